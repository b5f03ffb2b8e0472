//! Step 2, route: which route a request takes, and the target sent to the backend.

use std::borrow::Cow;

use http::HeaderValue;
use http::request::Parts;

use super::error::ProxyError;
use super::headers;
use crate::http1::RawTarget;
use crate::path;
use crate::runtime::Runtime;
use crate::runtime::router::Route;

/// What routing found.
pub struct Routed<'rt, 'p> {
    /// `None`: no route matches (a 404, once the server-wide limits have had their say).
    pub route: Option<&'rt Route>,
    /// The client's host: the authority of an absolute-form or HTTP/2 target, else `Host`.
    pub host: Option<HeaderValue>,
    /// The normalised path routing saw (borrowed from the request when already normal).
    pub path: Cow<'p, str>,
}

/// The route for this host and normalised path (`crate::path`), longest prefix first.
#[inline]
pub fn find<'rt, 'p>(rt: &'rt Runtime, parts: &'p Parts) -> Routed<'rt, 'p> {
    let host = headers::client_host(parts);
    let host_str = host.as_ref().and_then(|h| h.to_str().ok()).map(headers::host_without_port);
    let path = path::normalise(parts.uri.path());
    let route = rt.router.find(host_str, &path);
    Routed { route, host, path }
}

/// The request target sent to the backend: the client's, unchanged (bytes above 0x7F
/// included), or under `strip_prefix` the normalised path without the prefix.
#[inline]
pub fn target<'a>(parts: &'a Parts, route: &Route, normalised: &str) -> Result<Cow<'a, [u8]>, ProxyError> {
    if route.strip_prefix && route.prefix != "/" {
        let rest = &normalised[route.prefix.len()..];
        let rest = if rest.is_empty() { "/" } else { rest };
        let pq = match parts.uri.query() {
            Some(q) => format!("{rest}?{q}"),
            None => rest.to_owned(),
        };
        http::uri::PathAndQuery::try_from(pq.as_str()).map_err(|_| ProxyError::BadRequest("unusable path"))?;
        return Ok(Cow::Owned(pq.into_bytes()));
    }
    if let Some(raw) = parts.extensions.get::<RawTarget>() {
        return Ok(Cow::Borrowed(&raw.0[..]));
    }
    Ok(Cow::Borrowed(parts.uri.path_and_query().map_or("/", |pq| pq.as_str()).as_bytes()))
}
