//! Test support shared by session-client's integration tests: a real session server behind a
//! counting, fault-injecting gRPC front, and a small axum app behind `SessionLayer` with what a
//! test reads from its responses. Each test binary uses part of it.
#![allow(dead_code)]

pub mod app;
pub mod counting_server;
