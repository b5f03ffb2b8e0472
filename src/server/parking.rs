//! The parking lot: one worker's idle keep-alive HTTP/1 connections, held as entries of an
//! epoll set of its own (one slab entry each: no task, no timer and no reactor entry)
//! until their next byte arrives, their idle time runs out or their listener drains.
//!
//! The set is one descriptor in the worker's event loop; the lot's one task reads its
//! events, sweeps expired entries and watches the drains of the listeners it holds
//! connections of.

use std::future::poll_fn;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::task::{Poll, Waker};
use std::time::Duration;

use mio::unix::SourceFd;
use mio::{Events, Interest, Token};
use slab::Slab;
use tokio::io::unix::AsyncFd;
use tokio::net::TcpStream;
use tokio::sync::{Notify, OwnedSemaphorePermit};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::ConnLimits;
use super::drain::{Drain, DrainGuard};
use super::h1::PARK_AFTER;
use super::workers::Served;
use crate::metrics::Metrics;
use crate::runtime::SharedRuntime;

/// What a client connection holds from accept to close, whichever task (or lot) holds
/// it: its connection slot, its worker's count, its listener's drain, and the
/// open-connections gauge.
pub struct Open {
    pub peer: SocketAddr,
    pub limits: ConnLimits,
    pub metrics: Arc<Metrics>,
    pub guard: DrainGuard,
    pub runtime: SharedRuntime,
    /// The lot of the worker serving it.
    pub lot: Arc<Lot>,
    _held: (OwnedSemaphorePermit, Served),
}

impl Open {
    /// Counts a connection `peer` just made as open, with the limits the runtime has now.
    pub fn new(
        peer: SocketAddr,
        runtime: &SharedRuntime,
        guard: DrainGuard,
        lot: Arc<Lot>,
        held: (OwnedSemaphorePermit, Served),
    ) -> Open {
        let rt = runtime.load();
        let s = &rt.config.server;
        let limits = ConnLimits {
            client_header: s.timeouts.client_header,
            idle: s.timeouts.idle,
            max_header_bytes: s.max_header_bytes,
        };
        rt.metrics.client_connections.fetch_add(1, Relaxed);
        Open { peer, limits, metrics: rt.metrics.clone(), guard, runtime: runtime.clone(), lot, _held: held }
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.metrics.client_connections.fetch_sub(1, Relaxed);
    }
}

/// Serves a parked connection again when its next byte has arrived.
pub type Resume = fn(TcpStream, Open);

/// One worker's parked connections. Parking hands a socket over; the lot's task
/// ([`Lot::run`], on the same worker) does the rest.
#[derive(Default)]
pub struct Lot {
    arriving: Mutex<Vec<(std::net::TcpStream, Open)>>,
    arrived: Notify,
    /// Its task has ended: a connection that would park is closed instead.
    closed: AtomicBool,
}

/// A parked connection.
struct Car {
    stream: std::net::TcpStream,
    open: Open,
    /// When its idle time runs out.
    until: Instant,
}

/// How long after an expiry the next sweep may come at the earliest: sweeping reads
/// every entry, so close expiries are taken together.
const SWEEP_GAP: Duration = Duration::from_millis(50);

impl Lot {
    /// Parks `stream`, idle for [`PARK_AFTER`] now. Failing to take it off the worker's
    /// event loop (practically never), or a lot that has stopped, closes it, as an idle
    /// timeout would.
    pub fn park(&self, stream: TcpStream, open: Open) {
        match stream.into_std() {
            Ok(stream) if !self.closed.load(Relaxed) => {
                open.metrics.parks.fetch_add(1, Relaxed);
                open.metrics.parked_connections.fetch_add(1, Relaxed);
                self.arriving.lock().expect("parking lot").push((stream, open));
                self.arrived.notify_one();
            }
            Ok(_) => {}
            Err(e) => tracing::debug!(peer = %open.peer, error = %e, "cannot park an idle connection; closing it"),
        }
    }

    /// Holds this worker's parked connections until `stop` (or a failure of its epoll
    /// set, logged), then closes them and every one parked later.
    pub async fn run(self: Arc<Self>, resume: Resume, stop: CancellationToken) {
        // Closes the lot however the task ends, a panic included.
        let _closing = Closing(&self);
        match mio::Poll::new().and_then(watch) {
            Ok(set) => self.hold(set, resume, stop).await,
            Err(e) => tracing::error!(error = %e, "cannot make a parking lot; idle connections will be closed instead"),
        }
    }

    async fn hold(&self, set: AsyncFd<Set>, resume: Resume, stop: CancellationToken) {
        // The lot's task, which the drains of its connections wake.
        let waker = poll_fn(|cx| Poll::Ready(cx.waker().clone())).await;
        let mut held = Held { set, cars: Slab::new(), drains: Vec::new(), sweep: None };
        let mut events = Events::with_capacity(256);
        loop {
            let drains = &held.drains;
            let draining =
                poll_fn(|_| if drains.iter().any(Drain::is_draining) { Poll::Ready(()) } else { Poll::Pending });
            tokio::select! {
                () = stop.cancelled() => break,
                () = draining => held.close_draining(),
                () = self.arrived.notified() => {
                    let arrived = std::mem::take(&mut *self.arriving.lock().expect("parking lot"));
                    for (stream, open) in arrived {
                        held.admit(stream, open, &waker);
                    }
                }
                ready = held.set.readable_mut() => {
                    let mut ready = match ready {
                        Ok(ready) => ready,
                        Err(e) => {
                            tracing::error!(error = %e, "a parking lot failed; its idle connections are closed");
                            break;
                        }
                    };
                    events.clear();
                    match ready.get_inner_mut().0.poll(&mut events, Some(Duration::ZERO)) {
                        // A new event after this read is a new edge for the worker's event loop.
                        Ok(()) if events.iter().count() < events.capacity() => ready.clear_ready(),
                        Ok(()) => {}
                        // Still ready: read again on the next turn.
                        Err(e) => tracing::debug!(error = %e, "reading a parking lot's events failed"),
                    }
                    for event in &events {
                        if let Some(mut car) = held.cars.try_remove(event.token().0) {
                            close(ready.get_inner(), &mut car);
                            match TcpStream::from_std(car.stream) {
                                Ok(stream) => resume(stream, car.open),
                                Err(e) => tracing::debug!(peer = %car.open.peer, error = %e, "cannot serve a parked connection again"),
                            }
                        }
                    }
                }
                () = sleep_until(held.sweep) => held.close_expired(),
            }
        }
        let set = held.set.get_ref();
        for (_, car) in held.cars.iter_mut() {
            close(set, car);
        }
    }
}

/// What a lot's task holds.
struct Held {
    set: AsyncFd<Set>,
    cars: Slab<Car>,
    /// The drains of the listeners whose connections are parked here, each watched once.
    drains: Vec<Drain>,
    /// When the next expiry is due, at the earliest.
    sweep: Option<Instant>,
}

impl Held {
    /// Takes a connection into the set, or closes it if that fails or its listener drains.
    fn admit(&mut self, stream: std::net::TcpStream, open: Open, waker: &Waker) {
        let until = Instant::now() + open.limits.idle.saturating_sub(PARK_AFTER);
        let entry = self.cars.vacant_entry();
        let token = Token(entry.key());
        let mut car = Car { stream, open, until };
        let set = self.set.get_ref();
        if let Err(e) = set.0.registry().register(&mut SourceFd(&car.stream.as_raw_fd()), token, Interest::READABLE) {
            tracing::debug!(peer = %car.open.peer, error = %e, "cannot park an idle connection; closing it");
            close(set, &mut car);
            return;
        }
        // The lot watches the drain instead of a waker of each connection.
        car.open.guard.forget_waker();
        let drain = car.open.guard.drain();
        if !self.drains.iter().any(|d| d.same(&drain)) {
            drain.watch(waker);
            self.drains.push(drain);
        }
        if car.open.guard.is_draining() {
            close(set, &mut car);
            return;
        }
        self.sweep = Some(self.sweep.map_or(until, |s| s.min(until)));
        entry.insert(car);
    }

    /// Closes the connections whose listener drains.
    fn close_draining(&mut self) {
        let set = self.set.get_ref();
        self.cars.retain(|_, car| !car.open.guard.is_draining() || close(set, car));
        self.drains.retain(|d| !d.is_draining());
    }

    /// Closes the connections whose idle time ran out, and sets the next sweep.
    fn close_expired(&mut self) {
        let (set, now) = (self.set.get_ref(), Instant::now());
        let mut next: Option<Instant> = None;
        self.cars.retain(|_, car| {
            if car.until <= now {
                return close(set, car);
            }
            next = Some(next.map_or(car.until, |n| n.min(car.until)));
            true
        });
        self.sweep = next.map(|n| n.max(now + SWEEP_GAP));
    }
}

/// Marks a lot closed when its task ends, and closes what was still arriving.
struct Closing<'a>(&'a Lot);

impl Drop for Closing<'_> {
    fn drop(&mut self) {
        self.0.closed.store(true, Relaxed);
        let arriving = match self.0.arriving.lock() {
            Ok(mut arriving) => std::mem::take(&mut *arriving),
            Err(poisoned) => std::mem::take(&mut *poisoned.into_inner()),
        };
        for (_, open) in arriving {
            open.metrics.parked_connections.fetch_sub(1, Relaxed);
        }
    }
}

/// Takes a parked connection out of the set and the gauge, to be served again or
/// dropped (and so closed). Returns false: the entry is to go.
fn close(set: &Set, car: &mut Car) -> bool {
    let _ = set.0.registry().deregister(&mut SourceFd(&car.stream.as_raw_fd()));
    car.open.metrics.parked_connections.fetch_sub(1, Relaxed);
    false
}

/// Sleeps until `at`, or forever without one.
async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// The lot's epoll set, as a descriptor the worker's event loop watches.
struct Set(mio::Poll);

/// Registers the set with the worker's event loop.
// One of the crate's three `unsafe` calls (with `memory` and `notify`).
#[allow(unsafe_code)]
fn watch(poll: mio::Poll) -> std::io::Result<AsyncFd<Set>> {
    // SAFETY: the descriptor is the `mio::Poll`'s own, which `Set` owns and does not
    // close or replace: it stays open and the same for as long as the `AsyncFd` lives.
    unsafe { AsyncFd::register_with_interest(Set(poll), tokio::io::Interest::READABLE) }.map_err(Into::into)
}

impl AsRawFd for Set {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}
