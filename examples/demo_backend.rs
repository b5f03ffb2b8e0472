//! A small demo app server for trying balancer out: one process serving several ports,
//! each answering which instance it is, with optional latency and failure rate.
//!
//! ```text
//! cargo run --example demo_backend -- --port 8000 --port 8001 [--latency 20ms] [--fail-rate 0.1]
//!     [--cache-control "s-maxage=1"]
//! ```
//!
//! `GET /healthz` answers `ok`; every other request answers `hello from demo backend :PORT`.
//! With `--fail-rate`, that fraction of requests gets a 500. With `--cache-control`, the
//! 200s carry that `Cache-Control` (an app that lets balancer's cache keep them).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

struct Opts {
    ports: Vec<u16>,
    host: String,
    latency: Duration,
    fail_rate: f64,
    cache_control: Option<hyper::header::HeaderValue>,
}

fn parse() -> Result<Opts, String> {
    let mut o = Opts {
        ports: Vec::new(),
        host: "127.0.0.1".into(),
        latency: Duration::ZERO,
        fail_rate: 0.0,
        cache_control: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || args.next().ok_or(format!("{a} needs a value"));
        match a.as_str() {
            "--port" | "-p" => o.ports.push(val()?.parse().map_err(|e| format!("--port: {e}"))?),
            "--host" => o.host = val()?,
            "--latency" => o.latency = humantime::parse_duration(&val()?).map_err(|e| format!("--latency: {e}"))?,
            "--fail-rate" => o.fail_rate = val()?.parse().map_err(|e| format!("--fail-rate: {e}"))?,
            "--cache-control" => {
                o.cache_control = Some(val()?.parse().map_err(|e| format!("--cache-control: {e}"))?);
            }
            "-h" | "--help" => {
                println!(
                    "demo_backend --port PORT [--port PORT ...] [--host 127.0.0.1] [--latency 0ms] [--fail-rate 0.0] [--cache-control VALUE]"
                );
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other}")),
        }
    }
    if o.ports.is_empty() {
        o.ports = vec![8000, 8001];
    }
    Ok(o)
}

/// A tiny xorshift generator: enough to decide which requests fail.
fn chance(seed: &AtomicU64) -> f64 {
    let mut x = seed.load(Ordering::Relaxed);
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    seed.store(x, Ordering::Relaxed);
    (x >> 11) as f64 / (1u64 << 53) as f64
}

#[tokio::main]
async fn main() {
    let opts = match parse() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("demo_backend: {e}");
            std::process::exit(2);
        }
    };
    let seed: &'static AtomicU64 = Box::leak(Box::new(AtomicU64::new(0x9E37_79B9_7F4A_7C15)));
    let mut tasks = Vec::new();
    for port in opts.ports {
        let addr: SocketAddr = format!("{}:{port}", opts.host).parse().expect("host:port");
        let listener = match TcpListener::bind(addr).await {
            Ok(l) => l,
            Err(e) => {
                eprintln!("demo_backend: cannot listen on {addr}: {e}");
                std::process::exit(1);
            }
        };
        println!("demo backend listening on http://{addr}");
        let (latency, fail_rate) = (opts.latency, opts.fail_rate);
        let cache_control = opts.cache_control.clone();
        tasks.push(tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let cache_control = cache_control.clone();
                let svc = service_fn(move |req: Request<hyper::body::Incoming>| {
                    let cache_control = cache_control.clone();
                    async move {
                        if !latency.is_zero() {
                            tokio::time::sleep(latency).await;
                        }
                        let (status, body) = if req.uri().path() == "/healthz" {
                            (StatusCode::OK, "ok\n".to_owned())
                        } else if fail_rate > 0.0 && chance(seed) < fail_rate {
                            (StatusCode::INTERNAL_SERVER_ERROR, format!("demo backend :{port} failed on purpose\n"))
                        } else {
                            (
                                StatusCode::OK,
                                format!("hello from demo backend :{port} ({} {})\n", req.method(), req.uri()),
                            )
                        };
                        let mut resp = Response::new(Full::new(Bytes::from(body)));
                        *resp.status_mut() = status;
                        resp.headers_mut().insert("x-backend", port.to_string().parse().expect("digits"));
                        if let (StatusCode::OK, Some(cc)) = (status, cache_control) {
                            resp.headers_mut().insert(hyper::header::CACHE_CONTROL, cc);
                        }
                        Ok::<_, Infallible>(resp)
                    }
                });
                tokio::spawn(async move {
                    let _ = http1::Builder::new().serve_connection(TokioIo::new(stream), svc).with_upgrades().await;
                });
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
}
