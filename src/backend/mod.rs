//! One backend of an upstream and the state about it that outlives a reload: health,
//! in-flight count, counters and the pool of idle connections.
//!
//! Shared by `Arc` between the request path, the health checker, the metrics collector
//! and `/status`; every field the request path touches is an atomic, so picking and
//! counting take no lock.

pub mod health;
mod latency;
mod load_index;
mod passive;
mod pool;
mod queue;

use std::fmt::Display;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed, Ordering::SeqCst};

use arc_swap::ArcSwapOption;
use http::uri::Authority;

use crate::config::{PassiveConfig, PoolConfig};
pub use crate::http1::client::{
    BackendIo, BodyError, Conn, ConnBody, Framing, Head, NoBody, PendingUpload, ReadError, RequestFraming, SendError,
};
use crate::metrics::StatusCounts;
use crate::tls::BackendTls;
use latency::LatencyEwma;
pub use latency::clock;
pub use load_index::{IndexSlot, LoadIndex};
pub use passive::Admission;
use passive::{PassiveState, Transition};
pub use pool::{ConnectError, Pool};
pub use queue::{Entry, QueueRefusal, SlotQueue, Ticket};

/// Where a backend found by DNS came from: the host name, and the address it resolved to.
pub type FoundAt = (Arc<str>, std::net::SocketAddr);

#[derive(Debug)]
pub struct Backend {
    /// The URL as written in the config, for logs, metrics and `/status`.
    pub url: Arc<str>,
    pub upstream: Arc<str>,
    /// `host:port`, always with the port: the `Host` sent (with `preserve_host = false`)
    /// and the TLS server name. For a backend found by DNS, the name's, not the address's.
    pub authority: Authority,
    /// The host name this backend's address was found under (SPEC 12); `None` for an IP
    /// literal in the config.
    pub name: Option<Arc<str>>,
    /// When it last joined its upstream or came back up ([`clock`] + 1), while its share
    /// still grows under `slow_start`; 0 once it has all of it.
    ramp_since: AtomicU64,
    /// Written by the active checker (true when none is configured), read by pickers.
    active_up: AtomicBool,
    /// Written by the request path on failures and successes, read by pickers.
    passive: PassiveState,
    /// Requests (and upgraded tunnels) now using this backend.
    inflight: AtomicUsize,
    /// Where least-connections indexes this backend's load; kept current by every change
    /// of `inflight` and of health. `None` under round-robin.
    index: ArcSwapOption<IndexSlot>,
    /// `index` is set. Round-robin's requests read this flag instead of loading `index`,
    /// which costs about 130 instructions a request (callgrind).
    indexed: AtomicBool,
    /// The queue of its upstream, when that caps `max_inflight`: a released slot is handed
    /// to the request at its head. `None` (and `queued` false) otherwise, at no cost.
    queue: ArcSwapOption<SlotQueue>,
    queued: AtomicBool,
    /// Requests that got a response head from this backend.
    requests: AtomicU64,
    /// Attempts that failed: connect errors, resets, timeouts.
    failures: AtomicU64,
    /// Passive ejections that were due but refused by `max_ejected_percent`.
    ejections_refused: AtomicU64,
    /// Response-head latency, written by the request path of a least-latency upstream
    /// (failures as a penalty), read by its picks.
    latency: LatencyEwma,
    /// Final statuses of the requests this backend served or failed.
    pub statuses: StatusCounts,
    pub pool: Arc<Pool>,
}

impl Backend {
    /// `tls` is set for an `https://` backend. `found` is the host name and the address it
    /// resolved to, for a backend found by DNS; connections then go to the address.
    pub fn new(
        upstream: &str,
        url: &str,
        authority: Authority,
        found: Option<FoundAt>,
        pool: PoolConfig,
        tls: Option<BackendTls>,
    ) -> Backend {
        Backend {
            url: url.into(),
            upstream: upstream.into(),
            pool: Arc::new(Pool::new(authority.clone(), found.as_ref().map(|f| f.1), pool, tls)),
            authority,
            name: found.map(|f| f.0),
            ramp_since: AtomicU64::new(0),
            active_up: AtomicBool::new(true),
            passive: PassiveState::default(),
            inflight: AtomicUsize::new(0),
            index: ArcSwapOption::empty(),
            indexed: AtomicBool::new(false),
            queue: ArcSwapOption::empty(),
            queued: AtomicBool::new(false),
            requests: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            ejections_refused: AtomicU64::new(0),
            latency: LatencyEwma::default(),
            statuses: StatusCounts::default(),
        }
    }

    /// Up by the active checks and not taken out by the passive ones.
    pub fn is_healthy(&self) -> bool {
        self.active_up.load(Relaxed) && !self.passive.is_out()
    }

    /// Whether a request may be sent here now (see [`Admission`]).
    pub fn admission(&self, passive: &PassiveConfig) -> Admission {
        if !self.active_up.load(Relaxed) {
            return Admission::Closed;
        }
        self.passive.admission(passive)
    }

    pub fn claim_trial(&self, seen: u64) -> bool {
        self.passive.claim_trial(seen)
    }

    pub fn is_active_up(&self) -> bool {
        self.active_up.load(Relaxed)
    }

    /// Sets the active checkers' verdict, logging a change once.
    pub fn set_active_up(&self, up: bool, reason: &str) {
        if self.active_up.swap(up, Relaxed) != up {
            self.reindex();
            if up {
                self.start_ramp();
                tracing::info!(upstream = %self.upstream, backend = %self.url, reason, "backend up: active checks pass");
            } else {
                tracing::warn!(upstream = %self.upstream, backend = %self.url, reason, "backend down: active checks fail");
            }
        }
    }

    /// Starts the slow-start ramp: the backend just joined its upstream or came back up.
    pub fn start_ramp(&self) {
        self.ramp_since.store(clock() + 1, Relaxed);
    }

    /// The share of its weight this backend takes at `now` ([`clock`]) under `slow_start`:
    /// from 0.1 when it joined or came back up to 1 when `slow_start` has passed. `None`:
    /// the whole of it (and the ramp is forgotten, so later picks read one atomic).
    #[inline]
    pub fn ramp_share(&self, now: u64, slow_start: std::time::Duration) -> Option<f64> {
        let since = self.ramp_since.load(Relaxed);
        if since == 0 {
            return None;
        }
        let elapsed = now.saturating_sub(since - 1) as f64 / slow_start.as_nanos().max(1) as f64;
        if elapsed >= 1.0 {
            // Unless a new ramp started meanwhile.
            let _ = self.ramp_since.compare_exchange(since, 0, Relaxed, Relaxed);
            return None;
        }
        Some(0.1 + 0.9 * elapsed)
    }

    /// Takes the backend out of service for good (gone from its upstream): its checker
    /// stops at its next tick and its idle connections are closed now.
    pub fn retire(&self) {
        self.pool.close();
    }

    /// Gone from its upstream (by reload or DNS); requests already on it finish.
    pub fn is_retired(&self) -> bool {
        self.pool.is_closed()
    }

    /// Forgets passive failures (passive checks were turned off).
    pub fn reset_passive(&self) {
        self.passive.reset();
        self.reindex();
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

    pub fn ejections_refused(&self) -> u64 {
        self.ejections_refused.load(Relaxed)
    }

    /// Out on passive checks, whatever the active ones say.
    pub fn is_ejected(&self) -> bool {
        self.passive.is_out()
    }

    /// Counts a request as in flight until the returned guard is dropped.
    pub fn begin(self: &Arc<Self>) -> InflightGuard {
        self.inflight.fetch_add(1, SeqCst);
        self.reindex();
        InflightGuard(Some(self.clone()))
    }

    /// [`Backend::begin`] if fewer than `cap` requests are in flight here.
    pub fn try_begin(self: &Arc<Self>, cap: u32) -> Option<InflightGuard> {
        let cap = cap as usize;
        self.inflight.fetch_update(SeqCst, SeqCst, |n| (n < cap).then_some(n + 1)).ok()?;
        self.reindex();
        Some(InflightGuard(Some(self.clone())))
    }

    /// Points this backend's released slots at its upstream's queue (`None`: no cap).
    pub fn set_queue(&self, queue: Option<Arc<SlotQueue>>) {
        self.queued.store(queue.is_some(), SeqCst);
        self.queue.store(queue);
    }

    /// Out on passive checks (and not down by the active ones): due a trial in time.
    pub fn is_passive_out(&self) -> bool {
        self.active_up.load(Relaxed) && self.passive.is_out()
    }

    /// Moves this backend's load into `slot` (`None`: into no index), retiring the index
    /// it was in before.
    pub fn set_index(&self, slot: Option<Arc<IndexSlot>>) {
        self.indexed.store(slot.is_some(), SeqCst);
        if let Some(old) = self.index.swap(slot) {
            old.index.retire();
        }
        self.reindex();
    }

    /// Writes this backend's load and health into its index. Repeated until a write saw
    /// the same state before and after, so that of two racing writers the last to finish
    /// wrote the current state.
    fn reindex(&self) {
        if !self.indexed.load(Relaxed) {
            return;
        }
        let slot = self.index.load();
        let Some(slot) = slot.as_deref() else { return };
        loop {
            let (inflight, pickable) = (self.inflight.load(SeqCst), self.is_healthy());
            slot.store(inflight, pickable);
            if !pickable && self.is_passive_out() {
                slot.index.note_passive_out();
            }
            if self.inflight.load(SeqCst) == inflight && self.is_healthy() == pickable {
                return;
            }
        }
    }

    /// An attempt is being sent here (retries and resends included).
    pub fn record_attempt(&self) {
        self.requests.fetch_add(1, Relaxed);
    }

    /// A response head arrived; `trial`: this request was the passive trial.
    pub fn record_response(&self, trial: bool) {
        if self.passive.on_success(trial) == Some(Transition::Recovered) {
            self.start_ramp();
            // Back in the index now, not when the trial's response (perhaps a long stream
            // or a tunnel) ends.
            self.reindex();
            tracing::info!(upstream = %self.upstream, backend = %self.url, reason = "a trial request succeeded", "backend up: back in after passive ejection");
        }
    }

    /// A latency sample (or a failure's penalty) for least-latency, seen at `now` ([`clock`]).
    pub fn record_latency(&self, sample: std::time::Duration, now: u64) {
        self.latency.record(sample, now);
    }

    /// The latency estimate in nanoseconds at `now` ([`clock`]); `None` before a sample.
    pub fn latency_estimate(&self, now: u64) -> Option<f64> {
        self.latency.estimate(now)
    }

    /// An attempt failed: connect error, reset, or timeout. `may_eject` is the upstream's
    /// say on an ejection that is due (`max_ejected_percent`); it is asked again once the
    /// backend is out, and the ejection undone if another backend went out meanwhile.
    pub fn record_failure(
        &self,
        passive: &PassiveConfig,
        trial: bool,
        error: &dyn Display,
        may_eject: impl Fn() -> bool,
    ) {
        self.failures.fetch_add(1, Relaxed);
        let Some(Transition::EjectionDue { failures }) = self.passive.on_failure(passive, trial) else { return };
        let reason = format_args!("{failures} consecutive failures on real traffic, the last: {error}");
        if may_eject() {
            if !self.passive.eject(passive) {
                return;
            }
            if may_eject() {
                self.reindex();
                tracing::warn!(
                    upstream = %self.upstream,
                    backend = %self.url,
                    %reason,
                    out_for = %humantime::format_duration(passive.fail_timeout),
                    "backend down: passive checks",
                );
                return;
            }
            self.passive.reset_out();
        }
        self.ejections_refused.fetch_add(1, Relaxed);
        if self.passive.note_refused() {
            tracing::warn!(
                upstream = %self.upstream,
                backend = %self.url,
                %reason,
                max_ejected_percent = passive.max_ejected_percent,
                "passive ejection refused: it would take out more than max_ejected_percent of the upstream, or its last backend up",
            );
        }
    }
}

/// Holds one unit of a backend's in-flight count.
#[derive(Debug)]
pub struct InflightGuard(Option<Arc<Backend>>);

impl InflightGuard {
    pub fn backend(&self) -> &Arc<Backend> {
        self.0.as_ref().expect("a guard holds its backend until dropped")
    }
}

impl Drop for InflightGuard {
    fn drop(&mut self) {
        // `None`: a copy made to hand the slot over, which nobody took.
        let Some(b) = self.0.take() else { return };
        match b.queued.load(Relaxed).then(|| b.queue.load_full()).flatten() {
            // A capped backend: the slot goes to the head of its upstream's queue, or back.
            Some(queue) => queue.release(&b),
            None => {
                b.inflight.fetch_sub(1, SeqCst);
            }
        }
        b.reindex();
    }
}
