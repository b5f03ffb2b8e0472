//! The cache step, for routes with `cache = "NAME"` (SPEC 14): a GET or HEAD is answered
//! from the route's cache when an entry is fresh; otherwise it is forwarded (one request
//! for concurrent misses on a key, a conditional one for a stale entry with a validator).
//! A storable response is read from the backend by a task of its own into the cache's
//! tee: the client and every request waiting on the key read it from there as it arrives,
//! and it is stored once its body is whole, whoever has left by then. A POST, PUT, PATCH or DELETE that
//! succeeds drops its target's entries. Every response carries `Cache-Status`.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::request::Parts;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::BodyExt;

use super::body::{ClientBody, ResponseBody};
use super::conn::{ConnActivity, ConnInfo};
use super::error::ProxyError;
use super::forward::{self, Proxied};
use super::log::RequestLog;
use super::request_id::{RequestId, X_REQUEST_ID};
use crate::backend::{ConnBody, Framing, InflightGuard};
use crate::balance::Affinity;
use crate::cache::{Cache, Counted, Entry, Fill, Found, Next, Outcome, Reader, Role, Storable, age_value};
use crate::http1::server::IncomingBody;
use crate::runtime::Runtime;

/// RFC 9211's field.
static CACHE_STATUS: HeaderName = HeaderName::from_static("cache-status");

/// What the request path does after the cache step.
pub(super) enum Reply {
    /// The backend's response (its body may go into the store: [`Note::teeing`]).
    Proxied(Proxied),
    /// An answer from a stored entry, or from a response another request is fetching.
    Stored(Stored),
}

/// A response going into the store: the writing side, fed by a task of its own once the
/// response is made ([`Teeing::start`]), and this request's reader.
pub(super) struct Teeing {
    fill: Fill,
    reader: Reader,
    /// The longest the backend may send nothing (its `upstream_header` timeout).
    quiet: Duration,
}

impl Teeing {
    /// Starts reading the backend's `body` into the store; gives this request's body.
    /// The client leaving then cancels nothing: the task reads on for the others.
    pub(super) fn start(self, body: ConnBody, inflight: InflightGuard, log: Box<RequestLog>) -> ResponseBody {
        tokio::spawn(fill(self.fill, body, inflight, self.quiet));
        ResponseBody::shared(self.reader, log)
    }
}

/// Reads a backend's `body` into `fill` to its end, then gives the connection back to its
/// pool; a backend that sends nothing for `quiet` is cut off (nothing is stored).
async fn fill(mut fill: Fill, mut body: ConnBody, inflight: InflightGuard, quiet: Duration) {
    loop {
        match tokio::time::timeout(quiet, body.frame()).await {
            Ok(Some(Ok(frame))) => {
                if let Ok(data) = frame.into_data()
                    && fill.push(data).await == Next::Stop
                {
                    return;
                }
            }
            Ok(Some(Err(e))) => return fill.broke(&e),
            Ok(None) => break,
            Err(_) => return fill.broke(&format_args!("the backend sent nothing for {quiet:?}")),
        }
    }
    if let Some(c) = body.take_reusable() {
        inflight.backend().pool.release(c);
    }
    fill.finish();
}

/// A response the cache step makes itself.
pub(super) struct Stored {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: StoredBody,
}

pub(super) enum StoredBody {
    /// A stored entry's.
    Whole(Bytes),
    /// Read as it arrives from the response another request is fetching.
    Arriving(Reader),
}

impl Stored {
    /// The client's response; `log` goes with its body.
    pub(super) fn into_response(self, mut log: Box<RequestLog>) -> Response<ResponseBody> {
        log.status = self.status.as_u16();
        let mut headers = self.headers;
        headers.insert(X_REQUEST_ID.clone(), log.request_id.to_header_value());
        let body = match self.body {
            StoredBody::Whole(bytes) => ResponseBody::full(bytes, log),
            StoredBody::Arriving(reader) => ResponseBody::shared(reader, log),
        };
        let mut response = Response::new(body);
        *response.status_mut() = self.status;
        *response.headers_mut() = headers;
        response
    }
}

/// What the cache did for one request on a cached route: written into `Cache-Status`
/// and counted once its response is made.
pub(super) struct Note {
    cache: Arc<Cache>,
    status: Cow<'static, str>,
    counted: Counted,
    /// The response being stored, for the respond step.
    pub teeing: Option<Teeing>,
}

impl Note {
    /// A request on a route with `cache`: a bypass until the cache step says otherwise
    /// (a refused or malformed request never reaches it).
    pub(super) fn new(cache: Arc<Cache>) -> Note {
        Note { cache, status: Cow::Borrowed("balancer; fwd=bypass"), counted: Counted::Bypass, teeing: None }
    }

    fn set(&mut self, counted: Counted, status: impl Into<Cow<'static, str>>) {
        self.counted = counted;
        self.status = status.into();
    }

    /// Adds `Cache-Status` to `response` and counts the result.
    pub(super) fn finish(self, response: &mut Response<ResponseBody>) {
        self.cache.count(self.counted);
        let value = match self.status {
            Cow::Borrowed(s) => HeaderValue::from_static(s),
            Cow::Owned(s) => HeaderValue::try_from(s).unwrap_or_else(|_| HeaderValue::from_static("balancer")),
        };
        response.headers_mut().insert(CACHE_STATUS.clone(), value);
    }
}

/// Where a request goes when it is forwarded: owned, so that a background revalidation
/// can take it along.
#[derive(Clone)]
pub(super) struct Destination {
    pub upstream: usize,
    pub affinity: Affinity,
    pub target: Vec<u8>,
    pub host: Option<HeaderValue>,
}

/// The cache key of a request: the client's host and its target as sent.
fn request_key(parts: &Parts, host: Option<&HeaderValue>) -> Arc<str> {
    let host = host.and_then(|h| h.to_str().ok()).unwrap_or("");
    let target = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    crate::cache::key(host, target)
}

/// An empty request body, for the requests the cache makes itself.
fn no_body() -> ClientBody {
    ClientBody::Http1(IncomingBody { io: None })
}

/// A GET like `parts` with `headers`.
fn get_with(parts: &Parts, headers: HeaderMap) -> Parts {
    let (mut copy, ()) = Request::new(()).into_parts();
    copy.method = Method::GET;
    copy.uri = parts.uri.clone();
    copy.version = parts.version;
    copy.headers = headers;
    copy
}

/// `parts`' fields less the client's conditionals (the cache answers those itself), plus
/// the validators of `stale`, if any.
fn fields_to_send(parts: &Parts, stale: Option<&Entry>) -> HeaderMap {
    let mut headers = parts.headers.clone();
    for name in [header::IF_NONE_MATCH, header::IF_MODIFIED_SINCE, header::IF_MATCH, header::IF_UNMODIFIED_SINCE] {
        headers.remove(name);
    }
    if let Some(e) = stale {
        e.conditional_fields(&mut headers);
    }
    headers
}

/// The answer `entry` gives to `parts` (a 304 when the client's conditional matches).
fn answer(entry: &Entry, parts: &Parts, now: SystemTime) -> Stored {
    let age = age_value(entry.age(now));
    if entry.client_not_modified(&parts.headers) {
        let mut headers = entry.not_modified_fields();
        headers.insert(header::AGE, age);
        return Stored { status: StatusCode::NOT_MODIFIED, headers, body: StoredBody::Whole(Bytes::new()) };
    }
    let mut headers = entry.headers.clone();
    headers.insert(header::AGE, age);
    if entry.status != StatusCode::NO_CONTENT {
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(entry.body.len()));
    }
    let body = if parts.method == Method::HEAD { Bytes::new() } else { entry.body.clone() };
    Stored { status: entry.status, headers, body: StoredBody::Whole(body) }
}

/// The answer for a waiter from the response its flight's leader is fetching: when it is
/// the variant `parts` selects and fresh for it (a 304 when the client's conditional
/// matches). `None`: the waiter goes to the backend itself.
fn read_along(tee: &Arc<crate::cache::Tee>, parts: &Parts) -> Option<Reply> {
    let now = SystemTime::now();
    let head = tee.head();
    if !head.serves(parts, now) {
        return None;
    }
    let age = age_value(head.age(now));
    if head.client_not_modified(&parts.headers) {
        let mut headers = head.not_modified_fields();
        headers.insert(header::AGE, age);
        let body = StoredBody::Whole(Bytes::new());
        return Some(Reply::Stored(Stored { status: StatusCode::NOT_MODIFIED, headers, body }));
    }
    let body = tee.reader()?;
    let mut headers = head.headers().clone();
    headers.insert(header::AGE, age);
    if let Some(n) = tee.length().filter(|_| head.status() != StatusCode::NO_CONTENT) {
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(n));
    }
    Some(Reply::Stored(Stored { status: head.status(), headers, body: StoredBody::Arriving(body) }))
}

/// Gives a bodiless response's connection back to its pool.
fn release(proxied: Proxied) {
    let Proxied { head, inflight, conn, upload, .. } = proxied;
    let mut body = conn.into_body(head.framing, upload);
    if http_body::Body::is_end_stream(&body)
        && let Some(c) = body.take_reusable()
    {
        inflight.backend().pool.release(c);
    }
}

/// The backend's fields as a map, for the policy.
fn fields(proxied: &Proxied) -> HeaderMap {
    proxied.head.fields.to_header_map(0).unwrap_or_default()
}

/// The cache step. `parts` is the client's request; `dest` where it goes if forwarded.
#[allow(clippy::too_many_arguments)]
pub(super) async fn serve(
    cache: &Arc<Cache>,
    rt: &Runtime,
    conn: &Arc<ConnInfo>,
    parts: &Parts,
    dest: Destination,
    body: ClientBody,
    log: &mut RequestLog,
    note: &mut Note,
) -> Result<Reply, ProxyError> {
    let upstream = &rt.upstreams[dest.upstream];
    let key = request_key(parts, dest.host.as_ref());
    let readable = parts.method == Method::GET || parts.method == Method::HEAD;
    if !readable || !http_body::Body::is_end_stream(&body) || parts.headers.contains_key(header::RANGE) {
        // Not answered from the cache; an unsafe method that succeeds changes the resource.
        let proxied =
            forward::forward(rt, conn, parts, upstream, dest.affinity, &dest.target, dest.host.as_ref(), body, log)
                .await?;
        let unsafe_method = matches!(parts.method, Method::POST | Method::PUT | Method::PATCH | Method::DELETE);
        if unsafe_method && proxied.head.status.as_u16() < 400 {
            cache.invalidate(&key);
        }
        return Ok(Reply::Proxied(proxied));
    }

    // The policy matches a stored request's `Host` to the new one's: an HTTP/2 request
    // (whose host is its authority) gets the field, so that both protocols share entries.
    let with_host;
    let parts = match &dest.host {
        Some(h) if !parts.headers.contains_key(header::HOST) => {
            let mut headers = parts.headers.clone();
            headers.insert(header::HOST, h.clone());
            let mut copy = get_with(parts, headers);
            copy.method = parts.method.clone();
            with_host = copy;
            &with_host
        }
        _ => parts,
    };
    let mut collapsed = false;
    let mut leader = None;
    let found = loop {
        let now = SystemTime::now();
        let found = cache.lookup(&key, parts, now);
        match &found {
            Found::Fresh(e) => {
                if collapsed {
                    note.set(Counted::Hit, "balancer; fwd=miss; collapsed");
                } else {
                    note.set(Counted::Hit, "balancer; hit");
                }
                return Ok(Reply::Stored(answer(e, parts, now)));
            }
            Found::Stale(e) if e.within_while_revalidate(now) => {
                if let Some(l) = cache.try_lead(&key) {
                    let sent = get_with(parts, fields_to_send(parts, Some(e)));
                    let job =
                        Revalidation { cache: cache.clone(), key: key.clone(), entry: e.clone(), sent, leader: l };
                    tokio::spawn(job.run(log.runtime.clone(), conn.clone(), dest.clone(), log.request_id.clone()));
                }
                note.set(Counted::Stale, "balancer; hit; detail=stale-while-revalidate");
                return Ok(Reply::Stored(answer(e, parts, now)));
            }
            _ => {}
        }
        // HEAD is answered from a GET's entry, never stored: it goes on alone.
        if collapsed || parts.method == Method::HEAD {
            break found;
        }
        match cache.join(&key) {
            Role::Leader(l) => {
                // A fetch may have stored its response between the look above and now.
                let now = SystemTime::now();
                if let Found::Fresh(e) = cache.lookup(&key, parts, now) {
                    l.finish(Outcome::Stored);
                    note.set(Counted::Hit, "balancer; hit");
                    return Ok(Reply::Stored(answer(&e, parts, now)));
                }
                leader = Some(l);
                break found;
            }
            // After a fetch that stored, the next look finds the entry (unless this
            // request's `Vary` fields select another); after one that could not store,
            // nothing fresh: either way, without a fresh entry this request goes alone.
            Role::Waiter(w) => match w.outcome().await {
                Outcome::Streaming(tee) => {
                    if let Some(streamed) = read_along(&tee, parts) {
                        note.set(Counted::Hit, "balancer; fwd=miss; collapsed");
                        return Ok(streamed);
                    }
                    collapsed = true;
                }
                Outcome::Stored | Outcome::Pass => collapsed = true,
                Outcome::Abandoned => {}
            },
        }
    };

    let fwd = match found {
        Found::Stale(_) => "stale",
        Found::OtherVariant => "vary-miss",
        _ => "miss",
    };
    let stale = match found {
        Found::Stale(e) => Some(e),
        _ => None,
    };
    // A HEAD goes on as it came: a 304 to it would answer the client's own condition,
    // not the entry's validators.
    let validating = stale.as_ref().filter(|e| e.has_validator() && parts.method == Method::GET);
    let client_conditional =
        parts.headers.contains_key(header::IF_NONE_MATCH) || parts.headers.contains_key(header::IF_MODIFIED_SINCE);
    let sent = (validating.is_some() || client_conditional)
        .then(|| get_with(parts, fields_to_send(parts, validating.map(|e| &**e))));
    let sent_parts = sent.as_ref().map_or(parts, |s| s);
    let result = forward::forward(
        rt,
        conn,
        if parts.method == Method::HEAD { parts } else { sent_parts },
        upstream,
        dest.affinity,
        &dest.target,
        dest.host.as_ref(),
        body,
        log,
    )
    .await;
    let now = SystemTime::now();
    let counted = if stale.is_some() { Counted::Stale } else { Counted::Miss };
    let proxied = match result {
        Ok(p) => p,
        Err(e) => {
            if let Some(entry) = stale.filter(|s| s.within_if_error(now)) {
                finish(leader, Outcome::Pass);
                let code = super::Answer::of(&e).status.as_u16();
                note.set(Counted::Stale, format!("balancer; fwd=stale; fwd-status={code}; detail=stale-if-error"));
                return Ok(Reply::Stored(answer(&entry, parts, now)));
            }
            finish(leader, Outcome::Pass);
            note.set(counted, format!("balancer; fwd={fwd}; detail=error"));
            return Err(e);
        }
    };
    let status = proxied.head.status;
    let code = status.as_u16();
    if let (StatusCode::NOT_MODIFIED, Some(entry)) = (status, validating) {
        let headers = fields(&proxied);
        release(proxied);
        let refreshed = cache.insert(&key, parts, entry.refreshed(sent_parts, &headers, now));
        finish(leader, Outcome::Stored);
        note.set(Counted::Revalidated, "balancer; fwd=stale; fwd-status=304");
        return Ok(Reply::Stored(answer(&refreshed, parts, now)));
    }
    if status.is_server_error()
        && let Some(entry) = stale.as_ref().filter(|s| s.within_if_error(now))
    {
        drop(proxied);
        finish(leader, Outcome::Pass);
        note.set(Counted::Stale, format!("balancer; fwd=stale; fwd-status={code}; detail=stale-if-error"));
        return Ok(Reply::Stored(answer(entry, parts, now)));
    }
    if parts.method == Method::HEAD {
        note.set(counted, format!("balancer; fwd={fwd}; fwd-status={code}"));
        return Ok(Reply::Proxied(proxied));
    }
    let storable = match proxied.head.framing {
        Framing::Length(n) if n > cache.config.max_object => None,
        Framing::Upgrade => None,
        _ => Storable::judge(sent_parts, status, &fields(&proxied), now),
    };
    match storable {
        Some(head) => {
            let length = match proxied.head.framing {
                Framing::Length(n) => Some(n),
                _ => None,
            };
            let request = get_with(parts, parts.headers.clone());
            let (fill, reader) = Fill::open(cache.clone(), key, request, head, leader, length);
            note.teeing = Some(Teeing { fill, reader, quiet: upstream.timeouts.upstream_header });
            note.set(counted, format!("balancer; fwd={fwd}; fwd-status={code}; stored"));
        }
        None => {
            finish(leader, Outcome::Pass);
            note.set(counted, format!("balancer; fwd={fwd}; fwd-status={code}"));
        }
    }
    Ok(Reply::Proxied(proxied))
}

fn finish(leader: Option<crate::cache::Leader>, outcome: Outcome) {
    if let Some(l) = leader {
        l.finish(outcome);
    }
}

/// A stale entry's revalidation in the background, while the entry is served
/// (`stale-while-revalidate`). It leads its key's flight, so there is one at a time.
struct Revalidation {
    cache: Arc<Cache>,
    key: Arc<str>,
    entry: Arc<Entry>,
    /// The conditional GET.
    sent: Parts,
    leader: crate::cache::Leader,
}

impl Revalidation {
    async fn run(self, rt: Arc<Runtime>, conn: Arc<ConnInfo>, dest: Destination, request_id: RequestId) {
        let Revalidation { cache, key, entry, sent, leader } = self;
        // Logged like any request, but holding no client connection busy.
        let mut log = Box::new(RequestLog {
            start: Instant::now(),
            client: conn.peer,
            method: Method::GET,
            uri: sent.uri.clone(),
            request_id,
            trace: super::trace::TraceContext::from_headers(&sent.headers),
            status: 499,
            runtime: rt.clone(),
            upstream: Some(dest.upstream),
            backend: None,
            bytes: 0,
            broken: false,
            _activity: Arc::new(ConnActivity::default()).begin(),
        });
        let upstream = &rt.upstreams[dest.upstream];
        let result = forward::forward(
            &rt,
            &conn,
            &sent,
            upstream,
            dest.affinity,
            &dest.target,
            dest.host.as_ref(),
            no_body(),
            &mut log,
        )
        .await;
        let now = SystemTime::now();
        let proxied = match result {
            Ok(p) => p,
            Err(_) => return leader.finish(Outcome::Pass),
        };
        log.status = proxied.head.status.as_u16();
        if proxied.head.status == StatusCode::NOT_MODIFIED {
            let headers = fields(&proxied);
            release(proxied);
            cache.insert(&key, &sent, entry.refreshed(&sent, &headers, now));
            return leader.finish(Outcome::Stored);
        }
        let storable = match proxied.head.framing {
            Framing::Length(n) if n > cache.config.max_object => None,
            Framing::Upgrade => None,
            _ => Storable::judge(&sent, proxied.head.status, &fields(&proxied), now),
        };
        let Some(head) = storable else {
            return leader.finish(Outcome::Pass);
        };
        let length = match proxied.head.framing {
            Framing::Length(n) => Some(n),
            _ => None,
        };
        let Proxied { head: backend_head, inflight, conn: backend_conn, upload, .. } = proxied;
        // Its own reader goes unread: the waiters of its flight read theirs.
        let (tee, _) = Fill::open(cache, key, sent, head, Some(leader), length);
        let body = backend_conn.into_body(backend_head.framing, upload);
        fill(tee, body, inflight, upstream.timeouts.upstream_header).await;
    }
}
