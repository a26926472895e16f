//! The ketama-style ring behind [`HashType::Consistent`]: each backend owns points on a 64-bit
//! circle, 160 per unit of weight, each point the SHA-256 of `name#j` (four 64-bit points per
//! digest, as ketama takes four from each MD5). A key hashes to a spot on the circle and belongs
//! to the first point clockwise whose backend is usable.
//!
//! Points depend only on the backend's name and weight, never on its position or on the other
//! backends, so removing one of N backends (down, or gone from a rebuilt list) moves only the
//! keys it owned, about 1/N of them, each to its clockwise neighbour on the ring (which spreads
//! them over all survivors). What it loses: the spread is statistical (a backend's share varies
//! by a few percent at 160 points per weight), and the ring costs memory and a binary search
//! per request.
//!
//! [`HashType::Consistent`]: super::HashType::Consistent

use std::sync::Arc;

use ring::digest::{SHA256, digest};

use crate::backend::Backend;

/// Points per unit of weight: ketama's 160 (40 digests of 4 points).
const POINTS_PER_WEIGHT: u64 = 160;
/// Bound on the whole ring (16 bytes a point, so about 3 MB): beyond it every backend's count is
/// scaled down in proportion, keeping the weights' ratios.
const MAX_POINTS: u64 = 200_000;

/// The ring of one backend list with the weights it had when built.
#[derive(Debug, Default)]
pub(crate) struct Ring {
    /// `(point, position in the backend list)`, sorted.
    points: Vec<(u64, usize)>,
    /// The names and weights it was built from, to notice a weight change or another list.
    built_from: Vec<(String, u32)>,
}

impl Ring {
    /// The ring for `backends` with their current weights (weight 0 owns no point).
    pub(crate) fn build(backends: &[Arc<Backend>]) -> Ring {
        let built_from: Vec<(String, u32)> = backends
            .iter()
            .map(|b| (b.name.clone(), b.weight()))
            .collect();
        let wanted: u64 = built_from
            .iter()
            .map(|(_, w)| u64::from(*w) * POINTS_PER_WEIGHT)
            .sum();
        let mut points = Vec::with_capacity(wanted.min(MAX_POINTS) as usize + backends.len());
        for (position, (name, weight)) in built_from.iter().enumerate() {
            let mut count = u64::from(*weight) * POINTS_PER_WEIGHT;
            if wanted > MAX_POINTS && count > 0 {
                count =
                    (u128::from(count) * u128::from(MAX_POINTS) / u128::from(wanted)).max(1) as u64;
            }
            let mut j = 0u64;
            while j * 4 < count {
                let d = digest(&SHA256, format!("{name}#{j}").as_bytes());
                for chunk in d
                    .as_ref()
                    .chunks_exact(8)
                    .take((count - j * 4).min(4) as usize)
                {
                    let mut bytes = [0u8; 8];
                    bytes.copy_from_slice(chunk);
                    points.push((u64::from_be_bytes(bytes), position));
                }
                j += 1;
            }
        }
        points.sort_unstable();
        Ring { points, built_from }
    }

    /// Whether it was built from these backends with these weights.
    pub(crate) fn is_current(&self, backends: &[Arc<Backend>]) -> bool {
        self.built_from.len() == backends.len()
            && self
                .built_from
                .iter()
                .zip(backends)
                .all(|((name, weight), b)| *weight == b.weight() && *name == b.name)
    }

    /// The first usable backend clockwise from `hash`, or `None` when no point's backend is.
    pub(crate) fn lookup(
        &self,
        hash: u64,
        backends: &[Arc<Backend>],
        usable: &dyn Fn(&Backend) -> bool,
    ) -> Option<usize> {
        let start = self.points.partition_point(|(point, _)| *point < hash);
        let (before, after) = self.points.split_at(start);
        // Each backend is asked once however many points it has on the way round; the list of
        // refusals is only allocated once one is refused (the common case asks one backend).
        let mut refused: Vec<bool> = Vec::new();
        for &(_, position) in after.iter().chain(before) {
            let Some(backend) = backends.get(position) else {
                continue;
            };
            if refused.get(position).copied().unwrap_or(false) {
                continue;
            }
            if usable(backend) {
                return Some(position);
            }
            if refused.is_empty() {
                refused = vec![false; backends.len()];
            }
            refused[position] = true;
            if refused.iter().all(|r| *r) {
                break;
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backends(weights: &[u32]) -> Vec<Arc<Backend>> {
        weights
            .iter()
            .enumerate()
            .map(|(i, &w)| Arc::new(Backend::new(i, format!("b{i}"), "127.0.0.1:1", w)))
            .collect()
    }

    #[test]
    fn points_follow_weights_and_the_cap() {
        let ring = Ring::build(&backends(&[1, 2, 0]));
        let count = |p| ring.points.iter().filter(|(_, q)| *q == p).count();
        assert_eq!((count(0), count(1), count(2)), (160, 320, 0));
        let big = Ring::build(&backends(&[1000, 1000, 1]));
        assert!(big.points.len() as u64 <= MAX_POINTS + 3);
        assert!(
            big.points.iter().any(|(_, p)| *p == 2),
            "a positive weight keeps a point"
        );
    }

    #[test]
    fn a_backend_keeps_its_points_when_others_leave() {
        let all = backends(&[1, 1, 1]);
        let ring = Ring::build(&all);
        let fewer = Ring::build(&all[1..]);
        let names = |r: &Ring, list: &[Arc<Backend>]| -> Vec<(u64, String)> {
            let mut v: Vec<_> = r
                .points
                .iter()
                .filter(|(_, p)| list[*p].name != "b0")
                .map(|(h, p)| (*h, list[*p].name.clone()))
                .collect();
            v.sort();
            v
        };
        assert_eq!(names(&ring, &all), names(&fewer, &all[1..]));
        assert!(ring.is_current(&all) && !ring.is_current(&all[1..]));
        all[0].set_weight(2);
        assert!(!ring.is_current(&all));
    }
}
