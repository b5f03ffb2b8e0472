//! Smooth weighted round-robin (the nginx algorithm), precomputed.
//! (Equal weights are simply in order; a large upstream with mixed weights, where nginx's
//! order would take period x backends steps to build, gets the same shares spread evenly.)
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
        let weights: Vec<u32> = weights.iter().map(|&w| w / g).collect();
        let total: u64 = weights.iter().map(|&w| u64::from(w)).sum();
        let schedule = if total == weights.len() as u64 {
            // Equal weights: nginx's algorithm visits the backends in order.
            (0..weights.len() as u32).collect()
        } else if total * weights.len() as u64 <= NGINX_STEPS {
            nginx_schedule(&weights, total)
        } else {
            spread_schedule(&weights)
        };
        RoundRobin { schedule, cursor: AtomicUsize::new(0) }
    }
}

/// Above this many steps (period x backends), building nginx's exact order would hold up
/// a reload; [`spread_schedule`] is used instead.
const NGINX_STEPS: u64 = 4_000_000;

/// nginx's smooth weighted round-robin, one period of it: each step, every backend gains
/// its weight and the richest (first among equals) is picked and pays the total.
fn nginx_schedule(weights: &[u32], total: u64) -> Box<[u32]> {
    let total = total as i64;
    let mut current = vec![0i64; weights.len()];
    let mut schedule = Vec::with_capacity(total as usize);
    for _ in 0..total {
        let mut best = 0;
        for (i, &w) in weights.iter().enumerate() {
            current[i] += i64::from(w);
            if current[i] > current[best] {
                best = i;
            }
        }
        current[best] -= total;
        schedule.push(best as u32);
    }
    schedule.into_boxed_slice()
}

/// The same shares, as evenly spread, for large upstreams with mixed weights: a backend of
/// weight `w` is due once in each of `w` equal parts of the period, at the same point of
/// each (backends' points spread by the golden ratio, so that thousands of them are not
/// due at once), and the picks follow in order of when they are due (`O(total log total)`).
fn spread_schedule(weights: &[u32]) -> Box<[u32]> {
    let mut due: Vec<(f64, u32)> = weights
        .iter()
        .enumerate()
        .flat_map(|(i, &w)| {
            let phase = (i as f64 * 0.618_033_988_749_895).fract();
            (0..w).map(move |k| ((f64::from(k) + phase) / f64::from(w), i as u32))
        })
        .collect();
    due.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    due.into_iter().map(|(_, i)| i).collect()
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
    fn large_mixed_upstreams_get_exact_evenly_spread_shares() {
        let weights: Vec<u32> = (0..10_000).map(|i| 1 + i % 7).collect();
        let total: usize = weights.iter().map(|&w| w as usize).sum();
        assert!(total as u64 * weights.len() as u64 > NGINX_STEPS);
        let rr = RoundRobin::new(&weights);
        assert_eq!(rr.schedule.len(), total);
        let mut seen = vec![Vec::new(); weights.len()];
        for (at, &i) in rr.schedule.iter().enumerate() {
            seen[i as usize].push(at);
        }
        for (i, at) in seen.iter().enumerate() {
            assert_eq!(at.len(), weights[i] as usize, "backend {i}");
            // Spread: consecutive picks of one backend about total / weight apart.
            let even = total / weights[i] as usize;
            for pair in at.windows(2) {
                assert!((pair[1] - pair[0]).abs_diff(even) <= even / 4, "backend {i}: {at:?}");
            }
        }
        // Equal weights, however many: in order.
        assert_eq!(&*RoundRobin::new(&[3; 10_000]).schedule, &(0..10_000).collect::<Vec<u32>>()[..]);
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
