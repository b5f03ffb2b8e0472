//! Regression tests for defects found in review: each drives the real binary into the
//! situation that used to go wrong.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use http::Request;
use http_body_util::Full;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[tokio::test(flavor = "multi_thread")]
async fn server_limits_listed_out_of_order_do_not_deadlock() {
    let up = Upstream::start("a").await;
    // "per_ip" sorts after "everyone": listed first here, the lock order used to cross.
    let extra = "[rate_limits.everyone]\nrate = 1000000\nper = \"1s\"\nkey = \"global\"\n[rate_limits.per_ip]\nrate = 1000000\nper = \"1s\"\n[[routes]]\npath_prefix = \"/app\"\nupstream = \"app\"\nrate_limit = [\"everyone\"]\n";
    let b = Balancer::start(&config_for(&[up.addr], extra), &["--set", "server.rate_limit=[\"per_ip\", \"everyone\"]"]);
    let addr = b.addr();
    let mut tasks = Vec::new();
    for i in 0..8 {
        tasks.push(tokio::spawn(async move {
            let mut conn = Conn::open(addr).await;
            for _ in 0..200 {
                let path = if i % 2 == 0 { "/app" } else { "/unrouted" };
                conn.get(path).await.unwrap();
            }
        }));
    }
    for t in tasks {
        tokio::time::timeout(Duration::from_secs(20), t).await.expect("requests stalled: deadlock").unwrap();
    }
    // A name listed twice is a config error.
    let (code, _, err) = run_cli(
        &[
            "--check",
            "-b",
            "http://127.0.0.1:1",
            "--set",
            "rate_limits.x={rate=1,per=\"1s\"}",
            "--set",
            "server.rate_limit=[\"x\",\"x\"]",
        ],
        b.dir.path(),
    );
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("listed twice"), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn clients_that_abort_uploads_cannot_eject_a_backend() {
    let up = Upstream::start("a").await;
    let b = Balancer::start(
        &config_with_admin(&[up.addr], "[upstreams.app.passive]\nmax_fails = 2\nfail_timeout = \"30s\""),
        &[],
    );
    for _ in 0..5 {
        let mut s = TcpStream::connect(b.addr()).await.unwrap();
        s.write_all(b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 10000\r\n\r\n0123456789").await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        drop(s);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let s = get(b.admin(), "/status").await.json();
    let be = &s["upstreams"][0]["backends"][0];
    assert_eq!(be["healthy"], true, "{s}");
    assert_eq!(be["failures"], 0, "{s}");
    assert_eq!(get(b.addr(), "/").await.status, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_slow_upload_is_not_a_gateway_timeout() {
    let up = Upstream::start("a").await;
    let b = Balancer::start(&config_for(&[up.addr], "[upstreams.app.timeouts]\nupstream_header = \"400ms\""), &[]);
    let mut s = TcpStream::connect(b.addr()).await.unwrap();
    s.write_all(b"POST /slow HTTP/1.1\r\nHost: x\r\nContent-Length: 40\r\nConnection: close\r\n\r\n").await.unwrap();
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        s.write_all(b"0123456789").await.unwrap();
    }
    let out = read_until_close(&mut s, Duration::from_secs(5)).await;
    assert_eq!(status_of(&out), 200, "{out}");
    assert!(out.contains("\"body_len\":40"), "{out}");
    // The timer still runs once the body is sent.
    let t = Instant::now();
    let r = send(
        b.addr(),
        Request::post("/sleep/3000").header("host", "x").body(Full::new(Bytes::from_static(b"abc"))).unwrap(),
    )
    .await;
    assert_eq!(r.status, 504);
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
}

#[tokio::test(flavor = "multi_thread")]
async fn pipelined_heads_are_checked_and_split_heads_are_not_refused() {
    let up = Upstream::start("a").await;
    let b = Balancer::start(&config_for(&[up.addr], ""), &[]);
    // A second head pipelined behind the first, with an obfuscated transfer coding.
    let out = raw(
        b.addr(),
        b"GET /one HTTP/1.1\r\nHost: x\r\n\r\nPOST /two HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
        Duration::from_secs(3),
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert!(out.contains("HTTP/1.1 400"), "the pipelined head was not refused: {out}");
    assert_eq!(up.hits(), 1);
    // The next head's first bytes arrive during the previous request, the rest after it.
    let mut s = TcpStream::connect(b.addr()).await.unwrap();
    s.write_all(b"GET /sleep/300 HTTP/1.1\r\nHost: x\r\n\r\nGET /second HTTP/1.1\r\nHo").await.unwrap();
    tokio::time::sleep(Duration::from_millis(600)).await;
    s.write_all(b"st: x\r\nX-Long: ").await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    s.write_all(b"yes\r\nConnection: close\r\n\r\n").await.unwrap();
    let out = read_until_close(&mut s, Duration::from_secs(5)).await;
    assert_eq!(out.matches("HTTP/1.1 200").count(), 2, "{out}");
    assert!(out.contains("\"path\":\"/second\""), "{out}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_tunnel_ends_when_the_backend_closes_even_if_the_client_stays() {
    let backend = RawUpstream::start(|mut s| async move {
        read_head(&mut s).await;
        s.write_all(b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n")
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        // closes here
    })
    .await;
    let b = Balancer::start(&config_with_admin(&[backend.addr], ""), &[]);
    let mut s = TcpStream::connect(b.addr()).await.unwrap();
    s.write_all(b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n").await.unwrap();
    let mut buf = [0u8; 256];
    let n = s.read(&mut buf).await.unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 101"));
    // The client neither sends nor closes; the backend's close ends the tunnel.
    let deadline = Instant::now() + Duration::from_secs(4);
    loop {
        let st = get(b.admin(), "/status").await.json();
        if st["upstreams"][0]["backends"][0]["inflight"] == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "the tunnel still counts as in flight: {st}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(closed_within(&mut s, Duration::from_secs(2)).await, "the client side was not closed");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_leaves_early_is_logged_as_499() {
    let up = Upstream::start("a").await;
    let b = Balancer::start(&config_with_admin(&[up.addr], ""), &[]);
    let mut s = TcpStream::connect(b.addr()).await.unwrap();
    s.write_all(b"GET /sleep/800 HTTP/1.1\r\nHost: x\r\nX-Request-Id: leaver\r\n\r\n").await.unwrap();
    tokio::time::sleep(Duration::from_millis(150)).await;
    drop(s);
    let line = b.wait_for_log(Duration::from_secs(3), |l| l["target"] == "access" && l["request_id"] == "leaver");
    assert_eq!(line["status"], 499);
    let text = get(b.admin(), "/metrics").await.text();
    assert!(text.contains("code=\"499\"} 1"), "{text}");
    assert!(!text.contains("code=\"0\""), "{text}");
}

#[tokio::test(flavor = "multi_thread")]
async fn http2_cookie_fields_reach_an_http1_backend_as_one_header() {
    let up = Upstream::start("a").await;
    let b = Balancer::start(&config_for(&[up.addr], ""), &[]);
    let req = Request::get("http://x/c")
        .header("cookie", "a=1")
        .header("cookie", "b=2")
        .body(Full::<Bytes>::default())
        .unwrap();
    let (_, r) = send_h2(b.addr(), req).await;
    assert_eq!(r.json()["headers"]["cookie"], "a=1; b=2");
}

#[tokio::test(flavor = "multi_thread")]
async fn with_one_backend_a_retry_goes_to_the_same_backend() {
    // The first connection is closed without a response, the next one is served.
    let seen = Arc::new(AtomicUsize::new(0));
    let s2 = seen.clone();
    let backend = RawUpstream::start(move |mut s| {
        let n = s2.fetch_add(1, Ordering::SeqCst);
        async move {
            read_head(&mut s).await;
            if n > 0 {
                let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok").await;
            }
        }
    })
    .await;
    let b = Balancer::start(&config_for(&[backend.addr], "retries = 1\n[upstreams.app.passive]\nmax_fails = 0"), &[]);
    let r = get(b.addr(), "/").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(seen.load(Ordering::SeqCst), 2);
}

/// A backend that answers an upload before reading its body (413 here, as a size-checking
/// app does) and closes: the client gets that answer, not a 502, and the backend is not
/// blamed for it. Found in review of the inline backend client, which sent the whole body
/// before reading anything.
#[tokio::test(flavor = "multi_thread")]
async fn a_backend_answering_an_upload_early_is_heard() {
    let up = RawUpstream::start(|mut s| async move {
        let head = read_head(&mut s).await;
        if head.is_empty() {
            return;
        }
        let _ = s
            .write_all(b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 8\r\nConnection: close\r\n\r\ntoo big\n")
            .await;
        // Keeps the socket open without reading: the upload would stall against it.
        tokio::time::sleep(Duration::from_secs(5)).await;
    })
    .await;
    let b = Balancer::start(&config_with_admin(&[up.addr], "[upstreams.app.passive]\nmax_fails = 1"), &[]);
    for _ in 0..3 {
        // A raw client that reads while it uploads, as curl does: balancer may close the
        // connection before the upload ends (its body was never read).
        let s = TcpStream::connect(b.addr()).await.unwrap();
        let (mut rd, mut wr) = s.into_split();
        let upload = tokio::spawn(async move {
            let size = 8 << 20;
            let head = format!("POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: {size}\r\n\r\n");
            if wr.write_all(head.as_bytes()).await.is_err() {
                return;
            }
            let chunk = vec![b'x'; 64 << 10];
            for _ in 0..size / chunk.len() {
                if wr.write_all(&chunk).await.is_err() {
                    return;
                }
            }
        });
        let mut out = Vec::new();
        let mut buf = vec![0u8; 4096];
        let deadline = Instant::now() + Duration::from_secs(4);
        while !String::from_utf8_lossy(&out).contains("too big") && Instant::now() < deadline {
            match tokio::time::timeout(Duration::from_secs(4), rd.read(&mut buf)).await {
                Ok(Ok(n)) if n > 0 => out.extend_from_slice(&buf[..n]),
                _ => break,
            }
        }
        upload.abort();
        let out = String::from_utf8_lossy(&out);
        assert!(out.starts_with("HTTP/1.1 413"), "{out}");
        assert!(out.ends_with("too big\n"), "{out}");
    }
    let status = get(b.admin(), "/status").await.json();
    assert_eq!(status["upstreams"][0]["backends"][0]["healthy"], true, "{status}");
}

/// An interim response (103 Early Hints) means a response began: a backend that then
/// closes must not see the request again, nor another backend get it.
#[tokio::test(flavor = "multi_thread")]
async fn a_close_after_an_interim_response_is_not_retried() {
    let seen = Arc::new(AtomicUsize::new(0));
    let counted = seen.clone();
    let up = RawUpstream::start(move |mut s| {
        let seen = counted.clone();
        async move {
            if read_head(&mut s).await.is_empty() {
                return;
            }
            seen.fetch_add(1, Ordering::SeqCst);
            let _ = s.write_all(b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n").await;
        }
    })
    .await;
    let other = RawUpstream::start(move |mut s| async move {
        if read_head(&mut s).await.is_empty() {
            return;
        }
        let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok").await;
    })
    .await;
    let b = Balancer::start(&config_for(&[up.addr, other.addr], "retries = 1"), &[]);
    let r = get(b.addr(), "/once").await;
    // Round-robin starts at the first backend.
    assert_eq!(r.status, 502, "{}", r.text());
    assert_eq!(seen.load(Ordering::SeqCst), 1);
    assert_eq!(other.connections(), 0, "retried after a response began");
}

/// A chunked response that also carries Content-Length is framed by the chunks, and the
/// length does not reach the client (RFC 9112 6.3).
#[tokio::test(flavor = "multi_thread")]
async fn a_chunked_response_with_a_content_length_reaches_the_client_whole() {
    let up = RawUpstream::start(|mut s| async move {
        loop {
            if read_head(&mut s).await.is_empty() {
                return;
            }
            let _ = s
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")
                .await;
        }
    })
    .await;
    let b = Balancer::start(&config_for(&[up.addr], ""), &[]);
    let mut conn = Conn::open(b.addr()).await;
    for _ in 0..2 {
        let r = conn.get("/").await.unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.text(), "hello world");
        assert_ne!(r.header("content-length"), Some("3"));
    }
}

/// A client that stalls while the end of its response still waits in balancer's write
/// buffer must get all of it: the connection is not parked (its socket handed back
/// mid-write) because the request has ended on balancer's side. Found in review.
#[tokio::test(flavor = "multi_thread")]
async fn a_stalled_reader_is_not_parked_before_its_response_is_written() {
    let up = Upstream::start("source").await;
    let b = Balancer::start(&config_for(&[up.addr], ""), &[]);
    let sizes = [1usize << 20, 4 << 20, 16 << 20];
    let mut tasks = Vec::new();
    for size in sizes {
        let addr = b.addr();
        tasks.push(tokio::spawn(async move {
            let mut s = TcpStream::connect(addr).await.unwrap();
            s.write_all(format!("GET /bytes/{size} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes()).await.unwrap();
            let mut buf = vec![0u8; 64 * 1024];
            let mut total = s.read(&mut buf).await.unwrap();
            tokio::time::sleep(Duration::from_millis(1500)).await;
            // Kept alive: read until the whole body (and its head) is in, or nothing comes.
            while total < size + 40 {
                match tokio::time::timeout(Duration::from_secs(3), s.read(&mut buf)).await {
                    Ok(Ok(n)) if n > 0 => total += n,
                    _ => break,
                }
            }
            assert!(total >= size + 40, "{size}-byte response cut short at {total} bytes (head included)");
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}
