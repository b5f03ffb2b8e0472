//! Least connections: the backend with the fewest in-flight requests per unit of weight.
//! The scan starts one place further on each pick, so ties rotate instead of piling onto
//! the first backend.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

use super::Balancer;
use crate::backend::Backend;

#[derive(Debug)]
pub struct LeastConnections {
    weights: Box<[u32]>,
    start: AtomicUsize,
}

impl LeastConnections {
    pub fn new(weights: &[u32]) -> LeastConnections {
        LeastConnections { weights: weights.into(), start: AtomicUsize::new(0) }
    }
}

impl Balancer for LeastConnections {
    fn pick(&self, backends: &[Arc<Backend>], accept: &mut dyn FnMut(usize, &Backend) -> bool) -> Option<usize> {
        let n = backends.len();
        let start = self.start.fetch_add(1, Relaxed) % n.max(1);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balance::tests::backends;

    #[test]
    fn picks_fewest_inflight_per_weight() {
        let bs = backends(3);
        let lc = LeastConnections::new(&[1, 1, 4]);
        let _g1 = [bs[0].begin(), bs[0].begin()];
        let _g2 = [bs[2].begin(), bs[2].begin(), bs[2].begin()];
        // loads: 2/1, 0/1, 3/4 -> backend 1
        assert_eq!(lc.pick(&bs, &mut |_, _| true), Some(1));
        let _g3 = bs[1].begin();
        // loads: 2/1, 1/1, 3/4 -> backend 2
        assert_eq!(lc.pick(&bs, &mut |_, _| true), Some(2));
    }

    #[test]
    fn ties_rotate() {
        let bs = backends(3);
        let lc = LeastConnections::new(&[1, 1, 1]);
        let picks: Vec<usize> = (0..6).map(|_| lc.pick(&bs, &mut |_, _| true).unwrap()).collect();
        assert_eq!(picks, vec![0, 1, 2, 0, 1, 2]);
        assert_eq!(lc.pick(&bs, &mut |i, _| i == 2), Some(2));
        assert_eq!(lc.pick(&bs, &mut |_, _| false), None);
    }
}
