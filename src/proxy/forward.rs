//! Step 4, forward: picks a backend, sends the request and reads the response head;
//! retries on another backend when it is safe (SPEC 4), and resends once on a fresh
//! connection when a pooled one turns out closed (not one of the retries).

use std::sync::Arc;

use http::request::Parts;
use http::{HeaderValue, Method};

use super::body::{BodyTooLarge, BoxError, ClientBody, RequestBody};
use super::conn::ConnInfo;
use super::error::ProxyError;
use super::headers::{self, Forwarded};
use super::log::RequestLog;
use crate::backend::{
    Backend, Conn, ConnectError, Head, InflightGuard, PendingUpload, ReadError, RequestFraming, SendError,
};
use crate::balance::{Affinity, NoSlot, Slot, Sticky};
use crate::runtime::{Runtime, Upstream};

/// A backend's response head, with the in-flight mark that must live as long as its body
/// and the connection its body is read from (or that becomes the tunnel, on a 101).
pub struct Proxied {
    pub head: Head,
    pub inflight: InflightGuard,
    pub conn: Conn,
    /// The rest of the request body, when the backend answered before it was all sent.
    pub upload: Option<PendingUpload>,
    /// The sticky cookie that pins the client to this backend, when it must be set.
    pub set_cookie: Option<HeaderValue>,
}

/// Sends the request to a backend of `upstream` (and another on a safe retry) until one
/// answers with a head; `affinity` is where the request would rather go.
#[allow(clippy::too_many_arguments)]
pub async fn forward(
    rt: &Runtime,
    conn: &ConnInfo,
    parts: &Parts,
    upstream: &Upstream,
    affinity: Affinity,
    target: &[u8],
    host: Option<&HeaderValue>,
    body: ClientBody,
    log: &mut RequestLog,
) -> Result<Proxied, ProxyError> {
    let upgrade = headers::requested_upgrade(parts);
    let body_empty = http_body::Body::is_end_stream(&body);
    let framing = match (body_empty, http_body::Body::size_hint(&body).exact()) {
        (true, _) => RequestFraming::Empty,
        (false, Some(len)) => RequestFraming::Length(len),
        (false, None) => RequestFraming::Chunked,
    };
    let limit = rt.config.server.max_request_body;
    let mut body = if body_empty { RequestBody::empty() } else { RequestBody::new(body, limit) };
    let attempts = 1 + upstream.retries as usize;
    let mut tried = Tried::default();
    let mut last_error: Option<ProxyError> = None;
    let budget = upstream.retry_budget.inspect(|_| upstream.stats.retry_window.record_request());
    let candidates = upstream.candidates();
    for attempt_no in 0..attempts {
        if attempt_no > 0
            && let Some(share) = budget
            && !upstream.stats.retry_window.try_retry(share)
        {
            tracing::debug!(upstream = %upstream.name, "retry budget spent: the error is answered");
            break;
        }
        // A different backend when possible; the same one again when it is the only one.
        // A slot without an await in the common case (the wait's future is not even made).
        let untried = |i| !tried.contains(i);
        let mut slot = match candidates.take(affinity, &untried) {
            Some(taken) => taken,
            None => candidates.wait(affinity, &untried).await,
        };
        if matches!(slot, Err(NoSlot::NoHealthy)) && last_error.is_some() {
            slot = candidates.acquire(affinity, &|_| true).await;
        }
        let Slot { index: idx, trial, guard: inflight } = match slot {
            Ok(slot) => slot,
            Err(NoSlot::NoHealthy) => break,
            Err(refused) => return Err(ProxyError::no_slot(refused, &upstream.name)),
        };
        tried.insert(idx);
        let backend = &upstream.backends[idx];
        log.backend = Some(idx);
        let fwd = Forwarded {
            client_ip: &conn.peer_ip,
            proto: if conn.tls { "https" } else { "http" },
            request_id: &log.request_id,
            trace: &log.trace,
            host,
            preserve_host: upstream.preserve_host,
            backend: &backend.authority,
            upgrade: upgrade.as_ref(),
            underscores: rt.config.server.underscores_in_headers,
        };
        let request = Outgoing { parts, target, framing, fwd: &fwd };
        let sent = upstream.times_responses().then(crate::backend::clock);
        match attempt(upstream, backend, &request, &mut body).await {
            Ok((head, backend_conn)) => {
                backend.record_response(trial);
                if let Some(sent) = sent {
                    upstream.record_latency(idx, sent, head.status.is_server_error());
                }
                // The backend answered before the whole body was sent: the rest goes with
                // the response body, which sends it as the response is read.
                let upload = backend_conn
                    .uploading()
                    .then(|| PendingUpload::new(std::mem::replace(&mut body, RequestBody::empty())));
                let set_cookie = upstream
                    .sticky
                    .as_ref()
                    .filter(|_| Sticky::repins(affinity.pinned, idx, |i| tried.contains(i), &upstream.backends))
                    .map(|s| s.set_cookie(idx, conn.tls).clone());
                return Ok(Proxied { head, inflight, conn: backend_conn, upload, set_cookie });
            }
            Err(Failure { error, retryable }) => {
                if error.is_backend_failure() {
                    upstream.record_failure(idx, trial, &error);
                }
                tracing::debug!(backend = %backend.url, error = %error, retryable, "attempt failed");
                if !retryable {
                    return Err(error);
                }
                last_error = Some(error);
            }
        }
    }
    Err(last_error.unwrap_or_else(|| ProxyError::NoHealthyBackend { upstream: upstream.name.clone() }))
}

/// What a failure of the client's own body is answered with.
fn client_body_error(e: &BoxError) -> ProxyError {
    match e.downcast_ref::<BodyTooLarge>() {
        Some(too_large) => ProxyError::BodyTooLarge { limit: too_large.limit },
        None => ProxyError::ClientBodyBroken,
    }
}

struct Failure {
    error: ProxyError,
    /// Safe to try again on another backend: nothing reached the backend, or an
    /// idempotent request without a body got no response byte.
    retryable: bool,
}

/// The backends a request was sent to, by index; allocates only past 128 backends.
#[derive(Default)]
struct Tried {
    low: u128,
    high: Vec<usize>,
}

impl Tried {
    fn contains(&self, i: usize) -> bool {
        if i < 128 { self.low & (1 << i) != 0 } else { self.high.contains(&i) }
    }

    fn insert(&mut self, i: usize) {
        if i < 128 {
            self.low |= 1 << i;
        } else {
            self.high.push(i);
        }
    }
}

/// What is sent to each backend tried.
struct Outgoing<'a> {
    parts: &'a Parts,
    target: &'a [u8],
    framing: RequestFraming,
    fwd: &'a Forwarded<'a>,
}

/// One try on one backend, including the one resend on a fresh connection when a pooled
/// connection turns out to have been closed by the backend while it sat idle.
async fn attempt(
    upstream: &Upstream,
    backend: &Arc<Backend>,
    req: &Outgoing<'_>,
    body: &mut RequestBody,
) -> Result<(Head, Conn), Failure> {
    let url = &backend.url;
    let pool = &backend.pool;
    let mut fresh_only = false;
    loop {
        backend.record_attempt();
        let checked_out = if fresh_only { pool.connect().await } else { pool.checkout().await };
        let mut conn = match checked_out {
            Ok(c) => c,
            Err(ConnectError::Local(e)) => {
                return Err(Failure { error: ProxyError::OutOfResources(e), retryable: false });
            }
            Err(e) => {
                return Err(Failure {
                    error: ProxyError::Unreachable { backend: url.clone(), source: Box::new(e) },
                    retryable: true,
                });
            }
        };
        headers::write_request_head(conn.head_buf(), req.parts, req.target, req.framing, req.fwd);
        let broke_off = |source: BoxError| ProxyError::BrokeOff { backend: url.clone(), source };
        // Nothing of the body is taken until the head is written, so a failed head write
        // leaves the request whole for another connection or backend.
        let replayable = |body: &RequestBody| req.framing == RequestFraming::Empty || !body.started();
        match conn.send(body, req.framing).await {
            Ok(()) => {}
            Err(SendError::Head(e)) => {
                if conn.reused && !fresh_only {
                    tracing::debug!(backend = %url, error = %e, "pooled connection was closed by the backend; resending on a new one");
                    fresh_only = true;
                    continue;
                }
                return Err(Failure { error: broke_off(Box::new(e)), retryable: true });
            }
            Err(SendError::ClientBody(e)) => return Err(Failure { error: client_body_error(&e), retryable: false }),
        }
        // The backend's time to answer starts once the whole request is sent: a slow
        // upload is not the backend's delay.
        let after = upstream.timeouts.upstream_header;
        let read = conn.read_head_within(after, req.parts.method == Method::HEAD, body).await;
        let error = match read {
            Some(Ok(head)) => return Ok((head, conn)),
            Some(Err(ReadError::ClientBody(e))) => {
                return Err(Failure { error: client_body_error(&e), retryable: false });
            }
            Some(Err(e)) => e,
            None => {
                return Err(Failure {
                    error: ProxyError::UpstreamTimeout { backend: url.clone(), after },
                    retryable: false,
                });
            }
        };
        let no_response_byte = error.before_any_byte(conn.has_read());
        let replayable = replayable(body);
        if conn.reused && !fresh_only && replayable && no_response_byte {
            tracing::debug!(backend = %url, error = %error, "pooled connection was closed by the backend; resending on a new one");
            fresh_only = true;
            continue;
        }
        let idempotent = matches!(
            req.parts.method,
            Method::GET | Method::HEAD | Method::PUT | Method::DELETE | Method::OPTIONS | Method::TRACE
        );
        return Err(Failure {
            error: broke_off(Box::new(error)),
            retryable: replayable && idempotent && no_response_byte,
        });
    }
}
