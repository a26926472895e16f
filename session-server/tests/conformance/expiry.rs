//! Expiry: a session is readable until its `expires_at` and gone after it; touches and writes
//! slide it, plain reads do not; ttls are clamped.
//!
//! These tests never assume how long a call takes. They compare when each call started and
//! ended (wall clock, as `expires_at` is) with the expiry the server reported: a session gone
//! before its `expires_at` is a failure, one still there long after it is a failure, and
//! anything in between is left alone, so a loaded machine that slows every call proves less
//! but fails nothing.

use std::time::{Duration, SystemTime};

use session_proto::v1::*;
use session_server::config::Settings;
use tonic::{Code, Status};

use crate::calls::*;
use crate::support::harness::Backend;

/// Allowance for how stores round expiry times (to the millisecond in Redis and MySQL), and
/// for the memory store's monotonic clock against the wall clock.
const ROUNDING: Duration = Duration::from_millis(100);

/// How long past its expiry a session may still be readable before the test fails: far more
/// than any store needs (each checks expiry on every read), so only a session that never
/// expires fails it.
const GONE_WITHIN: Duration = Duration::from_secs(20);

/// Pause between the reads of a poll.
const POLL_EVERY: Duration = Duration::from_millis(50);

/// A call, with when it started and ended.
struct Timed {
    /// Wall clock before the request was sent.
    started: SystemTime,
    /// Wall clock after the answer came.
    ended: SystemTime,
    /// The answer.
    result: Result<Session, Status>,
}

impl Timed {
    /// Whether the whole call ran before `deadline` (less the rounding): a store that
    /// answered NOT_FOUND then lost the session early.
    fn ended_before(&self, deadline: SystemTime) -> bool {
        self.ended + ROUNDING < deadline
    }

    /// Whether the call failed with NOT_FOUND; any other failure fails the test.
    fn not_found(&self, what: &str) -> bool {
        match &self.result {
            Ok(_) => false,
            Err(status) if status.code() == Code::NotFound => true,
            Err(status) => panic!("{what}: {status}"),
        }
    }
}

/// Runs `call`, noting when it started and ended.
async fn timed(
    call: impl std::future::Future<Output = Result<tonic::Response<Session>, Status>>,
) -> Timed {
    let started = SystemTime::now();
    let result = call.await.map(tonic::Response::into_inner);
    Timed {
        started,
        ended: SystemTime::now(),
        result,
    }
}

/// A plain (not touching) read of `id`, timed.
async fn timed_get(c: &mut Client, id: &str) -> Timed {
    let request = GetRequest {
        namespace: "".into(),
        id: id.into(),
        touch: false,
        bypass_cache: false,
    };
    timed(c.get(request)).await
}

/// Reads `id` without touching it until it is gone, failing the test if it goes before
/// `until` (its expiry as the server said) or is still there [`GONE_WITHIN`] after it.
async fn read_until_gone(c: &mut Client, id: &str, until: SystemTime, what: &str) {
    loop {
        let read = timed_get(c, id).await;
        if read.not_found(what) {
            assert!(
                !read.ended_before(until),
                "{what}: gone {:?} before its expires_at",
                until.duration_since(read.ended).unwrap_or_default()
            );
            return;
        }
        assert!(
            read.started < until + GONE_WITHIN,
            "{what}: still readable {GONE_WITHIN:?} after its expires_at"
        );
        tokio::time::sleep(POLL_EVERY).await;
    }
}

/// A session is readable until its ttl has passed, then gone for every call, and cannot be
/// revived by a touch.
pub async fn expiry_after_ttl(backend: Backend) {
    let Some((_server, mut c)) = start(backend, "expiry_after_ttl").await else {
        return;
    };
    let life = Duration::from_secs(2);
    let asked = SystemTime::now();
    let s = create(&mut c, "", "", &[("k", "v")], Some(life)).await;
    let until = expires_at(&s);
    assert!(
        until + ROUNDING >= asked + life,
        "expires_at is creation + ttl"
    );
    read_until_gone(&mut c, &s.id, until, "a session with a 2s ttl").await;

    let touch = c
        .touch(TouchRequest {
            namespace: "".into(),
            id: s.id.clone(),
            ttl: None,
        })
        .await;
    assert_eq!(
        touch.unwrap_err().code(),
        Code::NotFound,
        "an expired session cannot be revived"
    );
    let touching_get = c
        .get(GetRequest {
            namespace: "".into(),
            id: s.id.clone(),
            touch: true,
            bypass_cache: false,
        })
        .await;
    assert_eq!(touching_get.unwrap_err().code(), Code::NotFound);
    let update = c.update(set("", &s.id, &[("k", "w")])).await;
    assert_eq!(update.unwrap_err().code(), Code::NotFound);
}

/// Of two sessions created together, the one kept touched (Touch and Get{touch} in turn)
/// outlives the one only read; once touches stop it expires too, plain reads do not slide it.
pub async fn touch_slides_expiry(backend: Backend) {
    // Every touch written (its pauses are shorter than the default granularity, which would
    // rightly skip them: see `lifetime::touches_inside_the_granularity_are_not_written`).
    let settings = Settings {
        touch_granularity: Some(Duration::ZERO),
        ..Settings::default()
    };
    let Some((_server, mut c)) = start_with(backend, "touch_slides_expiry", settings).await else {
        return;
    };
    for attempt in 1..=3 {
        match touched_outlives_untouched(&mut c).await {
            Ok(()) => return,
            Err(stall) => {
                eprintln!("touch_slides_expiry: attempt {attempt} proved nothing: {stall}")
            }
        }
    }
    panic!("three attempts in a row stalled for longer than the ttl");
}

/// One attempt of [`touch_slides_expiry`]. `Err` when the machine stalled so long that a
/// touch came after the session's expiry, which proves nothing either way.
async fn touched_outlives_untouched(c: &mut Client) -> Result<(), String> {
    let life = Duration::from_secs(3);
    // Between touches: a fraction of the ttl, so only a stall of seconds can outlast it.
    let pause = Duration::from_millis(250);
    let touched = create(c, "", "", &[], Some(life)).await;
    let untouched = create(c, "", "", &[], Some(life)).await;
    let untouched_until = expires_at(&untouched);
    let mut touched_until = expires_at(&touched);
    for round in 0.. {
        let read = timed_get(c, &untouched.id).await;
        if read.not_found("read the untouched session") {
            assert!(
                !read.ended_before(untouched_until),
                "the untouched session was gone before its expires_at"
            );
            if round == 0 {
                return Err("the first read came after the expiry".into());
            }
            break;
        }
        assert!(
            read.started < untouched_until + GONE_WITHIN,
            "the untouched session outlived its expiry by {GONE_WITHIN:?}: plain reads slide it?"
        );
        tokio::time::sleep(pause).await;
        let touch = if round % 2 == 0 {
            timed(c.touch(TouchRequest {
                namespace: "".into(),
                id: touched.id.clone(),
                ttl: None,
            }))
            .await
        } else {
            timed(c.get(GetRequest {
                namespace: "".into(),
                id: touched.id.clone(),
                touch: true,
                bypass_cache: false,
            }))
            .await
        };
        if touch.not_found("touch") {
            assert!(
                !touch.ended_before(touched_until),
                "round {round}: the touched session was gone before its expires_at"
            );
            return Err(format!("round {round}: the touch came after the expiry"));
        }
        let slid = touch.result.expect("found");
        assert_eq!(slid.version, 1, "touching is not a write");
        touched_until = expires_at(&slid);
        assert!(
            touched_until + ROUNDING >= touch.started + life,
            "round {round}: a touch moves the expiry to now + ttl"
        );
    }

    // The untouched session is gone; the touched one, whose expiry moved past it, is not.
    assert!(
        touched_until > untouched_until,
        "the touches moved the expiry"
    );
    let read = timed_get(c, &touched.id).await;
    if read.not_found("read the touched session") {
        assert!(
            !read.ended_before(touched_until),
            "the touched session did not outlive the untouched one"
        );
        return Err("the read after the untouched session's expiry came too late".into());
    }
    // Without touches it expires: plain reads, polled until then, do not slide it.
    read_until_gone(c, &touched.id, touched_until, "once touches stopped").await;
    Ok(())
}

/// An update slides the expiry and can set a new ttl; a touch with a ttl sets it too.
pub async fn update_slides_expiry_and_can_change_ttl(backend: Backend) {
    let Some((_server, mut c)) = start(backend, "update_slides_expiry").await else {
        return;
    };
    let s = create(&mut c, "", "", &[], Some(Duration::from_secs(60))).await;
    let mut req = set("", &s.id, &[("a", "1")]);
    req.ttl = ttl(Duration::from_secs(600));
    let asked = SystemTime::now();
    let updated = c.update(req).await.unwrap().into_inner();
    assert_eq!(updated.ttl, ttl(Duration::from_secs(600)));
    assert!(
        expires_at(&updated) + ROUNDING >= asked + Duration::from_secs(600),
        "the update moved the expiry to now + its new ttl"
    );
    let touched = c
        .touch(TouchRequest {
            namespace: "".into(),
            id: s.id.clone(),
            ttl: ttl(Duration::from_secs(120)),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(expires_in(&touched) <= Duration::from_secs(120));
    assert_eq!(
        get(&mut c, "", &s.id).await.unwrap().ttl,
        ttl(Duration::from_secs(120)),
        "touch ttl sticks"
    );
}

/// A ttl above `--max-ttl` is clamped (on create and touch), no ttl means `--default-ttl`, and
/// a ttl of zero or less is INVALID_ARGUMENT.
pub async fn max_ttl_is_clamped(backend: Backend) {
    let settings = Settings {
        max_ttl: Duration::from_secs(60),
        default_ttl: Duration::from_secs(30),
        ..Settings::default()
    };
    let Some((_server, mut c)) = start_with(backend, "max_ttl_is_clamped", settings).await else {
        return;
    };
    let s = create(&mut c, "", "", &[], Some(Duration::from_secs(86_400 * 365))).await;
    assert_eq!(
        s.ttl,
        ttl(Duration::from_secs(60)),
        "a year is clamped to max-ttl"
    );
    assert!(expires_in(&s) <= Duration::from_secs(60));
    let d = create(&mut c, "", "", &[], None).await;
    assert_eq!(
        d.ttl,
        ttl(Duration::from_secs(30)),
        "no ttl means default-ttl"
    );
    let touched = c
        .touch(TouchRequest {
            namespace: "".into(),
            id: s.id.clone(),
            ttl: ttl(Duration::from_secs(7200)),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        touched.ttl,
        ttl(Duration::from_secs(60)),
        "touch clamps too"
    );
    let err = c
        .create(CreateRequest {
            ttl: ttl(Duration::ZERO),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let negative = prost_types::Duration {
        seconds: -5,
        nanos: 0,
    };
    let err = c
        .create(CreateRequest {
            ttl: Some(negative),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
}
