//! systemd's readiness protocol (`sd_notify`): `READY=1` once every listener is bound,
//! `RELOADING=1` / `READY=1` around a reload, `STOPPING=1` at shutdown, each as one
//! datagram to the socket `$NOTIFY_SOCKET` names. Without that variable nothing is sent.
//!
//! A failed send is logged and otherwise ignored: readiness is advice to the service
//! manager, never a reason to stop serving.

use std::ffi::OsStr;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixDatagram;

/// Every listener is bound and serving (also: a reload finished, whatever its outcome).
pub fn ready() {
    send(b"READY=1");
}

/// A reload starts. systemd (`Type=notify-reload`) wants the time the reload began on
/// `CLOCK_MONOTONIC`, so that it can tell this reload from an earlier one.
pub fn reloading() {
    send(format!("RELOADING=1\nMONOTONIC_USEC={}", monotonic_usec()).as_bytes());
}

/// Shutdown has begun: listeners are closing and connections draining.
pub fn stopping() {
    send(b"STOPPING=1");
}

fn send(msg: &[u8]) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else { return };
    if let Err(e) = send_to(&path, msg) {
        tracing::warn!(socket = %path.to_string_lossy(), error = %e, "cannot notify systemd");
    }
}

/// Sends one datagram to a socket path, or to an abstract socket when the name starts
/// with '@' (as systemd gives it).
fn send_to(path: &OsStr, msg: &[u8]) -> io::Result<()> {
    let socket = UnixDatagram::unbound()?;
    match path.as_bytes().strip_prefix(b"@") {
        #[cfg(target_os = "linux")]
        Some(name) => {
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
            socket.send_to_addr(msg, &addr)?;
        }
        #[cfg(not(target_os = "linux"))]
        Some(_) => return Err(io::Error::new(io::ErrorKind::Unsupported, "abstract sockets are Linux only")),
        None => {
            socket.send_to(msg, path)?;
        }
    }
    Ok(())
}

/// `CLOCK_MONOTONIC` in microseconds (std's `Instant` reads that clock but does not show it).
#[allow(unsafe_code)]
fn monotonic_usec() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid, writable timespec for the call's duration; CLOCK_MONOTONIC
    // always exists on Linux, so the call cannot fail with a valid pointer.
    unsafe {
        libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts);
    }
    ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1_000
}
