//! The admin listener: `/` (the dashboard) and `/dashboard.json` (its feed), `/healthz`,
//! `/metrics` (Prometheus text), `/status` (JSON), `/config` (the running config as TOML,
//! secrets hidden), `POST /reload` and `POST /cache/purge`.
//!
//! Everything is read at request time from the live runtime; the admin listener keeps no
//! state of its own beyond the metrics registry.

mod dashboard;
mod metrics;

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use prometheus_client::registry::Registry;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::metrics::LastReload;
use crate::reload::{ReloadHandle, Trigger};
use crate::runtime::SharedRuntime;
use metrics::RuntimeCollector;

/// What the admin endpoints read: the runtime, the registry that exposes it, and the
/// reloader they can ask for a reload.
struct Admin {
    runtime: SharedRuntime,
    registry: Registry,
    reload: ReloadHandle,
}

/// Serves the admin endpoints on `listener` until `stop` is cancelled.
pub fn spawn(listener: std::net::TcpListener, runtime: SharedRuntime, reload: ReloadHandle, stop: CancellationToken) {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(RuntimeCollector(runtime.clone())));
    let admin = Arc::new(Admin { runtime, registry, reload });
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, protocol = "http", "admin listening");
    }
    tokio::spawn(async move {
        let listener = match TcpListener::from_std(listener) {
            Ok(l) => l,
            Err(e) => return tracing::error!(error = %e, "cannot register the admin listener"),
        };
        loop {
            let accepted = tokio::select! {
                _ = stop.cancelled() => return,
                r = listener.accept() => r,
            };
            let (stream, _) = match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            };
            let admin = admin.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req| {
                    let admin = admin.clone();
                    async move { Ok::<_, Infallible>(admin.handle(req).await) }
                });
                let _ = auto::Builder::new(TokioExecutor::new()).serve_connection(TokioIo::new(stream), svc).await;
            });
        }
    });
}

impl Admin {
    async fn handle(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        match (req.method(), req.uri().path()) {
            (&Method::POST, "/reload") => match self.reload.reload(Trigger::Admin).await {
                Ok(generation) => json(StatusCode::OK, &serde_json::json!({ "ok": true, "generation": generation })),
                Err(error) => {
                    json(StatusCode::UNPROCESSABLE_ENTITY, &serde_json::json!({ "ok": false, "error": error }))
                }
            },
            (&Method::POST, "/cache/purge") => self.purge(req.into_body()).await,
            (&Method::GET | &Method::HEAD, "/") => page(),
            (&Method::GET | &Method::HEAD, "/dashboard.json") => {
                json(StatusCode::OK, &dashboard::feed(&self.runtime.load()))
            }
            (&Method::GET | &Method::HEAD, "/healthz") => text(StatusCode::OK, "ok\n".into()),
            (&Method::GET | &Method::HEAD, "/metrics") => self.metrics(),
            (&Method::GET | &Method::HEAD, "/status") => json(StatusCode::OK, &self.status()),
            (&Method::GET | &Method::HEAD, "/config") => self.config(),
            (
                _,
                "/" | "/dashboard.json" | "/healthz" | "/metrics" | "/status" | "/reload" | "/config" | "/cache/purge",
            ) => text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n".into()),
            (_, path) => text(StatusCode::NOT_FOUND, format!("no admin endpoint at {path}\n")),
        }
    }

    fn metrics(&self) -> Response<Full<Bytes>> {
        let mut body = String::with_capacity(4096);
        match prometheus_client::encoding::prometheus_text::encode(&mut body, &self.registry) {
            Ok(()) => {
                let mut resp = Response::new(Full::new(Bytes::from(body)));
                resp.headers_mut().insert(
                    header::CONTENT_TYPE,
                    header::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
                );
                resp
            }
            Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("cannot encode metrics: {e}\n")),
        }
    }

    /// The running generation's effective config (what `balancer --check --diff` compares
    /// an edit against).
    fn config(&self) -> Response<Full<Bytes>> {
        let rt = self.runtime.load();
        let mut resp = Response::new(Full::new(Bytes::copy_from_slice(rt.config.effective_toml.as_bytes())));
        resp.headers_mut()
            .insert(header::CONTENT_TYPE, header::HeaderValue::from_static("application/toml; charset=utf-8"));
        resp.headers_mut().insert("x-balancer-generation", header::HeaderValue::from(rt.generation));
        resp
    }

    /// `POST /cache/purge` with `{"cache": NAME, "prefix": "/path"}`: drops the entries of
    /// that cache whose path starts with the prefix, answers `{"purged": N}`.
    async fn purge(&self, body: Incoming) -> Response<Full<Bytes>> {
        use http_body_util::BodyExt;
        #[derive(serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Purge {
            cache: String,
            #[serde(default = "root")]
            prefix: String,
        }
        fn root() -> String {
            "/".into()
        }
        let bytes = match http_body_util::Limited::new(body, 64 * 1024).collect().await {
            Ok(b) => b.to_bytes(),
            Err(e) => return json(StatusCode::BAD_REQUEST, &serde_json::json!({ "error": e.to_string() })),
        };
        let purge: Purge = match serde_json::from_slice(&bytes) {
            Ok(p) => p,
            Err(e) => return json(StatusCode::BAD_REQUEST, &serde_json::json!({ "error": e.to_string() })),
        };
        let rt = self.runtime.load();
        match rt.caches.iter().find(|c| c.name == purge.cache) {
            Some(cache) => json(StatusCode::OK, &serde_json::json!({ "purged": cache.purge(&purge.prefix) })),
            None => json(
                StatusCode::NOT_FOUND,
                &serde_json::json!({ "error": format!("no [caches.{}] is defined", purge.cache) }),
            ),
        }
    }

    fn status(&self) -> Status {
        let rt = self.runtime.load();
        let last_reload = rt.metrics.last_reload.lock().expect("last_reload lock").clone();
        Status {
            generation: rt.generation,
            last_reload,
            limit_store: rt.limit_store.as_ref().map(|s| LimitStoreStatus {
                url: s.url(),
                up: s.is_up(),
                instances: s.instances(),
                last_error: s.last_error(),
            }),
            upstreams: rt
                .upstreams
                .iter()
                .map(|u| UpstreamStatus {
                    name: u.name.clone(),
                    strategy: u.strategy.to_string(),
                    max_inflight: u.max_inflight,
                    queued: u.queue.depth(),
                    backends: u
                        .backends
                        .iter()
                        .zip(&u.weights)
                        .map(|(b, &weight)| BackendStatus {
                            url: b.url.to_string(),
                            name: b.name.as_deref().map(str::to_owned),
                            weight,
                            healthy: b.is_healthy(),
                            inflight: b.inflight(),
                            requests: b.requests(),
                            failures: b.failures(),
                        })
                        .collect(),
                })
                .collect(),
        }
    }
}

#[derive(Serialize)]
struct Status {
    generation: u64,
    last_reload: LastReload,
    /// `null` without `[limit_store]`.
    limit_store: Option<LimitStoreStatus>,
    upstreams: Vec<UpstreamStatus>,
}

#[derive(Serialize)]
struct LimitStoreStatus {
    /// The password hidden.
    url: String,
    up: bool,
    /// Instances using the store at the last good contact.
    instances: u64,
    last_error: Option<String>,
}

#[derive(Serialize)]
struct UpstreamStatus {
    name: String,
    strategy: String,
    /// Per backend; 0: no cap.
    max_inflight: u32,
    /// Requests waiting in the upstream's queue now.
    queued: usize,
    backends: Vec<BackendStatus>,
}

#[derive(Serialize)]
struct BackendStatus {
    url: String,
    /// The host name the address in `url` was found under (SPEC 12); absent otherwise.
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<String>,
    weight: u32,
    healthy: bool,
    inflight: usize,
    requests: u64,
    failures: u64,
}

/// The dashboard page. It loads nothing but its feed, and says so to the browser.
fn page() -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from_static(dashboard::PAGE.as_bytes())));
    let headers = resp.headers_mut();
    headers.insert(header::CONTENT_TYPE, header::HeaderValue::from_static("text/html; charset=utf-8"));
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        header::HeaderValue::from_static(
            "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; img-src data:",
        ),
    );
    headers.insert(header::CACHE_CONTROL, header::HeaderValue::from_static("no-cache"));
    resp
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static("text/plain; charset=utf-8"));
    resp
}

/// A JSON response (also used by `POST /reload`).
pub fn json(status: StatusCode, value: &impl Serialize) -> Response<Full<Bytes>> {
    let body = serde_json::to_vec(value).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}").into_bytes());
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static("application/json"));
    resp
}
