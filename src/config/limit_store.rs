//! `[limit_store]` checked: the URL must parse as a Redis URL (`redis://` or `rediss://`),
//! nothing is connected (so `--check` and start-up never wait on the store).

use super::raw::RawLimitStore;
use super::validate::{KeyError, err};
use super::{LimitStoreConfig, OnError};

pub(super) fn validate(raw: &RawLimitStore) -> Result<LimitStoreConfig, KeyError> {
    let url = raw.url.trim();
    let scheme = url.split_once("://").map(|(s, _)| s);
    if !matches!(scheme, Some("redis" | "rediss")) {
        return err(
            "limit_store.url",
            format!(
                r#""{}" is not a Redis URL: write e.g. "redis://127.0.0.1:6379/0" or "rediss://user:password@host:6380""#,
                hide_password(url)
            ),
        );
    }
    if url.contains('#') {
        return err("limit_store.url", "a fragment is not allowed (TLS is always verified)");
    }
    if let Err(e) = redis::IntoConnectionInfo::into_connection_info(url) {
        return err("limit_store.url", format!(r#"invalid Redis URL "{}": {e}"#, hide_password(url)));
    }
    // Braces would move the Redis Cluster hash tag that keeps each key in one slot.
    if raw.key_prefix.contains(['{', '}']) {
        return err("limit_store.key_prefix", "must not contain { or }");
    }
    if raw.timeout.0.is_zero() {
        return err("limit_store.timeout", "must be longer than 0s");
    }
    let on_error: OnError = raw.on_error;
    Ok(LimitStoreConfig { url: url.to_owned(), key_prefix: raw.key_prefix.clone(), timeout: raw.timeout.0, on_error })
}

/// The URL with its password (if any) replaced by `***`, for logs, `/status` and errors
/// (the same hiding as `GET /config`'s).
pub fn hide_password(url: &str) -> String {
    super::redact::hide_url_password(url).unwrap_or_else(|| url.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::units::HumanDuration;

    fn raw(url: &str) -> RawLimitStore {
        RawLimitStore {
            url: url.into(),
            key_prefix: "balancer:".into(),
            timeout: HumanDuration::millis(50),
            on_error: OnError::Local,
        }
    }

    #[test]
    fn urls() {
        assert!(validate(&raw("redis://127.0.0.1:6379/0")).is_ok());
        assert!(validate(&raw("rediss://user:secret@redis.example.com:6380")).is_ok());
        assert!(validate(&raw("http://127.0.0.1:6379")).is_err());
        assert!(validate(&raw("redis://127.0.0.1:notaport")).is_err());
        assert!(validate(&raw("rediss://h:6380/#insecure")).is_err());
        let e = validate(&raw("redis://u:secret@h:1/notadb")).unwrap_err();
        assert!(!e.message.contains("secret"), "{}", e.message);
    }

    #[test]
    fn passwords_are_hidden() {
        assert_eq!(hide_password("rediss://user:secret@h:6380/0"), "rediss://user:***@h:6380/0");
        assert_eq!(hide_password("redis://:secret@h"), "redis://:***@h");
        assert_eq!(hide_password("redis://h:6379"), "redis://h:6379");
    }
}
