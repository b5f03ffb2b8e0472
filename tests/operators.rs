//! What operators see and use (SPEC section 15) through the real binary: systemd
//! readiness and the shipped unit file.

mod common;

use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::time::Duration;

use common::*;

/// Reads one notification, failing after a few seconds.
fn recv(socket: &UnixDatagram) -> String {
    let mut buf = [0u8; 1024];
    let n = socket.recv(&mut buf).expect("a notification within 10 s");
    String::from_utf8(buf[..n].to_vec()).unwrap()
}

/// The socket has nothing more to say (within a short wait).
fn silent(socket: &UnixDatagram) -> bool {
    socket.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
    let mut buf = [0u8; 1024];
    let quiet = socket.recv(&mut buf).is_err();
    socket.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    quiet
}

/// READY=1 once listening, RELOADING=1 (with MONOTONIC_USEC) and READY=1 around a reload,
/// STOPPING=1 on SIGTERM: the messages systemd's `Type=notify` waits for.
async fn readiness_through(socket: UnixDatagram, notify_socket: &str) {
    socket.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let up = Upstream::start("a").await;
    let mut b = Balancer::start_with_env(&config_with_admin(&[up.addr], ""), &[], &[("NOTIFY_SOCKET", notify_socket)]);
    let admin = b.admin();
    assert_eq!(recv(&socket), "READY=1");
    // Ready means serving: the listener answers right away.
    assert_eq!(get(b.addr(), "/").await.status, 200);
    assert!(silent(&socket), "nothing else is said while nothing happens");

    for _ in 0..2 {
        let r = send(admin, http::Request::post("/reload").header("host", "x").body(Default::default()).unwrap()).await;
        assert_eq!(r.status, 200, "{}", r.text());
        let reloading = recv(&socket);
        let mut lines = reloading.lines();
        assert_eq!(lines.next(), Some("RELOADING=1"), "{reloading:?}");
        let usec: u64 = lines
            .next()
            .and_then(|l| l.strip_prefix("MONOTONIC_USEC="))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no MONOTONIC_USEC in {reloading:?}"));
        assert!(usec > 0);
        assert_eq!(recv(&socket), "READY=1");
    }

    // A failed reload still ends in READY=1: the old config keeps serving.
    b.write_config("[server\n");
    let r = send(admin, http::Request::post("/reload").header("host", "x").body(Default::default()).unwrap()).await;
    assert_eq!(r.status, 422);
    // The watcher may have tried the broken file too: every attempt is a pair.
    loop {
        assert!(recv(&socket).starts_with("RELOADING=1\n"));
        assert_eq!(recv(&socket), "READY=1");
        if silent(&socket) {
            break;
        }
    }

    b.signal("TERM");
    assert_eq!(recv(&socket), "STOPPING=1");
    assert!(b.wait_exit(Duration::from_secs(10)).success());
}

#[tokio::test]
async fn systemd_readiness_over_a_socket_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify");
    let socket = UnixDatagram::bind(&path).unwrap();
    readiness_through(socket, path.to_str().unwrap()).await;
}

#[tokio::test]
async fn systemd_readiness_over_an_abstract_socket() {
    use std::os::linux::net::SocketAddrExt;
    let name = format!("balancer-test-{}", std::process::id());
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
    let socket = UnixDatagram::bind_addr(&addr).unwrap();
    readiness_through(socket, &format!("@{name}")).await;
}

#[tokio::test]
async fn without_notify_socket_balancer_runs_as_usual() {
    let up = Upstream::start("a").await;
    let mut b = Balancer::start(&config_for(&[up.addr], ""), &[]);
    assert_eq!(get(b.addr(), "/").await.status, 200);
    b.signal("TERM");
    assert!(b.wait_exit(Duration::from_secs(10)).success());
    assert!(b.logs_matching("cannot notify systemd").is_empty());
}

/// The shipped unit passes `systemd-analyze verify` (with ExecStart pointing at this build,
/// since verify wants the binary to exist).
#[test]
fn the_shipped_unit_file_verifies() {
    let unit = Path::new(env!("CARGO_MANIFEST_DIR")).join("contrib/systemd/balancer.service");
    let text = std::fs::read_to_string(&unit).unwrap();
    for key in [
        "Type=notify",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "DynamicUser=yes",
        "AmbientCapabilities=CAP_NET_BIND_SERVICE",
        "ProtectSystem=strict",
        "NoNewPrivileges=yes",
    ] {
        assert!(text.lines().any(|l| l == key), "the unit has no {key}");
    }
    if std::process::Command::new("systemd-analyze").arg("--version").output().is_err() {
        eprintln!("note: systemd-analyze is not installed; skipping `systemd-analyze verify`");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("balancer.service");
    std::fs::write(&copy, text.replace("/usr/local/bin/balancer", BIN)).unwrap();
    let out = std::process::Command::new("systemd-analyze").arg("verify").arg(&copy).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && stderr.trim().is_empty(), "systemd-analyze verify: {stderr}");
}

// ---------------------------------------------------------------------------------------
// GET /config and --check --diff
// ---------------------------------------------------------------------------------------

const STICKY: &str = "[upstreams.app.sticky]\ncookie = \"lb\"\nsecret = \"hunter2-very-secret\"\n";

#[tokio::test]
async fn admin_config_shows_the_running_config_with_secrets_hidden() {
    let up = Upstream::start("a").await;
    // A store that is not there: balancer starts anyway, and its password is a secret.
    let store = "[limit_store]\nurl = \"redis://app:hunter3@127.0.0.1:1/0\"\n";
    let b = Balancer::start(
        &config_with_admin(&[up.addr], &format!("{STICKY}{store}")),
        &["--set", "upstreams.app.retries=3"],
    );
    let admin = b.admin();
    let r = get(admin, "/config").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("application/toml; charset=utf-8"));
    assert_eq!(r.header("x-balancer-generation"), Some("1"));
    let text = r.text();
    assert!(!text.contains("hunter2") && !text.contains("hunter3"), "a secret leaked:\n{text}");
    let t: toml::Table = toml::from_str(&text).unwrap_or_else(|e| panic!("not TOML ({e}):\n{text}"));
    let app = &t["upstreams"]["app"];
    assert_eq!(app["sticky"]["secret"].as_str(), Some("***"));
    assert_eq!(t["limit_store"]["url"].as_str(), Some("redis://app:***@127.0.0.1:1/0"));
    assert_eq!(app["sticky"]["cookie"].as_str(), Some("lb"));
    assert_eq!(app["retries"].as_integer(), Some(3), "command-line overrides are part of it");
    assert_eq!(app["backends"][0].as_str(), Some(format!("http://{}", up.addr).as_str()));
    assert_eq!(t["log"]["format"].as_str(), Some("json"));

    // A reload shows the new generation's config.
    b.write_config(&config_with_admin(&[up.addr], "[upstreams.app.sticky]\ncookie = \"other\"\n"));
    let r = send(admin, http::Request::post("/reload").header("host", "x").body(Default::default()).unwrap()).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let r = get(admin, "/config").await;
    let t: toml::Table = toml::from_str(&r.text()).unwrap();
    assert_eq!(t["upstreams"]["app"]["sticky"]["cookie"].as_str(), Some("other"));
    assert!(t["upstreams"]["app"]["sticky"].get("secret").is_none());
    assert_ne!(r.header("x-balancer-generation"), Some("1"));

    let r = send(admin, http::Request::post("/config").header("host", "x").body(Default::default()).unwrap()).await;
    assert_eq!(r.status, 405);
}

#[tokio::test]
async fn check_diff_shows_what_a_reload_would_change() {
    let up = Upstream::start("a").await;
    let running = config_with_admin(&[up.addr], STICKY);
    let b = Balancer::start(&running, &[]);
    let url = format!("http://{}", b.admin());
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("balancer.toml");

    // The same file and flags: valid, nothing on stdout.
    std::fs::write(&file, &running).unwrap();
    let (code, out, err) = run_cli(&["--check", "--log-format", "json", "--diff", &url], dir.path());
    assert_eq!((code, out.as_str()), (0, ""), "stderr: {err}");
    assert!(err.contains("the same as the running config"), "{err}");

    // An edit: a unified diff from the running config to the file, secrets still hidden.
    let edited = running.replace("[upstreams.app]\n", "[upstreams.app]\nretries = 4\n").replace("hunter2", "swordfish");
    std::fs::write(&file, &edited).unwrap();
    let (code, out, err) = run_cli(&["--check", "--diff", &url, "--log-format", "json"], dir.path());
    assert_eq!(code, 0, "stdout: {out}\nstderr: {err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], format!("--- running ({url})"), "{out}");
    assert_eq!(lines[1], "+++ balancer.toml", "{out}");
    assert!(lines.iter().any(|l| l.starts_with("@@ ")), "{out}");
    assert!(lines.contains(&"-retries = 1") || lines.contains(&"-retries = 0"), "{out}");
    assert!(lines.contains(&"+retries = 4"), "{out}");
    assert!(!out.contains("swordfish") && !out.contains("hunter2"), "{out}");
    assert_eq!(
        lines.iter().filter(|l| l.starts_with(['-', '+']) && !l.starts_with("---") && !l.starts_with("+++")).count(),
        2,
        "{out}"
    );

    // Overrides count: without --log-format json the file differs from the running process.
    let (code, out, _) = run_cli(&["--check", "--diff", &url], dir.path());
    assert_eq!(code, 0);
    assert!(out.lines().any(|l| l == "+format = \"text\""), "{out}");

    // Invalid: exit 1 with file:line:col, and nothing fetched or printed on stdout.
    std::fs::write(&file, running.replace("[upstreams.app]\n", "[upstreams.app]\nstrategy = \"nope\"\n")).unwrap();
    let (code, out, err) = run_cli(&["--check", "--diff", &url], dir.path());
    assert_eq!((code, out.as_str()), (1, ""), "{err}");
    assert!(err.starts_with("error: balancer.toml:") && err.contains("nope"), "{err}");
}

#[tokio::test]
async fn check_diff_exits_2_when_the_admin_listener_cannot_be_reached() {
    let up = Upstream::start("a").await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("balancer.toml"), config_for(&[up.addr], "")).unwrap();
    // A port nothing listens on.
    let closed = dead_addr();
    let (code, out, err) = run_cli(&["--check", "--diff", &format!("http://{closed}")], dir.path());
    assert_eq!((code, out.as_str()), (2, ""), "{err}");
    assert!(err.starts_with("error: cannot read the running config:") && err.contains(&closed.to_string()), "{err}");
    // Something that is not balancer's admin listener.
    let (code, _, err) = run_cli(&["--check", "--diff", &up.addr.to_string()], dir.path());
    assert_eq!(code, 2, "{err}");
    // --diff without --check is bad usage.
    let (code, _, err) = run_cli(&["--diff", &format!("http://{closed}")], dir.path());
    assert_eq!(code, 2);
    assert!(err.contains("--check"), "{err}");
}

// ---------------------------------------------------------------------------------------
// Shell completions and the man page
// ---------------------------------------------------------------------------------------

fn has(tool: &str) -> bool {
    std::process::Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .output()
        .is_ok_and(|o| o.status.success())
}

#[test]
fn completions_are_generated_for_each_shell_and_bash_completes_flags() {
    let dir = tempfile::tempdir().unwrap();
    for (shell, marker) in
        [("bash", "complete -F _balancer"), ("zsh", "#compdef balancer"), ("fish", "complete -c balancer")]
    {
        let (code, out, err) = run_cli(&["completions", shell], dir.path());
        assert_eq!(code, 0, "{shell}: {err}");
        assert!(
            out.contains(marker) && out.contains("print-config") && out.contains("least-latency"),
            "{shell}:\n{out}"
        );
    }
    let (code, _, err) = run_cli(&["completions", "tcsh"], dir.path());
    assert_eq!(code, 2, "{err}");

    if !has("bash") {
        eprintln!("note: bash is not installed; not running the bash completion");
        return;
    }
    let (_, script, _) = run_cli(&["completions", "bash"], dir.path());
    let file = dir.path().join("balancer.bash");
    std::fs::write(&file, script).unwrap();
    // What bash offers after `balancer --log-f<TAB>` and `balancer --strategy <TAB>`.
    let complete = |words: &str, cword: usize, cur: &str, prev: &str| {
        let out = std::process::Command::new("bash")
            .arg("-c")
            .arg(format!(
                "source {}; COMP_WORDS=({words}); COMP_CWORD={cword}; _balancer balancer '{cur}' '{prev}'; echo \"${{COMPREPLY[@]}}\"",
                file.display()
            ))
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    };
    assert_eq!(complete("balancer --log-f", 1, "--log-f", "balancer"), "--log-format");
    assert_eq!(
        complete("balancer --strategy ''", 2, "", "--strategy"),
        "round-robin least-connections consistent-hash least-latency"
    );
}

#[test]
fn man_prints_a_man_page_of_every_flag() {
    let dir = tempfile::tempdir().unwrap();
    let (code, out, err) = run_cli(&["--man"], dir.path());
    assert_eq!(code, 0, "{err}");
    assert!(out.contains(".TH balancer 1"), "{out}");
    for flag in ["config", "listen", "backend", "strategy", "set", "check", "print\\-config", "diff"] {
        assert!(out.contains(&format!("\\fB\\-\\-{flag}\\fR")), "no --{flag} in the man page:\n{out}");
    }
    if !has("groff") {
        eprintln!("note: groff is not installed; not rendering the man page");
        return;
    }
    let page = dir.path().join("balancer.1");
    std::fs::write(&page, &out).unwrap();
    // -ww: every warning; -z: no output, only the check.
    let o = std::process::Command::new("groff").args(["-man", "-Tascii", "-ww", "-z"]).arg(&page).output().unwrap();
    assert!(o.status.success() && o.stderr.is_empty(), "groff: {}", String::from_utf8_lossy(&o.stderr));
}

// ---------------------------------------------------------------------------------------
// W3C trace context
// ---------------------------------------------------------------------------------------

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT: &str = "00f067aa0ba902b7";

/// Sends GET `path` with `fields`; returns the `traceparent` and `tracestate` values the
/// backend received (every one of them) and the access-log line of the request.
async fn traced(b: &Balancer, path: &str, fields: &[(&str, &str)]) -> (Vec<String>, Vec<String>, serde_json::Value) {
    let mut req = http::Request::get(path).header("host", "x");
    for (k, v) in fields {
        req = req.header(*k, *v);
    }
    let r = send(b.addr(), req.body(Default::default()).unwrap()).await;
    assert_eq!(r.status, 200);
    let head = r.text();
    let values = |name: &str| -> Vec<String> {
        head.lines()
            .filter_map(|l| l.split_once(": "))
            .filter(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.trim().to_owned())
            .collect()
    };
    let log = b.wait_for_log(Duration::from_secs(5), |l| l["target"] == "access" && l["path"] == path);
    (values("traceparent"), values("tracestate"), log)
}

/// (trace id, parent id, flags) of a `traceparent` balancer sent, checked for form.
fn fields_of(traceparent: &str) -> (String, String, String) {
    let parts: Vec<&str> = traceparent.split('-').collect();
    assert_eq!(parts.len(), 4, "{traceparent}");
    let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    assert!(parts[0] == "00" && hex(parts[1], 32) && hex(parts[2], 16) && hex(parts[3], 2), "{traceparent}");
    assert!(parts[1].bytes().any(|b| b != b'0') && parts[2].bytes().any(|b| b != b'0'), "{traceparent}");
    (parts[1].to_owned(), parts[2].to_owned(), parts[3].to_owned())
}

#[tokio::test]
async fn a_valid_traceparent_is_continued_with_balancers_span_as_parent() {
    let (up, _heads) = head_echo().await;
    let b = Balancer::start(&config_for(&[up.addr], ""), &[]);
    for flags in ["01", "00"] {
        let incoming = format!("00-{TRACE}-{PARENT}-{flags}");
        let path = format!("/valid/{flags}");
        let (tp, ts, log) =
            traced(&b, &path, &[("traceparent", &incoming), ("tracestate", "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7")])
                .await;
        assert_eq!(tp.len(), 1, "{tp:?}");
        let (trace, parent, kept) = fields_of(&tp[0]);
        assert_eq!(trace, TRACE);
        assert_ne!(parent, PARENT, "balancer's own span is the parent");
        assert_eq!(kept, flags);
        assert_eq!(ts, ["congo=t61rcWkgMzE,rojo=00f067aa0ba902b7"]);
        assert_eq!(log["trace_id"], TRACE, "{log}");
    }
    // A later version is read as version 00 and sent on as 00.
    let (tp, _, _) = traced(&b, "/v2", &[("traceparent", &format!("cc-{TRACE}-{PARENT}-01-what-follows"))]).await;
    assert_eq!(fields_of(&tp[0]).0, TRACE);
}

#[tokio::test]
async fn without_a_valid_traceparent_balancer_starts_a_trace() {
    let (up, _heads) = head_echo().await;
    let b = Balancer::start(&config_for(&[up.addr], ""), &[]);
    let malformed = [
        ("version-ff", format!("ff-{TRACE}-{PARENT}-01")),
        ("version-nonhex", format!("0x-{TRACE}-{PARENT}-01")),
        ("version-00-longer", format!("00-{TRACE}-{PARENT}-01-extra")),
        ("short-trace", format!("00-{}-{PARENT}-01", &TRACE[1..])),
        ("long-parent", format!("00-{TRACE}-{PARENT}0-01")),
        ("short-flags", format!("00-{TRACE}-{PARENT}-1")),
        ("nonhex-trace", format!("00-{}z-{PARENT}-01", &TRACE[1..])),
        ("upper-case", format!("00-{}-{PARENT}-01", TRACE.to_uppercase())),
        ("zero-trace", format!("00-{}-{PARENT}-01", "0".repeat(32))),
        ("zero-parent", format!("00-{TRACE}-{}-01", "0".repeat(16))),
        ("empty", String::new()),
        ("garbage", "not a traceparent".to_owned()),
    ];
    let mut seen = std::collections::HashSet::new();
    for (what, value) in &malformed {
        let path = format!("/bad/{what}");
        let (tp, ts, log) = traced(&b, &path, &[("traceparent", value), ("tracestate", "congo=t61rcWkgMzE")]).await;
        assert_eq!(tp.len(), 1, "{what}: {tp:?}");
        let (trace, _, flags) = fields_of(&tp[0]);
        assert_ne!(trace, TRACE, "{what}: the malformed trace was continued");
        assert_eq!(flags, "01", "{what}: a started trace is sampled");
        assert!(ts.is_empty(), "{what}: tracestate of a trace not continued was sent: {ts:?}");
        assert_eq!(log["trace_id"], trace.as_str(), "{what}: {log}");
        assert!(seen.insert(trace), "{what}: a trace id came twice");
    }
    // Two traceparent fields: not one trace to continue either.
    let (tp, _, _) = traced(
        &b,
        "/two",
        &[("traceparent", &format!("00-{TRACE}-{PARENT}-01")), ("traceparent", &format!("00-{TRACE}-{PARENT}-01"))],
    )
    .await;
    assert_ne!(fields_of(&tp[0]).0, TRACE);
    // None at all: a new trace per request.
    for i in 0..3 {
        let (tp, _, log) = traced(&b, &format!("/none/{i}"), &[]).await;
        let (trace, _, _) = fields_of(&tp[0]);
        assert_eq!(log["trace_id"], trace.as_str());
        assert!(seen.insert(trace));
    }
}
