//! `SticklessStore` against a real in-process session server (memory store): the cases of
//! tower-sessions' own store tests (create, save, load, delete, id collision), and what the
//! mapping onto Stickless adds (data replaced on save, expiry kept and enforced by the server,
//! tombstones, the reserved attribute).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use session_client::{ClientConfig, SessionClient};
use session_server::config::Settings;
use session_server::metrics::Metrics;
use session_server::store::memory::MemoryStore;
use tokio::sync::oneshot;
use tower_sessions::cookie::time::{self, OffsetDateTime};
use tower_sessions::session::{Id, Record};
use tower_sessions::session_store::{Error, SessionStore};
use tower_sessions_stickless::{EXPIRY_ATTRIBUTE, SticklessStore, stickless_id};

/// A session server on `127.0.0.1:0` over a fresh memory store; stopped when dropped.
struct Server {
    url: String,
    _stop: oneshot::Sender<()>,
}

async fn server() -> Server {
    let settings = Settings::default();
    let store = Arc::new(MemoryStore::new(settings.max_session_bytes));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(async move {
        let shutdown = async {
            let _ = stopped.await;
        };
        session_server::server::run(listener, &settings, store, Metrics::new(), shutdown)
            .await
            .expect("session server failed");
    });
    Server { url, _stop: stop }
}

fn client(server: &Server) -> SessionClient {
    let mut config = ClientConfig::new(&server.url);
    config.namespace = "tower".into();
    config.timeout = Duration::from_secs(20);
    config.connect_timeout = Duration::from_secs(5);
    SessionClient::connect_lazy(config).expect("valid config")
}

fn record_expiring_in(expiry: time::Duration) -> Record {
    Record {
        id: Id::default(),
        data: HashMap::new(),
        expiry_date: OffsetDateTime::now_utc() + expiry,
    }
}

fn thirty_minutes() -> Record {
    record_expiring_in(time::Duration::minutes(30))
}

#[tokio::test]
async fn test_create() {
    let server = server().await;
    let store = SticklessStore::new(client(&server));
    let mut record = thirty_minutes();
    assert!(store.create(&mut record).await.is_ok());
    // An ordinary Stickless session under the mapped id.
    let stored = store
        .client()
        .get(&stickless_id(&record.id), false)
        .await
        .expect("stored");
    assert_eq!(stored.version, 1);
    assert_eq!(stored.namespace, "tower");
}

#[tokio::test]
async fn test_save() {
    let server = server().await;
    let store = SticklessStore::new(client(&server));
    let record = thirty_minutes();
    // Saved without a create: made under its id.
    assert!(store.save(&record).await.is_ok());
    assert_eq!(store.load(&record.id).await.unwrap(), Some(record));
}

#[tokio::test]
async fn test_load() {
    let server = server().await;
    let store = SticklessStore::new(client(&server));
    let mut record = thirty_minutes();
    record
        .data
        .insert("user".into(), serde_json::json!({"id": 7, "name": "ann"}));
    record.data.insert("n".into(), serde_json::json!(42));
    store.create(&mut record).await.unwrap();
    let loaded_record = store.load(&record.id).await.unwrap();
    assert_eq!(Some(record), loaded_record);
    assert_eq!(store.load(&Id::default()).await.unwrap(), None);
}

#[tokio::test]
async fn test_delete() {
    let server = server().await;
    let store = SticklessStore::new(client(&server));
    let mut record = thirty_minutes();
    store.create(&mut record).await.unwrap();
    assert!(store.delete(&record.id).await.is_ok());
    assert_eq!(None, store.load(&record.id).await.unwrap());
    // Deleting what is not there is no error.
    assert!(store.delete(&record.id).await.is_ok());
}

#[tokio::test]
async fn test_create_id_collision() {
    let server = server().await;
    let store = SticklessStore::new(client(&server));
    let expiry_date = OffsetDateTime::now_utc() + time::Duration::minutes(30);
    let mut record1 = Record {
        id: Default::default(),
        data: Default::default(),
        expiry_date,
    };
    let mut record2 = Record {
        id: Default::default(),
        data: HashMap::from([("mine".to_owned(), serde_json::json!(2))]),
        expiry_date,
    };
    store.create(&mut record1).await.unwrap();
    record2.id = record1.id; // Set the same ID for record2
    store.create(&mut record2).await.unwrap();
    assert_ne!(record1.id, record2.id); // IDs should be different
    // Each under its own id, neither overwritten.
    assert_eq!(store.load(&record1.id).await.unwrap(), Some(record1));
    assert_eq!(store.load(&record2.id).await.unwrap(), Some(record2));
}

#[tokio::test]
async fn the_id_of_a_deleted_session_is_not_given_out_again() {
    let server = server().await;
    let store = SticklessStore::new(client(&server));
    let mut first = thirty_minutes();
    store.create(&mut first).await.unwrap();
    store.delete(&first.id).await.unwrap();
    let mut second = thirty_minutes();
    second.id = first.id;
    store.create(&mut second).await.unwrap();
    assert_ne!(second.id, first.id, "a tombstone counts as a collision");
    // Saving the deleted session does not bring it back.
    let saved = store.save(&first).await;
    assert!(matches!(saved, Err(Error::Backend(_))), "{saved:?}");
    assert_eq!(store.load(&first.id).await.unwrap(), None);
}

#[tokio::test]
async fn save_replaces_the_data_and_the_expiry() {
    let server = server().await;
    let store = SticklessStore::new(client(&server));
    let mut record = thirty_minutes();
    record.data.insert("a".into(), serde_json::json!(1));
    record.data.insert("b".into(), serde_json::json!("two"));
    store.create(&mut record).await.unwrap();

    record.data.remove("a");
    record.data.insert("b".into(), serde_json::json!([2]));
    record.data.insert("c".into(), serde_json::json!(null));
    record.expiry_date = OffsetDateTime::now_utc() + time::Duration::hours(2);
    store.save(&record).await.unwrap();
    assert_eq!(store.load(&record.id).await.unwrap(), Some(record.clone()));

    let stored = store
        .client()
        .get(&stickless_id(&record.id), false)
        .await
        .unwrap();
    let mut keys: Vec<_> = stored.attrs.keys().cloned().collect();
    keys.sort();
    assert_eq!(keys, ["b", "c", EXPIRY_ATTRIBUTE]);
    assert_eq!(stored.attrs["b"], b"[2]");
    // The server's expiry is the record's (to the second: it counts from its own clock).
    let server_expiry = OffsetDateTime::from(stored.expires_at);
    assert!(
        (server_expiry - record.expiry_date).abs() < time::Duration::seconds(5),
        "{server_expiry} vs {}",
        record.expiry_date
    );
}

#[tokio::test]
async fn the_server_expires_a_record_at_its_expiry_date() {
    let server = server().await;
    let store = SticklessStore::new(client(&server));
    let mut record = record_expiring_in(time::Duration::seconds(1));
    store.create(&mut record).await.unwrap();
    assert_eq!(store.load(&record.id).await.unwrap(), Some(record.clone()));
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let stored = store.client().get(&stickless_id(&record.id), false).await;
        match stored {
            Err(session_client::ClientError::NotFound { .. }) => break,
            Ok(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            other => panic!("still stored past its expiry: {other:?}"),
        }
    }
    assert_eq!(store.load(&record.id).await.unwrap(), None);
}

#[tokio::test]
async fn a_record_saved_already_expired_is_not_kept() {
    let server = server().await;
    let store = SticklessStore::new(client(&server));
    let mut record = thirty_minutes();
    store.create(&mut record).await.unwrap();
    record.expiry_date = OffsetDateTime::now_utc() - time::Duration::seconds(1);
    store.save(&record).await.unwrap();
    assert_eq!(store.load(&record.id).await.unwrap(), None);
    let mut stale = record_expiring_in(time::Duration::seconds(-5));
    store.create(&mut stale).await.unwrap();
    assert_eq!(store.load(&stale.id).await.unwrap(), None);
}

#[tokio::test]
async fn the_reserved_attribute_is_not_a_data_key() {
    let server = server().await;
    let store = SticklessStore::new(client(&server));
    let mut record = thirty_minutes();
    record
        .data
        .insert(EXPIRY_ATTRIBUTE.into(), serde_json::json!(1));
    let created = store.create(&mut record).await;
    assert!(matches!(created, Err(Error::Encode(_))), "{created:?}");
    assert_eq!(store.load(&record.id).await.unwrap(), None);
}
