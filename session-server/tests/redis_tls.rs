//! The Redis store over TLS: a `rediss://` URL with `--redis-ca` serves every call and Watch
//! from a TLS-only Redis whose certificate only that CA signed; without the CA (the system's
//! roots) or with a cleartext `redis://` URL at the TLS port the store is unavailable, never
//! served in cleartext; a CA with a `redis://` URL, or a CA file that cannot be read or holds
//! no certificate, is a configuration error (exit status 2) naming the fault.

mod support;

use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::Duration;

use futures::StreamExt as _;
use session_proto::v1::session_event::Kind;
use session_proto::v1::session_store_client::SessionStoreClient;
use session_proto::v1::*;
use session_server::config::{Settings, StoreKind};
use session_server::server::build_store;
use support::harness::TestServer;
use support::process::ServerProcess;
use support::redis_tls::OwnTlsRedis;
use support::services;
use support::wait::events_ready;
use test_pki::{Ca, PemDir};
use tonic::Code;

const BINARY: &str = env!("CARGO_BIN_EXE_session-server");

/// Bound on one store call (TLS handshake included): generous, for a loaded machine.
const STORE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long one Watch event may take to arrive: generous, for a loaded machine.
const EVENT_WITHIN: Duration = Duration::from_secs(20);

/// Settings of a Redis store at `url` trusting `ca`, with a key prefix unique to `test`.
fn redis_settings(url: String, ca: Option<PathBuf>, test: &str) -> Settings {
    Settings {
        store: StoreKind::Redis,
        redis_url: url,
        redis_ca: ca,
        redis_prefix: services::unique_prefix(test),
        store_timeout: STORE_TIMEOUT,
        ..Settings::default()
    }
}

/// A private TLS-only Redis, or `None` when `redis-server` is not installed (skipped).
fn tls_redis(test: &str) -> Option<OwnTlsRedis> {
    let binary = services::redis_server_binary(test)?;
    Some(OwnTlsRedis::start(binary, test))
}

fn create_request(ns: &str, user: &str) -> CreateRequest {
    CreateRequest {
        namespace: ns.into(),
        user_id: user.into(),
        ..Default::default()
    }
}

#[tokio::test]
async fn rediss_url_with_redis_ca_serves_create_get_update_delete_and_watch() {
    let test = "rediss_with_ca_serves";
    let Some(redis) = tls_redis(test) else { return };
    let settings = redis_settings(redis.url(), Some(redis.ca_file.clone()), test);
    serves_calls_and_watch(settings).await;
}

#[tokio::test]
async fn redis_cluster_over_rediss_with_redis_ca_serves_calls_and_watch() {
    let test = "rediss_cluster_with_ca";
    let Some(binary) = services::redis_server_binary(test) else {
        return;
    };
    let redis = OwnTlsRedis::start_cluster(binary, test);
    let settings = Settings {
        store: StoreKind::RedisCluster,
        ..redis_settings(redis.url(), Some(redis.ca_file.clone()), test)
    };
    serves_calls_and_watch(settings).await;
}

/// A server on the store of `settings` serves Create, Get, Update and Delete, and a Watch of
/// the namespace sees their events in order.
async fn serves_calls_and_watch(settings: Settings) {
    let store = build_store(&settings).await.expect("store over TLS");
    events_ready(store.as_ref()).await;
    let server = TestServer::start(settings, store).await;
    let mut c = server.client().await;
    let mut events = c
        .watch(WatchRequest {
            namespace: "tls".into(),
            user_id: String::new(),
        })
        .await
        .expect("watch")
        .into_inner();

    let created = c.create(create_request("tls", "ada")).await.unwrap();
    let created = created.into_inner();
    let got = c
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
    let updated = c
        .update(UpdateRequest {
            namespace: "tls".into(),
            id: created.id.clone(),
            set: [("k".to_owned(), b"v".to_vec())].into(),
            ..Default::default()
        })
        .await
        .expect("update")
        .into_inner();
    assert_eq!(updated.attrs.get("k").map(Vec::as_slice), Some(&b"v"[..]));
    c.delete(DeleteRequest {
        namespace: "tls".into(),
        id: created.id.clone(),
    })
    .await
    .expect("delete");
    let gone = c
        .get(GetRequest {
            namespace: "tls".into(),
            id: created.id.clone(),
            touch: false,
            bypass_cache: false,
        })
        .await
        .unwrap_err();
    assert_eq!(gone.code(), Code::NotFound, "{gone:?}");

    let mut seen = Vec::new();
    while seen.len() < 3 {
        let event = tokio::time::timeout(EVENT_WITHIN, events.next())
            .await
            .unwrap_or_else(|_| panic!("events so far {seen:?}: no more within {EVENT_WITHIN:?}"))
            .expect("stream open")
            .expect("event");
        assert_eq!(
            event.id, created.id,
            "only this session is written in 'tls'"
        );
        seen.push((event.kind(), event.version));
    }
    assert_eq!(
        seen,
        [(Kind::Created, 1), (Kind::Updated, 2), (Kind::Deleted, 2)]
    );
}

#[tokio::test]
async fn rediss_url_without_redis_ca_is_unavailable_as_the_system_roots_do_not_trust_it() {
    let test = "rediss_without_ca";
    let Some(redis) = tls_redis(test) else { return };
    let settings = redis_settings(redis.url(), None, test);
    let store = build_store(&settings).await.expect("store builds");
    let server = TestServer::start(settings, store).await;
    let mut c = server.client().await;
    for _ in 0..2 {
        let err = c.create(create_request("tls", "")).await.unwrap_err();
        assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    }
    // The same server reaches the same Redis once it trusts the CA: only trust was missing.
    let trusted = redis_settings(redis.url(), Some(redis.ca_file.clone()), test);
    let store = build_store(&trusted).await.expect("store over TLS");
    let server = TestServer::start(trusted, store).await;
    server
        .client()
        .await
        .create(create_request("tls", ""))
        .await
        .expect("create");
}

#[tokio::test]
async fn cleartext_redis_url_at_the_tls_port_is_unavailable() {
    let test = "cleartext_at_tls_port";
    let Some(redis) = tls_redis(test) else { return };
    let url = format!("redis://127.0.0.1:{}", redis.port);
    let settings = redis_settings(url, None, test);
    let store = build_store(&settings).await.expect("store builds");
    let server = TestServer::start(settings, store).await;
    let mut c = server.client().await;
    let err = c.create(create_request("tls", "")).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
}

#[tokio::test]
async fn binary_with_redis_ca_flag_serves_sessions_from_a_tls_redis() {
    let test = "binary_redis_ca";
    let Some(redis) = tls_redis(test) else { return };
    let (url, ca, prefix) = (
        redis.url(),
        redis.ca_file.display().to_string(),
        services::unique_prefix(test),
    );
    let args = [
        "--listen",
        "127.0.0.1:0",
        "--store",
        "redis",
        "--redis-url",
        &url,
        "--redis-ca",
        &ca,
        "--redis-prefix",
        &prefix,
        "--store-timeout",
        "10s",
    ];
    let server = ServerProcess::start(std::path::Path::new(BINARY), &args, &["grpc"]);
    let mut c = SessionStoreClient::connect(server.grpc_url())
        .await
        .expect("connect");
    let created = c
        .create(create_request("tls", "bob"))
        .await
        .expect("create");
    let got = c
        .get(GetRequest {
            namespace: "tls".into(),
            id: created.into_inner().id,
            touch: false,
            bypass_cache: false,
        })
        .await
        .expect("get");
    assert_eq!(got.into_inner().user_id, "bob");
}

/// Runs the binary to completion with `args` and no `STICKLESS_*` variables from the caller's
/// environment; fails unless it refused its configuration (exit status 2, nothing on stdout)
/// with each of `expected` in stderr.
fn assert_refused(args: &[&str], expected: &[&str]) {
    let mut command = Command::new(BINARY);
    command.args(args);
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("STICKLESS_") {
            command.env_remove(name);
        }
    }
    let Output {
        status,
        stdout,
        stderr,
    } = command.output().expect("run session-server");
    let stderr = String::from_utf8_lossy(&stderr);
    assert_eq!(
        status.code(),
        Some(2),
        "{args:?}: {status}; stderr:\n{stderr}"
    );
    assert!(stdout.is_empty(), "{args:?}: stdout not empty");
    for text in expected {
        assert!(stderr.contains(text), "{args:?}: no {text:?} in:\n{stderr}");
    }
}

#[test]
fn redis_ca_with_a_cleartext_redis_url_is_refused_with_status_2() {
    let dir = PemDir::new("redis_ca_cleartext");
    let ca = dir.write_ca(&Ca::new("refused"));
    let ca = ca.display().to_string();
    for store in ["redis", "redis-cluster"] {
        let args = [
            "--store",
            store,
            "--redis-url",
            "redis://127.0.0.1:6379",
            "--redis-ca",
            &ca,
        ];
        assert_refused(&args, &["redis-ca", "rediss://"]);
    }
    // The TOML key is the same setting.
    let file = dir.write(
        "config.toml",
        format!(
            "store = \"redis\"\nredis_url = \"redis://127.0.0.1:6379\"\nredis_ca = {:?}\n",
            ca
        ),
    );
    assert_refused(
        &["--config", &file.display().to_string()],
        &["redis-ca", "rediss://"],
    );
}

#[test]
fn unreadable_or_empty_redis_ca_is_refused_with_status_2_naming_the_file() {
    let dir = PemDir::new("redis_ca_unreadable");
    let missing = dir.file("no-such-ca.pem").display().to_string();
    let empty = dir.write("empty-ca.pem", "").display().to_string();
    for ca in [&missing, &empty] {
        let args = [
            "--store",
            "redis",
            "--redis-url",
            "rediss://127.0.0.1:6379",
            "--redis-ca",
            ca,
        ];
        assert_refused(&args, &["redis-ca", ca]);
    }
}
