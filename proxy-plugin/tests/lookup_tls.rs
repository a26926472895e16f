//! README: `session-proxy --session-lookup https://… --session-ca PATH` reads sessions from a
//! TLS session server, and an `https://` URL is never dialled in cleartext. The `session-proxy`
//! binary as an operator runs it (port 0, flags, environment twins, a TOML file and SIGHUP),
//! in front of a backend echoing the `x-session-*` headers it got, with the session server's
//! service over a memory store served by tonic with rustls; certificates are made here with
//! test-pki. Then the configuration itself: where the TLS files come from (flags, their
//! environment twins, `[session_lookup]` keys), that they are read at every resolve, and the
//! messages a mistake gets.

mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{CommandFactory as _, Parser as _};
use proxy_plugin::config::{Cli, ConfigError, resolve};
use session_client::{ClientConfig, ClientIdentity, ClientTls, SessionClient};
use session_proto::v1::session_store_server::SessionStoreServer;
use session_server::config::Settings;
use session_server::metrics::Metrics;
use session_server::service::{Limits, SessionService};
use session_server::store::memory::MemoryStore;
use support::backend::{Behaviour, TestBackend};
use support::proxy_process::{ProxyProcess, command, run_bounded};
use test_pki::{Ca, PemDir};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Certificate, Identity, ServerTlsConfig};

/// Bound on anything a test waits for: generous, a passing test never waits it out.
const PATIENCE: Duration = Duration::from_secs(30);
/// The session namespace of every session here.
const NAMESPACE: &str = "shop";

/// A test CA (test-pki) and a directory of its own for its files, removed on drop.
struct Pki {
    /// The CA.
    ca: Ca,
    /// Where its files go.
    dir: PemDir,
}

impl Pki {
    fn new(label: &str) -> Pki {
        let dir = PemDir::new(&format!("proxy-tls-{label}"));
        Pki {
            ca: Ca::new(label),
            dir,
        }
    }

    /// The CA certificate, written to `ca.pem`; its path.
    fn ca_file(&self) -> PathBuf {
        self.dir.write_ca(&self.ca)
    }

    /// A client certificate and key, written to `client.pem` and `client.key`; their paths.
    fn client_files(&self) -> (PathBuf, PathBuf) {
        self.dir.write_leaf(&self.ca.client("proxy.test"), "client")
    }
}

/// A TLS session server (memory store) on `127.0.0.1:0` with a certificate from `pki`,
/// stopped on drop.
struct TlsSessionServer {
    /// Where it listens.
    addr: SocketAddr,
    /// A client of [`NAMESPACE`] on it, with `pki`'s CA and a client certificate.
    client: SessionClient,
    /// Ends Watch streams (kept alive while the server runs).
    _watch_stop: watch::Sender<bool>,
    /// The serving task.
    task: JoinHandle<()>,
}

impl TlsSessionServer {
    /// Starts it; with `mtls`, client certificates signed by `pki` are required.
    async fn start(pki: &Pki, mtls: bool) -> TlsSessionServer {
        let leaf = pki.ca.server(&["127.0.0.1"]);
        let mut tls = ServerTlsConfig::new().identity(Identity::from_pem(leaf.cert, leaf.key));
        if mtls {
            tls = tls.client_ca_root(Certificate::from_pem(pki.ca.cert_pem()));
        }
        let settings = Settings::default();
        let store = Arc::new(MemoryStore::new(settings.max_session_bytes));
        let limits = Limits {
            default_ttl: settings.default_ttl,
            max_ttl: settings.max_ttl,
            max_session_bytes: settings.max_session_bytes,
        };
        let (watch_stop, watch_rx) = watch::channel(false);
        let service = SessionService::new(store, limits, Metrics::new(), watch_rx);
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local address");
        let mut builder = tonic::transport::Server::builder()
            .tls_config(tls)
            .expect("server TLS settings");
        let task = tokio::spawn(async move {
            builder
                .add_service(SessionStoreServer::new(service))
                .serve_with_incoming(TcpIncoming::from(listener))
                .await
                .expect("TLS session server failed");
        });
        let identity = pki.ca.client("test.client");
        let mut config = ClientConfig::new(format!("https://{addr}"));
        config.namespace = NAMESPACE.to_owned();
        config.timeout = PATIENCE;
        config.connect_timeout = PATIENCE;
        config.tls = Some(ClientTls {
            ca_pem: Some(pki.ca.cert_pem().as_bytes().to_vec()),
            identity: Some(ClientIdentity {
                cert_pem: identity.cert.into_bytes(),
                key_pem: identity.key.into_bytes(),
            }),
        });
        let client = SessionClient::connect_lazy(config).expect("test client");
        TlsSessionServer {
            addr,
            client,
            _watch_stop: watch_stop,
            task,
        }
    }

    /// `https://127.0.0.1:port`.
    fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// A new session of `user`; its id.
    async fn session_of(&self, user: &str) -> String {
        self.client
            .create(user, Default::default(), None)
            .await
            .expect("create over TLS")
            .id
    }
}

impl Drop for TlsSessionServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(PATIENCE)
        .build()
        .expect("HTTP client")
}

/// A path as a flag value.
fn arg(path: &Path) -> &str {
    path.to_str().expect("UTF-8 temporary path")
}

/// The flags of a proxy in front of `backend` looking sessions up at `url` in [`NAMESPACE`],
/// with a lookup bound no loaded machine reaches, then `extra`.
fn lookup_args<'a>(backend: &'a str, url: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "--backend",
        backend,
        "--session-lookup",
        url,
        "--session-namespace",
        NAMESPACE,
        "--session-timeout",
        "10s",
    ];
    args.extend_from_slice(extra);
    args
}

/// `GET /` through the proxy with the session cookie `sid`: the status and the user the
/// backend was told (`x-session-user`).
async fn user_seen(
    proxy: &ProxyProcess,
    http: &reqwest::Client,
    sid: &str,
) -> (u16, Option<String>) {
    let response = http
        .get(proxy.url("/"))
        .header("cookie", format!("sid={sid}"))
        .send()
        .await
        .expect("the proxy answers");
    let status = response.status().as_u16();
    if status != 200 {
        return (status, None);
    }
    let seen: serde_json::Value = response.json().await.expect("the backend's JSON");
    let user = seen["x-session-user"].as_str().map(str::to_owned);
    (status, user)
}

/// Polls `user_seen` until it gives `expected`, failing with the proxy's logs after
/// [`PATIENCE`].
async fn eventually_seen(
    what: &str,
    proxy: &ProxyProcess,
    http: &reqwest::Client,
    sid: &str,
    expected: (u16, Option<&str>),
) {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let (status, user) = user_seen(proxy, http, sid).await;
        if (status, user.as_deref()) == expected {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: got {status} {user:?}, not {expected:?}; logs: {}",
            proxy.logs()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_session_lookup_with_session_ca_resolves_sessions_from_a_tls_session_server() {
    let pki = Pki::new("lookup");
    let sessions = TlsSessionServer::start(&pki, false).await;
    let sid = sessions.session_of("alice").await;
    let backend = TestBackend::start("echo", Behaviour::SessionEcho).await;
    let (backend_url, url) = (format!("http://{}", backend.addr), sessions.url());
    let ca = pki.ca_file();
    let proxy = ProxyProcess::start(&lookup_args(
        &backend_url,
        &url,
        &["--session-ca", arg(&ca), "--session-fail", "closed"],
    ));
    let http = http_client();
    assert_eq!(
        user_seen(&proxy, &http, &sid).await,
        (200, Some("alice".to_owned()))
    );
    proxy.terminate().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtls_session_server_is_reached_with_the_identity_given_by_environment_twins() {
    let pki = Pki::new("mtls");
    let sessions = TlsSessionServer::start(&pki, true).await;
    let sid = sessions.session_of("alice").await;
    let backend = TestBackend::start("echo", Behaviour::SessionEcho).await;
    let (backend_url, url) = (format!("http://{}", backend.addr), sessions.url());
    let ca = pki.ca_file();
    let (cert, key) = pki.client_files();
    let http = http_client();

    let mut with_identity = command();
    with_identity
        .args(["--listen", "127.0.0.1:0"])
        .args(lookup_args(
            &backend_url,
            &url,
            &["--session-fail", "closed"],
        ))
        .env("STICKLESS_PROXY_SESSION_CA", &ca)
        .env("STICKLESS_PROXY_SESSION_CLIENT_CERT", &cert)
        .env("STICKLESS_PROXY_SESSION_CLIENT_KEY", &key);
    let proxy = ProxyProcess::spawn(with_identity, &["proxy"]);
    assert_eq!(
        user_seen(&proxy, &http, &sid).await,
        (200, Some("alice".to_owned()))
    );
    proxy.terminate().await;

    // Without the identity the server refuses the handshake: the store is unreachable.
    let proxy = ProxyProcess::start(&lookup_args(
        &backend_url,
        &url,
        &["--session-ca", arg(&ca), "--session-fail", "closed"],
    ));
    assert_eq!(user_seen(&proxy, &http, &sid).await, (503, None));
    proxy.terminate().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_session_lookup_without_the_ca_never_resolves_a_session() {
    let pki = Pki::new("untrusted");
    let sessions = TlsSessionServer::start(&pki, false).await;
    let sid = sessions.session_of("alice").await;
    let backend = TestBackend::start("echo", Behaviour::SessionEcho).await;
    let (backend_url, url) = (format!("http://{}", backend.addr), sessions.url());
    let http = http_client();
    // The system's roots do not know the private CA: the store counts as unreachable.
    let closed = ProxyProcess::start(&lookup_args(
        &backend_url,
        &url,
        &["--session-fail", "closed"],
    ));
    assert_eq!(user_seen(&closed, &http, &sid).await, (503, None));
    closed.terminate().await;
    let open = ProxyProcess::start(&lookup_args(&backend_url, &url, &[]));
    assert_eq!(user_seen(&open, &http, &sid).await, (200, None));
    let logs = open.terminate().await;
    assert!(logs.contains("certificate"), "the reason is logged: {logs}");
}

#[test]
fn unusable_session_tls_settings_exit_2_naming_the_problem() {
    let pki = Pki::new("exit");
    let ca = pki.ca_file();
    let missing = pki.dir.file("missing.pem");
    let backend = "http://127.0.0.1:2";
    let cases = [
        (
            lookup_args(
                backend,
                "https://127.0.0.1:1",
                &["--session-ca", arg(&missing)],
            ),
            [arg(&missing), "CA bundle"],
        ),
        (
            lookup_args(backend, "http://127.0.0.1:1", &["--session-ca", arg(&ca)]),
            ["--session-ca", "https://"],
        ),
    ];
    for (args, expected) in cases {
        let out = run_bounded(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        for text in expected {
            assert!(stderr.contains(text), "{args:?}: {text:?} not in {stderr}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_rereads_the_session_ca_and_keeps_the_running_one_when_unreadable() {
    let first_ca = Pki::new("first");
    let second_ca = Pki::new("second");
    let first = TlsSessionServer::start(&first_ca, false).await;
    let second = TlsSessionServer::start(&second_ca, false).await;
    let alice = first.session_of("alice").await;
    let bob = second.session_of("bob").await;
    let backend = TestBackend::start("echo", Behaviour::SessionEcho).await;
    let ca = first_ca.ca_file();
    let file = first_ca.dir.file("proxy.toml");
    let table = |url: &str| {
        format!(
            "[[backend]]\nurl = \"http://{}\"\n\n[session_lookup]\nurl = \"{url}\"\n\
             namespace = \"{NAMESPACE}\"\ntimeout = \"10s\"\non_failure = \"closed\"\n\
             ca = {:?}\n",
            backend.addr,
            arg(&ca)
        )
    };
    std::fs::write(&file, table(&first.url())).expect("write config");
    let proxy = ProxyProcess::start(&["--config", arg(&file)]);
    let http = http_client();
    assert_eq!(
        user_seen(&proxy, &http, &alice).await,
        (200, Some("alice".to_owned()))
    );

    // An unreadable CA bundle: the reload is refused naming it; the running lookup goes on.
    std::fs::write(&ca, "not a certificate\n").expect("spoil the CA bundle");
    proxy.signal("HUP");
    let deadline = Instant::now() + PATIENCE;
    while !proxy.logs().contains("reload refused") {
        assert!(Instant::now() < deadline, "no refusal: {}", proxy.logs());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(proxy.logs().contains(arg(&ca)), "{}", proxy.logs());
    assert_eq!(
        user_seen(&proxy, &http, &alice).await,
        (200, Some("alice".to_owned()))
    );

    // The second server, with the first CA in the file: its certificate is not trusted.
    std::fs::write(&ca, first_ca.ca.cert_pem()).expect("restore the CA bundle");
    std::fs::write(&file, table(&second.url())).expect("write config");
    proxy.signal("HUP");
    eventually_seen(
        "the second server is untrusted",
        &proxy,
        &http,
        &bob,
        (503, None),
    )
    .await;

    // Only the CA file changes: the reload reads it and the lookup trusts the second server.
    std::fs::write(&ca, second_ca.ca.cert_pem()).expect("rotate the CA bundle");
    proxy.signal("HUP");
    eventually_seen(
        "bob's session through the re-read CA",
        &proxy,
        &http,
        &bob,
        (200, Some("bob")),
    )
    .await;
    proxy.terminate().await;
}

/// The flags `args` after `session-proxy`, with one backend.
fn flags(args: &[&str]) -> Cli {
    let all = ["session-proxy", "--backend", "http://127.0.0.1:9001"];
    Cli::try_parse_from(all.iter().chain(args)).unwrap_or_else(|e| panic!("{args:?}: {e}"))
}

/// The session lookup's TLS settings of `cli` over the file text `file`.
fn lookup_tls(cli: Cli, file: Option<&str>) -> Option<ClientTls> {
    resolve(cli, file)
        .expect("configuration accepted")
        .lookup
        .expect("session lookup on")
        .tls
}

/// The message of a configuration that must be refused.
fn refused(cli: Cli, file: Option<&str>) -> String {
    match resolve(cli, file) {
        Ok(config) => panic!("accepted: {config:?}"),
        Err(error @ (ConfigError::Invalid(_) | ConfigError::Parse { .. })) => error.to_string(),
        Err(other) => panic!("not a configuration error: {other:?}"),
    }
}

/// A path as a TOML string.
fn toml_path(path: &Path) -> String {
    format!("{:?}", arg(path))
}

/// A CA bundle and a client certificate with its key, written; and the settings they hold.
fn tls_files(pki: &Pki) -> ((PathBuf, PathBuf, PathBuf), ClientTls) {
    let ca = pki.ca_file();
    let (cert, key) = pki.client_files();
    let settings = ClientTls {
        ca_pem: Some(pki.ca.cert_pem().as_bytes().to_vec()),
        identity: Some(ClientIdentity {
            cert_pem: std::fs::read(&cert).expect("read"),
            key_pem: std::fs::read(&key).expect("read"),
        }),
    };
    ((ca, cert, key), settings)
}

#[test]
fn session_tls_files_come_from_flags_or_the_file_and_are_read_at_every_resolve() {
    let pki = Pki::new("sources");
    let ((ca, cert, key), settings) = tls_files(&pki);
    let url = "https://sessions.internal:50051";
    let by_flags = flags(&[
        "--session-lookup",
        url,
        "--session-ca",
        arg(&ca),
        "--session-client-cert",
        arg(&cert),
        "--session-client-key",
        arg(&key),
    ]);
    assert_eq!(lookup_tls(by_flags, None), Some(settings.clone()));
    assert_eq!(
        lookup_tls(flags(&["--session-lookup", url]), None),
        None,
        "https:// without files: the system's roots"
    );

    let file = format!(
        "[session_lookup]\nurl = \"{url}\"\nca = {}\nclient_cert = {}\nclient_key = {}\n",
        toml_path(&ca),
        toml_path(&cert),
        toml_path(&key)
    );
    assert_eq!(lookup_tls(flags(&[]), Some(&file)), Some(settings.clone()));
    let shown = format!("{:?}", resolve(flags(&[]), Some(&file)).expect("accepted"));
    assert!(!shown.contains("PRIVATE KEY"), "the key is never printed");

    // A flag wins over the file's key; the files are read again at every resolve (SIGHUP).
    let only_ca = format!(
        "[session_lookup]\nurl = \"{url}\"\nca = {}\n",
        toml_path(&ca)
    );
    let other = Pki::new("other");
    let other_ca = other.ca_file();
    let other_settings = ClientTls {
        ca_pem: Some(other.ca.cert_pem().as_bytes().to_vec()),
        identity: None,
    };
    let overridden = flags(&["--session-ca", arg(&other_ca)]);
    assert_eq!(
        lookup_tls(overridden, Some(&only_ca)),
        Some(other_settings.clone())
    );
    std::fs::write(&ca, other.ca.cert_pem()).expect("rewrite the CA bundle");
    assert_eq!(lookup_tls(flags(&[]), Some(&only_ca)), Some(other_settings));
}

#[test]
fn session_tls_settings_that_do_not_fit_are_refused_naming_the_problem() {
    let pki = Pki::new("refusals");
    let ((ca, cert, key), _) = tls_files(&pki);
    let missing = pki.dir.file("missing.pem");
    let https = |extra: &[&str]| {
        let mut args = vec!["--session-lookup", "https://127.0.0.1:50051"];
        args.extend_from_slice(extra);
        flags(&args)
    };
    let m = refused(https(&["--session-ca", arg(&missing)]), None);
    assert!(m.contains(arg(&missing)) && m.contains("CA bundle"), "{m}");
    let m = refused(https(&["--session-ca", arg(&key)]), None);
    assert!(
        m.contains(arg(&key)) && m.contains("no PEM certificate"),
        "{m}"
    );
    let both = [
        "--session-client-cert",
        arg(&cert),
        "--session-client-key",
        arg(&cert),
    ];
    let m = refused(https(&both), None);
    assert!(m.contains("client key") && m.contains(arg(&cert)), "{m}");
    let m = refused(https(&["--session-client-cert", arg(&cert)]), None);
    assert!(m.contains("without its key"), "{m}");
    let m = refused(https(&["--session-client-key", arg(&key)]), None);
    assert!(m.contains("without its certificate"), "{m}");

    let cleartext = ["--session-lookup", "http://127.0.0.1:50051"];
    let m = refused(
        flags(&[cleartext[0], cleartext[1], "--session-ca", arg(&ca)]),
        None,
    );
    assert!(m.contains("--session-ca") && m.contains("https://"), "{m}");
    let file = format!(
        "[session_lookup]\nurl = \"http://127.0.0.1:1\"\nclient_cert = {}\nclient_key = {}\n",
        toml_path(&cert),
        toml_path(&key)
    );
    let m = refused(flags(&[]), Some(&file));
    assert!(m.contains("client_cert") && m.contains("https://"), "{m}");

    let m = refused(flags(&["--session-ca", arg(&ca)]), None);
    assert!(
        m.contains("--session-ca") && m.contains("--session-lookup"),
        "{m}"
    );
    let file = format!("[session_lookup]\nca = {}\n", toml_path(&ca));
    let m = refused(flags(&[]), Some(&file));
    assert!(m.contains("session_lookup"), "{m}");
    let file = "[session_lookup]\nurl = \"https://h:1\"\ncert = \"/x\"\n";
    let m = refused(flags(&[]), Some(file));
    assert!(m.contains("cert") && m.contains("line 3"), "{m}");
}

#[test]
fn every_session_tls_flag_has_an_environment_twin() {
    let command = Cli::command();
    for (flag, twin) in [
        ("session-ca", "STICKLESS_PROXY_SESSION_CA"),
        ("session-client-cert", "STICKLESS_PROXY_SESSION_CLIENT_CERT"),
        ("session-client-key", "STICKLESS_PROXY_SESSION_CLIENT_KEY"),
    ] {
        let argument = command
            .get_arguments()
            .find(|a| a.get_long() == Some(flag))
            .unwrap_or_else(|| panic!("no --{flag}"));
        assert_eq!(
            argument.get_env().and_then(|e| e.to_str()),
            Some(twin),
            "--{flag}"
        );
    }
}
