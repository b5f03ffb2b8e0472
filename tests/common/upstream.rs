//! In-process test upstreams. Behaviour is chosen by the request path:
//!
//! - anything: 200 with a JSON echo of the request (`name`, `method`, `path`, `headers`,
//!   `body_len`) and `x-upstream: NAME`
//! - `/sleep/MS`: the same after MS milliseconds
//! - `/status/CODE`: that status
//! - `/healthz`: the status in `Upstream::health` (200 until a test changes it)
//! - `/bytes/N`: N bytes of body, streamed
//! - an `Upgrade` request: 101, then echo every byte back
//!
//! Options: close idle keep-alive connections after a delay (as gunicorn does); answer
//! every request late (a slow instance).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

#[derive(Clone, Default)]
pub struct UpstreamOpts {
    /// Close a keep-alive connection that stays idle this long (gunicorn: 2 s).
    pub idle_close: Option<Duration>,
    /// Answer every request (health checks too) this much later.
    pub delay: Option<Duration>,
}

pub struct Upstream {
    pub addr: SocketAddr,
    pub name: String,
    /// Requests answered so far (health checks not included).
    pub hits: Arc<AtomicUsize>,
    /// The request target of each of those requests, in arrival order.
    pub paths: Arc<std::sync::Mutex<Vec<String>>>,
    /// TCP connections accepted so far.
    pub connections: Arc<AtomicUsize>,
    /// The status `/healthz` answers.
    pub health: Arc<std::sync::atomic::AtomicU16>,
    task: tokio::task::JoinHandle<()>,
    conns: Arc<std::sync::Mutex<Vec<tokio::task::AbortHandle>>>,
}

impl Upstream {
    pub async fn start(name: &str) -> Upstream {
        Self::start_with(name, UpstreamOpts::default()).await
    }

    pub async fn start_with(name: &str, opts: UpstreamOpts) -> Upstream {
        Self::start_on("127.0.0.1:0".parse().unwrap(), name, opts).await
    }

    /// Starts on a given address (to bring a killed upstream back on its port).
    pub async fn start_on(addr: SocketAddr, name: &str, opts: UpstreamOpts) -> Upstream {
        let listener = TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let hits = Arc::new(AtomicUsize::new(0));
        let paths: Arc<std::sync::Mutex<Vec<String>>> = Arc::default();
        let connections = Arc::new(AtomicUsize::new(0));
        let health = Arc::new(std::sync::atomic::AtomicU16::new(200));
        let conns: Arc<std::sync::Mutex<Vec<tokio::task::AbortHandle>>> = Arc::default();
        let (h, c, n, hl, cs, ps) =
            (hits.clone(), connections.clone(), name.to_owned(), health.clone(), conns.clone(), paths.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                c.fetch_add(1, Ordering::SeqCst);
                let (h, n, opts, hl, ps) = (h.clone(), n.clone(), opts.clone(), hl.clone(), ps.clone());
                let conn_task = tokio::spawn(async move {
                    let delay = opts.delay;
                    let svc = service_fn(move |req| {
                        let answer = handle(req, n.clone(), h.clone(), hl.clone(), ps.clone());
                        async move {
                            if let Some(d) = delay {
                                tokio::time::sleep(d).await;
                            }
                            answer.await
                        }
                    });
                    let mut builder = hyper::server::conn::http1::Builder::new();
                    builder.keep_alive(true);
                    let conn = builder.serve_connection(TokioIo::new(stream), svc).with_upgrades();
                    match opts.idle_close {
                        // Approximates gunicorn: the connection is closed once it has been
                        // open this long with nothing in flight.
                        Some(idle) => {
                            let mut conn = std::pin::pin!(conn);
                            loop {
                                tokio::select! {
                                    _ = &mut conn => break,
                                    _ = tokio::time::sleep(idle) => {
                                        conn.as_mut().graceful_shutdown();
                                    }
                                }
                            }
                        }
                        None => {
                            let _ = conn.await;
                        }
                    }
                });
                cs.lock().unwrap().push(conn_task.abort_handle());
            }
        });
        Upstream { addr, name: name.to_owned(), hits, paths, connections, health, task, conns }
    }

    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }

    /// The request targets (path and query) received so far, health checks not included.
    pub fn paths(&self) -> Vec<String> {
        self.paths.lock().unwrap().clone()
    }

    /// Stops listening and cuts every open connection, as a crashed process would.
    pub fn kill(&self) {
        self.task.abort();
        for c in self.conns.lock().unwrap().drain(..) {
            c.abort();
        }
    }

    pub fn set_health(&self, status: u16) {
        self.health.store(status, Ordering::SeqCst);
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.kill();
    }
}

type Body = BoxBody<Bytes, Infallible>;

fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).boxed()
}

async fn handle(
    mut req: Request<Incoming>,
    name: String,
    hits: Arc<AtomicUsize>,
    health: Arc<std::sync::atomic::AtomicU16>,
    paths: Arc<std::sync::Mutex<Vec<String>>>,
) -> Result<Response<Body>, Infallible> {
    let path = req.uri().path().to_owned();
    if path == "/healthz" {
        let mut resp = Response::new(full("health\n"));
        *resp.status_mut() = StatusCode::from_u16(health.load(Ordering::SeqCst)).unwrap();
        return Ok(resp);
    }
    paths.lock().unwrap().push(req.uri().path_and_query().map_or_else(|| path.clone(), |pq| pq.to_string()));
    hits.fetch_add(1, Ordering::SeqCst);
    if req.headers().contains_key("upgrade") {
        let on_upgrade = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            if let Ok(up) = on_upgrade.await {
                let mut io = TokioIo::new(up);
                let (mut r, mut w) = tokio::io::split(&mut io);
                let _ = tokio::io::copy(&mut r, &mut w).await;
            }
        });
        let mut resp = Response::new(full(""));
        *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        resp.headers_mut().insert("connection", "upgrade".parse().unwrap());
        resp.headers_mut().insert("upgrade", req.headers()["upgrade"].clone());
        return Ok(resp);
    }
    if let Some(ms) = path.strip_prefix("/sleep/").and_then(|s| s.parse().ok()) {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    if let Some(n) = path.strip_prefix("/bytes/").and_then(|s| s.parse::<usize>().ok()) {
        let mut resp = Response::new(Repeat { remaining: n }.boxed());
        resp.headers_mut().insert("x-upstream", name.parse().unwrap());
        return Ok(resp);
    }
    let status = path
        .strip_prefix("/status/")
        .and_then(|s| s.parse().ok())
        .and_then(|c| StatusCode::from_u16(c).ok())
        .unwrap_or(StatusCode::OK);
    let method = req.method().to_string();
    let uri = req.uri().to_string();
    let headers: serde_json::Map<String, serde_json::Value> = req
        .headers()
        .iter()
        .map(|(k, v)| (k.to_string(), serde_json::Value::String(v.to_str().unwrap_or("?").to_owned())))
        .collect();
    // Count the body without keeping it.
    let mut body = req.into_body();
    let mut body_len = 0usize;
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(f) => body_len += f.data_ref().map_or(0, |d| d.len()),
            Err(_) => break,
        }
    }
    let echo =
        serde_json::json!({ "name": name, "method": method, "path": uri, "headers": headers, "body_len": body_len });
    let mut resp = Response::new(full(echo.to_string()));
    *resp.status_mut() = status;
    resp.headers_mut().insert("x-upstream", name.parse().unwrap());
    resp.headers_mut().insert("content-type", "application/json".parse().unwrap());
    Ok(resp)
}

/// `remaining` bytes of `x`, in 64 KiB frames.
struct Repeat {
    remaining: usize,
}

impl http_body::Body for Repeat {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.remaining == 0 {
            return std::task::Poll::Ready(None);
        }
        let n = self.remaining.min(65536);
        self.remaining -= n;
        std::task::Poll::Ready(Some(Ok(Frame::data(Bytes::from(vec![b'x'; n])))))
    }
}

/// A misbehaving backend: every accepted connection is handed to `behaviour`.
pub struct RawUpstream {
    pub addr: SocketAddr,
    pub connections: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl RawUpstream {
    pub async fn start<F, Fut>(behaviour: F) -> RawUpstream
    where
        F: Fn(tokio::net::TcpStream) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let connections = Arc::new(AtomicUsize::new(0));
        let c = connections.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                c.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(behaviour(stream));
            }
        });
        RawUpstream { addr, connections, task }
    }

    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

impl Drop for RawUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Reads one request head (up to the blank line) from `s`.
pub async fn read_head(s: &mut tokio::net::TcpStream) -> String {
    String::from_utf8_lossy(&read_head_bytes(s).await).into_owned()
}

/// A port on 127.0.0.1 with nothing listening on it (connections are refused), held for
/// the rest of the test process: a socket stays bound to it without listening, so the
/// kernel cannot hand the port to anything else — not even to the balancer's own admin
/// listener, which once answered a "dead" backend with the dashboard.
pub fn dead_addr() -> SocketAddr {
    let (addr, held) = held_port();
    // Never closed: the port must not come free while the test runs.
    std::mem::forget(held);
    addr
}

/// A port on 127.0.0.1 nothing listens on, kept from anyone else until the returned socket
/// is dropped (for a test that brings a server up on it later).
pub fn held_port() -> (SocketAddr, tokio::net::TcpSocket) {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    (socket.local_addr().unwrap(), socket)
}

/// Reads one request head from `s` as raw bytes, through its blank line (empty at EOF).
pub async fn read_head_bytes(s: &mut tokio::net::TcpStream) -> Vec<u8> {
    use tokio::io::AsyncReadExt;
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match s.read(&mut b).await {
            Ok(1) => head.push(b[0]),
            _ => break,
        }
    }
    head
}

/// The request heads a [`head_echo`] backend received, as raw bytes, in arrival order.
pub type Heads = Arc<std::sync::Mutex<Vec<Vec<u8>>>>;

/// A backend that answers every request `200` with the exact request head it received
/// (request line and fields, as bytes) as its body, with `connection: close`, and records
/// each head: what balancer forwarded, byte for byte.
pub async fn head_echo() -> (RawUpstream, Heads) {
    use tokio::io::AsyncWriteExt;
    let heads: Heads = Arc::default();
    let h = heads.clone();
    let up = RawUpstream::start(move |mut s| {
        let h = h.clone();
        async move {
            let head = read_head_bytes(&mut s).await;
            if head.is_empty() {
                return;
            }
            h.lock().unwrap().push(head.clone());
            let mut resp = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                head.len()
            )
            .into_bytes();
            resp.extend_from_slice(&head);
            let _ = s.write_all(&resp).await;
            let _ = s.shutdown().await;
        }
    })
    .await;
    (up, heads)
}
