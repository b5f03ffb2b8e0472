//! SPEC 14, the response cache, through the real binary against an origin that counts its
//! requests and scripts its caching fields (tests/common/origin.rs).

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use common::origin::Origin;
use common::*;
use http::Request;
use http_body_util::Full;

/// A target on the origin with its answer scripted by `params` (see common/origin.rs).
fn target(path: &str, params: &[(&str, &str)]) -> String {
    let q: Vec<String> = params
        .iter()
        .map(|(k, v)| {
            let v = v.replace('=', "%3D").replace(',', "%2C").replace(' ', "%20").replace('"', "%22");
            format!("{k}={v}")
        })
        .collect();
    format!("{path}?{}", q.join("&"))
}

/// Balancer with `[caches.edge]` on every path but `/plain`.
fn start(origin: &Origin, max_size: &str, max_object: &str) -> Balancer {
    let extra = format!(
        "\n[caches.edge]\nmax_size = \"{max_size}\"\nmax_object = \"{max_object}\"\n\n\
         [[routes]]\npath_prefix = \"/\"\nupstream = \"app\"\ncache = \"edge\"\n\n\
         [[routes]]\npath_prefix = \"/plain\"\nupstream = \"app\"\n"
    );
    Balancer::start(&config_with_admin(&[origin.addr], &extra), &[])
}

async fn get_with(addr: SocketAddr, path: &str, fields: &[(&str, &str)]) -> Reply {
    let mut b = Request::get(path).header("host", "test.local");
    for (n, v) in fields {
        b = b.header(*n, *v);
    }
    send(addr, b.body(Full::default()).unwrap()).await
}

fn status_of(r: &Reply) -> &str {
    r.header("cache-status").unwrap_or_else(|| panic!("no Cache-Status on {r:?}"))
}

async fn metrics(b: &Balancer) -> String {
    get(b.admin(), "/metrics").await.text()
}

#[tokio::test]
async fn max_age_gives_hits_until_stale_then_a_new_fetch() {
    let origin = Origin::start().await;
    let b = start(&origin, "1MiB", "64KiB");
    let t = target("/a", &[("cc", "max-age=1")]);
    let first = get(b.addr(), &t).await;
    assert_eq!(first.status, 200);
    assert_eq!(status_of(&first), "balancer; fwd=miss; fwd-status=200; stored");
    let second = get(b.addr(), &t).await;
    assert_eq!(status_of(&second), "balancer; hit");
    assert_eq!(second.body, first.body, "the stored body");
    assert!(second.header("age").is_some(), "a hit carries Age");
    assert_eq!(origin.hits(&t), 1);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let third = get(b.addr(), &t).await;
    assert_eq!(status_of(&third), "balancer; fwd=stale; fwd-status=200; stored");
    assert_eq!(origin.hits(&t), 2);
    assert_ne!(third.body, first.body);
    let m = metrics(&b).await;
    assert_eq!(metric(&m, "balancer_cache_requests_total{cache=\"edge\",result=\"hit\"}"), Some(1.0));
    assert_eq!(metric(&m, "balancer_cache_requests_total{cache=\"edge\",result=\"miss\"}"), Some(1.0));
    assert_eq!(metric(&m, "balancer_cache_requests_total{cache=\"edge\",result=\"stale\"}"), Some(1.0));
}

#[tokio::test]
async fn s_maxage_is_honoured_and_lets_an_authorized_response_be_shared() {
    let origin = Origin::start().await;
    let b = start(&origin, "1MiB", "64KiB");
    let t = target("/s", &[("cc", "s-maxage=60, max-age=0")]);
    get_with(b.addr(), &t, &[("authorization", "Bearer a")]).await;
    let r = get_with(b.addr(), &t, &[("authorization", "Bearer a")]).await;
    assert_eq!(status_of(&r), "balancer; hit");
    assert_eq!(origin.hits(&t), 1);
}

#[tokio::test]
async fn responses_that_must_not_be_stored_are_not() {
    let origin = Origin::start().await;
    let b = start(&origin, "1MiB", "64KiB");
    let cases: Vec<(String, Vec<(&str, &str)>)> = vec![
        (target("/n1", &[("cc", "no-store, max-age=60")]), vec![]),
        (target("/n2", &[("cc", "private, max-age=60")]), vec![]),
        (target("/n3", &[("cc", "max-age=60"), ("cookie", "1")]), vec![]),
        (target("/n4", &[("cc", "max-age=60")]), vec![("authorization", "Bearer a")]),
        (target("/n5", &[("cc", "max-age=60"), ("vary", "*")]), vec![]),
        // No explicit freshness: no heuristics, even with Last-Modified.
        (target("/n6", &[("lm", "Mon, 01 Jan 2024 00:00:00 GMT")]), vec![]),
    ];
    for (t, fields) in &cases {
        for _ in 0..2 {
            let r = get_with(b.addr(), t, fields).await;
            assert_eq!(r.status, 200);
            assert_eq!(status_of(&r), "balancer; fwd=miss; fwd-status=200", "{t}");
        }
        assert_eq!(origin.hits(t), 2, "{t} reached the origin each time");
    }
}

#[tokio::test]
async fn vary_keeps_one_entry_per_accept_encoding() {
    let origin = Origin::start().await;
    let b = start(&origin, "1MiB", "64KiB");
    let t = target("/v", &[("cc", "max-age=60"), ("vary", "Accept-Encoding")]);
    let gz = get_with(b.addr(), &t, &[("accept-encoding", "gzip")]).await;
    let br = get_with(b.addr(), &t, &[("accept-encoding", "br")]).await;
    assert_eq!(status_of(&br), "balancer; fwd=vary-miss; fwd-status=200; stored");
    assert_eq!(origin.hits(&t), 2);
    let gz2 = get_with(b.addr(), &t, &[("accept-encoding", "gzip")]).await;
    let br2 = get_with(b.addr(), &t, &[("accept-encoding", "br")]).await;
    assert_eq!((status_of(&gz2), status_of(&br2)), ("balancer; hit", "balancer; hit"));
    assert_eq!((gz2.body.clone(), br2.body.clone()), (gz.body, br.body));
    assert!(gz2.text().ends_with("gzip") && br2.text().ends_with("br"));
    assert_eq!(origin.hits(&t), 2);
}

#[tokio::test]
async fn a_stale_entry_with_an_etag_is_revalidated() {
    let origin = Origin::start().await;
    let b = start(&origin, "1MiB", "64KiB");
    let t = target("/e", &[("cc", "max-age=1"), ("etag", "v1")]);
    let first = get(b.addr(), &t).await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let second = get(b.addr(), &t).await;
    assert_eq!(status_of(&second), "balancer; fwd=stale; fwd-status=304");
    assert_eq!(second.status, 200);
    assert_eq!(second.body, first.body, "the stored body, confirmed");
    let seen = origin.seen(&t);
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[1].headers.get("if-none-match").unwrap(), "\"v1\"");
    // Fresh again after the 304.
    assert_eq!(status_of(&get(b.addr(), &t).await), "balancer; hit");
    let m = metrics(&b).await;
    assert_eq!(metric(&m, "balancer_cache_requests_total{cache=\"edge\",result=\"revalidated\"}"), Some(1.0));
}

#[tokio::test]
async fn a_client_if_none_match_on_a_fresh_entry_gets_304_from_the_cache() {
    let origin = Origin::start().await;
    let b = start(&origin, "1MiB", "64KiB");
    let t = target("/c", &[("cc", "max-age=60"), ("etag", "v7")]);
    // The first one is a miss: the client's condition is not sent on, the body is stored.
    let first = get_with(b.addr(), &t, &[("if-none-match", "\"v7\"")]).await;
    assert_eq!(first.status, 200);
    assert!(origin.seen(&t)[0].headers.get("if-none-match").is_none());
    let r = get_with(b.addr(), &t, &[("if-none-match", "\"v7\"")]).await;
    assert_eq!(r.status, 304);
    assert_eq!(status_of(&r), "balancer; hit");
    assert_eq!(r.header("etag"), Some("\"v7\""));
    assert!(r.body.is_empty());
    let other = get_with(b.addr(), &t, &[("if-none-match", "\"v6\"")]).await;
    assert_eq!(other.status, 200);
    assert_eq!(origin.hits(&t), 1);
}

#[tokio::test]
async fn head_is_answered_from_the_get_entry() {
    let origin = Origin::start().await;
    let b = start(&origin, "1MiB", "64KiB");
    let t = target("/h", &[("cc", "max-age=60")]);
    let full = get(b.addr(), &t).await;
    let req = Request::head(&t).header("host", "test.local").body(Full::default()).unwrap();
    let head = send(b.addr(), req).await;
    assert_eq!(head.status, 200);
    assert_eq!(status_of(&head), "balancer; hit");
    assert_eq!(head.header("content-length"), Some(full.body.len().to_string().as_str()));
    assert!(head.body.is_empty());
    assert_eq!(origin.hits(&t), 1);
    // A HEAD that finds no entry goes on as a HEAD and stores nothing.
    let cold = target("/h-cold", &[("cc", "max-age=60")]);
    let req = Request::head(&cold).header("host", "test.local").body(Full::default()).unwrap();
    let r = send(b.addr(), req).await;
    assert_eq!((r.status.as_u16(), status_of(&r)), (200, "balancer; fwd=miss; fwd-status=200"));
    assert_eq!(origin.seen(&cold)[0].method, "HEAD");
    assert_eq!(status_of(&get(b.addr(), &cold).await), "balancer; fwd=miss; fwd-status=200; stored");
}

#[tokio::test]
async fn a_hundred_concurrent_misses_make_one_backend_request() {
    let origin = Origin::start().await;
    let b = start(&origin, "1MiB", "64KiB");
    let t = target("/cold", &[("cc", "max-age=60"), ("delay", "300")]);
    let addr = b.addr();
    let tasks: Vec<_> = (0..100)
        .map(|_| {
            let t = t.clone();
            tokio::spawn(async move { get(addr, &t).await })
        })
        .collect();
    let mut bodies = Vec::new();
    for task in tasks {
        let r = task.await.unwrap();
        assert_eq!(r.status, 200);
        status_of(&r);
        bodies.push(r.body);
    }
    assert_eq!(origin.hits(&t), 1, "one backend request for all of them");
    assert!(bodies.iter().all(|body| *body == bodies[0]));
}

#[tokio::test]
async fn stale_if_error_serves_the_entry_while_the_backend_is_down() {
    let origin = Origin::start().await;
    let b = start(&origin, "1MiB", "64KiB");
    let t = target("/sie", &[("cc", "max-age=1, stale-if-error=60")]);
    let first = get(b.addr(), &t).await;
    let bare = target("/sie-none", &[("cc", "max-age=1")]);
    get(b.addr(), &bare).await;
    origin.kill();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let r = get(b.addr(), &t).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body, first.body);
    let cs = status_of(&r);
    assert!(cs.starts_with("balancer; fwd=stale;") && cs.ends_with("detail=stale-if-error"), "{cs}");
    // Without stale-if-error, the error goes through, still with Cache-Status.
    let r = get(b.addr(), &bare).await;
    assert!(r.status.is_server_error(), "{r:?}");
    assert!(status_of(&r).starts_with("balancer; fwd=stale"));
}

#[tokio::test]
async fn stale_while_revalidate_serves_stale_and_refreshes_in_the_background() {
    let origin = Origin::start().await;
    let b = start(&origin, "1MiB", "64KiB");
    let t = target("/swr", &[("cc", "max-age=1, stale-while-revalidate=30")]);
    let first = get(b.addr(), &t).await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let stale = get(b.addr(), &t).await;
    assert_eq!(status_of(&stale), "balancer; hit; detail=stale-while-revalidate");
    assert_eq!(stale.body, first.body);
    assert!(wait_until(Duration::from_secs(5), || async { origin.hits(&t) == 2 }).await);
    let fresh = async {
        loop {
            let r = get(b.addr(), &t).await;
            if r.body != first.body {
                return r;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    let r = tokio::time::timeout(Duration::from_secs(5), fresh).await.expect("the refreshed entry");
    assert_eq!(status_of(&r), "balancer; hit");
    assert_eq!(origin.hits(&t), 2);
}

#[tokio::test]
async fn a_successful_unsafe_method_invalidates_its_target() {
    let origin = Origin::start().await;
    let b = start(&origin, "1MiB", "64KiB");
    let t = target("/post", &[("cc", "max-age=60")]);
    get(b.addr(), &t).await;
    assert_eq!(status_of(&get(b.addr(), &t).await), "balancer; hit");
    let post = Request::post(&t).header("host", "test.local").body(Full::new(Bytes::from_static(b"x"))).unwrap();
    let r = send(b.addr(), post).await;
    assert_eq!(r.status, 200);
    assert_eq!(status_of(&r), "balancer; fwd=bypass");
    let again = get(b.addr(), &t).await;
    assert_eq!(status_of(&again), "balancer; fwd=miss; fwd-status=200; stored");
    assert_eq!(origin.hits(&t), 3);
}

#[tokio::test]
async fn admin_purge_drops_entries_by_path_prefix() {
    let origin = Origin::start().await;
    let b = start(&origin, "1MiB", "64KiB");
    let (a, c, d) = (
        target("/p/a", &[("cc", "max-age=60")]),
        target("/p/b", &[("cc", "max-age=60")]),
        target("/q/c", &[("cc", "max-age=60")]),
    );
    for t in [&a, &c, &d] {
        get(b.addr(), t).await;
    }
    let req = Request::post("/cache/purge")
        .header("host", "admin")
        .body(Full::new(Bytes::from_static(br#"{"cache":"edge","prefix":"/p"}"#)))
        .unwrap();
    let r = send(b.admin(), req).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["purged"], 2);
    assert_eq!(status_of(&get(b.addr(), &a).await), "balancer; fwd=miss; fwd-status=200; stored");
    assert_eq!(status_of(&get(b.addr(), &d).await), "balancer; hit");
    let unknown = Request::post("/cache/purge").body(Full::new(Bytes::from_static(br#"{"cache":"nope"}"#))).unwrap();
    assert_eq!(send(b.admin(), unknown).await.status, 404);
}

#[tokio::test]
async fn every_response_of_a_cached_route_has_cache_status_and_others_none() {
    let origin = Origin::start().await;
    let b = start(&origin, "1MiB", "64KiB");
    let t = target("/every", &[("cc", "max-age=60")]);
    for r in [
        get(b.addr(), &t).await,
        get(b.addr(), &t).await,
        get(b.addr(), &target("/every", &[("status", "500")])).await,
        send(b.addr(), Request::delete(&t).header("host", "test.local").body(Full::default()).unwrap()).await,
    ] {
        status_of(&r);
    }
    let plain = get(b.addr(), &target("/plain", &[("cc", "max-age=60")])).await;
    assert!(plain.header("cache-status").is_none());
    origin.kill();
    let down = get(b.addr(), &target("/gone", &[])).await;
    assert!(down.status.is_server_error());
    status_of(&down);
}

#[tokio::test]
async fn a_response_larger_than_max_object_streams_through_unstored() {
    let origin = Origin::start().await;
    let b = start(&origin, "1MiB", "1KiB");
    let t = target("/big", &[("cc", "max-age=60"), ("size", "100000")]);
    for _ in 0..2 {
        let r = get(b.addr(), &t).await;
        assert_eq!(r.body.len(), 100_000);
        assert_eq!(status_of(&r), "balancer; fwd=miss; fwd-status=200");
    }
    assert_eq!(origin.hits(&t), 2);
}

#[tokio::test]
async fn memory_stays_within_max_size_when_filled_ten_times_over() {
    let origin = Origin::start().await;
    let b = start(&origin, "64KiB", "8KiB");
    let mut conn = Conn::open(b.addr()).await;
    // 160 entries of 4 KiB: ten times max_size.
    for i in 0..160 {
        let t = target(&format!("/fill/{i}"), &[("cc", "max-age=60"), ("size", "4096")]);
        let r = conn.get(&t).await.unwrap();
        assert_eq!(r.body.len(), 4096);
    }
    let m = metrics(&b).await;
    let bytes = metric(&m, "balancer_cache_bytes{cache=\"edge\"}").expect("balancer_cache_bytes");
    assert!(bytes > 0.0 && bytes <= 65536.0, "{bytes} bytes held");
    // The most recent entry is still there.
    let last = target("/fill/159", &[("cc", "max-age=60"), ("size", "4096")]);
    assert_eq!(status_of(&conn.get(&last).await.unwrap()), "balancer; hit");
}

#[tokio::test]
async fn hits_are_served_over_http2_too() {
    let origin = Origin::start().await;
    let b = start(&origin, "1MiB", "64KiB");
    let t = target("/h2", &[("cc", "max-age=60")]);
    let first = get(b.addr(), &t).await;
    let uri = format!("http://test.local{t}");
    let (version, r) = send_h2(b.addr(), Request::get(uri).body(Full::default()).unwrap()).await;
    assert_eq!(version, http::Version::HTTP_2);
    assert_eq!(status_of(&r), "balancer; hit");
    assert_eq!(r.body, first.body);
}

#[test]
fn an_unknown_cache_name_is_a_config_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("b.toml");
    std::fs::write(
        &path,
        "[upstreams.app]\nbackends = [\"http://127.0.0.1:9\"]\n\n[[routes]]\npath_prefix = \"/\"\nupstream = \"app\"\ncache = \"edge\"\n",
    )
    .unwrap();
    let (code, _out, err) = run_cli(&["--check", "-c", path.to_str().unwrap()], dir.path());
    assert_ne!(code, 0);
    assert!(err.contains("b.toml:7:9: no [caches.edge] is defined"), "file:line:col of the name: {err}");
}

/// Reads from `stream` into `buf` until the head has arrived and `body` bytes after it;
/// gives the head's length.
async fn read_until_body(stream: &mut tokio::net::TcpStream, buf: &mut Vec<u8>, body: usize) -> usize {
    use tokio::io::AsyncReadExt;
    let reading = async {
        loop {
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4)
                && buf.len() >= end + body
            {
                return end;
            }
            let mut chunk = [0u8; 4096];
            let n = stream.read(&mut chunk).await.unwrap();
            assert!(n > 0, "closed after {} bytes: {}", buf.len(), String::from_utf8_lossy(buf));
            buf.extend_from_slice(&chunk[..n]);
        }
    };
    tokio::time::timeout(Duration::from_secs(20), reading).await.expect("the bytes arrive")
}

#[tokio::test]
async fn a_waiter_reads_the_response_as_it_arrives_and_the_first_client_leaving_cancels_nothing() {
    use tokio::io::AsyncWriteExt;
    let origin = Origin::start().await;
    let b = start(&origin, "1MiB", "64KiB");
    // The origin sends the first half of the body, then holds the rest until released.
    let t = target("/leave", &[("cc", "max-age=60"), ("size", "10000"), ("hold", "1")]);
    let request = format!("GET {t} HTTP/1.1\r\nhost: test.local\r\n\r\n");
    let mut leaver = tokio::net::TcpStream::connect(b.addr()).await.unwrap();
    leaver.write_all(request.as_bytes()).await.unwrap();
    let mut first = Vec::new();
    read_until_body(&mut leaver, &mut first, 5000).await;
    // A second client arrives while the backend is still holding the second half: it is
    // answered from the same fetch, with what has arrived so far, before the end.
    let mut waiter = tokio::net::TcpStream::connect(b.addr()).await.unwrap();
    waiter.write_all(request.as_bytes()).await.unwrap();
    let mut second = Vec::new();
    let head = read_until_body(&mut waiter, &mut second, 5000).await;
    let head_text = String::from_utf8_lossy(&second[..head]).to_lowercase();
    assert!(head_text.starts_with("http/1.1 200"), "{head_text}");
    assert!(head_text.contains("cache-status: balancer; fwd=miss; collapsed"), "{head_text}");
    assert!(head_text.contains("content-length: 10000"), "{head_text}");
    // The first client leaves; the fetch goes on for the second.
    drop(leaver);
    origin.release();
    read_until_body(&mut waiter, &mut second, 10000).await;
    assert_eq!(second.len(), head + 10000);
    assert!(second[head..].iter().all(|&c| c == b'x'));
    // And it was stored whole.
    let third = get(b.addr(), &t).await;
    assert_eq!(third.body.len(), 10000);
    assert_eq!(status_of(&third), "balancer; hit");
    assert_eq!(origin.hits(&t), 1, "one backend request for all three");
}

#[tokio::test]
async fn a_cache_with_unchanged_settings_keeps_its_entries_across_a_reload() {
    let origin = Origin::start().await;
    let b = start(&origin, "1MiB", "64KiB");
    let t = target("/reload", &[("cc", "max-age=60")]);
    get(b.addr(), &t).await;
    let text = std::fs::read_to_string(&b.config_path).unwrap();
    b.write_config(&format!("{text}\n[[routes]]\npath_prefix = \"/other\"\nupstream = \"app\"\n"));
    let r = send(b.admin(), Request::post("/reload").body(Full::default()).unwrap()).await;
    assert_eq!(r.json()["ok"], true, "{}", r.text());
    assert_eq!(status_of(&get(b.addr(), &t).await), "balancer; hit");
    let config = get(b.admin(), "/config").await.text();
    assert!(config.contains("[caches.edge]") && config.contains("cache = \"edge\""), "{config}");
    // Changed settings: a new, empty cache.
    let text = std::fs::read_to_string(&b.config_path).unwrap().replace("max_size = \"1MiB\"", "max_size = \"2MiB\"");
    b.write_config(&text);
    let r = send(b.admin(), Request::post("/reload").body(Full::default()).unwrap()).await;
    assert_eq!(r.json()["ok"], true, "{}", r.text());
    assert_eq!(status_of(&get(b.addr(), &t).await), "balancer; fwd=miss; fwd-status=200; stored");
}
