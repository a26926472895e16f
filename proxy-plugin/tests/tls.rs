//! README (Security): `session-proxy --tls-cert PATH --tls-key PATH` serves HTTPS on
//! `--listen` (ALPN `h2` and `http/1.1`), tells backends `X-Forwarded-Proto: https` and
//! `Forwarded: …proto=https`, makes the cookies it sets `Secure`, re-reads its certificate on
//! SIGHUP, and dials `https://` backends over TLS only (`--backend-ca PATH`, the system's roots
//! otherwise), their certificates verified for the URL's host.
//!
//! The `session-proxy` binary as an operator runs it (port 0, flags, SIGHUP), clients and a TLS
//! backend made here with tokio-rustls and hyper, certificates made here with test-pki; the cookie
//! tests run the proxy in-process, one plain and one TLS listener side by side.

mod support;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Parser as _;
use http::{HeaderMap, Request, Response, StatusCode, Version};
use http_body_util::{BodyExt as _, Empty, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use parking_lot::Mutex;
use proxy_plugin::balance::{BalanceMode, StickyConfig};
use proxy_plugin::config::{Cli, LookupFailure, TlsConfig, resolve};
use proxy_plugin::proxy::Proxy;
use proxy_plugin::tls::ListenerTls;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, ServerName};
use support::backend::{Behaviour, TestBackend};
use support::eventually;
use support::lookup::{NAMESPACE, lookup_config};
use support::proxy::{client as http_client, config as proxy_config};
use support::proxy_process::{ProxyProcess, RUN_WITHIN, command, run_bounded};
use support::session::TestSessionServer;
use test_pki::{Ca, Leaf, PemDir, Usage};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_rustls::client::TlsStream;

/// Bound on anything a test waits for: generous, a passing test never waits it out.
const PATIENCE: Duration = Duration::from_secs(30);
/// The name clients use for the proxy (its certificate is for it and for 127.0.0.1).
const PROXY_NAME: &str = "localhost";
/// ALPN's name of HTTP/1.1.
const H1: &[u8] = b"http/1.1";
/// ALPN's name of HTTP/2.
const H2: &[u8] = b"h2";
/// Snapshot cookie key material of the lookup plugin in the cookie test.
const SNAPSHOT_KEY: [u8; 32] = [42; 32];

/// A test CA (test-pki) and a directory of its own for its files, removed on drop.
struct Pki {
    /// The CA.
    ca: Ca,
    /// Where its files go.
    dir: PemDir,
}

impl Pki {
    fn new(label: &str) -> Pki {
        let dir = PemDir::new(&format!("proxy-https-{label}"));
        Pki {
            ca: Ca::new(label),
            dir,
        }
    }

    /// A server certificate for `names`, its subject's common name `label`.
    fn server(&self, names: &[&str], label: &str) -> Leaf {
        self.ca.leaf(label, names, Usage::Server)
    }

    /// The proxy's certificate (for `localhost` and 127.0.0.1), written to `proxy.pem` and
    /// `proxy.key`.
    fn proxy_files(&self, label: &str) -> (Leaf, TlsConfig) {
        let leaf = self.server(&[PROXY_NAME, "127.0.0.1"], label);
        let (cert, key) = self.dir.write_leaf(&leaf, "proxy");
        (leaf, TlsConfig { cert, key })
    }
}

/// A path as a flag value.
fn arg(path: &Path) -> &str {
    path.to_str().expect("UTF-8 temporary path")
}

/// A TLS connection to `addr` trusting only `ca`, for [`PROXY_NAME`], offering `alpn`.
async fn tls_connect(addr: SocketAddr, ca: &Ca, alpn: &[&[u8]]) -> TlsStream<TcpStream> {
    let mut config = ca.rustls_client_config();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let tcp = TcpStream::connect(addr)
        .await
        .expect("connect to the proxy");
    let name = ServerName::try_from(PROXY_NAME).expect("server name");
    tokio::time::timeout(
        PATIENCE,
        tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name, tcp),
    )
    .await
    .expect("handshake within the deadline")
    .expect("TLS handshake with the proxy")
}

/// The certificate the server presented on `stream`, DER.
fn peer_certificate(stream: &TlsStream<TcpStream>) -> Vec<u8> {
    stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|chain| chain.first())
        .expect("a server certificate")
        .to_vec()
}

/// A response, read whole.
struct Answer {
    /// Status.
    status: StatusCode,
    /// HTTP version.
    version: Version,
    /// Headers.
    headers: HeaderMap,
    /// Body.
    body: String,
}

impl Answer {
    async fn read(response: Response<Incoming>) -> Answer {
        let (parts, body) = response.into_parts();
        let body = body.collect().await.expect("response body").to_bytes();
        Answer {
            status: parts.status,
            version: parts.version,
            headers: parts.headers,
            body: String::from_utf8_lossy(&body).into_owned(),
        }
    }

    /// Every `Set-Cookie` line.
    fn set_cookies(&self) -> Vec<String> {
        self.headers
            .get_all("set-cookie")
            .iter()
            .map(|v| v.to_str().expect("ascii cookie").to_owned())
            .collect()
    }
}

/// An HTTPS client connection to the proxy: HTTP/1.1 or HTTP/2 as ALPN decided.
struct Https {
    /// Sends requests on the connection (its I/O runs in a task of its own).
    sender: Sender,
    /// The protocol ALPN chose, if any.
    alpn: Option<Vec<u8>>,
    /// The certificate the proxy presented.
    certificate: Vec<u8>,
}

/// hyper's request handle, by protocol.
enum Sender {
    /// HTTP/1.1.
    H1(hyper::client::conn::http1::SendRequest<Empty<Bytes>>),
    /// HTTP/2.
    H2(hyper::client::conn::http2::SendRequest<Empty<Bytes>>),
}

impl Https {
    /// Connects offering `alpn`; speaks HTTP/2 when the proxy chose `h2`.
    async fn connect(addr: SocketAddr, ca: &Ca, alpn: &[&[u8]]) -> Https {
        let stream = tls_connect(addr, ca, alpn).await;
        let chosen = stream.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
        let certificate = peer_certificate(&stream);
        let io = TokioIo::new(stream);
        let sender = if chosen.as_deref() == Some(b"h2") {
            let (sender, connection) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                    .await
                    .expect("HTTP/2 handshake");
            tokio::spawn(connection);
            Sender::H2(sender)
        } else {
            let (sender, connection) = hyper::client::conn::http1::handshake(io)
                .await
                .expect("HTTP/1.1 handshake");
            tokio::spawn(connection);
            Sender::H1(sender)
        };
        Https {
            sender,
            alpn: chosen,
            certificate,
        }
    }

    /// `GET path` with `headers`.
    async fn get(&mut self, path: &str, headers: &[(&str, &str)]) -> Answer {
        let mut request = match self.sender {
            Sender::H1(_) => Request::get(path).header("host", PROXY_NAME),
            Sender::H2(_) => Request::get(format!("https://{PROXY_NAME}{path}")),
        };
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let request = request.body(Empty::new()).expect("request");
        let response = match &mut self.sender {
            Sender::H1(sender) => {
                tokio::time::timeout(PATIENCE, sender.send_request(request)).await
            }
            Sender::H2(sender) => {
                tokio::time::timeout(PATIENCE, sender.send_request(request)).await
            }
        };
        let response = response
            .expect("an answer within the deadline")
            .expect("the proxy answers");
        Answer::read(response).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_listener_serves_http1_and_h2_and_tells_backends_https() {
    let pki = Pki::new("serve");
    let (_, files) = pki.proxy_files("proxy");
    let backend = TestBackend::start("alpha", Behaviour::Echo).await;
    let proxy = ProxyProcess::start(&[
        "--backend",
        &format!("http://{},name=alpha", backend.addr),
        "--tls-cert",
        arg(&files.cert),
        "--tls-key",
        arg(&files.key),
    ]);
    let ca = &pki.ca;

    let cases = [
        (vec![H1], Some(H1), Version::HTTP_11),
        (vec![H2, H1], Some(H2), Version::HTTP_2),
        // A client without ALPN gets HTTP/1.1.
        (vec![], None, Version::HTTP_11),
    ];
    for (offered, chosen, version) in cases {
        let mut client = Https::connect(proxy.addr, ca, &offered).await;
        assert_eq!(client.alpn.as_deref(), chosen, "ALPN for {offered:?}");
        let path = format!("/over-{version:?}");
        let answer = client.get(&path, &[("x-forwarded-proto", "http")]).await;
        assert_eq!(answer.status, StatusCode::OK, "{}", proxy.logs());
        assert_eq!(answer.version, version);
        assert_eq!(answer.body, "alpha");
        let seen = backend.last().expect("the backend got the request");
        assert_eq!(seen.target, path);
        assert_eq!(
            seen.headers["x-forwarded-proto"], "https",
            "whatever the client claimed"
        );
        let forwarded = seen.headers["forwarded"].to_str().expect("ascii");
        assert!(forwarded.contains(";proto=https"), "{forwarded}");
        assert!(forwarded.contains("host=localhost"), "{forwarded}");
    }

    // Plaintext HTTP on the HTTPS port gets no HTTP answer: a TLS alert at most, then the end.
    let hits = backend.hits();
    let mut plain = TcpStream::connect(proxy.addr).await.expect("connect");
    plain
        .write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .expect("write");
    let mut reply = Vec::new();
    let read = tokio::time::timeout(PATIENCE, plain.read_to_end(&mut reply)).await;
    assert!(read.is_ok(), "the proxy closes the connection");
    let text = String::from_utf8_lossy(&reply);
    assert!(
        !text.contains("HTTP/"),
        "an HTTP answer in cleartext: {text:?}"
    );
    assert_eq!(backend.hits(), hits, "nothing reached the backend");
    proxy.terminate().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_clients_hold_up_nobody_and_are_dropped_after_the_header_read_timeout() {
    // More than 1024 (a cap on pending handshakes once locked every TLS client out), fewer than
    // `--max-connections`, the only bound. The test and the proxy (which inherits the limit)
    // each hold one descriptor per silent client, plus their own.
    const SILENT: usize = 1100;
    let limit = open_files_soft_limit();
    assert!(
        limit >= SILENT as u64 + 512,
        "this test holds {SILENT} sockets (and so does the proxy), but the soft limit on open \
         files is {limit}: raise it (`ulimit -n 4096`) to run it"
    );
    // Above the 10 s the handshake timeout once was, so that only the flag can explain it.
    const TIMEOUT: Duration = Duration::from_secs(12);
    let pki = Pki::new("silent");
    let (_, files) = pki.proxy_files("proxy");
    let backend = TestBackend::start("alpha", Behaviour::Echo).await;
    let proxy = ProxyProcess::start(&[
        "--backend",
        &format!("http://{},name=alpha", backend.addr),
        "--tls-cert",
        arg(&files.cert),
        "--tls-key",
        arg(&files.key),
        "--header-read-timeout",
        "12s",
        "--max-connections",
        "2000",
    ]);
    // Before the first connect: every handshake timer starts later, at the proxy's accept.
    let connected = Instant::now();
    let mut silent = Vec::with_capacity(SILENT);
    for _ in 0..SILENT {
        silent.push(TcpStream::connect(proxy.addr).await.expect("connect"));
    }
    // Meanwhile another client's handshake and request go through.
    let mut client = Https::connect(proxy.addr, &pki.ca, &[H1]).await;
    assert_eq!(client.get("/", &[]).await.status, StatusCode::OK);
    for mut stream in silent {
        let mut reply = Vec::new();
        let read = tokio::time::timeout(TIMEOUT + PATIENCE, stream.read_to_end(&mut reply)).await;
        assert!(read.is_ok(), "a silent client is dropped: {}", proxy.logs());
    }
    assert!(
        connected.elapsed() >= TIMEOUT,
        "dropped before --header-read-timeout: {:?}",
        connected.elapsed()
    );
    proxy.terminate().await;
}

/// This process's soft limit on open files, from `/proc/self/limits` (`u64::MAX` when
/// unlimited or unknown: then nothing is checked).
fn open_files_soft_limit() -> u64 {
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap_or_default();
    limits
        .lines()
        .find(|line| line.starts_with("Max open files"))
        .and_then(|line| line.split_whitespace().nth(3))
        .and_then(|soft| soft.parse().ok())
        .unwrap_or(u64::MAX)
}

#[tokio::test]
async fn plain_serve_refuses_a_configuration_with_tls_files() {
    let pki = Pki::new("serve-plain");
    let (_, files) = pki.proxy_files("proxy");
    let backend = TestBackend::start("alpha", Behaviour::Echo).await;
    let mut config = proxy_config(&[&backend]);
    config.tls = Some(files);
    let proxy = Proxy::new(config).expect("proxy");
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let served = tokio::time::timeout(PATIENCE, proxy.serve(listener, std::future::pending()))
        .await
        .expect("refused at once, not served");
    let error = served.expect_err("a TLS configuration is not served in cleartext");
    assert_eq!(error.kind(), std::io::ErrorKind::InvalidInput, "{error}");
    assert!(error.to_string().contains("serve_tls"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxys_cookies_are_secure_over_tls_only() {
    let pki = Pki::new("cookies");
    let (_, files) = pki.proxy_files("proxy");
    let sessions = TestSessionServer::start().await;
    let session = sessions
        .client(NAMESPACE)
        .create("alice", HashMap::new(), None)
        .await
        .expect("create a session");
    let backend = TestBackend::start("echo", Behaviour::SessionEcho).await;
    let mut config = proxy_config(&[&backend]);
    config.balance = BalanceMode::StickyCookie(StickyConfig {
        cookie: "stickless_backend".into(),
        key: vec![7; 32],
    });
    config.lookup = Some(lookup_config(
        &sessions.url(),
        LookupFailure::Open,
        &[&SNAPSHOT_KEY],
    ));
    // One proxy, a plain and a TLS listener.
    let proxy = Proxy::new(config).expect("proxy");
    let plain = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let secure = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let (plain_addr, secure_addr) = (plain.local_addr().unwrap(), secure.local_addr().unwrap());
    let tls = ListenerTls::load(&files).expect("the proxy's certificate");
    let _plain = tokio::spawn(proxy.clone().serve(plain, std::future::pending()));
    let _secure = tokio::spawn(proxy.clone().serve_tls(secure, tls, std::future::pending()));
    let session_cookie = format!("sid={}", session.id);

    let response = http_client()
        .get(format!("http://{plain_addr}/"))
        .header("cookie", &session_cookie)
        .send()
        .await
        .expect("plain answer");
    assert_eq!(response.status(), StatusCode::OK);
    let plain_cookies: Vec<String> = response
        .headers()
        .get_all("set-cookie")
        .iter()
        .map(|v| v.to_str().unwrap().to_owned())
        .collect();

    let mut client = Https::connect(secure_addr, &pki.ca, &[H2]).await;
    let answer = client.get("/", &[("cookie", &session_cookie)]).await;
    assert_eq!(answer.status, StatusCode::OK);
    let secure_cookies = answer.set_cookies();

    for (cookies, secure) in [(&plain_cookies, false), (&secure_cookies, true)] {
        for name in ["stickless_backend=", "sid_snap="] {
            let line = cookies
                .iter()
                .find(|c| c.starts_with(name))
                .unwrap_or_else(|| panic!("{name} set: {cookies:?}"));
            assert!(line.contains("HttpOnly"), "{line}");
            assert_eq!(
                line.split(';').any(|a| a.trim() == "Secure"),
                secure,
                "{line}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_certificate_for_new_connections_only_and_keeps_it_on_bad_files() {
    let pki = Pki::new("reload");
    let (first, files) = pki.proxy_files("proxy one");
    let backend = TestBackend::start("alpha", Behaviour::Echo).await;
    let mut proxy = ProxyProcess::start(&[
        "--backend",
        &format!("http://{},name=alpha", backend.addr),
        "--tls-cert",
        arg(&files.cert),
        "--tls-key",
        arg(&files.key),
    ]);
    let ca = &pki.ca;
    let mut before = Https::connect(proxy.addr, ca, &[H1]).await;
    assert!(before.certificate == first.der, "the first certificate");
    assert_eq!(before.get("/one", &[]).await.status, StatusCode::OK);

    let (second, _) = pki.proxy_files("proxy two");
    proxy.signal("HUP");
    assert!(
        eventually(PATIENCE, || proxy
            .logs()
            .contains("TLS certificate reloaded"))
        .await,
        "{}",
        proxy.logs()
    );
    let after = Https::connect(proxy.addr, ca, &[H2]).await;
    assert!(
        after.certificate == second.der,
        "a new connection gets the new certificate"
    );
    assert_ne!(first.der, second.der);
    // The connection opened before carries on, with the session it had.
    let answer = before.get("/two", &[]).await;
    assert_eq!(
        (answer.status, answer.body.as_str()),
        (StatusCode::OK, "alpha")
    );

    // Files that make no certificate: refused, the second one kept.
    let refusals = |n: usize| {
        let proxy = &proxy;
        move || {
            proxy
                .logs()
                .matches("TLS certificate reload refused")
                .count()
                >= n
        }
    };
    pki.dir.write("proxy.pem", "not a certificate\n");
    proxy.signal("HUP");
    assert!(eventually(PATIENCE, refusals(1)).await, "{}", proxy.logs());
    // A certificate with another certificate's key.
    let third = pki.server(&[PROXY_NAME], "proxy three");
    pki.dir.write("proxy.pem", &third.cert);
    pki.dir.write("proxy.key", &first.key);
    proxy.signal("HUP");
    assert!(eventually(PATIENCE, refusals(2)).await, "{}", proxy.logs());
    let mut still = Https::connect(proxy.addr, ca, &[H1]).await;
    assert!(
        still.certificate == second.der,
        "the certificate in use is kept"
    );
    assert_eq!(still.get("/three", &[]).await.status, StatusCode::OK);
    assert!(
        proxy.is_running(),
        "a bad certificate never stops the proxy"
    );
    proxy.terminate().await;
}

/// A TLS backend: hyper over tokio-rustls, answering `secure <path>`; it counts the
/// connections that did not start with a TLS handshake (cleartext), the TLS handshakes begun,
/// and records the path of each request.
struct TlsBackend {
    /// Where it listens.
    addr: SocketAddr,
    /// Connections whose first byte was not a TLS handshake record.
    cleartext: Arc<AtomicUsize>,
    /// Connections that began a TLS handshake.
    handshakes: Arc<AtomicUsize>,
    /// Paths of the requests it answered.
    paths: Arc<Mutex<Vec<String>>>,
    /// The accept loop.
    task: JoinHandle<()>,
}

impl TlsBackend {
    async fn start(leaf: &Leaf) -> TlsBackend {
        let chain = vec![CertificateDer::from(leaf.der.clone())];
        let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(leaf.key.as_bytes())
            .expect("backend key");
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .expect("backend certificate");
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("address");
        let cleartext = Arc::new(AtomicUsize::new(0));
        let handshakes = Arc::new(AtomicUsize::new(0));
        let paths = Arc::new(Mutex::new(Vec::new()));
        let task = tokio::spawn({
            let (cleartext, handshakes, paths) =
                (cleartext.clone(), handshakes.clone(), paths.clone());
            async move {
                while let Ok((tcp, _)) = listener.accept().await {
                    let (acceptor, cleartext, handshakes, paths) = (
                        acceptor.clone(),
                        cleartext.clone(),
                        handshakes.clone(),
                        paths.clone(),
                    );
                    tokio::spawn(async move {
                        let mut first = [0u8; 1];
                        match tcp.peek(&mut first).await {
                            // 22: a TLS handshake record.
                            Ok(1) if first[0] == 22 => handshakes.fetch_add(1, Ordering::SeqCst),
                            Ok(0) | Err(_) => return,
                            Ok(_) => {
                                cleartext.fetch_add(1, Ordering::SeqCst);
                                return;
                            }
                        };
                        let Ok(stream) = acceptor.accept(tcp).await else {
                            return;
                        };
                        let service = service_fn(move |request: Request<Incoming>| {
                            let path = request.uri().path().to_owned();
                            paths.lock().push(path.clone());
                            async move {
                                Ok::<_, std::convert::Infallible>(Response::new(Full::new(
                                    Bytes::from(format!("secure {path}")),
                                )))
                            }
                        });
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(stream), service)
                            .await;
                    });
                }
            }
        });
        TlsBackend {
            addr,
            cleartext,
            handshakes,
            paths,
            task,
        }
    }

    /// `https://127.0.0.1:port,name=NAME`, its flag value.
    fn flag(&self, name: &str) -> String {
        format!("https://{},name={name}", self.addr)
    }

    fn paths(&self) -> Vec<String> {
        self.paths.lock().clone()
    }
}

impl Drop for TlsBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// `GET http://proxy/path` on the proxy's plain listener: status and body.
async fn get_plain(proxy: &ProxyProcess, path: &str) -> (StatusCode, String) {
    let response = http_client()
        .get(proxy.url(path))
        .send()
        .await
        .expect("the proxy answers");
    let status = response.status();
    (status, response.text().await.unwrap_or_default())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_backends_are_reached_over_verified_tls_only() {
    let pki = Pki::new("backends");
    let rogue_ca = Pki::new("rogue");
    let ca_file = pki.dir.write_ca(&pki.ca);
    let good = TlsBackend::start(&pki.server(&["127.0.0.1"], "good")).await;
    let rogue = TlsBackend::start(&rogue_ca.server(&["127.0.0.1"], "rogue")).await;
    let misnamed = TlsBackend::start(&pki.server(&["other.test"], "misnamed")).await;

    // The CA given: requests and HTTP health checks go over TLS.
    let proxy = ProxyProcess::start(&[
        "--backend",
        &good.flag("good"),
        "--backend-ca",
        arg(&ca_file),
        "--health-check",
        "http:/healthz",
        "--health-interval",
        "100ms",
    ]);
    let (status, body) = get_plain(&proxy, "/hello").await;
    assert_eq!(
        (status, body.as_str()),
        (StatusCode::OK, "secure /hello"),
        "{}",
        proxy.logs()
    );
    assert!(
        eventually(PATIENCE, || good.paths().iter().any(|p| p == "/healthz")).await,
        "the health check speaks TLS too: {}",
        proxy.logs()
    );
    proxy.terminate().await;

    // A certificate from another CA, or for another name: never reached, never in cleartext.
    let proxy = ProxyProcess::start(&[
        "--backend",
        &rogue.flag("rogue"),
        "--backend",
        &misnamed.flag("misnamed"),
        "--backend-ca",
        arg(&ca_file),
        "--health-check",
        "off",
    ]);
    let (status, _) = get_plain(&proxy, "/secret").await;
    assert!(
        status == StatusCode::BAD_GATEWAY || status == StatusCode::SERVICE_UNAVAILABLE,
        "{status}: {}",
        proxy.logs()
    );
    for backend in [&rogue, &misnamed] {
        assert!(
            backend.handshakes.load(Ordering::SeqCst) >= 1,
            "TLS was tried"
        );
        assert!(backend.paths().is_empty(), "no request got through");
        assert_eq!(
            backend.cleartext.load(Ordering::SeqCst),
            0,
            "nothing in cleartext"
        );
    }
    let logs = proxy.terminate().await;
    assert!(logs.contains("TLS handshake with"), "{logs}");

    // No --backend-ca: the system's roots (here SSL_CERT_FILE, which rustls-native-certs
    // reads): the backend's CA is trusted only when it is among them.
    for (roots, expected) in [(&rogue_ca, false), (&pki, true)] {
        let roots_file = roots.dir.write_ca(&roots.ca);
        let mut command = command();
        command
            .args(["--listen", "127.0.0.1:0", "--health-check", "off"])
            .args(["--backend", &good.flag("good")])
            .env("SSL_CERT_FILE", &roots_file)
            .env_remove("SSL_CERT_DIR");
        let proxy = ProxyProcess::spawn(command, &["proxy"]);
        let (status, _) = get_plain(&proxy, "/system").await;
        assert_eq!(
            status == StatusCode::OK,
            expected,
            "{status}: {}",
            proxy.logs()
        );
        proxy.terminate().await;
    }
    assert_eq!(
        good.cleartext.load(Ordering::SeqCst),
        0,
        "nothing in cleartext"
    );
}

/// Runs the binary with `args` and the environment `env` until it exits (killed after
/// [`RUN_WITHIN`]).
fn run_with_env(args: &[&str], env: &[(&str, &Path)]) -> Output {
    let mut command = command();
    command
        .args(["--listen", "127.0.0.1:0"])
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    for (name, value) in env {
        command.env(name, value);
    }
    let mut child = command.spawn().expect("run session-proxy");
    let deadline = Instant::now() + RUN_WITHIN;
    while child.try_wait().expect("poll the child").is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    child.wait_with_output().expect("the child's output")
}

#[test]
fn half_or_unusable_tls_settings_exit_2_naming_the_fix() {
    let pki = Pki::new("refusals");
    let (_, files) = pki.proxy_files("proxy");
    let backend = ["--backend", "http://127.0.0.1:1"];
    let cert_only = run_bounded(&[backend[0], backend[1], "--tls-cert", arg(&files.cert)]);
    let key_by_env = run_with_env(&backend, &[("STICKLESS_PROXY_TLS_KEY", &files.key)]);
    let missing = run_bounded(&[
        backend[0],
        backend[1],
        "--tls-cert",
        "/nonexistent/stickless/proxy.pem",
        "--tls-key",
        arg(&files.key),
    ]);
    let garbage = pki.dir.write("garbage.pem", "not PEM\n");
    let bad_ca = run_bounded(&[
        "--backend",
        "https://127.0.0.1:1",
        "--backend-ca",
        arg(&garbage),
    ]);
    for (out, expected) in [
        (
            cert_only,
            "--tls-cert (tls.cert) is given without --tls-key",
        ),
        (
            key_by_env,
            "--tls-key (tls.key) is given without --tls-cert",
        ),
        (missing, "/nonexistent/stickless/proxy.pem"),
        (bad_ca, "garbage.pem"),
    ] {
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{expected}: {stderr}");
        assert!(stderr.contains(expected), "{expected:?} not in {stderr}");
        assert!(out.stdout.is_empty(), "never listening: {:?}", out.stdout);
    }
}

#[test]
fn tls_settings_come_from_flags_or_the_file() {
    let cli =
        |args: &[&str]| Cli::try_parse_from(["session-proxy"].iter().chain(args)).expect("flags");
    let file = "backend_ca = \"/etc/ca.pem\"\n\n[[backend]]\nurl = \"https://b.example\"\n\n\
                [tls]\ncert = \"/etc/proxy.pem\"\nkey = \"/etc/proxy.key\"\n";
    let config = resolve(cli(&[]), Some(file)).expect("valid file");
    assert_eq!(
        config.tls,
        Some(TlsConfig {
            cert: "/etc/proxy.pem".into(),
            key: "/etc/proxy.key".into(),
        })
    );
    assert_eq!(config.backend_ca, Some(PathBuf::from("/etc/ca.pem")));
    let backend = &config.backends[0];
    assert!(backend.tls);
    assert_eq!(backend.authority, "b.example:443", "https's default port");

    let config = resolve(
        cli(&["--tls-cert", "/flag.pem", "--backend-ca", "/flag-ca.pem"]),
        Some(file),
    )
    .expect("flags over the file");
    assert_eq!(config.tls.expect("tls").cert, PathBuf::from("/flag.pem"));
    assert_eq!(config.backend_ca, Some(PathBuf::from("/flag-ca.pem")));

    let plain = resolve(cli(&["--backend", "http://a:1"]), None).expect("plain");
    assert_eq!(
        (plain.tls, plain.backend_ca, plain.backends[0].tls),
        (None, None, false)
    );

    let error = resolve(
        cli(&[]),
        Some("[[backend]]\nurl = \"http://a:1\"\n[tls]\nkey = \"/k\"\n"),
    )
    .expect_err("a key without a certificate");
    assert!(error.to_string().contains("without --tls-cert"), "{error}");
}
