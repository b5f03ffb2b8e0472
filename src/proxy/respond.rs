//! Step 5, respond: the client's response from a backend's head: its fields passed
//! through raw to balancer's own HTTP/1 server, or as a `HeaderMap` to hyper; on a 101,
//! the tunnel.

use bytes::Bytes;
use http::{Response, header};

use super::body::ResponseBody;
use super::cache::Teeing;
use super::conn::ConnInfo;
use super::error::ProxyError;
use super::forward::Proxied;
use super::headers;
use super::log::RequestLog;
use super::upgrade::{self, ClientUpgrade};
use crate::backend::{ConnBody, Framing, InflightGuard};

/// The response for `proxied`; `client_upgrade` is where the client connection goes if
/// the backend switches protocols; `teeing`, when its route's cache stores it, takes its
/// body (the client reads it from there).
#[inline]
pub fn response(
    proxied: Proxied,
    conn: &ConnInfo,
    client_upgrade: Option<ClientUpgrade>,
    mut log: Box<RequestLog>,
    teeing: Option<Teeing>,
) -> Response<ResponseBody> {
    let Proxied { head, inflight, conn: backend_conn, upload, set_cookie } = proxied;
    log.status = head.status.as_u16();
    let switching = head.framing == Framing::Upgrade;
    if conn.writes_raw_fields && !switching && !head.names_fields {
        // The fields go to the client as the backend sent them, less the hop-by-hop ones
        // (`headers::write_response_fields`): no map is built. The server writes those of
        // the response's map (balancer's own: a sticky cookie) after them.
        let body = backend_body(backend_conn.into_body(head.framing, upload), log, inflight, teeing);
        let mut response = Response::new(body.passing(head.fields));
        *response.status_mut() = head.status;
        if let Some(cookie) = set_cookie {
            response.headers_mut().append(header::SET_COOKIE, cookie);
        }
        return response;
    }
    let Some(mut headers) = head.fields.to_header_map(1) else {
        let backend = inflight.backend().url.clone();
        return ProxyError::BrokeOff { backend, source: "invalid header field".into() }.into_response(log);
    };
    headers::rewrite_response(&mut headers, switching, &log.request_id);
    if let Some(cookie) = set_cookie {
        headers.append(header::SET_COOKIE, cookie);
    }
    let mut response = Response::new(());
    *response.status_mut() = head.status;
    *response.version_mut() = head.version;
    *response.headers_mut() = headers;
    let (parts, ()) = response.into_parts();
    if !switching {
        let body = backend_body(backend_conn.into_body(head.framing, upload), log, inflight, teeing);
        return Response::from_parts(parts, body);
    }
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
}

/// The client's body: the backend's, or, for a response being stored, its reader of the
/// cache's copy.
fn backend_body(body: ConnBody, log: Box<RequestLog>, inflight: InflightGuard, teeing: Option<Teeing>) -> ResponseBody {
    match teeing {
        Some(t) => t.start(body, inflight, log),
        None => ResponseBody::upstream(body, log, inflight),
    }
}
