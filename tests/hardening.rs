//! Hardening of the HTTP/1 front (SPEC 3): what nginx refuses or fixes by default, byte for
//! byte over raw sockets against the plain listener. The backend echoes the request head it
//! received, so each test sees exactly what was forwarded, or that nothing was.
//!
//! Also here: an IPv6-literal backend, and the config watcher's cost when another file in
//! its directory is written all the time (SPEC 6).

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::duplex::{BodyReader, Head, Input};
use common::*;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// A balancer in front of a [`head_echo`] backend, with `server` lines added to `[server]`.
async fn site(server: &str) -> (Balancer, RawUpstream, Heads) {
    let (up, heads) = head_echo().await;
    let config = config_for(&[up.addr], "").replace("[server]\n", &format!("[server]\n{server}"));
    let b = Balancer::start(&config, &[]);
    (b, up, heads)
}

/// One response read off `s`: its head (status line as sent) and decoded body.
struct Answer {
    status_line: String,
    head: Head,
    body: Vec<u8>,
}

async fn read_answer(inp: &mut Input<&mut TcpStream>) -> Result<Answer, String> {
    let raw = inp.head().await.map_err(|e| format!("no response: {e}"))?;
    let status_line = String::from_utf8_lossy(&raw[..raw.windows(2).position(|w| w == b"\r\n").unwrap()]).into();
    let head = Head::parse_response(&raw, false)?;
    let mut reader = BodyReader::new(head.framing);
    let mut body = Vec::new();
    while let Some(piece) = reader.next(inp).await.map_err(|e| format!("body broke off: {e}"))? {
        body.extend_from_slice(&piece);
    }
    Ok(Answer { status_line, head, body })
}

/// Sends `request` on a new connection (a write cut short by the server is fine) and
/// reads one response, within 5 s.
async fn ask(addr: SocketAddr, request: &[u8]) -> Answer {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let _ = s.write_all(request).await;
    let mut inp = Input::new(&mut s);
    let shown = String::from_utf8_lossy(&request[..request.len().min(120)]).into_owned();
    match tokio::time::timeout(Duration::from_secs(5), read_answer(&mut inp)).await {
        Err(_) => panic!("no response within 5s to {shown:?}"),
        Ok(Err(e)) => panic!("{e}, to {shown:?}"),
        Ok(Ok(a)) => a,
    }
}

/// The forwarded head's field `name` (exact name, any case), as text.
fn forwarded(answer: &Answer, name: &str) -> Option<String> {
    let head = Head::parse_request(&answer.body).unwrap_or_else(|e| panic!("the echo is not a request head: {e}"));
    head.field(name).map(|v| String::from_utf8_lossy(v).into_owned())
}

fn count(heads: &Heads) -> usize {
    heads.lock().unwrap().len()
}

// ---------------------------------------------------------------------------------------
// Header names with underscores
// ---------------------------------------------------------------------------------------

const UNDERSCORES: &[u8] = b"GET /u HTTP/1.1\r\nHost: example.com\r\nX_Forwarded_Host: evil.example\r\nX_Custom: 1\r\nX-Dashed: 2\r\nConnection: close\r\n\r\n";

#[tokio::test(flavor = "multi_thread")]
async fn header_names_with_underscores_are_not_forwarded_by_default() {
    let (b, _up, _heads) = site("").await;
    let a = ask(b.addr(), UNDERSCORES).await;
    assert_eq!(a.head.status, 200);
    let sent = String::from_utf8_lossy(&a.body).into_owned();
    assert_eq!(forwarded(&a, "X_Forwarded_Host"), None, "forwarded:\n{sent}");
    assert_eq!(forwarded(&a, "X_Custom"), None, "forwarded:\n{sent}");
    assert!(!sent.contains("evil.example"), "forwarded:\n{sent}");
    assert_eq!(forwarded(&a, "X-Dashed").as_deref(), Some("2"), "other fields still go: {sent}");
    assert_eq!(forwarded(&a, "X-Forwarded-Host").as_deref(), Some("example.com"), "{sent}");
}

#[tokio::test(flavor = "multi_thread")]
async fn underscores_in_headers_true_forwards_them() {
    let (b, _up, _heads) = site("underscores_in_headers = true\n").await;
    let a = ask(b.addr(), UNDERSCORES).await;
    assert_eq!(a.head.status, 200);
    let sent = String::from_utf8_lossy(&a.body).into_owned();
    assert_eq!(forwarded(&a, "X_Forwarded_Host").as_deref(), Some("evil.example"), "forwarded:\n{sent}");
    assert_eq!(forwarded(&a, "X_Custom").as_deref(), Some("1"), "forwarded:\n{sent}");
    assert_eq!(forwarded(&a, "X-Forwarded-Host").as_deref(), Some("example.com"), "{sent}");
}

// ---------------------------------------------------------------------------------------
// Host
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn an_invalid_host_is_a_400_and_never_forwarded() {
    let (b, _up, heads) = site("").await;
    for host in ["a b", "a\tb", "evil.example/x"] {
        let req = format!("GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
        let a = ask(b.addr(), req.as_bytes()).await;
        assert_eq!(a.head.status, 400, "Host {host:?}: {}", String::from_utf8_lossy(&a.body));
    }
    assert_eq!(count(&heads), 0, "forwarded: {:?}", heads.lock().unwrap());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_host_with_a_port_or_an_ipv6_literal_passes() {
    let (b, _up, heads) = site("").await;
    for host in ["example.com:8080", "[::1]:80", "[::1]", "127.0.0.1:8080"] {
        let req = format!("GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
        let a = ask(b.addr(), req.as_bytes()).await;
        assert_eq!(a.head.status, 200, "Host {host:?}: {}", String::from_utf8_lossy(&a.body));
        assert_eq!(forwarded(&a, "Host").as_deref(), Some(host), "preserve_host is on");
    }
    assert_eq!(count(&heads), 4);
}

// ---------------------------------------------------------------------------------------
// Methods, lengths, versions
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn trace_is_405_like_connect_and_never_forwarded() {
    let (b, _up, heads) = site("").await;
    let a = ask(b.addr(), b"TRACE / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await;
    assert_eq!(a.head.status, 405, "TRACE: {}", String::from_utf8_lossy(&a.body));
    let a = ask(b.addr(), b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n").await;
    assert_eq!(a.head.status, 405, "CONNECT");
    assert_eq!(count(&heads), 0, "forwarded: {:?}", heads.lock().unwrap());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_request_line_longer_than_max_header_bytes_is_414() {
    let (b, _up, heads) = site("").await;
    let req = format!("GET /{} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", "a".repeat(80_000));
    let a = ask(b.addr(), req.as_bytes()).await;
    assert_eq!(a.head.status, 414, "an 80 KB target: {}", String::from_utf8_lossy(&a.body));
    assert_eq!(count(&heads), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_short_request_line_with_a_huge_header_is_still_431() {
    let (b, _up, heads) = site("").await;
    let req = format!("GET / HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\nConnection: close\r\n\r\n", "a".repeat(80_000));
    let a = ask(b.addr(), req.as_bytes()).await;
    assert_eq!(a.head.status, 431, "an 80 KB field: {}", String::from_utf8_lossy(&a.body));
    assert_eq!(count(&heads), 0);
}

/// HTTP/1.0: an `HTTP/1.1` status line (RFC 9110 section 2.5), and the connection closes
/// after the response unless the client asked for keep-alive.
#[tokio::test(flavor = "multi_thread")]
async fn http_1_0_is_answered_with_an_http_1_1_status_line_and_1_0_semantics() {
    let (b, _up, _heads) = site("").await;
    let mut s = TcpStream::connect(b.addr()).await.unwrap();
    s.write_all(b"GET /ten HTTP/1.0\r\nHost: x\r\n\r\n").await.unwrap();
    let (out, closed) = read_to_close(&mut s, Duration::from_secs(3)).await;
    let out = String::from_utf8_lossy(&out).into_owned();
    assert!(out.starts_with("HTTP/1.1 200 "), "{out:?}");
    assert!(closed, "an HTTP/1.0 connection without keep-alive stays open after its response: {out:?}");

    // Keep-alive asked for: the connection serves a second request.
    let mut s = TcpStream::connect(b.addr()).await.unwrap();
    let mut inp = Input::new(&mut s);
    for i in 0..2 {
        inp_write(&mut inp, b"GET /ten HTTP/1.0\r\nHost: x\r\nConnection: keep-alive\r\n\r\n").await;
        let a = tokio::time::timeout(Duration::from_secs(3), read_answer(&mut inp))
            .await
            .unwrap_or_else(|_| panic!("no response to keep-alive request {i}"))
            .unwrap();
        assert!(a.status_line.starts_with("HTTP/1.1 200 "), "{}", a.status_line);
    }
}

async fn inp_write(inp: &mut Input<&mut TcpStream>, bytes: &[u8]) {
    inp.inner().write_all(bytes).await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn http_1_2_is_served_as_http_1_1() {
    let (b, _up, heads) = site("").await;
    let a = ask(b.addr(), b"GET /twelve HTTP/1.2\r\nHost: x\r\nConnection: close\r\n\r\n").await;
    assert_eq!(a.head.status, 200, "HTTP/1.2: {}", String::from_utf8_lossy(&a.body));
    assert!(a.status_line.starts_with("HTTP/1.1 200 "), "{}", a.status_line);
    assert_eq!(count(&heads), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn another_major_version_in_an_http1_request_line_is_505() {
    let (b, _up, heads) = site("").await;
    for version in ["HTTP/2.0", "HTTP/3.0"] {
        let req = format!("GET / {version}\r\nHost: x\r\nConnection: close\r\n\r\n");
        let a = ask(b.addr(), req.as_bytes()).await;
        assert_eq!(a.head.status, 505, "{version}: {}", String::from_utf8_lossy(&a.body));
    }
    assert_eq!(count(&heads), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_raw_byte_above_0x7f_in_the_target_is_accepted_and_forwarded_unchanged() {
    let (b, _up, heads) = site("").await;
    let a = ask(b.addr(), b"GET /caf\xe9?q=\xe9t\xe9 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await;
    assert_eq!(a.head.status, 200, "{}", String::from_utf8_lossy(&a.body));
    let heads = heads.lock().unwrap();
    let line = heads[0].split(|b| *b == b'\r').next().unwrap();
    assert_eq!(line, b"GET /caf\xe9?q=\xe9t\xe9 HTTP/1.1", "forwarded {:?}", String::from_utf8_lossy(line));
}

// ---------------------------------------------------------------------------------------
// IPv6 backends
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn a_static_ipv6_literal_backend_is_reached() {
    if let Err(e) = std::net::TcpListener::bind("[::1]:0") {
        eprintln!("skipped: cannot listen on [::1] on this machine ({e})");
        return;
    }
    let up = Upstream::start_on("[::1]:0".parse().unwrap(), "six", UpstreamOpts::default()).await;
    let config = config_for(&[up.addr], "");
    assert!(config.contains("\"http://[::1]:"), "{config}");
    let b = Balancer::start(&config, &[]);
    let r = tokio::time::timeout(Duration::from_secs(5), get(b.addr(), "/v6")).await.expect("hung");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-upstream"), Some("six"));
    assert_eq!(up.hits(), 1);
}

// ---------------------------------------------------------------------------------------
// The config watcher
// ---------------------------------------------------------------------------------------

/// balancer run as `balancer 2> balancer.log` next to its config: the log is written all the
/// time, and that must not make balancer re-read its config. Opens of the config file are
/// counted with inotify (the `notify` crate, `IN_OPEN` on the file itself); only the slow
/// periodic check (every 2 s) should open it.
#[tokio::test(flavor = "multi_thread")]
async fn writes_to_a_sibling_file_do_not_make_balancer_reread_its_config() {
    use notify::event::AccessKind;
    use notify::{EventKind, RecursiveMode, Watcher};

    let up = Upstream::start("a").await;
    let b = Balancer::start(&config_for(&[up.addr], ""), &[]);
    std::thread::sleep(Duration::from_millis(300));

    let opens = Arc::new(AtomicUsize::new(0));
    let o = opens.clone();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if event.is_ok_and(|e| matches!(e.kind, EventKind::Access(AccessKind::Open(_)))) {
            o.fetch_add(1, Ordering::SeqCst);
        }
    })
    .unwrap();
    watcher.watch(&b.config_path, RecursiveMode::NonRecursive).unwrap();

    // The count works: an open of our own is seen.
    std::fs::read(&b.config_path).unwrap();
    let deadline = Instant::now() + Duration::from_secs(2);
    while opens.load(Ordering::SeqCst) == 0 {
        assert!(Instant::now() < deadline, "inotify did not report an open of the config file");
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_millis(100));

    // Three seconds of a log file being appended to, a line every 10 ms.
    let mut log =
        std::fs::OpenOptions::new().create(true).append(true).open(b.dir.path().join("balancer.log")).unwrap();
    let before = opens.load(Ordering::SeqCst);
    let start = Instant::now();
    let mut lines = 0;
    while start.elapsed() < Duration::from_secs(3) {
        use std::io::Write;
        writeln!(log, "{{\"message\":\"line {lines}\"}}").unwrap();
        lines += 1;
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_millis(200));
    let reads = opens.load(Ordering::SeqCst) - before;
    drop(watcher);
    assert!(
        reads <= 4,
        "balancer opened its config {reads} times in 3 s while {lines} lines were written to balancer.log next to it"
    );
    // And it still serves.
    assert_eq!(get(b.addr(), "/").await.status, 200);
}
