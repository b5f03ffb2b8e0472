//! Replays the fuzz corpus on stable, in the ordinary `cargo test`: every file in
//! `fuzz/corpus/<target>/` (the seeds) and `fuzz/regressions/<target>/` (inputs that
//! once made a target fail) goes through the same harness as the fuzz target of that
//! name (`tests/fuzz_harness/mod.rs`), which must not panic. The fuzzing itself needs
//! nightly: see `fuzz/run.sh`.

mod fuzz_harness;

use std::path::{Path, PathBuf};

fn inputs(target: &str) -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut files = Vec::new();
    for dir in ["corpus", "regressions"] {
        let Ok(entries) = std::fs::read_dir(root.join(dir).join(target)) else { continue };
        files.extend(entries.map(|e| e.unwrap().path()).filter(|p| p.is_file()));
    }
    files.sort();
    files
}

/// Runs `harness` on every input of `target`; reports all failing files at once.
fn replay(target: &str, harness: fn(&[u8])) {
    let files = inputs(target);
    assert!(!files.is_empty(), "no seed corpus in fuzz/corpus/{target}/");
    let mut failures = Vec::new();
    for file in &files {
        let data = std::fs::read(file).unwrap();
        if let Err(panic) = std::panic::catch_unwind(|| harness(&data)) {
            let message = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                .unwrap_or_default();
            failures.push(format!("{}: {message}", file.display()));
        }
    }
    assert!(failures.is_empty(), "{} of {} inputs failed:\n{}", failures.len(), files.len(), failures.join("\n"));
    eprintln!("{target}: {} inputs replayed", files.len());
}

#[test]
fn config_parse_corpus() {
    replay("config_parse", fuzz_harness::config_parse);
}

#[test]
fn request_head_corpus() {
    replay("request_head", fuzz_harness::request_head);
}

#[test]
fn framing_corpus() {
    replay("framing", fuzz_harness::framing);
}

#[test]
fn xff_client_ip_corpus() {
    replay("xff_client_ip", fuzz_harness::xff_client_ip);
}
