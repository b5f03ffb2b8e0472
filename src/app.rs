//! Wiring: config -> runtime -> listeners; then wait for a signal and drain.

use std::path::PathBuf;
use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio_util::sync::CancellationToken;

use crate::backend::health;
use crate::config::{Loaded, Overrides};
use crate::metrics::LastReload;
use crate::runtime::{self, Runtime, SharedRuntime};
use crate::server::{self, BindError, Listeners};

/// Where the config came from, so it can be read again the same way.
#[derive(Clone, Debug)]
pub struct ConfigSource {
    pub path: PathBuf,
    pub required: bool,
    pub overrides: Overrides,
}

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error(transparent)]
    Bind(#[from] BindError),
    #[error("cannot install signal handlers: {0}")]
    Signals(std::io::Error),
}

/// Runs balancer until SIGTERM or SIGINT, then drains within `shutdown_grace`.
pub async fn run(loaded: Loaded, _source: ConfigSource) -> Result<(), AppError> {
    let rt = runtime::build(loaded.config, None, 1);
    let listeners = server::bind(&rt.config.server.listen)?;
    let admin_listener = crate::admin::bind(rt.config.admin).await?;
    *rt.metrics.last_reload.lock().expect("last_reload lock") = LastReload::now(Ok(()));
    log_upstreams(&rt);
    if rt.config.routes.is_empty() && rt.upstreams.len() > 1 {
        tracing::warn!("there are several upstreams and no [[routes]]: every request will get 404");
    }
    let checks = CancellationToken::new();
    health::spawn_all(&rt, &checks);
    let runtime: SharedRuntime = Arc::new(ArcSwap::from_pointee(rt));
    let admin_stop = CancellationToken::new();
    if let Some(l) = admin_listener {
        crate::admin::spawn(l, runtime.clone(), admin_stop.clone());
    }
    let running = Listeners::start(listeners, runtime.clone());
    tokio::spawn(sweep_rate_limits(runtime.clone(), checks.clone()));

    wait_for_stop().await.map_err(AppError::Signals)?;
    checks.cancel();
    let grace = runtime.load().config.server.shutdown_grace;
    if running.shutdown(grace).await {
        tracing::info!("all connections drained; exiting");
    } else {
        tracing::warn!(grace = %humantime::format_duration(grace), "shutdown grace ran out; closing the remaining connections");
    }
    admin_stop.cancel();
    Ok(())
}

/// Drops full rate-limit buckets every few seconds, from whatever runtime is live.
async fn sweep_rate_limits(runtime: SharedRuntime, stop: CancellationToken) {
    let mut ticker = tokio::time::interval(crate::limit::SWEEP_EVERY);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let rt = runtime.load_full();
        for limit in &rt.limits {
            limit.sweep();
        }
    }
}

fn log_upstreams(rt: &Runtime) {
    for up in &rt.upstreams {
        let backends: Vec<String> = up
            .backends
            .iter()
            .zip(&up.weights)
            .map(|(b, w)| format!("{} (weight {w})", b.url))
            .collect();
        tracing::info!(upstream = %up.name, strategy = %up.strategy, backends = %backends.join(", "), "upstream");
    }
}

async fn wait_for_stop() -> std::io::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let which = tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    };
    tracing::info!(signal = which, "shutting down");
    Ok(())
}
