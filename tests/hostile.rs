//! Hostile clients (SPEC sections 2, 3 and 5): slowloris crowds, idle and half-open
//! connection floods, request smuggling, oversized heads, absolute-form and CONNECT
//! targets, spoofed X-Forwarded-For, and file-descriptor exhaustion. The process must
//! refuse each, keep serving everyone else, and never forward anything ambiguous.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The crowd tests measure latency on a 2-core machine: they run one at a time.
static HEAVY: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// This process's soft limit on open files (`ulimit -n`), which the balancer inherits.
fn fd_soft_limit() -> usize {
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap();
    let line = limits.lines().find(|l| l.starts_with("Max open files")).unwrap();
    let soft = line.split_whitespace().nth(3).unwrap();
    soft.parse().unwrap_or(usize::MAX)
}

/// `wanted` connections, or as many as the fd limit allows with room to spare.
fn crowd_size(wanted: usize) -> usize {
    let n = wanted.min(fd_soft_limit().saturating_sub(100));
    assert!(n >= 500, "the fd limit ({}) leaves room for only {n} connections", fd_soft_limit());
    n
}

#[tokio::test(flavor = "multi_thread")]
async fn a_slowloris_crowd_does_not_slow_a_normal_client_and_is_cut_off() {
    let _heavy = HEAVY.lock().await;
    let up = Upstream::start("a").await;
    let b = Balancer::start(&config_for(&[up.addr], ""), &["--set", "timeouts.client_header=2s"]);
    let n = crowd_size(1000);
    let client_header = Duration::from_secs(2);

    // Each connection sends a header byte every 200 ms, never finishing its head, and
    // reports what it was answered, whether it was closed, and when.
    let mut crowd = Vec::new();
    for _ in 0..n {
        let mut s = TcpStream::connect(b.addr()).await.unwrap();
        let opened = Instant::now();
        crowd.push(tokio::spawn(async move {
            let head =
                b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
            let mut out = Vec::new();
            let mut buf = [0u8; 1024];
            for byte in head.iter().cycle().take(100) {
                if s.write_all(&[*byte]).await.is_err() {
                    break;
                }
                match tokio::time::timeout(Duration::from_millis(200), s.read(&mut buf)).await {
                    Err(_) => continue,
                    Ok(Ok(0)) | Ok(Err(_)) => return (out, true, opened.elapsed()),
                    Ok(Ok(k)) => {
                        out.extend_from_slice(&buf[..k]);
                        break;
                    }
                }
            }
            let (rest, closed) = read_to_close(&mut s, Duration::from_secs(2)).await;
            out.extend_from_slice(&rest);
            (out, closed, opened.elapsed())
        }));
    }
    let crowd_open = Instant::now();

    // A normal client: 20 sequential requests, each prompt.
    for i in 0..20 {
        let t = Instant::now();
        let r = tokio::time::timeout(Duration::from_secs(2), get(b.addr(), "/")).await.expect("normal request hung");
        assert_eq!(r.status, 200);
        assert!(
            t.elapsed() < Duration::from_millis(200),
            "normal request {i} took {:?} under a slowloris crowd",
            t.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(crowd_open.elapsed() < client_header, "the normal requests did not run while the crowd was connected");

    // The crowd is cut off: 408 (a partial head was sent) and closed, within client_header + 1 s.
    let mut answered_408 = 0;
    for c in crowd {
        let (out, closed, after) = tokio::time::timeout(Duration::from_secs(6), c).await.unwrap().unwrap();
        let text = String::from_utf8_lossy(&out).into_owned();
        assert!(closed, "a slowloris connection was still open after {after:?}: {text:?}");
        assert!(after < client_header + Duration::from_secs(1), "cut off only after {after:?}");
        assert!(after >= client_header - Duration::from_millis(100), "cut off early, after {after:?}");
        if !text.is_empty() {
            assert_eq!(status_of(&text), 408, "{text}");
            answered_408 += 1;
        }
    }
    assert_eq!(answered_408, n, "every connection that sent part of a head is answered 408");
    assert_eq!(up.hits(), 20);
    // And the process serves on.
    assert_eq!(get(b.addr(), "/").await.status, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn thousands_of_idle_and_half_open_connections_are_closed_after_client_header() {
    let _heavy = HEAVY.lock().await;
    let up = Upstream::start("a").await;
    let b = Balancer::start(&config_with_admin(&[up.addr], ""), &["--set", "timeouts.client_header=1s"]);
    let n = crowd_size(3000);
    let client_header = Duration::from_secs(1);

    // Even ones never send a byte; odd ones send part of a head and stop.
    let mut crowd = Vec::new();
    for i in 0..n {
        let mut s = TcpStream::connect(b.addr()).await.unwrap();
        let opened = Instant::now();
        let half_open = i % 2 == 1;
        if half_open {
            s.write_all(b"GET /never HTTP/1.1\r\nHost: x\r\nX-Partial: ").await.unwrap();
        }
        crowd.push(tokio::spawn(async move {
            let (out, closed) = read_to_close(&mut s, client_header + Duration::from_secs(3)).await;
            (half_open, String::from_utf8_lossy(&out).into_owned(), closed, opened.elapsed())
        }));
    }
    let crowd_open = Instant::now();
    for i in 0..5 {
        let t = Instant::now();
        let r = tokio::time::timeout(Duration::from_secs(2), get(b.addr(), "/")).await.expect("normal request hung");
        assert_eq!(r.status, 200);
        assert!(
            t.elapsed() < Duration::from_millis(300),
            "normal request {i} took {:?} among {n} idle connections",
            t.elapsed()
        );
    }
    assert!(crowd_open.elapsed() < client_header);

    for c in crowd {
        let (half_open, out, closed, after) = tokio::time::timeout(Duration::from_secs(8), c).await.unwrap().unwrap();
        assert!(closed, "a {} connection was left open for {after:?}", if half_open { "half-open" } else { "idle" });
        assert!(after < client_header + Duration::from_secs(1), "closed only after {after:?}");
        if half_open {
            assert_eq!(status_of(&out), 408, "{out}");
        } else {
            assert_eq!(out, "", "a connection that sent nothing is closed without a response");
        }
    }
    assert_eq!(up.hits(), 5, "{:?}", up.paths());
    assert_eq!(get(b.addr(), "/").await.status, 200);
    // Nothing of the crowd is left behind: the connection gauge is back to 0.
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let text = get(b.admin(), "/metrics").await.text();
        let open = metric(&text, "balancer_client_connections");
        if open == Some(0.0) {
            break;
        }
        assert!(Instant::now() < deadline, "balancer_client_connections stays at {open:?} after the crowd left");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Sends `attempt` on a new connection; returns what came back and whether the
/// connection was closed.
async fn try_raw(addr: std::net::SocketAddr, attempt: &[u8]) -> (String, bool) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let _ = s.write_all(attempt).await;
    let (out, closed) = read_to_close(&mut s, Duration::from_secs(3)).await;
    (String::from_utf8_lossy(&out).into_owned(), closed)
}

/// A backend that records every request head it receives (whatever its size) and
/// answers each `200 ok`, closing the connection.
async fn recording_backend() -> (RawUpstream, Arc<Mutex<Vec<String>>>) {
    let heads: Arc<Mutex<Vec<String>>> = Arc::default();
    let h = heads.clone();
    let up = RawUpstream::start(move |mut s| {
        let h = h.clone();
        async move {
            let head = read_head(&mut s).await;
            if !head.is_empty() {
                h.lock().unwrap().push(head);
                let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok").await;
            }
        }
    })
    .await;
    (up, heads)
}

/// How many HTTP/1 responses `out` holds (status lines at its start or after a line end).
fn responses(out: &str) -> usize {
    usize::from(out.starts_with("HTTP/1.")) + out.matches("\nHTTP/1.").count()
}

/// Each attempt is answered with a single 400 and the connection closed, and nothing of
/// it reaches the backend (whose received heads are `heads`); a normal request works
/// after each.
async fn assert_refused_before_the_backend(b: &Balancer, heads: &Mutex<Vec<String>>, attempts: &[Vec<u8>]) {
    let hits = || heads.lock().unwrap().len();
    let mut failures = Vec::new();
    for attempt in attempts {
        let shown = if attempt.len() > 300 {
            format!("...{}", String::from_utf8_lossy(&attempt[attempt.len() - 150..]))
        } else {
            String::from_utf8_lossy(attempt).into_owned()
        };
        let before = hits();
        let (out, closed) = try_raw(b.addr(), attempt).await;
        let status = out.split_whitespace().nth(1).and_then(|s| s.parse::<u16>().ok());
        let responses = responses(&out);
        let reached = hits() - before;
        if status != Some(400) || responses != 1 || !closed || reached != 0 {
            let forwarded: String = heads.lock().unwrap()[before..]
                .iter()
                .map(|h| format!("\n      backend got: {:?}", if h.len() > 300 { &h[h.len() - 200..] } else { h }))
                .collect();
            failures.push(format!(
                "{shown:?}\n    -> status {status:?}, {responses} response(s), closed: {closed}, reached the backend {reached} time(s){forwarded}"
            ));
        }
        assert_eq!(get(b.addr(), "/after").await.status, 200, "after {shown:?}");
    }
    assert!(
        failures.is_empty(),
        "{} of {} attempts not refused:\n{}",
        failures.len(),
        attempts.len(),
        failures.join("\n")
    );
}

/// A POST whose head has `headers` (CRLF-separated, no final CRLF) and a body that reads
/// one way as chunked and another as `Content-Length: 5`, with a request smuggled behind.
fn smuggle(headers: &str) -> Vec<u8> {
    format!("POST / HTTP/1.1\r\nHost: x\r\n{headers}\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n")
        .into_bytes()
}

/// Header lines that frame a request ambiguously, or that lenient parsers read differently.
const SMUGGLING_HEADERS: &[&str] = &[
    // Transfer-Encoding spelled so that one parser may not see "chunked".
    "Content-Length: 5\r\nTransfer-Encoding: chunked ",
    "Content-Length: 5\r\nTransfer-Encoding: chunked\t",
    "Content-Length: 5\r\nTransfer-Encoding:\tchunked",
    "Content-Length: 5\r\nTransfer-Encoding: \t chunked \t",
    "Content-Length: 5\r\nTransfer-Encoding:\x0bchunked",
    "Transfer-Encoding:\x0bchunked",
    "Transfer-Encoding: chunked\x0c",
    "Transfer-Encoding: \"chunked\"",
    "Transfer-Encoding: chunked;ext=1",
    "Transfer-Encoding: chunked\r\ntransfer-encoding: chunked",
    "Transfer-Encoding: identity\r\nTransfer-Encoding: chunked",
    "Transfer-Encoding: gzip, chunked",
    "TRANSFER-ENCODING: CHUNKED\r\nContent-Length: 5",
    "transfer-encoding: chunked\r\ncontent-length: 5",
    "Content-Length: 5\r\nContent-Length: 5\r\nTransfer-Encoding: chunked",
    "Transfer-Encoding chunked\r\nContent-Length: 5",
    // Content-Length that parsers read differently.
    "Content-Length: +5",
    "Content-Length: 0x5",
    "Content-Length: 5.0",
    "Content-Length: 5 5",
    "Content-Length: 5, 5",
    "Content-Length: 05\r\nContent-Length: 5",
    "Content-Length: 5\r\nContent-Length: 005",
    "Content-Length: 99999999999999999999999",
    "Content-Length:",
    // Header names a lenient parser would trim, or lines it would unfold.
    "Content-Length : 5",
    "Content-Length\t: 5",
    "Transfer-Encoding : chunked",
    " Transfer-Encoding: chunked",
    "\tContent-Length: 5",
    // NUL and other controls in a header.
    "X-Nul: a\x00b\r\nContent-Length: 5",
    "Content-Length: 5\x00",
    "X-\x00Nul: a",
    "X-Bare-Cr: a\rTransfer-Encoding: chunked",
    // Two Hosts: which one routes?
    "Host: evil.example",
];

#[tokio::test(flavor = "multi_thread")]
async fn request_smuggling_attempts_are_refused_before_the_backend() {
    let (up, heads) = recording_backend().await;
    let b = Balancer::start(&config_for(&[up.addr], ""), &[]);
    let mut attempts: Vec<Vec<u8>> = SMUGGLING_HEADERS.iter().map(|h| smuggle(h)).collect();
    attempts.extend([
        // Bare CR in the request line.
        b"GET /\rsmuggled HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
        b"GET / HTTP/1.1\rHost: x\r\n\r\n".to_vec(),
        b"GET / HTTP/1.1\r\r\nHost: x\r\n\r\n".to_vec(),
        // Transfer-Encoding in HTTP/1.0, which has none.
        b"POST / HTTP/1.0\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n"
            .to_vec(),
        // Spaces where the request line has exactly one.
        b"GET  /smuggled HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
        b"GET /smuggled HTTP/1.1 \r\nHost: x\r\n\r\n".to_vec(),
    ]);
    assert_refused_before_the_backend(&b, &heads, &attempts).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn framing_checks_still_hold_behind_many_headers() {
    // 200 headers: fewer than the balancer accepts (and far under max_header_bytes),
    // more than a fixed-size header array holds. The checks must not give up.
    let (up, heads) = recording_backend().await;
    let b = Balancer::start(&config_for(&[up.addr], ""), &[]);
    let filler: String = (0..200).map(|i| format!("X-Filler-{i}: v\r\n")).collect();
    let attempts: Vec<Vec<u8>> = SMUGGLING_HEADERS.iter().map(|h| smuggle(&format!("{filler}{h}"))).collect();
    assert_refused_before_the_backend(&b, &heads, &attempts).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn framing_checks_hold_for_pipelined_and_split_heads() {
    // An ambiguous head behind a good one on the same connection: in the same write
    // (pipelined), or with its request line sent while the first request is still being
    // answered and the rest after it (split). The good one is answered; the ambiguous
    // one gets 400 and the connection is closed; nothing of it reaches the backend.
    let up = Upstream::start("a").await;
    let b = Balancer::start(&config_for(&[up.addr], ""), &[]);
    let ambiguous = [
        "Content-Length: 5\r\nTransfer-Encoding: chunked",
        "Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked",
        "Content-Length: 05\r\nContent-Length: 5",
    ];
    let mut failures = Vec::new();
    for (i, headers) in ambiguous.iter().enumerate() {
        for split in [false, true] {
            let first = format!("GET /first{i}{} HTTP/1.1\r\nHost: x\r\n\r\n", if split { "/split" } else { "" });
            let second = format!(
                "POST /second{i} HTTP/1.1\r\nHost: x\r\n{headers}\r\n\r\n0\r\n\r\nGET /smuggled{i} HTTP/1.1\r\nHost: x\r\n\r\n"
            );
            let before = up.paths().len();
            let mut s = TcpStream::connect(b.addr()).await.unwrap();
            if split {
                // The backend's /sleep/400 keeps the first request busy while the
                // second's request line arrives.
                let first = first.replace("/first", "/sleep/400?first");
                s.write_all(first.as_bytes()).await.unwrap();
                tokio::time::sleep(Duration::from_millis(150)).await;
                let (line, rest) = second.split_at(second.find("\r\n").unwrap() + 2);
                s.write_all(line.as_bytes()).await.unwrap();
                tokio::time::sleep(Duration::from_millis(600)).await;
                s.write_all(rest.as_bytes()).await.unwrap();
            } else {
                s.write_all(format!("{first}{second}").as_bytes()).await.unwrap();
            }
            // Refused: answered and closed at once. Not refused: kept alive, so wait less.
            let (out, closed) = read_to_close(&mut s, Duration::from_millis(800)).await;
            let out = String::from_utf8_lossy(&out).into_owned();
            let statuses: Vec<&str> = out.match_indices("HTTP/1.1 ").map(|(i, _)| &out[i + 9..i + 12]).collect();
            let reached: Vec<String> = up.paths()[before..].iter().filter(|p| !p.contains("first")).cloned().collect();
            if statuses != ["200", "400"] || !closed || !reached.is_empty() {
                failures.push(format!(
                    "{} {headers:?}: statuses {statuses:?}, closed: {closed}, the backend got {reached:?}",
                    if split { "split" } else { "pipelined" }
                ));
            }
        }
    }
    assert!(failures.is_empty(), "ambiguous heads behind another were not refused:\n{}", failures.join("\n"));
}

/// Writes `head` on a new connection while reading the answer; returns the answer and
/// how the connection ended ("closed", "reset" or "timed out").
async fn send_oversized(addr: std::net::SocketAddr, head: &[u8]) -> (String, &'static str) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let (mut rd, mut wr) = s.split();
    // Write and read at once: the balancer answers before it has read it all.
    let write = async {
        let _ = wr.write_all(head).await;
    };
    let read = async {
        let mut out = Vec::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        let mut buf = [0u8; 4096];
        loop {
            match tokio::time::timeout_at(deadline, rd.read(&mut buf)).await {
                Ok(Ok(0)) => return (out, "closed"),
                Ok(Err(_)) => return (out, "reset"),
                Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
                Err(_) => return (out, "timed out"),
            }
        }
    };
    let ((), (out, end)) = tokio::join!(write, read);
    (String::from_utf8_lossy(&out).into_owned(), end)
}

/// `answer` is balancer's own 431 (414 when the request line alone is too long, or 400),
/// and the connection was closed after it.
fn assert_refused_as_too_large(what: &str, answer: &str, end: &str) {
    assert_ne!(end, "timed out", "{what}: left open: {answer:?}");
    assert!(!answer.is_empty(), "{what}: connection {end} without a response");
    let status = status_of(answer);
    assert!(matches!(status, 431 | 414 | 400), "{what}: {answer}");
    assert_eq!(responses(answer), 1, "{what}: {answer}");
    assert!(
        answer.contains("text/plain; charset=utf-8") && answer.contains("x-request-id"),
        "{what}: not balancer's own response (SPEC: text/plain, a one-line reason, x-request-id): {answer:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn oversized_heads_are_refused_and_the_process_serves_on() {
    let up = Upstream::start("a").await;
    let b = Balancer::start(&config_for(&[up.addr], ""), &[]);
    let mib = 1 << 20;
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "a 1 MiB header line",
            format!("GET / HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n", "a".repeat(mib)).into_bytes(),
        ),
        ("a 1 MiB request target", format!("GET /{} HTTP/1.1\r\nHost: x\r\n\r\n", "a".repeat(mib)).into_bytes()),
        (
            "10,000 small headers",
            format!(
                "GET / HTTP/1.1\r\nHost: x\r\n{}\r\n",
                (0..10_000).map(|i| format!("X-H{i}: v\r\n")).collect::<String>()
            )
            .into_bytes(),
        ),
        ("1 MiB without a line end", format!("GET /{}", "a".repeat(mib)).into_bytes()),
    ];
    for (what, head) in cases {
        let (answer, end) = send_oversized(b.addr(), &head).await;
        assert_refused_as_too_large(what, &answer, end);
        assert_eq!(get(b.addr(), "/").await.status, 200, "after {what}");
    }
    assert_eq!(up.hits(), 4);
}

#[tokio::test(flavor = "multi_thread")]
async fn too_many_headers_under_the_byte_limit_get_balancers_own_431() {
    // About 10 KiB, far under max_header_bytes, but 2,000 header lines.
    let up = Upstream::start("a").await;
    let b = Balancer::start(&config_for(&[up.addr], ""), &[]);
    let head = format!("GET / HTTP/1.1\r\nHost: x\r\n{}\r\n", "a:b\r\n".repeat(2000));
    let (answer, end) = send_oversized(b.addr(), head.as_bytes()).await;
    assert_refused_as_too_large("2,000 tiny headers", &answer, end);
    assert_eq!(up.hits(), 0);
    assert_eq!(get(b.addr(), "/").await.status, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn absolute_form_connect_and_foreign_hosts_never_reach_an_unlisted_server() {
    let up = Upstream::start("a").await;
    // A server on this host that is not in the config: nothing may reach it.
    let other = Upstream::start("other").await;
    let o = other.addr;
    let b = Balancer::start(&config_for(&[up.addr], ""), &[]);

    for target in [format!("http://{o}/x"), format!("https://{o}/x"), format!("http://{o}"), format!("HTTP://{o}/x")] {
        let req = format!("GET {target} HTTP/1.1\r\nHost: {o}\r\nConnection: close\r\n\r\n");
        let out = raw(b.addr(), req.as_bytes(), Duration::from_secs(3)).await;
        assert_eq!(status_of(&out), 200, "{target}: {out}");
        assert!(out.contains("\"name\":\"a\""), "{target}: {out}");
    }
    // A Host naming the other server.
    let r = send(b.addr(), Request::get("/h").header("host", o.to_string()).body(Full::default()).unwrap()).await;
    assert_eq!(r.header("x-upstream"), Some("a"));

    // CONNECT, then bytes that would go through a tunnel if one were opened.
    for target in [o.to_string(), format!("http://{o}/")] {
        let req = format!("CONNECT {target} HTTP/1.1\r\nHost: {o}\r\n\r\nGET /through HTTP/1.1\r\nHost: {o}\r\n\r\n");
        let out = raw(b.addr(), req.as_bytes(), Duration::from_secs(2)).await;
        assert_eq!(status_of(&out), 405, "CONNECT {target}: {out}");
        assert!(!out.contains("HTTP/1.1 200 Connection") && !out.contains("\"name\":\"other\""), "{out}");
    }

    // HTTP/2: a :authority naming the other server, and an extended CONNECT.
    let stream = TcpStream::connect(b.addr()).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream)).await.unwrap();
    tokio::spawn(conn);
    let resp = sender
        .send_request(Request::get(format!("http://{o}/h2")).body(Full::<Bytes>::default()).unwrap())
        .await
        .unwrap();
    assert_eq!(resp.headers().get("x-upstream").unwrap(), "a");
    let _ = resp.into_body().collect().await;
    let connect = Request::connect(o.to_string()).body(Full::<Bytes>::default()).unwrap();
    if let Ok(resp) = sender.send_request(connect).await {
        assert_eq!(resp.status(), 405);
    }

    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(other.hits(), 0, "{:?}", other.paths());
    assert_eq!(
        other.connections.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "balancer connected to an unlisted server"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn x_forwarded_for_cannot_dodge_a_client_ip_limit_without_trusted_proxies() {
    let up = Upstream::start("a").await;
    let b = Balancer::start(
        &config_for(&[up.addr], ""),
        &[
            "--set",
            "rate_limits.per_ip={rate=5,per=\"1m\",burst=5,key=\"client_ip\"}",
            "--set",
            "server.rate_limit=[\"per_ip\"]",
        ],
    );
    let mut passed = 0;
    let mut refused = 0;
    for i in 0..20 {
        let spoof = format!("203.0.113.{i}");
        let mut req = Request::get(format!("/r{i}")).header("host", "x");
        req = match i % 5 {
            0 => req.header("x-forwarded-for", &spoof),
            1 => req.header("x-forwarded-for", format!("{spoof}, 198.51.100.{i}")),
            2 => req.header("x-forwarded-for", "127.0.0.2").header("x-forwarded-for", &spoof),
            3 => req.header("forwarded", format!("for={spoof}")).header("x-real-ip", &spoof),
            _ => req.header("x-forwarded-for", format!("2001:db8::{i}")).header("true-client-ip", &spoof),
        };
        let r = send(b.addr(), req.body(Full::default()).unwrap()).await;
        match r.status.as_u16() {
            200 => passed += 1,
            429 => refused += 1,
            s => panic!("unexpected {s}: {}", r.text()),
        }
    }
    assert_eq!((passed, refused), (5, 15), "spoofed X-Forwarded-For values got their own buckets");
    assert_eq!(up.hits(), 5);
}

/// CPU time (user + system) of process `pid` so far.
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which may contain spaces) start at field 3.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    let hz: u64 = std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100);
    Duration::from_millis(ticks * 1000 / hz)
}

/// Whether process `pid` is running (not gone, not a zombie).
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|stat| stat.rfind(')').is_some_and(|i| !stat[i + 2..].starts_with('Z')))
}

#[tokio::test(flavor = "multi_thread")]
async fn running_out_of_file_descriptors_is_survived_without_spinning() {
    let _heavy = HEAVY.lock().await;
    let up = Upstream::start("a").await;
    let b = Balancer::start_with_nofile(&config_for(&[up.addr], ""), &[], 64);
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", b.pid())).unwrap();
    assert!(
        limits.lines().any(|l| l.starts_with("Max open files") && l.split_whitespace().nth(3) == Some("64")),
        "{limits}"
    );
    assert_eq!(get(b.addr(), "/").await.status, 200);

    // More connections than the process has descriptors; the rest wait in the backlog.
    let mut conns = Vec::new();
    for _ in 0..100 {
        conns.push(TcpStream::connect(b.addr()).await.unwrap());
    }
    // Some of the accepted ones ask for something (the backend connect may fail: 502).
    for s in conns.iter_mut().take(10) {
        let _ = s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let fds = std::fs::read_dir(format!("/proc/{}/fd", b.pid())).unwrap().count();
    assert!(fds >= 60, "only {fds} descriptors open: the test did not exhaust them");

    let (cpu0, t0) = (cpu_time(b.pid()), Instant::now());
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (cpu, wall) = (cpu_time(b.pid()) - cpu0, t0.elapsed());
    assert!(cpu < wall / 2, "the process spun while out of descriptors: {cpu:?} CPU in {wall:?}");
    assert!(alive(b.pid()), "the process died: {:?}", b.logs());
    let warnings = b.logs().len();
    assert!(warnings < 200, "{warnings} log lines in 2.5 s: {:?}", &b.logs()[..20]);

    // Recovery: once the connections are gone, new ones are served.
    drop(conns);
    let t = Instant::now();
    let r = tokio::time::timeout(Duration::from_secs(5), get(b.addr(), "/")).await.expect("not served after recovery");
    assert_eq!(r.status, 200);
    assert!(t.elapsed() < Duration::from_secs(2), "recovery took {:?}", t.elapsed());
    for _ in 0..20 {
        assert_eq!(get(b.addr(), "/").await.status, 200);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn running_out_of_file_descriptors_is_not_blamed_on_the_backend() {
    // Out of descriptors, balancer cannot open backend connections: its own failure, not
    // the backend's. A healthy backend must not be ejected for it (with fail_timeout
    // 10 s, every client would get 503 long after the descriptors are back).
    let _heavy = HEAVY.lock().await;
    let up = Upstream::start("a").await;
    let b = Balancer::start_with_nofile(&config_for(&[up.addr], "retries = 0"), &[], 64);
    let mut conns = Vec::new();
    for _ in 0..100 {
        let mut s = TcpStream::connect(b.addr()).await.unwrap();
        let _ = s.write_all(b"GET /sleep/100 HTTP/1.1\r\nHost: x\r\n\r\n").await;
        conns.push(s);
    }
    tokio::time::sleep(Duration::from_millis(1000)).await;
    drop(conns);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let r = tokio::time::timeout(Duration::from_secs(5), get(b.addr(), "/")).await.expect("not served after recovery");
    let downs: Vec<_> =
        b.logs_matching("backend down: passive checks").into_iter().map(|l| l["reason"].clone()).collect();
    assert_eq!(r.status, 200, "{}; {downs:?}", r.text());
    assert!(downs.is_empty(), "the backend was ejected for balancer's own lack of descriptors: {downs:?}");
}
