//! The cluster under attack, as the demo cluster runs it: a `session-server` on the memory
//! store with scoped tokens (the proxy reads namespace `demo`, the apps write it, and the
//! Watch flood holds a read token of its own, as a leaked or misused client would), two
//! stateless `demo-app --sessions proxy` backends, and `session-proxy` with the
//! session-lookup plugin and HTTP health checks in front. Every process binds port 0 and
//! reports its address; all are killed when the [`SoakCluster`] is dropped.

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher as _;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt as _;
use std::time::Duration;

use crate::cluster::ClusterError;
use crate::cluster::proc::Proc;
use crate::mode::Mode;

use super::SoakSettings;

/// The namespace of the honest users' sessions, which the Watch flood floods too: the one
/// demo-app and session-proxy use by default.
pub(crate) const NAMESPACE: &str = "default";
/// Backends behind the proxy.
const BACKENDS: usize = 2;
/// Where each child binds: any free loopback port, reported back.
const ANY_PORT: &str = "127.0.0.1:0";

/// The running cluster.
#[derive(Debug)]
pub(crate) struct SoakCluster {
    /// Every process (session server, backends, proxy), killed when dropped.
    _procs: Vec<Proc>,
    /// Where clients reach the proxy.
    pub(crate) proxy: SocketAddr,
    /// The proxy's admin API.
    pub(crate) admin: SocketAddr,
    /// The session server's gRPC address.
    pub(crate) session_server: SocketAddr,
    /// The read-only token of namespace `demo` the Watch flood uses.
    pub(crate) watch_token: String,
    /// The backends' names, as the proxy lists them.
    pub(crate) backends: Vec<String>,
}

impl SoakCluster {
    /// Starts the session server, the backends and the proxy, and waits until the proxy
    /// lists every backend as up and answers through them.
    pub(crate) async fn start(settings: &SoakSettings) -> Result<SoakCluster, ClusterError> {
        let dir = &settings.dir;
        let log = |name: &str| dir.join(format!("soak-{name}.log"));
        let http = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(2))
            .build()
            .map_err(|e| io_error("building an HTTP client", std::io::Error::other(e)))?;

        let (proxy_token, app_token, watch_token) = (token("proxy"), token("app"), token("watch"));
        let tokens = dir.join("soak-tokens");
        let text = format!(
            "# Written by the soak harness for one run.\n{proxy_token} {NAMESPACE} ro\n\
             {app_token} {NAMESPACE} rw\n{watch_token} {NAMESPACE} ro\n"
        );
        std::fs::write(&tokens, text)
            .and_then(|()| {
                std::fs::set_permissions(&tokens, std::fs::Permissions::from_mode(0o600))
            })
            .map_err(|e| io_error(&format!("writing {}", tokens.display()), e))?;

        let mut procs = Vec::new();
        let mut args = strings(&["--listen", ANY_PORT, "--store", "memory"]);
        args.push("--auth-token-file".to_owned());
        args.push(tokens.to_string_lossy().into_owned());
        args.push("--max-watchers-per-namespace".to_owned());
        args.push(settings.max_watchers_per_namespace.to_string());
        args.extend(settings.server_args.iter().cloned());
        let (server, session_server) = Proc::start_listening(
            &settings.bins.session_server,
            &args,
            "session-server",
            &log("session-server"),
            "grpc",
            false,
        )
        .await?;
        procs.push(server);
        let server_url = format!("http://{session_server}");

        let names: Vec<String> = (1..=BACKENDS).map(|i| format!("s{i}")).collect();
        let mut backend_procs = Vec::new();
        for name in &names {
            let mut args = strings(&["--listen", ANY_PORT, "--insecure-cookies", "--name"]);
            args.push(name.clone());
            args.extend(Mode::ProxyLookup.demo_args(&server_url));
            args.extend(["--auth-token".to_owned(), app_token.clone()]);
            let what = format!("backend {name}");
            backend_procs.push(Proc::spawn(
                &settings.bins.demo_app,
                &args,
                &what,
                &log(name),
            )?);
        }
        let mut backend_flags = Vec::new();
        for (name, mut proc) in names.iter().zip(backend_procs) {
            let addr = proc.wait_listening("http").await?;
            let url = format!("http://{addr}/healthz");
            proc.wait_ready(|| answers_200(&http, &url)).await?;
            backend_flags.extend(["--backend".to_owned(), format!("http://{addr},name={name}")]);
            procs.push(proc);
        }

        let mut args = strings(&["--listen", ANY_PORT, "--admin-listen", ANY_PORT]);
        args.extend(backend_flags);
        // The demo cluster's health checks (scripts/demo.sh).
        args.extend(strings(&[
            "--health-check",
            "http:/healthz",
            "--health-interval",
            "1s",
        ]));
        args.extend(Mode::ProxyLookup.proxy_args(&server_url, false));
        args.extend(["--session-auth-token".to_owned(), proxy_token]);
        args.extend([
            "--header-read-timeout".to_owned(),
            humantime::format_duration(settings.header_read_timeout).to_string(),
            "--body-read-timeout".to_owned(),
            humantime::format_duration(settings.body_read_timeout).to_string(),
        ]);
        args.extend(settings.proxy_args.iter().cloned());
        let mut proxy = Proc::spawn(
            &settings.bins.session_proxy,
            &args,
            "session-proxy",
            &log("session-proxy"),
        )?;
        let listen = proxy.wait_listening("proxy").await?;
        let admin = proxy.wait_listening("admin").await?;
        let admin_url = format!("http://{admin}/backends");
        let (client, url, expected) = (&http, &admin_url, &names);
        proxy
            .wait_ready(move || async move {
                backend_states(client, url).await.is_ok_and(|states| {
                    expected
                        .iter()
                        .all(|n| states.iter().any(|(name, up)| name == n && *up))
                })
            })
            .await?;
        let health = format!("http://{listen}/healthz");
        proxy.wait_ready(|| answers_200(&http, &health)).await?;
        procs.push(proxy);
        Ok(SoakCluster {
            _procs: procs,
            proxy: listen,
            admin,
            session_server,
            watch_token,
            backends: names,
        })
    }

    /// The admin API's `GET /backends`.
    pub(crate) fn admin_url(&self) -> String {
        format!("http://{}/backends", self.admin)
    }
}

/// `(name, up)` of every backend the admin API at `url` (`…/backends`) lists.
pub(crate) async fn backend_states(
    http: &reqwest::Client,
    url: &str,
) -> Result<Vec<(String, bool)>, String> {
    let response = http.get(url).send().await.map_err(|e| e.to_string())?;
    if !response.status().is_success() {
        return Err(format!("{url} answered {}", response.status()));
    }
    let list: Vec<serde_json::Value> = response.json().await.map_err(|e| e.to_string())?;
    Ok(list
        .iter()
        .filter_map(|backend| {
            let name = backend.get("name")?.as_str()?.to_owned();
            let up = backend.get("up")?.as_bool()?;
            Some((name, up))
        })
        .collect())
}

/// `GET url` answers 2xx.
async fn answers_200(http: &reqwest::Client, url: &str) -> bool {
    http.get(url)
        .send()
        .await
        .is_ok_and(|r| r.status().is_success())
}

/// A token for one run: `soak-ROLE-` and 128 bits from the standard library's random hash
/// keys (no cryptographic claim needed: the cluster lives on loopback for a minute).
fn token(role: &str) -> String {
    let random = || RandomState::new().hash_one(role);
    format!("soak-{role}-{:016x}{:016x}", random(), random())
}

fn strings(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| (*s).to_owned()).collect()
}

fn io_error(what: &str, source: std::io::Error) -> ClusterError {
    ClusterError::Io {
        what: what.to_owned(),
        source,
    }
}
