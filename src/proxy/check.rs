//! Step 1, check: what is refused before a request is routed.

use http::request::Parts;
use http::{Method, Version, header};

use super::body::ClientBody;
use super::error::ProxyError;
use super::headers;
use crate::runtime::Runtime;

/// Refuses CONNECT and TRACE (405), an invalid, repeated or (on HTTP/1.1) missing `Host`
/// (400), a transfer coding other than `chunked` that the connection layer could not see
/// (heads pipelined behind another; hyper accepts "gzip, chunked"), and a declared body
/// over `max_request_body` (413).
#[inline]
pub fn request(rt: &Runtime, parts: &Parts, body: &ClientBody) -> Result<(), ProxyError> {
    if parts.method == Method::CONNECT || parts.method == Method::TRACE {
        return Err(ProxyError::MethodNotAllowed(parts.method.clone()));
    }
    // One pass over the few fields a request has, rather than a hashed lookup for each.
    let mut host_headers = 0;
    for (name, value) in &parts.headers {
        if name == header::HOST {
            host_headers += 1;
            if !headers::valid_host(value.as_bytes()) {
                return Err(ProxyError::BadRequest("invalid Host header"));
            }
        } else if name == header::TRANSFER_ENCODING && !value.as_bytes().eq_ignore_ascii_case(b"chunked") {
            return Err(ProxyError::BadRequest(crate::http1::head_check::ONLY_CHUNKED));
        }
    }
    if host_headers > 1 {
        return Err(ProxyError::BadRequest("more than one Host header"));
    }
    if parts.version == Version::HTTP_11 && host_headers == 0 && parts.uri.authority().is_none() {
        return Err(ProxyError::BadRequest("HTTP/1.1 request without a Host header"));
    }
    let limit = rt.config.server.max_request_body;
    if http_body::Body::size_hint(body).exact().is_some_and(|len| len > limit) {
        return Err(ProxyError::BodyTooLarge { limit });
    }
    Ok(())
}
