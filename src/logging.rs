//! Logs through `tracing` to stderr, as text or one JSON object per line. The access log
//! is the `access` target, on whenever `log.access` is, whatever the level.

use std::io::IsTerminal;

use tracing::level_filters::LevelFilter;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::prelude::*;

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

/// Installs the global subscriber. Libraries (hyper, h2) log at warn at most.
pub fn init(log: &LogConfig) {
    let level = level_filter(log.level);
    let filter = Targets::new()
        .with_default(level.min(LevelFilter::WARN))
        .with_target("balancer", level)
        .with_target(
            "access",
            if log.access {
                LevelFilter::INFO
            } else {
                LevelFilter::OFF
            },
        );
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let registry = tracing_subscriber::registry().with(filter);
    let result = match log.format {
        LogFormat::Json => registry.with(fmt.json().flatten_event(true)).try_init(),
        LogFormat::Text => registry
            .with(fmt.with_ansi(std::io::stderr().is_terminal()))
            .try_init(),
    };
    if let Err(e) = result {
        eprintln!("balancer: logging was already set up: {e}");
    }
}
