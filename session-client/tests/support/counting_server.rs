//! A real session server behind a gRPC front that counts what reaches it and can fail on
//! purpose: the honest measure of what `SessionClient` and `SessionLayer` send over the wire.
//!
//! The front implements `session.v1.SessionStore` (the trait generated in `session-proto`) and
//! hands every call it does not fail to the session server's own service over a memory store,
//! so answers are the real ones. It listens on `127.0.0.1:0`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use session_client::{ClientConfig, SessionClient};
use session_proto::v1;
use session_proto::v1::session_store_server::{
    SessionStore as SessionStoreApi, SessionStoreServer,
};
use session_server::config::Settings;
use session_server::metrics::Metrics;
use session_server::service::{Limits, SessionService};
use session_server::store::memory::MemoryStore;
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Response, Status};

/// One RPC of `session.v1.SessionStore`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Method {
    /// `Create`.
    Create,
    /// `Get`.
    Get,
    /// `Update`.
    Update,
    /// `Touch`.
    Touch,
    /// `Regenerate`.
    Regenerate,
    /// `Delete`.
    Delete,
    /// `ListByUser`.
    ListByUser,
    /// `DeleteByUser`.
    DeleteByUser,
    /// `Restore`.
    Restore,
    /// `Watch`.
    Watch,
}

/// What reached the front, and the faults still to inject.
#[derive(Debug, Default)]
struct Record {
    /// Every call that reached the front, in arrival order (failed on purpose or not).
    calls: Vec<Method>,
    /// Calls of each method still to be answered UNAVAILABLE without reaching the store.
    faults: HashMap<Method, u32>,
    /// Calls still to be applied and then answered UNAVAILABLE (a reply lost).
    lost_replies: HashMap<Method, u32>,
    /// The `Update` requests, as received.
    updates: Vec<v1::UpdateRequest>,
    /// The `Create` requests, as received.
    creates: Vec<v1::CreateRequest>,
}

/// The counting, fault-injecting front over the real service.
struct Front {
    /// The session server's own service.
    inner: SessionService,
    /// Shared with the test's [`CountingServer`].
    record: Arc<Mutex<Record>>,
}

impl Front {
    /// Counts a call of `method`; `Err(UNAVAILABLE)` while a fault is pending for it.
    fn arrive(&self, method: Method) -> Result<(), Status> {
        let mut record = self.record.lock();
        record.calls.push(method);
        match record.faults.get_mut(&method) {
            Some(left) if *left > 0 => {
                *left -= 1;
                // The words of a server whose store refused it: the call reached this server
                // all the same (never taken for a connection the client could not make).
                Err(Status::unavailable(format!(
                    "injected fault on {method:?}: session store unavailable: tcp connect \
                     error: Connection refused (os error 111)"
                )))
            }
            _ => Ok(()),
        }
    }
}

#[tonic::async_trait]
impl SessionStoreApi for Front {
    async fn create(
        &self,
        request: Request<v1::CreateRequest>,
    ) -> Result<Response<v1::Session>, Status> {
        self.record.lock().creates.push(request.get_ref().clone());
        self.arrive(Method::Create)?;
        self.inner.create(request).await
    }

    async fn get(&self, request: Request<v1::GetRequest>) -> Result<Response<v1::Session>, Status> {
        self.arrive(Method::Get)?;
        self.inner.get(request).await
    }

    async fn update(
        &self,
        request: Request<v1::UpdateRequest>,
    ) -> Result<Response<v1::Session>, Status> {
        self.record.lock().updates.push(request.get_ref().clone());
        self.arrive(Method::Update)?;
        let answer = self.inner.update(request).await;
        let mut record = self.record.lock();
        match record.lost_replies.get_mut(&Method::Update) {
            Some(left) if *left > 0 && answer.is_ok() => {
                *left -= 1;
                Err(Status::unavailable("injected: applied, reply lost"))
            }
            _ => answer,
        }
    }

    async fn touch(
        &self,
        request: Request<v1::TouchRequest>,
    ) -> Result<Response<v1::Session>, Status> {
        self.arrive(Method::Touch)?;
        self.inner.touch(request).await
    }

    async fn regenerate(
        &self,
        request: Request<v1::RegenerateRequest>,
    ) -> Result<Response<v1::Session>, Status> {
        self.arrive(Method::Regenerate)?;
        self.inner.regenerate(request).await
    }

    async fn delete(
        &self,
        request: Request<v1::DeleteRequest>,
    ) -> Result<Response<v1::DeleteResponse>, Status> {
        self.arrive(Method::Delete)?;
        self.inner.delete(request).await
    }

    async fn list_by_user(
        &self,
        request: Request<v1::ListByUserRequest>,
    ) -> Result<Response<v1::ListByUserResponse>, Status> {
        self.arrive(Method::ListByUser)?;
        self.inner.list_by_user(request).await
    }

    async fn delete_by_user(
        &self,
        request: Request<v1::DeleteByUserRequest>,
    ) -> Result<Response<v1::DeleteByUserResponse>, Status> {
        self.arrive(Method::DeleteByUser)?;
        self.inner.delete_by_user(request).await
    }

    async fn restore(
        &self,
        request: Request<v1::RestoreRequest>,
    ) -> Result<Response<v1::Session>, Status> {
        self.arrive(Method::Restore)?;
        self.inner.restore(request).await
    }

    type WatchStream = <SessionService as SessionStoreApi>::WatchStream;

    async fn watch(
        &self,
        request: Request<v1::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        self.arrive(Method::Watch)?;
        self.inner.watch(request).await
    }
}

/// A running front (and the memory store behind it); stopped on drop.
pub struct CountingServer {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Calls, faults and captured requests.
    record: Arc<Mutex<Record>>,
    /// Fires the shutdown.
    stop: Option<oneshot::Sender<()>>,
    /// Ends Watch streams at shutdown (kept alive while the server runs).
    _watch_stop: watch::Sender<bool>,
    /// The serving task.
    task: JoinHandle<()>,
}

impl CountingServer {
    /// Starts a front over a fresh, empty memory store on `127.0.0.1:0`.
    pub async fn start() -> CountingServer {
        let settings = Settings::default();
        CountingServer::start_on(Arc::new(MemoryStore::new(settings.max_session_bytes))).await
    }

    /// Starts a front over `store` (two fronts over one store are two session servers over
    /// one shared store).
    pub async fn start_on(store: Arc<MemoryStore>) -> CountingServer {
        let settings = Settings::default();
        let limits = Limits {
            default_ttl: settings.default_ttl,
            max_ttl: settings.max_ttl,
            max_session_bytes: settings.max_session_bytes,
        };
        let (watch_stop, watch_rx) = watch::channel(false);
        let record = Arc::new(Mutex::new(Record::default()));
        let front = Front {
            inner: SessionService::new(store, limits, Metrics::new(), watch_rx),
            record: record.clone(),
        };
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let signal = async {
                let _ = stopped.await;
            };
            tonic::transport::Server::builder()
                .add_service(SessionStoreServer::new(front))
                .serve_with_incoming_shutdown(TcpIncoming::from(listener), signal)
                .await
                .expect("counting server failed");
        });
        CountingServer {
            addr,
            record,
            stop: Some(stop),
            _watch_stop: watch_stop,
            task,
        }
    }

    /// `http://<addr>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A client of this server. Its per-call timeout is generous (a loaded machine must not
    /// turn a slow answer into a retry that the counts would see); retries and backoff are the
    /// defaults.
    pub fn client(&self) -> SessionClient {
        let mut config = ClientConfig::new(self.url());
        config.timeout = Duration::from_secs(20);
        config.connect_timeout = Duration::from_secs(10);
        SessionClient::connect_lazy(config).expect("valid endpoint")
    }

    /// Applies the next `n` calls of `method` (only Update so far), then answers them
    /// UNAVAILABLE, as a server that died between the store's answer and its own.
    pub fn lose_reply_next(&self, method: Method, n: u32) {
        self.record.lock().lost_replies.insert(method, n);
    }

    /// Answers the next `n` calls of `method` UNAVAILABLE without reaching the store.
    pub fn fail_next(&self, method: Method, n: u32) {
        self.record.lock().faults.insert(method, n);
    }

    /// Every call that reached the server so far, in order.
    pub fn calls(&self) -> Vec<Method> {
        self.record.lock().calls.clone()
    }

    /// How many calls of `method` reached the server so far.
    pub fn count(&self, method: Method) -> usize {
        self.record
            .lock()
            .calls
            .iter()
            .filter(|m| **m == method)
            .count()
    }

    /// The `Update` requests received so far.
    pub fn updates(&self) -> Vec<v1::UpdateRequest> {
        self.record.lock().updates.clone()
    }

    /// The `Create` requests received so far.
    pub fn creates(&self) -> Vec<v1::CreateRequest> {
        self.record.lock().creates.clone()
    }

    /// Forgets the calls and requests seen so far (faults stay).
    pub fn reset(&self) {
        let mut record = self.record.lock();
        record.calls.clear();
        record.updates.clear();
        record.creates.clear();
    }
}

impl Drop for CountingServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.task.abort();
    }
}
