//! A real session server in-process (memory store) on `127.0.0.1:0`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use session_client::{ClientConfig, SessionClient};
use session_server::config::Settings;
use session_server::metrics::Metrics;
use session_server::server;
use session_server::store::memory::MemoryStore;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// A running session server.
pub struct TestSessionServer {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Fires the shutdown signal.
    stop: Option<oneshot::Sender<()>>,
    /// The server task.
    task: Option<JoinHandle<Result<(), server::ServeError>>>,
}

impl TestSessionServer {
    /// Starts a server over a fresh memory store.
    pub async fn start() -> TestSessionServer {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind loopback");
        let addr = listener.local_addr().expect("local address");
        let settings = Settings::default();
        let store = Arc::new(MemoryStore::new(settings.max_session_bytes));
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            server::run(listener, &settings, store, Metrics::new(), async {
                let _ = stopped.await;
            })
            .await
        });
        TestSessionServer {
            addr,
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// `http://addr`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A client of namespace `namespace`.
    pub fn client(&self, namespace: &str) -> SessionClient {
        let mut config = ClientConfig::new(self.url());
        config.namespace = namespace.to_owned();
        config.timeout = Duration::from_secs(5);
        SessionClient::connect_lazy(config).expect("session client")
    }

    /// Stops the server and waits for it to be gone.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(10), task).await;
        }
    }
}

impl Drop for TestSessionServer {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}
