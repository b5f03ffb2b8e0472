//! WebSocket and other `Upgrade`s: once the backend answers 101, bytes are copied both
//! ways until either side closes. The tunnel holds the backend's in-flight count and
//! marks the client connection busy for as long as it lives.

use std::time::Duration;

use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::oneshot;

use super::ActivityGuard;
use crate::backend::{Conn, InflightGuard};
use crate::http1::server::Prefixed;

/// After one side closes, how long the other direction may still finish sending.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// Where the client's side of the tunnel comes from once the 101 has been written.
pub enum ClientUpgrade {
    Hyper(OnUpgrade),
    /// From balancer's HTTP/1.1 server; `None` if it was already taken.
    Http1(Option<oneshot::Receiver<Prefixed<TcpStream>>>),
}

/// `backend` is the connection that answered 101, with any bytes it sent past the head.
pub fn tunnel(client: ClientUpgrade, backend: Conn, inflight: InflightGuard, activity: ActivityGuard) {
    tokio::spawn(async move {
        let _held = (inflight, activity);
        match client {
            ClientUpgrade::Hyper(on) => match on.await {
                Ok(c) => run(TokioIo::new(c), backend).await,
                Err(e) => tracing::debug!(error = %e, "upgrade did not complete"),
            },
            ClientUpgrade::Http1(Some(rx)) => match rx.await {
                Ok(c) => run(c, backend).await,
                Err(_) => tracing::debug!("upgrade did not complete"),
            },
            ClientUpgrade::Http1(None) => tracing::debug!("upgrade did not complete"),
        }
    });
}

/// Copies both ways until one side closes, then gives the other a moment.
async fn run<C: AsyncRead + AsyncWrite>(client: C, backend: Conn) {
    {
        let (mut cr, mut cw) = tokio::io::split(client);
        let (mut br, mut bw) = tokio::io::split(backend);
        let up = pipe(&mut cr, &mut bw);
        let down = pipe(&mut br, &mut cw);
        tokio::pin!(up, down);
        // The first side to close ends the tunnel; the other direction gets a moment to
        // deliver what it was sending (a close frame, say), then both are dropped.
        tokio::select! {
            _ = &mut up => { let _ = tokio::time::timeout(CLOSE_GRACE, down).await; }
            _ = &mut down => { let _ = tokio::time::timeout(CLOSE_GRACE, up).await; }
        }
        tracing::debug!("upgraded connection closed");
    }
}

/// Copies until EOF or an error, then shuts the writing side down.
async fn pipe<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(r: &mut R, w: &mut W) {
    let _ = tokio::io::copy(r, w).await;
    let _ = w.shutdown().await;
}
