//! Least connections: the backend with the fewest in-flight requests per unit of weight;
//! among equals, the first at or after a start that moves one place on each pick, so ties
//! rotate instead of piling onto the first backend.
//!
//! The pick reads the upstream's [`LoadIndex`] (O(log n)). It scans every backend instead
//! (O(n), exact, the same answer) when the index's candidate is refused (a retry excluding
//! backends already tried, a health change racing the pick), when every backend is out,
//! when a backend out on passive checks may be due its trial, and on a runtime replaced by
//! a reload.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

use super::Balancer;
use crate::backend::Backend;
use crate::backend::{IndexSlot, LoadIndex};

#[derive(Debug)]
pub struct LeastConnections {
    weights: Box<[u32]>,
    start: AtomicUsize,
    index: Arc<LoadIndex>,
}

impl LeastConnections {
    /// Builds the index of `backends` and moves each backend's load into it.
    pub fn new(backends: &[Arc<Backend>], weights: &[u32]) -> LeastConnections {
        let index = Arc::new(LoadIndex::new(backends.len()));
        for (leaf, (b, &weight)) in backends.iter().zip(weights).enumerate() {
            b.set_index(Some(Arc::new(IndexSlot { index: index.clone(), leaf, weight })));
        }
        LeastConnections { weights: weights.into(), start: AtomicUsize::new(0), index }
    }

    /// The pick, with ties broken from `start`.
    fn pick_from(
        &self,
        start: usize,
        backends: &[Arc<Backend>],
        accept: &mut dyn FnMut(usize, &Backend) -> bool,
    ) -> Option<usize> {
        if self.index.is_retired() {
            return self.scan(start, backends, accept);
        }
        if self.index.trial_scan_due(|| backends.iter().any(|b| b.is_passive_out())) {
            return self.scan(start, backends, accept);
        }
        match self.index.least_from(start) {
            Some(i) if accept(i, &backends[i]) => Some(i),
            _ => self.scan(start, backends, accept),
        }
    }

    /// Every backend `accept` allows, compared exactly.
    fn scan(
        &self,
        start: usize,
        backends: &[Arc<Backend>],
        accept: &mut dyn FnMut(usize, &Backend) -> bool,
    ) -> Option<usize> {
        let n = backends.len();
        // (index, inflight, weight) of the best so far; compare a/wa < b/wb as a*wb < b*wa.
        let mut best: Option<(usize, u64, u64)> = None;
        for k in 0..n {
            let i = (start + k) % n;
            let b = &backends[i];
            if !accept(i, b) {
                continue;
            }
            let (load, w) = (b.inflight() as u64, u64::from(self.weights[i]));
            match best {
                Some((_, bl, bw)) if load * bw >= bl * w => {}
                _ => best = Some((i, load, w)),
            }
        }
        best.map(|(i, _, _)| i)
    }
}

impl Balancer for LeastConnections {
    fn pick(
        &self,
        backends: &[Arc<Backend>],
        _hash: u64,
        accept: &mut dyn FnMut(usize, &Backend) -> bool,
    ) -> Option<usize> {
        let start = self.start.fetch_add(1, Relaxed) % backends.len().max(1);
        self.pick_from(start, backends, accept)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balance::tests::backends;

    #[test]
    fn picks_fewest_inflight_per_weight() {
        let bs = backends(3);
        let lc = LeastConnections::new(&bs, &[1, 1, 4]);
        let _g1 = [bs[0].begin(), bs[0].begin()];
        let _g2 = [bs[2].begin(), bs[2].begin(), bs[2].begin()];
        // loads: 2/1, 0/1, 3/4 -> backend 1
        assert_eq!(lc.pick(&bs, 0, &mut |_, _| true), Some(1));
        let _g3 = bs[1].begin();
        // loads: 2/1, 1/1, 3/4 -> backend 2
        assert_eq!(lc.pick(&bs, 0, &mut |_, _| true), Some(2));
    }

    #[test]
    fn ties_rotate() {
        let bs = backends(3);
        let lc = LeastConnections::new(&bs, &[1, 1, 1]);
        let picks: Vec<usize> = (0..6).map(|_| lc.pick(&bs, 0, &mut |_, _| true).unwrap()).collect();
        assert_eq!(picks, vec![0, 1, 2, 0, 1, 2]);
        assert_eq!(lc.pick(&bs, 0, &mut |i, _| i == 2), Some(2));
        assert_eq!(lc.pick(&bs, 0, &mut |_, _| false), None);
    }

    /// The index's answer is the scan's, through random loads and health changes.
    #[test]
    fn the_index_picks_what_the_scan_picks() {
        let n = 37;
        let bs = backends(n);
        let weights: Vec<u32> = (0..n).map(|i| [1, 2, 3, 1000][i % 4]).collect();
        let lc = LeastConnections::new(&bs, &weights);
        let mut held: Vec<crate::backend::InflightGuard> = Vec::new();
        let mut x: u64 = 88172645463325252;
        for round in 0..2000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let i = (x % n as u64) as usize;
            match (x >> 40) % 8 {
                0..=3 => held.push(bs[i].begin()),
                4..=5 if !held.is_empty() => drop(held.swap_remove((x >> 20) as usize % held.len())),
                6 => bs[i].set_active_up(false, "test"),
                _ => bs[i].set_active_up(true, "test"),
            }
            let start = round % n;
            let healthy = &mut |_: usize, b: &Backend| b.is_healthy();
            // The index's own answer, not the pick that falls back to a scan on a refusal.
            assert_eq!(lc.index.least_from(start), lc.scan(start, &bs, healthy), "round {round}");
        }
    }

    #[test]
    fn a_down_backend_is_skipped_until_it_is_back() {
        let bs = backends(3);
        let lc = LeastConnections::new(&bs, &[1, 1, 1]);
        let _busy = [bs[0].begin(), bs[2].begin()];
        let healthy = &mut |_: usize, b: &Backend| b.is_healthy();
        assert_eq!(lc.pick(&bs, 0, healthy), Some(1));
        bs[1].set_active_up(false, "test");
        assert_ne!(lc.pick(&bs, 0, healthy), Some(1));
        bs[1].set_active_up(true, "test");
        assert_eq!(lc.pick(&bs, 0, healthy), Some(1));
    }

    #[test]
    fn a_backend_out_on_passive_checks_is_offered_its_trial() {
        use crate::backend::Admission;
        use crate::config::PassiveConfig;
        let passive = PassiveConfig {
            max_fails: 1,
            fail_timeout: std::time::Duration::from_millis(30),
            max_ejected_percent: 100,
        };
        let bs = backends(3);
        let lc = LeastConnections::new(&bs, &[1, 1, 1]);
        let _busy = [bs[0].begin(), bs[2].begin()];
        let mut offered = |_: usize, b: &Backend| b.admission(&passive) != Admission::Closed;
        {
            let _attempt = bs[1].begin();
            bs[1].record_failure(&passive, false, &"refused", || true);
        }
        assert_ne!(lc.pick(&bs, 0, &mut offered), Some(1), "out");
        std::thread::sleep(std::time::Duration::from_millis(100));
        assert_eq!(lc.pick(&bs, 0, &mut offered), Some(1), "due its trial: the least loaded");
    }

    /// The trial's response may last (a stream, a tunnel): the backend is back in the
    /// index when its head arrives, not when it ends.
    #[test]
    fn a_backend_is_back_in_the_index_once_its_trial_answers() {
        use crate::backend::Admission;
        use crate::config::PassiveConfig;
        let passive = PassiveConfig {
            max_fails: 1,
            fail_timeout: std::time::Duration::from_millis(20),
            max_ejected_percent: 100,
        };
        let bs = backends(3);
        let lc = LeastConnections::new(&bs, &[1, 1, 1]);
        let _busy = [bs[0].begin(), bs[0].begin(), bs[2].begin(), bs[2].begin()];
        bs[1].begin();
        bs[1].record_failure(&passive, false, &"refused", || true);
        std::thread::sleep(std::time::Duration::from_millis(60));
        let Admission::Trial(seen) = bs[1].admission(&passive) else { panic!("no trial offered") };
        assert!(bs[1].claim_trial(seen));
        let _trial = bs[1].begin();
        bs[1].record_response(true);
        // Loads 2, 1 (the trial, still streaming), 2.
        assert_eq!(lc.index.least_from(1), Some(1));
    }

    #[test]
    fn an_index_replaced_by_a_reload_still_picks_right() {
        let bs = backends(3);
        let old = LeastConnections::new(&bs, &[1, 1, 1]);
        let _new = LeastConnections::new(&bs, &[1, 1, 1]);
        let _busy = [bs[0].begin(), bs[1].begin()];
        assert_eq!(old.pick(&bs, 0, &mut |_, _| true), Some(2));
    }
}
