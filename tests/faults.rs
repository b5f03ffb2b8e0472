//! Backend faults (SPEC sections 3 and 4): backends that die mid-response, reset, hang,
//! dribble, or answer garbage. In every test the balancer keeps serving other clients, a
//! broken response never looks complete to the client, and in-flight counts return to 0.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// `upstream_header` for the faulty upstream.
const HEADER_TIMEOUT: Duration = Duration::from_millis(500);

/// Two upstreams: `/bad...` goes to `bad` (the faulty backend; passive checks off so that
/// one test's faults do not eject it), everything else to `good`.
fn config(bad: SocketAddr, good: SocketAddr) -> String {
    format!(
        r#"
[server]
listen = ["127.0.0.1:0"]
[admin]
listen = "127.0.0.1:0"
[upstreams.bad]
backends = ["http://{bad}"]
[upstreams.bad.timeouts]
upstream_header = "{}ms"
[upstreams.bad.passive]
max_fails = 0
[upstreams.good]
backends = ["http://{good}"]
[[routes]]
path_prefix = "/bad"
upstream = "bad"
[[routes]]
path_prefix = "/"
upstream = "good"
"#,
        HEADER_TIMEOUT.as_millis()
    )
}

/// A backend that misbehaves as the request path asks; any other path gets a clean
/// keep-alive `200 clean`.
async fn faulty_backend() -> RawUpstream {
    RawUpstream::start(|mut s| async move {
        loop {
            let head = read_head(&mut s).await;
            if head.is_empty() {
                return;
            }
            let path = head.split_whitespace().nth(1).unwrap_or("").to_owned();
            match path.as_str() {
                // Killed mid-body: a declared length, a tenth of it, then a close.
                "/bad/cut-length" => {
                    let mut resp = b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n".to_vec();
                    resp.extend_from_slice(&[b'x'; 1000]);
                    let _ = s.write_all(&resp).await;
                    return;
                }
                // Killed mid-body: chunks, but never the last one.
                "/bad/cut-chunked" => {
                    let mut resp = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3e8\r\n".to_vec();
                    resp.extend_from_slice(&[b'x'; 1000]);
                    resp.extend_from_slice(b"\r\n");
                    let _ = s.write_all(&resp).await;
                    return;
                }
                // A head, then a reset (SO_LINGER 0), at once or once the head was read.
                "/bad/reset-now" | "/bad/reset-after-head" => {
                    let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n").await;
                    if path == "/bad/reset-after-head" {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    s.set_zero_linger().unwrap();
                    drop(s);
                    return;
                }
                // Accepts, reads the request, never answers (until the balancer hangs up).
                "/bad/hang" => {
                    let _ = read_to_close(&mut s, Duration::from_secs(20)).await;
                    return;
                }
                // The head, one byte every 100 ms.
                "/bad/dribble" => {
                    for b in b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Slow: yes\r\n\r\nok" {
                        if s.write_all(&[*b]).await.is_err() {
                            return;
                        }
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    return;
                }
                // 1xx responses forever: never a final head.
                "/bad/informational" => {
                    for _ in 0..100 {
                        if s.write_all(b"HTTP/1.1 102 Processing\r\n\r\n").await.is_err() {
                            return;
                        }
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    return;
                }
                "/bad/garbage-close" => {
                    let _ = s.write_all(b"\x00\x01\x02\xff this is not HTTP at all\r\n\r\n").await;
                    return;
                }
                "/bad/garbage-open" => {
                    let _ = s.write_all(b"SSH-2.0-OpenSSH_9.6\r\n").await;
                    let _ = read_to_close(&mut s, Duration::from_secs(20)).await;
                    return;
                }
                "/bad/bad-status" => {
                    let _ = s.write_all(b"HTTP/1.1 2OO OK\r\nContent-Length: 2\r\n\r\nok").await;
                    let _ = read_to_close(&mut s, Duration::from_secs(20)).await;
                    return;
                }
                "/bad/two-lengths" => {
                    let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nokk").await;
                    let _ = read_to_close(&mut s, Duration::from_secs(20)).await;
                    return;
                }
                "/bad/huge-head" => {
                    let mut resp = b"HTTP/1.1 200 OK\r\n".to_vec();
                    let mut i = 0;
                    while resp.len() < 1 << 20 {
                        resp.extend_from_slice(format!("X-Pad-{i}: {}\r\n", "p".repeat(100)).as_bytes());
                        i += 1;
                    }
                    resp.extend_from_slice(b"Content-Length: 2\r\n\r\nok");
                    let _ = s.write_all(&resp).await;
                    let _ = read_to_close(&mut s, Duration::from_secs(20)).await;
                    return;
                }
                // A complete response with a second, unasked-for one glued behind it.
                "/bad/extra" => {
                    let _ = s
                        .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\nINJECTED")
                        .await;
                }
                // A response that comes after upstream_header, on a connection kept open.
                "/bad/late" => {
                    tokio::time::sleep(HEADER_TIMEOUT + Duration::from_millis(300)).await;
                    if s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nLATE").await.is_err() {
                        return;
                    }
                }
                _ => {
                    if s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nclean").await.is_err() {
                        return;
                    }
                }
            }
        }
    })
    .await
}

struct Setup {
    bad: RawUpstream,
    good: Upstream,
    b: Balancer,
}

async fn setup() -> Setup {
    let bad = faulty_backend().await;
    let good = Upstream::start("good").await;
    let b = Balancer::start(&config(bad.addr, good.addr), &[]);
    Setup { bad, good, b }
}

/// A normal request to the healthy upstream is answered at once.
async fn assert_good_is_served(b: &Balancer) {
    let t = Instant::now();
    let r = tokio::time::timeout(Duration::from_secs(2), get(b.addr(), "/ok")).await.expect("a normal request hung");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-upstream"), Some("good"));
    assert!(t.elapsed() < Duration::from_millis(500), "a normal request took {:?}", t.elapsed());
}

/// Waits until every backend of every upstream shows `inflight == 0` in `/status`.
async fn assert_inflight_returns_to_zero(b: &Balancer) {
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let st = get(b.admin(), "/status").await.json();
        let all_zero = st["upstreams"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|u| u["backends"].as_array().unwrap())
            .all(|be| be["inflight"] == 0);
        if all_zero {
            return;
        }
        assert!(Instant::now() < deadline, "in-flight counts did not return to 0: {st}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Whether a raw HTTP/1.1 response (head and what arrived of the body) is complete by
/// its own framing.
fn complete_by_framing(raw: &[u8]) -> bool {
    let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") else { return false };
    let head = String::from_utf8_lossy(&raw[..end]).to_ascii_lowercase();
    let body = &raw[end + 4..];
    if head.contains("transfer-encoding: chunked") {
        return body.ends_with(b"0\r\n\r\n");
    }
    match head.lines().find_map(|l| l.strip_prefix("content-length:")) {
        Some(len) => body.len() >= len.trim().parse::<usize>().unwrap(),
        // Neither: the body ends at the close, which a client cannot tell from a cut.
        None => false,
    }
}

/// The request for `path` is seen broken by every kind of client: hyper's HTTP/1.1
/// client gets an error, a raw reader sees the connection closed before the body's
/// declared end, an HTTP/2 client gets a stream error. A `502` is accepted only when
/// `may_502` (the backend failed before its head could be read).
async fn assert_broken_everywhere(b: &Balancer, path: &str, may_502: bool) {
    // hyper HTTP/1.1 client.
    let mut conn = Conn::open(b.addr()).await;
    let r = tokio::time::timeout(Duration::from_secs(5), conn.get(path)).await.expect("client hung");
    match r {
        Err(e) => assert!(!e.is_timeout(), "{path}: {e}"),
        Ok(r) if may_502 && r.status == 502 => {}
        Ok(r) => panic!(
            "{path}: a broken response was passed off as complete: {} with {} body bytes",
            r.status,
            r.body.len()
        ),
    }

    // Raw HTTP/1.1: whatever arrives is not complete by its own framing, and the
    // connection is closed (not left hanging for the client to time out).
    let mut s = TcpStream::connect(b.addr()).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nX-Request-Id: raw{path}\r\n\r\n").as_bytes()).await.unwrap();
    let (out, closed) = read_to_close(&mut s, Duration::from_secs(5)).await;
    let text = String::from_utf8_lossy(&out[..out.len().min(300)]).into_owned();
    assert!(closed, "{path}: the client connection was left open after the backend broke off: {text}");
    if !(may_502 && !out.is_empty() && status_of(&text) == 502) {
        assert!(!complete_by_framing(&out), "{path}: raw response looks complete ({} bytes): {text}", out.len());
    }

    // HTTP/2: the stream is reset (or refused), never ended cleanly.
    let stream = TcpStream::connect(b.addr()).await.unwrap();
    let (mut sender, h2conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream)).await.unwrap();
    tokio::spawn(h2conn);
    let req = Request::get(format!("http://x{path}")).body(Full::<Bytes>::default()).unwrap();
    let outcome = tokio::time::timeout(Duration::from_secs(5), async {
        let resp = sender.send_request(req).await?;
        let status = resp.status();
        let body = resp.into_body().collect().await?.to_bytes();
        Ok::<_, hyper::Error>((status, body))
    })
    .await
    .expect("HTTP/2 client hung");
    match outcome {
        Err(_) => {}
        Ok((status, _)) if may_502 && status == 502 => {}
        Ok((status, body)) => {
            panic!("{path}: HTTP/2 stream ended cleanly on a broken response: {status} with {} body bytes", body.len())
        }
    }

    // The access log marks it as incomplete.
    let id = format!("raw{path}");
    let line = b.wait_for_log(Duration::from_secs(3), |l| l["target"] == "access" && l["request_id"] == id.as_str());
    if line["status"] != 502 {
        assert_eq!(line["complete"], false, "{line}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_backend_killed_mid_body_is_a_broken_response_never_a_short_complete_one() {
    let Setup { bad: _bad, good, b } = setup().await;
    for path in ["/bad/cut-length", "/bad/cut-chunked"] {
        assert_broken_everywhere(&b, path, false).await;
        assert_good_is_served(&b).await;
    }
    // The broken connections were not pooled: a clean request to the same backend works.
    let r = get(b.addr(), "/bad/clean").await;
    assert_eq!((r.status.as_u16(), r.text().as_str()), (200, "clean"));
    assert_inflight_returns_to_zero(&b).await;
    assert_good_is_served(&b).await;
    assert!(good.hits() >= 3);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_backend_that_resets_after_its_head_is_a_broken_response() {
    let Setup { bad: _bad, good: _good, b } = setup().await;
    assert_broken_everywhere(&b, "/bad/reset-after-head", false).await;
    assert_good_is_served(&b).await;
    // Reset straight after writing the head: the head may be lost with the connection
    // (then 502 is right), but never a complete-looking 200.
    assert_broken_everywhere(&b, "/bad/reset-now", true).await;
    assert_good_is_served(&b).await;
    assert_inflight_returns_to_zero(&b).await;
    let r = get(b.addr(), "/bad/clean").await;
    assert_eq!((r.status.as_u16(), r.text().as_str()), (200, "clean"));
}

/// Sends `path` to the bad upstream while normal requests run; returns its status, its
/// text and how long it took. Normal requests must stay fast during the wait.
async fn bad_request_while_others_are_served(b: &Balancer, path: &str) -> (u16, String, Duration) {
    let addr = b.addr();
    let path = path.to_owned();
    let t = Instant::now();
    let pending = tokio::spawn(async move {
        let r = get(addr, &path).await;
        (r.status.as_u16(), r.text(), r.header("content-type").map(str::to_owned), t.elapsed())
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    let mut during = 0;
    while !pending.is_finished() && t.elapsed() < Duration::from_secs(5) {
        assert_good_is_served(b).await;
        during += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (status, text, ctype, took) = tokio::time::timeout(Duration::from_secs(5), pending).await.unwrap().unwrap();
    assert!(during >= 2, "only {during} normal requests ran while the fault was pending ({took:?})");
    if status >= 500 {
        assert_eq!(ctype.as_deref(), Some("text/plain; charset=utf-8"), "{text}");
    }
    (status, text, took)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_backend_that_never_answers_is_a_504_after_upstream_header() {
    let Setup { bad, good: _good, b } = setup().await;
    let (status, text, took) = bad_request_while_others_are_served(&b, "/bad/hang").await;
    assert_eq!(status, 504, "{text}");
    // Not retried (a timeout is not a safe retry): one upstream_header, not two.
    assert!(took >= HEADER_TIMEOUT - Duration::from_millis(50), "504 after only {took:?}");
    assert!(took < HEADER_TIMEOUT * 2 - Duration::from_millis(100), "504 after {took:?}: retried or late");
    assert_eq!(bad.connections(), 1, "a timed-out request was sent again");
    // Several at once: each times out on its own.
    let addr = b.addr();
    let many: Vec<_> = (0..10).map(|_| tokio::spawn(async move { get(addr, "/bad/hang").await.status })).collect();
    assert_good_is_served(&b).await;
    for h in many {
        assert_eq!(tokio::time::timeout(Duration::from_secs(3), h).await.unwrap().unwrap(), 504);
    }
    assert_inflight_returns_to_zero(&b).await;
    assert_good_is_served(&b).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_backend_dribbling_its_head_is_a_504_after_upstream_header() {
    // One byte every 100 ms: the head takes ~5 s, each byte comes well within the
    // timeout, and the whole head is still late.
    let Setup { bad, good: _good, b } = setup().await;
    let (status, text, took) = bad_request_while_others_are_served(&b, "/bad/dribble").await;
    assert_eq!(status, 504, "{text}");
    assert!(took < HEADER_TIMEOUT * 2 - Duration::from_millis(100), "504 after {took:?}");
    assert_eq!(bad.connections(), 1);
    // Endless 1xx responses are not a final head either.
    let (status, text, took) = bad_request_while_others_are_served(&b, "/bad/informational").await;
    assert_eq!(status, 504, "{text}");
    assert!(took < HEADER_TIMEOUT * 2 - Duration::from_millis(100), "504 after {took:?}");
    assert_inflight_returns_to_zero(&b).await;
    assert_good_is_served(&b).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_malformed_response_is_a_502() {
    let Setup { bad, good: _good, b } = setup().await;
    for path in ["/bad/garbage-close", "/bad/garbage-open", "/bad/bad-status", "/bad/two-lengths", "/bad/huge-head"] {
        let before = bad.connections();
        let t = Instant::now();
        let r = tokio::time::timeout(Duration::from_secs(5), get(b.addr(), path)).await.expect("client hung");
        assert_eq!(r.status, 502, "{path}: {}", r.text());
        assert_eq!(r.header("content-type"), Some("text/plain; charset=utf-8"), "{path}");
        assert!(!r.text().contains("ok"), "{path}: backend bytes reached the client: {:?}", r.text());
        // At once, not after upstream_header; and not replayed (the backend answered).
        assert!(t.elapsed() < HEADER_TIMEOUT, "{path}: 502 after {:?}", t.elapsed());
        assert_eq!(bad.connections() - before, 1, "{path}: sent again after a response began");
        assert_good_is_served(&b).await;
    }
    assert_inflight_returns_to_zero(&b).await;
    let r = get(b.addr(), "/bad/clean").await;
    assert_eq!((r.status.as_u16(), r.text().as_str()), (200, "clean"));
}

#[tokio::test(flavor = "multi_thread")]
async fn bytes_a_backend_sends_beyond_a_response_never_answer_another_request() {
    let Setup { bad: _bad, good: _good, b } = setup().await;
    let mut conn = Conn::open(b.addr()).await;
    let r = conn.get("/bad/extra").await.unwrap();
    assert_eq!((r.status.as_u16(), r.text().as_str()), (200, "ok"));
    // The next requests may reuse the backend connection only if the stray response was
    // noticed; either way none of them gets it.
    for i in 0..5 {
        let r = conn.get(&format!("/bad/clean{i}")).await.unwrap();
        assert_eq!((r.status.as_u16(), r.text().as_str()), (200, "clean"), "request {i} got another's response");
        let r = get(b.addr(), "/bad/clean").await;
        assert_eq!((r.status.as_u16(), r.text().as_str()), (200, "clean"), "request {i} got another's response");
    }
    // A response that arrives after the 504 is not handed to the next request either.
    assert_eq!(get(b.addr(), "/bad/late").await.status, 504);
    tokio::time::sleep(Duration::from_millis(500)).await;
    for i in 0..3 {
        let r = get(b.addr(), "/bad/clean").await;
        assert_eq!((r.status.as_u16(), r.text().as_str()), (200, "clean"), "request {i} got a late response");
    }
    assert_inflight_returns_to_zero(&b).await;
    assert_good_is_served(&b).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_backend_killed_with_requests_in_flight_leaves_nothing_behind() {
    // A real upstream killed while 20 slow requests are in flight on it.
    let victim = Upstream::start("victim").await;
    let good = Upstream::start("good").await;
    let cfg = config(victim.addr, good.addr).replace("upstream = \"bad\"", "upstream = \"bad\"\nstrip_prefix = true");
    let b = Balancer::start(&cfg, &[]);
    let addr = b.addr();
    let pending: Vec<_> = (0..20)
        .map(|i| {
            tokio::spawn(async move {
                let mut s = TcpStream::connect(addr).await.unwrap();
                let path = if i % 2 == 0 { "/bad/sleep/3000" } else { "/bad/bytes/50000000" };
                s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
                    .await
                    .unwrap();
                // Stop reading until after the kill, so the 50 MB bodies are mid-stream.
                let mut first = [0u8; 64];
                let _ = s.read(&mut first).await;
                tokio::time::sleep(Duration::from_millis(600)).await;
                let (rest, closed) = read_to_close(&mut s, Duration::from_secs(6)).await;
                let mut all = first.to_vec();
                all.extend_from_slice(&rest);
                (all, closed)
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    victim.kill();
    assert_good_is_served(&b).await;
    for p in pending {
        let (out, closed) = tokio::time::timeout(Duration::from_secs(8), p).await.unwrap().unwrap();
        let text = String::from_utf8_lossy(&out[..out.len().min(200)]).into_owned();
        // A 502, or a body cut short and the connection closed; never a hang. (A body
        // that was wholly in socket buffers at the kill is complete; none of 50 MB fits.)
        if text.starts_with("HTTP/1.1 502") {
            continue;
        }
        assert!(!complete_by_framing(&out), "a cut response looks complete ({} bytes): {text}", out.len());
        assert!(closed, "a cut response was left hanging after {} bytes: {text}", out.len());
    }
    assert_inflight_returns_to_zero(&b).await;
    assert_good_is_served(&b).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_passive_ejection_lasts_fail_timeout_even_when_an_older_request_then_succeeds() {
    // Connection 0 carries a slow request that ends well; every later connection is
    // closed without a response (a failure passive checks count).
    let seen = Arc::new(AtomicUsize::new(0));
    let s2 = seen.clone();
    let backend = RawUpstream::start(move |mut s| {
        let n = s2.fetch_add(1, Ordering::SeqCst);
        async move {
            read_head(&mut s).await;
            if n == 0 {
                tokio::time::sleep(Duration::from_millis(1000)).await;
                let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\nConnection: close\r\n\r\nslow").await;
            }
        }
    })
    .await;
    // A second, healthy backend: passive checks never take out an upstream's last backend.
    let other = Upstream::start("other").await;
    let b = Balancer::start(
        &config_with_admin(
            &[backend.addr, other.addr],
            "retries = 0\n[upstreams.app.passive]\nmax_fails = 3\nfail_timeout = \"10s\"",
        ),
        &[],
    );
    let addr = b.addr();
    // Round-robin: the first request (the slow one) goes to the failing backend.
    let slow = tokio::spawn(async move { get(addr, "/slow").await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut failed = 0;
    while b.logs_matching("backend down: passive checks").is_empty() {
        let status = get(b.addr(), "/fails").await.status;
        assert!(status == 502 || status == 200, "{status}");
        failed += usize::from(status == 502);
        assert!(failed <= 3, "3 failures in a row did not take the backend out");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let reached = seen.load(Ordering::SeqCst);
    assert_eq!(get(b.addr(), "/while-out").await.status, 200, "served by the other backend");
    // The request that began before the ejection now succeeds...
    let r = tokio::time::timeout(Duration::from_secs(3), slow).await.unwrap().unwrap();
    assert_eq!(r.text(), "slow");
    // ...which is not the trial that fail_timeout (10 s) allows: the backend stays out.
    for _ in 0..4 {
        assert_eq!(get(b.addr(), "/after").await.status, 200);
    }
    let ups = b.logs_matching("backend up: back in after passive ejection");
    assert!(ups.is_empty(), "the backend was back in about 1 s into its 10 s ejection: {ups:?}");
    assert_eq!(seen.load(Ordering::SeqCst), reached, "a request reached the ejected backend");
}
