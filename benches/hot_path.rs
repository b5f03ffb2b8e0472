//! Criterion benches of the per-request decisions: picking a backend, matching a route,
//! admitting through a rate limit, the trace context. `cargo bench --bench hot_path`.

use std::hint::black_box;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use balancer::backend::{Backend, SlotQueue};
use balancer::balance::{
    Affinity, Balancer, Candidates, ConsistentHash, LeastConnections, LeastLatency, RoundRobin, hash_of,
};
use balancer::config::{HostMatch, LimitKey, PassiveConfig, PoolConfig, RateLimitConfig};
use balancer::limit::{Key, RateLimiter, admit};
use balancer::path::normalise;
use balancer::runtime::router::{Route, Router};
use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};

fn backends(n: usize) -> Vec<Arc<Backend>> {
    let pool =
        PoolConfig { keepalive: 1, idle_timeout: Duration::from_secs(1), connect_timeout: Duration::from_secs(1) };
    (0..n)
        .map(|i| {
            let auth: http::uri::Authority =
                format!("10.{}.{}.{}:8000", i >> 16, (i >> 8) & 255, i & 255).parse().unwrap();
            Arc::new(Backend::new("bench", &format!("http://{auth}"), auth, None, pool, None))
        })
        .collect()
}

fn pickers(c: &mut Criterion) {
    let mut g = c.benchmark_group("pick");
    for n in [2usize, 100, 10_000] {
        let bs = backends(n);
        let weights: Vec<u32> = (0..n).map(|i| 1 + (i % 3) as u32).collect();
        let rr = RoundRobin::new(&weights);
        g.bench_with_input(BenchmarkId::new("round_robin", n), &n, |b, _| {
            b.iter(|| black_box(rr.pick(&bs, 0, &mut |_, b| b.is_healthy())))
        });
        let lc = LeastConnections::new(&bs, &weights);
        g.bench_with_input(BenchmarkId::new("least_connections", n), &n, |b, _| {
            b.iter(|| black_box(lc.pick(&bs, 0, &mut |_, b| b.is_healthy())))
        });
        // A new key each time, hashed as the request path hashes it (a `hash_key` of 8 bytes).
        let ch = ConsistentHash::new(bs.iter().map(|b| &*b.url), &weights);
        let mut key = 0u64;
        g.bench_with_input(BenchmarkId::new("consistent_hash", n), &n, |b, _| {
            b.iter(|| {
                key += 1;
                black_box(ch.pick(&bs, hash_of(&key.to_le_bytes()), &mut |_, b| b.is_healthy()))
            })
        });
        // Every backend measured (1 to 10 ms), as after the first requests.
        let now = balancer::backend::clock();
        bs.iter().enumerate().for_each(|(i, b)| b.record_latency(Duration::from_millis(1 + i as u64 % 10), now));
        let ll = LeastLatency::new(&weights);
        g.bench_with_input(BenchmarkId::new("least_latency", n), &n, |b, _| {
            b.iter(|| black_box(ll.pick(&bs, 0, &mut |_, b| b.is_healthy())))
        });
        // What a request pays in all: the pick, and the index updates of `begin` and of
        // the in-flight guard's drop. Half the backends hold a request, so the keys differ.
        let _held: Vec<_> = bs.iter().step_by(2).map(|b| b.begin()).collect();
        g.bench_with_input(BenchmarkId::new("least_connections_pick_begin_end", n), &n, |b, _| {
            b.iter(|| {
                let i = lc.pick(&bs, 0, &mut |_, b| b.is_healthy()).unwrap();
                drop(black_box(bs[i].begin()));
            })
        });
    }
    g.finish();
}

/// What a request pays for a backend slot: a round-robin pick, the slot taken and given
/// back, with no cap (`max_inflight = 0`, the default) and with one that nobody waits at.
fn slots(c: &mut Criterion) {
    let mut g = c.benchmark_group("slot");
    let bs = backends(4);
    let rr = RoundRobin::new(&[1, 1, 1, 1]);
    let passive = PassiveConfig { max_fails: 3, fail_timeout: Duration::from_secs(10), max_ejected_percent: 50 };
    for cap in [0u32, 64] {
        let queue = Arc::new(SlotQueue::default());
        queue.configure(cap, Some((100, Duration::from_secs(5))));
        bs.iter().for_each(|b| b.set_queue((cap > 0).then(|| queue.clone())));
        let candidates = Candidates {
            balancer: &rr,
            backends: &bs,
            passive: &passive,
            cap,
            queue: &queue,
            slow_start: Duration::ZERO,
        };
        let name = if cap == 0 { "no_cap" } else { "cap_nobody_waits" };
        g.bench_function(name, |b| {
            b.iter(|| {
                let slot = candidates.take(Affinity::default(), &|_| true).expect("a slot now").expect("a slot");
                drop(black_box(slot.guard));
            })
        });
    }
    g.finish();
}

fn routes(c: &mut Criterion) {
    let mut g = c.benchmark_group("route");
    for n in [10usize, 1000] {
        let table: Vec<Route> = (0..n)
            .map(|i| Route {
                host: (i % 2 == 0).then(|| HostMatch::Exact(format!("app{i}.example.com"))),
                prefix: format!("/svc{i}/v1"),
                upstream: i,
                strip_prefix: false,
                limits: vec![],
                cache: None,
            })
            .collect();
        let router = Router::new(table);
        let path = format!("/svc{}/v1/users/42", n - 1);
        g.bench_with_input(BenchmarkId::new("match", n), &n, |b, _| {
            b.iter(|| {
                let p = normalise(black_box(&path));
                black_box(router.find(Some("app.example.com"), &p).map(|r| r.upstream))
            })
        });
    }
    g.finish();
}

fn rate_limit(c: &mut Criterion) {
    let mut g = c.benchmark_group("rate_limit");
    let cfg = RateLimitConfig {
        rate: u64::MAX / 4,
        per: Duration::from_secs(1),
        burst: u64::MAX / 4,
        key: LimitKey::ClientIp,
        shared: false,
    };
    let hot = RateLimiter::new("hot", cfg.clone(), Arc::default());
    let key = Key::Ip("192.0.2.1".parse().unwrap());
    g.bench_function("admit_one_hot_key", |b| b.iter(|| black_box(admit(&[(&hot, key.clone())]).is_ok())));
    let many = RateLimiter::new("many", cfg, Arc::default());
    let mut i: u32 = 0;
    g.bench_function("admit_many_keys", |b| {
        b.iter(|| {
            i = i.wrapping_add(1) % 100_000;
            let k = Key::Ip(IpAddr::from(i.to_be_bytes()));
            black_box(admit(&[(&many, k)]).is_ok())
        })
    });
    g.finish();
}

/// The W3C trace context per request: read (or start) it, write `traceparent`.
fn trace(c: &mut Criterion) {
    use balancer::proxy::trace::{TRACEPARENT, TraceContext};
    let mut g = c.benchmark_group("trace");
    let mut valid = http::HeaderMap::new();
    valid.insert(
        &TRACEPARENT,
        http::HeaderValue::from_static("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
    );
    valid.insert(http::header::ACCEPT, http::HeaderValue::from_static("*/*"));
    let mut none = valid.clone();
    none.remove(&TRACEPARENT);
    let mut out = Vec::with_capacity(128);
    for (name, headers) in [("continue", &valid), ("start", &none)] {
        g.bench_function(name, |b| {
            b.iter(|| {
                out.clear();
                TraceContext::from_headers(black_box(headers)).write_field(&mut out);
                black_box(out.len())
            })
        });
    }
    g.finish();
}

criterion_group!(benches, pickers, routes, rate_limit, slots, trace);
criterion_main!(benches);
