//! A `demo-app` (the real demo backend's router) served in-process so that killing it is a real
//! death: its accept task owns every connection in a `JoinSet`, so aborting the task closes the
//! listener and every open connection, pooled keep-alive ones included.

use demo::{DemoConfig, Sessions};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::task::{JoinHandle, JoinSet};

/// A running demo backend.
pub struct DemoBackend {
    /// `http://addr`.
    pub url: String,
    /// The accept task (owner of all connections).
    task: JoinHandle<()>,
}

impl DemoBackend {
    /// A `demo-app --sessions proxy` instance named `name`, writing to `session_server`.
    pub async fn proxy_mode(name: &str, session_server: &str) -> DemoBackend {
        let mut config = DemoConfig::new(name, Sessions::Proxy(session_server.to_owned()));
        config.secure_cookies = false;
        DemoBackend::start(&config).await
    }

    /// A `demo-app` instance as `config` says.
    pub async fn start(config: &DemoConfig) -> DemoBackend {
        let app = demo::app(config).await.expect("demo app");
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind loopback");
        let url = format!("http://{}", listener.local_addr().expect("local address"));
        let task = tokio::spawn(async move {
            let mut connections = JoinSet::new();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let service = TowerToHyperService::new(app.clone());
                connections.spawn(async move {
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        DemoBackend { url, task }
    }

    /// `host:port`.
    pub fn authority(&self) -> &str {
        self.url.trim_start_matches("http://")
    }

    /// Kills it: listener and connections gone at once.
    pub fn kill(&self) {
        self.task.abort();
    }
}

impl Drop for DemoBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}
