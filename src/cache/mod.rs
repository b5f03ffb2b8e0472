//! `[caches.NAME]`: an RFC 9111 shared cache in memory for GET and HEAD (SPEC 14).
//!
//! http-cache-semantics decides what the RFC decides (storable or not, fresh or stale for
//! a request, `Vary`, `Age`); balancer adds its stricter rules ([`entry`]), the stale
//! windows, the storage bounded by size (moka, least recently used first), coalescing of
//! concurrent misses ([`flight`]) and the [`tee`] that streams one backend response to
//! every request waiting for it and stores it only once it is whole. The request path
//! uses it in `proxy/cache.rs`.

mod entry;
mod flight;
mod tee;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::SystemTime;

use moka::policy::EvictionPolicy;

use crate::config::CacheConfig;
pub(crate) use entry::{Entry, Freshness, Storable, age_value};
pub(crate) use flight::{Leader, Outcome, Role};
pub(crate) use tee::{Fill, Next, Reader, Tee};

/// The variants stored under one key (one per combination of the fields `Vary` names).
type Variants = Arc<Vec<Arc<Entry>>>;

/// At most this many variants per key: a `Vary` on a field with many values cannot fill
/// the cache with one URL's copies.
const MAX_VARIANTS: usize = 8;

/// What a request found in the cache.
#[derive(Debug)]
pub(crate) enum Found {
    /// Nothing under its key.
    Miss,
    /// Entries under its key, none for this request's `Vary` fields.
    OtherVariant,
    Fresh(Arc<Entry>),
    Stale(Arc<Entry>),
}

/// The results counted by `balancer_cache_requests_total{cache,result}`.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Counted {
    Hit,
    Miss,
    Stale,
    Revalidated,
    Bypass,
}

/// One `[caches.NAME]`: kept across a reload while its settings are unchanged, so its
/// entries and counters survive.
pub struct Cache {
    pub name: String,
    pub config: CacheConfig,
    store: moka::sync::Cache<Arc<str>, Variants>,
    flights: Arc<flight::Flights>,
    /// Bumped by the request path, read by `/metrics`.
    results: [AtomicU64; 5],
}

impl std::fmt::Debug for Cache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cache").field("name", &self.name).field("config", &self.config).finish_non_exhaustive()
    }
}

/// The key of a request: its host (lower case, with its port) and its target as sent.
/// The scheme is not part of it: `http` and `https` share entries.
pub(crate) fn key(host: &str, target: &str) -> Arc<str> {
    let mut k = String::with_capacity(host.len() + 1 + target.len());
    k.extend(host.chars().map(|c| c.to_ascii_lowercase()));
    k.push(' ');
    k.push_str(target);
    k.into()
}

/// The path part of a key (for purges by prefix).
fn key_path(key: &str) -> &str {
    key.split_once(' ').map_or("", |(_, t)| t)
}

impl Cache {
    pub fn new(name: &str, config: CacheConfig) -> Cache {
        let store = moka::sync::Cache::builder()
            .max_capacity(config.max_size)
            .weigher(|k: &Arc<str>, v: &Variants| {
                let sum: u64 = v.iter().map(|e| u64::from(e.weight)).sum::<u64>() + k.len() as u64;
                sum.min(u64::from(u32::MAX)) as u32
            })
            .eviction_policy(EvictionPolicy::lru())
            .build();
        Cache { name: name.to_owned(), config, store, flights: Arc::default(), results: Default::default() }
    }

    /// Counts one request's result.
    pub(crate) fn count(&self, result: Counted) {
        self.results[result as usize].fetch_add(1, Relaxed);
    }

    /// `(result, count)` for `/metrics`.
    pub fn results(&self) -> [(&'static str, u64); 5] {
        let n = |r: Counted| self.results[r as usize].load(Relaxed);
        [
            ("hit", n(Counted::Hit)),
            ("miss", n(Counted::Miss)),
            ("stale", n(Counted::Stale)),
            ("revalidated", n(Counted::Revalidated)),
            ("bypass", n(Counted::Bypass)),
        ]
    }

    /// Bytes held (heads and bodies, as weighed), after the store's pending evictions.
    pub fn bytes(&self) -> u64 {
        self.store.run_pending_tasks();
        self.store.weighted_size()
    }

    /// The entry under `key` for the GET or HEAD `req`.
    pub(crate) fn lookup(&self, key: &Arc<str>, req: &http::request::Parts, now: SystemTime) -> Found {
        let Some(variants) = self.store.get(key) else {
            return Found::Miss;
        };
        for e in variants.iter() {
            match e.freshness(req, now) {
                Freshness::Fresh => return Found::Fresh(e.clone()),
                Freshness::Stale => return Found::Stale(e.clone()),
                Freshness::OtherVariant => {}
            }
        }
        Found::OtherVariant
    }

    /// Stores `entry` for `key`, in place of the variant that `req` selects; gives it back
    /// shared.
    pub(crate) fn insert(&self, key: &Arc<str>, req: &http::request::Parts, entry: Entry) -> Arc<Entry> {
        let entry = Arc::new(entry);
        if u64::from(entry.weight) > self.config.max_size {
            return entry;
        }
        let now = SystemTime::now();
        let mut variants: Vec<Arc<Entry>> = match self.store.get(key) {
            Some(v) => v.iter().filter(|e| e.freshness(req, now) == Freshness::OtherVariant).cloned().collect(),
            None => Vec::new(),
        };
        variants.truncate(MAX_VARIANTS - 1);
        variants.insert(0, entry.clone());
        self.store.insert(key.clone(), Arc::new(variants));
        entry
    }

    /// Drops every variant under `key` (an unsafe method changed the resource).
    pub(crate) fn invalidate(&self, key: &Arc<str>) {
        self.store.invalidate(key);
    }

    /// Drops the entries whose path starts with `prefix`; says how many.
    pub fn purge(&self, prefix: &str) -> usize {
        let mut purged = 0;
        for (key, variants) in self.store.iter() {
            if key_path(&key).starts_with(prefix) {
                self.store.invalidate(&*key);
                purged += variants.len();
            }
        }
        self.store.run_pending_tasks();
        purged
    }

    /// Leads the fetch of `key` or waits for the one in progress.
    pub(crate) fn join(&self, key: &Arc<str>) -> Role {
        self.flights.join(key)
    }

    /// Leads the fetch of `key` unless one is in progress.
    pub(crate) fn try_lead(&self, key: &Arc<str>) -> Option<Leader> {
        self.flights.try_lead(key)
    }
}
