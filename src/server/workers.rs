//! The threads that accept and serve client connections: one current-thread tokio runtime
//! each. A connection, its requests and the backend connections they use stay on the
//! thread that accepted it: no work stealing, and no cross-thread wake-up on the request
//! path.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

use tokio::runtime::{Builder, Handle};

use crate::logging::access;

/// The worker threads; each runs an accept loop on every listener.
#[derive(Debug)]
pub struct Workers {
    handles: Vec<Handle>,
    /// Open client connections per worker: a worker whose socket the kernel chose while
    /// another has clearly fewer hands the connection on (the kernel's choice is a hash of
    /// the client's address and port, fair over many connections but not over a few).
    open: Arc<[AtomicUsize]>,
}

/// One client connection counted on the worker that serves it, until dropped.
#[derive(Debug)]
pub struct Served {
    open: Arc<[AtomicUsize]>,
    worker: usize,
}

impl Drop for Served {
    fn drop(&mut self) {
        self.open[self.worker].fetch_sub(1, Relaxed);
    }
}

impl Workers {
    /// Starts `n` (at least one) worker threads. They run until the process exits.
    pub fn start(n: usize) -> std::io::Result<Workers> {
        let mut handles = Vec::with_capacity(n.max(1));
        for i in 0..n.max(1) {
            // Access-log lines are kept per worker and queued whenever it runs out of work.
            let rt = Builder::new_current_thread().enable_all().on_thread_park(access::flush_here).build()?;
            handles.push(rt.handle().clone());
            std::thread::Builder::new().name(format!("balancer-worker-{i}")).spawn(move || {
                crate::worker::set_current(i);
                access::batch_here();
                rt.block_on(std::future::pending::<()>());
            })?;
        }
        let open = (0..handles.len()).map(|_| AtomicUsize::new(0)).collect();
        Ok(Workers { handles, open })
    }

    /// Which worker should serve a connection that worker `me` accepted: `me`, unless
    /// another has fewer open connections by at least two plus a quarter of its own count.
    /// Counts it there.
    pub fn assign(&self, me: usize) -> (usize, Served) {
        let mine = self.open[me].load(Relaxed);
        let (least, fewest) = self
            .open
            .iter()
            .enumerate()
            .map(|(i, n)| (i, n.load(Relaxed)))
            .min_by_key(|&(_, n)| n)
            .unwrap_or((me, mine));
        let worker = if fewest + 2 + fewest / 4 <= mine { least } else { me };
        self.open[worker].fetch_add(1, Relaxed);
        (worker, Served { open: self.open.clone(), worker })
    }

    /// Queues the access-log lines the workers still keep: for the end, once their
    /// connections are gone and before the log thread writes its last.
    pub async fn flush_logs(&self) {
        let flushes: Vec<_> = self.handles.iter().map(|h| h.spawn(async { access::flush_here() })).collect();
        for f in flushes {
            let _ = f.await;
        }
    }

    pub fn handles(&self) -> &[Handle] {
        &self.handles
    }
}
