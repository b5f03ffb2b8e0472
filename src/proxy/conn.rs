//! What the request path knows of the client connection a request came on: its peer, and
//! whether it has a request (or a tunnel) in progress, which the server side reads to tell
//! an idle connection from a busy one.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use atomic_waker::AtomicWaker;

/// What a client connection is carried over.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    Plain,
    Tls,
}

/// What one client connection tells the request path about itself.
#[derive(Debug)]
pub struct ConnInfo {
    pub peer: SocketAddr,
    /// The peer's IP address as text, for `X-Forwarded-For`.
    pub peer_ip: Box<str>,
    pub tls: bool,
    pub activity: Arc<ConnActivity>,
    /// The server side writes a backend's fields itself from the raw head (the HTTP/1
    /// server does; hyper needs a `HeaderMap`).
    pub writes_raw_fields: bool,
}

impl ConnInfo {
    /// A plain-TCP connection served by balancer's own HTTP/1 server, which writes a
    /// backend's fields raw.
    pub fn http1(peer: SocketAddr, activity: Arc<ConnActivity>) -> ConnInfo {
        ConnInfo { peer, peer_ip: peer.ip().to_string().into(), tls: false, activity, writes_raw_fields: true }
    }

    /// A connection served by hyper (HTTP/2, or anything over TLS).
    pub fn hyper(peer: SocketAddr, transport: Transport) -> ConnInfo {
        let tls = transport == Transport::Tls;
        let activity = Arc::default();
        ConnInfo { peer, peer_ip: peer.ip().to_string().into(), tls, activity, writes_raw_fields: false }
    }
}

/// Whether a client connection has a request (or an upgraded tunnel) in progress.
/// Written by the request path through [`ActivityGuard`]s, read by the server side to
/// tell an idle connection (idle timeout) from one that is sending a head (408).
#[derive(Debug, Default)]
pub struct ConnActivity {
    busy: AtomicUsize,
    /// The connection's reader, woken when the last request ends so its idle timer starts
    /// even if hyper is already waiting on the socket.
    idle_waker: AtomicWaker,
}

impl ConnActivity {
    /// Whether busy; when busy, `waker` is woken as soon as the connection is not.
    pub fn is_busy_or_register(&self, waker: &std::task::Waker) -> bool {
        if !self.is_busy() {
            return false;
        }
        self.idle_waker.register(waker);
        // The last request may have ended between the check and the registration.
        self.is_busy()
    }

    pub fn begin(self: &Arc<Self>) -> ActivityGuard {
        self.busy.fetch_add(1, Ordering::AcqRel);
        ActivityGuard(self.clone())
    }

    pub fn is_busy(&self) -> bool {
        self.busy.load(Ordering::Acquire) > 0
    }
}

/// One unit of [`ConnActivity`], released on drop.
#[derive(Debug)]
pub struct ActivityGuard(Arc<ConnActivity>);

impl Drop for ActivityGuard {
    fn drop(&mut self) {
        if self.0.busy.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle_waker.wake();
        }
    }
}
