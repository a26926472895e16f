//! Test support shared by every integration test of the session server: finding services
//! (with the skip rule), starting servers, Redis Clusters and MariaDBs, waiting for what a test
//! expects, and checking outages. Each test binary uses part of it.
#![allow(dead_code)]

pub mod cas;
pub mod cluster;
pub mod harness;
pub mod ids;
pub mod mysql;
pub mod outage;
pub mod ports;
pub mod process;
pub mod redis_tls;
pub mod services;
pub mod tls;
pub mod wait;
