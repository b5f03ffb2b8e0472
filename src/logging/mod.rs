//! Logs to stderr, as text or one JSON object per line: balancer's own lines through
//! `tracing`, access lines (target `access`, on whenever `log.access` is, whatever the
//! level) formatted by hand in [`access`]. Level and access can change on reload; the
//! format is fixed at start-up.
//!
//! Lines are written by a thread of their own (tracing-appender's non-blocking writer):
//! a request pays for formatting its access-log line, not for a write(2) under stderr's
//! lock; workers queue their access lines in batches (see [`access`]), and the thread
//! writes whatever has queued up in one go. Nothing is
//! dropped: past [`LINES_QUEUED`] waiting lines, loggers wait, as a blocking write would.

pub mod access;

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
    Targets::new().with_default(level.min(LevelFilter::WARN)).with_target("balancer", level)
}

/// Lines waiting for the writer thread before loggers wait for it: 50 ms of a busy
/// two-worker process. The slots are allocated and written up front (32 bytes each), so
/// this many is 128 KiB of the idle process (16,384 made it 512 KiB).
const LINES_QUEUED: usize = 4_096;

/// Changes the live log filter on reload; dropped, it writes out the lines still queued.
pub struct LogHandle {
    filter: Option<reload::Handle<Targets, Registry>>,
    format: LogFormat,
    _writer: Option<tracing_appender::non_blocking::WorkerGuard>,
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
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(false)
        .buffered_lines_limit(LINES_QUEUED)
        .thread_name("balancer-log")
        .finish(std::io::BufWriter::new(std::io::stderr()));
    let _ = access::SINK.set(access::Sink { writer: writer.clone(), format: log.format });
    let fmt = tracing_subscriber::fmt::layer().with_writer(writer);
    let registry = tracing_subscriber::registry().with(filter);
    let result = match log.format {
        LogFormat::Json => registry.with(fmt.json().flatten_event(true)).try_init(),
        LogFormat::Text => registry.with(fmt.with_ansi(std::io::stderr().is_terminal())).try_init(),
    };
    if let Err(e) = result {
        eprintln!("balancer: logging was already set up: {e}");
        return LogHandle { filter: None, format: log.format, _writer: None };
    }
    LogHandle { filter: Some(handle), format: log.format, _writer: Some(guard) }
}
