//! Least latency: the power of two choices (Mitzenmacher) over a peak-sensitive moving
//! average of each backend's response-head latency, as Finagle, linkerd and Envoy do.
//!
//! A pick draws two distinct backends at random, from a per-thread xorshift, and takes the
//! one with the lower latency estimate x (in-flight + 1) / weight. Comparing two random
//! backends, never all of them, is what keeps one fast backend from taking every request
//! at once (the herd a full scan makes) and costs the same for 2 or 10,000 backends. The
//! estimates live on the backends (`Backend::latency_estimate`): failures are recorded as a
//! penalty latency by the request path, so a backend that answers errors fast does not
//! look fast, and an estimate fades while the backend gets no traffic, so one that was
//! slow a minute ago is tried again.
//!
//! A backend without a sample yet borrows its rival's estimate (both without: equal), so
//! the pair is compared by load alone: a new backend gets its share without a rush of
//! every request to it before its first answer.

use std::cell::Cell;
use std::sync::Arc;

use super::Balancer;
use crate::backend::{Backend, clock};

#[derive(Debug)]
pub struct LeastLatency {
    weights: Box<[u32]>,
}

impl LeastLatency {
    pub fn new(weights: &[u32]) -> LeastLatency {
        LeastLatency { weights: weights.into() }
    }

    /// The better of backends `a` and `b` at `now`.
    fn better(&self, backends: &[Arc<Backend>], a: usize, b: usize, now: u64) -> usize {
        let (ea, eb) = (backends[a].latency_estimate(now), backends[b].latency_estimate(now));
        let (la, lb) = match (ea, eb) {
            (Some(x), Some(y)) => (x, y),
            (Some(x), None) => (x, x),
            (None, Some(y)) => (y, y),
            (None, None) => (1.0, 1.0),
        };
        let score =
            |latency: f64, i: usize| latency * (backends[i].inflight() as f64 + 1.0) / f64::from(self.weights[i]);
        if score(lb, b) < score(la, a) { b } else { a }
    }
}

impl Balancer for LeastLatency {
    fn pick(
        &self,
        backends: &[Arc<Backend>],
        _hash: u64,
        accept: &mut dyn FnMut(usize, &Backend) -> bool,
    ) -> Option<usize> {
        let n = backends.len();
        if n < 2 {
            return backends.first().and_then(|b| accept(0, b).then_some(0));
        }
        let r = random();
        let a = (r % n as u64) as usize;
        let b = ((r >> 32) % (n as u64 - 1)) as usize;
        let b = if b >= a { b + 1 } else { b };
        let (ok_a, ok_b) = (accept(a, &backends[a]), accept(b, &backends[b]));
        let (first, second) = if ok_a && ok_b {
            (a, Some(b))
        } else {
            // One or both refused: the first two that accept from `a` on, each asked once.
            let mut found = (0..n).map(|k| (a + k) % n).filter(|&i| {
                if i == a {
                    ok_a
                } else if i == b {
                    ok_b
                } else {
                    accept(i, &backends[i])
                }
            });
            (found.next()?, found.next())
        };
        Some(match second {
            Some(second) => self.better(backends, first, second, clock()),
            None => first,
        })
    }
}

/// A random number from a per-thread xorshift64, seeded from std's random hasher keys
/// (also the slow-start dice).
pub(super) fn random() -> u64 {
    thread_local!(static STATE: Cell<u64> = const { Cell::new(0) });
    STATE.with(|s| {
        let mut x = s.get();
        if x == 0 {
            use std::hash::BuildHasher;
            x = std::hash::RandomState::new().hash_one(std::thread::current().id()) | 1;
        }
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        s.set(x);
        x
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balance::tests::backends;
    use std::time::Duration;

    fn shares(ll: &LeastLatency, bs: &[Arc<Backend>], picks: usize) -> Vec<usize> {
        let mut counts = vec![0; bs.len()];
        for _ in 0..picks {
            counts[ll.pick(bs, 0, &mut |_, _| true).unwrap()] += 1;
        }
        counts
    }

    #[test]
    fn the_fast_backend_is_preferred() {
        let bs = backends(3);
        let now = clock();
        bs[0].record_latency(Duration::from_millis(50), now);
        bs[1].record_latency(Duration::from_millis(1), now);
        bs[2].record_latency(Duration::from_millis(2), now);
        let counts = shares(&LeastLatency::new(&[1, 1, 1]), &bs, 3000);
        // The slow one only ever wins against nothing: it is never picked.
        assert_eq!(counts[0], 0, "{counts:?}");
        // The fastest wins every pair it is in (2 of 3), the other the rest.
        assert!(counts[1] > 1800 && counts[2] > 800, "{counts:?}");
    }

    #[test]
    fn load_counts_against_latency() {
        let bs = backends(2);
        let now = clock();
        bs[0].record_latency(Duration::from_millis(1), now);
        bs[1].record_latency(Duration::from_millis(3), now);
        let ll = LeastLatency::new(&[1, 1]);
        assert_eq!(ll.pick(&bs, 0, &mut |_, _| true), Some(0));
        // 1 ms x 4 in flight is worse than 3 ms x 1.
        let _busy = [bs[0].begin(), bs[0].begin(), bs[0].begin()];
        assert_eq!(ll.pick(&bs, 0, &mut |_, _| true), Some(1));
    }

    #[test]
    fn without_samples_it_is_least_loaded_and_weighted() {
        let bs = backends(2);
        let ll = LeastLatency::new(&[1, 3]);
        let _busy = [bs[1].begin(), bs[1].begin(), bs[1].begin()];
        // (0 + 1) / 1 against (3 + 1) / 3.
        assert_eq!(ll.pick(&bs, 0, &mut |_, _| true), Some(0));
        // Borrowed estimate: a measured backend against a new one is compared by load.
        bs[0].record_latency(Duration::from_millis(5), clock());
        assert_eq!(ll.pick(&bs, 0, &mut |_, _| true), Some(0));
    }

    #[test]
    fn refusals_are_honoured_and_never_starve_the_one_left() {
        let bs = backends(50);
        let ll = LeastLatency::new(&[1; 50]);
        for _ in 0..500 {
            assert_eq!(ll.pick(&bs, 0, &mut |i, _| i == 17), Some(17));
            let p = ll.pick(&bs, 0, &mut |i, _| i % 10 == 3).unwrap();
            assert_eq!(p % 10, 3);
        }
        assert_eq!(ll.pick(&bs, 0, &mut |_, _| false), None);
        let one = backends(1);
        assert_eq!(ll.pick(&one, 0, &mut |_, _| true), Some(0));
    }

    #[test]
    fn both_candidates_are_drawn_evenly() {
        let bs = backends(4);
        let counts = shares(&LeastLatency::new(&[1; 4]), &bs, 8000);
        assert!(counts.iter().all(|&c| c > 1500), "{counts:?}");
    }
}
