//! A session server (memory store) in-process on a loopback port that a test can stop and
//! start again, empty, on the same port.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use session_client::{ClientConfig, SessionClient};
use session_server::config::Settings;
use session_server::metrics::Metrics;
use session_server::store::memory::MemoryStore;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// A session server on a fixed loopback port that a test can stop and start again (empty).
pub struct StoreServer {
    /// Its address (kept across restarts).
    pub addr: SocketAddr,
    /// Stops the running instance.
    stop: Option<oneshot::Sender<()>>,
    /// The running instance.
    task: Option<JoinHandle<()>>,
}

impl StoreServer {
    /// Starts a server over a fresh memory store on a free port.
    pub async fn start() -> StoreServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut server = StoreServer {
            addr,
            stop: None,
            task: None,
        };
        server.serve(listener);
        server
    }

    fn serve(&mut self, listener: TcpListener) {
        let (stop, stopped) = oneshot::channel::<()>();
        let settings = Settings::default();
        let store = Arc::new(MemoryStore::new(settings.max_session_bytes));
        self.task = Some(tokio::spawn(async move {
            let signal = async {
                let _ = stopped.await;
            };
            session_server::server::run(listener, &settings, store, Metrics::new(), signal)
                .await
                .unwrap();
        }));
        self.stop = Some(stop);
    }

    /// `http://addr`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stops it: the store and every session in it are gone. A shutdown signal, not an abort:
    /// aborting the accept loop would leave its connection tasks serving the clients' open
    /// HTTP/2 connections; shutdown closes them too.
    pub async fn kill(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let stopped = tokio::time::timeout(Duration::from_secs(10), task).await;
            assert!(stopped.is_ok(), "session server did not stop within 10s");
        }
    }

    /// Starts a fresh, empty one on the same port.
    pub async fn restart(&mut self) {
        self.kill().await;
        let listener = TcpListener::bind(self.addr)
            .await
            .expect("rebind the same port");
        self.serve(listener);
    }
}

impl StoreServer {
    /// A client of namespace `namespace` that reaches it directly.
    pub fn client(&self, namespace: &str) -> SessionClient {
        let mut config = ClientConfig::new(self.url());
        config.namespace = namespace.to_owned();
        config.timeout = Duration::from_secs(5);
        SessionClient::connect_lazy(config).expect("session client")
    }
}
