//! One stored response and the RFC 9111 rules about it: whether a response may be stored
//! (http-cache-semantics' `is_storable`, plus balancer's stricter rules), whether a stored
//! one is fresh for a request, the stale windows, and a client's conditional request.

use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::request::Parts;
use http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use http_cache_semantics::{BeforeRequest, CacheOptions, CachePolicy, RequestLike, ResponseLike};

/// Bytes counted for an entry besides its fields and body: the policy's copies of the
/// request and response maps, the key, moka's node.
const ENTRY_OVERHEAD: usize = 512;

/// The statuses a response may be stored with (RFC 9110 15.1's "heuristically cacheable"
/// ones, less 206: balancer does not combine ranges). Each still needs explicit freshness.
const STORABLE_STATUSES: &[u16] = &[200, 203, 204, 300, 301, 308, 404, 405, 410, 414, 501];

/// Fields a stored response does not keep: per-connection ones, the length (the server
/// writes the stored body's), and the request id (each answer carries its own).
fn not_stored(name: &str) -> bool {
    crate::http1::is_hop_by_hop(name.as_bytes()) || matches!(name, "content-length" | "x-request-id" | "cache-status")
}

/// The options for a shared cache that never guesses a freshness lifetime.
fn options() -> CacheOptions {
    CacheOptions {
        shared: true,
        cache_heuristic: 0.0,
        immutable_min_time_to_live: Duration::ZERO,
        ignore_cargo_cult: false,
    }
}

/// A request as the policy sees it: always GET (a HEAD is answered from a GET's entry)
/// and always the same resource (the key has already matched host and target).
pub(crate) struct AsGet<'a>(pub &'a Parts);

impl RequestLike for AsGet<'_> {
    fn uri(&self) -> Uri {
        self.0.uri.clone()
    }
    fn is_same_uri(&self, _other: &Uri) -> bool {
        true
    }
    fn method(&self) -> &Method {
        &Method::GET
    }
    fn headers(&self) -> &HeaderMap {
        &self.0.headers
    }
}

/// A response head as the policy sees it.
pub(crate) struct ResponseView<'a> {
    pub status: StatusCode,
    pub headers: &'a HeaderMap,
}

impl ResponseLike for ResponseView<'_> {
    fn status(&self) -> StatusCode {
        self.status
    }
    fn headers(&self) -> &HeaderMap {
        self.headers
    }
}

/// A response head found storable, waiting for its body.
#[derive(Debug, Clone)]
pub(crate) struct Storable {
    policy: CachePolicy,
    status: StatusCode,
    headers: HeaderMap,
}

/// The directives with a delta-seconds value, in `Cache-Control` fields.
fn directive(headers: &HeaderMap, name: &str) -> Option<Option<u64>> {
    for value in headers.get_all(header::CACHE_CONTROL) {
        let Ok(text) = value.to_str() else { continue };
        for part in text.split(',') {
            let (key, val) = match part.split_once('=') {
                Some((k, v)) => (k.trim(), Some(v.trim().trim_matches('"'))),
                None => (part.trim(), None),
            };
            if key.eq_ignore_ascii_case(name) {
                return Some(val.and_then(|v| v.parse().ok()));
            }
        }
    }
    None
}

fn has_directive(headers: &HeaderMap, name: &str) -> bool {
    directive(headers, name).is_some()
}

impl Storable {
    /// Whether the response `status` + `headers` to the GET `req` may be stored, by RFC
    /// 9111 section 3 for a shared cache and SPEC 14's stricter rules: never with
    /// `Set-Cookie`, never `Vary: *`, never without `s-maxage`, `max-age` or `Expires`.
    pub(crate) fn judge(req: &Parts, status: StatusCode, headers: &HeaderMap, now: SystemTime) -> Option<Storable> {
        if req.method != Method::GET || !STORABLE_STATUSES.contains(&status.as_u16()) {
            return None;
        }
        if headers.contains_key(header::SET_COOKIE) {
            return None;
        }
        let vary_star = headers
            .get_all(header::VARY)
            .iter()
            .any(|v| v.to_str().is_ok_and(|v| v.split(',').any(|t| t.trim() == "*")));
        if vary_star {
            return None;
        }
        let explicit = has_directive(headers, "s-maxage")
            || has_directive(headers, "max-age")
            || headers.contains_key(header::EXPIRES);
        if !explicit {
            return None;
        }
        let policy = CachePolicy::new_options(&AsGet(req), &ResponseView { status, headers }, now, options());
        if !policy.is_storable() {
            return None;
        }
        let mut kept = HeaderMap::with_capacity(headers.len());
        for (name, value) in headers {
            if !not_stored(name.as_str()) {
                kept.append(name.clone(), value.clone());
            }
        }
        // A response with nothing to reuse it by (no freshness left, no validator, no
        // stale window) is not worth the memory.
        let useful = !policy.time_to_live(now).is_zero()
            || kept.contains_key(header::ETAG)
            || kept.contains_key(header::LAST_MODIFIED)
            || has_directive(&kept, "stale-while-revalidate")
            || has_directive(&kept, "stale-if-error");
        useful.then_some(Storable { policy, status, headers: kept })
    }

    /// The entry with its whole `body`.
    pub(crate) fn into_entry(self, body: Bytes, now: SystemTime) -> Entry {
        Entry::new(self.policy, self.status, self.headers, body, now)
    }

    pub(crate) fn status(&self) -> StatusCode {
        self.status
    }

    /// The fields kept (no per-connection ones, no length).
    pub(crate) fn headers(&self) -> &HeaderMap {
        &self.headers
    }

    /// Whether it answers `req` as it is (fresh, and the variant `req`'s fields select):
    /// a waiter may then read it while it arrives.
    pub(crate) fn serves(&self, req: &Parts, now: SystemTime) -> bool {
        matches!(self.policy.before_request(&AsGet(req), now), BeforeRequest::Fresh(_))
    }

    /// Its `Age` at `now`, in seconds.
    pub(crate) fn age(&self, now: SystemTime) -> u64 {
        self.policy.age(now).as_secs()
    }

    /// As [`Entry::client_not_modified`].
    pub(crate) fn client_not_modified(&self, req: &HeaderMap) -> bool {
        client_not_modified(self.status, &self.headers, req)
    }

    /// As [`Entry::not_modified_fields`].
    pub(crate) fn not_modified_fields(&self) -> HeaderMap {
        not_modified_fields(&self.headers)
    }
}

/// A stored response: its head (less per-connection fields), its whole body, and the
/// policy that says when it may be reused.
#[derive(Debug)]
pub(crate) struct Entry {
    policy: CachePolicy,
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
    /// When it stops being fresh.
    fresh_until: SystemTime,
    /// How long after that it may still be served while revalidated in the background,
    /// and while the backend fails (RFC 5861); zero under `must-revalidate`.
    while_revalidate: Duration,
    if_error: Duration,
    /// Bytes counted against `max_size`.
    pub weight: u32,
    /// It has a `Vary`: only the policy can tell whether a request matches it.
    varies: bool,
}

/// How a stored entry stands for one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Freshness {
    /// Reusable as it is.
    Fresh,
    /// Stale (or the request asks for a revalidation), and this request matches it.
    Stale,
    /// Stored for other values of the fields its `Vary` names.
    OtherVariant,
}

impl Entry {
    fn new(policy: CachePolicy, status: StatusCode, headers: HeaderMap, body: Bytes, now: SystemTime) -> Entry {
        let fresh_until = now + policy.time_to_live(now);
        let no_stale = has_directive(&headers, "must-revalidate")
            || has_directive(&headers, "proxy-revalidate")
            || has_directive(&headers, "no-cache");
        let window = |name| {
            if no_stale {
                return Duration::ZERO;
            }
            Duration::from_secs(directive(&headers, name).flatten().unwrap_or(0))
        };
        let (while_revalidate, if_error) = (window("stale-while-revalidate"), window("stale-if-error"));
        let head_bytes: usize = headers.iter().map(|(n, v)| n.as_str().len() + v.len() + 32).sum();
        // The policy keeps its own copy of the response's fields and of the request's.
        let weight = (ENTRY_OVERHEAD + 2 * head_bytes + body.len()).min(u32::MAX as usize) as u32;
        let varies = headers.contains_key(header::VARY);
        Entry { policy, status, headers, body, fresh_until, while_revalidate, if_error, weight, varies }
    }

    /// Whether this entry answers `req` (a GET or a HEAD) now.
    pub(crate) fn freshness(&self, req: &Parts, now: SystemTime) -> Freshness {
        // The common hit: no `Vary`, no request directives. The policy's answer would be
        // its freshness alone, and asking it builds a response head (a map and a date)
        // that balancer does not use.
        if !self.varies && !req.headers.contains_key(header::CACHE_CONTROL) && !req.headers.contains_key(header::PRAGMA)
        {
            return if now < self.fresh_until { Freshness::Fresh } else { Freshness::Stale };
        }
        match self.policy.before_request(&AsGet(req), now) {
            BeforeRequest::Fresh(_) => Freshness::Fresh,
            BeforeRequest::Stale { matches: true, .. } => Freshness::Stale,
            BeforeRequest::Stale { matches: false, .. } => Freshness::OtherVariant,
        }
    }

    /// How long it has been stale at `now` (zero while fresh).
    fn staleness(&self, now: SystemTime) -> Duration {
        now.duration_since(self.fresh_until).unwrap_or_default()
    }

    /// Whether it may be served stale while it is revalidated in the background.
    pub(crate) fn within_while_revalidate(&self, now: SystemTime) -> bool {
        let stale = self.staleness(now);
        !stale.is_zero() && stale <= self.while_revalidate
    }

    /// Whether it may be served stale because the backend failed.
    pub(crate) fn within_if_error(&self, now: SystemTime) -> bool {
        self.staleness(now) <= self.if_error && !self.if_error.is_zero()
    }

    /// Its `Age` at `now`, in seconds.
    pub(crate) fn age(&self, now: SystemTime) -> u64 {
        self.policy.age(now).as_secs()
    }

    /// Whether it can be revalidated with a conditional request.
    pub(crate) fn has_validator(&self) -> bool {
        self.headers.contains_key(header::ETAG) || self.headers.contains_key(header::LAST_MODIFIED)
    }

    /// The validators to send to the backend: `If-None-Match` from its `ETag`,
    /// `If-Modified-Since` from its `Last-Modified`.
    pub(crate) fn conditional_fields(&self, headers: &mut HeaderMap) {
        if let Some(etag) = self.headers.get(header::ETAG) {
            headers.insert(header::IF_NONE_MATCH, etag.clone());
        }
        if let Some(lm) = self.headers.get(header::LAST_MODIFIED) {
            headers.insert(header::IF_MODIFIED_SINCE, lm.clone());
        }
    }

    /// The entry refreshed by a 304's fields (RFC 9111 4.3.4): they replace the stored
    /// ones of the same name, the body stays. `req` is the request that revalidated it.
    pub(crate) fn refreshed(&self, req: &Parts, not_modified: &HeaderMap, now: SystemTime) -> Entry {
        let mut headers = self.headers.clone();
        for name in not_modified.keys() {
            if not_stored(name.as_str())
                || *name == header::CONTENT_TYPE
                || *name == header::CONTENT_ENCODING
                || *name == header::CONTENT_RANGE
            {
                continue;
            }
            headers.remove(name);
            for value in not_modified.get_all(name) {
                headers.append(name.clone(), value.clone());
            }
        }
        let view = ResponseView { status: self.status, headers: &headers };
        let policy = CachePolicy::new_options(&AsGet(req), &view, now, options());
        Entry::new(policy, self.status, headers, self.body.clone(), now)
    }

    /// Whether the client's `If-None-Match` (or, without one, `If-Modified-Since`)
    /// matches this entry, so that it gets 304 (RFC 9110 13.1.2, 13.1.3).
    pub(crate) fn client_not_modified(&self, req: &HeaderMap) -> bool {
        client_not_modified(self.status, &self.headers, req)
    }

    /// The fields a 304 from the cache carries (RFC 9110 15.4.5).
    pub(crate) fn not_modified_fields(&self) -> HeaderMap {
        not_modified_fields(&self.headers)
    }
}

/// Whether the client's conditional `req` fields match a stored `status` + `stored`.
fn client_not_modified(status: StatusCode, stored: &HeaderMap, req: &HeaderMap) -> bool {
    if status != StatusCode::OK {
        return false;
    }
    if let Some(inm) = req.get(header::IF_NONE_MATCH) {
        let Some(etag) = stored.get(header::ETAG).and_then(|e| e.to_str().ok()) else {
            return false;
        };
        let weak = |t: &str| t.trim().trim_start_matches("W/").to_owned();
        let ours = weak(etag);
        return req
            .get_all(header::IF_NONE_MATCH)
            .iter()
            .chain(std::iter::once(inm))
            .any(|v| v.to_str().is_ok_and(|v| v.split(',').any(|t| t.trim() == "*" || weak(t) == ours)));
    }
    let since = req.get(header::IF_MODIFIED_SINCE).and_then(|v| httpdate::parse_http_date(v.to_str().ok()?).ok());
    let modified = stored.get(header::LAST_MODIFIED).and_then(|v| httpdate::parse_http_date(v.to_str().ok()?).ok());
    matches!((since, modified), (Some(s), Some(m)) if m <= s)
}

/// The stored fields a 304 carries.
fn not_modified_fields(stored: &HeaderMap) -> HeaderMap {
    let mut out = HeaderMap::new();
    for name in [
        header::CACHE_CONTROL,
        header::CONTENT_LOCATION,
        header::DATE,
        header::ETAG,
        header::EXPIRES,
        header::VARY,
        header::LAST_MODIFIED,
    ] {
        for v in stored.get_all(&name) {
            out.append(name.clone(), v.clone());
        }
    }
    out
}

/// `Age` as a field value.
pub(crate) fn age_value(secs: u64) -> HeaderValue {
    HeaderValue::from(secs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get(fields: &[(&str, &str)]) -> Parts {
        let mut b = http::Request::builder().method(Method::GET).uri("/a");
        for (n, v) in fields {
            b = b.header(*n, *v);
        }
        b.body(()).unwrap().into_parts().0
    }

    fn head(fields: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (n, v) in fields {
            h.append(http::HeaderName::from_bytes(n.as_bytes()).unwrap(), v.parse().unwrap());
        }
        h
    }

    fn judge(req: &[(&str, &str)], res: &[(&str, &str)]) -> bool {
        Storable::judge(&get(req), StatusCode::OK, &head(res), SystemTime::now()).is_some()
    }

    #[test]
    fn storable_needs_explicit_freshness_and_no_forbidding_directive() {
        assert!(judge(&[], &[("cache-control", "max-age=10")]));
        assert!(judge(&[], &[("cache-control", "s-maxage=10")]));
        assert!(judge(&[], &[("expires", &httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(60)))]));
        assert!(!judge(&[], &[("last-modified", "Mon, 01 Jan 2024 00:00:00 GMT")]), "no heuristics");
        assert!(!judge(&[], &[("cache-control", "max-age=10, no-store")]));
        assert!(!judge(&[], &[("cache-control", "private, max-age=10")]));
        assert!(!judge(&[], &[("cache-control", "max-age=10"), ("set-cookie", "a=b")]));
        assert!(!judge(&[], &[("cache-control", "max-age=10"), ("vary", "*")]));
        assert!(!judge(&[("authorization", "Bearer x")], &[("cache-control", "max-age=10")]));
        assert!(judge(&[("authorization", "Bearer x")], &[("cache-control", "public, max-age=10")]));
        assert!(judge(&[("authorization", "Bearer x")], &[("cache-control", "s-maxage=10")]));
    }

    #[test]
    fn vary_selects_a_variant_and_stale_windows_count_from_expiry() {
        let now = SystemTime::now();
        let req = get(&[("accept-encoding", "gzip")]);
        let res = head(&[("cache-control", "max-age=1, stale-while-revalidate=5"), ("vary", "accept-encoding")]);
        let entry = Storable::judge(&req, StatusCode::OK, &res, now).unwrap().into_entry(Bytes::from_static(b"x"), now);
        assert_eq!(entry.freshness(&req, now), Freshness::Fresh);
        assert_eq!(entry.freshness(&get(&[("accept-encoding", "br")]), now), Freshness::OtherVariant);
        let later = now + Duration::from_secs(3);
        assert_eq!(entry.freshness(&req, later), Freshness::Stale);
        assert!(entry.within_while_revalidate(later));
        assert!(!entry.within_while_revalidate(now + Duration::from_secs(7)));
        assert!(!entry.within_if_error(later));
    }

    #[test]
    fn the_quick_freshness_check_agrees_with_the_policy() {
        let now = SystemTime::now();
        let res = head(&[("cache-control", "max-age=2"), ("age", "1")]);
        let entry = Storable::judge(&get(&[]), StatusCode::OK, &res, now).unwrap().into_entry(Bytes::new(), now);
        for (at, want) in [(0, Freshness::Fresh), (2, Freshness::Stale), (5, Freshness::Stale)] {
            let t = now + Duration::from_millis(at * 1000 + 10);
            assert_eq!(entry.freshness(&get(&[]), t), want, "quick, at +{at}s");
            assert_eq!(entry.freshness(&get(&[("cache-control", "max-stale=0")]), t), want, "policy, at +{at}s");
        }
        // The request's own directives go to the policy.
        assert_eq!(entry.freshness(&get(&[("cache-control", "no-cache")]), now), Freshness::Stale);
    }

    #[test]
    fn client_conditionals_match_the_entry() {
        let now = SystemTime::now();
        let res = head(&[
            ("cache-control", "max-age=10"),
            ("etag", "\"v1\""),
            ("last-modified", "Mon, 01 Jan 2024 00:00:00 GMT"),
        ]);
        let entry = Storable::judge(&get(&[]), StatusCode::OK, &res, now).unwrap().into_entry(Bytes::new(), now);
        assert!(entry.client_not_modified(&head(&[("if-none-match", "\"v0\", W/\"v1\"")])));
        assert!(!entry.client_not_modified(&head(&[("if-none-match", "\"v2\"")])));
        assert!(entry.client_not_modified(&head(&[("if-modified-since", "Tue, 02 Jan 2024 00:00:00 GMT")])));
        assert!(!entry.client_not_modified(&head(&[("if-modified-since", "Sun, 31 Dec 2023 00:00:00 GMT")])));
    }
}
