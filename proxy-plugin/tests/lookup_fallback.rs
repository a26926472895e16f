//! The session-lookup plugin's outage fallback end to end: a real session server (memory
//! store), a backend echoing the `x-session-*` headers it got, and the proxy keeping a signed
//! snapshot cookie that stands in for the session while the store is down.

mod support;

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use http::StatusCode;
use proxy_plugin::config::{LookupConfig, LookupFailure, SnapshotKey};
use session_client::cookie::{CookieCodec, CookieKey, Encryption, KeyRing, Snapshot, unix_ms};
use session_client::{Patch, SessionClient, SessionData};
use support::backend::{Behaviour, TestBackend};
use support::proxy::{TestProxy, client, config};
use support::session::TestSessionServer;

/// The key material the proxy and the "backends" share.
const KEY: [u8; 32] = [0x5a; 32];
/// Namespace of every session here.
const NAMESPACE: &str = "shop";

fn lookup_config(server: &str, on_failure: LookupFailure, keys: &[&[u8]]) -> LookupConfig {
    LookupConfig {
        session_server: server.to_owned(),
        namespace: NAMESPACE.to_owned(),
        cookie: "sid".to_owned(),
        attrs: vec!["cart".to_owned()],
        on_failure,
        auth_token: None,
        timeout: Duration::from_millis(500),
        snapshot_keys: keys.iter().map(|k| SnapshotKey(k.to_vec())).collect(),
        snapshot_cookie: "sid_snap".to_owned(),
    }
}

/// A codec over `material`, as a backend given the same `--cookie-key` builds it.
fn codec(material: &[u8]) -> CookieCodec {
    let key = CookieKey::new(material).expect("key");
    CookieCodec::new(KeyRing::new(vec![key]).expect("ring"), Encryption::None)
}

/// A session server, a session of alice (cart `[1,2]`, `ttl`), an echoing backend and a
/// proxy with the fallback on.
struct Stack {
    /// `None` once stopped.
    sessions: Option<TestSessionServer>,
    /// Its URL (still configured after it stopped).
    session_url: String,
    store: SessionClient,
    session: SessionData,
    backend: TestBackend,
    proxy: TestProxy,
    http: reqwest::Client,
}

impl Stack {
    async fn start(on_failure: LookupFailure, ttl: Option<Duration>) -> Stack {
        Self::start_with_keys(on_failure, ttl, &[&KEY]).await
    }

    async fn start_with_keys(
        on_failure: LookupFailure,
        ttl: Option<Duration>,
        keys: &[&[u8]],
    ) -> Stack {
        let sessions = TestSessionServer::start().await;
        let store = sessions.client(NAMESPACE);
        let session = store
            .create("alice", attrs(&[("cart", b"[1,2]")]), ttl)
            .await
            .expect("create");
        let backend = TestBackend::start("echo", Behaviour::SessionEcho).await;
        let mut cfg = config(&[&backend]);
        cfg.lookup = Some(lookup_config(&sessions.url(), on_failure, keys));
        let proxy = TestProxy::start(cfg).await;
        Stack {
            session_url: sessions.url(),
            sessions: Some(sessions),
            store,
            session,
            backend,
            proxy,
            http: client(),
        }
    }

    /// `GET path` with these cookies.
    async fn get(&self, path: &str, cookies: &str) -> Reply {
        let response = self
            .http
            .get(self.proxy.url(path))
            .header("cookie", cookies)
            .send()
            .await
            .expect("proxy answers");
        Reply::read(response).await
    }

    /// The snapshot the proxy sets on a first request with the session cookie.
    async fn first_snapshot(&self) -> String {
        let reply = self.get("/", &format!("sid={}", self.session.id)).await;
        assert_eq!(reply.status, StatusCode::OK);
        reply
            .snapshot()
            .expect("a snapshot cookie on the first request")
    }

    /// Stops the session server: every lookup is now Unavailable.
    async fn store_down(&mut self) {
        if let Some(sessions) = self.sessions.take() {
            sessions.stop().await;
        }
    }
}

fn attrs(pairs: &[(&str, &[u8])]) -> HashMap<String, Vec<u8>> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), v.to_vec()))
        .collect()
}

/// A response: status, the session headers the backend saw, the `Set-Cookie` lines.
struct Reply {
    status: StatusCode,
    seen: HashMap<String, String>,
    set_cookies: Vec<String>,
}

impl Reply {
    async fn read(response: reqwest::Response) -> Reply {
        let status = response.status();
        let set_cookies = response
            .headers()
            .get_all("set-cookie")
            .iter()
            .map(|v| v.to_str().expect("ascii").to_owned())
            .collect();
        let seen = if status == StatusCode::OK {
            response.json().await.expect("the backend's JSON")
        } else {
            HashMap::new()
        };
        Reply {
            status,
            seen,
            set_cookies,
        }
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.seen.get(name).map(String::as_str)
    }

    /// The `sid_snap` cookie set, if any (its value).
    fn snapshot(&self) -> Option<String> {
        self.snapshot_line().map(|line| {
            let (pair, _) = line.split_once(';').unwrap_or((line, ""));
            pair["sid_snap=".len()..].to_owned()
        })
    }

    fn snapshot_line(&self) -> Option<&str> {
        self.set_cookies
            .iter()
            .map(String::as_str)
            .find(|c| c.starts_with("sid_snap="))
    }
}

#[tokio::test]
async fn first_request_gets_a_snapshot_and_a_fresh_one_gets_none() {
    let stack = Stack::start(LookupFailure::Open, None).await;
    let id = &stack.session.id;
    let reply = stack.get("/", &format!("sid={id}")).await;
    assert_eq!(reply.header("x-session-user"), Some("alice"));
    assert_eq!(reply.header("x-session-degraded"), None);
    let line = reply.snapshot_line().expect("snapshot cookie set");
    assert!(line.ends_with("; Path=/; HttpOnly; SameSite=Lax"), "{line}");
    let value = reply.snapshot().unwrap();
    assert!(value.len() <= 4096);

    // A backend with the same key material reads it (key ids derive from the material).
    let snapshot = codec(&KEY)
        .decode(&value)
        .expect("the backends' codec verifies it");
    assert_eq!(snapshot.id, *id);
    assert_eq!(snapshot.namespace, NAMESPACE);
    assert_eq!(snapshot.user_id, "alice");
    assert_eq!(snapshot.attrs["cart"], b"[1,2]");
    assert_eq!(snapshot.version, stack.session.version);
    assert_eq!(snapshot.ttl_ms, 30 * 60 * 1000, "the server's default ttl");
    assert!(snapshot.expires_at_ms > unix_ms(SystemTime::now()) + 29 * 60 * 1000);

    let reply = stack.get("/", &format!("sid={id}; sid_snap={value}")).await;
    assert_eq!(reply.header("x-session-user"), Some("alice"));
    assert!(
        reply.set_cookies.is_empty(),
        "a fresh snapshot is not rewritten: {:?}",
        reply.set_cookies
    );

    // The session changes: the old snapshot is of another version and is replaced.
    let patch = Patch {
        set: attrs(&[("cart", b"[1,2,3]")]),
        ..Patch::default()
    };
    let updated = stack.store.update(id, patch).await.unwrap();
    let reply = stack.get("/", &format!("sid={id}; sid_snap={value}")).await;
    let newer = codec(&KEY)
        .decode(&reply.snapshot().expect("rewritten"))
        .unwrap();
    assert_eq!(newer.version, updated.version);
    assert_eq!(newer.attrs["cart"], b"[1,2,3]");
}

#[tokio::test]
async fn a_snapshot_past_half_its_life_is_rewritten() {
    let ttl = Duration::from_secs(4);
    let stack = Stack::start(LookupFailure::Open, Some(ttl)).await;
    let id = &stack.session.id;
    let first = stack.first_snapshot().await;
    let old = codec(&KEY).decode(&first).unwrap();
    tokio::time::sleep(Duration::from_millis(2300)).await;
    let reply = stack.get("/", &format!("sid={id}; sid_snap={first}")).await;
    assert_eq!(reply.header("x-session-user"), Some("alice"));
    let new = codec(&KEY)
        .decode(&reply.snapshot().expect("rewritten"))
        .unwrap();
    assert!(
        new.expires_at_ms > old.expires_at_ms + 2000,
        "{new:?} / {old:?}"
    );
}

#[tokio::test]
async fn store_down_a_valid_snapshot_keeps_the_user_logged_in_even_fail_closed() {
    let mut stack = Stack::start(LookupFailure::Closed, None).await;
    let id = stack.session.id.clone();
    let value = stack.first_snapshot().await;
    // A client cannot claim degraded mode (or anything else) itself.
    let spoofed = stack
        .http
        .get(stack.proxy.url("/"))
        .header("cookie", format!("sid={id}; sid_snap={value}"))
        .header("x-session-degraded", "1")
        .send()
        .await
        .unwrap();
    assert_eq!(
        Reply::read(spoofed).await.header("x-session-degraded"),
        None
    );

    stack.store_down().await;
    let reply = stack.get("/", &format!("sid={id}; sid_snap={value}")).await;
    assert_eq!(
        reply.status,
        StatusCode::OK,
        "a valid snapshot is a session"
    );
    assert_eq!(reply.header("x-session-id"), Some(id.as_str()));
    assert_eq!(reply.header("x-session-user"), Some("alice"));
    assert_eq!(reply.header("x-session-degraded"), Some("1"));
    let cart = base64::engine::general_purpose::STANDARD.encode(b"[1,2]");
    assert_eq!(reply.header("x-session-attr-cart"), Some(cart.as_str()));
    assert!(reply.set_cookies.is_empty(), "{:?}", reply.set_cookies);
    let text = stack.proxy.proxy.render_metrics();
    assert!(
        text.contains("proxy_session_lookups_total{outcome=\"snapshot\"} 1"),
        "{text}"
    );
}

#[tokio::test]
async fn a_snapshot_made_by_a_backend_with_the_same_key_is_honoured() {
    let mut stack = Stack::start(LookupFailure::Closed, None).await;
    let now = unix_ms(SystemTime::now());
    let snapshot = Snapshot {
        id: stack.session.id.clone(),
        namespace: NAMESPACE.to_owned(),
        user_id: "alice".to_owned(),
        attrs: BTreeMap::new(),
        version: stack.session.version,
        created_at_ms: now,
        issued_at_ms: now,
        expires_at_ms: now + 30 * 60 * 1000,
        ttl_ms: 30 * 60 * 1000,
    };
    // Signed only, as `demo-app --cookie-key` does without `--encrypt-cookies`.
    let value = codec(&KEY).encode(&snapshot).unwrap();
    let id = stack.session.id.clone();
    stack.store_down().await;
    let reply = stack.get("/", &format!("sid={id}; sid_snap={value}")).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.header("x-session-user"), Some("alice"));
}

#[tokio::test]
async fn store_down_the_snapshot_expiry_slides_like_the_store() {
    let mut stack = Stack::start(LookupFailure::Closed, Some(Duration::from_secs(4))).await;
    let id = stack.session.id.clone();
    let value = stack.first_snapshot().await;
    let old = codec(&KEY).decode(&value).unwrap();
    stack.store_down().await;
    tokio::time::sleep(Duration::from_millis(2300)).await;
    let reply = stack.get("/", &format!("sid={id}; sid_snap={value}")).await;
    assert_eq!(reply.header("x-session-degraded"), Some("1"));
    let slid = codec(&KEY)
        .decode(&reply.snapshot().expect("slid"))
        .unwrap();
    assert!(slid.expires_at_ms > old.expires_at_ms + 2000);
    assert_eq!(
        (slid.version, slid.user_id.as_str()),
        (old.version, "alice")
    );
}

#[tokio::test]
async fn store_down_without_a_snapshot_fail_open_and_closed_behave_as_before() {
    let mut stack = Stack::start(LookupFailure::Open, None).await;
    let cookie = format!("sid={}", stack.session.id);
    stack.store_down().await;
    let reply = stack.get("/", &cookie).await;
    assert_eq!(reply.status, StatusCode::OK, "fail-open forwards");
    assert!(reply.seen.is_empty(), "{:?}", reply.seen);
    assert!(reply.set_cookies.is_empty());

    let mut cfg = stack.proxy.proxy.config();
    cfg.lookup = Some(lookup_config(
        &stack.session_url,
        LookupFailure::Closed,
        &[&KEY],
    ));
    stack.proxy.proxy.reload(cfg).unwrap();
    let hits = stack.backend.hits();
    let reply = stack.get("/", &cookie).await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE, "fail-closed");
    assert_eq!(stack.backend.hits(), hits);
}

#[tokio::test]
async fn a_forged_or_altered_snapshot_is_ignored() {
    let mut stack = Stack::start(LookupFailure::Closed, None).await;
    let id = stack.session.id.clone();
    let value = stack.first_snapshot().await;
    // Altered: one character of the sealed payload changed.
    let mut parts: Vec<String> = value.split('.').map(str::to_owned).collect();
    let payload = &mut parts[2];
    let flipped = if payload.ends_with('A') { "B" } else { "A" };
    payload.replace_range(payload.len() - 1.., flipped);
    let altered = parts.join(".");
    // Forged: a well-formed snapshot claiming admin, signed with a key the proxy lacks.
    let now = unix_ms(SystemTime::now());
    let forged = codec(&[0x11; 32])
        .encode(&Snapshot {
            id: id.clone(),
            namespace: NAMESPACE.to_owned(),
            user_id: "admin".to_owned(),
            attrs: BTreeMap::new(),
            version: 1,
            created_at_ms: now,
            issued_at_ms: now,
            expires_at_ms: now + 60_000,
            ttl_ms: 60_000,
        })
        .unwrap();

    // Store up: replaced by a genuine one.
    let reply = stack
        .get("/", &format!("sid={id}; sid_snap={altered}"))
        .await;
    assert_eq!(reply.header("x-session-user"), Some("alice"));
    assert!(
        reply.snapshot().is_some(),
        "an invalid snapshot is replaced"
    );

    stack.store_down().await;
    for bad in [&altered, &forged] {
        let reply = stack.get("/", &format!("sid={id}; sid_snap={bad}")).await;
        assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE, "{bad}");
    }
}

#[tokio::test]
async fn a_snapshot_of_another_session_is_ignored() {
    let mut stack = Stack::start(LookupFailure::Open, None).await;
    let alice = stack.first_snapshot().await;
    let bob = stack
        .store
        .create("bob", HashMap::new(), None)
        .await
        .unwrap();

    // Store up: bob's request carrying alice's snapshot is bob's, and gets bob's snapshot.
    let reply = stack
        .get("/", &format!("sid={}; sid_snap={alice}", bob.id))
        .await;
    assert_eq!(reply.header("x-session-user"), Some("bob"));
    let replaced = codec(&KEY)
        .decode(&reply.snapshot().expect("replaced"))
        .unwrap();
    assert_eq!(replaced.user_id, "bob");

    stack.store_down().await;
    let reply = stack
        .get("/", &format!("sid={}; sid_snap={alice}", bob.id))
        .await;
    assert_eq!(reply.status, StatusCode::OK, "fail-open");
    assert!(
        reply.seen.is_empty(),
        "alice's snapshot was used: {:?}",
        reply.seen
    );
}

#[tokio::test]
async fn a_deleted_session_is_not_brought_back_by_its_snapshot() {
    let stack = Stack::start(LookupFailure::Open, None).await;
    let id = stack.session.id.clone();
    let value = stack.first_snapshot().await;
    assert!(stack.store.delete(&id).await.unwrap(), "logged out");

    let reply = stack.get("/", &format!("sid={id}; sid_snap={value}")).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert!(
        reply.seen.is_empty(),
        "the user came back: {:?}",
        reply.seen
    );
    let line = reply
        .snapshot_line()
        .expect("the stale snapshot is expired");
    assert!(
        line.starts_with("sid_snap=;") && line.contains("Max-Age=0"),
        "{line}"
    );
}

#[tokio::test]
async fn a_response_that_sets_the_session_cookie_gets_no_snapshot() {
    let stack = Stack::start(LookupFailure::Open, None).await;
    let reply = stack
        .get("/set-cookie/sid", &format!("sid={}", stack.session.id))
        .await;
    assert_eq!(reply.header("x-session-user"), Some("alice"));
    assert_eq!(reply.set_cookies, ["sid=set-by-backend; Path=/"]);
}

#[tokio::test]
async fn without_snapshot_keys_nothing_changes() {
    let mut stack = Stack::start_with_keys(LookupFailure::Closed, None, &[]).await;
    let id = stack.session.id.clone();
    let reply = stack.get("/", &format!("sid={id}")).await;
    assert_eq!(reply.header("x-session-user"), Some("alice"));
    assert!(reply.set_cookies.is_empty(), "{:?}", reply.set_cookies);

    let now = unix_ms(SystemTime::now());
    let value = codec(&KEY)
        .encode(&Snapshot {
            id: id.clone(),
            namespace: NAMESPACE.to_owned(),
            user_id: "alice".to_owned(),
            attrs: BTreeMap::new(),
            version: 1,
            created_at_ms: now,
            issued_at_ms: now,
            expires_at_ms: now + 60_000,
            ttl_ms: 60_000,
        })
        .unwrap();
    stack.store_down().await;
    let reply = stack.get("/", &format!("sid={id}; sid_snap={value}")).await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
}
