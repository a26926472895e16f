//! `SessionClient::watch`: typed events in order, a user filter, resubscription after a server
//! restart (a `Missed` marker, then the new subscription's events), on another configured
//! server when one is gone, and errors that will not heal ending the stream.
//!
//! Real session servers (`session_server::server::run` over a memory store) in-process; a
//! restarted server is bound to the address of the one it replaces, so the client's URL stays.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use session_client::watch::Stream;
use session_client::{
    ClientConfig, ClientError, EventKind, MissedReason, Patch, SessionClient, SessionEvent,
    WatchEvent, WatchStream,
};
use session_server::auth::{Rights, Scope, ScopedToken};
use session_server::config::Settings;
use session_server::metrics::Metrics;
use session_server::store::memory::MemoryStore;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// How long any one expected item may take.
const ITEM_WAIT: Duration = Duration::from_secs(20);

/// A running session server.
struct Server {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl Server {
    /// A server over `store` on `addr` (port 0: any). A fixed address may still be held by
    /// the server this one replaces for a moment: the bind is retried until a deadline.
    async fn start(addr: SocketAddr, settings: Settings, store: Arc<MemoryStore>) -> Server {
        let deadline = Instant::now() + Duration::from_secs(10);
        let listener = loop {
            match TcpListener::bind(addr).await {
                Ok(listener) => break listener,
                Err(e) if Instant::now() < deadline => {
                    eprintln!("bind {addr}: {e}; trying again");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => panic!("bind {addr}: {e}"),
            }
        };
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let shutdown = async {
                let _ = stopped.await;
            };
            session_server::server::run(listener, &settings, store, Metrics::new(), shutdown)
                .await
                .expect("session server failed");
        });
        Server {
            addr,
            stop: Some(stop),
            task,
        }
    }

    /// A server with default settings over a fresh memory store on any port.
    async fn fresh() -> Server {
        let settings = Settings::default();
        let store = Arc::new(MemoryStore::new(settings.max_session_bytes));
        Server::start("127.0.0.1:0".parse().unwrap(), settings, store).await
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Shuts it down (Watch streams end, the listener is closed) and waits until it is gone.
    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        tokio::time::timeout(Duration::from_secs(20), &mut self.task)
            .await
            .expect("server stops")
            .expect("server task");
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.task.abort();
    }
}

fn client_of(urls: &[String], namespace: &str, token: Option<&str>) -> SessionClient {
    let mut config = ClientConfig::new(urls.join(","));
    config.namespace = namespace.into();
    config.auth_token = token.map(str::to_owned);
    config.timeout = Duration::from_secs(20);
    config.connect_timeout = Duration::from_secs(5);
    SessionClient::connect_lazy(config).expect("valid config")
}

/// The next item, within [`ITEM_WAIT`]; `None` when the stream ended.
async fn next(stream: &mut WatchStream) -> Option<Result<WatchEvent, ClientError>> {
    let item = std::future::poll_fn(|cx| Pin::new(&mut *stream).poll_next(cx));
    tokio::time::timeout(ITEM_WAIT, item)
        .await
        .expect("an item within the wait")
}

/// The next item, which must be a session event.
async fn next_event(stream: &mut WatchStream) -> SessionEvent {
    match next(stream).await {
        Some(Ok(WatchEvent::Session(event))) => event,
        other => panic!("expected a session event, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_arrive_typed_and_in_order() {
    let server = Server::fresh().await;
    let client = client_of(&[server.url()], "app", None);
    let mut events = client.watch(None).await.expect("subscribed");
    let before = std::time::SystemTime::now();

    let made = client
        .create("alice", HashMap::new(), None)
        .await
        .expect("create");
    let patch = Patch {
        set: HashMap::from([("k".to_owned(), b"v".to_vec())]),
        ..Patch::default()
    };
    client.update(&made.id, patch).await.expect("update");
    assert!(client.delete(&made.id).await.expect("delete"));

    let seen = [
        next_event(&mut events).await,
        next_event(&mut events).await,
        next_event(&mut events).await,
    ];
    let kinds: Vec<_> = seen.iter().map(|e| (e.kind, e.version)).collect();
    assert_eq!(
        kinds[..2],
        [(EventKind::Created, 1), (EventKind::Updated, 2)],
        "{seen:?}"
    );
    assert_eq!(seen[2].kind, EventKind::Deleted, "{seen:?}");
    for event in &seen {
        assert_eq!(event.id, made.id);
        assert_eq!(event.user_id, "alice");
        assert_eq!(event.namespace, "app");
        assert!(
            event.at + Duration::from_secs(5) >= before,
            "event time {:?} is about now",
            event.at
        );
    }
    // Events of another namespace do not show.
    let other = client_of(&[server.url()], "elsewhere", None);
    other
        .create("alice", HashMap::new(), None)
        .await
        .expect("create elsewhere");
    let last = client
        .create("carol", HashMap::new(), None)
        .await
        .expect("create");
    let event = next_event(&mut events).await;
    assert_eq!((event.kind, event.id), (EventKind::Created, last.id));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_filter_shows_only_that_users_sessions() {
    let server = Server::fresh().await;
    let client = client_of(&[server.url()], "app", None);
    let mut alices = client.watch(Some("alice")).await.expect("subscribed");
    let mut all = client.watch(None).await.expect("subscribed");

    let bob = client
        .create("bob", HashMap::new(), None)
        .await
        .expect("create");
    let alice = client
        .create("alice", HashMap::new(), None)
        .await
        .expect("create");
    client.delete(&bob.id).await.expect("delete");
    client.delete(&alice.id).await.expect("delete");

    let first = next_event(&mut alices).await;
    let second = next_event(&mut alices).await;
    assert_eq!(
        [(first.kind, &first.id), (second.kind, &second.id)],
        [
            (EventKind::Created, &alice.id),
            (EventKind::Deleted, &alice.id)
        ]
    );
    let mut everyone = Vec::new();
    for _ in 0..4 {
        let event = next_event(&mut all).await;
        everyone.push((event.kind, event.user_id));
    }
    assert_eq!(
        everyone,
        [
            (EventKind::Created, "bob".to_owned()),
            (EventKind::Created, "alice".to_owned()),
            (EventKind::Deleted, "bob".to_owned()),
            (EventKind::Deleted, "alice".to_owned()),
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stream_subscribes_again_after_a_server_restart_and_says_events_were_missed() {
    let settings = Settings::default();
    let store = Arc::new(MemoryStore::new(settings.max_session_bytes));
    let server = Server::start(
        "127.0.0.1:0".parse().unwrap(),
        settings.clone(),
        store.clone(),
    )
    .await;
    let addr = server.addr;
    let client = client_of(&[server.url()], "app", None);
    let mut events = client.watch(None).await.expect("subscribed");
    let first = client
        .create("alice", HashMap::new(), None)
        .await
        .expect("create");
    assert_eq!(next_event(&mut events).await.id, first.id);

    server.stop().await;
    // Written while no server runs: lost to the watcher.
    let server = Server::start(addr, settings, store).await;
    assert_eq!(server.addr, addr, "same address");

    match next(&mut events).await {
        Some(Ok(WatchEvent::Interrupted(MissedReason::Reconnected))) => {}
        other => panic!("expected the interruption first, got {other:?}"),
    }
    match next(&mut events).await {
        Some(Ok(WatchEvent::Missed(MissedReason::Reconnected))) => {}
        other => panic!("expected the missed marker, got {other:?}"),
    }
    let second = client
        .create("bob", HashMap::new(), None)
        .await
        .expect("create on the new server");
    let event = next_event(&mut events).await;
    assert_eq!((event.kind, event.id), (EventKind::Created, second.id));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stream_moves_to_another_configured_server_when_its_own_is_gone() {
    let settings = Settings::default();
    let store = Arc::new(MemoryStore::new(settings.max_session_bytes));
    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let a = Server::start(any, settings.clone(), store.clone()).await;
    let b = Server::start(any, settings, store).await;
    let client = client_of(&[a.url(), b.url()], "app", None);
    let mut events = client.watch(None).await.expect("subscribed");
    // Both servers share the store: a write through either shows on the stream.
    let made = client
        .create("alice", HashMap::new(), None)
        .await
        .expect("create");
    assert_eq!(next_event(&mut events).await.id, made.id);

    // Stop both, then bring back only one: the stream finds it, whichever it was on.
    let (a_addr, b_addr) = (a.addr, b.addr);
    a.stop().await;
    b.stop().await;
    let settings = Settings::default();
    let store = Arc::new(MemoryStore::new(settings.max_session_bytes));
    let back = Server::start(b_addr, settings, store).await;
    assert_ne!(back.addr, a_addr);
    match next(&mut events).await {
        Some(Ok(WatchEvent::Interrupted(_))) => {}
        other => panic!("expected the interruption first, got {other:?}"),
    }
    match next(&mut events).await {
        Some(Ok(WatchEvent::Missed(_))) => {}
        other => panic!("expected the missed marker, got {other:?}"),
    }
    let later = client_of(&[back.url()], "app", None)
        .create("bob", HashMap::new(), None)
        .await
        .expect("create");
    let event = next_event(&mut events).await;
    assert_eq!((event.kind, event.id), (EventKind::Created, later.id));
}

/// A server whose only token reads namespace `demo`.
fn scoped_settings() -> Settings {
    Settings {
        auth_file_tokens: vec![ScopedToken::new(
            "demo-ro",
            Scope::new(Some(vec!["demo".into()]), Rights::ReadOnly),
        )],
        ..Settings::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_outside_the_tokens_scope_is_refused() {
    let settings = scoped_settings();
    let store = Arc::new(MemoryStore::new(settings.max_session_bytes));
    let server = Server::start("127.0.0.1:0".parse().unwrap(), settings, store).await;
    let client = client_of(&[server.url()], "shop", Some("demo-ro"));
    let refused = client.watch(None).await.expect_err("outside the scope");
    assert!(
        matches!(refused, ClientError::PermissionDenied(_)),
        "{refused:?}"
    );
    // Within the scope (read-only may watch), it is accepted.
    client
        .watch_namespace("demo", None)
        .await
        .expect("demo is in scope");
    let anonymous = client_of(&[server.url()], "demo", None);
    let refused = anonymous.watch(None).await.expect_err("no token");
    assert!(
        matches!(refused, ClientError::Unauthenticated(_)),
        "{refused:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_on_resubscription_ends_the_stream_with_the_error() {
    let open = Settings::default();
    let store = Arc::new(MemoryStore::new(open.max_session_bytes));
    let server = Server::start("127.0.0.1:0".parse().unwrap(), open, store.clone()).await;
    let addr = server.addr;
    // The token is ignored by a server without tokens, and outside the scope of the next one.
    let client = client_of(&[server.url()], "shop", Some("demo-ro"));
    let mut events = client.watch(None).await.expect("subscribed");
    server.stop().await;
    let _server = Server::start(addr, scoped_settings(), store).await;
    match next(&mut events).await {
        Some(Ok(WatchEvent::Interrupted(MissedReason::Reconnected))) => {}
        other => panic!("expected the interruption first, got {other:?}"),
    }
    match next(&mut events).await {
        Some(Err(ClientError::PermissionDenied(_))) => {}
        other => panic!("expected PERMISSION_DENIED, got {other:?}"),
    }
    assert!(next(&mut events).await.is_none(), "the stream ended");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watcher_that_fell_behind_is_told_and_subscribes_again() {
    let server = Server::fresh().await;
    let client = client_of(&[server.url()], "app", None);
    let mut events = client.watch(None).await.expect("subscribed");
    // Far more events than the store's event buffer (4096) plus what the HTTP/2 windows and
    // buffers hold (long user ids make the events large), while nobody reads the stream.
    const WRITES: usize = 12_000;
    let writers: Vec<_> = (0..8)
        .map(|w| {
            let client = client.clone();
            tokio::spawn(async move {
                for n in 0..WRITES / 8 {
                    client
                        .create(
                            &format!("{w}-{n}-{}", "u".repeat(240)),
                            HashMap::new(),
                            None,
                        )
                        .await
                        .expect("create");
                }
            })
        })
        .collect();
    for writer in writers {
        writer.await.expect("writer");
    }
    let mut delivered = 0;
    loop {
        match next(&mut events).await {
            Some(Ok(WatchEvent::Session(_))) => {
                delivered += 1;
                assert!(
                    delivered < WRITES,
                    "every event delivered: nobody fell behind"
                );
            }
            Some(Ok(WatchEvent::Interrupted(reason))) => {
                assert_eq!(reason, MissedReason::FellBehind);
                match next(&mut events).await {
                    Some(Ok(WatchEvent::Missed(MissedReason::FellBehind))) => {}
                    other => panic!("expected the missed marker, got {other:?}"),
                }
                eprintln!("{delivered} of {WRITES} events delivered before falling behind");
                break;
            }
            other => panic!("expected events then the missed marker, got {other:?}"),
        }
    }
    let after = client
        .create("zed", HashMap::new(), None)
        .await
        .expect("create");
    let event = next_event(&mut events).await;
    assert_eq!((event.kind, event.id), (EventKind::Created, after.id));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_stream_ends_the_call_on_the_server() {
    // One watcher per namespace: a second is refused while the first call lives.
    let settings = Settings {
        max_watchers_per_namespace: 1,
        ..Settings::default()
    };
    let store = Arc::new(MemoryStore::new(settings.max_session_bytes));
    let server = Server::start("127.0.0.1:0".parse().unwrap(), settings, store).await;
    let client = client_of(&[server.url()], "app", None);
    let first = client.watch(None).await.expect("subscribed");
    let refused = client.watch(None).await.expect_err("over the limit");
    assert!(
        matches!(
            refused,
            ClientError::Other {
                code: tonic::Code::ResourceExhausted,
                ..
            }
        ),
        "{refused:?}"
    );
    drop(first);
    // The server learns of the cancel shortly after: poll until the place is free.
    let deadline = Instant::now() + ITEM_WAIT;
    loop {
        match client.watch(None).await {
            Ok(_) => break,
            Err(e) if Instant::now() < deadline => {
                assert!(matches!(e, ClientError::Other { .. }), "{e:?}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("the dropped watcher still holds its place: {e:?}"),
        }
    }
}
