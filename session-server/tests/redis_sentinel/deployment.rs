//! A Redis Sentinel deployment for the tests of this binary: a primary, a replica of it
//! (`--replicaof`) and one sentinel monitoring it with quorum 1 and short timeouts, each a
//! `redis-server` on a free loopback port, the sentinel's config file (which it rewrites) in a
//! temporary directory; in cleartext, or all three TLS-only (replication and the sentinel's
//! links too) with a certificate for `127.0.0.1` from a CA of the test's own. Everything is
//! killed, and the directory removed, on drop, also when the test fails.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use redis::aio::MultiplexedConnection;
use session_server::config::{Settings, StoreKind};
use session_server::store::redis::RedisConfig;

use crate::support::services::{self, PORT_ATTEMPTS};
use test_pki::{Ca, PemDir};

/// The name the sentinel monitors the primary under.
pub const MASTER: &str = "stickless-main";

/// How long a process gets to answer, or the deployment to settle: generous, for a loaded
/// machine.
const READY_WITHIN: Duration = Duration::from_secs(30);

/// A `redis-server` started here (replica or sentinel), killed on drop.
struct Process {
    /// The process; `None` once killed.
    child: Option<Child>,
    /// Its port.
    port: u16,
}

impl Process {
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The TLS material of a TLS-only deployment.
struct Tls {
    /// The CA that signed the servers' certificate, as PEM.
    ca_pem: String,
    /// The CA's PEM file.
    ca_file: PathBuf,
    /// The servers' certificate (for `127.0.0.1`) and key.
    cert: PathBuf,
    key: PathBuf,
    /// Holds the PEM files.
    _dir: PemDir,
}

/// How a client reaches every server of a deployment.
#[derive(Clone, Default)]
struct Access {
    /// PEM CA to trust over TLS; `None`: cleartext.
    ca: Option<String>,
    /// The password every server (the sentinel too) requires, if any.
    password: Option<String>,
}

/// A primary, its replica and a sentinel, torn down on drop.
pub struct Deployment {
    /// TLS material, when every server speaks TLS only.
    tls: Option<Tls>,
    /// How clients reach the servers.
    access: Access,
    /// The primary at start.
    primary: Process,
    /// The replica at start (the primary after a failover).
    replica: Process,
    /// The sentinel.
    sentinel: Process,
    /// The sentinel's config file (and anything else); removed on drop.
    dir: PathBuf,
}

impl Deployment {
    /// Starts the three servers in cleartext and waits until the replica is in sync and the
    /// sentinel knows both; `None` (skipped, by the skip rule) when `redis-server` is not
    /// installed.
    pub async fn start(test: &str) -> Option<Deployment> {
        Self::launch(test, None, None).await
    }

    /// Like [`Deployment::start`], every server (the sentinel too) requiring `password`.
    pub async fn start_with_password(test: &str, password: &str) -> Option<Deployment> {
        Self::launch(test, None, Some(password)).await
    }

    /// Like [`Deployment::start`], every server TLS-only.
    pub async fn start_tls(test: &str) -> Option<Deployment> {
        let ca = Ca::new("stickless test Redis Sentinel CA");
        let dir = PemDir::new(test);
        let (cert, key) = dir.write_leaf(&ca.localhost_server(), "server");
        let ca_file = dir.write("redis-ca.pem", ca.cert_pem());
        let tls = Tls {
            ca_pem: ca.cert_pem().to_string(),
            ca_file,
            cert,
            key,
            _dir: dir,
        };
        Self::launch(test, Some(tls), None).await
    }

    async fn launch(test: &str, tls: Option<Tls>, password: Option<&str>) -> Option<Deployment> {
        let binary = services::redis_server_binary(test)?;
        let dir = std::env::temp_dir().join(services::unique_prefix("stickless-sentinel"));
        std::fs::create_dir_all(&dir).expect("create the sentinel's temporary directory");
        let access = Access {
            ca: tls.as_ref().map(|tls| tls.ca_pem.clone()),
            password: password.map(str::to_owned),
        };
        let server = |port: u16| {
            // A replica writes the RDB of a full resync into its directory: one of its own in
            // the temporary directory, never the working directory.
            let data = dir.join(format!("redis-{port}"));
            std::fs::create_dir_all(&data).expect("create a Redis data directory");
            let mut command = Command::new(&binary);
            command
                .args(listen_args(port, tls.as_ref()))
                .args(["--bind", "127.0.0.1", "--protected-mode", "no"])
                .args(["--save", "", "--appendonly", "no"])
                .arg("--dir")
                .arg(&data);
            if let Some(password) = password {
                command.args(["--requirepass", password, "--masterauth", password]);
            }
            command
        };
        let primary = start_on_free_port("primary", &access, &server).await;
        let replica = start_on_free_port("replica", &access, |port| {
            let mut command = server(port);
            command.args(["--replicaof", "127.0.0.1", &primary.port.to_string()]);
            command
        })
        .await;
        let sentinel = start_on_free_port("sentinel", &access, |port| {
            let file = dir.join(format!("sentinel-{port}.conf"));
            write_sentinel_conf(&file, port, primary.port, tls.as_ref(), password);
            let mut command = Command::new(&binary);
            command.arg(&file).arg("--sentinel");
            command
        })
        .await;
        let deployment = Deployment {
            tls,
            access,
            primary,
            replica,
            sentinel,
            dir,
        };
        deployment.wait_until_settled().await;
        Some(deployment)
    }

    /// `redis://127.0.0.1:<sentinel port>` (`rediss://` with TLS), as `--redis-url` takes it.
    pub fn sentinel_url(&self) -> String {
        let scheme = if self.tls.is_some() {
            "rediss"
        } else {
            "redis"
        };
        let password = self
            .access
            .password
            .as_ref()
            .map(|p| format!(":{p}@"))
            .unwrap_or_default();
        format!("{scheme}://{password}127.0.0.1:{}", self.sentinel.port)
    }

    /// The PEM file of the CA that signed the servers' certificate (TLS only).
    pub fn ca_file(&self) -> Option<PathBuf> {
        self.tls.as_ref().map(|tls| tls.ca_file.clone())
    }

    /// The primary's port at start.
    pub fn primary_port(&self) -> u16 {
        self.primary.port
    }

    /// The replica's port at start.
    pub fn replica_port(&self) -> u16 {
        self.replica.port
    }

    /// The sentinel's port.
    pub fn sentinel_port(&self) -> u16 {
        self.sentinel.port
    }

    /// The settings of a `--store redis-sentinel` store on this deployment, from `settings`
    /// (`RedisConfig::from_settings`), with a key prefix unique to this call.
    pub fn config(&self, test: &str, settings: &Settings) -> RedisConfig {
        let sentinel = Settings {
            store: StoreKind::RedisSentinel,
            redis_url: self.sentinel_url(),
            redis_sentinel_master: Some(MASTER.to_string()),
            redis_ca: self.ca_file(),
            ..settings.clone()
        };
        let mut config =
            RedisConfig::from_settings(&sentinel).expect("the test's sentinel store settings");
        config.key_prefix = services::unique_prefix(test);
        config
    }

    /// Kills the primary with SIGKILL, as a crash would.
    pub fn kill_primary(&mut self) {
        self.primary.kill();
    }

    /// A connection to the server on loopback `port` (over TLS in a TLS deployment), within a
    /// second.
    pub async fn connect(&self, port: u16) -> redis::RedisResult<MultiplexedConnection> {
        connect(port, &self.access).await
    }

    /// `role:` of the server on `port` (`master`, `slave`), if it answers.
    pub async fn role(&self, port: u16) -> Option<String> {
        let mut conn = self.connect(port).await.ok()?;
        let info: String = redis::cmd("INFO")
            .arg("replication")
            .query_async(&mut conn)
            .await
            .ok()?;
        info_field(&info, "role").map(str::to_owned)
    }

    /// The primary the sentinel names now, as a port.
    pub async fn named_primary(&self) -> Option<u16> {
        let mut conn = self.connect(self.sentinel.port).await.ok()?;
        let (_host, port): (String, u16) = redis::cmd("SENTINEL")
            .arg("GET-MASTER-ADDR-BY-NAME")
            .arg(MASTER)
            .query_async(&mut conn)
            .await
            .ok()?;
        Some(port)
    }

    /// Waits (up to `within`) until the sentinel names the replica as the primary and the
    /// replica says it is a master; whether it did.
    pub async fn wait_until_promoted(&self, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if self.named_primary().await == Some(self.replica.port)
                && self.role(self.replica.port).await.as_deref() == Some("master")
            {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        false
    }

    /// Waits until every write the primary has taken so far is on the replica.
    pub async fn wait_until_replicated(&self) {
        let offset = |port: u16, field: &'static str| async move {
            let mut conn = self.connect(port).await.ok()?;
            let info: String = redis::cmd("INFO")
                .arg("replication")
                .query_async(&mut conn)
                .await
                .ok()?;
            info_field(&info, field)?.parse::<u64>().ok()
        };
        let target = offset(self.primary.port, "master_repl_offset")
            .await
            .expect("the primary's replication offset");
        let deadline = Instant::now() + READY_WITHIN;
        while offset(self.replica.port, "slave_repl_offset")
            .await
            .is_none_or(|at| at < target)
        {
            assert!(
                Instant::now() < deadline,
                "the replica did not reach offset {target} within {READY_WITHIN:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until the replica is in sync and the sentinel lists it (so it can fail over to
    /// it), failing the test after [`READY_WITHIN`].
    async fn wait_until_settled(&self) {
        let deadline = Instant::now() + READY_WITHIN;
        loop {
            if self.settled().await {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the sentinel deployment did not settle within {READY_WITHIN:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn settled(&self) -> bool {
        let Ok(mut replica) = self.connect(self.replica.port).await else {
            return false;
        };
        let info: String = redis::cmd("INFO")
            .arg("replication")
            .query_async(&mut replica)
            .await
            .unwrap_or_default();
        if info_field(&info, "master_link_status") != Some("up") {
            return false;
        }
        let Ok(mut sentinel) = self.connect(self.sentinel.port).await else {
            return false;
        };
        let replicas: Vec<std::collections::HashMap<String, String>> = redis::cmd("SENTINEL")
            .arg("REPLICAS")
            .arg(MASTER)
            .query_async(&mut sentinel)
            .await
            .unwrap_or_default();
        let port = self.replica.port.to_string();
        replicas.iter().any(|r| {
            r.get("port") == Some(&port)
                && r.get("flags").is_some_and(|f| {
                    f.split(',').any(|f| f == "slave")
                        && !f.contains("down")
                        && !f.contains("disconnected")
                })
                && r.get("master-link-status").map(String::as_str) == Some("ok")
        })
    }
}

impl Drop for Deployment {
    fn drop(&mut self) {
        self.sentinel.kill();
        self.replica.kill();
        self.primary.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The arguments that make a server listen on `port`: in cleartext, or TLS-only with `tls`
/// (replication over TLS too).
fn listen_args(port: u16, tls: Option<&Tls>) -> Vec<String> {
    let port = port.to_string();
    match tls {
        None => vec!["--port".into(), port],
        Some(tls) => [
            "--port",
            "0",
            "--tls-port",
            &port,
            "--tls-cert-file",
            &tls.cert.display().to_string(),
            "--tls-key-file",
            &tls.key.display().to_string(),
            "--tls-ca-cert-file",
            &tls.ca_file.display().to_string(),
            "--tls-auth-clients",
            "no",
            "--tls-replication",
            "yes",
        ]
        .map(str::to_owned)
        .to_vec(),
    }
}

/// The sentinel's config: quorum 1, a master down after 1 s, a quick failover; TLS-only
/// (clients, and its links to the servers) with `tls`.
fn write_sentinel_conf(
    file: &Path,
    port: u16,
    primary: u16,
    tls: Option<&Tls>,
    password: Option<&str>,
) {
    let listen = match tls {
        None => format!("port {port}\n"),
        Some(tls) => format!(
            "port 0\ntls-port {port}\ntls-cert-file {}\ntls-key-file {}\n\
             tls-ca-cert-file {}\ntls-auth-clients no\ntls-replication yes\n",
            tls.cert.display(),
            tls.key.display(),
            tls.ca_file.display()
        ),
    };
    let auth = match password {
        Some(password) => {
            format!("requirepass {password}\nsentinel auth-pass {MASTER} {password}\n")
        }
        None => String::new(),
    };
    let conf = format!(
        "{listen}bind 127.0.0.1\nprotected-mode no\ndaemonize no\n\
         dir {dir}\n\
         sentinel monitor {MASTER} 127.0.0.1 {primary} 1\n\
         sentinel down-after-milliseconds {MASTER} 1000\n\
         sentinel failover-timeout {MASTER} 5000\n\
         sentinel parallel-syncs {MASTER} 1\n",
        dir = file.parent().expect("a directory").display(),
    );
    // `auth-pass` must follow the `monitor` line that names the master.
    std::fs::write(file, conf + &auth).expect("write the sentinel's config");
}

/// Starts the process `command` makes for a free port and waits until it answers there as
/// itself (over TLS trusting `ca`, when given); one whose port was taken meanwhile is retried
/// on another, up to [`PORT_ATTEMPTS`] times.
async fn start_on_free_port(
    what: &str,
    access: &Access,
    command: impl Fn(u16) -> Command,
) -> Process {
    let mut failures = Vec::new();
    for _ in 0..PORT_ATTEMPTS {
        let port = services::free_port();
        let child = command(port)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn the {what}: {e}"));
        let mut process = Process {
            child: Some(child),
            port,
        };
        match answers_as(&mut process, access).await {
            Ok(()) => return process,
            Err(why) => {
                process.kill();
                failures.push(format!("port {port}: {why}"));
            }
        }
    }
    panic!("the {what} did not start in {PORT_ATTEMPTS} attempts: {failures:?}");
}

/// Waits until `process` answers `INFO server` on its port (over TLS trusting `ca`, when
/// given) with its own process id.
async fn answers_as(process: &mut Process, access: &Access) -> Result<(), String> {
    let child = process.child.as_mut().expect("a running process");
    let pid = format!("process_id:{}", child.id());
    let deadline = Instant::now() + READY_WITHIN;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("exited ({status}) before answering"));
        }
        if let Ok(mut conn) = connect(process.port, access).await {
            let info: redis::RedisResult<String> = redis::cmd("INFO")
                .arg("server")
                .query_async(&mut conn)
                .await;
            if let Ok(info) = info {
                return if info.lines().any(|l| l.trim() == pid) {
                    Ok(())
                } else {
                    Err("another server answers there".into())
                };
            }
        }
        if Instant::now() >= deadline {
            return Err(format!("no answer within {READY_WITHIN:?}"));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A connection to the server on loopback `port` as `access` says (TLS trusting only its CA,
/// its password), within a second.
async fn connect(port: u16, access: &Access) -> redis::RedisResult<MultiplexedConnection> {
    let password = access
        .password
        .as_ref()
        .map(|p| format!(":{p}@"))
        .unwrap_or_default();
    let client = match &access.ca {
        None => redis::Client::open(format!("redis://{password}127.0.0.1:{port}"))?,
        Some(ca) => redis::Client::build_with_tls(
            format!("rediss://{password}127.0.0.1:{port}"),
            redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(ca.as_bytes().to_vec()),
            },
        )?,
    };
    let config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(1)))
        .set_response_timeout(Some(Duration::from_secs(1)));
    client
        .get_multiplexed_async_connection_with_config(&config)
        .await
}

/// The value of `field` in an `INFO` reply.
fn info_field<'a>(info: &'a str, field: &str) -> Option<&'a str> {
    info.lines()
        .find_map(|line| line.trim().strip_prefix(field)?.strip_prefix(':'))
}
