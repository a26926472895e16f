//! Issue 12 end to end: the signed-snapshot fallback keeps its two promises against real
//! session servers over every store (memory, Redis, MySQL), with the network under the test's
//! control.
//!
//! - **A logout sticks** (through `session-proxy`'s lookup plugin and `demo-app --sessions
//!   proxy`): the cookies copied before a logout bring nobody back, also after the session
//!   server restarted over the same data (same epoch). A memory store that restarted lost its
//!   data (another epoch): there a replay within `--snapshot-max-age` of the snapshot is
//!   restored, which is the residual risk the README states, and a replay past it is refused,
//!   which is its bound.
//! - **The store wins** (session-client's layer): an administrator's change made in the store
//!   while a backend is partitioned from it is never undone by the offline changes that
//!   backend kept in the snapshot; offline changes are applied when nobody changed the store.
//! - **A store that lost its data** gets its live sessions back from their snapshots.
//! - **A logout during an outage** clears the cookies at once and deletes the session once the
//!   store answers again; the copied cookies bring nobody back.
//!
//! Real pieces, all in this process so the test controls the network: session servers
//! (`session_server::server::run`) over each store, a TCP relay (proxy-plugin's test relay)
//! between the backends and the session server (a partition the administrator, who talks to the server
//! directly, does not see; a restarted server behind the same URL), the demo app, the proxy,
//! and a small axum app on `session_client::SessionLayer` whose sessions hold a `role`.
//!
//! Redis (127.0.0.1:6379) and MariaDB (127.0.0.1:3306, db `test`) follow the skip rule: a
//! missing one prints `SKIPPED <test>: why`, or fails under `STICKLESS_REQUIRE_SERVICES=1`.
//! Every test has its own Redis key prefix or MySQL table, removed at its end.

#[path = "../../proxy-plugin/tests/support/relay.rs"]
mod relay;
#[path = "support/stores.rs"]
mod stores;
mod support;

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use demo::{DemoConfig, Sessions};
use proxy_plugin::balance::BalanceMode;
use proxy_plugin::config::{
    BackendConfig, HealthCheckKind, HealthConfig, Limits, LookupConfig, LookupFailure, ProxyConfig,
    SnapshotKey,
};
use proxy_plugin::proxy::Proxy;
use serde_json::{Value, json};
use session_client::cookie::{
    CookieCodec, CookieKey, Encryption, KeyRing, Snapshot, SnapshotPolicy,
};
use session_client::{
    ClientError, FallbackMode, Patch, Session, SessionClient, SessionConfig, SessionData,
    SessionError, SessionLayer,
};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use relay::Relay;
use stores::{Kind, Server, StoreSpec, client_of};

/// The namespace of every session here.
const NS: &str = "shop";

/// The cookie key material the proxy and the backends share.
const KEY: [u8; 32] = [0x6b; 32];

/// A well-formed id no session has: a read of it tells whether the store answers.
const PROBE_ID: &str = "PROBEPROBEPROBEPROBEPROBEPROBE00";

/// How long a poll for a condition may take before the test fails (generous: a loaded
/// 2-core machine).
const DEADLINE: Duration = Duration::from_secs(15);

/// The snapshot max age of the proxy that shows the bound on the residual risk.
const SHORT_MAX_AGE: Duration = Duration::from_secs(3);

// ---------------------------------------------------------------------------------------------
// The world: a session server over a store, the relay the backends reach it through, and the
// administrator's client straight to it.
// ---------------------------------------------------------------------------------------------

/// A session server and the ways to it. Fields drop in order: the relay and the server go
/// before the store's data is cleaned up.
struct World {
    /// What the backends reach the session server through.
    relay: Relay,
    /// The running server (`None` only during a restart).
    server: Option<Server>,
    /// The administrator's client, straight to the server: never partitioned.
    admin: SessionClient,
    /// Where the data lives; cleaned up when dropped.
    spec: StoreSpec,
}

impl World {
    /// A session server over a store of `kind`, or `None` when that store's service is
    /// missing (skipped, or a failure under `STICKLESS_REQUIRE_SERVICES=1`).
    async fn start(kind: Kind, test: &str) -> Option<World> {
        init_tracing();
        let spec = StoreSpec::open(kind, test).await?;
        let server = Server::start(spec.build().await, spec.settings()).await;
        let relay = Relay::start(server.addr).await;
        let admin = server.client(NS);
        Some(World {
            relay,
            admin,
            server: Some(server),
            spec,
        })
    }

    /// `http://` URL of the session server as the backends know it (the relay).
    fn backend_url(&self) -> String {
        self.relay.url()
    }

    /// Stops the session server and starts a new one over the same store settings: the same
    /// data and epoch for Redis and MySQL, none (and a new epoch) for memory. The backends'
    /// URL stays the same; the administrator gets a client of the new server.
    async fn restart(&mut self) {
        self.relay.cut();
        if let Some(server) = self.server.take() {
            server.stop().await;
        }
        let server = Server::start(self.spec.build().await, self.spec.settings()).await;
        self.relay.forward_to(server.addr);
        self.admin = server.client(NS);
        self.server = Some(server);
    }

    /// The backends can no longer reach the session server; the administrator still can.
    fn partition(&self) {
        self.relay.cut();
    }

    /// The backends reach the session server again.
    fn heal(&self) {
        let server = self.server.as_ref().expect("a running server");
        self.relay.forward_to(server.addr);
    }

    /// The sessions of `user` as the store lists them.
    async fn sessions_of(&self, user: &str) -> Vec<SessionData> {
        self.admin
            .list_by_user(user)
            .await
            .unwrap_or_else(|e| panic!("ListByUser {user}: {e}"))
    }

    /// Session `id` as stored, `None` when the store has none.
    async fn stored(&self, id: &str) -> Option<SessionData> {
        match self.admin.get(id, false).await {
            Ok(session) => Some(session),
            Err(ClientError::NotFound { .. }) => None,
            Err(error) => panic!("Get {id}: {error}"),
        }
    }

    /// The store's epoch now, as a NOT_FOUND answer carries it.
    async fn epoch(&self) -> String {
        match self.admin.get(PROBE_ID, false).await {
            Err(ClientError::NotFound { epoch: Some(epoch) }) => epoch,
            other => panic!("a NOT_FOUND with the store's epoch, got {other:?}"),
        }
    }
}

/// Logs of the pieces under `RUST_LOG`, for a failing run.
fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

/// Polls `probe` until it gives a value; fails the test past [`DEADLINE`].
async fn eventually<T, F, Fut>(what: &str, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + DEADLINE;
    loop {
        if let Some(value) = probe().await {
            return value;
        }
        assert!(Instant::now() < deadline, "{what}: not within {DEADLINE:?}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// An app served on a loopback port, stopped when dropped.
struct Served {
    /// Where it listens.
    addr: SocketAddr,
    /// The serving task.
    task: JoinHandle<()>,
}

impl Served {
    async fn start(app: Router) -> Served {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind loopback");
        let addr = listener.local_addr().expect("local address");
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Served { addr, task }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        self.task.abort();
    }
}

// ---------------------------------------------------------------------------------------------
// A browser's cookies, and responses.
// ---------------------------------------------------------------------------------------------

/// The cookies a browser holds for the site (name to value); copied to replay them.
#[derive(Debug, Clone, Default)]
struct Jar(BTreeMap<String, String>);

impl Jar {
    /// A jar holding one cookie.
    fn with(name: &str, value: &str) -> Jar {
        Jar(BTreeMap::from([(name.to_owned(), value.to_owned())]))
    }

    /// The `Cookie` header.
    fn header(&self) -> String {
        self.0
            .iter()
            .map(|(n, v)| format!("{n}={v}"))
            .collect::<Vec<_>>()
            .join("; ")
    }

    fn get(&self, name: &str) -> Option<&str> {
        self.0.get(name).map(String::as_str)
    }

    /// Takes what a response's `Set-Cookie` lines say, as a browser would.
    fn take(&mut self, reply: &Reply) {
        for line in &reply.set_cookies {
            let (name, value) = cookie_pair(line);
            if is_removal(line) {
                self.0.remove(name);
            } else {
                self.0.insert(name.to_owned(), value.to_owned());
            }
        }
    }
}

/// Name and value of a `Set-Cookie` line.
fn cookie_pair(line: &str) -> (&str, &str) {
    let pair = line.split(';').next().unwrap_or(line);
    pair.split_once('=').unwrap_or((pair, ""))
}

/// Whether a `Set-Cookie` line removes its cookie (empty value or `Max-Age=0`).
fn is_removal(line: &str) -> bool {
    let (_, value) = cookie_pair(line);
    value.is_empty()
        || line
            .split(';')
            .skip(1)
            .any(|a| a.trim().eq_ignore_ascii_case("max-age=0"))
}

/// A response as the tests need it.
#[derive(Debug)]
struct Reply {
    status: StatusCode,
    set_cookies: Vec<String>,
    /// The body as JSON (`Null` when it is not JSON).
    body: Value,
}

impl Reply {
    /// Whether the response removes cookie `name`.
    fn removes(&self, name: &str) -> bool {
        self.set_cookies
            .iter()
            .any(|line| cookie_pair(line).0 == name && is_removal(line))
    }

    /// The body's string field `field`.
    fn text(&self, field: &str) -> Option<&str> {
        self.body.get(field).and_then(Value::as_str)
    }

    /// The body's field `field` as strings (an array).
    fn list(&self, field: &str) -> Vec<String> {
        self.body
            .get(field)
            .and_then(Value::as_array)
            .map(|items| {
                items
                    .iter()
                    .filter_map(|i| i.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// A client that never uses a system proxy.
fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(20))
        .build()
        .expect("reqwest client")
}

/// `method url` with the jar's cookies and, when given, a JSON body.
async fn send(
    http: &reqwest::Client,
    method: reqwest::Method,
    url: String,
    jar: &Jar,
    body: Option<Value>,
) -> Reply {
    let mut request = http.request(method.clone(), &url);
    if !jar.0.is_empty() {
        request = request.header("cookie", jar.header());
    }
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request
        .send()
        .await
        .unwrap_or_else(|e| panic!("{method} {url}: {e}"));
    let status = response.status();
    let set_cookies = response
        .headers()
        .get_all("set-cookie")
        .iter()
        .map(|v| v.to_str().expect("ascii cookie").to_owned())
        .collect();
    let text = response.text().await.unwrap_or_default();
    Reply {
        status,
        set_cookies,
        body: serde_json::from_str(&text).unwrap_or(Value::Null),
    }
}

/// The codec the backends share (signing only: the test reads the snapshots it carries).
fn codec() -> CookieCodec {
    let key = CookieKey::new(&KEY).expect("cookie key");
    CookieCodec::new(KeyRing::new(vec![key]).expect("key ring"), Encryption::None)
}

// ---------------------------------------------------------------------------------------------
// Logout sticks: session-proxy's lookup plugin in front of `demo-app --sessions proxy`.
// ---------------------------------------------------------------------------------------------

/// The proxy in front of `backend`, its lookup plugin reaching the session server at
/// `session_url`, with snapshot keys [`KEY`] and `snapshot_max_age`.
async fn start_proxy(backend: &Served, session_url: &str, snapshot_max_age: Duration) -> Served {
    let lookup = LookupConfig {
        session_servers: vec![session_url.to_owned()],
        namespace: NS.to_owned(),
        cookie: "sid".to_owned(),
        attrs: vec!["cart".to_owned()],
        on_failure: LookupFailure::Open,
        auth_token: None,
        timeout: Duration::from_secs(2),
        snapshot_keys: vec![SnapshotKey(KEY.to_vec())],
        snapshot_cookie: "sid_snap".to_owned(),
        session_header: None,
        snapshot_max_age,
        outage_grace: Duration::from_secs(5),
        cache: 0,
        tls: None,
    };
    let config = ProxyConfig {
        listen: "127.0.0.1:0".parse().expect("address"),
        admin_listen: None,
        admin_token: None,
        backends: vec![BackendConfig {
            name: "demo".to_owned(),
            authority: backend.addr.to_string(),
            weight: 1,
            tls: false,
        }],
        balance: BalanceMode::RoundRobin,
        trusted_proxies: Vec::new(),
        allow_underscore_headers: false,
        client_limits: proxy_plugin::config::ClientLimits::default(),
        health: HealthConfig {
            kind: HealthCheckKind::Off,
            interval: Duration::from_millis(100),
            timeout: Duration::from_millis(300),
            rise: 1,
            fall: 1,
            max_fails: 1,
            fail_timeout: Duration::from_secs(10),
        },
        limits: Limits {
            header_read_timeout: Duration::from_secs(5),
            max_header_bytes: 16 * 1024,
            max_body_bytes: 1024 * 1024,
            connect_timeout: Duration::from_secs(1),
            response_timeout: Duration::from_secs(10),
            max_connections: 100,
            max_tries: 3,
            retry_buffer_bytes: 64 * 1024,
            ..Limits::default()
        },
        lookup: Some(lookup),
        tls: None,
        backend_ca: None,
    };
    let proxy: Arc<Proxy> = Proxy::new(config).expect("valid proxy config");
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind loopback");
    let addr = listener.local_addr().expect("local address");
    let task = tokio::spawn(async move {
        let _ = proxy.serve(listener, std::future::pending::<()>()).await;
    });
    Served { addr, task }
}

/// `demo-app --sessions proxy` writing through the session server at `session_url`, with the
/// proxy's cookie key.
async fn start_demo(session_url: &str) -> Served {
    let mut config = DemoConfig::new("s1", Sessions::Proxy(session_url.to_owned()));
    config.secure_cookies = false;
    config.namespace = NS.to_owned();
    config.cookie_keys = vec![KEY.to_vec()];
    Served::start(demo::app(&config).await.expect("demo app")).await
}

/// Waits until `proxy`'s lookups reach the session server: a session made by the
/// administrator (with no snapshot to stand in for it) is seen by the demo behind it.
async fn proxy_reaches_store(http: &reqwest::Client, proxy: &Served, world: &World) {
    let canary = world
        .admin
        .create("canary", HashMap::new(), None)
        .await
        .expect("create the canary session");
    let jar = Jar::with("sid", &canary.id);
    eventually("the proxy's lookups reach the session server", || async {
        let me = send(http, reqwest::Method::GET, proxy.url("/me"), &jar, None).await;
        (me.status == StatusCode::OK && me.text("user") == Some("canary")).then_some(())
    })
    .await;
}

/// `user` logs in through `proxy`, makes a request, and logs out; returns the cookies copied
/// just before the logout, and when they were copied. Asserts that the logout expires both
/// cookies, and that replaying the copied ones while the store is up logs nobody in and
/// leaves no session of `user` in the store.
async fn log_in_copy_log_out(
    http: &reqwest::Client,
    proxy: &Served,
    world: &World,
    user: &str,
) -> (Jar, Instant) {
    let mut jar = Jar::default();
    let login = send(
        http,
        reqwest::Method::POST,
        proxy.url("/login"),
        &jar,
        Some(json!({ "user": user })),
    )
    .await;
    assert_eq!(login.status, StatusCode::OK, "login: {login:?}");
    jar.take(&login);
    let me = send(http, reqwest::Method::GET, proxy.url("/me"), &jar, None).await;
    assert_eq!(me.status, StatusCode::OK, "{me:?}");
    assert_eq!(me.text("user"), Some(user));
    jar.take(&me);
    assert!(
        jar.get("sid").is_some() && jar.get("sid_snap").is_some(),
        "the browser holds the session and its snapshot: {jar:?}"
    );
    let copied = jar.clone();
    let copied_at = Instant::now();
    let id = jar.get("sid").expect("sid").to_owned();
    assert_eq!(
        world.sessions_of(user).await.len(),
        1,
        "{user} is logged in"
    );

    let out = send(
        http,
        reqwest::Method::POST,
        proxy.url("/logout"),
        &jar,
        None,
    )
    .await;
    assert_eq!(out.status, StatusCode::OK, "logout: {out:?}");
    assert!(
        out.removes("sid") && out.removes("sid_snap"),
        "the logout expires both cookies: {:?}",
        out.set_cookies
    );
    jar.take(&out);
    assert!(jar.0.is_empty(), "nothing of the session is left: {jar:?}");
    assert!(world.stored(&id).await.is_none(), "the session is deleted");

    let replay = send(http, reqwest::Method::GET, proxy.url("/me"), &copied, None).await;
    assert_eq!(
        replay.status,
        StatusCode::UNAUTHORIZED,
        "the copied cookies of {user} replayed after the logout: {replay:?}"
    );
    assert!(
        world.sessions_of(user).await.is_empty(),
        "no session of {user}"
    );
    (copied, copied_at)
}

async fn logout_sticks(kind: Kind, test: &str) {
    let Some(mut world) = World::start(kind, test).await else {
        return;
    };
    let http = http();
    let demo = start_demo(&world.backend_url()).await;
    let proxy = start_proxy(&demo, &world.backend_url(), Duration::from_secs(3600)).await;
    let (alice, _) = log_in_copy_log_out(&http, &proxy, &world, "alice").await;

    if kind != Kind::Memory {
        // The server restarts over the same data: the same epoch, and the deleted session is
        // still deleted.
        let epoch = world.epoch().await;
        world.restart().await;
        assert_eq!(world.epoch().await, epoch, "same data, same epoch");
        proxy_reaches_store(&http, &proxy, &world).await;
        let replay = send(&http, reqwest::Method::GET, proxy.url("/me"), &alice, None).await;
        assert_eq!(
            replay.status,
            StatusCode::UNAUTHORIZED,
            "copied cookies after a logout and a restart: {replay:?}"
        );
        assert!(
            world.sessions_of("alice").await.is_empty(),
            "the logged-out session stays out of the store"
        );
        return;
    }

    // A memory store that restarts loses its data, tombstones included: the residual case.
    // Its bound: a proxy with a short snapshot max age refuses snapshots older than that.
    let short = start_proxy(&demo, &world.backend_url(), SHORT_MAX_AGE).await;
    let (bea, bea_copied_at) = log_in_copy_log_out(&http, &short, &world, "bea").await;
    let epoch = world.epoch().await;
    world.restart().await;
    assert_ne!(
        world.epoch().await,
        epoch,
        "a restarted memory store is a new epoch"
    );
    proxy_reaches_store(&http, &proxy, &world).await;
    proxy_reaches_store(&http, &short, &world).await;

    // The residual risk, as the README states it: cookies copied before a logout and replayed
    // after the store lost its data, within the snapshot max age, bring the session back.
    let replay = send(&http, reqwest::Method::GET, proxy.url("/me"), &alice, None).await;
    assert_eq!(
        (replay.status, replay.text("user")),
        (StatusCode::OK, Some("alice")),
        "within the max age, a store that lost its data takes the snapshot back: {replay:?}"
    );
    let restored = world.sessions_of("alice").await;
    assert_eq!(
        restored.iter().map(|s| s.id.as_str()).collect::<Vec<_>>(),
        vec![alice.get("sid").expect("sid")],
        "restored into the store under its id"
    );

    // The bound: past the max age the same replay is refused.
    let past = bea_copied_at + SHORT_MAX_AGE + Duration::from_millis(300);
    tokio::time::sleep_until(past.into()).await;
    let replay = send(&http, reqwest::Method::GET, short.url("/me"), &bea, None).await;
    assert_eq!(
        replay.status,
        StatusCode::UNAUTHORIZED,
        "a snapshot past --snapshot-max-age brings nobody back: {replay:?}"
    );
    assert!(
        world.sessions_of("bea").await.is_empty(),
        "and nothing is restored"
    );
}

// ---------------------------------------------------------------------------------------------
// The layer: a small app on session_client::SessionLayer with the snapshot fallback.
// ---------------------------------------------------------------------------------------------

/// The app's state: a clone of the layer's client (the same connection), for `/ping`.
#[derive(Clone)]
struct AppState {
    store: SessionClient,
}

/// `POST /login?user=`: a new session id, the user, and `role=admin`.
async fn app_login(
    session: Session,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Response, SessionError> {
    let user = query.get("user").cloned().unwrap_or_default();
    session.regenerate().await?;
    session.set_user(user.clone()).await?;
    session.insert("role", &"admin").await?;
    Ok(axum::Json(json!({ "user": user })).into_response())
}

/// The session as the app sees it: user, role, cart, whether served from the snapshot.
async fn view(session: &Session) -> Result<Value, SessionError> {
    let role: Option<String> = session.get("role").await?;
    let cart: Vec<String> = session.get("cart").await?.unwrap_or_default();
    Ok(json!({
        "user": session.user_id().await?,
        "role": role,
        "cart": cart,
        "degraded": session.is_degraded().await?,
    }))
}

/// `GET /me`: 401 without a logged-in session.
async fn app_me(session: Session) -> Result<Response, SessionError> {
    if session.user_id().await?.is_none() {
        return Ok(StatusCode::UNAUTHORIZED.into_response());
    }
    Ok(axum::Json(view(&session).await?).into_response())
}

/// `POST /cart/add?item=`.
async fn app_cart_add(
    session: Session,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Response, SessionError> {
    let mut cart: Vec<String> = session.get("cart").await?.unwrap_or_default();
    cart.push(query.get("item").cloned().unwrap_or_default());
    session.insert("cart", &cart).await?;
    Ok(axum::Json(view(&session).await?).into_response())
}

/// `POST /logout`.
async fn app_logout(session: Session) -> Result<Response, SessionError> {
    session.destroy().await?;
    Ok(axum::Json(json!({ "logged_out": true })).into_response())
}

/// `GET /ping`: 200 when the app's client reaches the store, 503 when it does not.
async fn app_ping(State(state): State<AppState>) -> StatusCode {
    match state.store.get(PROBE_ID, false).await {
        Ok(_) | Err(ClientError::NotFound { .. }) => StatusCode::OK,
        Err(_) => StatusCode::SERVICE_UNAVAILABLE,
    }
}

/// The layer app over `world` (through its relay), its layer, and a browser client.
struct LayerStack {
    app: Served,
    layer: SessionLayer,
    http: reqwest::Client,
    world: World,
}

impl LayerStack {
    async fn start(kind: Kind, test: &str) -> Option<LayerStack> {
        let world = World::start(kind, test).await?;
        let client = client_of(&world.backend_url(), NS);
        let config = SessionConfig {
            secure: false,
            fallback: FallbackMode::OnOutage,
            ..SessionConfig::default()
        };
        let layer = SessionLayer::with_config(client.clone(), Some(codec()), config);
        let sessions = Router::new()
            .route("/login", post(app_login))
            .route("/me", get(app_me))
            .route("/cart/add", post(app_cart_add))
            .route("/logout", post(app_logout))
            .layer(layer.clone());
        let app = sessions
            .route("/ping", get(app_ping))
            .with_state(AppState { store: client });
        Some(LayerStack {
            app: Served::start(app).await,
            layer,
            http: http(),
            world,
        })
    }

    async fn get(&self, path: &str, jar: &Jar) -> Reply {
        send(
            &self.http,
            reqwest::Method::GET,
            self.app.url(path),
            jar,
            None,
        )
        .await
    }

    async fn post(&self, path: &str, jar: &Jar) -> Reply {
        send(
            &self.http,
            reqwest::Method::POST,
            self.app.url(path),
            jar,
            None,
        )
        .await
    }

    /// `user` logs in; the browser's cookies.
    async fn login(&self, user: &str) -> Jar {
        let mut jar = Jar::default();
        let login = self.post(&format!("/login?user={user}"), &jar).await;
        assert_eq!(login.status, StatusCode::OK, "login: {login:?}");
        jar.take(&login);
        assert!(
            jar.get("sid").is_some() && jar.get("sid_snap").is_some(),
            "a session and its snapshot: {jar:?}"
        );
        jar
    }

    /// Waits until the app's client reaches the store (`true`) or does not (`false`).
    async fn store_reachable(&self, reachable: bool) {
        let want = if reachable {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        };
        eventually(
            &format!("the app reaches the store: {reachable}"),
            || async { (self.get("/ping", &Jar::default()).await.status == want).then_some(()) },
        )
        .await;
    }

    /// The snapshot the jar holds, as the backends read it.
    fn snapshot(jar: &Jar) -> Snapshot {
        codec()
            .decode(jar.get("sid_snap").expect("a snapshot cookie"))
            .expect("a snapshot the backends' key verifies")
    }
}

/// The attribute value the app stores for `value` (JSON).
fn stored_json(session: &SessionData, key: &str) -> Option<Value> {
    session
        .attrs
        .get(key)
        .map(|bytes| serde_json::from_slice(bytes).expect("JSON attribute"))
}

/// Bob logs in (`role=admin`); his backend is partitioned from the store; `store_change`
/// runs as the administrator, then bob's backend serves two cart changes from the snapshot;
/// the partition heals. Returns the stack, bob's cookies, his session id, the version the
/// store last confirmed to bob's backend, and the epoch.
async fn partitioned_cart_changes<F, Fut>(
    kind: Kind,
    test: &str,
    store_change: F,
) -> Option<(LayerStack, Jar, String, u64, String)>
where
    F: FnOnce(SessionClient, String) -> Fut,
    Fut: Future<Output = ()>,
{
    let stack = LayerStack::start(kind, test).await?;
    let mut bob = stack.login("bob").await;
    let me = stack.get("/me", &bob).await;
    assert_eq!(me.status, StatusCode::OK, "{me:?}");
    assert_eq!(
        (me.text("role"), me.body["degraded"].as_bool()),
        (Some("admin"), Some(false))
    );
    bob.take(&me);
    let id = bob.get("sid").expect("sid").to_owned();
    let base = stack.world.stored(&id).await.expect("bob's session");
    assert_eq!(stored_json(&base, "role"), Some(json!("admin")));
    let epoch = stack.world.epoch().await;
    assert_eq!(base.epoch, epoch, "sessions carry the store's epoch");

    stack.world.partition();
    stack.store_reachable(false).await;
    store_change(stack.world.admin.clone(), id.clone()).await;
    for (n, item) in ["book", "pen"].into_iter().enumerate() {
        let added = stack.post(&format!("/cart/add?item={item}"), &bob).await;
        assert_eq!(
            added.status,
            StatusCode::OK,
            "offline change {n}: {added:?}"
        );
        assert_eq!(
            added.body["degraded"].as_bool(),
            Some(true),
            "served from the snapshot: {added:?}"
        );
        bob.take(&added);
    }
    let snapshot = LayerStack::snapshot(&bob);
    assert_eq!(
        (snapshot.epoch.as_str(), snapshot.base_version),
        (epoch.as_str(), base.version),
        "the snapshot keeps the epoch and the version the store last confirmed"
    );
    assert_eq!(
        snapshot.offline_set,
        vec!["cart".to_owned()],
        "and the keys changed offline"
    );
    assert!(snapshot.offline_removed.is_empty() && !snapshot.offline_user);
    assert_eq!(snapshot.version, base.version + 2, "two local writes");

    stack.world.heal();
    stack.store_reachable(true).await;
    Some((stack, bob, id, base.version, epoch))
}

async fn the_store_wins_over_offline_changes(kind: Kind, test: &str) {
    let demote = |admin: SessionClient, id: String| async move {
        let patch = Patch {
            remove: vec!["role".to_owned()],
            ..Patch::default()
        };
        admin
            .update(&id, patch)
            .await
            .expect("the administrator demotes bob during the partition");
    };
    let Some((stack, mut bob, id, base, _)) = partitioned_cart_changes(kind, test, demote).await
    else {
        return;
    };
    let demoted = stack.world.stored(&id).await.expect("bob's session");
    assert_eq!(demoted.version, base + 1, "the administrator's write");

    let me = stack.get("/me", &bob).await;
    assert_eq!(me.status, StatusCode::OK, "{me:?}");
    assert_eq!(
        (me.text("user"), me.text("role"), me.list("cart")),
        (Some("bob"), None, Vec::<String>::new()),
        "bob sees the administrator's version: demoted, his offline cart dropped: {me:?}"
    );
    assert_eq!(me.body["degraded"].as_bool(), Some(false));
    bob.take(&me);
    let stored = stack.world.stored(&id).await.expect("bob's session");
    assert_eq!(
        (
            stored.version,
            stored_json(&stored, "role"),
            stored_json(&stored, "cart")
        ),
        (base + 1, None, None),
        "the store holds the administrator's version, untouched"
    );
    assert_eq!(
        stack.layer.dropped_offline_changes(),
        1,
        "the drop is counted"
    );
    let snapshot = LayerStack::snapshot(&bob);
    assert!(
        !snapshot.has_offline_changes() && snapshot.base_version == base + 1,
        "the new snapshot is the store's version: {snapshot:?}"
    );

    // And it stays so.
    let again = stack.get("/me", &bob).await;
    assert_eq!((again.status, again.text("role")), (StatusCode::OK, None));
    assert_eq!(
        stack.world.stored(&id).await.map(|s| s.version),
        Some(base + 1)
    );
}

async fn offline_changes_are_applied(kind: Kind, test: &str) {
    let nobody = |_: SessionClient, _: String| async {};
    let Some((stack, mut bob, id, base, epoch)) =
        partitioned_cart_changes(kind, test, nobody).await
    else {
        return;
    };
    let me = stack.get("/me", &bob).await;
    assert_eq!(me.status, StatusCode::OK, "{me:?}");
    assert_eq!(
        (me.text("role"), me.list("cart")),
        (Some("admin"), vec!["book".to_owned(), "pen".to_owned()]),
        "{me:?}"
    );
    assert_eq!(me.body["degraded"].as_bool(), Some(false));
    bob.take(&me);
    let stored = stack.world.stored(&id).await.expect("bob's session");
    assert_eq!(
        (
            stored.version,
            stored_json(&stored, "cart"),
            stored_json(&stored, "role")
        ),
        (base + 1, Some(json!(["book", "pen"])), Some(json!("admin"))),
        "both offline changes applied as one patch on the base version"
    );
    assert_eq!(stored.epoch, epoch);
    assert_eq!(stack.layer.dropped_offline_changes(), 0);
    let snapshot = LayerStack::snapshot(&bob);
    assert!(
        !snapshot.has_offline_changes() && snapshot.base_version == base + 1,
        "the new snapshot is the store's version: {snapshot:?}"
    );
}

async fn a_store_that_lost_its_data_restores_live_sessions(kind: Kind, test: &str) {
    let Some(mut stack) = LayerStack::start(kind, test).await else {
        return;
    };
    let mut bob = stack.login("bob").await;
    let added = stack.post("/cart/add?item=book", &bob).await;
    assert_eq!(added.status, StatusCode::OK, "{added:?}");
    bob.take(&added);
    let id = bob.get("sid").expect("sid").to_owned();
    let before = stack.world.stored(&id).await.expect("bob's session");

    match kind {
        Kind::Memory => stack.world.restart().await,
        Kind::Redis | Kind::Mysql => stack.world.spec.lose_data().await,
    }
    assert!(stack.world.stored(&id).await.is_none(), "the store lost it");
    assert!(stack.world.sessions_of("bob").await.is_empty());
    let epoch = stack.world.epoch().await;
    assert_ne!(
        epoch, before.epoch,
        "a store that lost its data has a new epoch"
    );
    stack.store_reachable(true).await;

    let me = stack.get("/me", &bob).await;
    assert_eq!(me.status, StatusCode::OK, "{me:?}");
    assert_eq!(
        (me.text("user"), me.text("role"), me.list("cart")),
        (Some("bob"), Some("admin"), vec!["book".to_owned()]),
        "restored from the snapshot: {me:?}"
    );
    assert_eq!(me.body["degraded"].as_bool(), Some(false), "from the store");
    let listed = stack.world.sessions_of("bob").await;
    assert_eq!(listed.len(), 1, "{listed:?}");
    let restored = &listed[0];
    assert_eq!(restored.id, id, "under its id");
    assert_eq!(restored.attrs, before.attrs, "with its attributes");
    assert_eq!(restored.epoch, epoch, "in the store's new epoch");
    assert_eq!(restored.version, 1, "a recreation starts at version 1");
}

async fn a_logout_during_an_outage_sticks(kind: Kind, test: &str) {
    let Some(stack) = LayerStack::start(kind, test).await else {
        return;
    };
    let mut bob = stack.login("bob").await;
    let carol = stack.login("carol").await;
    let copied = bob.clone();
    let id = bob.get("sid").expect("sid").to_owned();

    stack.world.partition();
    stack.store_reachable(false).await;
    let out = stack.post("/logout", &bob).await;
    assert_eq!(
        out.status,
        StatusCode::OK,
        "a logout during an outage: {out:?}"
    );
    assert!(
        out.removes("sid") && out.removes("sid_snap"),
        "both cookies cleared: {:?}",
        out.set_cookies
    );
    bob.take(&out);
    assert!(bob.0.is_empty(), "{bob:?}");
    assert!(
        stack.world.stored(&id).await.is_some(),
        "the store did not hear of it yet"
    );

    // The backend that took the logout remembers it: the copied cookies replayed to it during
    // the outage are no session (another backend would serve the snapshot until its max age).
    let during = stack.get("/me", &copied).await;
    assert_eq!(
        during.status,
        StatusCode::UNAUTHORIZED,
        "bob's copied cookies during the outage: {during:?}"
    );

    stack.world.heal();
    stack.store_reachable(true).await;
    // The deferred delete is made on a later request that reaches the store (here another
    // user's: bob's browser has no cookies left to send).
    eventually("the deferred delete of bob's session", || async {
        let me = stack.get("/me", &carol).await;
        assert_eq!(me.status, StatusCode::OK, "carol: {me:?}");
        stack
            .world
            .sessions_of("bob")
            .await
            .is_empty()
            .then_some(())
    })
    .await;
    let replay = stack.get("/me", &copied).await;
    assert_eq!(
        replay.status,
        StatusCode::UNAUTHORIZED,
        "bob's copied cookies after the recovery: {replay:?}"
    );
    assert!(stack.world.sessions_of("bob").await.is_empty());
    assert!(stack.world.stored(&id).await.is_none());
}

async fn a_session_made_and_logged_out_during_an_outage_never_comes_back(kind: Kind, test: &str) {
    let Some(stack) = LayerStack::start(kind, test).await else {
        return;
    };
    let carol = stack.login("carol").await;

    stack.world.partition();
    stack.store_reachable(false).await;
    // A login during the outage: a session made offline, which the store has never seen.
    let login = stack.post("/login?user=dan", &Jar::default()).await;
    assert_eq!(
        login.status,
        StatusCode::OK,
        "login during the outage: {login:?}"
    );
    let mut dan = Jar::default();
    dan.take(&login);
    let id = dan.get("sid").expect("sid").to_owned();
    assert_eq!(LayerStack::snapshot(&dan).epoch, "", "made offline");
    let copied = dan.clone();
    let out = stack.post("/logout", &dan).await;
    assert_eq!(
        out.status,
        StatusCode::OK,
        "logout during the outage: {out:?}"
    );
    assert!(
        out.removes("sid") && out.removes("sid_snap"),
        "{:?}",
        out.set_cookies
    );

    stack.world.heal();
    stack.store_reachable(true).await;
    // The next request that reaches the store settles the logout (restore, then delete: the
    // delete leaves a tombstone the copied snapshot cannot get past).
    let me = stack.get("/me", &carol).await;
    assert_eq!(me.status, StatusCode::OK, "carol: {me:?}");
    for attempt in 0..2 {
        let replay = stack.get("/me", &copied).await;
        assert_eq!(
            replay.status,
            StatusCode::UNAUTHORIZED,
            "dan's copied cookies after the recovery, attempt {attempt}: {replay:?}"
        );
        assert!(stack.world.stored(&id).await.is_none(), "not recreated");
        assert!(stack.world.sessions_of("dan").await.is_empty());
    }
}

/// One test per store for `scenario`: `scenario::memory`, `::redis`, `::mysql`.
macro_rules! on_every_store {
    ($($scenario:ident),* $(,)?) => {$(
        mod $scenario {
            use super::stores::Kind;

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn memory() {
                super::$scenario(Kind::Memory, concat!(stringify!($scenario), "::memory")).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn redis() {
                super::$scenario(Kind::Redis, concat!(stringify!($scenario), "::redis")).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn mysql() {
                super::$scenario(Kind::Mysql, concat!(stringify!($scenario), "::mysql")).await;
            }
        }
    )*};
}

on_every_store!(
    logout_sticks,
    the_store_wins_over_offline_changes,
    offline_changes_are_applied,
    a_store_that_lost_its_data_restores_live_sessions,
    a_logout_during_an_outage_sticks,
    a_session_made_and_logged_out_during_an_outage_never_comes_back,
);
