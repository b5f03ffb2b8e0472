//! Strategies that keep a user on one backend or follow latency, through the real binary
//! (SPEC 13): consistent-hash across requests, reloads, a backend added and one removed;
//! least-latency with a slow backend and with one that answers errors fast; sticky cookies.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use http::Request;
use http_body_util::Full;
use tokio::io::AsyncWriteExt;

const BY_USER: &str = "strategy = \"consistent-hash\"\nhash_key = \"header:X-User-Id\"\n";

fn addrs(ups: &[&Upstream]) -> Vec<SocketAddr> {
    ups.iter().map(|u| u.addr).collect()
}

/// Waits for `/status` to show `generation`.
async fn wait_generation(admin: SocketAddr, generation: u64) {
    let start = Instant::now();
    loop {
        let s = get(admin, "/status").await.json();
        if s["generation"].as_u64() == Some(generation) {
            return;
        }
        assert!(start.elapsed() < Duration::from_secs(5), "generation {generation} not reached: {s}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The backend (its name) that serves each of the users `ids`, one request each.
async fn owners(addr: SocketAddr, ids: std::ops::Range<usize>) -> Vec<String> {
    let mut conn = Conn::open(addr).await;
    let mut out = Vec::with_capacity(ids.len());
    for id in ids {
        let req = Request::get("/").header("host", "t").header("x-user-id", format!("user-{id}"));
        let r = conn.send(req.body(Full::default()).unwrap()).await.unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
        out.push(r.header("x-upstream").unwrap().to_owned());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_key_lands_on_the_same_backend_across_requests_and_a_reload() {
    let (a, b, c) = (Upstream::start("a").await, Upstream::start("b").await, Upstream::start("c").await);
    let bal = Balancer::start(&config_with_admin(&addrs(&[&a, &b, &c]), BY_USER), &[]);
    let first = owners(bal.addr(), 0..100).await;
    for name in ["a", "b", "c"] {
        assert!(first.iter().any(|o| o == name), "no key on {name}: {first:?}");
    }
    // 1,000 requests: every user ten times, always to the same backend.
    for _ in 0..9 {
        assert_eq!(owners(bal.addr(), 0..100).await, first);
    }
    // A reload that keeps the backends (listed in another order, another setting changed).
    bal.write_config(&config_with_admin(&addrs(&[&c, &a, &b]), &format!("{BY_USER}retries = 2\n")));
    wait_generation(bal.admin(), 2).await;
    assert_eq!(owners(bal.addr(), 0..100).await, first, "the reload moved keys");

    // Without the key, a request is hashed by its client IP: one backend for all of them.
    let mut seen: Vec<String> = Vec::new();
    for _ in 0..20 {
        seen.push(get(bal.addr(), "/").await.header("x-upstream").unwrap().to_owned());
    }
    seen.dedup();
    assert_eq!(seen.len(), 1, "{seen:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_added_takes_about_a_quarter_and_one_removed_gives_up_only_its_own() {
    let ups = [Upstream::start("a").await, Upstream::start("b").await, Upstream::start("c").await];
    let d = Upstream::start("d").await;
    let three = addrs(&[&ups[0], &ups[1], &ups[2]]);
    let bal = Balancer::start(&config_with_admin(&three, BY_USER), &[]);
    let before = owners(bal.addr(), 0..1000).await;

    bal.write_config(&config_with_admin(&addrs(&[&ups[0], &ups[1], &ups[2], &d]), BY_USER));
    wait_generation(bal.admin(), 2).await;
    let after = owners(bal.addr(), 0..1000).await;
    let moved: Vec<usize> = (0..1000).filter(|&k| before[k] != after[k]).collect();
    assert!((150..=350).contains(&moved.len()), "{} of 1000 keys moved", moved.len());
    assert!(moved.iter().all(|&k| after[k] == "d"), "a key moved between the old backends");

    // Remove b: its keys go elsewhere, every other key stays where it was.
    bal.write_config(&config_with_admin(&addrs(&[&ups[0], &ups[2], &d]), BY_USER));
    wait_generation(bal.admin(), 3).await;
    let removed = owners(bal.addr(), 0..1000).await;
    for k in 0..1000 {
        match after[k].as_str() {
            "b" => assert_ne!(removed[k], "b"),
            owner => assert_eq!(removed[k], owner, "key {k} moved though its backend stayed"),
        }
    }
    assert!(after.iter().any(|o| o == "b"));
}

/// `clients` concurrent keep-alive clients sending `each` GETs; the statuses seen.
async fn load(addr: SocketAddr, clients: usize, each: usize) -> Vec<u16> {
    let tasks: Vec<_> = (0..clients)
        .map(|_| {
            tokio::spawn(async move {
                let mut conn = Conn::open(addr).await;
                let mut statuses = Vec::with_capacity(each);
                for _ in 0..each {
                    statuses.push(conn.get("/").await.unwrap().status.as_u16());
                }
                statuses
            })
        })
        .collect();
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    all
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_latency_sends_little_to_a_slow_backend() {
    let fast = [Upstream::start("f1").await, Upstream::start("f2").await, Upstream::start("f3").await];
    let slow =
        Upstream::start_with("slow", UpstreamOpts { delay: Some(Duration::from_millis(50)), ..Default::default() })
            .await;
    let list = addrs(&[&fast[0], &slow, &fast[1], &fast[2]]);
    let bal = Balancer::start(&config_for(&list, "strategy = \"least-latency\"\n"), &[]);
    let statuses = load(bal.addr(), 4, 150).await;
    assert!(statuses.iter().all(|&s| s == 200));
    let share = slow.hits() as f64 / 600.0;
    assert!(share < 0.15, "the 50 ms backend got {} of 600", slow.hits());
    assert!(fast.iter().all(|f| f.hits() > 60), "{:?}", fast.iter().map(|f| f.hits()).collect::<Vec<_>>());
}

/// A backend that answers every request at once with a 500 (the fast error linkerd warns of).
async fn fast_errors() -> RawUpstream {
    RawUpstream::start(|mut s| async move {
        while !read_head(&mut s).await.is_empty() {
            let answer = b"HTTP/1.1 500 Internal Server Error\r\ncontent-length: 0\r\n\r\n";
            if s.write_all(answer).await.is_err() {
                return;
            }
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_latency_does_not_reward_a_backend_that_fails_fast() {
    let ok = [Upstream::start("a").await, Upstream::start("b").await, Upstream::start("c").await];
    let broken = fast_errors().await;
    let list = [ok[0].addr, broken.addr, ok[1].addr, ok[2].addr];
    let bal = Balancer::start(&config_for(&list, "strategy = \"least-latency\"\n"), &[]);
    let statuses = load(bal.addr(), 4, 100).await;
    let errors = statuses.iter().filter(|&&s| s == 500).count();
    assert!(errors < 20, "{errors} of 400 requests went to the backend that answers 500 at once");
}

/// The `name=value` part of a `Set-Cookie` field.
fn cookie_pair(set_cookie: &str) -> String {
    set_cookie.split(';').next().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sticky_cookie_is_set_once_obeyed_and_replaced_when_its_backend_dies() {
    let ups = [Upstream::start("a").await, Upstream::start("b").await, Upstream::start("c").await];
    let sticky = "[upstreams.app.sticky]\ncookie = \"lb\"\nmax_age = \"1h\"\n";
    let bal = Balancer::start(&config_for(&addrs(&[&ups[0], &ups[1], &ups[2]]), sticky), &[]);
    let first = get(bal.addr(), "/").await;
    let set = first.header("set-cookie").expect("the first response pins the client").to_owned();
    assert!(set.starts_with("lb=") && set.ends_with("; Path=/; Max-Age=3600; HttpOnly; SameSite=Lax"), "{set}");
    assert!(!set.contains("127.0.0.1") && !ups.iter().any(|u| set.contains(&u.addr.port().to_string())), "{set}");
    let pinned_to = first.header("x-upstream").unwrap().to_owned();

    // Obeyed under round-robin for 50 requests, and not set again.
    let with = |cookie: &str| {
        let cookie = format!("theme=dark; {cookie}");
        Request::get("/").header("host", "t").header("cookie", cookie).body(Full::<Bytes>::default()).unwrap()
    };
    let mut conn = Conn::open(bal.addr()).await;
    for i in 0..50 {
        let r = conn.send(with(&cookie_pair(&set))).await.unwrap();
        assert_eq!(r.header("x-upstream"), Some(pinned_to.as_str()), "request {i}");
        assert_eq!(r.header("set-cookie"), None, "request {i}");
    }
    // Over HTTP/2 (hyper's response path) too.
    let (_, r) = send_h2(bal.addr(), with(&cookie_pair(&set))).await;
    assert_eq!(r.header("x-upstream"), Some(pinned_to.as_str()));
    assert_eq!(r.header("set-cookie"), None);

    // Its backend dies: the request is served elsewhere and the client pinned there.
    ups.iter().find(|u| u.name == pinned_to).unwrap().kill();
    let r = send(bal.addr(), with(&cookie_pair(&set))).await;
    assert_eq!(r.status, 200);
    let moved_to = r.header("x-upstream").unwrap().to_owned();
    assert_ne!(moved_to, pinned_to);
    let replaced = r.header("set-cookie").expect("a cookie for a dead backend is replaced").to_owned();
    assert_ne!(cookie_pair(&replaced), cookie_pair(&set));
    for _ in 0..10 {
        let r = send(bal.addr(), with(&cookie_pair(&replaced))).await;
        assert_eq!(r.header("x-upstream"), Some(moved_to.as_str()));
        assert_eq!(r.header("set-cookie"), None);
    }

    // A cookie that names no backend (forged, or of a backend removed) is replaced too.
    let r = send(bal.addr(), with("lb=0123456789abcdef")).await;
    assert!(r.header("set-cookie").is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sticky_cookie_set_over_tls_is_secure() {
    use common::tls::{TestCa, http_addr, https_addr, https_get, toml_path};
    let up = Upstream::start("a").await;
    let ca = TestCa::new("balancer test CA");
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = ca.leaf(&["localhost"]).write(dir.path(), "site");
    let extra = format!(
        "[upstreams.app.sticky]\ncookie = \"lb\"\n\n[server.tls]\nlisten = [\"127.0.0.1:0\"]\ncert = {}\nkey = {}\n",
        toml_path(&cert),
        toml_path(&key)
    );
    let bal = Balancer::start(&config_for(&[up.addr], &extra), &[]);
    let (_, r) = https_get(https_addr(&bal), "localhost", &ca, "/").await;
    let set = r.header("set-cookie").unwrap();
    assert!(set.ends_with("; HttpOnly; SameSite=Lax; Secure"), "{set}");
    let plain = get(http_addr(&bal), "/").await;
    assert!(plain.header("set-cookie").unwrap().ends_with("; HttpOnly; SameSite=Lax"));
}
