//! Spans exported over OTLP/HTTP (protobuf), for `[tracing] otlp_endpoint`.
//!
//! The request path only hands a [`SpanRecord`] (ids as hex, times, a few shared strings)
//! to a bounded channel with `try_send`: when the channel is full the span is dropped and
//! counted, never waited for. One background task takes what is queued every [`TICK`]
//! (batches of up to [`MAX_BATCH`] spans), encodes an `ExportTraceServiceRequest` and
//! POSTs it to `{endpoint}/v1/traces` on one kept-alive HTTP/1.1 connection. A collector
//! that is down or slow costs spans, not requests. The task ends when the last
//! [`SpanExport`] holding the channel's sender is dropped (its runtimes are gone).

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{Method, Request, Uri, header};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{AnyValue, InstrumentationScope, KeyValue, any_value};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span, Status, span, status};
use prost::Message;
use tokio::sync::mpsc;

/// Spans waiting for the exporter at most; past this they are dropped (and counted).
pub const QUEUE: usize = 16384;
/// Spans in one export request at most.
pub const MAX_BATCH: usize = 512;
/// How often the exporter takes what is queued while spans flow: at 60,000 requests a
/// second that is 6,000 spans, well within [`QUEUE`] while a slow export holds it up.
pub const TICK: Duration = Duration::from_millis(100);
/// The longest one export (connect, send, answer) may take.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);

/// What one request's span needs, gathered when its response ends. Ids are as the trace
/// context keeps them (lower-case hex); turning them into bytes and strings into protobuf
/// happens in the exporter task.
#[derive(Debug)]
pub struct SpanRecord {
    pub trace_id: [u8; 32],
    pub span_id: [u8; 16],
    /// The client's span, when the request continued its trace.
    pub parent_id: Option<[u8; 16]>,
    pub start: SystemTime,
    pub end: SystemTime,
    pub method: Method,
    pub uri: Uri,
    pub status: u16,
    pub upstream: Option<Arc<str>>,
    pub backend: Option<Arc<str>>,
}

/// What the exporter counts, for `/metrics`; shared by the handle and its task.
#[derive(Debug, Default)]
pub struct ExportCounters {
    /// Spans a collector accepted.
    pub exported: AtomicU64,
    /// Spans dropped because the queue was full (the exporter fell behind).
    pub dropped_full: AtomicU64,
    /// Spans lost with an export that failed (collector down, slow, or refusing).
    pub failed: AtomicU64,
}

/// The request path's handle on the exporter: kept by the runtime across reloads while
/// the endpoint is unchanged.
#[derive(Debug)]
pub struct SpanExport {
    /// The endpoint as configured (a reload that keeps it keeps this exporter).
    pub configured: Uri,
    /// Where batches are POSTed: the configured endpoint with `/v1/traces`.
    pub endpoint: Uri,
    sender: mpsc::Sender<SpanRecord>,
    /// The task's end of the channel, until [`SpanExport::start`] hands it to the task.
    receiver: Mutex<Option<mpsc::Receiver<SpanRecord>>>,
    pub counters: Arc<ExportCounters>,
}

impl SpanExport {
    /// An exporter for `endpoint` (an `http://` URL, checked by the config); nothing is
    /// started or connected until [`SpanExport::start`].
    pub fn new(endpoint: Uri) -> SpanExport {
        let (sender, receiver) = mpsc::channel(QUEUE);
        SpanExport {
            endpoint: traces_url(&endpoint),
            configured: endpoint,
            sender,
            receiver: Mutex::new(Some(receiver)),
            counters: Arc::default(),
        }
    }

    /// Hands a finished request's span to the exporter, or drops it when the queue is
    /// full. Never waits.
    #[inline]
    pub fn record(&self, span: SpanRecord) {
        if self.sender.try_send(span).is_err() {
            self.counters.dropped_full.fetch_add(1, Relaxed);
        }
    }

    /// Starts the exporter task (once; later calls, e.g. by a reload that kept this
    /// exporter, do nothing). Must be called within a tokio runtime.
    pub fn start(&self) {
        let Some(receiver) = self.receiver.lock().expect("span receiver lock").take() else { return };
        tokio::spawn(run(receiver, self.endpoint.clone(), self.counters.clone()));
    }
}

/// `http://host:4318` -> `http://host:4318/v1/traces`; a URL that already names a path
/// ending in `/v1/traces` is kept as it is.
fn traces_url(endpoint: &Uri) -> Uri {
    if endpoint.path().ends_with("/v1/traces") {
        return endpoint.clone();
    }
    let base = endpoint.to_string();
    format!("{}/v1/traces", base.trim_end_matches('/')).parse().unwrap_or_else(|_| endpoint.clone())
}

/// The exporter task: batches, encodes and sends until the channel closes.
///
/// While nothing is queued it waits on the channel, so the first span wakes it; while
/// spans flow it takes them every [`TICK`] without waiting on the channel, so a request
/// handing over its span wakes no other thread (a wake-up per span, a futex call and a
/// context switch, cost a quarter of the throughput on two cores).
async fn run(mut receiver: mpsc::Receiver<SpanRecord>, endpoint: Uri, counters: Arc<ExportCounters>) {
    let mut client = Client { endpoint, conn: None, failing: false };
    let mut batch = Vec::with_capacity(MAX_BATCH);
    loop {
        if receiver.recv_many(&mut batch, MAX_BATCH).await == 0 {
            return;
        }
        // Spans are flowing: one tick for more to gather, then everything queued goes out
        // in batches of MAX_BATCH; a tick that finds nothing goes back to waiting.
        loop {
            tokio::time::sleep(TICK).await;
            let mut closed = false;
            loop {
                while batch.len() < MAX_BATCH {
                    match receiver.try_recv() {
                        Ok(span) => batch.push(span),
                        Err(mpsc::error::TryRecvError::Empty) => break,
                        Err(mpsc::error::TryRecvError::Disconnected) => {
                            closed = true;
                            break;
                        }
                    }
                }
                if batch.is_empty() {
                    break;
                }
                let full = batch.len() == MAX_BATCH;
                export(&mut client, &mut batch, &counters).await;
                if !full {
                    break;
                }
            }
            if closed {
                return;
            }
            if receiver.is_empty() {
                break;
            }
        }
    }
}

/// Sends `batch` (emptying it) and counts the outcome. While the collector is down, a
/// batch is dropped before it is encoded unless a connection can be made again: encoding
/// is most of the exporter's work, and a dead collector should cost little more than the
/// queue.
async fn export(client: &mut Client, batch: &mut Vec<SpanRecord>, counters: &ExportCounters) {
    let n = batch.len() as u64;
    if client.failing && client.reconnect().await.is_err() {
        batch.clear();
        counters.failed.fetch_add(n, Relaxed);
        return;
    }
    let body = encode(batch.drain(..));
    match client.post(body).await {
        Ok(()) => counters.exported.fetch_add(n, Relaxed),
        Err(_) => counters.failed.fetch_add(n, Relaxed),
    };
}

/// Why an export failed.
#[derive(Debug, thiserror::Error)]
enum ExportError {
    #[error("cannot connect to the collector: {0}")]
    Connect(std::io::Error),
    #[error("HTTP error talking to the collector: {0}")]
    Http(#[from] hyper::Error),
    #[error("the collector answered {0}")]
    Status(http::StatusCode),
    #[error("no answer within {EXPORT_TIMEOUT:?}")]
    Timeout,
}

/// One kept-alive HTTP/1.1 connection to the collector, opened again when it breaks.
struct Client {
    endpoint: Uri,
    conn: Option<SendRequest<Full<Bytes>>>,
    /// The last export failed: a warning was logged, the next success is logged too.
    failing: bool,
}

impl Client {
    async fn post(&mut self, body: Vec<u8>) -> Result<(), ExportError> {
        let body = Bytes::from(body);
        let reused = self.conn.as_ref().is_some_and(|c| !c.is_closed());
        let mut result = self.timed_post(body.clone()).await;
        // A kept-alive connection the collector closed as the batch went out: once more
        // on a fresh one.
        if reused && matches!(result, Err(ExportError::Http(_))) {
            self.conn = None;
            result = self.timed_post(body).await;
        }
        match (&result, self.failing) {
            (Err(e), false) => {
                tracing::warn!(endpoint = %self.endpoint, error = %e, "span export failed; spans are dropped until the collector answers");
                self.failing = true;
            }
            (Ok(()), true) => {
                tracing::info!(endpoint = %self.endpoint, "span export works again");
                self.failing = false;
            }
            _ => {}
        }
        if result.is_err() {
            // A connection that failed once is not trusted with the next batch.
            self.conn = None;
        }
        result
    }

    /// Opens a connection if there is no open one (within [`EXPORT_TIMEOUT`]).
    async fn reconnect(&mut self) -> Result<(), ExportError> {
        if self.conn.as_ref().is_some_and(|c| !c.is_closed()) {
            return Ok(());
        }
        let conn = tokio::time::timeout(EXPORT_TIMEOUT, self.connect()).await.map_err(|_| ExportError::Timeout)??;
        self.conn = Some(conn);
        Ok(())
    }

    async fn timed_post(&mut self, body: Bytes) -> Result<(), ExportError> {
        match tokio::time::timeout(EXPORT_TIMEOUT, self.try_post(body)).await {
            Ok(r) => r,
            Err(_) => Err(ExportError::Timeout),
        }
    }

    async fn try_post(&mut self, body: Bytes) -> Result<(), ExportError> {
        let conn = match self.conn.take() {
            Some(c) if !c.is_closed() => c,
            _ => self.connect().await?,
        };
        let mut conn = conn;
        conn.ready().await?;
        let authority = self.endpoint.authority().map_or("localhost", |a| a.as_str());
        let req = Request::post(self.endpoint.path())
            .header(header::HOST, authority)
            .header(header::CONTENT_TYPE, "application/x-protobuf")
            .body(Full::new(body))
            .expect("a request of valid parts");
        let resp = conn.send_request(req).await?;
        let status = resp.status();
        // Read the answer to its end so the connection can carry the next batch.
        resp.into_body().collect().await?;
        self.conn = Some(conn);
        if status.is_success() { Ok(()) } else { Err(ExportError::Status(status)) }
    }

    async fn connect(&self) -> Result<SendRequest<Full<Bytes>>, ExportError> {
        let host = self.endpoint.host().unwrap_or("localhost").trim_start_matches('[').trim_end_matches(']');
        let port = self.endpoint.port_u16().unwrap_or(80);
        let stream = tokio::net::TcpStream::connect((host, port)).await.map_err(ExportError::Connect)?;
        let _ = stream.set_nodelay(true);
        let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(send)
    }
}

/// The protobuf body of one export: one resource (`service.name` = `balancer`), one
/// scope, the spans.
fn encode(spans: impl Iterator<Item = SpanRecord>) -> Vec<u8> {
    let request = ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            resource: Some(Resource {
                attributes: vec![string("service.name", "balancer".to_owned())],
                ..Default::default()
            }),
            scope_spans: vec![ScopeSpans {
                scope: Some(InstrumentationScope {
                    name: "balancer".to_owned(),
                    version: env!("CARGO_PKG_VERSION").to_owned(),
                    ..Default::default()
                }),
                spans: spans.map(span).collect(),
                ..Default::default()
            }],
            ..Default::default()
        }],
    };
    request.encode_to_vec()
}

/// One request as an OTLP span: a server span named `HTTP {method}`, with the method,
/// path, status, upstream and backend as attributes, an error status for a 5xx.
fn span(r: SpanRecord) -> Span {
    let mut attributes = vec![
        string("http.request.method", r.method.as_str().to_owned()),
        string("url.path", r.uri.path().to_owned()),
        KeyValue {
            key: "http.response.status_code".to_owned(),
            value: Some(AnyValue { value: Some(any_value::Value::IntValue(i64::from(r.status))) }),
            ..Default::default()
        },
    ];
    if let Some(u) = &r.upstream {
        attributes.push(string("balancer.upstream", u.to_string()));
    }
    if let Some(b) = &r.backend {
        attributes.push(string("balancer.backend", b.to_string()));
    }
    let status = if r.status >= 500 {
        Status { code: status::StatusCode::Error as i32, message: String::new() }
    } else {
        Status::default()
    };
    Span {
        trace_id: unhex(&r.trace_id),
        span_id: unhex(&r.span_id),
        parent_span_id: r.parent_id.as_ref().map(|p| unhex(p)).unwrap_or_default(),
        name: format!("HTTP {}", r.method),
        kind: span::SpanKind::Server as i32,
        start_time_unix_nano: unix_nanos(r.start),
        end_time_unix_nano: unix_nanos(r.end),
        attributes,
        status: Some(status),
        ..Default::default()
    }
}

fn string(key: &str, value: String) -> KeyValue {
    KeyValue {
        key: key.to_owned(),
        value: Some(AnyValue { value: Some(any_value::Value::StringValue(value)) }),
        ..Default::default()
    }
}

fn unix_nanos(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
}

/// Lower-case hex digits (as the trace context keeps them) to bytes.
fn unhex(hex: &[u8]) -> Vec<u8> {
    let digit = |c: u8| match c {
        b'0'..=b'9' => c - b'0',
        b'a'..=b'f' => c - b'a' + 10,
        _ => 0,
    };
    hex.chunks_exact(2).map(|p| digit(p[0]) << 4 | digit(p[1])).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(status: u16) -> SpanRecord {
        let now = SystemTime::now();
        SpanRecord {
            trace_id: *b"4bf92f3577b34da6a3ce929d0e0e4736",
            span_id: *b"00f067aa0ba902b7",
            parent_id: None,
            start: now - Duration::from_millis(3),
            end: now,
            method: Method::GET,
            uri: "/a/b?c".parse().unwrap(),
            status,
            upstream: Some("app".into()),
            backend: Some("http://127.0.0.1:1".into()),
        }
    }

    #[test]
    fn a_batch_decodes_as_otlp() {
        let body = encode([record(200), record(502)].into_iter());
        let req = ExportTraceServiceRequest::decode(&body[..]).unwrap();
        let spans = &req.resource_spans[0].scope_spans[0].spans;
        assert_eq!(spans.len(), 2);
        assert_eq!(hex_of(&spans[0].trace_id), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(spans[0].span_id.len(), 8);
        assert!(spans[0].parent_span_id.is_empty());
        assert_eq!(spans[0].name, "HTTP GET");
        assert_eq!(spans[0].end_time_unix_nano - spans[0].start_time_unix_nano, 3_000_000);
        assert_eq!(spans[1].status.as_ref().unwrap().code, status::StatusCode::Error as i32);
        let path = spans[0].attributes.iter().find(|kv| kv.key == "url.path").unwrap();
        assert_eq!(path.value, Some(AnyValue { value: Some(any_value::Value::StringValue("/a/b".into())) }));
    }

    fn hex_of(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    #[test]
    fn the_traces_path_is_added_once() {
        let url = |s: &str| traces_url(&s.parse().unwrap()).to_string();
        assert_eq!(url("http://127.0.0.1:4318"), "http://127.0.0.1:4318/v1/traces");
        assert_eq!(url("http://c:4318/"), "http://c:4318/v1/traces");
        assert_eq!(url("http://c:4318/otlp/v1/traces"), "http://c:4318/otlp/v1/traces");
        assert_eq!(url("http://c/prefix"), "http://c/prefix/v1/traces");
    }

    #[tokio::test]
    async fn a_full_queue_drops_and_counts() {
        let export = SpanExport::new("http://127.0.0.1:9".parse().unwrap());
        for _ in 0..QUEUE + 3 {
            export.record(record(200));
        }
        assert_eq!(export.counters.dropped_full.load(Relaxed), 3, "not started: nothing is taken off");
    }
}
