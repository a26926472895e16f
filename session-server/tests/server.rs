//! The server as a whole, beyond any one store: auth, health and reflection for stock gRPC tools,
//! metrics, serving threads, message limits, and a Redis that is unreachable, silent or goes
//! away.
//! Graceful shutdown and Watch's lag rule have their own file, `shutdown.rs`.

mod support;

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt as _;
use session_proto::v1::*;
use session_server::config::Settings;
use session_server::store::memory::MemoryStore;
use session_server::store::redis::RedisStore;
use support::harness::{self, TestServer, redis_store};
use support::outage::{fails_within, is_unavailable};
use support::ports::RefusedPort;
use support::services::{self, OwnRedis};
use support::wait::eventually_ok;
use tonic::Code;
use tonic::metadata::MetadataValue;

fn memory(settings: &Settings) -> Arc<MemoryStore> {
    Arc::new(MemoryStore::new(settings.max_session_bytes))
}

#[tokio::test]
async fn auth_token_is_required_when_set() {
    let settings = Settings {
        auth_token: Some("t0ken".into()),
        ..Settings::default()
    };
    let server = TestServer::start(settings.clone(), memory(&settings)).await;
    let mut client = server.client().await;

    let err = client.create(CreateRequest::default()).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);

    for wrong in ["Bearer t0ke", "Bearer t0ken2", "Basic t0ken", "t0ken"] {
        let mut req = tonic::Request::new(CreateRequest::default());
        req.metadata_mut()
            .insert("authorization", MetadataValue::try_from(wrong).unwrap());
        assert_eq!(
            client.create(req).await.unwrap_err().code(),
            Code::Unauthenticated,
            "{wrong}"
        );
    }

    let mut req = tonic::Request::new(CreateRequest::default());
    req.metadata_mut()
        .insert("authorization", MetadataValue::from_static("Bearer t0ken"));
    let created = client
        .create(req)
        .await
        .expect("right token admitted")
        .into_inner();
    assert_eq!(created.version, 1);

    // Probes stay open: a load balancer checks health without the token.
    let mut health = tonic_health::pb::health_client::HealthClient::new(server.channel().await);
    let status = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: session_proto::SERVICE_NAME.into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        status.status(),
        tonic_health::pb::health_check_response::ServingStatus::Serving
    );
}

#[tokio::test]
async fn unknown_methods_and_services_are_unimplemented() {
    // SessionStore paths skip tonic's router (see dispatch.rs): an unknown method there, and an
    // unknown service, must still answer UNIMPLEMENTED, and the token check must come first.
    let settings = Settings {
        auth_token: Some("t0ken".into()),
        ..Settings::default()
    };
    let server = TestServer::start(settings.clone(), memory(&settings)).await;
    let call = |path: &'static str, token: bool| {
        let channel = server.channel();
        async move {
            let mut grpc = tonic::client::Grpc::new(channel.await);
            grpc.ready().await.unwrap();
            let mut request = tonic::Request::new(());
            if token {
                request
                    .metadata_mut()
                    .insert("authorization", MetadataValue::from_static("Bearer t0ken"));
            }
            let codec = tonic_prost::ProstCodec::<(), ()>::default();
            grpc.unary(
                request,
                tonic::codegen::http::uri::PathAndQuery::from_static(path),
                codec,
            )
            .await
            .unwrap_err()
            .code()
        }
    };
    assert_eq!(
        call("/session.v1.SessionStore/NoSuchMethod", true).await,
        Code::Unimplemented
    );
    assert_eq!(
        call("/session.v1.SessionStore/NoSuchMethod", false).await,
        Code::Unauthenticated
    );
    assert_eq!(
        call("/no.such.Service/Get", false).await,
        Code::Unimplemented
    );
    assert_eq!(
        call("/session.v1.SessionStoreX/Get", true).await,
        Code::Unimplemented
    );
}

#[tokio::test]
async fn reflection_lists_and_describes_the_api() {
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

    let settings = Settings::default();
    let server = TestServer::start(settings.clone(), memory(&settings)).await;
    let mut reflection = ServerReflectionClient::new(server.channel().await);
    let requests = [
        MessageRequest::ListServices(String::new()),
        MessageRequest::FileContainingSymbol(session_proto::SERVICE_NAME.into()),
    ]
    .map(|m| ServerReflectionRequest {
        host: String::new(),
        message_request: Some(m),
    });
    let mut answers = reflection
        .server_reflection_info(futures::stream::iter(requests))
        .await
        .unwrap()
        .into_inner();

    let Some(MessageResponse::ListServicesResponse(list)) =
        answers.next().await.unwrap().unwrap().message_response
    else {
        panic!("expected a service list");
    };
    let names: Vec<_> = list.service.iter().map(|s| s.name.as_str()).collect();
    assert!(names.contains(&session_proto::SERVICE_NAME), "{names:?}");
    assert!(names.contains(&"grpc.health.v1.Health"), "{names:?}");

    let Some(MessageResponse::FileDescriptorResponse(files)) =
        answers.next().await.unwrap().unwrap().message_response
    else {
        panic!("expected file descriptors");
    };
    assert!(!files.file_descriptor_proto.is_empty());
}

#[tokio::test]
async fn metrics_count_calls_by_method_and_code() {
    let settings = Settings::default();
    let store = memory(&settings);
    let server = TestServer::start(settings.clone(), store.clone()).await;
    let mut client = server.client().await;
    let s = client
        .create(CreateRequest::default())
        .await
        .unwrap()
        .into_inner();
    client
        .get(GetRequest {
            namespace: "".into(),
            id: s.id.clone(),
            touch: false,
            bypass_cache: false,
        })
        .await
        .unwrap();
    let missing = GetRequest {
        namespace: "".into(),
        id: "A".repeat(32),
        touch: false,
        bypass_cache: false,
    };
    client.get(missing).await.unwrap_err();

    // Scrape over HTTP, as Prometheus would.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let scrape = tokio::spawn(session_server::metrics::serve(
        listener,
        server.metrics.clone(),
        store,
        async {
            let _ = stopped.await;
        },
    ));
    let body = http_get(addr, "/metrics").await;
    let _ = stop.send(());
    scrape.await.unwrap().unwrap();

    assert!(
        body.contains(r#"stickless_grpc_calls_total{code="OK",method="Create"} 1"#),
        "{body}"
    );
    assert!(
        body.contains(r#"stickless_grpc_calls_total{code="OK",method="Get"} 1"#),
        "{body}"
    );
    assert!(
        body.contains(r#"stickless_grpc_calls_total{code="NOT_FOUND",method="Get"} 1"#),
        "{body}"
    );
    assert!(
        body.contains("stickless_grpc_call_seconds_bucket"),
        "{body}"
    );
    assert!(body.contains("stickless_sessions_live 1"), "{body}");
}

/// A minimal HTTP/1.1 GET, enough to scrape the metrics listener.
async fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    conn.write_all(request.as_bytes()).await.unwrap();
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(5), conn.read_to_string(&mut out))
        .await
        .unwrap()
        .unwrap();
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    out
}

#[tokio::test]
async fn serving_threads_answer_every_connection_and_drain_on_shutdown() {
    // `--serve-threads 3`: connections are handed round robin to three single-threaded
    // runtimes; all of them must serve, share the one store, and stop cleanly.
    let settings = Settings {
        serve_threads: Some(3),
        ..Settings::default()
    };
    let server = TestServer::start(settings.clone(), memory(&settings)).await;
    let mut clients = Vec::new();
    for _ in 0..6 {
        clients.push(server.client().await);
    }
    let mut watch = clients[0]
        .watch(WatchRequest::default())
        .await
        .unwrap()
        .into_inner();
    let mut ids = Vec::new();
    for client in &mut clients {
        let created = client.create(CreateRequest::default()).await.unwrap();
        ids.push(created.into_inner().id);
    }
    // Every connection reads what the others wrote: one store behind every thread.
    for (i, client) in clients.iter_mut().enumerate() {
        let id = ids[(i + 1) % ids.len()].clone();
        let got = client
            .get(GetRequest {
                namespace: "".into(),
                id: id.clone(),
                touch: false,
                bypass_cache: false,
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(got.id, id);
    }
    // The watch (on the first thread) saw the creates made through every thread.
    for id in &ids {
        assert_eq!(&watch.next().await.unwrap().unwrap().id, id);
    }

    server
        .shutdown(Duration::from_secs(10))
        .await
        .expect("clean stop");
    let end = tokio::time::timeout(Duration::from_secs(5), watch.next())
        .await
        .expect("watch ended");
    assert!(end.is_none_or(|item| item.is_err()));
    for client in &mut clients {
        let after = client.create(CreateRequest::default()).await;
        assert!(after.is_err(), "no calls served after shutdown");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_connections_outlive_the_serving_threads() {
    // With serving threads, the Redis lanes must be opened on the runtime the store was built
    // on: a lane opened on a serving thread would die with that thread's runtime.
    let test = "redis_connections_outlive_the_serving_threads";
    let Some(url) = services::redis_url(test) else {
        return;
    };
    let settings = Settings {
        serve_threads: Some(2),
        ..Settings::default()
    };
    // One lane, so that the connection the calls open is the one used after the shutdown.
    let mut config = harness::redis_config(&url, test, &settings);
    config.pool_size = 1;
    let store: Arc<dyn session_server::store::SessionStore> =
        Arc::new(RedisStore::new(config).unwrap());
    let server = TestServer::start(settings.clone(), store.clone()).await;
    let mut ids = Vec::new();
    for _ in 0..4 {
        let mut client = server.client().await;
        let created = client.create(CreateRequest::default()).await.unwrap();
        ids.push(created.into_inner().id);
    }
    server
        .shutdown(Duration::from_secs(10))
        .await
        .expect("clean stop");
    for id in &ids {
        let record = store
            .get("default", id, false)
            .await
            .expect("the store still reaches Redis after the serving threads ended");
        assert_eq!(&record.id, id);
    }
}

#[tokio::test]
async fn message_far_over_the_limit_is_refused_without_harm() {
    let settings = Settings {
        max_session_bytes: 1024,
        ..Settings::default()
    };
    let server = TestServer::start(settings.clone(), memory(&settings)).await;
    let mut client = server.client().await;
    let huge = CreateRequest {
        attrs: [("k".to_string(), vec![0u8; 4 * 1024 * 1024])].into(),
        ..Default::default()
    };
    let err = client.create(huge).await.unwrap_err();
    assert!(
        matches!(
            err.code(),
            Code::InvalidArgument | Code::ResourceExhausted | Code::OutOfRange
        ),
        "{err}"
    );
    // The server is fine afterwards.
    assert!(client.create(CreateRequest::default()).await.is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_at_a_dead_port_is_unavailable_within_the_timeout() {
    let settings = Settings {
        store_timeout: Duration::from_millis(500),
        ..Settings::default()
    };
    let dead = RefusedPort::new();
    let url = format!("redis://{}", dead.addr());
    let store = Arc::new(redis_store(&url, "dead_port", &settings));
    let server = TestServer::start(settings.clone(), store).await;
    let mut client = server.client().await;
    for _ in 0..3 {
        let create = client.create(CreateRequest::default());
        fails_within("create", settings.store_timeout, create, is_unavailable).await;
    }
    let missing = GetRequest {
        namespace: "".into(),
        id: "A".repeat(32),
        touch: false,
        bypass_cache: false,
    };
    assert_eq!(
        client.get(missing).await.unwrap_err().code(),
        Code::Unavailable
    );
    assert!(server.metrics.calls("Create", Code::Unavailable) >= 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_redis_gives_deadline_exceeded_within_the_timeout() {
    let settings = Settings {
        store_timeout: Duration::from_millis(500),
        ..Settings::default()
    };
    // Accepts connections (the kernel does) and never answers: a store too slow, not gone.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let url = format!("redis://{}", silent.local_addr().expect("address"));
    let store = Arc::new(redis_store(&url, "silent", &settings));
    let server = TestServer::start(settings.clone(), store).await;
    let mut client = server.client().await;
    let deadline = |status: &tonic::Status| status.code() == Code::DeadlineExceeded;
    for _ in 0..2 {
        let create = client.create(CreateRequest::default());
        fails_within("create", settings.store_timeout, create, deadline).await;
    }
    let missing = GetRequest {
        namespace: "".into(),
        id: "A".repeat(32),
        touch: false,
        bypass_cache: false,
    };
    let get = client.get(missing);
    fails_within("get", settings.store_timeout, get, deadline).await;
    assert!(server.metrics.calls("Create", Code::DeadlineExceeded) >= 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_that_stops_gives_unavailable_then_recovers_without_restart() {
    let Some(binary) = services::redis_server_binary("redis_stops") else {
        return;
    };
    let mut redis = OwnRedis::start(binary);
    let settings = Settings {
        store_timeout: Duration::from_millis(500),
        ..Settings::default()
    };
    let store = Arc::new(redis_store(&redis.url(), "redis_stops", &settings));
    let server = TestServer::start(settings.clone(), store).await;
    let mut client = server.client().await;
    let before = client
        .create(CreateRequest {
            user_id: "h".into(),
            ..Default::default()
        })
        .await;
    assert!(before.is_ok(), "works while Redis is up");

    redis.stop();
    for _ in 0..2 {
        let create = client.create(CreateRequest::default());
        fails_within("create", settings.store_timeout, create, is_unavailable).await;
    }

    redis.restart();
    let what = "calls succeeding again once Redis is back, same server";
    eventually_ok(what, Duration::from_secs(10), || {
        let mut client = client.clone();
        async move { client.create(CreateRequest::default()).await }
    })
    .await;
    let s = client
        .create(CreateRequest {
            user_id: "h".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let got = client
        .get(GetRequest {
            namespace: "".into(),
            id: s.id,
            touch: true,
            bypass_cache: false,
        })
        .await
        .unwrap();
    assert_eq!(got.into_inner().user_id, "h");
}

/// A Watch never misses events unknowingly: when the server loses its Redis event feed (Redis
/// stopped), every open Watch ends with UNAVAILABLE ("events may have been missed"); once
/// Redis is back, a Watch opened while the feed was down is ended too when the feed resumes,
/// and a new one hears writes again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watches_end_with_unavailable_when_the_event_feed_is_lost_and_when_it_resumes() {
    let Some(binary) = services::redis_server_binary("watch_feed_gap") else {
        return;
    };
    let mut redis = OwnRedis::start(binary);
    let settings = Settings {
        store_timeout: Duration::from_millis(500),
        ..Settings::default()
    };
    let store = Arc::new(redis_store(&redis.url(), "watch_feed_gap", &settings));
    support::wait::events_ready(store.as_ref()).await;
    let server = TestServer::start(settings.clone(), store).await;
    let mut client = server.client().await;
    let mut watch = client
        .watch(WatchRequest::default())
        .await
        .expect("watch")
        .into_inner();
    let made = client
        .create(CreateRequest::default())
        .await
        .expect("create")
        .into_inner();
    let first = tokio::time::timeout(Duration::from_secs(10), watch.next())
        .await
        .expect("an event")
        .expect("open")
        .expect("an event, not an error");
    assert_eq!(first.id, made.id);

    redis.stop();
    let ended = tokio::time::timeout(Duration::from_secs(30), watch.next())
        .await
        .expect("the watch is told within the subscriber's ping timeout");
    let status = ended.expect("an item").expect_err("an error, not an event");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");

    // Opened while the feed is down: ended when it resumes.
    let mut during = client
        .watch(WatchRequest::default())
        .await
        .expect("watch")
        .into_inner();
    redis.restart();
    let resumed = tokio::time::timeout(Duration::from_secs(30), during.next())
        .await
        .expect("the watch opened during the outage is told when the feed resumes");
    assert_eq!(
        resumed.expect("an item").expect_err("an error").code(),
        Code::Unavailable
    );
    // A new watch hears writes.
    let mut after = client
        .watch(WatchRequest::default())
        .await
        .expect("watch")
        .into_inner();
    // (Writes go on at once; the feed comes back on the subscriber's backoff.)
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    'heard: loop {
        assert!(tokio::time::Instant::now() < deadline, "no event heard");
        let Ok(made) = client.create(CreateRequest::default()).await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let made = made.into_inner();
        let wait = tokio::time::Instant::now() + Duration::from_millis(500);
        while let Ok(Some(item)) = tokio::time::timeout_at(wait, after.next()).await {
            match item {
                Ok(event) if event.id == made.id => break 'heard,
                Ok(_) => {}
                // Opened before the feed resumed: told so, and watching again.
                Err(status) => {
                    assert_eq!(status.code(), Code::Unavailable);
                    after = client
                        .watch(WatchRequest::default())
                        .await
                        .expect("watch")
                        .into_inner();
                    break;
                }
            }
        }
    }
}
