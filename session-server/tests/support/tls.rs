//! TLS for tests: server settings with certificates of a test CA (the workspace's `test-pki`
//! crate makes them on every run and writes them into a directory of the test's own); gRPC
//! channels that trust one given CA and nothing else; and the one call tests make to see
//! whether a connection is served.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use session_proto::v1::CreateRequest;
use session_proto::v1::session_store_client::SessionStoreClient;
use session_server::config::Settings;
use test_pki::{Ca, Leaf, PemDir};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

/// The name clients check the server certificate against (it also holds `127.0.0.1`): one of
/// [`test_pki::LOCALHOST`].
pub const SERVER_NAME: &str = "localhost";

/// Bound on a test client's TCP connect and TLS handshake: generous, for a loaded machine.
const CONNECT_WITHIN: Duration = Duration::from_secs(20);

/// Bound on one call of a test client.
const CALL_WITHIN: Duration = Duration::from_secs(20);

/// Default settings serving TLS with a server certificate of `ca` for [`SERVER_NAME`] and
/// `127.0.0.1` (written to `dir` as `server.pem` and `server.key`), and with `client_ca`
/// required to have signed every client's certificate when given (written as `client-ca.pem`).
pub fn settings(dir: &PemDir, ca: &Ca, client_ca: Option<&Ca>) -> Settings {
    let (cert, key) = dir.write_leaf(&ca.localhost_server(), "server");
    Settings {
        tls_cert: Some(cert),
        tls_key: Some(key),
        tls_client_ca: client_ca.map(|ca| dir.write("client-ca.pem", ca.cert_pem())),
        ..Settings::default()
    }
}

/// A TLS connection to `addr` trusting the CA certificate `ca` only, presenting `identity`
/// when given; the error when the connection cannot be made.
pub async fn tls_channel(
    addr: SocketAddr,
    ca: &str,
    identity: Option<&Leaf>,
) -> Result<Channel, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca))
        .domain_name(SERVER_NAME);
    if let Some(identity) = identity {
        tls = tls.identity(Identity::from_pem(&identity.cert, &identity.key));
    }
    Channel::from_shared(format!("https://{addr}"))
        .expect("valid URI")
        .tls_config(tls)?
        .connect_timeout(CONNECT_WITHIN)
        .timeout(CALL_WITHIN)
        .connect()
        .await
}

/// Creates a session on `channel`: its id, or why the call failed.
pub async fn create_on(channel: Channel) -> Result<String, String> {
    let request = CreateRequest {
        namespace: "tls".into(),
        user_id: "tls-user".into(),
        ..CreateRequest::default()
    };
    SessionStoreClient::new(channel)
        .create(request)
        .await
        .map(|created| created.into_inner().id)
        .map_err(|status| format!("create refused: {status:?}"))
}

/// Creates a session over a new TLS connection (see [`tls_channel`]): its id, or why the
/// connection or the call failed. With TLS 1.3 a server that refuses the client's certificate
/// says so after the client's side of the handshake is done, so a refusal may show either way.
pub async fn create_over_tls(
    addr: SocketAddr,
    ca: &str,
    identity: Option<&Leaf>,
) -> Result<String, String> {
    let channel = tls_channel(addr, ca, identity)
        .await
        .map_err(|e| format!("TLS connect failed: {e:?}"))?;
    create_on(channel).await
}

/// Creates a session over a new plaintext (`http://`) connection: its id, or why it failed.
pub async fn create_in_plaintext(addr: SocketAddr) -> Result<String, String> {
    let channel = Channel::from_shared(format!("http://{addr}"))
        .expect("valid URI")
        .connect_timeout(CONNECT_WITHIN)
        .timeout(CALL_WITHIN)
        .connect()
        .await
        .map_err(|e| format!("plaintext connect failed: {e:?}"))?;
    create_on(channel).await
}

/// Sends SIGHUP to process `pid` (the binary reloads its TLS files).
pub fn send_sighup(pid: u32) {
    let sent = Command::new("kill")
        .args(["-HUP", &pid.to_string()])
        .status()
        .is_ok_and(|s| s.success());
    assert!(sent, "kill -HUP {pid}");
}

/// `binary` and `args` wrapped in `sh -c 'exec …'` so the process (same pid, after the exec)
/// writes its stderr to `log`, where a test can read it while the process runs; stdout (the
/// `listening` lines) is untouched. For `process::ServerProcess::start(Path::new("sh"), …)`.
pub fn with_stderr_to(log: &Path, binary: &Path, args: &[&str]) -> Vec<String> {
    let script = format!("exec \"$0\" \"$@\" 2>>'{}'", log.display());
    ["-c".to_owned(), script, binary.display().to_string()]
        .into_iter()
        .chain(args.iter().map(|a| (*a).to_owned()))
        .collect()
}
