//! Test clients: a hyper HTTP/1.1 or HTTP/2 client for ordinary requests and a raw TCP one
//! for what ordinary clients refuse to send.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }
}

/// A keep-alive HTTP/1.1 connection.
pub struct Conn {
    sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
}

impl Conn {
    pub async fn open(addr: SocketAddr) -> Conn {
        let stream = TcpStream::connect(addr).await.unwrap();
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.unwrap();
        tokio::spawn(conn);
        Conn { sender }
    }

    pub async fn send(&mut self, req: Request<Full<Bytes>>) -> Result<Reply, hyper::Error> {
        self.sender.ready().await?;
        let resp = self.sender.send_request(req).await?;
        let (parts, body) = resp.into_parts();
        let body = body.collect().await?.to_bytes();
        Ok(Reply { status: parts.status, headers: parts.headers, body })
    }

    pub async fn get(&mut self, path: &str) -> Result<Reply, hyper::Error> {
        self.send(Request::get(path).header("host", "test.local").body(Full::default()).unwrap()).await
    }
}

/// One GET on a new connection.
pub async fn get(addr: SocketAddr, path: &str) -> Reply {
    Conn::open(addr).await.get(path).await.unwrap()
}

/// One request on a new connection.
pub async fn send(addr: SocketAddr, req: Request<Full<Bytes>>) -> Reply {
    Conn::open(addr).await.send(req).await.unwrap()
}

/// One request over HTTP/2 with prior knowledge.
pub async fn send_h2(addr: SocketAddr, req: Request<Full<Bytes>>) -> (http::Version, Reply) {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream)).await.unwrap();
    tokio::spawn(conn);
    let resp = sender.send_request(req).await.unwrap();
    let version = resp.version();
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    (version, Reply { status: parts.status, headers: parts.headers, body })
}

/// Writes `raw` on a new connection and reads until the server closes or `timeout`.
pub async fn raw(addr: SocketAddr, raw: &[u8], timeout: Duration) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(raw).await.unwrap();
    read_until_close(&mut s, timeout).await
}

/// Reads what arrives until EOF or `timeout`.
pub async fn read_until_close(s: &mut TcpStream, timeout: Duration) -> String {
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Whether the server closed `s` (EOF or reset) within `timeout`, discarding any data.
pub async fn closed_within(s: &mut TcpStream, timeout: Duration) -> bool {
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
            Err(_) => return false,
        }
    }
}

/// Status code of the first response in a raw HTTP/1 reply.
pub fn status_of(raw: &str) -> u16 {
    raw.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("no status line in {raw:?}"))
}

/// Reads raw bytes until EOF or reset (`true`) or until `timeout` (`false`).
pub async fn read_to_close(s: &mut TcpStream, timeout: Duration) -> (Vec<u8>, bool) {
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return (out, true),
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
            Err(_) => return (out, false),
        }
    }
}

/// One HTTP/1 response parsed off the front of `raw`: status, fields (names as sent),
/// decoded body, and what follows it. A response without a length runs to the end (`close_delimited`).
pub struct RawResponse {
    pub status: u16,
    pub fields: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub rest: Vec<u8>,
}

impl RawResponse {
    /// The first value of field `name` (any case).
    pub fn field(&self, name: &str) -> Option<&str> {
        self.values(name).into_iter().next()
    }

    /// Every value of field `name` (any case), in order.
    pub fn values(&self, name: &str) -> Vec<&str> {
        self.fields.iter().filter(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str()).collect()
    }
}

pub fn parse_response(raw: &[u8], head_request: bool) -> RawResponse {
    let end = raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap_or_else(|| panic!("no head end in {raw:?}")) + 4;
    let head = std::str::from_utf8(&raw[..end]).unwrap();
    let mut lines = head.split("\r\n");
    let status = lines.next().unwrap().split(' ').nth(1).unwrap().parse().unwrap();
    let fields: Vec<(String, String)> = lines
        .filter(|l| !l.is_empty())
        .map(|l| {
            let (n, v) = l.split_once(':').unwrap();
            (n.trim().to_owned(), v.trim().to_owned())
        })
        .collect();
    let mut p = RawResponse { status, fields, body: Vec::new(), rest: Vec::new() };
    let after = &raw[end..];
    if head_request || status == 204 || status == 304 || status / 100 == 1 {
        p.rest = after.to_vec();
    } else if p.field("transfer-encoding") == Some("chunked") {
        let mut at = 0;
        loop {
            let line_end = at + after[at..].windows(2).position(|w| w == b"\r\n").expect("chunk size line");
            let size = usize::from_str_radix(std::str::from_utf8(&after[at..line_end]).unwrap(), 16).unwrap();
            at = line_end + 2;
            if size == 0 {
                assert_eq!(&after[at..at + 2], b"\r\n", "no trailers expected");
                at += 2;
                break;
            }
            p.body.extend_from_slice(&after[at..at + size]);
            assert_eq!(&after[at + size..at + size + 2], b"\r\n");
            at += size + 2;
        }
        p.rest = after[at..].to_vec();
    } else if let Some(len) = p.field("content-length") {
        let len: usize = len.parse().unwrap();
        p.body = after[..len].to_vec();
        p.rest = after[len..].to_vec();
    } else {
        p.body = after.to_vec();
    }
    p
}
