//! Logs through `tracing` to stderr, as text or one JSON object per line. The access log
//! is the `access` target, on whenever `log.access` is, whatever the level. Level and
//! access can change on reload; the format is fixed at start-up.

use std::io::IsTerminal;

use tracing::level_filters::LevelFilter;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::prelude::*;
use tracing_subscriber::{Registry, reload};

use crate::config::{LogConfig, LogFormat, LogLevel};

pub fn level_filter(level: LogLevel) -> LevelFilter {
    match level {
        LogLevel::Error => LevelFilter::ERROR,
        LogLevel::Warn => LevelFilter::WARN,
        LogLevel::Info => LevelFilter::INFO,
        LogLevel::Debug => LevelFilter::DEBUG,
        LogLevel::Trace => LevelFilter::TRACE,
    }
}

/// Libraries (hyper, h2) log at warn at most; ours at the configured level.
fn targets(log: &LogConfig) -> Targets {
    let level = level_filter(log.level);
    Targets::new()
        .with_default(level.min(LevelFilter::WARN))
        .with_target("balancer", level)
        .with_target("access", if log.access { LevelFilter::INFO } else { LevelFilter::OFF })
}

/// Changes the live log filter on reload.
pub struct LogHandle {
    filter: Option<reload::Handle<Targets, Registry>>,
    format: LogFormat,
}

impl LogHandle {
    /// Applies `log.level` and `log.access`; a changed `log.format` needs a restart.
    pub fn apply(&self, log: &LogConfig) {
        if let Some(h) = &self.filter {
            let _ = h.modify(|t| *t = targets(log));
        }
        if log.format != self.format {
            tracing::warn!("log.format changes take effect after a restart");
        }
    }
}

/// Installs the global subscriber.
pub fn init(log: &LogConfig) -> LogHandle {
    let (filter, handle) = reload::Layer::new(targets(log));
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let registry = tracing_subscriber::registry().with(filter);
    let result = match log.format {
        LogFormat::Json => registry.with(fmt.json().flatten_event(true)).try_init(),
        LogFormat::Text => registry.with(fmt.with_ansi(std::io::stderr().is_terminal())).try_init(),
    };
    if let Err(e) = result {
        eprintln!("balancer: logging was already set up: {e}");
        return LogHandle { filter: None, format: log.format };
    }
    LogHandle { filter: Some(handle), format: log.format }
}
