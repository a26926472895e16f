//! Absolute lifetime (`--max-lifetime`, `CreateRequest.max_lifetime`, `Session.ends_at`) and
//! touch granularity (`--touch-granularity`, `stickless_touches_total{outcome}`).
//!
//! Like `expiry.rs`, these never assume how long a call takes: they compare when calls started
//! and ended (wall clock) with the times the server reported, with generous margins.

use std::time::{Duration, SystemTime};

use session_proto::v1::*;
use session_server::config::Settings;
use tonic::Code;

use crate::calls::*;
use crate::support::harness::Backend;

/// Allowance for how stores and the server round times (milliseconds) and for clock reads.
const SLACK: Duration = Duration::from_millis(100);
/// How long past its end a session may still answer before the test fails.
const GONE_WITHIN: Duration = Duration::from_secs(3);
/// Between touches of the lifetime tests.
const TOUCH_EVERY: Duration = Duration::from_millis(100);

/// Whether two reported times are the same up to the stores' rounding (a network store
/// reports an expiry as now + its remaining time, to the millisecond).
fn same_time(a: SystemTime, b: SystemTime) -> bool {
    let gap = a
        .duration_since(b)
        .or_else(|_| b.duration_since(a))
        .unwrap();
    gap <= SLACK
}

/// `Session.ends_at`, which must be reported.
fn ends_at(session: &Session) -> SystemTime {
    SystemTime::try_from(session.ends_at.expect("ends_at is reported")).unwrap()
}

fn created_at(session: &Session) -> SystemTime {
    SystemTime::try_from(session.created_at.unwrap()).unwrap()
}

fn duration(d: Duration) -> Option<prost_types::Duration> {
    Some(d.try_into().unwrap())
}

/// Creates a session of `ttl` asking for `lifetime` (`None`: none asked).
async fn create_for(c: &mut Client, ttl: Duration, lifetime: Option<Duration>) -> Session {
    c.create(CreateRequest {
        ttl: duration(ttl),
        max_lifetime: lifetime.and_then(duration),
        ..Default::default()
    })
    .await
    .expect("create")
    .into_inner()
}

/// One touch (a Touch, or a Get with touch when `by_get`), and when it started and ended.
async fn touch(
    c: &mut Client,
    id: &str,
    by_get: bool,
) -> (SystemTime, Result<Session, tonic::Status>, SystemTime) {
    let started = SystemTime::now();
    let result = if by_get {
        c.get(GetRequest {
            namespace: String::new(),
            id: id.into(),
            touch: true,
            bypass_cache: false,
        })
        .await
    } else {
        c.touch(TouchRequest {
            namespace: String::new(),
            id: id.into(),
            ttl: None,
        })
        .await
    };
    (started, result.map(|r| r.into_inner()), SystemTime::now())
}

/// Touches `session` every [`TOUCH_EVERY`] until it is NOT_FOUND: that never happens before
/// `ends_at` (less the slack), and does within [`GONE_WITHIN`] after it; no answer reports an
/// expiry past `ends_at`, and the session is read as gone afterwards too.
async fn touch_until_ended(c: &mut Client, session: &Session, ends: SystemTime) {
    for round in 0.. {
        let (started, result, ended) = touch(c, &session.id, round % 2 == 1).await;
        match result {
            Ok(touched) => {
                assert!(
                    started < ends + SLACK,
                    "round {round}: the session answered past its ends_at"
                );
                assert!(
                    expires_at(&touched) <= ends,
                    "round {round}: expires_at is past ends_at"
                );
                assert_eq!(ends_at(&touched), ends, "ends_at never moves");
            }
            Err(status) => {
                assert_eq!(status.code(), Code::NotFound, "{status}");
                assert!(
                    ended + SLACK >= ends,
                    "round {round}: the session was gone before its ends_at"
                );
                break;
            }
        }
        assert!(
            SystemTime::now() < ends + GONE_WITHIN,
            "the session outlived its ends_at by {GONE_WITHIN:?}"
        );
        tokio::time::sleep(TOUCH_EVERY).await;
    }
    let read = get(c, "", &session.id).await;
    assert_eq!(read.expect_err("gone for good").code(), Code::NotFound);
}

/// A session touched every 100 ms, with a ttl far longer than its lifetime, ends at
/// `created_at + max_lifetime`, and reports that as `ends_at`.
pub async fn touched_session_ends_at_its_absolute_lifetime(backend: Backend) {
    // Granularity 0: any touch that could move the expiry would be written.
    let settings = Settings {
        touch_granularity: Some(Duration::ZERO),
        ..Settings::default()
    };
    let Some((server, mut c)) = start_with(backend, "absolute_lifetime", settings).await else {
        return;
    };
    let lifetime = Duration::from_secs(2);
    let s = create_for(&mut c, Duration::from_secs(4), Some(lifetime)).await;
    let ends = ends_at(&s);
    assert!(
        ends + SLACK >= created_at(&s) + lifetime && ends <= created_at(&s) + lifetime + SLACK,
        "ends_at is created_at + max_lifetime"
    );
    assert!(expires_at(&s) <= ends, "expires_at is capped by ends_at");
    touch_until_ended(&mut c, &s, ends).await;
    // The stored expiry (created_at + 4 s) already lies past ends_at: even at granularity 0 no
    // touch has anything to move, so none is written.
    assert!(
        server.metrics.touches("skipped") > 0,
        "the touches were seen"
    );
    assert_eq!(server.metrics.touches("written"), 0, "nothing to move");
    // A session without a lifetime (no server flag) reports none.
    let free = create_for(&mut c, Duration::from_secs(60), None).await;
    assert_eq!(free.ends_at, None, "no lifetime, no ends_at");
}

/// `--max-lifetime` caps a longer per-session lifetime (Create and Update) and applies to a
/// session created without one.
pub async fn server_max_lifetime_caps_the_session_lifetime(backend: Backend) {
    let cap = Duration::from_secs(2);
    let settings = Settings {
        max_lifetime: Some(cap),
        ..Settings::default()
    };
    let Some((_server, mut c)) = start_with(backend, "max_lifetime_cap", settings).await else {
        return;
    };
    let hour = Duration::from_secs(3600);
    let asked = create_for(&mut c, Duration::from_secs(60), Some(hour)).await;
    let plain = create_for(&mut c, Duration::from_secs(60), None).await;
    for s in [&asked, &plain] {
        assert!(
            ends_at(s) <= created_at(s) + cap + SLACK,
            "the server's max-lifetime caps ends_at"
        );
        assert!(ends_at(s) + SLACK >= created_at(s) + cap);
    }
    let updated = c
        .update(UpdateRequest {
            id: asked.id.clone(),
            max_lifetime: duration(hour),
            ..Default::default()
        })
        .await
        .expect("update")
        .into_inner();
    assert!(
        ends_at(&updated) <= created_at(&asked) + cap + SLACK,
        "an update cannot lift the lifetime past the server's"
    );
    touch_until_ended(&mut c, &asked, ends_at(&updated)).await;
    // A write does not keep it either.
    let write = c.update(set("", &plain.id, &[("k", "v")])).await;
    if SystemTime::now() > ends_at(&plain) + SLACK {
        assert_eq!(write.expect_err("ended").code(), Code::NotFound);
    }
}

/// Touches inside the granularity write nothing (skipped counts, written does not, version and
/// expiry unchanged); with a granularity of 0 every touch is written.
pub async fn touches_inside_the_granularity_are_not_written(backend: Backend) {
    // Auto granularity: 1% of a 10-minute ttl is 6 s, far longer than five quick touches take.
    let Some((server, mut c)) = start_with(backend, "granularity_skip", Settings::default()).await
    else {
        return;
    };
    let s = create_for(&mut c, Duration::from_secs(600), None).await;
    let started = SystemTime::now();
    for round in 0..5 {
        let (_, result, ended) = touch(&mut c, &s.id, round % 2 == 1).await;
        let touched = result.expect("touch");
        if ended < started + Duration::from_secs(5) {
            assert!(same_time(expires_at(&touched), expires_at(&s)), "not slid");
        }
        assert_eq!(touched.version, 1);
    }
    if SystemTime::now() < started + Duration::from_secs(5) {
        assert_eq!(server.metrics.touches("skipped"), 5);
        assert_eq!(server.metrics.touches("written"), 0);
    }

    let zero = Settings {
        touch_granularity: Some(Duration::ZERO),
        ..Settings::default()
    };
    let Some((server, mut c)) = start_with(backend, "granularity_zero", zero).await else {
        return;
    };
    let s = create_for(&mut c, Duration::from_secs(600), None).await;
    for round in 0..5 {
        // Time to pass, so that each touch moves the expiry by at least a millisecond.
        tokio::time::sleep(Duration::from_millis(20)).await;
        touch(&mut c, &s.id, round % 2 == 1).await.1.expect("touch");
    }
    assert_eq!(server.metrics.touches("written"), 5);
    assert_eq!(server.metrics.touches("skipped"), 0);
}

/// A touch that moves the expiry by the granularity or more is written, and slides it.
pub async fn a_touch_past_the_granularity_is_written(backend: Backend) {
    let granularity = Duration::from_millis(500);
    let settings = Settings {
        touch_granularity: Some(granularity),
        ..Settings::default()
    };
    let Some((server, mut c)) = start_with(backend, "granularity_write", settings).await else {
        return;
    };
    let s = create_for(&mut c, Duration::from_secs(60), None).await;
    let before = expires_at(&s);
    let deadline = SystemTime::now() + Duration::from_secs(10);
    let touched = loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let (_, result, _) = touch(&mut c, &s.id, false).await;
        let touched = result.expect("touch");
        if server.metrics.touches("written") > 0 {
            break touched;
        }
        assert!(
            same_time(expires_at(&touched), before),
            "a skipped touch slides nothing"
        );
        assert!(SystemTime::now() < deadline, "no touch was written");
    };
    assert_eq!(server.metrics.touches("written"), 1);
    assert!(
        expires_at(&touched) >= before + granularity - SLACK,
        "the written touch slid the expiry by at least the granularity"
    );
    assert_eq!(touched.version, 1, "a touch is no write of the data");
    // Read back: the store has the new expiry.
    let read = get(&mut c, "", &s.id).await.expect("get");
    assert!(same_time(expires_at(&read), expires_at(&touched)));
}
