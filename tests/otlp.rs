//! `[tracing] otlp_endpoint` (SPEC 15) through the real binary: a tiny OTLP/HTTP collector
//! in the test decodes what balancer exports; an unreachable one costs requests nothing.

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;

const PARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

/// An OTLP/HTTP collector on 127.0.0.1: decodes every `POST /v1/traces` body as an
/// `ExportTraceServiceRequest` and keeps its spans (with the service name they came under).
struct Collector {
    addr: SocketAddr,
    spans: Arc<Mutex<Vec<(String, Span)>>>,
    /// Request paths and content types seen.
    posts: Arc<Mutex<Vec<(String, String)>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Collector {
    async fn start() -> Collector {
        Self::start_on("127.0.0.1:0".parse().unwrap()).await
    }

    async fn start_on(addr: SocketAddr) -> Collector {
        let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let spans: Arc<Mutex<Vec<(String, Span)>>> = Arc::default();
        let posts: Arc<Mutex<Vec<(String, String)>>> = Arc::default();
        let (s, p) = (spans.clone(), posts.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { continue };
                let (s, p) = (s.clone(), p.clone());
                tokio::spawn(async move {
                    let svc = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let (s, p) = (s.clone(), p.clone());
                        async move {
                            let path = req.uri().path().to_owned();
                            let ctype =
                                req.headers().get("content-type").map_or("", |v| v.to_str().unwrap()).to_owned();
                            p.lock().unwrap().push((path, ctype));
                            let body = req.into_body().collect().await.unwrap().to_bytes();
                            let export = ExportTraceServiceRequest::decode(body).expect("an ExportTraceServiceRequest");
                            for rs in export.resource_spans {
                                let service = rs
                                    .resource
                                    .iter()
                                    .flat_map(|r| &r.attributes)
                                    .find(|kv| kv.key == "service.name")
                                    .and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
                                        AnyValue::StringValue(v) => Some(v.clone()),
                                        _ => None,
                                    })
                                    .unwrap_or_default();
                                for ss in rs.scope_spans {
                                    s.lock().unwrap().extend(ss.spans.into_iter().map(|sp| (service.clone(), sp)));
                                }
                            }
                            let mut resp = http::Response::new(Full::new(Bytes::from(
                                ExportTraceServiceResponse::default().encode_to_vec(),
                            )));
                            resp.headers_mut().insert("content-type", "application/x-protobuf".parse().unwrap());
                            Ok::<_, std::convert::Infallible>(resp)
                        }
                    });
                    let _ =
                        hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
                });
            }
        });
        Collector { addr, spans, posts, task }
    }

    fn spans(&self) -> Vec<(String, Span)> {
        self.spans.lock().unwrap().clone()
    }

    async fn wait_for(&self, n: usize) -> Vec<(String, Span)> {
        let got = wait_until(Duration::from_secs(5), || async { self.spans.lock().unwrap().len() >= n }).await;
        assert!(got, "{} spans arrived, {n} expected", self.spans.lock().unwrap().len());
        self.spans()
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn attr(span: &Span, key: &str) -> Option<AnyValue> {
    span.attributes.iter().find(|kv| kv.key == key).and_then(|kv| kv.value.clone()?.value)
}

fn string(s: &str) -> Option<AnyValue> {
    Some(AnyValue::StringValue(s.to_owned()))
}

fn tracing(endpoint: SocketAddr) -> String {
    format!("\n[tracing]\notlp_endpoint = \"http://{endpoint}\"\n")
}

async fn get_with(addr: SocketAddr, path: &str, traceparent: Option<&str>) -> Reply {
    let mut req = http::Request::get(path).header("host", "test.local");
    if let Some(tp) = traceparent {
        req = req.header("traceparent", tp);
    }
    send(addr, req.body(Full::default()).unwrap()).await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_span_per_request_reaches_the_collector_with_the_trace_ids() {
    let collector = Collector::start().await;
    let (backend, heads) = head_echo().await;
    let b = Balancer::start(&config_with_admin(&[backend.addr], &tracing(collector.addr)), &[]);

    // Continued: same trace, the client's span as parent, balancer's span sent on.
    assert_eq!(get_with(b.addr(), "/orders/7?x=1", Some(PARENT)).await.status, 200);
    // Started here.
    assert_eq!(get_with(b.addr(), "/started", None).await.status, 200);
    // Not sampled by the caller: not exported (parent-based, like an SDK's default).
    let unsampled = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00";
    assert_eq!(get_with(b.addr(), "/unsampled", Some(unsampled)).await.status, 200);
    let spans = collector.wait_for(2).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let spans_after = collector.spans();
    assert_eq!(spans_after.len(), 2, "the unsampled request made no span: {spans:?}");

    let (service, continued) = spans.iter().find(|(_, s)| attr(s, "url.path") == string("/orders/7")).unwrap();
    assert_eq!(service, "balancer");
    assert_eq!(hex(&continued.trace_id), "4bf92f3577b34da6a3ce929d0e0e4736");
    assert_eq!(hex(&continued.parent_span_id), "00f067aa0ba902b7");
    assert_eq!(continued.name, "HTTP GET");
    assert_eq!(continued.kind, 2, "a server span");
    assert_eq!(attr(continued, "http.request.method"), string("GET"));
    assert_eq!(attr(continued, "http.response.status_code"), Some(AnyValue::IntValue(200)));
    assert_eq!(attr(continued, "balancer.upstream"), string("app"));
    assert_eq!(attr(continued, "balancer.backend"), string(&format!("http://{}", backend.addr)));
    assert!(continued.end_time_unix_nano > continued.start_time_unix_nano);
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64;
    assert!(now - continued.end_time_unix_nano < 30_000_000_000, "timestamps are wall-clock");
    // The backend's parent is the exported span.
    let sent = String::from_utf8_lossy(&heads.lock().unwrap()[0]).to_lowercase();
    let expected = format!("traceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-{}-01", hex(&continued.span_id));
    assert!(sent.contains(&expected), "{expected} not in {sent}");

    let (_, started) = spans.iter().find(|(_, s)| attr(s, "url.path") == string("/started")).unwrap();
    assert!(started.parent_span_id.is_empty(), "a root span");
    let logged = b.access_logs();
    let log = logged.iter().find(|l| l["path"] == "/started").unwrap();
    assert_eq!(log["trace_id"].as_str().unwrap(), hex(&started.trace_id), "the access log joins the span");

    let posts = collector.posts.lock().unwrap().clone();
    assert!(posts.iter().all(|(p, t)| p == "/v1/traces" && t == "application/x-protobuf"), "{posts:?}");
    assert!(posts.len() <= 2, "batched: {posts:?}");

    let metrics = get(b.admin(), "/metrics").await.text();
    assert_eq!(metric(&metrics, "balancer_spans_exported_total"), Some(2.0), "{metrics}");
    assert_eq!(metric(&metrics, "balancer_spans_dropped_total{reason=\"queue_full\"}"), Some(0.0));
    let config = get(b.admin(), "/config").await.text();
    assert!(config.contains(&format!("[tracing]\notlp_endpoint = \"http://{}\"", collector.addr)), "{config}");
}

/// Many requests at once go out in few POSTs; a 5xx is an error span; a reload to another
/// collector moves the spans there.
#[tokio::test(flavor = "multi_thread")]
async fn spans_are_batched_and_follow_a_reload() {
    let (first, second) = (Collector::start().await, Collector::start().await);
    let up = Upstream::start("a").await;
    let dead = dead_addr();
    let extra = format!(
        "{}\n[upstreams.down]\nbackends = [\"http://{dead}\"]\n\n[[routes]]\npath_prefix = \"/down\"\nupstream = \"down\"\n\n[[routes]]\npath_prefix = \"/\"\nupstream = \"app\"\n",
        tracing(first.addr)
    );
    let config = config_with_admin(&[up.addr], &extra);
    let b = Balancer::start(&config, &[]);
    let mut conn = Conn::open(b.addr()).await;
    for _ in 0..200 {
        assert_eq!(conn.get("/").await.unwrap().status, 200);
    }
    assert!(conn.get("/down").await.unwrap().status.is_server_error());
    let spans = first.wait_for(201).await;
    let posts = first.posts.lock().unwrap().len();
    assert!(posts < 20, "201 spans in {posts} POSTs");
    let (_, failed) = spans.iter().find(|(_, s)| attr(s, "url.path") == string("/down")).unwrap();
    assert_eq!(failed.status.as_ref().unwrap().code, 2, "an error span");
    assert_eq!(attr(failed, "balancer.upstream"), string("down"));

    b.write_config(&config.replace(&first.addr.to_string(), &second.addr.to_string()));
    let r = send(b.admin(), http::Request::post("/reload").header("host", "x").body(Full::default()).unwrap()).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(conn.get("/after").await.unwrap().status, 200);
    let spans = second.wait_for(1).await;
    assert_eq!(attr(&spans[0].1, "url.path"), string("/after"));
    assert!(first.spans().iter().all(|(_, s)| attr(s, "url.path") != string("/after")));
}

/// A collector that refuses connections loses spans, not requests: every request is
/// answered, the failure is logged once and counted.
#[tokio::test(flavor = "multi_thread")]
async fn an_unreachable_collector_costs_requests_nothing() {
    let up = Upstream::start("a").await;
    let (dead, held) = held_port();
    let b = Balancer::start(&config_with_admin(&[up.addr], &tracing(dead)), &[]);
    let mut conn = Conn::open(b.addr()).await;
    for i in 0..500 {
        let r = conn.get(&format!("/{i}")).await.unwrap();
        assert_eq!(r.status, 200);
    }
    b.wait_for_log(Duration::from_secs(5), |l| {
        l["message"].as_str().is_some_and(|m| m.starts_with("span export failed"))
    });
    let failed = wait_until(Duration::from_secs(5), || async {
        let m = get(b.admin(), "/metrics").await.text();
        metric(&m, "balancer_spans_dropped_total{reason=\"export_failed\"}") == Some(500.0)
    })
    .await;
    assert!(failed, "{}", get(b.admin(), "/metrics").await.text());
    let warned =
        b.logs().iter().filter(|l| l["message"].as_str().is_some_and(|m| m.starts_with("span export failed"))).count();
    assert_eq!(warned, 1, "logged once while it stays down");
    assert!(up.hits() >= 500);

    // The collector comes up on that port: spans flow again, and that is logged.
    drop(held);
    let collector = Collector::start_on(dead).await;
    let arrived = wait_until(Duration::from_secs(10), || async {
        get(b.addr(), "/again").await;
        !collector.spans().is_empty()
    })
    .await;
    assert!(arrived, "no span after the collector came back");
    b.wait_for_log(Duration::from_secs(5), |l| l["message"] == "span export works again");
}

#[test]
fn the_endpoint_is_checked() {
    let dir = tempfile::tempdir().unwrap();
    for (endpoint, says) in [("https://c:4318", "https is not supported"), ("c:4318", "not an http:// URL")] {
        std::fs::write(
            dir.path().join("b.toml"),
            format!(
                "[upstreams.app]\nbackends = [\"http://127.0.0.1:1\"]\n[tracing]\notlp_endpoint = \"{endpoint}\"\n"
            ),
        )
        .unwrap();
        let (code, _, err) = run_cli(&["-c", "b.toml", "--check"], dir.path());
        assert_eq!(code, 1, "{err}");
        assert!(err.contains("b.toml:4:") && err.contains(says), "{err}");
    }
}
