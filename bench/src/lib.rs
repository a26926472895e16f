//! The Stickless comparison harness: every routing mode through every failure scenario, on a
//! real cluster of the project's own binaries on loopback, with simulated users, measured.
//!
//! ```no_run
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! use bench::{Binaries, Mode, RunSettings, Scenario};
//! let settings = RunSettings::new(
//!     Binaries::locate()?,
//!     std::env::temp_dir().join("stickless-bench"),
//!     10,
//!     std::time::Duration::from_secs(2),
//! );
//! let row = bench::run_one(&settings, Mode::IpHash, Scenario::MiddleProxy, 0).await?;
//! assert!(row.load_max_over_mean > 2.5); // everyone on one backend
//! # Ok(()) }
//! ```
//!
//! # Layout
//! - [`mode`]: the routing modes and stores, as flags of `session-proxy` and `demo-app`.
//! - [`binaries`]: finding (or building) `session-server`, `demo-app`, `session-proxy`.
//! - [`cluster`]: the processes of one run, killed on drop; kill, restart, add a backend,
//!   stop and start a session server, fail the Redis primary over; [`cluster::redis`]: the
//!   Redis (standalone, or primary + replica + Sentinel) a run starts itself.
//! - [`external`]: a real nginx or HAProxy in front instead of `session-proxy`.
//! - [`users`]: simulated users (own cookie jar, own `X-Forwarded-For`), what they count.
//! - [`scenarios`]: the scenarios' timelines; running one pair or the whole matrix.
//! - [`report`]: one [`Row`] per run (users sent to log in, users who lost items, requests
//!   answered "please log in", lost items, load, latency), the Markdown tables and the JSON.
//! - [`svg`]: the charts.
//! - [`soak`]: the proxy and session server under hostile clients (slowloris, slow uploads,
//!   a Watch flood), honest latency and errors measured before and during the attack.
//! - `bin/compare.rs`: the `compare` command; `bin/soak.rs`: the `soak` command.

pub mod binaries;
pub mod cluster;
pub mod external;
pub mod load_grpc;
pub mod load_http;
pub mod mode;
pub mod report;
pub mod scenarios;
pub mod soak;
pub mod staleness;
pub mod svg;
pub mod users;

pub use binaries::Binaries;
pub use mode::{Mode, StoreChoice};
pub use report::Row;
pub use scenarios::{Progress, RunError, RunSettings, Scenario, run_matrix, run_one};
