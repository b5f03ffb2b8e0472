//! [`Config`] + the previous [`Runtime`] -> the next [`Runtime`].

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;

use super::router::Router;
use super::{Runtime, Upstream};
use crate::backend::{Backend, FoundAt};
use crate::balance;
use crate::cache::Cache;
use crate::config::{BackendConfig, Config};
use crate::discovery::Resolved;
use crate::limit::{LimitStore, RateLimiter};
use crate::metrics::Metrics;
use crate::otlp::SpanExport;

/// Compiles `config`, reusing the `Arc<Backend>` (health, counters, pool) of every backend
/// whose upstream name, URL and host name are unchanged from `previous`. A backend host
/// name stands for each of its addresses in `resolved`.
pub fn build(config: Config, previous: Option<&Runtime>, generation: u64, resolved: Resolved) -> Runtime {
    let metrics = previous.map_or_else(|| Arc::new(Metrics::default()), |p| p.metrics.clone());
    // A limit whose definition did not change keeps its buckets.
    let limits: Vec<Arc<RateLimiter>> = config
        .rate_limits
        .iter()
        .map(|(name, cfg)| {
            let kept = previous.and_then(|p| p.limits.iter().find(|l| l.name == *name && l.config == *cfg));
            match kept {
                Some(l) => l.clone(),
                None => Arc::new(RateLimiter::new(name, cfg.clone(), metrics.rate_limited_counter(name))),
            }
        })
        .collect();
    // The store (its connection and state) is kept while its config is unchanged.
    let limit_store = config.limit_store.as_ref().map(|cfg| {
        match previous.and_then(|p| p.limit_store.as_ref()).filter(|s| s.config == *cfg) {
            Some(kept) => kept.clone(),
            None => Arc::new(LimitStore::new(cfg.clone(), metrics.limit_store_errors.clone())),
        }
    });
    let span_export = config.otlp_endpoint.as_ref().map(|endpoint| {
        match previous.and_then(|p| p.span_export.as_ref()).filter(|e| e.configured == *endpoint) {
            Some(kept) => kept.clone(),
            None => Arc::new(SpanExport::new(endpoint.clone())),
        }
    });
    let limit_index = |name: &String| limits.iter().position(|l| l.name == *name).expect("validated limit name");
    // Ascending and without repeats, like every list of limit indices: it is the order
    // their shard locks are taken in, so any other order could deadlock two requests.
    let mut server_limits: Vec<usize> = config.server.rate_limit.iter().map(limit_index).collect();
    server_limits.sort_unstable();
    server_limits.dedup();
    let route_limits = |names: &[String]| {
        let mut ids: Vec<usize> = server_limits.iter().copied().chain(names.iter().map(limit_index)).collect();
        ids.sort_unstable();
        ids.dedup();
        ids
    };
    let upstreams: Vec<Upstream> = config
        .upstreams
        .iter()
        .map(|up| {
            let old = previous.and_then(|p| p.upstreams.iter().find(|o| o.name == up.name));
            let tls_for = |b: &crate::config::BackendConfig| {
                (b.scheme == http::uri::Scheme::HTTPS).then(|| up.tls.clone()).flatten()
            };
            // Each entry as written, or each address its name resolves to, with its weight.
            let mut found: Vec<(&BackendConfig, Option<FoundAt>)> = Vec::new();
            for b in &up.backends {
                match &b.name {
                    None => found.push((b, None)),
                    Some(name) => {
                        let name: Arc<str> = name.as_str().into();
                        let port = b.authority.port_u16().expect("validated URLs carry a port");
                        found.extend(
                            resolved
                                .addresses(&name)
                                .iter()
                                .map(|ip| (b, Some((name.clone(), SocketAddr::new(*ip, port))))),
                        );
                    }
                }
            }
            // A backend that joins an upstream already serving ramps up under slow_start.
            let joins_running = old.is_some_and(|o| !o.backends.is_empty());
            // The old backends by address and name: kept ones keep their state (a lookup,
            // not a scan, so a 10,000-backend reload stays linear).
            let old_backends: HashMap<(&str, Option<&Arc<str>>), &Arc<Backend>> = old
                .map(|o| o.backends.iter().map(|ob| ((&*ob.url, ob.name.as_ref()), ob)).collect())
                .unwrap_or_default();
            let backends: Vec<Arc<Backend>> = found
                .iter()
                .map(|(b, addr)| {
                    let url = match addr {
                        None => b.url.clone(),
                        Some((_, a)) => format!("{}://{a}", b.scheme),
                    };
                    let name = addr.as_ref().map(|a| &a.0);
                    let kept = old_backends.get(&(url.as_str(), name)).copied();
                    match kept {
                        Some(existing) => {
                            existing.pool.reconfigure(up.pool, tls_for(b));
                            if up.passive.max_fails == 0 {
                                existing.reset_passive();
                            }
                            existing.clone()
                        }
                        None => {
                            let new =
                                Backend::new(&up.name, &url, b.authority.clone(), addr.clone(), up.pool, tls_for(b));
                            if joins_running {
                                new.start_ramp();
                            }
                            Arc::new(new)
                        }
                    }
                })
                .collect();
            let weights: Vec<u32> = found.iter().map(|(b, _)| b.weight).collect();
            let queue = old.map(|o| o.queue.clone()).unwrap_or_default();
            queue.configure(up.max_inflight, up.queue.map(|q| (q.max, q.timeout)));
            let capped = (up.max_inflight > 0).then(|| queue.clone());
            backends.iter().for_each(|b| b.set_queue(capped.clone()));
            let sticky = up.sticky.as_ref().map(|s| balance::Sticky::new(s, &backends));
            Upstream {
                name: up.name.clone(),
                strategy: up.strategy,
                balancer: balance::for_strategy(up.strategy, &backends, &weights),
                backends,
                weights,
                preserve_host: up.preserve_host,
                retries: up.retries,
                timeouts: up.timeouts,
                passive: up.passive,
                health_check: up.health_check.clone(),
                stats: old.map(|o| o.stats.clone()).unwrap_or_default(),
                max_inflight: up.max_inflight,
                queue,
                retry_budget: up.retry_budget,
                hash_key: up.hash_key.clone(),
                sticky,
                slow_start: up.slow_start,
            }
        })
        .collect();

    // What the reload removed: its queued requests are answered now, and a removed
    // backend's released slots no longer go to its old upstream's queue.
    for old in previous.map_or(&[][..], |p| &p.upstreams[..]) {
        let Some(new) = upstreams.iter().find(|u| u.name == old.name) else {
            old.queue.close();
            old.backends.iter().for_each(|b| {
                b.set_queue(None);
                b.retire();
            });
            continue;
        };
        let kept: HashSet<*const Backend> = new.backends.iter().map(Arc::as_ptr).collect();
        for b in old.backends.iter().filter(|b| !kept.contains(&Arc::as_ptr(b))) {
            b.set_queue(None);
            b.retire();
        }
    }

    // A cache whose settings did not change keeps its entries and counters.
    let caches: Vec<Arc<Cache>> = config
        .caches
        .iter()
        .map(|(name, cfg)| {
            let kept = previous.and_then(|p| p.caches.iter().find(|c| c.name == *name && c.config == *cfg));
            kept.cloned().unwrap_or_else(|| Arc::new(Cache::new(name, *cfg)))
        })
        .collect();
    let cache_named = |name: &Option<String>| {
        name.as_ref().map(|n| caches.iter().find(|c| c.name == *n).expect("validated cache name").clone())
    };
    let index_of = |name: &str| upstreams.iter().position(|u| u.name == name).expect("validated upstream name");
    let routes = if config.routes.is_empty() && upstreams.len() == 1 {
        vec![super::router::Route {
            host: None,
            prefix: "/".into(),
            upstream: 0,
            strip_prefix: false,
            limits: server_limits.clone(),
            cache: None,
        }]
    } else {
        config
            .routes
            .iter()
            .map(|r| Router::route(r, index_of(&r.upstream), route_limits(&r.rate_limit), cache_named(&r.cache)))
            .collect()
    };
    let router = Router::new(routes);
    Runtime {
        generation,
        config,
        router,
        upstreams,
        metrics,
        limits,
        server_limits,
        limit_store,
        resolved,
        caches,
        span_export,
    }
}
