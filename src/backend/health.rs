//! Active health checks: `GET path` on a fresh connection every `interval`, per backend.
//!
//! One task per backend; their first checks are spread evenly over one interval so a
//! large upstream does not burst. The consecutive-result counters live in the task; the
//! only shared state is the backend's up/down flag. Tasks stop when their token is
//! cancelled (a reload starts new ones) or their backend is retired (gone by DNS).

use std::sync::Arc;
use std::time::Duration;

use std::io::Write;

use http::uri::PathAndQuery;
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;

use super::{Backend, NoBody, RequestFraming};
use crate::config::HealthCheckConfig;

/// Starts the checker of one backend, its first check `offset` into the interval; it
/// runs until `stop`.
pub fn spawn(backend: Arc<Backend>, hc: HealthCheckConfig, offset: Duration, stop: CancellationToken) {
    tokio::spawn(check_loop(backend, hc, offset, stop));
}

async fn check_loop(backend: Arc<Backend>, hc: HealthCheckConfig, offset: Duration, stop: CancellationToken) {
    tokio::select! {
        _ = stop.cancelled() => return,
        _ = tokio::time::sleep(offset) => {}
    }
    let mut ticker = tokio::time::interval(hc.interval);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Skip);
    let (mut passes, mut fails) = (0u32, 0u32);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = ticker.tick() => {}
        }
        if backend.is_retired() {
            return;
        }
        let outcome = tokio::select! {
            _ = stop.cancelled() => return,
            r = tokio::time::timeout(hc.timeout, probe(&backend, &hc)) => match r {
                Ok(r) => r,
                Err(_) => Err(format!("GET {} timed out after {}", hc.path, humantime::format_duration(hc.timeout))),
            },
        };
        match outcome {
            Ok(status) => {
                fails = 0;
                passes = passes.saturating_add(1);
                if !backend.is_active_up() && passes >= hc.healthy_threshold {
                    let reason = format!("GET {} answered {status} {passes} times in a row", hc.path);
                    backend.set_active_up(true, &reason);
                }
            }
            Err(reason) => {
                passes = 0;
                fails = fails.saturating_add(1);
                tracing::debug!(upstream = %backend.upstream, backend = %backend.url, %reason, "health check failed");
                if backend.is_active_up() && fails >= hc.unhealthy_threshold {
                    backend.set_active_up(false, &format!("{fails} checks in a row failed, the last: {reason}"));
                }
            }
        }
    }
}

/// One check on a new connection (TLS for an https backend), never a pooled one: the
/// status code when it is expected, else why not.
async fn probe(backend: &Backend, hc: &HealthCheckConfig) -> Result<u16, String> {
    let path = PathAndQuery::try_from(hc.path.as_str()).map_err(|e| format!("bad check path: {e}"))?;
    let mut conn = backend.pool.connect().await.map_err(|e| format!("connect: {e}"))?;
    let head = conn.head_buf();
    let _ = write!(
        head,
        "GET {path} HTTP/1.1\r\nhost: {}\r\nuser-agent: balancer-health-check\r\nconnection: close\r\n\r\n",
        backend.authority
    );
    let failed = |e: &dyn std::fmt::Display| format!("GET {}: {e}", hc.path);
    conn.send(&mut NoBody::new(), RequestFraming::Empty).await.map_err(|e| failed(&e))?;
    let status = conn.read_head(false).await.map_err(|e| failed(&e))?.status.as_u16();
    if hc.expect_status.iter().any(|&(lo, hi)| (lo..=hi).contains(&status)) {
        Ok(status)
    } else {
        Err(format!("GET {} answered {status}", hc.path))
    }
}
