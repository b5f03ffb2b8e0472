//! The bodies of the fuzz targets in `fuzz/` (which include this file with `#[path]`),
//! shared with `tests/fuzz_corpus.rs`, which replays the seed corpus and every saved
//! regression on stable in the ordinary `cargo test`. Each function must return
//! normally for every input: a panic is a bug (a crash of the real request path, or a
//! broken property that SPEC states).
#![allow(dead_code)]

use std::net::IpAddr;
use std::path::Path;
use std::sync::OnceLock;

use balancer::backend::RequestFraming;
use balancer::config::{self, Overrides};
use balancer::http1::head_check;
use balancer::limit::client_ip;
use balancer::path::normalise;
use balancer::proxy::headers::{self, Forwarded};
use balancer::proxy::request_id;
use balancer::runtime::router::Router;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::request::Parts;
use http::uri::{Authority, PathAndQuery};
use http::{Method, Request, Uri, Version};
use ipnet::IpNet;

/// As many headers as the listener lets hyper parse (`max_headers(1024)` in
/// `server/listener.rs`): what `check` lets through, hyper reads with this many.
const HYPER_MAX_HEADERS: usize = 1024;

// ---------------------------------------------------------------- config_parse

/// The config pipeline (TOML -> overrides -> validate) on arbitrary text. Anything
/// after the first NUL byte is read as `--set KEY=VALUE` lines, so the override merge
/// is fuzzed too. An accepted config must print (`--print-config`) and the printed
/// text must load again.
pub fn config_parse(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let (file, sets) = text.split_once('\0').unwrap_or((text, ""));
    // Certificate, key and CA paths are opened during validation: keep the fuzzer away
    // from device files that never end (/dev/zero) or block (/dev/stdin).
    if names_special_files(text) {
        return;
    }
    let overrides = Overrides {
        set: sets.lines().filter_map(|l| l.split_once('=')).map(|(k, v)| (k.to_owned(), v.to_owned())).collect(),
        ..Overrides::default()
    };
    // A directory that does not exist, so relative file names resolve to nothing.
    let path = Path::new("/nonexistent-balancer-fuzz/balancer.toml");
    match config::parse(file, path, &overrides) {
        Ok(loaded) => {
            let printed = toml::to_string_pretty(&loaded.raw)
                .unwrap_or_else(|e| panic!("--print-config cannot print an accepted config: {e}"));
            if let Err(e) = config::parse(&printed, path, &Overrides::default()) {
                panic!("--print-config printed a config that does not load: {e}\n{printed}");
            }
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
}

fn names_special_files(text: &str) -> bool {
    let lower = text.to_ascii_lowercase();
    ["/dev", "/proc", "/sys", "\\u"].iter().any(|s| lower.contains(s))
}

// ---------------------------------------------------------------- request_head

/// The raw HTTP/1 head check, then (for what parses as a request) the request path's
/// pure steps: request id, host, normalised path, route and `strip_prefix`, client IP,
/// and the head rewritten for the backend, and the response rewrite.
pub fn request_head(data: &[u8]) {
    let _ = head_check::starts_with_request_line(data);
    let _ = head_check::check(data);

    // `head_end` as the connection guard calls it, a few bytes per read, finds the
    // same end as one scan over everything, and that end is the first blank line.
    let whole = head_check::head_end(data, 0);
    assert_eq!(whole, first_blank_line(data), "head_end over the whole buffer");
    let step = usize::from(data.first().copied().unwrap_or(0) % 7) + 1;
    let mut incremental = None;
    let mut len = 0;
    while len < data.len() && incremental.is_none() {
        let from = len;
        len = (len + step).min(data.len());
        incremental = head_check::head_end(&data[..len], from);
    }
    assert_eq!(incremental, whole, "head_end across reads of {step} bytes");

    let Some(end) = whole else { return };
    let head = &data[..end];
    if head_check::check(head).is_err() {
        return;
    }
    assert_unambiguous(head);
    if let Some(parts) = parts_from_head(head) {
        forward(&parts, data);
    }
}

/// Index just past the first `\n\n` or `\n\r\n`.
fn first_blank_line(b: &[u8]) -> Option<usize> {
    (0..b.len()).find_map(|i| match (b[i], b.get(i + 1), b.get(i + 2)) {
        (b'\n', Some(b'\n'), _) => Some(i + 2),
        (b'\n', Some(b'\r'), Some(b'\n')) => Some(i + 3),
        _ => None,
    })
}

/// SPEC 3: what `check` lets through has one framing only, read the way hyper reads it
/// (with as many headers as hyper accepts).
fn assert_unambiguous(head: &[u8]) {
    let mut storage = vec![httparse::EMPTY_HEADER; HYPER_MAX_HEADERS];
    let mut req = httparse::Request::new(&mut storage);
    let Ok(httparse::Status::Complete(_)) = req.parse(head) else { return };
    let lengths: Vec<&[u8]> = req
        .headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("content-length"))
        .map(|h| h.value.trim_ascii())
        .collect();
    let codings: Vec<&[u8]> = req
        .headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("transfer-encoding"))
        .map(|h| h.value.trim_ascii())
        .collect();
    let n = req.headers.len();
    assert!(
        lengths.is_empty() || codings.is_empty(),
        "check let through Content-Length with Transfer-Encoding ({n} headers)"
    );
    assert!(codings.len() <= 1, "check let through a repeated Transfer-Encoding ({n} headers)");
    assert!(
        codings.iter().all(|c| c.eq_ignore_ascii_case(b"chunked")),
        "check let through Transfer-Encoding {:?} ({n} headers)",
        codings.iter().map(|c| String::from_utf8_lossy(c)).collect::<Vec<_>>()
    );
    assert!(
        lengths.iter().all(|l| !l.is_empty() && l.iter().all(u8::is_ascii_digit)),
        "check let through a malformed Content-Length ({n} headers)"
    );
    assert!(lengths.windows(2).all(|w| w[0] == w[1]), "check let through differing Content-Lengths ({n} headers)");
}

/// `http::request::Parts` for a head, as hyper would hand it over (`None` where hyper
/// would refuse it itself).
fn parts_from_head(head: &[u8]) -> Option<Parts> {
    let mut storage = vec![httparse::EMPTY_HEADER; HYPER_MAX_HEADERS];
    let mut req = httparse::Request::new(&mut storage);
    let Ok(httparse::Status::Complete(_)) = req.parse(head) else { return None };
    let method = Method::from_bytes(req.method?.as_bytes()).ok()?;
    let uri: Uri = req.path?.parse().ok()?;
    let version = if req.version? == 0 { Version::HTTP_10 } else { Version::HTTP_11 };
    let mut map = HeaderMap::new();
    for h in req.headers.iter() {
        let name = HeaderName::from_bytes(h.name.as_bytes()).ok()?;
        let value = HeaderValue::from_bytes(h.value).ok()?;
        map.append(name, value);
    }
    let (mut parts, ()) = Request::builder().method(method).uri(uri).version(version).body(()).ok()?.into_parts();
    parts.headers = map;
    Some(parts)
}

/// Routes that exercise host matching (exact, wildcard), prefixes and `strip_prefix`.
fn router() -> &'static Router {
    static ROUTER: OnceLock<Router> = OnceLock::new();
    ROUTER.get_or_init(|| {
        let text = r#"
[upstreams.app]
backends = ["http://127.0.0.1:9000"]
[[routes]]
host = "api.example.com"
path_prefix = "/v1"
upstream = "app"
strip_prefix = true
[[routes]]
host = "*.example.com"
upstream = "app"
[[routes]]
path_prefix = "/api"
upstream = "app"
strip_prefix = true
[[routes]]
path_prefix = "/static/img"
upstream = "app"
[[routes]]
path_prefix = "/"
upstream = "app"
"#;
        let loaded = config::parse(text, Path::new("router.toml"), &Overrides::default()).expect("router config");
        Router::new(loaded.config.routes.iter().map(|r| Router::route(r, 0, Vec::new(), None)).collect())
    })
}

fn trusted() -> &'static [IpNet] {
    static TRUSTED: OnceLock<Vec<IpNet>> = OnceLock::new();
    TRUSTED.get_or_init(|| {
        ["10.0.0.0/8", "192.168.1.1/32", "127.0.0.0/8", "::1/128", "fd00::/8"]
            .iter()
            .map(|n| n.parse().unwrap())
            .collect()
    })
}

const PEERS: [&str; 6] = ["127.0.0.1", "203.0.113.9", "10.1.2.3", "::1", "2001:db8::7", "fd00::1"];

/// What `proxy::proxy` does with a request before it goes out, without the network.
fn forward(parts: &Parts, data: &[u8]) {
    let request_id = request_id::from_headers(&parts.headers);
    let host = headers::client_host(parts);
    let host_str = host.as_ref().and_then(|h| h.to_str().ok()).map(headers::host_without_port);
    let norm = normalise(parts.uri.path());
    assert_normalised(parts.uri.path(), &norm);
    let target = match router().find(host_str, &norm) {
        // As `proxy::proxy` cuts the prefix off.
        Some(route) if route.strip_prefix && route.prefix != "/" => {
            let rest = &norm[route.prefix.len()..];
            let rest = if rest.is_empty() { "/" } else { rest };
            let pq = match parts.uri.query() {
                Some(q) => format!("{rest}?{q}"),
                None => rest.to_owned(),
            };
            PathAndQuery::try_from(pq).ok()
        }
        _ => Some(parts.uri.path_and_query().cloned().unwrap_or_else(|| PathAndQuery::from_static("/"))),
    };
    let Some(target) = target else { return };

    let seed = data.iter().fold(0usize, |a, b| a.wrapping_mul(31).wrapping_add(usize::from(*b)));
    let peer: IpAddr = PEERS[seed % PEERS.len()].parse().unwrap();
    let client = client_ip(peer, &parts.headers, trusted()).to_string();
    let upgrade = headers::requested_upgrade(parts);
    let trace = balancer::proxy::trace::TraceContext::from_headers(&parts.headers);
    let backend: Authority = "127.0.0.1:9000".parse().unwrap();
    for (preserve_host, version) in [(true, parts.version), (false, Version::HTTP_2)] {
        // The same head as if it had come over HTTP/2 (Cookie joining).
        let mut parts = parts.clone();
        parts.version = version;
        let fwd = Forwarded {
            client_ip: &client,
            proto: if seed % 2 == 0 { "http" } else { "https" },
            request_id: &request_id,
            trace: &trace,
            host: host.as_ref(),
            preserve_host,
            backend: &backend,
            upgrade: upgrade.as_ref(),
            underscores: seed % 3 == 0,
        };
        let mut out = Vec::new();
        headers::write_request_head(&mut out, &parts, target.as_str().as_bytes(), RequestFraming::Empty, &fwd);
        assert_forwardable(&parts, &forwarded_headers(&out), &fwd);
    }

    // The same fields as a backend's response head.
    let mut response = parts.headers.clone();
    headers::rewrite_response(&mut response, seed % 3 == 0, &request_id);
    assert_eq!(response.get_all("x-request-id").iter().collect::<Vec<_>>(), [&request_id.to_header_value()]);
    for name in ["keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "proxy-authenticate"] {
        assert!(!response.contains_key(name), "{name} kept in a response");
    }
}

/// SPEC 2: percent-decoded unreserved characters, no dot segments, no repeated slashes.
fn assert_normalised(raw: &str, norm: &str) {
    assert!(norm.starts_with('/'), "normalise({raw:?}) = {norm:?}");
    assert!(!norm.contains("//"), "normalise({raw:?}) = {norm:?}");
    assert!(!norm.split('/').any(|s| s == "." || s == ".."), "normalise({raw:?}) = {norm:?}");
}

/// The fields of a head written for a backend, which must parse as an HTTP/1.1 request.
fn forwarded_headers(head: &[u8]) -> HeaderMap {
    let mut slots = vec![httparse::EMPTY_HEADER; 2048];
    let mut req = httparse::Request::new(&mut slots);
    let parsed =
        req.parse(head).unwrap_or_else(|e| panic!("unparsable head ({e}): {:?}", String::from_utf8_lossy(head)));
    assert!(parsed.is_complete(), "incomplete head: {:?}", String::from_utf8_lossy(head));
    assert_eq!(req.version, Some(1));
    let mut h = HeaderMap::new();
    for f in req.headers.iter() {
        h.append(HeaderName::from_bytes(f.name.as_bytes()).unwrap(), HeaderValue::from_bytes(f.value).unwrap());
    }
    h
}

/// SPEC 3: hop-by-hop headers out (bar an upgrade's own), `X-Forwarded-*` and
/// `X-Request-Id` set, one `Host`.
fn assert_forwardable(parts: &Parts, h: &HeaderMap, fwd: &Forwarded<'_>) {
    assert_eq!(h.get_all(header::HOST).iter().count(), 1, "Host: {h:?}");
    assert_eq!(h.get_all("x-request-id").iter().collect::<Vec<_>>(), [&fwd.request_id.to_header_value()]);
    assert_eq!(h.get_all("traceparent").iter().count(), 1, "traceparent: {h:?}");
    let xff = h.get("x-forwarded-for").expect("x-forwarded-for").to_str().expect("x-forwarded-for is text");
    assert!(xff.rsplit(", ").next() == Some(fwd.client_ip), "x-forwarded-for {xff:?}");
    assert_eq!(h.get_all("x-forwarded-proto").iter().collect::<Vec<_>>(), [fwd.proto]);
    for name in
        ["keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "proxy-authorization", "expect"]
    {
        assert!(!h.contains_key(name), "{name} forwarded: {h:?}");
    }
    if fwd.upgrade.is_none() {
        assert!(!h.contains_key(header::CONNECTION) && !h.contains_key(header::UPGRADE), "{h:?}");
    }
    if !fwd.underscores {
        assert!(h.keys().all(|n| !n.as_str().contains('_')), "a name with _ forwarded: {h:?}");
    }
    // Every header the client's Connection names (as text) stays behind, unless it is
    // one balancer sets itself.
    let own = [
        "host",
        "x-forwarded-for",
        "x-forwarded-proto",
        "x-forwarded-host",
        "x-request-id",
        "traceparent",
        "connection",
        "upgrade",
    ];
    for v in parts.headers.get_all(header::CONNECTION) {
        let Ok(s) = v.to_str() else { continue };
        for token in s.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            if let Ok(name) = HeaderName::from_bytes(token.as_bytes()) {
                if !own.contains(&name.as_str()) {
                    assert!(!h.contains_key(&name), "{name} was named by Connection but forwarded");
                }
            }
        }
    }
}

// ---------------------------------------------------------------- framing

/// `head_check::Framing`, which follows the message boundaries of a client's byte
/// stream so that every pipelined head is checked: the first byte picks the head limit,
/// the second seeds how the rest is cut into reads. Cut anywhere, the stream gets the
/// same verdict as in one read, at the same place.
pub fn framing(data: &[u8]) {
    let [limit, seed, stream @ ..] = data else { return };
    let max_head = [64, 1024, 65536][usize::from(*limit) % 3];
    let whole = head_check::Framing::new(max_head).feed(stream);

    let mut f = head_check::Framing::new(max_head);
    let mut rng = u32::from(*seed) | 1;
    let mut offset = 0;
    let mut split = Ok(());
    while offset < stream.len() {
        // xorshift: reads of 1 to 16 bytes
        rng ^= rng << 13;
        rng ^= rng >> 17;
        rng ^= rng << 5;
        let len = (rng as usize % 16 + 1).min(stream.len() - offset);
        if let Err((at, reason)) = f.feed(&stream[offset..offset + len]) {
            assert!(at < len, "refusal at {at} in a read of {len}");
            split = Err((offset, at, reason));
            break;
        }
        offset += len;
    }
    match (whole, split) {
        (Ok(()), Ok(())) => {}
        (Err((start, r1)), Err((read_at, at, r2))) => {
            assert_eq!(r1, r2, "one read vs. reads of a few bytes");
            // `at` is where the refused head starts in that read, or 0 if it started
            // in an earlier one.
            if at > 0 {
                assert_eq!(read_at + at, start, "refused head starts");
            } else {
                assert!(start <= read_at, "refused head starts at {start}, after the read at {read_at}");
            }
        }
        (whole, split) => panic!("one read: {whole:?}; reads of a few bytes: {split:?}"),
    }
}

// ---------------------------------------------------------------- xff_client_ip

/// `limit::client_ip` on arbitrary `X-Forwarded-For` values: the first byte picks the
/// peer, the rest is split into header values at `\n`.
pub fn xff_client_ip(data: &[u8]) {
    let Some((&pick, rest)) = data.split_first() else { return };
    let peer: IpAddr = PEERS[usize::from(pick) % PEERS.len()].parse().unwrap();
    let mut map = HeaderMap::new();
    for v in rest.split(|b| *b == b'\n') {
        if let Ok(v) = HeaderValue::from_bytes(v) {
            map.append("x-forwarded-for", v);
        }
    }
    let ip = client_ip(peer, &map, trusted());
    // SPEC 5: a client outside the trusted set cannot choose its key.
    if !trusted().iter().any(|n| n.contains(&peer)) {
        assert_eq!(ip, peer, "an untrusted peer chose its key");
    }
    assert_eq!(client_ip(peer, &map, &[]), peer, "no trusted proxies: the peer");
    for v in map.get_all("x-forwarded-for") {
        if let Ok(s) = v.to_str() {
            let _ = headers::host_without_port(s);
        }
    }
}
