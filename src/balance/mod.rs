//! Picking a backend: one small trait, one file per strategy.
//!
//! Strategies know nothing of health: the caller passes `accept`, which says whether a
//! backend may be used now (healthy, not already tried by this request); [`pick`] is that
//! caller, with the passive trial, the ejection cap and the sticky cookie's pin beside it.

mod consistent_hash;
mod least_connections;
mod least_latency;
mod pick;
mod round_robin;
mod slots;
mod sticky;

use std::sync::Arc;

use crate::backend::Backend;
use crate::config::StrategyName;
pub use consistent_hash::{ConsistentHash, hash_of};
pub use least_connections::LeastConnections;
pub use least_latency::LeastLatency;
pub use pick::{may_eject, pick};
pub use round_robin::RoundRobin;
pub use slots::{Candidates, NoSlot, Slot};
pub use sticky::{Sticky, cookie};

pub trait Balancer: Send + Sync + std::fmt::Debug {
    /// The index of the backend to use among `backends`, or `None` when `accept` refuses
    /// them all. `backends` is the same slice, in the same order, on every call. `hash` is
    /// the request's key hashed ([`hash_of`]) for consistent-hash, 0 for the others.
    fn pick(
        &self,
        backends: &[Arc<Backend>],
        hash: u64,
        accept: &mut dyn FnMut(usize, &Backend) -> bool,
    ) -> Option<usize>;
}

/// What a pick knows of its request besides which backends it may take; the default
/// (nothing) for upstreams without `hash_key` or `[sticky]`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Affinity {
    /// The request's `hash_key`, hashed (consistent-hash only).
    pub hash: u64,
    /// The backend the request's sticky cookie names: taken first while it accepts.
    pub pinned: Option<usize>,
}

/// The strategy named in the config, for these backends with these weights. Takes the
/// backends out of any load index an earlier runtime built, and into this one's.
pub fn for_strategy(name: StrategyName, backends: &[Arc<Backend>], weights: &[u32]) -> Box<dyn Balancer> {
    if name != StrategyName::LeastConnections {
        backends.iter().for_each(|b| b.set_index(None));
    }
    match name {
        StrategyName::RoundRobin => Box::new(RoundRobin::new(weights)),
        StrategyName::LeastConnections => Box::new(LeastConnections::new(backends, weights)),
        StrategyName::ConsistentHash => Box::new(ConsistentHash::new(backends.iter().map(|b| &*b.url), weights)),
        StrategyName::LeastLatency => Box::new(LeastLatency::new(weights)),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::config::PoolConfig;
    use std::time::Duration;

    pub fn backends(n: usize) -> Vec<Arc<Backend>> {
        let pool =
            PoolConfig { keepalive: 1, idle_timeout: Duration::from_secs(1), connect_timeout: Duration::from_secs(1) };
        (0..n)
            .map(|i| {
                let auth: http::uri::Authority = format!("127.0.0.1:{}", 1000 + i).parse().unwrap();
                Arc::new(Backend::new("test", &format!("http://{auth}"), auth, None, pool, None))
            })
            .collect()
    }
}
