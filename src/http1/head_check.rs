//! Refusing request heads whose framing is ambiguous before hyper reads them, so that
//! nothing a front or back server could read differently is ever forwarded: both
//! `Content-Length` and `Transfer-Encoding`, differing or malformed lengths, any
//! transfer coding but a plain `chunked`, bare LF line ends, folded headers.

/// Where the head in `buf` ends (index just past the blank line), if it is complete.
/// A bare-LF blank line counts as an end, so that `check` can refuse it.
pub fn head_end(buf: &[u8], from: usize) -> Option<usize> {
    let start = from.saturating_sub(3);
    // memchr: line ends are found many bytes at a time, not one by one.
    for i in memchr::memchr_iter(b'\n', buf.get(start..)?).map(|i| i + start) {
        match buf.get(i + 1) {
            Some(b'\n') => return Some(i + 2),
            Some(b'\r') if buf.get(i + 2) == Some(&b'\n') => return Some(i + 3),
            _ => {}
        }
    }
    None
}

/// Whether `buf` (after any empty lines) starts like a request line: an upper-case
/// method token and a space. Used to tell a whole head from the tail of one.
pub fn starts_with_request_line(buf: &[u8]) -> bool {
    let start = buf.iter().position(|b| *b != b'\r' && *b != b'\n').unwrap_or(buf.len());
    let rest = &buf[start..];
    let method = rest.iter().take_while(|b| b.is_ascii_uppercase()).count();
    (1..=20).contains(&method) && rest.get(method) == Some(&b' ')
}

/// Why a transfer coding other than a single `chunked` is refused.
pub const ONLY_CHUNKED: &str = "unsupported Transfer-Encoding (only a single \"chunked\" is accepted)";

/// The most headers a request may have (hyper's limit too); more is a 431.
pub const MAX_HEADERS: usize = 1024;

/// Why a head is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reject {
    /// 400, with the reason.
    BadRequest(&'static str),
    /// 431: more than [`MAX_HEADERS`] headers, or more bytes than the limit.
    TooLarge,
    /// 414: the request line alone is longer than the limit.
    UriTooLong,
    /// 505: an HTTP major version other than 1.
    VersionNotSupported,
}

/// Why a head of more than `max` bytes is refused: 414 when its request line alone is
/// that long (RFC 9110 15.5.15, as nginx answers), else 431.
pub fn oversized(head: &[u8], max: usize) -> Reject {
    let start = super::blank_lines(head);
    match head[start..].iter().position(|&b| b == b'\n') {
        Some(line) if line <= max => Reject::TooLarge,
        _ => Reject::UriTooLong,
    }
}

/// Makes a request line's version one httparse reads, in place: `HTTP/1.x` with x above 1
/// is served as HTTP/1.1 (RFC 9110 2.5); another major version is a 505. Called only
/// when httparse refused the version.
pub fn settle_version(head: &mut [u8]) -> Result<(), Reject> {
    let start = super::blank_lines(head);
    let end = head[start..].iter().position(|&b| b == b'\r' || b == b'\n').map_or(head.len(), |e| start + e);
    let line = &mut head[start..end];
    let Some(at) = line.iter().rposition(|&b| b == b' ') else {
        return Err(Reject::BadRequest("malformed request line"));
    };
    match &mut line[at + 1..] {
        [b'H', b'T', b'T', b'P', b'/', b'1', b'.', minor] if minor.is_ascii_digit() => {
            *minor = b'1';
            Ok(())
        }
        [b'H', b'T', b'T', b'P', b'/', major, b'.', minor] if major.is_ascii_digit() && minor.is_ascii_digit() => {
            Err(Reject::VersionNotSupported)
        }
        [b'H', b'T', b'T', b'P', b'/', major] if major.is_ascii_digit() => Err(Reject::VersionNotSupported),
        _ => Err(Reject::BadRequest("malformed request line")),
    }
}

/// How the body after an accepted head is framed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Body {
    Length(u64),
    Chunked,
    /// The connection is being upgraded (or is a CONNECT): what follows is not HTTP.
    Upgrade,
}

/// The framing of a complete head, or why it must be refused.
pub fn check(head: &[u8]) -> Result<Body, Reject> {
    check_line_ends(head)?;
    let mut headers = [const { std::mem::MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut []);
    match req.parse_with_uninit_headers(head, &mut headers) {
        Ok(httparse::Status::Complete(_)) => {}
        Err(httparse::Error::TooManyHeaders) => return Err(Reject::TooLarge),
        Ok(httparse::Status::Partial) | Err(_) => return Err(Reject::BadRequest("malformed request head")),
    }
    let (body, upgrade) = framing_of(&req)?;
    Ok(if upgrade { Body::Upgrade } else { body })
}

/// Every LF must end a CRLF pair (leading empty lines included).
pub fn check_line_ends(head: &[u8]) -> Result<(), Reject> {
    // The LFs found by `memchr` (vector code), then the byte before each: a dozen checks
    // for a usual head, where counting LFs and CRLF pairs took two passes of ~200
    // instructions each.
    for i in memchr::memchr_iter(b'\n', head) {
        if i == 0 || head[i - 1] != b'\r' {
            return Err(Reject::BadRequest("bare LF in the request head"));
        }
    }
    Ok(())
}

/// The body framing of a parsed head (`Length` or `Chunked`), and whether it asks to
/// leave HTTP (an `Upgrade` header, or CONNECT); or why it must be refused.
pub fn framing_of(req: &httparse::Request<'_, '_>) -> Result<(Body, bool), Reject> {
    let mut content_length: Option<&[u8]> = None;
    let mut transfer_encodings = 0;
    let mut upgrade = req.method == Some("CONNECT");
    for h in req.headers.iter() {
        if h.name.eq_ignore_ascii_case("content-length") {
            let v = trim(h.value);
            if v.is_empty() || !v.iter().all(u8::is_ascii_digit) || v.len() > 19 {
                return Err(Reject::BadRequest("invalid Content-Length"));
            }
            match content_length {
                Some(prev) if prev != v => return Err(Reject::BadRequest("conflicting Content-Length headers")),
                _ => content_length = Some(v),
            }
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            transfer_encodings += 1;
            if !trim(h.value).eq_ignore_ascii_case(b"chunked") {
                return Err(Reject::BadRequest(ONLY_CHUNKED));
            }
        } else if h.name.eq_ignore_ascii_case("upgrade") {
            upgrade = true;
        }
    }
    if transfer_encodings > 1 {
        return Err(Reject::BadRequest("repeated Transfer-Encoding header"));
    }
    if transfer_encodings == 1 && content_length.is_some() {
        return Err(Reject::BadRequest("both Content-Length and Transfer-Encoding are set"));
    }
    if transfer_encodings == 1 && req.version == Some(0) {
        return Err(Reject::BadRequest("Transfer-Encoding in an HTTP/1.0 request"));
    }
    if transfer_encodings == 1 {
        return Ok((Body::Chunked, upgrade));
    }
    let len = content_length.map_or(Some(0), |v| std::str::from_utf8(v).ok().and_then(|v| v.parse().ok()));
    len.map(|n| (Body::Length(n), upgrade)).ok_or(Reject::BadRequest("invalid Content-Length"))
}

/// Follows the message boundaries of the bytes a client sends on one HTTP/1 connection, so
/// that every request head is checked, pipelined or split across reads, not just the first.
/// Where it cannot follow (anything odd inside a chunked body), it stops checking rather
/// than risk refusing a good request; hyper's own parser still applies.
#[derive(Debug)]
pub struct Framing {
    state: State,
    /// The head being received. Reused from request to request.
    head: Vec<u8>,
    max_head: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Head,
    Body(u64),
    /// Inside a chunk-size line (`size` so far, whether digits ended).
    ChunkSize {
        size: u64,
        digits: bool,
        ended: bool,
    },
    ChunkData(u64),
    /// After a chunk's data: its CRLF.
    ChunkEnd,
    /// Trailer lines after the last chunk; `empty` while the current line has no bytes.
    Trailers {
        empty: bool,
    },
    Off,
}

impl Framing {
    pub fn new(max_head: usize) -> Framing {
        Framing { state: State::Head, head: Vec::new(), max_head }
    }

    /// Whether every byte seen so far belongs to complete requests (nothing of a next one
    /// has arrived), and checking is still on.
    pub fn at_boundary(&self) -> bool {
        self.state == State::Head && self.head.is_empty()
    }

    /// Stops checking (after an upgrade, or on HTTP/2).
    pub fn stop(&mut self) {
        self.state = State::Off;
        self.head = Vec::new();
    }

    /// Follows `data`, the next bytes from the client. On a refused head, returns where in
    /// `data` that head starts (0 if it started in an earlier read) and why.
    pub fn feed(&mut self, data: &[u8]) -> Result<(), (usize, Reject)> {
        let mut i = 0;
        while i < data.len() {
            match self.state {
                State::Off => return Ok(()),
                State::Head => {
                    // Empty lines before a request line are ignored (RFC 9112 2.2), as hyper does.
                    if self.head.is_empty() {
                        while i < data.len() && matches!(data[i], b'\r' | b'\n') {
                            i += 1;
                        }
                        if i == data.len() {
                            return Ok(());
                        }
                    }
                    let started_here = self.head.is_empty();
                    let start = i;
                    let from = self.head.len();
                    let room = (self.max_head + 1).saturating_sub(from);
                    let take = (data.len() - i).min(room);
                    self.head.extend_from_slice(&data[i..i + take]);
                    let at = if started_here { start } else { 0 };
                    match head_end(&self.head, from) {
                        None => {
                            if self.head.len() > self.max_head {
                                return Err((at, oversized(&self.head, self.max_head)));
                            }
                            return Ok(());
                        }
                        Some(end) => {
                            if end > self.max_head {
                                return Err((at, oversized(&self.head, self.max_head)));
                            }
                            let verdict = check(&self.head[..end]);
                            i += end - from;
                            self.head.clear();
                            self.state = match verdict.map_err(|r| (at, r))? {
                                Body::Length(0) => State::Head,
                                Body::Length(n) => State::Body(n),
                                Body::Chunked => State::ChunkSize { size: 0, digits: false, ended: false },
                                Body::Upgrade => State::Off,
                            };
                        }
                    }
                }
                State::Body(n) => {
                    let take = ((data.len() - i) as u64).min(n);
                    i += take as usize;
                    self.state = if take == n { State::Head } else { State::Body(n - take) };
                }
                State::ChunkData(n) => {
                    let take = ((data.len() - i) as u64).min(n);
                    i += take as usize;
                    self.state = if take == n { State::ChunkEnd } else { State::ChunkData(n - take) };
                }
                State::ChunkSize { size, digits, ended } => {
                    let b = data[i];
                    i += 1;
                    self.state = match (b, ended) {
                        (b'\n', _) if digits => match size {
                            0 => State::Trailers { empty: true },
                            n => State::ChunkData(n),
                        },
                        (b'\r', _) => State::ChunkSize { size, digits, ended: true },
                        (_, true) => State::ChunkSize { size, digits, ended: true },
                        (b';' | b' ' | b'\t', false) if digits => State::ChunkSize { size, digits, ended: true },
                        (b, false) => match (b as char).to_digit(16) {
                            Some(d) if size < (1 << 56) => {
                                State::ChunkSize { size: size * 16 + u64::from(d), digits: true, ended }
                            }
                            _ => State::Off,
                        },
                    };
                }
                State::ChunkEnd => {
                    let b = data[i];
                    i += 1;
                    self.state = match b {
                        b'\r' => State::ChunkEnd,
                        b'\n' => State::ChunkSize { size: 0, digits: false, ended: false },
                        _ => State::Off,
                    };
                }
                State::Trailers { empty } => {
                    let b = data[i];
                    i += 1;
                    self.state = match b {
                        b'\n' if empty => State::Head,
                        b'\n' => State::Trailers { empty: true },
                        b'\r' => State::Trailers { empty },
                        _ => State::Trailers { empty: false },
                    };
                }
            }
        }
        Ok(())
    }
}

fn trim(v: &[u8]) -> &[u8] {
    let start = v.iter().position(|b| !b.is_ascii_whitespace()).unwrap_or(v.len());
    let end = v.iter().rposition(|b| !b.is_ascii_whitespace()).map_or(start, |e| e + 1);
    &v[start..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_lf_must_end_a_crlf() {
        for ok in [&b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"[..], b"", b"no line end", b"\r\r\n"] {
            assert!(check_line_ends(ok).is_ok(), "{:?}", String::from_utf8_lossy(ok));
        }
        for bad in
            [&b"\nGET / HTTP/1.1\r\n\r\n"[..], b"GET / HTTP/1.1\nHost: a\r\n\r\n", b"GET / HTTP/1.1\r\n\n", b"\n"]
        {
            assert!(check_line_ends(bad).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn later_minor_versions_are_served_as_1_1_and_other_majors_refused() {
        let mut head = b"GET / HTTP/1.2\r\nHost: a\r\n\r\n".to_vec();
        assert_eq!(settle_version(&mut head), Ok(()));
        assert!(head.starts_with(b"GET / HTTP/1.1\r\n"));
        for line in [&b"GET / HTTP/2.0\r\n\r\n"[..], b"GET / HTTP/3\r\n\r\n", b"GET / HTTP/0.9\r\n\r\n"] {
            assert_eq!(settle_version(&mut line.to_vec()), Err(Reject::VersionNotSupported), "{line:?}");
        }
        assert!(matches!(settle_version(&mut b"GET / HTTX/1.1\r\n\r\n".to_vec()), Err(Reject::BadRequest(_))));
    }

    #[test]
    fn an_oversized_request_line_is_414_and_an_oversized_head_431() {
        let long_line = format!("GET /{} HTTP/1.1\r\nHost: a\r\n", "a".repeat(100));
        assert_eq!(oversized(long_line.as_bytes(), 64), Reject::UriTooLong);
        assert_eq!(
            oversized(b"GET /aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa", 64),
            Reject::UriTooLong
        );
        let big_field = format!("GET / HTTP/1.1\r\nX: {}\r\n", "a".repeat(100));
        assert_eq!(oversized(big_field.as_bytes(), 64), Reject::TooLarge);
    }

    fn verdict(head: &str) -> Result<Body, Reject> {
        check(head.as_bytes())
    }

    #[test]
    fn ordinary_heads_pass() {
        assert!(verdict("GET / HTTP/1.1\r\nHost: x\r\n\r\n").is_ok());
        assert!(verdict("POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\n").is_ok());
        assert!(verdict("POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n").is_ok());
        assert!(verdict("POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: Chunked\r\n\r\n").is_ok());
    }

    #[test]
    fn smuggling_shapes_are_refused() {
        for head in [
            "POST / HTTP/1.1\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: 1,1\r\n\r\n",
            "POST / HTTP/1.1\r\nTransfer-Encoding: xchunked\r\n\r\n",
            "POST / HTTP/1.1\r\nTransfer-Encoding: chunked, identity\r\n\r\n",
            "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nTransfer-Encoding : chunked\r\n\r\n",
            "POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
            "GET / HTTP/1.1\nHost: x\n\n",
            "GET / HTTP/1.1\r\nHost: x\r\nX-Folded: a\r\n b\r\n\r\n",
        ] {
            assert!(verdict(head).is_err(), "accepted: {head:?}");
        }
    }

    #[test]
    fn request_lines_are_told_from_fragments() {
        assert!(starts_with_request_line(b"GET / HTTP/1.1\r\n"));
        assert!(starts_with_request_line(b"\r\nPOST /x HTTP/1.1\r\n"));
        assert!(!starts_with_request_line(b"st: x\r\n\r\n"));
        assert!(!starts_with_request_line(b"Cookie: a=b\r\n\r\n"));
        assert!(!starts_with_request_line(b""));
    }

    #[test]
    fn every_pipelined_or_split_head_is_checked() {
        let bad = "POST /b HTTP/1.1\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n";
        let good = "POST /a HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello";
        let chunked =
            "POST /c HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n0\r\nX-Trailer: 1\r\n\r\n";
        // In one read, behind a good request with a body and a chunked one.
        let mut f = Framing::new(65536);
        let all = format!("{good}{chunked}{bad}");
        assert_eq!(
            f.feed(all.as_bytes()),
            Err((good.len() + chunked.len(), Reject::BadRequest("both Content-Length and Transfer-Encoding are set")))
        );
        // Byte by byte: found at its last byte, having started in an earlier read.
        let mut f = Framing::new(65536);
        let stream = format!("{good}{chunked}{bad}");
        let mut refused = None;
        for (n, b) in stream.bytes().enumerate() {
            if let Err(e) = f.feed(&[b]) {
                refused = Some((n, e));
                break;
            }
        }
        assert_eq!(refused.map(|(n, e)| (n, e.0)), Some((stream.len() - 1, 0)));
        // Empty lines between requests are skipped, not taken for an empty head.
        let mut f = Framing::new(65536);
        assert_eq!(f.feed(format!("\r\n\r\n{good}\r\n\r\n{good}").as_bytes()), Ok(()));
        // Good requests only: nothing refused, and the state is back at a head.
        let mut f = Framing::new(65536);
        assert_eq!(f.feed(format!("{good}{chunked}{good}").as_bytes()), Ok(()));
        assert_eq!(f.state, State::Head);
    }

    #[test]
    fn upgrades_stop_checking_and_heads_past_the_limit_are_too_large() {
        let mut f = Framing::new(65536);
        let up = "GET /ws HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n";
        assert_eq!(f.feed(format!("{up}\n\n garbage \r\n\r\n").as_bytes()), Ok(()));
        let mut f = Framing::new(100);
        assert_eq!(
            f.feed(format!("GET / HTTP/1.1\r\nX: {}\r\n\r\n", "y".repeat(200)).as_bytes()).map_err(|e| e.1),
            Err(Reject::TooLarge)
        );
        let many: String = (0..MAX_HEADERS + 1).map(|i| format!("h{i}: v\r\n")).collect();
        assert_eq!(check(format!("GET / HTTP/1.1\r\n{many}\r\n").as_bytes()), Err(Reject::TooLarge));
    }

    #[test]
    fn head_ends_are_found_across_reads() {
        let buf = b"GET / HTTP/1.1\r\nHost: x\r\n\r\nBODY";
        assert_eq!(head_end(buf, 0), Some(buf.len() - 4));
        assert_eq!(head_end(&buf[..20], 0), None);
        assert_eq!(head_end(buf, 25), Some(buf.len() - 4));
        assert_eq!(head_end(b"GET / HTTP/1.1\nHost: x\n\n", 0), Some(24));
        // A line end at the very end, or a CR with its LF still to come: not yet.
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nHost: x\r\n", 0), None);
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nHost: x\r\n\r", 0), None);
        assert_eq!(head_end(buf, buf.len() + 10), None);
    }
}
