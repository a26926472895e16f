//! A proxy under test: `Proxy::serve` on `127.0.0.1:0`, with a test-friendly config.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use proxy_plugin::balance::BalanceMode;
use proxy_plugin::config::{HealthCheckKind, HealthConfig, Limits, ProxyConfig};
use proxy_plugin::proxy::Proxy;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use super::backend::TestBackend;

/// A config over `backends`: round-robin, no active checks, passive marking after one failure
/// for 10 s, generous limits (tests tighten what they exercise).
pub fn config(backends: &[&TestBackend]) -> ProxyConfig {
    ProxyConfig {
        listen: "127.0.0.1:0".parse().expect("address"),
        admin_listen: None,
        admin_token: None,
        backends: backends.iter().map(|b| b.config()).collect(),
        balance: BalanceMode::RoundRobin,
        trusted_proxies: Vec::new(),
        allow_underscore_headers: false,
        client_limits: proxy_plugin::config::ClientLimits::default(),
        health: HealthConfig {
            kind: HealthCheckKind::Off,
            interval: Duration::from_millis(100),
            timeout: Duration::from_millis(300),
            rise: 1,
            fall: 1,
            max_fails: 1,
            fail_timeout: Duration::from_secs(10),
        },
        limits: Limits {
            header_read_timeout: Duration::from_secs(5),
            max_header_bytes: 16 * 1024,
            max_body_bytes: 1024 * 1024,
            connect_timeout: Duration::from_secs(1),
            response_timeout: Duration::from_secs(5),
            max_connections: 100,
            max_tries: 3,
            retry_buffer_bytes: 64 * 1024,
            body_read_timeout: Duration::from_secs(5),
            min_upload_rate: 0,
            send_timeout: Duration::from_secs(10),
            // What the head deadline gave an idle keep-alive connection before there was one.
            idle_timeout: Duration::from_secs(5),
        },
        lookup: None,
        tls: None,
        backend_ca: None,
    }
}

/// A running proxy.
pub struct TestProxy {
    /// Where it listens.
    pub addr: SocketAddr,
    /// The proxy itself (reload, backends, metrics).
    pub proxy: Arc<Proxy>,
    /// Fires the shutdown signal.
    stop: Option<oneshot::Sender<()>>,
    /// The serving task.
    task: Option<JoinHandle<std::io::Result<()>>>,
}

impl TestProxy {
    /// Builds a proxy from `config` and serves it on a free loopback port.
    pub async fn start(config: ProxyConfig) -> TestProxy {
        let proxy = Proxy::new(config).expect("valid proxy config");
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind loopback");
        let addr = listener.local_addr().expect("local address");
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(proxy.clone().serve(listener, async {
            let _ = stopped.await;
        }));
        TestProxy {
            addr,
            proxy,
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// `http://addr{path}`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Signals shutdown and waits (at most `within`) for `serve` to return.
    pub async fn shutdown(mut self, within: Duration) -> std::io::Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let task = self.task.take().expect("proxy task");
        tokio::time::timeout(within, task)
            .await
            .expect("proxy stopped within the deadline")
            .expect("proxy task did not panic")
    }
}

impl Drop for TestProxy {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

/// A reqwest client that never uses a system proxy.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(20))
        .build()
        .expect("reqwest client")
}
