//! The access log: one line per request, written when its response body is finished.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use http::{Method, Uri};

use super::ActivityGuard;
use super::request_id::RequestId;
use super::trace::TraceContext;
use crate::backend::Backend;
use crate::logging::access::{self, AccessLine};
use crate::otlp::SpanExport;
use crate::otlp::SpanRecord;
use crate::runtime::Runtime;

/// Everything the access-log line needs, gathered along the request path. Also holds the
/// request's runtime snapshot and the connection's activity mark until the response ends.
#[derive(Debug)]
pub struct RequestLog {
    pub start: Instant,
    pub client: SocketAddr,
    pub method: Method,
    pub uri: Uri,
    pub request_id: RequestId,
    /// The W3C trace this request belongs to (continued or started here).
    pub trace: TraceContext,
    pub status: u16,
    pub runtime: Arc<Runtime>,
    pub upstream: Option<usize>,
    /// The backend tried last, by index in the upstream (no reference count to bump).
    pub backend: Option<usize>,
    pub bytes: u64,
    /// Set when the backend's body broke off mid-way.
    pub broken: bool,
    pub _activity: ActivityGuard,
}

impl RequestLog {
    fn backend(&self) -> Option<&Backend> {
        Some(&*self.runtime.upstreams[self.upstream?].backends[self.backend?])
    }

    /// Hands this request's span to the OTLP exporter (sampled traces only).
    #[cold]
    fn export_span(&self, export: &SpanExport, elapsed: std::time::Duration) {
        if !self.trace.sampled() {
            return;
        }
        let (trace_id, span_id, parent_id) = self.trace.ids();
        let end = SystemTime::now();
        let backend = self.backend();
        export.record(SpanRecord {
            trace_id,
            span_id,
            parent_id,
            start: end.checked_sub(elapsed).unwrap_or(end),
            end,
            method: self.method.clone(),
            uri: self.uri.clone(),
            status: self.status,
            upstream: match (backend, self.upstream) {
                (Some(b), _) => Some(b.upstream.clone()),
                (None, Some(i)) => Some(Arc::from(self.runtime.upstreams[i].name.as_str())),
                (None, None) => None,
            },
            backend: backend.map(|b| b.url.clone()),
        });
    }

    pub fn note_broken(&mut self, e: &dyn std::fmt::Display) {
        self.broken = true;
        if let Some(b) = self.backend() {
            tracing::warn!(backend = %b.url, error = %e, request_id = self.request_id.as_str(), "backend response body broke off");
        }
    }
}

impl Drop for RequestLog {
    fn drop(&mut self) {
        let elapsed = self.start.elapsed();
        let upstream = self.upstream.map(|i| &self.runtime.upstreams[i]);
        match (self.backend(), upstream) {
            (Some(b), _) => b.statuses.inc(self.status),
            (None, Some(u)) => u.stats.unattributed.inc(self.status),
            (None, None) => self.runtime.metrics.unrouted.inc(self.status),
        }
        if let Some(u) = upstream {
            u.stats.durations.observe(elapsed);
        }
        if let Some(export) = &self.runtime.span_export {
            self.export_span(export, elapsed);
        }
        if !self.runtime.config.log.access {
            return;
        }
        let micros = elapsed.as_secs() * 1_000_000 + u64::from((elapsed.subsec_nanos() + 500) / 1000);
        access::write(&AccessLine {
            client: self.client.ip(),
            method: self.method.as_str(),
            path: self.uri.path_and_query().map_or("/", |p| p.as_str()),
            status: self.status,
            upstream: self.upstream.map_or("-", |i| self.runtime.upstreams[i].name.as_str()),
            backend: self.backend().map_or("-", |b| &*b.url),
            duration_micros: micros,
            bytes: self.bytes,
            request_id: self.request_id.as_str(),
            trace_id: self.trace.trace_id(),
            complete: !self.broken,
        });
    }
}
