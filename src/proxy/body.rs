//! The bodies that flow through: the client's request body on its way to a backend
//! (capped at `max_request_body`), and the response body on its way to the client (which
//! carries the request's bookkeeping and releases it when the body ends or is dropped).

use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use super::log::RequestLog;
use crate::backend::{ConnBody, InflightGuard};
use crate::cache::Reader;
use crate::http1::RawFields;
use crate::http1::server::IncomingBody;

pub use crate::http1::BoxError;

/// The client's request body failed while streaming (the client went away or broke the
/// framing): the client's fault, never the backend's.
#[derive(Debug, thiserror::Error)]
#[error("the client's request body broke off: {0}")]
pub struct ClientBodyError(#[source] pub BoxError);

/// A client's request body as the server side that read its head hands it over.
#[derive(Debug)]
pub enum ClientBody {
    /// From hyper (HTTP/2, TLS).
    Hyper(Incoming),
    /// From balancer's own HTTP/1.1 server.
    Http1(IncomingBody),
}

impl Body for ClientBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            ClientBody::Hyper(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
            ClientBody::Http1(b) => Pin::new(b).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ClientBody::Hyper(b) => b.is_end_stream(),
            ClientBody::Http1(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ClientBody::Hyper(b) => b.size_hint(),
            ClientBody::Http1(b) => b.size_hint(),
        }
    }
}

/// The request body grew past `max_request_body` while streaming.
#[derive(Debug, thiserror::Error)]
#[error("request body larger than {limit} bytes")]
pub struct BodyTooLarge {
    pub limit: u64,
}

/// A client's request body, streamed to the backend with backpressure.
#[derive(Debug)]
pub struct RequestBody {
    inner: Option<ClientBody>,
    limit: u64,
    seen: u64,
    /// A frame has been taken: the body can no longer be sent to another backend.
    started: bool,
}

impl RequestBody {
    pub fn new(inner: ClientBody, limit: u64) -> RequestBody {
        RequestBody { inner: Some(inner), limit, seen: 0, started: false }
    }

    pub fn empty() -> RequestBody {
        RequestBody { inner: None, limit: 0, seen: 0, started: false }
    }

    /// Whether any of the body has been taken (and so cannot be replayed).
    pub fn started(&self) -> bool {
        self.started
    }

    fn finished(&mut self) {
        self.inner = None;
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
        this.started = true;
        match ready!(Pin::new(inner).poll_frame(cx)) {
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    this.seen += data.len() as u64;
                    if this.seen > this.limit {
                        this.finished();
                        return Poll::Ready(Some(Err(Box::new(BodyTooLarge { limit: this.limit }))));
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
    /// Keeps the backend's in-flight count until the last byte is sent; its backend's pool
    /// takes the connection back when the body ends cleanly. Declared first so that it is
    /// dropped first: a backend sees its connection closed (with `kind`) only once the
    /// request no longer counts as in flight there.
    inflight: Option<InflightGuard>,
    kind: Kind,
    /// Written to the access log when the body is done (or dropped, if the client left).
    /// Boxed: the response is moved several times on its way to the client's
    /// connection, and each move would copy the log's 300-odd bytes.
    log: Box<RequestLog>,
    /// The backend's fields, for a server that writes them itself (see
    /// `ConnInfo::writes_raw_fields`); the response's `HeaderMap` then holds only what
    /// balancer adds (a sticky cookie), written after them.
    fields: Option<RawFields>,
}

/// Not boxed: made once per request, and a box would be an allocation per request.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
enum Kind {
    /// Read from the backend's connection, which it owns (and closes if cut short).
    Upstream(ConnBody),
    /// A response on its way into the cache, read by this request and any waiting for it
    /// (a task of its own reads the backend: `proxy/cache.rs`).
    Shared(Reader),
    Full(Option<Bytes>),
}

impl ResponseBody {
    pub fn upstream(body: ConnBody, log: Box<RequestLog>, inflight: InflightGuard) -> ResponseBody {
        let mut b = ResponseBody { kind: Kind::Upstream(body), log, inflight: Some(inflight), fields: None };
        if http_body::Body::is_end_stream(&b) {
            b.ended();
        }
        b
    }

    pub fn full(bytes: Bytes, log: Box<RequestLog>) -> ResponseBody {
        ResponseBody { kind: Kind::Full(Some(bytes)), log, inflight: None, fields: None }
    }

    /// A response read from the cache's tee as the backend sends it.
    pub(crate) fn shared(reader: Reader, log: Box<RequestLog>) -> ResponseBody {
        ResponseBody { kind: Kind::Shared(reader), log, inflight: None, fields: None }
    }

    /// Carries the backend's `fields` to the server, which writes them.
    pub fn passing(mut self, fields: RawFields) -> ResponseBody {
        self.fields = Some(fields);
        self
    }

    /// The backend's fields, when [`Self::passing`] them, and the request id that goes
    /// with them; the server writes both.
    pub fn take_fields(&mut self) -> Option<(RawFields, &super::request_id::RequestId)> {
        Some((self.fields.take()?, &self.log.request_id))
    }

    /// The backend's body ended cleanly: its connection can serve another request.
    fn ended(&mut self) {
        if let (Kind::Upstream(body), Some(inflight)) = (&mut self.kind, &self.inflight) {
            if let Some(conn) = body.take_reusable() {
                inflight.backend().pool.release(conn);
            }
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
                    this.log.note_broken(&e);
                    return Poll::Ready(Some(Err(Box::new(e))));
                }
                None => {
                    this.ended();
                    return Poll::Ready(None);
                }
            },
            Kind::Shared(r) => match ready!(Pin::new(r).poll_frame(cx)) {
                Some(Ok(f)) => f,
                Some(Err(e)) => {
                    this.log.note_broken(&e);
                    return Poll::Ready(Some(Err(Box::new(e))));
                }
                None => return Poll::Ready(None),
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
            Kind::Shared(r) => r.is_end_stream(),
            Kind::Full(b) => b.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Upstream(b) => b.size_hint(),
            Kind::Shared(r) => r.size_hint(),
            Kind::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
        }
    }
}
