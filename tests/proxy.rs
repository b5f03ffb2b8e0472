//! Requests and responses through the real binary (SPEC section 3): protocols, header
//! rewriting, routing, self-made responses.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::Request;
use http_body_util::Full;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn req(method: &str, path: &str) -> http::request::Builder {
    Request::builder().method(method).uri(path).header("host", "front.example")
}

#[tokio::test(flavor = "multi_thread")]
async fn http10_keepalive_and_pipelining_are_served() {
    let up = Upstream::start("a").await;
    // One worker thread: its idle backend connection serves every client connection.
    let b = Balancer::start(&config_for(&[up.addr], ""), &["--set", "server.workers=1"]);

    // HTTP/1.0: answered, then closed.
    let out = raw(b.addr(), b"GET /ten HTTP/1.0\r\n\r\n", Duration::from_secs(5)).await;
    assert_eq!(status_of(&out), 200, "{out}");
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert!(out.contains("\"path\":\"/ten\""), "{out}");

    // Keep-alive: three requests on one connection.
    let mut conn = Conn::open(b.addr()).await;
    for i in 0..3 {
        let r = conn.get(&format!("/k{i}")).await.unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.json()["path"], format!("/k{i}"));
    }
    assert_eq!(up.connections.load(std::sync::atomic::Ordering::SeqCst), 1, "backend connection should be pooled");

    // Pipelining: two requests in one write, two responses in order.
    let out = raw(
        b.addr(),
        b"GET /p1 HTTP/1.1\r\nHost: x\r\n\r\nGET /p2 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    let first = out.find("\"path\":\"/p1\"").expect("first response");
    let second = out.find("\"path\":\"/p2\"").expect("second response");
    assert!(first < second, "{out}");
    assert_eq!(out.matches("HTTP/1.1 200").count(), 2, "{out}");
}

#[tokio::test(flavor = "multi_thread")]
async fn http2_prior_knowledge_is_proxied_to_http1_backends() {
    let up = Upstream::start("a").await;
    let b = Balancer::start(&config_for(&[up.addr], ""), &[]);
    let request = Request::get("http://front.example:8080/h2?q=1").body(Full::<Bytes>::default()).unwrap();
    let (version, r) = send_h2(b.addr(), request).await;
    assert_eq!(version, http::Version::HTTP_2);
    assert_eq!(r.status, 200);
    let echo = r.json();
    assert_eq!(echo["path"], "/h2?q=1");
    assert_eq!(echo["headers"]["host"], "front.example:8080");
    assert_eq!(echo["headers"]["x-forwarded-host"], "front.example:8080");
}

#[tokio::test(flavor = "multi_thread")]
async fn headers_are_rewritten_both_ways() {
    let up = Upstream::start("a").await;
    let b = Balancer::start(&config_for(&[up.addr], ""), &[]);
    let r = send(
        b.addr(),
        req("GET", "/h")
            .header("connection", "keep-alive, x-private")
            .header("x-private", "secret")
            .header("keep-alive", "timeout=5")
            .header("proxy-authorization", "Basic Zm9v")
            .header("te", "trailers")
            .header("x-forwarded-for", "203.0.113.9")
            .header("x-forwarded-proto", "https")
            .header("x-custom", "kept")
            .body(Full::default())
            .unwrap(),
    )
    .await;
    let h = &r.json()["headers"];
    for gone in ["x-private", "keep-alive", "proxy-authorization", "te"] {
        assert!(h.get(gone).is_none(), "{gone} was forwarded: {h}");
    }
    assert_eq!(h["x-custom"], "kept");
    assert_eq!(h["x-forwarded-for"], "203.0.113.9, 127.0.0.1");
    assert_eq!(h["x-forwarded-proto"], "http", "a client cannot claim https");
    assert_eq!(h["x-forwarded-host"], "front.example");
    assert_eq!(h["host"], "front.example", "preserve_host defaults to true");
    let rid = h["x-request-id"].as_str().unwrap();
    assert!(rid.len() >= 16, "generated request id: {rid}");
    assert_eq!(r.header("x-request-id"), Some(rid), "the same id is returned to the client");

    // A client's own request id is kept.
    let r =
        send(b.addr(), req("GET", "/h").header("x-request-id", "client-id-42").body(Full::default()).unwrap()).await;
    assert_eq!(r.json()["headers"]["x-request-id"], "client-id-42");
    assert_eq!(r.header("x-request-id"), Some("client-id-42"));
}

#[tokio::test(flavor = "multi_thread")]
async fn hop_by_hop_response_headers_are_removed() {
    let backend = RawUpstream::start(|mut s| async move {
        read_head(&mut s).await;
        let body = "ok";
        let resp = format!(
            "HTTP/1.1 200 OK\r\nConnection: x-internal\r\nX-Internal: 1\r\nKeep-Alive: timeout=5\r\nProxy-Authenticate: Basic\r\nX-App: yes\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        s.write_all(resp.as_bytes()).await.unwrap();
        let _ = s.read(&mut [0u8; 1]).await;
    })
    .await;
    let b = Balancer::start(&config_for(&[backend.addr], ""), &[]);
    let r = get(b.addr(), "/").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "ok");
    assert_eq!(r.header("x-app"), Some("yes"));
    for gone in ["x-internal", "keep-alive", "proxy-authenticate"] {
        assert!(r.header(gone).is_none(), "{gone} reached the client");
    }
}

/// A backend's fields reach an HTTP/1 client as sent, less the hop-by-hop ones and any it
/// named in `Connection`, with this request's id and balancer's own framing; the same
/// whether they are passed through raw (the usual case) or through a header map (when
/// `Connection` names another field).
#[tokio::test(flavor = "multi_thread")]
async fn response_fields_pass_through_less_hop_by_hop_ones() {
    for (connection, internal, passed_raw) in
        [("keep-alive", vec!["1"], true), ("keep-alive, X-Internal", vec![], false)]
    {
        let backend = RawUpstream::start(move |mut s| async move {
            read_head(&mut s).await;
            let resp = format!(
                "HTTP/1.1 200 OK\r\nConnection: {connection}\r\nX-Internal: 1\r\nKeep-Alive: timeout=5\r\nProxy-Authenticate: Basic\r\nX-Request-Id: the-backends\r\nSet-Cookie: a=1\r\nset-cookie: b=2\r\nX-Empty:\r\nContent-Length: 99\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n"
            );
            s.write_all(resp.as_bytes()).await.unwrap();
            let _ = s.read(&mut [0u8; 1]).await;
        })
        .await;
        let b = Balancer::start(&config_for(&[backend.addr], ""), &[]);
        let ask = b"GET / HTTP/1.1\r\nHost: x\r\nX-Request-Id: client-7\r\nConnection: close\r\n\r\n";
        let out = raw(b.addr(), ask, Duration::from_secs(5)).await;
        let r = parse_response(out.as_bytes(), false);
        let case = format!("Connection: {connection}\n{out}");
        assert!(out.starts_with("HTTP/1.1 200 OK\r\n"), "{case}");
        assert_eq!(r.values("set-cookie"), ["a=1", "b=2"], "{case}");
        // Names keep the backend's case when passed through raw; a header map lower-cases.
        let names: Vec<&str> =
            r.fields.iter().filter(|(n, _)| n.eq_ignore_ascii_case("set-cookie")).map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            if passed_raw { ["Set-Cookie", "set-cookie"] } else { ["set-cookie", "set-cookie"] },
            "{case}"
        );
        assert_eq!(r.values("x-empty"), [""], "{case}");
        assert_eq!(r.values("x-internal"), internal, "{case}");
        assert_eq!(r.values("x-request-id"), ["client-7"], "{case}");
        assert_eq!(r.values("transfer-encoding"), ["chunked"], "{case}");
        assert_eq!(r.values("content-length"), Vec::<&str>::new(), "{case}");
        assert_eq!(r.values("connection"), ["close"], "{case}");
        assert_eq!(r.values("date").len(), 1, "{case}");
        assert!(r.values("keep-alive").is_empty() && r.values("proxy-authenticate").is_empty(), "{case}");
        assert!(out.ends_with("\r\n\r\n2\r\nok\r\n0\r\n\r\n"), "{case}");
        assert_eq!((r.body.as_slice(), r.rest.as_slice()), (&b"ok"[..], &b""[..]), "{case}");
    }
}

/// Empty lines before a backend's status line are skipped, as before a request line; the
/// status line (here with a colon in its reason) is never taken for a field.
#[tokio::test(flavor = "multi_thread")]
async fn empty_lines_before_a_backends_status_line_are_skipped() {
    let backend = RawUpstream::start(|mut s| async move {
        read_head(&mut s).await;
        s.write_all(b"\r\n\nHTTP/1.1 200 OK: fine\r\nX-App: yes\r\nContent-Length: 2\r\n\r\nok").await.unwrap();
        let _ = s.read(&mut [0u8; 1]).await;
    })
    .await;
    let b = Balancer::start(&config_for(&[backend.addr], ""), &[]);
    let out = raw(b.addr(), b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", Duration::from_secs(5)).await;
    assert!(out.starts_with("HTTP/1.1 200 OK\r\n"), "{out}");
    let r = parse_response(out.as_bytes(), false);
    assert!(r.fields.iter().all(|(n, _)| !n.starts_with("HTTP/")), "the status line came through as a field: {out}");
    assert_eq!(r.values("x-app"), ["yes"], "{out}");
    assert_eq!(r.body, b"ok");
}

#[tokio::test(flavor = "multi_thread")]
async fn preserve_host_false_sends_the_backend_authority() {
    let up = Upstream::start("a").await;
    let b = Balancer::start(&config_for(&[up.addr], "preserve_host = false"), &[]);
    let r = get(b.addr(), "/").await;
    assert_eq!(r.json()["headers"]["host"], up.addr.to_string());
    assert_eq!(r.json()["headers"]["x-forwarded-host"], "test.local");
}

#[tokio::test(flavor = "multi_thread")]
async fn websocket_upgrade_is_tunnelled() {
    let up = Upstream::start("ws").await;
    let b = Balancer::start(&config_for(&[up.addr], ""), &[]);
    let mut s = TcpStream::connect(b.addr()).await.unwrap();
    s.write_all(b"GET /chat HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n").await.unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(s.read(&mut byte).await.unwrap(), 1, "closed during the 101 head");
        head.push(byte[0]);
    }
    let head = String::from_utf8(head).unwrap();
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(head.to_ascii_lowercase().contains("upgrade: websocket"), "{head}");
    for msg in [&b"hello"[..], b"second frame", &[0u8, 1, 2, 255]] {
        s.write_all(msg).await.unwrap();
        let mut got = vec![0u8; msg.len()];
        tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut got)).await.unwrap().unwrap();
        assert_eq!(got, msg);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn connect_gets_405_and_absolute_form_never_picks_its_host() {
    let up = Upstream::start("a").await;
    let b = Balancer::start(&config_for(&[up.addr], ""), &[]);
    let out = raw(
        b.addr(),
        b"CONNECT internal.example:22 HTTP/1.1\r\nHost: internal.example:22\r\n\r\n",
        Duration::from_secs(3),
    )
    .await;
    assert_eq!(status_of(&out), 405, "{out}");
    assert!(out.contains("text/plain; charset=utf-8") && out.to_lowercase().contains("x-request-id"), "{out}");
    assert_eq!(up.hits(), 0);

    // The absolute-form target names another host; it still goes to the configured upstream.
    let out = raw(
        b.addr(),
        b"GET http://169.254.169.254/latest/meta-data HTTP/1.1\r\nHost: 169.254.169.254\r\nConnection: close\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    assert_eq!(status_of(&out), 200, "{out}");
    assert!(out.contains("\"name\":\"a\"") && out.contains("\"path\":\"/latest/meta-data\""), "{out}");
}

#[tokio::test(flavor = "multi_thread")]
async fn ambiguous_framing_is_refused_and_the_connection_closed() {
    let up = Upstream::start("a").await;
    let b = Balancer::start(&config_for(&[up.addr], ""), &[]);
    let attempts: [&[u8]; 8] = [
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET / HTTP/1.1\nHost: x\n\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nX-Folded: a\r\n b\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\nabcde",
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n",
    ];
    for attempt in attempts {
        let mut s = TcpStream::connect(b.addr()).await.unwrap();
        s.write_all(attempt).await.unwrap();
        let out = read_until_close(&mut s, Duration::from_secs(5)).await;
        assert_eq!(status_of(&out), 400, "{}: {out}", String::from_utf8_lossy(attempt));
        assert_eq!(out.matches("HTTP/1.1").count(), 1, "only one response, then close: {out}");
    }
    assert_eq!(up.hits(), 0, "nothing ambiguous reached the backend");
}

#[tokio::test(flavor = "multi_thread")]
async fn routes_pick_upstreams_by_host_and_longest_prefix() {
    let (api, web, admin) =
        (Upstream::start("api").await, Upstream::start("web").await, Upstream::start("admin").await);
    let config = format!(
        r#"
[server]
listen = "127.0.0.1:0"
[admin]
listen = "off"
[upstreams.api]
backends = ["http://{}"]
[upstreams.web]
backends = ["http://{}"]
[upstreams.admin]
backends = ["http://{}"]
[[routes]]
path_prefix = "/api"
upstream = "api"
strip_prefix = true
[[routes]]
host = "*.admin.example"
upstream = "admin"
[[routes]]
path_prefix = "/admin"
upstream = "admin"
[[routes]]
host = "www.example"
path_prefix = "/"
upstream = "web"
"#,
        api.addr, web.addr, admin.addr
    );
    let b = Balancer::start(&config, &[]);
    let go = |host: &'static str, path: &'static str| {
        let addr = b.addr();
        async move { send(addr, Request::get(path).header("host", host).body(Full::default()).unwrap()).await }
    };
    let r = go("www.example", "/api/users?x=1").await;
    assert_eq!((r.header("x-upstream"), r.json()["path"].as_str()), (Some("api"), Some("/users?x=1")), "strip_prefix");
    assert_eq!(go("www.example", "/api").await.json()["path"], "/");
    assert_eq!(go("www.example", "/apix").await.header("x-upstream"), Some("web"), "/api must not match /apix");
    assert_eq!(go("www.example:8080", "/index.html").await.header("x-upstream"), Some("web"), "port is ignored");
    assert_eq!(go("eu.admin.example", "/").await.header("x-upstream"), Some("admin"), "wildcard host");
    assert_eq!(go("other.example", "/admin/x").await.header("x-upstream"), Some("admin"));
    // Normalised paths cannot dodge a route.
    assert_eq!(go("other.example", "/api/../admin/panel").await.header("x-upstream"), Some("admin"));
    assert_eq!(go("other.example", "/%61dmin").await.header("x-upstream"), Some("admin"));
    // No route: 404 from balancer itself.
    let r = go("other.example", "/nothing").await;
    assert_eq!(r.status, 404);
    assert_eq!(r.header("content-type"), Some("text/plain; charset=utf-8"));
    assert!(r.header("x-request-id").is_some());
    assert!(r.text().ends_with('\n') && r.text().lines().count() == 1, "{:?}", r.text());
}

#[tokio::test(flavor = "multi_thread")]
async fn oversized_bodies_get_413() {
    let up = Upstream::start("a").await;
    let cfg = config_for(&[up.addr], "").replace("[admin]", "[server.x]\n[admin]");
    let cfg = cfg.replace("[server.x]\n", "");
    let b = Balancer::start(&cfg, &["--set", "server.max_request_body=1KiB"]);
    // Declared length over the limit: refused before the backend is touched.
    let r = send(b.addr(), req("POST", "/up").body(Full::new(Bytes::from(vec![b'a'; 2048]))).unwrap()).await;
    assert_eq!(r.status, 413);
    assert_eq!(r.header("content-type"), Some("text/plain; charset=utf-8"));
    assert_eq!(up.hits(), 0);
    // Within the limit: forwarded.
    let r = send(b.addr(), req("POST", "/up").body(Full::new(Bytes::from(vec![b'a'; 1000]))).unwrap()).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["body_len"], 1000);
    // Chunked, no declared length: cut off once it passes the limit.
    let mut body = Vec::new();
    body.extend_from_slice(b"POST /chunked HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n");
    for _ in 0..4 {
        body.extend_from_slice(b"200\r\n");
        body.extend_from_slice(&[b'b'; 512]);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(b"0\r\n\r\n");
    let out = raw(b.addr(), &body, Duration::from_secs(5)).await;
    assert_eq!(status_of(&out), 413, "{out}");
}

#[tokio::test(flavor = "multi_thread")]
async fn oversized_heads_get_431() {
    let up = Upstream::start("a").await;
    let b = Balancer::start(&config_for(&[up.addr], ""), &["--set", "server.max_header_bytes=4KiB"]);
    let big = format!("GET / HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n", "y".repeat(8000));
    let out = raw(b.addr(), big.as_bytes(), Duration::from_secs(5)).await;
    assert_eq!(status_of(&out), 431, "{out}");
    assert!(out.contains("text/plain; charset=utf-8") && out.contains("x-request-id"), "{out}");
    // Just under the limit is fine.
    let ok = format!("GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\nX-Big: {}\r\n\r\n", "y".repeat(3000));
    assert_eq!(status_of(&raw(b.addr(), ok.as_bytes(), Duration::from_secs(5)).await), 200);
    assert_eq!(up.hits(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn access_log_has_the_spec_fields() {
    let up = Upstream::start("a").await;
    let b = Balancer::start(&config_for(&[up.addr], ""), &[]);
    let r =
        send(b.addr(), req("GET", "/logged?x=1").header("x-request-id", "log-me").body(Full::default()).unwrap()).await;
    assert_eq!(r.status, 200);
    let line = b.wait_for_log(Duration::from_secs(5), |l| l["target"] == "access" && l["request_id"] == "log-me");
    assert_eq!(line["client"], "127.0.0.1");
    assert_eq!(line["method"], "GET");
    assert_eq!(line["path"], "/logged?x=1");
    assert_eq!(line["status"], 200);
    assert_eq!(line["upstream"], "app");
    assert_eq!(line["backend"], format!("http://{}", up.addr));
    assert!(line["duration_ms"].as_f64().unwrap() >= 0.0);
    assert_eq!(line["bytes"].as_u64().unwrap(), r.body.len() as u64);
}
