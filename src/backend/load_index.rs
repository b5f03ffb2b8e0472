//! An upstream's backends indexed by load, so least-connections finds the least loaded
//! backend in O(log n) instead of scanning them all.
//!
//! A min-tree of atomics: leaf `i` holds backend `i`'s key (in-flight requests per unit of
//! weight, or [`OUT`] while it may not be picked), each inner node the least key below it.
//! A backend rewrites its leaf and the nodes above it whenever its in-flight count or its
//! health changes (`Backend::begin`, the in-flight guard's drop, the health verdicts), so
//! neither picking nor counting takes a lock.
//!
//! Writers race only on inner nodes. Each writer re-reads a node's two children after
//! storing it and redoes the node if they moved, and goes on upwards only when the node's
//! value changed; so once the writes stop, every node holds the least key below it.
//! During a burst of writes a pick may see a key a few requests old, as a scan would.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed, Ordering::SeqCst};
use std::time::Instant;

use crate::config::MAX_WEIGHT;

/// The key of a backend that may not be picked now (down, or out on passive checks).
pub const OUT: u64 = u64::MAX;

/// `in_flight / weight` is stored as `(in_flight << SHIFT) / weight`. Two different
/// fractions with weights up to `MAX_WEIGHT` differ by at least `1 / MAX_WEIGHT²`, which
/// this scale keeps above 1: the integer keys order backends exactly as the fractions do.
const SHIFT: u32 = 20;
const _: () = assert!((MAX_WEIGHT as u64) * (MAX_WEIGHT as u64) <= 1 << SHIFT);

/// How often, at most, a pick scans every backend while one is out on passive checks
/// (out backends are [`OUT`] in the tree, so only a scan can offer them their trial).
const TRIAL_SCAN_EVERY_MS: u64 = 50;

#[derive(Debug)]
pub struct LoadIndex {
    /// The number of leaves: a power of two, at least the number of backends. Node 1 is
    /// the root, node `k`'s children are `2k` and `2k + 1`, leaf `i` is node `width + i`.
    width: usize,
    nodes: Box<[AtomicU64]>,
    /// Set when a reload built another index for these backends: they no longer write to
    /// this one, and a request still on the old runtime scans instead.
    retired: AtomicBool,
    /// Set by a backend that went out on passive checks; cleared by the trial scan, which
    /// sets it again for each backend it finds still out.
    passive_out: AtomicBool,
    epoch: Instant,
    /// Milliseconds since `epoch` before which no trial scan starts.
    next_trial_scan: AtomicU64,
}

/// A backend's place in an index: what `Backend` holds to keep its leaf current.
#[derive(Debug)]
pub struct IndexSlot {
    pub index: std::sync::Arc<LoadIndex>,
    pub leaf: usize,
    pub weight: u32,
}

impl IndexSlot {
    /// Writes this backend's leaf: its load when it may be picked, [`OUT`] when not.
    pub fn store(&self, in_flight: usize, pickable: bool) {
        let key = if pickable { ((in_flight as u64) << SHIFT) / u64::from(self.weight) } else { OUT };
        self.index.set(self.leaf, key);
    }
}

impl LoadIndex {
    /// An index of `n` backends, all [`OUT`] until their backends write their leaves.
    pub fn new(n: usize) -> LoadIndex {
        let width = n.next_power_of_two().max(1);
        LoadIndex {
            width,
            nodes: (0..2 * width).map(|_| AtomicU64::new(OUT)).collect(),
            retired: AtomicBool::new(false),
            passive_out: AtomicBool::new(false),
            epoch: Instant::now(),
            next_trial_scan: AtomicU64::new(0),
        }
    }

    fn set(&self, leaf: usize, key: u64) {
        let mut node = self.width + leaf;
        if self.nodes[node].swap(key, SeqCst) == key {
            return;
        }
        while node > 1 {
            node /= 2;
            let (left, right) = (&self.nodes[2 * node], &self.nodes[2 * node + 1]);
            let mut changed = false;
            loop {
                let (l, r) = (left.load(SeqCst), right.load(SeqCst));
                changed |= self.nodes[node].swap(l.min(r), SeqCst) != l.min(r);
                if left.load(SeqCst) == l && right.load(SeqCst) == r {
                    break;
                }
            }
            if !changed {
                return;
            }
        }
    }

    /// The backend with the least key, the first at or after `start` (wrapping) among
    /// equals so that ties rotate; `None` when every backend is [`OUT`], or (rarely) when
    /// concurrent writes moved the least key during the descent.
    pub fn least_from(&self, start: usize) -> Option<usize> {
        let least = self.nodes[1].load(SeqCst);
        if least == OUT {
            return None;
        }
        self.first_at_most(1, 0, self.width, start, least).or_else(|| self.first_at_most(1, 0, self.width, 0, least))
    }

    /// The first leaf at or after `from` under `node` (which spans leaves `lo..hi`) with a
    /// key at most `max`. O(log n): only nodes on the boundary at `from` are left unfinished.
    fn first_at_most(&self, node: usize, lo: usize, hi: usize, from: usize, max: u64) -> Option<usize> {
        if hi <= from || self.nodes[node].load(SeqCst) > max {
            return None;
        }
        if node >= self.width {
            return Some(lo);
        }
        let mid = (lo + hi) / 2;
        self.first_at_most(2 * node, lo, mid, from, max)
            .or_else(|| self.first_at_most(2 * node + 1, mid, hi, from, max))
    }

    pub fn retire(&self) {
        self.retired.store(true, Relaxed);
    }

    pub fn is_retired(&self) -> bool {
        self.retired.load(Relaxed)
    }

    /// A backend of this index is out on passive checks and will be due a trial.
    pub fn note_passive_out(&self) {
        self.passive_out.store(true, SeqCst);
    }

    /// True for one pick at most every [`TRIAL_SCAN_EVERY_MS`] while a backend may be out
    /// on passive checks; that pick must scan. `still_out` says whether any backend is
    /// out now: if none is, scans stop until one goes out again.
    pub fn trial_scan_due(&self, still_out: impl FnOnce() -> bool) -> bool {
        if !self.passive_out.load(Relaxed) {
            return false;
        }
        let now = self.epoch.elapsed().as_millis() as u64;
        let next = self.next_trial_scan.load(Relaxed);
        if now < next
            || self.next_trial_scan.compare_exchange(next, now + TRIAL_SCAN_EVERY_MS, Relaxed, Relaxed).is_err()
        {
            return false;
        }
        self.passive_out.store(false, SeqCst);
        // The reads of the backends' state must not move before this clear, or a backend
        // ejected meanwhile could set the flag just before it is cleared, unseen.
        std::sync::atomic::fence(SeqCst);
        if still_out() {
            self.note_passive_out();
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn slots(weights: &[u32]) -> Vec<IndexSlot> {
        let index = Arc::new(LoadIndex::new(weights.len()));
        weights.iter().enumerate().map(|(leaf, &weight)| IndexSlot { index: index.clone(), leaf, weight }).collect()
    }

    /// Every inner node holds the least of its children.
    fn assert_consistent(index: &LoadIndex) {
        for k in 1..index.width {
            let (l, r) = (index.nodes[2 * k].load(SeqCst), index.nodes[2 * k + 1].load(SeqCst));
            assert_eq!(index.nodes[k].load(SeqCst), l.min(r), "node {k}");
        }
    }

    #[test]
    fn keys_order_exactly_as_load_per_weight() {
        // 999/1000 < 1/1 and 1/1 == 1000/1000, at the extremes of the weights allowed.
        let s = slots(&[1000, 1, 1000]);
        s[0].store(999, true);
        s[1].store(1, true);
        s[2].store(1000, true);
        assert_eq!(s[0].index.least_from(1), Some(0));
        s[0].store(1000, true);
        assert_eq!(s[0].index.least_from(1), Some(1), "a tie: the first from 1");
        assert_eq!(s[0].index.least_from(2), Some(2), "a tie: the first from 2");
        assert_consistent(&s[0].index);
    }

    #[test]
    fn out_backends_are_never_the_least_and_all_out_is_none() {
        let s = slots(&[1, 1, 1]);
        s[0].store(5, true);
        s[1].store(0, false);
        s[2].store(3, true);
        assert_eq!(s[0].index.least_from(0), Some(2));
        s[2].store(3, false);
        assert_eq!(s[0].index.least_from(0), Some(0));
        s[0].store(5, false);
        assert_eq!(s[0].index.least_from(0), None);
    }

    #[test]
    fn writers_racing_on_shared_nodes_leave_every_node_right() {
        // Few leaves, so that the two writers meet on the root; many rounds that each
        // stop both writers at once, so that their last writes race.
        let s: Arc<Vec<IndexSlot>> = Arc::new(slots(&[1; 2]));
        let mut stale_rounds = 0;
        for round in 0..2000u64 {
            let stop = Arc::new(AtomicBool::new(false));
            let threads: Vec<_> = (0..2u64)
                .map(|t| {
                    let (s, stop) = (s.clone(), stop.clone());
                    std::thread::spawn(move || {
                        let mut x = round * 2 + t + 1;
                        while !stop.load(Relaxed) {
                            x ^= x << 13;
                            x ^= x >> 7;
                            x ^= x << 17;
                            // Each thread writes its own leaf, as each backend does.
                            s[t as usize].store((x >> 32) as usize % 50, true);
                        }
                    })
                })
                .collect();
            std::thread::sleep(std::time::Duration::from_micros(100));
            stop.store(true, Relaxed);
            for t in threads {
                t.join().unwrap();
            }
            let (l, r) = (s[0].index.nodes[2].load(SeqCst), s[0].index.nodes[3].load(SeqCst));
            if s[0].index.nodes[1].load(SeqCst) != l.min(r) {
                stale_rounds += 1;
            }
        }
        assert_eq!(stale_rounds, 0, "rounds that ended with a stale root");
    }

    #[test]
    fn trial_scans_are_spaced_and_stop_when_nothing_is_out() {
        let index = LoadIndex::new(2);
        assert!(!index.trial_scan_due(|| true), "nothing went out");
        index.note_passive_out();
        assert!(index.trial_scan_due(|| true), "one went out, and is still out");
        assert!(!index.trial_scan_due(|| true), "too soon after the last");
        std::thread::sleep(std::time::Duration::from_millis(TRIAL_SCAN_EVERY_MS + 10));
        assert!(index.trial_scan_due(|| false), "due again; this time none is still out");
        std::thread::sleep(std::time::Duration::from_millis(TRIAL_SCAN_EVERY_MS + 10));
        assert!(!index.trial_scan_due(|| true), "the last scan found nothing out");
    }
}
