//! Rate limits shared between instances through a real redis-server (SPEC section 10),
//! through the real binary: several balancer processes on one store.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::redis::{RedisServer, Relay};
use common::*;
use http::Request;
use http_body_util::Full;

/// A config with a `[limit_store]` at `url` and one shared limit `per_key` on every
/// request, keyed by `X-Key`: `burst` at once, one more every 10 s.
fn config(up: SocketAddr, url: &str, on_error: &str, burst: u64) -> String {
    let extra = format!(
        r#"
[limit_store]
url = "{url}"
key_prefix = "test:"
timeout = "50ms"
on_error = "{on_error}"

[rate_limits.per_key]
rate = 6
per = "1m"
burst = {burst}
key = "header:X-Key"
shared = true
"#
    );
    with_server_limit(config_with_admin(&[up], &extra))
}

fn with_server_limit(cfg: String) -> String {
    cfg.replacen("listen = [\"127.0.0.1:0\"]", "listen = [\"127.0.0.1:0\"]\nrate_limit = \"per_key\"", 1)
}

async fn get_key(addr: SocketAddr, key: &str) -> Reply {
    let req = Request::get("/").header("host", "x").header("x-key", key).body(Full::default()).unwrap();
    send(addr, req).await
}

async fn status(b: &Balancer) -> serde_json::Value {
    get(b.admin(), "/status").await.json()
}

async fn reload(b: &Balancer) -> Reply {
    send(b.admin(), Request::post("/reload").header("host", "x").body(Full::default()).unwrap()).await
}

/// Waits until the balancer's store is up and counts `instances`.
async fn wait_up(b: &Balancer, instances: u64) {
    let ok = wait_until(Duration::from_secs(5), || async {
        let s = status(b).await;
        s["limit_store"]["up"] == true && s["limit_store"]["instances"] == instances
    })
    .await;
    assert!(ok, "store not up with {instances} instances: {}", status(b).await);
}

#[tokio::test(flavor = "multi_thread")]
async fn two_instances_admit_exactly_burst_between_them_and_agree_on_retry_after() {
    let redis = RedisServer::start();
    let up = Upstream::start("a").await;
    let cfg = config(up.addr, &redis.url(), "local", 10);
    let (a, b) = (Balancer::start(&cfg, &[]), Balancer::start(&cfg, &[]));
    wait_up(&a, 2).await;
    wait_up(&b, 2).await;

    let mut admitted = 0;
    let mut refusals = Vec::new();
    for i in 0..30 {
        let r = get_key(if i % 2 == 0 { a.addr() } else { b.addr() }, "user-1").await;
        match r.status.as_u16() {
            200 => admitted += 1,
            429 => refusals.push(r),
            s => panic!("status {s}"),
        }
    }
    assert_eq!(admitted, 10, "exactly burst between the two instances");
    assert_eq!(up.hits(), 10);
    // 6 a minute: 10 s to one token, 100 s to full; the same from either instance.
    for r in &refusals {
        assert_eq!(r.header("retry-after"), Some("10"));
        assert_eq!(r.header("ratelimit-limit"), Some("10"));
        assert_eq!(r.header("ratelimit-remaining"), Some("0"));
        assert_eq!(r.header("ratelimit-reset"), Some("100"));
    }
    assert_eq!(get_key(a.addr(), "user-2").await.status, 200, "another key has its own bucket");

    let text = get(a.admin(), "/metrics").await.text();
    assert_eq!(metric(&text, "balancer_limit_store_up"), Some(1.0), "{text}");
    assert_eq!(metric(&text, "balancer_limit_store_errors_total"), Some(0.0), "{text}");
    let (ra, rb) = (
        metric(&text, "balancer_rate_limited_total{limit=\"per_key\"}").unwrap(),
        metric(&get(b.admin(), "/metrics").await.text(), "balancer_rate_limited_total{limit=\"per_key\"}").unwrap(),
    );
    assert_eq!(ra + rb, 20.0);
    let s = status(&a).await;
    assert_eq!(s["limit_store"]["url"], redis.url());
    assert!(s["limit_store"]["last_error"].is_null(), "{s}");
    // Every key is under the prefix: the presence set and one bucket per client key.
    let keys = redis.keys("*");
    assert!(keys.iter().all(|k| k.starts_with("test:")), "{keys:?}");
    assert_eq!(keys.len(), 3, "{keys:?}");

    // Buckets live in the store: both instances restarted, the key is still limited.
    drop((a, b));
    let (a, b) = (Balancer::start(&cfg, &[]), Balancer::start(&cfg, &[]));
    wait_up(&a, 2).await;
    let r = get_key(a.addr(), "user-1").await;
    assert_eq!(r.status, 429, "the bucket survived the restart");
    assert_eq!(get_key(b.addr(), "user-1").await.status, 429);
    assert_eq!(get_key(b.addr(), "user-2").await.status, 200);
}

/// The store killed with two instances on it: `on_error` decides, no request waits
/// longer than `timeout` and a margin, and shared decisions resume once it is back.
async fn store_killed(on_error: &str) -> (Vec<u16>, Balancer, Balancer, RedisServer) {
    let mut redis = RedisServer::start();
    let up = Upstream::start("a").await;
    let cfg = config(up.addr, &redis.url(), on_error, 10);
    let (a, b) = (Balancer::start(&cfg, &[]), Balancer::start(&cfg, &[]));
    wait_up(&a, 2).await;
    wait_up(&b, 2).await;
    assert_eq!(get_key(a.addr(), "k").await.status, 200);
    redis.kill();
    let mut statuses = Vec::new();
    for _ in 0..12 {
        let t = Instant::now();
        let r = get_key(a.addr(), "fresh").await;
        assert!(t.elapsed() < Duration::from_millis(50 + 250), "took {:?}", t.elapsed());
        if r.status == 503 {
            assert_eq!(r.header("retry-after"), Some("1"));
        }
        statuses.push(r.status.as_u16());
    }
    let text = get(a.admin(), "/metrics").await.text();
    assert_eq!(metric(&text, "balancer_limit_store_up"), Some(0.0), "{text}");
    assert!(metric(&text, "balancer_limit_store_errors_total").unwrap() >= 1.0, "{text}");
    let s = status(&a).await;
    assert_eq!(s["limit_store"]["up"], false);
    assert!(s["limit_store"]["last_error"].is_string(), "{s}");
    let warns = a.logs_matching("limit store is failing; shared limits follow on_error until it answers again");
    assert_eq!(warns.len(), 1, "one warn line per change of state");

    // Back: shared decisions resume within about 2 s (an empty store: buckets full).
    redis.start_again();
    let t = Instant::now();
    wait_up(&a, 2).await;
    assert!(t.elapsed() < Duration::from_secs(3), "resumed after {:?}", t.elapsed());
    let mut admitted = 0;
    for i in 0..14 {
        if get_key(if i % 2 == 0 { a.addr() } else { b.addr() }, "after").await.status == 200 {
            admitted += 1;
        }
    }
    assert_eq!(admitted, 10, "shared again");
    assert_eq!(a.logs_matching("limit store answers again; shared decisions resume").len(), 1);
    (statuses, a, b, redis)
}

#[tokio::test(flavor = "multi_thread")]
async fn store_down_local_enforces_this_instances_share() {
    let (statuses, ..) = store_killed("local").await;
    // Two instances at the last contact: burst 10 becomes 5 here.
    assert_eq!(statuses.iter().filter(|&&s| s == 200).count(), 5, "{statuses:?}");
    assert!(statuses.iter().all(|&s| s == 200 || s == 429), "{statuses:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn store_down_allow_admits() {
    let (statuses, ..) = store_killed("allow").await;
    assert!(statuses.iter().all(|&s| s == 200), "{statuses:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn store_down_deny_answers_503() {
    let (statuses, ..) = store_killed("deny").await;
    assert!(statuses.iter().all(|&s| s == 503), "{statuses:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_slow_store_counts_as_down() {
    let redis = RedisServer::start();
    let relay = Relay::start(redis.addr());
    let up = Upstream::start("a").await;
    let b = Balancer::start(&config(up.addr, &relay.url(), "deny", 10), &[]);
    wait_up(&b, 1).await;
    assert_eq!(get_key(b.addr(), "k").await.status, 200);
    relay.set_delay(Duration::from_millis(300));
    for _ in 0..5 {
        let t = Instant::now();
        let r = get_key(b.addr(), "k").await;
        assert!(t.elapsed() < Duration::from_millis(50 + 250), "took {:?}", t.elapsed());
        assert_eq!(r.status, 503);
    }
    assert_eq!(status(&b).await["limit_store"]["up"], false);
    relay.set_delay(Duration::ZERO);
    // Replies already held back drain first; then the probe finds it answering.
    wait_up(&b, 1).await;
    assert_eq!(get_key(b.addr(), "k").await.status, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_key_full_of_lua_and_redis_metacharacters_is_just_a_key() {
    let redis = RedisServer::start();
    let up = Upstream::start("a").await;
    let b = Balancer::start(&config(up.addr, &redis.url(), "deny", 3), &[]);
    wait_up(&b, 1).await;
    let nasty = r#"x']] ; redis.call('FLUSHALL') --[[ {tag} *? [a-z] \ " $1 %s KEYS[1] ARGV[2] "#;
    let statuses: Vec<u16> = futures_statuses(b.addr(), nasty, 5).await;
    assert_eq!(statuses, [200, 200, 200, 429, 429]);
    assert_eq!(get_key(b.addr(), "{tag}").await.status, 200, "another key, even one inside the first");
    let keys = redis.keys("test:per_key:*");
    assert_eq!(keys.len(), 2, "{keys:?}");
    assert!(keys.iter().all(|k| k.matches('{').count() == 1 && k.len() == keys[0].len()), "{keys:?}");
    assert_eq!(status(&b).await["limit_store"]["up"], true);
}

async fn futures_statuses(addr: SocketAddr, key: &str, n: usize) -> Vec<u16> {
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(get_key(addr, key).await.status.as_u16());
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn a_reload_adds_changes_and_removes_the_store() {
    let redis = RedisServer::start();
    let up = Upstream::start("a").await;
    let local = with_server_limit(config_with_admin(
        &[up.addr],
        "[rate_limits.per_key]\nrate = 6\nper = \"1m\"\nburst = 3\nkey = \"header:X-Key\"\n",
    ));
    let b = Balancer::start(&local, &[]);
    assert!(status(&b).await["limit_store"].is_null());
    assert_eq!(futures_statuses(b.addr(), "k", 4).await, [200, 200, 200, 429]);

    // Added: the limit turns shared and starts full.
    b.write_config(&config(up.addr, &redis.url(), "deny", 3));
    assert_eq!(reload(&b).await.status, 200);
    wait_up(&b, 1).await;
    assert_eq!(futures_statuses(b.addr(), "k", 4).await, [200, 200, 200, 429]);
    assert_eq!(redis.keys("test:per_key:*").len(), 1);

    // Changed: another prefix, a new connection; the old prefix's bucket is left alone.
    b.write_config(
        &config(up.addr, &redis.url(), "deny", 3).replace("key_prefix = \"test:\"", "key_prefix = \"other:\""),
    );
    assert_eq!(reload(&b).await.status, 200);
    wait_up(&b, 1).await;
    assert_eq!(futures_statuses(b.addr(), "k", 4).await, [200, 200, 200, 429]);
    assert_eq!(redis.keys("other:per_key:*").len(), 1);

    // Removed: local again, full again.
    b.write_config(&local);
    assert_eq!(reload(&b).await.status, 200);
    assert!(status(&b).await["limit_store"].is_null());
    assert_eq!(futures_statuses(b.addr(), "k", 4).await, [200, 200, 200, 429]);

    // A shared limit without a store is refused, and the running config stays.
    b.write_config(&local.replace("key = \"header:X-Key\"", "key = \"header:X-Key\"\nshared = true"));
    let r = reload(&b).await;
    assert_eq!(r.status, 422);
    assert!(r.text().contains("a shared limit needs a [limit_store]"), "{}", r.text());
}

#[tokio::test(flavor = "multi_thread")]
async fn start_up_and_check_do_not_need_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let up = Upstream::start("a").await;
    let dead = format!("redis://{}/0", dead_addr());
    std::fs::write(dir.path().join("ok.toml"), config(up.addr, &dead, "deny", 3)).unwrap();
    let (code, out, err) = run_cli(&["--check", "-c", "ok.toml"], dir.path());
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("limit store: redis://"), "{out}");
    let bad = config(up.addr, "http://127.0.0.1:6379", "deny", 3);
    std::fs::write(dir.path().join("bad.toml"), bad).unwrap();
    let (code, _, err) = run_cli(&["--check", "-c", "bad.toml"], dir.path());
    assert_eq!(code, 1);
    assert!(err.contains("limit_store.url") || err.contains("not a Redis URL"), "{err}");
    let secret = config(up.addr, "redis://u:hunter2@127.0.0.1:notaport/0", "deny", 3);
    std::fs::write(dir.path().join("secret.toml"), secret).unwrap();
    let (code, _, err) = run_cli(&["--check", "-c", "secret.toml"], dir.path());
    assert_eq!(code, 1);
    assert!(!err.contains("hunter2"), "{err}");

    // Start-up with an unreachable store: a warning, on_error applies.
    let b = Balancer::start(&config(up.addr, &dead, "deny", 3), &[]);
    b.wait_for_log(Duration::from_secs(5), |l| {
        l["message"].as_str().is_some_and(|m| m.starts_with("limit store is failing"))
    });
    assert_eq!(get_key(b.addr(), "k").await.status, 503);
    let s = status(&b).await;
    assert_eq!(s["limit_store"]["up"], false);
}
