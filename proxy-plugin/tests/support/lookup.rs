//! The session-lookup plugin end to end: a real session server (memory store) holding a session
//! of alice, a backend echoing the `x-session-*` headers it got, and the proxy in front with the
//! plugin on (and the snapshot cookie, when given keys), plus the codec the backends would use.

use std::collections::HashMap;
use std::time::Duration;

use http::StatusCode;
use proxy_plugin::config::{
    DEFAULT_OUTAGE_GRACE, DEFAULT_SNAPSHOT_MAX_AGE, LookupConfig, LookupFailure, SnapshotKey,
};
use session_client::cookie::{CookieCodec, CookieKey, Encryption, KeyRing};
use session_client::{SessionClient, SessionData};

use super::backend::{Behaviour, TestBackend};
use super::proxy::{TestProxy, client, config};
use super::relay::Relay;
use super::session::TestSessionServer;

/// Namespace of every session here.
pub const NAMESPACE: &str = "shop";

/// The plugin over `server` in [`NAMESPACE`], cookie `sid`, attribute `cart`, snapshot cookie
/// `sid_snap` with `keys` (signing key first; none turns the snapshot off).
pub fn lookup_config(server: &str, on_failure: LookupFailure, keys: &[&[u8]]) -> LookupConfig {
    LookupConfig {
        session_servers: session_client::client::split_endpoints(server),
        namespace: NAMESPACE.to_owned(),
        cookie: "sid".to_owned(),
        session_header: None,
        attrs: vec!["cart".to_owned()],
        on_failure,
        auth_token: None,
        timeout: Duration::from_millis(500),
        snapshot_keys: keys.iter().map(|k| SnapshotKey(k.to_vec())).collect(),
        snapshot_cookie: "sid_snap".to_owned(),
        snapshot_max_age: DEFAULT_SNAPSHOT_MAX_AGE,
        outage_grace: DEFAULT_OUTAGE_GRACE,
        cache: 0,
        tls: None,
    }
}

/// A signing-only codec over `material`, as a backend given the same `--cookie-key` builds it.
pub fn codec(material: &[u8]) -> CookieCodec {
    let key = CookieKey::new(material).expect("key");
    CookieCodec::new(KeyRing::new(vec![key]).expect("ring"), Encryption::None)
}

/// The id of the key made from `material`, as written in the cookies it signs (`v2.<id>.…`).
pub fn key_id(material: &[u8]) -> String {
    CookieKey::new(material).expect("key").id().to_owned()
}

/// Attributes from `(name, value)` pairs.
pub fn attrs(pairs: &[(&str, &[u8])]) -> HashMap<String, Vec<u8>> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), v.to_vec()))
        .collect()
}

/// How many lookups of `proxy` had `outcome` so far.
pub fn lookups(proxy: &TestProxy, outcome: &str) -> u64 {
    let text = proxy.proxy.render_metrics();
    let series = format!("proxy_session_lookups_total{{outcome=\"{outcome}\"}} ");
    text.lines()
        .find_map(|line| line.strip_prefix(&series))
        .map_or(0, |n| n.trim().parse().expect("a counter"))
}

/// A session server, a session of alice (cart `[1,2]`), an echoing backend and a proxy with
/// the plugin on.
pub struct Stack {
    /// `None` once stopped.
    pub sessions: Option<TestSessionServer>,
    /// Its URL (still configured after it stopped).
    pub session_url: String,
    /// A client of [`NAMESPACE`] on it.
    pub store: SessionClient,
    /// Alice's session.
    pub session: SessionData,
    /// The backend behind the proxy.
    pub backend: TestBackend,
    /// The proxy.
    pub proxy: TestProxy,
    /// A client of the proxy.
    pub http: reqwest::Client,
    /// The relay between the plugin and the session server, when started with one.
    pub relay: Option<Relay>,
}

impl Stack {
    /// Starts it all; alice's session gets `ttl` (the server's default when `None`) and the
    /// plugin `on_failure` and snapshot `keys`.
    pub async fn start(on_failure: LookupFailure, ttl: Option<Duration>, keys: &[&[u8]]) -> Stack {
        Stack::start_with(ttl, false, |sessions| {
            lookup_config(sessions, on_failure, keys)
        })
        .await
    }

    /// Starts it all with the plugin settings `lookup` makes for the session server's URL,
    /// the plugin reaching the server through a [`Relay`] when `relayed` (the test's own
    /// client, [`Stack::store`], always reaches it directly).
    pub async fn start_with(
        ttl: Option<Duration>,
        relayed: bool,
        lookup: impl FnOnce(&str) -> LookupConfig,
    ) -> Stack {
        let sessions = TestSessionServer::start().await;
        let store = sessions.client(NAMESPACE);
        let session = store
            .create("alice", attrs(&[("cart", b"[1,2]")]), ttl)
            .await
            .expect("create");
        let relay = match relayed {
            true => Some(Relay::start(sessions.addr).await),
            false => None,
        };
        let url = relay.as_ref().map_or_else(|| sessions.url(), Relay::url);
        let backend = TestBackend::start("echo", Behaviour::SessionEcho).await;
        let mut cfg = config(&[&backend]);
        cfg.lookup = Some(lookup(&url));
        let proxy = TestProxy::start(cfg).await;
        Stack {
            session_url: url,
            sessions: Some(sessions),
            store,
            session,
            backend,
            proxy,
            http: client(),
            relay,
        }
    }

    /// The relay in front of the session server (started with one).
    pub fn relay(&self) -> &Relay {
        self.relay.as_ref().expect("a stack started behind a relay")
    }

    /// The lookup outcome `outcome` as counted so far.
    pub fn lookups(&self, outcome: &str) -> u64 {
        lookups(&self.proxy, outcome)
    }

    /// Reloads the proxy with `lookup` in place of its plugin settings.
    pub fn reload_lookup(&self, lookup: LookupConfig) {
        let mut cfg = self.proxy.proxy.config();
        cfg.lookup = Some(lookup);
        self.proxy.proxy.reload(cfg).expect("reload");
    }

    /// `GET path` with these cookies.
    pub async fn get(&self, path: &str, cookies: &str) -> Reply {
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
    pub async fn first_snapshot(&self) -> String {
        let reply = self.get("/", &format!("sid={}", self.session.id)).await;
        assert_eq!(reply.status, StatusCode::OK);
        reply
            .snapshot()
            .expect("a snapshot cookie on the first request")
    }

    /// Stops the session server: every lookup is now Unavailable.
    pub async fn store_down(&mut self) {
        if let Some(sessions) = self.sessions.take() {
            sessions.stop().await;
        }
    }
}

/// A response: status, the session headers the backend saw, the `Set-Cookie` lines.
pub struct Reply {
    /// Status.
    pub status: StatusCode,
    /// The `x-session-*` headers the backend saw (name to value); empty unless 200.
    pub seen: HashMap<String, String>,
    /// Every `Set-Cookie` line.
    pub set_cookies: Vec<String>,
    /// The `Retry-After` header, if any.
    pub retry_after: Option<String>,
}

impl Reply {
    /// Reads a response of the proxy.
    pub async fn read(response: reqwest::Response) -> Reply {
        let status = response.status();
        let set_cookies = response
            .headers()
            .get_all("set-cookie")
            .iter()
            .map(|v| v.to_str().expect("ascii").to_owned())
            .collect();
        let retry_after = response
            .headers()
            .get("retry-after")
            .map(|v| v.to_str().expect("ascii").to_owned());
        let seen = if status == StatusCode::OK {
            response.json().await.expect("the backend's JSON")
        } else {
            HashMap::new()
        };
        Reply {
            status,
            seen,
            set_cookies,
            retry_after,
        }
    }

    /// A session header the backend saw.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.seen.get(name).map(String::as_str)
    }

    /// The `sid_snap` cookie set, if any (its value).
    pub fn snapshot(&self) -> Option<String> {
        self.snapshot_line().map(|line| {
            let (pair, _) = line.split_once(';').unwrap_or((line, ""));
            pair["sid_snap=".len()..].to_owned()
        })
    }

    /// The whole `Set-Cookie` line of `sid_snap`, if any.
    pub fn snapshot_line(&self) -> Option<&str> {
        self.set_cookies
            .iter()
            .map(String::as_str)
            .find(|c| c.starts_with("sid_snap="))
    }
}
