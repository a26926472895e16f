//! A TCP relay a test puts between a backend and its session server, to make a network
//! partition the backend sees and nobody else does: while up it forwards every connection to
//! its target; [`Relay::cut`] closes every relayed connection and closes each new one at once
//! (the backend's client sees UNAVAILABLE: an outage); [`Relay::heal`] forwards again, to the
//! same or another target (a restarted server), on the same port, so the backend's URL never
//! changes.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};

use tokio::net::{TcpListener, TcpStream};
use tokio::task::{AbortHandle, JoinHandle};

/// What the relay does with a connection, and the connections it relays.
struct State {
    /// Where connections go; `None` while cut.
    target: Option<SocketAddr>,
    /// The tasks of the relayed connections (each owns both sockets): aborted by a cut.
    connections: Vec<AbortHandle>,
}

/// A relay on a loopback port of its own, stopped when dropped.
pub struct Relay {
    /// Where it listens (kept for its whole life).
    pub addr: SocketAddr,
    /// Target and connections, shared with the accept loop.
    state: Arc<Mutex<State>>,
    /// The accept loop.
    accept: JoinHandle<()>,
}

impl Relay {
    /// A relay to `target`, forwarding.
    pub async fn start(target: SocketAddr) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind a loopback port for the relay");
        let addr = listener.local_addr().expect("the relay's address");
        let state = Arc::new(Mutex::new(State {
            target: Some(target),
            connections: Vec::new(),
        }));
        let accept = tokio::spawn(accept_loop(listener, Arc::clone(&state)));
        Relay {
            addr,
            state,
            accept,
        }
    }

    /// `http://addr`: the session server's URL as the backends behind the relay know it.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The partition: every relayed connection is closed, and every new one is accepted and
    /// closed at once, until [`Relay::heal`].
    pub fn cut(&self) {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        state.target = None;
        for connection in state.connections.drain(..) {
            connection.abort();
        }
    }

    /// Forwards again, to `target`. Connections relayed to an earlier target are closed (a
    /// restarted server is another server).
    pub fn heal(&self, target: SocketAddr) {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if state.target != Some(target) {
            for connection in state.connections.drain(..) {
                connection.abort();
            }
        }
        state.target = Some(target);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}

/// Accepts connections for as long as the relay lives; each is relayed (its task registered
/// under the lock, so a cut never misses one) or, while cut, closed at once.
async fn accept_loop(listener: TcpListener, state: Arc<Mutex<State>>) {
    loop {
        let Ok((inbound, _)) = listener.accept().await else {
            continue;
        };
        let mut state = state.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(target) = state.target else {
            drop(inbound);
            continue;
        };
        state.connections.retain(|c| !c.is_finished());
        let task = tokio::spawn(relay_one(inbound, target));
        state.connections.push(task.abort_handle());
    }
}

/// Forwards one connection both ways until either side closes it.
async fn relay_one(mut inbound: TcpStream, target: SocketAddr) {
    let Ok(mut outbound) = TcpStream::connect(target).await else {
        return;
    };
    let _ = inbound.set_nodelay(true);
    let _ = outbound.set_nodelay(true);
    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
}
