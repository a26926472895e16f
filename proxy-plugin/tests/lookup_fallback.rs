//! The session-lookup plugin's outage fallback end to end: a real session server (memory
//! store), a backend echoing the `x-session-*` headers it got, and the proxy keeping a signed
//! snapshot cookie that stands in for the session while the store is down.

mod support;

use std::collections::HashMap;
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use http::StatusCode;
use proxy_plugin::config::LookupFailure;
use session_client::cookie::{
    CookieError, DEFAULT_SNAPSHOT_MAX_AGE, Snapshot, SnapshotPolicy, unix_ms,
};
use session_client::{Patch, SessionData};
use support::lookup::{NAMESPACE, Reply, Stack, attrs, codec, lookup_config};

/// The key material the proxy and the "backends" share.
const KEY: [u8; 32] = [0x5a; 32];
/// The ttl of a session created without one (the session server's default).
const DEFAULT_TTL: Duration = Duration::from_secs(30 * 60);

/// A snapshot of `stack`'s session (alice, cart `[1,2]`, the default ttl) with `left` of its
/// life left, signed with [`KEY`] as a backend, or the proxy on an earlier response, made it:
/// confirmed by the store a ttl minus `left` ago. Aging a snapshot this way instead of waiting
/// for it puts the test far from the half-life boundary whatever the machine's load.
fn snapshot_with(stack: &Stack, left: Duration) -> (Snapshot, String) {
    let confirmed_at = SystemTime::now() - (DEFAULT_TTL - left);
    let mut session = stack.session.clone();
    session.expires_at = confirmed_at + DEFAULT_TTL;
    let snapshot = Snapshot::confirmed(&session, NAMESPACE, confirmed_at, DEFAULT_SNAPSHOT_MAX_AGE);
    let value = codec(&KEY).encode(&snapshot).expect("encode");
    (snapshot, value)
}

/// A snapshot of `session` confirmed now, signed with `key` as a backend signs it.
fn signed(session: &SessionData, key: &[u8]) -> String {
    let snapshot = Snapshot::confirmed(
        session,
        NAMESPACE,
        SystemTime::now(),
        DEFAULT_SNAPSHOT_MAX_AGE,
    );
    codec(key).encode(&snapshot).expect("encode")
}

#[tokio::test]
async fn first_request_gets_a_snapshot_and_a_fresh_one_gets_none() {
    let stack = Stack::start(LookupFailure::Open, None, &[&KEY]).await;
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
    // Confirmed by the store: its epoch, the version as the base, nothing offline.
    assert!(!snapshot.epoch.is_empty(), "{snapshot:?}");
    assert_eq!(snapshot.epoch, stack.session.epoch);
    assert_eq!(snapshot.base_version, snapshot.version);
    assert!(!snapshot.has_offline_changes());
    let now = unix_ms(SystemTime::now());
    assert!(snapshot.confirmed_at_ms <= now && snapshot.confirmed_at_ms + 60_000 > now);

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
async fn a_snapshot_past_half_its_life_is_rewritten_and_a_younger_one_is_not() {
    let stack = Stack::start(LookupFailure::Open, None, &[&KEY]).await;
    let id = &stack.session.id;
    let (_, young) = snapshot_with(&stack, DEFAULT_TTL * 2 / 3);
    let reply = stack.get("/", &format!("sid={id}; sid_snap={young}")).await;
    assert_eq!(reply.header("x-session-user"), Some("alice"));
    assert!(
        reply.set_cookies.is_empty(),
        "two thirds of its life left: kept {:?}",
        reply.set_cookies
    );

    let (old, aged) = snapshot_with(&stack, DEFAULT_TTL / 3);
    let reply = stack.get("/", &format!("sid={id}; sid_snap={aged}")).await;
    assert_eq!(reply.header("x-session-user"), Some("alice"));
    let new = codec(&KEY)
        .decode(
            &reply
                .snapshot()
                .expect("a third of its life left: rewritten"),
        )
        .unwrap();
    // The store's expiry (about a whole ttl ahead), not the old snapshot's.
    let sixth = DEFAULT_TTL.as_millis() as u64 / 6;
    assert!(
        new.expires_at_ms > old.expires_at_ms + sixth,
        "{new:?} / {old:?}"
    );
    assert_eq!((new.version, new.user_id.as_str()), (old.version, "alice"));
}

#[tokio::test]
async fn store_down_a_valid_snapshot_keeps_the_user_logged_in_even_fail_closed() {
    let mut stack = Stack::start(LookupFailure::Closed, None, &[&KEY]).await;
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

    // Stopped right after it answered: connections are refused, an outage at once, well
    // within the outage grace (which only holds timeouts back).
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
    let mut stack = Stack::start(LookupFailure::Closed, None, &[&KEY]).await;
    let mut session = stack.session.clone();
    session.attrs.clear();
    // Signed only, as `demo-app --cookie-key` does without `--encrypt-cookies`.
    let value = signed(&session, &KEY);
    let id = stack.session.id.clone();
    stack.store_down().await;
    let reply = stack.get("/", &format!("sid={id}; sid_snap={value}")).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.header("x-session-user"), Some("alice"));
}

#[tokio::test]
async fn store_down_the_snapshot_expiry_slides_like_the_store() {
    let mut stack = Stack::start(LookupFailure::Closed, None, &[&KEY]).await;
    let id = stack.session.id.clone();
    let (_, young) = snapshot_with(&stack, DEFAULT_TTL * 2 / 3);
    let (old, aged) = snapshot_with(&stack, DEFAULT_TTL / 3);
    stack.store_down().await;

    let reply = stack.get("/", &format!("sid={id}; sid_snap={young}")).await;
    assert_eq!(reply.header("x-session-degraded"), Some("1"));
    assert!(
        reply.set_cookies.is_empty(),
        "two thirds of its life left: kept {:?}",
        reply.set_cookies
    );

    let reply = stack.get("/", &format!("sid={id}; sid_snap={aged}")).await;
    assert_eq!(reply.header("x-session-degraded"), Some("1"));
    let slid = codec(&KEY)
        .decode(&reply.snapshot().expect("a third of its life left: slid"))
        .unwrap();
    // Now + ttl, as a touch of the store would set it: two thirds of a ttl past the old expiry.
    let now = unix_ms(SystemTime::now());
    assert!(slid.expires_at_ms > old.expires_at_ms + DEFAULT_TTL.as_millis() as u64 / 2);
    assert!(slid.expires_at_ms <= now + old.ttl_ms, "{slid:?}");
    assert_eq!(
        (slid.version, slid.user_id.as_str(), slid.ttl_ms),
        (old.version, "alice", old.ttl_ms)
    );
}

#[tokio::test]
async fn store_down_without_a_snapshot_fail_open_and_closed_behave_as_before() {
    let mut stack = Stack::start(LookupFailure::Open, None, &[&KEY]).await;
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
    let mut stack = Stack::start(LookupFailure::Closed, None, &[&KEY]).await;
    let id = stack.session.id.clone();
    let value = stack.first_snapshot().await;
    // Altered: one byte in the middle of the sealed body flipped. Flipped in the decoded bytes,
    // not in the base64 text, whose last character may carry only padding bits.
    let (header, body) = value.rsplit_once('.').expect("v2.<kid>.<body>");
    assert!(header.starts_with("v2."), "{value}");
    let mut bytes = URL_SAFE_NO_PAD.decode(body).expect("base64url body");
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x01;
    let altered = format!("{header}.{}", URL_SAFE_NO_PAD.encode(&bytes));
    assert!(
        matches!(codec(&KEY).decode(&altered), Err(CookieError::BadSignature)),
        "the flip is in the authenticated part"
    );
    // Forged: a well-formed snapshot claiming admin, signed with a key the proxy lacks.
    let mut admin = stack.session.clone();
    admin.user_id = "admin".to_owned();
    let forged = signed(&admin, &[0x11; 32]);

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
    let mut stack = Stack::start(LookupFailure::Open, None, &[&KEY]).await;
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
    let stack = Stack::start(LookupFailure::Open, None, &[&KEY]).await;
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
    let sessions = stack.sessions.as_ref().expect("store up");
    assert_eq!(
        sessions.restore_calls(),
        0,
        "NOT_FOUND in the snapshot's own epoch: never pushed back"
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
    let stack = Stack::start(LookupFailure::Open, None, &[&KEY]).await;
    let reply = stack
        .get("/set-cookie/sid", &format!("sid={}", stack.session.id))
        .await;
    assert_eq!(reply.header("x-session-user"), Some("alice"));
    assert_eq!(reply.set_cookies, ["sid=set-by-backend; Path=/"]);
}

#[tokio::test]
async fn without_snapshot_keys_nothing_changes() {
    let mut stack = Stack::start(LookupFailure::Closed, None, &[]).await;
    let id = stack.session.id.clone();
    let reply = stack.get("/", &format!("sid={id}")).await;
    assert_eq!(reply.header("x-session-user"), Some("alice"));
    assert!(reply.set_cookies.is_empty(), "{:?}", reply.set_cookies);

    let value = signed(&stack.session, &KEY);
    stack.store_down().await;
    let reply = stack.get("/", &format!("sid={id}; sid_snap={value}")).await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
}

#[tokio::test]
async fn store_down_the_snapshot_never_slides_past_its_max_age() {
    let mut stack = Stack::start(LookupFailure::Closed, None, &[&KEY]).await;
    let id = stack.session.id.clone();
    // Confirmed 50 minutes ago and slid offline since, 5 minutes left: the next slide would
    // reach a ttl past now, but the limit is an hour past the confirmation.
    let now = SystemTime::now();
    let confirmed_at = now - Duration::from_secs(50 * 60);
    let mut snapshot = Snapshot::confirmed(
        &stack.session,
        NAMESPACE,
        confirmed_at,
        DEFAULT_SNAPSHOT_MAX_AGE,
    );
    snapshot.expires_at_ms = unix_ms(now) + 5 * 60 * 1000;
    let value = codec(&KEY).encode(&snapshot).unwrap();
    stack.store_down().await;

    let reply = stack.get("/", &format!("sid={id}; sid_snap={value}")).await;
    assert_eq!(reply.header("x-session-degraded"), Some("1"));
    let slid = codec(&KEY)
        .decode(&reply.snapshot().expect("5 minutes of 30 left: slid"))
        .unwrap();
    assert_eq!(
        slid.expires_at_ms,
        snapshot.confirmed_at_ms + DEFAULT_SNAPSHOT_MAX_AGE.as_millis() as u64,
        "degraded mode stops at the max age"
    );
    assert_eq!(slid.confirmed_at_ms, snapshot.confirmed_at_ms);

    // At its limit it is not rewritten again.
    let value = reply.snapshot().unwrap();
    let reply = stack.get("/", &format!("sid={id}; sid_snap={value}")).await;
    assert_eq!(reply.header("x-session-degraded"), Some("1"));
    assert!(reply.set_cookies.is_empty(), "{:?}", reply.set_cookies);
}

#[tokio::test]
async fn a_snapshot_past_the_proxys_max_age_is_ignored_whoever_wrote_it() {
    let mut stack = Stack::start_with(None, false, |url| {
        let mut lookup = lookup_config(url, LookupFailure::Closed, &[&KEY]);
        lookup.snapshot_max_age = Duration::from_secs(10 * 60);
        lookup
    })
    .await;
    let id = stack.session.id.clone();
    // A backend with the default hour of max age confirmed it 20 minutes ago: valid for it,
    // too old for this proxy.
    let confirmed_at = SystemTime::now() - Duration::from_secs(20 * 60);
    let mut session = stack.session.clone();
    session.expires_at = SystemTime::now() + Duration::from_secs(10 * 60);
    let old = Snapshot::confirmed(&session, NAMESPACE, confirmed_at, DEFAULT_SNAPSHOT_MAX_AGE);
    let old = codec(&KEY).encode(&old).unwrap();
    // One confirmed a minute ago is fine.
    let young = Snapshot::confirmed(
        &session,
        NAMESPACE,
        SystemTime::now() - Duration::from_secs(60),
        DEFAULT_SNAPSHOT_MAX_AGE,
    );
    let young = codec(&KEY).encode(&young).unwrap();
    stack.store_down().await;

    let reply = stack.get("/", &format!("sid={id}; sid_snap={old}")).await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE, "too old");
    let reply = stack.get("/", &format!("sid={id}; sid_snap={young}")).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.header("x-session-degraded"), Some("1"));
}
