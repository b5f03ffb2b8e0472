//! Counters the request path bumps without locks, and the Prometheus collector that reads
//! them at scrape time.
//!
//! Per-backend counts live on [`crate::backend::Backend`], per-upstream ones in
//! [`UpstreamStats`], process-wide ones in [`Metrics`]; all are carried across reloads by
//! the runtime, so counters never reset while balancer runs.

use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, AtomicU16, AtomicU64, Ordering::Relaxed};
use std::time::{Duration, SystemTime};

/// How many requests ended with each status code, in a small fixed table: the first
/// [`StatusCounts::SLOTS`] distinct codes get a slot, any further code counts as code 0.
#[derive(Debug, Default)]
pub struct StatusCounts {
    codes: [AtomicU16; StatusCounts::SLOTS],
    counts: [AtomicU64; StatusCounts::SLOTS],
    overflow: AtomicU64,
}

impl StatusCounts {
    pub const SLOTS: usize = 16;

    pub fn inc(&self, code: u16) {
        // 0 marks a free slot; it is never a code.
        if code == 0 {
            self.overflow.fetch_add(1, Relaxed);
            return;
        }
        for (slot, count) in self.codes.iter().zip(&self.counts) {
            match slot.load(Relaxed) {
                c if c == code => {
                    count.fetch_add(1, Relaxed);
                    return;
                }
                0 => match slot.compare_exchange(0, code, Relaxed, Relaxed) {
                    Ok(_) => {
                        count.fetch_add(1, Relaxed);
                        return;
                    }
                    Err(c) if c == code => {
                        count.fetch_add(1, Relaxed);
                        return;
                    }
                    Err(_) => continue,
                },
                _ => continue,
            }
        }
        self.overflow.fetch_add(1, Relaxed);
    }

    /// `(code, count)` for every code seen (code 0: the overflow).
    pub fn snapshot(&self) -> Vec<(u16, u64)> {
        let mut out: Vec<(u16, u64)> = self
            .codes
            .iter()
            .zip(&self.counts)
            .filter_map(|(c, n)| match c.load(Relaxed) {
                0 => None,
                c => Some((c, n.load(Relaxed))),
            })
            .collect();
        let overflow = self.overflow.load(Relaxed);
        if overflow > 0 {
            out.push((0, overflow));
        }
        out.sort_unstable();
        out
    }
}

/// Request durations, in Prometheus' default buckets (seconds).
#[derive(Debug, Default)]
pub struct LatencyHistogram {
    buckets: [AtomicU64; LatencyHistogram::BOUNDS.len()],
    count: AtomicU64,
    sum_micros: AtomicU64,
}

impl LatencyHistogram {
    pub const BOUNDS: [f64; 11] = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        if let Some(i) = Self::BOUNDS.iter().position(|&b| secs <= b) {
            self.buckets[i].fetch_add(1, Relaxed);
        }
        self.count.fetch_add(1, Relaxed);
        self.sum_micros.fetch_add(d.as_micros() as u64, Relaxed);
    }

    /// `(sum in seconds, count, per-bucket counts)`; the encoder makes them cumulative
    /// and adds `+Inf` (= count).
    pub fn snapshot(&self) -> (f64, u64, Vec<(f64, u64)>) {
        let buckets = Self::BOUNDS.iter().zip(&self.buckets).map(|(&b, n)| (b, n.load(Relaxed))).collect();
        let count = self.count.load(Relaxed);
        (self.sum_micros.load(Relaxed) as f64 / 1e6, count, buckets)
    }
}

/// What one upstream counts beyond its backends. Kept across reloads by upstream name.
#[derive(Debug, Default)]
pub struct UpstreamStats {
    pub durations: LatencyHistogram,
    /// Requests routed here that no backend answered (503, 413, ...).
    pub unattributed: StatusCounts,
    /// Requests and retries of the last 10 s, for `retry_budget`.
    pub retry_window: RetryWindow,
    /// Lookups of this upstream's backend host names that failed or found no address;
    /// shared with the DNS task.
    pub dns_failures: std::sync::Arc<AtomicU64>,
}

/// Requests and retries over the last [`RetryWindow::SECONDS`] seconds, in one-second
/// buckets of atomics: a retry is allowed while retries stay under a share of requests,
/// or under 3 a second.
#[derive(Debug, Default)]
pub struct RetryWindow {
    /// Per bucket: (the second it counts, requests, retries).
    buckets: [(AtomicU64, AtomicU64, AtomicU64); RetryWindow::SECONDS as usize],
}

impl RetryWindow {
    pub const SECONDS: u64 = 10;
    /// Retries allowed per second whatever the share.
    pub const FLOOR_PER_SECOND: u64 = 3;

    fn now() -> u64 {
        static EPOCH: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
        EPOCH.get_or_init(std::time::Instant::now).elapsed().as_secs() + 1
    }

    /// The bucket of second `now`, emptied first when it last counted an older second.
    fn bucket(&self, now: u64) -> &(AtomicU64, AtomicU64, AtomicU64) {
        let b = &self.buckets[(now % Self::SECONDS) as usize];
        let seen = b.0.load(Relaxed);
        if seen != now && b.0.compare_exchange(seen, now, Relaxed, Relaxed).is_ok() {
            b.1.store(0, Relaxed);
            b.2.store(0, Relaxed);
        }
        b
    }

    pub fn record_request(&self) {
        self.bucket(Self::now()).1.fetch_add(1, Relaxed);
    }

    /// Counts a retry if the budget allows one: retries in the window stay at most
    /// `share` of requests, or `FLOOR_PER_SECOND` a second.
    pub fn try_retry(&self, share: f64) -> bool {
        let now = Self::now();
        let (mut requests, mut retries) = (0, 0);
        for b in &self.buckets {
            if now.saturating_sub(b.0.load(Relaxed)) < Self::SECONDS {
                requests += b.1.load(Relaxed);
                retries += b.2.load(Relaxed);
            }
        }
        let allowed = ((requests as f64 * share) as u64).max(Self::FLOOR_PER_SECOND * Self::SECONDS);
        if retries >= allowed {
            return false;
        }
        self.bucket(now).2.fetch_add(1, Relaxed);
        true
    }
}

/// The outcome of the latest config reload, for `/status`.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct LastReload {
    pub ok: bool,
    /// RFC 3339, UTC.
    pub at: Option<String>,
    pub error: Option<String>,
}

impl LastReload {
    pub fn now(result: Result<(), String>) -> LastReload {
        let at = Some(humantime::format_rfc3339_seconds(SystemTime::now()).to_string());
        match result {
            Ok(()) => LastReload { ok: true, at, error: None },
            Err(e) => LastReload { ok: false, at, error: Some(e) },
        }
    }
}

/// Process-wide counters. One per process, carried from runtime to runtime.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Open client connections (written by the listeners).
    pub client_connections: AtomicI64,
    /// Of those, the idle ones parked without hyper's state (written by the listeners).
    pub parked_connections: AtomicI64,
    /// Connections parked so far; the memory trimmer looks for a change.
    pub parks: AtomicU64,
    pub reloads_success: AtomicU64,
    pub reloads_failure: AtomicU64,
    /// Written by the reloader, read by `/status`.
    pub last_reload: Mutex<LastReload>,
    /// Requests answered before any upstream was chosen (404, 405, 400, ...).
    pub unrouted: StatusCounts,
    /// Refusals per rate limit, by name; a limit's counter is created on first use.
    pub rate_limited: Mutex<std::collections::BTreeMap<String, std::sync::Arc<AtomicU64>>>,
    /// Failed operations on `[limit_store]` (written by the store, whichever one is live).
    pub limit_store_errors: std::sync::Arc<AtomicU64>,
}

impl Metrics {
    /// The refusal counter of the rate limit `name` (created when first asked for).
    pub fn rate_limited_counter(&self, name: &str) -> std::sync::Arc<AtomicU64> {
        let mut map = self.rate_limited.lock().expect("rate_limited lock");
        map.entry(name.to_owned()).or_default().clone()
    }

    pub fn rate_limited_snapshot(&self) -> Vec<(String, u64)> {
        let map = self.rate_limited.lock().expect("rate_limited lock");
        map.iter().map(|(k, v)| (k.clone(), v.load(Relaxed))).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_counts_fill_slots_then_overflow() {
        let s = StatusCounts::default();
        for _ in 0..3 {
            s.inc(200);
        }
        s.inc(502);
        for code in 300..300 + StatusCounts::SLOTS as u16 {
            s.inc(code);
        }
        let snap = s.snapshot();
        assert!(snap.contains(&(200, 3)) && snap.contains(&(502, 1)));
        assert_eq!(snap[0], (0, 2), "two codes found no slot");
    }

    #[test]
    fn histogram_counts_each_observation_once() {
        let h = LatencyHistogram::default();
        h.observe(Duration::from_millis(3));
        h.observe(Duration::from_millis(30));
        h.observe(Duration::from_secs(20));
        let (sum, count, buckets) = h.snapshot();
        assert_eq!(count, 3);
        assert!((sum - 20.033).abs() < 1e-6);
        assert_eq!(buckets[0], (0.005, 1));
        assert_eq!(buckets[3], (0.05, 1));
        assert_eq!(buckets.iter().map(|b| b.1).sum::<u64>(), 2, "20s is past the last bound");
    }
}
