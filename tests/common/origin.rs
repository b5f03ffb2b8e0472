//! A scripted origin for the response cache's tests (SPEC 14): each response is told by
//! the request's query, and every request is counted per target.
//!
//! Query keys: `cc` (Cache-Control), `etag`, `lm` (Last-Modified), `vary`, `cookie`
//! (adds Set-Cookie), `size` (body of that many bytes), `delay` (ms before the head),
//! `drip` (the body in 10 pieces, this many ms apart), `hold` (the first half of the body
//! at once, the rest once the test calls [`Origin::release`]), `status`. The body is
//! `hit N of TARGET` (or `size` bytes of `x`). A request whose `If-None-Match` holds the
//! `etag` gets 304 with the same Cache-Control.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::body::Frame;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

/// One request the origin saw: its target and fields.
#[derive(Clone, Debug)]
pub struct Seen {
    pub method: String,
    pub target: String,
    pub headers: HeaderMap,
}

pub struct Origin {
    pub addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    /// Opened by [`Origin::release`]: the held halves of `hold` bodies go out.
    gate: Arc<tokio::sync::watch::Sender<bool>>,
    tasks: Arc<Mutex<Vec<tokio::task::AbortHandle>>>,
}

fn query(target: &str) -> HashMap<String, String> {
    let q = target.split_once('?').map_or("", |(_, q)| q);
    q.split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| {
            (k.to_owned(), v.replace("%20", " ").replace("%3D", "=").replace("%2C", ",").replace("%22", "\""))
        })
        .collect()
}

type Body = BoxBody<Bytes, Infallible>;

fn full(b: Bytes) -> Body {
    Full::new(b).boxed()
}

/// A body sent in pieces as they come from a channel.
struct Drip(tokio::sync::mpsc::Receiver<Bytes>);

impl http_body::Body for Drip {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|piece| piece.map(|b| Ok(Frame::data(b))))
    }
}

/// `body` in 10 pieces, `ms` apart.
fn drip(body: Bytes, ms: u64) -> Body {
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(1);
    tokio::spawn(async move {
        let step = body.len().div_ceil(10).max(1);
        for piece in body.chunks(step) {
            tokio::time::sleep(Duration::from_millis(ms)).await;
            if tx.send(Bytes::copy_from_slice(piece)).await.is_err() {
                return;
            }
        }
    });
    Drip(rx).boxed()
}

/// The first half of `body` at once, the rest when `gate` opens.
fn hold(body: Bytes, mut gate: tokio::sync::watch::Receiver<bool>) -> Body {
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(2);
    tokio::spawn(async move {
        let half = body.len() / 2;
        if tx.send(body.slice(..half)).await.is_err() || gate.wait_for(|open| *open).await.is_err() {
            return;
        }
        let _ = tx.send(body.slice(half..)).await;
    });
    Drip(rx).boxed()
}

async fn answer(
    req: Request<Incoming>,
    seen: Arc<Mutex<Vec<Seen>>>,
    gate: tokio::sync::watch::Receiver<bool>,
) -> Result<Response<Body>, Infallible> {
    let target = req.uri().path_and_query().map_or("/", |p| p.as_str()).to_owned();
    let n = {
        let mut s = seen.lock().unwrap();
        s.push(Seen { method: req.method().to_string(), target: target.clone(), headers: req.headers().clone() });
        s.iter().filter(|r| r.target == target).count()
    };
    let q = query(&target);
    if let Some(ms) = q.get("delay").and_then(|d| d.parse().ok()) {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    let mut b = Response::builder();
    if let Some(cc) = q.get("cc") {
        b = b.header("cache-control", cc.as_str());
    }
    if let Some(etag) = q.get("etag") {
        let etag = format!("\"{etag}\"");
        let matches =
            req.headers().get("if-none-match").and_then(|v| v.to_str().ok()).is_some_and(|v| v.contains(&etag));
        b = b.header("etag", etag.as_str());
        if matches {
            return Ok(b.status(StatusCode::NOT_MODIFIED).body(full(Bytes::new())).unwrap());
        }
    }
    if let Some(lm) = q.get("lm") {
        b = b.header("last-modified", lm.as_str());
    }
    if let Some(vary) = q.get("vary") {
        b = b.header("vary", vary.as_str());
    }
    if q.contains_key("cookie") {
        b = b.header("set-cookie", "session=1");
    }
    let status = q.get("status").and_then(|s| s.parse().ok()).unwrap_or(200);
    let body = match q.get("size").and_then(|s| s.parse::<usize>().ok()) {
        Some(size) => Bytes::from(vec![b'x'; size]),
        None => {
            let enc = req.headers().get("accept-encoding").and_then(|v| v.to_str().ok()).unwrap_or("-");
            Bytes::from(format!("hit {n} of {target} for {enc}"))
        }
    };
    let body = match q.get("drip").and_then(|d| d.parse().ok()) {
        Some(ms) => drip(body, ms),
        None if q.contains_key("hold") => {
            b = b.header("content-length", body.len());
            hold(body, gate)
        }
        None => full(body),
    };
    Ok(b.status(status).body(body).unwrap())
}

impl Origin {
    pub async fn start() -> Origin {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let tasks: Arc<Mutex<Vec<tokio::task::AbortHandle>>> = Arc::default();
        let gate = Arc::new(tokio::sync::watch::channel(false).0);
        let (s, t, g) = (seen.clone(), tasks.clone(), gate.clone());
        let accept = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { continue };
                let (s, g) = (s.clone(), g.subscribe());
                let conn = tokio::spawn(async move {
                    let svc = service_fn(move |req| answer(req, s.clone(), g.clone()));
                    let _ =
                        hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
                });
                t.lock().unwrap().push(conn.abort_handle());
            }
        });
        tasks.lock().unwrap().push(accept.abort_handle());
        Origin { addr, seen, gate, tasks }
    }

    /// Sends the held second halves of `hold` bodies, now and from now on.
    pub fn release(&self) {
        self.gate.send_replace(true);
    }

    /// Requests seen for `target` (path and query).
    pub fn hits(&self, target: &str) -> usize {
        self.seen.lock().unwrap().iter().filter(|r| r.target == target).count()
    }

    /// Requests seen in all.
    pub fn total(&self) -> usize {
        self.seen.lock().unwrap().len()
    }

    /// The requests seen for `target`.
    pub fn seen(&self, target: &str) -> Vec<Seen> {
        self.seen.lock().unwrap().iter().filter(|r| r.target == target).cloned().collect()
    }

    /// Stops listening and closes every connection: the backend is down.
    pub fn kill(&self) {
        for t in self.tasks.lock().unwrap().drain(..) {
            t.abort();
        }
    }
}

impl Drop for Origin {
    fn drop(&mut self) {
        self.kill();
    }
}
