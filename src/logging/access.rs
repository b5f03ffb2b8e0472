//! The access-log line, formatted by hand: the same text and JSON as `tracing`'s `fmt`
//! layer writes for the `access` target (tests, the ELK config and users' parsers read it),
//! at a fraction of the cost. The line goes into a per-thread buffer; no lock is taken and
//! no `fmt::Arguments` built on the usual path (ASCII fields, IPv4 clients).
//!
//! On a worker thread ([`batch_here`]) the buffer collects lines until the thread runs
//! out of work ([`flush_here`], called as its runtime parks) or holds [`FLUSH_AT`] bytes,
//! then goes to the log thread's queue in one message: a busy worker queues, and wakes the
//! log thread, once per batch of requests rather than per request (nginx's `buffer=`),
//! and an idle one has written everything before it sleeps. Other threads queue each line
//! as it is made.

use std::cell::{Cell, RefCell};
use std::io::Write as _;
use std::net::IpAddr;
use std::sync::OnceLock;
use std::time::{SystemTime, UNIX_EPOCH};

use tracing_appender::non_blocking::NonBlocking;

use crate::config::LogFormat;

/// Where access lines go and how they look; set once at start-up by [`super::init`],
/// like `tracing`'s global subscriber, and never changed after.
pub(super) static SINK: OnceLock<Sink> = OnceLock::new();

pub(super) struct Sink {
    pub(super) writer: NonBlocking,
    pub(super) format: LogFormat,
}

/// One request's access-log fields, borrowed from its record.
#[derive(Debug, Clone, Copy)]
pub struct AccessLine<'a> {
    pub client: IpAddr,
    pub method: &'a str,
    pub path: &'a str,
    pub status: u16,
    pub upstream: &'a str,
    pub backend: &'a str,
    /// The request's duration in microseconds, written as milliseconds.
    pub duration_micros: u64,
    pub bytes: u64,
    pub request_id: &'a str,
    pub trace_id: &'a str,
    pub complete: bool,
}

/// A worker's buffered lines are queued once they reach this many bytes (about 30 text
/// lines), if the thread has not run out of work before.
pub const FLUSH_AT: usize = 8 * 1024;

/// A thread's lines not queued yet, its clone of the log queue's sender, and the
/// timestamp's formatted second (`2026-12-05T13:58:45.`), remade when the second changes.
struct Local {
    pending: Vec<u8>,
    writer: NonBlocking,
    second: u64,
    second_text: [u8; 20],
}

impl Local {
    fn flush(&mut self) {
        // The queue never fails a write but when the log thread is gone (shutdown).
        let _ = self.writer.write_all(&self.pending);
        self.pending.clear();
    }
}

thread_local! {
    static LOCAL: RefCell<Option<Local>> = const { RefCell::new(None) };
    /// Set on threads that call [`flush_here`] whenever they run out of work.
    static BATCHED: Cell<bool> = const { Cell::new(false) };
}

/// Keeps this thread's lines until [`flush_here`] or [`FLUSH_AT`]: for threads that
/// promise to call `flush_here` before they sleep (the workers, as their runtime parks).
pub fn batch_here() {
    BATCHED.with(|b| b.set(true));
}

/// Queues the lines this thread has kept, if any.
pub fn flush_here() {
    LOCAL.with(|local| {
        let Ok(mut local) = local.try_borrow_mut() else { return };
        match local.as_mut() {
            Some(local) if !local.pending.is_empty() => local.flush(),
            _ => {}
        }
    });
}

/// Formats `line` and queues it for the log thread. Does nothing when logging was not
/// set up by this process (benches, tests calling the library).
pub fn write(line: &AccessLine<'_>) {
    let Some(sink) = SINK.get() else { return };
    LOCAL.with(|local| {
        let Ok(mut local) = local.try_borrow_mut() else { return };
        let local = local.get_or_insert_with(|| Local {
            pending: Vec::with_capacity(512),
            writer: sink.writer.clone(),
            second: u64::MAX,
            second_text: [0; 20],
        });
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        if now.as_secs() != local.second {
            local.second = now.as_secs();
            let text = humantime::format_rfc3339_seconds(UNIX_EPOCH + std::time::Duration::from_secs(now.as_secs()));
            // "2026-12-05T13:58:45Z": the date and time, then '.' where the 'Z' was.
            let text = text.to_string();
            local.second_text[..19].copy_from_slice(&text.as_bytes()[..19]);
            local.second_text[19] = b'.';
        }
        let mut timestamp = [0u8; 27];
        timestamp[..20].copy_from_slice(&local.second_text);
        zero_padded(&mut timestamp[20..26], now.subsec_micros());
        timestamp[26] = b'Z';
        match sink.format {
            LogFormat::Text => text(&mut local.pending, &timestamp, line),
            LogFormat::Json => json(&mut local.pending, &timestamp, line),
        }
        if local.pending.len() >= FLUSH_AT || !BATCHED.with(Cell::get) {
            local.flush();
        }
    });
}

/// `2026-12-05T13:58:45.618765Z  INFO access: client=127.0.0.1 method=GET ... complete=true`
fn text(out: &mut Vec<u8>, timestamp: &[u8], l: &AccessLine<'_>) {
    out.extend_from_slice(timestamp);
    out.extend_from_slice(b"  INFO access:");
    fields(out, l, Style::Text);
    out.push(b'\n');
}

/// `{"timestamp":"...","level":"INFO","client":"127.0.0.1",...,"complete":true,"target":"access"}`
fn json(out: &mut Vec<u8>, timestamp: &[u8], l: &AccessLine<'_>) {
    out.extend_from_slice(b"{\"timestamp\":\"");
    out.extend_from_slice(timestamp);
    out.extend_from_slice(b"\",\"level\":\"INFO\"");
    fields(out, l, Style::Json);
    out.extend_from_slice(b",\"target\":\"access\"}\n");
}

/// How a format writes a field, as `tracing`'s does: text writes `%`-fields (client,
/// method, path) as they are and `&str` fields quoted by `Debug`; JSON quotes them all.
#[derive(Clone, Copy)]
enum Style {
    Text,
    Json,
}

impl Style {
    fn key(self, out: &mut Vec<u8>, name: &str) {
        match self {
            Style::Text => out.push(b' '),
            Style::Json => out.extend_from_slice(b",\""),
        }
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(match self {
            Style::Text => b"=",
            Style::Json => b"\":",
        });
    }

    /// A field `tracing` records with `%` (its `Display`).
    fn shown(self, out: &mut Vec<u8>, s: &str) {
        match self {
            Style::Text => out.extend_from_slice(s.as_bytes()),
            Style::Json => json_str(out, s),
        }
    }

    /// A `%`-field written by `write`, whose output needs no escaping (an address).
    fn shown_with(self, out: &mut Vec<u8>, write: impl FnOnce(&mut Vec<u8>)) {
        match self {
            Style::Text => write(out),
            Style::Json => {
                out.push(b'"');
                write(out);
                out.push(b'"');
            }
        }
    }

    /// A `&str` field.
    fn quoted(self, out: &mut Vec<u8>, s: &str) {
        match self {
            Style::Text => debug_str(out, s),
            Style::Json => json_str(out, s),
        }
    }
}

/// The fields, in the order the access log has always had them.
fn fields(out: &mut Vec<u8>, l: &AccessLine<'_>, style: Style) {
    style.key(out, "client");
    style.shown_with(out, |out| ip(out, l.client));
    style.key(out, "method");
    style.shown(out, l.method);
    style.key(out, "path");
    style.shown(out, l.path);
    style.key(out, "status");
    number(out, u64::from(l.status));
    style.key(out, "upstream");
    style.quoted(out, l.upstream);
    style.key(out, "backend");
    style.quoted(out, l.backend);
    style.key(out, "duration_ms");
    millis(out, l.duration_micros);
    style.key(out, "bytes");
    number(out, l.bytes);
    style.key(out, "request_id");
    style.quoted(out, l.request_id);
    style.key(out, "trace_id");
    style.quoted(out, l.trace_id);
    style.key(out, "complete");
    out.extend_from_slice(if l.complete { b"true" } else { b"false" });
}

fn number(out: &mut Vec<u8>, n: u64) {
    out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
}

/// `n` in exactly `out.len()` decimal digits.
fn zero_padded(out: &mut [u8], mut n: u32) {
    for digit in out.iter_mut().rev() {
        *digit = b'0' + (n % 10) as u8;
        n /= 10;
    }
}

/// Microseconds as the shortest decimal of the milliseconds, as `f64`'s `Debug` writes a
/// value rounded to three places: `0.078`, `1.5`, `2.0`.
fn millis(out: &mut Vec<u8>, micros: u64) {
    number(out, micros / 1000);
    out.push(b'.');
    let mut frac = [0u8; 3];
    zero_padded(&mut frac, (micros % 1000) as u32);
    let digits = frac.iter().rposition(|&d| d != b'0').map_or(1, |last| last + 1);
    out.extend_from_slice(&frac[..digits]);
}

fn ip(out: &mut Vec<u8>, ip: IpAddr) {
    match ip {
        IpAddr::V4(v4) => {
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    out.push(b'.');
                }
                number(out, u64::from(octet));
            }
        }
        IpAddr::V6(v6) => {
            let _ = write!(out, "{v6}");
        }
    }
}

/// Printable ASCII but for `"` and `\`: written as it is inside quotes, by either format.
fn plain(s: &str) -> bool {
    s.bytes().all(|b| (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\')
}

/// A string as `Debug` quotes it (what `tracing` does with a `&str` field).
fn debug_str(out: &mut Vec<u8>, s: &str) {
    if plain(s) {
        out.push(b'"');
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
    } else {
        let _ = write!(out, "{s:?}");
    }
}

/// A string as a JSON string.
fn json_str(out: &mut Vec<u8>, s: &str) {
    if plain(s) {
        out.push(b'"');
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
    } else {
        let _ = serde_json::to_writer(&mut *out, s);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// The line as `tracing`'s `fmt` layer wrote it before this module existed.
    fn reference(l: &AccessLine<'_>, json: bool) -> String {
        let out = Captured::default();
        let writer = out.clone();
        let builder = tracing_subscriber::fmt().with_writer(move || writer.clone()).with_ansi(false);
        let event = || {
            tracing::info!(
                target: "access",
                client = %l.client,
                method = %l.method,
                path = %l.path,
                status = l.status,
                upstream = l.upstream,
                backend = l.backend,
                duration_ms = (l.duration_micros as f64 / 1000.0 * 1000.0).round() / 1000.0,
                bytes = l.bytes,
                request_id = l.request_id,
                trace_id = l.trace_id,
                complete = l.complete,
            )
        };
        if json {
            tracing::subscriber::with_default(builder.json().flatten_event(true).finish(), event);
        } else {
            tracing::subscriber::with_default(builder.finish(), event);
        }
        String::from_utf8(out.0.lock().unwrap().clone()).unwrap()
    }

    /// The line without its timestamp, which is checked apart.
    fn ours(l: &AccessLine<'_>, json: bool) -> String {
        let stamp = b"2026-12-05T13:58:45.018765Z";
        let mut out = Vec::new();
        if json {
            super::json(&mut out, stamp, l)
        } else {
            super::text(&mut out, stamp, l)
        }
        String::from_utf8(out).unwrap()
    }

    fn without_timestamp(line: &str) -> String {
        let at = line.find("2026-").or_else(|| line.find(char::is_numeric)).unwrap();
        format!("{}{}", &line[..at], &line[at + 27..])
    }

    #[test]
    fn lines_are_what_tracing_fmt_writes() {
        let base = AccessLine {
            client: "127.0.0.1".parse().unwrap(),
            method: "GET",
            path: "/x?y=1",
            status: 200,
            upstream: "app",
            backend: "http://127.0.0.1:18000",
            duration_micros: 393,
            bytes: 44,
            request_id: "ea2ac393cd7566bf00000000",
            trace_id: "1e1828ec3c256d95fc7f48ea8c3e02c2",
            complete: true,
        };
        let cases = [
            base,
            AccessLine { duration_micros: 0, complete: false, status: 502, ..base },
            AccessLine { duration_micros: 1000, bytes: 0, ..base },
            AccessLine { duration_micros: 1500, ..base },
            AccessLine { duration_micros: 12_345_078, ..base },
            AccessLine { duration_micros: 1, ..base },
            AccessLine { client: "::1".parse().unwrap(), ..base },
            AccessLine { client: "2001:db8::17".parse().unwrap(), method: "PURGE", ..base },
            AccessLine { request_id: "a\"b\\c\td", upstream: "-", backend: "-", ..base },
            AccessLine { upstream: "appé ☃", path: "/%20a b\"c", ..base },
            AccessLine { client: "10.255.0.9".parse().unwrap(), ..base },
        ];
        for case in &cases {
            for json in [false, true] {
                let expected = reference(case, json);
                let got = ours(case, json);
                assert_eq!(without_timestamp(&got), without_timestamp(&expected), "json: {json}");
                if json {
                    let v: serde_json::Value = serde_json::from_str(&got).unwrap();
                    assert_eq!(v["timestamp"], "2026-12-05T13:58:45.018765Z");
                }
            }
        }
    }

    #[test]
    fn timestamps_are_rfc3339_with_microseconds() {
        let (writer, _guard) = tracing_appender::non_blocking(std::io::sink());
        let _ = SINK.set(Sink { writer, format: LogFormat::Text });
        // Kept, so that the line can be read back.
        batch_here();
        let before = SystemTime::now();
        write(&AccessLine {
            client: "127.0.0.1".parse().unwrap(),
            method: "GET",
            path: "/",
            status: 200,
            upstream: "-",
            backend: "-",
            duration_micros: 5,
            bytes: 0,
            request_id: "-",
            trace_id: "-",
            complete: true,
        });
        let line = LOCAL.with(|l| String::from_utf8(l.borrow().as_ref().unwrap().pending.clone()).unwrap());
        let stamp = &line[..27];
        let parsed = humantime::parse_rfc3339(stamp).unwrap();
        let after = SystemTime::now();
        let floor = |t: SystemTime| t.duration_since(UNIX_EPOCH).unwrap().as_micros();
        assert!(floor(before) <= floor(parsed) && floor(parsed) <= floor(after), "{stamp}");
        assert!(line[27..].starts_with("  INFO access: client=127.0.0.1 method=GET path=/ "), "{line}");
    }
}
