//! No single point in the session tier (issue 14): two session-server processes on one Redis,
//! one of them killed (SIGKILL) under load.
//!
//! - Behind `session-client` directly: 20 users read and compare-and-set their sessions for
//!   2 s; one server is killed at 40%: no call fails, no acknowledged write is lost; the
//!   killed server started again on its address is probed back (`grpc.health.v1`) and takes
//!   calls again.
//! - Behind `session-proxy --session-lookup A,B` with `demo-app --sessions proxy
//!   --session-server A,B`: 20 users logged in, then `/me` and `/cart/add` for 2 s; one server
//!   killed at 40%: every request answered 200 as the logged-in user, every acknowledged cart
//!   item still in the cart.
//!
//! Real binaries (found or built by `bench::binaries::Binaries`), the Redis at 127.0.0.1:6379
//! with a key prefix of the test's own (the skip rule applies: `SKIPPED <test>: why`, or a
//! failure under `STICKLESS_REQUIRE_SERVICES=1`).

mod support;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bench::binaries::{Binaries, Reported};
use session_client::{ClientConfig, ClientError, Patch, SessionClient};

/// Simulated users.
const USERS: usize = 20;
/// Load duration.
const LOAD: Duration = Duration::from_secs(2);
/// When, into the load, one session server is killed.
const KILL_AT: Duration = Duration::from_millis(800);
/// Pause between two requests of one user.
const THINK: Duration = Duration::from_millis(5);
/// Bound on anything the test waits for (a process to start, a probe to bring a server back).
const WITHIN: Duration = Duration::from_secs(30);

/// A `session-server` process on the shared Redis; killed (SIGKILL) when dropped.
struct Server {
    _proc: Proc,
    addr: SocketAddr,
}

impl Server {
    /// Starts one on `listen` (port 0: a port of its choosing) with Redis key prefix `prefix`.
    fn start(bins: &Binaries, listen: SocketAddr, prefix: &str) -> Server {
        let args: Vec<String> = [
            "--listen",
            &listen.to_string(),
            "--metrics-listen",
            "127.0.0.1:0",
            "--store",
            "redis",
            "--redis-url",
            "redis://127.0.0.1:6379",
            "--redis-prefix",
            prefix,
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
        let (proc, addr) = Proc::start(&bins.session_server, &args, "grpc");
        Server { _proc: proc, addr }
    }

    /// `http://addr`.
    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

/// A process of the test (session server, proxy, backend); killed (SIGKILL) when dropped.
struct Proc {
    child: Child,
    reported: Reported,
}

impl Proc {
    /// Starts `program` with `args` and waits for its `listening <role>` address.
    fn start(program: &std::path::Path, args: &[String], role: &str) -> (Proc, SocketAddr) {
        let mut child = Command::new(program)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("{} starts: {e}", program.display()));
        let stdout = child.stdout.take().expect("piped stdout");
        let mut proc = Proc {
            reported: Reported::tee(stdout, std::io::sink()),
            child,
        };
        let deadline = Instant::now() + WITHIN;
        loop {
            if let Some(addr) = proc.reported.get(role) {
                return (proc, addr);
            }
            if let Ok(Some(status)) = proc.child.try_wait() {
                panic!(
                    "{} {args:?} exited before listening: {status}",
                    program.display()
                );
            }
            assert!(
                Instant::now() < deadline,
                "{} never reported its {role} address",
                program.display()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The binaries and a Redis key prefix of this test's own, or `None` when Redis is missing
/// (after the skip rule).
fn setup(test: &str) -> Option<(Binaries, String)> {
    let redis = std::net::TcpStream::connect_timeout(
        &SocketAddr::from(([127, 0, 0, 1], 6379)),
        Duration::from_secs(2),
    );
    if let Err(e) = redis {
        support::skip_or_fail(test, &format!("no Redis at 127.0.0.1:6379 ({e})"));
        return None;
    }
    let bins = Binaries::locate().expect("the binaries are there or can be built");
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    Some((
        bins,
        format!("stickless-tier-{test}-{}-{nanos}", std::process::id()),
    ))
}

/// Removes the test's keys.
async fn clean(prefix: &str) {
    let Ok(client) = redis::Client::open("redis://127.0.0.1:6379") else {
        return;
    };
    let Ok(mut conn) = client.get_multiplexed_async_connection().await else {
        return;
    };
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}*"))
        .query_async(&mut conn)
        .await
        .unwrap_or_default();
    for key in keys {
        let _: redis::RedisResult<()> = redis::cmd("DEL").arg(key).query_async(&mut conn).await;
    }
}

/// A client of both servers with generous timeouts (a loaded machine is slow, not down).
fn client(urls: &[String]) -> SessionClient {
    let mut config = ClientConfig::new(urls.join(","));
    config.namespace = "tier".into();
    config.timeout = Duration::from_secs(5);
    config.connect_timeout = Duration::from_secs(2);
    SessionClient::connect_lazy(config).expect("client settings")
}

/// What one user saw.
#[derive(Debug, Default)]
struct Tally {
    /// Calls or requests that failed, with why.
    failures: Vec<String>,
    /// Writes acknowledged.
    acknowledged: u64,
    /// Compare-and-set writes answered ABORTED: a replay on the other server of a write the
    /// dying server may have applied before it could answer (applied or not: unknown).
    uncertain: u64,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_of_two_session_servers_loses_nothing_when_one_is_killed() {
    let test = "a_client_of_two_session_servers_loses_nothing_when_one_is_killed";
    let Some((bins, prefix)) = setup(test) else {
        return;
    };
    let mut servers = [
        Some(Server::start(&bins, ([127, 0, 0, 1], 0).into(), &prefix)),
        Some(Server::start(&bins, ([127, 0, 0, 1], 0).into(), &prefix)),
    ];
    let urls: Vec<String> = servers.iter().flatten().map(Server::url).collect();
    let victim_addr = servers[0].as_ref().unwrap().addr;
    let client = client(&urls);

    // Every user logs in before the load: a create is not replayed once it may have reached a
    // server, so one in flight on the server that dies would fail (as with any gRPC client).
    let mut ids = Vec::new();
    for user in 0..USERS {
        let session = client
            .create(
                &format!("u{user}"),
                HashMap::new(),
                Some(Duration::from_secs(600)),
            )
            .await
            .expect("create before the load");
        ids.push(session.id);
    }

    let stop = Arc::new(AtomicBool::new(false));
    let calls = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for id in ids.clone() {
        let client = client.clone();
        let stop = stop.clone();
        let calls = calls.clone();
        tasks.push(tokio::spawn(async move {
            let mut tally = Tally::default();
            while !stop.load(Ordering::Relaxed) {
                calls.fetch_add(1, Ordering::Relaxed);
                let session = match client.get(&id, true).await {
                    Ok(session) => session,
                    Err(e) => {
                        tally.failures.push(format!("get: {e}"));
                        continue;
                    }
                };
                let count = counter(&session.attrs);
                let patch = Patch {
                    set: HashMap::from([("n".to_owned(), (count + 1).to_string().into_bytes())]),
                    expected_version: Some(session.version),
                    ..Patch::default()
                };
                match client.update(&id, patch).await {
                    Ok(_) => tally.acknowledged += 1,
                    Err(ClientError::Conflict(_)) => tally.uncertain += 1,
                    Err(e) => tally.failures.push(format!("update: {e}")),
                }
                tokio::time::sleep(THINK).await;
            }
            tally
        }));
    }
    tokio::time::sleep(KILL_AT).await;
    servers[0] = None; // SIGKILL
    tokio::time::sleep(LOAD - KILL_AT).await;
    stop.store(true, Ordering::Relaxed);
    let mut failures = Vec::new();
    let mut acknowledged = Vec::new();
    for task in tasks {
        let tally = task.await.expect("user task");
        failures.extend(tally.failures);
        acknowledged.push((tally.acknowledged, tally.uncertain));
    }
    assert!(
        failures.is_empty(),
        "{} of {} rounds failed: {:?}",
        failures.len(),
        calls.load(Ordering::Relaxed),
        &failures[..failures.len().min(5)]
    );
    // No acknowledged write lost, none applied twice: each counter is the number of
    // acknowledged writes, plus at most the one write whose outcome the kill left unknown (a
    // user's increments are sequential; its replay on the other server found the version
    // moved and was ABORTED).
    for (id, (acknowledged, uncertain)) in ids.iter().zip(&acknowledged) {
        let session = client.get(id, false).await.expect("read after the load");
        let n = counter(&session.attrs);
        assert!(
            (*acknowledged..=acknowledged + uncertain).contains(&n) && *uncertain <= 1,
            "session {id}: counter {n}, {acknowledged} acknowledged, {uncertain} uncertain"
        );
    }
    let total: u64 = acknowledged.iter().map(|(a, _)| a).sum();
    assert!(total > USERS as u64, "the load ran");
    let states = client.endpoints();
    let victim = states
        .iter()
        .find(|s| s.label.contains(&victim_addr.to_string()))
        .expect("the killed server is a member");
    assert!(!victim.healthy, "the killed server is ejected: {states:?}");

    // Back on its address: the probe takes it back, and calls go to it again.
    servers[0] = Some(Server::start(&bins, victim_addr, &prefix));
    let deadline = Instant::now() + WITHIN;
    let answered_before = loop {
        let states = client.endpoints();
        let victim = states
            .iter()
            .find(|s| s.label.contains(&victim_addr.to_string()))
            .expect("member");
        if victim.healthy {
            break victim.answered;
        }
        assert!(Instant::now() < deadline, "never probed back: {states:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    for _ in 0..100 {
        client
            .get(&ids[0], false)
            .await
            .expect("read once both are up");
    }
    let answered_after = client
        .endpoints()
        .iter()
        .find(|s| s.label.contains(&victim_addr.to_string()))
        .expect("member")
        .answered;
    assert!(
        answered_after - answered_before >= 10,
        "the server that came back takes calls again: {} of 100",
        answered_after - answered_before
    );
    clean(&prefix).await;
}

/// The counter attribute `n` of a session (0 when unset).
fn counter(attrs: &HashMap<String, Vec<u8>>) -> u64 {
    attrs
        .get("n")
        .and_then(|v| std::str::from_utf8(v).ok()?.parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_and_its_backends_lose_nobody_when_one_of_two_session_servers_is_killed() {
    let test = "the_proxy_and_its_backends_lose_nobody_when_one_of_two_session_servers_is_killed";
    let Some((bins, prefix)) = setup(test) else {
        return;
    };
    let mut servers = [
        Some(Server::start(&bins, ([127, 0, 0, 1], 0).into(), &prefix)),
        Some(Server::start(&bins, ([127, 0, 0, 1], 0).into(), &prefix)),
    ];
    let urls = servers
        .iter()
        .flatten()
        .map(Server::url)
        .collect::<Vec<_>>()
        .join(",");
    let mut backends = Vec::new();
    for name in ["s1", "s2"] {
        let args: Vec<String> = [
            "--listen",
            "127.0.0.1:0",
            "--name",
            name,
            "--insecure-cookies",
            "--sessions",
            "proxy",
            "--session-server",
            &urls,
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
        backends.push(Proc::start(&bins.demo_app, &args, "http"));
    }
    let mut args: Vec<String> = ["--listen", "127.0.0.1:0", "--session-lookup", &urls]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
    args.extend(["--session-attr".into(), "cart".into()]);
    for (_, addr) in &backends {
        args.extend(["--backend".into(), format!("http://{addr}")]);
    }
    let (_proxy, front) = Proc::start(&bins.session_proxy, &args, "proxy");
    let base = format!("http://{front}");

    // Logged in before the load (a login is a create; see the client test).
    let mut users = Vec::new();
    for user in 0..USERS {
        let http = reqwest::Client::builder()
            .cookie_store(true)
            .timeout(Duration::from_secs(10))
            .build()
            .expect("HTTP client");
        let name = format!("u{user}");
        let deadline = Instant::now() + WITHIN;
        loop {
            let reply = http
                .post(format!("{base}/login"))
                .form(&[("user", name.as_str())])
                .send()
                .await;
            if reply.is_ok_and(|r| r.status().is_success()) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "login through the proxy never worked"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        users.push((http, name));
    }

    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for (http, name) in users {
        let stop = stop.clone();
        let base = base.clone();
        tasks.push(tokio::spawn(async move {
            let mut tally = Tally::default();
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                match me(&http, &base).await {
                    Ok(user) if user == name => {}
                    Ok(other) => tally.failures.push(format!("/me answered {other}")),
                    Err(e) => tally.failures.push(format!("/me: {e}")),
                }
                let item = format!("{name}-{n}");
                n += 1;
                let reply = http
                    .post(format!("{base}/cart/add"))
                    .form(&[("item", item.as_str())])
                    .send()
                    .await;
                match reply {
                    Ok(r) if r.status().is_success() => tally.acknowledged += 1,
                    Ok(r) => tally
                        .failures
                        .push(format!("/cart/add answered {}", r.status())),
                    Err(e) => tally.failures.push(format!("/cart/add: {e}")),
                }
                tokio::time::sleep(THINK).await;
            }
            (http, tally)
        }));
    }
    tokio::time::sleep(KILL_AT).await;
    servers[0] = None; // SIGKILL
    tokio::time::sleep(LOAD - KILL_AT).await;
    stop.store(true, Ordering::Relaxed);
    let mut failures = Vec::new();
    let mut total = 0;
    for task in tasks {
        let (http, tally) = task.await.expect("user task");
        failures.extend(tally.failures);
        total += tally.acknowledged;
        // Every acknowledged item is in the cart.
        let cart: serde_json::Value = http
            .get(format!("{base}/cart"))
            .send()
            .await
            .expect("cart after the load")
            .json()
            .await
            .expect("cart JSON");
        let items = cart["items"].as_array().map_or(0, Vec::len) as u64;
        assert_eq!(items, tally.acknowledged, "cart items vs acknowledged adds");
    }
    assert!(
        failures.is_empty(),
        "{} failures: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    assert!(total > USERS as u64, "the load ran");
    clean(&prefix).await;
}

/// The user `/me` answers for, or why not.
async fn me(http: &reqwest::Client, base: &str) -> Result<String, String> {
    let reply = http
        .get(format!("{base}/me"))
        .send()
        .await
        .map_err(|e| e.to_string())?;
    let status = reply.status();
    let body: serde_json::Value = reply.json().await.map_err(|e| e.to_string())?;
    if !status.is_success() {
        return Err(format!("{status}: {body}"));
    }
    body["user"]
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| format!("no user in {body}"))
}
