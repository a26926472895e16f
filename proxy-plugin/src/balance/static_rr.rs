//! Static weighted round-robin (HAProxy `static-rr`): the same smooth interleaving as
//! [`RoundRobin`](super::RoundRobin), but over the weights the backends had when the balancer
//! was built. A run-time weight change does not alter the rotation (a reload does); setting a
//! weight to 0 still drains a backend, because the proxy's `usable` predicate excludes it.
//!
//! What it loses: the same as round-robin (no affinity, blind to load), plus live re-weighting.
//! What it gains in HAProxy (no server-count limit, no recomputation) matters little here.

use std::sync::Arc;

use super::round_robin::SmoothWeights;
use super::{Balancer, RequestInfo};
use crate::backend::Backend;

/// Weighted round-robin over build-time weights ([`BalanceMode::StaticRr`]).
///
/// [`BalanceMode::StaticRr`]: super::BalanceMode::StaticRr
#[derive(Debug)]
pub struct StaticRr {
    /// Each backend's weight at build time, by position.
    weights: Vec<u32>,
    /// The algorithm's per-backend state.
    state: SmoothWeights,
}

impl StaticRr {
    /// A static round-robin over `backends` with their current weights frozen.
    pub fn new(backends: &[Arc<Backend>]) -> Self {
        StaticRr {
            weights: backends.iter().map(|b| b.weight()).collect(),
            state: SmoothWeights::new(backends.len()),
        }
    }
}

impl Balancer for StaticRr {
    fn pick(
        &self,
        _request: &RequestInfo<'_>,
        backends: &[Arc<Backend>],
        usable: &dyn Fn(&Backend) -> bool,
    ) -> Option<usize> {
        self.state.pick(backends.len(), |i| {
            let b = &backends[i];
            // A backend beyond the build-time list (should not happen) uses its live weight.
            usable(b).then(|| self.weights.get(i).copied().unwrap_or_else(|| b.weight()))
        })
    }
}
