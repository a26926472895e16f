//! The released `session-server` binary with its default limits (only `--listen 127.0.0.1:0`
//! given; loopback needs no token) against a client that opens Watch streams past what one
//! connection may have: the server advertises SETTINGS_MAX_CONCURRENT_STREAMS = 256 and
//! refuses every stream beyond it with REFUSED_STREAM, while a call on a second connection is
//! served. `tests/limits.rs` checks the same with a small `--max-concurrent-streams` in process.

mod support;

#[path = "limits/raw_h2.rs"]
// The frames for request bodies serve only the call-deadline tests of limits.rs.
#[allow(dead_code)]
mod raw_h2;

use std::collections::BTreeSet;
use std::time::Duration;

use raw_h2::{GOAWAY, REFUSED_STREAM, RawH2, reset_code};
use support::process::ServerProcess;
use support::tls::create_in_plaintext;

const BINARY: &str = env!("CARGO_BIN_EXE_session-server");

/// Bound on anything the test waits for: generous for a loaded machine, never reached when the
/// server answers.
const WITHIN: Duration = Duration::from_secs(10);

/// The path of the Watch method.
const WATCH: &str = "/session.v1.SessionStore/Watch";

/// The streams one connection may have open by default (README's Configuration table).
const DEFAULT_STREAMS: u32 = 256;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_default_limits_the_binary_refuses_watch_streams_past_256_on_one_connection() {
    const ATTEMPTED: u32 = 300;
    let server = ServerProcess::start(BINARY.as_ref(), &["--listen", "127.0.0.1:0"], &["grpc"]);
    let addr = server.address("grpc");

    let mut raw = RawH2::connect(addr).await;
    assert_eq!(
        raw.server_max_streams(WITHIN).await,
        Some(DEFAULT_STREAMS),
        "advertised; stderr: {}",
        server.stderr_so_far()
    );
    let authority = addr.to_string();
    for n in 0..ATTEMPTED {
        raw.open_call(2 * n + 1, &authority, WATCH, &[]).await;
    }
    let beyond_the_limit: BTreeSet<u32> = (DEFAULT_STREAMS..ATTEMPTED).map(|n| 2 * n + 1).collect();
    let mut refused = BTreeSet::new();
    while refused.len() < beyond_the_limit.len() {
        let frame = raw.next(WITHIN).await.unwrap_or_else(|| {
            panic!(
                "only {} refused; stderr: {}",
                refused.len(),
                server.stderr_so_far()
            )
        });
        assert_ne!(frame.kind, GOAWAY, "{frame:?}");
        if let Some(code) = reset_code(&frame) {
            assert_eq!(code, REFUSED_STREAM, "{frame:?}");
            refused.insert(frame.stream);
        }
    }
    assert_eq!(refused, beyond_the_limit);

    // Meanwhile, with the first connection still holding its 256 streams, a unary call on a
    // connection of its own is served.
    let created = create_in_plaintext(addr).await;
    assert!(
        created.is_ok(),
        "{created:?}; stderr: {}",
        server.stderr_so_far()
    );
    drop(raw);
    let stderr = server.stderr_so_far();
    assert!(!stderr.contains("panicked"), "{stderr}");
}
