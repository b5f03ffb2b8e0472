//! Picking a backend: one small trait, one file per strategy.
//!
//! Strategies know nothing of health: the caller passes `accept`, which says whether a
//! backend may be used now (healthy, not already tried by this request); [`pick`] is that
//! caller, with the passive trial and the ejection cap beside it.

mod least_connections;
mod pick;
mod round_robin;
mod slots;

use std::sync::Arc;

use crate::backend::Backend;
use crate::config::StrategyName;
pub use least_connections::LeastConnections;
pub use pick::{may_eject, pick};
pub use round_robin::RoundRobin;
pub use slots::{Candidates, NoSlot, Slot};

pub trait Balancer: Send + Sync + std::fmt::Debug {
    /// The index of the backend to use among `backends`, or `None` when `accept` refuses
    /// them all. `backends` is the same slice, in the same order, on every call.
    fn pick(&self, backends: &[Arc<Backend>], accept: &mut dyn FnMut(usize, &Backend) -> bool) -> Option<usize>;
}

/// The strategy named in the config, for these backends with these weights. Takes the
/// backends out of any load index an earlier runtime built, and into this one's.
pub fn for_strategy(name: StrategyName, backends: &[Arc<Backend>], weights: &[u32]) -> Box<dyn Balancer> {
    match name {
        StrategyName::RoundRobin => {
            backends.iter().for_each(|b| b.set_index(None));
            Box::new(RoundRobin::new(weights))
        }
        StrategyName::LeastConnections => Box::new(LeastConnections::new(backends, weights)),
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
                Arc::new(Backend::new("test", &format!("http://{auth}"), auth, pool, None))
            })
            .collect()
    }
}
