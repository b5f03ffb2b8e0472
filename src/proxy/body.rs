//! The bodies that flow through: the client's request body on its way to a backend
//! (capped at `max_request_body`), and the response body on its way to the client (which
//! carries the request's bookkeeping and releases it when the body ends or is dropped).

use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use super::log::RequestLog;
use crate::backend::{InflightGuard, PooledConn};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The client's request body failed while streaming (the client went away or broke the
/// framing): the client's fault, never the backend's.
#[derive(Debug, thiserror::Error)]
#[error("the client's request body broke off: {0}")]
pub struct ClientBodyError(#[source] pub hyper::Error);

/// The request body grew past `max_request_body` while streaming.
#[derive(Debug, thiserror::Error)]
#[error("request body larger than {limit} bytes")]
pub struct BodyTooLarge {
    pub limit: u64,
}

/// A client's request body, streamed to the backend with backpressure.
#[derive(Debug)]
pub struct RequestBody {
    inner: Option<Incoming>,
    limit: u64,
    seen: u64,
    /// Told when the last byte has been handed on (or the body is dropped), which is when
    /// the backend's `upstream_header` time starts.
    sent: Option<tokio::sync::oneshot::Sender<()>>,
}

impl RequestBody {
    pub fn new(inner: Incoming, limit: u64) -> RequestBody {
        RequestBody { inner: Some(inner), limit, seen: 0, sent: None }
    }

    pub fn empty() -> RequestBody {
        RequestBody { inner: None, limit: 0, seen: 0, sent: None }
    }

    /// A receiver that resolves once the whole body has been sent (at once if it is empty).
    pub fn on_sent(&mut self) -> Option<tokio::sync::oneshot::Receiver<()>> {
        self.inner.as_ref()?;
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.sent = Some(tx);
        Some(rx)
    }

    fn finished(&mut self) {
        self.inner = None;
        if let Some(tx) = self.sent.take() {
            let _ = tx.send(());
        }
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let Some(inner) = this.inner.as_mut() else {
            return Poll::Ready(None);
        };
        match ready!(Pin::new(inner).poll_frame(cx)) {
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    this.seen += data.len() as u64;
                    if this.seen > this.limit {
                        this.finished();
                        return Poll::Ready(Some(Err(Box::new(BodyTooLarge { limit: this.limit }))));
                    }
                }
                // hyper may not poll again once the body says it has ended.
                if this.inner.as_ref().is_some_and(|b| b.is_end_stream()) {
                    if let Some(tx) = this.sent.take() {
                        let _ = tx.send(());
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Some(Err(e)) => {
                this.finished();
                Poll::Ready(Some(Err(Box::new(ClientBodyError(e)))))
            }
            None => {
                this.finished();
                Poll::Ready(None)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(|b| b.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.as_ref().map_or_else(|| SizeHint::with_exact(0), |b| b.size_hint())
    }
}

/// What the client receives: a backend's body, or one balancer wrote itself.
#[derive(Debug)]
pub struct ResponseBody {
    kind: Kind,
    /// Written to the access log when the body is done (or dropped, if the client left).
    log: RequestLog,
    /// Keeps the backend's in-flight count until the last byte is sent.
    _inflight: Option<InflightGuard>,
    /// The backend connection, returned to its pool when the body ends cleanly (and
    /// dropped, closing it, if the body is cut short).
    release: Option<PooledConn>,
}

#[derive(Debug)]
enum Kind {
    Upstream(Incoming),
    Full(Option<Bytes>),
}

impl ResponseBody {
    pub fn upstream(
        body: Incoming,
        log: RequestLog,
        inflight: Option<InflightGuard>,
        release: Option<PooledConn>,
    ) -> ResponseBody {
        let mut b = ResponseBody { kind: Kind::Upstream(body), log, _inflight: inflight, release };
        if http_body::Body::is_end_stream(&b) {
            b.ended();
        }
        b
    }

    pub fn full(bytes: Bytes, log: RequestLog) -> ResponseBody {
        ResponseBody { kind: Kind::Full(Some(bytes)), log, _inflight: None, release: None }
    }

    /// The backend's body ended cleanly: its connection can serve another request.
    fn ended(&mut self) {
        if let (Some(conn), Some(inflight)) = (self.release.take(), &self._inflight) {
            inflight.backend().pool.release(conn);
        }
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let frame = match &mut this.kind {
            Kind::Upstream(b) => match ready!(Pin::new(&mut *b).poll_frame(cx)) {
                Some(Ok(f)) => {
                    if b.is_end_stream() {
                        this.ended();
                    }
                    f
                }
                Some(Err(e)) => {
                    this.release = None;
                    this.log.note_broken(&e);
                    return Poll::Ready(Some(Err(Box::new(e))));
                }
                None => {
                    this.ended();
                    return Poll::Ready(None);
                }
            },
            Kind::Full(b) => match b.take() {
                Some(bytes) => Frame::data(bytes),
                None => return Poll::Ready(None),
            },
        };
        if let Some(d) = frame.data_ref() {
            this.log.bytes += d.len() as u64;
        }
        Poll::Ready(Some(Ok(frame)))
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Upstream(b) => b.is_end_stream(),
            Kind::Full(b) => b.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Upstream(b) => b.size_hint(),
            Kind::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
        }
    }
}
