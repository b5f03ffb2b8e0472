//! Client-facing listeners: accepting, capping connections, serving HTTP/1.1 and HTTP/2
//! on one socket, the connection-level timeouts, and the graceful drain.

mod conn_guard;
pub mod drain;
pub mod h1;
pub mod head_check;
mod listener;
pub mod workers;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use atomic_waker::AtomicWaker;

pub use conn_guard::{ConnLimits, GuardedIo};
pub use listener::{BindError, ListenAddr, Listeners, bind, listen_set};
pub use workers::Workers;

/// Whether a client connection has a request (or an upgraded tunnel) in progress.
/// Written by the request path through [`ActivityGuard`]s, read by [`GuardedIo`] to
/// tell an idle connection (idle timeout) from one that is sending a head (408).
#[derive(Debug, Default)]
pub struct ConnActivity {
    busy: AtomicUsize,
    /// The connection's reader, woken when the last request ends so its idle timer starts
    /// even if hyper is already waiting on the socket.
    idle_waker: AtomicWaker,
}

impl ConnActivity {
    /// Whether busy; when busy, `waker` is woken as soon as the connection is not.
    pub fn is_busy_or_register(&self, waker: &std::task::Waker) -> bool {
        if !self.is_busy() {
            return false;
        }
        self.idle_waker.register(waker);
        // The last request may have ended between the check and the registration.
        self.is_busy()
    }

    pub fn begin(self: &Arc<Self>) -> ActivityGuard {
        self.busy.fetch_add(1, Ordering::AcqRel);
        ActivityGuard(self.clone())
    }

    pub fn is_busy(&self) -> bool {
        self.busy.load(Ordering::Acquire) > 0
    }
}

/// One unit of [`ConnActivity`], released on drop.
#[derive(Debug)]
pub struct ActivityGuard(Arc<ConnActivity>);

impl Drop for ActivityGuard {
    fn drop(&mut self) {
        if self.0.busy.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle_waker.wake();
        }
    }
}
