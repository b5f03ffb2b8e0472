//! Shared test harness: the real `balancer` binary on 127.0.0.1:0 with real upstreams.
//!
//! `Balancer::start` writes a config file, runs the binary with JSON logs, and learns its
//! listening addresses from the `listening` log lines. `Upstream` is an in-process hyper
//! server whose behaviour tests choose per request path.
#![allow(dead_code)]

pub mod client;
pub mod dns;
pub mod duplex;
pub mod gunicorn;
pub mod origin;
pub mod redis;
pub mod tls;
pub mod upstream;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub use client::*;
pub use upstream::*;

pub const BIN: &str = env!("CARGO_BIN_EXE_balancer");

/// A running balancer process. Killed on drop.
pub struct Balancer {
    child: Option<Child>,
    logs: Arc<Mutex<Vec<serde_json::Value>>>,
    pub dir: tempfile::TempDir,
    pub config_path: PathBuf,
    pub addrs: Vec<SocketAddr>,
}

impl Balancer {
    /// Starts balancer with `config` (TOML) and extra arguments; waits for its listeners.
    pub fn start(config: &str, args: &[&str]) -> Balancer {
        Self::try_start(config, args).unwrap_or_else(|e| panic!("balancer did not start: {e}"))
    }

    pub fn try_start(config: &str, args: &[&str]) -> Result<Balancer, String> {
        Self::try_start_with_nofile(config, args, None)
    }

    /// Like [`Balancer::start`], with the process's open-file limit (`ulimit -n`) set to
    /// `nofile` by a `sh` that then `exec`s the binary (so [`Balancer::pid`] is still its pid).
    pub fn start_with_nofile(config: &str, args: &[&str], nofile: u64) -> Balancer {
        Self::try_start_with_nofile(config, args, Some(nofile))
            .unwrap_or_else(|e| panic!("balancer did not start: {e}"))
    }

    pub fn try_start_with_nofile(config: &str, args: &[&str], nofile: Option<u64>) -> Result<Balancer, String> {
        Self::launch(Some(config), args, nofile, &[])
    }

    /// Like [`Balancer::start`], with extra environment variables for the process.
    pub fn start_with_env(config: &str, args: &[&str], env: &[(&str, &str)]) -> Balancer {
        Self::launch(Some(config), args, None, env).unwrap_or_else(|e| panic!("balancer did not start: {e}"))
    }

    /// Starts balancer with no config file at all: its working directory is a fresh empty
    /// one and no `-c` is given, so only the flags in `args` configure it.
    pub fn try_start_without_file(args: &[&str]) -> Result<Balancer, String> {
        Self::launch(None, args, None, &[])
    }

    fn launch(
        config: Option<&str>,
        args: &[&str],
        nofile: Option<u64>,
        env: &[(&str, &str)],
    ) -> Result<Balancer, String> {
        let dir = tempfile::tempdir().unwrap();
        let config_path = dir.path().join("balancer.toml");
        if let Some(config) = config {
            std::fs::write(&config_path, config).unwrap();
        }
        let mut cmd = match nofile {
            None => Command::new(BIN),
            Some(n) => {
                let mut sh = Command::new("sh");
                sh.arg("-c").arg(format!("ulimit -n {n} && exec \"$0\" \"$@\"")).arg(BIN);
                sh
            }
        };
        // A caller's own `-c` wins (e.g. a symlinked config); otherwise the written file.
        if config.is_some() && !args.contains(&"-c") {
            cmd.arg("-c").arg(&config_path);
        }
        cmd.current_dir(dir.path());
        cmd.arg("--log-format").arg("json").args(args);
        cmd.stdout(Stdio::null()).stderr(Stdio::piped()).stdin(Stdio::null());
        cmd.env_remove("BALANCER_CONFIG").env_remove("BALANCER_LOG").env_remove("NOTIFY_SOCKET");
        cmd.envs(env.iter().copied());
        let mut child = cmd.spawn().unwrap();
        let stderr = child.stderr.take().unwrap();
        let logs = Arc::new(Mutex::new(Vec::new()));
        let sink = logs.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let v = serde_json::from_str(&line).unwrap_or_else(|_| serde_json::json!({ "raw": line }));
                sink.lock().unwrap().push(v);
            }
        });
        let mut b = Balancer { child: Some(child), logs, dir, config_path, addrs: Vec::new() };
        let expected = config_listen_count(config.unwrap_or(""), args);
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let addrs: Vec<SocketAddr> = b
                .logs_matching("listening")
                .iter()
                .filter_map(|l| l["addr"].as_str().and_then(|a| a.parse().ok()))
                .collect();
            if addrs.len() >= expected {
                b.addrs = addrs;
                return Ok(b);
            }
            if let Some(status) = b.child.as_mut().unwrap().try_wait().unwrap() {
                return Err(format!("exited with {status}; logs: {:?}", b.logs()));
            }
            if Instant::now() > deadline {
                return Err(format!("no listening line within 15s; logs: {:?}", b.logs()));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addrs[0]
    }

    /// The admin listener's address (from its `admin listening` line).
    pub fn admin(&self) -> SocketAddr {
        let line = self.wait_for_log(Duration::from_secs(5), |l| l["message"] == "admin listening");
        line["addr"].as_str().unwrap().parse().unwrap()
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr(), path)
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    pub fn logs(&self) -> Vec<serde_json::Value> {
        self.logs.lock().unwrap().clone()
    }

    /// Log lines whose message is `message`.
    pub fn logs_matching(&self, message: &str) -> Vec<serde_json::Value> {
        self.logs().into_iter().filter(|l| l["message"] == message).collect()
    }

    /// Access-log lines (target `access`).
    pub fn access_logs(&self) -> Vec<serde_json::Value> {
        self.logs().into_iter().filter(|l| l["target"] == "access").collect()
    }

    /// Waits until `pred` holds for some log line; panics after `timeout`.
    pub fn wait_for_log(&self, timeout: Duration, pred: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(l) = self.logs().into_iter().find(|l| pred(l)) {
                return l;
            }
            assert!(Instant::now() < deadline, "log line not seen within {timeout:?}; logs: {:#?}", self.logs());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Rewrites the config file in place (as `echo > file` does).
    pub fn write_config(&self, text: &str) {
        std::fs::write(&self.config_path, text).unwrap();
    }

    /// Replaces the config file by renaming a new file over it (as most editors do).
    pub fn rename_config(&self, text: &str) {
        let tmp = self.dir.path().join(".balancer.toml.swp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, &self.config_path).unwrap();
    }

    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill").arg(format!("-{sig}")).arg(self.pid().to_string()).status().unwrap().success();
        assert!(ok, "kill -{sig} failed");
    }

    /// Waits for the process to exit on its own; panics after `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        let child = self.child.as_mut().unwrap();
        loop {
            if let Some(s) = child.try_wait().unwrap() {
                return s;
            }
            assert!(Instant::now() < deadline, "balancer did not exit within {timeout:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Resident memory of the process in KiB (from /proc).
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap()
    }
}

impl Drop for Balancer {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// How many `listening` lines to wait for: `-l` flags win, else the config's listen list.
fn config_listen_count(config: &str, args: &[&str]) -> usize {
    let flags = args.iter().filter(|a| **a == "-l" || **a == "--listen").count();
    if flags > 0 {
        return flags;
    }
    let table: toml::Table = toml::from_str(config).unwrap_or_default();
    match table.get("server").and_then(|s| s.get("listen")) {
        Some(toml::Value::Array(a)) => a.len(),
        Some(_) => 1,
        None => 1,
    }
}

/// Runs the binary to completion (for `--check`, `--print-config`, bad usage).
pub fn run_cli(args: &[&str], dir: &std::path::Path) -> (i32, String, String) {
    let out = Command::new(BIN)
        .args(args)
        .current_dir(dir)
        .env_remove("BALANCER_CONFIG")
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

/// Like [`config_for`], with the admin listener on a free port.
pub fn config_with_admin(backends: &[SocketAddr], extra: &str) -> String {
    config_for(backends, extra).replace("[admin]\nlisten = \"off\"", "[admin]\nlisten = \"127.0.0.1:0\"")
}

/// One sample's value from a Prometheus text exposition, e.g.
/// `metric(&text, "balancer_backend_up{upstream=\"app\",backend=\"http://..\"}")`.
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(series).and_then(|rest| rest.trim().parse().ok()))
}

/// A config with one upstream over `backends` and `extra` TOML appended; listens on :0.
pub fn config_for(backends: &[SocketAddr], extra: &str) -> String {
    let list: Vec<String> = backends.iter().map(|a| format!("\"http://{a}\"")).collect();
    format!(
        "[server]\nlisten = [\"127.0.0.1:0\"]\n\n[admin]\nlisten = \"off\"\n\n[upstreams.app]\nbackends = [{}]\n{extra}\n",
        list.join(", ")
    )
}

/// Polls `cond` every 20 ms until it holds (true) or `timeout` passes (false).
pub async fn wait_until<F, Fut>(timeout: Duration, mut cond: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if cond().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}
