//! Noticing config edits: the file's directory is watched (so a temp file renamed over the
//! config, or a Kubernetes `..data` symlink swap, is seen), events are debounced, and a
//! slow periodic check catches changes no event reports (a single file bind-mounted into
//! a container). The reloader compares contents, so a check that finds nothing new is free.

use std::path::{Path, PathBuf};
use std::time::Duration;

use notify::event::{AccessKind, AccessMode};
use notify::{EventKind, RecursiveMode, Watcher};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{ReloadHandle, Trigger};

/// Events closer together than this are one edit.
pub const DEBOUNCE: Duration = Duration::from_millis(100);
/// How often the content is checked without any event.
pub const POLL_EVERY: Duration = Duration::from_secs(2);

/// Whether an event can mean new content. Opening or reading a file is not: the reloader
/// reads the config on every check, and counting that as an edit would re-read it forever.
fn may_change_content(kind: &EventKind) -> bool {
    match kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        EventKind::Access(_) => false,
        _ => true,
    }
}

/// Watches the directories of `config` and of `others` (certificates, keys, CAs).
pub fn spawn(config: &Path, others: &[PathBuf], handle: ReloadHandle, stop: CancellationToken) {
    let dir_of = |path: &Path| match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => Path::new(".").to_owned(),
    };
    let mut dirs: Vec<PathBuf> =
        std::iter::once(config).chain(others.iter().map(PathBuf::as_path)).map(dir_of).collect();
    dirs.sort();
    dirs.dedup();
    let (tx, mut events) = mpsc::channel::<()>(1);
    let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if event.is_ok_and(|e| may_change_content(&e.kind)) {
            let _ = tx.try_send(());
        }
    })
    .and_then(|mut w| {
        for dir in &dirs {
            w.watch(dir, RecursiveMode::NonRecursive)?;
        }
        Ok(w)
    });
    let watcher = match watcher {
        Ok(w) => Some(w),
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch the config's directories; checking the files every {}s instead", POLL_EVERY.as_secs());
            None
        }
    };
    tokio::spawn(async move {
        let _watcher = watcher;
        let mut poll = tokio::time::interval(POLL_EVERY);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                Some(()) = events.recv() => {
                    tokio::time::sleep(DEBOUNCE).await;
                    while events.try_recv().is_ok() {}
                    handle.nudge(Trigger::File);
                }
                _ = poll.tick() => handle.nudge(Trigger::File),
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use notify::event::{CreateKind, ModifyKind};

    #[test]
    fn reads_are_not_edits() {
        assert!(!may_change_content(&EventKind::Access(AccessKind::Open(AccessMode::Any))));
        assert!(!may_change_content(&EventKind::Access(AccessKind::Close(AccessMode::Read))));
        assert!(may_change_content(&EventKind::Access(AccessKind::Close(AccessMode::Write))));
        assert!(may_change_content(&EventKind::Modify(ModifyKind::Any)));
        assert!(may_change_content(&EventKind::Create(CreateKind::File)));
    }
}
