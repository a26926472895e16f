//! The real nginx and HAProxy anchors of the comparison, started by `bench::external` in front of
//! two tiny loopback HTTP backends that answer with their name: requests are proxied, the
//! address-hashing modes keep one `X-Forwarded-For` on one backend (and spread different ones),
//! the cookie modes keep one cookie on one backend, a dead backend is skipped, and nothing is
//! left listening after the proxy is dropped.
//!
//! A missing nginx or haproxy binary prints `SKIPPED <test>: <why>` and skips, unless
//! `STICKLESS_REQUIRE_SERVICES=1`, when it fails the test (CI installs both).

mod support;

use std::collections::BTreeSet;
use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use bench::external::{ExternalKind, ExternalProxy, available, start_retrying};
use support::Reply;

/// Client addresses that differ in their first three octets (nginx `ip_hash` looks at no more)
/// and are varied enough that both backends get some of them whatever the hash.
const CLIENTS: [&str; 16] = [
    "1.2.3.4",
    "5.6.7.8",
    "9.10.11.12",
    "100.1.2.3",
    "200.3.2.1",
    "17.17.17.17",
    "33.1.9.2",
    "44.4.4.4",
    "61.80.7.1",
    "77.13.250.9",
    "88.88.1.1",
    "123.45.67.89",
    "150.2.99.3",
    "172.31.5.5",
    "192.0.2.44",
    "203.0.113.7",
];

/// True when `kind`'s binary is usable; otherwise the skip rule.
fn usable(kind: ExternalKind, test: &str) -> bool {
    match available(kind) {
        Ok(_) => true,
        Err(why) => {
            support::skip_or_fail(test, &why);
            false
        }
    }
}

/// A loopback HTTP/1.1 backend (keep-alive, bodies by Content-Length) answering every request
/// with its name, in the body and in `x-served-by`.
struct Backend {
    /// Its address.
    addr: SocketAddr,
    /// Set to stop accepting and close every connection.
    stopping: Arc<AtomicBool>,
    /// Open connections, shut down on stop so keep-alive connections of the proxy die too.
    connections: Arc<Mutex<Vec<TcpStream>>>,
    /// Request heads received, for checks on what the proxy forwards.
    heads: Arc<Mutex<Vec<String>>>,
    /// The accept loop.
    acceptor: Option<JoinHandle<()>>,
}

impl Backend {
    fn start(name: &'static str) -> Backend {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let stopping = Arc::new(AtomicBool::new(false));
        let connections = Arc::new(Mutex::new(Vec::new()));
        let heads = Arc::new(Mutex::new(Vec::new()));
        let acceptor = thread::spawn({
            let (stopping, connections, heads) =
                (stopping.clone(), connections.clone(), heads.clone());
            move || {
                for stream in listener.incoming() {
                    if stopping.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(stream) = stream else { continue };
                    if let Ok(clone) = stream.try_clone() {
                        connections.lock().unwrap().push(clone);
                    }
                    let heads = heads.clone();
                    thread::spawn(move || serve(stream, name, &heads));
                }
            }
        });
        Backend {
            addr,
            stopping,
            connections,
            heads,
            acceptor: Some(acceptor),
        }
    }

    /// Stops listening and closes every connection: the proxy's next connect is refused.
    fn stop(&mut self) {
        let Some(acceptor) = self.acceptor.take() else {
            return;
        };
        self.stopping.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.addr); // wakes the accept loop
        let _ = acceptor.join();
        for connection in self.connections.lock().unwrap().drain(..) {
            let _ = connection.shutdown(Shutdown::Both);
        }
    }

    fn heads(&self) -> Vec<String> {
        self.heads.lock().unwrap().clone()
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.stop();
    }
}

fn serve(stream: TcpStream, name: &str, heads: &Mutex<Vec<String>>) {
    let mut writer = stream.try_clone().unwrap();
    let mut reader = BufReader::new(stream);
    loop {
        let mut head = String::new();
        loop {
            let mut line = String::new();
            match reader.read_line(&mut line) {
                Ok(0) | Err(_) => return,
                Ok(_) if line == "\r\n" => break,
                Ok(_) => head.push_str(&line),
            }
        }
        let lower = head.to_ascii_lowercase();
        let length = lower
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(0);
        let mut body = Vec::new();
        if (&mut reader).take(length).read_to_end(&mut body).is_err() {
            return;
        }
        heads.lock().unwrap().push(head);
        let close = lower.contains("connection: close");
        let response = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\nx-served-by: {name}\r\n\
             content-length: {}\r\n{}\r\n{name}",
            name.len(),
            if close { "connection: close\r\n" } else { "" }
        );
        if writer.write_all(response.as_bytes()).is_err() || close {
            return;
        }
    }
}

/// `GET /` through `proxy` with extra headers, on its own connection.
fn get(proxy: &ExternalProxy, headers: &[(&str, &str)]) -> Reply {
    support::request(proxy.listen(), "GET", "/", headers, None)
}

/// The backend that served `GET /` with these headers (and that it was a 200).
fn served_by(proxy: &ExternalProxy, headers: &[(&str, &str)]) -> String {
    let reply = get(proxy, headers);
    assert_eq!(reply.status, 200, "{reply:?}");
    reply.body
}

/// Two backends and `kind` in front of them, or `None` when the binary is missing.
fn setup(
    kind: ExternalKind,
    test: &str,
) -> Option<(Backend, Backend, ExternalProxy, tempfile::TempDir)> {
    if !usable(kind, test) {
        return None;
    }
    let (a, b) = (Backend::start("s1"), Backend::start("s2"));
    let dir = tempfile::tempdir().unwrap();
    let proxy = start_retrying(kind, &[a.addr, b.addr], None, dir.path())
        .unwrap_or_else(|error| panic!("{kind} did not start: {error}"));
    Some((a, b, proxy, dir))
}

/// Each client address stays on one backend over several requests; returns the backends used.
fn each_forwarded_address_sticks(proxy: &ExternalProxy) -> BTreeSet<String> {
    let mut used = BTreeSet::new();
    for client in CLIENTS {
        let xff = [("X-Forwarded-For", client)];
        let first = served_by(proxy, &xff);
        for _ in 0..5 {
            assert_eq!(served_by(proxy, &xff), first, "{client} moved");
        }
        used.insert(first);
    }
    used
}

/// After `dead` stops, every request is still answered, by `alive`.
fn a_dead_backend_is_skipped(
    proxy: &ExternalProxy,
    dead: &mut Backend,
    headers: &[&[(&str, &str)]],
) {
    dead.stop();
    for extra in headers {
        for _ in 0..5 {
            assert_eq!(served_by(proxy, extra), "s2", "{}", proxy.kind());
        }
    }
}

/// Nothing accepts on the proxy's address once it is dropped, and its process is gone.
fn stops_when_dropped(proxy: ExternalProxy) {
    let addr = proxy.listen();
    let pid = proxy.pid();
    drop(proxy);
    let deadline = Instant::now() + Duration::from_secs(5);
    while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
        assert!(
            Instant::now() < deadline,
            "something still accepts on {addr}"
        );
        thread::sleep(Duration::from_millis(50));
    }
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "process {pid} is still there"
    );
}

#[test]
fn nginx_ip_hash_keeps_one_forwarded_address_on_one_backend() {
    let test = "nginx_ip_hash_keeps_one_forwarded_address_on_one_backend";
    let Some((_a, mut b, proxy, _dir)) = setup(ExternalKind::NginxIpHash, test) else {
        return;
    };
    let used = each_forwarded_address_sticks(&proxy);
    assert_eq!(
        used.len(),
        2,
        "the addresses spread over both backends: {used:?}"
    );
    assert!(
        b.heads().iter().all(|h| h.contains("X-Forwarded-For")),
        "nginx forwards the client address"
    );
    // The dead backend here is s2, so every address must end on s1.
    b.stop();
    for client in CLIENTS {
        assert_eq!(served_by(&proxy, &[("X-Forwarded-For", client)]), "s1");
    }
    stops_when_dropped(proxy);
}

#[test]
fn nginx_cookie_hash_keeps_one_sid_on_one_backend() {
    let test = "nginx_cookie_hash_keeps_one_sid_on_one_backend";
    let Some((mut a, _b, proxy, _dir)) = setup(ExternalKind::NginxCookieHash, test) else {
        return;
    };
    let mut used = BTreeSet::new();
    for user in 0..16 {
        let cookie = format!("theme=dark; sid=session-{user}");
        let first = served_by(&proxy, &[("Cookie", &cookie)]);
        for _ in 0..5 {
            assert_eq!(
                served_by(&proxy, &[("Cookie", &cookie)]),
                first,
                "sid {user} moved"
            );
        }
        used.insert(first);
    }
    assert_eq!(
        used.len(),
        2,
        "the sessions spread over both backends: {used:?}"
    );
    let cookies: Vec<String> = (0..16).map(|u| format!("sid=session-{u}")).collect();
    let headers: Vec<[(&str, &str); 1]> =
        cookies.iter().map(|c| [("Cookie", c.as_str())]).collect();
    let headers: Vec<&[(&str, &str)]> = headers.iter().map(|h| h.as_slice()).collect();
    a_dead_backend_is_skipped(&proxy, &mut a, &headers);
    stops_when_dropped(proxy);
}

#[test]
fn haproxy_source_keeps_one_forwarded_address_on_one_backend() {
    let test = "haproxy_source_keeps_one_forwarded_address_on_one_backend";
    let Some((mut a, _b, proxy, _dir)) = setup(ExternalKind::HaproxySource, test) else {
        return;
    };
    let used = each_forwarded_address_sticks(&proxy);
    assert_eq!(
        used.len(),
        2,
        "balance source hashes the forwarded address, not 127.0.0.1: {used:?}"
    );
    let headers: Vec<[(&str, &str); 1]> =
        CLIENTS.iter().map(|c| [("X-Forwarded-For", *c)]).collect();
    let headers: Vec<&[(&str, &str)]> = headers.iter().map(|h| h.as_slice()).collect();
    a_dead_backend_is_skipped(&proxy, &mut a, &headers);
    stops_when_dropped(proxy);
}

#[test]
fn haproxy_sticky_cookie_is_inserted_and_sticks() {
    let test = "haproxy_sticky_cookie_is_inserted_and_sticks";
    let Some((mut a, b, proxy, _dir)) = setup(ExternalKind::HaproxyCookieInsert, test) else {
        return;
    };
    let first = get(&proxy, &[]);
    assert_eq!(first.status, 200);
    let set_cookie = first
        .header("set-cookie")
        .expect("HAProxy inserts its cookie");
    let pin = set_cookie.split(';').next().unwrap().trim().to_owned();
    assert_eq!(
        pin,
        format!("SRV={}", first.body),
        "the cookie names the server"
    );
    for _ in 0..10 {
        let again = get(&proxy, &[("Cookie", &format!("a=1; {pin}"))]);
        assert_eq!(again.body, first.body, "pinned");
        assert!(
            again.header("set-cookie").is_none(),
            "a pinned client is not re-pinned"
        );
    }
    for server in ["s1", "s2"] {
        assert_eq!(
            served_by(&proxy, &[("Cookie", &format!("SRV={server}"))]),
            server
        );
    }
    assert!(
        a.heads()
            .iter()
            .chain(b.heads().iter())
            .all(|h| !h.contains("SRV=")),
        "indirect: the backends never see HAProxy's cookie"
    );
    // The pinned server dies: the pin is redispatched to the other one and re-pinned there.
    a.stop();
    for _ in 0..5 {
        let moved = get(&proxy, &[("Cookie", "SRV=s1")]);
        assert_eq!((moved.status, moved.body.as_str()), (200, "s2"));
    }
    assert_eq!(served_by(&proxy, &[]), "s2");
    stops_when_dropped(proxy);
}
