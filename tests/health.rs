//! Active and passive health checks, and the admin listener that shows them (SPEC
//! sections 4 and 7), with real backends broken on purpose.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::*;

async fn status(b: &Balancer) -> serde_json::Value {
    get(b.admin(), "/status").await.json()
}

fn backend<'a>(status: &'a serde_json::Value, url: &str) -> &'a serde_json::Value {
    status["upstreams"][0]["backends"].as_array().unwrap().iter().find(|b| b["url"] == url).unwrap()
}

const ACTIVE: &str = "[upstreams.app.health_check]\npath = \"/healthz\"\ninterval = \"200ms\"\ntimeout = \"150ms\"\nhealthy_threshold = 2\nunhealthy_threshold = 2\n";

#[tokio::test(flavor = "multi_thread")]
async fn active_checks_take_a_failing_backend_out_and_bring_it_back() {
    active_checks_out_and_back("round-robin").await;
}

/// Least-connections keeps its own index of backends by load, which health changes
/// must reach.
#[tokio::test(flavor = "multi_thread")]
async fn active_checks_out_and_back_under_least_connections() {
    active_checks_out_and_back("least-connections").await;
}

async fn active_checks_out_and_back(strategy: &str) {
    let (a, c) = (Upstream::start("a").await, Upstream::start("b").await);
    let extra = format!("strategy = \"{strategy}\"\n{ACTIVE}");
    let b = Balancer::start(&config_with_admin(&[a.addr, c.addr], &extra), &[]);
    let url_b = format!("http://{}", c.addr);

    c.set_health(500);
    assert!(
        wait_until(Duration::from_secs(3), || async {
            !backend(&status(&b).await, &url_b)["healthy"].as_bool().unwrap()
        })
        .await
    );
    let line = b.wait_for_log(Duration::from_secs(1), |l| l["message"] == "backend down: active checks fail");
    assert_eq!(line["upstream"], "app");
    assert_eq!(line["backend"], url_b);
    assert!(line["reason"].as_str().unwrap().contains("answered 500"), "{line}");
    // While it is down, traffic goes only to the other.
    for _ in 0..6 {
        assert_eq!(get(b.addr(), "/").await.header("x-upstream"), Some("a"));
    }
    let text = get(b.admin(), "/metrics").await.text();
    assert_eq!(
        metric(&text, &format!("balancer_backend_up{{upstream=\"app\",backend=\"{url_b}\"}}")),
        Some(0.0),
        "{text}"
    );

    c.set_health(200);
    assert!(
        wait_until(Duration::from_secs(3), || async {
            backend(&status(&b).await, &url_b)["healthy"].as_bool().unwrap()
        })
        .await
    );
    b.wait_for_log(Duration::from_secs(1), |l| {
        l["message"] == "backend up: active checks pass" && l["backend"] == url_b
    });
    let got: Vec<String> = {
        let mut v = Vec::new();
        for _ in 0..4 {
            v.push(get(b.addr(), "/").await.header("x-upstream").unwrap().to_owned());
        }
        v
    };
    assert!(got.contains(&"b".to_owned()), "back in rotation: {got:?}");
    // Each change was logged exactly once.
    assert_eq!(b.logs_matching("backend down: active checks fail").len(), 1);
    assert_eq!(b.logs_matching("backend up: active checks pass").len(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn no_healthy_backend_is_a_503_with_retry_after() {
    let a = Upstream::start("a").await;
    let b = Balancer::start(&config_with_admin(&[a.addr], ACTIVE), &[]);
    a.set_health(503);
    assert!(wait_until(Duration::from_secs(3), || async { get(b.addr(), "/").await.status == 503 }).await);
    let r = get(b.addr(), "/").await;
    assert_eq!(r.header("retry-after"), Some("1"));
    assert_eq!(r.header("content-type"), Some("text/plain; charset=utf-8"));
    assert!(r.text().contains("no healthy backend"), "{}", r.text());
    let hits = a.hits();
    get(b.addr(), "/").await;
    assert_eq!(a.hits(), hits, "a down backend gets no traffic");
}

#[tokio::test(flavor = "multi_thread")]
async fn passive_checks_eject_after_max_fails_and_a_trial_brings_it_back() {
    passive_eject_and_trial("round-robin").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn passive_eject_and_trial_under_least_connections() {
    passive_eject_and_trial("least-connections").await;
}

async fn passive_eject_and_trial(strategy: &str) {
    let a = Upstream::start("a").await;
    let victim = Upstream::start("v").await;
    let victim_addr = victim.addr;
    let url_v = format!("http://{victim_addr}");
    let extra = format!(
        "strategy = \"{strategy}\"\nretries = 1\n[upstreams.app.passive]\nmax_fails = 2\nfail_timeout = \"1s\"\n"
    );
    let b = Balancer::start(&config_with_admin(&[a.addr, victim_addr], &extra), &[]);
    victim.kill();
    drop(victim);
    // Every request still succeeds (retried on the live backend) while failures add up.
    for _ in 0..6 {
        assert_eq!(get(b.addr(), "/").await.status, 200);
    }
    let s = status(&b).await;
    assert_eq!(backend(&s, &url_v)["healthy"], false, "{s}");
    assert_eq!(backend(&s, &url_v)["failures"], 2, "ejected after exactly max_fails: {s}");
    let line = b.wait_for_log(Duration::from_secs(1), |l| l["message"] == "backend down: passive checks");
    assert!(line["reason"].as_str().unwrap().contains("2 consecutive failures"), "{line}");
    // Bring it back on the same port; after fail_timeout one trial request decides.
    let back = Upstream::start_on(victim_addr, "v", UpstreamOpts::default()).await;
    assert!(
        wait_until(Duration::from_secs(4), || async {
            get(b.addr(), "/").await;
            backend(&status(&b).await, &url_v)["healthy"] == true
        })
        .await
    );
    b.wait_for_log(Duration::from_secs(1), |l| l["message"] == "backend up: back in after passive ejection");
    assert!(back.hits() >= 1);
    // Back in rotation for good, not only for its trial.
    let before = back.hits();
    for _ in 0..6 {
        assert_eq!(get(b.addr(), "/").await.status, 200);
    }
    assert!(back.hits() >= before + 2, "{} of 6 requests after its recovery", back.hits() - before);
}

#[tokio::test(flavor = "multi_thread")]
async fn killing_one_of_three_backends_under_load_loses_no_request() {
    let ups = [Upstream::start("a").await, Upstream::start("b").await, Upstream::start("c").await];
    let b = Balancer::start(&config_with_admin(&[ups[0].addr, ups[1].addr, ups[2].addr], "retries = 1"), &[]);
    let addr = b.addr();
    let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let stop_at = Instant::now() + Duration::from_secs(3);
    let mut clients = Vec::new();
    for _ in 0..6 {
        let (ok, failed) = (ok.clone(), failed.clone());
        clients.push(tokio::spawn(async move {
            let mut conn = Conn::open(addr).await;
            while Instant::now() < stop_at {
                match conn.get("/").await {
                    Ok(r) if r.status == 200 => ok.fetch_add(1, Ordering::SeqCst),
                    _ => failed.fetch_add(1, Ordering::SeqCst),
                };
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    ups[1].kill();
    for c in clients {
        c.await.unwrap();
    }
    let (ok, failed) = (ok.load(Ordering::SeqCst), failed.load(Ordering::SeqCst));
    assert_eq!(failed, 0, "{failed} of {} requests failed", ok + failed);
    assert!(ok > 100, "only {ok} requests in 3s");
    let s = status(&b).await;
    let dead = backend(&s, &format!("http://{}", ups[1].addr));
    assert_eq!(dead["healthy"], false, "{s}");
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_and_status_move_with_real_traffic() {
    let a = Upstream::start("a").await;
    let b = Balancer::start(&config_with_admin(&[a.addr], ""), &[]);
    let admin = b.admin();
    assert_eq!(get(admin, "/healthz").await.text(), "ok\n");
    for _ in 0..5 {
        get(b.addr(), "/").await;
    }
    get(b.addr(), "/status/503").await;
    let url = format!("http://{}", a.addr);
    // A request in flight shows in the in-flight gauge and the connection gauge.
    let addr = b.addr();
    let slow = tokio::spawn(async move { get(addr, "/sleep/800").await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let r = get(admin, "/metrics").await;
    assert_eq!(r.header("content-type"), Some("text/plain; version=0.0.4; charset=utf-8"));
    let text = r.text();
    let series = |name: &str, labels: &str| metric(&text, &format!("{name}{{{labels}}}"));
    let be = format!("upstream=\"app\",backend=\"{url}\"");
    assert_eq!(series("balancer_requests_total", &format!("{be},code=\"200\"")), Some(5.0), "{text}");
    assert_eq!(series("balancer_requests_total", &format!("{be},code=\"503\"")), Some(1.0), "{text}");
    assert_eq!(series("balancer_backend_inflight", &be), Some(1.0), "{text}");
    assert_eq!(series("balancer_backend_up", &be), Some(1.0), "{text}");
    assert_eq!(metric(&text, "balancer_client_connections"), Some(1.0), "{text}");
    assert_eq!(series("balancer_request_duration_seconds_count", "upstream=\"app\""), Some(6.0), "{text}");
    assert_eq!(series("balancer_request_duration_seconds_bucket", "upstream=\"app\",le=\"+Inf\""), Some(6.0), "{text}");
    assert_eq!(series("balancer_config_reloads_total", "result=\"failure\""), Some(0.0), "{text}");
    assert!(text.contains("# TYPE balancer_rate_limited_total counter"), "{text}");
    // Unrouted requests are counted too, without upstream or backend.
    let s = status(&b).await;
    assert_eq!(s["generation"], 1);
    assert_eq!(s["last_reload"]["ok"], true);
    assert!(s["last_reload"]["at"].is_string());
    let up = &s["upstreams"][0];
    assert_eq!((up["name"].as_str(), up["strategy"].as_str()), (Some("app"), Some("round-robin")));
    let be = backend(&s, &url);
    assert_eq!(be["weight"], 1);
    assert_eq!(be["healthy"], true);
    assert_eq!(be["inflight"], 1);
    // Attempts sent, the one still in flight included (SPEC 7).
    assert_eq!(be["requests"], 7);
    assert_eq!(be["failures"], 0);
    assert_eq!(slow.await.unwrap().status, 200);
    assert_eq!(backend(&status(&b).await, &url)["inflight"], 0);
    assert_eq!(get(admin, "/nope").await.status, 404);
}

#[tokio::test(flavor = "multi_thread")]
async fn checks_are_spread_over_the_interval() {
    // Ten backends, a 1s interval: their checks must not all land at once.
    let mut ups = Vec::new();
    for i in 0..10 {
        ups.push(Upstream::start(&format!("u{i}")).await);
    }
    let addrs: Vec<_> = ups.iter().map(|u| u.addr).collect();
    let cfg = config_with_admin(&addrs, "[upstreams.app.health_check]\ninterval = \"1s\"\ntimeout = \"500ms\"\n");
    let b = Balancer::start(&cfg, &[]);
    // Record when each backend's first check arrives via its connection counter.
    let start = Instant::now();
    let mut first_seen = vec![None; ups.len()];
    while start.elapsed() < Duration::from_millis(1500) && first_seen.iter().any(Option::is_none) {
        for (i, u) in ups.iter().enumerate() {
            if first_seen[i].is_none() && u.connections.load(Ordering::SeqCst) > 0 {
                first_seen[i] = Some(start.elapsed());
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut times: Vec<Duration> =
        first_seen.into_iter().map(|t| t.expect("every backend checked within 1.5s")).collect();
    times.sort();
    let spread = times[times.len() - 1] - times[0];
    assert!(spread >= Duration::from_millis(600), "first checks within {spread:?} of each other: {times:?}");
    drop(b);
}
