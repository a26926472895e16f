//! Smooth weighted round-robin, nginx's algorithm: on every pick each candidate's `current`
//! grows by its weight, the largest `current` wins and loses the total. Weights 5:3:2 give
//! `a b a c a b a c b a`-like interleaving instead of `a a a a a b b b c c` bursts.
//!
//! Weights are read from [`Backend::weight`] on every pick, so an admin change takes effect on
//! the next request. What it loses: nothing ties a client to a backend, so sessions kept in a
//! backend's memory are lost on the next request that lands elsewhere; and it ignores load, so a
//! slow backend gets as many requests as a fast one.
//!
//! [`SmoothWeights`] is the bare algorithm over any candidate set; least-conn uses it to break
//! ties and static-rr to run it over build-time weights.

use std::sync::Arc;

use parking_lot::Mutex;

use super::{Balancer, RequestInfo};
use crate::backend::Backend;

/// nginx's smooth weighted round-robin state over positions in a backend list.
#[derive(Debug, Default)]
pub(crate) struct SmoothWeights {
    /// Each position's `current` weight (nginx `peer->current_weight`); grows on demand when
    /// asked about a longer list than it was built for.
    current: Mutex<Vec<i64>>,
}

impl SmoothWeights {
    /// State for a list of `len` backends.
    pub(crate) fn new(len: usize) -> Self {
        SmoothWeights {
            current: Mutex::new(vec![0; len]),
        }
    }

    /// Picks one of positions `0..len` for which `candidate` returns `Some(weight)`.
    ///
    /// A candidate with weight 0 only gets picked when every candidate has weight 0; they then
    /// count as weight 1 each, so a caller that allows only weight-0 backends still gets one.
    pub(crate) fn pick(
        &self,
        len: usize,
        candidate: impl Fn(usize) -> Option<u32>,
    ) -> Option<usize> {
        let mut any = false;
        let mut any_positive = false;
        for i in 0..len {
            if let Some(w) = candidate(i) {
                any = true;
                if w > 0 {
                    any_positive = true;
                    break;
                }
            }
        }
        if !any {
            return None;
        }
        let mut current = self.current.lock();
        if current.len() < len {
            current.resize(len, 0);
        }
        let mut total: i64 = 0;
        let mut best: Option<usize> = None;
        for i in 0..len {
            let Some(w) = candidate(i) else { continue };
            let weight = if any_positive { i64::from(w) } else { 1 };
            if weight == 0 {
                continue;
            }
            current[i] += weight;
            total += weight;
            if best.is_none_or(|b| current[i] > current[b]) {
                best = Some(i);
            }
        }
        if let Some(b) = best {
            current[b] -= total;
        }
        best
    }
}

/// Smooth weighted round-robin over the live weights ([`BalanceMode::RoundRobin`]).
///
/// [`BalanceMode::RoundRobin`]: super::BalanceMode::RoundRobin
#[derive(Debug, Default)]
pub struct RoundRobin {
    /// The algorithm's per-backend state.
    weights: SmoothWeights,
}

impl RoundRobin {
    /// A round-robin balancer for a list of `len` backends.
    pub fn new(len: usize) -> Self {
        RoundRobin {
            weights: SmoothWeights::new(len),
        }
    }

    /// The pick, without a request (the hashing balancers' fallback).
    pub(crate) fn next(
        &self,
        backends: &[Arc<Backend>],
        usable: &dyn Fn(&Backend) -> bool,
    ) -> Option<usize> {
        self.weights.pick(backends.len(), |i| {
            usable(&backends[i]).then(|| backends[i].weight())
        })
    }
}

impl Balancer for RoundRobin {
    fn pick(
        &self,
        _request: &RequestInfo<'_>,
        backends: &[Arc<Backend>],
        usable: &dyn Fn(&Backend) -> bool,
    ) -> Option<usize> {
        self.next(backends, usable)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smooth_sequence_matches_nginx_for_5_1_1() {
        // nginx's documented example: weights 5, 1, 1 give a a b a c a a.
        let w = SmoothWeights::new(3);
        let weights = [5, 1, 1];
        let seq: Vec<usize> = (0..7)
            .filter_map(|_| w.pick(3, |i| Some(weights[i])))
            .collect();
        assert_eq!(seq, [0, 0, 1, 0, 2, 0, 0]);
    }

    #[test]
    fn weight_zero_only_when_nothing_else() {
        let w = SmoothWeights::new(3);
        let weights = [0, 2, 0];
        assert!((0..10).all(|_| w.pick(3, |i| Some(weights[i])) == Some(1)));
        let picks: Vec<_> = (0..4)
            .filter_map(|_| w.pick(3, |i| (i != 1).then_some(0)))
            .collect();
        assert_eq!(picks, [0, 2, 0, 2]);
        assert_eq!(w.pick(3, |_| None), None);
    }
}
