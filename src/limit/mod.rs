//! Rate limits: token buckets per key (client IP, a header's value, or one global
//! bucket), kept in a sharded map so the request path never takes a global lock.
//!
//! A request must be admitted by every limit that applies (server-wide and its route's);
//! the shards involved are locked together, in the runtime's limit order, so a refused
//! request takes no token from any of them. A bucket that is full is the same as no bucket,
//! so the sweeper drops full buckets without changing any answer: memory stays bounded by
//! the keys active within one refill period.
//!
//! A `shared` limit's buckets live in the [`LimitStore`] instead ([`admit_shared`]); its
//! local buckets serve `on_error = "local"` while the store fails.

mod client_ip;
mod store;
mod token_bucket;

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use http::{HeaderMap, HeaderValue};

use arc_swap::ArcSwapOption;

pub use client_ip::client_ip;
pub use store::{LimitStore, Verdict};
use token_bucket::{Bucket, Refill};

use crate::config::{LimitKey, OnError, RateLimitConfig};

const SHARDS: usize = 64;

/// What a bucket is kept for.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Key {
    Ip(IpAddr),
    Header(HeaderValue),
    /// A `header:NAME` limit's request without that header: keyed by client IP, apart
    /// from the header values.
    NoHeader(IpAddr),
    Global,
}

type Shard = HashMap<Key, Bucket, RandomState>;

/// One `[rate_limits.NAME]`, with its buckets.
#[derive(Debug)]
pub struct RateLimiter {
    pub name: String,
    pub config: RateLimitConfig,
    refill: Refill,
    epoch: Instant,
    shard_of: RandomState,
    shards: Box<[Mutex<Shard>]>,
    /// Refusals, shared with the process metrics (kept by name across reloads).
    refused: Arc<AtomicU64>,
    /// A shared limit's share for this instance while the store fails (`on_error =
    /// "local"`), sized by the instances at the last good contact.
    fallback: ArcSwapOption<Fallback>,
}

#[derive(Debug)]
struct Fallback {
    instances: u64,
    limiter: RateLimiter,
}

/// Why a request was refused, and what the 429 tells the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub limit: String,
    /// Whole seconds until one token (at least 1).
    pub retry_after: u64,
    /// The bucket's capacity.
    pub capacity: u64,
    pub remaining: u64,
    /// Whole seconds until the bucket is full again.
    pub reset: u64,
}

impl RateLimiter {
    pub fn new(name: &str, config: RateLimitConfig, refused: Arc<AtomicU64>) -> RateLimiter {
        RateLimiter {
            name: name.to_owned(),
            refill: Refill::new(config.rate, config.per, config.burst),
            config,
            epoch: Instant::now(),
            shard_of: RandomState::new(),
            shards: (0..SHARDS).map(|_| Mutex::new(Shard::default())).collect(),
            refused,
            fallback: ArcSwapOption::empty(),
        }
    }

    /// This instance's share of the limit among `instances`: `rate` over `per` x
    /// `instances` (exact), `burst` divided and rounded up. Kept while the count holds.
    fn fallback(&self, instances: u64) -> Arc<Fallback> {
        if let Some(f) = self.fallback.load_full().filter(|f| f.instances == instances) {
            return f;
        }
        let n = instances.max(1);
        let config = RateLimitConfig {
            per: self.config.per.saturating_mul(n.min(u32::MAX as u64) as u32),
            burst: self.config.burst.div_ceil(n).max(1),
            shared: false,
            ..self.config.clone()
        };
        let f = Arc::new(Fallback { instances, limiter: RateLimiter::new(&self.name, config, self.refused.clone()) });
        self.fallback.store(Some(f.clone()));
        f
    }

    fn refusal(&self, to_one_micros: f64, to_full_micros: f64) -> Refusal {
        let secs = |micros: f64| ((micros / 1e6).ceil() as u64).max(1);
        Refusal {
            limit: self.name.clone(),
            retry_after: secs(to_one_micros),
            capacity: self.config.burst,
            remaining: 0,
            reset: secs(to_full_micros),
        }
    }

    fn micros(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.epoch).as_micros() as u64
    }

    fn shard(&self, key: &Key) -> &Mutex<Shard> {
        &self.shards[self.shard_of.hash_one(key) as usize % SHARDS]
    }

    /// The key this limit uses for a request.
    pub fn key(&self, client: IpAddr, headers: &HeaderMap) -> Key {
        match &self.config.key {
            LimitKey::ClientIp => Key::Ip(client),
            LimitKey::Global => Key::Global,
            LimitKey::Header(name) => match headers.get(name) {
                Some(v) => Key::Header(v.clone()),
                None => Key::NoHeader(client),
            },
        }
    }

    /// Drops every bucket that is full again; returns how many are left.
    pub fn sweep(&self) -> usize {
        if let Some(f) = self.fallback.load_full() {
            f.limiter.sweep();
        }
        let now = self.micros(Instant::now());
        let mut left = 0;
        for shard in self.shards.iter() {
            let mut map = shard.lock().expect("limit shard lock");
            map.retain(|_, b| !b.is_full(&self.refill, now));
            if map.capacity() > 64 && map.len() < map.capacity() / 4 {
                map.shrink_to_fit();
            }
            left += map.len();
        }
        left
    }

    /// Buckets held now (full ones not yet swept included).
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.lock().expect("limit shard lock").len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Admits a request through every `(limiter, key)` or through none. `checks` must be in
/// the runtime's limit order (the lock order), each limiter at most once: the shards are
/// held together for the decision, and any other order could deadlock two requests.
pub fn admit(checks: &[(&RateLimiter, Key)]) -> Result<(), Refusal> {
    debug_assert!(checks.windows(2).all(|w| !std::ptr::eq(w[0].0, w[1].0)), "a limiter appears twice in one admission");
    let now = Instant::now();
    let mut guards: Vec<MutexGuard<'_, Shard>> = Vec::with_capacity(checks.len());
    let mut refusal: Option<Refusal> = None;
    for (limiter, key) in checks {
        let t = limiter.micros(now);
        let guard = limiter.shard(key).lock().expect("limit shard lock");
        let tokens = guard.get(key).map_or(limiter.refill.burst, |b| b.tokens(&limiter.refill, t));
        if tokens < 1.0 {
            limiter.refused.fetch_add(1, Relaxed);
            let r = limiter.refusal(
                limiter.refill.micros_until(tokens, 1.0),
                limiter.refill.micros_until(tokens, limiter.refill.burst),
            );
            // Report the limit that makes the client wait longest.
            if refusal.as_ref().is_none_or(|prev| r.retry_after > prev.retry_after) {
                refusal = Some(r);
            }
        }
        guards.push(guard);
    }
    if let Some(r) = refusal {
        return Err(r);
    }
    for ((limiter, key), guard) in checks.iter().zip(guards.iter_mut()) {
        let t = limiter.micros(now);
        match guard.get_mut(key) {
            Some(b) => b.take(&limiter.refill, t),
            None => {
                let mut b = Bucket::full(&limiter.refill, t);
                b.take(&limiter.refill, t);
                guard.insert(key.clone(), b);
            }
        }
    }
    Ok(())
}

/// Gives back the token each `(limiter, key)` gave to a request that was then refused
/// elsewhere (by a shared limit, decided after the local ones).
pub fn refund(checks: &[(&RateLimiter, Key)]) {
    let now = Instant::now();
    for (limiter, key) in checks {
        let t = limiter.micros(now);
        if let Some(b) = limiter.shard(key).lock().expect("limit shard lock").get_mut(key) {
            b.give(&limiter.refill, t);
        }
    }
}

/// Why a shared admission failed.
#[derive(Debug)]
pub enum SharedRefusal {
    Limited(Refusal),
    /// The store is failing and `on_error = "deny"`.
    StoreDown {
        limit: String,
    },
}

/// What a shared admission took, to give back if a later limit refuses.
enum Taken<'a> {
    Store(&'a RateLimiter, &'a Key),
    Local(Arc<Fallback>, &'a Key),
}

/// Admits a request through every shared `(limiter, key)` or through none: one script
/// per limit in the store; a limit refused gives back what the ones before it took.
/// While the store fails, `on_error` decides for each.
pub async fn admit_shared(store: &LimitStore, checks: &[(&RateLimiter, Key)]) -> Result<(), SharedRefusal> {
    let mut taken: Vec<Taken<'_>> = Vec::with_capacity(checks.len());
    let mut outcome = Ok(());
    for (limiter, key) in checks {
        match store.decide(&limiter.name, &limiter.config, key, false).await {
            Some(Verdict::Admitted) => taken.push(Taken::Store(limiter, key)),
            Some(Verdict::Refused { to_one_ms, to_full_ms }) => {
                limiter.refused.fetch_add(1, Relaxed);
                outcome =
                    Err(SharedRefusal::Limited(limiter.refusal(to_one_ms as f64 * 1000.0, to_full_ms as f64 * 1000.0)));
                break;
            }
            None => match store.config.on_error {
                OnError::Allow => {}
                OnError::Deny => {
                    outcome = Err(SharedRefusal::StoreDown { limit: limiter.name.clone() });
                    break;
                }
                OnError::Local => {
                    let f = limiter.fallback(store.instances());
                    match admit(&[(&f.limiter, key.clone())]) {
                        Ok(()) => taken.push(Taken::Local(f, key)),
                        Err(r) => {
                            outcome = Err(SharedRefusal::Limited(r));
                            break;
                        }
                    }
                }
            },
        }
    }
    if outcome.is_err() {
        for t in taken {
            match t {
                Taken::Store(limiter, key) => {
                    store.decide(&limiter.name, &limiter.config, key, true).await;
                }
                Taken::Local(f, key) => refund(&[(&f.limiter, key.clone())]),
            }
        }
    }
    outcome
}

/// How often the sweeper runs.
pub const SWEEP_EVERY: Duration = Duration::from_secs(5);

#[cfg(test)]
mod tests {
    use super::*;

    fn limiter(name: &str, rate: u64, per: Duration, burst: u64, key: LimitKey) -> RateLimiter {
        RateLimiter::new(name, RateLimitConfig { rate, per, burst, key, shared: false }, Arc::default())
    }

    fn ip(s: &str) -> Key {
        Key::Ip(s.parse().unwrap())
    }

    #[test]
    fn a_refused_request_takes_no_token_from_any_limit() {
        let wide = limiter("wide", 100, Duration::from_secs(60), 100, LimitKey::Global);
        let narrow = limiter("narrow", 1, Duration::from_secs(60), 2, LimitKey::ClientIp);
        let checks = |k: &str| [(&wide, Key::Global), (&narrow, ip(k))];
        assert!(admit(&checks("1.1.1.1")).is_ok());
        assert!(admit(&checks("1.1.1.1")).is_ok());
        let r = admit(&checks("1.1.1.1")).unwrap_err();
        assert_eq!(r.limit, "narrow");
        assert_eq!((r.capacity, r.remaining), (2, 0));
        assert!((1..=60).contains(&r.retry_after), "{r:?}");
        // The global bucket lost exactly the two admitted requests' tokens.
        let t = wide.micros(Instant::now());
        let global = wide.shard(&Key::Global).lock().unwrap().get(&Key::Global).unwrap().tokens(&wide.refill, t);
        assert!((97.9..98.1).contains(&global), "{global}");
        // Another key is unaffected.
        assert!(admit(&checks("2.2.2.2")).is_ok());
        assert_eq!(narrow.refused.load(Relaxed), 1);
    }

    #[test]
    fn full_buckets_are_swept_and_memory_is_returned() {
        let l = limiter("ip", 1000, Duration::from_millis(100), 1, LimitKey::ClientIp);
        for i in 0..50_000u32 {
            assert!(admit(&[(&l, Key::Ip(IpAddr::from(i.to_be_bytes())))]).is_ok());
        }
        assert_eq!(l.len(), 50_000);
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(l.sweep(), 0, "every bucket refilled to full and was dropped");
        let cap: usize = l.shards.iter().map(|s| s.lock().unwrap().capacity()).sum();
        assert!(cap < 64 * 64, "capacity given back: {cap}");
    }

    #[test]
    fn a_refund_gives_back_one_token_and_never_past_burst() {
        let l = limiter("r", 1, Duration::from_secs(3600), 2, LimitKey::ClientIp);
        let checks = [(&l, ip("1.1.1.1"))];
        assert!(admit(&checks).is_ok());
        assert!(admit(&checks).is_ok());
        assert!(admit(&checks).is_err());
        refund(&checks);
        assert!(admit(&checks).is_ok(), "the refunded token is taken again");
        refund(&checks);
        refund(&checks);
        refund(&checks);
        assert!(admit(&checks).is_ok());
        assert!(admit(&checks).is_ok());
        assert!(admit(&checks).is_err(), "refunds stop at burst");
    }

    #[test]
    fn the_fallback_is_this_instances_share() {
        let l = limiter("f", 100, Duration::from_secs(60), 10, LimitKey::ClientIp);
        let f = l.fallback(3);
        assert_eq!((f.limiter.config.burst, f.limiter.config.per), (4, Duration::from_secs(180)));
        assert!(Arc::ptr_eq(&f, &l.fallback(3)), "kept while the count holds");
        assert_eq!(l.fallback(1).limiter.config.burst, 10);
    }

    #[test]
    fn header_keys_fall_back_to_a_separate_ip_space() {
        let l =
            limiter("key", 1, Duration::from_secs(60), 1, LimitKey::Header(http::HeaderName::from_static("x-api-key")));
        let client: IpAddr = "9.9.9.9".parse().unwrap();
        let mut h = HeaderMap::new();
        assert_eq!(l.key(client, &h), Key::NoHeader(client));
        h.insert("x-api-key", HeaderValue::from_static("9.9.9.9"));
        assert_eq!(l.key(client, &h), Key::Header(HeaderValue::from_static("9.9.9.9")));
        assert_ne!(l.key(client, &h), l.key(client, &HeaderMap::new()));
    }
}
