//! `demo-app --sessions proxy` and its snapshot cookie, with the proxy's part played by the
//! test (the `x-session-*` headers and the cookies it would forward): after a write the store
//! took, a snapshot the store confirmed; while the store is down, a cart change recorded in the
//! snapshot as an offline change; a slow store is a 503 with `Retry-After`; a logout during an
//! outage clears both cookies and deletes the session once the store is back.

mod support;

use std::time::{Duration, SystemTime};

use demo::{DemoConfig, Sessions};
use reqwest::StatusCode;
use serde_json::Value;
use session_client::ClientError;
use session_client::cookie::{
    CookieCodec, CookieKey, Encryption, KeyRing, Snapshot, SnapshotPolicy, unix_ms,
};
use support::relay::Relay;
use support::store::StoreServer;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// The demo's cookie key.
const KEY: [u8; 32] = [42; 32];
/// The demo's namespace.
const NAMESPACE: &str = demo::DEFAULT_NAMESPACE;

/// A `demo-app --sessions proxy` served in-process.
struct ProxyModeDemo {
    /// Base URL.
    url: String,
    /// The server task.
    task: JoinHandle<()>,
}

impl Drop for ProxyModeDemo {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl ProxyModeDemo {
    /// The demo writing to `session_server`, with a snapshot max age of `max_age` and an
    /// outage grace of `grace`.
    async fn start(session_server: String, max_age: Duration, grace: Duration) -> Self {
        let mut config = DemoConfig::new("s1", Sessions::Proxy(session_server));
        config.cookie_keys = vec![KEY.to_vec()];
        config.secure_cookies = false;
        config.snapshot_max_age = max_age;
        config.outage_grace = grace;
        let app = demo::app(&config).await.expect("demo app");
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        ProxyModeDemo { url, task }
    }

    /// `POST path` with `body` as JSON, and what the proxy would add for `session`: its id and
    /// user headers and the snapshot cookie `snapshot`.
    async fn post(
        &self,
        path: &str,
        session: Option<(&str, &str)>,
        snapshot: Option<&str>,
        body: Value,
    ) -> Answer {
        let mut request = reqwest::Client::new()
            .post(format!("{}{path}", self.url))
            .json(&body);
        let mut cookies = Vec::new();
        if let Some((id, user)) = session {
            request = request
                .header("x-session-id", id)
                .header("x-session-user", user);
            cookies.push(format!("sid={id}"));
        }
        if let Some(snapshot) = snapshot {
            cookies.push(format!("sid_snap={snapshot}"));
        }
        if !cookies.is_empty() {
            request = request.header("cookie", cookies.join("; "));
        }
        Answer::read(request.send().await.expect("demo answers")).await
    }

    /// Logs `user` in; the new session's id and snapshot cookie.
    async fn log_in(&self, user: &str) -> (String, String) {
        let answer = self
            .post("/login", None, None, serde_json::json!({ "user": user }))
            .await;
        assert_eq!(answer.status, StatusCode::OK, "{:?}", answer.body);
        let id = answer.cookie("sid").expect("session cookie");
        let snapshot = answer.cookie("sid_snap").expect("snapshot cookie");
        (id, snapshot)
    }
}

/// A response of the demo.
struct Answer {
    /// Status.
    status: StatusCode,
    /// Its JSON body (`Null` when not JSON).
    body: Value,
    /// Every `Set-Cookie` line.
    set_cookies: Vec<String>,
    /// `Retry-After`, if any.
    retry_after: Option<String>,
}

impl Answer {
    async fn read(response: reqwest::Response) -> Answer {
        let status = response.status();
        let headers = response.headers();
        let set_cookies = headers
            .get_all("set-cookie")
            .iter()
            .map(|v| v.to_str().unwrap().to_owned())
            .collect();
        let retry_after = headers
            .get("retry-after")
            .map(|v| v.to_str().unwrap().to_owned());
        let body = response.json().await.unwrap_or(Value::Null);
        Answer {
            status,
            body,
            set_cookies,
            retry_after,
        }
    }

    /// The value the response sets for cookie `name`.
    fn cookie(&self, name: &str) -> Option<String> {
        self.set_cookies
            .iter()
            .filter_map(|line| line.split(';').next()?.split_once('='))
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.to_owned())
    }

    /// Whether the response expires cookie `name`.
    fn expires(&self, name: &str) -> bool {
        self.set_cookies
            .iter()
            .any(|line| line.starts_with(&format!("{name}=;")) && line.contains("Max-Age=0"))
    }
}

fn decode(value: &str) -> Snapshot {
    let codec = CookieCodec::new(
        KeyRing::new(vec![CookieKey::new(&KEY).unwrap()]).unwrap(),
        Encryption::None,
    );
    codec
        .decode(value)
        .expect("a snapshot signed with the demo's key")
}

fn items(body: &Value) -> Vec<String> {
    body["items"]
        .as_array()
        .unwrap_or_else(|| panic!("no items in {body}"))
        .iter()
        .map(|v| v.as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_write_the_store_took_leaves_a_snapshot_the_store_confirmed() {
    let store = StoreServer::start().await;
    let direct = store.client(NAMESPACE);
    let demo = ProxyModeDemo::start(
        store.url(),
        Duration::from_secs(3600),
        Duration::from_secs(5),
    )
    .await;
    let (id, value) = demo.log_in("gus").await;
    let stored = direct.get(&id, false).await.unwrap();
    let snapshot = decode(&value);
    assert_eq!(
        (snapshot.id.as_str(), snapshot.user_id.as_str()),
        (id.as_str(), "gus")
    );
    assert_eq!(snapshot.namespace, NAMESPACE);
    assert!(!snapshot.epoch.is_empty());
    assert_eq!(snapshot.epoch, stored.epoch);
    assert_eq!(
        (snapshot.version, snapshot.base_version),
        (stored.version, stored.version)
    );
    assert!(!snapshot.has_offline_changes());
    let now = unix_ms(SystemTime::now());
    assert!(snapshot.confirmed_at_ms <= now && snapshot.confirmed_at_ms + 60_000 > now);

    let answer = demo
        .post(
            "/cart/add",
            Some((&id, "gus")),
            Some(&value),
            serde_json::json!({ "item": "tea" }),
        )
        .await;
    assert_eq!(answer.status, StatusCode::OK);
    let after = decode(&answer.cookie("sid_snap").expect("a new snapshot"));
    let stored = direct.get(&id, false).await.unwrap();
    assert_eq!(
        (after.version, after.base_version),
        (stored.version, stored.version)
    );
    assert_eq!(after.attrs["cart"], stored.attrs["cart"]);
    assert!(!after.has_offline_changes());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_the_store_is_down_cart_changes_are_recorded_in_the_snapshot() {
    const MAX_AGE: Duration = Duration::from_secs(600);
    let mut store = StoreServer::start().await;
    let demo = ProxyModeDemo::start(store.url(), MAX_AGE, Duration::from_secs(5)).await;
    let (id, value) = demo.log_in("hal").await;
    let base = decode(&value);
    store.kill().await;

    let add = |snapshot: String, item: &'static str| {
        let id = id.clone();
        let demo = &demo;
        async move {
            demo.post(
                "/cart/add",
                Some((&id, "hal")),
                Some(&snapshot),
                serde_json::json!({ "item": item }),
            )
            .await
        }
    };
    let first = add(value.clone(), "pen").await;
    assert_eq!(first.status, StatusCode::OK, "{:?}", first.body);
    assert_eq!(items(&first.body), ["pen"]);
    assert_eq!(first.body["degraded"], true);
    let offline = decode(&first.cookie("sid_snap").expect("the snapshot, changed"));
    assert_eq!(offline.offline_set, ["cart"]);
    assert_eq!(
        (
            offline.version,
            offline.base_version,
            offline.epoch.as_str()
        ),
        (base.version + 1, base.version, base.epoch.as_str())
    );
    assert_eq!(offline.confirmed_at_ms, base.confirmed_at_ms);
    // Slid, but never past the max age after the store's last confirmation (the ttl, 30
    // minutes, would go further).
    assert_eq!(
        offline.expires_at_ms,
        base.confirmed_at_ms + MAX_AGE.as_millis() as u64
    );

    let second = add(first.cookie("sid_snap").unwrap(), "ink").await;
    assert_eq!(second.status, StatusCode::OK);
    assert_eq!(items(&second.body), ["pen", "ink"]);
    let offline = decode(&second.cookie("sid_snap").unwrap());
    assert_eq!(
        (offline.version, offline.base_version),
        (base.version + 2, base.version)
    );
    let cart: Value = serde_json::from_slice(&offline.attrs["cart"]).unwrap();
    assert_eq!(cart["items"], serde_json::json!(["pen", "ink"]));

    // Without a valid snapshot of this session there is nothing to record it in: 503.
    let answer = demo
        .post(
            "/cart/add",
            Some((&id, "hal")),
            None,
            serde_json::json!({ "item": "cup" }),
        )
        .await;
    assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(answer.retry_after, None, "down, not slow");
    let other = demo
        .post(
            "/cart/add",
            Some((&"B".repeat(32), "hal")),
            Some(&value),
            serde_json::json!({ "item": "cup" }),
        )
        .await;
    assert_eq!(
        other.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "another session's"
    );
    // A login needs the store (it makes the ids).
    let login = demo
        .post("/login", None, None, serde_json::json!({ "user": "ivy" }))
        .await;
    assert_eq!(login.status, StatusCode::SERVICE_UNAVAILABLE);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_store_is_a_503_with_retry_after_and_nothing_is_recorded_offline() {
    let store = StoreServer::start().await;
    let relay = Relay::start(store.addr).await;
    // A grace no test run comes near: every timeout here is a slow store.
    let demo = ProxyModeDemo::start(
        relay.url(),
        Duration::from_secs(3600),
        Duration::from_secs(600),
    )
    .await;
    let (id, value) = demo.log_in("jon").await;

    relay.stall();
    let answer = demo
        .post(
            "/cart/add",
            Some((&id, "jon")),
            Some(&value),
            serde_json::json!({ "item": "pen" }),
        )
        .await;
    assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(answer.retry_after.as_deref(), Some("1"));
    assert!(answer.set_cookies.is_empty(), "{:?}", answer.set_cookies);
    // A logout keeps the cookies, so that the retry reaches the store.
    let out = demo
        .post("/logout", Some((&id, "jon")), Some(&value), Value::Null)
        .await;
    assert_eq!(out.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(out.retry_after.as_deref(), Some("1"));
    assert!(out.set_cookies.is_empty(), "{:?}", out.set_cookies);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_logout_during_an_outage_clears_both_cookies_and_deletes_the_session_once_the_store_is_back()
 {
    let store = StoreServer::start().await;
    let direct = store.client(NAMESPACE);
    let relay = Relay::start(store.addr).await;
    let demo = ProxyModeDemo::start(
        relay.url(),
        Duration::from_secs(3600),
        Duration::from_secs(5),
    )
    .await;
    let (id, value) = demo.log_in("kim").await;

    relay.cut();
    let out = demo
        .post("/logout", Some((&id, "kim")), Some(&value), Value::Null)
        .await;
    assert_eq!(out.status, StatusCode::OK, "{:?}", out.body);
    assert!(
        out.expires("sid") && out.expires("sid_snap"),
        "{:?}",
        out.set_cookies
    );
    assert!(
        direct.get(&id, false).await.is_ok(),
        "the store could not be told yet"
    );

    relay.forward();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        match direct.get(&id, false).await {
            Err(ClientError::NotFound { .. }) => break,
            Ok(_) => {}
            Err(error) => panic!("store: {error}"),
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the deferred logout never reached the store"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_changes_reaching_the_app_before_the_proxy_pushed_them_are_pushed_first() {
    let store = StoreServer::start().await;
    let direct = store.client(NAMESPACE);
    let relay = Relay::start(store.addr).await;
    let demo = ProxyModeDemo::start(
        relay.url(),
        Duration::from_secs(3600),
        Duration::from_secs(5),
    )
    .await;
    let (id, value) = demo.log_in("lea").await;
    let base = direct.get(&id, false).await.unwrap();

    relay.cut();
    let offline = demo
        .post(
            "/cart/add",
            Some((&id, "lea")),
            Some(&value),
            serde_json::json!({ "item": "pen" }),
        )
        .await;
    assert_eq!(offline.status, StatusCode::OK);
    let offline = offline.cookie("sid_snap").unwrap();
    assert!(decode(&offline).has_offline_changes());

    // The store is back for the app; the proxy (played here) still forwards the snapshot with
    // its offline change: it is pushed, then the write lands on top of it.
    relay.forward();
    let answer = demo
        .post(
            "/cart/add",
            Some((&id, "lea")),
            Some(&offline),
            serde_json::json!({ "item": "ink" }),
        )
        .await;
    assert_eq!(answer.status, StatusCode::OK, "{:?}", answer.body);
    assert_eq!(items(&answer.body), ["pen", "ink"]);
    let stored = direct.get(&id, false).await.unwrap();
    let cart: Value = serde_json::from_slice(&stored.attrs["cart"]).unwrap();
    assert_eq!(cart["items"], serde_json::json!(["pen", "ink"]));
    assert_eq!(
        stored.version,
        base.version + 2,
        "the restore, then the write"
    );
    let confirmed = decode(&answer.cookie("sid_snap").unwrap());
    assert!(!confirmed.has_offline_changes());
    assert_eq!(confirmed.base_version, stored.version);
}
