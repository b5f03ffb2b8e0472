//! A real app server for the tests: gunicorn serving `tests/apps/peak_app.py` on a free
//! port of 127.0.0.1, from a temp dir of its own, killed (master and workers) on drop.
//!
//! The app reports its own peak concurrency across all its worker processes (`/peak`),
//! how many `/sleep` requests it started (`/served`), and `/sleep?ms=N` sleeps N ms
//! (200 by default). CI installs gunicorn with `pip install gunicorn`.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running gunicorn: its master is the leader of its own process group, so that the
/// whole group (master and workers) is killed on drop.
pub struct Gunicorn {
    child: Option<Child>,
    pub addr: SocketAddr,
    /// Holds the app's shared state and gunicorn's own log (`gunicorn.log`).
    pub dir: tempfile::TempDir,
}

/// How gunicorn serves: `workers` processes, each with `threads` threads (1: the sync
/// worker class, more: gthread).
#[derive(Clone, Copy, Debug)]
pub struct GunicornOpts {
    pub workers: u32,
    pub threads: u32,
}

impl Default for GunicornOpts {
    fn default() -> Self {
        GunicornOpts { workers: 2, threads: 1 }
    }
}

impl Gunicorn {
    /// `gunicorn -w 2` with sync workers: two requests at once.
    pub fn start() -> Gunicorn {
        Self::start_with(GunicornOpts::default())
    }

    /// Starts gunicorn and waits until every worker has loaded the app and it answers.
    /// A port taken between choosing it and gunicorn binding it is retried on another.
    pub fn start_with(opts: GunicornOpts) -> Gunicorn {
        let mut errors = Vec::new();
        for _ in 0..3 {
            match Self::try_start(opts) {
                Ok(g) => return g,
                Err(e) => errors.push(e),
            }
        }
        panic!("gunicorn did not start (is it installed? `pip install gunicorn`): {errors:#?}")
    }

    fn try_start(opts: GunicornOpts) -> Result<Gunicorn, String> {
        let dir = tempfile::tempdir().unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let apps = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests").join("apps");
        let log = std::fs::File::create(dir.path().join("gunicorn.log")).unwrap();
        let mut cmd = Command::new("gunicorn");
        cmd.arg("-b")
            .arg(addr.to_string())
            .arg("-w")
            .arg(opts.workers.to_string())
            .arg("--chdir")
            .arg(&apps)
            .arg("--log-level")
            .arg("warning")
            .arg("--graceful-timeout")
            .arg("1");
        if opts.threads > 1 {
            cmd.arg("-k").arg("gthread").arg("--threads").arg(opts.threads.to_string());
        } else {
            cmd.arg("-k").arg("sync");
        }
        cmd.arg("peak_app:app")
            .current_dir(dir.path())
            .env("PEAK_DIR", dir.path())
            // No __pycache__ written into the source tree.
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .process_group(0);
        let child = cmd.spawn().map_err(|e| format!("cannot run gunicorn: {e}"))?;
        let mut g = Gunicorn { child: Some(child), addr, dir };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if g.workers_ready() >= opts.workers as usize && g.answers() {
                return Ok(g);
            }
            if let Some(status) = g.child.as_mut().unwrap().try_wait().unwrap() {
                return Err(format!("gunicorn exited with {status}: {}", g.log()));
            }
            if Instant::now() > deadline {
                return Err(format!("gunicorn not ready within 20s: {}", g.log()));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Workers that have loaded the app (each writes `worker-<pid>` into the state dir).
    fn workers_ready(&self) -> usize {
        std::fs::read_dir(self.dir.path())
            .map(|d| {
                d.filter_map(Result::ok).filter(|e| e.file_name().to_string_lossy().starts_with("worker-")).count()
            })
            .unwrap_or(0)
    }

    /// Whether `GET /peak` is answered 200 (blocking; for start-up only).
    fn answers(&self) -> bool {
        let Ok(mut s) = TcpStream::connect_timeout(&self.addr, Duration::from_millis(500)) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
        if s.write_all(b"GET /peak HTTP/1.0\r\nHost: localhost\r\n\r\n").is_err() {
            return false;
        }
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        out.starts_with(b"HTTP/1.1 200") || out.starts_with(b"HTTP/1.0 200")
    }

    /// gunicorn's own log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("gunicorn.log")).unwrap_or_default()
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The most `/sleep` requests the app ever ran at once (across all its workers).
    pub async fn peak(&self) -> u64 {
        self.number("/peak").await
    }

    /// How many `/sleep` requests reached the app.
    pub async fn served(&self) -> u64 {
        self.number("/served").await
    }

    /// Forgets the peak and the served count.
    pub async fn reset(&self) {
        assert_eq!(super::get(self.addr, "/reset").await.status, 200);
    }

    async fn number(&self, path: &str) -> u64 {
        let r = super::get(self.addr, path).await;
        assert_eq!(r.status, 200, "{path}: {}", r.text());
        r.text().trim().parse().unwrap_or_else(|_| panic!("{path}: {:?}", r.text()))
    }
}

impl Drop for Gunicorn {
    fn drop(&mut self) {
        let Some(mut c) = self.child.take() else { return };
        // SIGINT: gunicorn's quick shutdown, in which the master stops its workers and
        // reaps them (so none is left a zombie for an init that may not reap).
        let signal = |sig: &str, target: String| {
            let _ = Command::new("kill").arg(sig).arg("--").arg(target).stderr(Stdio::null()).status();
        };
        signal("-INT", c.id().to_string());
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline && matches!(c.try_wait(), Ok(None)) {
            std::thread::sleep(Duration::from_millis(10));
        }
        // Whatever is left of the group (master and workers) is killed outright.
        signal("-KILL", format!("-{}", c.id()));
        let _ = c.kill();
        let _ = c.wait();
    }
}
