//! The server side of HTTP/1.1 on a client connection: the connection's shared state
//! ([`Io`]), parsing a request head from it ([`parse_head`]: framing checks, the versions
//! and raw targets httparse refuses), the request body read from it ([`IncomingBody`]),
//! and where the connection goes on an upgrade. The per-connection loop that reads heads,
//! runs the request path and writes responses is `server::h1`.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, ready};

use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::oneshot;

use std::mem::MaybeUninit;

use http::{Method, Request, Uri, Version, header};

use super::head_check::{self, Body as Framing, Reject};
use super::{BoxError, Decoded, Decoder, FieldSpan, Malformed, RawTarget};

/// How much room each read asks for: heads are small; bodies come in larger reads.
pub const READ_SIZE: usize = 8 * 1024;
const BODY_READ_SIZE: usize = 64 * 1024;
pub const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";

/// A stream some of whose first bytes were already read: those come first.
#[derive(Debug)]
pub struct Prefixed<T> {
    pub prefix: Bytes,
    pub io: T,
}

impl<T: AsyncRead + Unpin> AsyncRead for Prefixed<T> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, out: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        super::poll_read_prefixed(&mut this.prefix, &mut this.io, cx, out)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Prefixed<T> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// The client connection as both the session and the request body being read use it.
/// Locked only inside `poll` functions, never across an await.
pub struct Io {
    pub stream: TcpStream,
    /// Bytes read from the client and not consumed yet.
    pub buf: BytesMut,
    /// The current request's body: what is left of it.
    pub body: Decoder,
    /// The body broke (the client closed, or sent a malformed chunk): the connection ends.
    pub body_broken: bool,
    /// How much of a `100 Continue` is still to be written before the body is read.
    pub continue_left: usize,
}

impl Io {
    pub fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        self.poll_fill_by(cx, READ_SIZE)
    }

    fn poll_fill_by(&mut self, cx: &mut Context<'_>, room: usize) -> Poll<io::Result<usize>> {
        super::poll_fill(&mut self.stream, &mut self.buf, room, cx)
    }

    /// Writes a pending `100 Continue`; ready when none is left.
    fn poll_continue(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.continue_left > 0 {
            let from = CONTINUE.len() - self.continue_left;
            match ready!(Pin::new(&mut self.stream).poll_write(cx, &CONTINUE[from..]))? {
                0 => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                n => self.continue_left -= n,
            }
        }
        Poll::Ready(Ok(()))
    }
}

pub type SharedIo = Arc<Mutex<Io>>;

pub fn lock(io: &SharedIo) -> MutexGuard<'_, Io> {
    io.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A request body read from the client connection as the request path takes it.
#[derive(Debug, Default)]
pub struct IncomingBody {
    /// `None` for a request without a body.
    pub io: Option<SharedIoHandle>,
}

/// `Arc<Mutex<Io>>` with a `Debug` that says nothing of the socket.
pub struct SharedIoHandle(pub SharedIo);

impl std::fmt::Debug for SharedIoHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SharedIo")
    }
}

/// The client's body broke off: it closed the connection or broke the chunked framing.
#[derive(Debug, thiserror::Error)]
pub enum IncomingBodyError {
    #[error("the client closed the connection before the end of the body")]
    Incomplete,
    #[error(transparent)]
    Malformed(#[from] Malformed),
    #[error(transparent)]
    Io(#[from] io::Error),
}

impl Body for IncomingBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let Some(shared) = &self.io else { return Poll::Ready(None) };
        let mut io = lock(&shared.0);
        let fail = |io: &mut Io, e: IncomingBodyError| {
            io.body_broken = true;
            io.body = Decoder::Done;
            Poll::Ready(Some(Err(Box::new(e) as BoxError)))
        };
        if let Err(e) = ready!(io.poll_continue(cx)) {
            return fail(&mut io, e.into());
        }
        loop {
            let io = &mut *io;
            match io.body.decode(&mut io.buf) {
                Ok(Decoded::Data(data)) => return Poll::Ready(Some(Ok(Frame::data(data)))),
                Ok(Decoded::End) => return Poll::Ready(None),
                Ok(Decoded::More) => {}
                Err(e) => return fail(io, e.into()),
            }
            match ready!(io.poll_fill_by(cx, BODY_READ_SIZE)) {
                Ok(0) => return fail(io, IncomingBodyError::Incomplete),
                Ok(_) => {}
                Err(e) => return fail(io, e.into()),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.io.as_ref().is_none_or(|io| lock(&io.0).body.is_done())
    }

    fn size_hint(&self) -> SizeHint {
        match &self.io {
            None => SizeHint::with_exact(0),
            Some(io) => lock(&io.0).body.remaining().map_or_else(SizeHint::default, SizeHint::with_exact),
        }
    }
}

/// Where the client connection goes once a `101` has been written: set on a request that
/// asks for an upgrade, taken by the request path when the backend agrees.
#[derive(Clone, Debug)]
pub struct PendingUpgrade(pub Arc<Mutex<Option<oneshot::Receiver<Prefixed<TcpStream>>>>>);

impl PendingUpgrade {
    pub fn take(&self) -> Option<oneshot::Receiver<Prefixed<TcpStream>>> {
        self.0.lock().ok()?.take()
    }
}

/// What the session knows of the request in progress, beyond what the request path gets.
pub struct Exchange {
    pub method: Method,
    pub version: Version,
    /// The client asked to keep the connection (or did not ask to close it, on 1.1).
    pub keep_alive: bool,
    /// Where the connection goes if the backend agrees to an upgrade the client asked for.
    pub upgrade: Option<oneshot::Sender<Prefixed<TcpStream>>>,
}

/// Parses the request head at the front of `io.buf` once it is complete, into `parsed`
/// (true once there); `scanned` is how far earlier calls looked for its end.
/// The request is made with `body()` as its body (so it is built in its final type), and
/// written where it is kept: returned by value, its 300-odd bytes would be copied at each
/// step out to the session.
pub fn parse_head<B>(
    io: &mut Io,
    scanned: &mut usize,
    max: usize,
    body: impl Fn() -> B,
    parsed: &mut Option<(Request<B>, Exchange)>,
) -> Result<bool, Reject> {
    let Some(end) = head_check::head_end(&io.buf, *scanned) else {
        if io.buf.len() > max {
            return Err(head_check::oversized(&io.buf, max));
        }
        *scanned = io.buf.len();
        return Ok(false);
    };
    if end > max {
        return Err(head_check::oversized(&io.buf[..end], max));
    }
    head_check::check_line_ends(&io.buf[..end])?;
    *scanned = 0;
    // What httparse refuses but clients send is mended in place and parsed again (a cold
    // path): a later HTTP/1 minor version, raw bytes above 0x7F in the target.
    let mut raw_target = None;
    for _ in 0..3 {
        match parse_at(io, end, &mut raw_target, &body, parsed) {
            Err(Unparsed::Version) => head_check::settle_version(&mut io.buf[..end])?,
            Err(Unparsed::Token) if raw_target.is_none() => {
                raw_target = Some(mask_raw_target(&mut io.buf[..end]).ok_or(MALFORMED)?);
            }
            Err(Unparsed::Token) => return Err(MALFORMED),
            Err(Unparsed::Refused(reject)) => return Err(reject),
            Ok(()) => return Ok(true),
        }
    }
    Err(MALFORMED)
}

const MALFORMED: Reject = Reject::BadRequest("malformed request head");

/// Why [`parse_at`] did not make a request of a head.
enum Unparsed {
    /// httparse refused the version: maybe one to serve as HTTP/1.1.
    Version,
    /// httparse refused a byte: maybe one above 0x7F in the target.
    Token,
    Refused(Reject),
}

impl From<Reject> for Unparsed {
    fn from(r: Reject) -> Self {
        Unparsed::Refused(r)
    }
}

/// Replaces the bytes above 0x7F in the request line's target with `x`, so that httparse
/// reads it, and returns the target as sent. `None` if the target has no such byte.
fn mask_raw_target(head: &mut [u8]) -> Option<Bytes> {
    let line_end = head.iter().position(|&b| b == b'\r')?;
    let line = &mut head[..line_end];
    let from = line.iter().position(|&b| b == b' ')? + 1;
    let to = line.iter().rposition(|&b| b == b' ')?;
    let target = line.get_mut(from..to)?;
    if target.is_ascii() {
        return None;
    }
    let raw = Bytes::copy_from_slice(target);
    target.iter_mut().filter(|b| !b.is_ascii()).for_each(|b| *b = b'x');
    Some(raw)
}

/// Parses the complete head of `end` bytes at the front of `io.buf` into a request in
/// `parsed`; the target is `raw_target` when one was masked.
#[inline]
fn parse_at<B>(
    io: &mut Io,
    end: usize,
    raw_target: &mut Option<Bytes>,
    body: &impl Fn() -> B,
    parsed: &mut Option<(Request<B>, Exchange)>,
) -> Result<(), Unparsed> {
    let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; head_check::MAX_HEADERS];
    let mut req = httparse::Request::new(&mut []);
    match req.parse_with_uninit_headers(&io.buf[..end], &mut slots) {
        Ok(httparse::Status::Complete(_)) => {}
        Err(httparse::Error::TooManyHeaders) => return Err(Reject::TooLarge.into()),
        Err(httparse::Error::Version) => return Err(Unparsed::Version),
        Err(httparse::Error::Token) => return Err(Unparsed::Token),
        Ok(httparse::Status::Partial) | Err(_) => return Err(MALFORMED.into()),
    }
    let (framing, upgrade) = head_check::framing_of(&req)?;
    let method = Method::from_bytes(req.method.unwrap_or("").as_bytes()).map_err(|_| MALFORMED)?;
    let version = if req.version == Some(0) { Version::HTTP_10 } else { Version::HTTP_11 };
    let base = io.buf.as_ptr();
    let path = req.path.unwrap_or("");
    let path_at = path.as_ptr() as usize - base as usize;
    let path_span = path_at..path_at + path.len();
    let count = req.headers.len();
    let mut few: [FieldSpan; 32] = [(0, 0, 0, 0); 32];
    let mut many = Vec::new();
    let spans: &mut [FieldSpan] = if count <= few.len() {
        &mut few[..count]
    } else {
        many.resize(count, (0, 0, 0, 0));
        &mut many
    };
    super::field_spans(base, req.headers, spans);
    let head = io.buf.split_to(end).freeze();
    let target = match raw_target {
        None => head.slice(path_span),
        Some(raw) => Bytes::from(super::percent_encode_non_ascii(raw)),
    };
    let uri = Uri::from_maybe_shared(target).map_err(|_| Reject::BadRequest("invalid request target"))?;
    let headers = super::header_map(&head, spans, 0).ok_or(Reject::BadRequest("invalid header field"))?;

    let (mut close, mut keep) = (false, false);
    for token in super::values(&headers, &header::CONNECTION).flat_map(|v| super::tokens(v.as_bytes())) {
        close |= token.eq_ignore_ascii_case(b"close");
        keep |= token.eq_ignore_ascii_case(b"keep-alive");
    }
    let keep_alive = !close && (version == Version::HTTP_11 || keep);
    io.body = match framing {
        Framing::Length(n) => Decoder::Length(n),
        Framing::Chunked => Decoder::ChunkSize,
        Framing::Upgrade => Decoder::Done,
    };
    io.body_broken = false;
    let has_body = !io.body.is_done();
    io.continue_left = 0;
    if has_body
        && version == Version::HTTP_11
        && super::value(&headers, &header::EXPECT).is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"))
    {
        io.continue_left = CONTINUE.len();
    }
    let mut request = Request::new(body());
    let mut pending = None;
    if upgrade && method != Method::CONNECT {
        let (tx, rx) = oneshot::channel();
        request.extensions_mut().insert(PendingUpgrade(Arc::new(Mutex::new(Some(rx)))));
        pending = Some(tx);
    }
    *request.method_mut() = method.clone();
    *request.uri_mut() = uri;
    *request.version_mut() = version;
    *request.headers_mut() = headers;
    if let Some(raw) = raw_target.take() {
        request.extensions_mut().insert(RawTarget(raw));
    }
    let exchange = Exchange { method, version, keep_alive, upgrade: pending };
    *parsed = Some((request, exchange));
    Ok(())
}
