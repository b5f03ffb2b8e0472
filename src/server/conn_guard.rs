//! The socket as hyper sees it, with the timeouts hyper does not give: `client_header`
//! (a head must arrive in full within it, else 408 and close), `idle` (a keep-alive
//! connection with no request in progress is closed after it), and, for every request
//! head on the connection (see `head_check::Framing`), `max_header_bytes` and ambiguous
//! framing: 431 or 400 with our body, before hyper sees the head, once any response in
//! progress has been sent.
//!
//! The phase is derived from [`ConnActivity`]: busy while a request or tunnel runs; when
//! it stops being busy the connection is idle until a byte arrives, then it is reading a
//! head until the request path picks the request up. (Plain HTTP/1 connections, which
//! balancer serves itself, are parked when idle: see `server::h1`.)

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

use super::ConnActivity;
use crate::http1::{H2_PREFACE, head_check};
use crate::proxy::{Answer, ProxyError, request_id};
use crate::timer::LazyTimer;

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
    timer: LazyTimer,
    /// When the current phase's time runs out; the timer may be set earlier than this.
    deadline: Instant,
    phase: Phase,
    first_read: bool,
    /// Follows HTTP/1 message boundaries so every head is checked.
    framing: head_check::Framing,
    /// A head was refused: the answer waits until the response in progress (if any) is sent.
    refused: Option<ProxyError>,
}

impl<T> GuardedIo<T> {
    pub fn new(inner: T, activity: Arc<ConnActivity>, limits: ConnLimits) -> Self {
        let deadline = Instant::now() + limits.client_header;
        GuardedIo {
            inner,
            activity,
            limits,
            timer: LazyTimer::new(deadline),
            deadline,
            phase: Phase::Head { bytes: 0 },
            first_read: true,
            framing: head_check::Framing::new(limits.max_header_bytes),
            refused: None,
        }
    }

    fn io(&mut self) -> Pin<&mut T>
    where
        T: Unpin,
    {
        Pin::new(&mut self.inner)
    }

    /// Moves the deadline (the timer follows lazily, see [`LazyTimer`]).
    fn rearm(&mut self, after: Duration) {
        self.deadline = Instant::now() + after;
    }

    /// Whether the deadline has passed; if not, the task is woken when it does.
    fn timer_expired(&mut self, cx: &mut Context<'_>) -> bool {
        self.timer.expired(self.deadline, cx)
    }

    fn close_with(&mut self, error: &ProxyError) {
        tracing::debug!("{error}");
        let response = Answer::of(error).to_bytes(&request_id::generate());
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
                    if self.timer_expired(cx) {
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
            self.rearm(self.limits.idle);
        }
        if self.timer_expired(cx) {
            match self.phase {
                Phase::Head { bytes } if bytes > 0 => {
                    self.close_with(&ProxyError::HeadTimeout { after: self.limits.client_header });
                }
                _ => self.phase = Phase::Closed,
            }
            return Poll::Ready(());
        }
        Poll::Pending
    }

    /// Records bytes just read, for the timers and the framing checks.
    fn note_read(&mut self, data: &[u8]) -> Result<(), (usize, head_check::Reject)> {
        if data.is_empty() {
            return Ok(());
        }
        if std::mem::take(&mut self.first_read)
            && data.len() >= 4
            && H2_PREFACE.starts_with(&data[..data.len().min(H2_PREFACE.len())])
        {
            self.phase = Phase::H2 { was_busy: false };
            self.framing.stop();
            self.rearm(self.limits.idle);
            return Ok(());
        }
        match &mut self.phase {
            Phase::Idle => {
                self.phase = Phase::Head { bytes: data.len() };
                self.rearm(self.limits.client_header);
            }
            Phase::Head { bytes } => *bytes += data.len(),
            _ => {}
        }
        self.framing.feed(data)
    }

    fn refuse(&mut self, reject: head_check::Reject) {
        self.refused = Some(ProxyError::refused_head(reject, self.limits.max_header_bytes));
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> GuardedIo<T> {
    /// Writes what we owe the client, then half-closes. Errors just end it.
    fn poll_closing(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if let Phase::Closing { response, written } = &mut self.phase {
            let inner = &mut self.inner;
            while *written < response.len() {
                match ready!(Pin::new(&mut *inner).poll_write(cx, &response[*written..])) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => *written += n,
                }
            }
            let _ = ready!(Pin::new(inner).poll_shutdown(cx));
            self.phase = Phase::Closed;
        }
        Poll::Ready(())
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncRead for GuardedIo<T> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.refused.is_some() {
            return this.poll_refusal(cx);
        }
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
            ready!(this.io().poll_read(cx, buf))?;
            buf.filled().len() - before
        } else {
            let mut limited = ReadBuf::new(buf.initialize_unfilled_to(cap));
            ready!(this.io().poll_read(cx, &mut limited))?;
            let n = limited.filled().len();
            buf.advance(n);
            n
        };
        if let Err((at, reject)) = this.note_read(&buf.filled()[before..before + n]) {
            // Hyper gets the complete requests before the refused head, never that head.
            buf.set_filled(before + at);
            this.refuse(reject);
            if at == 0 {
                return this.poll_refusal(cx);
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> GuardedIo<T> {
    /// Answers a refused head once no response is in progress (so the two never mix), then
    /// ends the connection.
    fn poll_refusal(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if !matches!(self.phase, Phase::Closing { .. } | Phase::Closed) {
            if self.activity.is_busy_or_register(cx.waker()) {
                return Poll::Pending;
            }
            let refused = self.refused.take().expect("a refusal is pending");
            self.close_with(&refused);
            self.refused = Some(refused);
        }
        ready!(self.poll_closing(cx));
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncWrite for GuardedIo<T> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.get_mut().io().poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().io().poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().io().poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().io().poll_shutdown(cx)
    }
}
