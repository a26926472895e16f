//! A TCP relay a test puts between a client of the session server (the proxy's lookup plugin,
//! a `demo-app`) and the server, to make the server slow or unreachable for that client alone,
//! on a URL that never changes:
//! - [`Relay::forward`]: every byte is relayed (the default); [`Relay::forward_to`] relays new
//!   connections to another address (a server restarted on a port of its own);
//! - [`Relay::stall`]: connections stay open and new ones are accepted, but nothing is relayed
//!   in either direction (a store that stopped answering: the client times out);
//! - [`Relay::cut`]: every relayed connection is closed and each new one is closed at once (a
//!   network partition: the client finds the server unreachable).
//!
//! Also used by demo's and bench's tests (`#[path]`), so that the relay exists once.

// Each test file uses a subset of it.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};

/// What the relay does with traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Relays every byte.
    Forward,
    /// Holds every byte (and accepts new connections) until the mode changes.
    Stall,
    /// Closes every connection.
    Cut,
}

/// A relay on a loopback port of its own, stopped (with every connection) when dropped.
pub struct Relay {
    /// Where it listens.
    pub addr: SocketAddr,
    /// The mode, watched by every connection.
    mode: watch::Sender<Mode>,
    /// Where new connections are relayed to.
    target: Arc<Mutex<SocketAddr>>,
    /// The accept loop, owner of every connection's task.
    accept: JoinHandle<()>,
}

impl Relay {
    /// A relay to `target`, forwarding.
    pub async fn start(target: SocketAddr) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind a loopback port for the relay");
        let addr = listener.local_addr().expect("the relay's address");
        let (mode, watching) = watch::channel(Mode::Forward);
        let target = Arc::new(Mutex::new(target));
        let accept = tokio::spawn(accept_loop(listener, target.clone(), watching));
        Relay {
            addr,
            mode,
            target,
            accept,
        }
    }

    /// `http://addr`: the session server's URL as the clients behind the relay know it.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Relays again (bytes held by a stall go through now).
    pub fn forward(&self) {
        self.mode.send_replace(Mode::Forward);
    }

    /// Relays again, new connections to `target` (connections made before go where they went).
    pub fn forward_to(&self, target: SocketAddr) {
        *self.target.lock().expect("relay target lock") = target;
        self.forward();
    }

    /// Holds every byte: the server seems to have stopped answering.
    pub fn stall(&self) {
        self.mode.send_replace(Mode::Stall);
    }

    /// Closes every connection, and each new one at once, until [`Relay::forward`].
    pub fn cut(&self) {
        self.mode.send_replace(Mode::Cut);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// Accepts connections and relays each to `target` as the mode says.
async fn accept_loop(
    listener: TcpListener,
    target: Arc<Mutex<SocketAddr>>,
    mode: watch::Receiver<Mode>,
) {
    let mut connections = JoinSet::new();
    loop {
        let Ok((client, _)) = listener.accept().await else {
            continue;
        };
        // Reap finished connections so the set does not grow.
        while connections.try_join_next().is_some() {}
        if *mode.borrow() == Mode::Cut {
            drop(client);
            continue;
        }
        let mode = mode.clone();
        let target = *target.lock().expect("relay target lock");
        connections.spawn(async move {
            let Ok(server) = TcpStream::connect(target).await else {
                return;
            };
            let (client_read, client_write) = client.into_split();
            let (server_read, server_write) = server.into_split();
            tokio::select! {
                () = pump(client_read, server_write, mode.clone()) => {}
                () = pump(server_read, client_write, mode) => {}
            }
        });
    }
}

/// Copies `from` to `to`, holding what it read while stalled, until either side closes or the
/// relay is cut.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut mode: watch::Receiver<Mode>,
) {
    let mut buffer = vec![0u8; 16 * 1024];
    loop {
        let read = tokio::select! {
            read = from.read(&mut buffer) => read,
            changed = mode.wait_for(|m| *m == Mode::Cut) => {
                let _ = changed;
                return;
            }
        };
        let n = match read {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        match mode.wait_for(|m| *m != Mode::Stall).await.map(|m| *m) {
            Ok(Mode::Forward) => {}
            _ => return,
        }
        if to.write_all(&buffer[..n]).await.is_err() {
            return;
        }
    }
}
