//! Live reload: a file edit, SIGHUP or `POST /reload` -> read and validate the file ->
//! re-apply the command-line overrides (the same `config::load` as start-up) -> build the
//! next runtime from the live one -> bind any new listener -> swap, all or nothing.
//!
//! One task owns everything a reload changes (listeners, admin listener, health checkers)
//! and handles one request at a time, so reloads never interleave and need no locks.
//! Requests in flight keep the runtime they started with.

pub mod watch;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::config::{self, ConfigSource};
use crate::discovery::Found;
use crate::logging::LogHandle;
use crate::metrics::LastReload;
use crate::runtime::{self, SharedRuntime};
use crate::server::Listeners;

/// What asked for a reload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Trigger {
    /// The watcher saw the file (or its directory) change, or the periodic check ran:
    /// reloads only if the file's content differs from what was last read.
    File,
    Signal,
    Admin,
}

impl Trigger {
    fn as_str(self) -> &'static str {
        match self {
            Trigger::File => "file change",
            Trigger::Signal => "SIGHUP",
            Trigger::Admin => "POST /reload",
        }
    }
}

/// One reload asked for, with where to send the outcome (if anyone waits for it).
pub struct Request {
    trigger: Trigger,
    reply: Option<oneshot::Sender<Result<u64, String>>>,
}

/// Asks the reloader for a reload. Cheap to clone.
#[derive(Clone, Debug)]
pub struct ReloadHandle(mpsc::Sender<Request>);

impl ReloadHandle {
    /// Reloads and waits: the new generation, or why nothing changed.
    pub async fn reload(&self, trigger: Trigger) -> Result<u64, String> {
        let (tx, rx) = oneshot::channel();
        self.0.send(Request { trigger, reply: Some(tx) }).await.map_err(|_| "balancer is shutting down".to_owned())?;
        rx.await.unwrap_or_else(|_| Err("balancer is shutting down".to_owned()))
    }

    /// Asks for a reload without waiting; dropped if one is already queued.
    pub fn nudge(&self, trigger: Trigger) {
        let _ = self.0.try_send(Request { trigger, reply: None });
    }
}

pub fn channel() -> (ReloadHandle, mpsc::Receiver<Request>) {
    let (tx, rx) = mpsc::channel(4);
    (ReloadHandle(tx), rx)
}

/// What the config file and the files it reads (certificates, keys, CAs) looked like
/// when last read, to ignore events that changed nothing.
#[derive(Clone, Debug, PartialEq, Eq)]
struct FileState {
    config: FileContent,
    /// A hash over every other file's content (or error).
    others: u64,
    /// Some file could not be read for reasons of balancer's own (out of descriptors).
    cannot_tell: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum FileContent {
    Content(u64),
    Missing,
    Unreadable(std::io::ErrorKind),
    CannotTell,
}

impl FileContent {
    fn read(path: &Path) -> FileContent {
        use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
        match std::fs::read(path) {
            Ok(bytes) => FileContent::Content(BuildHasherDefault::<DefaultHasher>::default().hash_one(&bytes)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => FileContent::Missing,
            // Out of file descriptors (EMFILE, ENFILE): nothing is known about the file.
            Err(e) if matches!(e.raw_os_error(), Some(23 | 24)) => FileContent::CannotTell,
            Err(e) => FileContent::Unreadable(e.kind()),
        }
    }
}

impl FileState {
    fn read(config: &Path, others: &[std::path::PathBuf]) -> FileState {
        use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
        let contents: Vec<FileContent> = others.iter().map(|p| FileContent::read(p)).collect();
        let config = FileContent::read(config);
        let cannot_tell = config == FileContent::CannotTell || contents.contains(&FileContent::CannotTell);
        FileState { config, others: BuildHasherDefault::<DefaultHasher>::default().hash_one(&contents), cannot_tell }
    }
}

/// Starts serving the admin endpoints on a bound listener, until the token is cancelled.
pub type SpawnAdmin = fn(std::net::TcpListener, SharedRuntime, ReloadHandle, CancellationToken);

/// The admin listener as a reload sees it.
pub struct AdminListener {
    /// The address as configured.
    pub addr: Option<SocketAddr>,
    /// Stops the one serving now.
    pub stop: CancellationToken,
    /// Serves it when a reload moves it (the admin module, handed in by the app: the
    /// admin listener triggers reloads, so reload does not name it).
    pub spawn: SpawnAdmin,
}

/// The state a reload changes, owned by the reload task.
pub struct Reloader {
    pub source: ConfigSource,
    pub runtime: SharedRuntime,
    pub listeners: Listeners,
    /// Cancels the current generation's health checkers.
    pub checks: CancellationToken,
    pub admin: AdminListener,
    pub log: LogHandle,
    pub handle: ReloadHandle,
    last_seen: FileState,
    /// A file was read once: from then on, a missing file is an error, not "no file".
    had_file: bool,
    /// Where the current generation's DNS task sends changes of backend addresses.
    found_tx: mpsc::Sender<Found>,
    found: mpsc::Receiver<Found>,
}

impl Reloader {
    pub fn new(
        source: ConfigSource,
        runtime: SharedRuntime,
        listeners: Listeners,
        checks: CancellationToken,
        admin: AdminListener,
        log: LogHandle,
        handle: ReloadHandle,
    ) -> Reloader {
        let last_seen = FileState::read(&source.path, &runtime.load().config.files);
        let had_file = matches!(last_seen.config, FileContent::Content(_));
        let (found_tx, found) = mpsc::channel(1);
        runtime.load().spawn_discovery(&checks, found_tx.clone());
        Reloader { source, runtime, listeners, checks, admin, log, handle, last_seen, had_file, found_tx, found }
    }

    /// Serves reload requests until `stop`; then hands itself back for the shutdown.
    pub async fn run(mut self, mut requests: mpsc::Receiver<Request>, stop: CancellationToken) -> Reloader {
        loop {
            let req = tokio::select! {
                _ = stop.cancelled() => return self,
                r = requests.recv() => match r {
                    Some(r) => r,
                    None => return self,
                },
                Some(found) = self.found.recv() => {
                    self.apply_addresses(found);
                    continue;
                }
            };
            let mut current = self.read_files();
            if req.trigger == Trigger::File {
                current = self.settle(current).await;
                if current == self.last_seen || current.cannot_tell {
                    continue;
                }
            }
            self.last_seen = current;
            let result = self.reload(req.trigger);
            if let Some(reply) = req.reply {
                let _ = reply.send(result);
            }
        }
    }

    /// Backend host names resolve to other addresses: the next runtime is the live one's
    /// config built again with them, same generation, nothing else touched (SPEC 12). A
    /// change found by an earlier generation's task is dropped: the new task looks again.
    fn apply_addresses(&mut self, found: Found) {
        let old = self.runtime.load_full();
        if found.generation != old.generation {
            return;
        }
        let next = Arc::new(runtime::build(old.config.clone(), Some(&old), old.generation, found.resolved));
        self.runtime.store(next.clone());
        next.spawn_health_checks(&self.checks, Some(&old));
    }

    fn read_files(&self) -> FileState {
        FileState::read(&self.source.path, &self.runtime.load().config.files)
    }

    /// A file seen changing may still be being written (truncated, half full): waits until
    /// it reads the same twice in a row, `watch::DEBOUNCE` apart, for up to a second.
    async fn settle(&self, mut current: FileState) -> FileState {
        for _ in 0..10 {
            if current == self.last_seen || current.cannot_tell {
                break;
            }
            tokio::time::sleep(watch::DEBOUNCE).await;
            let again = self.read_files();
            if again == current {
                break;
            }
            current = again;
        }
        current
    }

    fn reload(&mut self, trigger: Trigger) -> Result<u64, String> {
        crate::notify::reloading();
        let result = self.try_reload();
        // A failed reload leaves the old config serving: ready either way.
        crate::notify::ready();
        let metrics = self.runtime.load().metrics.clone();
        // The outcome first, the counters after: whoever sees a counter move can read why.
        *metrics.last_reload.lock().expect("last_reload lock") =
            LastReload::now(result.as_ref().map(|_| ()).map_err(Clone::clone));
        match &result {
            Ok(generation) => {
                metrics.reloads_success.fetch_add(1, Relaxed);
                tracing::info!(trigger = trigger.as_str(), generation, "config reloaded");
            }
            Err(error) => {
                metrics.reloads_failure.fetch_add(1, Relaxed);
                tracing::error!(trigger = trigger.as_str(), %error, "config reload failed; the running config stays in force");
            }
        }
        result
    }

    fn try_reload(&mut self) -> Result<u64, String> {
        let required = self.source.required || self.had_file;
        let loaded = config::load(&self.source.path, required, &self.source.overrides).map_err(|e| e.to_string())?;
        self.had_file |= self.last_seen.config != FileContent::Missing;
        let config = loaded.config;
        let old = self.runtime.load_full();

        // Everything that can fail happens before the swap.
        let listen = crate::server::listen_set(&config.server);
        let fresh = self.listeners.prepare(&listen).map_err(|e| e.to_string())?;
        let admin_listener = if config.admin != self.admin.addr {
            Some(crate::server::bind_single(config.admin.as_slice()).map_err(|e| e.to_string())?)
        } else {
            None
        };
        if config.server.workers != old.config.server.workers {
            tracing::warn!("server.workers changes take effect after a restart");
        }

        let next = Arc::new(runtime::build(config, Some(&old), old.generation + 1, old.resolved.clone()));
        self.runtime.store(next.clone());

        let server = &next.config.server;
        self.listeners.apply(&listen, fresh, server.shutdown_grace);
        self.listeners.set_max_connections(server.max_connections);
        self.checks.cancel();
        self.checks = CancellationToken::new();
        next.spawn_health_checks(&self.checks, None);
        next.spawn_limit_store(&self.checks);
        next.spawn_discovery(&self.checks, self.found_tx.clone());
        next.spawn_span_export();
        self.log.apply(&next.config.log);
        if let Some(mut bound) = admin_listener {
            self.admin.stop.cancel();
            let stop = CancellationToken::new();
            if let Some(l) = bound.pop() {
                (self.admin.spawn)(l, self.runtime.clone(), self.handle.clone(), stop.clone());
            } else {
                tracing::info!("admin listener turned off");
            }
            self.admin.addr = next.config.admin;
            self.admin.stop = stop;
        }
        Ok(next.generation)
    }
}
