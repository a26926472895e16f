//! README: "an `https://` session-server URL always means TLS". Checked against real servers:
//! the session server's service over a memory store, served by tonic with rustls (a CA, server
//! and client certificates made here with test-pki), a plaintext one, and a raw TCP listener that
//! records the first bytes a client sends. An `https://` client with the CA works; one trusting
//! only the system's roots, or facing a certificate for another name, fails and reaches
//! nothing; an mTLS server takes a client with its identity and refuses one without; an
//! `https://` URL sends a TLS ClientHello, never the cleartext HTTP/2 preface; TLS settings
//! with an `http://` URL, and schemes other than http/https, are refused.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use session_client::{
    ClientConfig, ClientError, ClientIdentity, ClientTls, SessionClient, SessionData,
};
use session_proto::v1::session_store_server::SessionStoreServer;
use session_server::config::Settings;
use session_server::metrics::Metrics;
use session_server::service::{Limits, SessionService};
use session_server::store::memory::MemoryStore;
use test_pki::{Ca, PemDir};
use tokio::io::AsyncReadExt as _;
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Certificate, Identity, ServerTlsConfig};

/// Bound on anything a test waits for: generous, a passing test never waits it out.
const PATIENCE: Duration = Duration::from_secs(30);
/// The HTTP/2 connection preface: what a cleartext gRPC client sends first.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// A client identity (certificate and key, PEM) signed by `ca`.
fn client_identity(ca: &Ca) -> ClientIdentity {
    let leaf = ca.client("stickless test client");
    ClientIdentity {
        cert_pem: leaf.cert.into_bytes(),
        key_pem: leaf.key.into_bytes(),
    }
}

/// A session server (memory store) on `127.0.0.1:0`, over TLS when given one; stopped on drop.
struct TestServer {
    /// Where it listens.
    addr: SocketAddr,
    /// Fires the shutdown.
    stop: Option<oneshot::Sender<()>>,
    /// Ends Watch streams at shutdown (kept alive while the server runs).
    _watch_stop: watch::Sender<bool>,
    /// The serving task.
    task: JoinHandle<()>,
}

impl TestServer {
    /// Serves the session service with `tls` (cleartext when `None`).
    async fn start(tls: Option<ServerTlsConfig>) -> TestServer {
        let settings = Settings::default();
        let store = Arc::new(MemoryStore::new(settings.max_session_bytes));
        let limits = Limits {
            default_ttl: settings.default_ttl,
            max_ttl: settings.max_ttl,
            max_session_bytes: settings.max_session_bytes,
        };
        let (watch_stop, watch_rx) = watch::channel(false);
        let service = SessionService::new(store, limits, Metrics::new(), watch_rx);
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("local address");
        let mut builder = tonic::transport::Server::builder();
        if let Some(tls) = tls {
            builder = builder.tls_config(tls).expect("server TLS settings");
        }
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            builder
                .add_service(SessionStoreServer::new(service))
                .serve_with_incoming_shutdown(TcpIncoming::from(listener), async {
                    let _ = stopped.await;
                })
                .await
                .expect("test server failed");
        });
        TestServer {
            addr,
            stop: Some(stop),
            _watch_stop: watch_stop,
            task,
        }
    }

    /// A TLS server with a certificate from `pki` for 127.0.0.1 and localhost, requiring
    /// client certificates signed by `client_ca` when given (mTLS).
    async fn tls(pki: &Ca, client_ca: Option<&Ca>) -> TestServer {
        let leaf = pki.localhost_server();
        let mut tls = ServerTlsConfig::new().identity(Identity::from_pem(leaf.cert, leaf.key));
        if let Some(client_ca) = client_ca {
            tls = tls.client_ca_root(Certificate::from_pem(client_ca.cert_pem()));
        }
        TestServer::start(Some(tls)).await
    }

    /// `https://127.0.0.1:port`.
    fn https(&self) -> String {
        format!("https://{}", self.addr)
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.task.abort();
    }
}

/// A client of `url` with `tls`, generous timeouts (a loaded machine must not turn a slow
/// handshake into a failure) and no retries (every call is one attempt).
fn client(url: &str, tls: Option<ClientTls>) -> SessionClient {
    SessionClient::connect_lazy(config(url, tls)).expect("client settings accepted")
}

/// The settings of [`client`].
fn config(url: &str, tls: Option<ClientTls>) -> ClientConfig {
    let mut config = ClientConfig::new(url);
    config.tls = tls;
    config.namespace = "tls".to_owned();
    config.timeout = Duration::from_secs(20);
    config.connect_timeout = Duration::from_secs(10);
    config.retries = 0;
    config
}

/// Trusts `pki`'s CA only.
fn trusting(pki: &Ca) -> ClientTls {
    ClientTls {
        ca_pem: Some(pki.cert_pem().as_bytes().to_vec()),
        identity: None,
    }
}

/// Creates a session of `user` through `client`.
async fn create(client: &SessionClient, user: &str) -> Result<SessionData, ClientError> {
    tokio::time::timeout(PATIENCE, client.create(user, Default::default(), None))
        .await
        .expect("the call ends within its own timeouts")
}

/// Asserts that a call that should not have reached the service did not: `user` has no
/// session there (asked through `good`, a client that does reach it).
async fn nothing_reached(good: &SessionClient, user: &str) {
    let listed = good
        .list_by_user(user)
        .await
        .expect("the good client works");
    assert!(listed.is_empty(), "a refused client created {listed:?}");
}

#[tokio::test]
async fn https_with_the_ca_bundle_reaches_a_tls_server() {
    let pki = Ca::new("stickless test CA");
    let server = TestServer::tls(&pki, None).await;
    let client = client(&server.https(), Some(trusting(&pki)));
    let created = create(&client, "alice").await.expect("create over TLS");
    let got = client.get(&created.id, false).await.expect("get over TLS");
    assert_eq!(got.user_id, "alice");
    assert_eq!(got.id, created.id);
}

#[tokio::test]
async fn https_without_a_ca_bundle_trusts_only_the_system_roots_and_fails() {
    let pki = Ca::new("private CA unknown to the system");
    let server = TestServer::tls(&pki, None).await;
    let good = client(&server.https(), Some(trusting(&pki)));
    match SessionClient::connect_lazy(config(&server.https(), None)) {
        Ok(system_roots) => {
            let error = create(&system_roots, "mallory")
                .await
                .expect_err("a private CA's certificate is not trusted by the system roots");
            assert!(error.is_unavailable(), "{error:?}");
            assert!(error.to_string().contains("certificate"), "{error}");
        }
        // A machine without any system roots: refused up front, and said so.
        Err(error) => assert!(error.to_string().contains("system's roots"), "{error}"),
    }
    nothing_reached(&good, "mallory").await;
}

#[tokio::test]
async fn a_server_certificate_for_another_name_is_refused() {
    let pki = Ca::new("stickless test CA");
    let leaf = pki.server(&["sessions.elsewhere.test"]);
    let tls = ServerTlsConfig::new().identity(Identity::from_pem(leaf.cert, leaf.key));
    let server = TestServer::start(Some(tls)).await;
    let error = create(&client(&server.https(), Some(trusting(&pki))), "mallory")
        .await
        .expect_err("the certificate does not name 127.0.0.1");
    assert!(error.is_unavailable(), "{error:?}");
    assert!(error.to_string().contains("certificate"), "{error}");
}

#[tokio::test]
async fn mtls_server_takes_a_client_with_its_identity_and_refuses_one_without() {
    let pki = Ca::new("stickless test CA");
    let server = TestServer::tls(&pki, Some(&pki)).await;
    let with_identity = ClientTls {
        identity: Some(client_identity(&pki)),
        ..trusting(&pki)
    };
    let good = client(&server.https(), Some(with_identity));
    let created = create(&good, "alice").await.expect("mTLS with identity");
    assert_eq!(created.user_id, "alice");

    let anonymous = client(&server.https(), Some(trusting(&pki)));
    let error = create(&anonymous, "mallory")
        .await
        .expect_err("no client certificate");
    assert!(error.is_unavailable(), "{error:?}");

    let stranger = Ca::new("another CA");
    let foreign = ClientTls {
        identity: Some(client_identity(&stranger)),
        ..trusting(&pki)
    };
    let error = create(&client(&server.https(), Some(foreign)), "mallory")
        .await
        .expect_err("a client certificate from another CA");
    assert!(error.is_unavailable(), "{error:?}");
    nothing_reached(&good, "mallory").await;
}

/// Listens on `127.0.0.1:0`; the first connection's first bytes (up to `H2_PREFACE`'s length,
/// or what came before the client gave up) are sent back, then the connection is dropped.
async fn first_bytes_recorder() -> (SocketAddr, oneshot::Receiver<Vec<u8>>) {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind 127.0.0.1:0");
    let addr = listener.local_addr().expect("local address");
    let (tx, rx) = oneshot::channel();
    tokio::spawn(async move {
        let Ok((mut socket, _)) = listener.accept().await else {
            return;
        };
        let mut seen = Vec::new();
        let mut buffer = [0u8; 512];
        while seen.len() < H2_PREFACE.len() {
            match tokio::time::timeout(PATIENCE, socket.read(&mut buffer)).await {
                Ok(Ok(n)) if n > 0 => seen.extend_from_slice(&buffer[..n]),
                _ => break,
            }
        }
        let _ = tx.send(seen);
    });
    (addr, rx)
}

/// The first bytes a client of `url` sends to a listener that never answers.
async fn first_bytes_sent(scheme: &str, tls: Option<ClientTls>) -> Vec<u8> {
    let (addr, recorded) = first_bytes_recorder().await;
    let client = client(&format!("{scheme}://{addr}"), tls);
    let (result, seen) = tokio::join!(create(&client, "alice"), async {
        tokio::time::timeout(PATIENCE, recorded)
            .await
            .expect("the client connects")
            .expect("the recorder reports")
    });
    assert!(result.is_err(), "nothing answered, yet: {result:?}");
    seen
}

#[tokio::test]
async fn https_url_sends_a_tls_client_hello_never_the_http2_preface() {
    let pki = Ca::new("stickless test CA");
    for tls in [None, Some(trusting(&pki))] {
        let seen = first_bytes_sent("https", tls).await;
        assert!(
            seen.len() >= 3 && seen[0] == 0x16 && seen[1] == 0x03,
            "a TLS handshake record comes first, got {:02x?}",
            &seen[..seen.len().min(16)]
        );
        assert!(
            !seen.windows(4).any(|w| w == b"PRI "),
            "no cleartext HTTP/2 in {seen:02x?}"
        );
    }
    // The recorder does see cleartext when that is what a client sends: http:// is cleartext.
    let seen = first_bytes_sent("http", None).await;
    assert!(seen.starts_with(H2_PREFACE), "{seen:02x?}");
}

#[tokio::test]
async fn https_url_against_a_plaintext_server_fails_and_reaches_nothing() {
    let server = TestServer::start(None).await;
    let pki = Ca::new("stickless test CA");
    let error = create(&client(&server.https(), Some(trusting(&pki))), "mallory")
        .await
        .expect_err("a plaintext server cannot complete a TLS handshake");
    assert!(error.is_unavailable(), "{error:?}");
    let cleartext = client(&format!("http://{}", server.addr), None);
    nothing_reached(&cleartext, "mallory").await;
}

#[tokio::test]
async fn tls_settings_with_an_http_url_are_refused() {
    let pki = Ca::new("stickless test CA");
    for tls in [
        trusting(&pki),
        ClientTls::default(),
        ClientTls {
            ca_pem: None,
            identity: Some(client_identity(&pki)),
        },
    ] {
        let error = SessionClient::connect_lazy(config("http://127.0.0.1:50051", Some(tls)))
            .expect_err("TLS settings with a cleartext URL");
        assert!(
            matches!(&error, ClientError::Config(m) if m.contains("https://")),
            "{error:?}"
        );
    }
}

#[tokio::test]
async fn schemes_other_than_http_and_https_are_refused() {
    for url in [
        "ftp://127.0.0.1:50051",
        "grpc://127.0.0.1:50051",
        "127.0.0.1:50051",
        "unix:/tmp/sessions.sock",
        "https://",
    ] {
        let error = SessionClient::connect_lazy(ClientConfig::new(url))
            .expect_err("not an http(s) URL with a host");
        assert!(matches!(error, ClientError::Config(_)), "{url}: {error:?}");
        assert!(ClientConfig::new(url).validate().is_err(), "{url}");
    }
    for url in ["http://127.0.0.1:50051", "https://sessions.internal:50051"] {
        ClientConfig::new(url).validate().expect(url);
    }
}

/// The configuration error `from_files` gives.
fn from_files_error(ca: Option<&Path>, cert: Option<&Path>, key: Option<&Path>) -> String {
    match ClientTls::from_files(ca, cert, key) {
        Ok(tls) => panic!("accepted: {tls:?}"),
        Err(ClientError::Config(message)) => message,
        Err(other) => panic!("not a configuration error: {other:?}"),
    }
}

#[tokio::test]
async fn tls_files_are_read_and_bad_ones_are_refused_naming_the_file() {
    let pki = Ca::new("stickless test CA");
    let identity = client_identity(&pki);
    let dir = PemDir::new("client-tls");
    let ca = dir.write_ca(&pki);
    let cert = dir.write("client.pem", &identity.cert_pem);
    let key = dir.write("client.key", &identity.key_pem);
    let garbage = dir.write("garbage.pem", "not a certificate\n");
    let missing = dir.file("missing.pem");

    assert_eq!(ClientTls::from_files(None, None, None).unwrap(), None);
    let read = ClientTls::from_files(Some(&ca), Some(&cert), Some(&key))
        .unwrap()
        .expect("settings");
    assert_eq!(read.ca_pem.as_deref(), Some(pki.cert_pem().as_bytes()));
    assert_eq!(read.identity.as_ref(), Some(&identity));
    let shown = format!("{read:?}");
    assert!(
        !shown.contains("PRIVATE KEY") && shown.contains("hidden"),
        "the key is never printed: {shown}"
    );
    let only_ca = ClientTls::from_files(Some(&ca), None, None)
        .unwrap()
        .unwrap();
    assert_eq!(only_ca.identity, None);

    let m = from_files_error(Some(&missing), None, None);
    assert!(
        m.contains("CA bundle") && m.contains(&*missing.to_string_lossy()),
        "{m}"
    );
    let m = from_files_error(Some(&garbage), None, None);
    assert!(
        m.contains(&*garbage.to_string_lossy()) && m.contains("no PEM certificate"),
        "{m}"
    );
    let m = from_files_error(Some(&ca), Some(&garbage), Some(&key));
    assert!(
        m.contains("client certificate") && m.contains(&*garbage.to_string_lossy()),
        "{m}"
    );
    let m = from_files_error(Some(&ca), Some(&cert), Some(&cert));
    assert!(
        m.contains("client key") && m.contains(&*cert.to_string_lossy()),
        "a certificate is no key: {m}"
    );
    let m = from_files_error(None, Some(&cert), None);
    assert!(m.contains("without its key"), "{m}");
    let m = from_files_error(None, None, Some(&key));
    assert!(m.contains("without its certificate"), "{m}");

    // A key that is not the certificate's: refused before any connection.
    let other = client_identity(&pki);
    let mismatched = ClientTls {
        ca_pem: None,
        identity: Some(ClientIdentity {
            cert_pem: identity.cert_pem.clone(),
            key_pem: other.key_pem,
        }),
    };
    let error = config("https://127.0.0.1:1", Some(mismatched))
        .validate()
        .expect_err("a client key that does not fit its certificate");
    assert!(
        matches!(&error, ClientError::Config(m) if m.contains("client certificate") && m.contains("Key")),
        "{error:?}"
    );

    // The same checks hold for PEM given as bytes.
    let bad = ClientTls {
        ca_pem: Some(b"not a certificate".to_vec()),
        identity: None,
    };
    let error = SessionClient::connect_lazy(config("https://127.0.0.1:1", Some(bad)))
        .expect_err("a CA bundle without a certificate");
    assert!(error.to_string().contains("CA bundle"), "{error}");
}
