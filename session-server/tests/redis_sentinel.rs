//! `--store redis-sentinel`: the Redis store on the primary a Redis Sentinel names, on a
//! deployment each test starts (a primary, a replica, one sentinel: `redis_sentinel/
//! deployment.rs`). The calls work through the gRPC server and land on the primary; a master
//! name the sentinels do not know is UNAVAILABLE naming it; a switchover (`SENTINEL FAILOVER`)
//! and a killed primary (`redis_sentinel/failover.rs`) are followed without a restart, with
//! UNAVAILABLE (or DEADLINE_EXCEEDED) at worst; the flags are checked.

mod support;

#[path = "redis_sentinel/deployment.rs"]
mod deployment;
#[path = "redis_sentinel/failover.rs"]
mod failover;

use std::sync::Arc;
use std::time::{Duration, Instant};

use deployment::{Deployment, MASTER};
use redis::AsyncCommands as _;
use session_proto::v1::{
    CreateRequest, DeleteRequest, GetRequest, ListByUserRequest, UpdateRequest,
};
use session_server::config::{Cli, ConfigError, Settings, StoreKind};
use session_server::store::redis::{RedisConfig, RedisStore};
use session_server::store::{NewSession, SessionStore, StoreError};
use support::harness::TestServer;
use support::ids::new_id;
use support::process::run_bounded;
use support::redis_record;
use support::wait::{events_ready, update_until_heard};
use tonic::Code;

const BINARY: &str = env!("CARGO_BIN_EXE_session-server");

/// How long a store may take to follow a switchover: generous, for a loaded machine.
const FOLLOW_WITHIN: Duration = Duration::from_secs(20);

/// Lanes of the switchover test's store: few, so that all are in use before the switch.
const POOL_SIZE: usize = 4;

/// Settings with a 1 s store timeout, so an outage shows quickly.
fn settings() -> Settings {
    Settings {
        store_timeout: Duration::from_secs(1),
        ..Settings::default()
    }
}

/// The key of session `id` in namespace `default` under `prefix`.
fn session_key(prefix: &str, id: &str) -> String {
    format!("{prefix}:default:s:{{{id}}}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_go_through_the_sentinels_to_the_primary() {
    let test = "calls_go_through_the_sentinels_to_the_primary";
    let Some(deployment) = Deployment::start(test).await else {
        return;
    };
    let config = deployment.config(test, &settings());
    let prefix = config.key_prefix.clone();
    let store = Arc::new(RedisStore::new(config).expect("store"));
    assert_eq!(store.kind(), "redis-sentinel");
    events_ready(store.as_ref()).await;
    let server = TestServer::start(settings(), store.clone()).await;
    let mut client = server.client().await;

    let created = client
        .create(CreateRequest {
            user_id: "ada".into(),
            attrs: [("cart".to_string(), b"2 pears".to_vec())].into(),
            ..CreateRequest::default()
        })
        .await
        .expect("create")
        .into_inner();
    assert_eq!(created.version, 1);
    assert!(!created.epoch.is_empty(), "answers carry the store's epoch");
    let get = |id: &str| GetRequest {
        namespace: String::new(),
        id: id.to_string(),
        touch: false,
        bypass_cache: false,
    };
    let read = client
        .get(get(&created.id))
        .await
        .expect("get")
        .into_inner();
    assert_eq!(read.attrs.get("cart"), Some(&b"2 pears".to_vec()));
    let updated = client
        .update(UpdateRequest {
            id: created.id.clone(),
            set: [("cart".to_string(), b"3 pears".to_vec())].into(),
            expected_version: Some(1),
            ..UpdateRequest::default()
        })
        .await
        .expect("update")
        .into_inner();
    assert_eq!(updated.version, 2);
    let stale = client
        .update(UpdateRequest {
            id: created.id.clone(),
            set: [("cart".to_string(), b"stale".to_vec())].into(),
            expected_version: Some(1),
            ..UpdateRequest::default()
        })
        .await
        .expect_err("a stale compare-and-set");
    assert_eq!(stale.code(), Code::Aborted);
    let listed = client
        .list_by_user(ListByUserRequest {
            user_id: "ada".into(),
            ..ListByUserRequest::default()
        })
        .await
        .expect("list")
        .into_inner();
    assert_eq!(listed.sessions.len(), 1);

    // It is on the primary, the server the sentinel names, and replicated from there.
    let key = session_key(&prefix, &created.id);
    let mut primary = deployment
        .connect(deployment.primary_port())
        .await
        .expect("primary");
    let on_primary = redis_record::field(&mut primary, &key, "a:cart").await;
    assert_eq!(on_primary.as_deref(), Some(&b"3 pears"[..]));
    assert_eq!(
        deployment.named_primary().await,
        Some(deployment.primary_port())
    );

    let deleted = client
        .delete(DeleteRequest {
            id: created.id.clone(),
            ..DeleteRequest::default()
        })
        .await
        .expect("delete")
        .into_inner();
    assert!(deleted.deleted);
    let gone = client.get(get(&created.id)).await.expect_err("deleted");
    assert_eq!(gone.code(), Code::NotFound);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_name_the_sentinels_do_not_know_is_unavailable_naming_it() {
    let test = "a_master_name_the_sentinels_do_not_know_is_unavailable_naming_it";
    let Some(deployment) = Deployment::start(test).await else {
        return;
    };
    let mut config = deployment.config(test, &settings());
    config.sentinel_master = Some("no-such-master".into());
    let store = RedisStore::new(config).expect("store");
    let session = NewSession {
        id: new_id(),
        namespace: "shop".into(),
        user_id: String::new(),
        attrs: Default::default(),
        ttl: Duration::from_secs(60),
    };
    match store.create(session).await {
        Err(StoreError::Unavailable(message)) => {
            assert!(message.contains("no-such-master"), "{message}");
            let sentinel = format!("127.0.0.1:{}", deployment.sentinel_port());
            assert!(message.contains(&sentinel), "{message}");
        }
        other => panic!("expected UNAVAILABLE, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_switchover_is_followed_and_no_write_after_the_promotion_is_lost() {
    let test = "a_switchover_is_followed_and_no_write_after_the_promotion_is_lost";
    let Some(deployment) = Deployment::start(test).await else {
        return;
    };
    let mut config = deployment.config(test, &settings());
    config.pool_size = POOL_SIZE;
    let prefix = config.key_prefix.clone();
    let store = RedisStore::new(config).expect("store");
    events_ready(&store).await;
    let session = |n: &str| NewSession {
        id: new_id(),
        namespace: "default".into(),
        user_id: String::new(),
        attrs: [("n".to_string(), n.as_bytes().to_vec())].into(),
        ttl: Duration::from_secs(300),
    };
    let before = store.create(session("0")).await.expect("create before");
    // Every lane connected, to the primary of now.
    for _ in 0..2 * POOL_SIZE {
        store.create(session("x")).await.expect("create before");
    }

    // Replication is asynchronous: what the switch may keep is what reached the replica.
    deployment.wait_until_replicated().await;
    let mut sentinel = deployment
        .connect(deployment.sentinel_port())
        .await
        .expect("sentinel");
    let () = redis::cmd("SENTINEL")
        .arg("FAILOVER")
        .arg(MASTER)
        .query_async(&mut sentinel)
        .await
        .expect("SENTINEL FAILOVER");
    assert!(
        deployment.wait_until_promoted(FOLLOW_WITHIN).await,
        "the sentinel did not promote the replica within {FOLLOW_WITHIN:?}"
    );

    // Writes go on, with outages at worst, until the old primary is demoted; every write
    // acknowledged meanwhile went to the new primary (one on the old, still a master until the
    // sentinel reconfigures it, would be discarded by its demotion and missed below).
    let demoted = deployment.primary_port();
    let mut acknowledged = Vec::new();
    let deadline = Instant::now() + FOLLOW_WITHIN;
    while deployment.role(demoted).await.as_deref() != Some("slave") {
        assert!(
            Instant::now() < deadline,
            "the old primary was not demoted within {FOLLOW_WITHIN:?}"
        );
        match store.create(session(&acknowledged.len().to_string())).await {
            Ok(made) => acknowledged.push(made),
            Err(StoreError::Unavailable(_) | StoreError::Timeout(_)) => {}
            Err(other) => panic!("a write during the switchover failed with {other:?}"),
        }
    }
    // Once it is, every lane writes to the new primary, none failing on a connection to the
    // old one.
    for _ in 0..3 * POOL_SIZE {
        let made = store
            .create(session(&acknowledged.len().to_string()))
            .await
            .expect("every lane writes to the new primary");
        acknowledged.push(made);
    }
    let mut new_primary = deployment
        .connect(deployment.replica_port())
        .await
        .expect("new primary");
    for made in &acknowledged {
        let key = session_key(&prefix, &made.id);
        let exists: bool = new_primary.exists(&key).await.expect("EXISTS");
        assert!(
            exists,
            "session {} acknowledged, missing on the new primary",
            made.id
        );
    }
    let read = store
        .get("default", &before.id, false)
        .await
        .expect("the session made before the switchover");
    assert_eq!(read.attrs.get("n"), Some(&b"0".to_vec()));

    // Events follow the primary too.
    let mut events = store.subscribe();
    update_until_heard(
        &store,
        &mut events,
        "default",
        &before.id,
        FOLLOW_WITHIN,
        "after the switchover",
    )
    .await;
}

/// The near cache (`--cache-capacity`) on Sentinel: its tracking connection is on the primary
/// the sentinels name (a write through another store is invalidated), and after a switchover
/// it is on the new one: a write there through another store still reaches this store's reads,
/// and hits resume.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_near_cache_follows_a_switchover() {
    let test = "the_near_cache_follows_a_switchover";
    let Some(deployment) = Deployment::start(test).await else {
        return;
    };
    let mut config = deployment.config(test, &settings());
    config.cache_capacity = 100;
    let mut plain = config.clone();
    plain.cache_capacity = 0;
    let cached = RedisStore::new(config).expect("store");
    support::harness::near_cache_up(&cached).await;
    let other = RedisStore::new(plain).expect("store");
    let made = cached
        .create(NewSession {
            id: new_id(),
            namespace: "default".into(),
            user_id: String::new(),
            attrs: [("n".to_string(), b"0".to_vec())].into(),
            ttl: Duration::from_secs(300),
        })
        .await
        .expect("create");
    let hits = || cached.near_cache_stats().expect("a near cache").hits;
    // Reads until `version` is read, each retried through outages; then one more, a hit.
    let reads_version = |version: u64, within: Duration| {
        let (cached, id) = (&cached, made.id.clone());
        async move {
            let deadline = Instant::now() + within;
            loop {
                let read = cached.get("default", &id, false).await;
                if matches!(&read, Ok(r) if r.version == version) {
                    return;
                }
                assert!(
                    Instant::now() < deadline,
                    "still read {read:?}, not version {version}, after {within:?}"
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    };
    let update = |n: &'static str| {
        let (other, id) = (&other, made.id.clone());
        async move {
            let deadline = Instant::now() + FOLLOW_WITHIN;
            loop {
                let patch = session_server::store::Patch {
                    set: [("n".to_string(), n.as_bytes().to_vec())].into(),
                    ..Default::default()
                };
                match other.update("default", &id, patch).await {
                    Ok(record) => return record.version,
                    Err(StoreError::Unavailable(_) | StoreError::Timeout(_))
                        if Instant::now() < deadline => {}
                    Err(error) => panic!("update: {error:?}"),
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    // The create's own invalidation may arrive after the first read's fill and drop it: read
    // until a read is a hit.
    let deadline = Instant::now() + Duration::from_secs(2);
    let before = hits();
    while hits() == before {
        assert!(Instant::now() < deadline, "no read was a hit");
        reads_version(1, Duration::from_secs(2)).await;
    }
    let two = update("1").await;
    reads_version(two, Duration::from_secs(2)).await;

    deployment.wait_until_replicated().await;
    let mut sentinel = deployment
        .connect(deployment.sentinel_port())
        .await
        .expect("sentinel");
    let () = redis::cmd("SENTINEL")
        .arg("FAILOVER")
        .arg(MASTER)
        .query_async(&mut sentinel)
        .await
        .expect("SENTINEL FAILOVER");
    assert!(
        deployment.wait_until_promoted(FOLLOW_WITHIN).await,
        "the sentinel did not promote the replica within {FOLLOW_WITHIN:?}"
    );
    let demoted = deployment.primary_port();
    let deadline = Instant::now() + FOLLOW_WITHIN;
    while deployment.role(demoted).await.as_deref() != Some("slave") {
        assert!(Instant::now() < deadline, "the old primary was not demoted");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Through the new primary: read (and cached), then written by the other store.
    reads_version(two, FOLLOW_WITHIN).await;
    support::harness::near_cache_up(&cached).await;
    let three = update("2").await;
    reads_version(three, Duration::from_secs(2)).await;
    let four = update("3").await;
    reads_version(four, Duration::from_secs(2)).await;
    let deadline = Instant::now() + Duration::from_secs(2);
    let before = hits();
    while hits() == before {
        assert!(
            Instant::now() < deadline,
            "hits did not resume on the new primary"
        );
        reads_version(four, Duration::from_secs(2)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_sentinels_and_primary_are_reached_with_the_redis_ca_and_never_without() {
    let test = "tls_sentinels_and_primary_are_reached_with_the_redis_ca_and_never_without";
    let Some(deployment) = Deployment::start_tls(test).await else {
        return;
    };
    // A TLS handshake per connection: a generous bound, for a loaded machine.
    let settings = Settings {
        store_timeout: Duration::from_secs(5),
        ..Settings::default()
    };
    let config = deployment.config(test, &settings);
    assert!(config.url.starts_with("rediss://") && config.tls_ca.is_some());
    let store = RedisStore::new(config.clone()).expect("store");
    events_ready(&store).await;
    let session = NewSession {
        id: new_id(),
        namespace: "shop".into(),
        user_id: "ada".into(),
        attrs: [("cart".to_string(), b"tls".to_vec())].into(),
        ttl: Duration::from_secs(60),
    };
    let made = store.create(session).await.expect("create over TLS");
    let read = store
        .get("shop", &made.id, false)
        .await
        .expect("get over TLS");
    assert_eq!(read.attrs.get("cart"), Some(&b"tls".to_vec()));

    // Without the CA (the system's roots) nothing is trusted: unavailable, never cleartext.
    let untrusted = RedisStore::new(RedisConfig {
        tls_ca: None,
        ..config
    })
    .expect("store");
    match untrusted.get("shop", &made.id, false).await {
        Err(StoreError::Unavailable(_) | StoreError::Timeout(_)) => {}
        other => panic!("expected an outage without the CA, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_password_in_the_url_reaches_the_sentinels_and_the_primary() {
    let test = "a_password_in_the_url_reaches_the_sentinels_and_the_primary";
    let Some(deployment) = Deployment::start_with_password(test, "s3cret-pw").await else {
        return;
    };
    let config = deployment.config(test, &settings());
    assert!(
        config.url.starts_with("redis://:s3cret-pw@"),
        "{}",
        config.url
    );
    let store = RedisStore::new(config.clone()).expect("store");
    events_ready(&store).await;
    let session = NewSession {
        id: new_id(),
        namespace: "shop".into(),
        user_id: String::new(),
        attrs: [("cart".to_string(), b"auth".to_vec())].into(),
        ttl: Duration::from_secs(60),
    };
    let made = store
        .create(session)
        .await
        .expect("create with the password");
    let read = store.get("shop", &made.id, false).await.expect("get");
    assert_eq!(read.attrs.get("cart"), Some(&b"auth".to_vec()));

    let wrong = RedisStore::new(RedisConfig {
        url: config.url.replace("s3cret-pw", "wrong-pw"),
        ..config
    })
    .expect("store");
    match wrong.get("shop", &made.id, false).await {
        Err(StoreError::Unavailable(message)) => {
            assert!(!message.contains("wrong-pw"), "{message}");
        }
        other => panic!("expected UNAVAILABLE with a wrong password, got {other:?}"),
    }
}

/// `Settings::resolve` of `args`, with `file` as the config file's text.
fn resolve(args: &[&str], file: Option<&str>) -> Result<Settings, ConfigError> {
    use clap::Parser as _;
    let cli = Cli::try_parse_from(std::iter::once("session-server").chain(args.iter().copied()))
        .expect("flags parse");
    Settings::resolve(cli, file)
}

#[test]
fn the_sentinel_master_is_required_with_redis_sentinel_and_refused_without() {
    let sentinels = "redis://127.0.0.1:26379,redis://127.0.0.1:26380";
    let ok = resolve(
        &[
            "--store",
            "redis-sentinel",
            "--redis-url",
            sentinels,
            "--redis-sentinel-master",
            "main",
        ],
        None,
    )
    .expect("a sentinel store");
    assert_eq!(ok.store, StoreKind::RedisSentinel);
    let config = RedisConfig::from_settings(&ok).expect("store settings");
    assert_eq!(config.sentinel_master.as_deref(), Some("main"));
    assert!(!config.cluster);
    let from_file = resolve(
        &[],
        Some("store = \"redis-sentinel\"\nredis_sentinel_master = \"main\"\n"),
    )
    .expect("from the file");
    assert_eq!(from_file.redis_sentinel_master.as_deref(), Some("main"));

    let missing = resolve(&["--store", "redis-sentinel"], None).expect_err("no master");
    assert!(
        missing.to_string().contains("needs redis-sentinel-master"),
        "{missing}"
    );
    for store in ["redis", "redis-cluster", "memory", "mysql"] {
        let stray =
            resolve(&["--store", store, "--redis-sentinel-master", "main"], None).expect_err(store);
        let message = stray.to_string();
        assert!(
            message.contains("redis-sentinel-master is only for store redis-sentinel"),
            "{store}: {message}"
        );
    }
    let blank = resolve(
        &[
            "--store",
            "redis-sentinel",
            "--redis-sentinel-master",
            "my master",
        ],
        None,
    )
    .expect_err("a name with a space");
    assert!(blank.to_string().contains("without spaces"), "{blank}");
    let no_url = resolve(
        &[
            "--store",
            "redis-sentinel",
            "--redis-sentinel-master",
            "main",
            "--redis-url",
            " , ",
        ],
        None,
    )
    .expect_err("no sentinel listed");
    assert!(
        no_url.to_string().contains("list the sentinels"),
        "{no_url}"
    );
    let cleartext_with_ca = resolve(
        &[
            "--store",
            "redis-sentinel",
            "--redis-sentinel-master",
            "main",
            "--redis-ca",
            "/nonexistent/ca.pem",
        ],
        None,
    )
    .expect_err("a CA with a redis:// URL");
    assert!(
        cleartext_with_ca.to_string().contains("not rediss://"),
        "{cleartext_with_ca}"
    );
}

#[test]
fn the_binary_refuses_a_stray_or_missing_sentinel_master_with_exit_status_2() {
    let missing = run_bounded::<&str>(BINARY.as_ref(), &["--store", "redis-sentinel"], &[]);
    assert_eq!(missing.status.code(), Some(2), "{missing:?}");
    let stderr = String::from_utf8_lossy(&missing.stderr);
    assert!(stderr.contains("redis-sentinel-master"), "{stderr}");
    // The environment twin counts as the flag.
    let stray = run_bounded(
        BINARY.as_ref(),
        &["--store", "redis"],
        &[("STICKLESS_REDIS_SENTINEL_MASTER", "main")],
    );
    assert_eq!(stray.status.code(), Some(2), "{stray:?}");
    let stderr = String::from_utf8_lossy(&stray.stderr);
    assert!(stderr.contains("only for store redis-sentinel"), "{stderr}");
}
