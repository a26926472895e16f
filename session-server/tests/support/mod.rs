//! Test support shared by every integration test of the session server: finding services
//! (with the skip rule), starting servers, Redis Clusters and MariaDBs, waiting for what a test
//! expects, and checking outages. Each test binary uses part of it. The parts for Redis and
//! MySQL are built with session-server's `redis-store` and `mysql-store` features.
#![allow(dead_code)]

pub mod cas;
#[cfg(feature = "redis-store")]
pub mod cluster;
pub mod harness;
pub mod ids;
#[cfg(feature = "mysql-store")]
pub mod mysql;
pub mod outage;
pub mod ports;
pub mod process;
#[cfg(feature = "redis-store")]
pub mod redis_record;
#[cfg(feature = "redis-store")]
pub mod redis_tls;
pub mod services;
pub mod tls;
pub mod wait;
