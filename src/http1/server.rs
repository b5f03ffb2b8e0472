//! The server side of HTTP/1.1 on a client connection, as far as the request path needs
//! it: the connection's shared state ([`Io`]), the request body read from it
//! ([`IncomingBody`]), and where the connection goes on an upgrade. The per-connection
//! loop that reads heads and writes responses is `server::h1`.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, ready};

use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::oneshot;

use super::{BoxError, Decoded, Decoder, Malformed};

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
