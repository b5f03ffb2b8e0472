//! Keep-alive HTTP/1.1 connections to one backend.
//!
//! Idle connections are kept newest-last and handed out newest first (the least likely to
//! have been closed by the backend); any idle longer than `idle_timeout` is dropped before
//! the backend's own keep-alive timer (gunicorn: 2 s, uvicorn: 5 s) can close it under us.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http::uri::Authority;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::config::PoolConfig;
use crate::proxy::body::RequestBody;
use crate::tls::BackendTls;
use rustls::pki_types::ServerName;

#[derive(Debug)]
pub struct Pool {
    authority: Authority,
    /// Connections opened so far (pooled or not): requests per opened connection is the
    /// reuse rate.
    opened: AtomicU64,
    inner: Mutex<PoolInner>,
}

#[derive(Debug)]
struct PoolInner {
    config: PoolConfig,
    /// Set for an `https://` backend: how its certificate is verified.
    tls: Option<BackendTls>,
    /// Oldest at the front, newest at the back.
    idle: VecDeque<Idle>,
}

#[derive(Debug)]
struct Idle {
    conn: PooledConn,
    since: Instant,
}

/// A connection checked out for one request.
#[derive(Debug)]
pub struct PooledConn {
    pub sender: SendRequest<RequestBody>,
    /// True when the connection served an earlier request: a failure before any response
    /// byte may then just mean the backend closed it while it sat idle.
    pub reused: bool,
    /// Bytes read from the backend on this connection so far (written by its I/O).
    read: Arc<AtomicU64>,
}

impl PooledConn {
    /// Bytes received from the backend so far; compare before and after a request to know
    /// whether any response byte arrived.
    pub fn bytes_read(&self) -> u64 {
        self.read.load(Relaxed)
    }
}

/// HTTP/1.1 over `io`, its connection driven by its own task.
async fn handshake<T>(io: T) -> Result<SendRequest<RequestBody>, hyper::Error>
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (sender, conn) = http1::Builder::new().handshake(TokioIo::new(io)).await?;
    tokio::spawn(async move {
        if let Err(e) = conn.with_upgrades().await {
            tracing::debug!(error = %e, "backend connection ended with an error");
        }
    });
    Ok(sender)
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
    #[error("HTTP handshake failed: {0}")]
    Handshake(#[from] hyper::Error),
}

impl Pool {
    /// A pool for the backend at `authority`; `tls` is set for an `https://` backend.
    pub fn new(authority: Authority, config: PoolConfig, tls: Option<BackendTls>) -> Pool {
        Pool {
            authority,
            opened: AtomicU64::new(0),
            inner: Mutex::new(PoolInner { config, tls, idle: VecDeque::new() }),
        }
    }

    /// Applies a reloaded upstream's settings; idle connections are kept.
    pub fn reconfigure(&self, config: PoolConfig, tls: Option<BackendTls>) {
        let mut inner = self.inner.lock().expect("pool lock");
        inner.config = config;
        inner.tls = tls;
        let keep = config.keepalive;
        let len = inner.idle.len();
        if len > keep {
            inner.idle.drain(..len - keep);
        }
    }

    pub fn opened(&self) -> u64 {
        self.opened.load(Relaxed)
    }

    /// An idle, usable connection if there is one; otherwise a new one.
    pub async fn checkout(self: &Arc<Self>) -> Result<PooledConn, ConnectError> {
        while let Some(mut conn) = self.take_idle() {
            // Put back as soon as its response ended: the connection's own task may not
            // have marked it ready yet. A closed one fails here and is dropped.
            if conn.sender.ready().await.is_ok() {
                conn.reused = true;
                return Ok(conn);
            }
        }
        self.connect().await
    }

    /// The newest idle connection that is neither expired nor known closed.
    fn take_idle(&self) -> Option<PooledConn> {
        let mut inner = self.inner.lock().expect("pool lock");
        let max_idle = inner.config.idle_timeout;
        while let Some(idle) = inner.idle.pop_back() {
            if idle.since.elapsed() >= max_idle {
                // Older entries are older still: drop them all.
                inner.idle.clear();
                return None;
            }
            if !idle.conn.sender.is_closed() {
                return Some(idle.conn);
            }
        }
        None
    }

    /// A new connection, never one from the pool.
    /// The TCP connect and, for https, the TLS handshake share `timeouts.connect`.
    pub async fn connect(self: &Arc<Self>) -> Result<PooledConn, ConnectError> {
        let (timeout, tls) = {
            let inner = self.inner.lock().expect("pool lock");
            (inner.config.connect_timeout, inner.tls.clone())
        };
        match tokio::time::timeout(timeout, self.open(tls)).await {
            Ok(r) => r,
            Err(_) => Err(ConnectError::Timeout(timeout)),
        }
    }

    async fn open(&self, tls: Option<BackendTls>) -> Result<PooledConn, ConnectError> {
        let host = self.authority.host();
        let port = self.authority.port_u16().unwrap_or(if tls.is_some() { 443 } else { 80 });
        let stream = TcpStream::connect((host, port))
            .await
            .map_err(|e| if is_local_exhaustion(&e) { ConnectError::Local(e) } else { ConnectError::Io(e) })?;
        self.opened.fetch_add(1, Relaxed);
        stream.set_nodelay(true)?;
        let read = Arc::new(AtomicU64::new(0));
        let sender = match tls {
            None => handshake(CountingIo { inner: stream, read: read.clone() }).await?,
            Some(tls) => {
                let name = match tls.server_name {
                    Some(n) => n,
                    None => ServerName::try_from(host.trim_start_matches('[').trim_end_matches(']').to_owned())
                        .map_err(|e| ConnectError::Tls(std::io::Error::new(std::io::ErrorKind::InvalidInput, e)))?,
                };
                let stream = tls.connector.connect(name, stream).await.map_err(ConnectError::Tls)?;
                handshake(CountingIo { inner: stream, read: read.clone() }).await?
            }
        };
        Ok(PooledConn { sender, reused: false, read })
    }

    /// Returns a connection whose response has been read in full (never one whose
    /// response was cut short) to the pool, newest last, dropping the expired oldest.
    pub fn release(&self, conn: PooledConn) {
        let mut inner = self.inner.lock().expect("pool lock");
        let cfg = inner.config;
        if cfg.keepalive == 0 || conn.sender.is_closed() {
            return;
        }
        let now = Instant::now();
        while inner.idle.front().is_some_and(|i| now.duration_since(i.since) >= cfg.idle_timeout) {
            inner.idle.pop_front();
        }
        if inner.idle.len() >= cfg.keepalive {
            inner.idle.pop_front();
        }
        inner.idle.push_back(Idle { conn, since: now });
    }
}

/// A backend stream that counts the bytes read from it.
struct CountingIo<T> {
    inner: T,
    read: Arc<AtomicU64>,
}

impl<T: AsyncRead + Unpin> AsyncRead for CountingIo<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if n > 0 {
            self.read.fetch_add(n as u64, Relaxed);
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for CountingIo<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
