//! Rewriting heads in both directions: hop-by-hop headers out, `X-Forwarded-*` and
//! `X-Request-Id` in, `Host` per `preserve_host`.

use std::net::IpAddr;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::request::Parts;
use http::uri::{Authority, PathAndQuery};
use http::{Request, Uri, Version};

use super::body::RequestBody;
use super::request_id::X_REQUEST_ID;

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// Headers that describe one connection, never forwarded.
fn is_hop_by_hop(name: &HeaderName) -> bool {
    name == header::CONNECTION
        || name == KEEP_ALIVE
        || name == PROXY_CONNECTION
        || name == header::TE
        || name == header::TRAILER
        || name == header::TRANSFER_ENCODING
        || name == header::UPGRADE
        || name == header::PROXY_AUTHORIZATION
        || name == header::PROXY_AUTHENTICATE
}

/// Calls `f` with each header name listed in `Connection` (lower-cased by `HeaderName`).
/// Works on the raw bytes: a token that is not text is skipped, but cannot hide the others.
fn connection_tokens(headers: &HeaderMap, mut f: impl FnMut(&str)) {
    for v in headers.get_all(header::CONNECTION) {
        for token in v.as_bytes().split(|b| *b == b',') {
            if let Ok(t) = std::str::from_utf8(token) {
                let t = t.trim();
                if !t.is_empty() {
                    f(t);
                }
            }
        }
    }
}

/// The protocol the client asked to switch to, when it asked (`Connection: upgrade` and
/// `Upgrade: ...`, HTTP/1.1 only).
pub fn requested_upgrade(parts: &Parts) -> Option<HeaderValue> {
    if parts.version != Version::HTTP_11 {
        return None;
    }
    let mut asked = false;
    connection_tokens(&parts.headers, |t| asked |= t.eq_ignore_ascii_case("upgrade"));
    if asked { parts.headers.get(header::UPGRADE).cloned() } else { None }
}

/// Copies the end-to-end headers of `src` into `dst`: not hop-by-hop, not named by
/// `Connection`, not `skip`ped.
fn copy_end_to_end(src: &HeaderMap, dst: &mut HeaderMap, skip: impl Fn(&HeaderName) -> bool) {
    let mut named: Vec<HeaderName> = Vec::new();
    connection_tokens(src, |t| {
        if let Ok(n) = HeaderName::from_bytes(t.as_bytes()) {
            named.push(n);
        }
    });
    for (name, value) in src {
        if is_hop_by_hop(name) || skip(name) || named.contains(name) {
            continue;
        }
        dst.append(name.clone(), value.clone());
    }
}

/// The client's host: the authority of an absolute-form or HTTP/2 target, else `Host`.
pub fn client_host(parts: &Parts) -> Option<HeaderValue> {
    match parts.uri.authority() {
        Some(a) => HeaderValue::from_str(a.as_str()).ok(),
        None => parts.headers.get(header::HOST).cloned(),
    }
}

/// What the request path knows that the backend should be told.
pub struct Forwarded<'a> {
    pub client_ip: IpAddr,
    pub proto: &'static str,
    pub request_id: &'a HeaderValue,
    pub host: Option<&'a HeaderValue>,
    pub preserve_host: bool,
    pub backend: &'a Authority,
    pub upgrade: Option<&'a HeaderValue>,
}

/// The head sent to a backend for `parts`, with `path` as its origin-form target.
pub fn upstream_request(
    parts: &Parts,
    path: PathAndQuery,
    body: RequestBody,
    fwd: &Forwarded<'_>,
) -> Request<RequestBody> {
    let mut req = Request::new(body);
    *req.method_mut() = parts.method.clone();
    *req.uri_mut() = Uri::from(path);
    *req.version_mut() = Version::HTTP_11;
    let headers = req.headers_mut();
    headers.reserve(parts.headers.len() + 5);
    // HTTP/2 clients may split Cookie into several fields; HTTP/1.1 wants one (RFC 9113 8.2.3).
    let join_cookies =
        parts.version == Version::HTTP_2 && parts.headers.get_all(header::COOKIE).iter().nth(1).is_some();
    copy_end_to_end(&parts.headers, headers, |n| {
        (join_cookies && n == header::COOKIE)
            || n == X_FORWARDED_FOR
            || n == X_FORWARDED_PROTO
            || n == X_FORWARDED_HOST
            || n == X_REQUEST_ID
            || n == header::HOST
            || n == header::EXPECT
    });

    if join_cookies {
        let joined: Vec<&[u8]> = parts.headers.get_all(header::COOKIE).iter().map(HeaderValue::as_bytes).collect();
        if let Ok(v) = HeaderValue::from_bytes(&joined.join(&b"; "[..])) {
            headers.insert(header::COOKIE, v);
        }
    }
    let mut xff = String::new();
    for v in parts.headers.get_all(&X_FORWARDED_FOR) {
        if let Ok(s) = v.to_str() {
            xff.push_str(s);
            xff.push_str(", ");
        }
    }
    xff.push_str(&fwd.client_ip.to_string());
    if let Ok(v) = HeaderValue::try_from(xff) {
        headers.insert(X_FORWARDED_FOR.clone(), v);
    }
    headers.insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static(fwd.proto));
    if let Some(h) = fwd.host {
        headers.insert(X_FORWARDED_HOST.clone(), h.clone());
    }
    headers.insert(X_REQUEST_ID.clone(), fwd.request_id.clone());
    let host = match (fwd.preserve_host, fwd.host) {
        (true, Some(h)) => h.clone(),
        _ => HeaderValue::from_str(fwd.backend.as_str()).expect("authority is a valid header value"),
    };
    headers.insert(header::HOST, host);
    if let Some(proto) = fwd.upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, proto.clone());
    }
    req
}

/// Strips hop-by-hop headers from a backend's response (keeping `Upgrade` on a 101) and
/// sets the request id.
pub fn rewrite_response(headers: &mut HeaderMap, switching: bool, request_id: &HeaderValue) {
    let mut named: Vec<HeaderName> = Vec::new();
    connection_tokens(headers, |t| {
        if let Ok(n) = HeaderName::from_bytes(t.as_bytes()) {
            named.push(n);
        }
    });
    for n in named {
        if !(switching && n == header::UPGRADE) {
            headers.remove(n);
        }
    }
    let upgrade = if switching { headers.remove(header::UPGRADE) } else { None };
    for n in [
        &header::CONNECTION,
        &KEEP_ALIVE,
        &PROXY_CONNECTION,
        &header::TE,
        &header::TRAILER,
        &header::TRANSFER_ENCODING,
        &header::UPGRADE,
        &header::PROXY_AUTHORIZATION,
        &header::PROXY_AUTHENTICATE,
    ] {
        headers.remove(n);
    }
    if let Some(u) = upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, u);
    }
    headers.insert(X_REQUEST_ID.clone(), request_id.clone());
}

/// `host` without its port (`[::1]:80` -> `::1`, `example.com:8080` -> `example.com`).
pub fn host_without_port(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    host.rsplit_once(':').filter(|(_, p)| p.bytes().all(|b| b.is_ascii_digit())).map_or(host, |(h, _)| h)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_and_connection_named_headers_are_dropped() {
        let req = Request::builder()
            .uri("/x?y=1")
            .header("connection", "keep-alive, x-secret")
            .header("x-secret", "1")
            .header("keep-alive", "timeout=5")
            .header("te", "trailers")
            .header("x-forwarded-for", "10.0.0.1")
            .header("host", "front.example")
            .header("accept", "*/*")
            .body(())
            .unwrap();
        let (parts, ()) = req.into_parts();
        let rid = HeaderValue::from_static("rid");
        let host = client_host(&parts);
        let backend: Authority = "127.0.0.1:9000".parse().unwrap();
        let fwd = Forwarded {
            client_ip: "192.0.2.7".parse().unwrap(),
            proto: "http",
            request_id: &rid,
            host: host.as_ref(),
            preserve_host: false,
            backend: &backend,
            upgrade: None,
        };
        let out = upstream_request(&parts, PathAndQuery::from_static("/x?y=1"), RequestBody::empty(), &fwd);
        let h = out.headers();
        assert!(h.get("x-secret").is_none() && h.get("keep-alive").is_none() && h.get("te").is_none());
        assert!(h.get("connection").is_none());
        assert_eq!(h["x-forwarded-for"], "10.0.0.1, 192.0.2.7");
        assert_eq!(h["x-forwarded-host"], "front.example");
        assert_eq!(h["host"], "127.0.0.1:9000");
        assert_eq!(h["accept"], "*/*");
        assert_eq!(h["x-request-id"], "rid");
    }

    #[test]
    fn a_non_text_connection_token_does_not_hide_the_others() {
        let mut h = HeaderMap::new();
        h.insert("connection", HeaderValue::from_bytes(b"x-secret, \xff").unwrap());
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        let mut out = HeaderMap::new();
        copy_end_to_end(&h, &mut out, |_| false);
        assert!(out.get("x-secret").is_none());
        assert!(out.get("x-kept").is_some());
    }

    #[test]
    fn ports_are_cut_from_hosts() {
        assert_eq!(host_without_port("example.com:8080"), "example.com");
        assert_eq!(host_without_port("example.com"), "example.com");
        assert_eq!(host_without_port("[::1]:80"), "::1");
    }
}
