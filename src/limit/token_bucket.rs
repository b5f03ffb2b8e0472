//! One token bucket: capacity `burst`, refilled continuously at `rate` per `per`.
//! Times are microseconds on the owning limiter's clock, passed in so the math is pure.

/// The refill schedule shared by all buckets of one limit.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Refill {
    /// Tokens added per microsecond.
    pub per_micro: f64,
    pub burst: f64,
}

impl Refill {
    pub fn new(rate: u64, per: std::time::Duration, burst: u64) -> Refill {
        Refill { per_micro: rate as f64 / per.as_micros().max(1) as f64, burst: burst as f64 }
    }

    /// Microseconds until `tokens` grows to `target`.
    pub fn micros_until(&self, tokens: f64, target: f64) -> f64 {
        ((target - tokens).max(0.0)) / self.per_micro
    }
}

/// A bucket that has been touched; one that is not stored is full.
#[derive(Clone, Copy, Debug)]
pub struct Bucket {
    tokens: f64,
    at: u64,
}

impl Bucket {
    /// A new key's bucket: full.
    pub fn full(refill: &Refill, now: u64) -> Bucket {
        Bucket { tokens: refill.burst, at: now }
    }

    /// Tokens available at `now`.
    pub fn tokens(&self, refill: &Refill, now: u64) -> f64 {
        let elapsed = now.saturating_sub(self.at) as f64;
        (self.tokens + elapsed * refill.per_micro).min(refill.burst)
    }

    /// Takes one token (the caller checked `tokens >= 1`).
    pub fn take(&mut self, refill: &Refill, now: u64) {
        self.tokens = self.tokens(refill, now) - 1.0;
        self.at = now;
    }

    /// Gives back one token taken by a request that another limit refused.
    pub fn give(&mut self, refill: &Refill, now: u64) {
        self.tokens = (self.tokens(refill, now) + 1.0).min(refill.burst);
        self.at = now;
    }

    /// Whether the bucket is full again (and so can be forgotten).
    pub fn is_full(&self, refill: &Refill, now: u64) -> bool {
        self.tokens(refill, now) >= refill.burst
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn five_per_second_with_burst_five() {
        let r = Refill::new(5, Duration::from_secs(1), 5);
        let mut b = Bucket::full(&r, 0);
        for _ in 0..5 {
            assert!(b.tokens(&r, 0) >= 1.0);
            b.take(&r, 0);
        }
        assert!(b.tokens(&r, 0) < 1.0, "the sixth is refused");
        assert!((r.micros_until(b.tokens(&r, 0), 1.0) - 200_000.0).abs() < 1.0, "one token in 200ms");
        assert!(b.tokens(&r, 199_000) < 1.0);
        assert!(b.tokens(&r, 200_000) >= 1.0);
        assert!(!b.is_full(&r, 900_000));
        assert!(b.is_full(&r, 1_000_000));
        assert!(b.tokens(&r, 60_000_000) <= 5.0, "never above burst");
    }

    #[test]
    fn hundred_per_minute() {
        let r = Refill::new(100, Duration::from_secs(60), 100);
        let mut b = Bucket::full(&r, 0);
        for _ in 0..100 {
            b.take(&r, 0);
        }
        assert!(b.tokens(&r, 0) < 1.0);
        assert!(b.tokens(&r, 600_000) >= 1.0, "one more every 0.6s");
    }
}
