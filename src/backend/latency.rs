//! A backend's response-head latency as a peak-sensitive moving average (the "peak EWMA"
//! of Finagle and linkerd), which least-latency scores backends by. Written where a
//! response head arrives or an attempt fails, read by every pick: two atomics, no lock.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

/// How fast the average forgets: an old sample's weight falls to 1/e over this time, and
/// so does the estimate of a backend that gets no traffic (so a backend slow a minute ago,
/// at e^-6 of its peak, is tried again). linkerd's default.
pub const DECAY: Duration = Duration::from_secs(10);
const DECAY_NANOS: f64 = DECAY.as_nanos() as f64;

/// Nanoseconds since the process's first call: the clock of [`LatencyEwma`].
pub fn clock() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

/// The estimate and when it was written. The pair is not written as one: a reader racing a
/// writer may fade the new estimate from the old time (microseconds apart), which changes
/// nothing a pick can see.
#[derive(Debug, Default)]
pub struct LatencyEwma {
    /// Nanoseconds, as `f64` bits; 0 until the first sample.
    nanos: AtomicU64,
    /// [`clock`] at the last sample.
    at: AtomicU64,
}

impl LatencyEwma {
    /// Takes in one sample seen at `now` ([`clock`]): above the faded estimate it replaces
    /// it at once (peak-sensitive); below, the faded estimate moves toward it by the share
    /// of [`DECAY`] that passed since the last sample.
    pub fn record(&self, sample: Duration, now: u64) {
        let sample = sample.as_nanos() as f64;
        let fade = fade(now.saturating_sub(self.at.load(Relaxed)));
        let _ = self.nanos.fetch_update(Relaxed, Relaxed, |bits| {
            let faded = f64::from_bits(bits) * fade;
            let next = if sample >= faded { sample } else { faded * fade + sample * (1.0 - fade) };
            Some(next.to_bits())
        });
        self.at.fetch_max(now, Relaxed);
    }

    /// The estimate in nanoseconds at `now`, faded toward 0 by the time since its last
    /// sample; `None` before the first.
    pub fn estimate(&self, now: u64) -> Option<f64> {
        let v = f64::from_bits(self.nanos.load(Relaxed));
        (v > 0.0).then(|| v * fade(now.saturating_sub(self.at.load(Relaxed))))
    }
}

/// The weight an estimate keeps after `elapsed` nanoseconds.
fn fade(elapsed: u64) -> f64 {
    (-(elapsed as f64) / DECAY_NANOS).exp()
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    fn ms(est: Option<f64>) -> f64 {
        est.unwrap() / MS as f64
    }

    #[test]
    fn a_peak_replaces_at_once_and_a_lower_sample_pulls_slowly() {
        let e = LatencyEwma::default();
        assert_eq!(e.estimate(0), None);
        e.record(Duration::from_millis(10), 1000 * MS);
        assert!((ms(e.estimate(1000 * MS)) - 10.0).abs() < 1e-9);
        e.record(Duration::from_millis(50), 1001 * MS);
        assert!((ms(e.estimate(1001 * MS)) - 50.0).abs() < 1e-9, "a peak is taken at once");
        // A fast sample 1 ms later barely moves it: 1e-4 of the way.
        e.record(Duration::from_millis(1), 1002 * MS);
        let after = ms(e.estimate(1002 * MS));
        assert!(after > 49.9 && after < 50.0, "{after}");
        // Ten seconds of fast samples, every 10 ms, take it most of the way down.
        for i in 1..=1000 {
            e.record(Duration::from_millis(1), 1002 * MS + i * 10 * MS);
        }
        let later = ms(e.estimate(11_002 * MS));
        assert!(later > 1.0 && later < 1.0 + 49.0 * 0.4, "{later}");
    }

    #[test]
    fn an_estimate_fades_while_the_backend_gets_no_traffic() {
        let e = LatencyEwma::default();
        e.record(Duration::from_millis(500), 0);
        assert!((ms(e.estimate(10_000 * MS)) - 500.0 / std::f64::consts::E).abs() < 1e-6);
        // A minute later it is below a 2 ms backend's: it gets tried again.
        assert!(ms(e.estimate(60_000 * MS)) < 2.0);
        // And a sample after the quiet spell counts nearly whole.
        e.record(Duration::from_millis(3), 60_000 * MS);
        assert!((ms(e.estimate(60_000 * MS)) - 3.0).abs() < 0.01);
    }
}
