//! The request path. Every request goes through these phases, in this order:
//!
//! ```text
//! check (CONNECT, framing, size) -> route -> limit -> pick -> rewrite request -> forward (retry)
//!   -> rewrite response -> stream body -> access log (when the body ends)
//! ```
//!
//! The runtime snapshot is loaded once per request and held to its end (in [`RequestLog`]).

pub mod body;
mod conn;
pub mod error;
pub mod headers;
mod log;
pub mod request_id;
mod upgrade;

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::request::Parts;
use http::uri::PathAndQuery;
use http::{Method, Request, Response, Version, header};

use crate::backend::{
    Backend, Conn, ConnectError, Framing, Head, InflightGuard, PendingUpload, ReadError, RequestFraming, SendError,
};
use crate::http1::RawTarget;
use crate::http1::server::PendingUpgrade;
use crate::limit::{self, RateLimiter};
use crate::path;
use crate::runtime::{Runtime, Upstream};
use body::{BodyTooLarge, BoxError, ClientBody, RequestBody, ResponseBody};
pub use conn::{ActivityGuard, ConnActivity, ConnInfo};
pub use error::ProxyError;
use headers::Forwarded;
pub use log::RequestLog;
use upgrade::ClientUpgrade;

/// Serves one request from a client connection, on `rt`, the runtime loaded for it.
/// `busy` marks the connection busy from the moment the server hands the request over.
pub async fn handle(
    rt: Arc<Runtime>,
    conn: Arc<ConnInfo>,
    busy: ActivityGuard,
    mut req: Request<ClientBody>,
) -> Result<Response<ResponseBody>, Infallible> {
    let request_id = request_id::from_headers(req.headers());
    let client_upgrade = if req.headers().contains_key(header::UPGRADE) {
        Some(match req.extensions_mut().remove::<PendingUpgrade>() {
            Some(pending) => ClientUpgrade::Http1(pending.take()),
            None => ClientUpgrade::Hyper(hyper::upgrade::on(&mut req)),
        })
    } else {
        None
    };
    let mut log = RequestLog {
        start: Instant::now(),
        client: conn.peer,
        method: req.method().clone(),
        uri: req.uri().clone(),
        request_id,
        // Stays 499 (nginx's "client closed request") if the client leaves before a head.
        status: 499,
        runtime: rt.clone(),
        upstream: None,
        backend: None,
        bytes: 0,
        broken: false,
        _activity: busy,
    };
    let (parts, body) = req.into_parts();
    let outcome = proxy(&rt, &conn, &parts, body, &mut log).await;
    Ok(match outcome {
        Ok(Proxied { head, inflight, conn: backend_conn, upload }) => {
            log.status = head.status.as_u16();
            let switching = head.framing == Framing::Upgrade;
            if conn.writes_raw_fields && !switching && !head.names_fields {
                // The fields go to the client as the backend sent them, less the hop-by-hop
                // ones (`headers::write_response_fields`): no map is built.
                let body = ResponseBody::upstream(backend_conn.into_body(head.framing, upload), log, inflight);
                let mut response = Response::new(body.passing(head.fields));
                *response.status_mut() = head.status;
                return Ok(response);
            }
            let Some(mut headers) = head.fields.to_header_map(1) else {
                let backend = inflight.backend().url.clone();
                return Ok(ProxyError::BrokeOff { backend, source: "invalid header field".into() }.into_response(log));
            };
            headers::rewrite_response(&mut headers, switching, &log.request_id);
            let mut response = Response::new(());
            *response.status_mut() = head.status;
            *response.version_mut() = head.version;
            *response.headers_mut() = headers;
            let (parts, ()) = response.into_parts();
            if switching {
                match client_upgrade {
                    Some(client) => {
                        upgrade::tunnel(client, backend_conn, inflight, conn.activity.begin());
                        Response::from_parts(parts, ResponseBody::full(Bytes::new(), log))
                    }
                    None => ProxyError::BrokeOff {
                        backend: inflight.backend().url.clone(),
                        source: "backend switched protocols without being asked".into(),
                    }
                    .into_response(log),
                }
            } else {
                Response::from_parts(
                    parts,
                    ResponseBody::upstream(backend_conn.into_body(head.framing, upload), log, inflight),
                )
            }
        }
        Err(e) => e.into_response(log),
    })
}

/// A backend's response head, with the in-flight mark that must live as long as its body
/// and the connection its body is read from (or that becomes the tunnel, on a 101).
struct Proxied {
    head: Head,
    inflight: InflightGuard,
    conn: Conn,
    /// The rest of the request body, when the backend answered before it was all sent.
    upload: Option<PendingUpload>,
}

async fn proxy(
    rt: &Runtime,
    conn: &ConnInfo,
    parts: &Parts,
    body: ClientBody,
    log: &mut RequestLog,
) -> Result<Proxied, ProxyError> {
    // check
    if parts.method == Method::CONNECT || parts.method == Method::TRACE {
        return Err(ProxyError::MethodNotAllowed(parts.method.clone()));
    }
    // The connection guard checks framing on the raw head; this catches what it cannot
    // see (heads pipelined behind another): hyper accepts "gzip, chunked", and only the
    // chunked framing would be removed on the way to the backend.
    // One pass over the few fields a request has, rather than a hashed lookup for each.
    let mut host_headers = 0;
    for (name, value) in &parts.headers {
        if name == header::HOST {
            host_headers += 1;
            if !headers::valid_host(value.as_bytes()) {
                return Err(ProxyError::BadRequest("invalid Host header"));
            }
        } else if name == header::TRANSFER_ENCODING && !value.as_bytes().eq_ignore_ascii_case(b"chunked") {
            return Err(ProxyError::BadRequest(
                "unsupported Transfer-Encoding (only a single \"chunked\" is accepted)",
            ));
        }
    }
    if host_headers > 1 {
        return Err(ProxyError::BadRequest("more than one Host header"));
    }
    if parts.version == Version::HTTP_11 && host_headers == 0 && parts.uri.authority().is_none() {
        return Err(ProxyError::BadRequest("HTTP/1.1 request without a Host header"));
    }
    let limit = rt.config.server.max_request_body;
    if http_body::Body::size_hint(&body).exact().is_some_and(|len| len > limit) {
        return Err(ProxyError::BodyTooLarge { limit });
    }

    // route
    let host = headers::client_host(parts);
    let host_str = host.as_ref().and_then(|h| h.to_str().ok()).map(headers::host_without_port);
    let norm = path::normalise(parts.uri.path());
    let route = rt.router.find(host_str, &norm);
    log.upstream = route.map(|r| r.upstream);

    // limit
    let limit_ids = route.map_or(&rt.server_limits[..], |r| &r.limits[..]);
    if !limit_ids.is_empty() {
        let client = limit::client_ip(conn.peer.ip(), &parts.headers, &rt.config.server.trusted_proxies);
        let checks: Vec<(&RateLimiter, limit::Key)> = limit_ids
            .iter()
            .map(|&i| {
                let l = &*rt.limits[i];
                (l, l.key(client, &parts.headers))
            })
            .collect();
        limit::admit(&checks).map_err(ProxyError::RateLimited)?;
    }
    let route = route.ok_or(ProxyError::NoRoute)?;
    let upstream = &rt.upstreams[route.upstream];
    let target = if route.strip_prefix && route.prefix != "/" {
        let rest = &norm[route.prefix.len()..];
        let rest = if rest.is_empty() { "/" } else { rest };
        let pq = match parts.uri.query() {
            Some(q) => format!("{rest}?{q}"),
            None => rest.to_owned(),
        };
        PathAndQuery::try_from(pq).map_err(|_| ProxyError::BadRequest("unusable path"))?
    } else {
        parts.uri.path_and_query().cloned().unwrap_or_else(|| PathAndQuery::from_static("/"))
    };
    // Bytes above 0x7F in the target go to the backend as the client sent them.
    let raw = parts.extensions.get::<RawTarget>().filter(|_| !route.strip_prefix);
    let target = raw.map_or(target.as_str().as_bytes(), |r| &r.0[..]);
    let upgrade = headers::requested_upgrade(parts);

    // pick + forward (retry)
    let body_empty = http_body::Body::is_end_stream(&body);
    let framing = match (body_empty, http_body::Body::size_hint(&body).exact()) {
        (true, _) => RequestFraming::Empty,
        (false, Some(len)) => RequestFraming::Length(len),
        (false, None) => RequestFraming::Chunked,
    };
    let mut body = if body_empty { RequestBody::empty() } else { RequestBody::new(body, limit) };
    let attempts = 1 + upstream.retries as usize;
    let mut tried = Tried::default();
    let mut last_error: Option<ProxyError> = None;
    for _ in 0..attempts {
        // A different backend when possible; the same one again when it is the only one.
        let picked = upstream.pick(|i| !tried.contains(i)).or_else(|| match last_error {
            Some(_) => upstream.pick(|_| true),
            None => None,
        });
        let Some((idx, trial)) = picked else { break };
        tried.insert(idx);
        let backend = &upstream.backends[idx];
        log.backend = Some(idx);
        let inflight = backend.begin();
        let fwd = Forwarded {
            client_ip: &conn.peer_ip,
            proto: if conn.tls { "https" } else { "http" },
            request_id: &log.request_id,
            host: host.as_ref(),
            preserve_host: upstream.preserve_host,
            backend: &backend.authority,
            upgrade: upgrade.as_ref(),
            underscores: rt.config.server.underscores_in_headers,
        };
        let request = Outgoing { parts, target, framing, fwd: &fwd };
        match attempt(upstream, backend, &request, &mut body).await {
            Ok((head, conn)) => {
                backend.record_response(trial);
                // The backend answered before the whole body was sent: the rest goes with
                // the response body, which sends it as the response is read.
                let upload =
                    conn.uploading().then(|| PendingUpload::new(std::mem::replace(&mut body, RequestBody::empty())));
                return Ok(Proxied { head, inflight, conn, upload });
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
