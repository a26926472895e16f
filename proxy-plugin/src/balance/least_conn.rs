//! Least connections, weighted (nginx `least_conn`): the backend with the fewest requests in
//! flight per unit of weight, comparing `active_a * weight_b` with `active_b * weight_a` so no
//! division rounds anything away. Ties (e.g. every backend idle) go to smooth weighted
//! round-robin among the tied, as nginx does, so idle traffic still follows the weights.
//!
//! What it loses: no affinity (like round-robin); and it only sees this proxy's own requests,
//! so with several proxies, or with long-lived connections that carry few requests, the counts
//! understate a backend's real load.

use std::cmp::Ordering;
use std::sync::Arc;

use super::round_robin::SmoothWeights;
use super::{Balancer, RequestInfo};
use crate::backend::Backend;

/// Fewest in-flight requests per weight ([`BalanceMode::LeastConn`]).
///
/// [`BalanceMode::LeastConn`]: super::BalanceMode::LeastConn
#[derive(Debug, Default)]
pub struct LeastConn {
    /// Round-robin state for breaking ties.
    ties: SmoothWeights,
}

impl LeastConn {
    /// A least-conn balancer for a list of `len` backends.
    pub fn new(len: usize) -> Self {
        LeastConn {
            ties: SmoothWeights::new(len),
        }
    }
}

/// Compares the load of `a` and `b` (in-flight requests per weight); weights of 0 count as 1
/// when `weightless` (every candidate has weight 0).
pub(crate) fn compare_load(a: &Backend, b: &Backend, weightless: bool) -> Ordering {
    let weight = |x: &Backend| {
        if weightless {
            1
        } else {
            u128::from(x.weight())
        }
    };
    let (wa, wb) = (weight(a), weight(b));
    match (wa, wb) {
        (0, 0) => Ordering::Equal,
        (0, _) => Ordering::Greater,
        (_, 0) => Ordering::Less,
        _ => (a.active() as u128 * wb).cmp(&(b.active() as u128 * wa)),
    }
}

impl Balancer for LeastConn {
    fn pick(
        &self,
        _request: &RequestInfo<'_>,
        backends: &[Arc<Backend>],
        usable: &dyn Fn(&Backend) -> bool,
    ) -> Option<usize> {
        let candidates = || backends.iter().enumerate().filter(|(_, b)| usable(b));
        let weightless = candidates().all(|(_, b)| b.weight() == 0);
        let (least_position, least) =
            candidates().min_by(|(_, a), (_, b)| compare_load(a, b, weightless))?;
        // Snapshot the least loaded backend's counts: `active` moves under us, and a tie is
        // judged against this one snapshot.
        let (least_active, least_weight) = (least.active() as u128, u128::from(least.weight()));
        let tied = |b: &Backend| {
            if weightless {
                return b.active() as u128 == least_active;
            }
            let w = u128::from(b.weight());
            w > 0 && b.active() as u128 * least_weight == least_active * w
        };
        let picked = self.ties.pick(backends.len(), |i| {
            (usable(&backends[i]) && tied(&backends[i])).then(|| backends[i].weight())
        });
        // Counts changed between the two passes so nothing ties any more: take the least.
        picked.or(Some(least_position))
    }
}
