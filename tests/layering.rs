//! The modules of `src/` depend on each other in one direction only (README "Layout"):
//! `app -> admin -> reload -> server -> proxy -> runtime -> balance -> backend/limit ->
//! leaves`. This reads every source file and fails when a module names one at its own
//! level or above, so a cycle cannot come back unnoticed.

use std::path::Path;

/// Each top-level module's layer: a module may only use modules of a higher number.
const LAYERS: &[(&str, u32)] = &[
    ("app", 0),
    ("cli", 1),
    ("admin", 1),
    ("diff", 1),
    ("reload", 2),
    ("server", 3),
    ("proxy", 4),
    ("runtime", 5),
    ("balance", 6),
    ("cache", 6),
    ("backend", 7),
    ("limit", 7),
    ("discovery", 7),
    ("logging", 8),
    ("config", 9),
    ("tls", 10),
    ("path", 10),
    ("http1", 10),
    ("metrics", 10),
    ("timer", 11),
    ("worker", 10),
    ("memory", 10),
    ("notify", 10),
    ("otlp", 10),
    ("host", 11),
];

fn layer(module: &str) -> u32 {
    LAYERS
        .iter()
        .find(|(m, _)| *m == module)
        .map(|&(_, l)| l)
        .unwrap_or_else(|| panic!("module `{module}` has no layer: add it to LAYERS in tests/layering.rs"))
}

fn files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The modules named as `crate::NAME` in code (comments skipped).
fn uses(text: &str) -> Vec<String> {
    let mut names = Vec::new();
    for line in text.lines().filter(|l| !l.trim_start().starts_with("//")) {
        let mut rest = line;
        while let Some(at) = rest.find("crate::") {
            rest = &rest[at + "crate::".len()..];
            let name: String = rest.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
            if !name.is_empty() {
                names.push(name);
            }
        }
    }
    names
}

#[test]
fn dependencies_flow_one_way() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut all = Vec::new();
    files(&src, &mut all);
    let mut wrong = Vec::new();
    for file in &all {
        let rel = file.strip_prefix(&src).unwrap();
        let top = rel.components().next().unwrap().as_os_str().to_string_lossy().trim_end_matches(".rs").to_owned();
        if top == "main" || top == "lib" {
            continue;
        }
        let text = std::fs::read_to_string(file).unwrap();
        for used in uses(&text) {
            if used != top && layer(&used) <= layer(&top) {
                wrong.push(format!("{}: {top} uses {used}", rel.display()));
            }
        }
    }
    wrong.sort();
    wrong.dedup();
    assert!(wrong.is_empty(), "modules that name a module at or above their layer:\n{}", wrong.join("\n"));
}

#[test]
fn the_check_sees_a_violation() {
    assert_eq!(
        uses("use crate::server::h1;\n// crate::app in a comment\nlet x = crate::proxy::f();"),
        ["server", "proxy"]
    );
    assert!(layer("balance") < layer("backend"), "balance may use backend, not the reverse");
}
