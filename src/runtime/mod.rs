//! The state the request path reads: one immutable snapshot, swapped whole on reload.
//!
//! A request loads the `Arc<Runtime>` once and keeps it to its end, so it never sees half
//! a reload. Per-backend state lives in `Arc<Backend>`, carried from one snapshot to the
//! next by (upstream name, backend URL).

mod build;
pub mod path;
pub mod router;

use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::backend::Backend;
use crate::balance::Balancer;
use crate::config::{Config, StrategyName, Timeouts};
pub use build::build;
use router::Router;

/// The live runtime, shared by listeners, the reloader and the admin listener.
pub type SharedRuntime = Arc<ArcSwap<Runtime>>;

#[derive(Debug)]
pub struct Runtime {
    /// Bumped by every successful (re)load; 1 for the first.
    pub generation: u64,
    pub config: Config,
    pub router: Router,
    pub upstreams: Vec<Upstream>,
}

#[derive(Debug)]
pub struct Upstream {
    pub name: String,
    pub strategy: StrategyName,
    pub backends: Vec<Arc<Backend>>,
    pub weights: Vec<u32>,
    balancer: Box<dyn Balancer>,
    pub preserve_host: bool,
    pub retries: u32,
    pub timeouts: Timeouts,
}

impl Upstream {
    /// A backend that `accept` allows, by this upstream's strategy, among healthy ones.
    pub fn pick(&self, mut accept: impl FnMut(usize) -> bool) -> Option<usize> {
        self.balancer
            .pick(&self.backends, &mut |i, b| b.is_healthy() && accept(i))
    }
}
