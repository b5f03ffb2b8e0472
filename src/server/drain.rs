//! Draining one listener's client connections: each is told to finish (close when idle,
//! no more keep-alive) and the listener waits until every one has ended.
//!
//! A connection reads one atomic per poll to learn whether the drain has begun; the drain
//! wakes each connection's task once. (hyper-util's watcher took a lock on every poll.)
//! A connection's waker is made the first time it waits; a parked one gives it up, and
//! its worker's parking lot watches the drain for all of them.

use std::future::poll_fn;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::task::{Context, Poll, Waker};

use atomic_waker::AtomicWaker;
use tokio::sync::Notify;

/// The connections of one listener (clones share them). Dropping it does not drain them.
#[derive(Clone, Debug, Default)]
pub struct Drain {
    shared: Arc<Shared>,
}

#[derive(Debug, Default)]
struct Shared {
    draining: AtomicBool,
    open: AtomicUsize,
    /// The waker of each connection's task, dropped with its guard.
    conns: Mutex<Registry>,
    /// Notified when the last connection ends.
    done: Notify,
}

#[derive(Debug, Default)]
struct Registry {
    wakers: Vec<Weak<AtomicWaker>>,
    /// Tasks that watch the drain for many connections (the parking lots).
    watchers: Vec<Waker>,
    /// Dead entries are swept when the list reaches this length.
    sweep_at: usize,
}

impl Drain {
    pub fn new() -> Drain {
        Drain::default()
    }

    /// Counts a connection as open until the guard is dropped.
    pub fn enter(&self) -> DrainGuard {
        self.shared.open.fetch_add(1, Ordering::AcqRel);
        DrainGuard { shared: self.shared.clone(), waker: OnceLock::new() }
    }

    /// Wakes `waker` when the drain begins (at once if it has).
    pub fn watch(&self, waker: &Waker) {
        self.shared.conns.lock().expect("drain lock").watchers.push(waker.clone());
        if self.is_draining() {
            waker.wake_by_ref();
        }
    }

    /// Whether the drain has begun.
    pub fn is_draining(&self) -> bool {
        self.shared.draining.load(Ordering::Acquire)
    }

    /// Whether `other` is a handle to the same listener's connections.
    pub fn same(&self, other: &Drain) -> bool {
        Arc::ptr_eq(&self.shared, &other.shared)
    }

    /// Connections open now.
    pub fn count(&self) -> usize {
        self.shared.open.load(Ordering::Acquire)
    }

    /// Tells every connection to finish, then waits until all have ended.
    pub async fn shutdown(self) {
        self.shared.draining.store(true, Ordering::Release);
        let (wakers, watchers) = {
            let reg = self.shared.conns.lock().expect("drain lock");
            (reg.wakers.clone(), reg.watchers.clone())
        };
        for w in wakers.iter().filter_map(Weak::upgrade) {
            w.wake();
        }
        for w in watchers {
            w.wake();
        }
        loop {
            let ended = self.shared.done.notified();
            if self.count() == 0 {
                return;
            }
            ended.await;
        }
    }
}

/// One open connection of a [`Drain`].
#[derive(Debug)]
pub struct DrainGuard {
    shared: Arc<Shared>,
    /// Made (and listed with the drain) the first time the connection waits.
    waker: OnceLock<Arc<AtomicWaker>>,
}

impl DrainGuard {
    /// Whether the drain has begun; if not, the task of `cx` is woken when it does.
    pub fn poll_draining(&self, cx: &mut Context<'_>) -> bool {
        if self.shared.draining.load(Ordering::Acquire) {
            return true;
        }
        self.waker.get_or_init(|| self.listed()).register(cx.waker());
        self.shared.draining.load(Ordering::Acquire)
    }

    /// A new waker, listed with the drain so that the drain wakes it.
    fn listed(&self) -> Arc<AtomicWaker> {
        let waker = Arc::new(AtomicWaker::new());
        let mut reg = self.shared.conns.lock().expect("drain lock");
        if reg.wakers.len() >= reg.sweep_at {
            reg.wakers.retain(|w| w.strong_count() > 0);
            reg.sweep_at = (reg.wakers.len() * 2).max(64);
        }
        reg.wakers.push(Arc::downgrade(&waker));
        waker
    }

    /// Gives up the connection's waker while something else watches the drain for it
    /// (see [`Drain::watch`]); the next wait makes a new one.
    pub fn forget_waker(&mut self) {
        self.waker.take();
    }

    pub fn is_draining(&self) -> bool {
        self.shared.draining.load(Ordering::Acquire)
    }

    /// The drain this connection belongs to.
    pub fn drain(&self) -> Drain {
        Drain { shared: self.shared.clone() }
    }

    /// Resolves when the drain begins.
    pub async fn draining(&self) {
        poll_fn(|cx| if self.poll_draining(cx) { Poll::Ready(()) } else { Poll::Pending }).await;
    }
}

impl Drop for DrainGuard {
    fn drop(&mut self) {
        if self.shared.open.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.shared.done.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn shutdown_waits_for_every_connection_and_wakes_them() {
        let drain = Drain::new();
        let a = drain.enter();
        let b = drain.enter();
        assert_eq!(drain.count(), 2);
        let told = tokio::spawn(async move {
            a.draining().await;
            drop(a);
        });
        tokio::task::yield_now().await;
        let waiting = tokio::spawn(drain.shutdown());
        told.await.unwrap();
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished(), "one connection is still open");
        drop(b);
        waiting.await.unwrap();
    }
}
