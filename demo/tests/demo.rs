//! The demo backend on real session servers: shared sessions across instances, the local
//! baseline that loses them, store outages with and without the cookie fallback, logout replay,
//! and session fixation.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use demo::{DemoConfig, Sessions};
use reqwest::StatusCode;
use serde_json::Value;
use session_client::cookie::{CookieCodec, CookieKey, Encryption, KeyRing};
use session_client::{ClientConfig, ClientError, FallbackMode, SessionClient};
use session_proto::v1::ListByUserRequest;
use session_proto::v1::session_store_client::SessionStoreClient;
use support::store::StoreServer;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// A demo-app instance served in-process.
struct Demo {
    /// Base URL.
    url: String,
    /// The server task.
    task: JoinHandle<()>,
}

impl Drop for Demo {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn demo(name: &str, sessions: Sessions, fallback: FallbackMode) -> Demo {
    let mut config = DemoConfig::new(name, sessions);
    config.fallback = fallback;
    config.cookie_keys = vec![vec![42u8; 32]];
    config.secure_cookies = false;
    serve(&config).await
}

/// An instance of `config` served on a free loopback port.
async fn serve(config: &DemoConfig) -> Demo {
    let app = demo::app(config).await.unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let task = tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    });
    Demo { url, task }
}

fn browser() -> reqwest::Client {
    reqwest::Client::builder()
        .cookie_store(true)
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

async fn login(client: &reqwest::Client, on: &Demo, user: &str) -> reqwest::Response {
    let response = client
        .post(format!("{}/login", on.url))
        .form(&[("user", user)])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    response
}

async fn me(client: &reqwest::Client, on: &Demo) -> (StatusCode, Value, String) {
    let response = client.get(format!("{}/me", on.url)).send().await.unwrap();
    let status = response.status();
    let served_by = response.headers()["x-served-by"]
        .to_str()
        .unwrap()
        .to_owned();
    let body = response.json().await.unwrap_or(Value::Null);
    (status, body, served_by)
}

async fn add(client: &reqwest::Client, on: &Demo, item: &str) -> StatusCode {
    let response = client
        .post(format!("{}/cart/add", on.url))
        .json(&serde_json::json!({ "item": item }))
        .send()
        .await
        .unwrap();
    response.status()
}

async fn cart(client: &reqwest::Client, on: &Demo) -> Vec<String> {
    let body: Value = client
        .get(format!("{}/cart", on.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    body["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_owned())
        .collect()
}

/// The `name=value` pairs of a response's Set-Cookie headers.
fn set_cookies(response: &reqwest::Response) -> Vec<(String, String)> {
    response
        .headers()
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .filter_map(|v| v.split(';').next())
        .filter_map(|pair| pair.split_once('='))
        .map(|(n, v)| (n.to_owned(), v.to_owned()))
        .collect()
}

/// The value of the cookie `name` among `cookies`.
fn cookie_value(cookies: &[(String, String)], name: &str) -> Option<String> {
    cookies
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_in_on_one_instance_and_be_known_on_the_other() {
    let store = StoreServer::start().await;
    let (a, b) = (
        demo("s1", Sessions::Store(store.url()), FallbackMode::Off).await,
        demo("s2", Sessions::Store(store.url()), FallbackMode::Off).await,
    );
    let user = browser();
    login(&user, &a, "alice").await;
    let (status, body, served_by) = me(&user, &b).await;
    assert_eq!((status, served_by.as_str()), (StatusCode::OK, "s2"));
    assert_eq!(body["user"], "alice");
    assert_eq!(add(&user, &b, "book").await, StatusCode::OK);
    assert_eq!(add(&user, &a, "pen").await, StatusCode::OK);
    assert_eq!(cart(&user, &a).await, ["book", "pen"]);
    assert_eq!(cart(&user, &b).await, ["book", "pen"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_sessions_are_lost_on_another_instance() {
    let (a, b) = (
        demo("s1", Sessions::Local, FallbackMode::Off).await,
        demo("s2", Sessions::Local, FallbackMode::Off).await,
    );
    let user = browser();
    login(&user, &a, "bob").await;
    assert_eq!(me(&user, &a).await.0, StatusCode::OK);
    let (status, body, _) = me(&user, &b).await;
    assert_eq!(
        status,
        StatusCode::UNAUTHORIZED,
        "the baseline loses the session: {body}"
    );
    assert!(body["login"].is_string(), "401 carries a login hint");
}

async fn outage_keeps_users_logged_in(fallback: FallbackMode) {
    let mut store = StoreServer::start().await;
    let (a, b) = (
        demo("s1", Sessions::Store(store.url()), fallback).await,
        demo("s2", Sessions::Store(store.url()), fallback).await,
    );
    let user = browser();
    login(&user, &a, "carol").await;
    assert_eq!(add(&user, &a, "before").await, StatusCode::OK);

    store.kill().await;
    let (status, body, _) = me(&user, &b).await;
    assert_eq!(status, StatusCode::OK, "served from the snapshot: {body}");
    assert_eq!(
        (body["user"].as_str(), body["degraded"].as_bool()),
        (Some("carol"), Some(true))
    );
    assert_eq!(add(&user, &b, "during").await, StatusCode::OK);
    assert_eq!(cart(&user, &a).await, ["before", "during"]);

    // The store comes back empty (a memory store restarted): the snapshot is pushed back.
    store.restart().await;
    let (status, body, _) = me(&user, &a).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["degraded"], false);
    let mut direct = SessionStoreClient::connect(store.url()).await.unwrap();
    let listed = direct
        .list_by_user(ListByUserRequest {
            namespace: demo::DEFAULT_NAMESPACE.into(),
            user_id: "carol".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .sessions;
    assert_eq!(listed.len(), 1, "the session is in the store again");
    let stored: Value = serde_json::from_slice(&listed[0].attrs["cart"]).unwrap();
    assert_eq!(
        stored["items"],
        serde_json::json!(["before", "during"]),
        "outage changes reached the store"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_outage_is_survived_with_on_outage_fallback() {
    outage_keeps_users_logged_in(FallbackMode::OnOutage).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_outage_is_survived_with_always_fallback() {
    outage_keeps_users_logged_in(FallbackMode::Always).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_outage_without_fallback_is_a_clear_503() {
    let mut store = StoreServer::start().await;
    let a = demo("s1", Sessions::Store(store.url()), FallbackMode::Off).await;
    let user = browser();
    login(&user, &a, "dan").await;
    store.kill().await;
    let (status, _, _) = me(&user, &a).await;
    assert_eq!(
        status,
        StatusCode::SERVICE_UNAVAILABLE,
        "never a silent logout (401)"
    );
    assert_eq!(add(&user, &a, "x").await, StatusCode::SERVICE_UNAVAILABLE);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replaying_cookies_after_logout_brings_nothing_back() {
    let store = StoreServer::start().await;
    let a = demo("s1", Sessions::Store(store.url()), FallbackMode::Always).await;
    let user = browser();
    let response = login(&user, &a, "erin").await;
    let old = set_cookies(&response);
    assert!(
        old.iter().any(|(n, _)| n == "sid") && old.iter().any(|(n, _)| n == "sid_snap"),
        "{old:?}"
    );
    assert_eq!(me(&user, &a).await.0, StatusCode::OK);

    let out = user.post(format!("{}/logout", a.url)).send().await.unwrap();
    assert_eq!(out.status(), StatusCode::OK);
    assert_eq!(
        me(&user, &a).await.0,
        StatusCode::UNAUTHORIZED,
        "cookies cleared"
    );

    // An attacker (or a back button) replays the cookies from before the logout.
    let replay = reqwest::Client::new();
    let cookie = old
        .iter()
        .map(|(n, v)| format!("{n}={v}"))
        .collect::<Vec<_>>()
        .join("; ");
    let response = replay
        .get(format!("{}/me", a.url))
        .header("cookie", cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(
        response.status(),
        StatusCode::UNAUTHORIZED,
        "a logged-out session came back"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_gives_a_new_session_id_and_keeps_the_guest_cart() {
    let store = StoreServer::start().await;
    let a = demo("s1", Sessions::Store(store.url()), FallbackMode::OnOutage).await;
    let user = browser();
    let guest = user
        .post(format!("{}/cart/add", a.url))
        .form(&[("item", "mug")])
        .send()
        .await
        .unwrap();
    let guest_cookies = set_cookies(&guest);
    let before = cookie_value(&guest_cookies, "sid").expect("guest session");
    let guest_snapshot = cookie_value(&guest_cookies, "sid_snap").expect("guest snapshot cookie");
    // The snapshot is authentic and names the guest id: if the layer trusted it over the
    // store's tombstone, it would bring the guest session back.
    let codec = CookieCodec::new(
        KeyRing::new(vec![CookieKey::new(&[42u8; 32]).unwrap()]).unwrap(),
        Encryption::None,
    );
    assert_eq!(codec.decode(&guest_snapshot).unwrap().id, before);
    let after = cookie_value(&set_cookies(&login(&user, &a, "fay").await), "sid").unwrap();
    assert_ne!(
        before, after,
        "session fixation: the id must change on login"
    );
    assert_eq!(
        cart(&user, &a).await,
        ["mug"],
        "the guest cart survives the login"
    );

    // The pre-login id is dead, even with its snapshot cookie.
    let planted = reqwest::Client::new();
    let response = planted
        .get(format!("{}/cart", a.url))
        .header("cookie", format!("sid={before}; sid_snap={guest_snapshot}"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let reissued = set_cookies(&response);
    assert!(
        !reissued.iter().any(|(n, v)| n == "sid" && *v == before),
        "the old id was handed back: {reissued:?}"
    );
    let body: Value = response.json().await.unwrap();
    assert_eq!(
        body["items"],
        serde_json::json!([]),
        "old id still reads the cart"
    );
    let mut config = ClientConfig::new(store.url());
    config.namespace = "demo".into();
    let direct = SessionClient::connect_lazy(config).unwrap();
    assert!(
        matches!(
            direct.get(&before, false).await,
            Err(ClientError::NotFound { .. })
        ),
        "the snapshot restored the pre-login session into the store"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_mode_reads_injected_headers_and_writes_to_the_store() {
    use base64::Engine as _;
    let store = StoreServer::start().await;
    let a = demo("s1", Sessions::Proxy(store.url()), FallbackMode::Off).await;
    let http = reqwest::Client::new();
    // Without the proxy's headers the app knows nobody, whatever cookies say.
    let me = http
        .get(format!("{}/me", a.url))
        .header("cookie", "sid=x")
        .send()
        .await
        .unwrap();
    assert_eq!(me.status(), StatusCode::UNAUTHORIZED);

    let login = http
        .post(format!("{}/login", a.url))
        .form(&[("user", "gus")])
        .send()
        .await
        .unwrap();
    assert_eq!(login.status(), StatusCode::OK);
    let id = set_cookies(&login)
        .into_iter()
        .find(|(n, _)| n == "sid")
        .expect("session cookie")
        .1;

    // What session-proxy's lookup plugin would inject for that cookie.
    let added = http
        .post(format!("{}/cart/add", a.url))
        .header("x-session-id", &id)
        .header("x-session-user", "gus")
        .form(&[("item", "tea")])
        .send()
        .await
        .unwrap();
    assert_eq!(added.status(), StatusCode::OK);
    let mut direct = SessionStoreClient::connect(store.url()).await.unwrap();
    let stored = direct
        .get(session_proto::v1::GetRequest {
            namespace: demo::DEFAULT_NAMESPACE.into(),
            id: id.clone(),
            touch: false,
            bypass_cache: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stored.user_id, "gus");
    let cart = stored.attrs["cart"].clone();
    assert_eq!(
        serde_json::from_slice::<Value>(&cart).unwrap()["items"],
        serde_json::json!(["tea"])
    );

    let encoded = base64::engine::general_purpose::STANDARD.encode(&cart);
    let me = http
        .get(format!("{}/me", a.url))
        .header("x-session-id", &id)
        .header("x-session-user", "gus")
        .header("x-session-attr-cart", encoded)
        .send()
        .await
        .unwrap();
    let body: Value = me.json().await.unwrap();
    assert_eq!(
        (body["user"].as_str(), body["cart_items"].as_u64()),
        (Some("gus"), Some(1))
    );
}

/// A `demo-app` process started with `--listen 127.0.0.1:0`, at the address it reported.
struct DemoProcess {
    /// The child (killed on drop).
    child: tokio::process::Child,
    /// Its stdout after the address line.
    stdout: tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
    /// Collects its stderr, drained so its logs never fill the pipe.
    stderr: JoinHandle<String>,
    /// Where it listens, as reported.
    addr: SocketAddr,
}

impl DemoProcess {
    /// Starts `demo-app` with `args` and port 0, and reads the `listening http <addr>` line
    /// within 30 s, failing with its exit status and stderr if it exits first.
    async fn start(args: &[&str]) -> DemoProcess {
        use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _};
        let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_demo-app"))
            .args(["--listen", "127.0.0.1:0"])
            .args(args)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("start demo-app");
        let mut stderr_pipe = child.stderr.take().unwrap();
        let stderr = tokio::spawn(async move {
            let mut text = String::new();
            let _ = stderr_pipe.read_to_string(&mut text).await;
            text
        });
        let mut stdout = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
        let line = tokio::time::timeout(Duration::from_secs(30), stdout.next_line()).await;
        let line = match line {
            Ok(Ok(Some(line))) => line,
            other => {
                let _ = child.start_kill();
                let status = tokio::time::timeout(Duration::from_secs(10), child.wait()).await;
                let stderr = tokio::time::timeout(Duration::from_secs(10), stderr).await;
                panic!(
                    "demo-app reported no address ({other:?}); exit: {status:?}; stderr: {stderr:?}"
                );
            }
        };
        let addr = line
            .strip_prefix("listening http ")
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("not an address line: {line:?}"));
        DemoProcess {
            child,
            stdout,
            stderr,
            addr,
        }
    }

    /// Kills it and returns what it printed on stdout after the address line, and its stderr.
    async fn stop(mut self) -> (Vec<String>, String) {
        let _ = self.child.start_kill();
        let status = tokio::time::timeout(Duration::from_secs(10), self.child.wait()).await;
        assert!(status.is_ok(), "demo-app did not die within 10s");
        let mut rest = Vec::new();
        while let Ok(Some(line)) = self.stdout.next_line().await {
            rest.push(line);
        }
        let stderr = tokio::time::timeout(Duration::from_secs(10), self.stderr)
            .await
            .expect("stderr closed")
            .unwrap_or_default();
        (rest, stderr)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_app_binds_port_0_and_reports_the_bound_address_on_stdout() {
    let app =
        DemoProcess::start(&["--sessions", "local", "--name", "bin", "--insecure-cookies"]).await;
    assert!(
        app.addr.ip().is_loopback() && app.addr.port() != 0,
        "{}",
        app.addr
    );
    let http = browser();
    let health = http
        .get(format!("http://{}/healthz", app.addr))
        .send()
        .await
        .expect("demo-app serves on the address it reported");
    assert_eq!(health.status(), StatusCode::OK);
    assert_eq!(health.headers()["x-served-by"], "bin");
    let login = http
        .post(format!("http://{}/login", app.addr))
        .form(&[("user", "ida")])
        .send()
        .await
        .unwrap();
    assert_eq!(login.status(), StatusCode::OK);
    let me = http
        .get(format!("http://{}/me", app.addr))
        .send()
        .await
        .unwrap();
    assert_eq!(me.status(), StatusCode::OK);
    let (rest, stderr) = app.stop().await;
    assert!(
        rest.is_empty(),
        "stdout holds only the address line; also got {rest:?} (stderr: {stderr})"
    );
}

/// `--session-header x-session-token`: a client without cookies logs in, gets its id in the
/// header, is known on another instance by the header alone, and a logout answers it empty.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_without_cookies_carries_its_session_in_the_header() {
    let store = StoreServer::start().await;
    let instance = |name: &'static str| {
        let mut config = DemoConfig::new(name, Sessions::Store(store.url()));
        config.secure_cookies = false;
        config.session_header = Some(http::HeaderName::from_static("x-session-token"));
        config
    };
    let (a, b) = (serve(&instance("s1")).await, serve(&instance("s2")).await);
    // No cookie store: only the header carries the session.
    let api = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let logged_in = api
        .post(format!("{}/login", a.url))
        .form(&[("user", "ada")])
        .send()
        .await
        .unwrap();
    assert_eq!(logged_in.status(), StatusCode::OK);
    let token = logged_in.headers()["x-session-token"]
        .to_str()
        .unwrap()
        .to_owned();
    assert_eq!(token.len(), 32, "the new id in the header");
    let me_b = api
        .get(format!("{}/me", b.url))
        .header("x-session-token", &token)
        .send()
        .await
        .unwrap();
    assert_eq!(me_b.status(), StatusCode::OK);
    assert_eq!(me_b.json::<Value>().await.unwrap()["user"], "ada");
    let out = api
        .post(format!("{}/logout", b.url))
        .header("x-session-token", &token)
        .send()
        .await
        .unwrap();
    assert_eq!(out.status(), StatusCode::OK);
    assert_eq!(
        out.headers()["x-session-token"],
        "",
        "a logout answers it empty"
    );
    let after = api
        .get(format!("{}/me", a.url))
        .header("x-session-token", &token)
        .send()
        .await
        .unwrap();
    assert_eq!(
        after.status(),
        StatusCode::UNAUTHORIZED,
        "the session is gone"
    );
}
