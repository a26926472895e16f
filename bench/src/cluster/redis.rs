//! Redis servers a cluster starts itself, as `redis-server` processes on loopback (no
//! persistence, logs and the Sentinel's file in the run's directory), killed when dropped:
//! - a private standalone Redis, for two session servers when the run's store is the memory
//!   store (which two servers cannot share), so no run depends on a Redis of the machine;
//! - a primary, one replica and one Sentinel watching them (`store-failover`), ready once the
//!   replica has acknowledged a write of the primary and the Sentinel knows the replica; there
//!   `OwnRedis::fail_over` kills the primary and waits until the Sentinel has promoted the
//!   replica.
//!
//! Redis cannot report the port it got from a port-0 bind, so a free port is picked (bound and
//! released) and a start whose server exits because someone took the port meanwhile is tried
//! again on another one. A server is ready when it answers `INFO server` with its own process
//! id (another server holding the port would answer too). The few commands the harness needs
//! are sent over a plain TCP connection (`pipeline`): no client library for three commands.

use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::proc::Proc;
use super::{ClusterError, io_error};
use crate::mode::StoreChoice;

/// The name the Sentinel knows the primary by (`--redis-sentinel-master`).
pub(crate) const SENTINEL_MASTER: &str = "stickless";
/// The Sentinel's `down-after-milliseconds`: how long the primary must be silent before it is
/// failed over. Short, so that the failover fits in a run of a few seconds (production: 5–30 s).
const DOWN_AFTER_MS: u32 = 1000;
/// The Sentinel's `failover-timeout`: when it gives up a failover and may try again.
const FAILOVER_TIMEOUT_MS: u32 = 10_000;
/// Bound on a failover, from the kill until the replica serves as the primary: the Sentinel
/// needs `DOWN_AFTER_MS`, up to a second of random delay and a few INFO rounds (~3 s at idle),
/// so this only catches one that will never happen.
const FAILOVER_WITHIN: Duration = Duration::from_secs(30);
/// Free ports tried for one server before giving up (each one taken meanwhile moves on).
const PORT_ATTEMPTS: u32 = 10;
/// Pause between two polls of a wait on Redis or the Sentinel.
const WAIT_POLL: Duration = Duration::from_millis(100);
/// The command that tells a data server's role and replication link.
const INFO_REPLICATION: &[&str] = &["INFO", "replication"];
/// Bound on one command's round trip.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(1);

/// Where `redis-server` is, or why it cannot be used. `STICKLESS_REDIS_SERVER` names a binary
/// outside `PATH`.
pub fn redis_server() -> Result<PathBuf, String> {
    if let Some(path) = std::env::var_os("STICKLESS_REDIS_SERVER") {
        let path = PathBuf::from(path);
        return if path.is_file() {
            Ok(path)
        } else {
            Err(format!(
                "STICKLESS_REDIS_SERVER={} is not a file",
                path.display()
            ))
        };
    }
    std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .chain(["/usr/bin", "/usr/local/bin"].map(PathBuf::from))
        .map(|dir| dir.join("redis-server"))
        .find(|path| path.is_file())
        .ok_or_else(|| {
            "redis-server is not installed (Debian: apt-get install redis-server; or set \
             STICKLESS_REDIS_SERVER to its path)"
                .to_owned()
        })
}

/// One `redis-server` process and its port.
#[derive(Debug)]
struct RedisServer {
    /// Its client port.
    port: u16,
    /// The process; `None` once killed.
    proc: Option<Proc>,
}

/// The Redis processes of one cluster, killed when dropped.
#[derive(Debug)]
pub(crate) struct OwnRedis {
    /// A standalone server; or the primary, the replica and the Sentinel, in that order.
    servers: Vec<RedisServer>,
}

impl OwnRedis {
    /// A private standalone Redis. `log` names each process's log file.
    pub(crate) async fn standalone(
        binary: &Path,
        log: impl Fn(&str) -> PathBuf,
    ) -> Result<OwnRedis, ClusterError> {
        let log = log("redis");
        let server = start(binary, &log, "redis", |port| data_args(port, &log)).await?;
        Ok(OwnRedis {
            servers: vec![server],
        })
    }

    /// A primary, one replica in sync with it, and a Sentinel that watches the primary and
    /// knows the replica (so it can fail over to it). The Sentinel's file (which it rewrites)
    /// goes next to its log, with the extension `conf`.
    pub(crate) async fn with_sentinel(
        binary: &Path,
        log: impl Fn(&str) -> PathBuf,
    ) -> Result<OwnRedis, ClusterError> {
        let primary_log = log("redis-primary");
        let primary = start(binary, &primary_log, "redis primary", |port| {
            data_args(port, &primary_log)
        })
        .await?;
        let primary_port = primary.port.to_string();
        let replica_log = log("redis-replica");
        let replica = start(binary, &replica_log, "redis replica", |port| {
            let mut args = data_args(port, &replica_log);
            args.extend(["--replicaof", "127.0.0.1", &primary_port].map(str::to_owned));
            args
        })
        .await?;
        let mut set = OwnRedis {
            servers: vec![primary, replica],
        };
        // A replica whose link is up may not be sent writes yet (after a diskless sync the
        // primary waits for its first acknowledgement, up to a second): wait until it has
        // acknowledged one, or the load's first writes could be the primary's alone.
        let acknowledged = [
            ["SET", "stickless-bench:replication-probe", "1"].as_slice(),
            &["WAIT", "1", "200"],
        ];
        set.wait_for(
            0,
            &acknowledged,
            "replica acknowledging the primary's writes",
            |reply| *reply == Resp::Int(1),
        )
        .await?;
        let config = log("sentinel").with_extension("conf");
        let primary = set.servers[0].port;
        let sentinel = start(binary, &log("sentinel"), "redis sentinel", |port| {
            // Written again for each port tried: the Sentinel rewrites the file it runs from.
            // (A failed write shows as the Sentinel's own start error, with its log.)
            let _ = std::fs::write(&config, sentinel_config(port, primary));
            vec![config.display().to_string(), "--sentinel".to_owned()]
        })
        .await?;
        set.servers.push(sentinel);
        // It learns about the replica from the primary's INFO; until then it could not fail
        // over.
        let replicas = ["SENTINEL", "replicas", SENTINEL_MASTER];
        set.wait_for(
            2,
            &[&replicas],
            "sentinel that knows the replica",
            |reply| matches!(reply, Resp::Array(replicas) if !replicas.is_empty()),
        )
        .await?;
        Ok(set)
    }

    /// The store the session servers are given.
    pub(crate) fn store(&self) -> StoreChoice {
        let url = |server: &RedisServer| format!("redis://127.0.0.1:{}", server.port);
        match self.servers.as_slice() {
            [_, _, sentinel] => StoreChoice::RedisSentinel {
                url: url(sentinel),
                master: SENTINEL_MASTER.to_owned(),
            },
            servers => StoreChoice::Redis(url(&servers[0])),
        }
    }

    /// Kills the primary (SIGKILL: a crash) and waits until the Sentinel names the replica as
    /// the primary and the replica serves as one. An error when there is no Sentinel.
    pub(crate) async fn fail_over(&mut self) -> Result<(), ClusterError> {
        if self.servers.len() != 3 {
            return Err(ClusterError::Unavailable(
                "a failover needs the primary, replica and Sentinel set".to_owned(),
            ));
        }
        self.servers[0].proc = None;
        let replica = self.servers[1].port.to_string();
        let ask = ["SENTINEL", "get-master-addr-by-name", SENTINEL_MASTER];
        self.wait_for(2, &[&ask], "sentinel naming the replica as the primary", |reply| {
            matches!(reply, Resp::Array(addr) if addr.get(1).and_then(text) == Some(&replica))
        })
        .await?;
        self.wait_for(
            1,
            &[INFO_REPLICATION],
            "replica serving as the primary",
            |reply| text(reply).is_some_and(|info| info.contains("role:master")),
        )
        .await
    }

    /// Sends the commands `ask` to server `index` on one connection until `ready` holds for
    /// the last reply, within
    /// `FAILOVER_WITHIN` (which bounds the slowest of these waits); an error when the server
    /// exits first.
    async fn wait_for(
        &mut self,
        index: usize,
        ask: &[&[&str]],
        what: &str,
        ready: impl Fn(&Resp) -> bool,
    ) -> Result<(), ClusterError> {
        let port = self.servers[index].port;
        let deadline = Instant::now() + FAILOVER_WITHIN;
        let Some(proc) = self.servers[index].proc.as_mut() else {
            return Err(ClusterError::Unavailable(format!(
                "no process for the {what}"
            )));
        };
        loop {
            if pipeline(port, ask).await.is_some_and(|reply| ready(&reply)) {
                return Ok(());
            }
            proc.check_alive()?;
            if Instant::now() >= deadline {
                return Err(proc.not_ready(format!("no {what} within {FAILOVER_WITHIN:?}")));
            }
            tokio::time::sleep(WAIT_POLL).await;
        }
    }
}

/// Arguments of a data server on `port`: loopback, expiry events on (the session server's
/// watchers want them), nothing on disk. Its working directory and RDB file name are set all
/// the same (next to `log`, named after it): a replica's full sync may still write the RDB it
/// receives, and a server started later in the same directory would load it.
fn data_args(port: u16, log: &Path) -> Vec<String> {
    let mut args: Vec<String> = [
        "--port",
        &port.to_string(),
        "--bind",
        "127.0.0.1",
        "--protected-mode",
        "no",
        "--save",
        "",
        "--appendonly",
        "no",
        "--notify-keyspace-events",
        "Ex",
        "--repl-diskless-sync",
        "yes",
        "--repl-diskless-sync-delay",
        "0",
        "--repl-diskless-load",
        "on-empty-db",
    ]
    .map(str::to_owned)
    .to_vec();
    let dir = log.parent().unwrap_or(Path::new("."));
    args.extend(["--dir".to_owned(), dir.display().to_string()]);
    let rdb = log.with_extension("rdb");
    let name = rdb.file_name().map(|n| n.to_string_lossy().into_owned());
    args.extend(["--dbfilename".to_owned(), name.unwrap_or_default()]);
    args
}

/// The Sentinel's file: it listens on `port` and watches the primary on `primary` (quorum 1:
/// it is the only one).
fn sentinel_config(port: u16, primary: u16) -> String {
    let m = SENTINEL_MASTER;
    format!(
        "# Written by the comparison harness; the Sentinel rewrites it.\n\
         port {port}\nbind 127.0.0.1\nprotected-mode no\n\
         sentinel monitor {m} 127.0.0.1 {primary} 1\n\
         sentinel down-after-milliseconds {m} {DOWN_AFTER_MS}\n\
         sentinel failover-timeout {m} {FAILOVER_TIMEOUT_MS}\n\
         sentinel parallel-syncs {m} 1\n"
    )
}

/// Starts `redis-server` with `args(port)` on a free port, trying another when the server
/// exits because the port was taken, until it answers as itself.
async fn start(
    binary: &Path,
    log: &Path,
    what: &str,
    args: impl Fn(u16) -> Vec<String>,
) -> Result<RedisServer, ClusterError> {
    let mut attempt = 1;
    loop {
        let port = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .and_then(|listener| listener.local_addr())
            .map_err(io_error("picking a loopback port"))?
            .port();
        let mut proc = Proc::spawn(binary, &args(port), what, log)?;
        let pid = format!("process_id:{}", proc.pid());
        let answers_as_itself = || async {
            command(port, &["INFO", "server"])
                .await
                .as_ref()
                .and_then(text)
                .is_some_and(|info| info.lines().any(|line| line.trim() == pid))
        };
        match proc.wait_ready(answers_as_itself).await {
            Ok(()) => {
                return Ok(RedisServer {
                    port,
                    proc: Some(proc),
                });
            }
            Err(error) if attempt < PORT_ATTEMPTS && proc.lost_its_address() => {
                tracing::debug!(what, port, %error, "its port was taken; trying another");
                attempt += 1;
            }
            Err(error) => return Err(error),
        }
    }
}

/// A reply, as far as the harness reads them.
#[derive(Debug, PartialEq)]
enum Resp {
    /// A simple or bulk string.
    Text(String),
    /// An integer.
    Int(i64),
    /// A nil bulk string or array.
    Nil,
    /// An error reply.
    Error(String),
    /// An array.
    Array(Vec<Resp>),
}

/// The text of a string reply.
fn text(reply: &Resp) -> Option<&String> {
    match reply {
        Resp::Text(text) => Some(text),
        _ => None,
    }
}

/// Sends one command to the Redis (or Sentinel) on loopback `port` and reads its reply; `None`
/// when nothing answers within `COMMAND_TIMEOUT`.
async fn command(port: u16, args: &[&str]) -> Option<Resp> {
    pipeline(port, &[args]).await
}

/// Sends `commands` to the Redis on loopback `port` on one connection (`WAIT` counts the
/// replicas that have the writes of its own connection) and reads their replies; the last one,
/// or `None` when they do not all come within `COMMAND_TIMEOUT`.
async fn pipeline(port: u16, commands: &[&[&str]]) -> Option<Resp> {
    let exchange = async {
        let mut conn = TcpStream::connect(SocketAddr::from((Ipv4Addr::LOCALHOST, port)))
            .await
            .ok()?;
        let mut request = String::new();
        for args in commands {
            request.push_str(&format!("*{}\r\n", args.len()));
            for arg in *args {
                request.push_str(&format!("${}\r\n{arg}\r\n", arg.len()));
            }
        }
        conn.write_all(request.as_bytes()).await.ok()?;
        let mut bytes = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            let n = conn.read(&mut chunk).await.ok()?;
            if n == 0 {
                return None;
            }
            bytes.extend_from_slice(&chunk[..n]);
            let mut replies = Vec::new();
            let mut at = 0;
            while let Some((reply, used)) = parse(&bytes[at..]) {
                replies.push(reply);
                at += used;
            }
            if replies.len() >= commands.len() {
                return replies.pop();
            }
        }
    };
    tokio::time::timeout(COMMAND_TIMEOUT, exchange)
        .await
        .ok()
        .flatten()
}

/// The first reply in `bytes` and the length it takes; `None` while it is incomplete (or not
/// RESP).
fn parse(bytes: &[u8]) -> Option<(Resp, usize)> {
    let end = bytes.windows(2).position(|w| w == b"\r\n")?;
    let line = std::str::from_utf8(bytes.get(1..end)?).ok()?;
    let rest = end + 2;
    match bytes.first()? {
        b'+' => Some((Resp::Text(line.to_owned()), rest)),
        b'-' => Some((Resp::Error(line.to_owned()), rest)),
        b':' => Some((Resp::Int(line.parse().ok()?), rest)),
        b'$' => {
            let Ok(len) = usize::try_from(line.parse::<i64>().ok()?) else {
                return Some((Resp::Nil, rest));
            };
            let end = rest.checked_add(len)?;
            let body = bytes.get(rest..end)?;
            bytes.get(end..end.checked_add(2)?)?;
            Some((
                Resp::Text(String::from_utf8_lossy(body).into_owned()),
                end + 2,
            ))
        }
        b'*' => {
            let Ok(count) = usize::try_from(line.parse::<i64>().ok()?) else {
                return Some((Resp::Nil, rest));
            };
            let mut items = Vec::with_capacity(count.min(1024));
            let mut at = rest;
            for _ in 0..count {
                let (item, used) = parse(&bytes[at..])?;
                items.push(item);
                at += used;
            }
            Some((Resp::Array(items), at))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_parse_whole_and_wait_for_the_rest() {
        // Garbage never panics: no type byte, a length past any buffer.
        assert_eq!(parse(b"\r\n"), None);
        assert_eq!(parse(b"$18446744073709551615\r\nabc\r\n"), None);
        let reply = b"*2\r\n$9\r\n127.0.0.1\r\n$4\r\n6380\r\n";
        assert_eq!(
            parse(reply),
            Some((
                Resp::Array(vec![
                    Resp::Text("127.0.0.1".into()),
                    Resp::Text("6380".into())
                ]),
                reply.len()
            ))
        );
        assert_eq!(parse(&reply[..reply.len() - 3]), None);
        assert_eq!(parse(b"$-1\r\n"), Some((Resp::Nil, 5)));
        assert_eq!(
            parse(b"-ERR no\r\n"),
            Some((Resp::Error("ERR no".into()), 9))
        );
        assert_eq!(parse(b":12\r\n"), Some((Resp::Int(12), 5)));
        assert_eq!(parse(b"*0\r\n"), Some((Resp::Array(vec![]), 4)));
    }

    /// A primary, a replica and a Sentinel start on free ports; killing the primary makes the
    /// replica the primary, as the Sentinel names it.
    #[tokio::test]
    async fn the_sentinel_promotes_the_replica_when_the_primary_is_killed() {
        let Ok(binary) = redis_server() else {
            if std::env::var("STICKLESS_REQUIRE_SERVICES").is_ok_and(|v| v == "1") {
                panic!("redis-server is not installed (STICKLESS_REQUIRE_SERVICES=1)");
            }
            let _ = std::io::Write::write_all(
                &mut std::io::stderr(),
                b"SKIPPED the_sentinel_promotes_the_replica: no redis-server\n",
            );
            return;
        };
        let dir = tempfile::tempdir().unwrap();
        let log = |what: &str| dir.path().join(format!("{what}.log"));
        let mut set = OwnRedis::with_sentinel(&binary, log)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let StoreChoice::RedisSentinel { url, master } = set.store() else {
            panic!("not a sentinel store: {:?}", set.store());
        };
        assert_eq!(master, SENTINEL_MASTER);
        assert_eq!(url, format!("redis://127.0.0.1:{}", set.servers[2].port));
        let replica = set.servers[1].port;
        let started = Instant::now();
        set.fail_over().await.unwrap_or_else(|e| panic!("{e}"));
        let reply = command(
            set.servers[2].port,
            &["SENTINEL", "get-master-addr-by-name", SENTINEL_MASTER],
        )
        .await;
        assert_eq!(
            reply,
            Some(Resp::Array(vec![
                Resp::Text("127.0.0.1".into()),
                Resp::Text(replica.to_string())
            ]))
        );
        // What the primary acknowledged before it died is on the new primary (the set waits
        // for the replica to acknowledge a probe write before it is ready).
        let probe = command(replica, &["GET", "stickless-bench:replication-probe"]).await;
        assert_eq!(probe, Some(Resp::Text("1".into())));
        let _ = std::io::Write::write_all(
            &mut std::io::stderr(),
            format!("failover took {:?}\n", started.elapsed()).as_bytes(),
        );
    }
}
