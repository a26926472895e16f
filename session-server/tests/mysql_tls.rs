//! The MySQL store over TLS: `ssl-mode` and `ssl-ca` in the URL, through the real `MysqlStore`
//! and the real binary, against private MariaDBs serving a certificate of a test CA. With
//! `ssl-mode=verify_ca` and the CA that signed the server the store serves calls, encrypted; with
//! another CA, or a mode that asks for TLS against a server without it, the store does not
//! connect (never in cleartext) and says which `ssl-mode` failed; `ssl-mode=disabled` against
//! a server that requires TLS is refused by the server.

mod support;

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use session_proto::v1::session_store_client::SessionStoreClient;
use session_proto::v1::{CreateRequest, GetRequest};
use session_server::config::Settings;
use session_server::store::mysql::{MysqlConfig, MysqlStore};
use session_server::store::{NewSession, SessionStore, StoreError};
use sqlx::Connection as _;
use sqlx::mysql::MySqlConnection;
use support::ids::new_id;
use support::mysql::{self as mysql, OwnMariadb};
use support::process::{ServerProcess, run_bounded};
use test_pki::{Ca, PemDir};

const BINARY: &str = env!("CARGO_BIN_EXE_session-server");

/// Bound on one store call (a TLS handshake included): generous, for a loaded machine.
const STORE_TIMEOUT: Duration = Duration::from_secs(10);

/// The URL of `db`'s `test` database with `query` (`ssl-mode=…&ssl-ca=…`).
fn url_with(db: &OwnMariadb, query: &str) -> String {
    format!("{}?{query}", db.url())
}

/// `ssl-mode=<mode>&ssl-ca=<ca>`.
fn verify_query(mode: &str, ca: &Path) -> String {
    format!("ssl-mode={mode}&ssl-ca={}", ca.display())
}

/// The MySQL store settings of `url`, from [`MysqlConfig::from_settings`], in a table of the
/// test's own.
fn config(url: &str, test: &str) -> MysqlConfig {
    let settings = Settings {
        store_timeout: STORE_TIMEOUT,
        ..Settings::default()
    };
    mysql::test_config(url, &mysql::unique_table(test), &settings)
}

fn session(user: &str) -> NewSession {
    NewSession {
        id: new_id(),
        namespace: "tls".to_owned(),
        user_id: user.to_owned(),
        attrs: HashMap::from([("k".to_owned(), b"v".to_vec())]),
        ttl: Duration::from_secs(600),
    }
}

/// The cipher of a new connection made with `url`'s options (`Ssl_cipher`: empty in
/// cleartext).
async fn cipher_of_a_connection(url: &str) -> String {
    let mut conn = MySqlConnection::connect(url).await.expect("connect");
    let (_, cipher): (String, String) = sqlx::query_as("SHOW SESSION STATUS LIKE 'Ssl_cipher'")
        .fetch_one(&mut conn)
        .await
        .expect("read Ssl_cipher");
    let _ = conn.close().await;
    cipher
}

/// Whether the `test` database of `url` has `table`.
async fn table_exists(url: &str, table: &str) -> bool {
    let mut conn = MySqlConnection::connect(url).await.expect("connect");
    let count: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM information_schema.tables \
         WHERE table_schema = 'test' AND table_name = ?",
    )
    .bind(table)
    .fetch_one(&mut conn)
    .await
    .expect("look for the table");
    let _ = conn.close().await;
    count > 0
}

/// The error of a store that must not connect.
async fn refused(config: MysqlConfig) -> String {
    match MysqlStore::connect(config).await {
        Ok(_) => panic!("the store connected"),
        Err(StoreError::Unavailable(msg) | StoreError::Internal(msg)) => msg,
        Err(other) => panic!("unexpected error: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_ca_with_the_signing_ca_serves_calls_encrypted() {
    let test = "mysql_verify_ca_serves";
    let ca = Ca::new("stickless test MariaDB CA");
    // The server refuses clients that do not start TLS: nothing works in cleartext.
    let Some(db) = OwnMariadb::start_with_tls(test, &ca, true).await else {
        return;
    };
    let ca_file = db.ca_file().expect("a TLS server");
    for mode in ["verify_ca", "verify_identity"] {
        let url = url_with(&db, &verify_query(mode, ca_file));
        let store = MysqlStore::connect(config(&url, test))
            .await
            .unwrap_or_else(|e| panic!("{mode}: connect over TLS: {e}"));
        let created = store.create(session("ada")).await.expect("create");
        let got = store.get("tls", &created.id, false).await.expect("get");
        assert_eq!((got.user_id.as_str(), got.version), ("ada", 1), "{mode}");
        assert_eq!(got.attrs, created.attrs, "{mode}");
        let cipher = cipher_of_a_connection(&url).await;
        assert!(
            !cipher.is_empty(),
            "{mode}: a connection with these options is not TLS"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_ca_with_a_ca_that_did_not_sign_the_server_is_refused() {
    let test = "mysql_verify_ca_foreign_ca";
    let ca = Ca::new("stickless test MariaDB CA");
    let Some(db) = OwnMariadb::start_with_tls(test, &ca, false).await else {
        return;
    };
    let dir = PemDir::new(test);
    let foreign = dir.write("foreign-ca.pem", Ca::new("another CA").cert_pem());
    for mode in ["verify_ca", "verify_identity"] {
        let config = config(&url_with(&db, &verify_query(mode, &foreign)), test);
        let table = config.table.clone();
        let msg = refused(config).await;
        assert!(msg.contains(&format!("ssl-mode={mode}")), "{mode}: {msg}");
        assert!(msg.contains("certificate"), "{mode}: {msg}");
        // Nothing was written: the schema migration never ran.
        let right = url_with(&db, &verify_query("verify_ca", db.ca_file().unwrap()));
        assert!(!table_exists(&right, &table).await, "{mode}: table created");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssl_modes_that_ask_for_tls_refuse_a_server_without_it() {
    let test = "mysql_tls_modes_refuse_plaintext";
    // A server that offers no TLS at all: its own, so what the shared one offers does not matter.
    let Some(db) = OwnMariadb::start(test).await else {
        return;
    };
    let dir = PemDir::new(test);
    let ca = dir.write_ca(&Ca::new("stickless test MariaDB CA"));
    for query in [
        "ssl-mode=required".to_owned(),
        verify_query("verify_ca", &ca),
        verify_query("verify_identity", &ca),
    ] {
        let config = config(&url_with(&db, &query), test);
        let table = config.table.clone();
        let msg = refused(config).await;
        let mode = query.split('&').next().unwrap();
        assert!(msg.contains(mode), "{query}: {msg}");
        assert!(
            msg.contains("not connecting in cleartext"),
            "{query}: {msg}"
        );
        assert!(
            !table_exists(&db.url(), &table).await,
            "{query}: table created"
        );
    }
    // The default (`preferred`) connects in cleartext to such a server, as documented.
    let store = MysqlStore::connect(config(&db.url(), test)).await;
    assert!(store.is_ok(), "preferred: {:?}", store.err());

    // The binary: exit status 1, naming the mode.
    let url = url_with(&db, "ssl-mode=required");
    let out = run_bounded(
        Path::new(BINARY),
        &["--store", "mysql", "--mysql-url", &url],
        &[] as &[(&str, &str)],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("ssl-mode=required"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssl_mode_disabled_is_refused_by_a_server_that_requires_tls() {
    let test = "mysql_disabled_vs_require_secure";
    let ca = Ca::new("stickless test MariaDB CA");
    let Some(db) = OwnMariadb::start_with_tls(test, &ca, true).await else {
        return;
    };
    let config = config(&url_with(&db, "ssl-mode=disabled"), test);
    let table = config.table.clone();
    let msg = refused(config).await;
    assert!(msg.contains("ssl-mode=disabled"), "{msg}");
    let tls = url_with(&db, &verify_query("verify_ca", db.ca_file().unwrap()));
    assert!(!table_exists(&tls, &table).await, "table created");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_serves_create_and_get_over_mysql_with_verify_ca() {
    let test = "mysql_tls_binary";
    let ca = Ca::new("stickless test MariaDB CA");
    let Some(db) = OwnMariadb::start_with_tls(test, &ca, true).await else {
        return;
    };
    let url = url_with(&db, &verify_query("verify_ca", db.ca_file().unwrap()));
    let table = mysql::unique_table(test);
    let server = ServerProcess::start(
        Path::new(BINARY),
        &[
            "--listen",
            "127.0.0.1:0",
            "--store",
            "mysql",
            "--mysql-url",
            &url,
            "--mysql-table",
            &table,
            "--store-timeout",
            "10s",
        ],
        &["grpc"],
    );
    let mut client = SessionStoreClient::connect(server.grpc_url())
        .await
        .expect("connect to the binary");
    let created = client
        .create(CreateRequest {
            namespace: "tls".into(),
            user_id: "ada".into(),
            ..CreateRequest::default()
        })
        .await
        .expect("create")
        .into_inner();
    let got = client
        .get(GetRequest {
            namespace: "tls".into(),
            id: created.id.clone(),
            touch: false,
            bypass_cache: false,
        })
        .await
        .expect("get")
        .into_inner();
    assert_eq!((got.user_id.as_str(), got.version), ("ada", 1));
    assert!(table_exists(&url, &table).await, "the session table");
}
