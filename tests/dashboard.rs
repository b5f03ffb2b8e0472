//! The admin dashboard (SPEC 15) in a real browser: headless Chromium driven through
//! WebDriver (chromedriver, fantoccini) against the real binary under traffic.
//!
//! Needs Debian's `chromium` and `chromium-driver` (`.ci/run` installs them); fails, with
//! that said, when they are missing.

mod common;

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::*;
use fantoccini::{Client, ClientBuilder};
use serde_json::{Value, json};

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

/// A chromedriver on a free port of 127.0.0.1, killed on drop.
struct Driver {
    child: Child,
    addr: SocketAddr,
}

impl Driver {
    async fn start() -> Driver {
        for tool in [CHROMIUM, CHROMEDRIVER] {
            assert!(
                std::path::Path::new(tool).exists(),
                "{tool} is missing: apt-get install -y chromium chromium-driver (.ci/run does)"
            );
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let child = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .arg("--allowed-ips=127.0.0.1")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let up =
            wait_until(Duration::from_secs(15), || async { tokio::net::TcpStream::connect(addr).await.is_ok() }).await;
        assert!(up, "chromedriver did not listen on {addr}");
        Driver { child, addr }
    }

    /// A headless Chromium session with a fresh profile, keeping the browser's console.
    async fn session(&self, profile: &std::path::Path) -> Client {
        let args = [
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--window-size=1280,900",
            &format!("--user-data-dir={}", profile.display()),
        ];
        let caps = json!({
            "browserName": "chrome",
            "goog:chromeOptions": { "binary": CHROMIUM, "args": args },
            "goog:loggingPrefs": { "browser": "ALL" },
        });
        let caps = caps.as_object().unwrap().clone();
        ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(caps)
            .connect(&format!("http://{}", self.addr))
            .await
            .expect("a WebDriver session")
    }

    /// What the page wrote to the browser's console at level SEVERE (errors), through
    /// chromedriver's log endpoint.
    async fn console_errors(&self, client: &Client) -> Vec<String> {
        let id = client.session_id().await.unwrap().unwrap();
        let req = http::Request::post(format!("/session/{id}/se/log"))
            .header("host", self.addr.to_string())
            .header("content-type", "application/json")
            .body(r#"{"type":"browser"}"#.into())
            .unwrap();
        let reply = send(self.addr, req).await;
        assert_eq!(reply.status, 200, "chromedriver's log endpoint: {}", reply.text());
        let entries = reply.json()["value"].as_array().cloned().unwrap_or_default();
        entries
            .iter()
            .filter(|e| e["level"] == "SEVERE")
            .map(|e| e["message"].as_str().unwrap_or_default().to_owned())
            .collect()
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Steady GETs through balancer on two keep-alive connections (and a few on a rate-limited
/// path) until `stop`, at most 60 s.
fn traffic(addr: SocketAddr, stop: Arc<AtomicBool>, sent: Arc<AtomicU64>) -> Vec<tokio::task::JoinHandle<()>> {
    (0..2)
        .map(|i| {
            let (stop, sent) = (stop.clone(), sent.clone());
            tokio::spawn(async move {
                let deadline = Instant::now() + Duration::from_secs(60);
                let mut conn = Conn::open(addr).await;
                let mut n = 0u64;
                while !stop.load(Ordering::SeqCst) && Instant::now() < deadline {
                    let path = if i == 0 && n % 10 == 0 { "/limited" } else { "/" };
                    if conn.get(path).await.is_err() {
                        conn = Conn::open(addr).await;
                    }
                    sent.fetch_add(1, Ordering::SeqCst);
                    n += 1;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            })
        })
        .collect()
}

/// The backends' rows as the page shows them: url -> {health, inflight, requests, failures}.
async fn shown_backends(client: &Client) -> Value {
    client
        .execute(
            r#"var out = {};
            document.querySelectorAll('section.upstream[data-upstream="app"] tr[data-url]').forEach(function (tr) {
              var f = function (n) { return tr.querySelector('[data-field="' + n + '"]').textContent.trim(); };
              out[tr.dataset.url] = { health: f("health"), inflight: Number(f("inflight")),
                requests: Number(f("requests")), failures: Number(f("failures")),
                colour: getComputedStyle(tr.querySelector(".health")).color };
            });
            return out;"#,
            vec![],
        )
        .await
        .unwrap()
}

async fn field(client: &Client, name: &str) -> String {
    let script = format!(
        r#"var e = document.querySelector('section.upstream[data-upstream="app"] [data-field="{name}"]');
        return e ? e.textContent : null;"#
    );
    client.execute(&script, vec![]).await.unwrap().as_str().unwrap_or_default().to_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_dashboard_shows_live_numbers_and_a_dead_backend_in_red() {
    let slow = UpstreamOpts { delay: Some(Duration::from_millis(3)), ..Default::default() };
    let (a, c) = (Upstream::start_with("a", slow.clone()).await, Upstream::start_with("b", slow).await);
    let extra = "[upstreams.app.health_check]\npath = \"/healthz\"\ninterval = \"200ms\"\ntimeout = \"150ms\"\n\
                 healthy_threshold = 1\nunhealthy_threshold = 1\n\n\
                 [rate_limits.per_client]\nrate = 20\nper = \"1m\"\nburst = 1\n\n\
                 [[routes]]\npath_prefix = \"/limited\"\nupstream = \"app\"\nrate_limit = \"per_client\"\n\n\
                 [[routes]]\npath_prefix = \"/\"\nupstream = \"app\"\n";
    let b = Balancer::start(&config_with_admin(&[a.addr, c.addr], extra), &[]);
    let admin = b.admin();
    let (url_a, url_b) = (format!("http://{}", a.addr), format!("http://{}", c.addr));

    let (stop, sent) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicU64::new(0)));
    let load = traffic(b.addr(), stop.clone(), sent.clone());

    let driver = Driver::start().await;
    let profile = tempfile::tempdir().unwrap();
    let client = driver.session(profile.path()).await;
    client.goto(&format!("http://{admin}/")).await.unwrap();
    assert_eq!(client.title().await.unwrap(), "balancer");

    // Under traffic: requests per second and latencies appear once two samples are in.
    let live = wait_until(Duration::from_secs(10), || async {
        field(&client, "rps").await.parse::<f64>().is_ok_and(|r| r > 0.0) && field(&client, "p99").await.ends_with("ms")
    })
    .await;
    assert!(live, "no live rate: rps {:?}, p99 {:?}", field(&client, "rps").await, field(&client, "p99").await);
    let p50 = field(&client, "p50").await;
    assert!(p50.ends_with(" ms"), "{p50}");
    let errors = field(&client, "errors").await;
    assert_eq!(errors, "0.0 %", "no backend fails yet");
    let refused: Value = client
        .execute(r#"var e = document.querySelector('#limits tr[data-limit="per_client"] [data-field="refused"]'); return e && Number(e.textContent);"#, vec![])
        .await
        .unwrap();
    assert!(refused.as_u64().is_some_and(|n| n > 0), "refusals of per_client shown: {refused}");
    let reload: Value =
        client.execute("return document.getElementById('last-reload').textContent", vec![]).await.unwrap();
    assert!(reload.as_str().unwrap().starts_with("ok at "), "{reload}");

    // Traffic stopped, the counters settle: what the page shows is what /status says.
    stop.store(true, Ordering::SeqCst);
    for t in load {
        t.await.unwrap();
    }
    assert!(sent.load(Ordering::SeqCst) > 50, "traffic flowed");
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let status = get(admin, "/status").await.json();
    let shown = shown_backends(&client).await;
    for backend in status["upstreams"][0]["backends"].as_array().unwrap() {
        let url = backend["url"].as_str().unwrap();
        let row = &shown[url];
        assert_eq!(row["requests"], backend["requests"], "{url}: page {row}, /status {backend}");
        assert_eq!(row["inflight"], backend["inflight"], "{url}: page {row}, /status {backend}");
        assert_eq!(row["failures"], backend["failures"], "{url}: page {row}, /status {backend}");
        assert_eq!(row["health"], "up", "{url}");
        assert!(backend["requests"].as_u64().unwrap() > 10, "both backends served: {status}");
    }
    assert_eq!(shown[&url_a]["colour"], "rgb(31, 157, 85)", "green when up");

    // A backend killed turns red within a few seconds.
    c.kill();
    let killed = Instant::now();
    let red =
        wait_until(Duration::from_secs(5), || async { shown_backends(&client).await[&url_b]["health"] == "down" })
            .await;
    let shown = shown_backends(&client).await;
    assert!(red, "still shown {} 5 s after the kill", shown[&url_b]);
    assert_eq!(shown[&url_b]["colour"], "rgb(214, 69, 69)", "red when down");
    assert_eq!(shown[&url_a]["health"], "up");
    let row_class: Value = client
        .execute(&format!(r#"return document.querySelector('tr[data-url="{url_b}"]').className"#), vec![])
        .await
        .unwrap();
    assert_eq!(row_class, "down");
    eprintln!("backend shown down {:?} after the kill", killed.elapsed());

    // Nothing but the page and its feed was loaded, and nothing went wrong in it.
    let resources: Value = client
        .execute("return performance.getEntriesByType('resource').map(function (r) { return r.name; })", vec![])
        .await
        .unwrap();
    for r in resources.as_array().unwrap() {
        assert!(r.as_str().unwrap().starts_with(&format!("http://{admin}/dashboard.json")), "loaded {r}");
    }
    let page_errors: Value = client.execute("return window.dashboardErrors", vec![]).await.unwrap();
    assert_eq!(page_errors, json!([]), "errors in the page");
    let console = driver.console_errors(&client).await;
    assert!(console.is_empty(), "console errors: {console:?}");

    let png = client.screenshot().await.unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    let shot = b.dir.path().join("dashboard.png");
    std::fs::write(&shot, &png).unwrap();
    eprintln!("screenshot: {} ({} bytes)", shot.display(), png.len());
    // To refresh the README's picture: DASHBOARD_SCREENSHOT=docs/dashboard.png cargo test --test dashboard
    if let Ok(path) = std::env::var("DASHBOARD_SCREENSHOT") {
        std::fs::write(path, &png).unwrap();
    }
    client.close().await.unwrap();
}

/// The feed on its own: JSON with the counters the page needs, and the page served as
/// one self-contained HTML document with a policy that lets it load nothing else.
#[tokio::test(flavor = "multi_thread")]
async fn the_page_and_its_feed_are_served_by_the_admin_listener() {
    let a = Upstream::start("a").await;
    let b = Balancer::start(&config_with_admin(&[a.addr], ""), &[]);
    for _ in 0..3 {
        assert_eq!(get(b.addr(), "/").await.status, 200);
    }
    let page = get(b.admin(), "/").await;
    assert_eq!(page.status, 200);
    assert_eq!(page.header("content-type"), Some("text/html; charset=utf-8"));
    assert!(page.header("content-security-policy").unwrap().starts_with("default-src 'none'"));
    assert!(page.text().contains("/dashboard.json"));
    let feed = get(b.admin(), "/dashboard.json").await.json();
    let up = &feed["upstreams"][0];
    assert_eq!(up["name"], "app");
    assert_eq!(up["answered"], 3);
    assert_eq!(up["errors"], 0);
    let buckets: u64 = up["latency_buckets"].as_array().unwrap().iter().map(|n| n.as_u64().unwrap()).sum();
    assert_eq!(buckets, 3, "every answer in one latency bucket");
    assert_eq!(up["latency_buckets"].as_array().unwrap().len(), feed["latency_bounds"].as_array().unwrap().len() + 1);
    assert_eq!(up["backends"][0]["requests"], 3);
    assert!(feed["now_ms"].as_u64().unwrap() > 1_700_000_000_000);
    assert_eq!(
        send(b.admin(), http::Request::post("/").header("host", "x").body(Default::default()).unwrap()).await.status,
        405
    );
}
