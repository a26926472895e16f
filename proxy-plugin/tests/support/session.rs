//! A real session server in-process (memory store) on `127.0.0.1:0`, that a test can restart
//! on the same port with its data lost (a new store epoch), and whose calls it can count.

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
    /// Where it listens (kept across restarts).
    pub addr: SocketAddr,
    /// Its metrics, kept across restarts: calls are counted from the first start.
    metrics: Metrics,
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
        let mut server = TestSessionServer {
            addr: listener.local_addr().expect("local address"),
            metrics: Metrics::new(),
            stop: None,
            task: None,
        };
        server.serve(listener);
        server
    }

    /// Serves a fresh memory store on `listener`.
    fn serve(&mut self, listener: TcpListener) {
        let settings = Settings::default();
        let store = Arc::new(MemoryStore::new(settings.max_session_bytes));
        let metrics = self.metrics.clone();
        let (stop, stopped) = oneshot::channel::<()>();
        self.task = Some(tokio::spawn(async move {
            server::run(listener, &settings, store, metrics, async {
                let _ = stopped.await;
            })
            .await
        }));
        self.stop = Some(stop);
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

    /// `Restore` calls the server answered since it first started, whatever the answer.
    pub fn restore_calls(&self) -> u64 {
        (0..=16)
            .map(|code| self.metrics.calls("Restore", tonic::Code::from_i32(code)))
            .sum()
    }

    /// `Get` calls the server answered since it first started, whatever the answer.
    pub fn get_calls(&self) -> u64 {
        (0..=16)
            .map(|code| self.metrics.calls("Get", tonic::Code::from_i32(code)))
            .sum()
    }

    /// `Restore` calls answered with `code`.
    pub fn restore_calls_with(&self, code: tonic::Code) -> u64 {
        self.metrics.calls("Restore", code)
    }

    /// Stops the server (its store and every session in it are gone) and starts a fresh,
    /// empty one on the same port: a memory store restarted, with a new epoch.
    pub async fn restart(&mut self) {
        self.halt().await;
        let listener = TcpListener::bind(self.addr)
            .await
            .expect("rebind the same port");
        self.serve(listener);
    }

    /// Signals shutdown and waits for the server to be gone: a shutdown, not an abort, so
    /// that the clients' open HTTP/2 connections are closed too.
    async fn halt(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let stopped = tokio::time::timeout(Duration::from_secs(10), task).await;
            assert!(stopped.is_ok(), "session server did not stop within 10s");
        }
    }

    /// Stops the server and waits for it to be gone.
    pub async fn stop(mut self) {
        self.halt().await;
    }
}

impl Drop for TestSessionServer {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}
