//! Passive checks: consecutive failures on real traffic take a backend out for
//! `fail_timeout`; then one trial request is let through, and its outcome decides. Whether
//! an ejection that is due may happen is the upstream's call (`max_ejected_percent`).
//!
//! All state is atomics on the backend; times are milliseconds since the backend was
//! created, so they fit an `AtomicU64` (0 means "not set").

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::Relaxed};
use std::time::Instant;

use crate::config::PassiveConfig;

#[derive(Debug)]
pub struct PassiveState {
    epoch: Instant,
    consecutive_failures: AtomicU32,
    /// While non-zero, the backend is out until this time (then a trial may go).
    out_until: AtomicU64,
    /// When the current trial request started; 0 when none is in flight.
    trial_since: AtomicU64,
    /// An ejection was refused since the last success (so it is logged once per streak).
    refused: AtomicBool,
}

/// Whether a request may use the backend now, as far as passive checks go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admission {
    Open,
    /// Out, but its time is up: one request may try it, by claiming it with this stamp
    /// (the trial start it saw; only one claimer can swap it).
    Trial(u64),
    Closed,
}

/// A change of state that must be logged.
#[derive(Debug, PartialEq, Eq)]
pub enum Transition {
    /// `max_fails` reached: the backend is due out, if the upstream allows it
    /// ([`PassiveState::eject`]).
    EjectionDue {
        failures: u32,
    },
    Recovered,
}

impl Default for PassiveState {
    fn default() -> Self {
        PassiveState {
            epoch: Instant::now(),
            consecutive_failures: AtomicU32::new(0),
            out_until: AtomicU64::new(0),
            trial_since: AtomicU64::new(0),
            refused: AtomicBool::new(false),
        }
    }
}

impl PassiveState {
    fn now(&self) -> u64 {
        // +1 so that "now" is never the 0 that means "not set".
        self.epoch.elapsed().as_millis() as u64 + 1
    }

    pub fn is_out(&self) -> bool {
        self.out_until.load(Relaxed) != 0
    }

    pub fn admission(&self, cfg: &PassiveConfig) -> Admission {
        let until = self.out_until.load(Relaxed);
        if until == 0 {
            return Admission::Open;
        }
        let now = self.now();
        if now < until {
            return Admission::Closed;
        }
        let trial = self.trial_since.load(Relaxed);
        // A trial whose request never reported back (client gone) expires.
        if trial == 0 || now.saturating_sub(trial) > cfg.fail_timeout.as_millis() as u64 {
            Admission::Trial(trial)
        } else {
            Admission::Closed
        }
    }

    /// Claims the trial that `admission` offered with `seen`; false if another request
    /// got it first.
    pub fn claim_trial(&self, seen: u64) -> bool {
        self.trial_since.compare_exchange(seen, self.now(), Relaxed, Relaxed).is_ok()
    }

    /// A response head arrived. `trial`: this request was the claimed trial; only its
    /// success brings an ejected backend back (a request sent before the ejection that
    /// happens to finish well does not).
    pub fn on_success(&self, trial: bool) -> Option<Transition> {
        self.consecutive_failures.store(0, Relaxed);
        self.refused.store(false, Relaxed);
        if trial && self.out_until.swap(0, Relaxed) != 0 {
            self.trial_since.store(0, Relaxed);
            return Some(Transition::Recovered);
        }
        None
    }

    /// An attempt failed. `trial` as for [`Self::on_success`]: a failed trial puts the
    /// backend out for another `fail_timeout`; other failures while out change nothing.
    pub fn on_failure(&self, cfg: &PassiveConfig, trial: bool) -> Option<Transition> {
        if cfg.max_fails == 0 {
            return None;
        }
        let failures = self.consecutive_failures.fetch_add(1, Relaxed) + 1;
        if self.is_out() {
            if trial {
                self.trial_since.store(0, Relaxed);
                self.out_until.store(self.now() + cfg.fail_timeout.as_millis() as u64, Relaxed);
            }
            return None;
        }
        (failures >= cfg.max_fails).then_some(Transition::EjectionDue { failures })
    }

    /// Takes the backend out for `fail_timeout`; false if it already was.
    pub fn eject(&self, cfg: &PassiveConfig) -> bool {
        let until = self.now() + cfg.fail_timeout.as_millis() as u64;
        self.out_until.compare_exchange(0, until, Relaxed, Relaxed).is_ok()
    }

    /// An ejection was refused; true the first time since the last success.
    pub fn note_refused(&self) -> bool {
        !self.refused.swap(true, Relaxed)
    }

    /// Undoes an ejection that raced another (see `Backend::record_failure`).
    pub fn reset_out(&self) {
        self.out_until.store(0, Relaxed);
    }

    /// Puts the backend back in (its passive checks were turned off by a reload).
    pub fn reset(&self) {
        self.consecutive_failures.store(0, Relaxed);
        self.out_until.store(0, Relaxed);
        self.trial_since.store(0, Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn cfg(ms: u64) -> PassiveConfig {
        PassiveConfig { max_fails: 2, fail_timeout: Duration::from_millis(ms), max_ejected_percent: 100 }
    }

    #[test]
    fn ejects_after_max_fails_then_one_trial_decides() {
        let s = PassiveState::default();
        let c = cfg(30);
        assert_eq!(s.on_failure(&c, false), None);
        assert_eq!(s.on_success(false), None, "a success resets the streak");
        assert_eq!(s.on_failure(&c, false), None);
        assert_eq!(s.on_failure(&c, false), Some(Transition::EjectionDue { failures: 2 }));
        assert!(s.eject(&c));
        assert!(!s.eject(&c), "already out");
        assert_eq!(s.on_success(false), None, "an older request's success does not end the ejection");
        assert_eq!(s.on_failure(&c, false), None, "nor does an older request's failure extend it");
        assert_eq!(s.admission(&c), Admission::Closed);
        std::thread::sleep(Duration::from_millis(40));
        let Admission::Trial(seen) = s.admission(&c) else { panic!("no trial offered") };
        assert!(s.claim_trial(seen));
        assert!(!s.claim_trial(seen), "a second claimer with the same offer loses");
        assert_eq!(s.admission(&c), Admission::Closed, "only one trial at a time");
        // The trial fails: out for another fail_timeout.
        assert_eq!(s.on_failure(&c, true), None);
        assert_eq!(s.admission(&c), Admission::Closed);
        std::thread::sleep(Duration::from_millis(40));
        let Admission::Trial(seen) = s.admission(&c) else { panic!("no trial offered") };
        assert!(s.claim_trial(seen));
        assert_eq!(s.on_success(true), Some(Transition::Recovered));
        assert_eq!(s.admission(&c), Admission::Open);
    }

    #[test]
    fn max_fails_zero_never_ejects() {
        let s = PassiveState::default();
        let c = PassiveConfig { max_fails: 0, fail_timeout: Duration::from_secs(1), max_ejected_percent: 100 };
        for _ in 0..10 {
            assert_eq!(s.on_failure(&c, false), None);
        }
        assert_eq!(s.admission(&c), Admission::Open);
    }
}
