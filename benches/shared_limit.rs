//! One shared rate-limit decision (one EVALSHA of the token-bucket script) against a
//! redis-server on loopback, beside the same decision by a local limit; then the
//! latency distribution of 20,000 shared decisions (p50, p99, max). Skipped, with a
//! message, when `redis-server` is not installed.
//!
//!   cargo bench --bench shared_limit

use std::hint::black_box;
use std::net::{IpAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use balancer::config::{LimitKey, LimitStoreConfig, OnError, RateLimitConfig};
use balancer::limit::{Key, LimitStore, RateLimiter, admit, admit_shared};
use criterion::Criterion;

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_redis(dir: &std::path::Path) -> Option<(Server, u16)> {
    let port = TcpListener::bind("127.0.0.1:0").ok()?.local_addr().ok()?.port();
    let child = Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
        .arg("--dir")
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let server = Server(child);
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Some((server, port))
}

fn main() {
    let dir = tempfile::tempdir().unwrap();
    let Some((_server, port)) = start_redis(dir.path()) else {
        eprintln!("shared_limit: redis-server is not installed (apt-get install redis-server); skipped");
        return;
    };
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let store = Arc::new(LimitStore::new(
        LimitStoreConfig {
            url: format!("redis://127.0.0.1:{port}/0"),
            key_prefix: "bench:".into(),
            timeout: Duration::from_millis(50),
            on_error: OnError::Deny,
        },
        Arc::default(),
    ));
    let stop = tokio_util::sync::CancellationToken::new();
    rt.spawn(store.clone().run(stop.clone()));
    let deadline = Instant::now() + Duration::from_secs(10);
    while !store.is_up() {
        assert!(Instant::now() < deadline, "the store did not come up");
        std::thread::sleep(Duration::from_millis(20));
    }

    // A limit that admits everything: every decision takes a token and writes the bucket.
    let cfg = |shared| RateLimitConfig {
        rate: 1_000_000_000,
        per: Duration::from_secs(1),
        burst: 1_000_000_000,
        key: LimitKey::ClientIp,
        shared,
    };
    let shared = RateLimiter::new("shared", cfg(true), Arc::default());
    let local = RateLimiter::new("local", cfg(false), Arc::default());
    let key = Key::Ip(IpAddr::from([192, 0, 2, 1]));

    let mut c = Criterion::default().configure_from_args();
    let mut g = c.benchmark_group("shared_limit");
    g.bench_function("local_decision", |b| b.iter(|| black_box(admit(&[(&local, key.clone())]).is_ok())));
    g.bench_function("shared_decision", |b| {
        b.iter(|| rt.block_on(async { black_box(admit_shared(&store, &[(&shared, key.clone())]).await.is_ok()) }))
    });
    g.finish();
    c.final_summary();

    let mut took: Vec<Duration> = (0..20_000)
        .map(|i| {
            let key = Key::Ip(IpAddr::from((i as u32).to_be_bytes()));
            let t = Instant::now();
            let ok = rt.block_on(admit_shared(&store, &[(&shared, key)])).is_ok();
            assert!(ok && store.is_up());
            t.elapsed()
        })
        .collect();
    took.sort_unstable();
    let at = |q: f64| took[((took.len() as f64 * q) as usize).min(took.len() - 1)];
    println!(
        "shared decisions (20,000 distinct keys): p50 {:?}, p99 {:?}, p99.9 {:?}, max {:?}",
        at(0.5),
        at(0.99),
        at(0.999),
        took[took.len() - 1]
    );
    stop.cancel();
}
