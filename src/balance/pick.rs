//! Picking a backend for one request, and refusing one: the strategy proposes, health
//! (active verdicts, passive ejection and its one trial request) disposes, and the
//! ejection cap keeps passive checks from emptying an upstream.

use std::sync::Arc;

use super::{Affinity, Balancer};
use crate::backend::{Admission, Backend};
use crate::config::PassiveConfig;

/// A backend that `accept` allows and health admits: the one the request is pinned to
/// while it is open, else `balancer`'s. A backend that is out but due a trial is only
/// returned to the request that claims it. Returns the backend's index, and whether this
/// request is its passive trial.
pub fn pick(
    balancer: &dyn Balancer,
    backends: &[Arc<Backend>],
    passive: &PassiveConfig,
    affinity: Affinity,
    mut accept: impl FnMut(usize) -> bool,
) -> Option<(usize, bool)> {
    if let Some(p) = affinity.pinned
        && accept(p)
        && backends[p].admission(passive) == Admission::Open
    {
        return Some((p, false));
    }
    let mut lost_trials: Vec<usize> = Vec::new();
    loop {
        // The trial offers seen during this scan: (backend, stamp to claim with).
        let mut offers: Vec<(usize, u64)> = Vec::new();
        let idx = balancer.pick(backends, affinity.hash, &mut |i, b| {
            if lost_trials.contains(&i) || !accept(i) {
                return false;
            }
            match b.admission(passive) {
                Admission::Open => true,
                Admission::Trial(seen) => {
                    offers.push((i, seen));
                    true
                }
                Admission::Closed => false,
            }
        })?;
        match offers.iter().find(|(i, _)| *i == idx) {
            None => return Some((idx, false)),
            Some(&(_, seen)) if backends[idx].claim_trial(seen) => return Some((idx, true)),
            Some(_) => lost_trials.push(idx),
        }
    }
}

/// Whether passive checks may have backend `idx` out: another backend is still up, and
/// with it out no more than `max_ejected_percent` of the backends are (SPEC 4).
pub fn may_eject(backends: &[Arc<Backend>], idx: usize, max_ejected_percent: u32) -> bool {
    let others = backends.iter().enumerate().filter(|&(i, _)| i != idx);
    let ejected = others.clone().filter(|(_, b)| b.is_ejected()).count();
    let another_up = others.clone().any(|(_, b)| b.is_healthy());
    another_up && (ejected + 1) * 100 <= max_ejected_percent as usize * backends.len()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balance::tests::backends;
    use std::time::Duration;

    #[test]
    fn the_cap_keeps_a_share_and_the_last_backend_in() {
        let bs = backends(4);
        let cfg = PassiveConfig { max_fails: 1, fail_timeout: Duration::from_secs(60), max_ejected_percent: 50 };
        assert!(may_eject(&bs, 0, 50));
        bs[0].record_failure(&cfg, false, &"x", || true);
        assert!(may_eject(&bs, 1, 50), "2 of 4 out is 50%");
        bs[1].record_failure(&cfg, false, &"x", || true);
        assert!(!may_eject(&bs, 2, 50), "3 of 4 would be 75%");
        assert!(may_eject(&bs, 2, 100));
        let one = backends(1);
        assert!(!may_eject(&one, 0, 100), "never the last backend up");
    }
}
