//! `session-proxy`: the Stickless reverse proxy. It balances requests over backends with every
//! routing mode the comparison needs (round-robin, weighted, least-conn, ip-hash, consistent
//! hashing, sticky cookie), checks their health, retries on another backend when that is safe,
//! and can resolve the session itself (the session-lookup plugin) so backends stay stateless.
//!
//! # Layout
//! - [`backend`]: a backend and its live state (weight, in-flight requests, health).
//! - [`balance`]: the [`balance::Balancer`] trait, one file per algorithm.
//! - [`config`]: the configuration (TOML file and flags, `SIGHUP` re-reads the file).
//! - [`admin`]: the admin API on its own listener (backends as JSON, weights changeable at run
//!   time, Prometheus metrics).
//! - [`proxy`]: the reverse proxy itself ([`proxy::Proxy`]): accept loop, forwarding, retries,
//!   limits, reload and graceful shutdown.
//! - [`filter`]: the request filters, the proxy's extension point ([`filter::RequestFilter`],
//!   [`filter::Reject`], [`filter::FilterContext`]), and the built-in ones: per-client limits,
//!   header hygiene, forwarding headers.
//! - [`client_ip`]: the real client address (socket peer, or `X-Forwarded-For` of a trusted proxy).
//! - [`health`]: active (TCP, HTTP) and passive health checks, one task per backend.
//! - [`lookup`]: the session-lookup plugin (a request filter adding `x-session-*` headers).
//! - [`metrics`]: the proxy's Prometheus metrics.
//! - [`tls`]: HTTPS on the client listener (certificates reloaded on `SIGHUP`) and TLS to
//!   `https://` backends.

pub mod admin;
pub mod backend;
pub mod balance;
pub mod client_ip;
pub mod config;
mod cookie;
pub mod filter;
pub mod health;
pub mod lookup;
pub mod metrics;
pub mod proxy;
pub mod tls;
