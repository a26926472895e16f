//! A write left in doubt, end to end (issue 14, write ids): the store applies a write and goes
//! away before its answer reaches the caller. A real session server (in-process, over a memory
//! store) sits behind a TCP relay that can lose the server's answers while it still forwards the
//! caller's requests, then cut the connection and refuse new ones (an outage as the caller sees
//! it). A second client, connected to the server directly, proves each time that the write was
//! in fact applied, so no test here passes without the case it is about.
//!
//! - The layer: the lost write is recorded offline in the snapshot cookie with its write id
//!   (`unsure_write_id`); once the store answers again, the `Restore` takes the version that
//!   write made for its own base and drops nothing. Another writer's change still wins.
//! - The client: a compare-and-set whose answer was lost, retried once the store is back, is
//!   recognised as applied (its write id on the stored session), not taken for a conflict.

mod support;

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::Path;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use http::StatusCode;
use parking_lot::Mutex;
use serde_json::json;
use session_client::{
    ClientConfig, FallbackMode, Patch, Session, SessionClient, SessionConfig, SessionData,
    SessionError, SessionLayer,
};
use session_proto::v1::session_store_server::SessionStoreServer;
use session_server::config::Settings;
use session_server::metrics::Metrics;
use session_server::service::{Limits, SessionService};
use session_server::store::memory::MemoryStore;
use support::app::{Reply, codec, send};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, watch};
use tokio::task::{AbortHandle, JoinHandle};
use tonic::Code;
use tonic::transport::server::TcpIncoming;

/// How long a condition polled for may take before the test fails.
const PATIENCE: Duration = Duration::from_secs(10);

/// The session server's own service over a fresh memory store, on `127.0.0.1:0`; its metrics
/// stay readable. Stopped on drop.
struct Server {
    /// Where it listens.
    addr: SocketAddr,
    /// The metrics its service records (`stickless_restores_total`, call counts).
    metrics: Metrics,
    /// Fires the shutdown.
    stop: Option<oneshot::Sender<()>>,
    /// Kept alive while the server runs (ends Watch streams when dropped).
    _watch_stop: watch::Sender<bool>,
    /// The serving task.
    task: JoinHandle<()>,
}

impl Server {
    async fn start() -> Server {
        let settings = Settings::default();
        let store = Arc::new(MemoryStore::new(settings.max_session_bytes));
        let limits = Limits {
            default_ttl: settings.default_ttl,
            max_ttl: settings.max_ttl,
            max_session_bytes: settings.max_session_bytes,
        };
        let metrics = Metrics::new();
        let (watch_stop, watch_rx) = watch::channel(false);
        let service = SessionService::new(store, limits, metrics.clone(), watch_rx);
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let signal = async {
                let _ = stopped.await;
            };
            tonic::transport::Server::builder()
                .add_service(SessionStoreServer::new(service))
                .serve_with_incoming_shutdown(TcpIncoming::from(listener), signal)
                .await
                .expect("session server failed");
        });
        Server {
            addr,
            metrics,
            stop: Some(stop),
            _watch_stop: watch_stop,
            task,
        }
    }

    /// A client connected to the server itself, not through any relay: the test's witness of
    /// what the store holds. Generous timeout, default retries.
    fn direct_client(&self) -> SessionClient {
        client_of(&format!("http://{}", self.addr), 2)
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

/// A client of `url` with `retries` extra tries 20 ms apart (doubling) and a per-call timeout
/// long enough that no call here ever times out: every failure it sees is the relay's cut.
fn client_of(url: &str, retries: u32) -> SessionClient {
    let mut config = ClientConfig::new(url);
    config.timeout = Duration::from_secs(20);
    config.connect_timeout = Duration::from_secs(5);
    config.retries = retries;
    config.backoff = Duration::from_millis(20);
    SessionClient::connect_lazy(config).expect("valid endpoint")
}

/// What the relay's tasks share with the test.
#[derive(Default)]
struct RelayState {
    /// Cut: the server's bytes are swallowed on open connections, new connections are closed at
    /// once; the caller's bytes still reach the server.
    cut: AtomicBool,
    /// The connections being relayed (their tasks own both sockets).
    open: Mutex<Vec<AbortHandle>>,
    /// Bytes of the server swallowed while cut.
    swallowed: AtomicU64,
    /// Connections closed at once while cut.
    refused: AtomicU64,
}

/// A TCP relay from `127.0.0.1:0` to the session server. Normally it forwards both ways; see
/// [`Relay::cut`], [`Relay::sever`], [`Relay::restore`].
struct Relay {
    /// Where callers connect.
    addr: SocketAddr,
    /// Shared with the relay's tasks.
    state: Arc<RelayState>,
    /// The accepting task.
    accept: JoinHandle<()>,
}

impl Relay {
    async fn start(to: SocketAddr) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(RelayState::default());
        let shared = state.clone();
        let accept = tokio::spawn(async move {
            loop {
                let Ok((caller, _)) = listener.accept().await else {
                    return;
                };
                // Checked and registered under the lock that `sever` takes, so a connection is
                // either refused or known to `sever`.
                let mut open = shared.open.lock();
                if shared.cut.load(Ordering::SeqCst) {
                    shared.refused.fetch_add(1, Ordering::SeqCst);
                    drop(caller);
                    continue;
                }
                let task = tokio::spawn(relay_one(caller, to, shared.clone()));
                open.push(task.abort_handle());
            }
        });
        Relay {
            addr,
            state,
            accept,
        }
    }

    /// `http://<addr>`.
    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// From now on the server's answers on open connections are swallowed (the caller's
    /// requests still reach it) and new connections are closed at once.
    fn cut(&self) {
        self.state.cut.store(true, Ordering::SeqCst);
    }

    /// Closes every open connection (the caller sees its call fail mid-way); the relay stays
    /// as it is (cut or not).
    fn sever(&self) {
        let mut open = self.state.open.lock();
        for task in open.drain(..) {
            task.abort();
        }
    }

    /// Back to normal: forwards both ways, accepts new connections.
    fn restore(&self) {
        let _open = self.state.open.lock();
        self.state.cut.store(false, Ordering::SeqCst);
    }

    /// Closes every open connection and is back to normal at once: the caller's next try
    /// (a retry after its backoff) gets through.
    fn sever_and_restore(&self) {
        let mut open = self.state.open.lock();
        self.state.cut.store(false, Ordering::SeqCst);
        for task in open.drain(..) {
            task.abort();
        }
    }

    fn swallowed(&self) -> u64 {
        self.state.swallowed.load(Ordering::SeqCst)
    }

    fn refused(&self) -> u64 {
        self.state.refused.load(Ordering::SeqCst)
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.accept.abort();
        self.sever();
    }
}

/// Relays one connection until either side closes it (or `sever` aborts it): the caller's
/// bytes always, the server's only while the relay is not cut.
async fn relay_one(caller: TcpStream, to: SocketAddr, state: Arc<RelayState>) {
    let Ok(server) = TcpStream::connect(to).await else {
        return;
    };
    let _ = caller.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (mut caller_read, mut caller_write) = caller.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    let up = async {
        let _ = tokio::io::copy(&mut caller_read, &mut server_write).await;
    };
    let down = async {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match server_read.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            if state.cut.load(Ordering::SeqCst) {
                state.swallowed.fetch_add(n as u64, Ordering::SeqCst);
                continue;
            }
            if caller_write.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    };
    tokio::select! {
        () = up => {}
        () = down => {}
    }
}

/// Polls `check` until it gives a value; fails the test after [`PATIENCE`].
async fn until<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + PATIENCE;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(Instant::now() < deadline, "gave up waiting: {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Returns once the relay has swallowed some of the server's answer (the answer was sent, so
/// closing the connection now loses it rather than racing it).
async fn swallowed(relay: &Relay) {
    until("the server's answer reached the relay", || async {
        (relay.swallowed() > 0).then_some(())
    })
    .await;
}

/// The stored session once it is at `version` (read by the direct client).
async fn stored_at(direct: &SessionClient, id: &str, version: u64) -> SessionData {
    until(&format!("the store holds version {version}"), || async {
        direct
            .get(id, false)
            .await
            .ok()
            .filter(|s| s.version == version)
    })
    .await
}

/// The cart a stored session holds (JSON, as the layer writes it).
fn cart_of(session: &SessionData) -> Vec<String> {
    session
        .attrs
        .get("cart")
        .map(|raw| serde_json::from_slice(raw).expect("a JSON cart"))
        .unwrap_or_default()
}

/// `POST /add/{item}` appends `item` to the cart, `POST /add-then-cut/{item}` too and then
/// cuts `relay` before the layer saves (after its load: the store answered the `Get`, and the
/// `Update` that carries the item is the first call whose answer is lost); `GET /cart` reads
/// it. Each answers `{cart, degraded}` (degraded: as loaded).
fn app(layer: SessionLayer, relay: Arc<Relay>) -> Router {
    async fn add(session: &Session, item: String) -> Result<serde_json::Value, SessionError> {
        let mut cart: Vec<String> = session.get("cart").await?.unwrap_or_default();
        cart.push(item);
        session.insert("cart", &cart).await?;
        let degraded = session.is_degraded().await?;
        Ok(json!({ "cart": cart, "degraded": degraded }))
    }
    async fn read(session: Session) -> Result<Response, SessionError> {
        let cart: Vec<String> = session.get("cart").await?.unwrap_or_default();
        let degraded = session.is_degraded().await?;
        Ok(axum::Json(json!({ "cart": cart, "degraded": degraded })).into_response())
    }
    Router::new()
        .route(
            "/add/{item}",
            post(|Path(item): Path<String>, session: Session| async move {
                add(&session, item).await.map(axum::Json)
            }),
        )
        .route(
            "/add-then-cut/{item}",
            post(
                move |Path(item): Path<String>, session: Session| async move {
                    let body = add(&session, item).await?;
                    relay.cut();
                    Ok::<_, SessionError>(axum::Json(body))
                },
            ),
        )
        .route("/cart", get(read))
        .layer(layer)
}

/// The layer's cookie names.
const SID: &str = "sid";
const SNAP: &str = "sid_snap";

/// A layer test's world: server, relay, the app behind the relay, the direct witness.
struct World {
    server: Server,
    relay: Arc<Relay>,
    layer: SessionLayer,
    app: Router,
    direct: SessionClient,
    codec: session_client::cookie::CookieCodec,
}

impl World {
    async fn new() -> World {
        let server = Server::start().await;
        let relay = Arc::new(Relay::start(server.addr).await);
        let key = [7u8; 32];
        let config = SessionConfig {
            fallback: FallbackMode::OnOutage,
            ..SessionConfig::default()
        };
        // One retry for the idempotent calls (the Get of a load): an outage is seen quickly.
        let layer =
            SessionLayer::with_config(client_of(&relay.url(), 1), Some(codec(&[key])), config);
        let app = app(layer.clone(), relay.clone());
        let direct = server.direct_client();
        World {
            server,
            relay,
            layer,
            app,
            direct,
            codec: codec(&[key]),
        }
    }

    /// Sends `method path` with the session's two cookies.
    async fn send(&self, method: &str, path: &str, sid: &str, snap: &str) -> Reply {
        send(&self.app, method, path, &[(SID, sid), (SNAP, snap)]).await
    }

    /// The steps both layer tests share, up to the outage: a session with item A confirmed by
    /// the store; B added with the relay cut right before the save (the store applies B, its
    /// answer is lost, the connection then breaks); C added while the store is unreachable.
    /// Returns the session id, the last snapshot cookie, and the version A made.
    async fn a_then_lost_b_then_offline_c(&self) -> (String, String, u64) {
        // A: the store makes the session and confirms it; the snapshot cookie comes with it.
        let first = send(&self.app, "POST", "/add/A", &[]).await;
        assert_eq!(first.status, StatusCode::OK, "{:?}", first.body);
        let (sid, snap_a) = (first.value(SID), first.value(SNAP));
        let stored_a = self.direct.get(&sid, false).await.expect("A stored");
        assert_eq!(cart_of(&stored_a), ["A"]);
        let base = stored_a.version;
        let snapshot = self.codec.decode(&snap_a).expect("a valid snapshot");
        assert_eq!(
            (snapshot.base_version, snapshot.offline_set.len()),
            (base, 0),
            "confirmed by the store"
        );

        // B: the handler cuts the relay before the save; the Update reaches the store, its
        // answer does not. Once the direct client sees B applied, the connection is closed.
        let (reply_b, stored_b) =
            tokio::join!(self.send("POST", "/add-then-cut/B", &sid, &snap_a), async {
                let stored = stored_at(&self.direct, &sid, base + 1).await;
                swallowed(&self.relay).await;
                self.relay.sever();
                stored
            });
        assert_eq!(cart_of(&stored_b), ["A", "B"], "the store applied B");
        assert!(
            !stored_b.write_id.is_empty(),
            "the layer's patch carried a write id"
        );
        assert!(self.relay.swallowed() > 0, "B's answer was swallowed");
        assert_eq!(reply_b.status, StatusCode::OK, "{:?}", reply_b.body);
        assert_eq!(reply_b.body["cart"], json!(["A", "B"]));
        let snap_b = reply_b.value(SNAP);
        let snapshot = self.codec.decode(&snap_b).expect("a valid snapshot");
        assert_eq!(
            snapshot.base_version, base,
            "the snapshot still stands on A's version"
        );
        assert_eq!(
            snapshot.offline_set,
            ["cart"],
            "B kept as an offline change"
        );
        assert_eq!(
            snapshot.unsure_write_id, stored_b.write_id,
            "the snapshot knows the write left in doubt is its own"
        );

        // C: the store is unreachable (the relay closes new connections): served from the
        // snapshot, recorded offline.
        let refused = self.relay.refused();
        let reply_c = self.send("POST", "/add/C", &sid, &snap_b).await;
        assert_eq!(reply_c.status, StatusCode::OK, "{:?}", reply_c.body);
        assert_eq!(
            (
                reply_c.body["cart"].clone(),
                reply_c.body["degraded"].clone()
            ),
            (json!(["A", "B", "C"]), json!(true)),
            "served from the snapshot"
        );
        assert!(self.relay.refused() > refused, "the store was unreachable");
        let snap_c = reply_c.value(SNAP);
        let snapshot = self.codec.decode(&snap_c).expect("a valid snapshot");
        assert_eq!(snapshot.base_version, base);
        assert_eq!(snapshot.unsure_write_id, stored_b.write_id, "kept");
        let still = self.direct.get(&sid, false).await.unwrap();
        assert_eq!(
            (still.version, cart_of(&still)),
            (base + 1, vec!["A".to_owned(), "B".to_owned()]),
            "C did not reach the store"
        );
        (sid, snap_c, base)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_layer_rebases_offline_changes_onto_its_own_write_whose_answer_was_lost() {
    let world = World::new().await;
    let (sid, snap, base) = world.a_then_lost_b_then_offline_c().await;

    // The store is back: the next request's load reads the session (at B's version, made by
    // the snapshot's own write) and restores the offline changes on top of it.
    world.relay.restore();
    let reply = world.send("GET", "/cart", &sid, &snap).await;
    assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.body);
    assert_eq!(
        (reply.body["cart"].clone(), reply.body["degraded"].clone()),
        (json!(["A", "B", "C"]), json!(false)),
        "served from the store, C included"
    );
    let stored = world.direct.get(&sid, false).await.unwrap();
    assert_eq!(
        cart_of(&stored),
        ["A", "B", "C"],
        "the store holds A, B and C"
    );
    assert_eq!(stored.version, base + 2, "B, then the rebased restore");
    assert_eq!(
        world.layer.dropped_offline_changes(),
        0,
        "no offline change dropped"
    );
    assert_eq!(world.server.metrics.restores("rebased"), 1);
    assert_eq!(world.server.metrics.restores("conflict"), 0);
    // The snapshot is confirmed again: no offline changes left.
    let snapshot = world
        .codec
        .decode(&reply.value(SNAP))
        .expect("a valid snapshot");
    assert_eq!(snapshot.base_version, base + 2);
    assert!(snapshot.offline_set.is_empty() && snapshot.unsure_write_id.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_writer_after_the_lost_write_still_wins() {
    let world = World::new().await;
    let (sid, snap, base) = world.a_then_lost_b_then_offline_c().await;

    // Another writer changes the session after B landed, before the store is back to the
    // layer: a plain update, no write id.
    let other = Patch {
        set: HashMap::from([("coupon".to_owned(), b"\"X\"".to_vec())]),
        ..Patch::default()
    };
    let written = world
        .direct
        .update(&sid, other)
        .await
        .expect("other writer");
    assert_eq!(written.version, base + 2);
    assert!(written.write_id.is_empty());

    world.relay.restore();
    let reply = world.send("GET", "/cart", &sid, &snap).await;
    assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.body);
    assert_eq!(
        reply.body["cart"],
        json!(["A", "B"]),
        "the store wins: C is dropped"
    );
    let stored = world.direct.get(&sid, false).await.unwrap();
    assert_eq!(cart_of(&stored), ["A", "B"]);
    assert_eq!(stored.attrs["coupon"], b"\"X\"");
    assert_eq!(stored.version, base + 2, "nothing applied by the restore");
    assert_eq!(
        world.layer.dropped_offline_changes(),
        1,
        "the offline changes were dropped"
    );
    assert_eq!(world.server.metrics.restores("conflict"), 1);
    assert_eq!(world.server.metrics.restores("rebased"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compare_and_set_whose_answer_was_lost_is_recognised_on_retry() {
    let server = Server::start().await;
    let relay = Relay::start(server.addr).await;
    let direct = server.direct_client();
    let through = client_of(&relay.url(), 2);
    let session = through
        .create(
            "cas",
            HashMap::from([("n".to_owned(), b"0".to_vec())]),
            None,
        )
        .await
        .expect("created through the relay");

    // The update reaches the store, its answer is swallowed; once the direct client sees it
    // applied, the connection is closed and the relay is back to normal for the retry.
    relay.cut();
    let patch = Patch {
        set: HashMap::from([("n".to_owned(), b"1".to_vec())]),
        expected_version: Some(session.version),
        ..Patch::default()
    };
    let (outcome, applied) = tokio::join!(through.update(&session.id, patch), async {
        let applied = stored_at(&direct, &session.id, session.version + 1).await;
        swallowed(&relay).await;
        relay.sever_and_restore();
        applied
    });
    assert_eq!(applied.attrs["n"], b"1", "the store applied the write");
    assert!(relay.swallowed() > 0, "its answer was swallowed");

    let updated = outcome.expect("the applied write is not a conflict");
    assert_eq!(updated.version, session.version + 1);
    assert_eq!(updated.attrs["n"], b"1");
    assert!(!updated.write_id.is_empty(), "the write carried a write id");
    assert_eq!(updated.write_id, applied.write_id, "its own write");

    // Applied exactly once: the retry reached the store and was refused (the version had
    // moved), and the store is where that one write left it.
    assert_eq!(server.metrics.calls("Update", Code::Ok), 1);
    assert_eq!(server.metrics.calls("Update", Code::Aborted), 1);
    let stored = direct.get(&session.id, false).await.unwrap();
    assert_eq!(
        (stored.version, &stored.attrs["n"][..]),
        (session.version + 1, &b"1"[..])
    );
}
