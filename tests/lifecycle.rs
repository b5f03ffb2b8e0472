//! Start-up, logs, graceful shutdown, and memory that stays bounded while bodies stream
//! (SPEC sections 3 and 8).

mod common;

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use http::Request;
use http_body::Frame;
use http_body_util::BodyExt;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[tokio::test(flavor = "multi_thread")]
async fn startup_lines_name_every_listener_and_upstream_and_logs_are_json() {
    let (a, c) = (Upstream::start("a").await, Upstream::start("b").await);
    let cfg = format!(
        "[server]\nlisten = [\"127.0.0.1:0\", \"127.0.0.1:0\"]\n[admin]\nlisten = \"off\"\n[upstreams.one]\nbackends = [\"http://{}\"]\n[upstreams.two]\nstrategy = \"least-connections\"\nbackends = [\"http://{}\"]\n[[routes]]\npath_prefix = \"/\"\nupstream = \"one\"\n",
        a.addr, c.addr
    );
    let b = Balancer::start(&cfg, &[]);
    assert_eq!(b.addrs.len(), 2);
    assert_ne!(b.addrs[0], b.addrs[1]);
    for addr in &b.addrs {
        assert_eq!(get(*addr, "/").await.status, 200);
    }
    let ups = b.logs_matching("upstream");
    assert_eq!(ups.len(), 2, "{ups:?}");
    let two = ups.iter().find(|l| l["upstream"] == "two").unwrap();
    assert_eq!(two["strategy"], "least-connections");
    assert!(two["backends"].as_str().unwrap().contains(&c.addr.to_string()));
    let logs = b.logs();
    assert!(logs.iter().all(|l| l.get("raw").is_none()), "every line is one JSON object: {logs:?}");
    assert!(logs.iter().all(|l| l["level"].is_string() && l["timestamp"].is_string()));
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_drains_in_flight_requests_and_exits_0() {
    let up = Upstream::start("a").await;
    let mut b = Balancer::start(&config_for(&[up.addr], ""), &[]);
    let addr = b.addr();
    // An idle keep-alive connection, and a request in flight.
    let mut idle = Conn::open(addr).await;
    assert_eq!(idle.get("/").await.unwrap().status, 200);
    let slow = tokio::spawn(async move { get(addr, "/sleep/1500").await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let start = Instant::now();
    b.signal("TERM");
    // It stops accepting at once.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let refused = match tokio::time::timeout(Duration::from_millis(500), TcpStream::connect(addr)).await {
        Ok(Ok(mut s)) => {
            let _ = s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
            read_until_close(&mut s, Duration::from_secs(1)).await.is_empty()
        }
        _ => true,
    };
    assert!(refused, "a new connection was served after SIGTERM");
    // The in-flight request finishes.
    let r = slow.await.unwrap();
    assert_eq!(r.status, 200);
    let status = b.wait_exit(Duration::from_secs(5));
    assert!(status.success(), "{status}");
    assert!(start.elapsed() < Duration::from_secs(4), "exit took {:?}", start.elapsed());
    // The idle connection was closed, not kept until the grace ran out.
    assert!(idle.get("/").await.is_err());
}

/// Each request's access line is written while balancer runs (a worker's kept lines go out
/// as soon as it has nothing else to do) and none is lost at exit.
#[tokio::test(flavor = "multi_thread")]
async fn every_access_line_is_written_while_running_and_before_exit() {
    let up = Upstream::start("a").await;
    let mut b = Balancer::start(&config_for(&[up.addr], ""), &["--set", "server.workers=2"]);
    let addr = b.addr();
    let mut conns = Vec::new();
    for _ in 0..4 {
        conns.push(Conn::open(addr).await);
    }
    // 201 requests on each connection at once, tagged with their round (201: batches of
    // lines of one length could come out even at a round number).
    async fn burst(conns: Vec<Conn>, round: u32) -> Vec<Conn> {
        let tasks: Vec<_> = conns
            .into_iter()
            .enumerate()
            .map(|(c, mut conn)| {
                tokio::spawn(async move {
                    for i in 0..201 {
                        let r = conn.get(&format!("/{round}/{c}/{i}")).await.unwrap();
                        assert_eq!(r.status, 200);
                    }
                    conn
                })
            })
            .collect();
        let mut conns = Vec::new();
        for t in tasks {
            conns.push(t.await.unwrap());
        }
        conns
    }
    let lines = |b: &Balancer, round: u32| {
        b.access_logs()
            .iter()
            .filter(|l| l["path"].as_str().is_some_and(|p| p.starts_with(&format!("/{round}/"))))
            .count()
    };
    let conns = burst(conns, 1).await;
    let deadline = Instant::now() + Duration::from_secs(2);
    while lines(&b, 1) < 804 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(lines(&b, 1), 804, "access lines of 804 answered requests, 2 s after the last");

    // The same again, then SIGTERM as soon as the last answer is in.
    let conns = burst(conns, 2).await;
    b.signal("TERM");
    assert!(b.wait_exit(Duration::from_secs(5)).success());
    drop(conns);
    let deadline = Instant::now() + Duration::from_secs(2);
    while lines(&b, 2) < 804 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(lines(&b, 2), 804, "access lines of the 804 requests answered just before SIGTERM");
}

#[tokio::test(flavor = "multi_thread")]
async fn sigint_with_a_stuck_request_exits_0_after_shutdown_grace() {
    let up = Upstream::start("a").await;
    let mut b = Balancer::start(&config_for(&[up.addr], ""), &["--set", "server.shutdown_grace=500ms"]);
    let addr = b.addr();
    let stuck = tokio::spawn(async move { Conn::open(addr).await.get("/sleep/10000").await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let start = Instant::now();
    b.signal("INT");
    let status = b.wait_exit(Duration::from_secs(5));
    assert!(status.success(), "{status}");
    assert!(start.elapsed() < Duration::from_secs(3), "grace of 500ms, exit took {:?}", start.elapsed());
    assert!(stuck.await.unwrap().is_err(), "the stuck request is cut off, not answered");
    b.wait_for_log(Duration::from_secs(1), |l| l["message"].as_str().is_some_and(|m| m.contains("grace")));
}

/// `total` bytes of request body in 64 KiB frames, generated as they are sent.
struct Generated {
    left: u64,
    chunk: Bytes,
}

impl http_body::Body for Generated {
    type Data = Bytes;
    type Error = std::convert::Infallible;
    fn poll_frame(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if self.left == 0 {
            return Poll::Ready(None);
        }
        let n = self.left.min(self.chunk.len() as u64) as usize;
        self.left -= n as u64;
        Poll::Ready(Some(Ok(Frame::data(self.chunk.slice(..n)))))
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_1gib_upload_streams_through_in_bounded_memory() {
    const TOTAL: u64 = 1 << 30;
    let up = Upstream::start("sink").await;
    let b = Balancer::start(&config_for(&[up.addr], ""), &["--set", "server.max_request_body=2GiB"]);
    assert_eq!(get(b.addr(), "/warm").await.status, 200);
    let before = b.rss_kib();

    let stream = TcpStream::connect(b.addr()).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.unwrap();
    tokio::spawn(conn);
    let body = Generated { left: TOTAL, chunk: Bytes::from(vec![b'u'; 64 * 1024]) };
    let req = Request::post("/upload").header("host", "x").body(body).unwrap();
    let pid = b.pid();
    let sampler = tokio::spawn(async move {
        let mut peak = 0;
        loop {
            match std::fs::read_to_string(format!("/proc/{pid}/status")) {
                Ok(s) => {
                    let rss: u64 = s
                        .lines()
                        .find_map(|l| l.strip_prefix("VmRSS:"))
                        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
                        .unwrap_or(0);
                    peak = peak.max(rss);
                }
                Err(_) => return peak,
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let echo: serde_json::Value =
        serde_json::from_slice(&resp.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert_eq!(echo["body_len"].as_u64(), Some(TOTAL), "every byte arrived");
    sampler.abort();
    let after = b.rss_kib();
    let growth = after.saturating_sub(before);
    eprintln!("1 GiB upload: RSS before {before} KiB, after {after} KiB");
    assert!(growth < 16 * 1024, "RSS grew by {growth} KiB while streaming 1 GiB");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_slow_reader_does_not_make_balancer_buffer_the_response() {
    let up = Upstream::start("source").await;
    let b = Balancer::start(&config_for(&[up.addr], ""), &[]);
    assert_eq!(get(b.addr(), "/warm").await.status, 200);
    let before = b.rss_kib();
    let mut s = TcpStream::connect(b.addr()).await.unwrap();
    s.write_all(b"GET /bytes/268435456 HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    // Read a little, then stall: the backend keeps offering 256 MiB.
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = s.read(&mut buf).await.unwrap() as u64;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let stalled = b.rss_kib();
    let growth = stalled.saturating_sub(before);
    eprintln!("slow reader: RSS before {before} KiB, while stalled {stalled} KiB");
    assert!(growth < 16 * 1024, "RSS grew by {growth} KiB behind a stalled client");
    // Then it reads the rest and gets all of it (the head adds a few bytes).
    loop {
        match tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf)).await.unwrap() {
            Ok(0) | Err(_) => break,
            Ok(n) => total += n as u64,
        }
        if total >= 268_435_456 {
            break;
        }
    }
    assert!(total >= 268_435_456, "read {total} bytes");
}
