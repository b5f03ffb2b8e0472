//! The socket as hyper sees it, with the timeouts hyper does not give: `client_header`
//! (a head must arrive in full within it, else 408 and close), `idle` (a keep-alive
//! connection with no request in progress is closed after it), and, for every request
//! head on the connection (see `head_check::Framing`), `max_header_bytes` and ambiguous
//! framing: 431 or 400 with our body, before hyper sees the head, once any response in
//! progress has been sent.
//!
//! The phase is derived from [`ConnActivity`]: busy while a request or tunnel runs; when
//! it stops being busy the connection is idle until a byte arrives, then it is reading a
//! head until the request path picks the request up.
//!
//! An HTTP/1 connection idle for [`PARK_AFTER`] is parked: the socket is handed back
//! through its [`ParkSlot`] and hyper reads an end of stream, so hyper's buffers and state
//! are freed while the client thinks. The next byte starts a new hyper session.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http::StatusCode;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

use super::ConnActivity;
use super::head_check;
use crate::proxy::{error::raw_response, request_id};
use crate::timer::LazyTimer;

/// How long an HTTP/1 keep-alive connection stays idle before it is parked.
pub const PARK_AFTER: Duration = Duration::from_millis(500);

/// Where a parked socket is handed back to the code that serves the connection.
pub type ParkSlot<T> = Arc<std::sync::Mutex<Option<T>>>;

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
    /// `None` once parked.
    inner: Option<T>,
    /// Set when the connection may be parked.
    park: Option<ParkSlot<T>>,
    activity: Arc<ConnActivity>,
    limits: ConnLimits,
    timer: LazyTimer,
    /// When the current phase's time runs out; the timer may be set earlier than this.
    deadline: Instant,
    phase: Phase,
    first_read: bool,
    /// Follows HTTP/1 message boundaries so every head is checked.
    framing: head_check::Framing,
    /// The last write to the socket could not go through (a slow reader): hyper still holds
    /// output, so the connection must not be parked.
    write_blocked: bool,
    /// A head was refused: the answer waits until the response in progress (if any) is sent.
    refused: Option<(StatusCode, String)>,
}

impl<T> GuardedIo<T> {
    pub fn new(inner: T, activity: Arc<ConnActivity>, limits: ConnLimits, park: Option<ParkSlot<T>>) -> Self {
        let deadline = Instant::now() + limits.client_header;
        GuardedIo {
            inner: Some(inner),
            // Parking after the idle timeout would only delay the close.
            park: park.filter(|_| PARK_AFTER < limits.idle),
            activity,
            limits,
            timer: LazyTimer::new(deadline),
            deadline,
            phase: Phase::Head { bytes: 0 },
            first_read: true,
            framing: head_check::Framing::new(limits.max_header_bytes),
            refused: None,
            write_blocked: false,
        }
    }

    /// The socket; an error once it has been parked (hyper has been told it ended).
    fn io(&mut self) -> io::Result<Pin<&mut T>>
    where
        T: Unpin,
    {
        match &mut self.inner {
            Some(t) => Ok(Pin::new(t)),
            None => Err(io::ErrorKind::NotConnected.into()),
        }
    }

    /// How long an idle connection waits: until it is parked, or else closed.
    fn idle_wait(&self) -> Duration {
        if self.park.is_some() { PARK_AFTER.min(self.limits.idle) } else { self.limits.idle }
    }

    /// Hands the socket to the park slot when nothing of a request is pending; false if
    /// it cannot be parked.
    fn try_park(&mut self) -> bool {
        let Some(slot) = &self.park else { return false };
        if !self.framing.at_boundary() || self.write_blocked {
            return false;
        }
        *slot.lock().expect("park slot lock") = self.inner.take();
        self.phase = Phase::Closed;
        true
    }

    /// Moves the deadline (the timer follows lazily, see [`LazyTimer`]).
    fn rearm(&mut self, after: Duration) {
        self.deadline = Instant::now() + after;
    }

    /// Whether the deadline has passed; if not, the task is woken when it does.
    fn timer_expired(&mut self, cx: &mut Context<'_>) -> bool {
        self.timer.expired(self.deadline, cx)
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
            self.rearm(self.idle_wait());
        }
        if self.timer_expired(cx) {
            if matches!(self.phase, Phase::Idle) && self.park.is_some() {
                if self.try_park() {
                    return Poll::Ready(());
                }
                // Cannot park now: wait out the rest of the idle time.
                self.park = None;
                self.rearm(self.limits.idle.saturating_sub(PARK_AFTER));
                if !self.timer_expired(cx) {
                    return Poll::Pending;
                }
            }
            match self.phase {
                Phase::Head { bytes } if bytes > 0 => {
                    let reason = head_timeout_reason(self.limits.client_header);
                    self.close_with(StatusCode::REQUEST_TIMEOUT, reason);
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
            && H2_PREFACE_START.starts_with(&data[..data.len().min(H2_PREFACE_START.len())])
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
        self.refused = Some(refusal(reject, self.limits.max_header_bytes));
    }
}

/// The status and text of a refused head.
pub fn refusal(reject: head_check::Reject, max_header_bytes: usize) -> (StatusCode, String) {
    match reject {
        head_check::Reject::BadRequest(why) => (StatusCode::BAD_REQUEST, format!("bad request: {why}")),
        head_check::Reject::TooLarge => (
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            format!(
                "request head larger than the limit of {max_header_bytes} bytes or {} headers",
                head_check::MAX_HEADERS
            ),
        ),
        head_check::Reject::UriTooLong => {
            (StatusCode::URI_TOO_LONG, format!("request line longer than the limit of {max_header_bytes} bytes"))
        }
        head_check::Reject::VersionNotSupported => (
            StatusCode::HTTP_VERSION_NOT_SUPPORTED,
            "HTTP version not supported: only HTTP/1.x on an HTTP/1 connection".to_owned(),
        ),
    }
}

/// The text of a 408.
pub fn head_timeout_reason(client_header: Duration) -> String {
    format!("request timeout: the request head did not arrive within {}", humantime::format_duration(client_header))
}

impl<T: AsyncRead + AsyncWrite + Unpin> GuardedIo<T> {
    /// Writes what we owe the client, then half-closes. Errors just end it.
    fn poll_closing(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if let Phase::Closing { response, written } = &mut self.phase {
            let Some(inner) = &mut self.inner else { return Poll::Ready(()) };
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
            ready!(this.io()?.poll_read(cx, buf))?;
            buf.filled().len() - before
        } else {
            let mut limited = ReadBuf::new(buf.initialize_unfilled_to(cap));
            ready!(this.io()?.poll_read(cx, &mut limited))?;
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
            let (status, reason) = self.refused.clone().expect("a refusal is pending");
            self.close_with(status, reason);
        }
        ready!(self.poll_closing(cx));
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncWrite for GuardedIo<T> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = this.io()?.poll_write(cx, buf);
        this.write_blocked = r.is_pending();
        r
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = this.io()?.poll_write_vectored(cx, bufs);
        this.write_blocked = r.is_pending();
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.as_ref().is_some_and(T::is_write_vectored)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let r = match &mut this.inner {
            Some(t) => Pin::new(t).poll_flush(cx),
            None => Poll::Ready(Ok(())),
        };
        this.write_blocked = r.is_pending();
        r
    }

    /// A parked socket is not shut down: it lives on in the park slot.
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().inner {
            Some(t) => Pin::new(t).poll_shutdown(cx),
            None => Poll::Ready(Ok(())),
        }
    }
}
