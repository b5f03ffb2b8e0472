//! Refusing request heads whose framing is ambiguous before hyper reads them, so that
//! nothing a front or back server could read differently is ever forwarded: both
//! `Content-Length` and `Transfer-Encoding`, differing or malformed lengths, any
//! transfer coding but a plain `chunked`, bare LF line ends, folded headers.

/// Where the head in `buf` ends (index just past the blank line), if it is complete.
/// A bare-LF blank line counts as an end, so that `check` can refuse it.
pub fn head_end(buf: &[u8], from: usize) -> Option<usize> {
    let start = from.saturating_sub(3);
    let mut i = start;
    while i + 1 < buf.len() {
        if buf[i] == b'\n' {
            if buf[i + 1] == b'\n' {
                return Some(i + 2);
            }
            if buf[i + 1] == b'\r' && buf.get(i + 2) == Some(&b'\n') {
                return Some(i + 3);
            }
        }
        i += 1;
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

/// Why a complete head must be refused with 400, or `Ok` to let it through.
pub fn check(head: &[u8]) -> Result<(), &'static str> {
    // Every LF must end a CRLF pair (leading empty lines included).
    for (i, &b) in head.iter().enumerate() {
        if b == b'\n' && (i == 0 || head[i - 1] != b'\r') {
            return Err("bare LF in the request head");
        }
    }
    let mut headers = [httparse::EMPTY_HEADER; 128];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(head) {
        Ok(httparse::Status::Complete(_)) => {}
        // Too many headers for this check: hyper's own limits decide.
        Err(httparse::Error::TooManyHeaders) => return Ok(()),
        Ok(httparse::Status::Partial) | Err(_) => return Err("malformed request head"),
    }
    let mut content_length: Option<&[u8]> = None;
    let mut transfer_encodings = 0;
    for h in req.headers.iter() {
        if h.name.eq_ignore_ascii_case("content-length") {
            let v = trim(h.value);
            if v.is_empty() || !v.iter().all(u8::is_ascii_digit) || v.len() > 19 {
                return Err("invalid Content-Length");
            }
            match content_length {
                Some(prev) if prev != v => return Err("conflicting Content-Length headers"),
                _ => content_length = Some(v),
            }
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            transfer_encodings += 1;
            if !trim(h.value).eq_ignore_ascii_case(b"chunked") {
                return Err("unsupported Transfer-Encoding (only a single \"chunked\" is accepted)");
            }
        }
    }
    if transfer_encodings > 1 {
        return Err("repeated Transfer-Encoding header");
    }
    if transfer_encodings == 1 && content_length.is_some() {
        return Err("both Content-Length and Transfer-Encoding are set");
    }
    if transfer_encodings == 1 && req.version == Some(0) {
        return Err("Transfer-Encoding in an HTTP/1.0 request");
    }
    Ok(())
}

fn trim(v: &[u8]) -> &[u8] {
    let start = v.iter().position(|b| !b.is_ascii_whitespace()).unwrap_or(v.len());
    let end = v.iter().rposition(|b| !b.is_ascii_whitespace()).map_or(start, |e| e + 1);
    &v[start..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verdict(head: &str) -> Result<(), &'static str> {
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
    fn head_ends_are_found_across_reads() {
        let buf = b"GET / HTTP/1.1\r\nHost: x\r\n\r\nBODY";
        assert_eq!(head_end(buf, 0), Some(buf.len() - 4));
        assert_eq!(head_end(&buf[..20], 0), None);
        assert_eq!(head_end(buf, 25), Some(buf.len() - 4));
        assert_eq!(head_end(b"GET / HTTP/1.1\nHost: x\n\n", 0), Some(24));
    }
}
