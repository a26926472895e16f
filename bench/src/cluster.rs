//! The cluster under test, as real processes on loopback: one `session-server`, N `demo-app`
//! backends and one front proxy (`session-proxy`, or an external nginx/HAProxy). Processes,
//! not in-process tasks, so that killing a backend really cuts its connections.
//!
//! Every child is a [`Proc`], killed (SIGKILL) and reaped when dropped, so a harness that
//! fails or panics leaves nothing running. Each start waits for the process to answer, with a
//! deadline; each child's stdout and stderr go to a log file in the run's directory.

use std::ffi::OsString;
use std::fs::File;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tokio::time::Instant;

use crate::binaries::Binaries;
use crate::external::{self, ExternalProxy};
use crate::mode::{COOKIE_KEY, Mode, StoreChoice};

/// Bound on any one process becoming ready: debug builds on a busy 2-core machine start in
/// well under a second, so this only catches a process that will never come up.
const START_TIMEOUT: Duration = Duration::from_secs(20);
/// Pause between two readiness probes.
const POLL: Duration = Duration::from_millis(20);

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
    #[error("{what} {why} (its log: {})", log.display())]
    NotReady {
        /// Which process.
        what: String,
        /// Exited with which status, or timed out.
        why: String,
        /// Its log file.
        log: PathBuf,
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
}

fn io_error(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ClusterError {
    let what = what.into();
    move |source| ClusterError::Io { what, source }
}

/// A loopback address nobody listens on right now (bind port 0, read it, let it go).
pub fn free_addr() -> Result<SocketAddr, ClusterError> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map_err(io_error("reserving a loopback port"))
}

/// A child process, killed and reaped when dropped.
#[derive(Debug)]
pub(crate) struct Proc {
    /// What it is, for messages (`backend s2`).
    what: String,
    /// The process.
    child: Child,
    /// Its stdout and stderr.
    log: PathBuf,
}

impl Proc {
    /// Spawns `program args` with stdout and stderr appended to `log`, and without the
    /// environment variables the project's binaries read (a developer's shell may set them).
    fn spawn(
        program: &Path,
        args: &[String],
        what: &str,
        log: &Path,
    ) -> Result<Proc, ClusterError> {
        let file = File::options()
            .create(true)
            .append(true)
            .open(log)
            .map_err(io_error(format!("opening {}", log.display())))?;
        let err_file = file
            .try_clone()
            .map_err(io_error(format!("opening {}", log.display())))?;
        let mut command = Command::new(program);
        command
            .args(args)
            .stdin(Stdio::null())
            .stdout(file)
            .stderr(err_file)
            .env("RUST_LOG", "warn");
        let inherited: Vec<OsString> = std::env::vars_os()
            .map(|(key, _)| key)
            .filter(|key| {
                let key = key.to_string_lossy();
                key.starts_with("STICKLESS_") || key.starts_with("DEMO_")
            })
            .collect();
        for key in inherited {
            command.env_remove(key);
        }
        let child = command.spawn().map_err(|source| ClusterError::Spawn {
            what: format!("{what} ({})", program.display()),
            source,
        })?;
        tracing::debug!(what, pid = child.id(), "started");
        Ok(Proc {
            what: what.to_owned(),
            child,
            log: log.to_owned(),
        })
    }

    /// An error if the process has exited.
    fn check_alive(&mut self) -> Result<(), ClusterError> {
        match self.child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => Err(self.not_ready(format!("exited ({status})"))),
            Err(error) => Err(self.not_ready(format!("cannot be watched ({error})"))),
        }
    }

    fn not_ready(&self, why: String) -> ClusterError {
        ClusterError::NotReady {
            what: self.what.clone(),
            why,
            log: self.log.clone(),
        }
    }

    /// Polls `ready` until it holds, failing when the process exits or `START_TIMEOUT` passes.
    async fn wait_ready<F, Fut>(&mut self, mut ready: F) -> Result<(), ClusterError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = bool>,
    {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            self.check_alive()?;
            if ready().await {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(self.not_ready(format!("not ready within {START_TIMEOUT:?}")));
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Sends SIGHUP (the proxy re-reads its configuration).
    fn hangup(&self) -> Result<(), ClusterError> {
        let pid = rustix::process::Pid::from_child(&self.child);
        rustix::process::kill_process(pid, rustix::process::Signal::HUP)
            .map_err(|errno| io_error(format!("SIGHUP to {}", self.what))(errno.into()))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        // SIGKILL: a crash, not a shutdown. Its connections are cut at once.
        let _ = self.child.kill();
        let _ = self.child.wait();
        tracing::debug!(what = %self.what, "killed");
    }
}

/// One backend slot: a name and port that survive restarts of its process.
#[derive(Debug)]
struct Backend {
    /// Instance name (`x-served-by`).
    name: String,
    /// Where it listens.
    addr: SocketAddr,
    /// The running process, if any.
    proc: Option<Proc>,
}

/// The proxy in front.
#[derive(Debug)]
enum Front {
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
    /// The session server's store.
    pub store: StoreChoice,
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
    /// Where the session server listens (kept across its restarts).
    store_addr: SocketAddr,
    /// The session server, when running.
    store: Option<Proc>,
    /// Every backend slot ever configured, in order.
    backends: Vec<Backend>,
    /// Where clients connect.
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
            store_addr: free_addr()?,
            store: None,
            backends: Vec::new(),
            listen: free_addr()?,
            front: Front::External(None),
            http,
            spec,
        };
        cluster.start_store().await?;
        for _ in 0..cluster.spec.backends {
            cluster.backends.push(Backend {
                name: format!("s{}", cluster.backends.len() + 1),
                addr: free_addr()?,
                proc: None,
            });
        }
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

    fn session_server_url(&self) -> String {
        format!("http://{}", self.store_addr)
    }

    /// Starts (or restarts, on the same port) the session server.
    pub async fn start_store(&mut self) -> Result<(), ClusterError> {
        let mut args = vec!["--listen".to_owned(), self.store_addr.to_string()];
        args.extend(self.spec.store.server_args(&self.spec.tag));
        let log = self.log("session-server");
        let mut proc = Proc::spawn(
            &self.spec.bins.session_server,
            &args,
            "session-server",
            &log,
        )?;
        let addr = self.store_addr;
        proc.wait_ready(|| async move { tokio::net::TcpStream::connect(addr).await.is_ok() })
            .await?;
        self.store = Some(proc);
        Ok(())
    }

    /// Kills the session server (SIGKILL: an outage, not a shutdown).
    pub fn kill_store(&mut self) {
        self.store = None;
    }

    fn spawn_backend(&mut self, index: usize) -> Result<(), ClusterError> {
        let url = self.session_server_url();
        let backend = &self.backends[index];
        let mut args = vec![
            "--listen".to_owned(),
            backend.addr.to_string(),
            "--name".to_owned(),
            backend.name.clone(),
            "--insecure-cookies".to_owned(),
        ];
        args.extend(self.spec.mode.demo_args(&url));
        let what = format!("backend {}", backend.name);
        let log = self.log(&backend.name);
        let proc = Proc::spawn(&self.spec.bins.demo_app, &args, &what, &log)?;
        self.backends[index].proc = Some(proc);
        Ok(())
    }

    async fn wait_backend(&mut self, index: usize) -> Result<(), ClusterError> {
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

    /// Starts backend `index` again on its port and waits until the proxy uses it again.
    pub async fn restart_backend(&mut self, index: usize) -> Result<(), ClusterError> {
        self.spawn_backend(index)?;
        self.wait_backend(index).await?;
        self.wait_front_sees_all_up().await
    }

    /// Starts one more backend and adds it to the proxy's configuration.
    pub async fn add_backend(&mut self) -> Result<(), ClusterError> {
        self.backends.push(Backend {
            name: format!("s{}", self.backends.len() + 1),
            addr: free_addr()?,
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
        }
    }

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
        let (listen, http) = (self.listen, self.http.clone());
        let proxy =
            tokio::task::spawn_blocking(move || external::start(kind, &addrs, listen, &dir))
                .await
                .map_err(|e| ClusterError::External(e.to_string()))?
                .map_err(|e| ClusterError::External(e.to_string()))?;
        let url = format!("{}/healthz", proxy.url.trim_end_matches('/'));
        self.front = Front::External(Some(proxy));
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
        let admin = free_addr()?;
        let mut args: Vec<String> = [
            "--config",
            &config.to_string_lossy(),
            "--listen",
            &self.listen.to_string(),
            "--admin-listen",
            &admin.to_string(),
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
            &self.session_server_url(),
            self.spec.bins.proxy_snapshot_key,
        ));
        let log = self.log("session-proxy");
        let proc = Proc::spawn(&self.spec.bins.session_proxy, &args, "session-proxy", &log)?;
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
