//! `X-Request-Id`: kept when the client sent a sane one, otherwise made unique per
//! process (random prefix) and per request (counter).

use std::hash::{BuildHasher, RandomState};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use http::{HeaderMap, HeaderValue};

pub static X_REQUEST_ID: http::HeaderName = http::HeaderName::from_static("x-request-id");

/// The client's `X-Request-Id` if it is 1..=200 visible ASCII characters, else a new one.
pub fn from_headers(headers: &HeaderMap) -> HeaderValue {
    match headers.get(&X_REQUEST_ID) {
        Some(v) if (1..=200).contains(&v.len()) && v.as_bytes().iter().all(|b| b.is_ascii_graphic()) => v.clone(),
        _ => generate(),
    }
}

/// A new id: 16 hex digits of per-process randomness, then 8 or more of a counter.
pub fn generate() -> HeaderValue {
    static PREFIX: OnceLock<u64> = OnceLock::new();
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let prefix = *PREFIX.get_or_init(|| RandomState::new().hash_one(std::process::id()));
    let n = COUNTER.fetch_add(1, Relaxed);
    HeaderValue::try_from(format!("{prefix:016x}{n:08x}")).expect("hex is a valid header value")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_ids_are_unique_and_client_ids_kept() {
        assert_ne!(generate(), generate());
        let mut h = HeaderMap::new();
        h.insert(&X_REQUEST_ID, HeaderValue::from_static("abc-123"));
        assert_eq!(from_headers(&h), "abc-123");
        h.insert(&X_REQUEST_ID, HeaderValue::from_static("has space"));
        assert_ne!(from_headers(&h), "has space");
    }
}
