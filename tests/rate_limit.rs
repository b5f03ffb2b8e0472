//! Rate limits through the real binary (SPEC section 5 and the 429 row of section 3).

mod common;

use std::time::Duration;

use common::*;
use http::Request;
use http_body_util::Full;

async fn get_as(addr: std::net::SocketAddr, path: &str, headers: &[(&str, &str)]) -> Reply {
    let mut req = Request::get(path).header("host", "x");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    send(addr, req.body(Full::default()).unwrap()).await
}

#[tokio::test(flavor = "multi_thread")]
async fn burst_five_rate_five_per_second() {
    let up = Upstream::start("a").await;
    let extra = "[rate_limits.ip]\nrate = 5\nper = \"1s\"\nburst = 5\nkey = \"client_ip\"\n";
    let cfg =
        config_with_admin(&[up.addr], extra).replace("[admin]", "[server.x]\n[admin]").replace("[server.x]\n", "");
    let cfg = cfg.replace("listen = [\"127.0.0.1:0\"]", "listen = [\"127.0.0.1:0\"]\nrate_limit = \"ip\"");
    let b = Balancer::start(&cfg, &[]);
    let mut conn = Conn::open(b.addr()).await;
    for i in 0..5 {
        assert_eq!(conn.get("/").await.unwrap().status, 200, "request {i}");
    }
    let r = conn.get("/").await.unwrap();
    assert_eq!(r.status, 429);
    assert_eq!(r.header("retry-after"), Some("1"));
    assert_eq!(r.header("ratelimit-limit"), Some("5"));
    assert_eq!(r.header("ratelimit-remaining"), Some("0"));
    assert_eq!(r.header("ratelimit-reset"), Some("1"));
    assert_eq!(r.header("content-type"), Some("text/plain; charset=utf-8"));
    assert!(r.header("x-request-id").is_some());
    assert!(r.text().contains("rate limited by ip"), "{}", r.text());
    assert_eq!(up.hits(), 5, "a refused request never reaches a backend");
    tokio::time::sleep(Duration::from_millis(230)).await;
    assert_eq!(conn.get("/").await.unwrap().status, 200, "one token back after 200ms");
    assert_eq!(conn.get("/").await.unwrap().status, 429);
    assert_eq!(up.hits(), 6);
    let text = get(b.admin(), "/metrics").await.text();
    assert_eq!(metric(&text, "balancer_rate_limited_total{limit=\"ip\"}"), Some(2.0), "{text}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_route_limit_applies_to_its_route_and_cannot_be_dodged() {
    let up = Upstream::start("a").await;
    let cfg = format!(
        r#"
[server]
listen = "127.0.0.1:0"
[admin]
listen = "off"
[upstreams.app]
backends = ["http://{}"]
[rate_limits.per_ip]
rate = 100
per = "1m"
burst = 3
[[routes]]
path_prefix = "/api"
upstream = "app"
rate_limit = "per_ip"
[[routes]]
path_prefix = "/"
upstream = "app"
"#,
        up.addr
    );
    let b = Balancer::start(&cfg, &[]);
    for path in ["/api/a", "/%61pi/b", "/static/../api/c"] {
        assert_eq!(get(b.addr(), path).await.status, 200, "{path}");
    }
    for path in ["/api", "/%61pi/x", "//api/y", "/x/../api/z"] {
        assert_eq!(get(b.addr(), path).await.status, 429, "{path} must count against /api");
    }
    for _ in 0..10 {
        assert_eq!(get(b.addr(), "/other").await.status, 200, "other routes are not limited");
    }
    let r = get(b.addr(), "/api").await;
    let retry: u64 = r.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=1).contains(&retry), "100 per minute: one token in 0.6s, rounded up to 1s: {retry}");
}

#[tokio::test(flavor = "multi_thread")]
async fn api_keys_have_their_own_buckets_and_keyless_requests_share_the_ip_bucket() {
    let up = Upstream::start("a").await;
    let extra = "[rate_limits.per_key]\nrate = 2\nper = \"1m\"\nkey = \"header:X-Api-Key\"\n[[routes]]\nupstream = \"app\"\nrate_limit = [\"per_key\"]\n";
    let b = Balancer::start(&config_for(&[up.addr], extra), &[]);
    let with = |k: &'static str| [("x-api-key", k)];
    assert_eq!(get_as(b.addr(), "/", &with("alice")).await.status, 200);
    assert_eq!(get_as(b.addr(), "/", &with("alice")).await.status, 200);
    assert_eq!(get_as(b.addr(), "/", &with("alice")).await.status, 429);
    assert_eq!(get_as(b.addr(), "/", &with("bob")).await.status, 200, "another key has its own bucket");
    // No key: keyed by client IP, apart from every key's bucket (even a key equal to the IP).
    assert_eq!(get_as(b.addr(), "/", &with("127.0.0.1")).await.status, 200);
    assert_eq!(get_as(b.addr(), "/", &[]).await.status, 200);
    assert_eq!(get_as(b.addr(), "/", &[]).await.status, 200);
    assert_eq!(get_as(b.addr(), "/", &[]).await.status, 429);
    assert_eq!(up.hits(), 6);
}

#[tokio::test(flavor = "multi_thread")]
async fn x_forwarded_for_counts_only_from_trusted_proxies() {
    let up = Upstream::start("a").await;
    let limit = "[rate_limits.ip]\nrate = 1\nper = \"1m\"\n[[routes]]\nupstream = \"app\"\nrate_limit = \"ip\"\n";
    // Untrusted peer: a spoofed X-Forwarded-For does not buy a new bucket.
    let b = Balancer::start(&config_for(&[up.addr], limit), &[]);
    assert_eq!(get_as(b.addr(), "/", &[("x-forwarded-for", "1.1.1.1")]).await.status, 200);
    assert_eq!(get_as(b.addr(), "/", &[("x-forwarded-for", "2.2.2.2")]).await.status, 429);
    // Trusted peer: the right-most untrusted entry is the client.
    let b = Balancer::start(
        &config_for(&[up.addr], limit),
        &["--set", "server.trusted_proxies=[\"127.0.0.0/8\", \"10.0.0.0/8\"]"],
    );
    assert_eq!(get_as(b.addr(), "/", &[("x-forwarded-for", "1.1.1.1")]).await.status, 200);
    assert_eq!(get_as(b.addr(), "/", &[("x-forwarded-for", "2.2.2.2")]).await.status, 200);
    assert_eq!(get_as(b.addr(), "/", &[("x-forwarded-for", "2.2.2.2")]).await.status, 429);
    // A client spoofing a left-most entry is still keyed by its real (right-most untrusted) address.
    assert_eq!(get_as(b.addr(), "/", &[("x-forwarded-for", "9.9.9.9, 2.2.2.2, 10.0.0.1")]).await.status, 429);
    assert_eq!(get_as(b.addr(), "/", &[("x-forwarded-for", "2.2.2.2, 3.3.3.3, 10.0.0.1")]).await.status, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn every_limit_must_admit_and_a_refusal_takes_no_token() {
    let up = Upstream::start("a").await;
    let extra = "[rate_limits.global]\nrate = 10\nper = \"1h\"\nkey = \"global\"\n[rate_limits.ip]\nrate = 2\nper = \"1h\"\n[[routes]]\npath_prefix = \"/app\"\nupstream = \"app\"\nrate_limit = \"ip\"\n";
    let b = Balancer::start(
        &config_for(&[up.addr], extra),
        &["--set", "server.rate_limit=\"global\"", "--set", "server.trusted_proxies=[\"127.0.0.1\"]"],
    );
    // Five clients, three tries each: the third of each is refused by "ip" and must not
    // cost "global" a token, so all ten global tokens go to admitted requests.
    let mut admitted = 0;
    for client in 1..=5 {
        let ip = format!("192.0.2.{client}");
        for attempt in 0..3 {
            let r = get_as(b.addr(), "/app", &[("x-forwarded-for", &ip)]).await;
            if attempt < 2 {
                assert_eq!(r.status, 200, "client {client} attempt {attempt}");
                admitted += 1;
            } else {
                assert_eq!(r.status, 429);
            }
        }
    }
    assert_eq!(admitted, 10);
    // Now the global bucket is empty: a fresh client is refused by "global".
    let r = get_as(b.addr(), "/app", &[("x-forwarded-for", "192.0.2.99")]).await;
    assert_eq!(r.status, 429);
    assert!(r.text().contains("global"), "{}", r.text());
    assert_eq!(up.hits(), 10);
    // The server-wide limit applies to requests that match no route, too.
    assert_eq!(get_as(b.addr(), "/elsewhere", &[]).await.status, 429);
}
