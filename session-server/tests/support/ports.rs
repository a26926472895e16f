//! A loopback port where a connection is refused, for tests of a service that is down: the
//! port is bound but never listened on, so nothing else can take it while the test runs (a
//! port found free and released could be bound by any process before the test connects).

use std::net::SocketAddr;

use tokio::net::TcpSocket;

/// A loopback address that refuses connections for as long as this value lives.
pub struct RefusedPort {
    /// Bound, not listening: holds the port, refuses connections to it.
    socket: TcpSocket,
}

impl RefusedPort {
    /// Reserves a fresh loopback port.
    pub fn new() -> RefusedPort {
        let socket = TcpSocket::new_v4().expect("a TCP socket");
        socket
            .bind(SocketAddr::from(([127, 0, 0, 1], 0)))
            .expect("bind an ephemeral loopback port");
        RefusedPort { socket }
    }

    /// `127.0.0.1:<port>`.
    pub fn addr(&self) -> SocketAddr {
        self.socket
            .local_addr()
            .expect("a bound socket has an address")
    }
}
