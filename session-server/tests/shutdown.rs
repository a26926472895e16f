//! Graceful shutdown and Watch, as README promises them: on SIGINT/SIGTERM the server stops
//! accepting, reports NOT_SERVING on health, ends Watch streams, lets in-flight calls finish (up
//! to `--shutdown-grace`), then exits 0; a watcher that falls behind gets RESOURCE_EXHAUSTED.
//!
//! In-process tests hold a call inside a store whose calls wait on a gate ([`GatedStore`]), so
//! a call is truly in flight when shutdown starts. The grace period lives in the binary
//! (`main.rs`), so it is tested there, with the store's replies held back by a TCP proxy in
//! front of the shared Redis ([`StallingProxy`]).

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt as _;
use session_proto::v1::session_store_client::SessionStoreClient;
use session_proto::v1::*;
use session_server::config::Settings;
use session_server::service::MAX_USER_ID_LEN;
use session_server::store::memory::MemoryStore;
use session_server::store::{
    EVENT_BUFFER, NewSession, Patch, SessionEvent, SessionRecord, SessionStore, StoreResult,
};
use support::harness::TestServer;
use support::process::ServerProcess;
use support::services;
use support::wait::eventually;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::sync::{broadcast, watch};
use tonic::Code;
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

const BINARY: &str = env!("CARGO_BIN_EXE_session-server");

/// Bound on every wait for something the test expects to happen: generous, for a loaded
/// 2-core machine.
const PATIENCE: Duration = Duration::from_secs(30);

/// The namespace whose calls [`GatedStore`] holds; calls of other namespaces pass.
const GATED: &str = "gated";

/// A memory store whose calls in namespace [`GATED`] announce that they entered, then wait
/// until the gate is opened: a store that blocks, so that a call is in flight when a test
/// wants one to be.
struct GatedStore {
    /// Where sessions really live.
    inner: MemoryStore,
    /// How many gated calls have entered the store so far.
    entered: watch::Sender<usize>,
    /// Whether gated calls may go on.
    open: watch::Sender<bool>,
}

impl GatedStore {
    fn new() -> Arc<GatedStore> {
        Arc::new(GatedStore {
            inner: MemoryStore::new(Settings::default().max_session_bytes),
            entered: watch::channel(0).0,
            open: watch::channel(false).0,
        })
    }

    /// Counts a call of `namespace` as entered and, if gated, waits for the gate.
    async fn pass(&self, namespace: &str) {
        if namespace != GATED {
            return;
        }
        self.entered.send_modify(|n| *n += 1);
        let mut open = self.open.subscribe();
        let _ = open.wait_for(|open| *open).await;
    }

    /// Waits until `count` gated calls have entered the store.
    async fn wait_entered(&self, count: usize) {
        let mut entered = self.entered.subscribe();
        tokio::time::timeout(PATIENCE, entered.wait_for(|n| *n >= count))
            .await
            .unwrap_or_else(|_| {
                panic!("{count} gated call(s) not in the store within {PATIENCE:?}")
            })
            .expect("gate alive");
    }

    /// Lets every gated call (held or to come) go on.
    fn release(&self) {
        self.open.send_replace(true);
    }
}

#[tonic::async_trait]
impl SessionStore for GatedStore {
    fn kind(&self) -> &'static str {
        "gated-memory"
    }
    fn epoch(&self) -> Arc<str> {
        self.inner.epoch()
    }
    async fn current_epoch(&self) -> StoreResult<Arc<str>> {
        self.inner.current_epoch().await
    }
    async fn create(&self, new: NewSession) -> StoreResult<SessionRecord> {
        self.pass(&new.namespace).await;
        self.inner.create(new).await
    }
    async fn get(&self, namespace: &str, id: &str, touch: bool) -> StoreResult<SessionRecord> {
        self.pass(namespace).await;
        self.inner.get(namespace, id, touch).await
    }
    async fn update(&self, namespace: &str, id: &str, patch: Patch) -> StoreResult<SessionRecord> {
        self.pass(namespace).await;
        self.inner.update(namespace, id, patch).await
    }
    async fn touch(
        &self,
        namespace: &str,
        id: &str,
        ttl: Option<Duration>,
    ) -> StoreResult<SessionRecord> {
        self.pass(namespace).await;
        self.inner.touch(namespace, id, ttl).await
    }
    async fn regenerate(
        &self,
        namespace: &str,
        old_id: &str,
        new_id: &str,
    ) -> StoreResult<SessionRecord> {
        self.pass(namespace).await;
        self.inner.regenerate(namespace, old_id, new_id).await
    }
    async fn delete(&self, namespace: &str, id: &str) -> StoreResult<bool> {
        self.pass(namespace).await;
        self.inner.delete(namespace, id).await
    }
    async fn list_by_user(
        &self,
        namespace: &str,
        user_id: &str,
    ) -> StoreResult<Vec<SessionRecord>> {
        self.pass(namespace).await;
        self.inner.list_by_user(namespace, user_id).await
    }
    async fn delete_by_user(&self, namespace: &str, user_id: &str) -> StoreResult<u64> {
        self.pass(namespace).await;
        self.inner.delete_by_user(namespace, user_id).await
    }
    async fn restore(&self, record: SessionRecord) -> StoreResult<SessionRecord> {
        self.pass(&record.namespace).await;
        self.inner.restore(record).await
    }
    fn subscribe(&self) -> broadcast::Receiver<SessionEvent> {
        self.inner.subscribe()
    }
}

/// A new connection to `addr` with no per-call timeout (a held call must not time out).
async fn connect(addr: std::net::SocketAddr) -> Channel {
    Channel::from_shared(format!("http://{addr}"))
        .expect("valid URI")
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .expect("connect to the server")
}

/// A health Watch of `service`, after its first answer, which must be SERVING.
async fn serving_health_watch(
    channel: Channel,
    service: &str,
) -> tonic::Streaming<tonic_health::pb::HealthCheckResponse> {
    let mut health = HealthClient::new(channel);
    let mut watch = health
        .watch(HealthCheckRequest {
            service: service.into(),
        })
        .await
        .expect("health Watch")
        .into_inner();
    let first = next_within(&mut watch, "the first health status").await;
    assert_eq!(first.status(), ServingStatus::Serving, "{service:?}");
    watch
}

/// The next message of `stream`, which must come (not an error, not the end) within
/// [`PATIENCE`].
async fn next_within<T>(stream: &mut tonic::Streaming<T>, what: &str) -> T {
    tokio::time::timeout(PATIENCE, stream.next())
        .await
        .unwrap_or_else(|_| panic!("{what}: nothing within {PATIENCE:?}"))
        .unwrap_or_else(|| panic!("{what}: the stream ended"))
        .unwrap_or_else(|status| panic!("{what}: {status}"))
}

/// The whole in-process shutdown story on `threads` serving threads: a call held inside the
/// store, a Watch and health watches open, then shutdown.
async fn shutdown_with_a_call_in_flight(threads: usize) {
    let settings = Settings {
        serve_threads: Some(threads),
        ..Settings::default()
    };
    let store = GatedStore::new();
    let server = TestServer::start(settings, store.clone()).await;
    let addr = server.addr;

    let health_all = serving_health_watch(connect(addr).await, "").await;
    let health_api = serving_health_watch(connect(addr).await, session_proto::SERVICE_NAME).await;
    let mut health = [(health_all, ""), (health_api, session_proto::SERVICE_NAME)];
    let mut watch = SessionStoreClient::new(connect(addr).await)
        .watch(WatchRequest::default())
        .await
        .expect("Watch")
        .into_inner();

    let mut client = SessionStoreClient::new(connect(addr).await);
    let in_flight = tokio::spawn(async move {
        let create = CreateRequest {
            namespace: GATED.into(),
            user_id: "in-flight".into(),
            ..Default::default()
        };
        client.create(create).await
    });
    store.wait_entered(1).await;

    // The server owns its shutdown from here; the task ends when it has stopped.
    let stopped = tokio::spawn(server.shutdown(Duration::from_secs(120)));

    for (stream, service) in &mut health {
        let status = next_within(stream, "the health status after shutdown").await;
        assert_eq!(status.status(), ServingStatus::NotServing, "{service:?}");
    }
    // Each health Watch ends after its NOT_SERVING (an open one never holds the drain).
    for (stream, service) in &mut health {
        let end = tokio::time::timeout(PATIENCE, stream.next())
            .await
            .unwrap_or_else(|_| panic!("the {service:?} health Watch did not end at shutdown"));
        assert!(
            !matches!(end, Some(Ok(_))),
            "{service:?}: nothing after NOT_SERVING"
        );
    }

    let end = tokio::time::timeout(PATIENCE, watch.next())
        .await
        .expect("the Watch stream ended at shutdown, with the call still in flight");
    assert!(end.is_none(), "the Watch ends cleanly (OK), got {end:?}");

    eventually("new connections refused", PATIENCE, || async {
        match tokio::net::TcpStream::connect(addr).await {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => Some(()),
            _ => None,
        }
    })
    .await;
    assert!(
        !stopped.is_finished() && !in_flight.is_finished(),
        "the server waits for the call held in the store"
    );

    store.release();
    let created = tokio::time::timeout(PATIENCE, in_flight)
        .await
        .expect("the in-flight call finished once the store let it")
        .expect("call task")
        .expect("the in-flight call succeeds, shutdown or not")
        .into_inner();
    assert_eq!(
        (created.namespace.as_str(), created.version),
        (GATED, 1),
        "{created:?}"
    );
    tokio::time::timeout(PATIENCE, stopped)
        .await
        .expect("the server stopped once the call finished")
        .expect("shutdown task")
        .expect("a clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_reports_not_serving_ends_watches_refuses_connections_and_finishes_in_flight_calls()
 {
    shutdown_with_a_call_in_flight(1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_on_serving_threads_finishes_in_flight_calls_the_same_way() {
    shutdown_with_a_call_in_flight(2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watcher_that_falls_behind_gets_resource_exhausted_then_the_stream_ends() {
    let settings = Settings::default();
    let store = Arc::new(MemoryStore::new(settings.max_session_bytes));
    let server = TestServer::start(settings, store.clone()).await;
    // A small HTTP/2 window, so that the server can push only a few hundred events ahead of a
    // watcher that does not read; the rest wait in the store's broadcast, which keeps
    // EVENT_BUFFER of them. Each event carries a user id of the longest allowed length, so that
    // every DATA frame is over h2's 256-byte "small frame" threshold: small unread frames
    // spend the client's own flood budget (window / 2) and h2 would end the connection with
    // ENHANCE_YOUR_CALM before the server's broadcast overflows.
    let channel = Channel::from_shared(format!("http://{}", server.addr))
        .expect("valid URI")
        .initial_stream_window_size(65_535)
        .initial_connection_window_size(65_535)
        .connect()
        .await
        .expect("connect");
    let mut watch = SessionStoreClient::new(channel)
        .watch(WatchRequest::default())
        .await
        .expect("Watch")
        .into_inner();

    // Four times the buffer, written while the watcher reads nothing: whatever the scheduling,
    // at most a window's worth (~200 events) leaves the broadcast, so it must overflow.
    let produced = 4 * EVENT_BUFFER;
    let created = store
        .create(NewSession {
            id: "lagginglagginglagginglagginglagg".into(),
            namespace: "default".into(),
            user_id: "u".repeat(MAX_USER_ID_LEN),
            attrs: Default::default(),
            ttl: Duration::from_secs(600),
        })
        .await
        .expect("create");
    for n in 1..produced {
        let patch = Patch {
            set: [("n".to_owned(), n.to_string().into_bytes())].into(),
            ..Patch::default()
        };
        store
            .update("default", &created.id, patch)
            .await
            .expect("update");
    }

    let mut versions = Vec::new();
    let status = loop {
        match tokio::time::timeout(PATIENCE, watch.next()).await {
            Ok(Some(Ok(event))) => versions.push(event.version),
            Ok(Some(Err(status))) => break status,
            Ok(None) => panic!(
                "the stream ended without an error after {} events",
                versions.len()
            ),
            Err(_) => panic!(
                "no error within {PATIENCE:?} after {} events",
                versions.len()
            ),
        }
    };
    assert_eq!(status.code(), Code::ResourceExhausted, "{status}");
    assert!(status.message().contains("behind"), "{status}");
    assert!(
        versions.len() < produced - EVENT_BUFFER,
        "{} of {produced} events delivered before the error",
        versions.len()
    );
    assert!(
        versions.windows(2).all(|w| w[0] < w[1]),
        "the events before the error are in write order"
    );
    let after = tokio::time::timeout(PATIENCE, watch.next())
        .await
        .expect("the stream ends after the error");
    assert!(after.is_none(), "nothing after the error: {after:?}");
}

/// A TCP proxy in front of the shared Redis that passes everything until a connection carries
/// `marker` (in a command's arguments); from then on it holds back Redis's replies on that
/// connection until [`StallingProxy::release`]: a store call that is in flight and stays so.
struct StallingProxy {
    /// Where the session server connects instead of Redis.
    addr: std::net::SocketAddr,
    /// Turns true once a command carrying the marker went by.
    entered: watch::Receiver<bool>,
    /// Opened by `release`.
    open: watch::Sender<bool>,
    /// The accept loop, aborted on drop (its connections end with the server).
    task: tokio::task::JoinHandle<()>,
}

impl StallingProxy {
    async fn start(redis: &str, marker: &str) -> StallingProxy {
        let redis = redis.trim_start_matches("redis://").to_owned();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind loopback");
        let addr = listener.local_addr().expect("local address");
        let (entered_tx, entered) = watch::channel(false);
        let entered_tx = Arc::new(entered_tx);
        let open = watch::channel(false).0;
        let (marker, gate) = (marker.as_bytes().to_vec(), open.clone());
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(upstream) = tokio::net::TcpStream::connect(&redis).await else {
                    continue;
                };
                let (entered, marker, gate) = (entered_tx.clone(), marker.clone(), gate.clone());
                tokio::spawn(proxy_connection(client, upstream, marker, entered, gate));
            }
        });
        StallingProxy {
            addr,
            entered,
            open,
            task,
        }
    }

    /// The `--redis-url` that goes through the proxy.
    fn url(&self) -> String {
        format!("redis://{}", self.addr)
    }

    /// Waits until a command with the marker reached the proxy.
    async fn wait_entered(&mut self) {
        tokio::time::timeout(PATIENCE, self.entered.wait_for(|e| *e))
            .await
            .expect("the marked call reached the store within the deadline")
            .expect("proxy alive");
    }

    /// Lets the held replies (and all later ones) through.
    fn release(&self) {
        self.open.send_replace(true);
    }
}

impl Drop for StallingProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// One proxied connection: commands pass at once; replies stop once `marker` went upstream, until
/// `gate` opens.
async fn proxy_connection(
    client: tokio::net::TcpStream,
    upstream: tokio::net::TcpStream,
    marker: Vec<u8>,
    entered: Arc<watch::Sender<bool>>,
    gate: watch::Sender<bool>,
) {
    let (mut client_read, mut client_write) = client.into_split();
    let (mut upstream_read, mut upstream_write) = upstream.into_split();
    let stalled = watch::channel(false).0;
    let stall = stalled.clone();
    let commands = async move {
        let (mut seen, mut chunk) = (Vec::new(), vec![0u8; 16 * 1024]);
        while let Ok(n @ 1..) = client_read.read(&mut chunk).await {
            seen.extend_from_slice(&chunk[..n]);
            // Marked before the command goes on, so its reply cannot slip through first.
            if seen.windows(marker.len()).any(|w| w == marker.as_slice()) {
                stall.send_replace(true);
                entered.send_replace(true);
            }
            if upstream_write.write_all(&chunk[..n]).await.is_err() {
                break;
            }
        }
    };
    let replies = async move {
        let mut chunk = vec![0u8; 16 * 1024];
        while let Ok(n @ 1..) = upstream_read.read(&mut chunk).await {
            if *stalled.borrow() {
                let _ = gate.subscribe().wait_for(|open| *open).await;
            }
            if client_write.write_all(&chunk[..n]).await.is_err() {
                break;
            }
        }
    };
    tokio::join!(commands, replies);
}

/// Starts the binary on Redis through `proxy`, with a store timeout no test outlives (so only
/// shutdown can end a held call) and the given grace.
fn start_binary_through(proxy: &StallingProxy, grace: &str) -> ServerProcess {
    let url = proxy.url();
    let args = [
        "--listen",
        "127.0.0.1:0",
        "--store",
        "redis",
        "--redis-url",
        &url,
        "--redis-prefix",
        &services::unique_prefix("shutdown"),
        "--redis-pool-size",
        "1",
        "--store-timeout",
        "1h",
        "--shutdown-grace",
        grace,
    ];
    ServerProcess::start(BINARY.as_ref(), &args, &["grpc"])
}

/// A Create of user `marker`, started now, on a connection of its own.
async fn create_in_background(
    url: String,
    marker: &str,
) -> tokio::task::JoinHandle<Result<tonic::Response<Session>, tonic::Status>> {
    let mut client = SessionStoreClient::connect(url).await.expect("connect");
    let create = CreateRequest {
        user_id: marker.into(),
        ..Default::default()
    };
    tokio::spawn(async move { client.create(create).await })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_on_sigterm_waits_for_a_call_in_flight_then_exits_0() {
    let test = "binary_on_sigterm_waits_for_a_call_in_flight_then_exits_0";
    let Some(redis) = services::redis_url(test) else {
        return;
    };
    let marker = services::unique_prefix("in-flight-user");
    let mut proxy = StallingProxy::start(&redis, &marker).await;
    // A grace far beyond the test: only the call's end can let the server go.
    let mut server = start_binary_through(&proxy, "1h");
    let call = create_in_background(server.grpc_url(), &marker).await;
    proxy.wait_entered().await;

    server.terminate();
    let addr = server.address("grpc");
    eventually(
        "new connections refused after SIGTERM",
        PATIENCE,
        || async {
            match tokio::net::TcpStream::connect(addr).await {
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => Some(()),
                _ => None,
            }
        },
    )
    .await;
    assert!(!call.is_finished(), "the call is still held in the store");

    proxy.release();
    let created = tokio::time::timeout(PATIENCE, call)
        .await
        .expect("the call finished once the store answered")
        .expect("call task")
        .expect("the in-flight call succeeds although SIGTERM came first")
        .into_inner();
    assert_eq!(created.user_id, marker);
    let status = tokio::task::block_in_place(|| server.wait_exit(PATIENCE));
    assert_eq!(status.code(), Some(0), "{status}");
    let logs = server.stderr_after_exit();
    assert!(logs.contains("SIGTERM received"), "{logs}");
    assert!(!logs.contains("exiting anyway"), "{logs}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_cuts_off_a_call_still_in_flight_when_the_grace_ends_and_exits_0() {
    let test = "binary_cuts_off_a_call_still_in_flight_when_the_grace_ends_and_exits_0";
    let Some(redis) = services::redis_url(test) else {
        return;
    };
    let marker = services::unique_prefix("cut-off-user");
    let mut proxy = StallingProxy::start(&redis, &marker).await;
    let grace = Duration::from_secs(1);
    let mut server = start_binary_through(&proxy, "1s");
    let call = create_in_background(server.grpc_url(), &marker).await;
    proxy.wait_entered().await;

    let signalled = Instant::now();
    server.terminate();
    let status = tokio::task::block_in_place(|| server.wait_exit(PATIENCE));
    let took = signalled.elapsed();
    assert_eq!(status.code(), Some(0), "{status}");
    assert!(
        took >= grace,
        "exited {took:?} after SIGTERM, before the grace ended"
    );
    let logs = server.stderr_after_exit();
    assert!(logs.contains("exiting anyway"), "{logs}");

    // The store never answered (the proxy still holds its reply): the call ends with the
    // process, as a transport error (the connection broke: UNKNOWN or UNAVAILABLE by how it
    // broke), never as a success.
    let result = tokio::time::timeout(PATIENCE, call)
        .await
        .expect("the cut-off call ended with the server")
        .expect("call task");
    let status = result.expect_err("a call cut off at the grace's end cannot succeed");
    assert!(
        matches!(status.code(), Code::Unavailable | Code::Unknown),
        "{status}"
    );
}
