//! Step 3, admit: the rate limits that apply must all admit the request; a refused
//! request takes no token from any of them and never reaches a backend.

use http::request::Parts;

use super::conn::ConnInfo;
use super::error::ProxyError;
use crate::limit::{self, RateLimiter};
use crate::runtime::Runtime;
use crate::runtime::router::Route;

/// Admits the request by the route's limits, or the server-wide ones when no route
/// matched.
#[inline]
pub fn limits(rt: &Runtime, conn: &ConnInfo, parts: &Parts, route: Option<&Route>) -> Result<(), ProxyError> {
    let ids = route.map_or(&rt.server_limits[..], |r| &r.limits[..]);
    if ids.is_empty() {
        return Ok(());
    }
    let client = limit::client_ip(conn.peer.ip(), &parts.headers, &rt.config.server.trusted_proxies);
    let checks: Vec<(&RateLimiter, limit::Key)> = ids
        .iter()
        .map(|&i| {
            let l = &*rt.limits[i];
            (l, l.key(client, &parts.headers))
        })
        .collect();
    limit::admit(&checks).map_err(ProxyError::RateLimited)
}
