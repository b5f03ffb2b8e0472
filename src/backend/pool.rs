//! Keep-alive HTTP/1.1 connections to one backend.
//!
//! Idle connections are kept newest-last and handed out newest first (the least likely to
//! have been closed by the backend); any idle longer than `idle_timeout` is dropped before
//! the backend's own keep-alive timer (gunicorn: 2 s, uvicorn: 5 s) can close it under us.
//! Each worker thread has its own idle list (of up to `keepalive` connections): a
//! connection is registered with the reactor of the thread that opened it, and stays there.
//!
//! At most [`OPENING`] connections to one backend are being opened at once. A burst of
//! new requests past that queues, first come first served, for whichever comes first: a
//! connection released by an answered request (handed over before it reaches the idle
//! list) or a place to open one. The backend gets a bounded stream of SYNs instead of
//! thousands that overflow its accept queue and come back as retransmits seconds later.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use http::uri::Authority;
use tokio::net::TcpStream;
use tokio::sync::{Semaphore, oneshot};

use crate::config::PoolConfig;
use crate::http1::client::{BackendIo, Conn};
use crate::tls::BackendTls;
use rustls::pki_types::ServerName;

/// Connections to one backend being opened at once, at most (TCP connect and TLS
/// handshake): a quarter of the smallest accept queue the usual backends listen with
/// (uvicorn and gunicorn ask for 2,048; the kernel's default cap was 128 before Linux 5.4).
pub const OPENING: usize = 64;

#[derive(Debug)]
pub struct Pool {
    authority: Authority,
    /// Where connections go when the backend was found by DNS (`authority` is then the
    /// name's, for the TLS server name); `None`: `authority` itself.
    address: Option<std::net::SocketAddr>,
    /// Set when the backend is retired: released connections are closed, not kept.
    closed: std::sync::atomic::AtomicBool,
    /// Connections opened so far (pooled or not): requests per opened connection is the
    /// reuse rate.
    opened: AtomicU64,
    /// [`OPENING`] permits: one is held while a connection is being opened.
    opening: Semaphore,
    /// Requests that found every permit taken and waited.
    waits: AtomicU64,
    inner: Mutex<PoolInner>,
}

#[derive(Debug)]
struct PoolInner {
    config: PoolConfig,
    /// Set for an `https://` backend: how its certificate is verified.
    tls: Option<BackendTls>,
    /// Per worker thread (see `server::workers`).
    lanes: Vec<Lane>,
}

/// One worker thread's connections to the backend, and its requests waiting for one.
#[derive(Debug, Default)]
struct Lane {
    /// Oldest at the front, newest at the back.
    idle: VecDeque<Idle>,
    /// Requests queued behind [`OPENING`], oldest first; a released connection goes to
    /// the first still waiting before it goes to `idle`.
    waiting: VecDeque<oneshot::Sender<Conn>>,
    /// `waiting`'s length after places given up were last dropped: they are dropped again
    /// when it doubles, so that costs O(1) a place.
    waiting_kept: usize,
}

impl Lane {
    /// How many of the oldest idle connections have been idle for `max_idle` at `now`.
    fn expired(&self, now: Instant, max_idle: Duration) -> usize {
        self.idle.iter().take_while(|i| now.duration_since(i.since) >= max_idle).count()
    }
}

impl PoolInner {
    /// The calling worker thread's lane.
    fn lane(&mut self) -> &mut Lane {
        let w = crate::worker::current();
        if self.lanes.len() <= w {
            self.lanes.resize_with(w + 1, Lane::default);
        }
        &mut self.lanes[w]
    }
}

#[derive(Debug)]
struct Idle {
    conn: Conn,
    since: Instant,
}

/// Errors that mean balancer itself is out of something (file descriptors, buffers, local
/// ports), not that the backend is unwell.
fn is_local_exhaustion(e: &std::io::Error) -> bool {
    // EMFILE, ENFILE, ENOMEM, ENOBUFS, EADDRNOTAVAIL (Linux numbering).
    matches!(e.raw_os_error(), Some(24 | 23 | 12 | 105 | 99))
}

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// balancer's own resources ran out; the backend is not to blame.
    #[error("balancer is out of local resources: {0}")]
    Local(std::io::Error),
    #[error("TLS handshake failed: {0}")]
    Tls(std::io::Error),
    #[error("connect timed out after {0:?}")]
    Timeout(Duration),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

impl Pool {
    /// A pool for the backend at `authority`; `tls` is set for an `https://` backend.
    /// `address`: where to connect instead of `authority`, for a backend found by DNS.
    pub fn new(
        authority: Authority,
        address: Option<std::net::SocketAddr>,
        config: PoolConfig,
        tls: Option<BackendTls>,
    ) -> Pool {
        Pool {
            authority,
            address,
            closed: Default::default(),
            opened: AtomicU64::new(0),
            opening: Semaphore::const_new(OPENING),
            waits: AtomicU64::new(0),
            inner: Mutex::new(PoolInner { config, tls, lanes: Vec::new() }),
        }
    }

    /// Closes every idle connection and keeps none from now on (the backend is retired).
    pub fn close(&self) {
        self.closed.store(true, Relaxed);
        let lanes = std::mem::take(&mut self.inner.lock().expect("pool lock").lanes);
        drop(lanes);
    }

    /// Closes the connections idle for `idle_timeout` on every worker, so that a quiet
    /// backend is not left holding them (and balancer their buffers) until its next
    /// request. Returns how many it closed.
    pub fn drop_expired(&self) -> usize {
        let mut expired = Vec::new();
        {
            let mut inner = self.inner.lock().expect("pool lock");
            let (max_idle, now) = (inner.config.idle_timeout, Instant::now());
            for lane in &mut inner.lanes {
                let n = lane.expired(now, max_idle);
                expired.extend(lane.idle.drain(..n));
            }
        }
        // Closed outside the lock.
        expired.len()
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(Relaxed)
    }

    /// Applies a reloaded upstream's settings; idle connections are kept.
    pub fn reconfigure(&self, config: PoolConfig, tls: Option<BackendTls>) {
        let mut inner = self.inner.lock().expect("pool lock");
        inner.config = config;
        inner.tls = tls;
        let keep = config.keepalive;
        for lane in &mut inner.lanes {
            let len = lane.idle.len();
            if len > keep {
                lane.idle.drain(..len - keep);
            }
        }
    }

    pub fn opened(&self) -> u64 {
        self.opened.load(Relaxed)
    }

    /// Requests that waited because [`OPENING`] connections were being opened already.
    pub fn waits(&self) -> u64 {
        self.waits.load(Relaxed)
    }

    /// An idle, usable connection if there is one; otherwise a new one.
    pub async fn checkout(&self) -> Result<Conn, ConnectError> {
        match self.take_idle() {
            Some(conn) => Ok(conn),
            None => self.open_gated(true).await,
        }
    }

    /// The newest idle connection that is neither expired nor closed by the backend.
    fn take_idle(&self) -> Option<Conn> {
        let mut inner = self.inner.lock().expect("pool lock");
        let max_idle = inner.config.idle_timeout;
        let list = &mut inner.lane().idle;
        while let Some(idle) = list.pop_back() {
            if idle.since.elapsed() >= max_idle {
                // Older entries are older still: drop them all.
                list.clear();
                return None;
            }
            let mut conn = idle.conn;
            if conn.is_usable_idle() {
                return Some(conn);
            }
        }
        None
    }

    /// A new connection, never one from the pool.
    pub async fn connect(&self) -> Result<Conn, ConnectError> {
        self.open_gated(false).await
    }

    /// Opens a connection once fewer than [`OPENING`] are being opened; with `reuse`, a
    /// connection released while it waits is taken instead. The wait, the TCP connect
    /// and, for https, the TLS handshake share `timeouts.connect`.
    async fn open_gated(&self, reuse: bool) -> Result<Conn, ConnectError> {
        let (timeout, tls) = {
            let inner = self.inner.lock().expect("pool lock");
            (inner.config.connect_timeout, inner.tls.clone())
        };
        let attempt = async {
            let _permit = match self.opening.try_acquire() {
                Ok(permit) => permit,
                Err(_) => {
                    self.waits.fetch_add(1, Relaxed);
                    if !reuse {
                        self.opening.acquire().await.expect("the semaphore is never closed")
                    } else {
                        let mut released = self.queue();
                        tokio::select! {
                            biased;
                            Ok(conn) = &mut released => return Ok(conn),
                            permit = self.opening.acquire() => permit.expect("the semaphore is never closed"),
                        }
                    }
                }
            };
            self.open(tls).await
        };
        match tokio::time::timeout(timeout, attempt).await {
            Ok(r) => r,
            Err(_) => Err(ConnectError::Timeout(timeout)),
        }
    }

    /// A place in the calling worker's queue for a released connection. Places given up
    /// (their request got a permit first, or gave up) go as the queue grows, or as a
    /// released connection passes them.
    fn queue(&self) -> oneshot::Receiver<Conn> {
        let (tx, rx) = oneshot::channel();
        let mut inner = self.inner.lock().expect("pool lock");
        let lane = inner.lane();
        if lane.waiting.len() >= 2 * lane.waiting_kept.max(16) {
            lane.waiting.retain(|w| !w.is_closed());
            lane.waiting_kept = lane.waiting.len();
        }
        lane.waiting.push_back(tx);
        rx
    }

    async fn open(&self, tls: Option<BackendTls>) -> Result<Conn, ConnectError> {
        // An IPv6 literal comes bracketed in a URL; the resolver wants the address alone.
        let host = self.authority.host().trim_start_matches('[').trim_end_matches(']');
        let port = self.authority.port_u16().unwrap_or(if tls.is_some() { 443 } else { 80 });
        let connected = match self.address {
            Some(address) => TcpStream::connect(address).await,
            None => TcpStream::connect((host, port)).await,
        };
        let stream = connected
            .map_err(|e| if is_local_exhaustion(&e) { ConnectError::Local(e) } else { ConnectError::Io(e) })?;
        self.opened.fetch_add(1, Relaxed);
        stream.set_nodelay(true)?;
        let io = match tls {
            None => BackendIo::Plain(stream),
            Some(tls) => {
                let name = match tls.server_name {
                    Some(n) => n,
                    None => ServerName::try_from(host.to_owned())
                        .map_err(|e| ConnectError::Tls(std::io::Error::new(std::io::ErrorKind::InvalidInput, e)))?,
                };
                let stream = tls.connector.connect(name, stream).await.map_err(ConnectError::Tls)?;
                BackendIo::Tls(Box::new(stream))
            }
        };
        Ok(Conn::new(io))
    }

    /// Returns a connection whose response has been read in full (never one whose
    /// response was cut short) to the pool, newest last, dropping the expired oldest.
    pub fn release(&self, conn: Conn) {
        let mut inner = self.inner.lock().expect("pool lock");
        let cfg = inner.config;
        if cfg.keepalive == 0 || self.closed.load(Relaxed) {
            return;
        }
        let lane = inner.lane();
        let mut conn = conn;
        while let Some(waiter) = lane.waiting.pop_front() {
            match waiter.send(conn) {
                Ok(()) => return,
                Err(back) => conn = back,
            }
        }
        let now = Instant::now();
        let n = lane.expired(now, cfg.idle_timeout);
        let list = &mut lane.idle;
        list.drain(..n);
        if list.len() >= cfg.keepalive {
            list.pop_front();
        }
        list.push_back(Idle { conn, since: now });
    }
}
