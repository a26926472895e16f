//! Shared support of the demo's tests: a session server that can be stopped and restarted,
//! and a relay that makes it slow or unreachable for one client (the proxy's tests' relay,
//! included from there so that it exists once).

// Each test file uses a subset of the helpers.
#![allow(dead_code)]

#[path = "../../../proxy-plugin/tests/support/relay.rs"]
pub mod relay;
pub mod store;
