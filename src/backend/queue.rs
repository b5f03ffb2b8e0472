//! The queue of an upstream whose backends have a `max_inflight` cap (SPEC 11): requests
//! that find every backend full wait here, first come first served, and a slot that frees
//! on any of the upstream's backends is handed straight to the head of the queue (no
//! polling, no second race for it). Kept across reloads by upstream name, so queued
//! requests keep their place; a reload that removes the upstream closes it.
//!
//! Shared by the request path (which waits) and every in-flight guard of a capped backend
//! (which hands its slot on when it is released).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering::Relaxed, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::oneshot;

use super::{Backend, InflightGuard};
use crate::metrics::LatencyHistogram;

#[derive(Debug, Default)]
pub struct SlotQueue {
    /// Waiters in arrival order. A sender whose request stopped waiting (it left, or timed
    /// out) is skipped when its turn comes: its send fails.
    waiters: Mutex<VecDeque<oneshot::Sender<InflightGuard>>>,
    /// Requests waiting now (only live ones): the depth gauge and the `max` check.
    depth: AtomicUsize,
    /// The current runtime's settings (a reload stores new ones): the per-backend cap,
    /// the most that may wait, the longest wait in milliseconds (0: no queue).
    cap: AtomicU32,
    max: AtomicUsize,
    timeout_ms: AtomicU64,
    /// Requests refused because the queue was full, or because they waited too long.
    pub rejected_full: AtomicU64,
    pub rejected_timeout: AtomicU64,
    /// How long requests that got a slot waited for it.
    pub waits: LatencyHistogram,
}

/// Why a request that waited got no slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueRefusal {
    /// `max` requests were waiting already (or there is no queue).
    Full,
    /// No slot freed within the queue's timeout.
    Timeout(Duration),
    /// The upstream was removed by a reload while the request waited.
    Closed,
}

impl SlotQueue {
    /// Stores a (re)loaded upstream's settings: `cap` per backend (0: none), and the
    /// queue's `max` and `timeout` (`None`: requests do not wait).
    pub fn configure(&self, cap: u32, queue: Option<(usize, Duration)>) {
        self.cap.store(cap, Relaxed);
        let (max, timeout) = queue.unwrap_or_default();
        self.max.store(max, Relaxed);
        self.timeout_ms.store(timeout.as_millis() as u64, Relaxed);
    }

    /// Requests may wait here (a `[queue]` is configured).
    pub fn enabled(&self) -> bool {
        self.timeout_ms.load(Relaxed) > 0
    }

    pub fn cap(&self) -> u32 {
        self.cap.load(Relaxed)
    }

    /// Requests waiting now.
    pub fn depth(&self) -> usize {
        self.depth.load(Relaxed)
    }

    /// Under the queue's lock: what `now` finds (a free slot), or a place at the back of
    /// the queue, or a refusal when `max` requests already wait (or the upstream has no
    /// queue). Every release of a capped backend's slot takes the same lock
    /// ([`SlotQueue::release`]), so a slot freed meanwhile is either seen by `now` or
    /// handed to this request once it waits: none is lost between the two.
    pub fn enqueue_unless<T>(&self, now: impl FnOnce() -> Option<T>) -> Result<Entry<'_, T>, QueueRefusal> {
        let mut waiters = self.waiters.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(taken) = now() {
            return Ok(Entry::Now(taken));
        }
        if self.timeout_ms.load(Relaxed) == 0 || self.depth.load(Relaxed) >= self.max.load(Relaxed) {
            self.rejected_full.fetch_add(1, Relaxed);
            return Err(QueueRefusal::Full);
        }
        // Senders of requests that stopped waiting stay until their turn; dropped here so a
        // long-full queue does not grow without bound.
        if waiters.len() > 2 * self.max.load(Relaxed) {
            waiters.retain(|w| !w.is_closed());
        }
        let (tx, rx) = oneshot::channel();
        waiters.push_back(tx);
        self.depth.fetch_add(1, Relaxed);
        Ok(Entry::Queued(Ticket { queue: self, rx, started: std::time::Instant::now() }))
    }

    /// Releases one of `backend`'s slots: to the first request still waiting, while the
    /// backend is up and within the cap; otherwise the backend's in-flight count drops.
    /// Both under the queue's lock (see [`SlotQueue::enqueue_unless`]).
    pub(super) fn release(&self, backend: &Arc<Backend>) {
        let mut waiters = self.waiters.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if self.depth.load(Relaxed) > 0 && backend.is_healthy() && backend.inflight() <= self.cap() as usize {
            let mut guard = InflightGuard(Some(backend.clone()));
            while let Some(next) = waiters.pop_front() {
                match next.send(guard) {
                    Ok(()) => return,
                    Err(back) => guard = back,
                }
            }
            // Nobody took it: the copy must not release the slot a second time.
            guard.0 = None;
        }
        backend.inflight.fetch_sub(1, SeqCst);
    }

    /// The upstream is gone (a reload removed it): every waiter is answered at once.
    pub fn close(&self) {
        self.waiters.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clear();
    }
}

/// What [`SlotQueue::enqueue_unless`] found.
#[derive(Debug)]
pub enum Entry<'q, T> {
    /// A free slot, taken at once.
    Now(T),
    /// A place in the queue.
    Queued(Ticket<'q>),
}

/// A request's place in the queue. Dropping it leaves the queue at once (a client that
/// left, a request that found a slot by itself); a slot handed to it meanwhile is released
/// again, to the next in line.
#[derive(Debug)]
pub struct Ticket<'q> {
    queue: &'q SlotQueue,
    rx: oneshot::Receiver<InflightGuard>,
    started: std::time::Instant,
}

impl Ticket<'_> {
    /// Waits for a slot, within the queue's timeout.
    pub async fn wait(mut self) -> Result<InflightGuard, QueueRefusal> {
        let timeout = Duration::from_millis(self.queue.timeout_ms.load(Relaxed));
        match tokio::time::timeout(timeout, &mut self.rx).await {
            Ok(Ok(guard)) => {
                self.queue.waits.observe(self.started.elapsed());
                Ok(guard)
            }
            Ok(Err(_)) => Err(QueueRefusal::Closed),
            Err(_) => {
                self.queue.rejected_timeout.fetch_add(1, Relaxed);
                Err(QueueRefusal::Timeout(timeout))
            }
        }
    }
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        self.queue.depth.fetch_sub(1, Relaxed);
        self.rx.close();
        // A slot that arrived after the request stopped waiting goes to the next in line.
        drop(self.rx.try_recv());
    }
}
