//! Store epochs through the lookup plugin, end to end: a real session server (memory store),
//! `demo-app --sessions proxy` behind the proxy (the proxy's snapshot keys are its cookie keys)
//! and a browser keeping cookies.
//! - A logout sticks: cookies copied before it and replayed against the same store find
//!   NOT_FOUND in the snapshot's own epoch, and the proxy never calls `Restore`.
//! - A store that lost its data (a memory store restarted: a new epoch) gets a live session
//!   back from its snapshot.
//! - What remains: cookies copied before a logout and replayed after the store lost its data
//!   bring the session back, but only until the snapshot max age after the store last
//!   confirmed them (`--snapshot-max-age`).
//! - During a partition the demo records cart changes in the snapshot; when the store is back
//!   they reach it, unless the store changed the session meanwhile: then the store wins.

mod support;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use demo::{DemoConfig, Sessions};
use http::StatusCode;
use proxy_plugin::config::{BackendConfig, LookupFailure};
use reqwest::cookie::{CookieStore as _, Jar};
use serde_json::Value;
use session_client::cookie::{CookieCodec, CookieKey, Encryption, KeyRing, unix_ms};
use session_client::{Patch, SessionClient};
use support::demo::DemoBackend;
use support::lookup::{NAMESPACE, attrs, lookup_config};
use support::proxy::{TestProxy, config};
use support::relay::Relay;
use support::session::TestSessionServer;

/// The key material the proxy and the demo share.
const KEY: [u8; 32] = [0x5a; 32];

/// A session server, a demo backend and the proxy with the plugin, the demo and the plugin
/// reaching the server through a relay.
struct Cluster {
    /// The session server.
    sessions: TestSessionServer,
    /// Between the demo and the plugin on one side and the session server on the other.
    relay: Relay,
    /// A client of the session server that bypasses the relay (an administrator's).
    admin: SessionClient,
    /// The demo backend.
    _demo: DemoBackend,
    /// The proxy.
    proxy: TestProxy,
}

impl Cluster {
    /// Starts it all; the plugin refuses snapshots older than `max_age` (the demo keeps the
    /// default hour).
    async fn start(max_age: Duration) -> Cluster {
        let sessions = TestSessionServer::start().await;
        let relay = Relay::start(sessions.addr).await;
        let mut demo_config = DemoConfig::new("s1", Sessions::Proxy(relay.url()));
        demo_config.secure_cookies = false;
        demo_config.namespace = NAMESPACE.to_owned();
        demo_config.cookie_keys = vec![KEY.to_vec()];
        let demo = DemoBackend::start(&demo_config).await;
        let mut cfg = config(&[]);
        cfg.backends = vec![BackendConfig {
            name: "s1".into(),
            authority: demo.authority().to_owned(),
            weight: 1,
            tls: false,
        }];
        let mut lookup = lookup_config(&relay.url(), LookupFailure::Closed, &[&KEY]);
        lookup.attrs = vec!["cart".into(), "role".into()];
        lookup.snapshot_max_age = max_age;
        cfg.lookup = Some(lookup);
        let proxy = TestProxy::start(cfg).await;
        Cluster {
            admin: sessions.client(NAMESPACE),
            sessions,
            relay,
            _demo: demo,
            proxy,
        }
    }

    /// A browser: a client keeping the cookies the proxy (and the demo behind it) set.
    fn browser(&self) -> Browser {
        let jar = Arc::new(Jar::default());
        let http = reqwest::Client::builder()
            .no_proxy()
            .cookie_provider(jar.clone())
            .timeout(Duration::from_secs(20))
            .build()
            .expect("client");
        Browser {
            http,
            jar,
            base: self.proxy.url(""),
        }
    }

    /// The user's sessions as the store lists them.
    async fn sessions_of(&self, user: &str) -> usize {
        self.admin.list_by_user(user).await.expect("list").len()
    }

    /// Sends `cookies` (copied from a browser) to `GET /me`: the status and the demo's body.
    async fn replay(&self, cookies: &str) -> (StatusCode, Value, Vec<String>) {
        let response = support::proxy::client()
            .get(self.proxy.url("/me"))
            .header("cookie", cookies)
            .send()
            .await
            .expect("proxy answers");
        let status = response.status();
        let set_cookies = response
            .headers()
            .get_all("set-cookie")
            .iter()
            .map(|v| v.to_str().expect("ascii").to_owned())
            .collect();
        let body = response.json().await.unwrap_or(Value::Null);
        (status, body, set_cookies)
    }

    /// The lookup outcome `outcome` as counted so far.
    fn lookups(&self, outcome: &str) -> u64 {
        support::lookup::lookups(&self.proxy, outcome)
    }
}

/// A client keeping cookies.
struct Browser {
    /// The client.
    http: reqwest::Client,
    /// Its cookies.
    jar: Arc<Jar>,
    /// The proxy's URL.
    base: String,
}

impl Browser {
    async fn post(&self, path: &str, body: Value) -> (StatusCode, Value) {
        let response = self
            .http
            .post(format!("{}{path}", self.base))
            .json(&body)
            .send()
            .await
            .expect("proxy answers");
        let status = response.status();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    async fn me(&self) -> (StatusCode, Value) {
        let response = self
            .http
            .get(format!("{}/me", self.base))
            .send()
            .await
            .expect("proxy answers");
        let status = response.status();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    /// The cookies it would send now, as a `Cookie` header (empty when none).
    fn cookies(&self) -> String {
        let url = self.base.parse().expect("proxy URL");
        self.jar
            .cookies(&url)
            .map(|v| v.to_str().expect("ascii").to_owned())
            .unwrap_or_default()
    }

    /// The value of its cookie `name`.
    fn cookie(&self, name: &str) -> Option<String> {
        self.cookies()
            .split("; ")
            .filter_map(|pair| pair.split_once('='))
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.to_owned())
    }
}

/// Logs `user` in through the proxy and checks that `/me` knows them and that both cookies
/// are set; returns the session id.
async fn log_in(browser: &Browser, user: &str) -> String {
    let (status, _) = browser
        .post("/login", serde_json::json!({ "user": user }))
        .await;
    assert_eq!(status, StatusCode::OK);
    let (status, me) = browser.me().await;
    assert_eq!((status, me["user"].as_str()), (StatusCode::OK, Some(user)));
    assert!(
        browser.cookie("sid_snap").is_some(),
        "{}",
        browser.cookies()
    );
    browser.cookie("sid").expect("session cookie")
}

fn codec() -> CookieCodec {
    CookieCodec::new(
        KeyRing::new(vec![CookieKey::new(&KEY).expect("key")]).expect("ring"),
        Encryption::None,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_logout_sticks_against_replayed_cookies_and_nothing_is_restored() {
    let cluster = Cluster::start(Duration::from_secs(3600)).await;
    let browser = cluster.browser();
    log_in(&browser, "alice").await;
    let copied = browser.cookies();

    let (status, _) = browser.post("/logout", Value::Null).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(browser.cookies(), "", "both cookies cleared");
    assert_eq!(cluster.sessions_of("alice").await, 0);

    // The same store (same epoch) answers NOT_FOUND: the snapshot is never pushed back.
    for _ in 0..3 {
        let (status, body, set_cookies) = cluster.replay(&copied).await;
        assert_eq!(
            status,
            StatusCode::UNAUTHORIZED,
            "logged out stays out: {body}"
        );
        assert!(
            set_cookies
                .iter()
                .any(|line| line.starts_with("sid_snap=;") && line.contains("Max-Age=0")),
            "the replayed snapshot is expired: {set_cookies:?}"
        );
    }
    assert_eq!(cluster.sessions.restore_calls(), 0, "no Restore call");
    assert_eq!(cluster.sessions_of("alice").await, 0, "not in the store");
    assert_eq!(cluster.lookups("missing"), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_that_lost_its_data_gets_a_live_session_back_from_its_snapshot() {
    let mut cluster = Cluster::start(Duration::from_secs(3600)).await;
    let browser = cluster.browser();
    let id = log_in(&browser, "bob").await;
    let (status, _) = browser
        .post("/cart/add", serde_json::json!({ "item": "tea" }))
        .await;
    assert_eq!(status, StatusCode::OK);
    let before = codec()
        .decode(&browser.cookie("sid_snap").unwrap())
        .unwrap();

    // A memory store restarted: every session gone, a new epoch.
    cluster.sessions.restart().await;
    let (status, me) = browser.me().await;
    assert_eq!(status, StatusCode::OK, "{me}");
    assert_eq!(
        (me["user"].as_str(), me["cart_items"].as_u64()),
        (Some("bob"), Some(1))
    );
    assert_eq!(cluster.sessions.restore_calls(), 1);
    let stored = cluster
        .admin
        .get(&id, false)
        .await
        .expect("back in the store");
    assert_eq!(stored.user_id, "bob");
    assert_ne!(stored.epoch, before.epoch, "a new epoch");
    assert_eq!(cluster.lookups("restored"), 1);
    // The proxy re-issued the snapshot in the new epoch.
    let after = codec()
        .decode(&browser.cookie("sid_snap").unwrap())
        .unwrap();
    assert_eq!(after.epoch, stored.epoch);
    assert_eq!(after.base_version, stored.version);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_logged_out_before_the_store_lost_its_data_comes_back_only_within_the_snapshot_max_age()
 {
    const MAX_AGE: Duration = Duration::from_secs(2);
    // The residual risk: within the max age, a logged-out session whose cookies were copied
    // comes back into a store that lost its data, since nothing in it tells the two apart.
    let mut cluster = Cluster::start(Duration::from_secs(3600)).await;
    let browser = cluster.browser();
    log_in(&browser, "carol").await;
    let copied = browser.cookies();
    browser.post("/logout", Value::Null).await;
    cluster.sessions.restart().await;
    let (status, body, _) = cluster.replay(&copied).await;
    assert_eq!(
        status,
        StatusCode::OK,
        "restored within the max age: {body}"
    );
    assert_eq!(cluster.sessions_of("carol").await, 1);

    // The bound: a proxy with a 2 s max age does not take the same cookies once the store
    // last confirmed them more than 2 s ago, whatever the demo (one hour) wrote into them.
    let mut cluster = Cluster::start(MAX_AGE).await;
    let browser = cluster.browser();
    log_in(&browser, "dave").await;
    let copied = browser.cookies();
    browser.post("/logout", Value::Null).await;
    cluster.sessions.restart().await;
    let snapshot = codec()
        .decode(&browser_cookie(&copied, "sid_snap"))
        .unwrap();
    let limit = snapshot.confirmed_at_ms + MAX_AGE.as_millis() as u64;
    let now = unix_ms(SystemTime::now());
    tokio::time::sleep(Duration::from_millis(limit.saturating_sub(now) + 50)).await;
    let (status, body, _) = cluster.replay(&copied).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "past the max age: {body}");
    assert_eq!(cluster.sessions.restore_calls(), 0, "not even tried");
    assert_eq!(cluster.sessions_of("dave").await, 0);
}

/// The value of cookie `name` in a `Cookie` header.
fn browser_cookie(cookies: &str, name: &str) -> String {
    cookies
        .split("; ")
        .filter_map(|pair| pair.split_once('='))
        .find(|(n, _)| *n == name)
        .map(|(_, v)| v.to_owned())
        .unwrap_or_else(|| panic!("no {name} in {cookies}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cart_changes_made_during_a_partition_reach_the_store_when_it_is_back() {
    let cluster = Cluster::start(Duration::from_secs(3600)).await;
    let browser = cluster.browser();
    let id = log_in(&browser, "erin").await;
    let base = cluster.admin.get(&id, false).await.unwrap();

    cluster.relay.cut();
    for item in ["pen", "ink"] {
        let (status, body) = browser
            .post("/cart/add", serde_json::json!({ "item": item }))
            .await;
        assert_eq!(status, StatusCode::OK, "recorded offline: {body}");
    }
    let (status, me) = browser.me().await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        (me["cart_items"].as_u64(), me["degraded"].as_bool()),
        (Some(2), Some(true))
    );
    let offline = codec()
        .decode(&browser.cookie("sid_snap").unwrap())
        .unwrap();
    assert_eq!(
        (
            offline.base_version,
            offline.version,
            offline.offline_set.as_slice()
        ),
        (
            base.version,
            base.version + 2,
            ["cart".to_owned()].as_slice()
        )
    );

    cluster.relay.forward();
    let (status, me) = browser.me().await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        (me["cart_items"].as_u64(), me["degraded"].as_bool()),
        (Some(2), Some(false))
    );
    let stored = cluster.admin.get(&id, false).await.unwrap();
    let cart: Value = serde_json::from_slice(&stored.attrs["cart"]).unwrap();
    assert_eq!(cart["items"], serde_json::json!(["pen", "ink"]));
    assert_eq!(stored.version, base.version + 1, "one patch");
    assert_eq!(cluster.lookups("restored"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_demotion_made_in_the_store_during_a_partition_wins_over_offline_changes() {
    let cluster = Cluster::start(Duration::from_secs(3600)).await;
    let browser = cluster.browser();
    let id = log_in(&browser, "bob").await;
    // Bob is an administrator; his next request takes that into his snapshot.
    let patch = Patch {
        set: attrs(&[("role", b"admin")]),
        ..Patch::default()
    };
    cluster.admin.update(&id, patch).await.unwrap();
    browser.me().await;
    let confirmed = codec()
        .decode(&browser.cookie("sid_snap").unwrap())
        .unwrap();
    assert_eq!(confirmed.attrs["role"], b"admin");

    // Bob's side cannot reach the store and serves two of his requests from the snapshot,
    // while an administrator demotes him in the store.
    cluster.relay.cut();
    for item in ["pen", "ink"] {
        let (status, _) = browser
            .post("/cart/add", serde_json::json!({ "item": item }))
            .await;
        assert_eq!(status, StatusCode::OK);
    }
    let patch = Patch {
        remove: vec!["role".into()],
        ..Patch::default()
    };
    let demoted = cluster.admin.update(&id, patch).await.unwrap();
    let offline = codec()
        .decode(&browser.cookie("sid_snap").unwrap())
        .unwrap();
    assert!(offline.version > demoted.version, "a higher local version");

    // Back: the store wins. Still demoted, the offline changes dropped, counted.
    cluster.relay.forward();
    let (status, me) = browser.me().await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        (me["cart_items"].as_u64(), me["degraded"].as_bool()),
        (Some(0), Some(false))
    );
    let stored = cluster.admin.get(&id, false).await.unwrap();
    assert!(
        !stored.attrs.contains_key("role"),
        "the demotion was undone"
    );
    assert!(!stored.attrs.contains_key("cart"));
    assert_eq!(stored.version, demoted.version, "nothing applied");
    assert_eq!(cluster.lookups("conflict"), 1);
    assert_eq!(cluster.sessions.restore_calls(), 1);
    // The browser's snapshot is the store's now: no role, nothing offline.
    let adopted = codec()
        .decode(&browser.cookie("sid_snap").unwrap())
        .unwrap();
    assert_eq!(
        (adopted.version, adopted.base_version),
        (demoted.version, demoted.version)
    );
    assert!(!adopted.attrs.contains_key("role"));
    assert!(adopted.offline_set.is_empty());
}
