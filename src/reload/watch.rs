//! Noticing config edits: the file's directory is watched (so a temp file renamed over the
//! config, or a Kubernetes `..data` symlink swap, is seen), events are debounced, and a
//! slow periodic check catches changes no event reports (a single file bind-mounted into
//! a container). The reloader compares contents, so a check that finds nothing new is free.
//! Only events that name a watched file (or the symlink it is reached through) wake it:
//! balancer's own log file beside the config must not make it re-read the config.

use std::collections::HashSet;
use std::ffi::OsString;
use std::path::{Component, Path, PathBuf};
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

/// The names in its directory whose change can change what `path` reads: its own, and
/// for a symlink (a Kubernetes ConfigMap's `balancer.toml -> ..data/balancer.toml`) the
/// first component of each hop that stays in the directory (`..data`).
fn names_behind(path: &Path) -> Vec<OsString> {
    let mut names: Vec<OsString> = path.file_name().map(OsString::from).into_iter().collect();
    let mut at = path.to_owned();
    for _ in 0..8 {
        let Ok(target) = std::fs::read_link(&at) else { break };
        if let Some(Component::Normal(first)) = target.components().next()
            && target.is_relative()
        {
            names.push(first.to_owned());
        }
        at = at.parent().map_or_else(|| target.clone(), |dir| dir.join(&target));
    }
    names
}

/// Watches the directories of `config` and of `others` (certificates, keys, CAs).
pub fn spawn(config: &Path, others: &[PathBuf], handle: ReloadHandle, stop: CancellationToken) {
    let dir_of = |path: &Path| match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => Path::new(".").to_owned(),
    };
    let files = || std::iter::once(config).chain(others.iter().map(PathBuf::as_path));
    let mut dirs: Vec<PathBuf> = files().map(dir_of).collect();
    dirs.sort();
    dirs.dedup();
    let watched: HashSet<OsString> = files().flat_map(names_behind).collect();
    let concerns_us =
        move |e: &notify::Event| e.paths.iter().any(|p| p.file_name().is_some_and(|n| watched.contains(n)));
    let (tx, mut events) = mpsc::channel::<()>(1);
    let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if event.is_ok_and(|e| may_change_content(&e.kind) && concerns_us(&e)) {
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

    #[test]
    fn a_symlinked_file_is_watched_through_its_links() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("..v1")).unwrap();
        std::fs::write(dir.path().join("..v1/balancer.toml"), "").unwrap();
        std::os::unix::fs::symlink("..v1", dir.path().join("..data")).unwrap();
        let link = dir.path().join("balancer.toml");
        std::os::unix::fs::symlink("..data/balancer.toml", &link).unwrap();
        let names = names_behind(&link);
        assert!(names.contains(&"balancer.toml".into()) && names.contains(&"..data".into()), "{names:?}");
        assert!(!names.contains(&"balancer.log".into()));
    }
}
