//! `/metrics`: the live runtime's counters in Prometheus text format, read at scrape time
//! from the same atomics the request path bumps.

use std::sync::atomic::Ordering::Relaxed;

use crate::metrics::StatusCounts;
use crate::runtime::SharedRuntime;

/// A per-backend metric family: name, help, type, and how to read a backend's value.
type BackendFamily =
    (&'static str, &'static str, prometheus_client::metrics::MetricType, fn(&crate::backend::Backend) -> i64);

/// Exposes the live runtime's counters in the Prometheus registry, read at scrape time.
#[derive(Debug)]
pub struct RuntimeCollector(pub SharedRuntime);

impl prometheus_client::collector::Collector for RuntimeCollector {
    fn encode(&self, mut enc: prometheus_client::encoding::DescriptorEncoder) -> Result<(), std::fmt::Error> {
        use prometheus_client::encoding::EncodeMetric;
        use prometheus_client::metrics::MetricType;
        use prometheus_client::metrics::counter::ConstCounter;
        use prometheus_client::metrics::gauge::ConstGauge;

        let rt = self.0.load();
        let m = &rt.metrics;

        let mut family = enc.encode_descriptor(
            "balancer_requests",
            "Requests answered, by upstream, backend and status code (empty labels: none was chosen).",
            None,
            MetricType::Counter,
        )?;
        let mut counts = |up: &str, backend: &str, statuses: &StatusCounts| -> Result<(), std::fmt::Error> {
            for (code, n) in statuses.snapshot() {
                let code = if code == 0 { "other".to_owned() } else { code.to_string() };
                let labels = [("upstream", up), ("backend", backend), ("code", code.as_str())];
                ConstCounter::new(n).encode(family.encode_family(&labels)?)?;
            }
            Ok(())
        };
        counts("", "", &m.unrouted)?;
        for up in &rt.upstreams {
            counts(&up.name, "", &up.stats.unattributed)?;
            for b in &up.backends {
                counts(&up.name, &b.url, &b.statuses)?;
            }
        }

        upstream_histogram(
            &mut enc,
            &rt,
            "balancer_request_duration_seconds",
            "Time from request head to the end of the response body, by upstream.",
            |up| &up.stats.durations,
        )?;

        let mut family = enc.encode_descriptor(
            "balancer_queue_depth",
            "Requests waiting for a backend under max_inflight, by upstream.",
            None,
            MetricType::Gauge,
        )?;
        for up in &rt.upstreams {
            ConstGauge::new(up.queue.depth() as i64)
                .encode(family.encode_family(&[("upstream", up.name.as_str())])?)?;
        }
        upstream_histogram(
            &mut enc,
            &rt,
            "balancer_queue_wait_seconds",
            "How long requests that got a backend slot waited in the queue, by upstream.",
            |up| &up.queue.waits,
        )?;
        let mut family = enc.encode_descriptor(
            "balancer_queue_rejected",
            "Requests answered 503 by the queue, by upstream and reason (full, timeout).",
            None,
            MetricType::Counter,
        )?;
        for up in &rt.upstreams {
            for (reason, n) in [("full", &up.queue.rejected_full), ("timeout", &up.queue.rejected_timeout)] {
                let labels = [("upstream", up.name.as_str()), ("reason", reason)];
                ConstCounter::new(n.load(Relaxed)).encode(family.encode_family(&labels)?)?;
            }
        }

        let mut family = enc.encode_descriptor(
            "balancer_dns_failures",
            "Lookups of backend host names that failed or found no address, by upstream.",
            None,
            MetricType::Counter,
        )?;
        for (up, cfg) in rt.upstreams.iter().zip(&rt.config.upstreams) {
            if cfg.backends.iter().any(|b| b.name.is_some()) {
                ConstCounter::new(up.stats.dns_failures.load(Relaxed))
                    .encode(family.encode_family(&[("upstream", up.name.as_str())])?)?;
            }
        }

        // One family per backend property, each labelled by upstream and backend.
        let per_backend: [BackendFamily; 6] = [
            (
                "balancer_backend_up",
                "1 when the backend receives traffic: active checks pass and passive checks have not taken it out.",
                MetricType::Gauge,
                |b| i64::from(b.is_healthy()),
            ),
            ("balancer_backend_inflight", "Requests in flight to the backend.", MetricType::Gauge, |b| {
                b.inflight() as i64
            }),
            (
                "balancer_backend_failures",
                "Failed attempts on the backend: connect errors, resets, timeouts.",
                MetricType::Counter,
                |b| b.failures() as i64,
            ),
            (
                "balancer_passive_ejections_refused",
                "Passive ejections that were due but refused: they would have taken out more than max_ejected_percent of the upstream, or its last backend up.",
                MetricType::Counter,
                |b| b.ejections_refused() as i64,
            ),
            (
                "balancer_backend_connections_opened",
                "TCP connections opened to the backend (requests per connection opened is the reuse rate).",
                MetricType::Counter,
                |b| b.pool.opened() as i64,
            ),
            (
                "balancer_backend_connection_waits",
                "Requests that waited for a connection to the backend because 64 were being opened already.",
                MetricType::Counter,
                |b| b.pool.waits() as i64,
            ),
        ];
        for (name, help, kind, value) in per_backend {
            let mut family = enc.encode_descriptor(name, help, None, kind)?;
            for u in &rt.upstreams {
                for b in &u.backends {
                    let labels = [("upstream", u.name.as_str()), ("backend", &*b.url)];
                    let series = family.encode_family(&labels)?;
                    match kind {
                        MetricType::Counter => ConstCounter::new(value(b) as u64).encode(series)?,
                        _ => ConstGauge::new(value(b)).encode(series)?,
                    }
                }
            }
        }

        let mut family = enc.encode_descriptor(
            "balancer_rate_limited",
            "Requests refused with 429, by rate limit.",
            None,
            MetricType::Counter,
        )?;
        for (name, n) in m.rate_limited_snapshot() {
            ConstCounter::new(n).encode(family.encode_family(&[("limit", name.as_str())])?)?;
        }

        if let Some(store) = &rt.limit_store {
            let family = enc.encode_descriptor(
                "balancer_limit_store_up",
                "1 while [limit_store] answers shared rate-limit decisions; 0 while on_error applies.",
                None,
                MetricType::Gauge,
            )?;
            ConstGauge::new(i64::from(store.is_up())).encode(family)?;
        }
        let family = enc.encode_descriptor(
            "balancer_limit_store_errors",
            "Failed [limit_store] operations: refused, timed out, or an error reply.",
            None,
            MetricType::Counter,
        )?;
        ConstCounter::new(m.limit_store_errors.load(Relaxed)).encode(family)?;

        if !rt.caches.is_empty() {
            let mut family = enc.encode_descriptor(
                "balancer_cache_requests",
                "Requests on cached routes, by cache and result (hit, miss, stale, revalidated, bypass).",
                None,
                MetricType::Counter,
            )?;
            for cache in &rt.caches {
                for (result, n) in cache.results() {
                    let labels = [("cache", cache.name.as_str()), ("result", result)];
                    ConstCounter::new(n).encode(family.encode_family(&labels)?)?;
                }
            }
            let mut family = enc.encode_descriptor(
                "balancer_cache_bytes",
                "Bytes held by each cache, heads and bodies (bounded by max_size).",
                None,
                MetricType::Gauge,
            )?;
            for cache in &rt.caches {
                let bytes = i64::try_from(cache.bytes()).unwrap_or(i64::MAX);
                ConstGauge::new(bytes).encode(family.encode_family(&[("cache", cache.name.as_str())])?)?;
            }
        }
        if let Some(export) = &rt.span_export {
            let c = &export.counters;
            let family = enc.encode_descriptor(
                "balancer_spans_exported",
                "Spans an OTLP collector accepted ([tracing] otlp_endpoint).",
                None,
                MetricType::Counter,
            )?;
            ConstCounter::new(c.exported.load(Relaxed)).encode(family)?;
            let mut family = enc.encode_descriptor(
                "balancer_spans_dropped",
                "Spans not exported, by reason: queue_full (the exporter fell behind), export_failed (the collector was down, slow or refused).",
                None,
                MetricType::Counter,
            )?;
            for (reason, n) in [("queue_full", &c.dropped_full), ("export_failed", &c.failed)] {
                ConstCounter::new(n.load(Relaxed)).encode(family.encode_family(&[("reason", reason)])?)?;
            }
        }

        let mut family =
            enc.encode_descriptor("balancer_config_reloads", "Config reloads, by result.", None, MetricType::Counter)?;
        ConstCounter::new(m.reloads_success.load(Relaxed)).encode(family.encode_family(&[("result", "success")])?)?;
        ConstCounter::new(m.reloads_failure.load(Relaxed)).encode(family.encode_family(&[("result", "failure")])?)?;

        let family =
            enc.encode_descriptor("balancer_client_connections", "Open client connections.", None, MetricType::Gauge)?;
        ConstGauge::new(m.client_connections.load(Relaxed)).encode(family)?;
        let family = enc.encode_descriptor(
            "balancer_client_connections_parked",
            "Idle keep-alive client connections parked (only their socket is kept).",
            None,
            MetricType::Gauge,
        )?;
        ConstGauge::new(m.parked_connections.load(Relaxed)).encode(family)?;
        Ok(())
    }
}

/// One histogram family with a series per upstream.
fn upstream_histogram(
    enc: &mut prometheus_client::encoding::DescriptorEncoder<'_>,
    rt: &crate::runtime::Runtime,
    name: &str,
    help: &str,
    of: impl Fn(&crate::runtime::Upstream) -> &crate::metrics::LatencyHistogram,
) -> Result<(), std::fmt::Error> {
    use prometheus_client::encoding::NoLabelSet;
    let mut family = enc.encode_descriptor(name, help, None, prometheus_client::metrics::MetricType::Histogram)?;
    for up in &rt.upstreams {
        let (sum, count, buckets) = of(up).snapshot();
        family
            .encode_family(&[("upstream", up.name.as_str())])?
            .encode_histogram::<NoLabelSet>(sum, count, &buckets, None)?;
    }
    Ok(())
}
