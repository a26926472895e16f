//! Several session servers behind one client: which one a call goes to, which ones are out.
//!
//! [`Endpoints`] holds one tonic channel (one HTTP/2 connection) per session server. The
//! configured URLs are targets; a target whose host is a DNS name becomes one member per
//! address the name resolves to, re-resolved every [`ClientConfig::resolve_interval`] (members
//! whose address stays keep their connection). Until the first resolution a name's target is
//! one member that lets tonic resolve the name on connect.
//!
//! A call goes to the less busy of two members drawn at random among the healthy ones (power
//! of two choices on in-flight calls, as Finagle and Envoy's `LEAST_REQUEST` do): no member
//! gets a queue while another idles, and no shared counter orders every call. A member is
//! ejected when it cannot be reached (connect failure, broken connection, UNAVAILABLE); a
//! probe asks it `grpc.health.v1.Health/Check` for `session.v1.SessionStore` with a growing
//! pause (200 ms to 5 s) and takes it back once it says SERVING. While every member is out,
//! calls go to all of them (one of them may be back before its probe says so): a client never
//! refuses a call on its own.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use parking_lot::RwLock;
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use crate::client::{ClientConfig, ClientError};

/// First pause of a probe of an ejected member; doubles up to [`PROBE_MAX`].
const PROBE_MIN: Duration = Duration::from_millis(200);
/// Longest pause between two probes of an ejected member.
const PROBE_MAX: Duration = Duration::from_secs(5);
/// Bound on one DNS resolution of a target's name.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(5);

/// One configured session server URL.
#[derive(Debug)]
struct Target {
    /// As configured (`http://sessions:50051`).
    url: String,
    /// Its parsed form.
    uri: http::Uri,
    /// Host, without IPv6 brackets.
    host: String,
    /// Port (the scheme's default when the URL has none).
    port: u16,
    /// Whether `host` is a name to resolve (not an IP literal).
    is_name: bool,
}

impl Target {
    fn parse(url: &str) -> Result<Target, ClientError> {
        let uri: http::Uri = url
            .parse()
            .map_err(|e| ClientError::Config(format!("bad endpoint {url:?}: {e}")))?;
        let host = uri
            .host()
            .unwrap_or_default()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let port = uri
            .port_u16()
            .unwrap_or(if uri.scheme_str() == Some("https") {
                443
            } else {
                80
            });
        let is_name = host.parse::<IpAddr>().is_err();
        Ok(Target {
            url: url.to_owned(),
            uri,
            host,
            port,
            is_name,
        })
    }
}

/// One session server address and its connection.
#[derive(Debug)]
pub(crate) struct Member {
    /// Index of its target.
    target: usize,
    /// The resolved address it connects to; `None` for a target used as configured.
    addr: Option<SocketAddr>,
    /// How logs and [`EndpointState`] name it.
    label: String,
    /// Its connection (connects on first use, reconnects after failures).
    channel: Channel,
    /// Calls sent to it and not answered yet.
    in_flight: AtomicUsize,
    /// Calls it answered (anything but unreachable).
    answered: AtomicU64,
    /// Out of the rotation until a probe finds it SERVING.
    ejected: AtomicBool,
    /// A probe task is running for it.
    probing: AtomicBool,
}

impl Member {
    /// The connection, to send one call on.
    pub(crate) fn channel(&self) -> Channel {
        self.channel.clone()
    }

    /// How logs name it.
    pub(crate) fn label(&self) -> &str {
        &self.label
    }

    /// Counts one call in flight until the guard drops.
    pub(crate) fn start(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(self.clone())
    }
}

/// One call in flight on a member.
pub(crate) struct InFlight(Arc<Member>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// How one session server looks to the client ([`crate::SessionClient::endpoints`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointState {
    /// The URL, and the address it resolved to when the URL names a host.
    pub label: String,
    /// In the rotation (not ejected).
    pub healthy: bool,
    /// Calls sent and not answered yet.
    pub in_flight: usize,
    /// Calls it answered since it joined (an error answer counts; unreachable does not).
    pub answered: u64,
}

/// The session servers of one client, shared by its clones.
#[derive(Debug)]
pub(crate) struct Endpoints {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    /// The configured URLs.
    targets: Vec<Target>,
    /// The current members, replaced whole when a resolution changes them.
    members: RwLock<Arc<Vec<Arc<Member>>>>,
    /// What channels are built from (TLS, timeouts).
    config: Arc<ClientConfig>,
    /// State of the random draws.
    seed: AtomicU64,
}

impl Endpoints {
    /// Members for every URL of `config` (each checked, channels not connected yet); starts
    /// the resolver of DNS names when there is a runtime to run it.
    pub(crate) fn new(config: Arc<ClientConfig>) -> Result<Endpoints, ClientError> {
        let targets = config
            .endpoints
            .iter()
            .map(|url| Target::parse(url))
            .collect::<Result<Vec<_>, _>>()?;
        if targets.is_empty() {
            return Err(ClientError::Config(
                "no session server endpoint given".into(),
            ));
        }
        let members = targets
            .iter()
            .enumerate()
            .map(|(index, target)| {
                let endpoint = config.endpoint_for(&target.url, None)?;
                Ok(Arc::new(Member::new(
                    index,
                    None,
                    target.url.clone(),
                    endpoint.connect_lazy(),
                )))
            })
            .collect::<Result<Vec<_>, ClientError>>()?;
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0x9e37_79b9, |d| d.as_nanos() as u64)
            | 1;
        let shared = Arc::new(Shared {
            targets,
            members: RwLock::new(Arc::new(members)),
            config,
            seed: AtomicU64::new(seed),
        });
        if shared.targets.iter().any(|t| t.is_name) {
            match tokio::runtime::Handle::try_current() {
                Ok(runtime) => {
                    runtime.spawn(resolve_loop(Arc::downgrade(&shared)));
                }
                Err(_) => tracing::warn!(
                    "session client built outside a tokio runtime: host names are resolved by \
                     each connection, never spread over their addresses nor re-resolved"
                ),
            }
        }
        Ok(Endpoints { shared })
    }

    /// The member for the next call: power of two choices on in-flight calls among the healthy
    /// members not in `tried`; among all members not in `tried` when none of those is healthy;
    /// among all when every member was tried.
    pub(crate) fn pick(&self, tried: &[Arc<Member>]) -> Arc<Member> {
        let members = self.shared.members.read().clone();
        if let [only] = members.as_slice() {
            return only.clone();
        }
        let untried = |m: &&Arc<Member>| !tried.iter().any(|t| Arc::ptr_eq(t, m));
        let healthy: Vec<&Arc<Member>> = members
            .iter()
            .filter(untried)
            .filter(|m| !m.ejected.load(Ordering::Relaxed))
            .collect();
        let pool = if !healthy.is_empty() {
            healthy
        } else {
            let rest: Vec<&Arc<Member>> = members.iter().filter(untried).collect();
            if rest.is_empty() {
                members.iter().collect()
            } else {
                rest
            }
        };
        let chosen = match pool.len() {
            0 => unreachable!("a client has at least one member"),
            1 => pool[0],
            n => {
                let draw = self.shared.next_random();
                let a = (draw % n as u64) as usize;
                let b = (a + 1 + ((draw >> 32) % (n as u64 - 1)) as usize) % n;
                let (a, b) = (pool[a], pool[b]);
                if b.in_flight.load(Ordering::Relaxed) < a.in_flight.load(Ordering::Relaxed) {
                    b
                } else {
                    a
                }
            }
        };
        chosen.clone()
    }

    /// Whether a member outside `tried` exists to fail over to.
    pub(crate) fn has_untried(&self, tried: &[Arc<Member>]) -> bool {
        self.shared
            .members
            .read()
            .iter()
            .any(|m| !tried.iter().any(|t| Arc::ptr_eq(t, m)))
    }

    /// `member` answered (a reply or an error status other than unreachable): counted, and
    /// back in the rotation if it was out.
    pub(crate) fn answered(&self, member: &Member) {
        member.answered.fetch_add(1, Ordering::Relaxed);
        if member.ejected.swap(false, Ordering::Relaxed) {
            tracing::info!(endpoint = member.label, "session server answers again");
        }
    }

    /// `member` could not be reached: out of the rotation, probed until it says SERVING.
    pub(crate) fn eject(&self, member: &Arc<Member>, error: &ClientError) {
        if member.ejected.swap(true, Ordering::SeqCst) {
            return;
        }
        let members = self.shared.members.read().len();
        tracing::warn!(
            endpoint = member.label,
            %error,
            members,
            "session server ejected: probing it with grpc.health.v1"
        );
        if !member.probing.swap(true, Ordering::SeqCst) {
            match tokio::runtime::Handle::try_current() {
                Ok(runtime) => {
                    runtime.spawn(probe(Arc::downgrade(&self.shared), member.clone()));
                }
                // No runtime to probe on: an answer to a call takes it back.
                Err(_) => member.probing.store(false, Ordering::SeqCst),
            }
        }
    }

    /// Every member's state, in target order.
    pub(crate) fn states(&self) -> Vec<EndpointState> {
        self.shared
            .members
            .read()
            .iter()
            .map(|m| EndpointState {
                label: m.label.clone(),
                healthy: !m.ejected.load(Ordering::Relaxed),
                in_flight: m.in_flight.load(Ordering::Relaxed),
                answered: m.answered.load(Ordering::Relaxed),
            })
            .collect()
    }
}

impl Member {
    fn new(target: usize, addr: Option<SocketAddr>, label: String, channel: Channel) -> Member {
        Member {
            target,
            addr,
            label,
            channel,
            in_flight: AtomicUsize::new(0),
            answered: AtomicU64::new(0),
            ejected: AtomicBool::new(false),
            probing: AtomicBool::new(false),
        }
    }
}

impl Shared {
    /// A xorshift draw: enough to spread picks, no dependency, no lock.
    fn next_random(&self) -> u64 {
        let mut x = self.seed.load(Ordering::Relaxed);
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.seed.store(x, Ordering::Relaxed);
        x
    }

    /// Resolves every named target once and replaces the members when the addresses changed.
    /// A name that does not resolve (or resolves to nothing) keeps its members as they are.
    async fn resolve(&self) {
        let mut resolved: Vec<Option<Vec<SocketAddr>>> = Vec::with_capacity(self.targets.len());
        for target in &self.targets {
            if !target.is_name {
                resolved.push(None);
                continue;
            }
            let lookup = tokio::net::lookup_host((target.host.as_str(), target.port));
            let addrs = match tokio::time::timeout(RESOLVE_TIMEOUT, lookup).await {
                Ok(Ok(addrs)) => {
                    let mut addrs: Vec<SocketAddr> = addrs.collect();
                    addrs.sort();
                    addrs.dedup();
                    addrs
                }
                Ok(Err(error)) => {
                    tracing::warn!(endpoint = target.url, %error, "cannot resolve the session server's name: its addresses are kept");
                    Vec::new()
                }
                Err(_) => {
                    tracing::warn!(
                        endpoint = target.url,
                        "resolving the session server's name timed out: its addresses are kept"
                    );
                    Vec::new()
                }
            };
            resolved.push(Some(addrs).filter(|a| !a.is_empty()));
        }
        let current = self.members.read().clone();
        let mut next: Vec<Arc<Member>> = Vec::with_capacity(current.len());
        let mut changed = false;
        for (index, target) in self.targets.iter().enumerate() {
            let mine = current.iter().filter(|m| m.target == index);
            let Some(addrs) = &resolved[index] else {
                next.extend(mine.cloned());
                continue;
            };
            let kept: Vec<&Arc<Member>> = mine.collect();
            for addr in addrs {
                if let Some(member) = kept.iter().find(|m| m.addr == Some(*addr)) {
                    next.push((*member).clone());
                    continue;
                }
                let url = format!("{}://{addr}", scheme(target));
                match self
                    .config
                    .endpoint_for(&url, Some((&target.host, &target.uri)))
                {
                    Ok(endpoint) => {
                        changed = true;
                        next.push(Arc::new(Member::new(
                            index,
                            Some(*addr),
                            format!("{} ({addr})", target.url),
                            endpoint.connect_lazy(),
                        )));
                    }
                    Err(error) => {
                        tracing::warn!(endpoint = target.url, %addr, %error, "cannot use a resolved address");
                    }
                }
            }
            changed |= kept
                .iter()
                .any(|m| !addrs.iter().any(|a| m.addr == Some(*a)));
        }
        if changed && !next.is_empty() {
            let labels: Vec<&str> = next.iter().map(|m| m.label.as_str()).collect();
            tracing::info!(?labels, "session server addresses changed");
            *self.members.write() = Arc::new(next);
        }
    }
}

/// The scheme of a target (only `http` and `https` get this far).
fn scheme(target: &Target) -> &str {
    target.uri.scheme_str().unwrap_or("http")
}

/// Re-resolves the named targets until every clone of the client is gone.
async fn resolve_loop(shared: Weak<Shared>) {
    loop {
        let Some(live) = shared.upgrade() else { return };
        live.resolve().await;
        let interval = live.config.resolve_interval;
        drop(live);
        tokio::time::sleep(interval).await;
    }
}

/// Ends a member's probe; `false` when the member was ejected again meanwhile (an ejection
/// that found the probe still running started none), so the probe goes on.
fn stop_probing(member: &Member) -> bool {
    member.probing.store(false, Ordering::SeqCst);
    !member.ejected.load(Ordering::SeqCst) || member.probing.swap(true, Ordering::SeqCst)
}

/// Probes an ejected member until it says SERVING (back in the rotation; a server without the
/// health service that answers UNIMPLEMENTED is reachable, so back too), it is back by a call
/// that got an answer, it is no longer a member, or the client is gone.
async fn probe(shared: Weak<Shared>, member: Arc<Member>) {
    let mut pause = PROBE_MIN;
    loop {
        tokio::time::sleep(pause).await;
        let Some(live) = shared.upgrade() else { return };
        let still_member = live.members.read().iter().any(|m| Arc::ptr_eq(m, &member));
        if !still_member {
            member.probing.store(false, Ordering::SeqCst);
            return;
        }
        if !member.ejected.load(Ordering::SeqCst) {
            if stop_probing(&member) {
                return;
            }
            continue;
        }
        let timeout = live.config.timeout;
        drop(live);
        let mut health = HealthClient::new(member.channel.clone());
        let mut request = tonic::Request::new(HealthCheckRequest {
            service: session_proto::SERVICE_NAME.to_owned(),
        });
        request.set_timeout(timeout);
        let back = match tokio::time::timeout(timeout, health.check(request)).await {
            Ok(Ok(reply)) if reply.get_ref().status == ServingStatus::Serving as i32 => true,
            Ok(Err(status)) if status.code() == tonic::Code::Unimplemented => true,
            Ok(Ok(reply)) => {
                tracing::debug!(
                    endpoint = member.label,
                    status = reply.get_ref().status,
                    "session server probed: not serving"
                );
                false
            }
            Ok(Err(status)) => {
                tracing::debug!(endpoint = member.label, %status, "session server probe failed");
                false
            }
            Err(_) => {
                tracing::debug!(endpoint = member.label, "session server probe timed out");
                false
            }
        };
        if back {
            member.ejected.store(false, Ordering::SeqCst);
            tracing::info!(
                endpoint = member.label,
                "session server answers its probe: back in the rotation"
            );
            if stop_probing(&member) {
                return;
            }
            pause = PROBE_MIN;
            continue;
        }
        pause = (pause * 2).min(PROBE_MAX);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoints(urls: &[&str]) -> Endpoints {
        let mut config = ClientConfig::new(urls.join(","));
        config.timeout = Duration::from_millis(200);
        Endpoints::new(Arc::new(config)).unwrap()
    }

    #[tokio::test]
    async fn picks_spread_over_members_and_favour_the_less_busy() {
        let endpoints = endpoints(&[
            "http://127.0.0.1:1",
            "http://127.0.0.1:2",
            "http://127.0.0.1:3",
        ]);
        let mut counts = [0usize; 3];
        for _ in 0..300 {
            let member = endpoints.pick(&[]);
            counts[member.target] += 1;
        }
        assert!(counts.iter().all(|&c| c > 50), "{counts:?}");
        // A member with calls in flight loses every draw it is in.
        let busy = endpoints.pick(&[]);
        let _guards: Vec<InFlight> = (0..5).map(|_| busy.start()).collect();
        // The two members drawn always differ, so the busy one is never the less busy.
        for _ in 0..100 {
            assert!(!Arc::ptr_eq(&endpoints.pick(&[]), &busy));
        }
    }

    #[tokio::test]
    async fn ejected_members_are_skipped_until_every_member_is_out() {
        let endpoints = endpoints(&["http://127.0.0.1:1", "http://127.0.0.1:2"]);
        let first = endpoints.pick(&[]);
        endpoints.eject(&first, &ClientError::Unavailable("down".into()));
        for _ in 0..50 {
            assert!(!Arc::ptr_eq(&endpoints.pick(&[]), &first));
        }
        let second = endpoints.pick(&[]);
        endpoints.eject(&second, &ClientError::Unavailable("down".into()));
        // All out: calls still go somewhere.
        let both: Vec<bool> = endpoints.states().iter().map(|s| s.healthy).collect();
        assert_eq!(both, [false, false]);
        let _ = endpoints.pick(&[]);
        // An answer brings a member back.
        endpoints.answered(&first);
        assert!(Arc::ptr_eq(&endpoints.pick(&[]), &first));
        // What was tried is avoided while something else is left.
        assert!(Arc::ptr_eq(
            &endpoints.pick(std::slice::from_ref(&first)),
            &second
        ));
        assert!(endpoints.has_untried(std::slice::from_ref(&first)));
        assert!(!endpoints.has_untried(&[first.clone(), second.clone()]));
    }

    #[tokio::test]
    async fn a_name_becomes_one_member_per_address() {
        let mut config = ClientConfig::new("http://localhost:7");
        config.resolve_interval = Duration::from_secs(3600);
        let endpoints = Endpoints::new(Arc::new(config)).unwrap();
        endpoints.shared.resolve().await;
        let states = endpoints.states();
        assert!(!states.is_empty());
        for state in &states {
            assert!(state.label.starts_with("http://localhost:7 ("), "{state:?}");
        }
        // Resolving again keeps the same members (and their connections).
        let before = endpoints.shared.members.read().clone();
        endpoints.shared.resolve().await;
        let after = endpoints.shared.members.read().clone();
        assert_eq!(before.len(), after.len());
        assert!(
            before
                .iter()
                .zip(after.iter())
                .all(|(a, b)| Arc::ptr_eq(a, b))
        );
    }
}
