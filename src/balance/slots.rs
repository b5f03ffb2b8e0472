//! Taking a slot on a backend for one attempt (SPEC 11): with no `max_inflight` it is the
//! pick; with one, only backends under the cap are offered to the strategy, the slot is
//! taken atomically, and when every backend is full the request waits in its upstream's
//! queue for the first slot that frees on any of them (first come, first served: while
//! others wait, a newcomer queues behind them).

use std::sync::Arc;

use super::{Affinity, Balancer, pick};
use crate::backend::{Admission, Backend, Entry, InflightGuard, QueueRefusal, SlotQueue};
use crate::config::PassiveConfig;

/// A backend's slot, held for one attempt.
#[derive(Debug)]
pub struct Slot {
    pub index: usize,
    /// This request is the backend's passive trial.
    pub trial: bool,
    pub guard: InflightGuard,
}

/// Why no slot was had.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoSlot {
    /// No backend that `accept` allows is healthy.
    NoHealthy,
    /// Every one is at `max_inflight`, and the upstream has no queue.
    AllBusy,
    Queue(QueueRefusal),
}

/// What a pick needs of the upstream.
pub struct Candidates<'u> {
    pub balancer: &'u dyn Balancer,
    pub backends: &'u [Arc<Backend>],
    pub passive: &'u PassiveConfig,
    /// Requests in flight per backend; 0: no cap.
    pub cap: u32,
    pub queue: &'u SlotQueue,
    /// `slow_start`: how long a new or recovered backend's share takes to grow.
    pub slow_start: std::time::Duration,
}

impl Candidates<'_> {
    /// A slot on a backend that `accept` allows, waiting in the queue when all are full
    /// (a request that waited takes the first slot that frees, whatever its `affinity`).
    /// The common cases (no cap, or a free slot) are answered without an `await`.
    pub async fn acquire(&self, affinity: Affinity, accept: &(dyn Fn(usize) -> bool + Sync)) -> Result<Slot, NoSlot> {
        match self.take(affinity, accept) {
            Some(taken) => taken,
            None => self.wait(affinity, accept).await,
        }
    }

    /// A slot now, or why there is none; `None` when the request may have to wait.
    #[inline]
    pub fn take(&self, affinity: Affinity, accept: &(dyn Fn(usize) -> bool + Sync)) -> Option<Result<Slot, NoSlot>> {
        if self.cap == 0 {
            return Some(match pick(self.balancer, self.backends, self.passive, affinity, self.slow_start, accept) {
                Some((index, trial)) => Ok(Slot { index, trial, guard: self.backends[index].begin() }),
                None => Err(NoSlot::NoHealthy),
            });
        }
        if self.queue.depth() == 0 {
            return self.try_capped(affinity, accept).map(Ok);
        }
        None
    }

    /// Every backend is full (or others wait already): waits in the queue. For a request
    /// that [`Candidates::take`] answered `None`.
    pub async fn wait(&self, affinity: Affinity, accept: &(dyn Fn(usize) -> bool + Sync)) -> Result<Slot, NoSlot> {
        let any_up =
            self.backends.iter().enumerate().any(|(i, b)| accept(i) && b.admission(self.passive) != Admission::Closed);
        if !any_up {
            return Err(NoSlot::NoHealthy);
        }
        if !self.queue.enabled() {
            return Err(NoSlot::AllBusy);
        }
        // Under the queue's lock, which every release of a capped backend's slot takes too:
        // either a slot is free now, or this request is in the queue before the next
        // release looks at it. A freed slot is never missed.
        let ticket = match self.queue.enqueue_unless(|| self.try_capped(affinity, accept)) {
            Ok(Entry::Now(slot)) => return Ok(slot),
            Ok(Entry::Queued(ticket)) => ticket,
            Err(refused) => return Err(NoSlot::Queue(refused)),
        };
        let guard = ticket.wait().await.map_err(NoSlot::Queue)?;
        let index = self
            .backends
            .iter()
            .position(|b| Arc::ptr_eq(b, guard.backend()))
            .ok_or(NoSlot::Queue(QueueRefusal::Closed))?;
        Ok(Slot { index, trial: false, guard })
    }

    /// A slot on a backend under the cap, if one is free. A pick can lose the slot to a
    /// concurrent one; it then picks again (at most once per backend).
    fn try_capped(&self, affinity: Affinity, accept: &(dyn Fn(usize) -> bool + Sync)) -> Option<Slot> {
        let cap = self.cap as usize;
        for _ in 0..self.backends.len() {
            let under_cap = |i: usize| accept(i) && self.backends[i].inflight() < cap;
            let (index, trial) =
                pick(self.balancer, self.backends, self.passive, affinity, self.slow_start, under_cap)?;
            if let Some(guard) = self.backends[index].try_begin(self.cap) {
                return Some(Slot { index, trial, guard });
            }
        }
        None
    }
}
