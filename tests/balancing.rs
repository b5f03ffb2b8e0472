//! Strategies, retries and the backend connection pool through the real binary (SPEC
//! section 4, and the pooled-connection rules of section 3).

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use http::Request;
use http_body_util::Full;
use tokio::io::AsyncWriteExt;

async fn names(b: &Balancer, n: usize) -> Vec<String> {
    let mut conn = Conn::open(b.addr()).await;
    let mut out = Vec::new();
    for _ in 0..n {
        let r = conn.get("/").await.unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
        out.push(r.header("x-upstream").unwrap().to_owned());
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn round_robin_alternates_strictly_with_equal_weights() {
    let ups = [Upstream::start("a").await, Upstream::start("b").await, Upstream::start("c").await];
    let b = Balancer::start(&config_for(&[ups[0].addr, ups[1].addr, ups[2].addr], ""), &[]);
    let got = names(&b, 9).await;
    let first = &got[..3];
    let mut sorted = first.to_vec();
    sorted.sort();
    assert_eq!(sorted, ["a", "b", "c"], "{got:?}");
    for (i, n) in got.iter().enumerate() {
        assert_eq!(n, &first[i % 3], "strict alternation: {got:?}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn weighted_round_robin_gives_exact_shares_in_every_window() {
    let (a, c) = (Upstream::start("a").await, Upstream::start("c").await);
    let cfg = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"off\"\n[upstreams.app]\nbackends = [{{ url = \"http://{}\", weight = 3 }}, \"http://{}\"]\n",
        a.addr, c.addr
    );
    let b = Balancer::start(&cfg, &[]);
    let got = names(&b, 40).await;
    for w in got.windows(4) {
        assert_eq!(w.iter().filter(|n| *n == "a").count(), 3, "{got:?}");
    }
    // Smooth: the light backend is never starved for more than three picks.
    assert!(!got.windows(4).any(|w| w.iter().all(|n| n == "a")), "{got:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn least_connections_avoids_the_busy_backend() {
    let (a, c) = (Upstream::start("a").await, Upstream::start("b").await);
    let b = Balancer::start(&config_for(&[a.addr, c.addr], "strategy = \"least-connections\""), &[]);
    // Occupy one backend with two slow requests.
    let addr = b.addr();
    let slow: Vec<_> = (0..2).map(|_| tokio::spawn(async move { get(addr, "/sleep/1500").await })).collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let busy = if a.hits() == 2 {
        "a"
    } else if c.hits() == 2 {
        "b"
    } else {
        ""
    };
    assert!(!busy.is_empty() || (a.hits() == 1 && c.hits() == 1), "slow requests: a={} b={}", a.hits(), c.hits());
    let got = names(&b, 6).await;
    if busy.is_empty() {
        // One slow request on each: loads are equal, ties rotate between them.
        assert!(got.contains(&"a".to_owned()) && got.contains(&"b".to_owned()), "{got:?}");
    } else {
        assert!(got.iter().all(|n| n != busy), "quick requests went to the busy backend {busy}: {got:?}");
    }
    for s in slow {
        assert_eq!(s.await.unwrap().status, 200);
    }
}

/// Twenty backends, so that least-connections' index is a tree of several levels: quick
/// requests go only to the backends no slow request holds, and reach every one of them.
#[tokio::test(flavor = "multi_thread")]
async fn least_connections_over_twenty_backends_uses_only_the_idle_ones() {
    let mut ups = Vec::new();
    for i in 0..20 {
        ups.push(Upstream::start(&i.to_string()).await);
    }
    let addrs: Vec<_> = ups.iter().map(|u| u.addr).collect();
    let b = Balancer::start(&config_for(&addrs, "strategy = \"least-connections\""), &[]);
    let addr = b.addr();
    // Seven slow requests, one at a time, so each pick sees the ones before it.
    let mut slow = Vec::new();
    for n in 1..=7 {
        slow.push(tokio::spawn(async move { get(addr, "/sleep/2000").await }));
        let deadline = Instant::now() + Duration::from_secs(2);
        while ups.iter().map(|u| u.hits()).sum::<usize>() < n && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    let busy: Vec<usize> = (0..20).filter(|&i| ups[i].hits() > 0).collect();
    assert_eq!(busy.len(), 7, "each slow request on its own backend: {busy:?}");
    let got = names(&b, 40).await;
    for i in 0..20 {
        let name = i.to_string();
        let n = got.iter().filter(|g| **g == name).count();
        if busy.contains(&i) {
            assert_eq!(n, 0, "backend {i} holds a slow request: {got:?}");
        } else {
            assert!(n > 0, "idle backend {i} never picked: {got:?}");
        }
    }
    for s in slow {
        assert_eq!(s.await.unwrap().status, 200);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dead_backend_is_retried_elsewhere_and_without_retries_is_a_502() {
    let up = Upstream::start("live").await;
    let dead = dead_addr();
    let b = Balancer::start(&config_for(&[dead, up.addr], "retries = 1\n[upstreams.app.passive]\nmax_fails = 0"), &[]);
    for _ in 0..10 {
        let r = get(b.addr(), "/").await;
        assert_eq!(r.status, 200, "{}", r.text());
    }
    let b = Balancer::start(&config_for(&[dead, up.addr], "retries = 0\n[upstreams.app.passive]\nmax_fails = 0"), &[]);
    let mut codes = Vec::new();
    for _ in 0..4 {
        let r = get(b.addr(), "/").await;
        if r.status == 502 {
            assert_eq!(r.header("content-type"), Some("text/plain; charset=utf-8"));
            assert!(r.header("x-request-id").is_some());
            assert!(r.text().contains("could not be reached"), "{}", r.text());
        }
        codes.push(r.status.as_u16());
    }
    assert_eq!(codes.iter().filter(|&&c| c == 502).count(), 2, "{codes:?}");
}

/// A backend that reads the request head and closes without a byte of response.
async fn closing_backend() -> RawUpstream {
    RawUpstream::start(|mut s| async move {
        read_head(&mut s).await;
        drop(s);
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn idempotent_requests_are_retried_but_consumed_bodies_never_are() {
    let bad = closing_backend().await;
    let good = Upstream::start("good").await;
    let b = Balancer::start(
        &config_for(&[bad.addr, good.addr], "retries = 1\n[upstreams.app.passive]\nmax_fails = 0"),
        &[],
    );
    // GET without a body: the failure on the closing backend is retried on the good one.
    for _ in 0..4 {
        assert_eq!(get(b.addr(), "/").await.status, 200);
    }
    // POST with a body: never replayed. Whichever backend it lands on, it is tried once.
    let before = good.hits();
    let mut statuses = Vec::new();
    for _ in 0..4 {
        let r = send(
            b.addr(),
            Request::post("/submit").header("host", "x").body(Full::new(Bytes::from_static(b"payload"))).unwrap(),
        )
        .await;
        statuses.push(r.status.as_u16());
    }
    assert_eq!(statuses.iter().filter(|&&s| s == 502).count(), 2, "{statuses:?}");
    assert_eq!(good.hits() - before, 2, "the good backend saw only its own share of POSTs");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_slow_backend_is_a_504() {
    let up = Upstream::start("slow").await;
    let b = Balancer::start(&config_for(&[up.addr], "[upstreams.app.timeouts]\nupstream_header = \"300ms\""), &[]);
    let start = Instant::now();
    let r = get(b.addr(), "/sleep/3000").await;
    assert_eq!(r.status, 504);
    assert!(start.elapsed() < Duration::from_secs(2), "took {:?}", start.elapsed());
    assert_eq!(r.header("content-type"), Some("text/plain; charset=utf-8"));
    assert!(r.text().contains("300ms"), "{}", r.text());
    // Faster than the limit is fine.
    assert_eq!(get(b.addr(), "/sleep/50").await.status, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_backend_that_closes_idle_connections_like_gunicorn_never_causes_a_502() {
    // gunicorn closes keep-alive connections idle for 2s; balancer drops pooled ones after
    // pool_idle_timeout (1s by default), so requests spaced just past 2s never hit a dead one.
    let up = Upstream::start_with("g", UpstreamOpts { idle_close: Some(Duration::from_secs(2)), ..Default::default() })
        .await;
    let b = Balancer::start(&config_for(&[up.addr], "retries = 0"), &[]);
    let mut conn = Conn::open(b.addr()).await;
    for gap_ms in [0, 2050, 2100, 1000, 2000] {
        tokio::time::sleep(Duration::from_millis(gap_ms)).await;
        let r = conn.get("/").await.unwrap();
        assert_eq!(r.status, 200, "after {gap_ms}ms idle: {}", r.text());
    }
}

/// Idle pooled connections are closed `pool_idle_timeout` after their last use even when
/// no request comes to look at the pool: a quiet backend is not left holding them.
#[tokio::test(flavor = "multi_thread")]
async fn idle_pooled_connections_are_closed_after_pool_idle_timeout_without_traffic() {
    let closed = Arc::new(AtomicUsize::new(0));
    let c = closed.clone();
    let backend = RawUpstream::start(move |mut s| {
        let closed = c.clone();
        async move {
            // Keep-alive until balancer closes the connection.
            while !read_head(&mut s).await.is_empty() {
                let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok").await;
            }
            closed.fetch_add(1, Ordering::SeqCst);
        }
    })
    .await;
    let b = Balancer::start(&config_for(&[backend.addr], ""), &[]);
    // Concurrent requests: several backend connections, all pooled once answered.
    let mut set = tokio::task::JoinSet::new();
    for i in 0..8 {
        let addr = b.addr();
        set.spawn(async move { get(addr, &format!("/{i}")).await.status });
    }
    let replies = set.join_all().await;
    assert!(replies.iter().all(|s| *s == 200), "{replies:?}");
    let opened = backend.connections();
    assert_eq!(closed.load(Ordering::SeqCst), 0, "closed while the pool was fresh");
    // 1 s of idle time plus the once-a-second sweep.
    let deadline = Instant::now() + Duration::from_secs(4);
    while closed.load(Ordering::SeqCst) < opened && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(closed.load(Ordering::SeqCst), opened, "of {opened} idle backend connections");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pooled_connection_closed_at_reuse_is_resent_on_a_fresh_one() {
    // Each connection answers its first request, then closes on the second without a byte:
    // exactly the race of a backend closing an idle connection as it is reused.
    let served = Arc::new(AtomicUsize::new(0));
    let s2 = served.clone();
    let backend = RawUpstream::start(move |mut s| {
        let served = s2.clone();
        async move {
            read_head(&mut s).await;
            served.fetch_add(1, Ordering::SeqCst);
            let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok").await;
            read_head(&mut s).await;
        }
    })
    .await;
    // retries = 0: the resend is not a retry, and applies to a POST without a body too.
    let b = Balancer::start(&config_for(&[backend.addr], "retries = 0\npool_idle_timeout = \"60s\""), &[]);
    let mut conn = Conn::open(b.addr()).await;
    for i in 0..6 {
        let method = if i % 2 == 0 { "GET" } else { "POST" };
        let r = conn
            .send(Request::builder().method(method).uri("/").header("host", "x").body(Full::default()).unwrap())
            .await
            .unwrap();
        assert_eq!(r.status, 200, "request {i} ({method}): {}", r.text());
    }
    assert_eq!(served.load(Ordering::SeqCst), 6);
    assert!(backend.connections() >= 6, "every request after the first needed a new connection");
}

#[tokio::test(flavor = "multi_thread")]
async fn connections_to_backends_are_reused() {
    let up = Upstream::start("a").await;
    // Each worker thread keeps its own idle connections: with one worker, one backend
    // connection serves several client connections, one after the other.
    let b = Balancer::start(&config_for(&[up.addr], ""), &["--set", "server.workers=1"]);
    for _ in 0..5 {
        let mut conn = Conn::open(b.addr()).await;
        for _ in 0..4 {
            assert_eq!(conn.get("/").await.unwrap().status, 200);
        }
    }
    assert_eq!(up.hits(), 20);
    assert_eq!(up.connections.load(Ordering::SeqCst), 1);

    // With two workers (whichever accepts a client connection serves it): at most one
    // backend connection per worker.
    let up = Upstream::start("b").await;
    let b = Balancer::start(&config_for(&[up.addr], ""), &["--set", "server.workers=2"]);
    for _ in 0..6 {
        let mut conn = Conn::open(b.addr()).await;
        for _ in 0..4 {
            assert_eq!(conn.get("/").await.unwrap().status, 200);
        }
    }
    assert_eq!(up.hits(), 24);
    let opened = up.connections.load(Ordering::SeqCst);
    assert!((1..=2).contains(&opened), "{opened} backend connections for 2 workers");
}
