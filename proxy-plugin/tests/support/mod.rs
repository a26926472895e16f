//! Shared support of the proxy tests: test backends, a proxy on a loopback port, the
//! `session-proxy` binary as a child process, a session server in-process, the session-lookup
//! plugin over it, a relay that makes that server slow or unreachable, and waiting for a
//! condition.

// Each test file uses a subset of the helpers.
#![allow(dead_code)]

pub mod backend;
pub mod demo;
pub mod lookup;
pub mod proxy;
pub mod proxy_process;
pub mod raw;
pub mod relay;
pub mod session;

use std::time::Duration;

/// Waits (polling every 10 ms, at most `within`) until `condition` holds; false on timeout.
pub async fn eventually(within: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if condition() {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
