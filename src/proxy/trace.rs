//! W3C trace context (`traceparent`, `tracestate`): a valid incoming `traceparent` is
//! continued with balancer's own span as the parent (same trace id, a new parent id, the
//! flags kept) and its `tracestate` passed on; without one, or with a malformed one,
//! balancer starts a trace (a random trace id, sampled) and drops any `tracestate`, which
//! belonged to a trace no longer continued.
//!
//! A context is 74 bytes on the stack: parsing, making ids and writing the header allocate
//! nothing.

use std::cell::Cell;
use std::hash::{BuildHasher, RandomState};

use http::HeaderMap;
use http::header::HeaderName;

pub static TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
pub static TRACESTATE: HeaderName = HeaderName::from_static("tracestate");

/// The context sent to the backend: `00-{trace_id}-{span_id}-{flags}`, as lower-case hex.
#[derive(Clone, Copy, Debug)]
pub struct TraceContext {
    trace_id: [u8; 32],
    /// Balancer's own span: the backend's parent.
    span_id: [u8; 16],
    /// The client's span (balancer's parent), when `continued`; zeros otherwise.
    parent_id: [u8; 16],
    flags: [u8; 2],
    /// The client sent a valid `traceparent`: this continues its trace, and its
    /// `tracestate` goes along.
    pub continued: bool,
}

impl TraceContext {
    /// Continues the client's trace when its `traceparent` is valid, else starts one.
    pub fn from_headers(headers: &HeaderMap) -> TraceContext {
        let mut all = crate::http1::values(headers, &TRACEPARENT);
        let parent = match (all.next(), all.next()) {
            (Some(v), None) => parse(v.as_bytes()),
            // None, or several: not a trace to continue.
            _ => None,
        };
        let span_id = hex16(nonzero_random());
        match parent {
            Some((trace_id, parent_id, flags)) => TraceContext { trace_id, span_id, parent_id, flags, continued: true },
            None => {
                let mut trace_id = [0u8; 32];
                trace_id[..16].copy_from_slice(&hex16(nonzero_random()));
                trace_id[16..].copy_from_slice(&hex16(random()));
                TraceContext { trace_id, span_id, parent_id: [b'0'; 16], flags: *b"01", continued: false }
            }
        }
    }

    /// The trace id, 32 lower-case hex digits (for the access log).
    pub fn trace_id(&self) -> &str {
        std::str::from_utf8(&self.trace_id).unwrap_or("-")
    }

    /// Balancer's span id, 16 lower-case hex digits.
    pub fn span_id(&self) -> &str {
        std::str::from_utf8(&self.span_id).unwrap_or("-")
    }

    /// The ids as hex digits (trace, balancer's span, the client's span when continued),
    /// for a span exported over OTLP.
    pub fn ids(&self) -> ([u8; 32], [u8; 16], Option<[u8; 16]>) {
        (self.trace_id, self.span_id, self.continued.then_some(self.parent_id))
    }

    /// The sampled flag: whether whoever started the trace records it (a span is exported
    /// only then, as an OpenTelemetry SDK's default parent-based sampler does).
    pub fn sampled(&self) -> bool {
        HEX_VALUE[usize::from(self.flags[1])] & 1 == 1
    }

    /// Appends `traceparent: 00-...\r\n`.
    pub fn write_field(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(b"traceparent: 00-");
        out.extend_from_slice(&self.trace_id);
        out.push(b'-');
        out.extend_from_slice(&self.span_id);
        out.push(b'-');
        out.extend_from_slice(&self.flags);
        out.extend_from_slice(b"\r\n");
    }
}

/// The trace id and flags of a valid `traceparent` (W3C Trace Context, level 1 section
/// 3.2): `version-traceid-parentid-flags` in lower-case hex; version `ff` is invalid; a
/// version above `00` is read as `00` where it may carry more after a `-`; all-zero ids
/// are invalid.
fn parse(v: &[u8]) -> Option<([u8; 32], [u8; 16], [u8; 2])> {
    let head: &[u8; 55] = v.get(..55)?.try_into().ok()?;
    let version = &head[..2];
    let exact = version == b"00";
    if version == b"ff" || (exact && v.len() != 55) || (!exact && v.len() > 55 && v[55] != b'-') {
        return None;
    }
    // One pass without branches: '-' at 2, 35 and 52, lower-case hex everywhere else.
    let mut bad = false;
    for (i, &b) in head.iter().enumerate() {
        bad |= if matches!(i, 2 | 35 | 52) { b != b'-' } else { !LOWER_HEX[usize::from(b)] };
    }
    let (trace, parent) = (&head[3..35], &head[36..52]);
    if bad || trace == [b'0'; 32] || parent == [b'0'; 16] {
        return None;
    }
    Some((trace.try_into().ok()?, parent.try_into().ok()?, [head[53], head[54]]))
}

/// Which bytes are lower-case hex digits (upper case is invalid in `traceparent`).
const LOWER_HEX: [bool; 256] = {
    let mut table = [false; 256];
    let mut b = 0;
    while b < 256 {
        table[b] = matches!(b as u8, b'0'..=b'9' | b'a'..=b'f');
        b += 1;
    }
    table
};

/// Each lower-case hex digit's value (0 for any other byte).
const HEX_VALUE: [u8; 256] = {
    let mut table = [0u8; 256];
    let mut b = 0;
    while b < 256 {
        table[b] = match b as u8 {
            d @ b'0'..=b'9' => d - b'0',
            d @ b'a'..=b'f' => d - b'a' + 10,
            _ => 0,
        };
        b += 1;
    }
    table
};

/// Each byte's two lower-case hex digits.
const HEX_PAIRS: [[u8; 2]; 256] = {
    let digits = b"0123456789abcdef";
    let mut table = [[0u8; 2]; 256];
    let mut b = 0;
    while b < 256 {
        table[b] = [digits[b >> 4], digits[b & 0xf]];
        b += 1;
    }
    table
};

fn hex16(n: u64) -> [u8; 16] {
    let mut out = [0u8; 16];
    for (pair, byte) in out.chunks_exact_mut(2).zip(n.to_be_bytes()) {
        pair.copy_from_slice(&HEX_PAIRS[usize::from(byte)]);
    }
    out
}

/// 64 random bits from a per-thread generator (SplitMix64 over a randomly seeded state):
/// ids need to be unique, not secret, and a lock or a syscall per request costs more.
fn random() -> u64 {
    thread_local! {
        static STATE: Cell<u64> = Cell::new(RandomState::new().hash_one(std::thread::current().id()));
    }
    STATE.with(|s| {
        let x = s.get().wrapping_add(0x9e37_79b9_7f4a_7c15);
        s.set(x);
        let mut z = x;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    })
}

fn nonzero_random() -> u64 {
    random().max(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn lower_hex(s: &[u8]) -> bool {
        s.iter().all(|&b| LOWER_HEX[usize::from(b)])
    }

    const VALID: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    fn ctx(values: &[&str]) -> TraceContext {
        let mut h = HeaderMap::new();
        for v in values {
            h.append(&TRACEPARENT, HeaderValue::from_str(v).unwrap());
        }
        TraceContext::from_headers(&h)
    }

    fn written(c: &TraceContext) -> String {
        let mut out = Vec::new();
        c.write_field(&mut out);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn a_valid_parent_is_continued_with_a_new_span() {
        let c = ctx(&[VALID]);
        assert!(c.continued && c.sampled());
        assert_eq!(c.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(
            c.ids().2.as_ref().map(|p| &p[..]),
            Some(&b"00f067aa0ba902b7"[..]),
            "the client's span is the parent"
        );
        assert!(!ctx(&[&VALID.replace("-01", "-00")]).sampled());
        assert_ne!(c.span_id(), "00f067aa0ba902b7");
        assert_eq!(written(&c), format!("traceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-{}-01\r\n", c.span_id()));
        assert!(written(&ctx(&[&VALID.replace("-01", "-00")])).ends_with("-00\r\n"), "flags kept");
        // A later version is read as 00 and sent as 00.
        let c = ctx(&[&format!("{}-extra", VALID.replacen("00", "cc", 1))]);
        assert!(c.continued && written(&c).starts_with("traceparent: 00-4bf92f"));
    }

    #[test]
    fn malformed_parents_start_a_new_trace() {
        let bad = [
            VALID.replacen("00", "ff", 1),                                      // version ff
            VALID.replacen("00", "0g", 1),                                      // non-hex version
            format!("{VALID}-"),                                                // 00 with more
            VALID[..54].to_owned(),                                             // short
            VALID.replace("4bf92f", "4bf92"),                                   // short trace id
            VALID.replace("00f067", "00f0670"),                                 // long parent id
            VALID.replace("4bf92f", "4BF92F"),                                  // upper case
            VALID.replace("4bf92f3577b34da6a3ce929d0e0e4736", &"0".repeat(32)), // zero trace
            VALID.replace("00f067aa0ba902b7", &"0".repeat(16)),                 // zero parent
            VALID.replace("-01", "-0x"),                                        // bad flags
            VALID.replace('-', "_"),                                            // separators
            VALID.replacen("00", "cc", 1) + "x",                                // later version, no '-'
        ];
        for b in &bad {
            let c = ctx(&[b]);
            assert!(!c.continued, "{b} was accepted");
            assert_ne!(c.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736");
            assert!(c.trace_id().len() == 32 && lower_hex(c.trace_id().as_bytes()));
            assert!(written(&c).ends_with("-01\r\n"));
        }
        assert!(!ctx(&[VALID, VALID]).continued, "two traceparent fields");
        let (a, b) = (ctx(&[]), ctx(&[]));
        assert!(!a.continued && a.sampled() && a.ids().2.is_none());
        assert_ne!(a.trace_id(), b.trace_id());
        assert_ne!(a.span_id(), b.span_id());
    }
}
