//! Consistent hashing on a ring (Karger et al.; ketama's and nginx's `hash ... consistent`):
//! each backend owns points in proportion to its weight, a request goes to the owner of the
//! first point at or after its key's hash, and when that backend refuses (down, capped,
//! already tried) to the owner of the next point that accepts.
//!
//! A backend's points depend on its URL alone, so a reload that keeps a backend keeps its
//! keys, and adding or removing one of n backends moves only about 1/n of them: those the
//! new one's points take, or those of the one that went.
//!
//! The hash is XXH3 (64 bits): its output is specified and stable across versions and
//! machines, so balancers that share a config agree on every key, after restarts and
//! upgrades too; it is also one of the fastest on short keys. Std's `DefaultHasher` makes
//! no such promise across Rust releases.

use std::sync::Arc;

use xxhash_rust::xxh3::{xxh3_64, xxh3_64_with_seed};

use super::Balancer;
use crate::backend::Backend;

/// Points per unit of weight (ketama's and nginx's 160): each backend's share of the keys
/// is then within about 8% of its weight's.
const POINTS_PER_WEIGHT: u64 = 160;
/// The most points in one ring (12 bytes each, and a 4-byte slice start per 4 points):
/// past it, each backend's count is scaled down in proportion (at least one), so 10,000
/// backends take 13 MiB, not 21.
const MAX_POINTS: u64 = 1 << 20;
/// Refused backends remembered while walking the ring; past them, a plain scan.
const WALK_MEMORY: usize = 16;

/// The hash a request's key is placed on the ring by.
#[inline]
pub fn hash_of(key: &[u8]) -> u64 {
    xxh3_64(key)
}

#[derive(Debug)]
pub struct ConsistentHash {
    /// The points' positions, ascending.
    points: Box<[u64]>,
    /// The backend (index) that owns each point.
    owners: Box<[u32]>,
    /// The first point of each of 2^k equal slices of the hash space (and `points.len()`
    /// at the end): a pick searches its slice only, instead of a binary search with a
    /// cache miss per level (288 ns a pick with 10,000 backends).
    slices: Box<[u32]>,
    /// 64 - k: a hash's slice is `hash >> shift`.
    shift: u32,
}

impl ConsistentHash {
    /// The ring of backends named by `urls`, with their `weights`.
    pub fn new<'a>(urls: impl Iterator<Item = &'a str>, weights: &[u32]) -> ConsistentHash {
        let total: u64 = weights.iter().map(|&w| u64::from(w)).sum();
        let count = |w: u32| {
            let w = u64::from(w);
            if total * POINTS_PER_WEIGHT <= MAX_POINTS {
                w * POINTS_PER_WEIGHT
            } else {
                (w * MAX_POINTS / total).max(1)
            }
        };
        let mut ring: Vec<(u64, u32)> = Vec::new();
        for (i, (url, &w)) in urls.zip(weights).enumerate() {
            // Point k of a backend is the same in every ring it is part of.
            ring.extend((0..count(w)).map(|k| (xxh3_64_with_seed(url.as_bytes(), k), i as u32)));
        }
        ring.sort_unstable();
        let points: Box<[u64]> = ring.iter().map(|p| p.0).collect();
        // About four points per slice: searched within one or two cache lines.
        let k = points.len().next_power_of_two().trailing_zeros().saturating_sub(2).clamp(1, 20);
        let shift = 64 - k;
        let slices = (0..=1u64 << k)
            .map(|s| if s < 1 << k { points.partition_point(|&p| p < s << shift) } else { points.len() } as u32)
            .collect();
        ConsistentHash { points, owners: ring.iter().map(|p| p.1).collect(), slices, shift }
    }

    /// The first point at or after `hash`, going round.
    fn first_point(&self, hash: u64) -> usize {
        let slice = (hash >> self.shift) as usize;
        let (from, to) = (self.slices[slice] as usize, self.slices[slice + 1] as usize);
        let i = from + self.points[from..to].partition_point(|&p| p < hash);
        if i == self.points.len() { 0 } else { i }
    }
}

impl Balancer for ConsistentHash {
    fn pick(
        &self,
        backends: &[Arc<Backend>],
        hash: u64,
        accept: &mut dyn FnMut(usize, &Backend) -> bool,
    ) -> Option<usize> {
        let len = self.points.len();
        if len == 0 {
            return None;
        }
        let mut refused = [0u32; WALK_MEMORY];
        let mut n_refused = 0;
        let mut at = self.first_point(hash);
        for _ in 0..len {
            let owner = self.owners[at];
            at = if at + 1 == len { 0 } else { at + 1 };
            if refused[..n_refused].contains(&owner) {
                continue;
            }
            if accept(owner as usize, &backends[owner as usize]) {
                return Some(owner as usize);
            }
            if n_refused == WALK_MEMORY {
                // Many backends refuse: the rest in index order after this one, each once.
                let n = backends.len();
                return (1..n)
                    .map(|k| (owner as usize + k) % n)
                    .filter(|&i| !refused.contains(&(i as u32)))
                    .find(|&i| accept(i, &backends[i]));
            }
            refused[n_refused] = owner;
            n_refused += 1;
            if n_refused == backends.len() {
                return None;
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balance::tests::backends;

    fn ring(n: usize) -> (Vec<Arc<Backend>>, ConsistentHash) {
        let bs = backends(n);
        let ch = ConsistentHash::new(bs.iter().map(|b| &*b.url), &vec![1; n]);
        (bs, ch)
    }

    fn owners(bs: &[Arc<Backend>], ch: &ConsistentHash, keys: usize) -> Vec<Arc<str>> {
        let key = |k: usize| hash_of(format!("user-{k}").as_bytes());
        (0..keys).map(|k| bs[ch.pick(bs, key(k), &mut |_, _| true).unwrap()].url.clone()).collect()
    }

    #[test]
    fn the_same_key_lands_on_the_same_backend() {
        let (bs, ch) = ring(5);
        let again = ConsistentHash::new(bs.iter().map(|b| &*b.url), &[1; 5]);
        assert_eq!(owners(&bs, &ch, 1000), owners(&bs, &again, 1000));
    }

    #[test]
    fn keys_spread_in_proportion_to_weight() {
        let bs = backends(4);
        let ch = ConsistentHash::new(bs.iter().map(|b| &*b.url), &[1, 1, 1, 3]);
        let mut counts = [0usize; 4];
        for k in 0..60_000u64 {
            counts[ch.pick(&bs, hash_of(&k.to_le_bytes()), &mut |_, _| true).unwrap()] += 1;
        }
        for (i, &c) in counts.iter().enumerate() {
            let expected = if i == 3 { 30_000.0 } else { 10_000.0 };
            assert!((c as f64 - expected).abs() / expected < 0.15, "{counts:?}");
        }
    }

    #[test]
    fn adding_a_fourth_backend_moves_a_quarter_of_the_keys_and_only_to_it() {
        let (three, before) = ring(3);
        let (four, after) = ring(4);
        let (a, b) = (owners(&three, &before, 1000), owners(&four, &after, 1000));
        let moved: Vec<usize> = (0..1000).filter(|&k| a[k] != b[k]).collect();
        assert!((150..=350).contains(&moved.len()), "{} moved", moved.len());
        assert!(moved.iter().all(|&k| b[k] == four[3].url), "a key moved between old backends");
    }

    #[test]
    fn removing_a_backend_moves_only_its_keys() {
        let (four, before) = ring(4);
        let three: Vec<Arc<Backend>> = four[..3].to_vec();
        let after = ConsistentHash::new(three.iter().map(|b| &*b.url), &[1; 3]);
        let (a, b) = (owners(&four, &before, 1000), owners(&three, &after, 1000));
        for k in 0..1000 {
            assert!(a[k] == b[k] || a[k] == four[3].url, "key {k} moved from {} to {}", a[k], b[k]);
        }
    }

    #[test]
    fn a_refused_backend_gives_its_keys_to_the_next_point_as_if_removed() {
        let (four, ch) = ring(4);
        let three = ConsistentHash::new(four[..3].iter().map(|b| &*b.url), &[1; 3]);
        for k in 0..1000u64 {
            let h = hash_of(&k.to_le_bytes());
            let down = ch.pick(&four, h, &mut |i, _| i != 3).unwrap();
            assert_eq!(Some(down), three.pick(&four[..3], h, &mut |_, _| true));
        }
        assert_eq!(ch.pick(&four, 7, &mut |_, _| false), None);
    }

    #[test]
    fn many_refusals_still_find_the_one_that_accepts() {
        let (bs, ch) = ring(100);
        for k in 0..200u64 {
            assert_eq!(ch.pick(&bs, hash_of(&k.to_le_bytes()), &mut |i, _| i == 42), Some(42));
        }
        assert_eq!(ch.pick(&bs, 1, &mut |_, _| false), None);
    }

    #[test]
    fn the_slices_find_the_point_a_binary_search_finds() {
        for n in [1, 2, 3, 100, 1000] {
            let (_, ch) = ring(n);
            let mut h: u64 = 0x9e37_79b9_7f4a_7c15;
            for _ in 0..10_000 {
                h = h.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                let plain = ch.points.partition_point(|&p| p < h);
                assert_eq!(ch.first_point(h), if plain == ch.points.len() { 0 } else { plain });
            }
            assert_eq!(ch.first_point(u64::MAX), ch.points.partition_point(|&p| p < u64::MAX) % ch.points.len());
            assert_eq!(ch.first_point(0), 0);
        }
    }

    #[test]
    fn a_large_ring_is_capped() {
        let bs = backends(10_000);
        let ch = ConsistentHash::new(bs.iter().map(|b| &*b.url), &vec![1; 10_000]);
        assert!(ch.points.len() as u64 <= MAX_POINTS);
        assert!(ch.points.len() >= 10_000);
    }
}
