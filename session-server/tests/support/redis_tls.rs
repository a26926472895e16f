//! A private `redis-server` that speaks TLS only (no cleartext port), with a certificate for
//! `127.0.0.1` signed by a CA of the test's own that nothing else trusts, on a free loopback
//! port (retried on a fresh port when it fails to come up, as [`services::OwnRedis`] is);
//! alone, or as a one-node Redis Cluster holding every slot, its cluster bus over TLS too.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::services::{self, PORT_ATTEMPTS};
use test_pki::{Ca, PemDir};

/// How long one `redis-server` gets to answer, over TLS, as itself: generous, for a loaded
/// machine.
const START_WITHIN: Duration = Duration::from_secs(20);

/// A private TLS-only `redis-server`, killed when dropped.
pub struct OwnTlsRedis {
    /// The running server process.
    child: Child,
    /// Its TLS port (it has no other).
    pub port: u16,
    /// The PEM file of the CA that signed its certificate.
    pub ca_file: PathBuf,
    /// Holds the PEM files; removed with the server.
    _dir: PemDir,
}

impl OwnTlsRedis {
    /// Makes a CA and a server certificate, starts the server on a free port and waits until
    /// it answers as itself over TLS; a server that does not come up (the port was taken
    /// meanwhile) is retried on another port, up to [`PORT_ATTEMPTS`] times.
    pub fn start(binary: PathBuf, test: &str) -> OwnTlsRedis {
        Self::launch(binary, test, false)
    }

    /// Like [`OwnTlsRedis::start`], as a one-node cluster that holds every slot, once the
    /// cluster reports itself ready.
    pub fn start_cluster(binary: PathBuf, test: &str) -> OwnTlsRedis {
        let redis = Self::launch(binary, test, true);
        redis.query(&["CLUSTER", "ADDSLOTSRANGE", "0", "16383"]);
        let deadline = Instant::now() + START_WITHIN;
        while !redis
            .query(&["CLUSTER", "INFO"])
            .contains("cluster_state:ok")
        {
            assert!(
                Instant::now() < deadline,
                "the one-node TLS cluster was not ready within {START_WITHIN:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        redis
    }

    fn launch(binary: PathBuf, test: &str, cluster: bool) -> OwnTlsRedis {
        let ca = Ca::new("stickless test Redis CA");
        let dir = PemDir::new(test);
        let (cert, key) = dir.write_leaf(&ca.localhost_server(), "server");
        let ca_file = dir.write("redis-ca.pem", ca.cert_pem());
        let mut failures = Vec::new();
        for _ in 0..PORT_ATTEMPTS {
            let port = services::free_port();
            let mut command = Command::new(&binary);
            if cluster {
                let bus = services::free_port().to_string();
                command
                    .args(["--cluster-enabled", "yes", "--tls-cluster", "yes"])
                    .args(["--cluster-port", &bus])
                    .arg("--cluster-config-file")
                    .arg(dir.file(&format!("nodes-{port}.conf")));
            }
            let mut child = command
                .args(["--port", "0", "--tls-port", &port.to_string()])
                .args(["--bind", "127.0.0.1", "--protected-mode", "no"])
                .arg("--tls-cert-file")
                .arg(&cert)
                .arg("--tls-key-file")
                .arg(&key)
                .arg("--tls-ca-cert-file")
                .arg(&ca_file)
                .args([
                    "--tls-auth-clients",
                    "no",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                ])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("spawn redis-server");
            match answers_as(&mut child, port, ca.cert_pem()) {
                Ok(()) => {
                    return OwnTlsRedis {
                        child,
                        port,
                        ca_file,
                        _dir: dir,
                    };
                }
                Err(why) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    failures.push(format!("port {port}: {why}"));
                }
            }
        }
        panic!("own TLS redis-server did not start in {PORT_ATTEMPTS} attempts: {failures:?}");
    }

    /// The reply to the command `args`, as text, over a TLS connection trusting the CA.
    fn query(&self, args: &[&str]) -> String {
        let ca = std::fs::read(&self.ca_file).expect("read the CA");
        let mut conn = tls_client(&self.url(), &ca)
            .get_connection_with_timeout(Duration::from_secs(10))
            .expect("connect over TLS");
        let mut cmd = redis::cmd(args[0]);
        for arg in &args[1..] {
            cmd.arg(*arg);
        }
        cmd.query::<String>(&mut conn)
            .unwrap_or_else(|e| panic!("{args:?}: {e}"))
    }

    /// The `rediss://` URL of the server.
    pub fn url(&self) -> String {
        format!("rediss://127.0.0.1:{}", self.port)
    }
}

impl Drop for OwnTlsRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits (up to [`START_WITHIN`]) until the server `child` answers `INFO server` over TLS on
/// `port`, trusting `ca` only, with its own process id (another server that holds the port
/// would answer too); why not otherwise.
fn answers_as(child: &mut Child, port: u16, ca: &str) -> Result<(), String> {
    let pid = format!("process_id:{}", child.id());
    let url = format!("rediss://127.0.0.1:{port}");
    let deadline = Instant::now() + START_WITHIN;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("exited ({status}) before answering"));
        }
        let info = tls_client(&url, ca.as_bytes())
            .get_connection_with_timeout(Duration::from_secs(2))
            .and_then(|mut conn| redis::cmd("INFO").arg("server").query::<String>(&mut conn));
        match info {
            Ok(info) if info.lines().any(|l| l.trim() == pid) => return Ok(()),
            Ok(_) => return Err("another server answers there".into()),
            Err(error) if Instant::now() >= deadline => {
                return Err(format!("no answer within {START_WITHIN:?} (last: {error})"));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// A client of `url` trusting only the PEM CA `ca`.
fn tls_client(url: &str, ca: &[u8]) -> redis::Client {
    let certificates = redis::TlsCertificates {
        client_tls: None,
        root_cert: Some(ca.to_vec()),
    };
    redis::Client::build_with_tls(url, certificates).expect("a valid rediss:// URL and CA")
}
