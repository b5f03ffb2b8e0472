//! Client-side timeouts and limits (SPEC sections 2 and 3): client_header (408 and close,
//! slowloris), idle, max_connections, connect.

mod common;

use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A listener with the smallest accept queue: once [`fill_accept_queue`] has run, further
/// SYNs to it are dropped and connects hang.
fn listener_with_no_backlog() -> TcpListener {
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    sock.listen(0).unwrap()
}

/// Connections that fill `addr`'s accept queue (kept open by the caller).
async fn fill_accept_queue(addr: std::net::SocketAddr) -> Vec<TcpStream> {
    let mut fillers = Vec::new();
    for _ in 0..4 {
        if let Ok(Ok(s)) = tokio::time::timeout(Duration::from_millis(200), TcpStream::connect(addr)).await {
            fillers.push(s);
        }
    }
    fillers
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dribbling_client_gets_408_while_others_are_served() {
    let up = Upstream::start("a").await;
    let b = Balancer::start(&config_for(&[up.addr], ""), &["--set", "timeouts.client_header=700ms"]);
    // A crowd of slowloris clients, each sending a byte now and then.
    let mut crowd = Vec::new();
    for _ in 0..50 {
        let mut s = TcpStream::connect(b.addr()).await.unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: ").await.unwrap();
        crowd.push(s);
    }
    let start = Instant::now();
    let dribbler = tokio::spawn({
        let mut s = crowd.pop().unwrap();
        async move {
            for _ in 0..30 {
                if s.write_all(b"a").await.is_err() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            read_until_close(&mut s, Duration::from_secs(5)).await
        }
    });
    // Meanwhile a normal client is served promptly.
    for _ in 0..5 {
        let t = Instant::now();
        assert_eq!(get(b.addr(), "/").await.status, 200);
        assert!(t.elapsed() < Duration::from_millis(500), "normal request took {:?}", t.elapsed());
    }
    let out = dribbler.await.unwrap();
    assert_eq!(status_of(&out), 408, "{out}");
    assert!(out.contains("text/plain; charset=utf-8") && out.contains("x-request-id"), "{out}");
    assert!(start.elapsed() < Duration::from_secs(3), "cut off after {:?}", start.elapsed());
    // The rest of the crowd was cut off too.
    for mut s in crowd {
        assert!(closed_within(&mut s, Duration::from_secs(2)).await);
    }
    assert_eq!(up.hits(), 5);
}

#[tokio::test(flavor = "multi_thread")]
async fn idle_keepalive_connections_are_closed() {
    let up = Upstream::start("a").await;
    let b = Balancer::start(&config_for(&[up.addr], ""), &["--set", "timeouts.idle=600ms"]);
    let mut s = TcpStream::connect(b.addr()).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let start = Instant::now();
    // Reads the response, then waits for the close.
    assert!(closed_within(&mut s, Duration::from_secs(3)).await, "idle connection left open");
    let waited = start.elapsed();
    assert!(waited >= Duration::from_millis(500), "closed too early: {waited:?}");
    // Not while a request is in progress: a slow response outlives the idle timeout.
    let r = get(b.addr(), "/sleep/1200").await;
    assert_eq!(r.status, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_silent_connection_is_closed_after_client_header_without_a_response() {
    let up = Upstream::start("a").await;
    let b = Balancer::start(&config_for(&[up.addr], ""), &["--set", "timeouts.client_header=500ms"]);
    let mut s = TcpStream::connect(b.addr()).await.unwrap();
    let out = read_until_close(&mut s, Duration::from_secs(3)).await;
    assert_eq!(out, "", "nothing was asked, nothing is answered");
}

#[tokio::test(flavor = "multi_thread")]
async fn max_connections_makes_new_connections_wait() {
    let up = Upstream::start("a").await;
    let b = Balancer::start(&config_for(&[up.addr], ""), &["--set", "server.max_connections=1"]);
    let mut first = Conn::open(b.addr()).await;
    assert_eq!(first.get("/").await.unwrap().status, 200);
    // Several, so that some land on each worker's listening socket (the kernel picks one
    // by a hash of the client's port: all 12 on one of two is a chance of 1 in 2,048).
    let mut waiting = tokio::task::JoinSet::new();
    for i in 0..12 {
        let addr = b.addr();
        waiting.spawn(async move { get(addr, &format!("/waiting/{i}")).await.status });
    }
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(waiting.try_join_next().is_none(), "a connection was served while the first was open");
    drop(first);
    let served = tokio::time::timeout(Duration::from_secs(5), waiting.join_all())
        .await
        .expect("waiting connections served, one after another, once the first closed");
    assert_eq!(served, [200; 12]);
}

#[tokio::test(flavor = "multi_thread")]
async fn connect_timeout_bounds_an_unanswered_connect() {
    // A listener whose accept queue is full: further SYNs are dropped, connects hang.
    let listener = listener_with_no_backlog();
    let addr = listener.local_addr().unwrap();
    let _fillers = fill_accept_queue(addr).await;
    let b = Balancer::start(&config_for(&[addr], "retries = 0"), &["--set", "timeouts.connect=300ms"]);
    let start = Instant::now();
    let r = get(b.addr(), "/").await;
    assert_eq!(r.status, 502, "{}", r.text());
    assert!(start.elapsed() < Duration::from_secs(2), "took {:?}", start.elapsed());
    let line =
        b.wait_for_log(Duration::from_secs(2), |l| l["message"].as_str().is_some_and(|m| m.contains("timed out")));
    assert!(line["message"].as_str().unwrap().contains("300ms"), "{line}");
}

/// An idle keep-alive connection is parked after 500 ms (hyper's buffers freed, only the
/// socket kept): it must go on exactly as if it had not been.
#[tokio::test(flavor = "multi_thread")]
async fn a_parked_keepalive_connection_is_served_again_and_still_times_out_and_drains() {
    let up = Upstream::start("a").await;
    let b = Balancer::start(&config_with_admin(&[up.addr], ""), &["--set", "timeouts.idle=2s"]);
    let parked = || async { metric(&get(b.admin(), "/metrics").await.text(), "balancer_client_connections_parked") };
    let mut conn = Conn::open(b.addr()).await;
    assert_eq!(conn.get("/one").await.unwrap().status, 200);
    assert_eq!(parked().await, Some(0.0), "not parked while fresh");
    tokio::time::sleep(Duration::from_millis(900)).await;
    assert_eq!(parked().await, Some(1.0), "parked after 500 ms idle");
    let r = conn.get("/two").await.unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["path"], "/two");
    assert_eq!(parked().await, Some(0.0), "in use again");

    // A head split by a pause longer than the parking delay, with a request pipelined
    // behind it: nothing of either is lost.
    let mut s = TcpStream::connect(b.addr()).await.unwrap();
    s.write_all(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let mut first = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(3), s.read(&mut first)).await.unwrap().unwrap();
    assert!(String::from_utf8_lossy(&first[..n]).contains("\"path\":\"/a\""));
    tokio::time::sleep(Duration::from_millis(900)).await;
    s.write_all(b"GET /b HTTP/1.1\r\nHo").await.unwrap();
    tokio::time::sleep(Duration::from_millis(900)).await;
    s.write_all(b"st: x\r\n\r\nGET /c HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await.unwrap();
    let out = read_until_close(&mut s, Duration::from_secs(3)).await;
    let (at_b, at_c) = (out.find("\"path\":\"/b\""), out.find("\"path\":\"/c\""));
    assert!(at_b.is_some() && at_c.is_some() && at_b < at_c, "{out}");

    // Parked, the idle timeout still counts from the end of the last request.
    let mut s = TcpStream::connect(b.addr()).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let start = Instant::now();
    assert!(closed_within(&mut s, Duration::from_secs(5)).await, "parked connection left open");
    let waited = start.elapsed();
    assert!(waited >= Duration::from_millis(1800) && waited < Duration::from_secs(4), "closed after {waited:?}");

    // SIGTERM closes a parked connection at once, not after shutdown_grace (30 s) nor
    // at the end of its idle time (60 s here).
    drop(b);
    let mut b = Balancer::start(&config_for(&[up.addr], ""), &["--set", "timeouts.idle=60s"]);
    let mut conn = Conn::open(b.addr()).await;
    assert_eq!(conn.get("/three").await.unwrap().status, 200);
    tokio::time::sleep(Duration::from_millis(900)).await;
    let start = Instant::now();
    b.signal("TERM");
    assert!(b.wait_exit(Duration::from_secs(5)).success());
    assert!(start.elapsed() < Duration::from_secs(3), "exit took {:?}", start.elapsed());
    assert!(conn.get("/").await.is_err());
}

#[tokio::test(flavor = "multi_thread")]
async fn at_most_64_connections_to_one_backend_are_opened_at_once() {
    // An https backend that accepts TCP connections and never answers the TLS handshake:
    // each open holds its place until `timeouts.connect`, and the backend counts them.
    let up = RawUpstream::start(|s| async move {
        let _held = s;
        std::future::pending::<()>().await
    })
    .await;
    let addr = up.addr;
    let config = format!(
        "[server]\nlisten = [\"127.0.0.1:0\"]\n\n[admin]\nlisten = \"127.0.0.1:0\"\n\n\
         [upstreams.app]\nbackends = [\"https://{addr}\"]\nretries = 0\n"
    );
    let b = Balancer::start(&config, &["--set", "timeouts.connect=2s"]);
    let start = Instant::now();
    let front = b.addr();
    let requests: Vec<_> = (0..150).map(|i| tokio::spawn(async move { get(front, &format!("/{i}")).await })).collect();

    let opened = || up.connections();
    assert!(wait_until(Duration::from_secs(1), || async { opened() >= 64 }).await, "only {} opened", opened());
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(opened(), 64, "more than 64 connections were being opened to the backend at once");
    for r in requests {
        let r = r.await.unwrap();
        assert_eq!(r.status, 502, "{}", r.text());
    }
    // Those waiting for a place gave up with the ones holding one: nobody waited twice.
    assert!(start.elapsed() < Duration::from_secs(4), "took {:?}", start.elapsed());
    let metrics = get(b.admin(), "/metrics").await.text();
    let series = format!("balancer_backend_connection_waits_total{{upstream=\"app\",backend=\"https://{addr}\"}}");
    assert_eq!(metric(&metrics, &series), Some(86.0), "{metrics}");
}

#[tokio::test(flavor = "multi_thread")]
async fn requests_queued_behind_the_opening_cap_get_connections_answered_requests_release() {
    // A backend that serves one keep-alive connection (100 ms a request) and then accepts
    // no more, its accept queue full: every further connect hangs until `timeouts.connect`.
    let listener = listener_with_no_backlog();
    let addr = listener.local_addr().unwrap();
    let served = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = served.clone();
    let backend = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        while !read_head_bytes(&mut s).await.is_empty() {
            tokio::time::sleep(Duration::from_millis(100)).await;
            s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok").await.unwrap();
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    });
    let b = Balancer::start(
        &config_for(&[addr], "retries = 0"),
        &["--set", "timeouts.connect=5s", "--set", "server.workers=1"],
    );
    assert_eq!(get(b.addr(), "/first").await.status, 200);
    let _fillers = fill_accept_queue(addr).await;

    // 64 of these take the places to open a connection and hang in connect; the other 6
    // queue, and the one pooled connection, released after each answer, serves them in turn.
    let front = b.addr();
    let requests: Vec<_> = (0..70).map(|i| tokio::spawn(async move { get(front, &format!("/{i}")).await })).collect();
    let mut statuses = Vec::new();
    for r in requests {
        statuses.push(r.await.unwrap().status);
    }
    let ok = statuses.iter().filter(|&&s| s == 200).count();
    assert_eq!(ok, 6, "statuses: {statuses:?}");
    assert_eq!(statuses.iter().filter(|&&s| s == 502).count(), 64, "statuses: {statuses:?}");
    assert_eq!(served.load(std::sync::atomic::Ordering::SeqCst), 7);
    backend.abort();
}
