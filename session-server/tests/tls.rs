//! gRPC over TLS and mTLS, as README describes it: with `--tls-cert`/`--tls-key` the port
//! speaks only TLS (the API, health and reflection alike), `--tls-client-ca` requires client
//! certificates signed by that CA, one silent client never holds up another's handshake, SIGHUP
//! swaps the certificate for new connections while open ones stay up (and refuses broken files,
//! keeping the old ones), and unusable files at start-up are a configuration error naming the
//! file. Certificates are made by the `test-pki` crate for each run. In-process servers run both on
//! the caller's runtime (1 thread) and on serving threads (2), the two accept paths.

mod support;

use std::path::Path;
use std::process::Output;
use std::sync::Arc;
use std::time::{Duration, Instant};

use session_server::config::Settings;
use session_server::store::memory::MemoryStore;
use session_server::tls::HANDSHAKE_TIMEOUT;
use support::harness::TestServer;
use support::process::ServerProcess;
use support::tls::{
    self, create_in_plaintext, create_on, create_over_tls, send_sighup, tls_channel, with_stderr_to,
};
use support::wait::eventually_ok;
use test_pki::{Ca, PemDir};
use tokio::io::AsyncReadExt as _;

const BINARY: &str = env!("CARGO_BIN_EXE_session-server");

/// Bound on waiting for what a SIGHUP changes: generous, for a loaded machine.
const RELOAD_WITHIN: Duration = Duration::from_secs(30);

/// The two accept paths: connections on the caller's runtime, and on serving threads.
const THREADS: [usize; 2] = [1, 2];

/// An in-process server over a memory store with `settings` on `threads` serving threads.
async fn start(mut settings: Settings, threads: usize) -> TestServer {
    settings.serve_threads = Some(threads);
    let store = Arc::new(MemoryStore::new(settings.max_session_bytes));
    TestServer::start(settings, store).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_client_trusting_the_ca_is_served_api_health_and_reflection() {
    use session_proto::v1::GetRequest;
    use session_proto::v1::session_store_client::SessionStoreClient;
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

    let dir = PemDir::new("tls_api_health_reflection");
    let ca = Ca::new("api ca");
    for threads in THREADS {
        let server = start(tls::settings(&dir, &ca, None), threads).await;
        let channel = tls_channel(server.addr, ca.cert_pem(), None)
            .await
            .unwrap_or_else(|e| panic!("{threads} thread(s): TLS connect: {e:?}"));
        let id = create_on(channel.clone()).await.unwrap();
        let got = SessionStoreClient::new(channel.clone())
            .get(GetRequest {
                namespace: "tls".into(),
                id: id.clone(),
                touch: false,
                bypass_cache: false,
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            (got.id.as_str(), got.user_id.as_str()),
            (id.as_str(), "tls-user")
        );

        let health = HealthClient::new(channel.clone())
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(health.status, ServingStatus::Serving as i32);

        let list = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut answers = ServerReflectionClient::new(channel)
            .server_reflection_info(futures::stream::iter([list]))
            .await
            .unwrap()
            .into_inner();
        let Some(MessageResponse::ListServicesResponse(services)) =
            answers.message().await.unwrap().unwrap().message_response
        else {
            panic!("expected a service list");
        };
        let names: Vec<_> = services.service.iter().map(|s| s.name.as_str()).collect();
        assert!(names.contains(&session_proto::SERVICE_NAME), "{names:?}");
        server.shutdown(Duration::from_secs(30)).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_clients_and_clients_trusting_another_ca_are_refused() {
    let dir = PemDir::new("tls_refusals");
    let (ca, other) = (Ca::new("server ca"), Ca::new("other ca"));
    for threads in THREADS {
        let server = start(tls::settings(&dir, &ca, None), threads).await;
        let plaintext = create_in_plaintext(server.addr).await;
        assert!(
            plaintext.is_err(),
            "{threads}: plaintext served: {plaintext:?}"
        );
        let untrusted = create_over_tls(server.addr, other.cert_pem(), None).await;
        assert!(
            untrusted.is_err(),
            "{threads}: wrong CA served: {untrusted:?}"
        );
        // The refusals cost only those connections.
        create_over_tls(server.addr, ca.cert_pem(), None)
            .await
            .unwrap_or_else(|e| panic!("{threads} thread(s), after the refusals: {e}"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_ca_requires_a_client_certificate_it_signed() {
    let dir = PemDir::new("tls_mtls");
    let (ca, clients, strangers) = (
        Ca::new("server ca"),
        Ca::new("client ca"),
        Ca::new("stranger ca"),
    );
    let (known, unknown) = (clients.client("app"), strangers.client("intruder"));
    for threads in THREADS {
        let server = start(tls::settings(&dir, &ca, Some(&clients)), threads).await;
        let anonymous = create_over_tls(server.addr, ca.cert_pem(), None).await;
        assert!(
            anonymous.is_err(),
            "{threads}: no client cert served: {anonymous:?}"
        );
        let stranger = create_over_tls(server.addr, ca.cert_pem(), Some(&unknown)).await;
        assert!(
            stranger.is_err(),
            "{threads}: other CA's cert served: {stranger:?}"
        );
        create_over_tls(server.addr, ca.cert_pem(), Some(&known))
            .await
            .unwrap_or_else(|e| panic!("{threads} thread(s), client CA's cert: {e}"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_clients_do_not_hold_up_another_clients_handshake() {
    let dir = PemDir::new("tls_silent");
    let ca = Ca::new("server ca");
    for threads in THREADS {
        let server = start(tls::settings(&dir, &ca, None), threads).await;
        // One per serving thread (connections are handed out round robin), never a ClientHello.
        let mut silent = Vec::new();
        for _ in 0..threads {
            silent.push(tokio::net::TcpStream::connect(server.addr).await.unwrap());
        }
        create_over_tls(server.addr, ca.cert_pem(), None)
            .await
            .unwrap_or_else(|e| panic!("{threads} thread(s), beside silent clients: {e}"));
        // Served while the silent ones still wait in their handshakes: had their handshakes
        // come first, the server would have dropped them (after its timeout) before serving.
        for stream in &silent {
            let mut byte = [0u8; 1];
            match stream.try_read(&mut byte) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                other => panic!("{threads}: a silent client was already let go: {other:?}"),
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_client_is_dropped_after_the_handshake_timeout() {
    let dir = PemDir::new("tls_timeout");
    let ca = Ca::new("server ca");
    let server = start(tls::settings(&dir, &ca, None), 1).await;
    let mut silent = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let connected = Instant::now();
    let mut byte = [0u8; 1];
    let read = tokio::time::timeout(HANDSHAKE_TIMEOUT * 3, silent.read(&mut byte))
        .await
        .expect("the silent connection was not closed");
    // Closed (EOF, or reset), with nothing sent, and not before the timeout had passed.
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    assert!(
        connected.elapsed() >= HANDSHAKE_TIMEOUT,
        "closed after {:?}",
        connected.elapsed()
    );
}

/// The binary with TLS files in `dir` (`server.pem` and `server.key`, see [`tls::settings`]), its stderr
/// written to `log` so the test can read the reload messages while it runs.
fn start_binary(dir: &PemDir, log: &Path, extra: &[&str]) -> ServerProcess {
    let (cert, key) = (dir.file("server.pem"), dir.file("server.key"));
    let (cert, key) = (cert.to_str().unwrap(), key.to_str().unwrap());
    let mut args = vec![
        "--listen",
        "127.0.0.1:0",
        "--tls-cert",
        cert,
        "--tls-key",
        key,
    ];
    args.extend_from_slice(extra);
    let wrapped = with_stderr_to(log, Path::new(BINARY), &args);
    let wrapped: Vec<&str> = wrapped.iter().map(String::as_str).collect();
    ServerProcess::start(Path::new("sh"), &wrapped, &["grpc"])
}

/// Waits until `log` holds `text` at least `count` times; fails with the log after `within`.
async fn log_holds(log: &Path, text: &str, count: usize, within: Duration) {
    eventually_ok(&format!("{count}× {text:?} in the log"), within, || async {
        let contents = std::fs::read_to_string(log).unwrap_or_default();
        if contents.matches(text).count() >= count {
            Ok(contents)
        } else {
            Err(contents)
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_swaps_the_certificate_for_new_connections_and_keeps_open_ones() {
    let dir = PemDir::new("tls_sighup_swap");
    let (old_ca, new_ca) = (Ca::new("old ca"), Ca::new("new ca"));
    dir.write_leaf(&old_ca.localhost_server(), "server");
    let log = dir.file("stderr.log");
    let server = start_binary(&dir, &log, &[]);
    let addr = server.address("grpc");

    let open = tls_channel(addr, old_ca.cert_pem(), None).await.unwrap();
    create_on(open.clone()).await.unwrap();
    let before = create_over_tls(addr, new_ca.cert_pem(), None).await;
    assert!(before.is_err(), "the new CA was trusted early: {before:?}");

    dir.write_leaf(&new_ca.localhost_server(), "server");
    send_sighup(server.pid());
    eventually_ok("a client trusting only the new CA", RELOAD_WITHIN, || {
        create_over_tls(addr, new_ca.cert_pem(), None)
    })
    .await;
    let old = create_over_tls(addr, old_ca.cert_pem(), None).await;
    assert!(
        old.is_err(),
        "new connections still get the old cert: {old:?}"
    );
    // A reconnection would have to trust the new certificate, which this channel does not: a
    // call that works went over the connection opened before the reload.
    create_on(open)
        .await
        .unwrap_or_else(|e| panic!("the open connection: {e}"));
    log_holds(&log, "TLS files reloaded", 1, RELOAD_WITHIN).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_with_broken_files_keeps_the_old_certificate_and_logs_why() {
    let dir = PemDir::new("tls_sighup_broken");
    let (ca, new_ca) = (Ca::new("ca"), Ca::new("new ca"));
    let (cert, _) = dir.write_leaf(&ca.localhost_server(), "server");
    let log = dir.file("stderr.log");
    let server = start_binary(&dir, &log, &[]);
    let addr = server.address("grpc");
    let refused = "TLS files refused";

    // Not a certificate at all.
    dir.write("server.pem", "-----BEGIN CERTIFICATE-----\nnot base64!\n");
    send_sighup(server.pid());
    log_holds(&log, refused, 1, RELOAD_WITHIN).await;
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(logged.contains(&cert.display().to_string()), "{logged}");
    create_over_tls(addr, ca.cert_pem(), None)
        .await
        .unwrap_or_else(|e| panic!("after an unparsable certificate: {e}"));

    // A valid certificate whose key is still the old one.
    dir.write("server.pem", &new_ca.localhost_server().cert);
    send_sighup(server.pid());
    log_holds(&log, refused, 2, RELOAD_WITHIN).await;
    create_over_tls(addr, ca.cert_pem(), None)
        .await
        .unwrap_or_else(|e| panic!("after a certificate without its key: {e}"));

    // Repaired files are taken on the next SIGHUP.
    dir.write_leaf(&new_ca.localhost_server(), "server");
    send_sighup(server.pid());
    eventually_ok("the repaired certificate", RELOAD_WITHIN, || {
        create_over_tls(addr, new_ca.cert_pem(), None)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_files_come_from_the_config_file() {
    let dir = PemDir::new("tls_config_file");
    let (ca, clients) = (Ca::new("ca"), Ca::new("client ca"));
    let (cert, key) = dir.write_leaf(&ca.localhost_server(), "server");
    let client_ca = dir.write("client-ca.pem", clients.cert_pem());
    let config = dir.write(
        "server.toml",
        format!(
            "listen = \"127.0.0.1:0\"\ntls_cert = {:?}\ntls_key = {:?}\ntls_client_ca = {:?}\n",
            cert.display().to_string(),
            key.display().to_string(),
            client_ca.display().to_string()
        ),
    );
    let server = ServerProcess::start(
        Path::new(BINARY),
        &["--config", config.to_str().unwrap()],
        &["grpc"],
    );
    let addr = server.address("grpc");
    let anonymous = create_over_tls(addr, ca.cert_pem(), None).await;
    assert!(anonymous.is_err(), "tls_client_ca ignored: {anonymous:?}");
    create_over_tls(addr, ca.cert_pem(), Some(&clients.client("app")))
        .await
        .unwrap();
}

/// Runs the binary with `args` and `env` as its only `STICKLESS_*` variables, bounded.
fn run(args: &[&str], env: &[(&str, &Path)]) -> Output {
    support::process::run_bounded(BINARY.as_ref(), args, env)
}

/// Fails unless `out` is a start-up refusal: exit status 2, nothing on stdout, and one line on
/// stderr holding each of `expected`.
fn assert_refused(case: &str, out: &Output, expected: &[&str]) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(2),
        "{case}: {}; stderr:\n{stderr}",
        out.status
    );
    assert!(out.stdout.is_empty(), "{case}: stdout not empty");
    assert_eq!(stderr.trim_end().lines().count(), 1, "{case}: {stderr}");
    for text in expected {
        assert!(stderr.contains(text), "{case}: no {text:?} in:\n{stderr}");
    }
}

#[test]
fn unusable_tls_files_at_start_up_exit_2_naming_the_file() {
    let dir = PemDir::new("tls_start_up_errors");
    let (ca, other) = (Ca::new("ca"), Ca::new("other"));
    let (cert, key) = dir.write_leaf(&ca.localhost_server(), "server");
    let garbage = dir.write("garbage.pem", "this is not PEM\n");
    let other_key = dir.write("other.key", &other.localhost_server().key);
    let missing = dir.file("missing.pem");
    let text = |p: &Path| p.to_str().unwrap().to_owned();
    let (cert, key, garbage, other_key, missing) = (
        text(&cert),
        text(&key),
        text(&garbage),
        text(&other_key),
        text(&missing),
    );
    let listen = ["--listen", "127.0.0.1:0"];
    let cases: [(&str, Vec<&str>, Vec<&str>); 6] = [
        (
            "missing cert",
            vec!["--tls-cert", &missing, "--tls-key", &key],
            vec![&missing],
        ),
        (
            "garbage cert",
            vec!["--tls-cert", &garbage, "--tls-key", &key],
            vec![&garbage],
        ),
        (
            "garbage key",
            vec!["--tls-cert", &cert, "--tls-key", &garbage],
            vec![&garbage],
        ),
        (
            "key of another cert",
            vec!["--tls-cert", &cert, "--tls-key", &other_key],
            vec![&cert, &other_key],
        ),
        (
            "missing client CA",
            vec![
                "--tls-cert",
                &cert,
                "--tls-key",
                &key,
                "--tls-client-ca",
                &missing,
            ],
            vec![&missing],
        ),
        (
            "cert without key",
            vec!["--tls-cert", &cert],
            vec!["tls-key"],
        ),
    ];
    for (case, args, expected) in cases {
        let args: Vec<&str> = listen.iter().copied().chain(args).collect();
        assert_refused(case, &run(&args, &[]), &expected);
    }
    let out = run(&["--listen", "127.0.0.1:0", "--tls-client-ca", &cert], &[]);
    assert_refused("client CA without TLS", &out, &["tls-client-ca"]);
}

#[test]
fn tls_settings_have_environment_twins() {
    let dir = PemDir::new("tls_env");
    let ca = Ca::new("ca");
    let (cert, key) = dir.write_leaf(&ca.localhost_server(), "server");
    let missing = dir.file("missing.pem");
    let listen = ["--listen", "127.0.0.1:0"];
    let named = missing.to_str().unwrap();
    for (case, env) in [
        (
            "STICKLESS_TLS_CERT",
            [
                ("STICKLESS_TLS_CERT", &missing),
                ("STICKLESS_TLS_KEY", &key),
            ],
        ),
        (
            "STICKLESS_TLS_KEY",
            [
                ("STICKLESS_TLS_CERT", &cert),
                ("STICKLESS_TLS_KEY", &missing),
            ],
        ),
    ] {
        let env = env.map(|(name, path)| (name, path.as_path()));
        assert_refused(case, &run(&listen, &env), &[named]);
    }
    let env = [
        ("STICKLESS_TLS_CERT", cert.as_path()),
        ("STICKLESS_TLS_KEY", key.as_path()),
        ("STICKLESS_TLS_CLIENT_CA", missing.as_path()),
    ];
    assert_refused("STICKLESS_TLS_CLIENT_CA", &run(&listen, &env), &[named]);
}

#[tokio::test]
async fn hand_built_settings_naming_part_of_a_tls_setup_never_serve_plaintext() {
    // `server::run` is public and `Settings` has public fields: a caller that leaves the key
    // (or the certificate) out must get an error, not a cleartext server or one without mTLS.
    let dir = PemDir::new("partial-settings");
    let ca = Ca::new("partial");
    let (cert, key) = dir.write_leaf(&ca.localhost_server(), "server");
    let client_ca = dir.write("client-ca.pem", ca.cert_pem());
    let partial = [
        (Some(cert.clone()), None, None),
        (None, Some(key.clone()), None),
        (None, None, Some(client_ca.clone())),
        (Some(cert), None, Some(client_ca)),
    ];
    for (tls_cert, tls_key, tls_client_ca) in partial {
        let settings = Settings {
            tls_cert,
            tls_key,
            tls_client_ca,
            ..Settings::default()
        };
        let case = format!("{settings:?}");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let store = Arc::new(MemoryStore::new(settings.max_session_bytes));
        let served = session_server::server::run(
            listener,
            &settings,
            store,
            session_server::metrics::Metrics::new(),
            std::future::ready(()),
        )
        .await;
        let error = served.expect_err(&case).to_string();
        assert!(error.contains("incomplete TLS settings"), "{case}: {error}");
    }
}

#[tokio::test]
async fn a_public_listener_without_credentials_is_refused_on_the_library_path_too() {
    let settings = Settings::default();
    let listener = tokio::net::TcpListener::bind("0.0.0.0:0").await.unwrap();
    let store = Arc::new(MemoryStore::new(settings.max_session_bytes));
    let served = session_server::server::run(
        listener,
        &settings,
        store,
        session_server::metrics::Metrics::new(),
        std::future::ready(()),
    )
    .await;
    let error = served.expect_err("refused").to_string();
    assert!(error.contains("without authentication"), "{error}");
}
