//! Draining one listener's client connections: each is told to finish (close when idle,
//! no more keep-alive) and the listener waits until every one has ended.
//!
//! A connection reads one atomic per poll to learn whether the drain has begun; the drain
//! wakes each connection's task once. (hyper-util's watcher took a lock on every poll.)

use std::future::poll_fn;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};

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
        let waker = Arc::new(AtomicWaker::new());
        let mut reg = self.shared.conns.lock().expect("drain lock");
        if reg.wakers.len() >= reg.sweep_at {
            reg.wakers.retain(|w| w.strong_count() > 0);
            reg.sweep_at = (reg.wakers.len() * 2).max(64);
        }
        reg.wakers.push(Arc::downgrade(&waker));
        DrainGuard { shared: self.shared.clone(), waker }
    }

    /// Connections open now.
    pub fn count(&self) -> usize {
        self.shared.open.load(Ordering::Acquire)
    }

    /// Tells every connection to finish, then waits until all have ended.
    pub async fn shutdown(self) {
        self.shared.draining.store(true, Ordering::Release);
        let wakers: Vec<Weak<AtomicWaker>> = self.shared.conns.lock().expect("drain lock").wakers.clone();
        for w in wakers.iter().filter_map(Weak::upgrade) {
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
    waker: Arc<AtomicWaker>,
}

impl DrainGuard {
    /// Whether the drain has begun; if not, the task of `cx` is woken when it does.
    pub fn poll_draining(&self, cx: &mut Context<'_>) -> bool {
        if self.shared.draining.load(Ordering::Acquire) {
            return true;
        }
        self.waker.register(cx.waker());
        self.shared.draining.load(Ordering::Acquire)
    }

    pub fn is_draining(&self) -> bool {
        self.shared.draining.load(Ordering::Acquire)
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
