//! Reading the file and merging command-line overrides into it, keeping every value's
//! position so any error can name `file:line:col` (or the flag that set the value).

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml::Spanned;
use toml::de::{DeTable, DeValue};

use super::ConfigError;
use super::raw::RawConfig;

/// Values set on the command line, applied over the file at start-up and after every
/// reload, in this order: `--listen`, `--backend`, `--strategy`, `--admin`, `--log-*`,
/// then each `--set` in the order given.
#[derive(Clone, Debug, Default)]
pub struct Overrides {
    pub listen: Vec<String>,
    pub backends: Vec<String>,
    pub strategy: Option<String>,
    pub admin: Option<String>,
    pub log_level: Option<String>,
    pub log_format: Option<String>,
    /// `KEY=VALUE` pairs from `--set`, split at the first `=`.
    pub set: Vec<(String, String)>,
}

/// Where a value came from, for error messages.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Location {
    /// A position in the config file (1-based line and column).
    File { path: PathBuf, line: usize, col: usize },
    /// A key whose value is not written anywhere (a default); `path` is `None` when
    /// there is no config file at all.
    Key { path: Option<PathBuf>, key: String },
    /// A command-line flag.
    Flag(String),
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Location::File { path, line, col } => write!(f, "{}:{line}:{col}", path.display()),
            Location::Key { path: Some(path), key } => write!(f, "{}: {key}", path.display()),
            Location::Key { path: None, key } => write!(f, "(no config file): {key}"),
            Location::Flag(flag) => f.write_str(flag),
        }
    }
}

/// Spans at or past this offset mark a value set by override number `span.start - BASE`.
const OVERRIDE_SPAN_BASE: usize = 1 << 40;

/// One edit of the document, in the TOML syntax of its value.
struct Edit {
    target: Target,
    snippet: String,
    origin: String,
}

enum Target {
    Key(Vec<String>),
    BackendsOfOnlyUpstream,
    StrategyOfEveryUpstream,
}

impl Overrides {
    fn edits(&self) -> Vec<Edit> {
        let mut edits = Vec::new();
        let key = |k: &str| Target::Key(k.split('.').map(str::to_owned).collect());
        if !self.listen.is_empty() {
            edits.push(Edit {
                target: key("server.listen"),
                snippet: string_array(&self.listen),
                origin: format!("--listen {}", self.listen.join(" --listen ")),
            });
        }
        if !self.backends.is_empty() {
            edits.push(Edit {
                target: Target::BackendsOfOnlyUpstream,
                snippet: string_array(&self.backends),
                origin: format!("--backend {}", self.backends.join(" --backend ")),
            });
        }
        if let Some(s) = &self.strategy {
            edits.push(Edit {
                target: Target::StrategyOfEveryUpstream,
                snippet: toml_string(s),
                origin: format!("--strategy {s}"),
            });
        }
        let mut simple = |k: &str, v: &Option<String>, flag: &str| {
            if let Some(v) = v {
                edits.push(Edit { target: key(k), snippet: toml_string(v), origin: format!("{flag} {v}") });
            }
        };
        simple("admin.listen", &self.admin, "--admin");
        simple("log.level", &self.log_level, "--log-level");
        simple("log.format", &self.log_format, "--log-format");
        for (k, v) in &self.set {
            // A VALUE that is not valid TOML is taken as a plain string.
            let snippet = if DeValue::parse(v).is_ok() { v.clone() } else { toml_string(v) };
            edits.push(Edit { target: key(k), snippet, origin: format!("--set {k}={v}") });
        }
        edits
    }
}

fn toml_string(s: &str) -> String {
    toml::Value::String(s.to_owned()).to_string()
}

fn string_array(items: &[String]) -> String {
    let quoted: Vec<String> = items.iter().map(|s| toml_string(s)).collect();
    format!("[{}]", quoted.join(", "))
}

/// The file's text (empty when there is no file) and where it came from.
pub struct Source {
    pub path: PathBuf,
    pub text: String,
    /// False when the (optional) file does not exist and `text` is empty.
    pub exists: bool,
}

impl Source {
    /// Reads `path`; a missing file is an error only when `required`.
    pub fn read(path: &Path, required: bool) -> Result<Source, ConfigError> {
        match std::fs::read_to_string(path) {
            Ok(text) => Ok(Source { path: path.to_owned(), text, exists: true }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => {
                Ok(Source { path: path.to_owned(), text: String::new(), exists: false })
            }
            Err(source) => Err(ConfigError::Read { path: path.to_owned(), source }),
        }
    }

    /// Parses the text, applies the overrides and deserialises the result.
    pub fn merge(&self, overrides: &Overrides) -> Result<Merged, ConfigError> {
        let edits = overrides.edits();
        let mut parsed: Vec<Spanned<DeValue<'_>>> = Vec::with_capacity(edits.len());
        for (i, edit) in edits.iter().enumerate() {
            let value = DeValue::parse(&edit.snippet).map_err(|e| ConfigError::Invalid {
                location: Location::Flag(edit.origin.clone()),
                message: e.message().to_owned(),
            })?;
            parsed.push(respan(value, marker(i)));
        }
        let mut root = DeTable::parse(&self.text).map_err(|e| self.error_at(e.span(), e.message(), &edits))?;
        for (edit, value) in edits.iter().zip(parsed) {
            apply(root.get_mut(), &edit.target, value)
                .map_err(|message| ConfigError::Invalid { location: Location::Flag(edit.origin.clone()), message })?;
        }
        let file = self.exists.then(|| self.path.clone());
        let index = KeyIndex::build(root.get_ref(), &self.text, &self.path, file, &edits);
        let raw = RawConfig::deserialize(toml::de::Deserializer::from(root))
            .map_err(|e| self.error_at(e.span(), e.message(), &edits))?;
        Ok(Merged { raw, index })
    }

    fn error_at(&self, span: Option<Range<usize>>, message: &str, edits: &[Edit]) -> ConfigError {
        let location = match span {
            Some(span) => span_location(span, &Lines::new(&self.text), &self.path, edits),
            None => Location::Key { path: self.exists.then(|| self.path.clone()), key: String::from("(top level)") },
        };
        ConfigError::Invalid { location, message: message.trim().to_owned() }
    }
}

fn marker(i: usize) -> Range<usize> {
    OVERRIDE_SPAN_BASE + i..OVERRIDE_SPAN_BASE + i + 1
}

fn span_location(span: Range<usize>, lines: &Lines<'_>, path: &Path, edits: &[Edit]) -> Location {
    if span.start >= OVERRIDE_SPAN_BASE {
        let origin = edits.get(span.start - OVERRIDE_SPAN_BASE).map(|e| e.origin.clone());
        return Location::Flag(origin.unwrap_or_else(|| "command line".into()));
    }
    let (line, col) = lines.line_col(span.start);
    Location::File { path: path.to_owned(), line, col }
}

/// Where each line of a text starts: a byte offset becomes line:col by a binary search,
/// not a scan from the top (the key index locates every key of a 10,000-backend file).
struct Lines<'t> {
    text: &'t str,
    starts: Vec<usize>,
}

impl<'t> Lines<'t> {
    fn new(text: &'t str) -> Lines<'t> {
        let starts = std::iter::once(0).chain(text.match_indices('\n').map(|(i, _)| i + 1)).collect();
        Lines { text, starts }
    }

    /// 1-based line and column (in characters) of byte offset `at`.
    fn line_col(&self, at: usize) -> (usize, usize) {
        let at = at.min(self.text.len());
        let line = self.starts.partition_point(|&start| start <= at);
        let start = self.starts[line - 1];
        (line, self.text[start..at].chars().count() + 1)
    }
}

/// Gives every span inside an override value the override's marker span.
fn respan<'i>(value: Spanned<DeValue<'i>>, span: Range<usize>) -> Spanned<DeValue<'i>> {
    let inner = match value.into_inner() {
        DeValue::Array(mut items) => {
            for item in items.iter_mut() {
                let taken = std::mem::replace(item, Spanned::new(0..0, DeValue::Boolean(false)));
                *item = respan(taken, span.clone());
            }
            DeValue::Array(items)
        }
        DeValue::Table(table) => {
            let mut out = DeTable::new();
            for (k, v) in table {
                out.insert(Spanned::new(span.clone(), k.into_inner()), respan(v, span.clone()));
            }
            DeValue::Table(out)
        }
        other => other,
    };
    Spanned::new(span, inner)
}

fn apply<'i>(root: &mut DeTable<'i>, target: &Target, value: Spanned<DeValue<'i>>) -> Result<(), String> {
    match target {
        Target::Key(path) => set_path(root, path, value),
        Target::BackendsOfOnlyUpstream => {
            let span = value.span();
            let ups = table_entry(root, "upstreams", span.clone())?;
            let names: Vec<String> = ups.keys().map(|k| k.get_ref().to_string()).collect();
            let name = match names.as_slice() {
                [] => "default".to_owned(),
                [one] => one.clone(),
                many => {
                    return Err(format!(
                        "--backend replaces the backends of the only upstream, but the config has {} ({})",
                        many.len(),
                        many.join(", ")
                    ));
                }
            };
            let up = table_entry(ups, &name, span)?;
            up.insert(Spanned::new(value.span(), "backends".into()), value);
            Ok(())
        }
        Target::StrategyOfEveryUpstream => {
            let ups = table_entry(root, "upstreams", value.span())?;
            for (_, up) in ups.iter_mut() {
                if let DeValue::Table(t) = up.get_mut() {
                    t.insert(Spanned::new(value.span(), "strategy".into()), value.clone());
                }
            }
            Ok(())
        }
    }
}

/// Sets the dotted `path` in `table`; numeric segments index into lists (`routes.0.upstream`).
fn set_path<'i>(table: &mut DeTable<'i>, path: &[String], value: Spanned<DeValue<'i>>) -> Result<(), String> {
    let (first, rest) = path.split_first().ok_or("empty key")?;
    if first.is_empty() {
        return Err("empty key segment".into());
    }
    if rest.is_empty() {
        table.insert(Spanned::new(value.span(), first.clone().into()), value);
        return Ok(());
    }
    let child = table_entry_value(table, first, value.span());
    set_in_value(child, first, rest, value)
}

fn set_in_value<'i>(
    node: &mut DeValue<'i>,
    at: &str,
    rest: &[String],
    value: Spanned<DeValue<'i>>,
) -> Result<(), String> {
    match node {
        DeValue::Table(t) => set_path(t, rest, value),
        DeValue::Array(items) => {
            let idx: usize = rest[0].parse().map_err(|_| format!("`{at}` is a list: index it with a number"))?;
            let len = items.len();
            let item = items.get_mut(idx).ok_or_else(|| format!("`{at}` has {len} entries, no index {idx}"))?;
            match &rest[1..] {
                [] => {
                    *item = value;
                    Ok(())
                }
                deeper => set_in_value(item.get_mut(), &format!("{at}.{idx}"), deeper, value),
            }
        }
        _ => Err(format!("`{at}` is not a table")),
    }
}

fn table_entry_value<'t, 'i>(table: &'t mut DeTable<'i>, key: &str, span: Range<usize>) -> &'t mut DeValue<'i> {
    if table.get(key).is_none() {
        table.insert(
            Spanned::new(span.clone(), key.to_owned().into()),
            Spanned::new(span, DeValue::Table(DeTable::new())),
        );
    }
    table.get_mut(key).expect("present").get_mut()
}

fn table_entry<'t, 'i>(
    table: &'t mut DeTable<'i>,
    key: &str,
    span: Range<usize>,
) -> Result<&'t mut DeTable<'i>, String> {
    match table_entry_value(table, key, span) {
        DeValue::Table(t) => Ok(t),
        _ => Err(format!("`{key}` is not a table")),
    }
}

/// The location of every key of the merged document, for validation errors found after
/// deserialisation.
pub struct KeyIndex {
    file: Option<PathBuf>,
    entries: Vec<(String, Location)>,
}

impl KeyIndex {
    fn build(root: &DeTable<'_>, text: &str, path: &Path, file: Option<PathBuf>, edits: &[Edit]) -> KeyIndex {
        let mut entries = Vec::new();
        let lines = Lines::new(text);
        walk(root, String::new(), &mut |key, span| entries.push((key, span_location(span, &lines, path, edits))));
        KeyIndex { file, entries }
    }

    /// Where the value at `key` (dotted, `[i]` for list items) was written.
    pub fn locate(&self, key: &str) -> Location {
        // The longest written prefix of the key: a default inside a written table points
        // at that table.
        let mut probe = key.to_owned();
        loop {
            if let Some((_, loc)) = self.entries.iter().find(|(k, _)| *k == probe) {
                return loc.clone();
            }
            match probe.rfind(['.', '[']) {
                Some(i) => probe.truncate(i),
                None => {
                    return Location::Key { path: self.file.clone(), key: key.to_owned() };
                }
            }
        }
    }
}

fn walk(table: &DeTable<'_>, prefix: String, out: &mut dyn FnMut(String, Range<usize>)) {
    for (k, v) in table.iter() {
        let key = if prefix.is_empty() { k.get_ref().to_string() } else { format!("{prefix}.{}", k.get_ref()) };
        walk_value(v, key, out);
    }
}

fn walk_value(v: &Spanned<DeValue<'_>>, key: String, out: &mut dyn FnMut(String, Range<usize>)) {
    out(key.clone(), v.span());
    match v.get_ref() {
        DeValue::Table(t) => walk(t, key, out),
        DeValue::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                walk_value(item, format!("{key}[{i}]"), out);
            }
        }
        _ => {}
    }
}

/// The merged document, deserialised, with the index to locate its keys.
pub struct Merged {
    pub raw: RawConfig,
    pub index: KeyIndex,
}
