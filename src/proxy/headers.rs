//! Rewriting heads in both directions: hop-by-hop headers out, `X-Forwarded-*`,
//! `X-Request-Id` and `traceparent` in, `Host` per `preserve_host`.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::request::Parts;
use http::uri::Authority;
use http::{Method, Version};

use super::request_id::{RequestId, X_REQUEST_ID};
use super::trace::{TRACEPARENT, TRACESTATE, TraceContext};
use crate::backend::RequestFraming;
use crate::http1::{HOP_BY_HOP, RawFields, put_field, value, values};

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

fn is_hop_by_hop(name: &HeaderName) -> bool {
    crate::http1::is_hop_by_hop(name.as_str().as_bytes())
}

/// Calls `f` with each header name listed in `Connection` (lower-cased by `HeaderName`).
/// Works on the raw bytes: a token that is not text is skipped, but cannot hide the others.
pub(crate) fn connection_tokens(headers: &HeaderMap, mut f: impl FnMut(&str)) {
    for v in values(headers, &header::CONNECTION) {
        for token in crate::http1::tokens(v.as_bytes()) {
            if let Ok(t) = std::str::from_utf8(token) {
                f(t);
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

/// Whether `name` must not travel past this hop: hop-by-hop, or listed in `Connection`.
fn is_connection_specific(name: &HeaderName, headers: &HeaderMap, has_connection: bool) -> bool {
    if is_hop_by_hop(name) {
        return true;
    }
    if !has_connection {
        return false;
    }
    let mut named = false;
    connection_tokens(headers, |t| named |= t.eq_ignore_ascii_case(name.as_str()));
    named
}

/// The client's host: the authority of an absolute-form or HTTP/2 target, else `Host`.
pub fn client_host(parts: &Parts) -> Option<HeaderValue> {
    match parts.uri.authority() {
        Some(a) => HeaderValue::from_str(a.as_str()).ok(),
        None => value(&parts.headers, &header::HOST).cloned(),
    }
}

/// What the request path knows that the backend should be told.
pub struct Forwarded<'a> {
    /// The peer's address as text (formatted once per connection).
    pub client_ip: &'a str,
    pub proto: &'static str,
    pub request_id: &'a RequestId,
    /// The backend's `traceparent` (balancer's span as the parent); the client's
    /// `tracestate` goes along only when its trace is continued.
    pub trace: &'a TraceContext,
    pub host: Option<&'a HeaderValue>,
    pub preserve_host: bool,
    pub backend: &'a Authority,
    pub upgrade: Option<&'a HeaderValue>,
    /// `server.underscores_in_headers`: forward fields whose names contain `_`.
    pub underscores: bool,
}

/// The bytes of a reg-name or IPv4 address (RFC 3986 3.2.2: unreserved, sub-delims, `%`).
const HOST_BYTE: [bool; 256] = {
    let mut t = [false; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        t[b] = c.is_ascii_alphanumeric()
            || matches!(
                c,
                b'-' | b'.'
                    | b'_'
                    | b'~'
                    | b'%'
                    | b'!'
                    | b'$'
                    | b'&'
                    | b'\''
                    | b'('
                    | b')'
                    | b'*'
                    | b'+'
                    | b','
                    | b';'
                    | b'='
            );
        b += 1;
    }
    t
};

/// Whether a `Host` value is `host[:port]` (RFC 9110 7.2, RFC 3986 3.2.2): a reg-name or
/// IPv4 address, or an IP literal in brackets, then an optional port of digits.
pub fn valid_host(value: &[u8]) -> bool {
    let (host, port) = if value.first() == Some(&b'[') {
        let Some(close) = value.iter().position(|&b| b == b']') else { return false };
        let literal = &value[1..close];
        if literal.is_empty() || !literal.iter().all(|&b| b.is_ascii_hexdigit() || matches!(b, b':' | b'.')) {
            return false;
        }
        match &value[close + 1..] {
            [] => return true,
            [b':', port @ ..] => (&b"h"[..], port),
            _ => return false,
        }
    } else {
        match value.iter().position(|&b| !HOST_BYTE[usize::from(b)]) {
            None => (value, &value[..0]),
            Some(at) if value[at] == b':' => (&value[..at], &value[at + 1..]),
            Some(_) => return false,
        }
    };
    !host.is_empty() && port.len() <= 5 && port.iter().all(u8::is_ascii_digit)
}

/// Writes the HTTP/1.1 head sent to a backend for `parts` into `out`, with `target` as
/// its origin-form target; the body framing header is chosen by `framing`.
pub fn write_request_head(
    out: &mut Vec<u8>,
    parts: &Parts,
    target: &[u8],
    framing: RequestFraming,
    fwd: &Forwarded<'_>,
) {
    out.reserve(256);
    out.extend_from_slice(parts.method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(target);
    out.extend_from_slice(b" HTTP/1.1\r\nhost: ");
    match (fwd.preserve_host, fwd.host) {
        (true, Some(h)) => out.extend_from_slice(h.as_bytes()),
        _ => out.extend_from_slice(fwd.backend.as_str().as_bytes()),
    }
    out.extend_from_slice(b"\r\n");
    let src = &parts.headers;
    let has_connection = value(src, &header::CONNECTION).is_some();
    let (mut has_xff, mut has_length) = (false, false);
    // HTTP/2 clients may split Cookie into several fields; HTTP/1.1 wants one (RFC 9113 8.2.3).
    let join_cookies = parts.version == Version::HTTP_2 && src.get_all(header::COOKIE).iter().nth(1).is_some();
    let mut cookies_written = false;
    for (name, value) in src {
        if name == X_FORWARDED_FOR {
            has_xff = true;
            continue;
        }
        if name == header::CONTENT_LENGTH {
            has_length = true;
            continue;
        }
        if name == header::HOST
            || name == header::EXPECT
            || name == X_FORWARDED_PROTO
            || name == X_FORWARDED_HOST
            || name == X_REQUEST_ID
            || name == TRACEPARENT
            || (name == TRACESTATE && !fwd.trace.continued)
            || is_connection_specific(name, src, has_connection)
            // A WSGI app reads `X_Forwarded_Host` as `X-Forwarded-Host` (nginx drops them too).
            || (!fwd.underscores && name.as_str().contains('_'))
        {
            continue;
        }
        if join_cookies && name == header::COOKIE {
            if !std::mem::replace(&mut cookies_written, true) {
                out.extend_from_slice(b"cookie: ");
                for (i, v) in src.get_all(header::COOKIE).iter().enumerate() {
                    if i > 0 {
                        out.extend_from_slice(b"; ");
                    }
                    out.extend_from_slice(v.as_bytes());
                }
                out.extend_from_slice(b"\r\n");
            }
            continue;
        }
        put_field(out, name.as_str().as_bytes(), value.as_bytes());
    }
    out.extend_from_slice(b"x-forwarded-for: ");
    if has_xff {
        for v in src.get_all(&X_FORWARDED_FOR) {
            if v.to_str().is_ok() {
                out.extend_from_slice(v.as_bytes());
                out.extend_from_slice(b", ");
            }
        }
    }
    out.extend_from_slice(fwd.client_ip.as_bytes());
    out.extend_from_slice(b"\r\n");
    put_field(out, b"x-forwarded-proto", fwd.proto.as_bytes());
    if let Some(h) = fwd.host {
        put_field(out, b"x-forwarded-host", h.as_bytes());
    }
    put_field(out, b"x-request-id", fwd.request_id.as_bytes());
    fwd.trace.write_field(out);
    if let Some(proto) = fwd.upgrade {
        out.extend_from_slice(b"connection: upgrade\r\n");
        put_field(out, b"upgrade", proto.as_bytes());
    }
    match framing {
        RequestFraming::Chunked => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
        RequestFraming::Length(len) => {
            out.extend_from_slice(b"content-length: ");
            out.extend_from_slice(itoa::Buffer::new().format(len).as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        RequestFraming::Empty => {
            // An empty body still says so where a body is expected or the client said so.
            if has_length || matches!(parts.method, Method::POST | Method::PUT | Method::PATCH) {
                out.extend_from_slice(b"content-length: 0\r\n");
            }
        }
    }
    out.extend_from_slice(b"\r\n");
}

/// Strips hop-by-hop headers from a backend's response (keeping `Upgrade` on a 101) and
/// sets the request id.
pub fn rewrite_response(headers: &mut HeaderMap, switching: bool, request_id: &RequestId) {
    // Most responses carry none of them: one pass over the names instead of a removal
    // (a hash and a probe) per name.
    if headers.keys().any(is_hop_by_hop) {
        strip_hop_by_hop(headers, switching);
    }
    headers.insert(X_REQUEST_ID.clone(), request_id.to_header_value());
}

fn strip_hop_by_hop(headers: &mut HeaderMap, switching: bool) {
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
    for n in HOP_BY_HOP {
        headers.remove(n);
    }
    if let Some(u) = upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, u);
    }
}

/// Writes a backend's fields for an HTTP/1 client, as [`rewrite_response`] would leave
/// them: hop-by-hop fields out, this request's `X-Request-Id` in place of any the backend
/// sent. Only for a response that does not switch protocols and whose `Connection` names no
/// other field (`Head::names_fields`). Says whether `Date` and `Content-Length` were there.
pub fn write_response_fields(out: &mut Vec<u8>, fields: &RawFields, request_id: &RequestId) -> (bool, bool) {
    let (mut has_date, mut has_length) = (false, false);
    for (name, value) in fields.iter() {
        let is = |known: &str| name.eq_ignore_ascii_case(known.as_bytes());
        if crate::http1::is_hop_by_hop(name) || is(X_REQUEST_ID.as_str()) {
            continue;
        }
        has_date |= is("date");
        has_length |= is("content-length");
        put_field(out, name, value);
    }
    put_field(out, X_REQUEST_ID.as_str().as_bytes(), request_id.as_bytes());
    (has_date, has_length)
}

/// `host` without its port (`[::1]:80` -> `::1`, `example.com:8080` -> `example.com`).
pub fn host_without_port(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    let bytes = host.as_bytes();
    match bytes.iter().rposition(|&b| b == b':') {
        Some(i) if bytes[i + 1..].iter().all(u8::is_ascii_digit) => &host[..i],
        _ => host,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_values_are_host_and_optional_port() {
        for ok in [
            "example.com",
            "example.com:8080",
            "127.0.0.1:80",
            "[::1]",
            "[::1]:80",
            "a_b.example",
            "xn--bcher-kva.example",
        ] {
            assert!(valid_host(ok.as_bytes()), "{ok}");
        }
        for bad in ["", "a b", "a\tb", "evil.example/x", "a:b", "[::1", "[]:80", ":80", "a:123456", "x@y", "[::1]x"] {
            assert!(!valid_host(bad.as_bytes()), "{bad:?}");
        }
    }
    use http::Request;

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
        let rid = RequestId::Sent(HeaderValue::from_static("rid"));
        let trace = TraceContext::from_headers(&parts.headers);
        let host = client_host(&parts);
        let backend: Authority = "127.0.0.1:9000".parse().unwrap();
        let fwd = Forwarded {
            client_ip: "192.0.2.7",
            proto: "http",
            request_id: &rid,
            trace: &trace,
            host: host.as_ref(),
            preserve_host: false,
            backend: &backend,
            upgrade: None,
            underscores: false,
        };
        let mut out = Vec::new();
        write_request_head(&mut out, &parts, b"/x?y=1", RequestFraming::Empty, &fwd);
        let mut slots = [httparse::EMPTY_HEADER; 32];
        let mut parsed = httparse::Request::new(&mut slots);
        assert!(parsed.parse(&out).unwrap().is_complete());
        assert_eq!(parsed.path, Some("/x?y=1"));
        let mut h = HeaderMap::new();
        for f in parsed.headers.iter() {
            h.append(HeaderName::from_bytes(f.name.as_bytes()).unwrap(), HeaderValue::from_bytes(f.value).unwrap());
        }
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
        let dropped = |n: &str| is_connection_specific(&HeaderName::from_bytes(n.as_bytes()).unwrap(), &h, true);
        assert!(dropped("x-secret"));
        assert!(!dropped("x-kept"));
    }

    #[test]
    fn ports_are_cut_from_hosts() {
        assert_eq!(host_without_port("example.com:8080"), "example.com");
        assert_eq!(host_without_port("example.com"), "example.com");
        assert_eq!(host_without_port("[::1]:80"), "::1");
    }
}
