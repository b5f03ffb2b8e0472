//! Why balancer answered a request itself, and the one place that turns that into a
//! status and a response.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};

use super::body::{BoxError, ResponseBody};
use super::log::RequestLog;
use super::request_id::X_REQUEST_ID;

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("bad request: {0}")]
    BadRequest(&'static str),
    #[error("no route matches this host and path")]
    NoRoute,
    /// CONNECT and TRACE: never forwarded.
    #[error("method not allowed: {0} is not forwarded by this proxy")]
    MethodNotAllowed(http::Method),
    #[error("bad request: the request body broke off before its end")]
    ClientBodyBroken,
    #[error("request body is larger than the limit of {limit} bytes")]
    BodyTooLarge { limit: u64 },
    #[error("rate limited by {}: retry in {}s", .0.limit, .0.retry_after)]
    RateLimited(crate::limit::Refusal),
    #[error("no healthy backend in upstream {upstream}")]
    NoHealthyBackend { upstream: String },
    #[error("balancer is out of local resources: {0}")]
    OutOfResources(std::io::Error),
    #[error("backend {backend} could not be reached: {source}")]
    Unreachable { backend: Arc<str>, source: BoxError },
    #[error("backend {backend} failed before responding: {source}")]
    BrokeOff { backend: Arc<str>, source: BoxError },
    #[error("backend {backend} sent no response head within {after:?}")]
    UpstreamTimeout { backend: Arc<str>, after: Duration },
}

impl ProxyError {
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::BadRequest(_) | ProxyError::ClientBodyBroken => StatusCode::BAD_REQUEST,
            ProxyError::NoRoute => StatusCode::NOT_FOUND,
            ProxyError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            ProxyError::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ProxyError::RateLimited(_) => StatusCode::TOO_MANY_REQUESTS,
            ProxyError::NoHealthyBackend { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::Unreachable { .. } | ProxyError::BrokeOff { .. } | ProxyError::OutOfResources(_) => {
                StatusCode::BAD_GATEWAY
            }
            ProxyError::UpstreamTimeout { .. } => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    /// A connect error, reset or timeout: what passive health checks count.
    pub fn is_backend_failure(&self) -> bool {
        matches!(
            self,
            ProxyError::Unreachable { .. } | ProxyError::BrokeOff { .. } | ProxyError::UpstreamTimeout { .. }
        )
    }

    /// Whether the client connection must be closed after the answer (its framing is not
    /// to be trusted, or its body was not read).
    fn closes(&self) -> bool {
        matches!(self, ProxyError::BadRequest(_) | ProxyError::ClientBodyBroken | ProxyError::BodyTooLarge { .. })
    }

    /// The text the client reads: the cause, without internal detail for backend errors.
    fn public_reason(&self) -> String {
        match self {
            ProxyError::Unreachable { .. } => "bad gateway: the backend could not be reached".into(),
            ProxyError::OutOfResources(_) => "bad gateway: balancer is out of resources to reach the backend".into(),
            ProxyError::BrokeOff { .. } => "bad gateway: the backend closed the connection without a response".into(),
            ProxyError::UpstreamTimeout { after, .. } => {
                format!("gateway timeout: the backend sent no response within {}", humantime::format_duration(*after))
            }
            other => other.to_string(),
        }
    }

    pub fn into_response(self, mut log: RequestLog) -> Response<ResponseBody> {
        let status = self.status();
        if status.is_server_error() {
            tracing::warn!(status = status.as_u16(), request_id = log.request_id.to_str().unwrap_or("-"), "{self}");
        } else {
            tracing::debug!(status = status.as_u16(), request_id = log.request_id.to_str().unwrap_or("-"), "{self}");
        }
        log.status = status.as_u16();
        let closes = self.closes();
        let retry_after = match &self {
            ProxyError::NoHealthyBackend { .. } => Some(1),
            ProxyError::RateLimited(r) => Some(r.retry_after),
            _ => None,
        };
        let rate_limit = match &self {
            ProxyError::RateLimited(r) => Some((r.capacity, r.remaining, r.reset)),
            _ => None,
        };
        let request_id = log.request_id.clone();
        let mut resp = Response::new(ResponseBody::full(Bytes::from(format!("{}\n", self.public_reason())), log));
        *resp.status_mut() = status;
        let h = resp.headers_mut();
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
        h.insert(X_REQUEST_ID.clone(), request_id);
        if closes {
            h.insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        if let Some(secs) = retry_after {
            h.insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        if let Some((limit, remaining, reset)) = rate_limit {
            h.insert("ratelimit-limit", HeaderValue::from(limit));
            h.insert("ratelimit-remaining", HeaderValue::from(remaining));
            h.insert("ratelimit-reset", HeaderValue::from(reset));
        }
        resp
    }
}

/// A whole HTTP/1.1 response for the connection layer to write raw (408, 431), in the
/// same form as [`ProxyError::into_response`].
pub fn raw_response(status: StatusCode, reason: &str, request_id: &HeaderValue) -> Bytes {
    let body = format!("{reason}\n");
    Bytes::from(format!(
        "HTTP/1.1 {} {}\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: {}\r\nx-request-id: {}\r\nconnection: close\r\n\r\n{body}",
        status.as_u16(),
        status.canonical_reason().unwrap_or(""),
        body.len(),
        request_id.to_str().unwrap_or("-"),
    ))
}
