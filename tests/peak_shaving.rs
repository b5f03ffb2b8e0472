//! Peak shaving through the real binary (SPEC section 11): `max_inflight` per backend, the
//! upstream's bounded queue, and `retry_budget`, in front of a real app server (gunicorn
//! with sync workers, `tests/apps/peak_app.py`) that reports its own peak concurrency.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::gunicorn::{Gunicorn, GunicornOpts};
use common::*;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

const DEPTH: &str = "balancer_queue_depth{upstream=\"app\"}";
const WAITS: &str = "balancer_queue_wait_seconds_count{upstream=\"app\"}";

/// One upstream `app` over `g`, capped at `cap` per backend, with a `[queue]` of
/// `(max, timeout)` when given.
fn capped(g: &Gunicorn, cap: u32, queue: Option<(u32, &str)>) -> String {
    let mut extra = format!("max_inflight = {cap}\n");
    if let Some((max, timeout)) = queue {
        extra.push_str(&format!("[upstreams.app.queue]\nmax = {max}\ntimeout = \"{timeout}\"\n"));
    }
    config_with_admin(&[g.addr], &extra)
}

async fn metrics(admin: SocketAddr) -> String {
    get(admin, "/metrics").await.text()
}

/// A series that must be present.
fn series(text: &str, name: &str) -> f64 {
    metric(text, name).unwrap_or_else(|| panic!("{name} not in /metrics:\n{text}"))
}

fn rejected(reason: &str) -> String {
    format!("balancer_queue_rejected_total{{upstream=\"app\",reason=\"{reason}\"}}")
}

async fn status(admin: SocketAddr) -> serde_json::Value {
    get(admin, "/status").await.json()
}

fn upstream_status<'a>(s: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    s["upstreams"].as_array().unwrap().iter().find(|u| u["name"] == name).unwrap_or_else(|| panic!("{name}: {s}"))
}

/// `n` concurrent GETs of `path`, each on a connection of its own: every reply with the
/// time from its send to its whole reply, in the order they were sent.
async fn burst(addr: SocketAddr, path: &str, n: usize) -> Vec<(Reply, Duration)> {
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            let path = path.to_owned();
            tokio::spawn(async move {
                let start = Instant::now();
                let r = get(addr, &path).await;
                (r, start.elapsed())
            })
        })
        .collect();
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

/// Polls `/metrics` and `/status` until `stop`: the deepest queue and the most requests
/// in flight on one backend seen meanwhile.
fn watch(admin: SocketAddr, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<(f64, u64)> {
    tokio::spawn(async move {
        let (mut depth, mut inflight) = (0f64, 0u64);
        while !stop.load(Ordering::SeqCst) {
            depth = depth.max(series(&metrics(admin).await, DEPTH));
            let s = status(admin).await;
            for b in upstream_status(&s, "app")["backends"].as_array().unwrap() {
                inflight = inflight.max(b["inflight"].as_u64().unwrap());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        (depth, inflight)
    })
}

fn assert_503(r: &Reply, says: &str) {
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(r.header("retry-after"), Some("1"), "{:?}", r.headers);
    assert!(r.text().contains(says), "the 503 body does not say {says:?}: {:?}", r.text());
}

/// 40 requests at once on a 2-worker app capped at 2: all answered 200, the app never
/// runs more than 2, and the queue that held the rest is seen rising and emptying.
#[tokio::test(flavor = "multi_thread")]
async fn a_burst_is_queued_and_all_of_it_answered() {
    let g = Gunicorn::start();
    let b = Balancer::start(&capped(&g, 2, Some((100, "10s"))), &[]);
    let admin = b.admin();
    let stop = Arc::new(AtomicBool::new(false));
    let watcher = watch(admin, stop.clone());

    let start = Instant::now();
    let replies = burst(b.addr(), "/sleep", 40).await;
    let took = start.elapsed();
    stop.store(true, Ordering::SeqCst);
    let (max_depth, max_inflight) = watcher.await.unwrap();

    for (r, _) in &replies {
        assert_eq!(r.status, 200, "{}", r.text());
    }
    let peak = g.peak().await;
    assert!(peak <= 2, "the app ran {peak} requests at once");
    assert_eq!(g.served().await, 40);
    assert!(max_depth > 0.0, "the queue depth was never seen above 0");
    assert!(max_inflight <= 2, "/status showed {max_inflight} requests in flight on the backend");
    // Slots are handed on as they free: 20 rounds of 200 ms, not much more.
    assert!(took < Duration::from_secs(7), "40 requests took {took:?}");

    let text = metrics(admin).await;
    assert_eq!(series(&text, DEPTH), 0.0);
    assert!(series(&text, WAITS) > 0.0, "no queue wait observed:\n{text}");
    assert_eq!(series(&text, &rejected("full")), 0.0);
    assert_eq!(series(&text, &rejected("timeout")), 0.0);
    let s = status(admin).await;
    let app = upstream_status(&s, "app");
    assert_eq!(app["queued"], 0, "{s}");
    assert_eq!(app["max_inflight"], 2, "{s}");
    eprintln!("40 requests in {took:?}; deepest queue seen {max_depth}");
}

/// The cap is what holds the app back: an app server that could run 8 at once (gthread,
/// 2 workers of 4 threads) sees at most 2 behind `max_inflight = 2`, and more without it.
#[tokio::test(flavor = "multi_thread")]
async fn the_cap_holds_back_an_app_that_could_take_more() {
    let g = Gunicorn::start_with(GunicornOpts { workers: 2, threads: 4 });
    let with_cap = Balancer::start(&capped(&g, 2, Some((100, "10s"))), &[]);
    for (r, _) in burst(with_cap.addr(), "/sleep", 16).await {
        assert_eq!(r.status, 200, "{}", r.text());
    }
    let capped_peak = g.peak().await;
    assert!(capped_peak <= 2, "behind max_inflight = 2 the app ran {capped_peak} at once");

    g.reset().await;
    let without = Balancer::start(&config_with_admin(&[g.addr], ""), &[]);
    for (r, _) in burst(without.addr(), "/sleep", 16).await {
        assert_eq!(r.status, 200, "{}", r.text());
    }
    let free_peak = g.peak().await;
    assert!(free_peak > 2, "without a cap the app ran only {free_peak} at once: the peak is not measured");
    eprintln!("app peak: {capped_peak} with max_inflight = 2, {free_peak} without");
}

/// A queue of 5 behind a cap of 2: of 40 at once, 7 are served and the rest are refused
/// at once, each refusal counted.
#[tokio::test(flavor = "multi_thread")]
async fn a_full_queue_refuses_at_once() {
    let g = Gunicorn::start();
    let b = Balancer::start(&capped(&g, 2, Some((5, "10s"))), &[]);
    let admin = b.admin();
    let replies = burst(b.addr(), "/sleep", 40).await;

    let ok = replies.iter().filter(|(r, _)| r.status == 200).count();
    let refused: Vec<_> = replies.iter().filter(|(r, _)| r.status != 200).collect();
    for (r, took) in &refused {
        assert_503(r, "full");
        // Serving all 40 would take 4 s; a refusal does not wait for any of it.
        assert!(*took < Duration::from_millis(1000), "a 503 took {took:?}");
    }
    assert!(ok >= 7, "only {ok} of 40 answered 200");
    assert!(!refused.is_empty(), "nothing was refused");
    let text = metrics(admin).await;
    assert_eq!(series(&text, &rejected("full")), refused.len() as f64, "{text}");
    assert_eq!(series(&text, &rejected("timeout")), 0.0);
    assert_eq!(series(&text, DEPTH), 0.0);
    assert!(g.peak().await <= 2);
    assert_eq!(g.served().await, ok as u64, "the app served a request that was answered 503");
    eprintln!("{ok} answered 200, {} refused", refused.len());
}

/// `timeout = "300ms"` behind a cap of 1: requests still waiting after 300 ms are
/// answered 503, about 300 ms after they were sent.
#[tokio::test(flavor = "multi_thread")]
async fn a_wait_past_the_queue_timeout_is_refused() {
    let g = Gunicorn::start();
    let b = Balancer::start(&capped(&g, 1, Some((100, "300ms"))), &[]);
    let admin = b.admin();
    let replies = burst(b.addr(), "/sleep", 10).await;

    let ok = replies.iter().filter(|(r, _)| r.status == 200).count();
    let refused: Vec<_> = replies.iter().filter(|(r, _)| r.status != 200).collect();
    for (r, took) in &refused {
        assert_503(r, "timeout");
        assert!(
            *took >= Duration::from_millis(250) && *took <= Duration::from_millis(1500),
            "a queue timeout of 300ms answered after {took:?}"
        );
    }
    // The first is served at once and the second within 300 ms of waiting; no more.
    assert!((1..=3).contains(&ok), "{ok} of 10 answered 200");
    assert_eq!(ok + refused.len(), 10);
    let text = metrics(admin).await;
    assert_eq!(series(&text, &rejected("timeout")), refused.len() as f64, "{text}");
    assert_eq!(series(&text, &rejected("full")), 0.0);
    assert_eq!(series(&text, DEPTH), 0.0);
    assert_eq!(g.served().await, ok as u64);
}

/// A cap without a `[queue]`: nobody waits, the surplus is answered 503 at once.
#[tokio::test(flavor = "multi_thread")]
async fn without_a_queue_the_surplus_is_refused_at_once() {
    let g = Gunicorn::start();
    let b = Balancer::start(&capped(&g, 1, None), &[]);
    let replies = burst(b.addr(), "/sleep", 5).await;

    let ok: Vec<_> = replies.iter().filter(|(r, _)| r.status == 200).collect();
    let refused: Vec<_> = replies.iter().filter(|(r, _)| r.status != 200).collect();
    assert!(!ok.is_empty(), "none answered 200");
    assert!(!refused.is_empty(), "none refused: 5 at once went through a cap of 1");
    let first_ok = ok.iter().map(|(_, t)| *t).min().unwrap();
    for (r, took) in &refused {
        assert_eq!(r.status, 503, "{}", r.text());
        assert_eq!(r.header("retry-after"), Some("1"));
        assert!(*took < first_ok, "a 503 took {took:?}, longer than a served request ({first_ok:?})");
    }
    assert_eq!(g.served().await, ok.len() as u64);
}

/// Clients that close their connection while queued leave the queue at once (logged as
/// 499) and never reach the app, while the request that holds the slot runs on.
#[tokio::test(flavor = "multi_thread")]
async fn clients_that_leave_while_queued_are_dropped_from_the_queue() {
    let g = Gunicorn::start();
    let b = Balancer::start(&capped(&g, 1, Some((100, "10s"))), &[]);
    let (addr, admin) = (b.addr(), b.admin());

    let long = tokio::spawn(async move { get(addr, "/sleep?ms=1500").await });
    let started = Instant::now();
    assert!(
        wait_until(Duration::from_secs(1), || async {
            upstream_status(&status(admin).await, "app")["backends"][0]["inflight"] == 1
        })
        .await,
        "the long request did not reach the backend"
    );
    let mut leavers = Vec::new();
    for _ in 0..10 {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /sleep HTTP/1.1\r\nhost: test.local\r\n\r\n").await.unwrap();
        leavers.push(s);
    }
    assert!(
        wait_until(Duration::from_secs(1), || async { metric(&metrics(admin).await, DEPTH) == Some(10.0) }).await,
        "10 requests were not queued: {}",
        metrics(admin).await
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    drop(leavers);
    let left = Instant::now();
    assert!(
        wait_until(Duration::from_secs(1), || async { metric(&metrics(admin).await, DEPTH) == Some(0.0) }).await,
        "the queue still holds clients that left a second ago: {}",
        metrics(admin).await
    );
    assert!(!long.is_finished(), "the long request ended before the check ({:?})", started.elapsed());
    eprintln!("queue empty {:?} after the clients left", left.elapsed());
    assert_eq!(status(admin).await["upstreams"][0]["queued"], 0);

    assert_eq!(long.await.unwrap().status, 200);
    assert_eq!(g.served().await, 1, "a client that left while queued still reached the app");
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let gone = b.access_logs().into_iter().filter(|l| l["status"] == 499).count();
        if gone == 10 {
            break;
        }
        assert!(Instant::now() < deadline, "{gone} access-log lines with 499, not 10: {:#?}", b.access_logs());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let text = metrics(admin).await;
    assert_eq!(series(&text, &rejected("timeout")), 0.0);
    assert_eq!(series(&text, &rejected("full")), 0.0);
}

/// Attempts on an upstream whose every backend refuses connections, over 300 requests
/// with `retries = 1`, as `/status` counts them (`requests`, summed over the backends).
async fn attempts_on_dead_backends(budget: Option<f64>) -> u64 {
    let mut extra = String::from("retries = 1\n");
    if let Some(share) = budget {
        extra.push_str(&format!("retry_budget = {share}\n"));
    }
    extra.push_str("[upstreams.app.passive]\nmax_fails = 0\n");
    let b = Balancer::start(&config_with_admin(&[dead_addr(), dead_addr()], &extra), &[]);
    let mut conn = Conn::open(b.addr()).await;
    for _ in 0..300 {
        let r = conn.get("/").await.unwrap();
        assert_eq!(r.status, 502, "{}", r.text());
    }
    let s = status(b.admin()).await;
    let backends = upstream_status(&s, "app")["backends"].as_array().unwrap();
    assert!(backends.iter().all(|x| x["healthy"] == true), "passive checks are off, yet: {s}");
    backends.iter().map(|x| x["requests"].as_u64().unwrap()).sum()
}

/// `retry_budget = 0.1` over 300 failing requests: the retries stay within the budget's
/// share or its floor of 3 a second over the 10 s window (30), where without a budget
/// every request is tried twice.
#[tokio::test(flavor = "multi_thread")]
async fn the_retry_budget_bounds_the_extra_attempts() {
    let start = Instant::now();
    let with_budget = attempts_on_dead_backends(Some(0.1)).await;
    let took = start.elapsed();
    let without = attempts_on_dead_backends(None).await;
    eprintln!("attempts for 300 requests: {with_budget} with retry_budget = 0.1 (in {took:?}), {without} without");
    assert_eq!(without, 600, "without a budget each request is tried on both backends");
    // max(0.1 * 300, 3/s * 10 s) = 30 retries, when the 300 fit in the window.
    assert!(took < Duration::from_secs(10), "300 requests took {took:?}: longer than the budget's window");
    assert!(with_budget <= 335, "{with_budget} attempts: more than 300 + 30 retries (+5)");
    assert!(with_budget >= 325, "{with_budget} attempts: the floor of 3 retries a second was not granted");
}

/// A reload that removes an upstream answers the requests queued on it 503 at once; the
/// one in flight finishes, and the next requests go where the new config says.
#[tokio::test(flavor = "multi_thread")]
async fn a_reload_that_removes_the_upstream_answers_its_queue() {
    let g = Gunicorn::start();
    let other = Upstream::start("other").await;
    let head = "[server]\nlisten = [\"127.0.0.1:0\"]\n\n[admin]\nlisten = \"127.0.0.1:0\"\n\n";
    let other_up = format!("[upstreams.other]\nbackends = [\"http://{}\"]\n\n", other.addr);
    let before = format!(
        "{head}[upstreams.app]\nbackends = [\"{}\"]\nmax_inflight = 1\n\n[upstreams.app.queue]\nmax = 100\ntimeout = \"10s\"\n\n\
         {other_up}[[routes]]\npath_prefix = \"/\"\nupstream = \"app\"\n\n[[routes]]\npath_prefix = \"/other\"\nupstream = \"other\"\n",
        g.url()
    );
    let after = format!("{head}{other_up}[[routes]]\npath_prefix = \"/\"\nupstream = \"other\"\n");
    let b = Balancer::start(&before, &[]);
    let (addr, admin) = (b.addr(), b.admin());
    assert_eq!(get(addr, "/other").await.header("x-upstream"), Some("other"));

    let long = tokio::spawn(async move { get(addr, "/sleep?ms=2000").await });
    assert!(
        wait_until(Duration::from_secs(1), || async {
            upstream_status(&status(admin).await, "app")["backends"][0]["inflight"] == 1
        })
        .await
    );
    let queued = tokio::spawn(burst(addr, "/sleep", 5));
    assert!(
        wait_until(Duration::from_secs(1), || async { metric(&metrics(admin).await, DEPTH) == Some(5.0) }).await,
        "5 requests were not queued: {}",
        metrics(admin).await
    );

    let reloaded = Instant::now();
    b.write_config(&after);
    let replies = tokio::time::timeout(Duration::from_millis(1500), queued)
        .await
        .expect("the queued requests were not answered within 1.5 s of the reload")
        .unwrap();
    let answered = reloaded.elapsed();
    for (r, _) in &replies {
        assert_503(r, "removed by a reload");
    }
    assert!(!long.is_finished(), "the queue was only answered when the slot freed ({answered:?})");
    let s = status(admin).await;
    assert_eq!(s["generation"], 2, "{s}");
    assert!(s["upstreams"].as_array().unwrap().iter().all(|u| u["name"] != "app"), "{s}");

    let r = long.await.unwrap();
    assert_eq!(r.status, 200, "the request in flight at the reload: {}", r.text());
    assert_eq!(get(addr, "/sleep").await.header("x-upstream"), Some("other"));
    assert_eq!(g.served().await, 1, "a request answered 503 reached the app");
    eprintln!("queued requests answered {answered:?} after the config was written");
}

/// A slot that frees while requests join the queue is never lost: on each of two
/// upstreams, two clients in a closed loop on a fast backend capped at 1 always find the
/// slot free within milliseconds, so none may wait out the 300 ms queue timeout. A lost
/// hand-over leaves both waiting, with the backend idle, until they time out.
#[tokio::test(flavor = "multi_thread")]
async fn a_freed_slot_is_never_lost_while_requests_join_the_queue() {
    const UPSTREAMS: usize = 2;
    let mut backends = Vec::new();
    let mut config = String::from(
        "[server]\nlisten = [\"127.0.0.1:0\"]\n\n[admin]\nlisten = \"127.0.0.1:0\"\n\n[log]\naccess = false\n\n",
    );
    for i in 0..UPSTREAMS {
        let up = Upstream::start(&format!("u{i}")).await;
        config.push_str(&format!(
            "[upstreams.u{i}]\nbackends = [\"http://{}\"]\nmax_inflight = 1\n\n[upstreams.u{i}.queue]\nmax = 100\n\
             timeout = \"300ms\"\n\n[[routes]]\npath_prefix = \"/u{i}\"\nupstream = \"u{i}\"\n\n",
            up.addr
        ));
        backends.push(up);
    }
    // More worker threads than cores: a worker may be preempted anywhere.
    let b = Balancer::start(&config, &["--set", "server.workers=4"]);
    let addr = b.addr();
    let start = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..2 * UPSTREAMS)
        .map(|i| {
            let stop = stop.clone();
            let path = format!("/u{}", i % UPSTREAMS);
            tokio::spawn(async move {
                let mut conn = Conn::open(addr).await;
                let mut n = 0u64;
                while !stop.load(Ordering::SeqCst) && start.elapsed() < Duration::from_secs(4) {
                    let sent = Instant::now();
                    let r = conn.get(&path).await.unwrap();
                    n += 1;
                    if r.status != 200 {
                        stop.store(true, Ordering::SeqCst);
                        return Err(format!(
                            "request {n} on {path} answered {} after {:?} ({:?} into the run): {}",
                            r.status,
                            sent.elapsed(),
                            start.elapsed(),
                            r.text().trim()
                        ));
                    }
                }
                Ok(n)
            })
        })
        .collect();
    let mut served = 0;
    let mut failures = Vec::new();
    for c in clients {
        match c.await.unwrap() {
            Ok(n) => served += n,
            Err(e) => failures.push(e),
        }
    }
    assert!(failures.is_empty(), "a free slot was not handed to the queue: {failures:#?}");
    assert!(served > 1000, "only {served} requests in 4 s");
    eprintln!("{served} requests through caps of 1, none lost a slot");
}
