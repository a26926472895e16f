//! `demo-app`: the demo backend. `cargo run -p demo --bin demo-app -- --sessions local` runs it
//! alone; point `--session-server` at a running session server for shared sessions.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use demo::{DemoConfig, ListenerTls, Sessions};
use session_client::cookie::Encryption;
use session_client::{ClientTls, FallbackMode};

/// Where sessions live.
#[derive(Debug, Clone, Copy, ValueEnum)]
enum SessionMode {
    /// In this process only: the baseline that loses sessions across instances.
    Local,
    /// In the session server (`--session-server`).
    Store,
    /// Injected by session-proxy's lookup plugin; writes to `--session-server`.
    Proxy,
}

/// Cookie fallback when the session server is unreachable.
#[derive(Debug, Clone, Copy, ValueEnum)]
enum Fallback {
    /// None: 503 while the store is down.
    Off,
    /// Serve from the signed snapshot cookie during an outage.
    OnOutage,
    /// Same, with the snapshot rewritten on every response.
    Always,
}

/// Flags of `demo-app`.
#[derive(Debug, Parser)]
#[command(
    name = "demo-app",
    version,
    about = "Stickless demo backend (personal centre)"
)]
struct Cli {
    /// Address to serve HTTP on (port 0: any free port; the bound address is printed on stdout
    /// as `listening http <ip:port>`).
    #[arg(long, env = "DEMO_LISTEN", default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Certificate chain (PEM, this server's certificate first): with `--tls-key`, `--listen`
    /// serves HTTPS only (ALPN h2 and http/1.1), e.g. as an `https://` backend of
    /// session-proxy.
    #[arg(long, value_name = "PATH", env = "DEMO_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// Private key (PEM) of `--tls-cert`; both or neither.
    #[arg(long, value_name = "PATH", env = "DEMO_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Instance name, sent in `x-served-by`.
    #[arg(long, env = "DEMO_NAME", default_value = "demo")]
    name: String,
    /// Where sessions live.
    #[arg(long, env = "DEMO_SESSIONS", value_enum, default_value = "store")]
    sessions: SessionMode,
    /// Session server URL (with `--sessions store` or `proxy`): `https://` is always TLS,
    /// `http://` cleartext. Several servers over one store: comma-separated
    /// (`http://a:50051,http://b:50051`), balanced over and failed over between.
    #[arg(
        long,
        value_name = "URL[,URL...]",
        env = "DEMO_SESSION_SERVER",
        default_value = demo::DEFAULT_SESSION_SERVER
    )]
    session_server: String,
    /// CA bundle (PEM) the session server's certificate must chain to, for an `https://`
    /// `--session-server` [default: the system's roots].
    #[arg(long, value_name = "PATH", env = "DEMO_SESSION_SERVER_CA")]
    session_server_ca: Option<PathBuf>,
    /// Client certificate (PEM) presented to a session server that requires mTLS; needs
    /// `--session-client-key`.
    #[arg(
        long,
        value_name = "PATH",
        env = "DEMO_SESSION_CLIENT_CERT",
        requires = "session_client_key"
    )]
    session_client_cert: Option<PathBuf>,
    /// Private key (PEM) of `--session-client-cert`.
    #[arg(
        long,
        value_name = "PATH",
        env = "DEMO_SESSION_CLIENT_KEY",
        requires = "session_client_cert"
    )]
    session_client_key: Option<PathBuf>,
    /// Cookie fallback mode.
    #[arg(long, env = "DEMO_FALLBACK", value_enum, default_value = "off")]
    fallback: Fallback,
    /// Cookie key (hex or base64, at least 32 bytes); repeat for rotation, signing key first.
    #[arg(long = "cookie-key", env = "DEMO_COOKIE_KEYS", value_delimiter = ',', value_parser = parse_key)]
    cookie_keys: Vec<Vec<u8>>,
    /// Seal the snapshot cookie with AES-256-GCM (content hidden, not only signed).
    #[arg(long)]
    encrypt_cookies: bool,
    /// Send cookies without `Secure` (plain-HTTP localhost only).
    #[arg(long)]
    insecure_cookies: bool,
    /// Session namespace (the session server's and `session-proxy --session-namespace`'s
    /// default too).
    #[arg(long, env = "DEMO_NAMESPACE", default_value = demo::DEFAULT_NAMESPACE)]
    namespace: String,
    /// Bearer token for the session server.
    #[arg(long, env = "STICKLESS_AUTH_TOKEN", hide_env_values = true)]
    auth_token: Option<String>,
    /// The session id may also travel in this header, for clients without cookies
    /// (`x-session-token`, say): read before the cookie, a new id answered in it, a logout
    /// answers it empty. In `proxy` mode give session-proxy's `--session-header` the same.
    #[arg(long, value_name = "NAME", env = "DEMO_SESSION_HEADER")]
    session_header: Option<http::HeaderName>,
    /// How long past the session server's last confirmation a snapshot cookie may stand in
    /// for the session (and be pushed back with Restore); give session-proxy's
    /// `--snapshot-max-age` the same value [default: 1h].
    #[arg(
        long,
        value_name = "DURATION",
        env = "DEMO_SNAPSHOT_MAX_AGE",
        value_parser = parse_duration
    )]
    snapshot_max_age: Option<Duration>,
    /// A session server call that times out while the server answered less than this long
    /// ago is a 503 with Retry-After, not an outage the snapshot stands in for [default: 5s].
    #[arg(
        long,
        value_name = "DURATION",
        env = "DEMO_OUTAGE_GRACE",
        value_parser = parse_duration
    )]
    outage_grace: Option<Duration>,
}

/// A duration in humantime syntax ("500ms", "5s", "1h"), above zero.
fn parse_duration(text: &str) -> Result<Duration, String> {
    let duration = humantime::parse_duration(text)
        .map_err(|e| format!("bad duration {text:?} ({e}); write e.g. \"5s\" or \"1h\""))?;
    if duration.is_zero() {
        return Err(format!("duration {text:?} must be above zero"));
    }
    Ok(duration)
}

/// A key given as hex or base64, at least 32 bytes.
fn parse_key(text: &str) -> Result<Vec<u8>, String> {
    session_client::cookie::key_material_from_text(text, session_client::cookie::MIN_KEY_BYTES)
        .map_err(|error| format!("cookie key {error}"))
}

/// Prints `listening <role> <addr>` on stdout and flushes it: the one line a caller that
/// started us with port 0 reads to learn the bound address (nothing else goes to stdout).
fn report_listening(role: &str, addr: SocketAddr) -> std::io::Result<()> {
    use std::io::Write as _;
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "listening {role} {addr}")?;
    stdout.flush()
}

/// The demo's settings from its flags: what `main` refuses with exit status 2 (a fallback
/// without a key, TLS files that cannot be read or used, TLS settings that do not fit the
/// session server URL) is an `Err` with the reason.
fn demo_config(cli: Cli) -> Result<DemoConfig, String> {
    let fallback = match cli.fallback {
        Fallback::Off => FallbackMode::Off,
        Fallback::OnOutage => FallbackMode::OnOutage,
        Fallback::Always => FallbackMode::Always,
    };
    if !matches!(fallback, FallbackMode::Off) && cli.cookie_keys.is_empty() {
        return Err("--fallback needs at least one --cookie-key".into());
    }
    let session_tls = ClientTls::from_files(
        cli.session_server_ca.as_deref(),
        cli.session_client_cert.as_deref(),
        cli.session_client_key.as_deref(),
    )
    .map_err(|e| e.to_string())?;
    let listener_tls = match (&cli.tls_cert, &cli.tls_key) {
        (Some(cert), Some(key)) => {
            Some(ListenerTls::from_files(cert, key).map_err(|e| e.to_string())?)
        }
        (None, None) => None,
        _ => return Err("--tls-cert and --tls-key go together: give both or neither".into()),
    };
    let config = DemoConfig {
        name: cli.name,
        sessions: match cli.sessions {
            SessionMode::Local => Sessions::Local,
            SessionMode::Store => Sessions::Store(cli.session_server),
            SessionMode::Proxy => Sessions::Proxy(cli.session_server),
        },
        fallback,
        cookie_keys: cli.cookie_keys,
        encryption: if cli.encrypt_cookies {
            Encryption::Aes256Gcm
        } else {
            Encryption::None
        },
        secure_cookies: !cli.insecure_cookies,
        namespace: cli.namespace,
        auth_token: cli.auth_token,
        session_tls,
        listener_tls,
        snapshot_max_age: cli
            .snapshot_max_age
            .unwrap_or(session_client::cookie::DEFAULT_SNAPSHOT_MAX_AGE),
        outage_grace: cli.outage_grace.unwrap_or(demo::DEFAULT_OUTAGE_GRACE),
        session_header: cli.session_header,
    };
    match config.session_client_config() {
        Some(client_config) => client_config.validate().map_err(|e| e.to_string())?,
        None if config.session_tls.is_some() => {
            return Err(
                "--session-server-ca and --session-client-cert/--session-client-key are for \
                 --session-server; --sessions local has no session server"
                    .into(),
            );
        }
        None => {}
    }
    Ok(config)
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
    let listen = cli.listen;
    let config = match demo_config(cli) {
        Ok(config) => config,
        Err(reason) => {
            eprintln!("demo-app: {reason}");
            return ExitCode::from(2);
        }
    };
    let listener = match tokio::net::TcpListener::bind(listen).await {
        Ok(listener) => listener,
        Err(error) => {
            eprintln!("demo-app: cannot listen on {listen}: {error}");
            return ExitCode::FAILURE;
        }
    };
    // The address-reporting contract: one line on stdout once bound, so that a caller who
    // passed port 0 learns the port.
    match listener.local_addr() {
        Ok(addr) => {
            if let Err(error) = report_listening("http", addr) {
                eprintln!("demo-app: cannot report the listening address: {error}");
                return ExitCode::FAILURE;
            }
        }
        Err(error) => {
            eprintln!("demo-app: cannot read the bound address: {error}");
            return ExitCode::FAILURE;
        }
    }
    let shutdown = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    match demo::run(listener, &config, shutdown).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(%error, "demo-app failed");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::path::Path;
    use std::sync::Arc;
    use std::time::Duration;

    use base64::Engine as _;
    use clap::Parser as _;
    use session_client::{ClientConfig, ClientTls, SessionClient};
    use session_proto::v1::session_store_server::SessionStoreServer;
    use session_server::config::Settings;
    use session_server::metrics::Metrics;
    use session_server::service::{Limits, SessionService};
    use session_server::store::memory::MemoryStore;
    use test_pki::{Ca, PemDir};
    use tokio::net::TcpListener;
    use tokio::sync::watch;
    use tonic::transport::server::TcpIncoming;
    use tonic::transport::{Certificate, Identity, ServerTlsConfig};

    use super::{Cli, demo_config, parse_duration, parse_key};

    /// Bound on any wait: generous, a passing test never waits it out.
    const PATIENCE: Duration = Duration::from_secs(30);

    #[test]
    fn keys_parse_as_hex_or_base64_and_must_be_long_enough() {
        assert_eq!(parse_key(&"ab".repeat(32)).unwrap(), vec![0xab; 32]);
        let b64 = base64::engine::general_purpose::STANDARD.encode([7u8; 40]);
        assert_eq!(parse_key(&b64).unwrap(), vec![7u8; 40]);
        assert!(parse_key("abcd").is_err());
        assert!(parse_key("not a key at all!").is_err());
    }

    #[test]
    fn namespace_and_session_server_default_to_the_session_servers_own() {
        let config = demo_config(cli(&["--sessions", "proxy"])).expect("defaults");
        assert_eq!(config.namespace, demo::DEFAULT_NAMESPACE);
        assert_eq!(config.namespace, session_server::service::DEFAULT_NAMESPACE);
        assert_eq!(
            cli(&["--sessions", "proxy"]).session_server,
            format!("http://{}", session_server::config::DEFAULT_LISTEN)
        );
    }

    #[test]
    fn snapshot_max_age_and_outage_grace_default_and_parse_as_durations() {
        let config = demo_config(cli(&["--sessions", "local"])).expect("defaults");
        assert_eq!(config.snapshot_max_age, Duration::from_secs(3600));
        assert_eq!(config.outage_grace, Duration::from_secs(5));
        let config = demo_config(cli(&[
            "--sessions",
            "proxy",
            "--snapshot-max-age",
            "2m",
            "--outage-grace",
            "750ms",
        ]))
        .expect("durations");
        assert_eq!(config.snapshot_max_age, Duration::from_secs(120));
        assert_eq!(config.outage_grace, Duration::from_millis(750));
        assert!(parse_duration("0s").unwrap_err().contains("above zero"));
        assert!(parse_duration("soon").unwrap_err().contains("bad duration"));
        for flag in ["--snapshot-max-age", "--outage-grace"] {
            let error = Cli::try_parse_from(["demo-app", flag, "0s"]).expect_err(flag);
            assert_eq!(error.exit_code(), 2, "{error}");
        }
    }

    /// TLS settings of a server for 127.0.0.1 with a certificate of `ca`, requiring client
    /// certificates of `ca` when `mtls`.
    fn server_tls(ca: &Ca, mtls: bool) -> ServerTlsConfig {
        let leaf = ca.server(&["127.0.0.1"]);
        let tls = ServerTlsConfig::new().identity(Identity::from_pem(leaf.cert, leaf.key));
        if mtls {
            tls.client_ca_root(Certificate::from_pem(ca.cert_pem()))
        } else {
            tls
        }
    }

    /// A TLS session server (memory store) on `127.0.0.1:0`, serving until the test's runtime
    /// ends; its address.
    async fn tls_session_server(tls: ServerTlsConfig) -> SocketAddr {
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
        let builder = tonic::transport::Server::builder()
            .tls_config(tls)
            .expect("server TLS settings");
        tokio::spawn(async move {
            let _watch_stop = watch_stop;
            let mut builder = builder;
            builder
                .add_service(SessionStoreServer::new(service))
                .serve_with_incoming(TcpIncoming::from(listener))
                .await
                .expect("TLS session server failed");
        });
        addr
    }

    /// The flags `args` after `demo-app`.
    fn cli(args: &[&str]) -> Cli {
        Cli::try_parse_from(std::iter::once("demo-app").chain(args.iter().copied()))
            .expect("flags parse")
    }

    /// A path as a flag value.
    fn arg(path: &Path) -> &str {
        path.to_str().expect("UTF-8 temporary path")
    }

    #[tokio::test]
    async fn session_server_ca_with_an_https_url_keeps_sessions_in_a_tls_session_server() {
        let (pki, dir) = (Ca::new("session-ca"), PemDir::new("demo-session-ca"));
        let ca = dir.write_ca(&pki);
        let (cert, key) = dir.write_leaf(&pki.client("demo.test"), "client");
        for mtls in [false, true] {
            let addr = tls_session_server(server_tls(&pki, mtls)).await;
            let url = format!("https://{addr}");
            let mut args = vec![
                "--session-server",
                &url,
                "--session-server-ca",
                arg(&ca),
                "--insecure-cookies",
            ];
            if mtls {
                args.extend(["--session-client-cert", arg(&cert)]);
                args.extend(["--session-client-key", arg(&key)]);
            }
            let config = demo_config(cli(&args)).expect("TLS flags accepted");
            let tls = config.session_tls.clone().expect("TLS settings read");
            assert_eq!(tls.identity.is_some(), mtls);

            let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
            let app = format!("http://{}", listener.local_addr().expect("address"));
            let serving = config.clone();
            tokio::spawn(
                async move { demo::run(listener, &serving, std::future::pending()).await },
            );
            let http = reqwest::Client::builder()
                .cookie_store(true)
                .timeout(PATIENCE)
                .build()
                .expect("HTTP client");
            let login = http
                .post(format!("{app}/login"))
                .form(&[("user", "alice")])
                .send()
                .await
                .expect("login answered");
            assert_eq!(login.status(), reqwest::StatusCode::OK, "mTLS: {mtls}");
            let me: serde_json::Value = http
                .get(format!("{app}/me"))
                .send()
                .await
                .expect("/me answered")
                .json()
                .await
                .expect("JSON");
            assert_eq!(me["user"], "alice", "mTLS: {mtls}");

            // The session is in the TLS session server, in the demo's namespace.
            let mut direct = ClientConfig::new(url.clone());
            direct.namespace = demo::DEFAULT_NAMESPACE.into();
            direct.tls = Some(tls);
            direct.timeout = PATIENCE;
            let direct = SessionClient::connect_lazy(direct).expect("client");
            let sessions = direct.list_by_user("alice").await.expect("list over TLS");
            assert_eq!(sessions.len(), 1, "mTLS: {mtls}");
        }
    }

    #[test]
    fn a_client_certificate_without_its_key_is_refused_with_exit_status_2() {
        for args in [
            ["--session-client-cert", "/tmp/c.pem"],
            ["--session-client-key", "/tmp/c.key"],
        ] {
            let error = Cli::try_parse_from(std::iter::once("demo-app").chain(args))
                .expect_err("one half of an identity");
            assert_eq!(error.exit_code(), 2, "{error}");
        }
    }

    #[test]
    fn tls_settings_that_do_not_fit_are_refused_naming_the_reason() {
        let dir = PemDir::new("demo-refusals");
        let ca = dir.write_ca(&Ca::new("refusals"));
        let missing = dir.file("missing.pem");
        let refused = |args: &[&str]| match demo_config(cli(args)) {
            Ok(config) => panic!("accepted: {config:?}"),
            Err(reason) => reason,
        };
        let m = refused(&[
            "--session-server",
            "http://127.0.0.1:50051",
            "--session-server-ca",
            arg(&ca),
        ]);
        assert!(m.contains("https://"), "{m}");
        let m = refused(&[
            "--session-server",
            "https://127.0.0.1:50051",
            "--session-server-ca",
            arg(&missing),
        ]);
        assert!(m.contains(arg(&missing)), "{m}");
        let m = refused(&["--sessions", "local", "--session-server-ca", arg(&ca)]);
        assert!(m.contains("local"), "{m}");
        let m = refused(&["--session-server", "ftp://127.0.0.1:50051"]);
        assert!(m.contains("https://") && m.contains("http://"), "{m}");
        let plain = demo_config(cli(&[
            "--session-server",
            "https://sessions.internal:50051",
        ]))
        .expect("https:// without a CA: the system's roots");
        assert_eq!(plain.session_tls, None::<ClientTls>);
    }
}
