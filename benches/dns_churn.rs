//! DNS churn (issue 18): what re-resolving a name of 1,000 addresses, and applying a change
//! of half of them, costs the real binary, and whether it disturbs the load benchmark's p99.
//!
//! A DNS server on 127.0.0.1 (`tests/common/dns.rs`) answers `many.test` with 1,000
//! addresses (127.1.x.y; nothing listens there, no health checks). balancer
//! (`target/release/balancer`, `[server] workers = 1`, access log off) follows it every
//! 100 ms (upstream `churn`, route `/churn`); upstream `app` (route `/`) is one
//! `demo_backend`. Then:
//!
//! - CPU: balancer's utime + stime (`/proc/PID/stat`, clock ticks) over 8 s where the answer
//!   does not change (lookups only), then over 8 s where it flips every 500 ms between set
//!   A and set B (A with every other address replaced: 500 go, 500 come); 3 rounds,
//!   medians. Per lookup: steady CPU / lookups (DNS queries / 3: A over UDP, truncated,
//!   again over TCP, and AAAA). Per change: (flipping CPU - steady CPU) / changes (the
//!   `new addresses` log lines balancer wrote in the window).
//!   A change's CPU includes balancer's log line naming the new 1,000 addresses.
//! - p99: `wrk -t1 -c32 -d10s --latency` on `/` (after a 2 s warm-up), with no change and
//!   while the answer flips every 500 ms, in the order steady, flipping, flipping, steady.
//!
//! Figures are printed, never asserted; it exits nonzero only when the setup fails.
//!
//!   flock /tmp/cargo.lock cargo build --release --bin balancer --example demo_backend
//!   flock /tmp/cargo.lock cargo bench --bench dns_churn --no-run
//!   cargo bench --bench dns_churn      # about 95 s

#[path = "../tests/common/dns.rs"]
mod dns;

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use dns::{Answer, DnsServer};
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

const NAME: &str = "many.test";
const ADDRESSES: usize = 1000;
const PERIOD: Duration = Duration::from_secs(8);
const ROUNDS: usize = 3;
const FLIP_EVERY: Duration = Duration::from_millis(500);
const WRK_SECS: u32 = 10;
/// DNS queries per lookup: A over UDP (truncated), A again over TCP, AAAA over UDP.
const QUERIES_PER_LOOKUP: f64 = 3.0;

type Http = Client<HttpConnector, Empty<Bytes>>;

/// A child process killed when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// What balancer's JSON log said: its listeners, and how many address changes it found.
#[derive(Default)]
struct Logs {
    listen: Mutex<Option<SocketAddr>>,
    admin: Mutex<Option<SocketAddr>>,
    changes: AtomicUsize,
    tail: Mutex<Vec<String>>,
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    if let Err(e) = rt.block_on(run()) {
        eprintln!("dns_churn: setup failed: {e}");
        std::process::exit(1);
    }
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Set A: 127.1.0.1 .. 127.1.3.250. Set B: A with every other address moved to 127.2.x.y.
fn address_sets() -> (Vec<IpAddr>, Vec<IpAddr>) {
    let at = |net: u8, i: usize| IpAddr::V4(Ipv4Addr::new(127, net, (i / 250) as u8, (i % 250 + 1) as u8));
    let a = (0..ADDRESSES).map(|i| at(1, i)).collect();
    let b = (0..ADDRESSES).map(|i| at(if i % 2 == 0 { 2 } else { 1 }, i)).collect();
    (a, b)
}

fn free_port() -> Result<u16, String> {
    Ok(TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map_err(|e| format!("free port: {e}"))?.port())
}

fn newest_mtime(dir: &Path) -> Option<SystemTime> {
    let mut newest = None;
    for entry in std::fs::read_dir(dir).ok()?.flatten() {
        let path = entry.path();
        let t = if path.is_dir() { newest_mtime(&path) } else { entry.metadata().ok()?.modified().ok() };
        newest = newest.max(t);
    }
    newest
}

fn clk_tck() -> Result<f64, String> {
    let out = Command::new("getconf").arg("CLK_TCK").output().map_err(|e| format!("getconf: {e}"))?;
    String::from_utf8_lossy(&out.stdout).trim().parse().map_err(|e| format!("getconf CLK_TCK: {e}"))
}

/// utime + stime of process `pid`, in clock ticks.
fn cpu_ticks(pid: u32) -> Result<u64, String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).map_err(|e| format!("/proc/{pid}/stat: {e}"))?;
    let rest = stat.rsplit_once(')').ok_or("odd /proc stat")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the command: field 3 (state) is index 0, utime (14) index 11, stime (15) index 12.
    let field = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok()).ok_or("odd /proc stat field");
    Ok(field(11)? + field(12)?)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn wait_port(addr: SocketAddr) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(addr).is_err() {
        if Instant::now() > deadline {
            return Err(format!("nothing listens on {addr}"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

async fn get(http: &Http, addr: SocketAddr, path: &str) -> Result<String, String> {
    let uri: hyper::Uri = format!("http://{addr}{path}").parse().map_err(|e| format!("{e}"))?;
    let fetch = async {
        let resp = http.get(uri).await.map_err(|e| format!("GET {path}: {e}"))?;
        let status = resp.status();
        let body = resp.into_body().collect().await.map_err(|e| format!("GET {path}: {e}"))?.to_bytes();
        if !status.is_success() {
            return Err(format!("GET {path}: {status}"));
        }
        Ok(String::from_utf8_lossy(&body).into_owned())
    };
    tokio::time::timeout(Duration::from_secs(10), fetch).await.map_err(|_| format!("GET {path}: timed out"))?
}

/// The addresses `/status` lists for upstream `churn`.
async fn churn_backends(http: &Http, admin: SocketAddr) -> Result<BTreeSet<IpAddr>, String> {
    let status: serde_json::Value =
        serde_json::from_str(&get(http, admin, "/status").await?).map_err(|e| format!("/status: {e}"))?;
    let up = status["upstreams"]
        .as_array()
        .and_then(|ups| ups.iter().find(|u| u["name"] == "churn"))
        .ok_or("/status has no upstream churn")?;
    Ok(up["backends"]
        .as_array()
        .ok_or("/status: churn has no backends list")?
        .iter()
        .filter_map(|b| b["url"].as_str()?.strip_prefix("http://")?.parse::<SocketAddr>().ok())
        .map(|a| a.ip())
        .collect())
}

/// Waits until `/status` lists exactly `want` for `churn`.
async fn wait_listed(http: &Http, admin: SocketAddr, want: &[IpAddr]) -> Result<(), String> {
    let want: BTreeSet<IpAddr> = want.iter().copied().collect();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let got = churn_backends(http, admin).await?;
        if got == want {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!("/status lists {} churn backends, not the {} expected", got.len(), want.len()));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Flips `NAME` between `b` and `a` every `FLIP_EVERY` until `stop` (first to `b`, and
/// always back on `a` when it ends); returns how many flips it made.
fn spawn_flipper(
    dns: Arc<DnsServer>,
    a: Vec<IpAddr>,
    b: Vec<IpAddr>,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<usize> {
    tokio::spawn(async move {
        let mut flips = 0;
        let mut tick = tokio::time::interval(FLIP_EVERY);
        loop {
            tick.tick().await;
            if stop.load(Ordering::SeqCst) {
                break;
            }
            flips += 1;
            let next = if flips % 2 == 1 { &b } else { &a };
            dns.set(NAME, Answer::Addresses(next.clone()));
        }
        dns.set(NAME, Answer::Addresses(a));
        flips
    })
}

struct Wrk {
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
}

fn ms(v: &str) -> Option<f64> {
    let (num, scale) = if let Some(n) = v.strip_suffix("us") {
        (n, 0.001)
    } else if let Some(n) = v.strip_suffix("ms") {
        (n, 1.0)
    } else if let Some(n) = v.strip_suffix('s') {
        (n, 1000.0)
    } else {
        (v, 1.0)
    };
    num.parse::<f64>().ok().map(|n| n * scale)
}

fn wrk(addr: SocketAddr, secs: u32) -> Result<Wrk, String> {
    let out = Command::new("wrk")
        .args(["-t1", "-c32", &format!("-d{secs}s"), "--latency", &format!("http://{addr}/")])
        .output()
        .map_err(|e| format!("wrk: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let after = |key: &str| text.lines().find_map(|l| l.trim_start().strip_prefix(key).map(|v| v.trim().to_owned()));
    let parsed = (|| {
        Some(Wrk {
            rps: after("Requests/sec:")?.parse().ok()?,
            p50_ms: ms(&after("50%")?)?,
            p99_ms: ms(&after("99%")?)?,
        })
    })();
    match parsed {
        Some(w) if !text.contains("Non-2xx") && !text.contains("Socket errors") => Ok(w),
        _ => Err(format!("wrk output not as expected:\n{text}")),
    }
}

fn ensure_wrk() -> Result<(), String> {
    if Command::new("wrk").arg("-v").stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok() {
        return Ok(());
    }
    eprintln!("dns_churn: installing wrk ...");
    let ok = Command::new("apt-get")
        .args(["install", "-y", "-qq", "wrk"])
        .env("DEBIAN_FRONTEND", "noninteractive")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if ok { Ok(()) } else { Err("wrk is missing and apt-get install -y wrk failed".into()) }
}

fn start_balancer(config_path: &Path, logs: Arc<Logs>) -> Result<Proc, String> {
    let bin = root().join("target/release/balancer");
    let mut child = Command::new(&bin)
        .arg("-c")
        .arg(config_path)
        .args(["--log-format", "json"])
        .env_remove("BALANCER_CONFIG")
        .env_remove("BALANCER_LOG")
        .env_remove("NOTIFY_SOCKET")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("{}: {e}", bin.display()))?;
    let stderr = child.stderr.take().ok_or("no stderr")?;
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
            let addr = || v["addr"].as_str().and_then(|a| a.parse().ok());
            match v["message"].as_str() {
                Some("backend host name: new addresses") => {
                    logs.changes.fetch_add(1, Ordering::SeqCst);
                }
                Some("listening") => *logs.listen.lock().unwrap() = addr(),
                Some("admin listening") => *logs.admin.lock().unwrap() = addr(),
                _ => {
                    let mut tail = logs.tail.lock().unwrap();
                    tail.push(line.chars().take(300).collect());
                    let excess = tail.len().saturating_sub(10);
                    tail.drain(..excess);
                }
            }
        }
    });
    Ok(Proc(child))
}

async fn run() -> Result<(), String> {
    let bin = root().join("target/release/balancer");
    let demo = root().join("target/release/examples/demo_backend");
    for b in [&bin, &demo] {
        if !b.exists() {
            return Err(format!(
                "{} is missing: flock /tmp/cargo.lock cargo build --release --bin balancer --example demo_backend",
                b.display()
            ));
        }
    }
    let built = std::fs::metadata(&bin).and_then(|m| m.modified()).ok();
    if newest_mtime(&root().join("src")) > built {
        eprintln!("dns_churn: warning: target/release/balancer is older than src/; rebuild it for current figures");
    }
    ensure_wrk()?;
    let tck = clk_tck()?;

    // The app backend.
    let app_port = free_port()?;
    let _demo = Proc(
        Command::new(&demo)
            .args(["--host", "127.0.0.1", "--port", &app_port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("{}: {e}", demo.display()))?,
    );
    wait_port(SocketAddr::from(([127, 0, 0, 1], app_port)))?;

    // The name server and the name.
    let dns = Arc::new(DnsServer::start().await);
    let (set_a, set_b) = address_sets();
    dns.set(NAME, Answer::Addresses(set_a.clone()));

    let dir = tempfile::tempdir().map_err(|e| format!("tempdir: {e}"))?;
    let config = format!(
        "[server]\nlisten = [\"127.0.0.1:0\"]\nworkers = 1\n\n[admin]\nlisten = \"127.0.0.1:0\"\n\n\
         [log]\naccess = false\n\n[resolver]\nnameservers = [\"{dns}\"]\n\n\
         [upstreams.churn]\nbackends = [\"http://{NAME}:9\"]\nresolve_interval = \"100ms\"\n\n\
         [upstreams.app]\nbackends = [\"http://127.0.0.1:{app_port}\"]\nkeepalive = 256\n\n\
         [[routes]]\npath_prefix = \"/churn\"\nupstream = \"churn\"\n\n\
         [[routes]]\npath_prefix = \"/\"\nupstream = \"app\"\n",
        dns = dns.addr
    );
    let config_path = dir.path().join("balancer.toml");
    std::fs::write(&config_path, config).map_err(|e| format!("write config: {e}"))?;
    let logs = Arc::new(Logs::default());
    let mut bal = start_balancer(&config_path, logs.clone())?;
    let pid = bal.0.id();
    let deadline = Instant::now() + Duration::from_secs(15);
    let (listen, admin) = loop {
        let (l, a) = (*logs.listen.lock().unwrap(), *logs.admin.lock().unwrap());
        if let (Some(l), Some(a)) = (l, a) {
            break (l, a);
        }
        if let Ok(Some(status)) = bal.0.try_wait() {
            return Err(format!("balancer exited with {status}: {:?}", logs.tail.lock().unwrap()));
        }
        if Instant::now() > deadline {
            return Err(format!("balancer did not log its listeners: {:?}", logs.tail.lock().unwrap()));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let http: Http = Client::builder(TokioExecutor::new()).build_http();
    wait_listed(&http, admin, &set_a).await?;
    if get(&http, listen, "/").await.is_err() {
        return Err("GET / through balancer did not answer 200".into());
    }
    eprintln!("dns_churn: balancer pid {pid} on {listen} follows {NAME} ({ADDRESSES} addresses) every 100 ms");

    // CPU: steady then flipping, ROUNDS times.
    let mut per_lookup = Vec::new();
    let mut per_change = Vec::new();
    let mut rounds = Vec::new();
    for round in 1..=ROUNDS {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let (q0, c0, t0) = (dns.queries.load(Ordering::SeqCst), logs.changes.load(Ordering::SeqCst), cpu_ticks(pid)?);
        let start = Instant::now();
        tokio::time::sleep(PERIOD).await;
        let (q1, c1, t1) = (dns.queries.load(Ordering::SeqCst), logs.changes.load(Ordering::SeqCst), cpu_ticks(pid)?);
        let steady_secs = start.elapsed().as_secs_f64();
        if c1 != c0 {
            return Err(format!("balancer found {} changes while the answer did not change", c1 - c0));
        }

        let stop = Arc::new(AtomicBool::new(false));
        let start = Instant::now();
        let flipper = spawn_flipper(dns.clone(), set_a.clone(), set_b.clone(), stop.clone());
        tokio::time::sleep(PERIOD).await;
        stop.store(true, Ordering::SeqCst);
        let (q2, c2, t2) = (dns.queries.load(Ordering::SeqCst), logs.changes.load(Ordering::SeqCst), cpu_ticks(pid)?);
        let flip_secs = start.elapsed().as_secs_f64();
        let flips = flipper.await.map_err(|e| format!("flipper: {e}"))?;
        wait_listed(&http, admin, &set_a).await?;
        // The last flip may be applied after the window closed: let it, then start afresh.
        tokio::time::sleep(Duration::from_millis(300)).await;

        let lookups = (q1 - q0) as f64 / QUERIES_PER_LOOKUP;
        let changes = c2 - c1;
        let steady_ms = (t1 - t0) as f64 * 1000.0 / tck;
        let flip_ms = (t2 - t1) as f64 * 1000.0 / tck;
        // Normalised to the same length of time.
        let flip_ms_norm = flip_ms * steady_secs / flip_secs;
        let lookup_ms = steady_ms / lookups;
        let change_ms = (flip_ms_norm - steady_ms) / changes.max(1) as f64;
        eprintln!(
            "dns_churn: round {round}: steady {steady_ms:.0} ms CPU in {steady_secs:.1} s, {lookups:.0} lookups \
             ({:.0} queries in the flipping period); flipping {flip_ms:.0} ms CPU in {flip_secs:.1} s, \
             {flips} flips, {changes} changes found",
            (q2 - q1) as f64
        );
        per_lookup.push(lookup_ms);
        per_change.push(change_ms);
        rounds.push((steady_ms, lookups, flip_ms, changes));
    }

    // p99: wrk with no change and while the answer flips, in the order steady, flipping,
    // flipping, steady (so a drift of the machine's load shows rather than biasing one side).
    eprintln!("dns_churn: wrk warm-up 2 s, then {WRK_SECS} s runs: steady, flipping, flipping, steady");
    tokio::task::spawn_blocking(move || wrk(listen, 2)).await.map_err(|e| e.to_string())??;
    let mut wrk_runs = Vec::new();
    for flip in [false, true, true, false] {
        let c0 = logs.changes.load(Ordering::SeqCst);
        let stop = Arc::new(AtomicBool::new(false));
        let flipper = flip.then(|| spawn_flipper(dns.clone(), set_a.clone(), set_b.clone(), stop.clone()));
        let run = tokio::task::spawn_blocking(move || wrk(listen, WRK_SECS)).await.map_err(|e| e.to_string())??;
        stop.store(true, Ordering::SeqCst);
        let changes = logs.changes.load(Ordering::SeqCst) - c0;
        if let Some(flipper) = flipper {
            flipper.await.map_err(|e| format!("flipper: {e}"))?;
            wait_listed(&http, admin, &set_a).await?;
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        wrk_runs.push((flip, run, changes));
    }
    if let Ok(Some(status)) = bal.0.try_wait() {
        return Err(format!("balancer exited with {status}"));
    }

    println!();
    println!(
        "dns_churn: {ADDRESSES} addresses, resolve_interval 100 ms, change = 500 of them replaced, \
         server.workers = 1, CLK_TCK {tck}"
    );
    println!();
    println!(
        "| round | steady CPU ms / {}s | lookups | flipping CPU ms / {}s | changes |",
        PERIOD.as_secs(),
        PERIOD.as_secs()
    );
    println!("|---|---|---|---|---|");
    for (i, (s, l, f, c)) in rounds.iter().enumerate() {
        println!("| {} | {s:.0} | {l:.0} | {f:.0} | {c} |", i + 1);
    }
    println!();
    println!("| figure | value |");
    println!("|---|---|");
    println!("| CPU per lookup of {ADDRESSES} addresses (median of {ROUNDS}) | {:.2} ms |", median(per_lookup));
    println!("| CPU per change applied (median of {ROUNDS}) | {:.2} ms |", median(per_change));
    println!();
    println!("| wrk -t1 -c32 {WRK_SECS}s on / | requests/s | p50 ms | p99 ms | changes applied |");
    println!("|---|---|---|---|---|");
    for (flip, w, changes) in &wrk_runs {
        let what = if *flip { "flipping every 500 ms" } else { "no change" };
        println!("| {what} | {:.0} | {:.3} | {:.3} | {changes} |", w.rps, w.p50_ms, w.p99_ms);
    }
    let mean = |flip: bool, f: fn(&Wrk) -> f64| {
        let v: Vec<f64> = wrk_runs.iter().filter(|r| r.0 == flip).map(|r| f(&r.1)).collect();
        v.iter().sum::<f64>() / v.len() as f64
    };
    let (rps, p99) = (|w: &Wrk| w.rps, |w: &Wrk| w.p99_ms);
    println!(
        "| mean of 2, no change / flipping | {:.0} / {:.0} | | {:.3} / {:.3} | |",
        mean(false, rps),
        mean(true, rps),
        mean(false, p99),
        mean(true, p99)
    );
    Ok(())
}
