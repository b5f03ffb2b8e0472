//! Why balancer answers a request (or a refused head) itself. What the client is told
//! for each is decided in one place: [`super::Answer::of`].

use std::sync::Arc;
use std::time::Duration;

use super::body::BoxError;
use crate::backend::QueueRefusal;
use crate::balance::NoSlot;
use crate::http1::head_check::{self, Reject};

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("bad request: {0}")]
    BadRequest(&'static str),
    /// The request head did not arrive within `client_header`.
    #[error("request timeout: the request head did not arrive within {}", humantime::format_duration(*.after))]
    HeadTimeout { after: Duration },
    #[error("request head larger than the limit of {max} bytes or {} headers", head_check::MAX_HEADERS)]
    HeadTooLarge { max: usize },
    #[error("request line longer than the limit of {max} bytes")]
    UriTooLong { max: usize },
    #[error("HTTP version not supported: only HTTP/1.x on an HTTP/1 connection")]
    VersionNotSupported,
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
    /// A shared limit's store fails and its `on_error` is `deny`.
    #[error("the store of shared rate limit {limit} is failing (on_error = deny)")]
    LimitStoreDown { limit: String },
    #[error("no healthy backend in upstream {upstream}")]
    NoHealthyBackend { upstream: String },
    #[error("every backend of upstream {upstream} is at max_inflight")]
    AllBusy { upstream: String },
    #[error("the queue of upstream {upstream} is full")]
    QueueFull { upstream: String },
    #[error("no backend of upstream {upstream} was free within the queue timeout of {}", humantime::format_duration(*.after))]
    QueueTimeout { upstream: String, after: Duration },
    #[error("upstream {upstream} was removed by a reload while the request waited")]
    UpstreamRemoved { upstream: String },
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
    /// A connect error, reset or timeout: what passive health checks count.
    pub fn is_backend_failure(&self) -> bool {
        matches!(
            self,
            ProxyError::Unreachable { .. } | ProxyError::BrokeOff { .. } | ProxyError::UpstreamTimeout { .. }
        )
    }

    /// Why a request got no backend slot.
    pub fn no_slot(refused: NoSlot, upstream: &str) -> ProxyError {
        let upstream = upstream.to_owned();
        match refused {
            NoSlot::NoHealthy => ProxyError::NoHealthyBackend { upstream },
            NoSlot::AllBusy => ProxyError::AllBusy { upstream },
            NoSlot::Queue(QueueRefusal::Full) => ProxyError::QueueFull { upstream },
            NoSlot::Queue(QueueRefusal::Timeout(after)) => ProxyError::QueueTimeout { upstream, after },
            NoSlot::Queue(QueueRefusal::Closed) => ProxyError::UpstreamRemoved { upstream },
        }
    }

    /// Why a request head was refused before it became a request.
    pub fn refused_head(reject: Reject, max_header_bytes: usize) -> ProxyError {
        match reject {
            Reject::BadRequest(why) => ProxyError::BadRequest(why),
            Reject::TooLarge => ProxyError::HeadTooLarge { max: max_header_bytes },
            Reject::UriTooLong => ProxyError::UriTooLong { max: max_header_bytes },
            Reject::VersionNotSupported => ProxyError::VersionNotSupported,
        }
    }
}
