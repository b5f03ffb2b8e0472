//! Wiring: config -> runtime -> listeners, admin, checkers, reloader; then wait for a
//! signal and drain.

use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio_util::sync::CancellationToken;

use crate::config::{ConfigSource, Loaded};
use crate::logging::LogHandle;
use crate::metrics::LastReload;
use crate::reload::{self, AdminListener, Reloader, Trigger};
use crate::runtime::{self, Runtime, SharedRuntime};
use crate::server::{BindError, Listeners, Workers};

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error(transparent)]
    Bind(#[from] BindError),
    #[error("cannot install signal handlers: {0}")]
    Signals(std::io::Error),
    #[error(transparent)]
    TicketKeys(#[from] crate::tls::TicketKeysError),
}

/// Runs balancer until SIGTERM or SIGINT, then drains within `shutdown_grace`.
/// Client connections are served on `workers`; everything else runs where this is awaited.
pub async fn run(loaded: Loaded, source: ConfigSource, log: LogHandle, workers: Workers) -> Result<(), AppError> {
    let rt = runtime::build(loaded.config, None, 1, Default::default());
    *rt.metrics.last_reload.lock().expect("last_reload lock") = LastReload::now(Ok(()));
    if rt.config.routes.is_empty() && rt.upstreams.len() > 1 {
        tracing::warn!("there are several upstreams and no [[routes]]: every request will get 404");
    }
    let (listen, admin_addr) = (crate::server::listen_set(&rt.config.server), rt.config.admin);
    let runtime: SharedRuntime = Arc::new(ArcSwap::from_pointee(rt));

    // Bind everything first: any failure exits before serving anything.
    let mut listeners = Listeners::new(runtime.clone(), Arc::new(workers))?;
    let fresh = listeners.prepare(&listen)?;
    let admin_listener = crate::server::bind_single(admin_addr.as_slice())?.pop();
    log_upstreams(&runtime.load());

    let stop = CancellationToken::new();
    let checks = CancellationToken::new();
    runtime.load().spawn_health_checks(&checks, None);
    runtime.load().spawn_limit_store(&checks);
    runtime.load().spawn_span_export();
    let (handle, requests) = reload::channel();
    let admin_stop = CancellationToken::new();
    if let Some(l) = admin_listener {
        crate::admin::spawn(l, runtime.clone(), handle.clone(), admin_stop.clone());
    }
    listeners.apply(&listen, fresh, runtime.load().config.server.shutdown_grace);
    crate::notify::ready();
    tokio::spawn(housekeeping(runtime.clone(), stop.clone()));
    reload::watch::spawn(&source.path, &runtime.load().config.files, handle.clone(), stop.clone());
    let reloader = Reloader::new(
        source,
        runtime.clone(),
        listeners,
        checks,
        AdminListener { addr: admin_addr, stop: admin_stop, spawn: crate::admin::spawn },
        log,
        handle.clone(),
    );
    let reloader = tokio::spawn(reloader.run(requests, stop.clone()));

    wait_for_stop(&handle).await.map_err(AppError::Signals)?;
    crate::notify::stopping();
    stop.cancel();
    let reloader = reloader.await.expect("the reload task does not panic");
    reloader.checks.cancel();
    let grace = runtime.load().config.server.shutdown_grace;
    if reloader.listeners.shutdown(grace).await {
        tracing::info!("all connections drained; exiting");
    } else {
        tracing::warn!(grace = %humantime::format_duration(grace), "shutdown grace ran out; closing the remaining connections");
    }
    reloader.admin.stop.cancel();
    Ok(())
}

/// Once a second, on whatever runtime is live: closes backend connections idle past
/// their pool's `idle_timeout`, drops full rate-limit buckets (every
/// [`crate::limit::SWEEP_EVERY`]), and gives what parked and closed connections freed back
/// to the system, so that resident memory follows what is in use.
async fn housekeeping(runtime: SharedRuntime, stop: CancellationToken) {
    let mut ticker = tokio::time::interval(std::time::Duration::from_secs(1));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let limits_every = crate::limit::SWEEP_EVERY.as_secs().max(1);
    let (mut ticks, mut parks_seen, mut freed) = (0u64, 0, false);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = ticker.tick() => {}
        }
        ticks += 1;
        let rt = runtime.load_full();
        let closed: usize = rt.upstreams.iter().flat_map(|u| &u.backends).map(|b| b.pool.drop_expired()).sum();
        if ticks % limits_every == 0 {
            for limit in &rt.limits {
                limit.sweep();
            }
        }
        let parks = rt.metrics.parks.load(std::sync::atomic::Ordering::Relaxed);
        freed |= closed > 0 || parks != parks_seen;
        parks_seen = parks;
        // At most every 2 s: the trim takes the allocator's locks the workers use too.
        if freed && ticks % 2 == 0 {
            freed = false;
            crate::memory::release_free_memory();
        }
    }
}

fn log_upstreams(rt: &Runtime) {
    for up in &rt.config.upstreams {
        let backends: Vec<String> = up.backends.iter().map(|b| format!("{} (weight {})", b.url, b.weight)).collect();
        tracing::info!(upstream = %up.name, strategy = %up.strategy, backends = %backends.join(", "), "upstream");
    }
}

/// Waits for SIGTERM or SIGINT; SIGHUP asks for a reload meanwhile.
async fn wait_for_stop(reload: &reload::ReloadHandle) -> std::io::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    let which = loop {
        tokio::select! {
            _ = term.recv() => break "SIGTERM",
            _ = int.recv() => break "SIGINT",
            _ = hup.recv() => reload.nudge(Trigger::Signal),
        }
    };
    tracing::info!(signal = which, "shutting down");
    Ok(())
}
