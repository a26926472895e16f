//! Finding the primary of a Redis Sentinel deployment, as the Sentinel client specification
//! asks: every (re)connect asks the sentinels in turn (the one that answered last first)
//! `SENTINEL GET-MASTER-ADDR-BY-NAME <master>`, connects to the address named and keeps the
//! connection only once `ROLE` says that server is a master. A sentinel that does not know the
//! name, cannot be reached or names a server that is down or not (yet, or no longer) a master
//! moves the search to the next sentinel; when none names a usable primary the connect fails
//! with [`StoreError::Unavailable`], and the store's next call searches again.
//!
//! This is what lets the store follow a failover without a restart: a lane (`connection`) whose
//! connection breaks (the primary died, or a demoted primary's sentinel-issued `CLIENT KILL`)
//! or that answers `READONLY` (it reached a replica) is dropped, and its next connect lands on
//! whichever server the sentinels have promoted by then. The lanes also listen to the
//! sentinels' `+promoted-slave` and `+switch-master` announcements and reconnect all at once
//! when one comes: after a switchover (`SENTINEL FAILOVER`) the old primary stays a master,
//! taking writes that its demotion would then discard, until the sentinels reconfigure it.
//! Writes between the replica's promotion and the announcement's arrival (the sentinels
//! publish it as they start naming the new primary) can still land on the old one and be lost,
//! as with any Sentinel client; a primary that died takes none. The event subscriber
//! (`events`) finds its server the same way.
//!
//! Not `redis::sentinel`: its async look-up connects without the store's timeouts, checks the
//! role on a connection of its own and then opens another, and needs `&mut` (a lock around
//! every look-up); here the connection that passed `ROLE` is the lane's connection.
//!
//! The URL (`redis://[user:pw@]s1:26379,s2:26379[/db]`, split as cluster seeds are: an entry
//! without a scheme takes the first one's scheme and credentials) gives each sentinel its
//! address, credentials and TLS (`rediss://`, with the store's CA); the primary is reached with
//! the first entry's credentials, database and TLS. Sentinels only have database 0.

use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use futures::StreamExt as _;

use ::redis::aio::MultiplexedConnection;
use ::redis::{AsyncConnectionConfig, Client, ConnectionInfo, RedisError, Role};

use super::config::{RedisConfig, seed_urls};
use super::connection::redis_error;
use super::topology::Node;
use crate::store::{StoreError, StoreResult};

/// How often the subscription to a sentinel's announcements is pinged: one that does not
/// answer within the store timeout is given up for the next sentinel.
const PING_EVERY: Duration = Duration::from_secs(15);

/// The channels on which a sentinel announces a failover's new primary: `+promoted-slave` when
/// the replica it chose answers as a master (from then on it names that one), `+switch-master`
/// when the failover ends.
const SWITCH_CHANNELS: [&str; 2] = ["+promoted-slave", "+switch-master"];
/// First wait before subscribing again to a sentinel's announcements.
const SWITCHES_MIN_BACKOFF: Duration = Duration::from_millis(100);
/// Longest wait between two subscription attempts, so announcements are heard again soon
/// after a sentinel comes back.
const SWITCHES_MAX_BACKOFF: Duration = Duration::from_secs(2);

/// The sentinels of one monitored master, and how to reach what they name.
pub(super) struct Sentinels {
    /// How to reach each sentinel, in the order of the URL (database 0).
    sentinels: Vec<ConnectionInfo>,
    /// The name the sentinels monitor the primary under (`sentinel monitor <name> ...`).
    master: String,
    /// The first URL's settings (credentials, database, TLS): the primary's, with the address
    /// the sentinels name.
    primary_settings: ConnectionInfo,
    /// Connect and response timeouts of every connection made here.
    settings: AsyncConnectionConfig,
    /// The store's timeout: bound on connecting and subscribing to a sentinel's announcements.
    timeout: Duration,
    /// The sentinel that answered last and its connection, asked first next time (the
    /// specification's "move it to the head of the list"), so a failover's reconnects do not
    /// each open a sentinel connection.
    last: Mutex<Option<(usize, MultiplexedConnection)>>,
}

impl Sentinels {
    /// The sentinels of `config.url` monitoring `master`. Errors are malformed URLs and an
    /// empty list.
    pub(super) fn new(config: &RedisConfig, master: &str) -> Result<Self, RedisError> {
        let urls = seed_urls(&config.url);
        let sentinels = urls
            .iter()
            .map(|url| {
                let info = config.client(url.as_str())?.get_connection_info().clone();
                let at_db_zero = info.redis_settings().clone().set_db(0);
                Ok(info.set_redis_settings(at_db_zero))
            })
            .collect::<Result<Vec<_>, RedisError>>()?;
        let first = urls.first().ok_or_else(|| {
            RedisError::from((
                ::redis::ErrorKind::InvalidClientConfig,
                "no sentinel in the redis url",
            ))
        })?;
        let primary_settings = config.client(first.as_str())?.get_connection_info().clone();
        Ok(Sentinels {
            sentinels,
            master: master.to_owned(),
            primary_settings,
            settings: AsyncConnectionConfig::new()
                .set_connection_timeout(Some(config.timeout))
                .set_response_timeout(Some(config.timeout)),
            timeout: config.timeout,
            last: Mutex::new(None),
        })
    }

    /// How many sentinels are configured.
    pub(super) fn count(&self) -> usize {
        self.sentinels.len()
    }

    /// A connection to the current primary, checked with `ROLE`, and how it was reached.
    /// Unavailable when no sentinel names a primary that answers as one.
    pub(super) async fn primary(&self) -> StoreResult<(ConnectionInfo, MultiplexedConnection)> {
        let cached = self.cached();
        let start = cached.as_ref().map_or(0, |(index, _)| *index);
        let mut cached = cached.map(|(_, conn)| conn);
        let mut failures = Vec::new();
        let mut tried: Vec<(String, u16)> = Vec::new();
        for offset in 0..self.sentinels.len() {
            let index = (start + offset) % self.sentinels.len();
            let address = match self.ask(index, cached.take()).await {
                Ok(Some(address)) => address,
                Ok(None) => {
                    failures.push(format!(
                        "sentinel {} does not know master {:?}",
                        self.describe(index),
                        self.master
                    ));
                    continue;
                }
                Err(error) => {
                    failures.push(format!("sentinel {}: {error}", self.describe(index)));
                    continue;
                }
            };
            // Another sentinel naming the same server would get the same answer from it.
            if tried.contains(&address) {
                continue;
            }
            tried.push(address.clone());
            let (host, port) = address;
            match self.connect_primary(&host, port).await {
                Ok(found) => return Ok(found),
                Err(why) => failures.push(format!(
                    "{host}:{port}, named by sentinel {}: {why}",
                    self.describe(index)
                )),
            }
        }
        Err(StoreError::Unavailable(format!(
            "no redis sentinel names a usable primary for master {:?}: {}",
            self.master,
            failures.join("; ")
        )))
    }

    /// Listens to the sentinels' `+switch-master` announcements (on one sentinel at a time,
    /// the next one when it fails) and calls `switched` for each about this master, and once
    /// after every gap in the subscription (a switch may have gone unheard); returns when
    /// `switched` returns false. Runs until then, retrying with capped backoff.
    pub(super) async fn watch_switches(&self, mut switched: impl FnMut() -> bool) {
        let mut backoff = SWITCHES_MIN_BACKOFF;
        let mut index = 0;
        let mut heard_before = false;
        loop {
            let subscribe = async {
                let client = Client::open(self.sentinels[index].clone())?;
                let mut pubsub = client.get_async_pubsub().await?;
                pubsub.subscribe(&SWITCH_CHANNELS).await?;
                Ok::<_, RedisError>(pubsub)
            };
            match tokio::time::timeout(self.timeout, subscribe).await {
                Ok(Ok(pubsub)) => {
                    backoff = SWITCHES_MIN_BACKOFF;
                    if heard_before && !switched() {
                        return;
                    }
                    heard_before = true;
                    // Pinged every PING_EVERY: a sentinel gone silent without closing the
                    // connection is left for another, not listened to for ever.
                    let (mut sink, mut messages) = pubsub.split();
                    let mut ping = tokio::time::interval(PING_EVERY);
                    ping.reset();
                    loop {
                        tokio::select! {
                            message = messages.next() => {
                                let Some(message) = message else { break };
                                let payload = String::from_utf8_lossy(message.get_payload_bytes());
                                if self.announces_switch(message.get_channel_name(), &payload) {
                                    tracing::info!(switch = %payload, "redis sentinel announced a new primary; reconnecting");
                                    if !switched() {
                                        return;
                                    }
                                }
                            }
                            _ = ping.tick() => {
                                let answer = tokio::time::timeout(self.timeout, sink.ping::<::redis::Value>()).await;
                                if !matches!(answer, Ok(Ok(_))) {
                                    break;
                                }
                            }
                        }
                    }
                    tracing::debug!(sentinel = %self.describe(index), "sentinel announcements lost; resubscribing");
                }
                Ok(Err(error)) => {
                    tracing::debug!(sentinel = %self.describe(index), %error, "cannot subscribe to sentinel announcements");
                }
                Err(_) => {
                    tracing::debug!(sentinel = %self.describe(index), "no answer to the subscription to sentinel announcements");
                }
            }
            index = (index + 1) % self.sentinels.len();
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(SWITCHES_MAX_BACKOFF);
        }
    }

    /// Whether `payload` on `channel` announces a new primary for this master:
    /// `+switch-master`'s is `<master> <old ip> <old port> <new ip> <new port>`,
    /// `+promoted-slave`'s `slave <ip:port> <ip> <port> @ <master> <ip> <port>`.
    fn announces_switch(&self, channel: &str, payload: &str) -> bool {
        let mut words = payload.split(' ');
        let master = match channel {
            "+switch-master" => words.next(),
            "+promoted-slave" => words.skip_while(|w| *w != "@").nth(1),
            _ => None,
        };
        master == Some(self.master.as_str())
    }

    /// The address sentinel `index` gives for the master (`None`: it does not know the name),
    /// through `cached` (its kept connection) if given, else (or should that one have broken)
    /// a new connection, which is kept when it answers.
    async fn ask(
        &self,
        index: usize,
        cached: Option<MultiplexedConnection>,
    ) -> Result<Option<(String, u16)>, RedisError> {
        if let Some(mut conn) = cached {
            match self.get_master_addr(&mut conn).await {
                Ok(address) => return Ok(address),
                Err(error) => {
                    tracing::debug!(sentinel = %self.describe(index), %error, "kept sentinel connection failed; reconnecting");
                    self.forget(index);
                }
            }
        }
        let client = Client::open(self.sentinels[index].clone())?;
        let mut conn = client
            .get_multiplexed_async_connection_with_config(&self.settings)
            .await?;
        let address = self.get_master_addr(&mut conn).await?;
        *self.last.lock().unwrap_or_else(PoisonError::into_inner) = Some((index, conn));
        Ok(address)
    }

    /// `SENTINEL GET-MASTER-ADDR-BY-NAME <master>`: `[ip, port]`, or nil for an unknown name.
    async fn get_master_addr(
        &self,
        conn: &mut MultiplexedConnection,
    ) -> Result<Option<(String, u16)>, RedisError> {
        ::redis::cmd("SENTINEL")
            .arg("GET-MASTER-ADDR-BY-NAME")
            .arg(&self.master)
            .query_async(conn)
            .await
    }

    /// Connects to the server at `host:port` with the primary's settings and keeps the
    /// connection if `ROLE` says it is a master; why not otherwise.
    async fn connect_primary(
        &self,
        host: &str,
        port: u16,
    ) -> Result<(ConnectionInfo, MultiplexedConnection), String> {
        let node = Node {
            host: host.to_owned(),
            port,
            master: true,
        };
        let info = node.connection_info(&self.primary_settings);
        let connect = async {
            let client = Client::open(info.clone())?;
            let mut conn = client
                .get_multiplexed_async_connection_with_config(&self.settings)
                .await?;
            let role: Role = ::redis::cmd("ROLE").query_async(&mut conn).await?;
            Ok::<_, RedisError>((conn, role))
        };
        match connect.await {
            Ok((conn, Role::Primary { .. })) => Ok((info, conn)),
            Ok((_, Role::Replica { .. })) => Err("a replica, not (yet) promoted".into()),
            Ok((_, _)) => Err("not a master (a sentinel?)".into()),
            Err(error) => Err(redis_error(error).to_string()),
        }
    }

    /// The kept sentinel connection, if any.
    fn cached(&self) -> Option<(usize, MultiplexedConnection)> {
        self.last
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Drops the kept connection if it is sentinel `index`'s.
    fn forget(&self, index: usize) {
        let mut last = self.last.lock().unwrap_or_else(PoisonError::into_inner);
        if last.as_ref().is_some_and(|(i, _)| *i == index) {
            *last = None;
        }
    }

    /// `host:port` of sentinel `index`, for messages.
    fn describe(&self, index: usize) -> String {
        self.sentinels[index].addr().to_string()
    }
}

impl std::fmt::Debug for Sentinels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sentinels")
            .field("sentinels", &self.sentinels.len())
            .field("master", &self.master)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ::redis::ConnectionAddr;

    #[test]
    fn sentinels_are_asked_on_database_0_and_the_primary_gets_the_urls_settings() {
        let config = RedisConfig::new("redis://:pw@127.0.0.1:26379/3,127.0.0.2:26380", 1024);
        let sentinels = Sentinels::new(&config, "main").expect("valid url");
        assert_eq!(sentinels.sentinels.len(), 2);
        for sentinel in &sentinels.sentinels {
            assert_eq!(sentinel.redis_settings().db(), 0);
            assert_eq!(sentinel.redis_settings().password(), Some("pw"));
        }
        assert!(matches!(
            sentinels.sentinels[1].addr(),
            ConnectionAddr::Tcp(h, 26380) if h == "127.0.0.2"
        ));
        let primary = Node {
            host: "10.0.0.9".into(),
            port: 6379,
            master: true,
        }
        .connection_info(&sentinels.primary_settings);
        assert_eq!(primary.redis_settings().db(), 3);
        assert_eq!(primary.redis_settings().password(), Some("pw"));
        assert!(matches!(primary.addr(), ConnectionAddr::Tcp(h, 6379) if h == "10.0.0.9"));
        assert!(Sentinels::new(&RedisConfig::new(" , ", 1024), "main").is_err());
    }

    #[test]
    fn announcements_of_this_master_are_told_from_others() {
        let config = RedisConfig::new("redis://127.0.0.1:26379", 1024);
        let sentinels = Sentinels::new(&config, "main").expect("valid url");
        let switch = "main 127.0.0.1 6379 127.0.0.1 6380";
        assert!(sentinels.announces_switch("+switch-master", switch));
        assert!(!sentinels.announces_switch("+switch-master", "other 1 2 3 4"));
        let promoted = "slave 127.0.0.1:6380 127.0.0.1 6380 @ main 127.0.0.1 6379";
        assert!(sentinels.announces_switch("+promoted-slave", promoted));
        let elsewhere = "slave 127.0.0.1:6380 127.0.0.1 6380 @ mainly 127.0.0.1 6379";
        assert!(!sentinels.announces_switch("+promoted-slave", elsewhere));
        assert!(!sentinels.announces_switch("+sdown", switch));
    }

    #[tokio::test]
    async fn no_sentinel_answering_is_unavailable_naming_them() {
        let config = RedisConfig::new("redis://127.0.0.1:1,127.0.0.1:2", 1024);
        let sentinels = Sentinels::new(&config, "main").expect("valid url");
        match sentinels.primary().await {
            Err(StoreError::Unavailable(message)) => {
                assert!(message.contains("127.0.0.1:1"), "{message}");
                assert!(message.contains("127.0.0.1:2"), "{message}");
                assert!(message.contains("\"main\""), "{message}");
            }
            other => panic!("{other:?}"),
        }
    }
}
