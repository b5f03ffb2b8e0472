//! Memory of a rate limit with 1,000,000 distinct keys, and what remains once they have
//! gone idle and the sweeper has run. `cargo bench --bench rate_limit_memory`.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use balancer::config::{LimitKey, RateLimitConfig};
use balancer::limit::{Key, RateLimiter, admit};

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

fn main() {
    // Criterion-style arguments (`--bench`) are accepted and ignored.
    const KEYS: u32 = 1_000_000;
    // 100 per second, burst 100: an idle key is full again within a second.
    let cfg =
        RateLimitConfig { rate: 100, per: Duration::from_secs(1), burst: 100, key: LimitKey::ClientIp, shared: false };
    let limit = RateLimiter::new("per_ip", cfg, Arc::default());
    let before = rss_kib();
    let start = Instant::now();
    for i in 0..KEYS {
        let key = Key::Ip(IpAddr::from((0x0a00_0000 + i).to_be_bytes()));
        assert!(admit(&[(&limit, key)]).is_ok());
    }
    let fill = start.elapsed();
    let loaded = rss_kib();
    println!("{KEYS} keys admitted in {fill:?} ({:.0} ns per decision)", fill.as_nanos() as f64 / f64::from(KEYS));
    println!("resident memory: {before} KiB before, {loaded} KiB with {} buckets", limit.len());
    std::thread::sleep(Duration::from_millis(1100));
    let start = Instant::now();
    let left = limit.sweep();
    let swept = rss_kib();
    println!("after they went idle and one sweep ({:?}): {left} buckets, {swept} KiB resident", start.elapsed());
    assert_eq!(left, 0);
}
