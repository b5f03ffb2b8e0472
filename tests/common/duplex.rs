//! Full-duplex bodies (SPEC 3): upstreams that answer while the request body is still
//! arriving, and clients that write a request body and read the response at the same time.
//!
//! - [`streaming_echo`]: a raw HTTP/1.1 backend that sends its response head at once and
//!   then writes back every piece of request body as a chunk the moment it reads it (as an
//!   ASGI app echoing each `receive()`), ending with the last chunk when the body ends.
//! - [`early_413`]: a backend that reads about 4 KiB of a request body, answers 413 and
//!   closes; a request without a body gets `200 ok`.
//! - [`duplex_h1`] and [`duplex_h2`]: clients over any stream (TCP or TLS) that upload a
//!   body in pieces from one task while another reads the response.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::BodyExt;
use hyper::body::Frame;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use super::RawUpstream;

// ---------------------------------------------------------------------------------------
// Reading HTTP/1 framing incrementally
// ---------------------------------------------------------------------------------------

/// A buffered reader of HTTP/1 heads, lines and body bytes.
pub struct Input<R> {
    r: R,
    buf: Vec<u8>,
    pos: usize,
}

fn eof() -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "connection closed")
}

impl<R: AsyncRead + Unpin> Input<R> {
    pub fn new(r: R) -> Input<R> {
        Input { r, buf: Vec::new(), pos: 0 }
    }

    /// The stream underneath (to write on it); buffered bytes stay buffered.
    pub fn inner(&mut self) -> &mut R {
        &mut self.r
    }

    fn pending(&self) -> &[u8] {
        &self.buf[self.pos..]
    }

    /// Reads more bytes into the buffer; false at EOF.
    async fn fill(&mut self) -> std::io::Result<bool> {
        if self.pos > 0 && self.pos == self.buf.len() {
            self.buf.clear();
            self.pos = 0;
        } else if self.pos > 1 << 20 {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
        // Into the heap buffer: a large array held across an await would make every
        // future that contains this one large.
        self.buf.reserve(65536);
        let n = self.r.read_buf(&mut self.buf).await?;
        Ok(n > 0)
    }

    /// One head, through its blank line.
    pub async fn head(&mut self) -> std::io::Result<Vec<u8>> {
        let mut scanned: usize = 0;
        loop {
            let p = self.pending();
            if let Some(i) = p[scanned.saturating_sub(3)..].windows(4).position(|w| w == b"\r\n\r\n") {
                let end = scanned.saturating_sub(3) + i + 4;
                let head = p[..end].to_vec();
                self.pos += end;
                return Ok(head);
            }
            scanned = p.len();
            if !self.fill().await? {
                return Err(eof());
            }
        }
    }

    /// One line, without its CRLF.
    pub async fn line(&mut self) -> std::io::Result<Vec<u8>> {
        loop {
            if let Some(i) = self.pending().windows(2).position(|w| w == b"\r\n") {
                let line = self.pending()[..i].to_vec();
                self.pos += i + 2;
                return Ok(line);
            }
            if !self.fill().await? {
                return Err(eof());
            }
        }
    }

    /// Between 1 and `max` bytes; `None` at EOF.
    pub async fn some(&mut self, max: usize) -> std::io::Result<Option<Vec<u8>>> {
        if self.pending().is_empty() && !self.fill().await? {
            return Ok(None);
        }
        let n = self.pending().len().min(max);
        let out = self.pending()[..n].to_vec();
        self.pos += n;
        Ok(Some(out))
    }

    /// Reads and discards everything until EOF, an error or `timeout`.
    pub async fn drain(&mut self, timeout: Duration) {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut chunk = vec![0u8; 65536];
        while let Ok(Ok(n)) = tokio::time::timeout_at(deadline, self.r.read(&mut chunk)).await {
            if n == 0 {
                break;
            }
        }
    }
}

/// How a message body is delimited.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Framing {
    None,
    Length(u64),
    Chunked,
    /// Until the connection closes (responses only).
    Close,
}

/// A parsed head: the request line or status, the fields, and the body's framing.
#[derive(Debug)]
pub struct Head {
    /// The request's method and target, or empty for a response.
    pub method: String,
    pub target: String,
    /// The response's status, or 0 for a request.
    pub status: u16,
    pub fields: Vec<(String, Vec<u8>)>,
    pub framing: Framing,
}

impl Head {
    pub fn field(&self, name: &str) -> Option<&[u8]> {
        self.fields.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_slice())
    }

    fn framing_from_fields(&self) -> Option<Framing> {
        if self.field("transfer-encoding").is_some_and(|v| v.to_ascii_lowercase().ends_with(b"chunked")) {
            return Some(Framing::Chunked);
        }
        let len = self.field("content-length")?;
        Some(Framing::Length(std::str::from_utf8(len).ok()?.trim().parse().ok()?))
    }

    pub fn parse_request(raw: &[u8]) -> Result<Head, String> {
        let mut fields = [httparse::EMPTY_HEADER; 64];
        let mut req = httparse::Request::new(&mut fields);
        match req.parse(raw) {
            Ok(httparse::Status::Complete(_)) => {}
            other => return Err(format!("bad request head ({other:?}): {:?}", String::from_utf8_lossy(raw))),
        }
        let mut head = Head {
            method: req.method.unwrap_or("").to_owned(),
            target: req.path.unwrap_or("").to_owned(),
            status: 0,
            fields: req.headers.iter().map(|h| (h.name.to_owned(), h.value.to_vec())).collect(),
            framing: Framing::None,
        };
        head.framing = head.framing_from_fields().unwrap_or(Framing::None);
        Ok(head)
    }

    pub fn parse_response(raw: &[u8], to_head: bool) -> Result<Head, String> {
        let mut fields = [httparse::EMPTY_HEADER; 64];
        let mut resp = httparse::Response::new(&mut fields);
        match resp.parse(raw) {
            Ok(httparse::Status::Complete(_)) => {}
            other => return Err(format!("bad response head ({other:?}): {:?}", String::from_utf8_lossy(raw))),
        }
        let status = resp.code.unwrap_or(0);
        let mut head = Head {
            method: String::new(),
            target: String::new(),
            status,
            fields: resp.headers.iter().map(|h| (h.name.to_owned(), h.value.to_vec())).collect(),
            framing: Framing::None,
        };
        head.framing = if to_head || status == 204 || status == 304 || status / 100 == 1 {
            Framing::None
        } else {
            head.framing_from_fields().unwrap_or(Framing::Close)
        };
        Ok(head)
    }
}

/// Yields a body's data piece by piece, as it arrives.
pub struct BodyReader {
    framing: Framing,
    /// Bytes left: of the whole body (`Length`) or of the current chunk (`Chunked`).
    left: u64,
    /// A chunk's data ended and its CRLF is still to be read.
    crlf_due: bool,
    done: bool,
}

impl BodyReader {
    pub fn new(framing: Framing) -> BodyReader {
        let left = if let Framing::Length(n) = framing { n } else { 0 };
        BodyReader { framing, left, crlf_due: false, done: framing == Framing::None }
    }

    /// The next piece of body data; `None` once the body has ended.
    pub async fn next<R: AsyncRead + Unpin>(&mut self, inp: &mut Input<R>) -> std::io::Result<Option<Vec<u8>>> {
        if self.done {
            return Ok(None);
        }
        match self.framing {
            Framing::None => Ok(None),
            Framing::Close => {
                let piece = inp.some(65536).await?;
                self.done = piece.is_none();
                Ok(piece)
            }
            Framing::Length(_) => {
                if self.left == 0 {
                    self.done = true;
                    return Ok(None);
                }
                let piece = inp.some(self.left.min(65536) as usize).await?.ok_or_else(eof)?;
                self.left -= piece.len() as u64;
                Ok(Some(piece))
            }
            Framing::Chunked => loop {
                if self.left > 0 {
                    let piece = inp.some(self.left.min(65536) as usize).await?.ok_or_else(eof)?;
                    self.left -= piece.len() as u64;
                    self.crlf_due = self.left == 0;
                    return Ok(Some(piece));
                }
                if self.crlf_due {
                    let line = inp.line().await?;
                    if !line.is_empty() {
                        return Err(bad_chunk(&line));
                    }
                    self.crlf_due = false;
                }
                let line = inp.line().await?;
                let size = line.split(|b| *b == b';').next().unwrap_or(b"");
                let size = std::str::from_utf8(size)
                    .ok()
                    .and_then(|s| u64::from_str_radix(s.trim(), 16).ok())
                    .ok_or_else(|| bad_chunk(&line))?;
                if size == 0 {
                    // Trailer fields, then the blank line.
                    while !inp.line().await?.is_empty() {}
                    self.done = true;
                    return Ok(None);
                }
                self.left = size;
            },
        }
    }
}

fn bad_chunk(line: &[u8]) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, format!("bad chunk line {:?}", String::from_utf8_lossy(line)))
}

// ---------------------------------------------------------------------------------------
// Upstreams
// ---------------------------------------------------------------------------------------

/// The streaming-echo backend: response head at once (`200`, chunked, `connection: close`),
/// then each piece of request body written back as one chunk as soon as it is read.
pub async fn streaming_echo() -> RawUpstream {
    RawUpstream::start(serve_streaming_echo).await
}

async fn serve_streaming_echo(s: TcpStream) {
    let (r, mut w) = s.into_split();
    let mut inp = Input::new(r);
    let Ok(raw) = inp.head().await else { return };
    let Ok(head) = Head::parse_request(&raw) else { return };
    if head.field("expect").is_some_and(|v| v.eq_ignore_ascii_case(b"100-continue")) {
        let _ = w.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").await;
    }
    let resp = b"HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n";
    if w.write_all(resp).await.is_err() {
        return;
    }
    let mut body = BodyReader::new(head.framing);
    loop {
        match body.next(&mut inp).await {
            Ok(Some(piece)) => {
                let mut chunk = format!("{:x}\r\n", piece.len()).into_bytes();
                chunk.extend_from_slice(&piece);
                chunk.extend_from_slice(b"\r\n");
                if w.write_all(&chunk).await.is_err() {
                    return;
                }
            }
            Ok(None) => break,
            // A body cut short: no last chunk, so the response does not look complete.
            Err(_) => return,
        }
    }
    let _ = w.write_all(b"0\r\n\r\n").await;
    let _ = w.shutdown().await;
}

/// How much request body [`early_413`] reads before it answers.
pub const EARLY_413_READS: usize = 4096;

/// A backend that refuses uploads early: for a request with a body it reads about 4 KiB of
/// it, answers `413` (a short body, `connection: close`), shuts its side and closes (after
/// discarding what arrives for at most a second, as servers do on a lingering close). A
/// request without a body gets `200 ok`.
pub async fn early_413() -> RawUpstream {
    RawUpstream::start(|s| serve_early_413(s, true)).await
}

/// Like [`early_413`], but the backend closes its socket right after the 413, with the
/// rest of the upload unread (the kernel then answers further data with a reset), as an
/// app that simply closes the connection does.
pub async fn early_413_abrupt() -> RawUpstream {
    RawUpstream::start(|s| serve_early_413(s, false)).await
}

async fn serve_early_413(s: TcpStream, linger: bool) {
    let (r, mut w) = s.into_split();
    let mut inp = Input::new(r);
    let Ok(raw) = inp.head().await else { return };
    let Ok(head) = Head::parse_request(&raw) else { return };
    let has_body = matches!(head.framing, Framing::Chunked) || matches!(head.framing, Framing::Length(n) if n > 0);
    if !has_body {
        let _ = w.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\nconnection: close\r\n\r\nok\n").await;
        let _ = w.shutdown().await;
        return;
    }
    let mut body = BodyReader::new(head.framing);
    let mut read = 0;
    while read < EARLY_413_READS {
        match body.next(&mut inp).await {
            Ok(Some(piece)) => read += piece.len(),
            _ => break,
        }
    }
    let text = b"upload too large\n";
    let resp = format!(
        "HTTP/1.1 413 Payload Too Large\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        text.len()
    );
    let _ = w.write_all(&[resp.as_bytes(), text].concat()).await;
    let _ = w.shutdown().await;
    if linger {
        inp.drain(Duration::from_secs(1)).await;
    }
}

// ---------------------------------------------------------------------------------------
// Clients
// ---------------------------------------------------------------------------------------

/// `len` pseudo-random bytes (xorshift), so that a lost, repeated or reordered piece shows.
pub fn pattern(len: usize, seed: u64) -> Bytes {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    Bytes::from(out)
}

/// The sizes the clients cut an upload into: uneven, so chunk boundaries move around.
const PIECES: [usize; 6] = [65536, 1000, 16384, 7, 40000, 4096];

fn pieces(body: &Bytes) -> Vec<Bytes> {
    let mut out = Vec::new();
    let mut at = 0;
    for size in PIECES.iter().cycle() {
        if at >= body.len() {
            break;
        }
        let end = (at + size).min(body.len());
        out.push(body.slice(at..end));
        at = end;
    }
    out
}

/// `what` if `got` equals `want`, else where they first differ.
pub fn compare(want: &[u8], got: &[u8]) -> Result<(), String> {
    if want == got {
        return Ok(());
    }
    let at = want.iter().zip(got).position(|(a, b)| a != b).unwrap_or(want.len().min(got.len()));
    Err(format!("sent {} bytes, got {} back; first difference at byte {at}", want.len(), got.len()))
}

/// What a duplex exchange saw.
#[derive(Debug)]
pub struct Exchange {
    /// The final response's status.
    pub status: u16,
    /// The response body, decoded.
    pub body: Vec<u8>,
    /// How the upload ended: `Ok` when all of it was written, else the write error (or
    /// that the writer was still blocked when the response had ended).
    pub upload: Result<(), String>,
}

/// How [`duplex_h1`] frames and paces its upload.
#[derive(Clone, Copy, Debug)]
pub struct Upload {
    /// Chunked transfer coding instead of Content-Length.
    pub chunked: bool,
    /// Stop writing after this many body bytes until the response head has arrived.
    pub wait_for_head_after: Option<usize>,
}

impl Upload {
    pub fn content_length() -> Upload {
        Upload { chunked: false, wait_for_head_after: None }
    }
    pub fn chunked() -> Upload {
        Upload { chunked: true, wait_for_head_after: None }
    }
}

/// An HTTP/1.1 `POST path` of `body` over `io`: one task writes the head and the body in
/// pieces while this one reads the response (head, then body as it comes). Returns once
/// the response has ended.
pub async fn duplex_h1<S>(io: S, path: &str, body: Bytes, upload: Upload) -> Result<Exchange, String>
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (r, mut w) = tokio::io::split(io);
    let framing = if upload.chunked {
        "transfer-encoding: chunked".to_owned()
    } else {
        format!("content-length: {}", body.len())
    };
    let head = format!(
        "POST {path} HTTP/1.1\r\nhost: duplex.test\r\ncontent-type: application/octet-stream\r\n{framing}\r\n\r\n"
    );
    let (head_seen_tx, mut head_seen) = tokio::sync::watch::channel(false);
    let writer = tokio::spawn(async move {
        let e = |e: std::io::Error| e.to_string();
        w.write_all(head.as_bytes()).await.map_err(e)?;
        let mut written = 0;
        for piece in pieces(&body) {
            if upload.wait_for_head_after.is_some_and(|n| written >= n) {
                let _ = head_seen.wait_for(|seen| *seen).await;
            }
            if upload.chunked {
                let mut chunk = format!("{:x}\r\n", piece.len()).into_bytes();
                chunk.extend_from_slice(&piece);
                chunk.extend_from_slice(b"\r\n");
                w.write_all(&chunk).await.map_err(e)?;
            } else {
                w.write_all(&piece).await.map_err(e)?;
            }
            written += piece.len();
        }
        if upload.chunked {
            w.write_all(b"0\r\n\r\n").await.map_err(e)?;
        }
        w.flush().await.map_err(e)?;
        // Keep the write half (and so the connection) open until the reader is done.
        Ok::<_, String>(w)
    });

    let mut inp = Input::new(r);
    let head = loop {
        let raw = inp.head().await.map_err(|e| format!("no response head: {e}"))?;
        let head = Head::parse_response(&raw, false)?;
        if head.status / 100 != 1 {
            break head;
        }
    };
    let _ = head_seen_tx.send(true);
    let mut reader = BodyReader::new(head.framing);
    let mut got = Vec::new();
    loop {
        match reader.next(&mut inp).await {
            Ok(Some(piece)) => got.extend_from_slice(&piece),
            Ok(None) => break,
            Err(e) => {
                return Err(format!("response {} broke off after {} body bytes: {e}", head.status, got.len()));
            }
        }
    }
    // The response has ended. A writer still blocked then will never finish (the server
    // no longer reads); that is not an error of the exchange.
    let writer = tokio::time::timeout(Duration::from_secs(2), writer).await;
    let upload = match writer {
        Ok(Ok(Ok(_))) => Ok(()),
        Ok(Ok(Err(e))) => Err(e),
        Ok(Err(e)) => Err(format!("writer task: {e}")),
        Err(_) => Err("the upload was still blocked after the response ended".to_owned()),
    };
    Ok(Exchange { status: head.status, body: got, upload })
}

/// A request body fed from a channel, piece by piece, as a streaming client sends it.
pub struct ChannelBody(pub tokio::sync::mpsc::Receiver<Bytes>);

impl http_body::Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|piece| piece.map(|b| Ok(Frame::data(b))))
    }
}

/// An HTTP/2 `POST uri` of `body` over `io` (prior knowledge, or after ALPN `h2`): one task
/// feeds the body into the stream in pieces while this one reads the response body as it
/// comes. With `content_length` the request declares its length.
pub async fn duplex_h2<S>(io: S, uri: &str, body: Bytes, content_length: bool) -> Result<Exchange, String>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(io))
        .await
        .map_err(|e| format!("h2 handshake: {e}"))?;
    tokio::spawn(conn);
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(2);
    let mut req = Request::post(uri).header("content-type", "application/octet-stream");
    if content_length {
        req = req.header("content-length", body.len());
    }
    let req = req.body(ChannelBody(rx)).unwrap();
    let total = Arc::new(body);
    let feed = total.clone();
    let writer = tokio::spawn(async move {
        for piece in pieces(&feed) {
            if tx.send(piece).await.is_err() {
                return Err("the request stream was dropped before the body was sent".to_owned());
            }
        }
        Ok(())
    });
    let resp = sender.send_request(req).await.map_err(|e| format!("no response: {e}"))?;
    let status = resp.status().as_u16();
    let mut incoming = resp.into_body();
    let mut got = Vec::new();
    while let Some(frame) = incoming.frame().await {
        match frame {
            Ok(f) => {
                if let Some(d) = f.data_ref() {
                    got.extend_from_slice(d);
                }
            }
            Err(e) => return Err(format!("response {status} broke off after {} body bytes: {e}", got.len())),
        }
    }
    let upload = match tokio::time::timeout(Duration::from_secs(2), writer).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => Err(format!("writer task: {e}")),
        Err(_) => Err("the upload was still blocked after the response ended".to_owned()),
    };
    Ok(Exchange { status, body: got, upload })
}
