//! The event subscriber on a Redis Cluster: a supervisor that looks the cluster up
//! (`CLUSTER NODES`, from the last nodes it saw or else the seeds) every
//! [`TOPOLOGY_EVERY`] and whenever a subscription ends, and keeps
//!
//! - one subscription to the events channel, on any live node: the cluster bus forwards every
//!   PUBLISH to all nodes. When that node dies or stops answering pings, the next live node
//!   takes over;
//! - one subscription to the expiry notifications on every master, since a node notifies only
//!   the expiries of its own keys. A replica promoted by a failover is subscribed at the next
//!   look-up; a node that stopped being a master is dropped.
//!
//! Events published while no subscription is up (between a node's death and the next
//! look-up, at most about a second) are not delivered: pub/sub keeps nothing.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use ::redis::aio::MultiplexedConnection;
use ::redis::{Client, ConnectionAddr, ConnectionInfo, RedisError};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::{MIN_BACKOFF, Subscriber};
use crate::store::redis::topology::{self, Node};

/// How often the cluster's nodes are looked up, so a promoted replica's expiries are heard soon
/// after a failover. One `CLUSTER NODES` on a kept connection: cheap.
const TOPOLOGY_EVERY: Duration = Duration::from_secs(1);

/// A subscription task, aborted when dropped (so dropping the supervisor ends them all).
struct Listener {
    /// The task; it ends when its connection does.
    task: JoinHandle<()>,
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The supervisor's state.
struct Supervisor {
    /// Shared with the listener tasks: channels, decoding, the broadcast sender.
    subscriber: Arc<Subscriber>,
    /// The seed nodes: asked when no node seen before answers, and the settings of every node.
    seeds: Vec<ConnectionInfo>,
    /// The live nodes of the last look-up, asked first next time.
    known: Vec<ConnectionInfo>,
    /// The connection the last look-up went through, and the host it reached.
    lookup: Option<(String, MultiplexedConnection)>,
    /// The events channel subscription.
    events: Option<Listener>,
    /// The expiry subscriptions, by master address.
    expiry: HashMap<String, Listener>,
    /// Rotates the events subscription through the nodes, so a node that keeps failing is not
    /// tried over and over.
    next_events_node: usize,
    /// Listeners say here that they ended, to wake the supervisor early.
    ended: mpsc::UnboundedSender<()>,
    /// Whether the masters' expiry notification setting was checked (once).
    checked_notifications: bool,
    /// Whether the last look-up worked, to log an outage once.
    reachable: bool,
}

/// Runs the supervisor until aborted.
pub(super) async fn run(subscriber: Arc<Subscriber>, seeds: &[ConnectionInfo]) {
    if seeds.is_empty() {
        return;
    }
    let (ended, mut ended_rx) = mpsc::unbounded_channel();
    let mut supervisor = Supervisor {
        subscriber,
        seeds: seeds.to_vec(),
        known: Vec::new(),
        lookup: None,
        events: None,
        expiry: HashMap::new(),
        next_events_node: 0,
        ended,
        checked_notifications: false,
        reachable: true,
    };
    loop {
        supervisor.reconcile().await;
        tokio::select! {
            _ = tokio::time::sleep(TOPOLOGY_EVERY) => {}
            Some(()) = ended_rx.recv() => {
                // Give the cluster a moment (and avoid a tight loop on a node that refuses).
                tokio::time::sleep(MIN_BACKOFF).await;
                while ended_rx.try_recv().is_ok() {}
            }
        }
    }
}

impl Supervisor {
    /// Looks the cluster up and starts or stops subscriptions to match it.
    async fn reconcile(&mut self) {
        let Some(nodes) = self.discover().await else {
            return;
        };
        let seed = &self.seeds[0];
        self.known = nodes.iter().map(|n| n.connection_info(seed)).collect();

        let masters: HashSet<String> = nodes
            .iter()
            .filter(|n| n.master)
            .map(Node::address)
            .collect();
        self.expiry
            .retain(|address, l| masters.contains(address) && !l.task.is_finished());
        for node in nodes.iter().filter(|n| n.master) {
            if !self.expiry.contains_key(&node.address()) {
                let listener = self.listen(node, self.subscriber.expired.clone(), false);
                self.expiry.insert(node.address(), listener);
            }
        }

        let events_up = self.events.as_ref().is_some_and(|l| !l.task.is_finished());
        if !events_up && !nodes.is_empty() {
            let node = &nodes[self.next_events_node % nodes.len()];
            self.next_events_node = self.next_events_node.wrapping_add(1);
            let resumed = self.events.is_some();
            self.events = Some(self.listen(node, self.subscriber.events.clone(), resumed));
        }

        if !self.checked_notifications
            && let Some(master) = nodes.iter().find(|n| n.master)
        {
            self.checked_notifications = true;
            if let Ok(client) = Client::open(master.connection_info(seed)) {
                self.subscriber.check_notifications(&client).await;
            }
        }
    }

    /// The live nodes, from the kept connection, else the nodes seen last, else the seeds.
    async fn discover(&mut self) -> Option<Vec<Node>> {
        if let Some((host, conn)) = &mut self.lookup {
            match self.subscriber.bounded(cluster_nodes(conn)).await {
                Ok(reply) => return Some(topology::parse_nodes(&reply, host)),
                Err(error) => {
                    tracing::debug!(%error, "redis cluster look-up failed; trying other nodes");
                    self.lookup = None;
                }
            }
        }
        let mut last_error = None;
        for info in self.known.iter().chain(&self.seeds) {
            let host = host_of(info);
            let attempt = async {
                let client = Client::open(info.clone())?;
                let mut conn = client.get_multiplexed_async_connection().await?;
                let reply = cluster_nodes(&mut conn).await?;
                Ok::<_, RedisError>((conn, reply))
            };
            match self.subscriber.bounded(attempt).await {
                Ok((conn, reply)) => {
                    let nodes = topology::parse_nodes(&reply, &host);
                    self.lookup = Some((host, conn));
                    if !self.reachable {
                        self.reachable = true;
                        tracing::info!("redis cluster reachable again for events");
                    }
                    return Some(nodes);
                }
                Err(error) => last_error = Some(error),
            }
        }
        if self.reachable {
            self.reachable = false;
            let error = last_error.unwrap_or_default();
            tracing::warn!(%error, "no redis cluster node answers; events resume when one does");
        }
        None
    }

    /// Starts a task that subscribes to `channel` on `node` and listens until the connection
    /// ends; it then wakes the supervisor.
    fn listen(&self, node: &Node, channel: String, resumed: bool) -> Listener {
        let subscriber = self.subscriber.clone();
        let info = node.connection_info(&self.seeds[0]);
        let ended = self.ended.clone();
        let node_address = node.address();
        let task = tokio::spawn(async move {
            let subscribed = match Client::open(info) {
                Ok(client) => subscriber.subscribe(&client, &[channel.as_str()]).await,
                Err(error) => Err(error.to_string()),
            };
            match subscribed {
                Ok(pubsub) => {
                    tracing::info!(node = %node_address, %channel, "redis cluster subscription established");
                    subscriber.listen(pubsub, resumed).await;
                    tracing::warn!(node = %node_address, %channel, "redis cluster subscription lost");
                }
                Err(error) => {
                    tracing::debug!(node = %node_address, %channel, %error, "cannot subscribe");
                }
            }
            let _ = ended.send(());
        });
        Listener { task }
    }
}

impl Subscriber {
    /// Runs a cluster look-up step within the subscriber's timeout.
    async fn bounded<T>(
        &self,
        step: impl Future<Output = Result<T, RedisError>>,
    ) -> Result<T, String> {
        match tokio::time::timeout(self.timeout, step).await {
            Ok(result) => result.map_err(|e| e.to_string()),
            Err(_) => Err(format!("no answer within {:?}", self.timeout)),
        }
    }
}

async fn cluster_nodes(conn: &mut MultiplexedConnection) -> Result<String, RedisError> {
    ::redis::cmd("CLUSTER").arg("NODES").query_async(conn).await
}

/// The host a connection goes to (for nodes announced without one).
fn host_of(info: &ConnectionInfo) -> String {
    match info.addr() {
        ConnectionAddr::Tcp(host, _) | ConnectionAddr::TcpTls { host, .. } => host.clone(),
        _ => String::new(),
    }
}
