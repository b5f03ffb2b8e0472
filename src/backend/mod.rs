//! One backend of an upstream and the state about it that outlives a reload: health,
//! in-flight count, counters and the pool of idle connections.
//!
//! Shared by `Arc` between the request path, the health checker and `/status`; every
//! field the request path touches is an atomic, so picking and counting take no lock.

mod pool;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};

use http::uri::Authority;

use crate::config::PoolConfig;
pub use pool::{ConnectError, Pool, PooledConn};

#[derive(Debug)]
pub struct Backend {
    /// The URL as written in the config, for logs, metrics and `/status`.
    pub url: Arc<str>,
    /// `host:port`, always with the port.
    pub authority: Authority,
    /// Written by health checks (active and passive), read by the pickers.
    healthy: AtomicBool,
    /// Requests (and upgraded tunnels) now using this backend.
    inflight: AtomicUsize,
    /// Requests that got a response head from this backend.
    requests: AtomicU64,
    /// Attempts that failed: connect errors, resets, timeouts.
    failures: AtomicU64,
    pub pool: Arc<Pool>,
}

impl Backend {
    pub fn new(url: &str, authority: Authority, pool: PoolConfig) -> Backend {
        Backend {
            url: url.into(),
            pool: Arc::new(Pool::new(authority.clone(), pool)),
            authority,
            healthy: AtomicBool::new(true),
            inflight: AtomicUsize::new(0),
            requests: AtomicU64::new(0),
            failures: AtomicU64::new(0),
        }
    }

    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Relaxed)
    }

    pub fn inflight(&self) -> usize {
        self.inflight.load(Relaxed)
    }

    pub fn requests(&self) -> u64 {
        self.requests.load(Relaxed)
    }

    pub fn failures(&self) -> u64 {
        self.failures.load(Relaxed)
    }

    /// Counts a request as in flight until the returned guard is dropped.
    pub fn begin(self: &Arc<Self>) -> InflightGuard {
        self.inflight.fetch_add(1, Relaxed);
        InflightGuard(self.clone())
    }

    pub fn record_response(&self) {
        self.requests.fetch_add(1, Relaxed);
    }

    pub fn record_failure(&self) {
        self.failures.fetch_add(1, Relaxed);
    }
}

/// Holds one unit of a backend's in-flight count.
#[derive(Debug)]
pub struct InflightGuard(Arc<Backend>);

impl InflightGuard {
    pub fn backend(&self) -> &Arc<Backend> {
        &self.0
    }
}

impl Drop for InflightGuard {
    fn drop(&mut self) {
        self.0.inflight.fetch_sub(1, Relaxed);
    }
}
