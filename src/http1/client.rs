//! The client side of HTTP/1.1: one keep-alive connection to a backend, driven from the
//! request's own task:
//! the request head is written, then the request body is sent while the response head and
//! then the response body are read as the client takes them. The two directions flow at
//! once (SPEC 3): whatever waits on one side, the other keeps moving, so a backend that
//! streams its answer while the upload still arrives is never stalled. There is no connection task and no channel between the two
//! sides, so a request never changes task on its way to the backend and back (the
//! profile's largest user-space cost with hyper's client).

use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::task::{Context, Poll, Waker, ready};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http::{StatusCode, Version};
use http_body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::timer::LazyTimer;
use tokio_rustls::client::TlsStream;

use super::{self as http1, BoxError, Decoded, Decoder, Malformed, RawFields};

/// The most headers a backend's response head may have (hyper's default too).
const MAX_HEADERS: usize = 100;
/// The largest response head accepted from a backend.
const MAX_HEAD_BYTES: usize = 64 * 1024;
/// How much room each read asks for.
const READ_SIZE: usize = 16 * 1024;

/// The byte stream to a backend: plain TCP, or TLS for an `https://` backend.
pub enum BackendIo {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl AsyncRead for BackendIo {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            BackendIo::Plain(s) => Pin::new(s).poll_read(cx, buf),
            BackendIo::Tls(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for BackendIo {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            BackendIo::Plain(s) => Pin::new(s).poll_write(cx, buf),
            BackendIo::Tls(s) => Pin::new(s).poll_write(cx, buf),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            BackendIo::Plain(s) => Pin::new(s).poll_flush(cx),
            BackendIo::Tls(s) => Pin::new(s).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            BackendIo::Plain(s) => Pin::new(s).poll_shutdown(cx),
            BackendIo::Tls(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// A backend's response head, with its fields left as received.
#[derive(Debug)]
pub struct Head {
    pub status: StatusCode,
    pub version: Version,
    pub fields: RawFields,
    /// How the body after it is delimited.
    pub framing: Framing,
    /// `Connection` lists a field other than `close` and `keep-alive`, which must not be
    /// forwarded either: only a `HeaderMap` pass removes it.
    pub names_fields: bool,
}

/// A connection to one backend, idle in its pool or checked out for one request.
pub struct Conn(Box<ConnState>);

/// A [`Conn`]'s state, on the heap: a connection moves in and out of its pool and through
/// the request path's steps on every request, as one pointer rather than 120 bytes.
pub struct ConnState {
    io: BackendIo,
    /// Bytes read from the backend and not consumed yet.
    buf: BytesMut,
    /// The head of the request being sent; kept between requests to reuse its memory.
    head: Vec<u8>,
    /// True when the connection served an earlier request: a failure before any response
    /// byte may then just mean the backend closed it while it sat idle.
    pub reused: bool,
    /// The last response allows another request on this connection.
    keep_alive: bool,
    /// The request body still being sent; `None` once it is all out. A connection whose
    /// upload did not finish cannot carry another request.
    /// Boxed: only requests with a body have one, and a connection is moved in and out of
    /// its pool on every request.
    upload: Option<Box<Upload>>,
    /// An interim (1xx) response arrived since the request was sent: a response began.
    interim: bool,
    /// The response-head timer, made on first use (see `read_head_within`).
    timer: Option<LazyTimer>,
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn").field("reused", &self.reused).field("buffered", &self.buf.len()).finish_non_exhaustive()
    }
}

/// Why sending a request failed, by how far it got.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// Writing the head failed: the body was not touched and can be sent elsewhere.
    #[error("writing the request head: {0}")]
    Head(io::Error),
    /// The client's body failed (it broke off, or grew past the limit).
    #[error("{0}")]
    ClientBody(BoxError),
}

/// What is left to send of a request body: the pieces of the frame being written
/// (chunk-size line, data, CRLF), and whether the body has ended.
#[derive(Debug)]
struct Upload {
    framing: RequestFraming,
    pieces: [Bytes; 3],
    ended: bool,
    /// Writing to the backend failed (it closed, or reset): nothing more is sent, and
    /// its response, if one comes, is still read.
    dead: bool,
}

/// A request without a body (health checks).
pub type NoBody = http_body_util::Empty<Bytes>;

/// The client's body as the response body carries it while it is still being sent.
pub type PendingUpload = http_body_util::combinators::UnsyncBoxBody<Bytes, BoxError>;

/// Why reading a response failed.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("the backend closed the connection before sending a response")]
    Closed,
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("malformed response: {0}")]
    Malformed(&'static str),
    /// The client's body failed while the response head was awaited.
    #[error("{0}")]
    ClientBody(BoxError),
}

impl ReadError {
    /// No response byte arrived: the backend closed or reset the connection first.
    pub fn before_any_byte(&self, read_any: bool) -> bool {
        match self {
            ReadError::Closed => !read_any,
            ReadError::Io(e) => {
                !read_any
                    && matches!(
                        e.kind(),
                        io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionAborted
                    )
            }
            ReadError::Malformed(_) | ReadError::ClientBody(_) => false,
        }
    }
}

/// How a response body is delimited (RFC 9112 section 6.3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Framing {
    /// No body: HEAD, 204, 304.
    Empty,
    Length(u64),
    Chunked,
    /// Until the backend closes; the connection is not reused.
    UntilClose,
    /// 101: what follows is the upgraded protocol.
    Upgrade,
}

/// How the request body is framed towards the backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestFraming {
    /// Nothing after the head.
    Empty,
    /// `Content-Length` with this value; the body is copied as it comes.
    Length(u64),
    /// `Transfer-Encoding: chunked` was written.
    Chunked,
}

impl std::ops::Deref for Conn {
    type Target = ConnState;
    fn deref(&self) -> &ConnState {
        &self.0
    }
}

impl std::ops::DerefMut for Conn {
    fn deref_mut(&mut self) -> &mut ConnState {
        &mut self.0
    }
}

impl Conn {
    pub fn new(io: BackendIo) -> Conn {
        Conn(Box::new(ConnState {
            io,
            buf: BytesMut::new(),
            head: Vec::new(),
            reused: false,
            keep_alive: true,
            upload: None,
            interim: false,
            timer: None,
        }))
    }

    /// The response body that follows a head with `framing`; it owns the connection, and
    /// `upload`, the rest of the request body when [`ConnState::uploading`], which it sends as
    /// it is read.
    pub fn into_body(self, framing: Framing, upload: Option<PendingUpload>) -> ConnBody {
        let state = match framing {
            Framing::Empty | Framing::Upgrade | Framing::Length(0) => Decoder::Done,
            Framing::Length(n) => Decoder::Length(n),
            Framing::Chunked => Decoder::ChunkSize,
            Framing::UntilClose => Decoder::UntilClose,
        };
        ConnBody { upload: upload.filter(|_| self.uploading()), conn: Some(self), state }
    }
}

impl ConnState {
    /// Whether an idle connection can take a request: the backend has neither closed it
    /// nor sent anything unasked. Never waits.
    pub fn is_usable_idle(&mut self) -> bool {
        if !self.buf.is_empty() || !self.keep_alive {
            return false;
        }
        let mut cx = Context::from_waker(Waker::noop());
        let mut byte = [0u8; 1];
        let mut probe = ReadBuf::new(&mut byte);
        Pin::new(&mut self.io).poll_read(&mut cx, &mut probe).is_pending()
    }

    /// The buffer the next request head is written into (empty).
    pub fn head_buf(&mut self) -> &mut Vec<u8> {
        self.head.clear();
        &mut self.head
    }

    /// Writes the head in [`Conn::head_buf`], then streams `body` with `framing` until it
    /// is all out or the backend starts answering (a streaming echo, or a 413 or 401 to an
    /// upload): the rest then goes out while the response is read
    /// ([`Conn::read_head_within`], [`ConnBody`]).
    pub async fn send<B>(&mut self, body: &mut B, framing: RequestFraming) -> Result<(), SendError>
    where
        B: Body<Data = Bytes> + Unpin,
        B::Error: Into<BoxError>,
    {
        self.interim = false;
        self.io.write_all(&self.head).await.map_err(SendError::Head)?;
        if framing == RequestFraming::Empty {
            self.upload = None;
            // A failed flush shows as a failed response read.
            let _ = self.io.flush().await;
            return Ok(());
        }
        self.upload = Some(Box::new(Upload { framing, pieces: Default::default(), ended: false, dead: false }));
        let mut read_closed = false;
        std::future::poll_fn(|cx| {
            if self.poll_upload(cx, body).map_err(SendError::ClientBody)?.is_ready() {
                return Poll::Ready(Ok(()));
            }
            if !read_closed {
                match self.poll_fill(cx) {
                    Poll::Ready(Ok(0)) => read_closed = true,
                    // An answer began: it is read while the upload goes on.
                    Poll::Ready(Ok(_)) | Poll::Ready(Err(_)) => return Poll::Ready(Ok(())),
                    Poll::Pending => {}
                }
            }
            Poll::Pending
        })
        .await?;
        if self.upload.is_none() {
            // The whole request is out; a failed flush shows as a failed response read.
            let _ = self.io.flush().await;
        }
        Ok(())
    }

    /// Sends what it can of the request body: `Ready(Ok)` when nothing is left to send
    /// (all of it is out, or the backend stopped taking it), `Pending` while the body or
    /// the socket must be waited for.
    /// An error is the client body's own.
    fn poll_upload<B>(&mut self, cx: &mut Context<'_>, body: &mut B) -> Poll<Result<(), BoxError>>
    where
        B: Body<Data = Bytes> + Unpin,
        B::Error: Into<BoxError>,
    {
        let Some(up) = self.upload.as_mut() else { return Poll::Ready(Ok(())) };
        loop {
            if up.dead {
                return Poll::Ready(Ok(()));
            }
            if let Some(piece) = up.pieces.iter_mut().find(|p| !p.is_empty()) {
                match Pin::new(&mut self.io).poll_write(cx, piece) {
                    Poll::Ready(Ok(n)) if n > 0 => piece.advance(n),
                    Poll::Ready(_) => up.dead = true,
                    Poll::Pending => return Poll::Pending,
                }
                continue;
            }
            if up.ended {
                if ready!(Pin::new(&mut self.io).poll_flush(cx)).is_err() {
                    up.dead = true;
                    continue;
                }
                self.upload = None;
                return Poll::Ready(Ok(()));
            }
            match Pin::new(&mut *body).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    let Ok(data) = frame.into_data() else { continue };
                    if data.is_empty() {
                        continue;
                    }
                    if up.framing == RequestFraming::Chunked {
                        up.pieces = [
                            Bytes::copy_from_slice(http1::chunk_size_line(data.len()).as_bytes()),
                            data,
                            Bytes::from_static(b"\r\n"),
                        ];
                    } else {
                        up.pieces[1] = data;
                    }
                }
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(e.into())),
                Poll::Ready(None) => {
                    up.ended = true;
                    if up.framing == RequestFraming::Chunked {
                        up.pieces[2] = Bytes::from_static(b"0\r\n\r\n");
                    }
                }
                Poll::Pending => {
                    // Nothing more to write for now: what was written must reach the
                    // backend (TLS keeps records until flushed).
                    if let Poll::Ready(Err(_)) = Pin::new(&mut self.io).poll_flush(cx) {
                        up.dead = true;
                        continue;
                    }
                    return Poll::Pending;
                }
            }
        }
    }

    /// Whether part of the request body is still to be sent.
    pub fn uploading(&self) -> bool {
        self.upload.is_some()
    }

    /// Whether any byte of a response has arrived since the request was sent.
    pub fn has_read(&self) -> bool {
        !self.buf.is_empty() || self.interim
    }

    /// Reads the response head, skipping interim 1xx responses other than 101.
    /// `head_request`: the request was HEAD, so no body follows whatever the head says.
    pub async fn read_head(&mut self, head_request: bool) -> Result<Head, ReadError> {
        std::future::poll_fn(|cx| self.poll_head(cx, head_request)).await
    }

    /// [`Conn::read_head`] within `after`, sending what is left of `body` meanwhile;
    /// `None` when the time ran out first.
    ///
    /// The connection keeps one [`LazyTimer`] for its whole life.
    pub async fn read_head_within<B>(
        &mut self,
        after: Duration,
        head_request: bool,
        body: &mut B,
    ) -> Option<Result<Head, ReadError>>
    where
        B: Body<Data = Bytes> + Unpin,
        B::Error: Into<BoxError>,
    {
        let deadline = Instant::now() + after;
        std::future::poll_fn(|cx| {
            if self.upload.is_some()
                && let Poll::Ready(Err(e)) = self.poll_upload(cx, body)
            {
                return Poll::Ready(Some(Err(ReadError::ClientBody(e))));
            }
            if let Poll::Ready(r) = self.poll_head(cx, head_request) {
                return Poll::Ready(Some(r));
            }
            let timer = self.timer.get_or_insert_with(|| LazyTimer::new(deadline));
            if timer.expired(deadline, cx) { Poll::Ready(None) } else { Poll::Pending }
        })
        .await
    }

    fn poll_head(&mut self, cx: &mut Context<'_>, head_request: bool) -> Poll<Result<Head, ReadError>> {
        loop {
            if let Some(parsed) = self.parse_head(head_request)? {
                return Poll::Ready(Ok(parsed));
            }
            if self.buf.len() > MAX_HEAD_BYTES {
                return Poll::Ready(Err(ReadError::Malformed("response head too large")));
            }
            let n = ready!(self.poll_fill(cx))?;
            if n == 0 {
                return Poll::Ready(Err(if self.buf.is_empty() {
                    ReadError::Closed
                } else {
                    ReadError::Io(io::ErrorKind::UnexpectedEof.into())
                }));
            }
        }
    }

    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        http1::poll_fill(&mut self.io, &mut self.buf, READ_SIZE, cx)
    }

    /// A complete head at the start of the buffer, consumed; `None` if more is needed.
    /// Interim (1xx) heads other than 101 are consumed and skipped.
    fn parse_head(&mut self, head_request: bool) -> Result<Option<Head>, ReadError> {
        loop {
            // Empty lines before a status line are skipped (as httparse would), so that the
            // head starts at the status line and the fields right after its line end.
            let blank = http1::blank_lines(&self.buf);
            self.buf.advance(blank);
            let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
            let mut res = httparse::Response::new(&mut []);
            let len = match httparse::ParserConfig::default()
                .parse_response_with_uninit_headers(&mut res, &self.buf, &mut slots)
            {
                Ok(httparse::Status::Complete(len)) => len,
                Ok(httparse::Status::Partial) => return Ok(None),
                Err(httparse::Error::TooManyHeaders) => return Err(ReadError::Malformed("too many headers")),
                Err(_) => return Err(ReadError::Malformed("invalid response head")),
            };
            let code = res.code.unwrap_or(0);
            let status = StatusCode::from_u16(code).map_err(|_| ReadError::Malformed("invalid status code"))?;
            if status.is_informational() && status != StatusCode::SWITCHING_PROTOCOLS {
                let _ = self.buf.split_to(len);
                self.interim = true;
                continue;
            }
            let version = if res.version == Some(0) { Version::HTTP_10 } else { Version::HTTP_11 };
            let fields = &*res.headers;
            let framing = framing(status, version, fields, head_request)?;
            let (close, names_fields) = connection_says(version, fields);
            let transfer_coded = fields.iter().any(|f| f.name.eq_ignore_ascii_case("transfer-encoding"));
            let count = fields.len();
            self.keep_alive = !close && framing != Framing::UntilClose;
            // The fields start after the status line, which httparse found to end in LF.
            let fields_at = self.buf.iter().position(|b| *b == b'\n').map_or(len, |i| i + 1);
            let head = self.buf.split_to(len).freeze();
            let fields = RawFields::new(head.slice(fields_at..), count, transfer_coded);
            return Ok(Some(Head { status, version, fields, framing, names_fields }));
        }
    }
}

/// An upgraded connection is a plain byte stream: what was read past the 101 head first.
impl AsyncRead for Conn {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, out: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self.get_mut().0;
        http1::poll_read_prefixed(&mut this.buf, &mut this.io, cx, out)
    }
}

impl AsyncWrite for Conn {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// What the `Connection` fields say: whether the backend closes after this response, and
/// whether they name any field other than `close` and `keep-alive`.
fn connection_says(version: Version, fields: &[httparse::Header<'_>]) -> (bool, bool) {
    let (mut close, mut names_fields) = (version == Version::HTTP_10, false);
    for f in fields.iter().filter(|f| f.name.eq_ignore_ascii_case("connection")) {
        for token in http1::tokens(f.value) {
            if token.eq_ignore_ascii_case(b"close") {
                close = true;
            } else if token.eq_ignore_ascii_case(b"keep-alive") {
                close &= version != Version::HTTP_10;
            } else {
                names_fields = true;
            }
        }
    }
    (close, names_fields)
}

/// How the body after this head is delimited; conflicting lengths are refused.
fn framing(
    status: StatusCode,
    version: Version,
    fields: &[httparse::Header<'_>],
    head_request: bool,
) -> Result<Framing, ReadError> {
    if status == StatusCode::SWITCHING_PROTOCOLS {
        return Ok(Framing::Upgrade);
    }
    if head_request || status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED {
        return Ok(Framing::Empty);
    }
    let named = |name: &'static str| fields.iter().filter(move |f| f.name.eq_ignore_ascii_case(name));
    if let Some(last) = named("transfer-encoding").next_back() {
        if version == Version::HTTP_10 {
            return Ok(Framing::UntilClose);
        }
        // Chunked only when it is the final coding; otherwise the body runs to the close.
        let chunked = http1::tokens(last.value).next_back().is_some_and(|c| c.eq_ignore_ascii_case(b"chunked"));
        return Ok(if chunked { Framing::Chunked } else { Framing::UntilClose });
    }
    let mut length: Option<u64> = None;
    for f in named("content-length") {
        for part in f.value.split(|b| *b == b',') {
            let part = part.trim_ascii();
            let n = std::str::from_utf8(part)
                .ok()
                .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|s| s.parse::<u64>().ok())
                .ok_or(ReadError::Malformed("invalid Content-Length"))?;
            if length.is_some_and(|l| l != n) {
                return Err(ReadError::Malformed("conflicting Content-Length"));
            }
            length = Some(n);
        }
    }
    Ok(length.map_or(Framing::UntilClose, Framing::Length))
}

/// A backend's response body, read from its connection as the client takes it.
#[derive(Debug)]
pub struct ConnBody {
    /// `None` once the body failed: the connection is closed with it.
    conn: Option<Conn>,
    state: Decoder,
    /// The client's body, while part of it is still to be sent.
    upload: Option<PendingUpload>,
}

/// The backend's body broke off or was malformed.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("the backend closed the connection before the end of the body")]
    Incomplete,
    #[error("malformed chunked body")]
    Malformed,
    #[error("{0}")]
    Io(#[from] io::Error),
    /// The client's request body broke off (or grew past the limit) while the response
    /// streamed: the exchange cannot complete.
    #[error("{0}")]
    ClientBody(BoxError),
}

impl ConnBody {
    /// The connection, when the body ended cleanly and it can serve another request.
    pub fn take_reusable(&mut self) -> Option<Conn> {
        if !self.state.is_done() {
            return None;
        }
        let mut conn = self.conn.take()?;
        if !conn.keep_alive || !conn.buf.is_empty() || conn.uploading() {
            return None;
        }
        conn.reused = true;
        Some(conn)
    }

    fn fail(&mut self, e: BodyError) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        self.conn = None;
        self.upload = None;
        self.state = Decoder::Done;
        Poll::Ready(Some(Err(e)))
    }
}

impl Body for ConnBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.get_mut();
        loop {
            let Some(conn) = this.conn.as_mut() else { return Poll::Ready(None) };
            if let Some(upload) = this.upload.as_mut() {
                match conn.poll_upload(cx, upload) {
                    Poll::Ready(Ok(())) => this.upload = None,
                    Poll::Ready(Err(e)) => return this.fail(BodyError::ClientBody(e)),
                    Poll::Pending => {}
                }
            }
            match this.state.decode(&mut conn.buf) {
                Ok(Decoded::Data(data)) => return Poll::Ready(Some(Ok(Frame::data(data)))),
                Ok(Decoded::End) => return Poll::Ready(None),
                Ok(Decoded::More) => {}
                Err(Malformed) => return this.fail(BodyError::Malformed),
            }
            match ready!(conn.poll_fill(cx)) {
                Ok(0) if this.state == Decoder::UntilClose => {
                    this.state = Decoder::Done;
                    conn.keep_alive = false;
                    return Poll::Ready(None);
                }
                Ok(0) => return this.fail(BodyError::Incomplete),
                Ok(_) => {}
                Err(e) => return this.fail(BodyError::Io(e)),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.state.is_done()
    }

    fn size_hint(&self) -> SizeHint {
        self.state.remaining().map_or_else(SizeHint::default, SizeHint::with_exact)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn framing_follows_rfc_9112() {
        let f = |name, value: &'static str| httparse::Header { name, value: value.as_bytes() };
        let (ok, v11) = (StatusCode::OK, Version::HTTP_11);
        assert_eq!(framing(ok, v11, &[], false).unwrap(), Framing::UntilClose);
        assert_eq!(framing(ok, v11, &[], true).unwrap(), Framing::Empty);
        let five = [f("Content-Length", "5")];
        assert_eq!(framing(ok, v11, &five, false).unwrap(), Framing::Length(5));
        assert_eq!(framing(StatusCode::NO_CONTENT, v11, &five, false).unwrap(), Framing::Empty);
        let two = [f("content-length", "5"), f("content-length", "6")];
        assert!(framing(ok, v11, &two, false).is_err());
        let coded = [f("content-length", "5"), f("transfer-encoding", "gzip, chunked")];
        assert_eq!(framing(ok, v11, &coded, false).unwrap(), Framing::Chunked);
        let gzip_last = [f("transfer-encoding", "chunked"), f("transfer-encoding", "gzip")];
        assert_eq!(framing(ok, v11, &gzip_last, false).unwrap(), Framing::UntilClose);
        assert_eq!(connection_says(v11, &coded), (false, false));
        assert_eq!(connection_says(v11, &[f("Connection", "Close")]), (true, false));
        assert_eq!(connection_says(Version::HTTP_10, &[]), (true, false));
        assert_eq!(connection_says(Version::HTTP_10, &[f("connection", "keep-alive")]), (false, false));
        assert_eq!(connection_says(v11, &[f("connection", "keep-alive, X-Private")]), (false, true));
    }
}
