//! MySQL/MariaDB for tests: the shared MariaDB on 127.0.0.1:3306 (a table per test, dropped
//! afterwards), and a private `mariadbd` a test can stop and restart, or serve TLS with
//! certificates of a test CA. Both follow the skip rule of [`services`].

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use session_server::config::Settings;
use session_server::store::mysql::{EPOCHS_TABLE, MIGRATIONS_TABLE, MysqlConfig, MysqlStore};
use sqlx::mysql::MySqlConnection;
use sqlx::{AssertSqlSafe, Connection as _, Executor as _};

use super::harness::{StoreUnderTest, Wipe};
use super::services;
use test_pki::Ca;

/// The MariaDB every MySQL test uses, as CI and developer machines run it.
pub const MYSQL_URL: &str = "mysql://root@127.0.0.1:3306/test";

/// How often test stores reap, so expiry tests see EXPIRED quickly.
pub const TEST_REAP_INTERVAL: Duration = Duration::from_millis(100);

/// How long one start of a private `mariadbd` gets to answer: generous, for a loaded machine
/// (InnoDB recovery after a kill included).
const MARIADB_START_WITHIN: Duration = Duration::from_secs(60);

/// Starts of a restarted `mariadbd` on its own port before the test gives up.
const RESTART_ATTEMPTS: usize = 3;

/// `@@datadir` of the MySQL server at `url`, or `None` when none answers within two seconds.
async fn datadir_at(url: &str) -> Option<String> {
    let ask = async {
        let mut conn = MySqlConnection::connect(url).await.ok()?;
        let datadir: String = sqlx::query_scalar("SELECT @@datadir")
            .fetch_one(&mut conn)
            .await
            .ok()?;
        let _ = conn.close().await;
        Some(datadir)
    };
    tokio::time::timeout(Duration::from_secs(2), ask)
        .await
        .ok()
        .flatten()
}

/// Whether a MySQL server accepts a connection at `url` within two seconds.
pub async fn mysql_answers(url: &str) -> bool {
    let connect = async {
        let conn = MySqlConnection::connect(url).await.ok()?;
        conn.close().await.ok()
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(2), connect).await,
        Ok(Some(()))
    )
}

/// The URL of the shared test MariaDB, or `None` (skipped) when it does not answer.
pub async fn mysql_url(test: &str) -> Option<String> {
    if mysql_answers(MYSQL_URL).await {
        Some(MYSQL_URL.to_owned())
    } else {
        services::skip_or_fail(
            test,
            "no MySQL/MariaDB answers at mysql://root@127.0.0.1:3306/test",
        )
    }
}

/// A table name unique to this test and call: [`services::unique_prefix`] mapped into
/// `[A-Za-z0-9_]`, cut to MySQL's 64 characters (keeping its unique tail).
pub fn unique_table(test: &str) -> String {
    let name: String = services::unique_prefix(test)
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    let tail = name.len().saturating_sub(58);
    format!("sltest{}", &name[tail..])
}

/// The store settings tests use: those `settings` make (`MysqlConfig::from_settings`: the
/// test's timeout and size limit), with `url`, `table`, a short reap interval and a small pool.
pub fn test_config(url: &str, table: &str, settings: &Settings) -> MysqlConfig {
    let settings = Settings {
        mysql_url: url.to_owned(),
        mysql_table: table.to_owned(),
        mysql_reap_interval: TEST_REAP_INTERVAL,
        mysql_pool_size: 8,
        ..settings.clone()
    };
    MysqlConfig::from_settings(&settings).expect("the test's store settings")
}

/// A MySQL store in a table of this test's own, or `None` (skipped). Its wipe empties the
/// table and deletes its epoch row.
pub async fn store(test: &str, settings: &Settings) -> Option<StoreUnderTest> {
    let url = mysql_url(test).await?;
    let table = unique_table(test);
    let guard = DropTables::new(&url, &table);
    let store = MysqlStore::connect(test_config(&url, &table, settings))
        .await
        .unwrap_or_else(|e| panic!("{test}: connect the mysql store: {e}"));
    let wipe: Wipe = Box::new(move || {
        let (url, table) = (url.clone(), table.clone());
        Box::pin(async move {
            execute(
                &url,
                &[format!("DELETE FROM `{table}`"), forget_epoch(&table)],
            )
            .await;
        })
    });
    Some((Arc::new(store), Box::new(guard), Some(wipe)))
}

/// The statement deleting the epoch row of session table `table`.
pub fn forget_epoch(table: &str) -> String {
    format!("DELETE FROM `{EPOCHS_TABLE}` WHERE table_name = '{table}'")
}

/// Runs `statements` on a fresh connection to `url` (for setting up rows by hand).
pub async fn execute(url: &str, statements: &[String]) {
    let mut conn = MySqlConnection::connect(url)
        .await
        .expect("connect to mysql");
    for sql in statements {
        conn.execute(AssertSqlSafe(sql.as_str()))
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }
}

/// Drops a test's session tables (and their migration records) when dropped. Works inside a
/// tokio runtime: the drop runs on a thread of its own with a small runtime of its own.
pub struct DropTables {
    /// Where the tables are.
    url: String,
    /// Tables to drop.
    tables: Vec<String>,
}

impl DropTables {
    /// Drops `table` of the database at `url` when the guard goes.
    pub fn new(url: &str, table: &str) -> Self {
        DropTables {
            url: url.to_owned(),
            tables: vec![table.to_owned()],
        }
    }

    /// Drops `table` too.
    pub fn also(&mut self, table: &str) {
        self.tables.push(table.to_owned());
    }
}

impl Drop for DropTables {
    fn drop(&mut self) {
        let url = self.url.clone();
        let tables = std::mem::take(&mut self.tables);
        let cleanup = std::thread::spawn(move || {
            let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            runtime.block_on(async {
                let work = async {
                    let mut conn = MySqlConnection::connect(&url).await.ok()?;
                    // A connection of the dropped store may still hold a lock: wait briefly.
                    conn.execute("SET SESSION lock_wait_timeout = 5")
                        .await
                        .ok()?;
                    for table in &tables {
                        let drop = format!("DROP TABLE IF EXISTS `{table}`");
                        let _ = conn.execute(AssertSqlSafe(drop)).await;
                        let forget = format!(
                            "DELETE FROM `{MIGRATIONS_TABLE}` WHERE table_name = '{table}'"
                        );
                        let _ = conn.execute(AssertSqlSafe(forget)).await;
                        let _ = conn.execute(AssertSqlSafe(forget_epoch(table))).await;
                    }
                    conn.close().await.ok()
                };
                let _ = tokio::time::timeout(Duration::from_secs(10), work).await;
            });
        });
        let _ = cleanup.join();
    }
}

/// Where an installed program is: on `PATH`, or in the sbin directories distributions keep
/// server binaries in.
fn find_program(names: &[&str]) -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).collect())
        .unwrap_or_default();
    dirs.extend(["/usr/sbin", "/usr/local/sbin", "/usr/bin", "/usr/local/bin"].map(PathBuf::from));
    names
        .iter()
        .flat_map(|name| dirs.iter().map(move |dir| dir.join(name)))
        .find(|path| path.is_file())
}

/// Whether this process runs as root (mariadbd then needs `--user=root`).
fn running_as_root() -> bool {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// Whether every thread of process `pid` is stopped (state `T` in `/proc/<pid>/task/*/stat`).
fn all_threads_stopped(pid: u32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    tasks.flatten().all(|task| {
        std::fs::read_to_string(task.path().join("stat")).is_ok_and(|stat| {
            // `pid (comm) state ...`: comm may hold spaces and parentheses, so look past the
            // last `)`.
            stat.rsplit_once(')')
                .is_some_and(|(_, rest)| rest.trim_start().starts_with(['T', 't']))
        })
    })
}

/// How a private MariaDB serves TLS: its certificate files (in its own directory) and whether
/// it refuses plaintext clients.
struct MariadbTls {
    /// Its certificate, for `localhost` and `127.0.0.1` (`--ssl-cert`).
    cert: PathBuf,
    /// The certificate's key (`--ssl-key`).
    key: PathBuf,
    /// The test CA that signed it (`--ssl-ca`), which is also what clients should trust.
    ca: PathBuf,
    /// `--require-secure-transport=ON`: a client that does not start TLS is refused.
    require_secure_transport: bool,
}

/// A private MariaDB this test starts on its own port with its own data directory; killed and
/// its data directory removed when dropped. Its `test` database survives stop/restart.
pub struct OwnMariadb {
    /// The running server process, if started.
    child: Option<Child>,
    /// The port it listens on (kept across restarts).
    pub port: u16,
    /// The `mariadbd` binary, to restart it.
    server: PathBuf,
    /// Its data directory (removed on drop).
    dir: PathBuf,
    /// Its TLS, if it serves TLS.
    tls: Option<MariadbTls>,
}

impl OwnMariadb {
    /// Initializes a data directory and starts the server (plaintext only), or `None`
    /// (skipped) when MariaDB is not installed.
    pub async fn start(test: &str) -> Option<OwnMariadb> {
        Self::start_with(test, None, false).await
    }

    /// Like [`OwnMariadb::start`], serving TLS too with a server certificate of `ca` for
    /// `localhost` and `127.0.0.1` (`--ssl-cert`, `--ssl-key`, `--ssl-ca`); with
    /// `require_secure_transport`, a client that does not start TLS is refused. Such a server
    /// checks its grant tables (`root@127.0.0.1`, no password), which
    /// `require_secure_transport` needs to be enforced.
    pub async fn start_with_tls(
        test: &str,
        ca: &Ca,
        require_secure_transport: bool,
    ) -> Option<OwnMariadb> {
        Self::start_with(test, Some(ca), require_secure_transport).await
    }

    async fn start_with(
        test: &str,
        ca: Option<&Ca>,
        require_secure_transport: bool,
    ) -> Option<OwnMariadb> {
        let Some(server) = find_program(&["mariadbd", "mysqld"]) else {
            return services::skip_or_fail(test, "mariadbd is not installed");
        };
        let Some(install) = find_program(&["mariadb-install-db", "mysql_install_db"]) else {
            return services::skip_or_fail(test, "mariadb-install-db is not installed");
        };
        let dir = std::env::temp_dir().join(unique_table(test));
        let mut own = OwnMariadb {
            child: None,
            port: 0,
            server,
            dir,
            tls: None,
        };
        // A temporary directory of its own: a starting mariadbd deletes every `#sql*` file in
        // its tmpdir, so with a shared /tmp one test's server start broke another's install.
        if let Err(error) = std::fs::create_dir_all(own.tmp()) {
            let why = format!("cannot create {}: {error}", own.tmp().display());
            return services::skip_or_fail(test, &why);
        }
        let mut init = Command::new(install);
        init.arg("--no-defaults")
            .arg(format!("--datadir={}", own.data().display()))
            .arg(format!("--tmpdir={}", own.tmp().display()))
            .args(["--auth-root-authentication-method=normal", "--skip-test-db"]);
        if running_as_root() {
            init.arg("--user=root");
        }
        // Installs also take turns within this test process, as two at once sometimes failed.
        static INSTALLING: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let installed = tokio::task::spawn_blocking(move || {
            let _turn = INSTALLING
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            init.stdout(Stdio::null()).stderr(Stdio::piped()).output()
        })
        .await
        .ok()
        .and_then(Result::ok);
        match installed {
            Some(out) if out.status.success() => {}
            Some(out) => {
                let why = format!(
                    "mariadb-install-db failed: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                );
                return services::skip_or_fail(test, &why);
            }
            None => return services::skip_or_fail(test, "mariadb-install-db could not run"),
        }
        if let Some(ca) = ca {
            own.tls = Some(own.write_tls_files(ca, require_secure_transport));
        }
        own.start_on_a_free_port().await;
        execute(
            &own.url_without_database(),
            &["CREATE DATABASE IF NOT EXISTS test".into()],
        )
        .await;
        Some(own)
    }

    fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// Writes a server certificate of `ca` and `ca`'s certificate into its directory.
    fn write_tls_files(&self, ca: &Ca, require_secure_transport: bool) -> MariadbTls {
        let identity = ca.localhost_server();
        let write = |name: &str, contents: &str| {
            let path = self.dir.join(name);
            std::fs::write(&path, contents)
                .unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
            path
        };
        MariadbTls {
            cert: write("server-cert.pem", &identity.cert),
            key: write("server-key.pem", &identity.key),
            ca: write("ca.pem", ca.cert_pem()),
            require_secure_transport,
        }
    }

    /// The CA certificate file that signed its certificate, when it serves TLS.
    pub fn ca_file(&self) -> Option<&Path> {
        self.tls.as_ref().map(|tls| tls.ca.as_path())
    }

    /// Its temporary files' directory (`--tmpdir`), apart from every other server's.
    fn tmp(&self) -> PathBuf {
        self.dir.join("tmp")
    }

    fn spawn(&mut self) {
        let dir: &Path = &self.dir;
        let mut command = Command::new(&self.server);
        command
            .arg("--no-defaults")
            .arg(format!("--datadir={}", self.data().display()))
            .arg(format!("--tmpdir={}", self.tmp().display()))
            .arg(format!("--port={}", self.port))
            .arg(format!("--socket={}", dir.join("mysqld.sock").display()))
            .arg(format!("--pid-file={}", dir.join("mysqld.pid").display()))
            .arg(format!("--log-error={}", dir.join("error.log").display()))
            .args(["--bind-address=127.0.0.1", "--skip-name-resolve"])
            .args(["--innodb-buffer-pool-size=16M", "--skip-log-bin"])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        match &self.tls {
            // Without grant tables anyone is let in, whatever the transport.
            None => {
                command.arg("--skip-grant-tables");
            }
            Some(tls) => {
                command
                    .arg(format!("--ssl-cert={}", tls.cert.display()))
                    .arg(format!("--ssl-key={}", tls.key.display()))
                    .arg(format!("--ssl-ca={}", tls.ca.display()));
                if tls.require_secure_transport {
                    command.arg("--require-secure-transport=ON");
                }
            }
        }
        if running_as_root() {
            command.arg("--user=root");
        }
        self.child = Some(command.spawn().expect("spawn mariadbd"));
    }

    /// Starts the server on a free port, moving to a fresh port (up to
    /// [`services::PORT_ATTEMPTS`] times) whenever it does not come up as itself: mariadbd
    /// exits when another process took the port between [`services::free_port`] and its bind.
    async fn start_on_a_free_port(&mut self) {
        let mut failures = Vec::new();
        for _ in 0..services::PORT_ATTEMPTS {
            self.port = services::free_port();
            self.spawn();
            match self.came_up().await {
                Ok(()) => return,
                Err(why) => {
                    self.stop();
                    failures.push(format!("port {}: {why}", self.port));
                }
            }
        }
        panic!(
            "own mariadbd did not start in {} attempts (see {}): {failures:?}",
            services::PORT_ATTEMPTS,
            self.dir.join("error.log").display()
        );
    }

    /// Waits (up to [`MARIADB_START_WITHIN`]) until the server just spawned answers on its port
    /// with its own data directory (another server on that port would answer too); why not
    /// otherwise (it exited, say, because the port was taken).
    async fn came_up(&mut self) -> Result<(), String> {
        let url = self.url_without_database();
        let canonical = |path: PathBuf| std::fs::canonicalize(&path).unwrap_or(path);
        let ours = canonical(self.data());
        let deadline = tokio::time::Instant::now() + MARIADB_START_WITHIN;
        loop {
            let exited = match self.child.as_mut().map(Child::try_wait) {
                Some(Ok(None)) => None,
                Some(Ok(Some(status))) => Some(status.to_string()),
                Some(Err(error)) => Some(error.to_string()),
                None => Some("not started".to_owned()),
            };
            if let Some(status) = exited {
                return Err(format!("exited ({status}) before answering"));
            }
            if let Some(datadir) = datadir_at(&url).await {
                let theirs = canonical(PathBuf::from(datadir.trim_end_matches('/')));
                return if theirs == ours {
                    Ok(())
                } else {
                    Err(format!(
                        "another server answers there ({})",
                        theirs.display()
                    ))
                };
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(format!("no answer within {MARIADB_START_WITHIN:?}"));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn url_without_database(&self) -> String {
        format!("mysql://root@127.0.0.1:{}", self.port)
    }

    /// The URL clients use (database `test`).
    pub fn url(&self) -> String {
        format!("mysql://root@127.0.0.1:{}/test", self.port)
    }

    /// Kills the server (as a crash would) and waits for it to be gone.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Freezes the server (SIGSTOP): connections stay open and nothing answers, as in a network
    /// partition. Returns once every thread of it is stopped: a signal only asks each thread to
    /// stop, and on a loaded machine one could still answer a query sent right after `kill`.
    pub fn pause(&self) {
        self.signal("-STOP");
        let Some(child) = &self.child else { return };
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !all_threads_stopped(child.id()) {
            assert!(
                std::time::Instant::now() < deadline,
                "mariadbd {} not stopped 10s after SIGSTOP",
                child.id()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Thaws a paused server (SIGCONT).
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, signal: &str) {
        let Some(child) = &self.child else { return };
        let sent = Command::new("kill")
            .args([signal, &child.id().to_string()])
            .status()
            .is_ok_and(|s| s.success());
        assert!(sent, "kill {signal} mariadbd");
    }

    /// Starts it again on the same port and data directory, retrying a few times should the
    /// bind fail (the port was ours: only a moment's overlap), and waits until it answers.
    pub async fn restart(&mut self) {
        self.stop();
        let mut failures = Vec::new();
        for _ in 0..RESTART_ATTEMPTS {
            self.spawn();
            match self.came_up().await {
                Ok(()) => return,
                Err(why) => {
                    self.stop();
                    failures.push(why);
                    // A retry, not a synchronisation: give the port's last user a moment.
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
        panic!(
            "own mariadbd did not restart on {} (see {}): {failures:?}",
            self.port,
            self.dir.join("error.log").display()
        );
    }
}

impl Drop for OwnMariadb {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
