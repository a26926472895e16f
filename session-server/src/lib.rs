//! The Stickless session server: a gRPC API (`session.v1.SessionStore`) that keeps web sessions
//! for many stateless backends, so any backend can serve any request of a logged-in user.
//!
//! Start it with [`server::run`] on a listener of your choice (tests bind `127.0.0.1:0`), or run
//! the `session-server` binary.
//!
//! # Layout
//! - [`config`]: flags, environment variables and the TOML file, resolved into [`config::Settings`].
//! - [`id`]: server-made session ids (random, base64url) and their validation.
//! - [`store`]: the [`store::SessionStore`] trait and its adapters, one file each
//!   ([`store::memory`], `store::redis`, `store::mysql`).
//! - [`service`]: the tonic service: validation, TTL policy, error mapping to gRPC codes.
//! - [`auth`]: the bearer-token interceptor (constant-time check).
//! - [`metrics`]: Prometheus counters and histograms, and their `/metrics` listener.
//! - [`tls`]: the listener's certificate, key and client CA from PEM files, reloadable while
//!   serving, and TLS handshakes run side by side with a deadline.
//! - `health`: `grpc.health.v1` following the store (checked in the background every
//!   `--health-interval`) and shutdown; its Watch streams end when the server stops.
//! - [`healthcheck`]: the `session-server healthcheck` probe (one Health/Check, exit 0 or 1),
//!   for Docker's HEALTHCHECK and other orchestrators.
//! - [`server`]: builds the store and serves the API with health and reflection until shutdown,
//!   in plaintext or over TLS.
//! - `connections`: the limit on client connections open at once, a permit each connection's
//!   I/O holds until it ends.
//! - `deadline`: the deadline of every call but Watch, answered DEADLINE_EXCEEDED.
//!
//! # Cargo features
//! - `redis-store` (default): the Redis and Redis Cluster store, `--store redis|redis-cluster`.
//! - `mysql-store` (default): the MySQL/MariaDB store, `--store mysql` (sqlx, TLS by rustls).
//!
//! Without them only the memory store is built, and neither the `redis` crate nor sqlx is
//! compiled (the demo depends on this crate that way); `--store` naming a store left out is a
//! configuration error that names its feature.

pub mod auth;
pub mod config;
mod connections;
mod deadline;
mod dispatch;
mod health;
pub mod healthcheck;
pub mod id;
pub mod metrics;
pub mod server;
pub mod service;
pub mod store;
pub mod tls;
