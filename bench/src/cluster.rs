//! The cluster under test, as real processes on loopback: one or two `session-server`s (see
//! [`SessionTier`]; with two, every backend and the proxy are given both), N `demo-app`
//! backends and one front proxy (`session-proxy`, or an external nginx/HAProxy), and the Redis
//! processes the session tier needs when the harness provides its store ([`redis`]). Processes,
//! not in-process tasks, so that killing a backend really cuts its connections.
//!
//! Every child is a [`Proc`], killed (SIGKILL) and reaped when dropped, so a harness that
//! fails or panics leaves nothing running. Our own binaries start on port 0 and report where
//! they listen (`listening <role> <addr>` on stdout, see [`crate::binaries`]), so no port is
//! picked and raced for; only a restart that must come back on its old address (a backend in
//! a rolling restart, the session server after an outage: the others know them by it) names
//! that address, and is started again when the address is taken meanwhile. nginx, HAProxy and
//! Redis cannot report a port-0 bind: [`external::start_retrying`] and [`redis`] pick a port
//! and try another when it is taken. Each start waits for the process with a deadline; each
//! child's stdout and stderr go to a log file in the run's directory, whose end a failed start
//! quotes.

pub(crate) mod proc;
pub mod redis;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::time::Instant;

use crate::binaries::Binaries;
use crate::external::{self, ExternalProxy};
use crate::mode::{COOKIE_KEY, Mode, StoreChoice};
use proc::Proc;
use redis::OwnRedis;

/// Bound on any one process becoming ready: debug builds on a busy 2-core machine start in
/// well under a second, so this only catches a process that will never come up.
const START_TIMEOUT: Duration = Duration::from_secs(20);
/// Pause between two readiness probes.
const POLL: Duration = Duration::from_millis(20);
/// Where a child binds when any port will do: it reports the port it got.
const ANY_PORT: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 0);

/// Why the cluster could not be started or changed.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// A process could not be spawned.
    #[error("cannot start {what}: {source}")]
    Spawn {
        /// Which process.
        what: String,
        /// The spawn error.
        #[source]
        source: std::io::Error,
    },
    /// A process exited, or did not become ready in time.
    #[error("{what} {why}; the end of its log ({}):\n{tail}", log.display())]
    NotReady {
        /// Which process.
        what: String,
        /// Exited with which status, or timed out.
        why: String,
        /// Its log file.
        log: PathBuf,
        /// The end of what this start of the process wrote to it.
        tail: String,
    },
    /// A file of the run (log, proxy configuration) could not be written.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The external proxy could not be started.
    #[error("external proxy: {0}")]
    External(String),
    /// Something the cluster needs is missing (`redis-server`), or was asked of a cluster
    /// that does not have it.
    #[error("{0}")]
    Unavailable(String),
}

fn io_error(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ClusterError {
    let what = what.into();
    move |source| ClusterError::Io { what, source }
}

/// One backend slot: a name and an address that survive restarts of its process.
#[derive(Debug)]
struct Backend {
    /// Instance name (`x-served-by`).
    name: String,
    /// Where it listens: port 0 until its first start reports the real one.
    addr: SocketAddr,
    /// The running process, if any.
    proc: Option<Proc>,
}

/// One session server slot: an address that survives restarts of its process.
#[derive(Debug)]
struct SessionServer {
    /// Where it listens: port 0 until its first start reports the real one (the backends and
    /// the proxy know it by this address).
    addr: SocketAddr,
    /// The running process, if any.
    proc: Option<Proc>,
}

/// How many session servers a cluster runs, and on which store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionTier {
    /// One session server on the run's store ([`ClusterSpec::store`]).
    One,
    /// Two session servers on one shared store: the run's store, or, when that is the memory
    /// store (which two servers cannot share), a private Redis the cluster starts.
    TwoShared,
    /// Two session servers on a Redis primary with one replica, found through one Sentinel;
    /// all three started by the cluster, whatever the run's store.
    TwoOnSentinel,
}

impl SessionTier {
    /// Whether this tier, on `store`, needs a Redis the cluster starts (`redis-server`).
    pub fn starts_redis(self, store: &StoreChoice) -> bool {
        match self {
            SessionTier::One => false,
            SessionTier::TwoShared => *store == StoreChoice::Memory,
            SessionTier::TwoOnSentinel => true,
        }
    }
}

/// The proxy in front.
#[derive(Debug)]
enum Front {
    /// Not started yet.
    None,
    /// `session-proxy`, configured by flags plus a TOML file listing the backends.
    Stickless {
        /// The process.
        proc: Proc,
        /// Its TOML file (rewritten, then SIGHUP, to change the backends).
        config: PathBuf,
        /// Its admin API (to see which backends it has and which are up).
        admin: SocketAddr,
    },
    /// nginx or HAProxy, started by [`external`]; dropped (killed) to reconfigure.
    External(Option<ExternalProxy>),
}

/// What a cluster is made of.
#[derive(Debug, Clone)]
pub struct ClusterSpec {
    /// The binaries.
    pub bins: Binaries,
    /// The routing mode (flags of the backends and the proxy).
    pub mode: Mode,
    /// The run's store (what the session servers use, unless the tier says otherwise).
    pub store: StoreChoice,
    /// The session servers.
    pub session_tier: SessionTier,
    /// Backends at start.
    pub backends: usize,
    /// Directory for logs and configuration files (must exist).
    pub dir: PathBuf,
    /// A name unique to this run, for Redis prefixes and file names.
    pub tag: String,
}

/// A running cluster; dropping it kills every process.
#[derive(Debug)]
pub struct Cluster {
    /// How it was made.
    spec: ClusterSpec,
    /// A plain client for readiness probes (no cookies).
    http: reqwest::Client,
    /// The Redis processes the cluster started for its session tier, if any.
    redis: Option<OwnRedis>,
    /// The store the session servers run on: the spec's, or the cluster's own Redis.
    store: StoreChoice,
    /// The session servers, in the order the backends and the proxy are given them.
    session_servers: Vec<SessionServer>,
    /// Every backend slot ever configured, in order.
    backends: Vec<Backend>,
    /// Where clients connect (port 0 until the front has started).
    listen: SocketAddr,
    /// The proxy.
    front: Front,
}

impl Cluster {
    /// Starts the session server, the backends and the proxy, and waits until the proxy
    /// serves through every backend.
    pub async fn start(spec: ClusterSpec) -> Result<Cluster, ClusterError> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(2))
            .build()
            .map_err(|e| io_error("building an HTTP client")(std::io::Error::other(e)))?;
        let mut cluster = Cluster {
            redis: None,
            store: spec.store.clone(),
            session_servers: Vec::new(),
            backends: Vec::new(),
            listen: ANY_PORT,
            front: Front::None,
            http,
            spec,
        };
        cluster.start_session_tier().await?;
        for _ in 0..cluster.spec.backends {
            cluster.backends.push(Backend {
                name: format!("s{}", cluster.backends.len() + 1),
                addr: ANY_PORT,
                proc: None,
            });
        }
        // All spawned first, then waited for: they start side by side.
        for index in 0..cluster.backends.len() {
            cluster.spawn_backend(index)?;
        }
        for index in 0..cluster.backends.len() {
            cluster.wait_backend(index).await?;
        }
        cluster.start_front().await?;
        Ok(cluster)
    }

    /// The URL clients use (`http://127.0.0.1:PORT`).
    pub fn url(&self) -> String {
        format!("http://{}", self.listen)
    }

    /// The names of every backend configured so far (also killed ones).
    pub fn backend_names(&self) -> Vec<String> {
        self.backends.iter().map(|b| b.name.clone()).collect()
    }

    fn log(&self, what: &str) -> PathBuf {
        self.spec.dir.join(format!("{}-{what}.log", self.spec.tag))
    }

    /// The session servers' URLs, comma-separated, as `demo-app --session-server` and
    /// `session-proxy --session-lookup` take them.
    fn session_server_urls(&self) -> String {
        let urls: Vec<String> = self
            .session_servers
            .iter()
            .map(|server| format!("http://{}", server.addr))
            .collect();
        urls.join(",")
    }

    /// Starts the Redis processes the tier needs, then its session servers.
    async fn start_session_tier(&mut self) -> Result<(), ClusterError> {
        let tier = self.spec.session_tier;
        if tier.starts_redis(&self.spec.store) {
            let binary = redis::redis_server().map_err(ClusterError::Unavailable)?;
            let log = |what: &str| self.log(what);
            let own = match tier {
                SessionTier::TwoOnSentinel => OwnRedis::with_sentinel(&binary, log).await?,
                _ => OwnRedis::standalone(&binary, log).await?,
            };
            self.store = own.store();
            self.redis = Some(own);
        }
        let count = if tier == SessionTier::One { 1 } else { 2 };
        for index in 0..count {
            self.session_servers.push(SessionServer {
                addr: ANY_PORT,
                proc: None,
            });
            self.start_session_server(index).await?;
        }
        Ok(())
    }

    /// Starts session server `index`: on a port of its choosing the first time, on the same
    /// address again after [`Cluster::kill_session_server`].
    pub async fn start_session_server(&mut self, index: usize) -> Result<(), ClusterError> {
        let addr = self.session_servers[index].addr;
        let mut args = vec!["--listen".to_owned(), addr.to_string()];
        args.extend(self.store.server_args(&self.spec.tag));
        let name = format!("session-server-{}", index + 1);
        let (proc, addr) = Proc::start_listening(
            &self.spec.bins.session_server,
            &args,
            &name,
            &self.log(&name),
            "grpc",
            addr.port() != 0,
        )
        .await?;
        self.session_servers[index] = SessionServer {
            addr,
            proc: Some(proc),
        };
        Ok(())
    }

    /// Kills session server `index` (SIGKILL: an outage, not a shutdown).
    pub fn kill_session_server(&mut self, index: usize) {
        if let Some(server) = self.session_servers.get_mut(index) {
            server.proc = None;
        }
    }

    /// Kills the Redis primary of a [`SessionTier::TwoOnSentinel`] cluster (SIGKILL) and
    /// waits until the Sentinel has promoted the replica; an error for other tiers.
    pub async fn fail_over_store(&mut self) -> Result<(), ClusterError> {
        match &mut self.redis {
            Some(redis) => redis.fail_over().await,
            None => Err(ClusterError::Unavailable(
                "this cluster has no Redis of its own to fail over".to_owned(),
            )),
        }
    }

    fn backend_args(&self, index: usize) -> Vec<String> {
        let backend = &self.backends[index];
        let mut args = vec![
            "--listen".to_owned(),
            backend.addr.to_string(),
            "--name".to_owned(),
            backend.name.clone(),
            "--insecure-cookies".to_owned(),
        ];
        args.extend(self.spec.mode.demo_args(&self.session_server_urls()));
        args
    }

    /// Spawns backend `index` on a port of its choosing (its first start).
    fn spawn_backend(&mut self, index: usize) -> Result<(), ClusterError> {
        let args = self.backend_args(index);
        let what = format!("backend {}", self.backends[index].name);
        let log = self.log(&self.backends[index].name);
        let proc = Proc::spawn(&self.spec.bins.demo_app, &args, &what, &log)?;
        self.backends[index].proc = Some(proc);
        Ok(())
    }

    /// Waits until backend `index` reports its address (recorded) and answers its health check.
    async fn wait_backend(&mut self, index: usize) -> Result<(), ClusterError> {
        let Some(proc) = self.backends[index].proc.as_mut() else {
            return Ok(());
        };
        let addr = proc.wait_listening("http").await?;
        self.backends[index].addr = addr;
        self.wait_backend_healthy(index).await
    }

    async fn wait_backend_healthy(&mut self, index: usize) -> Result<(), ClusterError> {
        let url = format!("http://{}/healthz", self.backends[index].addr);
        let http = self.http.clone();
        let Some(proc) = self.backends[index].proc.as_mut() else {
            return Ok(());
        };
        proc.wait_ready(|| healthy(&http, &url)).await
    }

    /// Kills backend `index` (SIGKILL).
    pub fn kill_backend(&mut self, index: usize) {
        if let Some(backend) = self.backends.get_mut(index) {
            backend.proc = None;
        }
    }

    /// Starts backend `index` again on its address (the proxy knows it by that address) and
    /// waits until the proxy uses it again.
    pub async fn restart_backend(&mut self, index: usize) -> Result<(), ClusterError> {
        let args = self.backend_args(index);
        let what = format!("backend {}", self.backends[index].name);
        let log = self.log(&self.backends[index].name);
        let (proc, _) =
            Proc::start_listening(&self.spec.bins.demo_app, &args, &what, &log, "http", true)
                .await?;
        self.backends[index].proc = Some(proc);
        self.wait_backend_healthy(index).await?;
        self.wait_front_sees_all_up().await
    }

    /// Starts one more backend (on a port of its choosing) and adds it to the proxy's
    /// configuration.
    pub async fn add_backend(&mut self) -> Result<(), ClusterError> {
        self.backends.push(Backend {
            name: format!("s{}", self.backends.len() + 1),
            addr: ANY_PORT,
            proc: None,
        });
        let index = self.backends.len() - 1;
        self.spawn_backend(index)?;
        self.wait_backend(index).await?;
        match &mut self.front {
            Front::Stickless { proc, config, .. } => {
                let text = proxy_backends_toml(&self.backends);
                std::fs::write(&*config, text)
                    .map_err(io_error(format!("writing {}", config.display())))?;
                proc.hangup()?;
                self.wait_front_sees_all_up().await
            }
            Front::External(running) => {
                // nginx and HAProxy are given their backends at start: restart on the same
                // address with the longer list.
                *running = None;
                self.start_front().await
            }
            Front::None => Ok(()),
        }
    }

    /// Starts the front: on a port of its choosing the first time, on the same address when
    /// an external proxy is restarted with a new backend list.
    async fn start_front(&mut self) -> Result<(), ClusterError> {
        let Mode::External(kind) = self.spec.mode else {
            return self.start_session_proxy().await;
        };
        let addrs: Vec<SocketAddr> = self.backends.iter().map(|b| b.addr).collect();
        let dir = self
            .spec
            .dir
            .join(format!("{}-{}", self.spec.tag, self.spec.mode));
        std::fs::create_dir_all(&dir).map_err(io_error(format!("creating {}", dir.display())))?;
        let listen = Some(self.listen).filter(|addr| addr.port() != 0);
        let proxy = tokio::task::spawn_blocking(move || {
            external::start_retrying(kind, &addrs, listen, &dir)
        })
        .await
        .map_err(|e| ClusterError::External(e.to_string()))?
        .map_err(|e| ClusterError::External(e.to_string()))?;
        self.listen = proxy.listen();
        let url = format!("{}/healthz", proxy.url.trim_end_matches('/'));
        self.front = Front::External(Some(proxy));
        let http = self.http.clone();
        let deadline = Instant::now() + START_TIMEOUT;
        while !healthy(&http, &url).await {
            if Instant::now() >= deadline {
                return Err(ClusterError::External(format!(
                    "{url} did not answer 200 within {START_TIMEOUT:?}"
                )));
            }
            tokio::time::sleep(POLL).await;
        }
        Ok(())
    }

    async fn start_session_proxy(&mut self) -> Result<(), ClusterError> {
        let config = self.spec.dir.join(format!("{}-proxy.toml", self.spec.tag));
        std::fs::write(&config, proxy_backends_toml(&self.backends))
            .map_err(io_error(format!("writing {}", config.display())))?;
        let mut args: Vec<String> = [
            "--config",
            &config.to_string_lossy(),
            "--listen",
            &ANY_PORT.to_string(),
            "--admin-listen",
            &ANY_PORT.to_string(),
            // The harness is the forwarding proxy: its X-Forwarded-For is each user's address.
            "--trusted-proxies",
            "127.0.0.1/32",
            // Fast checks, so that a dead or new backend is seen within a fraction of a run.
            "--health-check",
            "http:/healthz",
            "--health-interval",
            "200ms",
            "--health-timeout",
            "500ms",
            "--health-fall",
            "1",
            "--health-rise",
            "1",
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
        if self.spec.mode == Mode::StickyCookie {
            args.extend(["--sticky-key".to_owned(), COOKIE_KEY.to_owned()]);
        }
        args.extend(self.spec.mode.proxy_args(
            &self.session_server_urls(),
            self.spec.bins.proxy_snapshot_key,
        ));
        let log = self.log("session-proxy");
        let mut proc = Proc::spawn(&self.spec.bins.session_proxy, &args, "session-proxy", &log)?;
        self.listen = proc.wait_listening("proxy").await?;
        let admin = proc.wait_listening("admin").await?;
        self.front = Front::Stickless {
            proc,
            config,
            admin,
        };
        self.wait_front_sees_all_up().await?;
        let url = format!("{}/healthz", self.url());
        let http = self.http.clone();
        if let Front::Stickless { proc, .. } = &mut self.front {
            proc.wait_ready(|| healthy(&http, &url)).await?;
        }
        Ok(())
    }

    /// Waits until `session-proxy` lists every running backend as up (no-op for external
    /// proxies, whose health state is not visible).
    async fn wait_front_sees_all_up(&mut self) -> Result<(), ClusterError> {
        let Front::Stickless { proc, admin, .. } = &mut self.front else {
            return Ok(());
        };
        let expected: Vec<String> = self
            .backends
            .iter()
            .filter(|b| b.proc.is_some())
            .map(|b| b.name.clone())
            .collect();
        let url = format!("http://{admin}/backends");
        let http = self.http.clone();
        proc.wait_ready(|| all_up(&http, &url, &expected)).await
    }
}

/// `GET url` answers 2xx.
async fn healthy(http: &reqwest::Client, url: &str) -> bool {
    http.get(url)
        .send()
        .await
        .is_ok_and(|r| r.status().is_success())
}

/// The admin API's `GET /backends` lists every name in `expected` as up.
async fn all_up(http: &reqwest::Client, url: &str, expected: &[String]) -> bool {
    let Ok(response) = http.get(url).send().await else {
        return false;
    };
    let Ok(list) = response.json::<Vec<serde_json::Value>>().await else {
        return false;
    };
    expected.iter().all(|name| {
        list.iter().any(|b| {
            b.get("name").and_then(|n| n.as_str()) == Some(name.as_str())
                && b.get("up").and_then(|u| u.as_bool()) == Some(true)
        })
    })
}

/// The proxy's TOML file: the backends only (everything else is given as flags, which a
/// SIGHUP re-applies over the re-read file).
fn proxy_backends_toml(backends: &[Backend]) -> String {
    let mut text = String::from("# Written by the comparison harness; SIGHUP re-reads it.\n");
    for backend in backends {
        text.push_str(&format!(
            "\n[[backend]]\nurl = \"http://{}\"\nname = \"{}\"\n",
            backend.addr, backend.name
        ));
    }
    text
}

/// Creates `dir` if needed.
pub(crate) fn ensure_dir(dir: &Path) -> Result<(), ClusterError> {
    std::fs::create_dir_all(dir).map_err(io_error(format!("creating {}", dir.display())))
}
