//! The path that routing (and rate limiting) sees: unreserved characters percent-decoded,
//! dot segments removed, repeated slashes merged. So `/api/../admin`, `/%61pi` and
//! `//api` cannot dodge a route. The path forwarded is the client's, unchanged, except
//! under `strip_prefix`, which forwards the normalised path without the prefix.

use std::borrow::Cow;

/// Normalises an origin-form path (no query). Allocates only when something changes.
pub fn normalise(path: &str) -> Cow<'_, str> {
    let b = path.as_bytes();
    let clean = !b.is_empty() && b[0] == b'/' && !path.contains('%') && !path.contains("//") && !path.contains("/.");
    if clean {
        return Cow::Borrowed(path);
    }
    let decoded = decode_unreserved(path);
    let mut out: Vec<&str> = Vec::new();
    let mut trailing_slash = false;
    for seg in decoded.split('/') {
        trailing_slash = false;
        match seg {
            "" => trailing_slash = true,
            "." => trailing_slash = true,
            ".." => {
                out.pop();
                trailing_slash = true;
            }
            s => out.push(s),
        }
    }
    let mut result = String::with_capacity(decoded.len());
    for seg in &out {
        result.push('/');
        result.push_str(seg);
    }
    if result.is_empty() || trailing_slash {
        result.push('/');
    }
    Cow::Owned(result)
}

fn decode_unreserved(path: &str) -> Cow<'_, str> {
    if !path.contains('%') {
        return Cow::Borrowed(path);
    }
    let b = path.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                let c = h * 16 + l;
                if c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_' | b'~') {
                    out.push(c);
                    i += 3;
                    continue;
                }
            }
        }
        out.push(b[i]);
        i += 1;
    }
    // Only ASCII was decoded into ASCII, so the result is as valid UTF-8 as the input.
    Cow::Owned(String::from_utf8(out).expect("decoding unreserved bytes keeps UTF-8"))
}

fn hex(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::normalise;

    #[test]
    fn dodges_are_undone() {
        assert_eq!(normalise("/api/../admin"), "/admin");
        assert_eq!(normalise("/%61pi/x"), "/api/x");
        assert_eq!(normalise("/%2e%2e/admin"), "/admin");
        assert_eq!(normalise("//api//x"), "/api/x");
        assert_eq!(normalise("/api/./x/"), "/api/x/");
        assert_eq!(normalise("/../../"), "/");
        assert_eq!(normalise("/a/%2F/b"), "/a/%2F/b");
        assert_eq!(normalise("/plain/path"), "/plain/path");
        assert_eq!(normalise("/x%"), "/x%");
        assert_eq!(normalise("/x%4"), "/x%4");
        assert_eq!(normalise(""), "/");
    }
}
