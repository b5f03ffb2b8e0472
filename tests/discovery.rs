//! Backends found by DNS, and slow start (SPEC 12), through the real binary with a real
//! DNS server the test controls (`common::dns`): addresses that appear get traffic and
//! ones that go drain, without a reload; failed lookups keep the last set; a name that
//! does not resolve yet answers 503; slow start ramps a new backend's share; IPv6.
//!
//! Backends that one name stands for differ by address, not port: each listens on the
//! same port of its own loopback address (127.0.0.2, 127.0.0.3, ...).

mod common;

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use common::dns::{Answer, DnsServer};
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const NAME: &str = "app.test";

/// Upstreams on the same free port of 127.0.0.2, 127.0.0.3, ... (one per name given).
async fn upstreams_on_one_port(names: &[&str]) -> Vec<Upstream> {
    'retry: for _ in 0..20 {
        let port = std::net::TcpListener::bind("127.0.0.2:0").unwrap().local_addr().unwrap().port();
        for i in 0..names.len() {
            let addr: SocketAddr = format!("127.0.0.{}:{port}", i + 2).parse().unwrap();
            if std::net::TcpListener::bind(addr).is_err() {
                continue 'retry;
            }
        }
        let mut ups = Vec::new();
        for (i, name) in names.iter().enumerate() {
            let addr = format!("127.0.0.{}:{port}", i + 2).parse().unwrap();
            ups.push(Upstream::start_on(addr, name, UpstreamOpts::default()).await);
        }
        return ups;
    }
    panic!("no port free on every loopback address");
}

fn ip(up: &Upstream) -> IpAddr {
    up.addr.ip()
}

/// A config whose one upstream is `NAME` on `port`, looked up on `dns` every 200 ms.
fn config(dns: &DnsServer, port: u16, extra: &str) -> String {
    format!(
        "[server]\nlisten = [\"127.0.0.1:0\"]\n\n[admin]\nlisten = \"127.0.0.1:0\"\n\n\
         [resolver]\nnameservers = [\"{}\"]\n\n\
         [upstreams.app]\nbackends = [\"http://{NAME}:{port}\"]\nresolve_interval = \"200ms\"\npreserve_host = false\n{extra}\n",
        dns.addr
    )
}

/// The backends `/status` lists for the upstream: (url, name).
async fn listed(bal: &Balancer) -> Vec<(String, String)> {
    let s = get(bal.admin(), "/status").await.json();
    s["upstreams"][0]["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| (b["url"].as_str().unwrap().to_owned(), b["name"].as_str().unwrap_or("").to_owned()))
        .collect()
}

async fn wait_listed(bal: &Balancer, want: &[&Upstream]) {
    let mut want: Vec<(String, String)> =
        want.iter().map(|u| (format!("http://{}", u.addr), NAME.to_owned())).collect();
    want.sort();
    let start = Instant::now();
    loop {
        let mut got = listed(bal).await;
        got.sort();
        if got == want {
            return;
        }
        assert!(start.elapsed() < Duration::from_secs(5), "backends {got:?}, expected {want:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Upstreams named `names`, a DNS server with `NAME` on the first of them, and balancer
/// following it (`extra`: more upstream keys), once `/status` lists that one backend.
async fn following(names: &[&str], extra: &str) -> (Vec<Upstream>, DnsServer, Balancer) {
    let ups = upstreams_on_one_port(names).await;
    let dns = DnsServer::start().await;
    dns.set(NAME, Answer::Addresses(vec![ip(&ups[0])]));
    let bal = Balancer::start(&config(&dns, ups[0].addr.port(), extra), &[]);
    wait_listed(&bal, &[&ups[0]]).await;
    (ups, dns, bal)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn addresses_that_appear_get_traffic_and_ones_that_go_drain_without_a_reload() {
    let (ups, dns, bal) = following(&["a", "b"], "").await;
    let (a, b) = (&ups[0], &ups[1]);

    // The name is sent as Host, not the address.
    let r = get(bal.addr(), "/who").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["headers"]["host"], format!("{NAME}:{}", a.addr.port()));

    // An address that appears gets traffic within the interval and a margin.
    dns.set(NAME, Answer::Addresses(vec![ip(a), ip(b)]));
    let appeared = Instant::now();
    assert!(
        wait_until(Duration::from_secs(3), || async {
            get(bal.addr(), "/").await;
            b.hits() > 0
        })
        .await,
        "the new address got no request"
    );
    assert!(appeared.elapsed() < Duration::from_secs(2), "took {:?}", appeared.elapsed());
    wait_listed(&bal, &[a, b]).await;
    let status = get(bal.admin(), "/status").await.json();
    assert_eq!(status["generation"], 1, "DNS changes are not reloads: {status}");

    // One that goes takes no new request while its in-flight one finishes.
    let slow = tokio::spawn({
        let addr = bal.addr();
        async move {
            // Sent until one lands on a (round-robin alternates).
            loop {
                let r = get(addr, "/sleep/1500").await;
                if r.header("x-upstream") == Some("a") {
                    return r.status;
                }
            }
        }
    });
    assert!(wait_until(Duration::from_secs(3), || async { a.paths().iter().any(|p| p == "/sleep/1500") }).await);
    dns.set(NAME, Answer::Addresses(vec![ip(b)]));
    wait_listed(&bal, &[b]).await;
    let a_hits = a.hits();
    for _ in 0..20 {
        let r = get(bal.addr(), "/").await;
        assert_eq!(r.status, 200);
        assert_eq!(r.header("x-upstream"), Some("b"));
    }
    assert_eq!(a.hits(), a_hits, "a removed address got new requests");
    assert_eq!(slow.await.unwrap(), 200, "the in-flight request on the removed address did not finish");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_to_a_removed_address_stays_open_until_it_closes() {
    let (ups, dns, bal) = following(&["a", "b"], "").await;
    let (a, b) = (&ups[0], &ups[1]);

    let mut s = tokio::net::TcpStream::connect(bal.addr()).await.unwrap();
    s.write_all(b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n").await.unwrap();
    let head = upstream::read_head(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert_eq!(a.hits(), 1, "the tunnel is to the address about to go");

    dns.set(NAME, Answer::Addresses(vec![ip(b)]));
    wait_listed(&bal, &[b]).await;
    for word in [&b"still"[..], b"open"] {
        s.write_all(word).await.unwrap();
        let mut echo = vec![0u8; word.len()];
        tokio::time::timeout(Duration::from_secs(3), s.read_exact(&mut echo)).await.unwrap().unwrap();
        assert_eq!(echo, word);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn servfail_a_timeout_and_an_empty_answer_keep_the_last_addresses() {
    let (ups, dns, bal) = following(&["a"], "").await;
    let a = &ups[0];

    let failures = || async {
        let text = get(bal.admin(), "/metrics").await.text();
        metric(&text, "balancer_dns_failures_total{upstream=\"app\"}").unwrap_or(0.0)
    };
    assert_eq!(failures().await, 0.0);
    for answer in [Answer::ServFail, Answer::Silence, Answer::Empty] {
        let before = failures().await;
        dns.set(NAME, answer.clone());
        assert!(
            wait_until(Duration::from_secs(15), || async { failures().await > before }).await,
            "{answer:?} was not counted as a failed lookup"
        );
        wait_listed(&bal, &[a]).await;
        let r = get(bal.addr(), "/").await;
        assert_eq!(r.status, 200, "{answer:?} lost the last known address");
    }
    // Logged once for the whole failing streak, once more when it resolves again.
    assert_eq!(bal.logs_matching("backend host name lookup failed; keeping the last known addresses").len(), 1);
    dns.set(NAME, Answer::Addresses(vec![ip(a)]));
    bal.wait_for_log(Duration::from_secs(5), |l| l["message"] == "backend host name resolves again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_that_does_not_resolve_at_start_answers_503_then_serves() {
    let ups = upstreams_on_one_port(&["a"]).await;
    let a = &ups[0];
    let dns = DnsServer::start().await;
    let bal = Balancer::start(&config(&dns, a.addr.port(), ""), &[]);
    assert!(
        wait_until(Duration::from_secs(3), || async { dns.queries.load(std::sync::atomic::Ordering::SeqCst) > 0 })
            .await
    );
    assert_eq!(get(bal.addr(), "/").await.status, 503);
    assert!(listed(&bal).await.is_empty());

    dns.set(NAME, Answer::Addresses(vec![ip(a)]));
    assert!(
        wait_until(Duration::from_secs(3), || async { get(bal.addr(), "/").await.status == 200 }).await,
        "the name resolved but requests still fail"
    );
    wait_listed(&bal, &[a]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_start_grows_a_new_backends_share_over_time() {
    let (ups, dns, bal) = following(&["a", "b"], "slow_start = \"4s\"").await;
    let (a, b) = (&ups[0], &ups[1]);

    dns.set(NAME, Answer::Addresses(vec![ip(a), ip(b)]));
    wait_listed(&bal, &[a, b]).await;
    let joined = Instant::now();
    // The share of b per second, from the responses' own `x-upstream`.
    let mut per_second = [(0u32, 0u32); 6];
    let mut conn = client::Conn::open(bal.addr()).await;
    while joined.elapsed() < Duration::from_secs(6) {
        let r = conn.get("/").await.unwrap();
        let slot = &mut per_second[joined.elapsed().as_secs().min(5) as usize];
        slot.0 += 1;
        slot.1 += u32::from(r.header("x-upstream") == Some("b"));
    }
    let share: Vec<f64> = per_second.iter().map(|&(n, to_b)| f64::from(to_b) / f64::from(n.max(1))).collect();
    // Round-robin over weights 1 and f (b's share of its weight, 0.1 -> 1 over 4 s) gives b
    // f / (1 + f): about 0.15 in the first second, 0.45 in the fourth, 0.5 after.
    assert!(per_second.iter().all(|&(n, _)| n > 50), "too few requests to measure: {per_second:?}");
    assert!(share[0] < 0.3, "b took {:.2} of the first second: {share:?}", share[0]);
    assert!(share[0] < share[2] && share[2] < share[4] + 0.05, "no ramp: {share:?}");
    assert!(share[5] > 0.42, "b did not reach its full share: {share:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipv6_answers_are_backends_too() {
    let Ok(probe) = std::net::TcpListener::bind("[::1]:0") else {
        eprintln!("no IPv6 loopback here; skipped");
        return;
    };
    let port = probe.local_addr().unwrap().port();
    drop(probe);
    let v6 = Upstream::start_on(format!("[::1]:{port}").parse().unwrap(), "v6", UpstreamOpts::default()).await;
    let dns = DnsServer::start().await;
    dns.set(NAME, Answer::Addresses(vec![v6.addr.ip()]));
    let bal = Balancer::start(&config(&dns, port, ""), &[]);
    wait_listed(&bal, &[&v6]).await;
    assert_eq!(listed(&bal).await[0].0, format!("http://[::1]:{port}"));
    let r = get(bal.addr(), "/").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-upstream"), Some("v6"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_backend_found_by_dns_is_checked_against_the_name_not_the_address() {
    let ca = tls::TestCa::new("balancer test CA");
    let dir = tempfile::tempdir().unwrap();
    let ca_pem = ca.write(dir.path(), "ca.pem");
    // A certificate for the name only: no IP SAN, so a check against 127.0.0.2 would fail.
    let up = tls::TlsUpstream::start_on("127.0.0.2:0".parse().unwrap(), "tls", &ca.leaf(&[NAME])).await;
    let port = up.addr.port();
    let dns = DnsServer::start().await;
    dns.set(NAME, Answer::Addresses(vec![up.addr.ip()]));
    let config = config(&dns, port, &format!("ca = {}", tls::toml_path(&ca_pem)))
        .replace(&format!("http://{NAME}:{port}"), &format!("https://{NAME}:{port}"));
    let bal = Balancer::start(&config, &[]);
    assert!(wait_until(Duration::from_secs(3), || async { !listed(&bal).await.is_empty() }).await);
    let r = get(bal.addr(), "/").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-upstream"), Some("tls"));
    assert_eq!(r.json()["headers"]["host"], format!("{NAME}:{port}"));
    assert_eq!(listed(&bal).await, vec![(format!("https://127.0.0.2:{port}"), NAME.to_owned())]);
}

/// `--check` validates without looking any name up: the name server hears nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_does_not_need_dns() {
    let dns = DnsServer::start().await;
    dns.set("never.resolves.test", Answer::Silence);
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "[resolver]\nnameservers = [\"{}\"]\n\n[upstreams.app]\nbackends = [\"http://never.resolves.test:8000\"]\n",
        dns.addr
    );
    std::fs::write(dir.path().join("balancer.toml"), text).unwrap();
    std::fs::write(dir.path().join("bad.toml"), "[resolver]\nnameservers = [\"dns.example\"]\n").unwrap();
    let path = dir.path().to_owned();
    let (ok, bad) = tokio::task::spawn_blocking(move || {
        (
            run_cli(&["--check", "--config", "balancer.toml"], &path),
            run_cli(&["--check", "--config", "bad.toml"], &path),
        )
    })
    .await
    .unwrap();
    assert_eq!(ok.0, 0, "{}{}", ok.1, ok.2);
    assert_eq!(dns.queries.load(std::sync::atomic::Ordering::SeqCst), 0, "--check looked a name up");
    assert_eq!(bad.0, 1, "{}", bad.2);
    assert!(bad.2.contains("bad.toml:2:") && bad.2.contains("not an IP address"), "{}", bad.2);
}
