//! Power of two random choices (nginx `random two least_conn`): draw two different backends
//! at random, each with probability proportional to its weight, and send the request to the one
//! with fewer requests in flight per weight (the first drawn on a tie, so idle traffic follows
//! the weights exactly). Two choices avoid both round-robin's blindness to load and least-conn's
//! herding, where every proxy sends its next request to the same momentarily idle backend.
//!
//! What it loses: no affinity; the spread is only statistical (small samples are uneven).
//!
//! The random numbers come from splitmix64 over an atomic counter seeded from
//! [`ring::rand::SystemRandom`]: lock-free, and not for anything secret.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use ring::rand::{SecureRandom, SystemRandom};

use super::least_conn::compare_load;
use super::{Balancer, RequestInfo};
use crate::backend::Backend;

/// splitmix64's increment (the golden ratio in 64-bit fixed point).
const GOLDEN_GAMMA: u64 = 0x9e37_79b9_7f4a_7c15;

/// Two weighted random choices, the less loaded wins ([`BalanceMode::Random`]).
///
/// [`BalanceMode::Random`]: super::BalanceMode::Random
#[derive(Debug)]
pub struct Random {
    /// splitmix64 state: each draw adds [`GOLDEN_GAMMA`] and mixes the result.
    state: AtomicU64,
}

impl Default for Random {
    fn default() -> Self {
        Self::new()
    }
}

impl Random {
    /// A random balancer seeded from the operating system.
    pub fn new() -> Self {
        let mut seed = [0u8; 8];
        // Should the OS refuse, a fixed seed still balances; it is only less unpredictable.
        let _ = SystemRandom::new().fill(&mut seed);
        Self::with_seed(u64::from_le_bytes(seed))
    }

    /// A random balancer with a fixed seed (reproducible tests).
    pub fn with_seed(seed: u64) -> Self {
        Random {
            state: AtomicU64::new(seed),
        }
    }

    /// The next 64 random bits.
    fn next_u64(&self) -> u64 {
        let mut z = self
            .state
            .fetch_add(GOLDEN_GAMMA, Ordering::Relaxed)
            .wrapping_add(GOLDEN_GAMMA);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A uniform number in `0..bound` (`bound > 0`), by multiply-shift (no modulo bias worth
    /// mentioning at 64 bits).
    fn below(&self, bound: u64) -> u64 {
        ((u128::from(self.next_u64()) * u128::from(bound)) >> 64) as u64
    }

    /// One weighted draw among the candidates other than `except`.
    fn draw(&self, candidates: &[(usize, u64)], except: Option<usize>) -> Option<usize> {
        let total: u64 = candidates
            .iter()
            .filter(|(i, _)| Some(*i) != except)
            .map(|(_, w)| w)
            .sum();
        if total == 0 {
            return None;
        }
        let mut r = self.below(total);
        for &(i, w) in candidates.iter().filter(|(i, _)| Some(*i) != except) {
            if r < w {
                return Some(i);
            }
            r -= w;
        }
        None
    }
}

impl Balancer for Random {
    fn pick(
        &self,
        _request: &RequestInfo<'_>,
        backends: &[Arc<Backend>],
        usable: &dyn Fn(&Backend) -> bool,
    ) -> Option<usize> {
        let mut candidates: Vec<(usize, u64)> = backends
            .iter()
            .enumerate()
            .filter(|(_, b)| usable(b))
            .map(|(i, b)| (i, u64::from(b.weight())))
            .collect();
        let weightless = candidates.iter().all(|(_, w)| *w == 0);
        if weightless {
            candidates.iter_mut().for_each(|(_, w)| *w = 1);
        }
        let first = self.draw(&candidates, None)?;
        let Some(second) = self.draw(&candidates, Some(first)) else {
            return Some(first);
        };
        if compare_load(&backends[second], &backends[first], weightless).is_lt() {
            Some(second)
        } else {
            Some(first)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn below_stays_in_range_and_covers_it() {
        let r = Random::with_seed(7);
        let mut seen = [0u32; 5];
        for _ in 0..5000 {
            let x = r.below(5);
            assert!(x < 5);
            seen[x as usize] += 1;
        }
        assert!(seen.iter().all(|&n| n > 800), "{seen:?}");
    }
}
