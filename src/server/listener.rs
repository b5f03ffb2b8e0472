//! Binding listeners and their accept loops: at most `max_connections` client
//! connections (past it, new ones wait in the kernel backlog, bar one accepted per
//! worker), each served as HTTP/1.1 or HTTP/2 by hyper-util's auto builder, each counted
//! by its listener's drain.

use std::future::poll_fn;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use super::drain::{Drain, DrainGuard};
use super::h1::{self, Ended, Start};
use super::parking::{Lot, Open};
use super::{ConnLimits, GuardedIo, Workers};
use crate::proxy::body::ClientBody;
use crate::proxy::{self, ConnInfo, Transport};
use crate::runtime::SharedRuntime;

#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {addr}: {source}")]
pub struct BindError {
    pub addr: SocketAddr,
    pub source: std::io::Error,
}

/// Binds every address, or none: the first failure is returned. Each address gets
/// `per_addr` sockets (one per worker) sharing its port through `SO_REUSEPORT`, so the
/// kernel spreads new connections over the workers and wakes only the one it chose.
fn bind(addrs: &[SocketAddr], per_addr: usize) -> Result<Vec<Vec<std::net::TcpListener>>, BindError> {
    addrs.iter().map(|&addr| bind_shared(addr, per_addr).map_err(|source| BindError { addr, source })).collect()
}

/// One unshared listening socket per address (the admin listener).
pub fn bind_single(addrs: &[SocketAddr]) -> Result<Vec<std::net::TcpListener>, BindError> {
    Ok(bind(addrs, 1)?.into_iter().flatten().collect())
}

/// `n` listening sockets on one address. With more than one, a first bind without
/// `SO_REUSEPORT` checks that nothing holds the port, so a second balancer started on
/// the same port still fails with "cannot listen" instead of silently sharing it.
fn bind_shared(addr: SocketAddr, n: usize) -> std::io::Result<Vec<std::net::TcpListener>> {
    let shared = n > 1;
    // Port 0 becomes the port the check was given, which the shared sockets then take;
    // the check stays bound (never listening) until they listen, so nothing takes the
    // port in between.
    let check = if shared { Some(socket(addr, false)?) } else { None };
    let addr = match &check {
        Some(check) => check.local_addr()?,
        None => addr,
    };
    (0..n.max(1))
        .map(|_| {
            let s = socket(addr, shared)?;
            s.listen(1024)?.into_std()
        })
        .collect()
}

/// A socket bound to `addr`, not yet listening.
fn socket(addr: SocketAddr, shared: bool) -> std::io::Result<TcpSocket> {
    let s = if addr.is_ipv4() { TcpSocket::new_v4() } else { TcpSocket::new_v6() }?;
    s.set_reuseaddr(true)?;
    if shared {
        s.set_reuseport(true)?;
    }
    s.bind(addr)?;
    Ok(s)
}

/// One address's listening sockets, one per worker.
pub type Bound = Vec<std::net::TcpListener>;

/// A listen address and whether it terminates TLS.
pub type ListenAddr = (SocketAddr, bool);

/// Every address the config listens on: plain ones, then `[server.tls]` ones.
pub fn listen_set(cfg: &crate::config::ServerConfig) -> Vec<ListenAddr> {
    let plain = cfg.listen.iter().map(|a| (*a, false));
    let tls = cfg.tls.iter().flat_map(|t| t.listen.iter().map(|a| (*a, true)));
    plain.chain(tls).collect()
}

/// The running listeners, each with its accept loop and the connections it started.
/// Owned by the reloader, which changes the set as the config's listen lists change.
pub struct Listeners {
    runtime: SharedRuntime,
    /// The threads that serve the accepted connections.
    workers: Arc<Workers>,
    /// Client connections, over all listeners (`server.max_connections`).
    slots: Arc<Semaphore>,
    max_connections: usize,
    /// Shared by every HTTPS listener; certificates come from the live runtime.
    tls: TlsAcceptor,
    /// Each worker's parking lot, by worker; their tasks end on `lots_stop`.
    lots: Arc<[Arc<Lot>]>,
    lots_stop: CancellationToken,
    entries: Vec<Entry>,
}

struct Entry {
    /// The address as configured (what reloads compare), and as bound (port 0 resolved).
    configured: ListenAddr,
    bound: SocketAddr,
    stop: CancellationToken,
    /// One accept loop per worker thread, each on its own socket; they end on `stop`.
    tasks: Vec<JoinHandle<()>>,
    /// The connections they accepted.
    conns: Drain,
}

impl Listeners {
    pub fn new(runtime: SharedRuntime, workers: Arc<Workers>) -> Result<Listeners, crate::tls::TicketKeysError> {
        let max_connections = runtime.load().config.server.max_connections;
        let tls = TlsAcceptor::from(crate::tls::server_config(Arc::new(LiveCerts(runtime.clone())))?);
        let lots: Arc<[Arc<Lot>]> = workers.handles().iter().map(|_| Arc::new(Lot::default())).collect();
        let lots_stop = CancellationToken::new();
        for (lot, worker) in lots.iter().zip(workers.handles()) {
            worker.spawn(lot.clone().run(resume, lots_stop.clone()));
        }
        Ok(Listeners {
            runtime,
            workers,
            slots: Arc::new(Semaphore::new(max_connections)),
            max_connections,
            tls,
            lots,
            lots_stop,
            entries: Vec::new(),
        })
    }

    /// Binds every address of `wanted` not listened on yet. Nothing changes on error.
    pub fn prepare(&self, wanted: &[ListenAddr]) -> Result<Vec<(ListenAddr, Bound)>, BindError> {
        let new: Vec<ListenAddr> =
            wanted.iter().copied().filter(|a| !self.entries.iter().any(|e| e.configured == *a)).collect();
        let addrs: Vec<SocketAddr> = new.iter().map(|(a, _)| *a).collect();
        Ok(new.into_iter().zip(bind(&addrs, self.workers.handles().len())?).collect())
    }

    /// Starts the listeners `prepare` bound, and stops (then drains within `grace`) the
    /// ones no longer in `wanted`.
    pub fn apply(&mut self, wanted: &[ListenAddr], fresh: Vec<(ListenAddr, Bound)>, grace: Duration) {
        let (keep, gone): (Vec<Entry>, Vec<Entry>) =
            std::mem::take(&mut self.entries).into_iter().partition(|e| wanted.contains(&e.configured));
        self.entries = keep;
        for entry in gone {
            tracing::info!(addr = %entry.bound, "listener removed; draining its connections");
            tokio::spawn(drain(entry, grace));
        }
        for (configured, sockets) in fresh {
            let bound = sockets.first().and_then(|s| s.local_addr().ok()).unwrap_or(configured.0);
            let tls = configured.1.then(|| self.tls.clone());
            tracing::info!(addr = %bound, protocol = if tls.is_some() { "https" } else { "http" }, "listening");
            let stop = CancellationToken::new();
            let conns = Drain::new();
            // Each worker accepts on its own socket, into its own event loop; it keeps the
            // connection unless another worker has clearly fewer (see `Workers::assign`).
            let shared = Arc::new(Accepting {
                workers: self.workers.clone(),
                lots: self.lots.clone(),
                tls,
                runtime: self.runtime.clone(),
                slots: self.slots.clone(),
                conns: conns.clone(),
                stop: stop.clone(),
            });
            let tasks = sockets
                .into_iter()
                .zip(self.workers.handles())
                .enumerate()
                .map(|(i, (socket, worker))| worker.spawn(accept_loop(socket, i, shared.clone())))
                .collect();
            self.entries.push(Entry { configured, bound, stop, tasks, conns });
        }
        self.entries.sort_by_key(|e| wanted.iter().position(|w| *w == e.configured));
    }

    /// Changes `max_connections`; a lower limit takes effect as connections close.
    pub fn set_max_connections(&mut self, n: usize) {
        if n > self.max_connections {
            self.slots.add_permits(n - self.max_connections);
        } else if n < self.max_connections {
            let (slots, fewer) = (self.slots.clone(), (self.max_connections - n) as u32);
            tokio::spawn(async move {
                if let Ok(p) = slots.acquire_many_owned(fewer).await {
                    p.forget();
                }
            });
        }
        self.max_connections = n;
    }

    /// Stops accepting at once on every listener, then lets open connections finish their
    /// requests for up to `grace`, then has every worker queue the access-log lines it
    /// still keeps. Returns whether every connection was done in time.
    pub async fn shutdown(self, grace: Duration) -> bool {
        for e in &self.entries {
            e.stop.cancel();
        }
        let mut drains = Vec::new();
        for e in self.entries {
            drains.push(tokio::spawn(drain(e, grace)));
        }
        let mut all = true;
        for d in drains {
            all &= d.await.unwrap_or(false);
        }
        self.lots_stop.cancel();
        self.workers.flush_logs().await;
        all
    }
}

/// Stops one listener's accept loop and waits up to `grace` for its connections.
async fn drain(entry: Entry, grace: Duration) -> bool {
    entry.stop.cancel();
    for task in entry.tasks {
        let _ = task.await;
    }
    let conns = entry.conns;
    let open = conns.count();
    if open > 0 {
        tracing::info!(addr = %entry.bound, connections = open, grace = %humantime::format_duration(grace), "draining connections");
    }
    tokio::time::timeout(grace, conns.shutdown()).await.is_ok()
}

/// What the accept loops of one listener share.
struct Accepting {
    workers: Arc<Workers>,
    /// Each worker's parking lot, by worker.
    lots: Arc<[Arc<Lot>]>,
    tls: Option<TlsAcceptor>,
    runtime: SharedRuntime,
    /// Client connections, over all listeners (`server.max_connections`).
    slots: Arc<Semaphore>,
    conns: Drain,
    stop: CancellationToken,
}

/// Accepts on one worker thread until `stop`; the connections are served on that thread.
async fn accept_loop(listener: std::net::TcpListener, me: usize, shared: Arc<Accepting>) {
    let Accepting { workers, lots, tls, runtime, slots, conns, stop } = &*shared;
    let listener = match TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "cannot register the listening socket with a worker");
            return;
        }
    };
    // Accept errors come in floods (out of descriptors): log one, then a count every 10 s.
    let mut last_warned: Option<tokio::time::Instant> = None;
    let mut unlogged = 0u64;
    loop {
        let accepted = tokio::select! {
            biased;
            _ = stop.cancelled() => return,
            r = listener.accept() => r,
        };
        match accepted {
            Ok((stream, peer)) => {
                // Past max_connections a connection waits here, accepted but unread (one
                // per worker; the rest in the backlog): a worker that took a free slot
                // and then waited on its own empty socket would keep it from the others.
                let permit = tokio::select! {
                    biased;
                    _ = stop.cancelled() => return,
                    p = slots.clone().acquire_owned() => p.expect("the connection semaphore is never closed"),
                };
                let _ = stream.set_nodelay(true);
                let (worker, served) = workers.assign(me);
                let open = Open::new(peer, runtime, conns.enter(), lots[worker].clone(), (permit, served));
                if worker == me {
                    tokio::spawn(serve(stream, tls.clone(), open));
                    continue;
                }
                // Another worker has fewer connections: it takes this one, on its own reactor.
                let tls = tls.clone();
                match stream.into_std() {
                    Ok(stream) => {
                        workers.handles()[worker].spawn(async move {
                            match TcpStream::from_std(stream) {
                                Ok(stream) => serve(stream, tls, open).await,
                                Err(e) => tracing::debug!(%peer, error = %e, "cannot register a connection"),
                            }
                        });
                    }
                    Err(e) => tracing::debug!(%peer, error = %e, "cannot hand a connection over"),
                }
            }
            Err(e) => {
                // Out of file descriptors or similar: back off instead of spinning.
                if last_warned.is_none_or(|t| t.elapsed() >= Duration::from_secs(10)) {
                    tracing::warn!(error = %e, repeated = unlogged, "accept failed; retrying every 100ms");
                    last_warned = Some(tokio::time::Instant::now());
                    unlogged = 0;
                } else {
                    unlogged += 1;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// One client connection, from TLS handshake (if any) to its end, or to its parking.
async fn serve(stream: TcpStream, tls: Option<TlsAcceptor>, open: Open) {
    match tls {
        None => serve_plain(stream, open, Start::Fresh).await,
        // Boxed: TLS state is large, and plain connections' tasks need no room for it.
        Some(acceptor) => {
            Box::pin(async {
                // A handshake must finish within client_header, like a request head.
                let peer = open.peer;
                match tokio::time::timeout(open.limits.client_header, acceptor.accept(stream)).await {
                    Ok(Ok(stream)) => {
                        let info = ConnInfo::hyper(peer, Transport::Tls);
                        serve_http(stream, info, open.limits, &open.runtime, &open.guard).await;
                    }
                    Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                    Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                }
            })
            .await
        }
    }
}

/// Plain HTTP/1.1 (or HTTP/2 with prior knowledge) until the connection closes or parks.
async fn serve_plain(stream: TcpStream, open: Open, start: Start) {
    // Boxed, and in a task that ends when the connection parks: a parked connection
    // keeps no room for a session (the request path's future inside it is several KiB).
    let session = Box::pin(h1::serve(stream, open.peer, open.limits, &open.runtime, &open.guard, start));
    match session.await {
        Ended::Parked(parked) => open.lot.clone().park(parked, open),
        Ended::Closed => {}
        Ended::Http2(io) => {
            let info = ConnInfo::hyper(open.peer, Transport::Plain);
            Box::pin(serve_http(io, info, open.limits, &open.runtime, &open.guard)).await;
        }
    }
}

/// Serves a parked connection whose next byte arrived, in a task of its own.
fn resume(stream: TcpStream, open: Open) {
    tokio::spawn(serve_plain(stream, open, Start::Resumed));
}

/// One hyper session (HTTP/2, or anything over TLS) on a client connection, until it ends.
async fn serve_http<T>(io: T, info: ConnInfo, limits: ConnLimits, runtime: &SharedRuntime, guard: &DrainGuard)
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let peer = info.peer;
    let info = Arc::new(info);
    let io = TokioIo::new(GuardedIo::new(io, info.activity.clone(), limits));

    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .keep_alive(true)
        .header_read_timeout(None)
        // Larger than the head limit, which GuardedIo enforces with a proper 431.
        .max_buf_size((limits.max_header_bytes * 2).max(16 * 1024))
        .max_headers(1024);
    builder.http2().timer(TokioTimer::new()).max_header_list_size(limits.max_header_bytes as u32);

    let runtime = runtime.clone();
    let service = service_fn(move |req| {
        let busy = info.activity.begin();
        proxy::handle(runtime.load_full(), info.clone(), busy, req.map(ClientBody::Hyper))
    });
    let mut conn = Box::pin(builder.serve_connection_with_upgrades(io, service).into_owned());
    let mut told = false;
    let ended = poll_fn(|cx| {
        if !told && guard.poll_draining(cx) {
            told = true;
            conn.as_mut().graceful_shutdown();
        }
        conn.as_mut().poll(cx)
    })
    .await;
    drop(conn);
    if let Err(e) = ended {
        tracing::debug!(%peer, error = %e, "client connection ended with an error");
    }
}

/// Picks the certificate for each handshake from the live runtime.
#[derive(Debug)]
struct LiveCerts(SharedRuntime);

impl rustls::server::ResolvesServerCert for LiveCerts {
    fn resolve(&self, hello: rustls::server::ClientHello<'_>) -> Option<Arc<rustls::sign::CertifiedKey>> {
        let rt = self.0.load();
        let certs = &rt.config.server.tls.as_ref()?.certs;
        Some(certs.choose(hello.server_name()))
    }
}
