//! The keys that say how an upstream keeps a client on one backend: `hash_key` (for
//! consistent-hash) and `[sticky]` (any strategy), checked into [`HashKey`] and
//! [`StickyConfig`].

use super::raw::RawUpstream;
use super::validate::{KeyError, err};
use super::{HashKey, StickyConfig, StrategyName};

/// `hash_key`, only with consistent-hash, where it defaults to the client IP.
pub fn hash_key(up: &RawUpstream, at: &str) -> Result<Option<HashKey>, KeyError> {
    let key = format!("{at}.hash_key");
    let Some(text) = up.hash_key.as_deref() else {
        return Ok((up.strategy == StrategyName::ConsistentHash).then_some(HashKey::ClientIp));
    };
    if up.strategy != StrategyName::ConsistentHash {
        return err(
            key,
            format!(r#"hash_key is only used by strategy = "consistent-hash" (this upstream's is "{}")"#, up.strategy),
        );
    }
    let unknown = || {
        let expected = "client_ip, path, header:NAME, cookie:NAME or query:NAME";
        err(&key, format!(r#"unknown hash_key "{text}", expected {expected}"#))
    };
    let parsed = match text.split_once(':') {
        None if text == "client_ip" => HashKey::ClientIp,
        None if text == "path" => HashKey::Path,
        None => return unknown(),
        Some(("header", name)) => match http::HeaderName::from_bytes(name.as_bytes()) {
            Ok(h) => HashKey::Header(h),
            Err(_) => return err(key, format!(r#""{name}" is not a header field name"#)),
        },
        Some(("cookie", name)) if is_token(name) => HashKey::Cookie(name.to_owned()),
        Some(("cookie", name)) => return err(key, format!(r#""{name}" is not a cookie name"#)),
        Some(("query", name)) if !name.is_empty() && !name.contains(['&', '=', '#', ' ']) => {
            HashKey::Query(name.to_owned())
        }
        Some(("query", name)) => return err(key, format!(r#""{name}" is not a query parameter name"#)),
        Some(_) => return unknown(),
    };
    Ok(Some(parsed))
}

/// `[sticky]`: a cookie name that is a token, a `max_age` over 0, a `secret` not empty.
pub fn sticky(up: &RawUpstream, at: &str) -> Result<Option<StickyConfig>, KeyError> {
    let Some(s) = &up.sticky else { return Ok(None) };
    if !is_token(&s.cookie) {
        return err(
            format!("{at}.sticky.cookie"),
            format!(r#""{}" is not a cookie name: letters, digits and !#$%&'*+-.^_`|~ only"#, s.cookie),
        );
    }
    if s.max_age.is_some_and(|d| d.0.as_secs() == 0) {
        return err(format!("{at}.sticky.max_age"), "must be at least 1s (omit it for a session cookie)");
    }
    if s.secret.as_ref().is_some_and(|k| k.is_empty()) {
        return err(format!("{at}.sticky.secret"), "must not be empty (omit it for a random key per process)");
    }
    Ok(Some(StickyConfig { cookie: s.cookie.clone(), max_age: s.max_age.map(|d| d.0), secret: s.secret.clone() }))
}

/// An RFC 9110 token, which is what a cookie name must be (RFC 6265 4.1.1).
fn is_token(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Overrides, parse};
    use std::path::Path;

    fn load(extra: &str) -> Result<crate::config::Config, String> {
        let text = format!("[upstreams.app]\nbackends = [\"http://127.0.0.1:8000\"]\n{extra}\n");
        parse(&text, Path::new("b.toml"), &Overrides::default()).map(|l| l.config).map_err(|e| e.to_string())
    }

    #[test]
    fn hash_keys() {
        let key = |k: &str| {
            load(&format!("strategy = \"consistent-hash\"\nhash_key = \"{k}\""))
                .map(|c| c.upstreams[0].hash_key.clone())
        };
        assert_eq!(key("client_ip"), Ok(Some(HashKey::ClientIp)));
        assert_eq!(key("path"), Ok(Some(HashKey::Path)));
        assert_eq!(key("header:X-User-Id"), Ok(Some(HashKey::Header(http::HeaderName::from_static("x-user-id")))));
        assert_eq!(key("cookie:session"), Ok(Some(HashKey::Cookie("session".into()))));
        assert_eq!(key("query:user"), Ok(Some(HashKey::Query("user".into()))));
        let default = load("strategy = \"consistent-hash\"").unwrap();
        assert_eq!(default.upstreams[0].hash_key, Some(HashKey::ClientIp));
        assert_eq!(load("").unwrap().upstreams[0].hash_key, None);
        for bad in ["ip", "header:", "header:a b", "cookie:a;b", "query:", "body:x", "path:x"] {
            let e = key(bad).unwrap_err();
            assert!(e.starts_with("b.toml:4:"), "{bad}: {e}");
        }
    }

    #[test]
    fn hash_key_needs_consistent_hash() {
        let e = load("strategy = \"least-latency\"\nhash_key = \"path\"").unwrap_err();
        assert!(e.starts_with("b.toml:4:") && e.contains("consistent-hash"), "{e}");
    }

    #[test]
    fn sticky_tables() {
        let c = load("[upstreams.app.sticky]\ncookie = \"lb\"\nmax_age = \"1h\"").unwrap();
        let s = c.upstreams[0].sticky.clone().unwrap();
        assert_eq!((s.cookie.as_str(), s.max_age), ("lb", Some(std::time::Duration::from_secs(3600))));
        assert_eq!(
            load("[upstreams.app.sticky]\ncookie = \"lb\"").unwrap().upstreams[0].sticky.clone().unwrap().max_age,
            None
        );
        for (bad, line) in [("cookie = \"a b\"", 4), ("cookie = \"a=b\"", 4), ("cookie = \"\"", 4)] {
            let e = load(&format!("[upstreams.app.sticky]\n{bad}")).unwrap_err();
            assert!(e.starts_with(&format!("b.toml:{line}:")), "{bad}: {e}");
        }
        let e = load("[upstreams.app.sticky]\ncookie = \"lb\"\nmax_age = \"0s\"").unwrap_err();
        assert!(e.starts_with("b.toml:5:"), "{e}");
        let e = load("[upstreams.app.sticky]\ncookie = \"lb\"\nnope = 1").unwrap_err();
        assert!(e.contains("nope"), "{e}");
    }
}
