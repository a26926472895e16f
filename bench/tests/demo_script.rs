//! `scripts/demo.sh`, the demo cluster without Docker (README, "Demo cluster"), run as a person
//! runs it, on free ports (`--port-base 0`) with the binaries the tests use (`--bin-dir`), and
//! probed through each door: a login through the door is seen on the next requests through it;
//! when the backend the user is on is killed, the plugin door (session-proxy with the lookup
//! plugin, sessions in the store) keeps the user logged in while the nginx `ip_hash` and
//! HAProxy sticky-cookie doors (sessions inside one backend) lose the session. SIGTERM stops
//! the script, and with it every process it started.
//!
//! nginx and HAProxy doors exist only where those are installed: a missing one follows the
//! skip rule (`SKIPPED`, or a failure under `STICKLESS_REQUIRE_SERVICES=1`), as does a missing
//! curl (the script needs it) or Redis for the `--store redis` test.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use bench::Binaries;
use bench::external::{ExternalKind, available};
use rustix::process::{Pid, Signal, kill_process, kill_process_group};
use support::{Reply, request, skip_or_fail, try_request};

/// Bound on the script bringing everything up (about ten debug processes, nginx and HAProxy)
/// on a loaded machine.
const START_TIMEOUT: Duration = Duration::from_secs(120);
/// Bound on anything else the tests wait for: a killed backend gone, the script stopped.
const WAIT: Duration = Duration::from_secs(30);
/// Pause between two polls.
const POLL: Duration = Duration::from_millis(50);

/// What the script wrote to its `--ready-file`.
#[derive(Debug, Default)]
struct Ready {
    /// Door name (`plugin`, `nginx`, `haproxy`) -> address.
    doors: BTreeMap<String, SocketAddr>,
    /// session-proxy's admin API.
    admin: Option<SocketAddr>,
    /// Backend name (`app-1`, `local-iphash-2`, ...) -> address.
    backends: BTreeMap<String, SocketAddr>,
    /// Process name -> pid.
    procs: BTreeMap<String, i32>,
    /// Its run directory (logs), removed when it stops.
    run: Option<PathBuf>,
}

impl Ready {
    fn parse(text: &str) -> Ready {
        let addr = |url: &str| -> SocketAddr {
            url.trim_start_matches("http://")
                .parse()
                .unwrap_or_else(|e| panic!("{url}: {e}"))
        };
        let mut ready = Ready::default();
        for line in text.lines() {
            let words: Vec<&str> = line.split(' ').collect();
            match words.as_slice() {
                ["door", name, url] => {
                    ready.doors.insert((*name).to_owned(), addr(url));
                }
                ["admin", url] => ready.admin = Some(addr(url)),
                ["backend", name, url] => {
                    ready.backends.insert((*name).to_owned(), addr(url));
                }
                ["proc", name, pid] => {
                    ready.procs.insert((*name).to_owned(), pid.parse().unwrap());
                }
                ["run", dir] => ready.run = Some(PathBuf::from(dir)),
                _ => panic!("unexpected line in the ready file: {line:?}"),
            }
        }
        ready
    }
}

/// A running `scripts/demo.sh`, leading its own process group; killed with everything it
/// started (SIGKILL to the group) if a test fails before stopping it.
struct Demo {
    /// The script's bash.
    child: Child,
    /// Where its stdout and stderr go.
    output: PathBuf,
    /// What it reported once up.
    ready: Ready,
    /// Holds the ready file and the output.
    _dir: tempfile::TempDir,
}

impl Demo {
    /// Starts the script with `args` on free ports and waits until it has written its ready
    /// file; panics with its output when it exits first or is too slow.
    fn start(args: &[&str]) -> Demo {
        let bins = Binaries::locate().unwrap_or_else(|e| panic!("{e}"));
        let bin_dir = bins
            .session_server
            .parent()
            .expect("a directory")
            .to_owned();
        let dir = tempfile::tempdir().unwrap();
        let ready_file = dir.path().join("ready");
        let output = dir.path().join("output.log");
        let log = std::fs::File::create(&output).unwrap();
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/demo.sh");
        let mut command = Command::new("bash");
        command
            .arg(&script)
            .args(["--port-base", "0", "--bin-dir"])
            .arg(&bin_dir)
            .arg("--ready-file")
            .arg(&ready_file)
            .args(args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .process_group(0);
        for (key, _) in std::env::vars_os() {
            let name = key.to_string_lossy();
            if name.starts_with("STICKLESS_") || name.starts_with("DEMO_") {
                command.env_remove(&key);
            }
        }
        let child = command.spawn().expect("bash runs");
        let mut demo = Demo {
            child,
            output,
            ready: Ready::default(),
            _dir: dir,
        };
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Ok(text) = std::fs::read_to_string(&ready_file) {
                demo.ready = Ready::parse(&text);
                return demo;
            }
            if let Ok(Some(status)) = demo.child.try_wait() {
                panic!("demo.sh exited ({status}):\n{}", demo.output());
            }
            assert!(
                Instant::now() < deadline,
                "demo.sh was not up within {START_TIMEOUT:?}:\n{}",
                demo.output()
            );
            thread::sleep(POLL);
        }
    }

    fn output(&self) -> String {
        std::fs::read_to_string(&self.output).unwrap_or_default()
    }

    fn door(&self, name: &str) -> Option<SocketAddr> {
        self.ready.doors.get(name).copied()
    }

    /// Kills (SIGKILL) the process named `name` and waits until its address refuses
    /// connections.
    fn kill_backend(&self, name: &str) {
        let pid = self.ready.procs[name];
        let addr = self.ready.backends[name];
        kill_process(Pid::from_raw(pid).unwrap(), Signal::KILL).unwrap();
        wait_until(&format!("{name} ({addr}) refuses connections"), || {
            TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err()
        });
    }

    /// SIGTERM, as Ctrl-C would: waits for the script to exit and for every process it
    /// started to be gone; returns its exit status.
    fn stop(mut self) -> ExitStatus {
        let pid = Pid::from_child(&self.child);
        kill_process(pid, Signal::TERM).unwrap();
        let deadline = Instant::now() + WAIT;
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            assert!(
                Instant::now() < deadline,
                "demo.sh still runs {WAIT:?} after SIGTERM:\n{}",
                self.output()
            );
            thread::sleep(POLL);
        };
        wait_until("no process of the demo's group is left", || {
            group_members(pid.as_raw_nonzero().get()).is_empty()
        });
        for (name, &pid) in &self.ready.procs {
            assert!(!alive(pid), "{name} (pid {pid}) is still running");
        }
        for (name, addr) in &self.ready.doors {
            assert!(
                TcpStream::connect_timeout(addr, Duration::from_millis(500)).is_err(),
                "the {name} door ({addr}) still accepts"
            );
        }
        if let Some(run) = &self.ready.run {
            assert!(!run.exists(), "its run directory {} is left", run.display());
        }
        status
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            // A failed test: the script and everything it started, at once.
            let _ = kill_process_group(Pid::from_child(&self.child), Signal::KILL);
            let _ = self.child.wait();
        }
    }
}

/// Polls `done` until it holds; panics naming `what` after `WAIT`.
fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !done() {
        assert!(Instant::now() < deadline, "not within {WAIT:?}: {what}");
        thread::sleep(POLL);
    }
}

/// The state letter of process `pid` (`/proc/PID/stat`), `None` when there is none.
fn state_and_group(pid: &str) -> Option<(char, i32)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "pid (comm) state ppid pgrp ...": comm may hold spaces, so split after its ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let mut fields = rest.split(' ');
    let state = fields.next()?.chars().next()?;
    let group = fields.nth(1)?.parse().ok()?;
    Some((state, group))
}

/// Whether `pid` runs (a zombie, dead and not yet reaped, does not).
fn alive(pid: i32) -> bool {
    state_and_group(&pid.to_string()).is_some_and(|(state, _)| state != 'Z')
}

/// Pids of live processes in process group `group`.
fn group_members(group: i32) -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            state_and_group(&pid.to_string())
                .is_some_and(|(state, pgrp)| pgrp == group && state != 'Z')
        })
        .collect()
}

/// One browser's cookies for one door (cookies ignore ports: one jar per door).
#[derive(Debug, Default)]
struct Jar(BTreeMap<String, String>);

impl Jar {
    fn absorb(&mut self, reply: &Reply) {
        for (name, value) in &reply.headers {
            if name != "set-cookie" {
                continue;
            }
            let pair = value.split(';').next().unwrap_or("");
            if let Some((key, val)) = pair.split_once('=') {
                let removed = val.is_empty() || value.to_ascii_lowercase().contains("max-age=0");
                if removed {
                    self.0.remove(key.trim());
                } else {
                    self.0.insert(key.trim().to_owned(), val.trim().to_owned());
                }
            }
        }
    }

    fn header(&self) -> String {
        let pairs: Vec<String> = self.0.iter().map(|(k, v)| format!("{k}={v}")).collect();
        pairs.join("; ")
    }

    /// `method path` through `door` with these cookies, taking the cookies of the answer.
    fn send(&mut self, door: SocketAddr, method: &str, path: &str, form: Option<&str>) -> Reply {
        let cookies = self.header();
        let headers: Vec<(&str, &str)> = if cookies.is_empty() {
            Vec::new()
        } else {
            vec![("Cookie", cookies.as_str())]
        };
        let reply = request(door, method, path, &headers, form);
        self.absorb(&reply);
        reply
    }
}

fn served_by(reply: &Reply) -> String {
    reply
        .header("x-served-by")
        .unwrap_or_else(|| panic!("no x-served-by: {reply:?}"))
        .to_owned()
}

/// Logs `user` in through `door` and reads `/me` four times through it: every answer knows the
/// user. Returns the jar and the backends that answered `/me`, the last one last.
fn log_in_and_stay(door: SocketAddr, user: &str) -> (Jar, Vec<String>) {
    let mut jar = Jar::default();
    let health = request(door, "GET", "/healthz", &[], None);
    assert_eq!(health.status, 200, "{door}: {health:?}");
    let login = jar.send(door, "POST", "/login", Some(&format!("user={user}")));
    assert_eq!(login.status, 200, "login through {door}: {login:?}");
    let mut served = Vec::new();
    for _ in 0..4 {
        let me = jar.send(door, "GET", "/me", None);
        assert_eq!(me.status, 200, "/me through {door}: {me:?}");
        assert!(me.body.contains(user), "/me through {door}: {me:?}");
        served.push(served_by(&me));
    }
    (jar, served)
}

/// The first answer to `/me` through `door` that is not a 5xx (a proxy may need a moment to
/// take a dead backend out).
fn me_after_a_death(jar: &mut Jar, door: SocketAddr) -> Reply {
    let deadline = Instant::now() + WAIT;
    loop {
        let cookies = jar.header();
        match try_request(door, "GET", "/me", &[("Cookie", &cookies)], None) {
            Ok(reply) if reply.status < 500 => {
                jar.absorb(&reply);
                return reply;
            }
            other => assert!(
                Instant::now() < deadline,
                "{door} gave no answer but errors for {WAIT:?}, the last: {other:?}"
            ),
        }
        thread::sleep(POLL);
    }
}

/// The nginx or HAProxy door: sticky, so one backend serves the user; once that one is killed,
/// the other answers and does not know the user.
fn a_local_session_door_loses_the_user_when_its_backend_dies(demo: &Demo, door: &str) {
    let addr = demo.door(door).expect("the door is up");
    let user = format!("{door}-user");
    let (mut jar, served) = log_in_and_stay(addr, &user);
    let on: BTreeSet<&String> = served.iter().collect();
    assert_eq!(
        on.len(),
        1,
        "{door} keeps a user on one backend: {served:?}"
    );
    let dead = served[0].clone();
    demo.kill_backend(&dead);
    let after = me_after_a_death(&mut jar, addr);
    assert_eq!(after.status, 401, "{door} after {dead} died: {after:?}");
    assert_ne!(served_by(&after), dead, "{after:?}");
}

fn curl_usable(test: &str) -> bool {
    let ok = Command::new("curl")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        skip_or_fail(
            test,
            "curl is not installed (demo.sh needs it; apt-get install curl)",
        );
    }
    ok
}

#[test]
fn demo_script_doors_keep_a_login_and_only_the_plugin_door_survives_the_backend_dying() {
    let test = "demo_script_doors_keep_a_login_and_only_the_plugin_door_survives_the_backend_dying";
    if !curl_usable(test) {
        return;
    }
    let demo = Demo::start(&[]);

    // The direct doors: every backend answers its health check, under its own name.
    for (name, addr) in &demo.ready.backends {
        let health = request(*addr, "GET", "/healthz", &[], None);
        assert_eq!(health.status, 200, "{name}: {health:?}");
        assert_eq!(
            health.header("x-served-by"),
            Some(name.as_str()),
            "{health:?}"
        );
    }
    let apps: BTreeSet<&str> = ["app-1", "app-2", "app-3"].into();
    let admin = demo.ready.admin.expect("the admin API is up");
    let listed = request(admin, "GET", "/backends", &[], None);
    assert_eq!(listed.status, 200, "{listed:?}");
    for app in &apps {
        assert!(listed.body.contains(app), "{app} is not listed: {listed:?}");
    }

    // The plugin door: round-robin over three backends, each knowing the user (the session is
    // in the store), and still after the backend last used is killed.
    let plugin = demo.door("plugin").expect("the plugin door is up");
    let (mut jar, served) = log_in_and_stay(plugin, "plugin-user");
    let on: BTreeSet<&str> = served.iter().map(String::as_str).collect();
    assert!(on.len() >= 2, "round-robin spreads one user: {served:?}");
    assert!(on.is_subset(&apps), "{served:?}");
    let dead = served.last().unwrap().clone();
    demo.kill_backend(&dead);
    for _ in 0..6 {
        let me = jar.send(plugin, "GET", "/me", None);
        assert_eq!(me.status, 200, "after {dead} died: {me:?}");
        assert!(me.body.contains("plugin-user"), "after {dead} died: {me:?}");
        assert_ne!(served_by(&me), dead, "{me:?}");
    }

    for (door, kind) in [
        ("nginx", ExternalKind::NginxIpHash),
        ("haproxy", ExternalKind::HaproxyCookieInsert),
    ] {
        match (demo.door(door), available(kind)) {
            (Some(_), _) => a_local_session_door_loses_the_user_when_its_backend_dies(&demo, door),
            (None, Err(why)) => skip_or_fail(test, &format!("no {door} door: {why}")),
            (None, Ok(binary)) => panic!(
                "{} is installed but demo.sh opened no {door} door:\n{}",
                binary.display(),
                demo.output()
            ),
        }
    }

    let status = demo.stop();
    // SIGTERM's status (128 + 15), after stopping every process it started.
    assert_eq!(status.code(), Some(143), "{status}");
}

#[test]
fn demo_script_on_redis_serves_a_login_written_through_one_session_server_read_through_the_other() {
    let test = "demo_script_on_redis_serves_a_login_written_through_one_session_server_read_through_the_other";
    if !curl_usable(test) {
        return;
    }
    let redis: SocketAddr = "127.0.0.1:6379".parse().unwrap();
    if TcpStream::connect_timeout(&redis, Duration::from_secs(2)).is_err() {
        skip_or_fail(test, &format!("no Redis at {redis}"));
        return;
    }
    let demo = Demo::start(&["--store", "redis", "--redis-url", "redis://127.0.0.1:6379"]);
    for server in ["session-server-1", "session-server-2"] {
        assert!(
            demo.ready.procs.contains_key(server),
            "{server} is not running: {:?}",
            demo.ready.procs
        );
    }
    // The apps write the login through session server 2, the proxy reads it through 1.
    let plugin = demo.door("plugin").expect("the plugin door is up");
    let (_jar, served) = log_in_and_stay(plugin, "redis-user");
    let on: BTreeSet<&String> = served.iter().collect();
    assert!(on.len() >= 2, "round-robin spreads one user: {served:?}");
    let status = demo.stop();
    assert_eq!(status.code(), Some(143), "{status}");
}
