//! `X-Request-Id`: kept when the client sent a sane one, otherwise made unique per
//! process (random prefix) and per request (counter).

use std::hash::{BuildHasher, RandomState};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use http::{HeaderMap, HeaderValue};

pub static X_REQUEST_ID: http::HeaderName = http::HeaderName::from_static("x-request-id");

/// A request's `X-Request-Id`: the client's, or one made here and kept inline (as a
/// `HeaderValue` it would take an allocation per request).
#[derive(Clone, Debug)]
pub enum RequestId {
    Sent(HeaderValue),
    Made { digits: [u8; 32], len: u8 },
}

impl RequestId {
    pub fn as_bytes(&self) -> &[u8] {
        match self {
            RequestId::Sent(v) => v.as_bytes(),
            RequestId::Made { digits, len } => &digits[..usize::from(*len)],
        }
    }

    /// The id as text: always visible ASCII (a client's is checked before it is kept).
    pub fn as_str(&self) -> &str {
        std::str::from_utf8(self.as_bytes()).unwrap_or("-")
    }

    /// The id as a header value, for a response whose fields are a map.
    pub fn to_header_value(&self) -> HeaderValue {
        match self {
            RequestId::Sent(v) => v.clone(),
            RequestId::Made { .. } => HeaderValue::from_bytes(self.as_bytes()).expect("hex is a valid header value"),
        }
    }
}

/// The client's `X-Request-Id` if it is 1..=200 visible ASCII characters, else a new one.
pub fn from_headers(headers: &HeaderMap) -> RequestId {
    match crate::http1::value(headers, &X_REQUEST_ID) {
        Some(v) if (1..=200).contains(&v.len()) && v.as_bytes().iter().all(|b| b.is_ascii_graphic()) => {
            RequestId::Sent(v.clone())
        }
        _ => generate(),
    }
}

/// A new id: 16 hex digits of per-process randomness, then 8 or more of a counter.
pub fn generate() -> RequestId {
    // The prefix's digits are written once per process.
    static PREFIX: OnceLock<[u8; 16]> = OnceLock::new();
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let prefix = PREFIX.get_or_init(|| {
        let mut digits = [0u8; 16];
        hex(&mut digits, RandomState::new().hash_one(std::process::id()));
        digits
    });
    let n = COUNTER.fetch_add(1, Relaxed);
    // Written by hand: `format!` costs more than the rest of the id's work together.
    let mut id = [0u8; 32];
    id[..16].copy_from_slice(prefix);
    let digits = (64 - (n | 0xffff_ffff).leading_zeros()).div_ceil(4) as usize;
    hex(&mut id[16..16 + digits], n);
    RequestId::Made { digits: id, len: (16 + digits) as u8 }
}

/// Writes `n` into `out` as lower-case hex, zero-padded on the left to `out`'s length.
fn hex(out: &mut [u8], mut n: u64) {
    for b in out.iter_mut().rev() {
        *b = b"0123456789abcdef"[(n & 0xf) as usize];
        n >>= 4;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_matches_format() {
        for n in [0u64, 1, 0xabc, 0xffff_ffff, 0x1_0000_0000, u64::MAX] {
            let mut out = [0u8; 16];
            hex(&mut out, n);
            assert_eq!(std::str::from_utf8(&out).unwrap(), format!("{n:016x}"));
        }
        let id = generate();
        assert!(id.as_str().len() >= 24 && id.as_str().bytes().all(|b| b.is_ascii_hexdigit()));
        assert_eq!(id.to_header_value(), id.as_str());
    }

    #[test]
    fn generated_ids_are_unique_and_client_ids_kept() {
        assert_ne!(generate().as_str(), generate().as_str());
        let mut h = HeaderMap::new();
        h.insert(&X_REQUEST_ID, HeaderValue::from_static("abc-123"));
        assert_eq!(from_headers(&h).as_str(), "abc-123");
        h.insert(&X_REQUEST_ID, HeaderValue::from_static("has space"));
        assert_ne!(from_headers(&h).as_str(), "has space");
    }
}
