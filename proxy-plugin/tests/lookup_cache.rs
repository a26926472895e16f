//! The session-lookup plugin's cache (`--session-cache N`) against a real session server
//! (memory store): a hit costs no store call, a write made elsewhere is seen within a bounded
//! wait (the Watch event), a logout or a write through the proxy is seen by the very next
//! request (the response forgets the session), a lost Watch stream bypasses the cache and a
//! restarted store serves nothing stale, and the cache never holds more than N sessions.

mod support;

use std::future::Future;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use proxy_plugin::config::{BackendConfig, LookupConfig, LookupFailure};
use session_client::{Patch, SessionClient};
use support::eventually;
use support::lookup::{NAMESPACE, Stack, attrs, lookup_config, lookups};
use support::proxy::{TestProxy, client, config};
use support::relay::Relay;
use support::session::TestSessionServer;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// `[1,2]`, alice's cart, as the plugin forwards it (base64).
const CART_1_2: &str = "WzEsMl0=";

/// The plugin settings of the tests: no snapshot, fail open, a cache of `n` sessions.
fn cached(url: &str, n: usize) -> LookupConfig {
    LookupConfig {
        cache: n,
        ..lookup_config(url, LookupFailure::Open, &[])
    }
}

/// The value of a metric series (`name` or `name{labels}`) of `proxy`; 0 when absent.
fn metric(proxy: &TestProxy, series: &str) -> u64 {
    let text = proxy.proxy.render_metrics();
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .map_or(0, |n| n.trim().parse::<f64>().expect("a number") as u64)
}

/// A lookup cache event counted so far.
fn cache_events(proxy: &TestProxy, event: &str) -> u64 {
    metric(
        proxy,
        &format!("proxy_session_cache_total{{event=\"{event}\"}}"),
    )
}

/// Waits (at most `within`) until the cache's Watch stream is up (or down); panics otherwise.
async fn cache_up(proxy: &TestProxy, up: bool, within: Duration) {
    let want = u64::from(up);
    assert!(
        eventually(within, || metric(proxy, "proxy_session_cache_up") == want).await,
        "the cache's watch stream did not come {} within {within:?}",
        if up { "up" } else { "down" }
    );
}

/// Polls `check` every 10 ms for at most `within`; whether it held.
async fn poll<F: Future<Output = bool>>(within: Duration, mut check: impl FnMut() -> F) -> bool {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if check().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A [`Stack`] whose plugin has a cache of `n` sessions, its stream up.
async fn cached_stack(n: usize, relayed: bool) -> Stack {
    let stack = Stack::start_with(None, relayed, |url| cached(url, n)).await;
    cache_up(&stack.proxy, true, Duration::from_secs(5)).await;
    stack
}

/// `Get` calls the stack's session server answered.
fn get_calls(stack: &Stack) -> u64 {
    stack.sessions.as_ref().expect("server up").get_calls()
}

#[tokio::test]
async fn a_cache_hit_serves_the_session_without_a_store_call() {
    let stack = cached_stack(100, false).await;
    let cookie = format!("sid={}", stack.session.id);
    let first = stack.get("/", &cookie).await;
    assert_eq!(first.header("x-session-user"), Some("alice"));
    let gets = get_calls(&stack);
    let hits = cache_events(&stack.proxy, "hit");
    for _ in 0..20 {
        let reply = stack.get("/", &cookie).await;
        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(reply.header("x-session-user"), Some("alice"));
        assert_eq!(
            reply.header("x-session-id"),
            Some(stack.session.id.as_str())
        );
        assert_eq!(reply.header("x-session-attr-cart"), Some(CART_1_2));
    }
    assert_eq!(
        get_calls(&stack),
        gets,
        "every request served from the cache"
    );
    assert_eq!(cache_events(&stack.proxy, "hit"), hits + 20);
    assert_eq!(stack.lookups("found"), 21, "a hit is a session found");
    assert_eq!(metric(&stack.proxy, "proxy_session_cache_entries"), 1);
}

#[tokio::test]
async fn without_the_flag_every_request_reads_the_store() {
    let stack = Stack::start(LookupFailure::Open, None, &[]).await;
    let cookie = format!("sid={}", stack.session.id);
    let gets = get_calls(&stack);
    for _ in 0..5 {
        let reply = stack.get("/", &cookie).await;
        assert_eq!(reply.header("x-session-user"), Some("alice"));
    }
    assert_eq!(get_calls(&stack), gets + 5);
    assert_eq!(cache_events(&stack.proxy, "hit"), 0);
}

#[tokio::test]
async fn a_write_or_a_delete_made_elsewhere_is_seen_within_a_bounded_wait() {
    let stack = cached_stack(100, false).await;
    let id = stack.session.id.clone();
    let cookie = format!("sid={id}");
    stack.get("/", &cookie).await;
    assert_eq!(
        stack.get("/", &cookie).await.header("x-session-attr-cart"),
        Some(CART_1_2)
    );
    let patch = Patch {
        set: attrs(&[("cart", b"[9]")]),
        ..Patch::default()
    };
    stack.store.update(&id, patch).await.expect("update");
    let seen = poll(Duration::from_secs(2), || async {
        stack.get("/", &cookie).await.header("x-session-attr-cart") == Some("Wzld")
    })
    .await;
    assert!(seen, "an Update through another client seen within 2 s");
    assert!(cache_events(&stack.proxy, "invalidated") >= 1);

    stack.store.delete(&id).await.expect("delete");
    let gone = poll(Duration::from_secs(2), || async {
        let reply = stack.get("/", &cookie).await;
        reply.status == StatusCode::OK && reply.header("x-session-user").is_none()
    })
    .await;
    assert!(gone, "a Delete through another client seen within 2 s");
    for _ in 0..5 {
        let reply = stack.get("/", &cookie).await;
        assert_eq!(reply.header("x-session-user"), None, "and never again");
    }
}

/// A backend served on a loopback port, stopped when dropped.
struct Backend {
    /// Its entry in the proxy's config.
    config: BackendConfig,
    /// The serving task.
    task: JoinHandle<()>,
}

impl Backend {
    /// A backend without session code: `/me` answers the session the proxy forwarded
    /// (`user cart`), `GET /logout` deletes the session and clears the cookie, `POST /cart`
    /// writes the cart (the body) and answers without any cookie.
    async fn start(store: SessionClient) -> Backend {
        async fn me(headers: HeaderMap) -> String {
            let header = |name| {
                headers
                    .get(name)
                    .map_or("-", |v| v.to_str().unwrap_or("?"))
                    .to_owned()
            };
            format!(
                "{} {}",
                header("x-session-user"),
                header("x-session-attr-cart")
            )
        }
        async fn logout(State(store): State<SessionClient>, headers: HeaderMap) -> Response {
            if let Some(id) = headers.get("x-session-id") {
                store
                    .delete(id.to_str().expect("ascii"))
                    .await
                    .expect("delete");
            }
            ([("set-cookie", "sid=; Path=/; Max-Age=0; HttpOnly")], "bye").into_response()
        }
        async fn cart(
            State(store): State<SessionClient>,
            headers: HeaderMap,
            body: String,
        ) -> StatusCode {
            let Some(id) = headers.get("x-session-id") else {
                return StatusCode::UNAUTHORIZED;
            };
            let patch = Patch {
                set: attrs(&[("cart", body.as_bytes())]),
                ..Patch::default()
            };
            store
                .update(id.to_str().expect("ascii"), patch)
                .await
                .expect("update");
            StatusCode::NO_CONTENT
        }
        let app = Router::new()
            .route("/me", get(me))
            .route("/logout", get(logout))
            .route("/cart", post(cart))
            .with_state(store);
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind loopback");
        let addr = listener.local_addr().expect("local address");
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        let config = BackendConfig {
            name: "app".to_owned(),
            authority: addr.to_string(),
            weight: 1,
            tls: false,
        };
        Backend { config, task }
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[tokio::test]
async fn a_logout_or_a_write_through_the_proxy_is_seen_by_the_very_next_request() {
    let sessions = TestSessionServer::start().await;
    let store = sessions.client(NAMESPACE);
    let backend = Backend::start(store.clone()).await;
    let mut cfg = config(&[]);
    cfg.backends = vec![backend.config.clone()];
    cfg.lookup = Some(cached(&sessions.url(), 100));
    let proxy = TestProxy::start(cfg).await;
    cache_up(&proxy, true, Duration::from_secs(5)).await;
    let http = client();
    let me = |cookie: String| {
        let request = http.get(proxy.url("/me")).header("cookie", cookie);
        async move {
            let response = request.send().await.expect("proxy answers");
            assert_eq!(response.status(), StatusCode::OK);
            response.text().await.expect("body")
        }
    };
    for round in 0..10 {
        let session = store
            .create(&format!("user{round}"), attrs(&[("cart", b"[1,2]")]), None)
            .await
            .expect("create");
        let cookie = format!("sid={}", session.id);
        let user = format!("user{round} {CART_1_2}");
        assert_eq!(me(cookie.clone()).await, user);
        let hits = cache_events(&proxy, "hit");
        assert_eq!(me(cookie.clone()).await, user);
        assert_eq!(
            cache_events(&proxy, "hit"),
            hits + 1,
            "round {round}: cached"
        );

        // A write through the proxy (an unsafe method): the next request reads it.
        let forgotten = cache_events(&proxy, "forgotten");
        let response = http
            .post(proxy.url("/cart"))
            .header("cookie", cookie.clone())
            .body("[7]")
            .send()
            .await
            .expect("proxy answers");
        assert_eq!(response.status(), StatusCode::NO_CONTENT);
        assert_eq!(cache_events(&proxy, "forgotten"), forgotten + 1);
        assert_eq!(me(cookie.clone()).await, format!("user{round} Wzdd"));
        assert_eq!(me(cookie.clone()).await, format!("user{round} Wzdd"));

        // A logout (a GET, so only the cleared cookie says it): the next request, with the
        // cookie copied before, finds nobody.
        let response = http
            .get(proxy.url("/logout"))
            .header("cookie", cookie.clone())
            .send()
            .await
            .expect("proxy answers");
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(cache_events(&proxy, "forgotten"), forgotten + 2);
        assert_eq!(me(cookie.clone()).await, "- -", "round {round}: logged out");
    }
}

#[tokio::test]
async fn a_logout_or_a_write_is_forgotten_at_once_even_while_its_event_is_held_up() {
    let sessions = TestSessionServer::start().await;
    let store = sessions.client(NAMESPACE);
    let backend = Backend::start(store.clone()).await;
    // The plugin (its Gets and its Watch stream) reaches the server through a relay; the
    // backend reaches it directly.
    let relay = Relay::start(sessions.addr).await;
    let mut cfg = config(&[]);
    cfg.backends = vec![backend.config.clone()];
    cfg.lookup = Some(cached(&relay.url(), 100));
    let proxy = TestProxy::start(cfg).await;
    cache_up(&proxy, true, Duration::from_secs(5)).await;
    let http = client();
    let send = |request: reqwest::RequestBuilder| async move {
        let response = request.send().await.expect("proxy answers");
        let status = response.status();
        (status, response.text().await.expect("body"))
    };
    for path in ["/logout", "/cart"] {
        let session = store
            .create("bob", attrs(&[("cart", b"[1,2]")]), None)
            .await
            .expect("create");
        let cookie = format!("sid={}", session.id);
        let me = || http.get(proxy.url("/me")).header("cookie", cookie.clone());
        send(me()).await;
        assert_eq!(send(me()).await.1, format!("bob {CART_1_2}"));
        // The plugin's events (and Gets) held up: the logout or write below is served from
        // the cache, and its event cannot reach the proxy before the next request.
        relay.stall();
        let request = match path {
            "/logout" => http.get(proxy.url(path)),
            _ => http.post(proxy.url(path)).body("[7]"),
        };
        let (status, _) = send(request.header("cookie", cookie.clone())).await;
        assert!(status.is_success(), "{path}: {status}");
        // Not served from the cache: the store is asked (and, held up, times out: fail open).
        let timed_out = lookups(&proxy, "timeout_open");
        let (status, body) = send(me()).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(
            body, "- -",
            "{path}: the next request got the forgotten session"
        );
        assert_eq!(lookups(&proxy, "timeout_open"), timed_out + 1);
        relay.forward();
        cache_up(&proxy, true, Duration::from_secs(5)).await;
    }
}

#[tokio::test]
async fn with_the_watch_stream_down_the_cache_is_bypassed_and_a_restarted_store_serves_nothing_stale()
 {
    let mut stack = cached_stack(100, true).await;
    let cookie = format!("sid={}", stack.session.id);
    stack.get("/", &cookie).await;
    let hits = cache_events(&stack.proxy, "hit");
    assert_eq!(
        stack.get("/", &cookie).await.header("x-session-user"),
        Some("alice")
    );
    assert_eq!(cache_events(&stack.proxy, "hit"), hits + 1, "cached");

    // The store unreachable: the stream is lost, the cache bypassed (not served from).
    stack.relay().cut();
    cache_up(&stack.proxy, false, Duration::from_secs(5)).await;
    assert_eq!(metric(&stack.proxy, "proxy_session_cache_entries"), 0);
    let failed = stack.lookups("failed_open");
    let reply = stack.get("/", &cookie).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(
        reply.header("x-session-user"),
        None,
        "the cache was bypassed"
    );
    assert_eq!(stack.lookups("failed_open"), failed + 1);
    assert!(cache_events(&stack.proxy, "bypassed") >= 1);

    // Reachable again: the stream comes back, the session is read from the store and cached.
    stack.relay().forward();
    cache_up(&stack.proxy, true, Duration::from_secs(10)).await;
    let gets = get_calls(&stack);
    assert_eq!(
        stack.get("/", &cookie).await.header("x-session-user"),
        Some("alice")
    );
    assert_eq!(get_calls(&stack), gets + 1, "read from the store");
    assert_eq!(
        stack.get("/", &cookie).await.header("x-session-user"),
        Some("alice")
    );
    assert_eq!(get_calls(&stack), gets + 1, "cached again");

    // The store restarts with its data lost: once the proxy sees its stream end, the cached
    // session is gone, and when the stream is back nothing stale is served.
    let cleared = cache_events(&stack.proxy, "cleared");
    stack.sessions.as_mut().expect("server up").restart().await;
    assert!(
        eventually(Duration::from_secs(5), || cache_events(
            &stack.proxy,
            "cleared"
        ) > cleared)
        .await,
        "the cache was emptied when its stream ended"
    );
    cache_up(&stack.proxy, true, Duration::from_secs(10)).await;
    for _ in 0..5 {
        let reply = stack.get("/", &cookie).await;
        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(reply.header("x-session-user"), None, "nothing stale");
    }
    assert!(stack.lookups("missing") >= 5);
}

#[tokio::test]
async fn an_active_users_session_keeps_sliding_while_served_from_the_cache() {
    let stack = cached_stack(100, false).await;
    // A 2 s ttl: a 1 s touch window, so requests every 200 ms for 5 s (2.5 ttls) are mostly
    // served from the cache and the store is touched about once a second.
    let session = stack
        .store
        .create("carol", attrs(&[]), Some(Duration::from_secs(2)))
        .await
        .expect("create");
    let cookie = format!("sid={}", session.id);
    let gets = get_calls(&stack);
    let hits = cache_events(&stack.proxy, "hit");
    for i in 0..25 {
        let reply = stack.get("/", &cookie).await;
        assert_eq!(reply.header("x-session-user"), Some("carol"), "request {i}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (gets, hits) = (
        get_calls(&stack) - gets,
        cache_events(&stack.proxy, "hit") - hits,
    );
    assert!((3..=15).contains(&gets), "{gets} store reads");
    assert!(hits >= 10, "{hits} hits");
    // Idle past its ttl, it expires as it would without the cache.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let reply = stack.get("/", &cookie).await;
    assert_eq!(reply.header("x-session-user"), None);
}

#[tokio::test]
async fn the_cache_holds_at_most_n_sessions_and_unknown_ids_insert_nothing() {
    let stack = cached_stack(8, false).await;
    let entries = || metric(&stack.proxy, "proxy_session_cache_entries");
    for i in 0..40 {
        let user = format!("u{i}");
        let session = stack
            .store
            .create(&user, attrs(&[]), None)
            .await
            .expect("create");
        let cookie = format!("sid={}", session.id);
        for _ in 0..2 {
            let reply = stack.get("/", &cookie).await;
            assert_eq!(reply.header("x-session-user"), Some(user.as_str()));
        }
        assert!(entries() <= 8, "{} entries", entries());
    }
    assert_eq!(entries(), 8);
    assert!(cache_events(&stack.proxy, "evicted") >= 32);
    // A hostile client's random ids: each a miss, none kept.
    let misses = cache_events(&stack.proxy, "miss");
    for i in 0..100 {
        let cookie = format!("sid=unknown{i:024}");
        let reply = stack.get("/", &cookie).await;
        assert_eq!(reply.header("x-session-user"), None);
    }
    assert_eq!(cache_events(&stack.proxy, "miss"), misses + 100);
    assert_eq!(entries(), 8);
}
