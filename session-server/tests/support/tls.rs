//! TLS for tests: certificates made with rcgen on every run (a CA, a server certificate for
//! `127.0.0.1` and `localhost`, client certificates), written as PEM files into a directory of
//! the test's own that goes away with it; gRPC channels that trust one given CA and nothing
//! else; and the one call tests make to see whether a connection is served.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use session_proto::v1::CreateRequest;
use session_proto::v1::session_store_client::SessionStoreClient;
use session_server::config::Settings;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

use super::services;

/// The name clients check the server certificate against (it also holds `127.0.0.1`).
pub const SERVER_NAME: &str = "localhost";

/// Bound on a test client's TCP connect and TLS handshake: generous, for a loaded machine.
const CONNECT_WITHIN: Duration = Duration::from_secs(20);

/// Bound on one call of a test client.
const CALL_WITHIN: Duration = Duration::from_secs(20);

/// A certificate and its private key, PEM.
#[derive(Debug, Clone)]
pub struct Pem {
    /// The certificate.
    pub cert: String,
    /// Its private key (PKCS#8).
    pub key: String,
}

/// A certificate authority of one test, whose certificates nothing else trusts.
pub struct TestCa {
    /// Signs the certificates this CA issues.
    issuer: Issuer<'static, KeyPair>,
    /// The CA certificate, PEM: what a client or a server told to trust this CA is given.
    pub cert: String,
}

impl TestCa {
    /// A new CA named `name` (its common name).
    pub fn new(name: &str) -> TestCa {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA parameters");
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate().expect("CA key");
        let cert = params.self_signed(&key).expect("self-signed CA").pem();
        TestCa {
            issuer: Issuer::new(params, key),
            cert,
        }
    }

    /// A server certificate for `localhost` and `127.0.0.1`, signed by this CA.
    pub fn server(&self) -> Pem {
        self.issue(
            vec![SERVER_NAME.to_owned(), "127.0.0.1".to_owned()],
            "stickless test server",
            ExtendedKeyUsagePurpose::ServerAuth,
        )
    }

    /// A client certificate named `name`, signed by this CA.
    pub fn client(&self, name: &str) -> Pem {
        self.issue(Vec::new(), name, ExtendedKeyUsagePurpose::ClientAuth)
    }

    /// A leaf certificate with `names` as subject alternative names, for `usage`.
    fn issue(&self, names: Vec<String>, common_name: &str, usage: ExtendedKeyUsagePurpose) -> Pem {
        let mut params = CertificateParams::new(names).expect("leaf parameters");
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.extended_key_usages = vec![usage];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let key = KeyPair::generate().expect("leaf key");
        let cert = params.signed_by(&key, &self.issuer).expect("signed leaf");
        Pem {
            cert: cert.pem(),
            key: key.serialize_pem(),
        }
    }
}

/// A directory of the test's own for PEM files, removed when dropped.
pub struct TlsDir {
    /// The directory.
    path: PathBuf,
}

impl TlsDir {
    /// A new empty directory named after `test`.
    pub fn new(test: &str) -> TlsDir {
        let path = std::env::temp_dir().join(services::unique_prefix(test));
        std::fs::create_dir_all(&path).expect("create the test's TLS directory");
        TlsDir { path }
    }

    /// Writes (or overwrites) file `name` with `contents` and gives its path.
    pub fn write(&self, name: &str, contents: &str) -> PathBuf {
        let path = self.file(name);
        std::fs::write(&path, contents).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        path
    }

    /// The path of file `name` in the directory (written or not).
    pub fn file(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    /// Writes `identity` as `server.pem` and `server.key`, the files [`TlsDir::settings`] names.
    pub fn write_server_identity(&self, identity: &Pem) -> (PathBuf, PathBuf) {
        (
            self.write("server.pem", &identity.cert),
            self.write("server.key", &identity.key),
        )
    }

    /// Default settings serving TLS with a server certificate of `ca` (written here), and with
    /// `client_ca` required to have signed every client's certificate when given.
    pub fn settings(&self, ca: &TestCa, client_ca: Option<&TestCa>) -> Settings {
        let (cert, key) = self.write_server_identity(&ca.server());
        Settings {
            tls_cert: Some(cert),
            tls_key: Some(key),
            tls_client_ca: client_ca.map(|ca| self.write("client-ca.pem", &ca.cert)),
            ..Settings::default()
        }
    }
}

impl Drop for TlsDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// A TLS connection to `addr` trusting the CA certificate `ca` only, presenting `identity`
/// when given; the error when the connection cannot be made.
pub async fn tls_channel(
    addr: SocketAddr,
    ca: &str,
    identity: Option<&Pem>,
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
    identity: Option<&Pem>,
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
