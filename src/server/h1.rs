//! balancer's own HTTP/1.1 server side, for client connections over plain TCP (hyper
//! serves HTTP/2 and TLS). One task per connection reads a head, runs the request path
//! in place, writes the response, and goes round again. Written for the profile: hyper's
//! dispatcher, its second parse of every head and its separate framing guard cost more
//! user time per request than the rest of the request path together.
//!
//! The connection-level rules are those of [`GuardedIo`](super::GuardedIo) under hyper:
//! `client_header` (408), `idle`, `max_header_bytes` and ambiguous framing (431/400,
//! through `head_check`), parking after [`PARK_AFTER`] idle, and the drain.

use std::future::{Future, poll_fn};
use std::io;
use std::net::SocketAddr;
use std::pin::{Pin, pin};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http::{Method, Request, Response, StatusCode, Version, header};
use http_body::Body;
use tokio::io::AsyncWrite;
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::time::Instant;

use super::ConnActivity;
use super::conn_guard::ConnLimits;
use super::drain::DrainGuard;
use crate::http1::server::{self, Exchange, IncomingBody, Io, Prefixed, READ_SIZE, SharedIo, SharedIoHandle, lock};
use crate::http1::{self, Decoder, put_field};
use crate::proxy::body::{ClientBody, ResponseBody};
use crate::proxy::{self, Answer, ConnInfo, ProxyError, headers, request_id};
use crate::runtime::SharedRuntime;
use crate::timer::LazyTimer;

/// Response body pieces up to this size are copied next to their framing and written in
/// one go; larger ones are written from where they are.
const COPY_UP_TO: usize = 16 * 1024;
/// How long a keep-alive connection stays idle before it is parked: only its socket is
/// kept (the session's buffers and state are freed) until its next byte arrives.
pub const PARK_AFTER: Duration = Duration::from_millis(500);

/// Where a session starts on a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Start {
    /// A new connection: it may still turn out to speak HTTP/2, and must send its first
    /// head within `client_header` of the accept.
    Fresh,
    /// A parked connection whose next byte arrived.
    Resumed,
}

/// How a session on a connection ended.
pub enum Ended {
    Closed,
    /// Idle for [`PARK_AFTER`] with nothing pending: the socket, for the caller to park.
    Parked(TcpStream),
    /// The client spoke HTTP/2 (prior knowledge): the socket and what was read of it.
    Http2(Prefixed<TcpStream>),
}

/// Serves HTTP/1.1 requests on `stream` until it closes, goes idle long enough to park,
/// or turns out to speak HTTP/2 (only checked at a [`Start::Fresh`]).
pub async fn serve(
    stream: TcpStream,
    peer: SocketAddr,
    limits: ConnLimits,
    runtime: &SharedRuntime,
    guard: &DrainGuard,
    start: Start,
) -> Ended {
    let activity = Arc::new(ConnActivity::default());
    let info = Arc::new(ConnInfo::http1(peer, activity));
    let io: SharedIo = Arc::new(Mutex::new(Io {
        stream,
        buf: BytesMut::new(),
        body: Decoder::Done,
        body_broken: false,
        continue_left: 0,
    }));
    // Parking after the idle timeout would only delay the close.
    let park = PARK_AFTER < limits.idle;
    let first = start == Start::Fresh;
    let mut session = Session {
        io,
        limits,
        first,
        park,
        out: Vec::new(),
        parsed: None,
        timer: LazyTimer::new(Instant::now() + limits.idle),
    };
    loop {
        let (req, exchange) = match session.read_head(guard).await {
            Next::Request => {
                let Some((mut req, exchange)) = session.parsed.take() else { return Ended::Closed };
                attach_body(&mut req, &session.io);
                (req, exchange)
            }
            Next::Refuse(error) => {
                session.refuse(&error).await;
                return Ended::Closed;
            }
            // The client closed, or stayed idle: dropping the socket closes it.
            Next::Close => return Ended::Closed,
            Next::Park => return session.into_parked(),
            Next::Http2 => return session.into_http2(),
        };
        let busy = info.activity.begin();
        // Pinned where it is made: the future is large, and each move is a copy.
        let handled = pin!(proxy::handle(runtime.load_full(), info.clone(), busy, req));
        let Some(response) = session.run(handled).await else {
            // The client left: dropping the request path's future logs it (499).
            return Ended::Closed;
        };
        match session.respond(response, exchange, guard.is_draining()).await {
            After::KeepAlive => {}
            After::Close => {
                // Part of the request is still unread: the client may still be sending, so
                // it is told the end first (a plain close could reset the connection
                // before it reads the answer). Otherwise the close alone says it.
                if !lock(&session.io).body.is_done() {
                    session.close().await;
                }
                return Ended::Closed;
            }
            After::Upgrade(tx) => {
                if let Some(io) = session.into_prefixed() {
                    let _ = tx.send(io);
                }
                return Ended::Closed;
            }
        }
    }
}

/// What reading a head came to.
enum Next {
    /// A request, in `Session::parsed`.
    Request,
    Refuse(ProxyError),
    Close,
    Park,
    Http2,
}

enum After {
    KeepAlive,
    Close,
    Upgrade(oneshot::Sender<Prefixed<TcpStream>>),
}

struct Session {
    io: SharedIo,
    limits: ConnLimits,
    /// The connection's first session: HTTP/2 is still possible.
    first: bool,
    park: bool,
    /// The response being written; kept to reuse its memory.
    out: Vec<u8>,
    /// The request [`Session::read_head`] parsed, until the request path takes it.
    parsed: Option<(Request<ClientBody>, Exchange)>,
    /// The idle and head timers.
    timer: LazyTimer,
}

impl Session {
    /// Reads until a whole request head is in, then parses it.
    async fn read_head(&mut self, guard: &DrainGuard) -> Next {
        // A new connection must send its first head within client_header, like any head.
        let fresh = self.first;
        let idle_for = match (fresh, self.park) {
            (true, _) => self.limits.client_header,
            (false, true) => PARK_AFTER,
            (false, false) => self.limits.idle,
        };
        let idle_until = Instant::now() + idle_for;
        let mut head_until: Option<Instant> = None;
        let mut scanned = 0;
        poll_fn(|cx| {
            loop {
                let mut io = lock(&self.io);
                // Empty lines before a request line are ignored (RFC 9112 2.2).
                let blank = http1::blank_lines(&io.buf);
                if blank > 0 {
                    io.buf.advance(blank);
                    scanned = 0;
                }
                if blank > 0 || !io.buf.is_empty() {
                    // Any byte, blank lines included, starts the head's clock (so blank
                    // lines cannot keep a connection open); a new connection's first head
                    // keeps the deadline counted from the accept.
                    head_until.get_or_insert_with(|| {
                        if fresh { idle_until } else { Instant::now() + self.limits.client_header }
                    });
                }
                if !io.buf.is_empty() {
                    if self.first && io.buf.len() >= 4 {
                        self.first = false;
                        let n = io.buf.len().min(http1::H2_PREFACE.len());
                        if io.buf[..n] == http1::H2_PREFACE[..n] {
                            return Poll::Ready(Next::Http2);
                        }
                    }
                    let no_body = || ClientBody::Http1(IncomingBody::default());
                    let max = self.limits.max_header_bytes;
                    match server::parse_head(&mut io, &mut scanned, max, no_body, &mut self.parsed) {
                        Ok(true) => {
                            self.first = false;
                            return Poll::Ready(Next::Request);
                        }
                        Ok(false) => {}
                        Err(reject) => {
                            let refused = ProxyError::refused_head(reject, self.limits.max_header_bytes);
                            return Poll::Ready(Next::Refuse(refused));
                        }
                    }
                }
                match io.poll_fill(cx) {
                    Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => return Poll::Ready(Next::Close),
                    Poll::Ready(Ok(_)) => continue,
                    Poll::Pending => {}
                }
                let buffered = !io.buf.is_empty();
                drop(io);
                if !buffered && guard.poll_draining(cx) {
                    return Poll::Ready(Next::Close);
                }
                return match head_until {
                    Some(until) => {
                        if self.timer.expired(until, cx) {
                            Poll::Ready(Next::Refuse(ProxyError::HeadTimeout { after: self.limits.client_header }))
                        } else {
                            Poll::Pending
                        }
                    }
                    _ if self.timer.expired(idle_until, cx) => {
                        Poll::Ready(if self.park && !fresh { Next::Park } else { Next::Close })
                    }
                    _ => Poll::Pending,
                };
            }
        })
        .await
    }

    /// Runs the request path; `None` if the client closed the connection meanwhile.
    async fn run<F: Future<Output = Result<Response<ResponseBody>, std::convert::Infallible>>>(
        &mut self,
        mut handled: Pin<&mut F>,
    ) -> Option<Response<ResponseBody>> {
        let limit = self.limits.max_header_bytes + READ_SIZE;
        poll_fn(|cx| {
            if let Poll::Ready(Ok(response)) = handled.as_mut().poll(cx) {
                return Poll::Ready(Some(response));
            }
            // While the body is not being read, watch for the client leaving (what arrives
            // meanwhile is a pipelined request, kept for later).
            match watch_client(&mut lock(&self.io), limit, cx) {
                Poll::Ready(_) => Poll::Ready(None),
                Poll::Pending => Poll::Pending,
            }
        })
        .await
    }

    /// Writes the response; says what becomes of the connection.
    async fn respond(&mut self, response: Response<ResponseBody>, mut ex: Exchange, draining: bool) -> After {
        let (head, body) = response.into_parts();
        // Dropped as soon as it ends, before its last bytes are written: the in-flight mark
        // and the access log are done by the time the client has the whole response.
        let mut body = Some(body);
        let status = head.status;
        let switching = status == StatusCode::SWITCHING_PROTOCOLS;
        let (body_done, body_broken) = {
            let io = lock(&self.io);
            (io.body.is_done(), io.body_broken)
        };
        let no_body = ex.method == Method::HEAD
            || status.is_informational()
            || status == StatusCode::NO_CONTENT
            || status == StatusCode::NOT_MODIFIED;
        let length = body.as_ref().and_then(|b| b.size_hint().exact());
        let chunked = !no_body && length.is_none() && ex.version == Version::HTTP_11;
        let out = &mut self.out;
        out.clear();
        // An HTTP/1.0 client gets HTTP/1.0 semantics under the highest version balancer
        // speaks (RFC 9110 2.5).
        out.extend_from_slice(b"HTTP/1.1 ");
        out.extend_from_slice(status.as_str().as_bytes());
        out.push(b' ');
        out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
        out.extend_from_slice(b"\r\n");
        // One pass: the fields, and which of those the framing depends on are there.
        let (mut has_date, mut has_length, mut connection) = (false, false, None);
        match body.as_mut().and_then(ResponseBody::take_fields) {
            // A backend's, as it sent them (no `Connection` is left among them), then any
            // balancer adds in the map (a sticky cookie).
            Some((fields, request_id)) => {
                (has_date, has_length) = headers::write_response_fields(out, &fields, request_id);
                for (name, value) in &head.headers {
                    put_field(out, name.as_str().as_bytes(), value.as_bytes());
                }
            }
            None => {
                for (name, value) in &head.headers {
                    if name == header::DATE {
                        has_date = true;
                    } else if name == header::CONTENT_LENGTH {
                        has_length = true;
                    } else if name == header::CONNECTION {
                        connection = Some(value);
                    }
                    put_field(out, name.as_str().as_bytes(), value.as_bytes());
                }
            }
        }
        let keep_alive = ex.keep_alive
            && !draining
            && ex.method != Method::CONNECT
            && body_done
            && !body_broken
            && (no_body || length.is_some() || chunked)
            && !connection.is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"close"));
        if !has_date {
            put_field(out, b"date", http1::date().as_bytes());
        }
        if !no_body && !switching {
            match length {
                Some(n) if !has_length => {
                    put_field(out, b"content-length", itoa::Buffer::new().format(n).as_bytes());
                }
                Some(_) => {}
                None if chunked => put_field(out, b"transfer-encoding", b"chunked"),
                None => {}
            }
        }
        if !switching && connection.is_none() {
            if !keep_alive {
                put_field(out, b"connection", b"close");
            } else if ex.version == Version::HTTP_10 {
                put_field(out, b"connection", b"keep-alive");
            }
        }
        out.extend_from_slice(b"\r\n");

        let written = if no_body {
            body = None;
            self.flush().await
        } else {
            self.write_body(&mut body, chunked).await
        };
        drop(body);
        match written {
            Ok(true) if switching => match ex.upgrade.take() {
                Some(tx) => After::Upgrade(tx),
                None => After::Close,
            },
            Ok(true) if keep_alive => After::KeepAlive,
            _ => After::Close,
        }
    }

    /// Writes everything in `out`.
    async fn flush(&mut self) -> io::Result<bool> {
        let (out, io) = (&mut self.out, &self.io);
        let mut at = 0;
        poll_fn(|cx| -> Poll<io::Result<()>> {
            let mut io = lock(io);
            while at < out.len() {
                match ready!(Pin::new(&mut io.stream).poll_write(cx, &out[at..]))? {
                    0 => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                    n => at += n,
                }
            }
            Poll::Ready(Ok(()))
        })
        .await?;
        out.clear();
        Ok(true)
    }

    /// Writes `out` (the head) and the body after it, framed; `Ok(false)` if the body
    /// broke off (the client then cannot tell where it ends, so the connection closes).
    async fn write_body(&mut self, body: &mut Option<ResponseBody>, chunked: bool) -> io::Result<bool> {
        let (out, io) = (&mut self.out, &self.io);
        // Written from `out` (head, framing, small data), then `big` (large data).
        let mut at = 0;
        let mut big = Bytes::new();
        let mut ended = false;
        let mut broken = false;
        // The body ended with a large piece still to write: the last chunk follows it.
        let mut last_chunk_after_big = false;
        let limit = self.limits.max_header_bytes + READ_SIZE;
        let last_chunk = |out: &mut Vec<u8>| {
            if chunked {
                out.extend_from_slice(b"0\r\n\r\n");
            }
        };
        poll_fn(|cx| -> Poll<io::Result<()>> {
            loop {
                // Take frames while the body has them ready and the buffer is small.
                while !ended && big.is_empty() && out.len() - at < COPY_UP_TO {
                    let Some(b) = body.as_mut() else { break };
                    match Pin::new(&mut *b).poll_frame(cx) {
                        Poll::Ready(Some(Ok(frame))) => {
                            let end = b.is_end_stream();
                            if let Ok(data) = frame.into_data()
                                && !data.is_empty()
                            {
                                if chunked {
                                    out.extend_from_slice(http1::chunk_size_line(data.len()).as_bytes());
                                }
                                if data.len() <= COPY_UP_TO {
                                    out.extend_from_slice(&data);
                                    if chunked {
                                        out.extend_from_slice(b"\r\n");
                                    }
                                } else {
                                    big = data;
                                }
                            }
                            if end {
                                *body = None;
                                ended = true;
                                if big.is_empty() {
                                    last_chunk(out);
                                } else {
                                    last_chunk_after_big = true;
                                }
                            }
                        }
                        Poll::Ready(Some(Err(_))) => {
                            *body = None;
                            ended = true;
                            broken = true;
                        }
                        Poll::Ready(None) => {
                            *body = None;
                            ended = true;
                            last_chunk(out);
                        }
                        Poll::Pending => break,
                    }
                }
                if at == out.len() && big.is_empty() {
                    if ended {
                        return Poll::Ready(Ok(()));
                    }
                    // Nothing to write: the body is pending, and will wake us. A client that
                    // leaves meanwhile ends the response (a quiet backend would otherwise
                    // hold the connection, its slot and the backend for ever).
                    return watch_client(&mut lock(io), limit, cx)
                        .map(|()| Err(io::Error::from(io::ErrorKind::ConnectionAborted)));
                }
                let mut io = lock(io);
                let n = if big.is_empty() {
                    ready!(Pin::new(&mut io.stream).poll_write(cx, &out[at..]))?
                } else {
                    let bufs = [io::IoSlice::new(&out[at..]), io::IoSlice::new(&big)];
                    ready!(Pin::new(&mut io.stream).poll_write_vectored(cx, &bufs))?
                };
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                let from_out = n.min(out.len() - at);
                at += from_out;
                big.advance(n - from_out);
                if at == out.len() {
                    out.clear();
                    at = 0;
                }
                if n > from_out && big.is_empty() {
                    // The large piece went out: its chunk ends here.
                    if chunked {
                        out.extend_from_slice(b"\r\n");
                    }
                    if std::mem::take(&mut last_chunk_after_big) {
                        last_chunk(out);
                    }
                }
            }
        })
        .await?;
        Ok(!broken)
    }

    /// Answers a refused head, then closes.
    async fn refuse(&mut self, error: &ProxyError) {
        tracing::debug!("{error}");
        let response = Answer::of(error).to_bytes(&request_id::generate());
        self.out.clear();
        self.out.extend_from_slice(&response);
        let _ = self.flush().await;
        self.close().await;
    }

    /// Shuts the sending side down so the client reads a clean end.
    async fn close(&mut self) {
        let io = &self.io;
        let _ = poll_fn(|cx| Pin::new(&mut lock(io).stream).poll_shutdown(cx)).await;
    }

    fn into_io(self) -> Option<Io> {
        Arc::try_unwrap(self.io).ok().map(|m| m.into_inner().unwrap_or_else(std::sync::PoisonError::into_inner))
    }

    fn into_parked(self) -> Ended {
        match self.into_io() {
            Some(io) if io.buf.is_empty() => Ended::Parked(io.stream),
            _ => Ended::Closed,
        }
    }

    fn into_http2(self) -> Ended {
        match self.into_io() {
            Some(io) => Ended::Http2(Prefixed { prefix: io.buf.freeze(), io: io.stream }),
            None => Ended::Closed,
        }
    }

    fn into_prefixed(self) -> Option<Prefixed<TcpStream>> {
        self.into_io().map(|io| Prefixed { prefix: io.buf.freeze(), io: io.stream })
    }
}

/// While the request path or the response body is busy, reads what the client sends
/// (kept: a pipelined request) up to `limit` bytes, to notice it leaving: `Ready` if it
/// closed or failed with nothing left to serve. An end behind pipelined requests only
/// stops the reading; they are served first.
fn watch_client(io: &mut Io, limit: usize, cx: &mut Context<'_>) -> Poll<()> {
    while io.body.is_done() && io.buf.len() < limit {
        match io.poll_fill(cx) {
            Poll::Ready(Ok(0)) if !io.buf.is_empty() => break,
            Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => return Poll::Ready(()),
            Poll::Ready(Ok(_)) => {}
            Poll::Pending => break,
        }
    }
    Poll::Pending
}

/// Gives a parsed request its body reader (which needs the shared connection).
fn attach_body(req: &mut Request<ClientBody>, io: &SharedIo) {
    if !lock(io).body.is_done() {
        *req.body_mut() = ClientBody::Http1(IncomingBody { io: Some(SharedIoHandle(io.clone())) });
    }
}
