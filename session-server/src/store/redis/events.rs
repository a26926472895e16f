//! The event subscriber of the Redis store: a background task with its own pub/sub
//! connections that turns the scripts' published events, and Redis' own expiry notifications,
//! into [`SessionEvent`]s on the store's broadcast channel. It reconnects forever with capped
//! backoff; the store aborts it when dropped.
//!
//! On one server, one connection subscribes to both channels; with Sentinel, on the primary
//! the sentinels name at each (re)connect, so the subscription follows a failover (the old
//! primary's death, or the sentinels' disconnecting of its clients when it is demoted, ends
//! it). On a cluster (see
//! `events/cluster.rs`), the events channel is heard on any one node, since a cluster forwards
//! every PUBLISH to all its nodes, and expiries on every master, since each node notifies only
//! the expiries of its own keys.

mod cluster;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use ::redis::{Client, ConnectionInfo, Msg, RedisError, Value};
use futures::StreamExt;
use tokio::sync::broadcast;
use tokio::task::JoinHandle;

use super::codec;
use super::config::{RedisConfig, seed_urls};
use super::sentinel::Sentinels;
use crate::store::{EventKind, SessionEvent};

/// First wait before reconnecting: short, so a restarted Redis is picked up quickly.
const MIN_BACKOFF: Duration = Duration::from_millis(100);
/// Longest wait between reconnect attempts, so recovery never lags a restart by more than this.
const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// How often an idle subscription is pinged, to notice a connection that died silently.
const PING_EVERY: Duration = Duration::from_secs(15);

/// Where the subscriber listens.
enum Source {
    /// One server.
    Standalone(Box<Client>),
    /// The primary the sentinels name.
    Sentinel(Box<Sentinels>),
    /// A cluster, found from its seed nodes (whose settings reach every node).
    Cluster(Vec<ConnectionInfo>),
}

/// What the subscriber tasks need.
pub(crate) struct Subscriber {
    /// Where to subscribe.
    source: Source,
    /// The store's key prefix: the expired keys it owns.
    prefix: String,
    /// The scripts' events channel.
    events: String,
    /// The expiry notifications channel of the database the store uses.
    expired: String,
    /// Where decoded events go.
    sender: broadcast::Sender<SessionEvent>,
    /// Bound on connecting and on each command (ping, subscribe, cluster lookups).
    timeout: Duration,
}

impl Subscriber {
    /// The subscriber of a store with `config`; errors are malformed URLs.
    pub(crate) fn new(
        config: &RedisConfig,
        sender: broadcast::Sender<SessionEvent>,
    ) -> Result<Self, RedisError> {
        let (source, db) = if config.cluster {
            let seeds = seed_urls(&config.url)
                .iter()
                .map(|url| Ok(config.client(url.as_str())?.get_connection_info().clone()))
                .collect::<Result<Vec<_>, RedisError>>()?;
            // A cluster has only database 0.
            (Source::Cluster(seeds), 0)
        } else if let Some(master) = &config.sentinel_master {
            let sentinels = Sentinels::new(config, master)?;
            let client = config.client(config.url.as_str())?;
            let db = client.get_connection_info().redis_settings().db();
            (Source::Sentinel(Box::new(sentinels)), db)
        } else {
            let client = config.client(config.url.as_str())?;
            let db = client.get_connection_info().redis_settings().db();
            (Source::Standalone(Box::new(client)), db)
        };
        Ok(Subscriber {
            source,
            prefix: config.key_prefix.clone(),
            events: codec::events_channel(&config.key_prefix),
            // Only this database's expiries: another database may hold keys with the prefix.
            expired: format!("__keyevent@{db}__:expired"),
            sender,
            timeout: config.timeout,
        })
    }

    /// Starts the task; it runs until aborted.
    pub(crate) fn spawn(self, runtime: &tokio::runtime::Handle) -> JoinHandle<()> {
        let subscriber = Arc::new(self);
        runtime.spawn(async move {
            match &subscriber.source {
                Source::Standalone(_) | Source::Sentinel(_) => subscriber.run_standalone().await,
                Source::Cluster(seeds) => cluster::run(subscriber.clone(), seeds).await,
            }
        })
    }

    /// Subscribes on the one server, again whenever the subscription ends; with Sentinel, also
    /// whenever the sentinels announce a new primary (see `sentinel`), so that events
    /// published on it are not missed while the old one waits to be demoted.
    async fn run_standalone(&self) {
        let switched = tokio::sync::Notify::new();
        let watch_switches = async {
            match &self.source {
                Source::Sentinel(sentinels) => {
                    sentinels
                        .watch_switches(|| {
                            switched.notify_one();
                            true
                        })
                        .await;
                }
                _ => std::future::pending().await,
            }
        };
        tokio::select! {
            () = watch_switches => {}
            () = self.resubscribe_forever(&switched) => {}
        }
    }

    async fn resubscribe_forever(&self, switched: &tokio::sync::Notify) {
        let mut backoff = MIN_BACKOFF;
        let mut checked_notifications = false;
        let mut was_connected = true;
        let mut lost_once = false;
        let channels = [self.events.as_str(), self.expired.as_str()];
        loop {
            let subscribed = match self.server().await {
                Ok(client) => self
                    .subscribe(&client, &channels)
                    .await
                    .map(|pubsub| (pubsub, client)),
                Err(error) => Err(error),
            };
            match subscribed {
                Ok((pubsub, client)) => {
                    tracing::info!(channel = %self.events, "redis event subscription established");
                    backoff = MIN_BACKOFF;
                    was_connected = true;
                    if !checked_notifications {
                        checked_notifications = true;
                        self.check_notifications(&client).await;
                    }
                    self.listen_until(pubsub, switched.notified(), lost_once)
                        .await;
                    lost_once = true;
                    tracing::warn!(channel = %self.events, "redis event subscription lost or moved; reconnecting");
                }
                Err(error) if was_connected => {
                    was_connected = false;
                    tracing::warn!(%error, "cannot subscribe to redis events; retrying");
                }
                Err(error) => tracing::debug!(%error, "cannot subscribe to redis events"),
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    /// A client of the one server to subscribe on: the URL's, or the primary the sentinels
    /// name now.
    async fn server(&self) -> Result<Client, String> {
        match &self.source {
            Source::Standalone(client) => Ok(client.as_ref().clone()),
            Source::Sentinel(sentinels) => {
                // Each sentinel asked, and the primary it names, get the store timeout: a dead
                // first sentinel must not use up the time of the others.
                let within = self.timeout.saturating_mul(sentinels.count() as u32 + 1);
                let (info, _checked) = tokio::time::timeout(within, sentinels.primary())
                    .await
                    .map_err(|_| format!("no primary found within {within:?}"))?
                    .map_err(|e| e.to_string())?;
                Client::open(info).map_err(|e| e.to_string())
            }
            Source::Cluster(_) => Err("a cluster has no one server".into()),
        }
    }

    /// Connects and subscribes to `channels`.
    async fn subscribe(
        &self,
        client: &Client,
        channels: &[&str],
    ) -> Result<::redis::aio::PubSub, String> {
        let connect = async {
            let mut pubsub = client.get_async_pubsub().await?;
            for channel in channels {
                pubsub.subscribe(*channel).await?;
            }
            Ok::<_, RedisError>(pubsub)
        };
        match tokio::time::timeout(self.timeout, connect).await {
            Ok(result) => result.map_err(|e| e.to_string()),
            Err(_) => Err(format!("no answer within {:?}", self.timeout)),
        }
    }

    /// Forwards messages until the connection ends or stops answering pings (see
    /// `listen_until`).
    async fn listen(&self, pubsub: ::redis::aio::PubSub, resumed: bool) {
        self.listen_until(pubsub, std::future::pending(), resumed)
            .await;
    }

    /// Like `listen`, ending also when `until` completes. A gap is broadcast
    /// ([`EventKind::Gap`]) when the subscription ends, and when it starts again after one
    /// was lost (`resumed`): watchers on the feed when it went, and those that subscribed while
    /// it was down, are ended and subscribe again, so none misses events unknowingly. (Before
    /// the first subscription of a server's life there is no gap: a watcher that subscribes in
    /// the moment between a server's start and its first subscription may miss events.)
    async fn listen_until(
        &self,
        pubsub: ::redis::aio::PubSub,
        until: impl Future<Output = ()>,
        resumed: bool,
    ) {
        if resumed {
            self.gap();
        }
        self.relay(pubsub, until).await;
        self.gap();
    }

    /// Tells watchers that events may have been missed.
    fn gap(&self) {
        let _ = self.sender.send(SessionEvent {
            kind: EventKind::Gap,
            namespace: String::new(),
            id: String::new(),
            user_id: String::new(),
            version: 0,
            at: SystemTime::now(),
        });
    }

    /// Forwards messages until the connection ends, stops answering pings, or `until`.
    async fn relay(&self, pubsub: ::redis::aio::PubSub, until: impl Future<Output = ()>) {
        let (mut sink, mut stream) = pubsub.split();
        let mut ping = tokio::time::interval(PING_EVERY);
        ping.reset();
        let mut until = std::pin::pin!(until);
        loop {
            tokio::select! {
                () = &mut until => return,
                message = stream.next() => match message {
                    Some(message) => self.forward(&message),
                    None => return,
                },
                _ = ping.tick() => {
                    let answer = tokio::time::timeout(self.timeout, sink.ping::<Value>()).await;
                    if !matches!(answer, Ok(Ok(_))) {
                        return;
                    }
                }
            }
        }
    }

    /// Decodes one message and broadcasts it; malformed ones are logged and skipped.
    fn forward(&self, message: &Msg) {
        let channel = message.get_channel_name();
        let event = if channel == self.events {
            match codec::decode_event(message.get_payload_bytes()) {
                Ok(event) => event,
                Err(reason) => {
                    tracing::warn!(%channel, %reason, "skipping malformed session event");
                    return;
                }
            }
        } else if channel == self.expired {
            let key = String::from_utf8_lossy(message.get_payload_bytes());
            let Some((namespace, id)) = codec::parse_session_key(&self.prefix, &key) else {
                return; // another application's key, our user index or a tombstone
            };
            SessionEvent {
                kind: EventKind::Expired,
                namespace,
                id,
                user_id: String::new(),
                version: 0,
                at: SystemTime::now(),
            }
        } else {
            return;
        };
        // An error only means nobody is watching right now.
        let _ = self.sender.send(event);
    }

    /// Logs once when Redis does not send expiry notifications, so EXPIRED events never come.
    /// Errors are ignored: managed Redis services often forbid CONFIG.
    async fn check_notifications(&self, client: &Client) {
        let check = async {
            let mut conn = client.get_multiplexed_async_connection().await?;
            ::redis::cmd("CONFIG")
                .arg("GET")
                .arg("notify-keyspace-events")
                .query_async::<HashMap<String, String>>(&mut conn)
                .await
        };
        let Ok(Ok(config)) = tokio::time::timeout(self.timeout, check).await else {
            return;
        };
        let flags = config
            .get("notify-keyspace-events")
            .cloned()
            .unwrap_or_default();
        let expiry_on = flags.contains('E') && (flags.contains('x') || flags.contains('A'));
        if !expiry_on {
            tracing::info!(
                notify_keyspace_events = %flags,
                "redis keyspace notifications for expiry are off (need \"Ex\"): \
                 watchers get no EXPIRED events"
            );
        }
    }
}
