//! Session servers in-process over each store, for tests that stop and restart them, or take
//! their data away: a memory store (its data dies with it), the shared Redis on 127.0.0.1:6379
//! under a key prefix of the test's own, the shared MariaDB on 127.0.0.1:3306 in a table of the
//! test's own. A missing service is skipped by the skip rule (`support::skip_or_fail`); a test's
//! keys, tables and epoch rows are removed when its [`StoreSpec`] is dropped.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use session_client::{ClientConfig, SessionClient};
use session_server::config::Settings;
use session_server::metrics::Metrics;
use session_server::server;
use session_server::store::SessionStore;
use session_server::store::memory::MemoryStore;
use session_server::store::mysql::{EPOCHS_TABLE, MIGRATIONS_TABLE, MysqlConfig, MysqlStore};
use session_server::store::redis::{RedisConfig, RedisStore};
use sqlx::mysql::MySqlConnection;
use sqlx::{AssertSqlSafe, Connection as _, Executor as _};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// The Redis the tests share.
pub const REDIS_URL: &str = "redis://127.0.0.1:6379";
/// The MariaDB the tests share.
pub const MYSQL_URL: &str = "mysql://root@127.0.0.1:3306/test";

/// Which store a session server keeps its sessions in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// In the server's process: a restart loses everything (a new epoch).
    Memory,
    /// The shared Redis, under a key prefix of the test's own.
    Redis,
    /// The shared MariaDB, in a table of the test's own.
    Mysql,
}

/// Where a test's sessions live, so that a restarted server finds the same data (Redis,
/// MySQL) or none (memory). Dropping it removes the test's keys, or its table and the rows
/// naming that table.
pub struct StoreSpec {
    /// The store kind.
    pub kind: Kind,
    /// Key prefix (Redis) or table (MySQL); empty for memory.
    pub place: String,
}

/// A name unique to this process and call, for keys and tables: `[a-z0-9_]` only.
fn unique_name(test: &str) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let short: String = test
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .take(24)
        .collect();
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() % 1_000_000_000_000)
        .unwrap_or_default();
    format!(
        "slfb_{short}_{}_{}_{nanos}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// Whether a Redis answers PING on 127.0.0.1:6379 within a second.
fn redis_answers() -> bool {
    use std::io::{Read as _, Write as _};
    let addr = SocketAddr::from(([127, 0, 0, 1], 6379));
    let Ok(mut conn) = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1)) else {
        return false;
    };
    let _ = conn.set_read_timeout(Some(Duration::from_secs(1)));
    let mut reply = [0u8; 7];
    conn.write_all(b"PING\r\n").is_ok()
        && conn.read_exact(&mut reply).is_ok()
        && &reply == b"+PONG\r\n"
}

/// Whether the shared MariaDB accepts a connection within two seconds.
async fn mysql_answers() -> bool {
    let connect = async {
        let conn = MySqlConnection::connect(MYSQL_URL).await.ok()?;
        conn.close().await.ok()
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(2), connect).await,
        Ok(Some(()))
    )
}

/// Runs `statements` on a fresh connection to the shared MariaDB.
async fn mysql_execute(statements: &[String]) {
    let mut conn = MySqlConnection::connect(MYSQL_URL)
        .await
        .expect("connect to mysql");
    for sql in statements {
        conn.execute(AssertSqlSafe(sql.as_str()))
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }
    let _ = conn.close().await;
}

/// The keys of the shared Redis that start with `prefix:`.
fn redis_keys(conn: &mut redis::Connection, prefix: &str) -> Vec<String> {
    redis::cmd("KEYS")
        .arg(format!("{prefix}:*"))
        .query(conn)
        .expect("KEYS")
}

/// A synchronous connection to the shared Redis.
fn redis_connection() -> redis::RedisResult<redis::Connection> {
    redis::Client::open(REDIS_URL)?.get_connection_with_timeout(Duration::from_secs(2))
}

impl StoreSpec {
    /// The store of `kind` for `test`, or `None` when its service is missing (skipped by the
    /// skip rule, or a failure under `STICKLESS_REQUIRE_SERVICES=1`).
    pub async fn open(kind: Kind, test: &str) -> Option<StoreSpec> {
        let place = match kind {
            Kind::Memory => String::new(),
            Kind::Redis if !redis_answers() => {
                crate::support::skip_or_fail(test, "no Redis answers on 127.0.0.1:6379");
                return None;
            }
            Kind::Mysql if !mysql_answers().await => {
                crate::support::skip_or_fail(
                    test,
                    &format!("no MySQL/MariaDB answers at {MYSQL_URL}"),
                );
                return None;
            }
            Kind::Redis | Kind::Mysql => unique_name(test),
        };
        Some(StoreSpec { kind, place })
    }

    /// The settings every server of this spec runs with: the defaults, with this test's key
    /// prefix or table.
    pub fn settings(&self) -> Settings {
        Settings {
            redis_url: REDIS_URL.to_owned(),
            redis_prefix: self.place.clone(),
            mysql_url: MYSQL_URL.to_owned(),
            mysql_table: self.place.clone(),
            mysql_pool_size: 4,
            ..Settings::default()
        }
    }

    /// A store over this spec's data: a fresh memory store (no data, a new epoch), or a store
    /// over the test's Redis prefix or MySQL table (the same data and epoch as before).
    pub async fn build(&self) -> Arc<dyn SessionStore> {
        let settings = self.settings();
        match self.kind {
            Kind::Memory => Arc::new(MemoryStore::new(settings.max_session_bytes)),
            Kind::Redis => {
                let config = RedisConfig::from_settings(&settings).expect("redis settings");
                Arc::new(RedisStore::new(config).expect("redis store"))
            }
            Kind::Mysql => {
                let config = MysqlConfig::from_settings(&settings).expect("mysql settings");
                Arc::new(MysqlStore::connect(config).await.expect("mysql store"))
            }
        }
    }

    /// Takes the store's data away while its server runs, as a flushed or replaced Redis or a
    /// recreated schema would: every key of the prefix (the epoch key `{prefix}:epoch`
    /// included), or every row of the table and its row in [`EPOCHS_TABLE`]. Not for memory
    /// (restart its server instead).
    pub async fn lose_data(&self) {
        match self.kind {
            Kind::Memory => panic!("a memory store loses its data by a restart"),
            Kind::Redis => {
                let mut conn = redis_connection().expect("connect to redis");
                let keys = redis_keys(&mut conn, &self.place);
                assert!(
                    keys.contains(&format!("{}:epoch", self.place)),
                    "the store's epoch key is among {keys:?}"
                );
                let () = redis::cmd("DEL").arg(&keys).query(&mut conn).expect("DEL");
            }
            Kind::Mysql => {
                mysql_execute(&[
                    format!("DELETE FROM `{}`", self.place),
                    format!(
                        "DELETE FROM `{EPOCHS_TABLE}` WHERE table_name = '{}'",
                        self.place
                    ),
                ])
                .await;
            }
        }
    }
}

impl Drop for StoreSpec {
    fn drop(&mut self) {
        match self.kind {
            Kind::Memory => {}
            Kind::Redis => {
                if let Ok(mut conn) = redis_connection() {
                    let keys = redis_keys(&mut conn, &self.place);
                    if !keys.is_empty() {
                        let _: redis::RedisResult<()> =
                            redis::cmd("DEL").arg(&keys).query(&mut conn);
                    }
                }
            }
            Kind::Mysql => {
                // sqlx is async: a thread with a small runtime of its own, as the test may be
                // dropping this inside its runtime.
                let table = self.place.clone();
                let cleanup = std::thread::spawn(move || {
                    let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                    else {
                        return;
                    };
                    runtime.block_on(async {
                        let work = async {
                            let mut conn = MySqlConnection::connect(MYSQL_URL).await.ok()?;
                            let _ = conn.execute("SET SESSION lock_wait_timeout = 5").await;
                            for sql in [
                                format!("DROP TABLE IF EXISTS `{table}`"),
                                format!(
                                    "DELETE FROM `{MIGRATIONS_TABLE}` WHERE table_name = '{table}'"
                                ),
                                format!(
                                    "DELETE FROM `{EPOCHS_TABLE}` WHERE table_name = '{table}'"
                                ),
                            ] {
                                let _ = conn.execute(AssertSqlSafe(sql)).await;
                            }
                            conn.close().await.ok()
                        };
                        let _ = tokio::time::timeout(Duration::from_secs(10), work).await;
                    });
                });
                let _ = cleanup.join();
            }
        }
    }
}

/// A session server running in this process on a loopback port, aborted when dropped.
pub struct Server {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Fires the shutdown signal.
    stop: Option<oneshot::Sender<()>>,
    /// The serving task.
    task: Option<JoinHandle<Result<(), server::ServeError>>>,
}

impl Server {
    /// Serves `store` with `settings` on a free loopback port.
    pub async fn start(store: Arc<dyn SessionStore>, settings: Settings) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind loopback");
        let addr = listener.local_addr().expect("local address");
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            server::run(listener, &settings, store, Metrics::new(), async {
                let _ = stopped.await;
            })
            .await
        });
        Server {
            addr,
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// A client of `namespace` straight to this server (the administrator's).
    pub fn client(&self, namespace: &str) -> SessionClient {
        client_of(&format!("http://{}", self.addr), namespace)
    }

    /// Stops it: the shutdown signal, at most 5 s for the calls in flight, then the task is
    /// aborted.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let abort = task.abort_handle();
            if tokio::time::timeout(Duration::from_secs(5), task)
                .await
                .is_err()
            {
                abort.abort();
            }
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

/// A client of `namespace` at `url`, with a bound of 2 s per call.
pub fn client_of(url: &str, namespace: &str) -> SessionClient {
    let mut config = ClientConfig::new(url);
    config.namespace = namespace.to_owned();
    config.timeout = Duration::from_secs(2);
    SessionClient::connect_lazy(config).expect("session client")
}
