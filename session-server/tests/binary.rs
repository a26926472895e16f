//! The `session-server` binary as an operator runs it: configuration errors (exit status 2 and a
//! message naming the fault, never a crash), port 0 and the `listening` lines on stdout,
//! serving with no setup on the memory store, and a clean exit on SIGTERM. Shutdown with calls
//! in flight is in `shutdown.rs`.

mod support;

use std::process::Output;
use std::time::Duration;

use session_proto::v1::CreateRequest;
use session_proto::v1::session_store_client::SessionStoreClient;
use support::process::{ServerProcess, parse_listening};
use support::services;

const BINARY: &str = env!("CARGO_BIN_EXE_session-server");

/// Bound on the exit after SIGTERM: generous, for a loaded machine.
const EXIT_WITHIN: Duration = Duration::from_secs(30);

/// Runs the binary with `args` and no `STICKLESS_*` variables from the caller's environment,
/// bounded (a binary that serves instead of refusing is killed and fails the test).
fn run(args: &[&str]) -> Output {
    support::process::run_bounded::<&str>(BINARY.as_ref(), args, &[])
}

/// Fails unless `out` is a refusal of the configuration: exit status 2 (not a panic's 101, not
/// a signal), nothing on stdout, and every one of `expected` in stderr.
fn assert_refused(args: &[&str], out: &Output, expected: &[&str]) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(2),
        "{args:?}: exit status {}; stderr:\n{stderr}",
        out.status
    );
    assert!(out.stdout.is_empty(), "{args:?}: stdout not empty");
    assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    for text in expected {
        assert!(stderr.contains(text), "{args:?}: no {text:?} in:\n{stderr}");
    }
}

#[test]
fn unknown_config_key_is_refused_with_its_name_and_line() {
    let file = TempFile::with("listen = \"127.0.0.1:0\"\nmax_sesion_bytes = 10\n");
    let path = file.0.to_string_lossy().into_owned();
    let args = ["--config", path.as_str()];
    let out = run(&args);
    assert_refused(
        &args,
        &out,
        &[
            "session-server: invalid config file",
            "unknown field `max_sesion_bytes`",
            "line 2",
        ],
    );
}

#[test]
fn bad_flag_values_are_refused_with_exit_status_2_and_say_why() {
    let cases: [(&[&str], &[&str]); 4] = [
        (&["--store", "mongo"], &["invalid value 'mongo'", "--store"]),
        (
            &["--default-ttl", "forever"],
            &["invalid value 'forever'", "--default-ttl"],
        ),
        (
            &["--max-ttl", "1s", "--default-ttl", "1m"],
            &["session-server: invalid setting: default-ttl (60s) is above max-ttl (1s)"],
        ),
        (
            &["--listen", "127.0.0.1"],
            &["invalid value '127.0.0.1'", "--listen"],
        ),
    ];
    for (args, expected) in cases {
        assert_refused(args, &run(args), expected);
    }
}

#[test]
fn listen_address_in_use_fails_with_status_1_and_names_it() {
    // Held by this test for as long as the binary runs.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind loopback");
    let address = taken.local_addr().expect("local address").to_string();
    let out = run(&["--listen", &address]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{}; {stderr}", out.status);
    assert!(
        out.stdout.is_empty(),
        "no `listening` line for a failed bind"
    );
    assert!(
        stderr.contains(&format!("cannot listen on {address}")),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_memory_store_with_no_setup_and_stops_on_sigterm() {
    let args = ["--listen", "127.0.0.1:0", "--log-format", "json"];
    let mut server = ServerProcess::start(BINARY.as_ref(), &args, &["grpc"]);
    let address = server.address("grpc");
    assert!(
        address.ip().is_loopback() && address.port() != 0,
        "{address}"
    );

    let mut client = SessionStoreClient::connect(server.grpc_url())
        .await
        .expect("connect to the reported address");
    let created = client
        .create(CreateRequest {
            user_id: "ops".into(),
            ..Default::default()
        })
        .await
        .expect("create on the memory store");
    assert_eq!(created.into_inner().user_id, "ops");

    server.terminate();
    let status = tokio::task::block_in_place(|| server.wait_exit(EXIT_WITHIN));
    assert_eq!(status.code(), Some(0), "{status}");
    let logs = server.stderr_after_exit();
    assert!(logs.contains("SIGTERM received"), "{logs}");
    assert!(
        logs.lines().all(|l| l.starts_with('{')),
        "json log lines: {logs}"
    );
    assert_eq!(
        server.stdout_after_exit(),
        [format!("listening grpc {address}")],
        "stdout holds the address line and nothing else"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn port_zero_listeners_report_grpc_then_metrics_on_stdout() {
    let args = ["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"];
    let mut server = ServerProcess::start(BINARY.as_ref(), &args, &["grpc", "metrics"]);
    let (grpc, metrics) = (server.address("grpc"), server.address("metrics"));
    assert_ne!(grpc, metrics);

    let mut client = SessionStoreClient::connect(server.grpc_url())
        .await
        .expect("connect to the reported gRPC address");
    client
        .create(CreateRequest::default())
        .await
        .expect("create");
    let body = http_get(metrics, "/metrics").await;
    assert!(
        body.contains(r#"stickless_grpc_calls_total{code="OK",method="Create"} 1"#),
        "{body}"
    );

    server.terminate();
    let status = tokio::task::block_in_place(|| server.wait_exit(EXIT_WITHIN));
    assert_eq!(status.code(), Some(0), "{status}");
    let lines = server.stdout_after_exit();
    assert_eq!(
        lines,
        [
            format!("listening grpc {grpc}"),
            format!("listening metrics {metrics}")
        ]
    );
    assert!(lines.iter().all(|l| parse_listening(l).is_some()));
}

#[test]
fn sigterm_as_soon_as_the_address_is_reported_is_a_clean_stop() {
    // The signal handlers are in place before the `listening` line: a harness that stops the
    // server at once gets exit status 0, not death by SIGTERM.
    let args = ["--listen", "127.0.0.1:0"];
    let mut server = ServerProcess::start(BINARY.as_ref(), &args, &["grpc"]);
    server.terminate();
    let status = server.wait_exit(EXIT_WITHIN);
    assert_eq!(status.code(), Some(0), "{status}");
    let logs = server.stderr_after_exit();
    assert!(logs.contains("SIGTERM received"), "{logs}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_without_tls_is_logged_and_ignored_not_fatal() {
    // SIGHUP's default action kills a process; operators send it to reload out of habit (nginx,
    // HAProxy). Without TLS files there is nothing to reload, and the server keeps serving.
    let args = ["--listen", "127.0.0.1:0"];
    let mut server = ServerProcess::start(BINARY.as_ref(), &args, &["grpc"]);
    let mut client = SessionStoreClient::connect(server.grpc_url())
        .await
        .expect("connect");
    server.hang_up();
    tokio::task::block_in_place(|| server.wait_stderr("no TLS files to reload", EXIT_WITHIN));
    client
        .create(CreateRequest::default())
        .await
        .expect("still serving after SIGHUP");
    server.terminate();
    let status = tokio::task::block_in_place(|| server.wait_exit(EXIT_WITHIN));
    assert_eq!(status.code(), Some(0), "{status}");
}

/// A minimal HTTP/1.1 GET, enough to scrape the metrics listener.
async fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut conn = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect to metrics");
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    conn.write_all(request.as_bytes()).await.expect("send");
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(30), conn.read_to_string(&mut out))
        .await
        .expect("metrics answered within 30s")
        .expect("read");
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    out
}

/// A file in the temp dir holding `text`, removed on drop. Its name is unique by process id,
/// time and a counter ([`services::unique_prefix`]), never by a port.
struct TempFile(std::path::PathBuf);

impl TempFile {
    fn with(text: &str) -> TempFile {
        let name = format!("{}.toml", services::unique_prefix("config"));
        let path = std::env::temp_dir().join(name);
        std::fs::write(&path, text).expect("write the temp file");
        TempFile(path)
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
