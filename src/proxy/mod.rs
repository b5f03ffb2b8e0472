//! The request path. Every request goes through these phases, in this order:
//!
//! ```text
//! check (CONNECT, framing, size) -> route -> limit -> pick -> rewrite request -> forward (retry)
//!   -> rewrite response -> stream body -> access log (when the body ends)
//! ```
//!
//! The runtime snapshot is loaded once per request and held to its end (in [`RequestLog`]).

pub mod body;
pub mod error;
pub mod headers;
mod log;
pub mod request_id;
mod upgrade;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use http::request::Parts;
use http::uri::PathAndQuery;
use http::{Method, Request, Response, StatusCode, Version, header};
use hyper::body::Incoming;

use crate::backend::{Backend, InflightGuard, PooledConn};
use crate::limit::{self, RateLimiter};
use crate::runtime::{Runtime, SharedRuntime, Upstream, path};
use crate::server::{ActivityGuard, ConnActivity};
use body::{BodyTooLarge, ClientBodyError, RequestBody, ResponseBody};
pub use error::ProxyError;
use headers::Forwarded;
pub use log::RequestLog;

/// What one client connection tells the request path about itself.
#[derive(Debug)]
pub struct ConnInfo {
    pub peer: SocketAddr,
    pub tls: bool,
    pub activity: Arc<ConnActivity>,
}

/// Serves one request from a client connection.
/// `busy` marks the connection busy from the moment hyper hands the request over.
pub async fn handle(
    runtime: SharedRuntime,
    conn: Arc<ConnInfo>,
    busy: ActivityGuard,
    mut req: Request<Incoming>,
) -> Result<Response<ResponseBody>, Infallible> {
    let rt = runtime.load_full();
    let request_id = request_id::from_headers(req.headers());
    let client_upgrade =
        if req.headers().contains_key(header::UPGRADE) { Some(hyper::upgrade::on(&mut req)) } else { None };
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
        Ok(Proxied { mut response, inflight, conn: backend_conn }) => {
            let switching = response.status() == StatusCode::SWITCHING_PROTOCOLS;
            headers::rewrite_response(response.headers_mut(), switching, &log.request_id);
            log.status = response.status().as_u16();
            if switching {
                match client_upgrade {
                    Some(client) => {
                        let backend = hyper::upgrade::on(&mut response);
                        upgrade::tunnel(client, backend, inflight, conn.activity.begin());
                        response.map(|b| ResponseBody::upstream(b, log, None, None))
                    }
                    None => ProxyError::BrokeOff {
                        backend: inflight.backend().url.clone(),
                        source: "backend switched protocols without being asked".into(),
                    }
                    .into_response(log),
                }
            } else {
                response.map(|b| ResponseBody::upstream(b, log, Some(inflight), Some(backend_conn)))
            }
        }
        Err(e) => e.into_response(log),
    })
}

/// A backend's response, with the in-flight mark that must live as long as its body and
/// the connection that returns to the pool when the body ends.
struct Proxied {
    response: Response<Incoming>,
    inflight: InflightGuard,
    conn: PooledConn,
}

async fn proxy(
    rt: &Runtime,
    conn: &ConnInfo,
    parts: &Parts,
    body: Incoming,
    log: &mut RequestLog,
) -> Result<Proxied, ProxyError> {
    // check
    if parts.method == Method::CONNECT {
        return Err(ProxyError::Connect);
    }
    // The connection guard checks framing on the raw head; this catches what it cannot
    // see (heads pipelined behind another): hyper accepts "gzip, chunked", and only the
    // chunked framing would be removed on the way to the backend.
    if parts.headers.get_all(header::TRANSFER_ENCODING).iter().any(|v| !v.as_bytes().eq_ignore_ascii_case(b"chunked")) {
        return Err(ProxyError::BadRequest("unsupported Transfer-Encoding (only a single \"chunked\" is accepted)"));
    }
    let host_headers = parts.headers.get_all(header::HOST).iter().count();
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
    let upgrade = headers::requested_upgrade(parts);

    // pick + forward (retry)
    let body_empty = http_body::Body::is_end_stream(&body);
    let mut body = Some(if body_empty { RequestBody::empty() } else { RequestBody::new(body, limit) });
    let attempts = 1 + upstream.retries as usize;
    let mut tried: Vec<usize> = Vec::new();
    let mut last_error: Option<ProxyError> = None;
    for _ in 0..attempts {
        // A different backend when possible; the same one again when it is the only one.
        let picked = upstream.pick(|i| !tried.contains(&i)).or_else(|| match last_error {
            Some(_) => upstream.pick(|_| true),
            None => None,
        });
        let Some((idx, trial)) = picked else { break };
        tried.push(idx);
        let backend = &upstream.backends[idx];
        log.backend = Some(backend.clone());
        let inflight = backend.begin();
        let fwd = Forwarded {
            client_ip: conn.peer.ip(),
            proto: if conn.tls { "https" } else { "http" },
            request_id: &log.request_id,
            host: host.as_ref(),
            preserve_host: upstream.preserve_host,
            backend: &backend.authority,
            upgrade: upgrade.as_ref(),
        };
        match attempt(upstream, backend, parts, &target, &mut body, body_empty, &fwd).await {
            Ok((response, conn)) => {
                backend.record_response(trial);
                return Ok(Proxied { response, inflight, conn });
            }
            Err(Failure { error, retryable }) => {
                if error.is_backend_failure() {
                    backend.record_failure(&upstream.passive, trial, &error);
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

struct Failure {
    error: ProxyError,
    /// Safe to try again on another backend: nothing reached the backend, or an
    /// idempotent request without a body got no response byte.
    retryable: bool,
}

/// One try on one backend, including the one resend on a fresh connection when a pooled
/// connection turns out to have been closed by the backend while it sat idle.
async fn attempt(
    upstream: &Upstream,
    backend: &Arc<Backend>,
    parts: &Parts,
    target: &PathAndQuery,
    body: &mut Option<RequestBody>,
    body_empty: bool,
    fwd: &Forwarded<'_>,
) -> Result<(Response<Incoming>, PooledConn), Failure> {
    let url = &backend.url;
    let pool = &backend.pool;
    let mut fresh_only = false;
    loop {
        let checked_out = if fresh_only { pool.connect().await } else { pool.checkout().await };
        let mut conn: PooledConn = match checked_out {
            Ok(c) => c,
            Err(crate::backend::ConnectError::Local(e)) => {
                return Err(Failure { error: ProxyError::OutOfResources(e), retryable: false });
            }
            Err(e) => {
                return Err(Failure {
                    error: ProxyError::Unreachable { backend: url.clone(), source: Box::new(e) },
                    retryable: true,
                });
            }
        };
        let mut req_body = match body.take() {
            Some(b) => b,
            None if body_empty => RequestBody::empty(),
            None => unreachable!("a consumed body is never sent again"),
        };
        // The backend's time to answer starts once the whole request is sent: a slow
        // upload is not the backend's delay.
        let body_sent = req_body.on_sent();
        let req = headers::upstream_request(parts, target.clone(), req_body, fwd);
        let after = upstream.timeouts.upstream_header;
        let read_before = conn.bytes_read();
        let deadline = async {
            if let Some(sent) = body_sent {
                let _ = sent.await;
            }
            tokio::time::sleep(after).await;
        };
        let outcome = tokio::select! {
            r = conn.sender.try_send_request(req) => r,
            () = deadline => {
                return Err(Failure {
                    error: ProxyError::UpstreamTimeout { backend: url.clone(), after },
                    retryable: false,
                });
            }
        };
        let mut err = match outcome {
            Ok(response) => return Ok((response, conn)),
            Err(e) => e,
        };
        let nothing_sent = err.take_message().is_some_and(|req| {
            *body = Some(req.into_body());
            true
        });
        let error = err.into_error();
        if let Some(too_large) = find_cause::<BodyTooLarge>(&error) {
            let limit = too_large.limit;
            return Err(Failure { error: ProxyError::BodyTooLarge { limit }, retryable: false });
        }
        if find_cause::<ClientBodyError>(&error).is_some() {
            return Err(Failure { error: ProxyError::ClientBodyBroken, retryable: false });
        }
        let replayable = body.is_some() || body_empty;
        let no_response_byte = conn.bytes_read() == read_before && closed_or_reset(&error);
        if conn.reused && !fresh_only && replayable && (nothing_sent || no_response_byte) {
            tracing::debug!(backend = %url, error = %error, "pooled connection was closed by the backend; resending on a new one");
            fresh_only = true;
            continue;
        }
        let idempotent = matches!(
            parts.method,
            Method::GET | Method::HEAD | Method::PUT | Method::DELETE | Method::OPTIONS | Method::TRACE
        );
        let retryable = replayable && (nothing_sent || (idempotent && no_response_byte));
        return Err(Failure {
            error: ProxyError::BrokeOff { backend: url.clone(), source: Box::new(error) },
            retryable,
        });
    }
}

/// The backend closed or reset the connection (rather than, say, sending garbage).
fn closed_or_reset(e: &hyper::Error) -> bool {
    if e.is_incomplete_message() || e.is_canceled() || e.is_closed() {
        return true;
    }
    find_cause::<std::io::Error>(e).is_some_and(|io| {
        matches!(
            io.kind(),
            std::io::ErrorKind::ConnectionReset
                | std::io::ErrorKind::BrokenPipe
                | std::io::ErrorKind::ConnectionAborted
        )
    })
}

fn find_cause<'e, T: std::error::Error + 'static>(e: &'e (dyn std::error::Error + 'static)) -> Option<&'e T> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(hit) = err.downcast_ref::<T>() {
            return Some(hit);
        }
        cur = err.source();
    }
    None
}
