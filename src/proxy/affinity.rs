//! Before the pick: what a request says about where it should go, for upstreams that keep
//! a client on one backend: the hash of its `hash_key` (consistent-hash) and the backend
//! its sticky cookie names. An upstream with neither reads nothing of the request.

use std::net::IpAddr;

use http::request::Parts;

use super::conn::ConnInfo;
use crate::balance::{self, Affinity};
use crate::config::HashKey;
use crate::limit;
use crate::runtime::{Runtime, Upstream};

/// The request's [`Affinity`] for `upstream`; `path` is the one routing saw.
#[inline]
pub fn of(rt: &Runtime, conn: &ConnInfo, parts: &Parts, path: &str, upstream: &Upstream) -> Affinity {
    let mut affinity = Affinity::default();
    if let Some(key) = &upstream.hash_key {
        affinity.hash = hash(rt, conn, parts, path, key);
    }
    if let Some(sticky) = &upstream.sticky {
        affinity.pinned = sticky.pinned(&parts.headers);
    }
    affinity
}

/// The hash of the request's key; a request without it (or with it empty) is hashed by
/// its client IP.
fn hash(rt: &Runtime, conn: &ConnInfo, parts: &Parts, path: &str, key: &HashKey) -> u64 {
    let value = match key {
        HashKey::ClientIp => None,
        HashKey::Header(name) => parts.headers.get(name).map(|v| v.as_bytes()),
        HashKey::Cookie(name) => balance::cookie(&parts.headers, name),
        HashKey::Query(name) => parts.uri.query().and_then(|q| query_param(q, name)),
        HashKey::Path => Some(path.as_bytes()),
    };
    if let Some(v) = value.filter(|v| !v.is_empty()) {
        return balance::hash_of(v);
    }
    match limit::client_ip(conn.peer.ip(), &parts.headers, &rt.config.server.trusted_proxies) {
        IpAddr::V4(ip) => balance::hash_of(&ip.octets()),
        IpAddr::V6(ip) => balance::hash_of(&ip.octets()),
    }
}

/// The value of the first `name=` parameter of `query`, as sent.
fn query_param<'q>(query: &'q str, name: &str) -> Option<&'q [u8]> {
    query.split('&').find_map(|pair| pair.strip_prefix(name)?.strip_prefix('=')).map(str::as_bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_parameters_by_name() {
        assert_eq!(query_param("a=1&user=42&b=2", "user"), Some(&b"42"[..]));
        assert_eq!(query_param("username=x&user=7", "user"), Some(&b"7"[..]));
        assert_eq!(query_param("user", "user"), None);
        assert_eq!(query_param("user=", "user"), Some(&b""[..]));
    }
}
