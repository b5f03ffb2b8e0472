//! The threads that accept and serve client connections: one current-thread tokio runtime
//! each. A connection, its requests and the backend connections they use stay on the
//! thread that accepted it: no work stealing, and no cross-thread wake-up on the request
//! path.

use std::cell::Cell;

use tokio::runtime::{Builder, Handle};

thread_local! {
    static WORKER: Cell<usize> = const { Cell::new(0) };
}

/// Which worker thread this is; 0 on any other thread (which shares worker 0's slots).
pub fn current() -> usize {
    WORKER.with(Cell::get)
}

/// The worker threads; each runs an accept loop on every listener.
#[derive(Debug)]
pub struct Workers {
    handles: Vec<Handle>,
}

impl Workers {
    /// Starts `n` (at least one) worker threads. They run until the process exits.
    pub fn start(n: usize) -> std::io::Result<Workers> {
        let mut handles = Vec::with_capacity(n.max(1));
        for i in 0..n.max(1) {
            let rt = Builder::new_current_thread().enable_all().build()?;
            handles.push(rt.handle().clone());
            std::thread::Builder::new().name(format!("balancer-worker-{i}")).spawn(move || {
                WORKER.with(|w| w.set(i));
                rt.block_on(std::future::pending::<()>());
            })?;
        }
        Ok(Workers { handles })
    }

    pub fn handles(&self) -> &[Handle] {
        &self.handles
    }
}
