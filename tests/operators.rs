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
