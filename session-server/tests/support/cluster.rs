//! Redis Clusters for tests: masters (and replicas) as `redis-server` processes on free loopback
//! ports with their files in a temporary directory, joined by `redis-cli --cluster create`, and
//! killed and cleaned up on drop, also when the test fails. Skipped (by the skip rule) when
//! `redis-server` or `redis-cli` is not installed.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use redis::aio::MultiplexedConnection;
use session_server::config::{Settings, StoreKind};
use session_server::store::SessionStore;
use session_server::store::redis::{RedisConfig, RedisStore};

use super::harness::{StoreUnderTest, Wipe};
use super::services;
use super::wait::events_ready;

/// Slots of a Redis Cluster.
pub const SLOTS: u32 = 16_384;

/// A Redis Cluster store on a 3-master cluster this test starts, or `None` (skipped). The
/// store's event subscription is up before it is returned, so a watcher misses nothing. Its
/// wipe flushes every master (the cluster is the test's own).
pub async fn store(test: &str, settings: &Settings) -> Option<StoreUnderTest> {
    let cluster = RedisCluster::start(test, 3, 0).await?;
    let store: Arc<dyn SessionStore> = Arc::new(cluster.store(test, settings));
    events_ready(store.as_ref()).await;
    let masters = cluster.ports();
    let wipe: Wipe = Box::new(move || {
        let masters = masters.clone();
        Box::pin(async move {
            for port in masters {
                let mut conn = connect(port).await.expect("connect to a cluster master");
                redis::cmd("FLUSHALL")
                    .query_async::<()>(&mut conn)
                    .await
                    .expect("FLUSHALL");
            }
        })
    });
    Some((store, Box::new(cluster), Some(wipe)))
}

/// One node process.
struct Node {
    /// Client port (its cluster bus is on port + 10000).
    port: u16,
    /// The process; `None` once killed.
    child: Option<Child>,
}

/// A running Redis Cluster, torn down on drop.
pub struct RedisCluster {
    /// Every node started, masters and replicas.
    nodes: Vec<Node>,
    /// Configs and logs of the nodes; removed on drop.
    dir: PathBuf,
    /// The `redis-server` binary, to restart nodes.
    server: PathBuf,
    /// `cluster-node-timeout` of the nodes (ms).
    node_timeout: u32,
}

impl RedisCluster {
    /// Starts `masters` masters with `replicas` replicas each and waits until the cluster
    /// serves every slot (and every replica is in sync). `None` when skipped.
    pub async fn start(test: &str, masters: usize, replicas: usize) -> Option<RedisCluster> {
        let server = services::redis_server_binary(test)?;
        let cli = binary(test, "redis-cli")?;
        let dir = std::env::temp_dir().join(services::unique_prefix("stickless-cluster"));
        std::fs::create_dir_all(&dir).expect("create the cluster's temporary directory");
        let mut cluster = RedisCluster {
            nodes: Vec::new(),
            dir,
            server,
            // A replica takes over fast when a master dies; without replicas nothing can, so a
            // slow (loaded) machine is given time before a node is declared failed.
            node_timeout: if replicas > 0 { 1000 } else { 5000 },
        };
        for _ in 0..masters * (1 + replicas) {
            let node = cluster.spawn_node().await;
            cluster.nodes.push(node);
        }
        cluster.create(&cli, replicas).await;
        // Seconds at idle; generous, for a loaded machine.
        let within = Duration::from_secs(60);
        let ready = cluster.wait_until_ready(within).await;
        assert!(
            ready,
            "{test}: the redis cluster did not become ready within {within:?}"
        );
        Some(cluster)
    }

    /// Seed URLs of every node, as `--redis-url` takes them for `--store redis-cluster`.
    pub fn url(&self) -> String {
        let seeds: Vec<String> = self
            .nodes
            .iter()
            .map(|n| format!("redis://127.0.0.1:{}", n.port))
            .collect();
        seeds.join(",")
    }

    /// The client ports of every node started (killed ones too).
    pub fn ports(&self) -> Vec<u16> {
        self.nodes.iter().map(|n| n.port).collect()
    }

    /// A cluster store on this cluster, with a key prefix of its own.
    pub fn store(&self, test: &str, settings: &Settings) -> RedisStore {
        RedisStore::new(self.config(test, settings)).expect("valid cluster URL")
    }

    /// The settings of a cluster store on this cluster: those of `settings` as
    /// `--store redis-cluster --redis-url <this cluster's seeds>` (`RedisConfig::from_settings`),
    /// with a key prefix unique to this call.
    pub fn config(&self, test: &str, settings: &Settings) -> RedisConfig {
        let cluster = Settings {
            store: StoreKind::RedisCluster,
            redis_url: self.url(),
            ..settings.clone()
        };
        let mut config = RedisConfig::from_settings(&cluster).expect("the test's store settings");
        config.key_prefix = services::unique_prefix(test);
        config
    }

    /// A plain connection to one node, to look behind the store.
    pub async fn node(&self, port: u16) -> MultiplexedConnection {
        connect(port).await.expect("connect to a cluster node")
    }

    /// The hash slot of a key.
    pub async fn slot(&self, key: &str) -> u32 {
        let mut conn = self.node(self.live_port()).await;
        redis::cmd("CLUSTER")
            .arg("KEYSLOT")
            .arg(key)
            .query_async(&mut conn)
            .await
            .expect("CLUSTER KEYSLOT")
    }

    /// The port of the live master serving `slot`.
    pub async fn master_of_slot(&self, slot: u32) -> u16 {
        self.masters()
            .await
            .into_iter()
            .find(|(_, slots)| {
                slots
                    .iter()
                    .any(|(first, last)| (*first..=*last).contains(&slot))
            })
            .map(|(port, _)| port)
            .expect("a master serves every slot")
    }

    /// The live masters that serve slots, with their slot ranges, as a live node sees them.
    pub async fn masters(&self) -> Vec<(u16, Vec<(u32, u32)>)> {
        let mut conn = self.node(self.live_port()).await;
        let nodes: String = redis::cmd("CLUSTER")
            .arg("NODES")
            .query_async(&mut conn)
            .await
            .expect("CLUSTER NODES");
        parse_masters(&nodes)
    }

    /// Kills a node (SIGKILL, like a crash) and waits until it is gone.
    pub fn kill(&mut self, port: u16) {
        if let Some(node) = self.nodes.iter_mut().find(|n| n.port == port) {
            stop(node);
        }
    }

    /// Waits until the cluster serves every slot again from live masters (after a kill, until
    /// a replica took over); whether it did within `within`.
    pub async fn wait_until_ready(&self, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        loop {
            if self.is_ready().await {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Every live node says `cluster_state:ok`, live masters cover every slot, and every live
    /// replica's link to its master is up.
    async fn is_ready(&self) -> bool {
        for node in self.nodes.iter().filter(|n| n.child.is_some()) {
            let Ok(mut conn) = connect(node.port).await else {
                return false;
            };
            let info: Result<String, _> = redis::cmd("CLUSTER")
                .arg("INFO")
                .query_async(&mut conn)
                .await;
            if !info.is_ok_and(|i| i.contains("cluster_state:ok")) {
                return false;
            }
            let replication: Result<String, _> = redis::cmd("INFO")
                .arg("replication")
                .query_async(&mut conn)
                .await;
            let Ok(replication) = replication else {
                return false;
            };
            if replication.contains("role:slave") && !replication.contains("master_link_status:up")
            {
                return false;
            }
        }
        let Ok(mut conn) = connect(self.live_port()).await else {
            return false;
        };
        let nodes: Result<String, _> = redis::cmd("CLUSTER")
            .arg("NODES")
            .query_async(&mut conn)
            .await;
        let Ok(nodes) = nodes else {
            return false;
        };
        let live: Vec<u16> = self
            .nodes
            .iter()
            .filter(|n| n.child.is_some())
            .map(|n| n.port)
            .collect();
        let covered: u32 = parse_masters(&nodes)
            .iter()
            .filter(|(port, _)| live.contains(port))
            .flat_map(|(_, slots)| slots.iter().map(|(first, last)| last - first + 1))
            .sum();
        covered == SLOTS
    }

    fn live_port(&self) -> u16 {
        self.nodes
            .iter()
            .find(|n| n.child.is_some())
            .map(|n| n.port)
            .expect("a live node")
    }

    /// Starts one node on free ports (client and bus), retrying on ports another process
    /// took first, and waits until it answers as itself.
    async fn spawn_node(&self) -> Node {
        for _ in 0..20 {
            let mut node = Node {
                port: free_port_pair(),
                child: None,
            };
            node.child = Some(self.launch(node.port));
            if self.answers_as(&mut node).await {
                return node;
            }
            stop(&mut node);
        }
        panic!("could not start a cluster node on free ports in 20 attempts");
    }

    /// Restarts a killed node on its port, empty (no persistence) but with its cluster
    /// configuration, so it rejoins as the node it was.
    pub async fn restart(&mut self, port: u16) {
        let child = self.launch(port);
        let index = self
            .nodes
            .iter()
            .position(|n| n.port == port)
            .expect("a node of this cluster");
        stop(&mut self.nodes[index]);
        let mut node = Node {
            port,
            child: Some(child),
        };
        assert!(
            self.answers_as(&mut node).await,
            "node {port} did not restart"
        );
        self.nodes[index] = node;
    }

    /// Spawns `redis-server` as a cluster node on `port`.
    fn launch(&self, port: u16) -> Child {
        Command::new(&self.server)
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--protected-mode",
                "no",
            ])
            .args([
                "--cluster-enabled",
                "yes",
                "--cluster-node-timeout",
                &self.node_timeout.to_string(),
            ])
            .arg("--cluster-config-file")
            .arg(self.dir.join(format!("nodes-{port}.conf")))
            .args(["--cluster-replica-validity-factor", "0"])
            .args(["--save", "", "--appendonly", "no"])
            .args([
                "--repl-diskless-sync",
                "yes",
                "--repl-diskless-sync-delay",
                "0",
            ])
            .args(["--notify-keyspace-events", "Ex"])
            .arg("--dir")
            .arg(&self.dir)
            .arg("--logfile")
            .arg(self.dir.join(format!("redis-{port}.log")))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn redis-server")
    }

    /// Waits (up to 10 s) until the node answers and reports its own process id: another
    /// server that holds the port would answer too.
    async fn answers_as(&self, node: &mut Node) -> bool {
        let Some(child) = node.child.as_mut() else {
            return false;
        };
        let pid = format!("process_id:{}", child.id());
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if !matches!(child.try_wait(), Ok(None)) {
                return false; // exited: the port was taken
            }
            if let Ok(mut conn) = connect(node.port).await {
                let info: Result<String, _> = redis::cmd("INFO")
                    .arg("server")
                    .query_async(&mut conn)
                    .await;
                return info.is_ok_and(|i| i.lines().any(|l| l.trim() == pid));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        false
    }

    /// Joins the nodes into a cluster with `redis-cli --cluster create`.
    async fn create(&self, cli: &Path, replicas: usize) {
        let mut command = tokio::process::Command::new(cli);
        command.arg("--cluster").arg("create");
        for node in &self.nodes {
            command.arg(format!("127.0.0.1:{}", node.port));
        }
        command
            .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
            .stdin(Stdio::null())
            .kill_on_drop(true);
        let output = tokio::time::timeout(Duration::from_secs(60), command.output())
            .await
            .expect("redis-cli --cluster create finished within 60s")
            .expect("run redis-cli");
        assert!(
            output.status.success(),
            "redis-cli --cluster create failed: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            stop(node);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Kills a node's process (if still running) and reaps it.
fn stop(node: &mut Node) {
    if let Some(mut child) = node.child.take() {
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// A connection to a node, within a second.
async fn connect(port: u16) -> redis::RedisResult<MultiplexedConnection> {
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}"))?;
    let config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(1)))
        .set_response_timeout(Some(Duration::from_secs(1)));
    client
        .get_multiplexed_async_connection_with_config(&config)
        .await
}

/// A port whose cluster bus port (+ 10000) is free too. Both come from 10000..=22767, under
/// the kernel's range for outgoing connections (32768 up), so no client socket takes one
/// between this check and the node binding it; different tests (and processes) start from
/// different places in the range.
fn free_port_pair() -> u16 {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    const FIRST: u64 = 10_000;
    const COUNT: u64 = 12_768;
    let seed = u64::from(std::process::id()).wrapping_mul(7_919) + u64::from(services::free_port());
    loop {
        let candidate = FIRST + (seed + NEXT.fetch_add(1, Ordering::Relaxed) * 101) % COUNT;
        let port = u16::try_from(candidate).expect("in range");
        let bindable = |p: u16| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok();
        if bindable(port) && bindable(port + 10_000) {
            return port;
        }
    }
}

/// The masters of a `CLUSTER NODES` reply that are not failing and serve slots, with their
/// slot ranges. A master without slots is passed over: it is how a node may still list a
/// replica whose role has not reached it yet, right after the cluster was created.
fn parse_masters(nodes: &str) -> Vec<(u16, Vec<(u32, u32)>)> {
    nodes
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let flags = fields.get(2)?;
            if !flags.contains("master") || flags.contains("fail") {
                return None;
            }
            let endpoint = fields.get(1)?.split('@').next()?;
            let port = endpoint.rsplit_once(':')?.1.parse().ok()?;
            let slots = fields
                .iter()
                .skip(8)
                .filter(|s| !s.starts_with('['))
                .filter_map(|s| match s.split_once('-') {
                    Some((a, b)) => Some((a.parse().ok()?, b.parse().ok()?)),
                    None => s.parse().ok().map(|n| (n, n)),
                })
                .collect::<Vec<_>>();
            (!slots.is_empty()).then_some((port, slots))
        })
        .collect()
}

/// Where a program is on `PATH`, or `None` (skipped) when it is not installed.
fn binary(test: &str, name: &str) -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(name))
            .find(|p| p.is_file())
    });
    match found {
        Some(path) => Some(path),
        None => services::skip_or_fail(test, &format!("{name} is not installed")),
    }
}
