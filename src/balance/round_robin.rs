//! Smooth weighted round-robin (the nginx algorithm), precomputed.
//!
//! The schedule of one period (sum of weights / their gcd) is computed when the upstream is
//! built, so a pick is one `fetch_add` and a table read. Because the schedule is periodic,
//! any run of sum-of-weights consecutive picks gives each backend exactly its weight, and
//! equal weights alternate strictly. A pick takes one start slot from the shared cursor
//! and walks the schedule from there on its own, so it considers every backend once
//! whatever other pickers do (SPEC 4: no 503 while a backend would accept); the cursor is
//! then moved past the slots it skipped, so the others keep their relative shares.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

use super::Balancer;
use crate::backend::Backend;

#[derive(Debug)]
pub struct RoundRobin {
    schedule: Box<[u32]>,
    cursor: AtomicUsize,
}

impl RoundRobin {
    pub fn new(weights: &[u32]) -> RoundRobin {
        let g = weights.iter().copied().fold(0, gcd).max(1);
        let weights: Vec<i64> = weights.iter().map(|&w| i64::from(w / g)).collect();
        let total: i64 = weights.iter().sum();
        let mut current = vec![0i64; weights.len()];
        let mut schedule = Vec::with_capacity(total as usize);
        for _ in 0..total {
            let mut best = 0;
            for i in 0..weights.len() {
                current[i] += weights[i];
                if current[i] > current[best] {
                    best = i;
                }
            }
            current[best] -= total;
            schedule.push(best as u32);
        }
        RoundRobin { schedule: schedule.into_boxed_slice(), cursor: AtomicUsize::new(0) }
    }
}

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 { a } else { gcd(b, a % b) }
}

impl Balancer for RoundRobin {
    fn pick(
        &self,
        backends: &[Arc<Backend>],
        _hash: u64,
        accept: &mut dyn FnMut(usize, &Backend) -> bool,
    ) -> Option<usize> {
        let len = self.schedule.len();
        let start = self.cursor.fetch_add(1, Relaxed);
        for skipped in 0..len {
            let idx = self.schedule[start.wrapping_add(skipped) % len] as usize;
            if accept(idx, &backends[idx]) {
                if skipped > 0 {
                    self.cursor.fetch_add(skipped, Relaxed);
                }
                return Some(idx);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balance::tests::backends;

    fn run(weights: &[u32], n: usize) -> Vec<usize> {
        let rr = RoundRobin::new(weights);
        let bs = backends(weights.len());
        (0..n).map(|_| rr.pick(&bs, 0, &mut |_, _| true).unwrap()).collect()
    }

    #[test]
    fn equal_weights_alternate_strictly() {
        assert_eq!(run(&[1, 1, 1], 7), vec![0, 1, 2, 0, 1, 2, 0]);
    }

    #[test]
    fn every_window_of_sum_of_weights_has_exact_shares() {
        let weights = [5, 1, 1, 3];
        let picks = run(&weights, 200);
        for window in picks.windows(10) {
            for (i, &w) in weights.iter().enumerate() {
                assert_eq!(window.iter().filter(|&&p| p == i).count(), w as usize, "{window:?}");
            }
        }
        // Smooth: the heavy backend is never picked three times in a row here.
        assert_eq!(&picks[..10], &[0, 3, 0, 1, 0, 3, 2, 0, 3, 0]);
    }

    #[test]
    fn refused_backends_are_skipped_and_others_keep_their_shares() {
        let rr = RoundRobin::new(&[1, 2, 1]);
        let bs = backends(3);
        let picks: Vec<usize> = (0..30).map(|_| rr.pick(&bs, 0, &mut |i, _| i != 1).unwrap()).collect();
        assert_eq!(picks.iter().filter(|&&p| p == 0).count(), 15);
        assert_eq!(picks.iter().filter(|&&p| p == 2).count(), 15);
        assert_eq!(rr.pick(&bs, 0, &mut |_, _| false), None);
    }

    #[test]
    fn a_pick_tries_every_backend_however_pickers_interleave() {
        // Two backends, the first refused. Each pick's refusal lets another picker advance
        // the cursor in between: with a shared cursor walked per try, a pick could land on
        // the refused slot every time and give up.
        let rr = Arc::new(RoundRobin::new(&[1, 1]));
        let bs = Arc::new(backends(2));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let (rr, bs) = (rr.clone(), bs.clone());
                std::thread::spawn(move || {
                    for _ in 0..20_000 {
                        let picked = rr.pick(&bs, 0, &mut |i, _| {
                            // Another picker moves the cursor while this one decides.
                            rr.cursor.fetch_add(1, Relaxed);
                            i == 1
                        });
                        assert_eq!(picked, Some(1));
                    }
                })
            })
            .collect();
        threads.into_iter().for_each(|t| t.join().unwrap());
    }
}
