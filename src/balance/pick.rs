//! Picking a backend for one request, and refusing one: the strategy proposes, health
//! (active verdicts, passive ejection and its one trial request) disposes, and the
//! ejection cap keeps passive checks from emptying an upstream.

use std::sync::Arc;
use std::time::Duration;

use super::{Affinity, Balancer};
use crate::backend::{Admission, Backend};
use crate::config::PassiveConfig;

/// A backend that `accept` allows and health admits: the one the request is pinned to
/// while it is open, else `balancer`'s. A backend that is out but due a trial is only
/// returned to the request that claims it. A backend still ramping up under `slow_start`
/// is passed over in proportion to what it does not take yet, unless nothing else would
/// do. Returns the backend's index, and whether this request is its passive trial.
pub fn pick(
    balancer: &dyn Balancer,
    backends: &[Arc<Backend>],
    passive: &PassiveConfig,
    affinity: Affinity,
    slow_start: Duration,
    mut accept: impl FnMut(usize) -> bool,
) -> Option<(usize, bool)> {
    if let Some(p) = affinity.pinned
        && accept(p)
        && backends[p].admission(passive) == Admission::Open
    {
        return Some((p, false));
    }
    let mut lost_trials: Vec<usize> = Vec::new();
    let mut ramp = Ramp::new(slow_start, affinity.hash);
    loop {
        // The trial offers seen during this scan: (backend, stamp to claim with).
        let mut offers: Vec<(usize, u64)> = Vec::new();
        let mut held_back = false;
        let idx = balancer.pick(backends, affinity.hash, &mut |i, b| {
            if lost_trials.contains(&i) || !accept(i) {
                return false;
            }
            let admission = b.admission(passive);
            if admission == Admission::Closed {
                return false;
            }
            if admission == Admission::Open && ramp.holds_back(b) {
                held_back = true;
                return false;
            }
            if let Admission::Trial(seen) = admission {
                offers.push((i, seen));
            }
            true
        });
        let Some(idx) = idx else {
            if held_back {
                // Only ramping backends would do: better one of them than none.
                ramp = Ramp::off();
                continue;
            }
            return None;
        };
        match offers.iter().find(|(i, _)| *i == idx) {
            None => return Some((idx, false)),
            Some(&(_, seen)) if backends[idx].claim_trial(seen) => return Some((idx, true)),
            Some(_) => lost_trials.push(idx),
        }
    }
}

/// Slow start as a pick sees it: a backend at share `s` of its weight is passed over
/// unless this request's dice (a number in [0, 1)) falls under `s`, so it takes about
/// `s` of the requests the strategy would give it. Under consistent-hash the dice is the
/// request's key, so a growing set of the backend's keys moves to it, each once.
struct Ramp {
    slow_start: Duration,
    hash: u64,
    /// The dice and the time, taken at the first ramping backend met.
    rolled: Option<(f64, u64)>,
}

impl Ramp {
    fn new(slow_start: Duration, hash: u64) -> Ramp {
        Ramp { slow_start, hash, rolled: None }
    }

    fn off() -> Ramp {
        Ramp::new(Duration::ZERO, 0)
    }

    #[inline]
    fn holds_back(&mut self, b: &Backend) -> bool {
        if self.slow_start.is_zero() {
            return false;
        }
        let (dice, now) = *self.rolled.get_or_insert_with(|| {
            // The key's hash mixed again: its position on the ring must not decide.
            let bits = if self.hash != 0 {
                (self.hash ^ (self.hash >> 31)).wrapping_mul(0x9E37_79B9_7F4A_7C15)
            } else {
                super::least_latency::random()
            };
            ((bits >> 11) as f64 / (1u64 << 53) as f64, crate::backend::clock())
        });
        b.ramp_share(now, self.slow_start).is_some_and(|share| dice >= share)
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

    /// Picks of backend 1 out of `n`, both round-robin with equal weights.
    fn share_of_one(bs: &[Arc<Backend>], slow_start: Duration, n: usize) -> f64 {
        let rr = crate::balance::RoundRobin::new(&[1, 1]);
        let cfg = PassiveConfig { max_fails: 0, fail_timeout: Duration::from_secs(1), max_ejected_percent: 50 };
        let ones = (0..n)
            .filter(|_| pick(&rr, bs, &cfg, Affinity::default(), slow_start, |_| true) == Some((1, false)))
            .count();
        ones as f64 / n as f64
    }

    #[test]
    fn a_backend_back_up_ramps_from_a_tenth_of_its_weight() {
        let bs = backends(2);
        let hour = Duration::from_secs(3600);
        assert!((share_of_one(&bs, hour, 10_000) - 0.5).abs() < 0.01, "no ramp before any change");
        bs[1].set_active_up(false, "test");
        bs[1].set_active_up(true, "test");
        // Weight 1 against 0.1: 1/11 of the picks.
        let share = share_of_one(&bs, hour, 20_000);
        assert!((0.06..0.125).contains(&share), "{share}");
        assert!((share_of_one(&bs, Duration::ZERO, 10_000) - 0.5).abs() < 0.01, "slow_start 0: no ramp");
        // Only ramping backends accept: one of them is taken rather than none.
        let rr = crate::balance::RoundRobin::new(&[1, 1]);
        let cfg = PassiveConfig { max_fails: 0, fail_timeout: Duration::from_secs(1), max_ejected_percent: 50 };
        for _ in 0..100 {
            assert_eq!(pick(&rr, &bs, &cfg, Affinity::default(), hour, |i| i == 1), Some((1, false)));
        }
    }
}
