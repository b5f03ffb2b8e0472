//! The dashboard: admin `GET /` is one self-contained HTML page (`dashboard.html`, inline
//! CSS and JS), and `GET /dashboard.json` the feed it polls every second.
//!
//! The feed carries cumulative counters only, read from the atomics the request path
//! already bumps (answers by status, the duration histogram, in-flight, queue depth): the
//! page turns successive samples into requests per second, error shares and percentiles,
//! so nothing is added to the request path and the admin listener keeps no history.

use std::sync::atomic::Ordering::Relaxed;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::metrics::{LastReload, LatencyHistogram, StatusCounts};
use crate::runtime::{Runtime, Upstream};

/// The page, served as is.
pub(super) const PAGE: &str = include_str!("dashboard.html");

/// One sample of everything the page shows.
#[derive(Serialize)]
pub(super) struct Feed {
    /// When the sample was taken, milliseconds since the Unix epoch (the page divides
    /// counter differences by differences of this).
    now_ms: u64,
    generation: u64,
    last_reload: LastReload,
    reloads_success: u64,
    reloads_failure: u64,
    client_connections: i64,
    /// Upper bounds of the latency buckets, in seconds (the last bucket is `+Inf`).
    latency_bounds: &'static [f64],
    /// Requests refused with 429 so far, by rate limit.
    rate_limited: Vec<Refusals>,
    upstreams: Vec<UpstreamFeed>,
}

#[derive(Serialize)]
struct Refusals {
    limit: String,
    refused: u64,
}

#[derive(Serialize)]
struct UpstreamFeed {
    name: String,
    strategy: String,
    /// Requests answered so far (by a backend or by balancer for this upstream).
    answered: u64,
    /// Of those, answered with a 5xx.
    errors: u64,
    /// Answered requests per latency bucket (not cumulative; one more than the bounds,
    /// the last being past the last bound).
    latency_buckets: Vec<u64>,
    queued: usize,
    max_inflight: u32,
    backends: Vec<BackendFeed>,
}

#[derive(Serialize)]
struct BackendFeed {
    url: String,
    weight: u32,
    healthy: bool,
    inflight: usize,
    requests: u64,
    failures: u64,
    /// Answered with a 5xx by this backend.
    errors: u64,
}

/// `(answered, of which 5xx)` of a status table.
fn answered(statuses: &StatusCounts) -> (u64, u64) {
    statuses.snapshot().into_iter().fold((0, 0), |(all, errors), (code, n)| {
        (all + n, if (500..600).contains(&code) { errors + n } else { errors })
    })
}

fn buckets(h: &LatencyHistogram) -> Vec<u64> {
    let (_, count, buckets) = h.snapshot();
    let within: u64 = buckets.iter().map(|b| b.1).sum();
    buckets.into_iter().map(|b| b.1).chain([count.saturating_sub(within)]).collect()
}

fn upstream(u: &Upstream) -> UpstreamFeed {
    let (mut all, mut errors) = answered(&u.stats.unattributed);
    let backends = u
        .backends
        .iter()
        .zip(&u.weights)
        .map(|(b, &weight)| {
            let (n, e) = answered(&b.statuses);
            all += n;
            errors += e;
            BackendFeed {
                url: b.url.to_string(),
                weight,
                healthy: b.is_healthy(),
                inflight: b.inflight(),
                requests: b.requests(),
                failures: b.failures(),
                errors: e,
            }
        })
        .collect();
    UpstreamFeed {
        name: u.name.clone(),
        strategy: u.strategy.to_string(),
        answered: all,
        errors,
        latency_buckets: buckets(&u.stats.durations),
        queued: u.queue.depth(),
        max_inflight: u.max_inflight,
        backends,
    }
}

/// Reads one sample from the live runtime.
pub(super) fn feed(rt: &Runtime) -> Feed {
    let m = &rt.metrics;
    Feed {
        now_ms: SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64),
        generation: rt.generation,
        last_reload: m.last_reload.lock().expect("last_reload lock").clone(),
        reloads_success: m.reloads_success.load(Relaxed),
        reloads_failure: m.reloads_failure.load(Relaxed),
        client_connections: m.client_connections.load(Relaxed),
        latency_bounds: &LatencyHistogram::BOUNDS,
        rate_limited: m
            .rate_limited_snapshot()
            .into_iter()
            .map(|(limit, refused)| Refusals { limit, refused })
            .collect(),
        upstreams: rt.upstreams.iter().map(upstream).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn answered_counts_and_5xx_share() {
        let s = StatusCounts::default();
        for code in [200, 200, 404, 502, 503, 200] {
            s.inc(code);
        }
        assert_eq!(answered(&s), (6, 2));
    }

    #[test]
    fn buckets_end_with_the_overflow() {
        let h = LatencyHistogram::default();
        h.observe(Duration::from_millis(1));
        h.observe(Duration::from_secs(30));
        let b = buckets(&h);
        assert_eq!(b.len(), LatencyHistogram::BOUNDS.len() + 1);
        assert_eq!((b[0], b[b.len() - 1]), (1, 1));
    }

    #[test]
    fn the_page_needs_nothing_from_outside() {
        for outside in ["http://", "https://", "src=\"//", "@import", "url(", "<link rel=\"stylesheet\""] {
            assert!(!PAGE.contains(outside), "the page refers to {outside}");
        }
        assert!(PAGE.contains("/dashboard.json"));
    }
}
