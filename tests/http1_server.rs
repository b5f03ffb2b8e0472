//! balancer's own HTTP/1.1 server side, byte for byte over raw sockets: `100 Continue`,
//! chunked bodies both ways, pipelining behind bodies, HTTP/1.0 clients, HEAD, and the
//! fields it adds to what it writes.

mod common;

use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn read_all(s: &mut TcpStream) -> Vec<u8> {
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await.expect("not closed").unwrap();
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn expect_100_continue_is_answered_before_the_body_is_sent() {
    let up = Upstream::start("a").await;
    let b = Balancer::start(&config_for(&[up.addr], ""), &[]);
    let mut s = TcpStream::connect(b.addr()).await.unwrap();
    s.write_all(b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n").await.unwrap();
    let mut interim = [0u8; 25];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut interim)).await.expect("no 100 Continue").unwrap();
    assert_eq!(&interim, b"HTTP/1.1 100 Continue\r\n\r\n");
    s.write_all(b"hello").await.unwrap();
    s.write_all(b"GET /next HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await.unwrap();
    let out = read_all(&mut s).await;
    let first = parse_response(&out, false);
    assert_eq!(first.status, 200);
    let echo: serde_json::Value = serde_json::from_slice(&first.body).unwrap();
    assert_eq!(echo["body_len"], 5);
    assert!(echo["headers"].get("expect").is_none(), "Expect is not forwarded: {echo}");
    let second = parse_response(&first.rest, false);
    assert_eq!(second.status, 200);
    assert!(String::from_utf8_lossy(&second.body).contains("/next"));
}

#[tokio::test(flavor = "multi_thread")]
async fn chunked_bodies_cross_both_ways_with_a_request_pipelined_behind() {
    let up = Upstream::start("a").await;
    let b = Balancer::start(&config_for(&[up.addr], ""), &[]);
    let mut s = TcpStream::connect(b.addr()).await.unwrap();
    s.write_all(
        b"POST /c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\n\r\n\
          GET /bytes/100000 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await
    .unwrap();
    let out = read_all(&mut s).await;
    let first = parse_response(&out, false);
    assert_eq!(first.status, 200);
    let echo: serde_json::Value = serde_json::from_slice(&first.body).unwrap();
    assert_eq!(echo["body_len"], 11);
    assert_eq!(echo["headers"]["transfer-encoding"], "chunked");
    let second = parse_response(&first.rest, false);
    assert_eq!(second.status, 200);
    assert_eq!(second.field("transfer-encoding"), Some("chunked"), "{:?}", second.fields);
    assert_eq!(second.body.len(), 100_000);
    assert!(second.body.iter().all(|&c| c == b'x'));
    assert!(second.rest.is_empty());
    assert_eq!(second.field("connection"), Some("close"));
}

#[tokio::test(flavor = "multi_thread")]
async fn an_http10_client_gets_a_body_delimited_by_the_close() {
    let up = Upstream::start("a").await;
    let b = Balancer::start(&config_for(&[up.addr], ""), &[]);
    let mut s = TcpStream::connect(b.addr()).await.unwrap();
    s.write_all(b"GET /bytes/70000 HTTP/1.0\r\n\r\n").await.unwrap();
    let out = read_all(&mut s).await;
    // HTTP/1.0 semantics under an HTTP/1.1 status line (RFC 9110 2.5).
    assert!(out.starts_with(b"HTTP/1.1 200 OK\r\n"), "{:?}", String::from_utf8_lossy(&out[..40]));
    let r = parse_response(&out, false);
    assert_eq!(r.field("transfer-encoding"), None, "no chunked framing for HTTP/1.0");
    assert_eq!(r.body.len(), 70_000);

    // Keep-alive asked for by an HTTP/1.0 client is kept, and said so.
    let mut s = TcpStream::connect(b.addr()).await.unwrap();
    s.write_all(b"GET /ka HTTP/1.0\r\nConnection: keep-alive\r\n\r\nGET /last HTTP/1.0\r\n\r\n").await.unwrap();
    let out = read_all(&mut s).await;
    let first = parse_response(&out, false);
    assert_eq!(first.field("connection"), Some("keep-alive"));
    let second = parse_response(&first.rest, false);
    assert!(String::from_utf8_lossy(&second.body).contains("/last"));
}

#[tokio::test(flavor = "multi_thread")]
async fn head_answers_keep_the_length_and_carry_no_body() {
    let up = Upstream::start("a").await;
    let b = Balancer::start(&config_for(&[up.addr], ""), &[]);
    let mut s = TcpStream::connect(b.addr()).await.unwrap();
    s.write_all(b"HEAD /h HTTP/1.1\r\nHost: x\r\n\r\nGET /after HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let out = read_all(&mut s).await;
    let head = parse_response(&out, true);
    assert_eq!(head.status, 200);
    assert!(head.field("content-length").is_some(), "{:?}", head.fields);
    let next = parse_response(&head.rest, false);
    assert_eq!(next.status, 200, "the next response follows the head at once");
    assert!(String::from_utf8_lossy(&next.body).contains("/after"));
}

#[tokio::test(flavor = "multi_thread")]
async fn balancer_made_answers_carry_date_length_and_request_id() {
    let b = Balancer::start(&config_for(&[dead_addr()], ""), &[]);
    let mut s = TcpStream::connect(b.addr()).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await.unwrap();
    let out = read_all(&mut s).await;
    let r = parse_response(&out, false);
    assert!(r.status == 502 || r.status == 503, "{}", r.status);
    let date = r.field("date").expect("a Date field");
    assert!(date.ends_with(" GMT") && date.len() == 29, "{date}");
    assert_eq!(r.field("content-length").map(|l| l.parse::<usize>().unwrap()), Some(r.body.len()));
    assert!(r.field("x-request-id").is_some_and(|id| id.len() >= 24));
}

#[tokio::test(flavor = "multi_thread")]
async fn heads_split_into_single_bytes_are_served() {
    let up = Upstream::start("a").await;
    let b = Balancer::start(&config_for(&[up.addr], ""), &[]);
    let mut s = TcpStream::connect(b.addr()).await.unwrap();
    s.set_nodelay(true).unwrap();
    for byte in b"\r\nGET /slow HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n" {
        s.write_all(&[*byte]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let out = read_all(&mut s).await;
    let r = parse_response(&out, false);
    assert_eq!(r.status, 200);
    assert!(String::from_utf8_lossy(&r.body).contains("/slow"));
}

#[tokio::test(flavor = "multi_thread")]
async fn blank_lines_alone_do_not_keep_a_connection_open() {
    let up = Upstream::start("a").await;
    let b = Balancer::start(&config_for(&[up.addr], ""), &["--set", "timeouts.client_header=1s"]);
    let mut s = TcpStream::connect(b.addr()).await.unwrap();
    s.write_all(b"GET /first HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await.unwrap().unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
    // Empty lines may precede a request line, but they start its clock: after
    // client_header the connection is answered 408 and closed, however many follow.
    let started = std::time::Instant::now();
    let mut out = Vec::new();
    let closed = loop {
        if s.write_all(b"\r\n").await.is_err() {
            break true;
        }
        match tokio::time::timeout(Duration::from_millis(300), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break true,
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
            Err(_) => {}
        }
        if started.elapsed() > Duration::from_secs(4) {
            break false;
        }
    };
    assert!(closed, "still open after {:?} of blank lines", started.elapsed());
    assert!(String::from_utf8_lossy(&out).starts_with("HTTP/1.1 408"), "{:?}", String::from_utf8_lossy(&out));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_leaves_a_quiet_streamed_response_frees_the_backend() {
    let (tx, mut closed) = tokio::sync::mpsc::unbounded_channel();
    // Sends a head and one chunk, then stays quiet until balancer closes the connection.
    let backend = RawUpstream::start(move |mut s| {
        let tx = tx.clone();
        async move {
            read_head(&mut s).await;
            let _ = s.write_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n").await;
            let mut buf = [0u8; 64];
            let ended = tokio::time::timeout(Duration::from_secs(20), s.read(&mut buf)).await;
            let _ = tx.send(matches!(ended, Ok(Ok(0)) | Ok(Err(_))));
        }
    })
    .await;
    let b = Balancer::start(&config_with_admin(&[backend.addr], ""), &[]);
    let mut s = TcpStream::connect(b.addr()).await.unwrap();
    s.write_all(b"GET /events HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    while !String::from_utf8_lossy(&got).contains("first") {
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await.unwrap().unwrap();
        assert!(n > 0, "closed early: {:?}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    drop(s);
    let freed = tokio::time::timeout(Duration::from_secs(3), closed.recv()).await;
    assert_eq!(freed, Ok(Some(true)), "the backend connection was not closed after the client left");
    let status = get(b.admin(), "/status").await.json();
    assert_eq!(status["upstreams"][0]["backends"][0]["inflight"], 0, "{status}");
}
