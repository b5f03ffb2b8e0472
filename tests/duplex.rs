//! Full-duplex bodies (SPEC 3): a backend that starts its response while the request body
//! is still arriving gets the rest of the body as it comes, and its response reaches the
//! client as it is sent, on HTTP/1.1 and HTTP/2, plain and TLS.
//!
//! The backend is a streaming echo (tests/common/duplex.rs) that writes each piece of
//! request body back as it reads it; the client writes and reads at the same time and
//! compares what came back with what it sent. Direct to the echo each exchange takes well
//! under a second; through balancer each is bounded by [`BOUND`].

mod common;

use std::future::Future;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::duplex::*;
use common::tls::*;
use common::*;
use tokio::net::TcpStream;

const BOUND: Duration = Duration::from_secs(20);
const MIB: usize = 1 << 20;

/// Runs one exchange within [`BOUND`]; a stall or a broken exchange fails the test.
async fn bounded(what: &str, exchange: impl Future<Output = Result<Exchange, String>>) -> Exchange {
    let start = Instant::now();
    match tokio::time::timeout(BOUND, exchange).await {
        Err(_) => panic!("{what}: the exchange stalled, no complete response within {BOUND:?}"),
        Ok(Err(e)) => panic!("{what}: {e} (after {:?})", start.elapsed()),
        Ok(Ok(x)) => x,
    }
}

/// The echo's answer: 200, every byte back in order, the whole upload written.
fn assert_echoed(what: &str, sent: &Bytes, ex: &Exchange) {
    assert_eq!(ex.status, 200, "{what}: status");
    if let Err(e) = compare(sent, &ex.body) {
        panic!("{what}: {e}");
    }
    assert!(ex.upload.is_ok(), "{what}: upload: {:?}", ex.upload);
}

async fn h1_through(addr: SocketAddr, len: usize, upload: Upload, what: &str) {
    let body = pattern(len, len as u64);
    let stream = TcpStream::connect(addr).await.unwrap();
    let ex = bounded(what, duplex_h1(stream, "/echo", body.clone(), upload)).await;
    assert_echoed(what, &body, &ex);
}

async fn h2_through(addr: SocketAddr, len: usize, content_length: bool, what: &str) {
    let body = pattern(len, len as u64 + 1);
    let stream = TcpStream::connect(addr).await.unwrap();
    let ex = bounded(what, duplex_h2(stream, "http://duplex.test/echo", body.clone(), content_length)).await;
    assert_echoed(what, &body, &ex);
}

// ---------------------------------------------------------------------------------------
// The harness itself
// ---------------------------------------------------------------------------------------

/// The echo answers before the upload ends (a client that waits for the response head
/// after 64 KiB gets it), and direct exchanges are quick: so a stall through balancer is
/// balancer's.
#[tokio::test(flavor = "multi_thread")]
async fn direct_to_the_echo_every_exchange_completes_quickly() {
    let echo = streaming_echo().await;
    let start = Instant::now();
    h1_through(echo.addr, 5 * MIB, Upload::content_length(), "direct, Content-Length").await;
    h1_through(echo.addr, 3 * MIB, Upload::chunked(), "direct, chunked").await;
    let gated = Upload { chunked: false, wait_for_head_after: Some(65536) };
    h1_through(echo.addr, MIB, gated, "direct, head awaited after 64 KiB").await;
    let gated = Upload { chunked: true, wait_for_head_after: Some(65536) };
    h1_through(echo.addr, MIB, gated, "direct, chunked, head awaited after 64 KiB").await;
    assert!(start.elapsed() < Duration::from_secs(5), "direct exchanges took {:?}", start.elapsed());
}

// ---------------------------------------------------------------------------------------
// Plain HTTP/1.1
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn h1_content_length_upload_is_echoed_while_it_is_sent() {
    let echo = streaming_echo().await;
    let b = Balancer::start(&config_for(&[echo.addr], ""), &[]);
    h1_through(b.addr(), 5 * MIB, Upload::content_length(), "HTTP/1.1, 5 MiB Content-Length").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn h1_chunked_upload_is_echoed_while_it_is_sent() {
    let echo = streaming_echo().await;
    let b = Balancer::start(&config_for(&[echo.addr], ""), &[]);
    h1_through(b.addr(), 3 * MIB, Upload::chunked(), "HTTP/1.1, 3 MiB chunked").await;
}

/// A client that sends 64 KiB and then waits for the response head before sending more
/// (as a streaming protocol does): the head the echo sent at once must reach it.
#[tokio::test(flavor = "multi_thread")]
async fn h1_response_head_reaches_a_client_before_its_upload_ends() {
    let echo = streaming_echo().await;
    let b = Balancer::start(&config_for(&[echo.addr], ""), &[]);
    let gated = Upload { chunked: true, wait_for_head_after: Some(65536) };
    h1_through(b.addr(), MIB, gated, "HTTP/1.1, chunked, head awaited after 64 KiB").await;
}

// ---------------------------------------------------------------------------------------
// HTTP/2 with prior knowledge
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn h2_upload_with_length_is_echoed_while_it_is_sent() {
    let echo = streaming_echo().await;
    let b = Balancer::start(&config_for(&[echo.addr], ""), &[]);
    h2_through(b.addr(), 5 * MIB, true, "HTTP/2, 5 MiB with content-length").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn h2_upload_without_length_is_echoed_while_it_is_sent() {
    let echo = streaming_echo().await;
    let b = Balancer::start(&config_for(&[echo.addr], ""), &[]);
    h2_through(b.addr(), 3 * MIB, false, "HTTP/2, 3 MiB without length").await;
}

// ---------------------------------------------------------------------------------------
// TLS: HTTP/1.1 and h2 chosen by ALPN
// ---------------------------------------------------------------------------------------

/// A test CA and a `[server.tls]` section (127.0.0.1:0) with a certificate for localhost.
struct Tls {
    ca: TestCa,
    section: String,
    _dir: tempfile::TempDir,
}

fn tls() -> Tls {
    let ca = TestCa::new("duplex test CA");
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = ca.leaf(&["localhost"]).write(dir.path(), "site");
    let section =
        format!("\n[server.tls]\nlisten = [\"127.0.0.1:0\"]\ncert = {}\nkey = {}\n", toml_path(&cert), toml_path(&key));
    Tls { ca, section, _dir: dir }
}

async fn tls_stream(addr: SocketAddr, ca: &TestCa, alpn: &'static str) -> tokio_rustls::client::TlsStream<TcpStream> {
    let conn = tls_connect(addr, "localhost", ca, &ClientOpts::default().alpn(&[alpn])).await.unwrap();
    assert_eq!(conn.alpn_str().as_deref(), Some(alpn), "ALPN");
    conn.stream
}

async fn tls_h1(len: usize, upload: Upload, what: &str) {
    let echo = streaming_echo().await;
    let t = tls();
    let b = Balancer::start(&config_for(&[echo.addr], &t.section), &[]);
    let body = pattern(len, len as u64 + 2);
    let stream = tls_stream(https_addr(&b), &t.ca, "http/1.1").await;
    let ex = bounded(what, duplex_h1(stream, "/echo", body.clone(), upload)).await;
    assert_echoed(what, &body, &ex);
}

async fn tls_h2(len: usize, content_length: bool, what: &str) {
    let echo = streaming_echo().await;
    let t = tls();
    let b = Balancer::start(&config_for(&[echo.addr], &t.section), &[]);
    let body = pattern(len, len as u64 + 3);
    let stream = tls_stream(https_addr(&b), &t.ca, "h2").await;
    let ex = bounded(what, duplex_h2(stream, "https://localhost/echo", body.clone(), content_length)).await;
    assert_echoed(what, &body, &ex);
}

#[tokio::test(flavor = "multi_thread")]
async fn tls_h1_content_length_upload_is_echoed_while_it_is_sent() {
    tls_h1(5 * MIB, Upload::content_length(), "TLS HTTP/1.1, 5 MiB Content-Length").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn tls_h1_chunked_upload_is_echoed_while_it_is_sent() {
    tls_h1(3 * MIB, Upload::chunked(), "TLS HTTP/1.1, 3 MiB chunked").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn tls_h2_upload_with_length_is_echoed_while_it_is_sent() {
    tls_h2(5 * MIB, true, "TLS h2, 5 MiB with content-length").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn tls_h2_upload_without_length_is_echoed_while_it_is_sent() {
    tls_h2(3 * MIB, false, "TLS h2, 3 MiB without length").await;
}

// ---------------------------------------------------------------------------------------
// An app that refuses an upload early
// ---------------------------------------------------------------------------------------

/// Passive checks as strict as they go: if balancer counted the early answer as a backend
/// failure, the backend would be out at once.
const STRICT_PASSIVE: &str = "[upstreams.app.passive]\nmax_fails = 1\nfail_timeout = \"30s\"\n";

/// After the 413: a plain GET through balancer reaches the same backend, and `/status`
/// shows it healthy with nothing counted as a failure.
async fn assert_backend_still_fine(b: &Balancer, up: &RawUpstream) {
    let before = up.connections();
    let r =
        tokio::time::timeout(Duration::from_secs(5), get(b.addr(), "/after")).await.expect("GET after the 413 hung");
    assert_eq!(r.status, 200, "GET after the 413: {}", r.text());
    assert_eq!(r.text(), "ok\n");
    assert!(up.connections() > before, "the GET did not reach the backend");
    let status = get(b.admin(), "/status").await.json();
    let backend = &status["upstreams"][0]["backends"][0];
    assert_eq!(backend["healthy"], true, "/status after an early 413: {status}");
    assert_eq!(backend["failures"], 0, "an early answer is not a backend failure: {status}");
}

/// The client writes all 5 MiB while reading; balancer must relay the 413 (write errors
/// after it are fine) and keep the backend in.
#[tokio::test(flavor = "multi_thread")]
async fn an_early_413_reaches_a_client_still_uploading() {
    let up = early_413().await;
    let b = Balancer::start(&config_with_admin(&[up.addr], STRICT_PASSIVE), &[]);
    let stream = TcpStream::connect(b.addr()).await.unwrap();
    let what = "HTTP/1.1, 5 MiB upload, early 413";
    let ex = bounded(what, duplex_h1(stream, "/upload", pattern(5 * MIB, 7), Upload::content_length())).await;
    assert_eq!(ex.status, 413, "{what}: {:?}", String::from_utf8_lossy(&ex.body));
    assert_eq!(ex.body, b"upload too large\n", "{what}: the backend's own body");
    assert_backend_still_fine(&b, &up).await;
}

/// A client that sends 64 KiB and then waits for an answer before sending the rest (as
/// `Expect`-less clients that watch the response do) gets the 413 the backend sent.
#[tokio::test(flavor = "multi_thread")]
async fn an_early_413_reaches_a_client_that_waits_for_it() {
    let up = early_413().await;
    let b = Balancer::start(&config_with_admin(&[up.addr], STRICT_PASSIVE), &[]);
    let stream = TcpStream::connect(b.addr()).await.unwrap();
    let what = "HTTP/1.1, upload paused after 64 KiB, early 413";
    let gated = Upload { chunked: false, wait_for_head_after: Some(65536) };
    let ex = bounded(what, duplex_h1(stream, "/upload", pattern(5 * MIB, 8), gated)).await;
    assert_eq!(ex.status, 413, "{what}: {:?}", String::from_utf8_lossy(&ex.body));
    assert_backend_still_fine(&b, &up).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_early_413_reaches_an_h2_client_still_uploading() {
    let up = early_413().await;
    let b = Balancer::start(&config_with_admin(&[up.addr], STRICT_PASSIVE), &[]);
    let stream = TcpStream::connect(b.addr()).await.unwrap();
    let what = "HTTP/2, 5 MiB upload, early 413";
    let ex = bounded(what, duplex_h2(stream, "http://duplex.test/upload", pattern(5 * MIB, 9), true)).await;
    assert_eq!(ex.status, 413, "{what}: {:?}", String::from_utf8_lossy(&ex.body));
    assert_backend_still_fine(&b, &up).await;
}

/// The same with a backend that closes right after its 413, the upload unread.
#[tokio::test(flavor = "multi_thread")]
async fn an_early_413_then_close_reaches_a_client_still_uploading() {
    let up = early_413_abrupt().await;
    let b = Balancer::start(&config_with_admin(&[up.addr], STRICT_PASSIVE), &[]);
    let stream = TcpStream::connect(b.addr()).await.unwrap();
    let what = "HTTP/1.1, 5 MiB upload, 413 and an abrupt close";
    let ex = bounded(what, duplex_h1(stream, "/upload", pattern(5 * MIB, 10), Upload::content_length())).await;
    assert_eq!(ex.status, 413, "{what}: {:?}", String::from_utf8_lossy(&ex.body));
    assert_backend_still_fine(&b, &up).await;
}
