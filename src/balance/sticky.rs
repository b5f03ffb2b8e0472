//! Sticky cookies (SPEC 13): the opaque value that names each backend, the backend a
//! request's cookie names, and the `Set-Cookie` field that pins a client to one.
//!
//! A backend's value is the hex of SipHash-2-4 of its URL under a 128-bit key: from
//! `secret` when configured (so several balancers, and restarts, agree), else random for
//! the process (kept across reloads). SipHash is a keyed pseudo-random function, so the
//! value reveals nothing of the address and cannot be made for one without the key.

use std::hash::{BuildHasher, Hasher};
use std::sync::{Arc, OnceLock};

use http::{HeaderMap, HeaderValue, header};
use siphasher::sip::SipHasher24;

use crate::backend::Backend;
use crate::config::StickyConfig;

#[derive(Debug)]
pub struct Sticky {
    /// (value, backend index), ascending by value, for a binary search.
    by_value: Box<[(u64, u32)]>,
    /// Each backend's `Set-Cookie` field: over plain HTTP, and over TLS (with `Secure`).
    set_cookie: Box<[[HeaderValue; 2]]>,
    cookie: Box<str>,
}

impl Sticky {
    pub fn new(config: &StickyConfig, backends: &[Arc<Backend>]) -> Sticky {
        let (k0, k1) = match &config.secret {
            Some(secret) => keys_from(secret.as_bytes()),
            None => process_keys(),
        };
        let values: Vec<u64> = backends
            .iter()
            .map(|b| {
                let mut h = SipHasher24::new_with_keys(k0, k1);
                h.write(b.url.as_bytes());
                h.finish()
            })
            .collect();
        let mut by_value: Vec<(u64, u32)> = values.iter().enumerate().map(|(i, &v)| (v, i as u32)).collect();
        by_value.sort_unstable();
        let max_age = config.max_age.map(|d| format!("; Max-Age={}", d.as_secs())).unwrap_or_default();
        let set_cookie = values
            .iter()
            .map(|v| {
                let field = format!("{}={v:016x}; Path=/{max_age}; HttpOnly; SameSite=Lax", config.cookie);
                let secure = format!("{field}; Secure");
                [field, secure].map(|f| HeaderValue::try_from(f).expect("a token and hex make a valid field"))
            })
            .collect();
        Sticky { by_value: by_value.into(), set_cookie, cookie: config.cookie.as_str().into() }
    }

    /// The backend the request's cookie names, when it names one of these.
    pub fn pinned(&self, headers: &HeaderMap) -> Option<usize> {
        let value = cookie(headers, &self.cookie)?;
        let value = std::str::from_utf8(value).ok().filter(|v| v.len() == 16)?;
        let value = u64::from_str_radix(value, 16).ok()?;
        let at = self.by_value.binary_search_by_key(&value, |p| p.0).ok()?;
        Some(self.by_value[at].1 as usize)
    }

    /// The `Set-Cookie` field that pins a client to backend `idx`; `tls`: the request came
    /// over TLS, so the cookie is `Secure`.
    pub fn set_cookie(&self, idx: usize, tls: bool) -> &HeaderValue {
        &self.set_cookie[idx][usize::from(tls)]
    }

    /// Whether a response from backend `served` must pin the client: the request named no
    /// backend here, or one that is down now or failed this very request (`failed`). One
    /// that was only busy (capped) keeps its clients.
    pub fn repins(
        pinned: Option<usize>,
        served: usize,
        failed: impl Fn(usize) -> bool,
        backends: &[Arc<Backend>],
    ) -> bool {
        match pinned {
            None => true,
            Some(p) => p != served && (failed(p) || !backends[p].is_healthy()),
        }
    }
}

/// The value of the cookie `name` in the request's `Cookie` fields (all of them: HTTP/2
/// sends one per cookie), as sent.
pub fn cookie<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h [u8]> {
    headers.get_all(header::COOKIE).iter().find_map(|field| {
        field.as_bytes().split(|&b| b == b';').find_map(|pair| {
            let pair = pair.trim_ascii_start();
            let value = pair.strip_prefix(name.as_bytes())?.strip_prefix(b"=")?;
            Some(value.trim_ascii_end())
        })
    })
}

/// A SipHash key from a configured secret.
fn keys_from(secret: &[u8]) -> (u64, u64) {
    let half = |k0: u64| {
        let mut h = SipHasher24::new_with_keys(k0, 0x6261_6c61_6e63_6572);
        h.write(secret);
        h.finish()
    };
    (half(1), half(2))
}

/// The process's random SipHash key, the same for every runtime it builds.
fn process_keys() -> (u64, u64) {
    static KEYS: OnceLock<(u64, u64)> = OnceLock::new();
    *KEYS.get_or_init(|| {
        let random = std::hash::RandomState::new();
        (random.hash_one(1u8), random.hash_one(2u8))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balance::tests::backends;

    fn config(secret: Option<&str>) -> StickyConfig {
        StickyConfig {
            cookie: "lb".into(),
            max_age: Some(std::time::Duration::from_secs(3600)),
            secret: secret.map(Into::into),
        }
    }

    fn request(cookie: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.append(header::COOKIE, HeaderValue::from_str(cookie).unwrap());
        h
    }

    #[test]
    fn a_cookie_names_its_backend_and_hides_its_address() {
        let bs = backends(5);
        let s = Sticky::new(&config(None), &bs);
        for i in 0..5 {
            let field = s.set_cookie(i, false).to_str().unwrap().to_owned();
            assert!(field.starts_with("lb=") && field.ends_with("; Path=/; Max-Age=3600; HttpOnly; SameSite=Lax"));
            assert!(!field.contains("127.0.0.1") && !field.contains(&(1000 + i).to_string()), "{field}");
            let value = &field[..field.find(';').unwrap()];
            assert_eq!(s.pinned(&request(&format!("a=1; {value}; b=2"))), Some(i));
            assert_eq!(s.set_cookie(i, true).to_str().unwrap(), format!("{field}; Secure"));
        }
        assert_eq!(s.pinned(&request("lb=0123456789abcdef")), None, "names no backend");
        assert_eq!(s.pinned(&request("lb=zz; other=1")), None);
        assert_eq!(s.pinned(&HeaderMap::new()), None);
    }

    #[test]
    fn the_value_depends_on_the_key() {
        let bs = backends(2);
        let (a, b) = (Sticky::new(&config(Some("one")), &bs), Sticky::new(&config(Some("one")), &bs));
        assert_eq!(a.set_cookie(0, false), b.set_cookie(0, false), "one secret, one value");
        let c = Sticky::new(&config(Some("two")), &bs);
        assert_ne!(a.set_cookie(0, false), c.set_cookie(0, false));
        assert_ne!(a.set_cookie(0, false), Sticky::new(&config(None), &bs).set_cookie(0, false));
    }

    #[test]
    fn cookies_are_found_in_any_field() {
        let mut h = request("x=1");
        h.append(header::COOKIE, HeaderValue::from_static("user=42 ; lb=7"));
        assert_eq!(cookie(&h, "user"), Some(&b"42"[..]));
        assert_eq!(cookie(&h, "lb"), Some(&b"7"[..]));
        assert_eq!(cookie(&h, "us"), None);
        assert_eq!(cookie(&h, "x"), Some(&b"1"[..]));
    }

    #[test]
    fn only_an_unknown_down_or_failed_backend_repins() {
        let bs = backends(2);
        let none_failed = |_| false;
        assert!(Sticky::repins(None, 0, none_failed, &bs));
        assert!(!Sticky::repins(Some(0), 0, none_failed, &bs));
        assert!(!Sticky::repins(Some(1), 0, none_failed, &bs), "busy, not down: the pin stays");
        assert!(Sticky::repins(Some(1), 0, |i| i == 1, &bs), "it failed this request");
        bs[1].set_active_up(false, "test");
        assert!(Sticky::repins(Some(1), 0, none_failed, &bs));
    }
}
