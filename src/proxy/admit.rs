//! Step 3, admit: the rate limits that apply must all admit the request; a refused
//! request takes no token from any of them and never reaches a backend.
//!
//! Local limits are decided at once, without an await; `shared` ones (only with a
//! `[limit_store]`) after them, in the store, and a refusal there gives the local tokens
//! back.

use http::request::Parts;

use super::conn::ConnInfo;
use super::error::ProxyError;
use crate::limit::{self, Key, LimitStore, RateLimiter, SharedRefusal};
use crate::runtime::Runtime;
use crate::runtime::router::Route;

/// Shared limits still to decide, once the local ones admitted the request.
pub struct Pending<'a> {
    store: &'a LimitStore,
    local: Vec<(&'a RateLimiter, Key)>,
    shared: Vec<(&'a RateLimiter, Key)>,
}

/// Admits the request by the route's limits, or the server-wide ones when no route
/// matched; `Some` when shared limits remain to be decided by [`shared`].
#[inline]
pub fn limits<'a>(
    rt: &'a Runtime,
    conn: &ConnInfo,
    parts: &Parts,
    route: Option<&Route>,
) -> Result<Option<Pending<'a>>, ProxyError> {
    let ids = route.map_or(&rt.server_limits[..], |r| &r.limits[..]);
    if ids.is_empty() {
        return Ok(None);
    }
    let client = limit::client_ip(conn.peer.ip(), &parts.headers, &rt.config.server.trusted_proxies);
    let checks: Vec<(&RateLimiter, Key)> = ids
        .iter()
        .map(|&i| {
            let l = &*rt.limits[i];
            (l, l.key(client, &parts.headers))
        })
        .collect();
    let store = match &rt.limit_store {
        Some(store) if checks.iter().any(|(l, _)| l.config.shared) => store,
        _ => return limit::admit(&checks).map(|()| None).map_err(ProxyError::RateLimited),
    };
    let (shared, local): (Vec<_>, Vec<_>) = checks.into_iter().partition(|(l, _)| l.config.shared);
    limit::admit(&local).map_err(ProxyError::RateLimited)?;
    Ok(Some(Pending { store, local, shared }))
}

/// Decides the shared limits in the store (or by `on_error` while it fails).
pub async fn shared(pending: Pending<'_>) -> Result<(), ProxyError> {
    match limit::admit_shared(pending.store, &pending.shared).await {
        Ok(()) => Ok(()),
        Err(refused) => {
            limit::refund(&pending.local);
            Err(match refused {
                SharedRefusal::Limited(r) => ProxyError::RateLimited(r),
                SharedRefusal::StoreDown { limit } => ProxyError::LimitStoreDown { limit },
            })
        }
    }
}
