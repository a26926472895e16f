//! Health that tells the truth (issue 14): `grpc.health.v1` reports `session.v1.SessionStore`
//! and `""` NOT_SERVING while the store cannot be reached (checked in the background every
//! `--health-interval`) and SERVING again once it answers; at shutdown both names go
//! NOT_SERVING for good and every health Watch stream ends, so an open Watch never holds the
//! drain. `session-server healthcheck` exits 0 against a SERVING server and 1 otherwise
//! (NOT_SERVING, nothing listening, no answer in time), over plaintext, TLS and mTLS, with no
//! token even when the server requires one for its API.

mod support;

use std::net::SocketAddr;
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt as _;
use session_server::config::Settings;
use session_server::store::memory::MemoryStore;
use support::harness::TestServer;
use support::ports::RefusedPort;
use support::process::ServerProcess;
use test_pki::{Ca, PemDir};
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

const BINARY: &str = env!("CARGO_BIN_EXE_session-server");

/// Bound on every wait for something the test expects to happen: generous, for a loaded
/// 2-core machine.
const PATIENCE: Duration = Duration::from_secs(30);

/// Both names health answers for: the server as a whole and the API service.
const NAMES: [&str; 2] = ["", session_proto::SERVICE_NAME];

/// A health client on a new connection to `addr`.
async fn health_client(addr: SocketAddr) -> HealthClient<Channel> {
    let channel = Channel::from_shared(format!("http://{addr}"))
        .expect("valid URI")
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .expect("connect to the server");
    HealthClient::new(channel)
}

/// The status Check gives for `service`.
async fn check(client: &mut HealthClient<Channel>, service: &str) -> ServingStatus {
    let request = HealthCheckRequest {
        service: service.into(),
    };
    tokio::time::timeout(PATIENCE, client.check(request))
        .await
        .unwrap_or_else(|_| panic!("Health/Check {service:?}: no answer within {PATIENCE:?}"))
        .unwrap_or_else(|status| panic!("Health/Check {service:?}: {status}"))
        .into_inner()
        .status()
}

/// Waits (at most [`PATIENCE`]) until Check gives `wanted` for both names.
async fn both_become(client: &mut HealthClient<Channel>, wanted: ServingStatus, when: &str) {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let mut statuses = Vec::new();
        for name in NAMES {
            statuses.push(check(client, name).await);
        }
        if statuses.iter().all(|s| *s == wanted) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{when}: health not {wanted:?} for both names within {PATIENCE:?}, still {statuses:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A health Watch of `service`.
async fn watch(
    client: &mut HealthClient<Channel>,
    service: &str,
) -> tonic::Streaming<tonic_health::pb::HealthCheckResponse> {
    let request = HealthCheckRequest {
        service: service.into(),
    };
    client
        .watch(request)
        .await
        .unwrap_or_else(|status| panic!("health Watch {service:?}: {status}"))
        .into_inner()
}

/// The next status of a health Watch (`None`: the stream ended cleanly), within [`PATIENCE`].
async fn next_status(
    stream: &mut tonic::Streaming<tonic_health::pb::HealthCheckResponse>,
    what: &str,
) -> Option<ServingStatus> {
    tokio::time::timeout(PATIENCE, stream.next())
        .await
        .unwrap_or_else(|_| panic!("{what}: nothing within {PATIENCE:?}"))
        .map(|item| {
            item.unwrap_or_else(|status| panic!("{what}: {status}"))
                .status()
        })
}

#[cfg(feature = "redis-store")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_goes_not_serving_while_redis_is_down_and_serving_once_it_is_back_on_both_names() {
    use support::harness::redis_store;
    use support::services::{self, OwnRedis};

    let test = "health_follows_redis";
    let Some(binary) = services::redis_server_binary(test) else {
        return;
    };
    let mut redis = OwnRedis::start(binary);
    let settings = Settings {
        store_timeout: Duration::from_millis(500),
        health_interval: Duration::from_millis(100),
        ..Settings::default()
    };
    let store = Arc::new(redis_store(&redis.url(), test, &settings));
    let server = TestServer::start(settings, store).await;
    let mut client = health_client(server.addr).await;
    both_become(&mut client, ServingStatus::Serving, "Redis up").await;
    assert_eq!(server.metrics.store_up(), 1);
    let mut watches = Vec::new();
    for name in NAMES {
        let mut stream = watch(&mut client, name).await;
        let first = next_status(&mut stream, "the first Watch status").await;
        assert_eq!(first, Some(ServingStatus::Serving), "{name:?}");
        watches.push((stream, name));
    }

    redis.stop();
    both_become(&mut client, ServingStatus::NotServing, "Redis stopped").await;
    assert_eq!(
        server.metrics.store_up(),
        0,
        "stickless_store_up while down"
    );
    for (stream, name) in &mut watches {
        let status = next_status(stream, "the Watch status once Redis stopped").await;
        assert_eq!(status, Some(ServingStatus::NotServing), "{name:?}");
    }

    redis.restart();
    both_become(&mut client, ServingStatus::Serving, "Redis restarted").await;
    assert_eq!(server.metrics.store_up(), 1, "stickless_store_up once back");
    for (stream, name) in &mut watches {
        let status = next_status(stream, "the Watch status once Redis is back").await;
        assert_eq!(status, Some(ServingStatus::Serving), "{name:?}");
    }
    drop(watches);
    server
        .shutdown(PATIENCE)
        .await
        .expect("a clean stop after the outage");
}

#[cfg(feature = "redis-store")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_started_with_its_store_down_or_silent_never_reports_serving() {
    use support::harness::redis_store;

    let refused = RefusedPort::new();
    // Accepts connections (the kernel does, into the backlog) and never answers.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("bind loopback");
    let silent_addr = silent.local_addr().expect("local address");
    for (redis, what) in [(refused.addr(), "refused"), (silent_addr, "silent")] {
        let settings = Settings {
            store_timeout: Duration::from_millis(500),
            ..Settings::default()
        };
        let url = format!("redis://{redis}");
        let store = Arc::new(redis_store(&url, "health_store_down_at_start", &settings));
        let server = TestServer::start(settings, store).await;
        let mut client = health_client(server.addr).await;
        // The very first answers, Watch and Check alike, already say NOT_SERVING: a call made
        // before the first check of the store has finished waits for it.
        for name in NAMES {
            let mut stream = watch(&mut client, name).await;
            let first = next_status(&mut stream, "the first Watch status").await;
            assert_eq!(first, Some(ServingStatus::NotServing), "{what} {name:?}");
            assert_eq!(
                check(&mut client, name).await,
                ServingStatus::NotServing,
                "{what} {name:?}"
            );
        }
        assert_eq!(server.metrics.store_up(), 0, "{what}");
        server.shutdown(PATIENCE).await.expect("a clean stop");
    }
}

#[test]
fn health_interval_comes_from_the_flag_the_file_or_the_default_and_is_never_zero() {
    use clap::Parser as _;
    use session_server::config::{Cli, DEFAULT_HEALTH_INTERVAL};

    let cli = |args: &[&str]| {
        Cli::try_parse_from(std::iter::once("session-server").chain(args.iter().copied()))
            .expect("valid flags")
    };
    let default = Settings::resolve(cli(&[]), None).expect("defaults");
    assert_eq!(default.health_interval, DEFAULT_HEALTH_INTERVAL);
    assert_eq!(DEFAULT_HEALTH_INTERVAL, Duration::from_secs(1));
    let file = Some("health_interval = \"250ms\"\n");
    let from_file = Settings::resolve(cli(&[]), file).expect("the file's");
    assert_eq!(from_file.health_interval, Duration::from_millis(250));
    let from_flag = Settings::resolve(cli(&["--health-interval", "3s"]), file).expect("flag");
    assert_eq!(from_flag.health_interval, Duration::from_secs(3));
    assert!(Settings::resolve(cli(&["--health-interval", "0s"]), None).is_err());

    // The environment twin, through the binary: a zero interval is a configuration error.
    let out =
        support::process::run_bounded(BINARY.as_ref(), &[], &[("STICKLESS_HEALTH_INTERVAL", "0s")]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("health-interval"),
        "{out:?}"
    );
}

/// Shutdown with health Watches of both names held open on `threads` serving threads: the
/// server must stop by itself (no Watch holds the drain), and each Watch must have seen
/// NOT_SERVING, then its end.
async fn shutdown_ends_held_health_watches(threads: usize) {
    let settings = Settings {
        serve_threads: Some(threads),
        ..Settings::default()
    };
    let store = Arc::new(MemoryStore::new(settings.max_session_bytes));
    let server = TestServer::start(settings, store).await;
    let mut client = health_client(server.addr).await;
    // A memory store always answers.
    both_become(&mut client, ServingStatus::Serving, "memory store").await;
    let mut watches = Vec::new();
    for name in NAMES {
        let mut stream = watch(&mut client, name).await;
        let first = next_status(&mut stream, "the first Watch status").await;
        assert_eq!(first, Some(ServingStatus::Serving), "{name:?}");
        watches.push((stream, name));
    }
    // The Watches stay open (held by this test) while the server stops: it must not wait for
    // them (the test fails at the deadline if it does).
    let stopped = tokio::spawn(server.shutdown(PATIENCE));
    for (stream, name) in &mut watches {
        let status = next_status(stream, "the Watch status at shutdown").await;
        assert_eq!(status, Some(ServingStatus::NotServing), "{name:?}");
        let end = next_status(stream, "the Watch after NOT_SERVING").await;
        assert_eq!(end, None, "{name:?}: the Watch ends after NOT_SERVING");
    }
    stopped
        .await
        .expect("the shutdown task")
        .expect("a clean stop with health Watches open");
    drop(watches);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_reports_not_serving_on_both_names_and_ends_health_watches() {
    shutdown_ends_held_health_watches(1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_on_serving_threads_ends_health_watches_the_same_way() {
    shutdown_ends_held_health_watches(2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_with_a_health_watch_open_stops_on_sigterm_without_waiting_out_the_grace() {
    // A grace far longer than the test's patience: a Watch that held the drain would keep the
    // server running past the deadline below.
    let mut server = ServerProcess::start(
        BINARY.as_ref(),
        &["--listen", "127.0.0.1:0", "--shutdown-grace", "10m"],
        &["grpc"],
    );
    let mut client = health_client(server.address("grpc")).await;
    let mut watches = Vec::new();
    for name in NAMES {
        let mut stream = watch(&mut client, name).await;
        let first = next_status(&mut stream, "the first Watch status").await;
        assert_eq!(first, Some(ServingStatus::Serving), "{name:?}");
        watches.push(stream);
    }
    server.terminate();
    for stream in &mut watches {
        let status = next_status(stream, "the Watch status after SIGTERM").await;
        assert_eq!(status, Some(ServingStatus::NotServing));
    }
    let status = server.wait_exit(PATIENCE);
    assert!(status.success(), "exit status {status}");
    drop(watches);
}

/// Bound on one `session-server healthcheck` run; one still running then is killed, so a
/// probe that hangs fails the test instead of holding it.
const PROBE_WITHIN: Duration = Duration::from_secs(30);

/// Runs `session-server healthcheck` with `args` and `env` as its whole environment (nothing
/// of the caller's shell reaches it), for at most [`PROBE_WITHIN`].
fn healthcheck(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut child = Command::new(BINARY)
        .arg("healthcheck")
        .args(args)
        .env_clear()
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run session-server healthcheck");
    let deadline = Instant::now() + PROBE_WITHIN;
    while child.try_wait().expect("poll the probe").is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    child.wait_with_output().expect("the probe's output")
}

/// Fails the test unless the probe exited with `code`, printing its stderr.
fn assert_exit(out: &Output, code: i32, what: &str) {
    assert_eq!(
        out.status.code(),
        Some(code),
        "{what}: {} stderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The probe's stderr.
fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn healthcheck_exits_0_for_a_serving_server_without_the_token_its_api_requires() {
    let dir = PemDir::new("healthcheck_serving");
    let tokens = dir.write("tokens", "api-secret * rw\n");
    let tokens = tokens.to_str().expect("a UTF-8 path");
    let server = ServerProcess::start(
        BINARY.as_ref(),
        &["--listen", "127.0.0.1:0", "--auth-token-file", tokens],
        &["grpc"],
    );
    let addr = server.address("grpc").to_string();
    let url = server.grpc_url();
    for (args, env) in [
        (vec!["--addr", addr.as_str()], vec![]),
        (vec!["--addr", url.as_str()], vec![]),
        (vec!["--addr", url.as_str(), "--service", ""], vec![]),
        (vec![], vec![("STICKLESS_HEALTHCHECK_ADDR", addr.as_str())]),
    ] {
        let out = healthcheck(&args, &env);
        assert_exit(&out, 0, &format!("{args:?} {env:?}"));
        assert!(out.stdout.is_empty() && out.stderr.is_empty(), "{out:?}");
    }
    // A service the server does not report on is no success.
    let out = healthcheck(&["--addr", &addr, "--service", "no.such.Service"], &[]);
    assert_exit(&out, 1, "unknown service");
    assert!(stderr(&out).contains("NotFound"), "{}", stderr(&out));
}

#[cfg(feature = "redis-store")]
#[test]
fn healthcheck_exits_1_while_the_store_cannot_be_reached() {
    let redis = RefusedPort::new();
    let redis_url = format!("redis://{}", redis.addr());
    let server = ServerProcess::start(
        BINARY.as_ref(),
        &[
            "--listen",
            "127.0.0.1:0",
            "--store",
            "redis",
            "--redis-url",
            &redis_url,
            "--store-timeout",
            "500ms",
        ],
        &["grpc"],
    );
    let addr = server.address("grpc").to_string();
    for service in NAMES {
        let out = healthcheck(&["--addr", &addr, "--service", service], &[]);
        assert_exit(&out, 1, &format!("store down, {service:?}"));
        let why = stderr(&out);
        assert!(
            why.contains("NOT_SERVING") && why.lines().count() == 1,
            "one line saying why: {why}"
        );
    }
}

#[cfg(feature = "redis-store")]
#[test]
fn binary_logs_the_store_going_and_coming_back_and_healthcheck_follows() {
    use support::services::{self, OwnRedis};

    let Some(binary) = services::redis_server_binary("binary_health_follows_redis") else {
        return;
    };
    let mut redis = OwnRedis::start(binary);
    let redis_url = redis.url();
    let mut server = ServerProcess::start(
        BINARY.as_ref(),
        &[
            "--listen",
            "127.0.0.1:0",
            "--store",
            "redis",
            "--redis-url",
            &redis_url,
            "--store-timeout",
            "500ms",
            "--health-interval",
            "100ms",
        ],
        &["grpc"],
    );
    let addr = server.address("grpc").to_string();
    assert_exit(&healthcheck(&["--addr", &addr], &[]), 0, "Redis up");

    redis.stop();
    server.wait_stderr("health: NOT_SERVING, the store cannot be reached", PATIENCE);
    assert!(
        server.stderr_so_far().contains(" WARN "),
        "logged as a warning: {}",
        server.stderr_so_far()
    );
    let out = healthcheck(&["--addr", &addr], &[]);
    assert_exit(&out, 1, "Redis stopped");
    assert!(stderr(&out).contains("NOT_SERVING"), "{}", stderr(&out));

    redis.restart();
    server.wait_stderr("health: SERVING, the store answers again", PATIENCE);
    assert_exit(&healthcheck(&["--addr", &addr], &[]), 0, "Redis back");
}

#[test]
fn healthcheck_exits_1_when_nothing_listens() {
    let nothing = RefusedPort::new();
    let out = healthcheck(&["--addr", &nothing.addr().to_string()], &[]);
    assert_exit(&out, 1, "nothing listening");
    let why = stderr(&out);
    assert!(
        why.contains("cannot connect") && why.lines().count() == 1,
        "one line saying why: {why}"
    );
}

#[test]
fn healthcheck_exits_1_when_the_server_does_not_answer_within_the_timeout() {
    // Accepts connections (the kernel does, into the backlog) and never answers.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("bind loopback");
    let addr = silent.local_addr().expect("local address").to_string();
    let started = Instant::now();
    let out = healthcheck(&["--addr", &addr, "--timeout", "1s"], &[]);
    assert_exit(&out, 1, "silent server");
    assert!(
        started.elapsed() < PROBE_WITHIN,
        "the probe ended by its own timeout"
    );
    assert!(stderr(&out).contains("within 1s"), "{}", stderr(&out));
}

#[test]
fn healthcheck_over_tls_trusts_the_given_ca_and_presents_a_client_certificate() {
    let dir = PemDir::new("healthcheck_tls");
    let ca = Ca::new("healthcheck ca");
    let client_ca = Ca::new("healthcheck client ca");
    let ca_pem = dir.write_ca(&ca);
    let (cert, key) = dir.write_leaf(&ca.localhost_server(), "server");
    let client_ca_pem = dir.write("client-ca.pem", client_ca.cert_pem());
    let (client_cert, client_key) = dir.write_leaf(&client_ca.client("probe"), "client");
    let path = |p: &std::path::Path| p.to_str().expect("a UTF-8 path").to_owned();
    let (ca_pem, cert, key) = (path(&ca_pem), path(&cert), path(&key));
    let (client_ca_pem, client_cert, client_key) =
        (path(&client_ca_pem), path(&client_cert), path(&client_key));

    let tls = ["--tls-cert", &cert, "--tls-key", &key];
    let server = ServerProcess::start(
        BINARY.as_ref(),
        &[&["--listen", "127.0.0.1:0"][..], &tls].concat(),
        &["grpc"],
    );
    let addr = server.address("grpc").to_string();
    let https = format!("https://{addr}");
    let out = healthcheck(&["--addr", &https, "--tls-ca", &ca_pem], &[]);
    assert_exit(&out, 0, "TLS with the server's CA");
    let out = healthcheck(&["--addr", &addr, "--tls-ca", &ca_pem], &[]);
    assert_exit(&out, 0, "host:port with --tls-ca dials TLS");
    let env = [
        ("STICKLESS_HEALTHCHECK_ADDR", https.as_str()),
        ("STICKLESS_HEALTHCHECK_TLS_CA", ca_pem.as_str()),
    ];
    assert_exit(&healthcheck(&[], &env), 0, "TLS from the environment");
    let out = healthcheck(&["--addr", &https, "--tls-ca", &client_ca_pem], &[]);
    assert_exit(&out, 1, "TLS trusting another CA");
    let out = healthcheck(&["--addr", &server.grpc_url()], &[]);
    assert_exit(&out, 1, "plaintext against a TLS server");
    drop(server);

    let mtls = ServerProcess::start(
        BINARY.as_ref(),
        &[
            &["--listen", "127.0.0.1:0", "--tls-client-ca", &client_ca_pem][..],
            &tls,
        ]
        .concat(),
        &["grpc"],
    );
    let https = format!("https://{}", mtls.address("grpc"));
    let identity = ["--tls-cert", &client_cert, "--tls-key", &client_key];
    let out = healthcheck(
        &[&["--addr", &https, "--tls-ca", &ca_pem][..], &identity].concat(),
        &[],
    );
    assert_exit(&out, 0, "mTLS with a client certificate");
    let out = healthcheck(&["--addr", &https, "--tls-ca", &ca_pem], &[]);
    assert_exit(&out, 1, "mTLS without a client certificate");
}

#[test]
fn healthcheck_flag_errors_exit_1_never_2_and_help_exits_0() {
    let out = healthcheck(&["--no-such-flag"], &[]);
    assert_exit(&out, 1, "unknown flag (Docker reserves exit status 2)");
    let out = healthcheck(&["--addr", "ftp://127.0.0.1:1"], &[]);
    assert_exit(&out, 1, "unknown scheme");
    assert!(stderr(&out).contains("scheme"), "{}", stderr(&out));
    let out = healthcheck(&["--help"], &[]);
    assert_exit(&out, 0, "--help");
    assert!(String::from_utf8_lossy(&out.stdout).contains("--tls-ca"));
    // The server's own --help names the subcommand.
    let out = Command::new(BINARY)
        .arg("--help")
        .output()
        .expect("session-server --help");
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("session-server healthcheck"));
}
