//! For tests only: a throwaway certificate authority made with rcgen on every run, the server
//! and client certificates it signs, and a temporary directory for their PEM files that goes
//! away with the test. Nothing here is ever committed: no key outlives the test that made it,
//! and nothing outside the test trusts these CAs.
//!
//! # Layout
//! - [`Ca`]: a CA of one test; issues [`Leaf`] certificates for servers ([`Ca::server`],
//!   [`Ca::localhost_server`]) and clients ([`Ca::client`]), and gives a rustls client that
//!   trusts it alone ([`Ca::rustls_client_config`]).
//! - [`Leaf`]: one issued certificate and its private key, PEM (and DER).
//! - [`PemDir`]: a temporary directory to write them into, for binaries and settings that
//!   take file paths; removed on drop.
//!
//! Keys are ECDSA P-256 made with ring (rcgen's `ring` feature, as the workspace's rustls).
//!
//! # Example
//! ```
//! let ca = test_pki::Ca::new("stickless test CA");
//! let dir = test_pki::PemDir::new("example");
//! let (cert, key) = dir.write_leaf(&ca.localhost_server(), "server");
//! let ca_file = dir.write_ca(&ca);
//! assert!(std::fs::read_to_string(cert).unwrap().contains("BEGIN CERTIFICATE"));
//! assert!(std::fs::read_to_string(key).unwrap().contains("PRIVATE KEY"));
//! assert_eq!(std::fs::read_to_string(ca_file).unwrap(), ca.cert_pem());
//! ```

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::CertificateDer;

/// The names of [`Ca::localhost_server`]'s certificate: `localhost` and `127.0.0.1`.
pub const LOCALHOST: [&str; 2] = ["localhost", "127.0.0.1"];

/// The subject's common name of [`Ca::server`]'s certificates.
const SERVER_COMMON_NAME: &str = "stickless test server";

/// What a [`Leaf`] certificate is for (its extended key usage).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Usage {
    /// A TLS server's certificate (`serverAuth`).
    Server,
    /// A TLS client's certificate, for mTLS (`clientAuth`).
    Client,
}

/// A certificate authority of one test, whose certificates nothing else trusts.
pub struct Ca {
    /// The CA's certificate and key: signs what it issues.
    issuer: CertifiedIssuer<'static, KeyPair>,
    /// The CA certificate, PEM: what a client or a server told to trust this CA is given.
    cert_pem: String,
}

impl Ca {
    /// A new CA named `name` (its subject's common name), with a key of its own.
    pub fn new(name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA parameters");
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate().expect("CA key");
        let issuer = CertifiedIssuer::self_signed(params, key).expect("self-signed CA");
        let cert_pem = issuer.pem();
        Ca { issuer, cert_pem }
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA certificate, DER.
    pub fn cert_der(&self) -> CertificateDer<'static> {
        self.issuer.der().clone()
    }

    /// A server certificate for `names` (each an IP address, such as `127.0.0.1`, or a DNS
    /// name), signed by this CA.
    pub fn server(&self, names: &[&str]) -> Leaf {
        self.leaf(SERVER_COMMON_NAME, names, Usage::Server)
    }

    /// A server certificate for `localhost` and `127.0.0.1` (see [`LOCALHOST`]).
    pub fn localhost_server(&self) -> Leaf {
        self.server(&LOCALHOST)
    }

    /// A client certificate named `name` (its subject's common name), signed by this CA.
    pub fn client(&self, name: &str) -> Leaf {
        self.leaf(name, &[], Usage::Client)
    }

    /// A certificate with a fresh key, subject common name `common_name`, `names` as subject
    /// alternative names (IP addresses or DNS names) and `usage`, signed by this CA.
    pub fn leaf(&self, common_name: &str, names: &[&str], usage: Usage) -> Leaf {
        let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
        let mut params = CertificateParams::new(names).expect("certificate names");
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![match usage {
            Usage::Server => ExtendedKeyUsagePurpose::ServerAuth,
            Usage::Client => ExtendedKeyUsagePurpose::ClientAuth,
        }];
        let key = KeyPair::generate().expect("certificate key");
        let cert = params
            .signed_by(&key, &self.issuer)
            .expect("certificate signed by the test CA");
        Leaf {
            cert: cert.pem(),
            key: key.serialize_pem(),
            der: cert.der().to_vec(),
        }
    }

    /// Settings of a rustls client (ring provider, safe default versions, no client
    /// certificate) that trusts this CA and nothing else; set `alpn_protocols` as needed.
    pub fn rustls_client_config(&self) -> rustls::ClientConfig {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.cert_der()).expect("the CA certificate");
        rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_root_certificates(roots)
        .with_no_client_auth()
    }
}

/// A certificate issued by a [`Ca`], with its private key.
#[derive(Debug, Clone)]
pub struct Leaf {
    /// The certificate, PEM.
    pub cert: String,
    /// Its private key, PEM (PKCS#8).
    pub key: String,
    /// The certificate, DER: what a peer sees in the handshake.
    pub der: Vec<u8>,
}

/// A temporary directory of one test for PEM (and other) files, removed with everything in
/// it when dropped.
pub struct PemDir {
    /// The directory (deleted by its drop).
    dir: tempfile::TempDir,
}

impl PemDir {
    /// A new empty directory in the system's temporary directory, its name starting with
    /// `stickless-{label}-` (the rest is random, so tests running at once never share one).
    pub fn new(label: &str) -> PemDir {
        let dir = tempfile::Builder::new()
            .prefix(&format!("stickless-{label}-"))
            .tempdir()
            .expect("a temporary directory");
        PemDir { dir }
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// The path of file `name` in the directory, written or not.
    pub fn file(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Writes (or overwrites) file `name` with `contents`; its path.
    pub fn write(&self, name: &str, contents: impl AsRef<[u8]>) -> PathBuf {
        let path = self.file(name);
        std::fs::write(&path, contents).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        path
    }

    /// Writes `ca`'s certificate as `ca.pem`; its path.
    pub fn write_ca(&self, ca: &Ca) -> PathBuf {
        self.write("ca.pem", ca.cert_pem())
    }

    /// Writes `leaf` as `{stem}.pem` (the certificate) and `{stem}.key` (its key); their
    /// paths, certificate first.
    pub fn write_leaf(&self, leaf: &Leaf, stem: &str) -> (PathBuf, PathBuf) {
        (
            self.write(&format!("{stem}.pem"), &leaf.cert),
            self.write(&format!("{stem}.key"), &leaf.key),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::{Ca, PemDir, Usage};

    #[test]
    fn issued_certificates_name_what_they_were_asked_for_and_differ_every_time() {
        let ca = Ca::new("test-pki CA");
        let server = ca.localhost_server();
        let client = ca.client("app");
        let custom = ca.leaf("custom", &["sessions.test"], Usage::Server);
        for leaf in [&server, &client, &custom] {
            assert!(leaf.cert.starts_with("-----BEGIN CERTIFICATE-----"));
            assert!(leaf.key.contains("PRIVATE KEY"));
            assert!(!leaf.der.is_empty());
        }
        assert_ne!(server.der, ca.localhost_server().der);
        assert_ne!(server.key, custom.key);
    }

    #[test]
    fn a_pem_dir_holds_its_files_until_dropped() {
        let ca = Ca::new("test-pki CA");
        let dir = PemDir::new("test-pki");
        let root = dir.path().to_owned();
        let (cert, key) = dir.write_leaf(&ca.client("app"), "client");
        assert_eq!(cert, root.join("client.pem"));
        assert_eq!(key, root.join("client.key"));
        assert_eq!(
            std::fs::read_to_string(dir.write_ca(&ca)).unwrap(),
            ca.cert_pem()
        );
        assert!(!dir.file("missing.pem").exists());
        drop(dir);
        assert!(!root.exists());
    }

    #[test]
    fn the_rustls_client_trusts_its_ca() {
        let config = Ca::new("test-pki CA").rustls_client_config();
        assert!(config.alpn_protocols.is_empty());
    }
}
