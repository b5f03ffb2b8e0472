//! Binding listeners and their accept loops: at most `max_connections` client
//! connections (past it, new ones wait in the kernel backlog), each served as HTTP/1.1 or
//! HTTP/2 by hyper-util's auto builder, each watched for the graceful drain.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::{ConnActivity, ConnLimits, GuardedIo};
use crate::proxy::{self, ConnInfo};
use crate::runtime::SharedRuntime;

#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {addr}: {source}")]
pub struct BindError {
    pub addr: SocketAddr,
    pub source: std::io::Error,
}

/// Binds every address, or none: the first failure is returned.
pub fn bind(addrs: &[SocketAddr]) -> Result<Vec<TcpListener>, BindError> {
    addrs
        .iter()
        .map(|&addr| {
            let socket = if addr.is_ipv4() {
                TcpSocket::new_v4()
            } else {
                TcpSocket::new_v6()
            };
            socket
                .and_then(|s| {
                    s.set_reuseaddr(true)?;
                    s.bind(addr)?;
                    s.listen(1024)
                })
                .map_err(|source| BindError { addr, source })
        })
        .collect()
}

/// The running accept loops and the connections they started.
pub struct Listeners {
    stop: CancellationToken,
    /// Shared with the accept loops; theirs are dropped before the drain.
    graceful: Arc<GracefulShutdown>,
    tasks: Vec<JoinHandle<()>>,
    pub addrs: Vec<SocketAddr>,
}

impl Listeners {
    pub fn start(listeners: Vec<TcpListener>, runtime: SharedRuntime) -> Listeners {
        let stop = CancellationToken::new();
        let graceful = Arc::new(GracefulShutdown::new());
        let slots = Arc::new(Semaphore::new(runtime.load().config.server.max_connections));
        let mut addrs = Vec::new();
        let mut tasks = Vec::new();
        for listener in listeners {
            let addr = listener
                .local_addr()
                .expect("bound listener has an address");
            tracing::info!(%addr, protocol = "http", "listening");
            addrs.push(addr);
            tasks.push(tokio::spawn(accept_loop(
                listener,
                runtime.clone(),
                graceful.clone(),
                slots.clone(),
                stop.clone(),
            )));
        }
        Listeners {
            stop,
            graceful,
            tasks,
            addrs,
        }
    }

    /// Stops accepting at once, then lets open connections finish their requests for up to
    /// `grace`. Returns whether every connection was done in time.
    pub async fn shutdown(self, grace: Duration) -> bool {
        self.stop.cancel();
        for t in self.tasks {
            let _ = t.await;
        }
        let open = self.graceful.count();
        tracing::info!(connections = open, grace = %humantime::format_duration(grace), "stopped accepting; draining connections");
        let graceful = Arc::try_unwrap(self.graceful)
            .unwrap_or_else(|_| unreachable!("accept loops have ended"));
        tokio::time::timeout(grace, graceful.shutdown())
            .await
            .is_ok()
    }
}

async fn accept_loop(
    listener: TcpListener,
    runtime: SharedRuntime,
    graceful: Arc<GracefulShutdown>,
    slots: Arc<Semaphore>,
    stop: CancellationToken,
) {
    loop {
        let permit = tokio::select! {
            biased;
            _ = stop.cancelled() => return,
            p = slots.clone().acquire_owned() => p.expect("the connection semaphore is never closed"),
        };
        let accepted = tokio::select! {
            biased;
            _ = stop.cancelled() => return,
            r = listener.accept() => r,
        };
        match accepted {
            Ok((stream, peer)) => serve(stream, peer, &runtime, &graceful, permit),
            Err(e) => {
                // Out of file descriptors or similar: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed; retrying in 100ms");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

fn serve(
    stream: TcpStream,
    peer: SocketAddr,
    runtime: &SharedRuntime,
    graceful: &GracefulShutdown,
    permit: OwnedSemaphorePermit,
) {
    let _ = stream.set_nodelay(true);
    let (limits, max_header_bytes, metrics) = {
        let rt = runtime.load();
        let s = &rt.config.server;
        let limits = ConnLimits {
            client_header: s.timeouts.client_header,
            idle: s.timeouts.idle,
            max_header_bytes: s.max_header_bytes,
        };
        (limits, s.max_header_bytes, rt.metrics.clone())
    };
    metrics
        .client_connections
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let activity = Arc::new(ConnActivity::default());
    let info = Arc::new(ConnInfo {
        peer,
        tls: false,
        activity: activity.clone(),
    });
    let io = TokioIo::new(GuardedIo::new(stream, activity, limits));

    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .keep_alive(true)
        .header_read_timeout(None)
        // Larger than the head limit, which GuardedIo enforces with a proper 431.
        .max_buf_size((max_header_bytes * 2).max(16 * 1024))
        .max_headers(1024);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(max_header_bytes as u32);

    let runtime = runtime.clone();
    let service = service_fn(move |req| {
        let busy = info.activity.begin();
        proxy::handle(runtime.clone(), info.clone(), busy, req)
    });
    let conn = builder
        .serve_connection_with_upgrades(io, service)
        .into_owned();
    let conn = graceful.watch(conn);
    tokio::spawn(async move {
        let _permit = permit;
        if let Err(e) = conn.await {
            tracing::debug!(%peer, error = %e, "client connection ended with an error");
        }
        metrics
            .client_connections
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    });
}
