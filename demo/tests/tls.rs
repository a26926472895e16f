//! `demo-app --tls-cert --tls-key`: the real binary serves HTTPS only (HTTP/1.1 and HTTP/2 by
//! ALPN) with a certificate from a test CA made here (test-pki), a silent client does not hold
//! up the others, shutdown still works, and half or bad TLS settings are refused with exit
//! status 2 naming the flag or file. (session-proxy in front of it, over `https://`, is in
//! bench/tests/tls_backend.rs, where the session-proxy binary is at hand.)

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt as _, Empty};
use hyper::body::Bytes;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::ServerName;
use test_pki::{Ca, PemDir};
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio_rustls::TlsConnector;

/// Bound on any wait: generous, a passing test never waits it out.
const PATIENCE: Duration = Duration::from_secs(30);

/// A server certificate and key of `ca` for 127.0.0.1, written to `dir` as `server.pem` and
/// `server.key`; their files.
fn server_files(ca: &Ca, dir: &PemDir) -> (PathBuf, PathBuf) {
    dir.write_leaf(&ca.server(&["127.0.0.1"]), "server")
}

/// A path as a flag value.
fn arg(path: &Path) -> &str {
    path.to_str().expect("UTF-8 temporary path")
}

/// A `demo-app` process on `127.0.0.1:0`, at the address it reported (killed on drop).
struct DemoProcess {
    /// The child.
    child: tokio::process::Child,
    /// Collects its stderr.
    stderr: JoinHandle<String>,
    /// Where it listens, as reported on the `listening http` line.
    addr: SocketAddr,
}

impl DemoProcess {
    /// Starts `demo-app` with `args` (`--sessions local` and port 0 added) and reads its
    /// `listening http <addr>` line, failing with its stderr if it exits first.
    async fn start(args: &[&str]) -> DemoProcess {
        // No environment: a developer's DEMO_* or STICKLESS_* variables must not change it.
        let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_demo-app"))
            .env_clear()
            .args([
                "--listen",
                "127.0.0.1:0",
                "--sessions",
                "local",
                "--name",
                "tls",
            ])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("start demo-app");
        let stderr = drain(child.stderr.take().expect("stderr"));
        let mut stdout = tokio::io::BufReader::new(child.stdout.take().expect("stdout")).lines();
        let line = match tokio::time::timeout(PATIENCE, stdout.next_line()).await {
            Ok(Ok(Some(line))) => line,
            other => {
                let _ = child.start_kill();
                let stderr = tokio::time::timeout(PATIENCE, stderr).await;
                panic!("demo-app reported no address ({other:?}); stderr: {stderr:?}");
            }
        };
        let addr = line
            .strip_prefix("listening http ")
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("not an address line: {line:?}"));
        // Nothing else comes on stdout; keep the pipe drained anyway.
        tokio::spawn(async move { while let Ok(Some(_)) = stdout.next_line().await {} });
        DemoProcess {
            child,
            stderr,
            addr,
        }
    }
}

/// Reads a child's stderr to its end.
fn drain(mut pipe: tokio::process::ChildStderr) -> JoinHandle<String> {
    tokio::spawn(async move {
        let mut text = String::new();
        let _ = pipe.read_to_string(&mut text).await;
        text
    })
}

/// `GET /healthz` over HTTPS on a connection of its own, offering `alpn`: the protocol agreed
/// on, the status and the `x-served-by` header.
async fn healthz(ca: &Ca, addr: SocketAddr, alpn: &[&[u8]]) -> (String, u16, String) {
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let name = ServerName::IpAddress(addr.ip().into());
    let mut config = ca.rustls_client_config();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let connector = TlsConnector::from(Arc::new(config));
    let tls = tokio::time::timeout(PATIENCE, connector.connect(name, tcp))
        .await
        .expect("handshake in time")
        .expect("TLS handshake with the test CA");
    let protocol =
        String::from_utf8_lossy(tls.get_ref().1.alpn_protocol().unwrap_or(b"-")).into_owned();
    let request = http::Request::get(format!("https://{addr}/healthz"))
        .body(Empty::<Bytes>::new())
        .expect("request");
    let io = TokioIo::new(tls);
    let response = if protocol == "h2" {
        let (mut sender, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
            .await
            .expect("HTTP/2 handshake");
        tokio::spawn(conn);
        tokio::time::timeout(PATIENCE, sender.send_request(request)).await
    } else {
        let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
            .await
            .expect("HTTP/1.1 handshake");
        tokio::spawn(conn);
        tokio::time::timeout(PATIENCE, sender.send_request(request)).await
    }
    .expect("answer in time")
    .expect("an HTTP answer");
    let status = response.status().as_u16();
    let served_by = response
        .headers()
        .get("x-served-by")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let _ = response.into_body().collect().await;
    (protocol, status, served_by)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_cert_and_key_serve_https_only_with_h2_and_http1() {
    let (ca, dir) = (Ca::new("serve"), PemDir::new("demo-tls-serve"));
    let (cert, key) = server_files(&ca, &dir);
    let mut app = DemoProcess::start(&[
        "--insecure-cookies",
        "--tls-cert",
        arg(&cert),
        "--tls-key",
        arg(&key),
    ])
    .await;

    // A client that connects and never says a word does not hold up the others.
    let _silent = TcpStream::connect(app.addr).await.expect("connect");

    for (alpn, expected) in [
        (&[b"h2".as_slice(), b"http/1.1"][..], "h2"),
        (&[b"http/1.1".as_slice()][..], "http/1.1"),
    ] {
        let (protocol, status, served_by) = healthz(&ca, app.addr, alpn).await;
        assert_eq!(
            (protocol.as_str(), status, served_by.as_str()),
            (expected, 200, "tls")
        );
    }

    // Plain HTTP gets no HTTP answer: a TLS alert at most, then the connection is closed.
    let mut plain = TcpStream::connect(app.addr).await.expect("connect");
    plain
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: demo\r\nConnection: close\r\n\r\n")
        .await
        .expect("send a plaintext request");
    let mut answer = Vec::new();
    tokio::time::timeout(PATIENCE, plain.read_to_end(&mut answer))
        .await
        .expect("closed in time")
        .ok();
    assert!(
        !answer.starts_with(b"HTTP/"),
        "plaintext got an HTTP answer: {:?}",
        String::from_utf8_lossy(&answer)
    );

    // Shutdown (SIGINT, as ctrl-c) still ends the process cleanly, the silent client too.
    let pid = app.child.id().expect("pid").to_string();
    let sent = tokio::process::Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .await
        .expect("run kill");
    assert!(sent.success());
    let status = tokio::time::timeout(PATIENCE, app.child.wait())
        .await
        .expect("demo-app stopped in time")
        .expect("exit status");
    let stderr = tokio::time::timeout(PATIENCE, app.stderr)
        .await
        .expect("stderr closed")
        .unwrap_or_default();
    assert!(status.success(), "{status}; stderr: {stderr}");
}

/// Runs `demo-app` with `args` to its exit: its exit code and stderr.
async fn refused(args: &[&str]) -> (Option<i32>, String) {
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_demo-app"))
        .env_clear()
        .args(["--listen", "127.0.0.1:0", "--sessions", "local"])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start demo-app");
    let stderr = drain(child.stderr.take().expect("stderr"));
    let status = tokio::time::timeout(PATIENCE, child.wait())
        .await
        .unwrap_or_else(|_| panic!("demo-app {args:?} did not exit"))
        .expect("exit status");
    let stderr = stderr.await.unwrap_or_default();
    (status.code(), stderr)
}

#[tokio::test]
async fn half_or_bad_tls_settings_exit_with_status_2_naming_the_flag_or_file() {
    let (ca, dir) = (Ca::new("refusals"), PemDir::new("demo-tls-refusals"));
    let (cert, key) = server_files(&ca, &dir);
    for (args, named) in [
        (["--tls-cert", arg(&cert)], "--tls-key"),
        (["--tls-key", arg(&key)], "--tls-cert"),
    ] {
        let (code, stderr) = refused(&args).await;
        assert_eq!(code, Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(named), "{args:?}: {stderr}");
    }

    let missing = dir.file("missing.pem");
    let not_pem = dir.write("not-pem.txt", "not a PEM file\n");
    let other_key = dir.write("other.key", Ca::new("other").server(&["127.0.0.1"]).key);
    for (cert, key, named) in [
        (&missing, &key, &missing),
        (&cert, &missing, &missing),
        (&not_pem, &key, &not_pem),
        (&cert, &not_pem, &not_pem),
        // A key that is not the certificate's.
        (&cert, &other_key, &other_key),
    ] {
        let args = ["--tls-cert", arg(cert), "--tls-key", arg(key)];
        let (code, stderr) = refused(&args).await;
        assert_eq!(code, Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(arg(named)), "{args:?}: {stderr}");
    }
}
