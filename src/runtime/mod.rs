//! The state the request path reads: one immutable snapshot, swapped whole on reload.
//!
//! A request loads the `Arc<Runtime>` once and keeps it to its end, so it never sees half
//! a reload. Per-backend state lives in `Arc<Backend>`, carried from one snapshot to the
//! next by (upstream name, backend URL).

mod build;

pub mod router;

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;

use crate::backend::{Backend, SlotQueue};
use crate::balance::{self, Balancer, Sticky};
use crate::cache::Cache;
use crate::config::{Config, HashKey, HealthCheckConfig, PassiveConfig, StrategyName, Timeouts};
use crate::discovery::{self, Found, Resolved, Target};
use crate::limit::{LimitStore, RateLimiter};
use crate::metrics::{Metrics, UpstreamStats};
use crate::otlp::SpanExport;
pub use build::build;
use router::Router;

/// The live runtime, shared by listeners, the reloader and the admin listener.
pub type SharedRuntime = Arc<ArcSwap<Runtime>>;

#[derive(Debug)]
pub struct Runtime {
    /// Bumped by every successful (re)load; 1 for the first.
    pub generation: u64,
    pub config: Config,
    pub router: Router,
    pub upstreams: Vec<Upstream>,
    /// Process-wide counters, the same object in every generation.
    pub metrics: Arc<Metrics>,
    /// Every `[rate_limits.*]`, in name order (which is also the lock order).
    pub limits: Vec<Arc<RateLimiter>>,
    /// Indices into `limits` of `server.rate_limit`, for requests that match no route.
    pub server_limits: Vec<usize>,
    /// `[limit_store]`, kept across reloads while its config is unchanged.
    pub limit_store: Option<Arc<LimitStore>>,
    /// The addresses of backend host names this snapshot's backends were made from.
    pub resolved: Resolved,
    /// Every `[caches.*]`, in name order; each kept across reloads while unchanged.
    pub caches: Vec<Arc<Cache>>,
    /// `[tracing] otlp_endpoint`: where each request's span goes; kept across reloads while
    /// the endpoint is unchanged. `None` costs the request path one check.
    pub span_export: Option<Arc<SpanExport>>,
}

#[derive(Debug)]
pub struct Upstream {
    pub name: String,
    pub strategy: StrategyName,
    pub backends: Vec<Arc<Backend>>,
    pub weights: Vec<u32>,
    balancer: Box<dyn Balancer>,
    pub preserve_host: bool,
    pub retries: u32,
    pub timeouts: Timeouts,
    pub passive: PassiveConfig,
    pub health_check: Option<HealthCheckConfig>,
    /// Kept across reloads by upstream name.
    pub stats: Arc<UpstreamStats>,
    /// Requests in flight per backend; 0: no cap.
    pub max_inflight: u32,
    /// Where requests wait for a slot under the cap. Kept across reloads by upstream name
    /// (queued requests keep their place); always present, enabled by `[queue]`.
    pub queue: Arc<SlotQueue>,
    /// Retries at most this share of requests (10 s window, at least 3 a second).
    pub retry_budget: Option<f64>,
    /// What a request is hashed by, under consistent-hash.
    pub hash_key: Option<HashKey>,
    /// `[sticky]`: each backend's cookie.
    pub sticky: Option<Sticky>,
    /// How long a new or recovered backend's share of traffic grows; zero: no ramp.
    pub slow_start: Duration,
}

impl Runtime {
    /// Starts the active checkers of every upstream that has `[health_check]`, spread over
    /// one interval, until `stop`; marks the backends of the others up (their checks may
    /// have been removed by a reload). With `kept`, the runtime this one replaced without a
    /// reload (DNS), only backends new in this one get a checker: the others keep theirs.
    pub fn spawn_health_checks(&self, stop: &tokio_util::sync::CancellationToken, kept: Option<&Runtime>) {
        for up in &self.upstreams {
            let Some(hc) = &up.health_check else {
                for b in &up.backends {
                    b.set_active_up(true, "active health checks are no longer configured");
                }
                continue;
            };
            let old = kept.and_then(|k| k.upstreams.iter().find(|o| o.name == up.name));
            let n = up.backends.len() as u32;
            for (i, backend) in up.backends.iter().enumerate() {
                if old.is_some_and(|o| o.backends.iter().any(|b| Arc::ptr_eq(b, backend))) {
                    continue;
                }
                crate::backend::health::spawn(backend.clone(), hc.clone(), hc.interval * i as u32 / n, stop.clone());
            }
        }
    }
}

impl Runtime {
    /// Starts the `[limit_store]` task (connect, presence, probes) until `stop`; the
    /// reloader stops it with the health checkers and starts the next generation's.
    pub fn spawn_limit_store(&self, stop: &tokio_util::sync::CancellationToken) {
        if let Some(store) = &self.limit_store {
            tokio::spawn(store.clone().run(stop.clone()));
        }
    }
}

impl Runtime {
    /// Starts following the backend host names of this snapshot's upstreams (SPEC 12)
    /// until `stop`, sending each change of their addresses to `found`.
    pub fn spawn_discovery(&self, stop: &tokio_util::sync::CancellationToken, found: tokio::sync::mpsc::Sender<Found>) {
        let mut targets: Vec<Target> = Vec::new();
        for (up, stats) in self.config.upstreams.iter().zip(&self.upstreams) {
            for name in up.backends.iter().filter_map(|b| b.name.as_deref()) {
                let failures = stats.stats.dns_failures.clone();
                match targets.iter_mut().find(|t| &*t.name == name) {
                    Some(t) => {
                        t.interval = t.interval.min(up.resolve_interval);
                        if !t.failures.iter().any(|f| Arc::ptr_eq(f, &failures)) {
                            t.failures.push(failures);
                        }
                    }
                    None => targets.push(Target {
                        name: name.into(),
                        interval: up.resolve_interval,
                        failures: vec![failures],
                    }),
                }
            }
        }
        let (nameservers, known) = (self.config.nameservers.clone(), self.resolved.clone());
        tokio::spawn(discovery::follow(targets, nameservers, known, self.generation, found, stop.clone()));
    }

    /// Starts the span exporter's task if this generation brought a new exporter (one
    /// kept from the previous generation is already running). The task ends by itself
    /// once no generation holds the exporter.
    pub fn spawn_span_export(&self) {
        if let Some(export) = &self.span_export {
            export.start();
        }
    }
}

impl Upstream {
    /// An attempt on backend `idx` failed: counts it (as a penalty latency under
    /// least-latency), and takes the backend out on passive checks when due and the cap
    /// allows.
    pub fn record_failure(&self, idx: usize, trial: bool, error: &dyn std::fmt::Display) {
        if self.times_responses() {
            let now = crate::backend::clock();
            self.backends[idx].record_latency(self.latency_penalty(&self.backends[idx], now), now);
        }
        let cap = self.passive.max_ejected_percent;
        self.backends[idx].record_failure(&self.passive, trial, error, || balance::may_eject(&self.backends, idx, cap));
    }

    /// Whether response-head latency is recorded (least-latency reads it).
    #[inline]
    pub fn times_responses(&self) -> bool {
        self.strategy == StrategyName::LeastLatency
    }

    /// Backend `idx` sent a response head, `sent` ([`crate::backend::clock`]) being when
    /// the attempt began: its latency, or the failure penalty for a 5xx (a backend that
    /// answers errors fast must not look fast).
    pub fn record_latency(&self, idx: usize, sent: u64, server_error: bool) {
        let (backend, now) = (&self.backends[idx], crate::backend::clock());
        let latency = Duration::from_nanos(now.saturating_sub(sent));
        let sample = if server_error { latency.max(self.latency_penalty(backend, now)) } else { latency };
        backend.record_latency(sample, now);
    }

    /// The latency a failure counts as: twice the backend's estimate, at least 1 s, at
    /// most `upstream_header` (the longest a success may take).
    fn latency_penalty(&self, backend: &Backend, now: u64) -> Duration {
        let estimate = Duration::from_nanos(backend.latency_estimate(now).unwrap_or(0.0) as u64);
        (estimate * 2).max(Duration::from_secs(1)).min(self.timeouts.upstream_header)
    }

    /// What picking a backend (and waiting for a slot) needs of this upstream.
    pub fn candidates(&self) -> balance::Candidates<'_> {
        balance::Candidates {
            balancer: &*self.balancer,
            backends: &self.backends,
            passive: &self.passive,
            cap: self.max_inflight,
            queue: &self.queue,
            slow_start: self.slow_start,
        }
    }
}
