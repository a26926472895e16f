//! Per-client limits end to end on loopback (nginx `limit_conn` and `limit_req`): requests in
//! flight per client address, counted to the end of the response body, over HTTP/1 and as
//! HTTP/2 streams; the request rate with its burst and `Retry-After`; both keyed by the address
//! of the trusted chain, and both reloaded. Distinct clients are simulated with
//! `X-Forwarded-For` through `trusted_proxies = 127.0.0.1/32`.

mod support;

use std::collections::HashSet;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use clap::Parser as _;
use http::{Request, Response, StatusCode};
use http_body_util::{Empty, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use proxy_plugin::config::{BackendConfig, Cli, ClientLimits, ProxyConfig, RequestRate, resolve};
use support::backend::{Behaviour, TestBackend};
use support::proxy::{TestProxy, client, config};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;

/// Bound on a wait for something that should happen at once: generous, since a loaded
/// machine is slow and a passing test never waits it out.
const PATIENCE: Duration = Duration::from_secs(20);

/// The reject labels of the two limits.
const CONN_LIMIT: &str = "conn_limit";
const RATE_LIMIT: &str = "rate_limit";

/// A backend answering `/stream/ID` with a 200 head and a first chunk at once, and the end of
/// the body only once the test releases `ID`: a response in flight for as long as a test
/// needs, head included.
struct StreamingBackend {
    addr: SocketAddr,
    /// The released ids (`*`: all).
    released: watch::Sender<HashSet<String>>,
    /// The accept task, which owns the connections.
    task: tokio::task::JoinHandle<()>,
}

impl StreamingBackend {
    async fn start() -> StreamingBackend {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (released, _) = watch::channel(HashSet::new());
        let watcher = released.clone();
        let task =
            tokio::spawn(async move {
                let mut connections = JoinSet::new();
                while let Ok((stream, _)) = listener.accept().await {
                    let watcher = watcher.clone();
                    connections.spawn(async move {
                    let service = service_fn(move |request: Request<Incoming>| {
                        let id = request.uri().path().trim_start_matches("/stream/").to_owned();
                        let steps = futures::stream::unfold(
                            (0u8, watcher.subscribe(), id),
                            |(step, mut released, id)| async move {
                                let frame = match step {
                                    0 => chunk("start\n"),
                                    1 => {
                                        released
                                            .wait_for(|ids| ids.contains(&id) || ids.contains("*"))
                                            .await
                                            .ok()?;
                                        chunk("end\n")
                                    }
                                    _ => return None,
                                };
                                let frame = Ok::<_, Infallible>(Frame::data(frame));
                                Some((frame, (step + 1, released, id)))
                            },
                        );
                        async move { Ok::<_, Infallible>(Response::new(StreamBody::new(steps))) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
                }
            });
        StreamingBackend {
            addr,
            released,
            task,
        }
    }

    /// Lets the body of `/stream/id` end (`*`: every one).
    fn release(&self, id: &str) {
        self.released.send_modify(|ids| {
            ids.insert(id.to_owned());
        });
    }

    fn config(&self) -> BackendConfig {
        BackendConfig {
            name: "streaming".to_owned(),
            authority: self.addr.to_string(),
            weight: 1,
            tls: false,
        }
    }
}

impl Drop for StreamingBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn chunk(text: &'static str) -> Bytes {
    Bytes::from_static(text.as_bytes())
}

/// The test config over the streaming backend, trusting loopback's `X-Forwarded-For`.
fn streaming_config(backend: &StreamingBackend, limits: ClientLimits) -> ProxyConfig {
    let mut cfg = config(&[]);
    cfg.backends = vec![backend.config()];
    cfg.trusted_proxies = vec!["127.0.0.1/32".parse().unwrap()];
    cfg.client_limits = limits;
    cfg
}

fn max_conns(n: u32) -> ClientLimits {
    ClientLimits {
        max_conns_per_ip: n,
        ..ClientLimits::default()
    }
}

/// `GET path` with `X-Forwarded-For: xff` when given.
async fn get(
    http: &reqwest::Client,
    proxy: &TestProxy,
    path: &str,
    xff: Option<&str>,
) -> reqwest::Response {
    let mut request = http.get(proxy.url(path));
    if let Some(xff) = xff {
        request = request.header("x-forwarded-for", xff);
    }
    tokio::time::timeout(PATIENCE, request.send())
        .await
        .expect("an answer within the deadline")
        .expect("the proxy answers")
}

/// A streamed response whose head and first chunk arrived: its request is in flight.
async fn in_flight(
    http: &reqwest::Client,
    proxy: &TestProxy,
    id: &str,
    xff: Option<&str>,
) -> reqwest::Response {
    let mut response = get(http, proxy, &format!("/stream/{id}"), xff).await;
    assert_eq!(response.status(), StatusCode::OK, "request {id}");
    let first = tokio::time::timeout(PATIENCE, response.chunk())
        .await
        .expect("the first chunk within the deadline")
        .expect("a chunk");
    assert_eq!(first.as_deref(), Some(&b"start\n"[..]));
    response
}

/// Asserts `response` is a 429 with `Retry-After` within `retry_after`; returns its value.
fn assert_refused(response: &reqwest::Response, retry_after: std::ops::RangeInclusive<u32>) -> u32 {
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    let value: u32 = response
        .headers()
        .get("retry-after")
        .expect("a Retry-After")
        .to_str()
        .unwrap()
        .parse()
        .expect("whole seconds");
    assert!(retry_after.contains(&value), "Retry-After: {value}");
    value
}

/// Sends `GET path` until it is answered 200, for at most [`PATIENCE`]; the answer.
async fn until_ok(
    http: &reqwest::Client,
    proxy: &TestProxy,
    path: &str,
    xff: Option<&str>,
) -> reqwest::Response {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let response = get(http, proxy, path, xff).await;
        if response.status() == StatusCode::OK {
            return response;
        }
        assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
        assert!(
            tokio::time::Instant::now() < deadline,
            "{path} still refused after {PATIENCE:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn requests_past_the_limit_get_429_until_one_completes_while_another_client_is_served() {
    let backend = StreamingBackend::start().await;
    let proxy = TestProxy::start(streaming_config(&backend, max_conns(2))).await;
    let http = client();

    let first = in_flight(&http, &proxy, "a1", None).await;
    let _second = in_flight(&http, &proxy, "a2", None).await;
    // Both heads were relayed: the slots are held by the bodies still arriving.
    let third = get(&http, &proxy, "/stream/a3", None).await;
    assert_refused(&third, 1..=1);
    assert_eq!(
        proxy
            .proxy
            .metrics()
            .rejects_with(StatusCode::TOO_MANY_REQUESTS, CONN_LIMIT),
        1
    );
    assert!(
        proxy
            .proxy
            .render_metrics()
            .contains("reason=\"conn_limit\""),
        "/metrics counts the refusal"
    );

    // Another client behind the trusted proxy has slots of its own.
    let _other = in_flight(&http, &proxy, "b1", Some("203.0.113.9")).await;
    let _other2 = in_flight(&http, &proxy, "b2", Some("203.0.113.9")).await;
    assert_refused(
        &get(&http, &proxy, "/stream/b3", Some("203.0.113.9")).await,
        1..=1,
    );

    // Once the first response is complete, its slot is free again.
    backend.release("a1");
    let body = tokio::time::timeout(PATIENCE, first.bytes())
        .await
        .expect("the body within the deadline")
        .expect("the whole body");
    assert_eq!(&body[..], b"end\n", "the rest of the body");
    let mut again = until_ok(&http, &proxy, "/stream/a4", None).await;
    assert_eq!(
        again.chunk().await.unwrap().as_deref(),
        Some(&b"start\n"[..])
    );
    // And it counts again.
    assert_refused(&get(&http, &proxy, "/stream/a5", None).await, 1..=1);
    backend.release("*");
}

#[tokio::test]
async fn the_key_is_the_trusted_chains_client_never_an_untrusted_forwarded_for() {
    let backend = StreamingBackend::start().await;
    // Nobody trusted: every request from loopback is loopback, whatever it says.
    let mut untrusting = streaming_config(&backend, max_conns(1));
    untrusting.trusted_proxies.clear();
    let proxy = TestProxy::start(untrusting).await;
    let http = client();
    let _held = in_flight(&http, &proxy, "u1", Some("203.0.113.1")).await;
    let forged = get(&http, &proxy, "/stream/u2", Some("203.0.113.2")).await;
    assert_refused(&forged, 1..=1);

    // Behind the trusted loopback, the right-most untrusted entry is the client: what the
    // client wrote to the left of it does not make it another one.
    let proxy = TestProxy::start(streaming_config(&backend, max_conns(1))).await;
    let _held = in_flight(&http, &proxy, "t1", Some("6.6.6.6, 203.0.113.5")).await;
    let forged = get(&http, &proxy, "/stream/t2", Some("7.7.7.7, 203.0.113.5")).await;
    assert_refused(&forged, 1..=1);
    let _other = in_flight(&http, &proxy, "t3", Some("203.0.113.6")).await;
    backend.release("*");
}

#[tokio::test]
async fn http2_streams_count_one_each_and_a_cancelled_stream_frees_its_slot() {
    let backend = StreamingBackend::start().await;
    let proxy = TestProxy::start(streaming_config(&backend, max_conns(2))).await;
    let stream = TcpStream::connect(proxy.addr).await.unwrap();
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .expect("HTTP/2 handshake");
    let connection = tokio::spawn(connection);
    let url = |id: &str| format!("http://{}/stream/{id}", proxy.addr);
    let mut send = move |id: String| {
        let request = Request::get(url(&id)).body(Empty::<Bytes>::new()).unwrap();
        let response = sender.send_request(request);
        async move {
            tokio::time::timeout(PATIENCE, response)
                .await
                .expect("an answer within the deadline")
                .expect("the proxy answers")
        }
    };

    let first = send("h1".into()).await;
    let second = send("h2".into()).await;
    assert_eq!(
        (first.status(), second.status()),
        (StatusCode::OK, StatusCode::OK)
    );
    let third = send("h3".into()).await;
    assert_eq!(third.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(third.headers()["retry-after"], "1");

    // Dropping a response mid-body resets its stream: the proxy drops the request, and the
    // slot with it.
    drop(first);
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let mut n = 4;
    loop {
        let response = send(format!("h{n}")).await;
        if response.status() == StatusCode::OK {
            break;
        }
        assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
        assert!(
            tokio::time::Instant::now() < deadline,
            "no slot freed by the reset"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
        n += 1;
    }
    drop(second);
    backend.release("*");
    connection.abort();
}

#[tokio::test]
async fn past_the_burst_requests_get_429_with_retry_after_and_pass_again_after_it() {
    let backend = TestBackend::start("a", Behaviour::Echo).await;
    let mut cfg = config(&[&backend]);
    cfg.trusted_proxies = vec!["127.0.0.1/32".parse().unwrap()];
    // One a minute: nothing refills while the test runs. Burst 2: three at once.
    cfg.client_limits = ClientLimits {
        rate_per_ip: Some(RequestRate::per_minute(1)),
        burst: 2,
        ..ClientLimits::default()
    };
    let proxy = TestProxy::start(cfg.clone()).await;
    let http = client();
    for n in 0..3 {
        let response = get(&http, &proxy, "/", None).await;
        assert_eq!(
            response.status(),
            StatusCode::OK,
            "request {n} of the burst"
        );
    }
    let refused = get(&http, &proxy, "/", None).await;
    assert_refused(&refused, 40..=60);
    assert_eq!(backend.hits(), 3, "a refused request reaches no backend");
    // Another client has its own bucket; a forged entry left of the client's changes nothing.
    assert_eq!(
        get(&http, &proxy, "/", Some("203.0.113.7")).await.status(),
        StatusCode::OK
    );
    for n in 0..2 {
        let forged = format!("6.6.6.{n}, 203.0.113.7");
        assert_eq!(
            get(&http, &proxy, "/", Some(&forged)).await.status(),
            StatusCode::OK
        );
    }
    assert_refused(
        &get(&http, &proxy, "/", Some("7.7.7.7, 203.0.113.7")).await,
        40..=60,
    );
    assert_eq!(
        proxy
            .proxy
            .metrics()
            .rejects_with(StatusCode::TOO_MANY_REQUESTS, RATE_LIMIT),
        2
    );

    // Reloaded with 2 a second and no burst: a new rate starts with full buckets, then the
    // second request within half a second is refused, and waiting Retry-After lets one pass.
    cfg.client_limits.rate_per_ip = Some(RequestRate::per_second(2));
    cfg.client_limits.burst = 0;
    proxy.proxy.reload(cfg).expect("reload");
    let retry_after = loop_until_refused(&http, &proxy).await;
    assert_eq!(retry_after, 1, "half a second, rounded up");
    tokio::time::sleep(Duration::from_secs(u64::from(retry_after))).await;
    assert_eq!(get(&http, &proxy, "/", None).await.status(), StatusCode::OK);
}

/// Sends requests until one is refused for the rate (a loaded machine may let a token refill
/// between two); its `Retry-After`.
async fn loop_until_refused(http: &reqwest::Client, proxy: &TestProxy) -> u32 {
    for _ in 0..50 {
        let response = get(http, proxy, "/", None).await;
        if response.status() == StatusCode::TOO_MANY_REQUESTS {
            return assert_refused(&response, 1..=1);
        }
        assert_eq!(response.status(), StatusCode::OK);
    }
    panic!("50 requests in a row passed a limit of 2 a second");
}

#[tokio::test]
async fn a_reload_turns_the_limit_on_and_off_counting_requests_of_the_old_configuration() {
    let backend = StreamingBackend::start().await;
    let mut cfg = streaming_config(&backend, ClientLimits::default());
    let proxy = TestProxy::start(cfg.clone()).await;
    let http = client();
    let _unlimited = in_flight(&http, &proxy, "r1", None).await;
    let _unlimited2 = in_flight(&http, &proxy, "r2", None).await;

    cfg.client_limits = max_conns(1);
    proxy.proxy.reload(cfg.clone()).expect("reload");
    let counted = in_flight(&http, &proxy, "r3", None).await;
    assert_refused(&get(&http, &proxy, "/stream/r4", None).await, 1..=1);

    // Raised to 2 by a reload: the request of the previous configuration still counts.
    cfg.client_limits = max_conns(2);
    proxy.proxy.reload(cfg.clone()).expect("reload");
    let _second = in_flight(&http, &proxy, "r5", None).await;
    assert_refused(&get(&http, &proxy, "/stream/r6", None).await, 1..=1);
    drop(counted);

    cfg.client_limits = ClientLimits::default();
    proxy.proxy.reload(cfg).expect("reload");
    let _free = in_flight(&http, &proxy, "r7", None).await;
    backend.release("*");
}

fn parse(args: &[&str], file: Option<&str>) -> Result<ClientLimits, String> {
    let args = ["session-proxy", "--backend", "http://127.0.0.1:9001"]
        .into_iter()
        .chain(args.iter().copied());
    let cli = Cli::try_parse_from(args).map_err(|e| e.to_string())?;
    resolve(cli, file)
        .map(|c| c.client_limits)
        .map_err(|e| e.to_string())
}

#[test]
fn flags_and_the_limits_table_set_the_limits_flags_first_all_off_by_default() {
    assert_eq!(parse(&[], None), Ok(ClientLimits::default()));
    assert_eq!(
        parse(
            &[
                "--max-conns-per-ip",
                "3",
                "--rate-per-ip",
                "30/m",
                "--burst",
                "5"
            ],
            None
        ),
        Ok(ClientLimits {
            max_conns_per_ip: 3,
            rate_per_ip: Some(RequestRate::per_minute(30)),
            burst: 5,
        })
    );
    let file = "[limits]\nmax_conns_per_ip = 2\nrate_per_ip = 10\nburst = 4\n";
    assert_eq!(
        parse(&[], Some(file)),
        Ok(ClientLimits {
            max_conns_per_ip: 2,
            rate_per_ip: Some(RequestRate::per_second(10)),
            burst: 4,
        })
    );
    assert_eq!(
        parse(
            &["--max-conns-per-ip", "0", "--rate-per-ip", "20r/s"],
            Some(file)
        ),
        Ok(ClientLimits {
            max_conns_per_ip: 0,
            rate_per_ip: Some(RequestRate::per_second(20)),
            burst: 4,
        })
    );
    let text_rate = "[limits]\nrate_per_ip = \"6/m\"\n";
    assert_eq!(
        parse(&[], Some(text_rate)).map(|l| l.rate_per_ip),
        Ok(Some(RequestRate::per_minute(6)))
    );
}

#[test]
fn bad_limits_are_refused_naming_the_flag_or_the_key() {
    let error = parse(&["--rate-per-ip", "10/h"], None).unwrap_err();
    assert!(error.contains("--rate-per-ip"), "{error}");
    let error = parse(&["--max-conns-per-ip", "many"], None).unwrap_err();
    assert!(error.contains("--max-conns-per-ip"), "{error}");
    let error = parse(&[], Some("[limits]\nrate_per_ip = \"fast\"\n")).unwrap_err();
    assert!(
        error.contains("rate_per_ip") && error.contains("line 2"),
        "{error}"
    );
    let error = parse(&[], Some("[limits]\nrate_per_ipp = 3\n")).unwrap_err();
    assert!(error.contains("rate_per_ipp"), "{error}");
    let error = parse(&["--burst", "3"], None).unwrap_err();
    assert!(
        error.contains("--burst") && error.contains("--rate-per-ip"),
        "{error}"
    );
    // Turning the rate off turns its burst off too, or the configuration is refused.
    assert!(parse(&["--rate-per-ip", "0", "--burst", "3"], None).is_err());
    assert!(parse(&["--rate-per-ip", "0"], None).is_ok());
}
