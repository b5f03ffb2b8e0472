//! The command line and the config file as a user meets them (SPEC sections 1 and 2):
//! `--check`, `--print-config`, `--set`, the shortcut flags, errors with `file:line:col`,
//! exit codes, running with no config file, and `BALANCER_CONFIG`.
mod common;
use common::*;

use std::path::Path;
use std::process::{Command, Stdio};

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

/// A temp dir holding `balancer.toml` with `text` (the default config path when the binary
/// runs with this dir as cwd, so errors read `balancer.toml:LINE:COL`).
fn dir_with(text: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("balancer.toml"), text).unwrap();
    dir
}

/// Runs `balancer --check` in a dir whose `balancer.toml` is `text`.
fn check(text: &str) -> (i32, String, String) {
    let dir = dir_with(text);
    run_cli(&["--check"], dir.path())
}

/// Runs `balancer --print-config ARGS` in `dir`, expects exit 0 and parses stdout as TOML.
fn print_config(args: &[&str], dir: &Path) -> toml::Table {
    let mut all = vec!["--print-config"];
    all.extend_from_slice(args);
    let (code, out, err) = run_cli(&all, dir);
    assert_eq!(code, 0, "--print-config {args:?} failed: stdout={out:?} stderr={err:?}");
    toml::from_str::<toml::Table>(&out).unwrap_or_else(|e| panic!("--print-config output is not TOML ({e}):\n{out}"))
}

/// 1-based (line, column) of the first occurrence of `needle` in `text`.
fn pos_of(text: &str, needle: &str) -> (usize, usize) {
    let off = text.find(needle).unwrap_or_else(|| panic!("{needle:?} not in test config"));
    let before = &text[..off];
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().unwrap().chars().count() + 1;
    (line, col)
}

/// Asserts that `stderr` is exactly one line `error: balancer.toml:LINE:COL: MESSAGE` with
/// the given line, a column among `cols` (any column of that line when `cols` is empty),
/// and a message that contains every one of `mentions`.
fn assert_error_at(code: i32, stdout: &str, stderr: &str, text: &str, line: usize, cols: &[usize], mentions: &[&str]) {
    assert_eq!(code, 1, "expected exit 1; stdout={stdout:?} stderr={stderr:?}");
    let msg = stderr.trim_end();
    assert_eq!(msg.lines().count(), 1, "expected one error line, got: {stderr:?}");
    let prefix = format!("error: balancer.toml:{line}:");
    let rest = msg
        .strip_prefix(&prefix)
        .unwrap_or_else(|| panic!("expected the error to start with {prefix:?}, got: {msg:?}"));
    let (col, message) =
        rest.split_once(": ").unwrap_or_else(|| panic!("expected `{prefix}COL: message`, got: {msg:?}"));
    let col: usize = col.parse().unwrap_or_else(|_| panic!("column {col:?} is not a number in: {msg:?}"));
    if cols.is_empty() {
        let len = text.lines().nth(line - 1).map_or(0, |l| l.chars().count());
        assert!((1..=len + 1).contains(&col), "column {col} is outside line {line} (len {len}): {msg:?}");
    } else {
        assert!(cols.contains(&col), "expected column in {cols:?}, got {col}: {msg:?}");
    }
    for m in mentions {
        assert!(message.contains(m), "expected the message to mention {m:?}, got: {msg:?}");
    }
}

fn get_path<'a>(t: &'a toml::Table, path: &str) -> &'a toml::Value {
    let mut parts = path.split('.');
    let mut v = t.get(parts.next().unwrap()).unwrap_or_else(|| panic!("{path} missing in {t:#?}"));
    for p in parts {
        v = match p.parse::<usize>() {
            Ok(i) => v.get(i),
            Err(_) => v.get(p),
        }
        .unwrap_or_else(|| panic!("{path} missing (at {p}) in {t:#?}"));
    }
    v
}

fn str_at<'a>(t: &'a toml::Table, path: &str) -> &'a str {
    get_path(t, path).as_str().unwrap_or_else(|| panic!("{path} is not a string: {:?}", get_path(t, path)))
}

fn strings_at(t: &toml::Table, path: &str) -> Vec<String> {
    match get_path(t, path) {
        toml::Value::String(s) => vec![s.clone()],
        toml::Value::Array(a) => {
            a.iter().map(|v| v.as_str().unwrap_or_else(|| panic!("{path}: {v:?} is not a string")).to_owned()).collect()
        }
        other => panic!("{path} is not a string or list: {other:?}"),
    }
}

/// A backend list entry's URL (`"url"` or `{ url = "...", weight = N }`).
fn backend_urls(t: &toml::Table, path: &str) -> Vec<String> {
    get_path(t, path)
        .as_array()
        .unwrap_or_else(|| panic!("{path} is not a list"))
        .iter()
        .map(|b| match b {
            toml::Value::String(s) => s.clone(),
            toml::Value::Table(t) => t["url"].as_str().unwrap().to_owned(),
            other => panic!("bad backend entry {other:?}"),
        })
        .collect()
}

const VALID: &str = r#"[server]
listen = ["127.0.0.1:18080"]

[admin]
listen = "off"

[upstreams.app]
backends = ["http://127.0.0.1:8000", { url = "http://127.0.0.1:8001", weight = 2 }]
"#;

// ---------------------------------------------------------------------------------------
// 1. --check on a valid file
// ---------------------------------------------------------------------------------------

#[test]
fn check_valid_config_prints_summary_and_exits_0() {
    let (code, out, err) = check(VALID);
    assert_eq!(code, 0, "stdout={out:?} stderr={err:?}");
    assert!(err.trim().is_empty(), "--check on a valid file wrote to stderr: {err:?}");
    assert!(out.contains("app"), "summary does not name upstream app: {out}");
    assert!(out.contains("http://127.0.0.1:8000"), "summary lacks backend 8000: {out}");
    assert!(out.contains("http://127.0.0.1:8001"), "summary lacks backend 8001: {out}");
    assert!(out.contains("127.0.0.1:18080"), "summary lacks the listen address: {out}");
}

#[test]
fn check_with_overrides_validates_the_effective_config() {
    // The file alone is valid; the override makes the effective config invalid, and a
    // file that is invalid alone is fixed by an override.
    let dir = dir_with(VALID);
    let (code, out, err) = run_cli(&["--check", "--set", "server.max_connections=0"], dir.path());
    assert_eq!(code, 1, "stdout={out:?} stderr={err:?}");
    assert!(err.starts_with("error: --set server.max_connections=0:"), "{err:?}");

    let broken = VALID.replace("127.0.0.1:18080", "nowhere");
    let dir = dir_with(&broken);
    let (code, out, err) = run_cli(&["--check", "-l", "127.0.0.1:18081"], dir.path());
    assert_eq!(code, 0, "stdout={out:?} stderr={err:?}");
    assert!(out.contains("127.0.0.1:18081"), "{out}");
}

// ---------------------------------------------------------------------------------------
// 2. --check errors point at file:line:col
// ---------------------------------------------------------------------------------------

#[test]
fn check_unknown_key_points_at_the_key() {
    let text =
        "[server]\nlisten_addr = \"127.0.0.1:8080\"\n\n[upstreams.app]\nbackends = [\"http://127.0.0.1:8000\"]\n";
    let (line, col) = pos_of(text, "listen_addr");
    assert_eq!((line, col), (2, 1));
    let (code, out, err) = check(text);
    assert_error_at(code, &out, &err, text, line, &[col], &["listen_addr"]);
}

#[test]
fn check_unknown_key_in_nested_table_points_at_the_key() {
    let text = "[upstreams.app]\nbackends = [\"http://127.0.0.1:8000\"]\n\n[upstreams.app.health_check]\npath = \"/healthz\"\n  intervall = \"2s\"\n";
    let (line, col) = pos_of(text, "intervall");
    let (code, out, err) = check(text);
    assert_error_at(code, &out, &err, text, line, &[col], &["intervall"]);
}

#[test]
fn check_bad_strategy_names_value_and_alternatives() {
    let text = "[admin]\nlisten = \"off\"\n\n[upstreams.app]\nbackends = [\"http://127.0.0.1:8000\"]\nstrategy = \"round-robbin\"\n";
    let (line, key_col) = pos_of(text, "strategy =");
    let (_, val_col) = pos_of(text, "\"round-robbin\"");
    let (code, out, err) = check(text);
    assert_error_at(
        code,
        &out,
        &err,
        text,
        line,
        &[key_col, val_col],
        &["round-robbin", "round-robin", "least-connections"],
    );
}

#[test]
fn check_route_to_missing_upstream_points_at_upstream_value() {
    let text = "[upstreams.app]\nbackends = [\"http://127.0.0.1:8000\"]\n\n[[routes]]\npath_prefix = \"/api\"\nupstream = \"missing\"\n";
    let (line, key_col) = pos_of(text, "upstream = \"missing\"");
    let (_, val_col) = pos_of(text, "\"missing\"");
    let (code, out, err) = check(text);
    assert_error_at(code, &out, &err, text, line, &[key_col, val_col], &["missing"]);
}

#[test]
fn check_route_in_second_routes_entry_points_at_that_entry() {
    let text = "[upstreams.app]\nbackends = [\"http://127.0.0.1:8000\"]\n\n[[routes]]\npath_prefix = \"/api\"\nupstream = \"app\"\n\n[[routes]]\npath_prefix = \"/web\"\nupstream = \"wbe\"\n";
    let (line, key_col) = pos_of(text, "upstream = \"wbe\"");
    let (_, val_col) = pos_of(text, "\"wbe\"");
    let (code, out, err) = check(text);
    assert_error_at(code, &out, &err, text, line, &[key_col, val_col], &["wbe"]);
}

#[test]
fn check_empty_backend_list() {
    let text = "[server]\nlisten = \"127.0.0.1:8080\"\n\n[upstreams.app]\nbackends = []\n";
    let (line, key_col) = pos_of(text, "backends");
    let (_, val_col) = pos_of(text, "[]");
    let (code, out, err) = check(text);
    assert_error_at(code, &out, &err, text, line, &[key_col, val_col], &["backend"]);
}

#[test]
fn check_weight_zero_points_at_that_backend() {
    let text = "[upstreams.app]\nbackends = [\n  \"http://127.0.0.1:8000\",\n  { url = \"http://127.0.0.1:8001\", weight = 0 },\n]\n";
    let (line, entry_col) = pos_of(text, "{ url");
    let (_, key_col) = pos_of(text, "weight = 0");
    let (_, val_col) = pos_of(text, "0 }");
    let (code, out, err) = check(text);
    assert_error_at(code, &out, &err, text, line, &[entry_col, key_col, val_col], &["weight"]);
}

#[test]
fn check_bad_backend_url_names_the_url() {
    let text = "[upstreams.app]\nbackends = [\n  \"http://127.0.0.1:8000\",\n  \"127.0.0.1:8001/x\",\n]\n";
    let (line, col) = pos_of(text, "\"127.0.0.1:8001/x\"");
    let (code, out, err) = check(text);
    assert_error_at(code, &out, &err, text, line, &[col], &["127.0.0.1:8001/x"]);
}

#[test]
fn check_unparsable_listen_address() {
    let text = "[server]\nworkers = 1\nlisten = \"localhost:eighty\"\n\n[upstreams.app]\nbackends = [\"http://127.0.0.1:8000\"]\n";
    let (line, key_col) = pos_of(text, "listen =");
    let (_, val_col) = pos_of(text, "\"localhost:eighty\"");
    let (code, out, err) = check(text);
    assert_error_at(code, &out, &err, text, line, &[key_col, val_col], &["localhost:eighty"]);
}

#[test]
fn check_unparsable_listen_address_in_list() {
    let text = "[server]\nlisten = [\n  \"127.0.0.1:8080\",\n  \"127.0.0.1:99999\",\n]\n\n[upstreams.app]\nbackends = [\"http://127.0.0.1:8000\"]\n";
    let (line, col) = pos_of(text, "\"127.0.0.1:99999\"");
    let (code, out, err) = check(text);
    assert_error_at(code, &out, &err, text, line, &[col], &["127.0.0.1:99999"]);
}

#[test]
fn check_bad_duration_string() {
    let text =
        "[timeouts]\nconnect = \"2s\"\nidle = \"soon\"\n\n[upstreams.app]\nbackends = [\"http://127.0.0.1:8000\"]\n";
    let (line, key_col) = pos_of(text, "idle =");
    let (_, val_col) = pos_of(text, "\"soon\"");
    let (code, out, err) = check(text);
    assert_error_at(code, &out, &err, text, line, &[key_col, val_col], &["soon"]);
}

/// A duration too long for a clock reading (a deadline now + it would overflow and
/// panic the worker serving the first connection) is refused where it is written.
#[test]
fn check_absurdly_long_duration_is_refused() {
    let text = "[timeouts]\nidle = \"500000000000y\"\n\n[upstreams.app]\nbackends = [\"http://127.0.0.1:8000\"]\n";
    let (line, key_col) = pos_of(text, "idle =");
    let (_, val_col) = pos_of(text, "\"500000000000y\"");
    let (code, out, err) = check(text);
    assert_error_at(code, &out, &err, text, line, &[key_col, val_col], &["500000000000y", "too long"]);
    // A long but sane one is fine.
    let (code, out, err) = check(&text.replace("500000000000y", "10y"));
    assert_eq!(code, 0, "stdout={out:?} stderr={err:?}");
}

#[test]
fn check_toml_syntax_error_points_at_the_line() {
    let text =
        "[server]\nworkers = 1\nmax_connections = = 5\n\n[upstreams.app]\nbackends = [\"http://127.0.0.1:8000\"]\n";
    let (line, _) = pos_of(text, "max_connections = = 5");
    let (code, out, err) = check(text);
    assert_error_at(code, &out, &err, text, line, &[], &[]);
}

#[test]
fn check_config_with_no_upstreams_fails() {
    let text = "[server]\nlisten = \"127.0.0.1:8080\"\n";
    let (code, out, err) = check(text);
    assert_eq!(code, 1, "stdout={out:?} stderr={err:?}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err:?}");
    assert!(err.starts_with("error: balancer.toml"), "{err:?}");
    assert!(err.contains("upstream"), "{err:?}");
}

// ---------------------------------------------------------------------------------------
// 3. --set on dotted keys
// ---------------------------------------------------------------------------------------

const TWO_UPSTREAMS: &str = r#"[server]
listen = "127.0.0.1:18080"
max_connections = 100

[admin]
listen = "off"

[timeouts]
connect = "3s"

[upstreams.app]
backends = ["http://127.0.0.1:8000"]

[upstreams.other]
backends = ["http://127.0.0.1:9000"]

[[routes]]
path_prefix = "/"
upstream = "app"
"#;

#[test]
fn set_overrides_dotted_keys() {
    let dir = dir_with(TWO_UPSTREAMS);
    let t = print_config(
        &[
            "--set",
            "timeouts.connect=1s",
            "--set",
            "server.max_connections=5000",
            "--set",
            "upstreams.app.strategy=least-connections",
            "--set",
            "routes.0.upstream=other",
        ],
        dir.path(),
    );
    assert_eq!(str_at(&t, "timeouts.connect"), "1s", "{t:#?}");
    assert_eq!(get_path(&t, "server.max_connections").as_integer(), Some(5000), "{t:#?}");
    assert_eq!(str_at(&t, "upstreams.app.strategy"), "least-connections", "{t:#?}");
    assert_eq!(str_at(&t, "upstreams.other.strategy"), "round-robin", "{t:#?}");
    assert_eq!(str_at(&t, "routes.0.upstream"), "other", "{t:#?}");
    // Untouched keys keep the file's values.
    assert_eq!(strings_at(&t, "server.listen"), vec!["127.0.0.1:18080"]);
    assert_eq!(backend_urls(&t, "upstreams.app.backends"), vec!["http://127.0.0.1:8000"]);
}

#[test]
fn set_applies_in_check_too() {
    let dir = dir_with(TWO_UPSTREAMS);
    let (code, out, err) = run_cli(&["--check", "--set", "upstreams.app.strategy=least-connections"], dir.path());
    assert_eq!(code, 0, "stdout={out:?} stderr={err:?}");
    let app_line = out.lines().find(|l| l.contains("app") && l.contains("8000")).unwrap_or_else(|| panic!("{out}"));
    assert!(app_line.contains("least-connections"), "{out}");
}

#[test]
fn set_later_flag_wins_and_creates_missing_tables() {
    let dir = dir_with(TWO_UPSTREAMS);
    let t = print_config(
        &[
            "--set",
            "timeouts.idle=5s",
            "--set",
            "timeouts.idle=7s",
            "--set",
            "upstreams.app.timeouts.upstream_header=120s",
            "--set",
            "rate_limits.per_ip.rate=10",
            "--set",
            "rate_limits.per_ip.per=1s",
        ],
        dir.path(),
    );
    assert_eq!(str_at(&t, "timeouts.idle"), "7s");
    assert!(matches!(str_at(&t, "upstreams.app.timeouts.upstream_header"), "120s" | "2m"), "{t:#?}");
    assert_eq!(get_path(&t, "rate_limits.per_ip.rate").as_integer(), Some(10));
}

#[test]
fn set_invalid_value_exits_1_naming_the_flag() {
    let dir = dir_with(TWO_UPSTREAMS);
    let (code, out, err) = run_cli(&["--check", "--set", "upstreams.app.strategy=bogus"], dir.path());
    assert_eq!(code, 1, "stdout={out:?} stderr={err:?}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err:?}");
    assert!(err.starts_with("error: --set upstreams.app.strategy=bogus:"), "{err:?}");
    assert!(err.contains("bogus"), "{err:?}");

    // Same for --print-config, and for a value that fails validation rather than parsing.
    let (code, _, err) = run_cli(&["--print-config", "--set", "timeouts.connect=soon"], dir.path());
    assert_eq!(code, 1, "{err:?}");
    assert!(err.starts_with("error: --set timeouts.connect=soon:"), "{err:?}");

    let (code, _, err) = run_cli(&["--check", "--set", "routes.0.upstream=nope"], dir.path());
    assert_eq!(code, 1, "{err:?}");
    assert!(err.starts_with("error: --set routes.0.upstream=nope:"), "{err:?}");
    assert!(err.contains("nope"), "{err:?}");
}

#[test]
fn set_unknown_key_exits_1_naming_the_flag() {
    let dir = dir_with(TWO_UPSTREAMS);
    let (code, out, err) = run_cli(&["--check", "--set", "server.listen_addr=127.0.0.1:1"], dir.path());
    assert_eq!(code, 1, "stdout={out:?} stderr={err:?}");
    assert!(err.starts_with("error: --set server.listen_addr=127.0.0.1:1:"), "{err:?}");
    assert!(err.contains("listen_addr"), "{err:?}");
}

#[test]
fn set_list_index_out_of_range_exits_1() {
    let dir = dir_with(TWO_UPSTREAMS);
    let (code, out, err) = run_cli(&["--check", "--set", "routes.5.upstream=app"], dir.path());
    assert_eq!(code, 1, "stdout={out:?} stderr={err:?}");
    assert!(err.starts_with("error: --set routes.5.upstream=app:"), "{err:?}");
}

// ---------------------------------------------------------------------------------------
// 4. --print-config: defaults and shortcut flags
// ---------------------------------------------------------------------------------------

#[test]
fn print_config_shows_defaults_and_flags_without_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let t = print_config(
        &[
            "-l",
            "127.0.0.1:18090",
            "-l",
            "127.0.0.1:18091",
            "-b",
            "http://127.0.0.1:8000",
            "-b",
            "http://127.0.0.1:8001",
            "-s",
            "least-connections",
            "--admin",
            "off",
            "--log-level",
            "debug",
        ],
        dir.path(),
    );
    assert_eq!(strings_at(&t, "server.listen"), vec!["127.0.0.1:18090", "127.0.0.1:18091"]);
    assert_eq!(backend_urls(&t, "upstreams.default.backends"), vec!["http://127.0.0.1:8000", "http://127.0.0.1:8001"]);
    assert_eq!(t["upstreams"].as_table().unwrap().len(), 1, "{t:#?}");
    assert_eq!(str_at(&t, "upstreams.default.strategy"), "least-connections");
    assert_eq!(str_at(&t, "admin.listen"), "off");
    assert_eq!(str_at(&t, "log.level"), "debug");
    // Defaults from SPEC section 2 are shown.
    let body = get_path(&t, "server.max_request_body");
    assert!(body.as_str() == Some("10MiB") || body.as_integer() == Some(10 << 20), "server.max_request_body: {body:?}");
    let hdr = get_path(&t, "server.max_header_bytes");
    assert!(hdr.as_str() == Some("64KiB") || hdr.as_integer() == Some(64 << 10), "server.max_header_bytes: {hdr:?}");
    assert!(matches!(str_at(&t, "timeouts.idle"), "60s" | "1m"), "timeouts.idle: {}", str_at(&t, "timeouts.idle"));
    assert_eq!(str_at(&t, "timeouts.connect"), "2s");
    assert_eq!(str_at(&t, "timeouts.client_header"), "10s");
    assert_eq!(str_at(&t, "timeouts.upstream_header"), "30s");
    assert_eq!(get_path(&t, "server.max_connections").as_integer(), Some(10000));
    assert_eq!(get_path(&t, "upstreams.default.retries").as_integer(), Some(1));
    assert_eq!(get_path(&t, "upstreams.default.preserve_host").as_bool(), Some(true));
    assert_eq!(get_path(&t, "log.access").as_bool(), Some(true));
}

#[test]
fn print_config_flags_replace_file_values() {
    let file = r#"[server]
listen = ["127.0.0.1:18080", "127.0.0.1:18081"]

[admin]
listen = "127.0.0.1:19901"

[log]
level = "warn"

[upstreams.web]
strategy = "round-robin"
backends = ["http://127.0.0.1:7000", "http://127.0.0.1:7001"]
"#;
    let dir = dir_with(file);
    let t = print_config(
        &[
            "-l",
            "127.0.0.1:18099",
            "-b",
            "http://127.0.0.1:8000",
            "--admin",
            "off",
            "--log-level",
            "debug",
            "-s",
            "least-connections",
        ],
        dir.path(),
    );
    assert_eq!(strings_at(&t, "server.listen"), vec!["127.0.0.1:18099"]);
    assert_eq!(backend_urls(&t, "upstreams.web.backends"), vec!["http://127.0.0.1:8000"]);
    assert!(t["upstreams"].get("default").is_none(), "-b with a file must not create \"default\": {t:#?}");
    assert_eq!(str_at(&t, "upstreams.web.strategy"), "least-connections");
    assert_eq!(str_at(&t, "admin.listen"), "off");
    assert_eq!(str_at(&t, "log.level"), "debug");

    // --admin with an address.
    let t = print_config(&["--admin", "127.0.0.1:19999"], dir.path());
    assert_eq!(str_at(&t, "admin.listen"), "127.0.0.1:19999");
    assert_eq!(str_at(&t, "log.level"), "warn");
}

#[test]
fn print_config_output_is_itself_a_valid_config() {
    let dir = dir_with(TWO_UPSTREAMS);
    let (code, printed, err) = run_cli(
        &["--print-config", "--set", "upstreams.other.backends=[{url = \"http://127.0.0.1:9000\", weight = 3}]"],
        dir.path(),
    );
    assert_eq!(code, 0, "{err:?}");
    let again = dir_with(&printed);
    let (code, out, err) = run_cli(&["--check"], again.path());
    assert_eq!(code, 0, "printed config does not pass --check: stderr={err:?}\n{printed}");
    assert!(out.contains("weight 3") || printed.contains("weight = 3"), "{out}\n{printed}");
    let (code, printed2, err) = run_cli(&["--print-config"], again.path());
    assert_eq!(code, 0, "{err:?}");
    assert_eq!(
        toml::from_str::<toml::Table>(&printed).unwrap(),
        toml::from_str::<toml::Table>(&printed2).unwrap(),
        "printing the printed config changed it"
    );
}

// ---------------------------------------------------------------------------------------
// 5. Running with no config file; an explicit missing --config
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn runs_without_a_config_file_using_flags() {
    let up = Upstream::start("one").await;
    let backend = format!("http://{}", up.addr);
    // `--admin off` only so the default admin port cannot clash with other tests.
    let args = ["-l", "127.0.0.1:0", "-b", backend.as_str(), "--admin", "off"];
    let proc = Balancer::try_start_without_file(&args)
        .unwrap_or_else(|e| panic!("balancer did not start without a file: {e}"));
    assert!(!proc.dir.path().join("balancer.toml").exists());
    let addr = proc.addr();
    let reply = get(addr, "/hello?x=1").await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.header("x-upstream"), Some("one"));
    let echo = reply.json();
    assert_eq!(echo["path"], "/hello?x=1");
    assert_eq!(echo["method"], "GET");
    assert_eq!(up.hits(), 1);
    // The upstream it created is called "default".
    let logs = proc.logs();
    assert!(
        logs.iter().any(|l| l["upstream"] == "default" && l["backends"].as_str().is_some_and(|b| b.contains(&backend))),
        "no start-up line for upstream \"default\" with {backend}: {logs:#?}"
    );
    drop(proc);
}

#[test]
fn no_file_and_no_backend_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let (code, out, err) = run_cli(&["--check", "-l", "127.0.0.1:0"], dir.path());
    assert_eq!(code, 1, "stdout={out:?} stderr={err:?}");
    assert!(err.starts_with("error: "), "{err:?}");
    assert!(err.contains("upstream") || err.contains("backend"), "{err:?}");
}

#[test]
fn explicit_missing_config_file_exits_1_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    for args in [
        &["--config", "missing.toml", "-l", "127.0.0.1:0", "-b", "http://127.0.0.1:8000"][..],
        &["-c", "missing.toml", "--check", "-b", "http://127.0.0.1:8000"][..],
    ] {
        let (code, out, err) = run_cli(args, dir.path());
        assert_eq!(code, 1, "{args:?}: stdout={out:?} stderr={err:?}");
        assert_eq!(err.trim_end().lines().count(), 1, "{err:?}");
        assert!(err.starts_with("error: "), "{err:?}");
        assert!(err.contains("missing.toml"), "{err:?}");
    }
}

#[test]
fn listener_that_cannot_be_bound_exits_1() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(BIN)
        .args(["-l", &addr, "-b", "http://127.0.0.1:8000", "--admin", "off"])
        .current_dir(dir.path())
        .env_remove("BALANCER_CONFIG")
        .env_remove("BALANCER_LOG")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr={err:?}");
    assert!(err.lines().any(|l| l.starts_with("error: ") && l.contains(&addr)), "no error line naming {addr}: {err:?}");
    drop(taken);
}

/// Each worker listens on a socket of its own sharing the port (`SO_REUSEPORT`); a second
/// balancer on the same port must still fail to start rather than join that group and
/// take half of the first one's connections.
#[tokio::test(flavor = "multi_thread")]
async fn second_balancer_on_the_same_port_exits_1_and_the_first_keeps_serving() {
    let up = Upstream::start("one").await;
    let config = |listen: &str| {
        format!(
            "[admin]\nlisten = \"off\"\n[server]\nlisten = \"{listen}\"\nworkers = 2\n\
             [upstreams.app]\nbackends = [\"http://{}\"]\n",
            up.addr
        )
    };
    let first = Balancer::start(&config("127.0.0.1:0"), &[]);
    let addr = first.addr().to_string();
    let err = match Balancer::try_start(&config(&addr), &[]) {
        Ok(_) => panic!("a second balancer started on {addr}, which the first one holds"),
        Err(e) => e,
    };
    assert!(err.contains("exited with exit status: 1") && err.contains("cannot listen"), "{err}");
    // Every fresh connection still reaches the first balancer, on whichever worker.
    for i in 0..40 {
        let reply = get(first.addr(), &format!("/n{i}")).await;
        assert_eq!(reply.status, 200, "{}", reply.text());
    }
    assert_eq!(up.hits(), 40);
}

// ---------------------------------------------------------------------------------------
// 6. -b with several upstreams
// ---------------------------------------------------------------------------------------

#[test]
fn backend_flag_with_two_upstreams_exits_1() {
    let dir = dir_with(TWO_UPSTREAMS);
    for flag in ["--check", "--print-config"] {
        let (code, out, err) = run_cli(&[flag, "-b", "http://127.0.0.1:7777"], dir.path());
        assert_eq!(code, 1, "{flag}: stdout={out:?} stderr={err:?}");
        assert_eq!(err.trim_end().lines().count(), 1, "{err:?}");
        assert!(err.starts_with("error: "), "{err:?}");
        assert!(err.contains("--backend") || err.contains("-b"), "does not name the flag: {err:?}");
        assert!(err.contains("app") && err.contains("other"), "does not name the upstreams: {err:?}");
    }
    // Running (not just checking) refuses too.
    let (code, _, err) = run_cli(&["-b", "http://127.0.0.1:7777", "-l", "127.0.0.1:0"], dir.path());
    assert_eq!(code, 1, "{err:?}");
}

// ---------------------------------------------------------------------------------------
// 7. Bad usage exits 2
// ---------------------------------------------------------------------------------------

#[test]
fn bad_usage_exits_2() {
    let dir = dir_with(VALID);
    let cases: &[(&[&str], &str)] = &[
        (&["--no-such-flag"], "--no-such-flag"),
        (&["--strategy", "nope"], "nope"),
        (&["-s", "random"], "random"),
        (&["--log-level", "loud"], "loud"),
        (&["--log-format", "xml"], "xml"),
        (&["--set", "no-equals-sign"], "no-equals-sign"),
        (&["--check", "--print-config"], "--"),
        (&["-l"], "-l"),
    ];
    for (args, mention) in cases {
        let (code, out, err) = run_cli(args, dir.path());
        assert_eq!(code, 2, "{args:?}: stdout={out:?} stderr={err:?}");
        assert!(err.contains(mention), "{args:?}: stderr does not mention {mention:?}: {err:?}");
    }
}

// ---------------------------------------------------------------------------------------
// 8. BALANCER_CONFIG
// ---------------------------------------------------------------------------------------

fn cli_with_env(args: &[&str], cwd: &Path, config_env: &Path) -> (i32, String, String) {
    let out = Command::new(BIN)
        .args(args)
        .current_dir(cwd)
        .env("BALANCER_CONFIG", config_env)
        .env_remove("BALANCER_LOG")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

#[test]
fn balancer_config_env_is_honoured() {
    let conf_dir = tempfile::tempdir().unwrap();
    let path = conf_dir.path().join("from-env.toml");
    std::fs::write(&path, "[admin]\nlisten = \"off\"\n\n[upstreams.fromenv]\nbackends = [\"http://127.0.0.1:8123\"]\n")
        .unwrap();
    // The cwd has its own balancer.toml, which the env var must win over.
    let cwd = dir_with(VALID);

    let (code, out, err) = cli_with_env(&["--check"], cwd.path(), &path);
    assert_eq!(code, 0, "stdout={out:?} stderr={err:?}");
    assert!(out.contains("fromenv") && out.contains("http://127.0.0.1:8123"), "{out}");
    assert!(!out.contains("http://127.0.0.1:8001"), "used ./balancer.toml instead: {out}");

    let (code, out, err) = cli_with_env(&["--print-config"], cwd.path(), &path);
    assert_eq!(code, 0, "{err:?}");
    let t: toml::Table = toml::from_str(&out).unwrap();
    assert_eq!(backend_urls(&t, "upstreams.fromenv.backends"), vec!["http://127.0.0.1:8123"]);

    // An error in that file is reported with its path.
    let bad = conf_dir.path().join("bad.toml");
    std::fs::write(&bad, "[upstreams.fromenv]\nbackends = [\"http://127.0.0.1:8123\"]\nstrategy = \"fastest\"\n")
        .unwrap();
    let (code, _, err) = cli_with_env(&["--check"], cwd.path(), &bad);
    assert_eq!(code, 1, "{err:?}");
    assert!(err.starts_with(&format!("error: {}:3:", bad.display())), "{err:?}");
}

#[test]
fn balancer_config_env_missing_file_is_an_error_and_flag_wins() {
    let cwd = dir_with(VALID);
    let missing = cwd.path().join("nope.toml");
    let (code, out, err) = cli_with_env(&["--check", "-b", "http://127.0.0.1:8000"], cwd.path(), &missing);
    assert_eq!(code, 1, "stdout={out:?} stderr={err:?}");
    assert!(err.contains("nope.toml"), "{err:?}");

    // --config on the command line beats the env var.
    let (code, out, err) = cli_with_env(&["--check", "-c", "balancer.toml"], cwd.path(), &missing);
    assert_eq!(code, 0, "stdout={out:?} stderr={err:?}");
    assert!(out.contains("http://127.0.0.1:8001"), "{out}");
}

// ---------------------------------------------------------------------------------------
// 9. --version
// ---------------------------------------------------------------------------------------

#[test]
fn version_flag() {
    let dir = tempfile::tempdir().unwrap();
    for flag in ["--version", "-V"] {
        let (code, out, err) = run_cli(&[flag], dir.path());
        assert_eq!(code, 0, "{flag}: stderr={err:?}");
        assert_eq!(out.trim(), format!("balancer {}", env!("CARGO_PKG_VERSION")), "{flag}");
    }
}

// ---------------------------------------------------------------------------------------
// 10. -s applies to every upstream
// ---------------------------------------------------------------------------------------

#[test]
fn strategy_flag_applies_to_every_upstream() {
    let file = r#"[admin]
listen = "off"

[upstreams.a]
strategy = "round-robin"
backends = ["http://127.0.0.1:7001"]

[upstreams.b]
backends = ["http://127.0.0.1:7002"]

[upstreams.c]
strategy = "least-connections"
backends = ["http://127.0.0.1:7003"]

[[routes]]
path_prefix = "/a"
upstream = "a"

[[routes]]
path_prefix = "/b"
upstream = "b"

[[routes]]
path_prefix = "/c"
upstream = "c"
"#;
    let dir = dir_with(file);
    let t = print_config(&["-s", "least-connections"], dir.path());
    for name in ["a", "b", "c"] {
        assert_eq!(str_at(&t, &format!("upstreams.{name}.strategy")), "least-connections", "upstream {name}");
    }
    let t = print_config(&["--strategy", "round-robin"], dir.path());
    for name in ["a", "b", "c"] {
        assert_eq!(str_at(&t, &format!("upstreams.{name}.strategy")), "round-robin", "upstream {name}");
    }
    // And --set after it still targets one upstream.
    let t = print_config(&["-s", "least-connections", "--set", "upstreams.b.strategy=round-robin"], dir.path());
    assert_eq!(str_at(&t, "upstreams.a.strategy"), "least-connections");
    assert_eq!(str_at(&t, "upstreams.b.strategy"), "round-robin");
    assert_eq!(str_at(&t, "upstreams.c.strategy"), "least-connections");

    let (code, out, err) = run_cli(&["--check", "-s", "least-connections"], dir.path());
    assert_eq!(code, 0, "{err:?}");
    assert_eq!(out.matches("least-connections").count(), 3, "{out}");
    assert!(!out.contains("round-robin"), "{out}");
}
