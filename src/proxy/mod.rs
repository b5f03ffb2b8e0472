//! The request path. Every request goes through these steps, in this order, each a
//! function in a file of its name:
//!
//! ```text
//! check -> route -> admit -> forward (pick, send, retry, resend) -> respond -> log
//! ```
//!
//! - [`check::request`]: what is refused before anything else (CONNECT, TRACE, `Host`,
//!   framing the connection could not judge, a declared body over the limit).
//! - [`route::find`]: the route, by host and normalised path; [`route::target`]: what is
//!   sent as the request target.
//! - [`admit::limits`]: the rate limits that apply (server-wide and the route's);
//!   [`admit::shared`] for those kept in `[limit_store]`.
//! - [`affinity::of`]: what the request says about its backend (its `hash_key`, its sticky
//!   cookie), for the upstreams that ask.
//! - [`cache::serve`], on routes with `cache`: an answer from the route's cache, or the
//!   forward below with one request per missed key, and the body kept for the store.
//! - [`forward::forward`]: picks a backend (`balance`), sends the request, reads the head;
//!   retries on another backend when safe, resends once on a fresh connection.
//! - [`respond::response`]: the client's response from the backend's head (or the tunnel).
//! - [`log`]: the access-log line, written when the response body ends ([`RequestLog`]).
//!
//! Alongside: [`request_id`] (`X-Request-Id`) and [`trace`] (W3C `traceparent`), read
//! once in [`handle`], written into the backend's head by [`headers`] and into the log.
//!
//! Anything balancer answers itself is a [`ProxyError`], told by [`Answer::of`]. The
//! runtime snapshot is loaded once per request and held to its end (in [`RequestLog`]).

mod admit;
mod affinity;
mod answer;
pub mod body;
mod cache;
mod check;
mod conn;
pub mod error;
mod forward;
pub mod headers;
mod log;
pub mod request_id;
mod respond;
mod route;
pub mod trace;
mod upgrade;

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use http::request::Parts;
use http::{Request, Response, header};

use crate::http1::server::PendingUpgrade;
use crate::runtime::Runtime;
pub use answer::Answer;
use body::{ClientBody, ResponseBody};
use cache::Reply;
pub use conn::{ActivityGuard, ConnActivity, ConnInfo, Transport};
pub use error::ProxyError;
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
    let trace = trace::TraceContext::from_headers(req.headers());
    let client_upgrade = if crate::http1::value(req.headers(), &header::UPGRADE).is_some() {
        Some(match req.extensions_mut().remove::<PendingUpgrade>() {
            Some(pending) => ClientUpgrade::Http1(pending.take()),
            None => ClientUpgrade::Hyper(hyper::upgrade::on(&mut req)),
        })
    } else {
        None
    };
    // Boxed where it is made: it goes with the response body, and each move of its
    // 336 bytes on the way would be a copy.
    let mut log = Box::new(RequestLog {
        start: Instant::now(),
        client: conn.peer,
        method: req.method().clone(),
        uri: req.uri().clone(),
        request_id,
        trace,
        // Stays 499 (nginx's "client closed request") if the client leaves before a head.
        status: 499,
        runtime: rt.clone(),
        upstream: None,
        backend: None,
        bytes: 0,
        broken: false,
        _activity: busy,
    });
    let (parts, body) = req.into_parts();
    // Set once the route has a cache: every response on it says what the cache did.
    let mut note: Option<cache::Note> = None;
    let mut response = match proxy(&rt, &conn, &parts, body, &mut log, &mut note).await {
        Ok(Reply::Proxied(proxied)) => {
            let teeing = note.as_mut().and_then(|n| n.teeing.take());
            respond::response(proxied, &conn, client_upgrade, log, teeing)
        }
        Ok(Reply::Stored(stored)) => stored.into_response(log),
        Err(e) => e.into_response(log),
    };
    if let Some(note) = note {
        note.finish(&mut response);
    }
    Ok(response)
}

/// The steps up to a backend's response head.
async fn proxy(
    rt: &Runtime,
    conn: &Arc<ConnInfo>,
    parts: &Parts,
    body: ClientBody,
    log: &mut RequestLog,
    note: &mut Option<cache::Note>,
) -> Result<Reply, ProxyError> {
    check::request(rt, parts, &body)?;
    let routed = route::find(rt, parts);
    log.upstream = routed.route.map(|r| r.upstream);
    if let Some(cache) = routed.route.and_then(|r| r.cache.as_ref()) {
        *note = Some(cache::Note::new(cache.clone()));
    }
    if let Some(pending) = admit::limits(rt, conn, parts, routed.route)? {
        // Boxed: requests without shared limits do not carry the store call's state.
        Box::pin(admit::shared(pending)).await?;
    }
    let route = routed.route.ok_or(ProxyError::NoRoute)?;
    let target = route::target(parts, route, &routed.path)?;
    let upstream = &rt.upstreams[route.upstream];
    let affinity = affinity::of(rt, conn, parts, &routed.path, upstream);
    if let (Some(cache), Some(note)) = (&route.cache, note.as_mut()) {
        let dest = cache::Destination {
            upstream: route.upstream,
            affinity,
            target: target.into_owned(),
            host: routed.host.clone(),
        };
        return cache::serve(cache, rt, conn, parts, dest, body, log, note).await;
    }
    forward::forward(rt, conn, parts, upstream, affinity, &target, routed.host.as_ref(), body, log)
        .await
        .map(Reply::Proxied)
}
