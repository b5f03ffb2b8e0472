//! The socket as hyper sees it, with the timeouts hyper does not give: `client_header`
//! (a head must arrive in full within it, else 408 and close), `idle` (a keep-alive
//! connection with no request in progress is closed after it), `max_header_bytes`
//! (431 with our body rather than a bare one), and ambiguous framing (400 before hyper
//! sees the head; see `head_check`).
//!
//! The phase is derived from [`ConnActivity`]: busy while a request or tunnel runs; when
//! it stops being busy the connection is idle until a byte arrives, then it is reading a
//! head until the request path picks the request up.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http::StatusCode;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

use super::ConnActivity;
use super::head_check;
use crate::proxy::{error::raw_response, request_id};

/// The HTTP/2 connection preface starts with this; HTTP/1 has no `PRI` method in use.
const H2_PREFACE_START: &[u8] = b"PRI * HTTP/2";

#[derive(Clone, Copy, Debug)]
pub struct ConnLimits {
    pub client_header: Duration,
    pub idle: Duration,
    pub max_header_bytes: usize,
}

#[derive(Debug)]
enum Phase {
    /// Waiting for (the rest of) a request head; `bytes` arrived since it began.
    Head {
        bytes: usize,
    },
    /// Between requests, nothing received yet.
    Idle,
    /// A request or tunnel is in progress: no timers.
    Busy,
    /// HTTP/2: only the idle timer, armed whenever no stream is active.
    H2 {
        was_busy: bool,
    },
    /// Writing our own response before closing.
    Closing {
        response: Bytes,
        written: usize,
    },
    Closed,
}

pub struct GuardedIo<T> {
    inner: T,
    activity: Arc<ConnActivity>,
    limits: ConnLimits,
    timer: Pin<Box<Sleep>>,
    phase: Phase,
    first_read: bool,
    /// The head being received (HTTP/1 only), kept until its framing has been checked.
    /// Reused from request to request.
    head: Vec<u8>,
    head_checked: bool,
    /// Bytes arrived while a request was busy (its body, or the start of the next head,
    /// which then went to hyper unseen).
    read_while_busy: bool,
    /// The head now being received may be the tail of one hyper already has part of:
    /// only check it if it starts with a request line.
    maybe_fragment: bool,
}

impl<T> GuardedIo<T> {
    pub fn new(inner: T, activity: Arc<ConnActivity>, limits: ConnLimits) -> Self {
        GuardedIo {
            inner,
            activity,
            limits,
            timer: Box::pin(tokio::time::sleep(limits.client_header)),
            phase: Phase::Head { bytes: 0 },
            first_read: true,
            head: Vec::new(),
            head_checked: false,
            read_while_busy: false,
            maybe_fragment: false,
        }
    }

    fn rearm(&mut self, after: Duration) {
        self.timer.as_mut().reset(Instant::now() + after);
    }

    fn close_with(&mut self, status: StatusCode, reason: String) {
        tracing::debug!(status = status.as_u16(), "{reason}");
        let response = raw_response(status, &reason, &request_id::generate());
        self.phase = Phase::Closing { response, written: 0 };
    }

    /// Moves the phase on from the connection's activity and the timer; `Ready` means the
    /// read must end now (EOF for hyper), after any response we owe has been written.
    fn poll_phase(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let busy = self.activity.is_busy_or_register(cx.waker());
        match &mut self.phase {
            Phase::Closing { .. } | Phase::Closed => return Poll::Ready(()),
            Phase::H2 { was_busy } => {
                if busy {
                    *was_busy = true;
                } else {
                    if *was_busy {
                        *was_busy = false;
                        self.rearm(self.limits.idle);
                    }
                    if self.timer.as_mut().poll(cx).is_ready() {
                        self.phase = Phase::Closed;
                        return Poll::Ready(());
                    }
                }
                return Poll::Pending;
            }
            _ => {}
        }
        if busy {
            self.phase = Phase::Busy;
            return Poll::Pending;
        }
        if matches!(self.phase, Phase::Busy) {
            self.phase = Phase::Idle;
            self.head.clear();
            self.head_checked = false;
            self.maybe_fragment = std::mem::take(&mut self.read_while_busy);
            self.rearm(self.limits.idle);
        }
        if let Phase::Head { bytes } = self.phase {
            if bytes > self.limits.max_header_bytes {
                let reason = format!("request head larger than the limit of {} bytes", self.limits.max_header_bytes);
                self.close_with(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE, reason);
                return Poll::Ready(());
            }
        }
        if self.timer.as_mut().poll(cx).is_ready() {
            match self.phase {
                Phase::Head { bytes } if bytes > 0 => {
                    let reason = format!(
                        "request timeout: the request head did not arrive within {}",
                        humantime::format_duration(self.limits.client_header)
                    );
                    self.close_with(StatusCode::REQUEST_TIMEOUT, reason);
                }
                _ => self.phase = Phase::Closed,
            }
            return Poll::Ready(());
        }
        Poll::Pending
    }

    /// Records bytes just read. Returns why the head they complete must be refused.
    fn note_read(&mut self, data: &[u8]) -> Option<&'static str> {
        if data.is_empty() {
            return None;
        }
        if std::mem::take(&mut self.first_read)
            && data.len() >= 4
            && H2_PREFACE_START.starts_with(&data[..data.len().min(H2_PREFACE_START.len())])
        {
            self.phase = Phase::H2 { was_busy: false };
            self.rearm(self.limits.idle);
            return None;
        }
        match &mut self.phase {
            Phase::Idle => {
                self.phase = Phase::Head { bytes: data.len() };
                self.rearm(self.limits.client_header);
            }
            Phase::Head { bytes } => *bytes += data.len(),
            Phase::Busy => {
                self.read_while_busy = true;
                return None;
            }
            _ => return None,
        }
        if self.head_checked {
            return None;
        }
        let from = self.head.len();
        self.head.extend_from_slice(data);
        let end = head_check::head_end(&self.head, from)?;
        self.head_checked = true;
        if self.maybe_fragment && !head_check::starts_with_request_line(&self.head) {
            return None;
        }
        head_check::check(&self.head[..end]).err()
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> GuardedIo<T> {
    /// Writes what we owe the client, then half-closes. Errors just end it.
    fn poll_closing(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if let Phase::Closing { response, written } = &mut self.phase {
            while *written < response.len() {
                match ready!(Pin::new(&mut self.inner).poll_write(cx, &response[*written..])) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => *written += n,
                }
            }
            let _ = ready!(Pin::new(&mut self.inner).poll_shutdown(cx));
            self.phase = Phase::Closed;
        }
        Poll::Ready(())
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncRead for GuardedIo<T> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.poll_phase(cx).is_ready() {
            ready!(this.poll_closing(cx));
            return Poll::Ready(Ok(()));
        }
        // While a head is awaited, never let more than the limit (+1, to notice) through.
        let cap = match this.phase {
            Phase::Head { bytes } => (this.limits.max_header_bytes + 1).saturating_sub(bytes).max(1),
            Phase::Idle => this.limits.max_header_bytes + 1,
            _ => usize::MAX,
        };
        let before = buf.filled().len();
        let n = if cap >= buf.remaining() {
            ready!(Pin::new(&mut this.inner).poll_read(cx, buf))?;
            buf.filled().len() - before
        } else {
            let mut limited = ReadBuf::new(buf.initialize_unfilled_to(cap));
            ready!(Pin::new(&mut this.inner).poll_read(cx, &mut limited))?;
            let n = limited.filled().len();
            buf.advance(n);
            n
        };
        if let Some(why) = this.note_read(&buf.filled()[before..before + n]) {
            // Hyper never sees the bytes that complete the refused head.
            buf.set_filled(before);
            this.close_with(StatusCode::BAD_REQUEST, format!("bad request: {why}"));
            ready!(this.poll_closing(cx));
        }
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncWrite for GuardedIo<T> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}
