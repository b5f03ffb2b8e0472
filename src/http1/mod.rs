//! HTTP/1.1 wire pieces shared by both sides of the proxy: the message-body decoder
//! (RFC 9112 section 7), a parsed head's fields as a `HeaderMap` that shares the read
//! buffer or as the raw lines, and the cached `Date` value.

pub mod client;
pub mod head_check;
pub mod server;

use std::cell::RefCell;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue};

/// The HTTP/2 connection preface (prior knowledge) starts with this; HTTP/1 has no `PRI`
/// method in use.
pub const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Any body's error, boxed: bodies of different sources meet in one type.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The longest chunk-size or trailer line accepted in a chunked body.
pub const MAX_LINE: usize = 4096;

/// Where a message body stands, from its framing to its end.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decoder {
    Length(u64),
    /// Until the peer closes (responses only).
    UntilClose,
    ChunkSize,
    ChunkData(u64),
    /// The CRLF after a chunk's data.
    ChunkEnd,
    Trailers,
    Done,
}

/// What [`Decoder::decode`] found in the buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded {
    Data(Bytes),
    /// The body is complete.
    End,
    /// More bytes must be read first.
    More,
}

/// A chunked body that breaks the grammar.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("malformed chunked body")]
pub struct Malformed;

impl Decoder {
    /// Takes the next piece of the body from the front of `buf`. Trailer fields are
    /// dropped.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Decoded, Malformed> {
        loop {
            match *self {
                Decoder::Done => return Ok(Decoded::End),
                Decoder::Length(0) => {
                    *self = Decoder::Done;
                    return Ok(Decoded::End);
                }
                Decoder::Length(n) | Decoder::ChunkData(n) => {
                    if buf.is_empty() {
                        return Ok(Decoded::More);
                    }
                    let take = (buf.len() as u64).min(n);
                    let data = buf.split_to(take as usize).freeze();
                    let left = n - take;
                    *self = match (*self, left) {
                        (Decoder::Length(_), 0) => Decoder::Done,
                        (Decoder::Length(_), left) => Decoder::Length(left),
                        (_, 0) => Decoder::ChunkEnd,
                        (_, left) => Decoder::ChunkData(left),
                    };
                    return Ok(Decoded::Data(data));
                }
                Decoder::UntilClose => {
                    if buf.is_empty() {
                        return Ok(Decoded::More);
                    }
                    return Ok(Decoded::Data(buf.split().freeze()));
                }
                Decoder::ChunkSize | Decoder::ChunkEnd | Decoder::Trailers => {
                    let Some(line) = take_line(buf) else {
                        if buf.len() > MAX_LINE {
                            return Err(Malformed);
                        }
                        return Ok(Decoded::More);
                    };
                    *self = match *self {
                        Decoder::ChunkSize => match parse_chunk_size(&line) {
                            Some(0) => Decoder::Trailers,
                            Some(n) => Decoder::ChunkData(n),
                            None => return Err(Malformed),
                        },
                        Decoder::ChunkEnd if line.is_empty() => Decoder::ChunkSize,
                        Decoder::ChunkEnd => return Err(Malformed),
                        _ if line.is_empty() => Decoder::Done,
                        _ => Decoder::Trailers,
                    };
                }
            }
        }
    }

    pub fn is_done(&self) -> bool {
        matches!(self, Decoder::Done | Decoder::Length(0))
    }

    /// The exact number of body bytes still to come, when the framing says.
    pub fn remaining(&self) -> Option<u64> {
        match self {
            Decoder::Length(n) => Some(*n),
            Decoder::Done => Some(0),
            _ => None,
        }
    }
}

/// Splits the next line (without its line end) off `buf`, if a whole one is there.
fn take_line(buf: &mut BytesMut) -> Option<Bytes> {
    let end = buf.iter().position(|b| *b == b'\n')?;
    let line = buf.split_to(end + 1).freeze();
    let len = if end > 0 && line[end - 1] == b'\r' { end - 1 } else { end };
    Some(line.slice(..len))
}

fn parse_chunk_size(line: &[u8]) -> Option<u64> {
    let digits = line.split(|b| *b == b';').next()?.trim_ascii();
    if digits.is_empty() || digits.len() > 15 {
        return None;
    }
    u64::from_str_radix(std::str::from_utf8(digits).ok()?, 16).ok()
}

/// Appends one `name: value` line of a head.
pub fn put_field(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// Where one field's name and value sit in a head buffer (start and end offsets).
pub type FieldSpan = (u32, u32, u32, u32);

/// The span of each of `fields` relative to `base` (the start of the buffer they were
/// parsed from), so the values can share the buffer's memory once it is frozen.
pub fn field_spans(base: *const u8, fields: &[httparse::Header<'_>], out: &mut [FieldSpan]) {
    let base = base as usize;
    for (span, h) in out.iter_mut().zip(fields) {
        let name = h.name.as_ptr() as usize - base;
        let value = h.value.as_ptr() as usize - base;
        *span = (name as u32, (name + h.name.len()) as u32, value as u32, (value + h.value.len()) as u32);
    }
}

/// A header map of the fields at `spans` in `head`; `extra` more fits without growing.
/// `None` if a name or value is not valid.
pub fn header_map(head: &Bytes, spans: &[FieldSpan], extra: usize) -> Option<HeaderMap> {
    let mut headers = HeaderMap::with_capacity(spans.len() + extra);
    for &(ns, ne, vs, ve) in spans {
        let name = HeaderName::from_bytes(&head[ns as usize..ne as usize]).ok()?;
        let value = HeaderValue::from_maybe_shared(head.slice(vs as usize..ve as usize)).ok()?;
        headers.append(name, value);
    }
    Some(headers)
}

/// Up to this many fields a map is scanned by [`values`]; past it, looked up by its hash.
const SCAN_UP_TO: usize = 8;

/// The values of `name` in `headers`. With a few fields, as most requests have, a scan of
/// the names costs a fraction of the map's hashed lookup (110-170 instructions each by
/// callgrind, and a request made several); with many, the lookup is used.
pub fn values<'a, 'n>(headers: &'a HeaderMap, name: &'n HeaderName) -> Values<'a, 'n> {
    if headers.len() <= SCAN_UP_TO {
        Values::Scan(headers.iter(), name)
    } else {
        Values::Hashed(headers.get_all(name).into_iter())
    }
}

/// The first value of `name` in `headers` (see [`values`]).
pub fn value<'a>(headers: &'a HeaderMap, name: &HeaderName) -> Option<&'a HeaderValue> {
    values(headers, name).next()
}

/// The values [`values`] finds, by either way.
pub enum Values<'a, 'n> {
    Scan(http::header::Iter<'a, HeaderValue>, &'n HeaderName),
    Hashed(http::header::ValueIter<'a, HeaderValue>),
}

impl<'a> Iterator for Values<'a, '_> {
    type Item = &'a HeaderValue;

    fn next(&mut self) -> Option<&'a HeaderValue> {
        match self {
            Values::Scan(fields, name) => fields.find(|(n, _)| n == name).map(|(_, v)| v),
            Values::Hashed(found) => found.next(),
        }
    }
}

/// The items of a comma-separated field value (`Connection`, `Transfer-Encoding`),
/// trimmed, empty ones skipped.
pub fn tokens(value: &[u8]) -> impl DoubleEndedIterator<Item = &[u8]> {
    value.split(|b| *b == b',').map(<[u8]>::trim_ascii).filter(|t| !t.is_empty())
}

/// A response head's fields as the backend sent them, kept as bytes. Passed through to an
/// HTTP/1 client without building a `HeaderMap` (its server writes them from here); a map
/// is built only for the clients hyper serves. httparse has accepted every line.
#[derive(Clone, Debug)]
pub struct RawFields {
    /// The field lines, each ending in LF (CRLF, or a bare LF as received).
    lines: Bytes,
    /// How many fields: room to reserve in a map.
    count: usize,
    /// Leave out `Content-Length`: a `Transfer-Encoding` beside it frames the body, and the
    /// length means nothing (RFC 9112 section 6.3).
    skip_length: bool,
}

impl RawFields {
    pub fn new(lines: Bytes, count: usize, skip_length: bool) -> RawFields {
        RawFields { lines, count, skip_length }
    }

    /// Each field's name (as sent) and value (trimmed), in order. Line ends and colons
    /// are found by `memchr`: a byte-by-byte search of every field line, twice, was a
    /// few hundred instructions of each proxied response.
    pub fn iter(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        let lines = &self.lines[..];
        let mut at = 0;
        std::iter::from_fn(move || {
            while at < lines.len() {
                let end = memchr::memchr(b'\n', &lines[at..]).map_or(lines.len(), |i| at + i);
                let line = &lines[at..end];
                at = end + 1;
                let Some(colon) = memchr::memchr(b':', line) else { continue };
                let name = &line[..colon];
                if self.skip_length && name.eq_ignore_ascii_case(b"content-length") {
                    continue;
                }
                return Some((name, line[colon + 1..].trim_ascii()));
            }
            None
        })
    }

    /// The fields as a map whose values share the head's memory; `extra` more fit without
    /// growing. `None` if a name or value is not valid for `http` (httparse's rules are the
    /// same, so this does not happen for a head it parsed).
    pub fn to_header_map(&self, extra: usize) -> Option<HeaderMap> {
        let mut headers = HeaderMap::with_capacity(self.count + extra);
        for (name, value) in self.iter() {
            let name = HeaderName::from_bytes(name).ok()?;
            headers.append(name, HeaderValue::from_maybe_shared(self.lines.slice_ref(value)).ok()?);
        }
        Some(headers)
    }
}

/// Today's `Date` header value, formatted at most once a second per thread.
pub fn date() -> HeaderValue {
    thread_local! {
        static CACHE: RefCell<(u64, HeaderValue)> =
            const { RefCell::new((u64::MAX, HeaderValue::from_static(""))) };
    }
    let now = SystemTime::now();
    let secs = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    CACHE.with(|c| {
        let mut c = c.borrow_mut();
        if c.0 != secs {
            let text = httpdate::fmt_http_date(now);
            *c = (secs, HeaderValue::from_str(&text).expect("an HTTP date is a valid header value"));
        }
        c.1.clone()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `is_hop_by_hop` says what a search of `HOP_BY_HOP` says, in any case.
    #[test]
    fn hop_by_hop_by_length_agrees_with_the_list() {
        let others = ["date", "content-length", "x-request-id", "trailers", "tee", "connections", "keep-alive2"];
        for name in HOP_BY_HOP.iter().chain(&others) {
            let listed = HOP_BY_HOP.contains(name);
            assert_eq!(is_hop_by_hop(name.as_bytes()), listed, "{name}");
            assert_eq!(is_hop_by_hop(name.to_ascii_uppercase().as_bytes()), listed, "{name}");
        }
        // Every other name of a listed length.
        for len in [2usize, 7, 10, 16, 17, 18, 19] {
            assert!(!is_hop_by_hop("x".repeat(len).as_bytes()));
        }
    }

    /// A scan and the hashed lookup find the same values, in the same order.
    #[test]
    fn values_by_scan_and_by_hash_agree() {
        for fields in [2, SCAN_UP_TO, SCAN_UP_TO + 1, 20] {
            let mut map = HeaderMap::new();
            for i in 0..fields {
                let name = match i % 3 {
                    0 => HeaderName::from_static("connection"),
                    1 => HeaderName::from_static("x-request-id"),
                    _ => HeaderName::from_bytes(format!("x-other-{i}").as_bytes()).unwrap(),
                };
                map.append(name, HeaderValue::from_str(&i.to_string()).unwrap());
            }
            for name in ["connection", "x-request-id", "x-other-2", "upgrade"] {
                let name = HeaderName::from_static(name);
                let scanned: Vec<_> = values(&map, &name).collect();
                let hashed: Vec<_> = map.get_all(&name).iter().collect();
                assert_eq!(scanned, hashed, "{name} in {fields} fields");
                assert_eq!(value(&map, &name), map.get(&name));
            }
        }
    }

    #[test]
    fn lines_and_chunk_sizes() {
        let mut b = BytesMut::from(&b"1a;ext=1\r\nrest"[..]);
        let line = take_line(&mut b).unwrap();
        assert_eq!(parse_chunk_size(&line), Some(26));
        assert_eq!(&b[..], b"rest");
        assert_eq!(take_line(&mut b), None);
        assert_eq!(parse_chunk_size(b"zz"), None);
        assert_eq!(parse_chunk_size(b""), None);
    }

    #[test]
    fn chunked_bodies_decode_across_reads() {
        let wire = b"5;x=1\r\nhello\r\n6\r\n world\r\n0\r\nTrailer: t\r\n\r\nNEXT";
        for split in 0..wire.len() {
            let mut d = Decoder::ChunkSize;
            let mut buf = BytesMut::from(&wire[..split]);
            let mut body = Vec::new();
            let mut fed = false;
            loop {
                match d.decode(&mut buf).unwrap() {
                    Decoded::Data(b) => body.extend_from_slice(&b),
                    Decoded::End => break,
                    Decoded::More => {
                        assert!(!fed, "stuck at split {split}");
                        buf.extend_from_slice(&wire[split..]);
                        fed = true;
                    }
                }
            }
            if !fed {
                buf.extend_from_slice(&wire[split..]);
            }
            assert_eq!(body, b"hello world");
            assert_eq!(&buf[..], b"NEXT");
        }
        let mut d = Decoder::ChunkSize;
        assert_eq!(d.decode(&mut BytesMut::from(&b"5\r\nhelloX\r\n"[..])), Ok(Decoded::Data(Bytes::from("hello"))));
    }

    #[test]
    fn dates_are_http_dates() {
        let d = date();
        assert_eq!(d.len(), 29);
        assert!(d.to_str().unwrap().ends_with(" GMT"));
    }

    #[test]
    fn raw_fields_read_as_sent_and_as_a_map() {
        let lines = Bytes::from_static(
            b"Content-Type:  text/plain \r\nX-Empty:\r\nContent-Length: 5\nTransfer-Encoding: chunked\r\n\r\n",
        );
        let raw = RawFields::new(lines.clone(), 4, false);
        let got: Vec<_> = raw.iter().collect();
        assert_eq!(
            got,
            [
                (&b"Content-Type"[..], &b"text/plain"[..]),
                (b"X-Empty", b""),
                (b"Content-Length", b"5"),
                (b"Transfer-Encoding", b"chunked")
            ]
        );
        let map = RawFields::new(lines, 4, true).to_header_map(0).unwrap();
        assert_eq!(map.len(), 3, "{map:?}");
        assert_eq!(map["content-type"], "text/plain");
        assert_eq!(map["x-empty"], "");
        assert!(!map.contains_key("content-length"), "a length beside a transfer coding is left out");
        assert_eq!(tokens(b" close ,, Keep-Alive").collect::<Vec<_>>(), [&b"close"[..], b"Keep-Alive"]);
    }
}

/// A chunk-size line: `len` in hex, then CRLF, without formatting machinery.
pub fn chunk_size_line(len: usize) -> ChunkSizeLine {
    let mut line = ChunkSizeLine { bytes: [0; 18], len: 0 };
    let digits = (usize::BITS - (len | 1).leading_zeros()).div_ceil(4) as usize;
    for i in 0..digits {
        line.bytes[digits - 1 - i] = b"0123456789abcdef"[(len >> (4 * i)) & 0xf];
    }
    line.bytes[digits] = b'\r';
    line.bytes[digits + 1] = b'\n';
    line.len = digits + 2;
    line
}

/// See [`chunk_size_line`].
pub struct ChunkSizeLine {
    bytes: [u8; 18],
    len: usize,
}

impl ChunkSizeLine {
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

/// A request target as the client sent it, when it had bytes above 0x7F: forwarded
/// unchanged, while the request's `Uri` (for routing) has them percent-encoded.
#[derive(Clone, Debug)]
pub struct RawTarget(pub Bytes);

/// `raw` with every byte above 0x7F percent-encoded.
pub fn percent_encode_non_ascii(raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(raw.len() + 16);
    for &b in raw {
        if b.is_ascii() {
            out.push(b);
        } else {
            out.extend_from_slice(&[
                b'%',
                b"0123456789ABCDEF"[usize::from(b >> 4)],
                b"0123456789ABCDEF"[usize::from(b & 15)],
            ]);
        }
    }
    out
}

/// Reads from a stream some of whose bytes were already taken off it: `prefix` first,
/// then `io` (an upgraded connection, an HTTP/2 connection found by its preface).
pub fn poll_read_prefixed<T: tokio::io::AsyncRead + Unpin>(
    prefix: &mut impl bytes::Buf,
    io: &mut T,
    cx: &mut std::task::Context<'_>,
    out: &mut tokio::io::ReadBuf<'_>,
) -> std::task::Poll<std::io::Result<()>> {
    if prefix.has_remaining() {
        let n = prefix.remaining().min(out.remaining());
        out.put_slice(&prefix.chunk()[..n.min(prefix.chunk().len())]);
        prefix.advance(n.min(prefix.chunk().len()));
        return std::task::Poll::Ready(Ok(()));
    }
    std::pin::Pin::new(io).poll_read(cx, out)
}

/// Reads what `io` has into `buf`, first making room (`room` more) when less than 1 KiB is
/// left: heads are read in small steps, bodies in larger ones.
pub fn poll_fill<T: tokio::io::AsyncRead + Unpin>(
    io: &mut T,
    buf: &mut BytesMut,
    room: usize,
    cx: &mut std::task::Context<'_>,
) -> std::task::Poll<std::io::Result<usize>> {
    if buf.capacity() - buf.len() < 1024 {
        buf.reserve(room);
    }
    tokio_util::io::poll_read_buf(std::pin::Pin::new(io), cx, buf)
}

/// How many bytes of empty lines (CR and LF) start `buf`: before a start line they are
/// ignored (RFC 9112 2.2).
pub fn blank_lines(buf: &[u8]) -> usize {
    buf.iter().take_while(|b| matches!(b, b'\r' | b'\n')).count()
}

#[cfg(test)]
mod chunk_tests {
    #[test]
    fn chunk_size_lines_are_hex() {
        for n in [1usize, 9, 10, 15, 16, 255, 4096, 65535, 1 << 20] {
            assert_eq!(super::chunk_size_line(n).as_bytes(), format!("{n:x}\r\n").as_bytes());
        }
    }
}

/// Headers that describe one connection, never forwarded.
pub const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "proxy-authorization",
    "proxy-authenticate",
];

/// Whether `name` (in any case) is one of [`HOP_BY_HOP`]. Told by its length first: most
/// names are then not compared at all, where a search of the list made nine comparisons
/// per field of every request and response.
pub fn is_hop_by_hop(name: &[u8]) -> bool {
    let is = |known: &str| name.eq_ignore_ascii_case(known.as_bytes());
    match name.len() {
        2 => is("te"),
        7 => is("trailer") || is("upgrade"),
        10 => is("connection") || is("keep-alive"),
        16 => is("proxy-connection"),
        17 => is("transfer-encoding"),
        18 => is("proxy-authenticate"),
        19 => is("proxy-authorization"),
        _ => false,
    }
}
