//! Live reload through the real binary (SPEC section 6): triggers, atomic swaps under load,
//! invalid edits, state carried over, listeners that come and go.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn cfg(listen: &[String], body: &str) -> String {
    let listen: Vec<String> = listen.iter().map(|l| format!("\"{l}\"")).collect();
    format!("[server]\nlisten = [{}]\n\n[admin]\nlisten = \"127.0.0.1:0\"\n\n{body}\n", listen.join(", "))
}

fn upstream(name: &str, addrs: &[SocketAddr], extra: &str) -> String {
    let list: Vec<String> = addrs.iter().map(|a| format!("\"http://{a}\"")).collect();
    format!("[upstreams.{name}]\nbackends = [{}]\n{extra}\n", list.join(", "))
}

async fn status(admin: SocketAddr) -> serde_json::Value {
    get(admin, "/status").await.json()
}

/// Waits for `/status` to show `generation`; returns how long that took.
async fn wait_generation(admin: SocketAddr, generation: u64, within: Duration) -> Duration {
    let start = Instant::now();
    loop {
        let s = status(admin).await;
        if s["generation"].as_u64() == Some(generation) {
            return start.elapsed();
        }
        assert!(start.elapsed() < within, "generation {generation} not reached within {within:?}: {s}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn failures(admin: SocketAddr) -> f64 {
    metric(&get(admin, "/metrics").await.text(), "balancer_config_reloads_total{result=\"failure\"}").unwrap()
}

/// A port nothing listens on right now.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

#[tokio::test(flavor = "multi_thread")]
async fn twenty_edits_under_load_drop_nothing_and_apply_within_a_second() {
    let (a, b_, c) = (Upstream::start("a").await, Upstream::start("b").await, Upstream::start("c").await);
    let listen = vec!["127.0.0.1:0".to_owned()];
    let variants: Vec<(String, &[&str])> = vec![
        (upstream("app", &[a.addr, b_.addr], ""), &["a", "b"]),
        (upstream("app", &[a.addr, b_.addr, c.addr], "strategy = \"least-connections\""), &["a", "b", "c"]),
        (upstream("app", &[c.addr], ""), &["c"]),
        (
            format!(
                "{}{}[[routes]]\npath_prefix = \"/\"\nupstream = \"other\"\n",
                upstream("app", &[a.addr], ""),
                upstream("other", &[b_.addr], "")
            ),
            &["b"],
        ),
    ];
    let bal = Balancer::start(&cfg(&listen, &variants[0].0), &[]);
    let admin = bal.admin();
    let addr = bal.addr();
    let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let running = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let mut clients = Vec::new();
    for _ in 0..8 {
        let (ok, failed, running) = (ok.clone(), failed.clone(), running.clone());
        clients.push(tokio::spawn(async move {
            let mut conn = Conn::open(addr).await;
            while running.load(Ordering::SeqCst) {
                match conn.get("/").await {
                    Ok(r) if r.status == 200 => ok.fetch_add(1, Ordering::SeqCst),
                    Ok(r) => {
                        eprintln!("status {}: {}", r.status, r.text());
                        failed.fetch_add(1, Ordering::SeqCst)
                    }
                    Err(e) => {
                        // The connection is gone: a new one, so that the failure is counted
                        // once instead of spinning on a closed connection.
                        eprintln!("error: {e}");
                        conn = Conn::open(addr).await;
                        failed.fetch_add(1, Ordering::SeqCst)
                    }
                };
            }
        }));
    }
    let mut slowest = Duration::ZERO;
    for i in 1..=20u64 {
        let (text, allowed) = &variants[i as usize % variants.len()];
        let text = cfg(&listen, text);
        if i % 2 == 0 {
            bal.write_config(&text)
        } else {
            bal.rename_config(&text)
        }
        let took = wait_generation(admin, i + 1, Duration::from_secs(3)).await;
        slowest = slowest.max(took);
        for _ in 0..3 {
            let r = get(addr, "/").await;
            assert!(
                allowed.contains(&r.header("x-upstream").unwrap()),
                "edit {i}: {:?} not in {allowed:?}",
                r.header("x-upstream")
            );
        }
    }
    running.store(false, Ordering::SeqCst);
    for c in clients {
        c.await.unwrap();
    }
    let (ok, failed) = (ok.load(Ordering::SeqCst), failed.load(Ordering::SeqCst));
    eprintln!("{ok} requests during 20 reloads; slowest reload seen after {slowest:?}");
    assert_eq!(failed, 0, "{failed} failed requests during reloads");
    assert!(ok > 200, "only {ok} requests");
    assert!(slowest < Duration::from_secs(1), "a change took {slowest:?} to apply");
    assert_eq!(
        metric(&get(admin, "/metrics").await.text(), "balancer_config_reloads_total{result=\"success\"}"),
        Some(20.0)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn sighup_and_post_reload_reload_and_report() {
    let a = Upstream::start("a").await;
    let listen = vec!["127.0.0.1:0".to_owned()];
    let good = cfg(&listen, &upstream("app", &[a.addr], ""));
    let bal = Balancer::start(&good, &[]);
    let admin = bal.admin();
    bal.signal("HUP");
    wait_generation(admin, 2, Duration::from_secs(2)).await;
    let r = send(admin, http::Request::post("/reload").header("host", "x").body(Default::default()).unwrap()).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json(), serde_json::json!({ "ok": true, "generation": 3 }));
    // A bad file: the watcher's attempt fails, and so does POST /reload, with the position.
    bal.write_config(&good.replace("backends", "backendz"));
    let start = Instant::now();
    while failures(admin).await < 1.0 {
        assert!(start.elapsed() < Duration::from_secs(3), "the bad edit was not noticed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let r = send(admin, http::Request::post("/reload").header("host", "x").body(Default::default()).unwrap()).await;
    assert_eq!(r.status, 422);
    let body = r.json();
    assert_eq!(body["ok"], false);
    let err = body["error"].as_str().unwrap();
    assert!(err.contains("balancer.toml:8:1:") && err.contains("backendz"), "{err}");
    assert_eq!(status(admin).await["generation"], 3);
    assert_eq!(get(admin, "/reload").await.status, 405);
}

#[tokio::test(flavor = "multi_thread")]
async fn invalid_edits_change_nothing_and_the_next_good_edit_applies() {
    let (a, b_) = (Upstream::start("a").await, Upstream::start("b").await);
    let listen = vec!["127.0.0.1:0".to_owned()];
    let good_a = cfg(&listen, &upstream("app", &[a.addr], ""));
    let bal = Balancer::start(&good_a, &[]);
    let admin = bal.admin();
    let bad_edits = [
        ("syntax error", cfg(&listen, &upstream("app", &[b_.addr], "retries = = 1")), Some("balancer.toml:9:")),
        ("unknown key", cfg(&listen, &upstream("app", &[b_.addr], "retrys = 1")), Some("balancer.toml:9:1:")),
        (
            "route to a missing upstream",
            cfg(&listen, &format!("{}[[routes]]\nupstream = \"nope\"\n", upstream("app", &[b_.addr], ""))),
            Some("balancer.toml:11:12:"),
        ),
        ("deleted file", String::new(), Some("cannot read config file")),
        ("unreadable file", String::new(), Some("cannot read config file")),
    ];
    for (n, (what, text, expect)) in bad_edits.iter().enumerate() {
        match *what {
            // (after "deleted file", so there is no file to remove)
            "unreadable file" => std::fs::create_dir(&bal.config_path).unwrap(),
            "deleted file" => std::fs::remove_file(&bal.config_path).unwrap(),
            _ => bal.write_config(text),
        }
        let start = Instant::now();
        while failures(admin).await < (n + 1) as f64 {
            assert!(start.elapsed() < Duration::from_secs(4), "{what}: failure not counted");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // The old config still serves.
        assert_eq!(get(bal.addr(), "/").await.header("x-upstream"), Some("a"), "{what}");
        let s = status(admin).await;
        assert_eq!(s["generation"], 1, "{what}");
        assert_eq!(s["last_reload"]["ok"], false, "{what}");
        let err = s["last_reload"]["error"].as_str().unwrap();
        if let Some(e) = expect {
            assert!(err.contains(e), "{what}: {err}");
        }
        let logged = bal.wait_for_log(Duration::from_secs(1), |l| {
            l["message"] == "config reload failed; the running config stays in force" && l["error"] == err
        });
        assert_eq!(logged["level"], "ERROR");
    }
    // The next good edit is picked up.
    std::fs::remove_dir(&bal.config_path).unwrap();
    bal.write_config(&cfg(&listen, &upstream("app", &[b_.addr], "")));
    wait_generation(admin, 2, Duration::from_secs(3)).await;
    assert_eq!(get(bal.addr(), "/").await.header("x-upstream"), Some("b"));
    assert_eq!(status(admin).await["last_reload"]["ok"], true);
}

#[tokio::test(flavor = "multi_thread")]
async fn kept_backends_keep_counters_pools_and_health_and_unchanged_limits_keep_buckets() {
    let (a, b_) = (Upstream::start("a").await, Upstream::start("b").await);
    let listen = vec!["127.0.0.1:0".to_owned()];
    let hc = "[upstreams.app.health_check]\ninterval = \"100ms\"\ntimeout = \"100ms\"\nunhealthy_threshold = 1\nhealthy_threshold = 50\n";
    let limit = "[rate_limits.ip]\nrate = 2\nper = \"1h\"\n[[routes]]\nupstream = \"app\"\nrate_limit = \"ip\"\n";
    let v1 = cfg(&listen, &format!("{}{hc}{limit}", upstream("app", &[a.addr, b_.addr], "")));
    let bal = Balancer::start(&v1, &[]);
    let (admin, addr) = (bal.admin(), bal.addr());
    let mut conn = Conn::open(addr).await;
    assert_eq!(conn.get("/").await.unwrap().status, 200);
    assert_eq!(conn.get("/").await.unwrap().status, 200);
    assert_eq!(conn.get("/").await.unwrap().status, 429);
    // Take b down by its active checks (it needs 50 passes to come back).
    b_.set_health(500);
    let url_b = format!("http://{}", b_.addr);
    let healthy_b = |s: &serde_json::Value| {
        s["upstreams"][0]["backends"].as_array().unwrap().iter().find(|x| x["url"] == url_b).unwrap()["healthy"].clone()
    };
    let start = Instant::now();
    while healthy_b(&status(admin).await) != false {
        assert!(start.elapsed() < Duration::from_secs(3));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    b_.set_health(200);
    let requests_a = status(admin).await["upstreams"][0]["backends"][0]["requests"].as_u64().unwrap();

    // An unrelated change: one more retry.
    bal.write_config(&cfg(&listen, &format!("{}{hc}{limit}", upstream("app", &[a.addr, b_.addr], "retries = 2"))));
    wait_generation(admin, 2, Duration::from_secs(3)).await;
    let s = status(admin).await;
    assert_eq!(healthy_b(&s), false, "b's health state was kept: {s}");
    assert_eq!(s["upstreams"][0]["backends"][0]["requests"].as_u64().unwrap(), requests_a, "a's counters kept");
    assert_eq!(conn.get("/").await.unwrap().status, 429, "the unchanged limit kept its bucket");

    // Change the limit's definition: its buckets start afresh.
    let limit2 = limit.replace("rate = 2", "rate = 3");
    bal.write_config(&cfg(&listen, &format!("{}{hc}{limit2}", upstream("app", &[a.addr, b_.addr], "retries = 2"))));
    wait_generation(admin, 3, Duration::from_secs(3)).await;
    assert_eq!(conn.get("/").await.unwrap().status, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_kept_backend_keeps_its_pooled_connections() {
    let a = Upstream::start("a").await;
    let listen = vec!["127.0.0.1:0".to_owned()];
    // One worker thread, so that every client connection draws on the same idle list.
    let bal = Balancer::start(
        &cfg(&listen, &upstream("app", &[a.addr], "pool_idle_timeout = \"30s\"")),
        &["--set", "server.workers=1"],
    );
    let admin = bal.admin();
    for _ in 0..3 {
        assert_eq!(get(bal.addr(), "/").await.status, 200);
    }
    assert_eq!(a.connections.load(Ordering::SeqCst), 1);
    for generation in 2..=4 {
        let extra = format!("pool_idle_timeout = \"30s\"\nretries = {generation}");
        bal.write_config(&cfg(&listen, &upstream("app", &[a.addr], &extra)));
        wait_generation(admin, generation, Duration::from_secs(3)).await;
        assert_eq!(get(bal.addr(), "/").await.status, 200);
    }
    assert_eq!(a.connections.load(Ordering::SeqCst), 1, "the pooled connection was reused across reloads");
}

#[tokio::test(flavor = "multi_thread")]
async fn listeners_are_added_removed_and_a_bind_failure_fails_the_reload() {
    let a = Upstream::start("a").await;
    let (p1, p2) = (free_port(), free_port());
    let l1 = format!("127.0.0.1:{p1}");
    let l2 = format!("127.0.0.1:{p2}");
    let body = upstream("app", &[a.addr], "");
    let bal = Balancer::start(&cfg(std::slice::from_ref(&l1), &body), &[]);
    let admin = bal.admin();
    let a1: SocketAddr = l1.parse().unwrap();
    let a2: SocketAddr = l2.parse().unwrap();

    bal.write_config(&cfg(&[l1.clone(), l2.clone()], &body));
    wait_generation(admin, 2, Duration::from_secs(3)).await;
    assert_eq!(get(a2, "/").await.status, 200, "the added listener serves");
    assert_eq!(get(a1, "/").await.status, 200);

    // Remove l1 while a slow request is in flight on it.
    let slow = tokio::spawn(async move { get(a1, "/sleep/1000").await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    bal.write_config(&cfg(std::slice::from_ref(&l2), &body));
    wait_generation(admin, 3, Duration::from_secs(3)).await;
    assert_eq!(slow.await.unwrap().status, 200, "the removed listener's request finished");
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(TcpStream::connect(a1).await.is_err(), "the removed listener still accepts");
    assert_eq!(get(a2, "/").await.status, 200);

    // A listener that cannot be bound fails the whole reload: nothing else changes.
    let squatter = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = squatter.local_addr().unwrap().to_string();
    let b_ = Upstream::start("b").await;
    bal.write_config(&cfg(&[l2.clone(), taken.clone()], &upstream("app", &[b_.addr], "")));
    let start = Instant::now();
    while failures(admin).await < 1.0 {
        assert!(start.elapsed() < Duration::from_secs(3));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let s = status(admin).await;
    assert_eq!(s["generation"], 3);
    assert!(s["last_reload"]["error"].as_str().unwrap().contains(&taken), "{s}");
    assert_eq!(get(a2, "/").await.header("x-upstream"), Some("a"), "the old upstream still serves");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_upgraded_connection_survives_reloads_even_when_its_backend_is_removed() {
    let (ws, other) = (Upstream::start("ws").await, Upstream::start("other").await);
    let listen = vec!["127.0.0.1:0".to_owned()];
    let bal = Balancer::start(&cfg(&listen, &upstream("app", &[ws.addr], "")), &[]);
    let admin = bal.admin();
    let mut s = TcpStream::connect(bal.addr()).await.unwrap();
    s.write_all(b"GET /chat HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n").await.unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut byte).await.unwrap();
        head.push(byte[0]);
    }
    assert!(head.starts_with(b"HTTP/1.1 101"));
    for generation in 2..=4 {
        let backend = if generation % 2 == 0 { other.addr } else { ws.addr };
        bal.write_config(&cfg(&listen, &upstream("app", &[backend], &format!("retries = {generation}"))));
        wait_generation(admin, generation, Duration::from_secs(3)).await;
        let msg = format!("still here after generation {generation}");
        s.write_all(msg.as_bytes()).await.unwrap();
        let mut got = vec![0u8; msg.len()];
        tokio::time::timeout(Duration::from_secs(3), s.read_exact(&mut got)).await.unwrap().unwrap();
        assert_eq!(got, msg.as_bytes());
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn command_line_overrides_keep_winning_after_a_reload() {
    let (a, b_) = (Upstream::start("a").await, Upstream::start("b").await);
    let listen = vec!["127.0.0.1:0".to_owned()];
    let backend_flag = format!("http://{}", a.addr);
    let bal = Balancer::start(&cfg(&listen, &upstream("app", &[b_.addr], "")), &["-b", &backend_flag]);
    let admin = bal.admin();
    assert_eq!(get(bal.addr(), "/").await.header("x-upstream"), Some("a"));
    bal.write_config(&cfg(&listen, &upstream("app", &[b_.addr], "retries = 3")));
    wait_generation(admin, 2, Duration::from_secs(3)).await;
    for _ in 0..3 {
        assert_eq!(
            get(bal.addr(), "/").await.header("x-upstream"),
            Some("a"),
            "--backend still replaces the file's backends"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_kubernetes_style_symlink_swap_is_seen() {
    let (a, b_) = (Upstream::start("a").await, Upstream::start("b").await);
    let listen = vec!["127.0.0.1:0".to_owned()];
    // dir/balancer.toml -> ..data/balancer.toml, ..data -> ..v1
    let dir = tempfile::tempdir().unwrap();
    let v1 = dir.path().join("..v1");
    std::fs::create_dir(&v1).unwrap();
    std::fs::write(v1.join("balancer.toml"), cfg(&listen, &upstream("app", &[a.addr], ""))).unwrap();
    std::os::unix::fs::symlink("..v1", dir.path().join("..data")).unwrap();
    let link = dir.path().join("balancer.toml");
    std::os::unix::fs::symlink("..data/balancer.toml", &link).unwrap();
    let bal = Balancer::start("", &["-c", link.to_str().unwrap()]);
    let admin = bal.admin();
    assert_eq!(get(bal.addr(), "/").await.header("x-upstream"), Some("a"));
    // The kubelet's swap: a new versioned dir, a new ..data link renamed over the old one.
    let v2 = dir.path().join("..v2");
    std::fs::create_dir(&v2).unwrap();
    std::fs::write(v2.join("balancer.toml"), cfg(&listen, &upstream("app", &[b_.addr], ""))).unwrap();
    std::os::unix::fs::symlink("..v2", dir.path().join("..data_tmp")).unwrap();
    std::fs::rename(dir.path().join("..data_tmp"), dir.path().join("..data")).unwrap();
    std::fs::remove_dir_all(&v1).unwrap();
    let took = wait_generation(admin, 2, Duration::from_secs(3)).await;
    assert!(took < Duration::from_secs(1), "took {took:?}");
    assert_eq!(get(bal.addr(), "/").await.header("x-upstream"), Some("b"));
}

#[tokio::test(flavor = "multi_thread")]
async fn log_settings_change_live() {
    let a = Upstream::start("a").await;
    let listen = vec!["127.0.0.1:0".to_owned()];
    let bal = Balancer::start(&cfg(&listen, &upstream("app", &[a.addr], "")), &[]);
    let admin = bal.admin();
    let with_id = |id: &'static str| {
        http::Request::get("/").header("host", "x").header("x-request-id", id).body(Default::default()).unwrap()
    };
    send(bal.addr(), with_id("before-reload")).await;
    bal.wait_for_log(Duration::from_secs(3), |l| l["target"] == "access" && l["request_id"] == "before-reload");
    // Access log off and level warn: no access line, and info lines (config reloaded) stop too.
    bal.write_config(&cfg(
        &listen,
        &format!("[log]\naccess = false\nlevel = \"warn\"\n\n{}", upstream("app", &[a.addr], "")),
    ));
    wait_generation(admin, 2, Duration::from_secs(3)).await;
    assert_eq!(send(bal.addr(), with_id("after-reload")).await.status, 200);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let logs = bal.logs();
    assert!(!logs.iter().any(|l| l["request_id"] == "after-reload"), "access line after access = false");
    assert!(bal.logs_matching("config reloaded").is_empty(), "an info line was logged at level warn");
    // Back to info with the access log on: both return, live.
    bal.write_config(&cfg(&listen, &upstream("app", &[a.addr], "retries = 3")));
    wait_generation(admin, 3, Duration::from_secs(3)).await;
    bal.wait_for_log(Duration::from_secs(3), |l| l["message"] == "config reloaded" && l["generation"] == 3);
    send(bal.addr(), with_id("back-on")).await;
    bal.wait_for_log(Duration::from_secs(3), |l| l["target"] == "access" && l["request_id"] == "back-on");
}
