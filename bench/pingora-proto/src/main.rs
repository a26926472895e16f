//! `pingora-proto`: session-proxy's plain path (round-robin over HTTP/1.1 backends, pooled
//! keep-alive upstream connections, the usual forwarding headers) built on Pingora instead of
//! hyper, to measure what Pingora's own HTTP/1 stack and connection pool do under the load that
//! `load-http` puts on session-proxy and nginx.
//!
//! ```sh
//! cd bench/pingora-proto && cargo build --release
//! target/release/pingora-proto --listen 127.0.0.1:8080 --backend 127.0.0.1:9001 --threads 2
//! # or from the main workspace, side by side with session-proxy and nginx:
//! target/release/load-http --vs-nginx --vs-pingora bench/pingora-proto/target/release/pingora-proto
//! ```
//!
//! A prototype for the benchmark, not a product: no session lookup, health checks, retries
//! beyond Pingora's own, TLS listener or admin endpoint. It has its own Cargo workspace so the
//! main workspace's builds and CI never compile Pingora. Building it needs `cmake` (Pingora's
//! compression support builds zlib-ng from C).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};

use async_trait::async_trait;
use clap::Parser;
use pingora::http::RequestHeader;
use pingora::prelude::{HttpPeer, Result, Server};
use pingora::proxy::{ProxyHttp, Session, http_proxy_service};
use pingora::server::configuration::ServerConf;

/// As session-proxy: mimalloc rather than glibc malloc.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
#[command(about = "Round-robin HTTP reverse proxy on Pingora (a benchmark prototype)")]
struct Cli {
    /// Address to listen on (HTTP/1.1, cleartext).
    #[arg(long)]
    listen: SocketAddr,
    /// A backend (host:port, plain HTTP); repeat for more. Requests go round-robin.
    #[arg(long = "backend", required = true)]
    backends: Vec<SocketAddr>,
    /// Worker threads of the proxy service (Pingora's `threads`).
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// One single-threaded runtime per thread (Pingora's `work_stealing: false`) instead of
    /// one work-stealing runtime with `threads` workers.
    #[arg(long)]
    no_work_stealing: bool,
}

/// The proxy: picks the next backend for each request and adds the forwarding headers.
struct RoundRobin {
    /// The backends, in the order given.
    backends: Vec<SocketAddr>,
    /// Requests routed so far; the next backend is `next % backends.len()`.
    next: AtomicUsize,
}

#[async_trait]
impl ProxyHttp for RoundRobin {
    type CTX = ();

    fn new_ctx(&self) -> Self::CTX {}

    /// The next backend in turn, as a plain-HTTP peer. Pingora reuses a pooled keep-alive
    /// connection to it when one is idle (the pool is keyed by the peer).
    async fn upstream_peer(&self, _session: &mut Session, _ctx: &mut ()) -> Result<Box<HttpPeer>> {
        let turn = self.next.fetch_add(1, Ordering::Relaxed) % self.backends.len();
        Ok(Box::new(HttpPeer::new(
            self.backends[turn],
            false,
            String::new(),
        )))
    }

    /// The headers nginx's benchmark configuration and session-proxy both add: the client's
    /// address appended to `X-Forwarded-For`, the scheme and the original host (the `Host`
    /// header itself is passed on unchanged, as `proxy_set_header Host $host` does).
    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        upstream_request: &mut RequestHeader,
        _ctx: &mut (),
    ) -> Result<()> {
        if let Some(client) = session.client_addr().and_then(|addr| addr.as_inet()) {
            let ip = client.ip().to_string();
            let forwarded_for = match upstream_request.headers.get("x-forwarded-for") {
                Some(earlier) => format!("{}, {ip}", String::from_utf8_lossy(earlier.as_bytes())),
                None => ip,
            };
            upstream_request.insert_header("x-forwarded-for", forwarded_for)?;
        }
        upstream_request.insert_header("x-forwarded-proto", "http")?;
        if let Some(host) = upstream_request.headers.get("host").cloned() {
            upstream_request.insert_header("x-forwarded-host", host)?;
        }
        Ok(())
    }
}

fn main() {
    let cli = Cli::parse();
    let conf = ServerConf {
        threads: cli.threads.max(1),
        work_stealing: !cli.no_work_stealing,
        // SIGTERM (how load-http stops it): finish at once, no grace period to wait out.
        grace_period_seconds: Some(0),
        graceful_shutdown_timeout_seconds: Some(1),
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();
    let mut proxy = http_proxy_service(
        &server.configuration,
        RoundRobin {
            backends: cli.backends,
            next: AtomicUsize::new(0),
        },
    );
    proxy.add_tcp(&cli.listen.to_string());
    server.add_service(proxy);
    server.run_forever();
}
