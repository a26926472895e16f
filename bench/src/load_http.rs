//! HTTP throughput and latency through `session-proxy`, and through nginx configured as the
//! same round-robin reverse proxy, to one fast in-process backend (issue 7, performance).
//!
//! The pieces the `load-http` command composes: a [`Backend`] answering every request with a
//! fixed 200 body (and counting how many carried the lookup plugin's `x-session-user`), the
//! spawned proxies ([`start_session_proxy`], [`start_nginx`]) and session server
//! ([`start_session_server`]), each a [`Spawned`] process stopped when dropped, and the load
//! drivers: `wrk` when installed ([`run_wrk`], its output parsed by [`parse_wrk`]) or a built-in
//! bounded loop of keep-alive hyper connections ([`run_builtin`]).
//!
//! Every wait is bounded: start-ups by [`START_TIMEOUT`], a load run by its duration plus
//! [`RUN_SLACK`].

use std::convert::Infallible;
use std::fmt;
use std::fs::{self, File};
use std::io;
use std::net::{SocketAddr, TcpListener as StdListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use rustix::process::{Pid, Signal, geteuid, kill_process};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::binaries::Reported;

/// The backend's answer: small, so the proxies (not the bytes) are what is measured.
pub const BACKEND_BODY: &[u8] = b"hello from the load-http backend\n";
/// Bound on a process's start-up, until it accepts (and, for proxies, answers 200).
pub const START_TIMEOUT: Duration = Duration::from_secs(15);
/// Time a load run gets beyond its duration before it is abandoned (wrk's own shutdown,
/// requests in flight at the deadline).
pub const RUN_SLACK: Duration = Duration::from_secs(30);
/// Bound on one request of the built-in loop: a stuck request counts as an error.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Time a spawned process gets to exit after SIGTERM before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);
/// Pause between two polls of a starting or stopping process.
const POLL: Duration = Duration::from_millis(20);

/// A fixed-200 HTTP/1.1 backend on the caller's tokio runtime; stops when dropped.
#[derive(Debug)]
pub struct Backend {
    /// Where it listens (127.0.0.1, a free port).
    pub addr: SocketAddr,
    /// Requests answered, and how many carried `x-session-user` (the lookup plugin worked).
    counts: Arc<Counts>,
    /// The accept loop.
    task: JoinHandle<()>,
}

#[derive(Debug, Default)]
struct Counts {
    /// Every request answered.
    requests: AtomicU64,
    /// Requests that arrived with `x-session-user`.
    with_session: AtomicU64,
}

impl Backend {
    /// Binds 127.0.0.1:0 and serves until dropped.
    pub async fn start() -> io::Result<Backend> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let counts = Arc::new(Counts::default());
        let task = tokio::spawn(serve_backend(listener, counts.clone()));
        Ok(Backend { addr, counts, task })
    }

    /// (requests answered, of which with `x-session-user`) so far.
    pub fn counts(&self) -> (u64, u64) {
        (
            self.counts.requests.load(Ordering::Relaxed),
            self.counts.with_session.load(Ordering::Relaxed),
        )
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve_backend(listener: TcpListener, counts: Arc<Counts>) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(_) => {
                // Out of file descriptors or similar: do not spin.
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let counts = counts.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                counts.requests.fetch_add(1, Ordering::Relaxed);
                if request.headers().contains_key("x-session-user") {
                    counts.with_session.fetch_add(1, Ordering::Relaxed);
                }
                let body = Full::new(Bytes::from_static(BACKEND_BODY));
                async move { Ok::<_, Infallible>(Response::new(body)) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// A spawned process (proxy, nginx master, session server): SIGTERM, a bounded wait, then
/// SIGKILL, when dropped.
#[derive(Debug)]
pub struct Spawned {
    /// For messages.
    name: String,
    /// Our child, so its pid cannot be reused before we reap it.
    child: Child,
    /// Where its output goes.
    pub log: PathBuf,
    /// The addresses it reported on stdout (our binaries: `listening <role> <addr>`).
    reported: Reported,
}

impl Spawned {
    /// Spawns `command` as `name`, its stdout and stderr into `log`.
    pub fn spawn(name: &str, command: &mut Command, log: &Path) -> Result<Spawned, String> {
        let file = File::create(log).map_err(|e| format!("{}: {e}", log.display()))?;
        let file_too = file
            .try_clone()
            .map_err(|e| format!("{}: {e}", log.display()))?;
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(file)
            .spawn()
            .map_err(|e| format!("starting {name}: {e}"))?;
        // stdout goes through a reader that records the `listening` lines, then to the log.
        let reported = match child.stdout.take() {
            Some(stdout) => Reported::tee(stdout, file_too),
            None => Reported::default(),
        };
        Ok(Spawned {
            name: name.to_owned(),
            child,
            log: log.to_owned(),
            reported,
        })
    }

    /// The end of the log, when the process has exited: why it did not start.
    fn exited(&mut self) -> Option<String> {
        let status = self.child.try_wait().ok().flatten()?;
        let log = fs::read_to_string(&self.log).unwrap_or_default();
        let tail: String = log
            .chars()
            .rev()
            .take(2000)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        Some(format!(
            "{} exited during start-up ({status}):\n{tail}",
            self.name
        ))
    }

    /// Waits (bounded) for the address one of our binaries reports for `role` once bound
    /// (started with port 0, so no port is guessed); the end of the log when it exits first.
    fn wait_reported(&mut self, role: &str) -> Result<SocketAddr, String> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(addr) = self.reported.get(role) {
                return Ok(addr);
            }
            if let Some(why) = self.exited() {
                return Err(why);
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "{} reported no {role} address within {START_TIMEOUT:?}",
                    self.name
                ));
            }
            std::thread::sleep(POLL);
        }
    }

    /// Waits (bounded) until `addr` accepts; the end of the log when the process exits first.
    pub fn wait_accepting(&mut self, addr: SocketAddr) -> Result<(), String> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(why) = self.exited() {
                return Err(why);
            }
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "{} did not accept on {addr} within {START_TIMEOUT:?}",
                    self.name
                ));
            }
            std::thread::sleep(POLL);
        }
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        if !matches!(self.child.try_wait(), Ok(None)) {
            return; // already reaped: never signal a pid that may be reused
        }
        if kill_process(Pid::from_child(&self.child), Signal::TERM).is_ok() {
            let deadline = Instant::now() + STOP_TIMEOUT;
            while Instant::now() < deadline {
                if !matches!(self.child.try_wait(), Ok(None)) {
                    return;
                }
                std::thread::sleep(POLL);
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A free loopback address (bound and released), for nginx, which cannot report a port-0
/// bind; our own binaries bind port 0 and report their address instead.
pub fn free_addr() -> io::Result<SocketAddr> {
    StdListener::bind("127.0.0.1:0")?.local_addr()
}

/// Starts `session-proxy` on a port of the OS's choosing in front of `backend` with `workers`
/// tokio worker threads (`TOKIO_WORKER_THREADS`); with `lookup`, the session-lookup plugin
/// asks that session server in namespace `namespace`. Returns the process and its address.
pub fn start_session_proxy(
    binary: &Path,
    backend: SocketAddr,
    workers: usize,
    lookup: Option<(&str, &str)>,
    extra_args: &[String],
    workdir: &Path,
) -> Result<(Spawned, SocketAddr), String> {
    let mut command = Command::new(binary);
    command.args(extra_args);
    command
        .args(["--listen", "127.0.0.1:0"])
        .arg("--backend")
        .arg(format!("http://{backend}"))
        .env("TOKIO_WORKER_THREADS", workers.to_string())
        .env("RUST_LOG", "warn");
    if let Some((url, namespace)) = lookup {
        command.args(["--session-lookup", url, "--session-namespace", namespace]);
    }
    let mut proc = Spawned::spawn(
        "session-proxy",
        &mut command,
        &workdir.join("session-proxy.log"),
    )?;
    let listen = proc.wait_reported("proxy")?;
    Ok((proc, listen))
}

/// Starts `session-server` (in-memory store) on a port of the OS's choosing. Returns the
/// process and its gRPC address.
pub fn start_session_server(
    binary: &Path,
    workdir: &Path,
) -> Result<(Spawned, SocketAddr), String> {
    let mut command = Command::new(binary);
    command
        .args(["--listen", "127.0.0.1:0"])
        .env("RUST_LOG", "warn");
    let mut proc = Spawned::spawn(
        "session-server",
        &mut command,
        &workdir.join("session-server.log"),
    )?;
    let listen = proc.wait_reported("grpc")?;
    Ok((proc, listen))
}

/// The nginx configuration: round-robin upstream (nginx's default) with a keep-alive pool,
/// `workers` worker processes, the usual forwarding headers (as session-proxy adds them),
/// everything it writes inside `workdir`.
pub fn nginx_config(
    backend: SocketAddr,
    listen: SocketAddr,
    workers: usize,
    workdir: &Path,
    root: bool,
) -> String {
    let dir = workdir.display();
    // As root, workers would run as nobody and could not write into a private temp dir.
    let user = if root {
        "user root;"
    } else {
        "# user: the caller's"
    };
    format!(
        r#"{user}
worker_processes {workers};
pid "{dir}/nginx.pid";
error_log "{dir}/error.log" warn;
events {{
    worker_connections 4096;
}}
http {{
    access_log off;
    client_body_temp_path "{dir}/client_body";
    proxy_temp_path "{dir}/proxy";
    fastcgi_temp_path "{dir}/fastcgi";
    uwsgi_temp_path "{dir}/uwsgi";
    scgi_temp_path "{dir}/scgi";
    # Client keep-alive without nginx's default cap of 1000 requests a connection, as
    # session-proxy keeps a client connection open as long as the client wants.
    keepalive_requests 1000000;
    upstream backends {{
        # Round-robin (nginx's default) over the one backend, with pooled connections.
        server {backend};
        keepalive 64;
        keepalive_requests 1000000;
    }}
    server {{
        listen {listen};
        location / {{
            proxy_pass http://backends;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            # What every nginx reverse-proxy set-up passes on, and what session-proxy always
            # sends: the client's Host, its address and the scheme, so both proxies do the
            # same header work (session-proxy also adds an RFC 7239 `Forwarded`).
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto $scheme;
            proxy_set_header X-Forwarded-Host $host;
        }}
    }}
}}
"#
    )
}

/// Starts nginx (found as `bench::external` finds it) with [`nginx_config`] in `workdir`.
pub fn start_nginx(
    backend: SocketAddr,
    listen: SocketAddr,
    workers: usize,
    workdir: &Path,
) -> Result<Spawned, String> {
    let binary = crate::external::available(crate::external::ExternalKind::NginxCookieHash)?;
    fs::create_dir_all(workdir).map_err(|e| format!("{}: {e}", workdir.display()))?;
    let workdir = workdir
        .canonicalize()
        .map_err(|e| format!("{}: {e}", workdir.display()))?;
    let config = workdir.join("nginx.conf");
    fs::write(
        &config,
        nginx_config(backend, listen, workers, &workdir, geteuid().is_root()),
    )
    .map_err(|e| format!("{}: {e}", config.display()))?;
    let mut command = Command::new(binary);
    command
        .arg("-p")
        .arg(&workdir)
        .arg("-c")
        .arg(&config)
        .arg("-e")
        .arg(workdir.join("error.log"))
        .args(["-g", "daemon off;"]);
    let mut proc = Spawned::spawn("nginx", &mut command, &workdir.join("stderr.log"))?;
    proc.wait_accepting(listen)?;
    Ok(proc)
}

/// Waits (bounded) until `url` answers 200 with `cookie` sent, e.g. until session-proxy's
/// health check has the backend up.
pub async fn wait_answering(url: &str, cookie: Option<&str>) -> Result<(), String> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()
        .map_err(|e| e.to_string())?;
    let deadline = Instant::now() + START_TIMEOUT;
    let mut last = String::from("no answer yet");
    while Instant::now() < deadline {
        let mut request = client.get(url);
        if let Some(cookie) = cookie {
            request = request.header("cookie", cookie);
        }
        match request.send().await {
            Ok(response) if response.status().is_success() => return Ok(()),
            Ok(response) => last = format!("status {}", response.status()),
            Err(error) => last = error.to_string(),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(format!(
        "{url} did not answer 200 within {START_TIMEOUT:?} ({last})"
    ))
}

/// Which load generator produced a [`LoadResult`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Driver {
    /// `wrk --latency`.
    Wrk,
    /// The built-in hyper loop.
    Builtin,
}

impl fmt::Display for Driver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Driver::Wrk => "wrk",
            Driver::Builtin => "built-in",
        })
    }
}

/// One load run's outcome.
#[derive(Debug, Clone, PartialEq)]
pub struct LoadResult {
    /// Who generated the load.
    pub driver: Driver,
    /// Completed requests.
    pub requests: u64,
    /// Completed requests per second.
    pub requests_per_sec: f64,
    /// Latency percentiles, milliseconds.
    pub p50_ms: f64,
    /// 90th percentile, ms.
    pub p90_ms: f64,
    /// 99th percentile, ms.
    pub p99_ms: f64,
    /// Non-2xx/3xx answers plus socket errors (wrk) or failed requests (built-in).
    pub errors: u64,
}

/// What to send, how hard, for how long.
#[derive(Debug, Clone)]
pub struct LoadSpec {
    /// `http://host:port/path`.
    pub url: String,
    /// Open connections.
    pub connections: usize,
    /// wrk threads (the built-in loop uses the caller's runtime).
    pub threads: usize,
    /// Length of the run.
    pub duration: Duration,
    /// `Cookie` header value to send, if any.
    pub cookie: Option<String>,
}

/// Whether `wrk` can be run.
pub fn wrk_available() -> bool {
    Command::new("wrk")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}

/// Runs `wrk --latency` (bounded by the duration plus [`RUN_SLACK`]) and parses its output.
pub async fn run_wrk(spec: &LoadSpec) -> Result<LoadResult, String> {
    let mut command = tokio::process::Command::new("wrk");
    command
        .arg(format!("-t{}", spec.threads.min(spec.connections).max(1)))
        .arg(format!("-c{}", spec.connections))
        .arg(format!("-d{}s", spec.duration.as_secs().max(1)))
        .arg("--latency");
    if let Some(cookie) = &spec.cookie {
        command.arg("-H").arg(format!("Cookie: {cookie}"));
    }
    command
        .arg(&spec.url)
        .stdin(Stdio::null())
        .kill_on_drop(true);
    let output = tokio::time::timeout(spec.duration + RUN_SLACK, command.output())
        .await
        .map_err(|_| "wrk did not finish in time".to_owned())?
        .map_err(|e| format!("running wrk: {e}"))?;
    let text = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        return Err(format!(
            "wrk failed ({}): {}{}",
            output.status,
            text,
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    parse_wrk(&text)
}

/// Parses wrk's report: `Requests/sec:`, the `--latency` distribution (50/90/99%), the
/// request count, `Non-2xx or 3xx responses:` and `Socket errors:`.
pub fn parse_wrk(text: &str) -> Result<LoadResult, String> {
    let mut result = LoadResult {
        driver: Driver::Wrk,
        requests: 0,
        requests_per_sec: f64::NAN,
        p50_ms: f64::NAN,
        p90_ms: f64::NAN,
        p99_ms: f64::NAN,
        errors: 0,
    };
    for line in text.lines().map(str::trim) {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["Requests/sec:", value] => {
                result.requests_per_sec = value.parse().map_err(|_| format!("bad line {line:?}"))?
            }
            ["50%", value] => result.p50_ms = wrk_duration_ms(value)?,
            ["90%", value] => result.p90_ms = wrk_duration_ms(value)?,
            ["99%", value] => result.p99_ms = wrk_duration_ms(value)?,
            [count, "requests", "in", ..] => {
                result.requests = count.parse().map_err(|_| format!("bad line {line:?}"))?
            }
            ["Non-2xx", "or", "3xx", "responses:", count] => {
                result.errors += count
                    .parse::<u64>()
                    .map_err(|_| format!("bad line {line:?}"))?;
            }
            ["Socket", "errors:", rest @ ..] => {
                // connect N, read N, write N, timeout N
                for number in rest
                    .iter()
                    .filter_map(|w| w.trim_end_matches(',').parse::<u64>().ok())
                {
                    result.errors += number;
                }
            }
            _ => {}
        }
    }
    if result.requests_per_sec.is_nan() || result.p99_ms.is_nan() {
        return Err(format!(
            "no Requests/sec or latency distribution in wrk's output:\n{text}"
        ));
    }
    Ok(result)
}

/// `812.00us`, `1.23ms`, `2.00s`, `1.00m` in milliseconds.
fn wrk_duration_ms(text: &str) -> Result<f64, String> {
    let split = text
        .find(|c: char| c.is_ascii_alphabetic())
        .ok_or_else(|| format!("no unit in {text:?}"))?;
    let (number, unit) = text.split_at(split);
    let number: f64 = number
        .parse()
        .map_err(|_| format!("bad number in {text:?}"))?;
    let factor = match unit {
        "us" => 0.001,
        "ms" => 1.0,
        "s" => 1000.0,
        "m" => 60_000.0,
        "h" => 3_600_000.0,
        _ => return Err(format!("unknown unit in {text:?}")),
    };
    Ok(number * factor)
}

/// The built-in load loop: `connections` keep-alive HTTP/1.1 connections on the caller's
/// runtime, each sending GETs back to back until the duration is over (a request still
/// running then is not counted); reconnects after an error. Bounded by the duration plus
/// [`REQUEST_TIMEOUT`].
pub async fn run_builtin(spec: &LoadSpec) -> Result<LoadResult, String> {
    let uri: hyper::Uri = spec
        .url
        .parse()
        .map_err(|e| format!("bad url {}: {e}", spec.url))?;
    let authority = uri.authority().ok_or("url without host:port")?.to_string();
    let addr: SocketAddr = authority.parse().map_err(|e| format!("{authority}: {e}"))?;
    let path = uri.path_and_query().map_or("/", |p| p.as_str()).to_owned();
    let started = Instant::now();
    let deadline = started + spec.duration;
    let workers: Vec<_> = (0..spec.connections)
        .map(|_| {
            let (authority, path, cookie) = (authority.clone(), path.clone(), spec.cookie.clone());
            tokio::spawn(builtin_connection(addr, authority, path, cookie, deadline))
        })
        .collect();
    let mut histogram = new_histogram()?;
    let mut errors = 0;
    for worker in workers {
        let (part, part_errors) = worker.await.map_err(|e| format!("load task: {e}"))?;
        histogram.add(part).map_err(|e| e.to_string())?;
        errors += part_errors;
    }
    let elapsed = started
        .elapsed()
        .as_secs_f64()
        .min(spec.duration.as_secs_f64())
        .max(1e-9);
    let ms = |q: f64| histogram.value_at_quantile(q) as f64 / 1000.0;
    Ok(LoadResult {
        driver: Driver::Builtin,
        requests: histogram.len(),
        requests_per_sec: histogram.len() as f64 / elapsed,
        p50_ms: ms(0.50),
        p90_ms: ms(0.90),
        p99_ms: ms(0.99),
        errors,
    })
}

/// Latencies in microseconds, 1 µs to 60 s, 3 significant digits.
fn new_histogram() -> Result<hdrhistogram::Histogram<u64>, String> {
    hdrhistogram::Histogram::new_with_bounds(1, 60_000_000, 3).map_err(|e| e.to_string())
}

async fn builtin_connection(
    addr: SocketAddr,
    authority: String,
    path: String,
    cookie: Option<String>,
    deadline: Instant,
) -> (hdrhistogram::Histogram<u64>, u64) {
    let mut histogram = new_histogram().expect("valid histogram bounds");
    let mut errors = 0;
    'connect: while Instant::now() < deadline {
        let Ok(Ok(stream)) =
            tokio::time::timeout(REQUEST_TIMEOUT, tokio::net::TcpStream::connect(addr)).await
        else {
            errors += 1;
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let _ = stream.set_nodelay(true);
        let Ok((mut sender, connection)) =
            hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(stream)).await
        else {
            errors += 1;
            continue;
        };
        let driver = tokio::spawn(connection);
        while Instant::now() < deadline {
            let mut request = Request::get(path.as_str()).header("host", authority.as_str());
            if let Some(cookie) = &cookie {
                request = request.header("cookie", cookie.as_str());
            }
            let Ok(request) = request.body(Empty::new()) else {
                errors += 1;
                break 'connect;
            };
            let sent = Instant::now();
            let answer = tokio::time::timeout(REQUEST_TIMEOUT, async {
                let response = sender.send_request(request).await.map_err(|_| ())?;
                let ok = response.status().is_success();
                response.into_body().collect().await.map_err(|_| ())?;
                if ok { Ok(()) } else { Err(()) }
            })
            .await;
            if Instant::now() > deadline {
                break; // finished after the end: not part of the measured window
            }
            match answer {
                Ok(Ok(())) => {
                    let micros = u64::try_from(sent.elapsed().as_micros()).unwrap_or(u64::MAX);
                    let _ = histogram.record(micros.max(1));
                }
                _ => {
                    errors += 1;
                    driver.abort();
                    continue 'connect;
                }
            }
        }
        driver.abort();
    }
    (histogram, errors)
}

/// The median of `values` (mean of the middle two for an even count); NaN when empty.
pub fn median(values: &[f64]) -> f64 {
    let mut sorted: Vec<f64> = values.iter().copied().filter(|v| !v.is_nan()).collect();
    sorted.sort_by(f64::total_cmp);
    match sorted.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrk_report_is_parsed() {
        let text = "Running 10s test @ http://127.0.0.1:8080/
  2 threads and 64 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     1.50ms  400.00us  20.00ms   90.00%
    Req/Sec    20.00k     1.00k   22.00k    70.00%
  Latency Distribution
     50%  812.00us
     75%    1.20ms
     90%    2.00ms
     99%    1.10s
  400000 requests in 10.00s, 50.00MB read
  Socket errors: connect 0, read 2, write 0, timeout 1
  Non-2xx or 3xx responses: 4
Requests/sec:  39999.50
Transfer/sec:      5.00MB
";
        let result = parse_wrk(text).unwrap();
        assert_eq!(result.requests, 400_000);
        assert!((result.requests_per_sec - 39_999.5).abs() < 1e-9);
        assert!((result.p50_ms - 0.812).abs() < 1e-9);
        assert!((result.p90_ms - 2.0).abs() < 1e-9);
        assert!((result.p99_ms - 1100.0).abs() < 1e-9);
        assert_eq!(result.errors, 7);
    }

    #[test]
    fn median_of_three_is_the_middle_one() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[1.0, 4.0]), 2.5);
    }
}
