//! Every response balancer makes itself, decided in one place: [`Answer::of`] is the one
//! exhaustive match from a [`ProxyError`] to what the client is told (status, one-line
//! reason, whether the connection closes, extra fields). It is rendered as a hyper response
//! for the request path, or as raw bytes for a connection that refuses a head.

use std::borrow::Cow;

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};

use super::body::ResponseBody;
use super::error::ProxyError;
use super::log::RequestLog;
use super::request_id::{RequestId, X_REQUEST_ID};

/// What balancer answers on its own.
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    /// The one-line body (a newline is added).
    pub reason: Cow<'static, str>,
    /// The client connection is closed after the answer (its framing is not to be
    /// trusted, or its body was not read).
    pub closes: bool,
    /// `Retry-After`, in seconds.
    pub retry_after: Option<u64>,
    /// `RateLimit-Limit`, `-Remaining` and `-Reset`.
    pub rate_limit: Option<(u64, u64, u64)>,
}

impl Answer {
    /// The answer to `error`. Backend errors are told without internal detail.
    pub fn of(error: &ProxyError) -> Answer {
        let (status, closes, reason): (StatusCode, bool, Cow<'static, str>) = match error {
            ProxyError::BadRequest(_) | ProxyError::ClientBodyBroken => {
                (StatusCode::BAD_REQUEST, true, error.to_string().into())
            }
            ProxyError::HeadTimeout { .. } => (StatusCode::REQUEST_TIMEOUT, true, error.to_string().into()),
            ProxyError::HeadTooLarge { .. } => {
                (StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE, true, error.to_string().into())
            }
            ProxyError::UriTooLong { .. } => (StatusCode::URI_TOO_LONG, true, error.to_string().into()),
            ProxyError::VersionNotSupported => (StatusCode::HTTP_VERSION_NOT_SUPPORTED, true, error.to_string().into()),
            ProxyError::NoRoute => (StatusCode::NOT_FOUND, false, error.to_string().into()),
            ProxyError::MethodNotAllowed(_) => (StatusCode::METHOD_NOT_ALLOWED, false, error.to_string().into()),
            ProxyError::BodyTooLarge { .. } => (StatusCode::PAYLOAD_TOO_LARGE, true, error.to_string().into()),
            ProxyError::RateLimited(_) => (StatusCode::TOO_MANY_REQUESTS, false, error.to_string().into()),
            ProxyError::NoHealthyBackend { .. }
            | ProxyError::AllBusy { .. }
            | ProxyError::QueueFull { .. }
            | ProxyError::QueueTimeout { .. }
            | ProxyError::UpstreamRemoved { .. }
            | ProxyError::LimitStoreDown { .. } => (StatusCode::SERVICE_UNAVAILABLE, false, error.to_string().into()),
            ProxyError::Unreachable { .. } => {
                (StatusCode::BAD_GATEWAY, false, "bad gateway: the backend could not be reached".into())
            }
            ProxyError::OutOfResources(_) => (
                StatusCode::BAD_GATEWAY,
                false,
                "bad gateway: balancer is out of resources to reach the backend".into(),
            ),
            ProxyError::BrokeOff { .. } => (
                StatusCode::BAD_GATEWAY,
                false,
                "bad gateway: the backend closed the connection without a response".into(),
            ),
            ProxyError::UpstreamTimeout { after, .. } => (
                StatusCode::GATEWAY_TIMEOUT,
                false,
                format!("gateway timeout: the backend sent no response within {}", humantime::format_duration(*after))
                    .into(),
            ),
        };
        let (retry_after, rate_limit) = match error {
            ProxyError::NoHealthyBackend { .. }
            | ProxyError::AllBusy { .. }
            | ProxyError::QueueFull { .. }
            | ProxyError::QueueTimeout { .. }
            | ProxyError::UpstreamRemoved { .. }
            | ProxyError::LimitStoreDown { .. } => (Some(1), None),
            ProxyError::RateLimited(r) => (Some(r.retry_after), Some((r.capacity, r.remaining, r.reset))),
            _ => (None, None),
        };
        Answer { status, reason, closes, retry_after, rate_limit }
    }

    /// The answer as a whole HTTP/1.1 response, for a connection that writes it raw.
    pub fn to_bytes(&self, request_id: &RequestId) -> Bytes {
        let mut out = format!(
            "HTTP/1.1 {} {}\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: {}\r\nx-request-id: {}\r\n",
            self.status.as_u16(),
            self.status.canonical_reason().unwrap_or(""),
            self.reason.len() + 1,
            request_id.as_str(),
        );
        if self.closes {
            out.push_str("connection: close\r\n");
        }
        if let Some(secs) = self.retry_after {
            out.push_str(&format!("retry-after: {secs}\r\n"));
        }
        if let Some((limit, remaining, reset)) = self.rate_limit {
            out.push_str(&format!(
                "ratelimit-limit: {limit}\r\nratelimit-remaining: {remaining}\r\nratelimit-reset: {reset}\r\n"
            ));
        }
        out.push_str("\r\n");
        out.push_str(&self.reason);
        out.push('\n');
        Bytes::from(out)
    }

    /// The answer as the request path's response; `log` records its status.
    pub fn into_response(self, mut log: Box<RequestLog>) -> Response<ResponseBody> {
        log.status = self.status.as_u16();
        let request_id = log.request_id.to_header_value();
        let mut resp = Response::new(ResponseBody::full(Bytes::from(format!("{}\n", self.reason)), log));
        *resp.status_mut() = self.status;
        let h = resp.headers_mut();
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
        h.insert(X_REQUEST_ID.clone(), request_id);
        if self.closes {
            h.insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        if let Some(secs) = self.retry_after {
            h.insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        if let Some((limit, remaining, reset)) = self.rate_limit {
            h.insert("ratelimit-limit", HeaderValue::from(limit));
            h.insert("ratelimit-remaining", HeaderValue::from(remaining));
            h.insert("ratelimit-reset", HeaderValue::from(reset));
        }
        resp
    }
}

impl ProxyError {
    /// Logs the error (server errors at warn) and answers it.
    pub fn into_response(self, log: Box<RequestLog>) -> Response<ResponseBody> {
        let answer = Answer::of(&self);
        let request_id = log.request_id.as_str();
        // A failing limit store is logged once per change of its state, not per request.
        if answer.status.is_server_error() && !matches!(self, ProxyError::LimitStoreDown { .. }) {
            tracing::warn!(status = answer.status.as_u16(), request_id, "{self}");
        } else {
            tracing::debug!(status = answer.status.as_u16(), request_id, "{self}");
        }
        answer.into_response(log)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_raw_answer_is_one_whole_response() {
        let a = Answer::of(&ProxyError::UriTooLong { max: 64 });
        let raw = a.to_bytes(&RequestId::Sent(HeaderValue::from_static("rid")));
        let mut slots = [httparse::EMPTY_HEADER; 8];
        let mut r = httparse::Response::new(&mut slots);
        let len = match r.parse(&raw).unwrap() {
            httparse::Status::Complete(len) => len,
            httparse::Status::Partial => panic!("partial"),
        };
        assert_eq!(r.code, Some(414));
        let cl: usize = r
            .headers
            .iter()
            .find(|h| h.name == "content-length")
            .map(|h| std::str::from_utf8(h.value).unwrap().parse().unwrap())
            .unwrap();
        assert_eq!(raw.len() - len, cl);
        assert!(r.headers.iter().any(|h| h.name == "connection" && h.value == b"close"));
    }
}
