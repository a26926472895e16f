//! The session cap's settings as an operator gives them: `--max-sessions-per-user` and
//! `--on-session-cap`, their environment twins (`STICKLESS_MAX_SESSIONS_PER_USER`,
//! `STICKLESS_ON_SESSION_CAP`) and TOML keys, and the binary applying them, with
//! `stickless_session_cap_total` on its metrics. What the cap does on each store is in the
//! conformance suite (`conformance/cap.rs`).

mod support;

use std::net::SocketAddr;

use clap::Parser as _;
use session_proto::v1::CreateRequest;
use session_proto::v1::session_store_client::SessionStoreClient;
use session_server::config::{Cli, OnCap, Settings};
use session_server::store::cap::SessionCap;
use support::process::{ServerProcess, run_bounded};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tonic::Code;

const BINARY: &str = env!("CARGO_BIN_EXE_session-server");

fn cli(args: &[&str]) -> Cli {
    Cli::try_parse_from(std::iter::once("session-server").chain(args.iter().copied()))
        .expect("valid flags")
}

fn cap_of(settings: &Settings) -> (u32, OnCap) {
    (settings.max_sessions_per_user, settings.on_session_cap)
}

#[test]
fn the_cap_is_off_by_default_and_set_by_flag_or_file_flag_first() {
    let defaults = Settings::resolve(Cli::default(), None).unwrap();
    assert_eq!(cap_of(&defaults), (0, OnCap::EvictOldest));
    assert_eq!(SessionCap::from_settings(&defaults), SessionCap::UNLIMITED);

    let flags = cli(&["--max-sessions-per-user", "3", "--on-session-cap", "refuse"]);
    let flags = Settings::resolve(flags, None).unwrap();
    assert_eq!(cap_of(&flags), (3, OnCap::Refuse));
    assert_eq!(
        SessionCap::from_settings(&flags),
        SessionCap {
            max: 3,
            on_cap: OnCap::Refuse
        }
    );

    let file = "max_sessions_per_user = 5\non_session_cap = \"refuse\"\n";
    let from_file = Settings::resolve(Cli::default(), Some(file)).unwrap();
    assert_eq!(cap_of(&from_file), (5, OnCap::Refuse));
    let both = cli(&[
        "--max-sessions-per-user",
        "2",
        "--on-session-cap",
        "evict-oldest",
    ]);
    assert_eq!(
        cap_of(&Settings::resolve(both, Some(file)).unwrap()),
        (2, OnCap::EvictOldest),
        "the flag wins over the file"
    );
}

#[test]
fn bad_cap_values_are_refused() {
    for args in [
        &["--on-session-cap", "drop-newest"][..],
        &["--max-sessions-per-user", "-1"][..],
        &["--max-sessions-per-user", "many"][..],
    ] {
        let parsed =
            Cli::try_parse_from(std::iter::once("session-server").chain(args.iter().copied()));
        assert!(parsed.is_err(), "{args:?} accepted");
    }
    for file in [
        "on_session_cap = \"oldest\"",
        "max_sessions_per_user = -2",
        "max_session_per_user = 2",
    ] {
        assert!(
            Settings::resolve(Cli::default(), Some(file)).is_err(),
            "{file:?} accepted"
        );
    }
}

#[test]
fn the_environment_twins_reach_the_flags() {
    for (name, value, flag) in [
        (
            "STICKLESS_ON_SESSION_CAP",
            "drop-newest",
            "--on-session-cap",
        ),
        (
            "STICKLESS_MAX_SESSIONS_PER_USER",
            "many",
            "--max-sessions-per-user",
        ),
    ] {
        let out = run_bounded(BINARY.as_ref(), &[], &[(name, value)]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{name}={value}: {stderr}");
        assert!(
            stderr.contains(&format!("invalid value '{value}'")) && stderr.contains(flag),
            "{name}={value}: {stderr}"
        );
    }
}

/// The binary with `args` on the memory store: two sessions of one user with a cap of 1, and
/// the metrics it then serves.
async fn two_logins(args: &[&str]) -> (Result<(), tonic::Status>, String) {
    let mut all = vec![
        "--metrics-listen",
        "127.0.0.1:0",
        "--max-sessions-per-user",
        "1",
    ];
    all.extend_from_slice(args);
    let mut server = ServerProcess::start(BINARY.as_ref(), &all, &["grpc", "metrics"]);
    let mut client = SessionStoreClient::connect(server.grpc_url())
        .await
        .expect("connect to the binary");
    let login = CreateRequest {
        user_id: "ann".into(),
        ..Default::default()
    };
    client.create(login.clone()).await.expect("first login");
    let second = client.create(login).await.map(drop);
    let metrics = http_get(server.address("metrics"), "/metrics").await;
    server.terminate();
    server.wait_exit(std::time::Duration::from_secs(30));
    (second, metrics)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_evicts_or_refuses_as_its_flags_say_and_counts_it() {
    let (second, metrics) = two_logins(&[]).await;
    assert!(second.is_ok(), "evict-oldest by default: {second:?}");
    assert!(
        metrics.contains("stickless_session_cap_total{action=\"evicted\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("stickless_session_cap_total{action=\"refused\"} 0"),
        "{metrics}"
    );

    let (second, metrics) = two_logins(&["--on-session-cap", "refuse"]).await;
    assert_eq!(second.map_err(|s| s.code()), Err(Code::ResourceExhausted));
    assert!(
        metrics.contains("stickless_session_cap_total{action=\"refused\"} 1"),
        "{metrics}"
    );
}

/// The response to a plain HTTP/1.1 GET of `path` on `addr` (bounded in time).
async fn http_get(addr: SocketAddr, path: &str) -> String {
    let get = async {
        let mut stream = tokio::net::TcpStream::connect(addr)
            .await
            .expect("connect to the metrics listener");
        let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.expect("send");
        let mut response = String::new();
        stream
            .read_to_string(&mut response)
            .await
            .expect("read the response");
        response
    };
    tokio::time::timeout(std::time::Duration::from_secs(20), get)
        .await
        .expect("the metrics answer within 20 s")
}
