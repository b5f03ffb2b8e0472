//! A bounded soak test against the real binary: mixed keep-alive traffic from 8 clients
//! while the config is reloaded every 3 s and one of three backends is killed and brought
//! back every 5 s, with a rate limit on one route. Every response is checked (status,
//! backend, echoed path, body length, request id), and the balancer's resident memory is
//! sampled every second and must level off.
//!
//! `SOAK_SECS` sets the duration (default 45 s, so that `cargo test` stays quick). The
//! long run:
//!
//! ```sh
//! SOAK_SECS=600 cargo test --release --test soak -- --nocapture
//! ```

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

const CLIENTS: usize = 8;
const RELOAD_EVERY: u64 = 3;
const FLAP_EVERY: u64 = 5;
/// The rate limit on `/limited`: all clients share one bucket.
const LIMIT_PER_SEC: u32 = 20;
/// A request that takes longer than this counts as failed.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

fn soak_duration() -> Duration {
    let secs = std::env::var("SOAK_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(45u64);
    Duration::from_secs(secs.max(9))
}

/// The two configs reloaded in turn: the same backends in opposite orders.
fn config(backends: &[SocketAddr], variant: usize) -> String {
    let mut list: Vec<String> = backends.iter().map(|a| format!("\"http://{a}\"")).collect();
    if variant % 2 == 1 {
        list.reverse();
    }
    format!(
        r#"# variant {variant}
[server]
listen = ["127.0.0.1:0"]

[admin]
listen = "127.0.0.1:0"

[log]
# Every log line is kept in memory by the test harness: no access log in a long run.
access = false

[upstreams.app]
backends = [{}]
retries = 2

[upstreams.app.passive]
max_fails = 2
fail_timeout = "2s"

[rate_limits.limited]
rate = {LIMIT_PER_SEC}
per = "1s"
key = "global"

[[routes]]
path_prefix = "/limited"
upstream = "app"
rate_limit = "limited"

[[routes]]
path_prefix = "/"
upstream = "app"
"#,
        list.join(", ")
    )
}

#[derive(Default)]
struct Tally {
    ok: AtomicU64,
    posts: AtomicU64,
    sleeps: AtomicU64,
    limited_ok: AtomicU64,
    rate_limited: AtomicU64,
    unavailable: AtomicU64,
    new_connections: AtomicU64,
    failures: Mutex<Vec<String>>,
    /// 502s for requests whose body was already sent to c when it was killed: SPEC forbids
    /// replaying a consumed body, so these are the expected answer, not failures.
    unreplayable: AtomicU64,
    /// When backend c was killed (seconds since the start).
    kills: Mutex<Vec<f64>>,
}

/// How long after the kill is noted backend c may still take a request: `kill()` aborts
/// its tasks, and an aborted task stops only at its next poll, so a request sent in that
/// moment can still reach it (and have its body consumed).
const KILL_SETTLES: f64 = 0.1;

/// Whether a request sent at `sent` and answered at `now` overlapped the kill at `k`.
fn overlaps(k: f64, sent: f64, now: f64) -> bool {
    sent <= k + KILL_SETTLES && k <= now
}

impl Tally {
    /// A 502 for a request with a body that was in flight when c was killed is expected;
    /// anything else is a failure.
    fn bad_status(&self, start: Instant, sent: f64, what: String, has_body: bool, status_502: bool) {
        let now = start.elapsed().as_secs_f64();
        let during_kill = self.kills.lock().unwrap().iter().any(|&k| overlaps(k, sent, now));
        if has_body && status_502 && during_kill {
            eprintln!("expected: t={sent:.3}s..{now:.3}s {what} (its body was consumed by the killed backend)");
            self.unreplayable.fetch_add(1, Ordering::Relaxed);
            return;
        }
        self.fail(start, sent, what);
    }

    /// Records a failed request that was sent at `sent` (seconds since `start`).
    fn fail(&self, start: Instant, sent: f64, what: String) {
        let now = start.elapsed().as_secs_f64();
        let during_kill = self.kills.lock().unwrap().iter().copied().find(|&k| overlaps(k, sent, now));
        let note = match during_kill {
            Some(k) => format!(" (in flight when c was killed at t={k:.3}s)"),
            None => String::new(),
        };
        let line = format!("t={sent:.3}s..{now:.3}s {what}{note}");
        eprintln!("FAILED {line}");
        self.failures.lock().unwrap().push(line);
    }
}

async fn connect(addr: SocketAddr) -> Result<SendRequest<Full<Bytes>>, String> {
    let stream = TcpStream::connect(addr).await.map_err(|e| format!("connect: {e}"))?;
    let (sender, conn) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(|e| format!("handshake: {e}"))?;
    tokio::spawn(conn);
    Ok(sender)
}

struct Sent {
    method: &'static str,
    path: String,
    body_len: usize,
    id: String,
}

struct Got {
    status: StatusCode,
    headers: http::HeaderMap,
    body: Bytes,
}

async fn exchange(sender: &mut SendRequest<Full<Bytes>>, sent: &Sent) -> Result<Got, String> {
    let body = Bytes::from(vec![b'p'; sent.body_len]);
    let req = Request::builder()
        .method(sent.method)
        .uri(&sent.path)
        .header("host", "soak.test")
        .header("x-request-id", &sent.id)
        .body(Full::new(body))
        .unwrap();
    let go = async {
        sender.ready().await.map_err(|e| format!("connection not ready: {e}"))?;
        let resp = sender.send_request(req).await.map_err(|e| format!("request: {e}"))?;
        let (parts, body) = resp.into_parts();
        let body = body.collect().await.map_err(|e| format!("response body: {e}"))?.to_bytes();
        Ok(Got { status: parts.status, headers: parts.headers, body })
    };
    tokio::time::timeout(REQUEST_TIMEOUT, go).await.map_err(|_| format!("no response within {REQUEST_TIMEOUT:?}"))?
}

/// Checks one response; `Err` describes what is wrong with it.
fn judge(sent: &Sent, got: &Got, tally: &Tally) -> Result<(), String> {
    let id = got.headers.get("x-request-id").and_then(|v| v.to_str().ok());
    if id != Some(sent.id.as_str()) {
        return Err(format!("x-request-id {id:?}, sent {}", sent.id));
    }
    match got.status {
        StatusCode::OK => {}
        StatusCode::TOO_MANY_REQUESTS if sent.path.starts_with("/limited") => {
            if got.headers.get("retry-after").is_none() {
                return Err("429 without Retry-After".into());
            }
            tally.rate_limited.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        }
        StatusCode::SERVICE_UNAVAILABLE => {
            tally.unavailable.fetch_add(1, Ordering::Relaxed);
            eprintln!("503 for {} {}: {}", sent.method, sent.path, String::from_utf8_lossy(&got.body).trim());
            return Ok(());
        }
        s => return Err(format!("status {s}: {}", String::from_utf8_lossy(&got.body).trim())),
    }
    let upstream = got.headers.get("x-upstream").and_then(|v| v.to_str().ok()).unwrap_or("");
    if !["a", "b", "c"].contains(&upstream) {
        return Err(format!("x-upstream {upstream:?}"));
    }
    let echo: serde_json::Value =
        serde_json::from_slice(&got.body).map_err(|e| format!("not the backend's JSON echo ({e})"))?;
    let matches = echo["method"] == sent.method
        && echo["path"] == sent.path.as_str()
        && echo["body_len"] == sent.body_len
        && echo["headers"]["x-request-id"] == sent.id.as_str();
    if !matches {
        return Err(format!("echo does not match the request: {echo}"));
    }
    tally.ok.fetch_add(1, Ordering::Relaxed);
    if sent.path.starts_with("/limited") {
        tally.limited_ok.fetch_add(1, Ordering::Relaxed);
    }
    Ok(())
}

/// One client: a keep-alive connection, a mix of requests, now and then a new connection.
async fn client(n: usize, addr: SocketAddr, running: Arc<AtomicBool>, tally: Arc<Tally>, start: Instant) {
    let mut sender: Option<SendRequest<Full<Bytes>>> = None;
    let mut i: usize = 0;
    while running.load(Ordering::Relaxed) {
        i += 1;
        let id = format!("soak-{n}-{i}");
        let sent = match i % 20 {
            0..=8 => Sent { method: "GET", path: format!("/get/{n}/{i}?q={i}"), body_len: 0, id },
            9..=13 => Sent { method: "POST", path: format!("/post/{n}/{i}"), body_len: 1 + (i * 37) % 3000, id },
            14 | 15 => Sent { method: "GET", path: "/sleep/20".into(), body_len: 0, id },
            16 | 17 => Sent { method: "GET", path: format!("/limited/{n}/{i}"), body_len: 0, id },
            18 => Sent { method: "PUT", path: format!("/put/{n}/{i}"), body_len: 64, id },
            _ => Sent { method: "DELETE", path: format!("/delete/{n}/{i}"), body_len: 0, id },
        };
        // Every 50th request on a new connection (the old one is dropped).
        if i % 50 == 0 {
            sender = None;
        }
        let at = start.elapsed().as_secs_f64();
        if sender.is_none() {
            tally.new_connections.fetch_add(1, Ordering::Relaxed);
            match connect(addr).await {
                Ok(s) => sender = Some(s),
                Err(e) => {
                    tally.fail(start, at, format!("client {n}: {e}"));
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            }
        }
        let result = exchange(sender.as_mut().unwrap(), &sent).await;
        match result {
            Ok(got) => {
                if let Err(e) = judge(&sent, &got, &tally) {
                    let what = format!("client {n}: {} {} ({} body bytes): {e}", sent.method, sent.path, sent.body_len);
                    tally.bad_status(start, at, what, sent.body_len > 0, got.status == 502);
                }
            }
            Err(e) => {
                tally.fail(
                    start,
                    at,
                    format!("client {n}: {} {} ({} body bytes): {e}", sent.method, sent.path, sent.body_len),
                );
                sender = None;
            }
        }
        if sent.method == "POST" {
            tally.posts.fetch_add(1, Ordering::Relaxed);
        } else if sent.path.starts_with("/sleep") {
            tally.sleeps.fetch_add(1, Ordering::Relaxed);
        }
    }
}

async fn generation(admin: SocketAddr) -> u64 {
    get(admin, "/status").await.json()["generation"].as_u64().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak_mixed_traffic_reloads_and_a_flapping_backend() {
    let duration = soak_duration();
    let a = Upstream::start("a").await;
    let b_ = Upstream::start("b").await;
    let mut c = Some(Upstream::start("c").await);
    let c_addr = c.as_ref().unwrap().addr;
    let backends = [a.addr, b_.addr, c_addr];
    let bal = Balancer::start(&config(&backends, 0), &[]);
    let (addr, admin) = (bal.addr(), bal.admin());
    eprintln!(
        "soak: {duration:?}, {CLIENTS} clients, reload every {RELOAD_EVERY}s, backend c flaps every {FLAP_EVERY}s"
    );

    let start = Instant::now();
    let tally = Arc::new(Tally::default());
    let running = Arc::new(AtomicBool::new(true));
    let clients: Vec<_> =
        (0..CLIENTS).map(|n| tokio::spawn(client(n, addr, running.clone(), tally.clone(), start))).collect();

    let mut rss: Vec<u64> = Vec::new();
    let mut reloads = 0u64;
    let (mut kills, mut restarts) = (0u64, 0u64);
    let mut restarted_hits = 0usize;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    let mut second = 0u64;
    while start.elapsed() < duration {
        tick.tick().await;
        second += 1;
        rss.push(bal.rss_kib());
        if second % RELOAD_EVERY == 0 {
            // The previous reload must be in force by now.
            let seen = generation(admin).await;
            assert_eq!(seen, reloads + 1, "generation at {second}s: {seen}, after {reloads} reloads");
            reloads += 1;
            let text = config(&backends, reloads as usize);
            if reloads % 2 == 0 { bal.write_config(&text) } else { bal.rename_config(&text) }
        }
        if second % FLAP_EVERY == 0 {
            match c.take() {
                Some(up) => {
                    if restarts > 0 {
                        restarted_hits += up.hits();
                    }
                    // Noted before the kill: a request it breaks can fail before kill() returns.
                    tally.kills.lock().unwrap().push(start.elapsed().as_secs_f64());
                    up.kill();
                    kills += 1;
                    eprintln!("t={:.3}s killed c ({} requests served)", start.elapsed().as_secs_f64(), up.hits());
                }
                None => {
                    c = Some(Upstream::start_on(c_addr, "c", UpstreamOpts::default()).await);
                    restarts += 1;
                    eprintln!("t={:.3}s restarted c", start.elapsed().as_secs_f64());
                }
            }
        }
        if second % 5 == 0 {
            eprintln!(
                "t={second:>4}s rss={:>7} KiB ok={} 429={} 503={} failed={}",
                rss.last().unwrap(),
                tally.ok.load(Ordering::Relaxed),
                tally.rate_limited.load(Ordering::Relaxed),
                tally.unavailable.load(Ordering::Relaxed),
                tally.failures.lock().unwrap().len()
            );
        }
    }
    running.store(false, Ordering::Relaxed);
    for t in clients {
        t.await.unwrap();
    }
    if let Some(up) = &c {
        if restarts > 0 {
            restarted_hits += up.hits();
        }
    }
    let elapsed = start.elapsed();
    // The last reload is in force too.
    let deadline = Instant::now() + Duration::from_secs(3);
    while generation(admin).await != reloads + 1 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let metrics = get(admin, "/metrics").await.text();
    let reload_ok = metric(&metrics, "balancer_config_reloads_total{result=\"success\"}").unwrap_or(0.0);
    let reload_failed = metric(&metrics, "balancer_config_reloads_total{result=\"failure\"}").unwrap_or(0.0);
    let status = get(admin, "/status").await.json();

    // The RSS curve, then the verdict on it.
    let line: Vec<String> = rss.iter().map(|k| format!("{}", k / 1024)).collect();
    eprintln!("RSS (MiB, one sample per second): {}", line.join(" "));
    let n = rss.len();
    let middle = *rss[n / 3..2 * n / 3].iter().max().unwrap();
    let last = *rss[2 * n / 3..].iter().max().unwrap();
    let allowed = middle + (middle / 5).max(4096);

    let t = &tally;
    let total = t.ok.load(Ordering::Relaxed) + t.rate_limited.load(Ordering::Relaxed);
    eprintln!(
        "soak: {total} requests in {:.1}s ({:.0}/s): {} ok ({} POST, {} /sleep/20, {} /limited), {} 429, {} 503, \
         {} failed; {} connections opened; {reloads} reloads ({reload_ok} ok, {reload_failed} failed); \
         c killed {kills}x, restarted {restarts}x, its restarted instances served {restarted_hits}; \
         RSS max middle third {} KiB, last third {} KiB (allowed {} KiB)",
        elapsed.as_secs_f64(),
        total as f64 / elapsed.as_secs_f64(),
        t.ok.load(Ordering::Relaxed),
        t.posts.load(Ordering::Relaxed),
        t.sleeps.load(Ordering::Relaxed),
        t.limited_ok.load(Ordering::Relaxed),
        t.rate_limited.load(Ordering::Relaxed),
        t.unavailable.load(Ordering::Relaxed),
        t.failures.lock().unwrap().len(),
        t.new_connections.load(Ordering::Relaxed),
        middle,
        last,
        allowed,
    );

    let failures = t.failures.lock().unwrap();
    assert!(
        failures.is_empty(),
        "{} failed requests (besides 429 and 503); the first ones:\n{}\nstatus: {status}",
        failures.len(),
        failures.iter().take(30).cloned().collect::<Vec<_>>().join("\n")
    );
    assert!(total as f64 > 50.0 * elapsed.as_secs_f64(), "only {total} requests in {elapsed:?}");
    assert!(t.rate_limited.load(Ordering::Relaxed) > 0, "the rate limit never refused a request");
    assert!(t.limited_ok.load(Ordering::Relaxed) > 0, "the rate-limited route never answered");
    assert_eq!(reload_ok, reloads as f64, "successful reloads");
    assert_eq!(reload_failed, 0.0, "failed reloads");
    assert!(kills >= 1, "backend c was never killed");
    if restarts >= 1 && kills >= 2 {
        assert!(restarted_hits > 0, "a restarted c never got traffic back");
    }
    assert!(last <= allowed, "RSS still growing: max {last} KiB in the last third, {middle} KiB in the middle third");
}
