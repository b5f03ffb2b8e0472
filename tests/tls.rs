//! TLS through the real binary (SPEC section 9, with the config keys of section 2 and the
//! reload rules of section 6): HTTPS listeners next to plain ones, ALPN, TLS 1.2 and 1.3,
//! certificates chosen by SNI, certificate files renewed (and broken) under a running
//! process, config errors that name the file, handshakes that stall or never start, and
//! `https://` backends verified against a CA file or a `tls_server_name`.
//!
//! Certificates are made at test time by a test CA (tests/common/tls.rs).

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::tls::*;
use common::*;
use http::Version;
use rustls::ProtocolVersion;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

/// A `[server.tls]` section on 127.0.0.1:0 with `cert`/`key` and `extra` lines after it
/// (e.g. `[[server.tls.sni]]` entries).
fn tls_section(cert: &Path, key: &Path, extra: &str) -> String {
    format!(
        "\n[server.tls]\nlisten = [\"127.0.0.1:0\"]\ncert = {}\nkey = {}\n{extra}\n",
        toml_path(cert),
        toml_path(key)
    )
}

fn sni_entry(host: &str, cert: &Path, key: &Path) -> String {
    format!("\n[[server.tls.sni]]\nhost = \"{host}\"\ncert = {}\nkey = {}\n", toml_path(cert), toml_path(key))
}

/// A started balancer with one plain and one HTTPS listener over a plain upstream.
struct Site {
    b: Balancer,
    https: SocketAddr,
    http: SocketAddr,
}

fn start_site(backends: &[SocketAddr], tls: &str, admin: bool, args: &[&str]) -> Site {
    let config = if admin { config_with_admin(backends, tls) } else { config_for(backends, tls) };
    let b = Balancer::try_start(&config, args).unwrap_or_else(|e| panic!("balancer did not start: {e}"));
    let https = https_addr(&b);
    let http = http_addr(&b);
    Site { b, https, http }
}

/// A site serving one certificate for `localhost`, from a new test CA, in front of one
/// upstream; it holds the files and the upstream for as long as the test keeps it.
struct LocalhostSite {
    ca: TestCa,
    s: Site,
    _dir: tempfile::TempDir,
    up: Upstream,
}

async fn localhost_site(admin: bool, args: &[&str]) -> LocalhostSite {
    let ca = TestCa::new("balancer test CA");
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = ca.leaf(&["localhost"]).write(dir.path(), "site");
    let up = Upstream::start("a").await;
    let s = start_site(&[up.addr], &tls_section(&cert, &key, ""), admin, args);
    LocalhostSite { ca, s, _dir: dir, up }
}

fn echo_header(r: &Reply, name: &str) -> Option<String> {
    r.json()["headers"][name].as_str().map(str::to_owned)
}

/// Which of `known` (name, DER) `der` is, for readable failures.
fn which<'a>(der: &[u8], known: &[(&'a str, &[u8])]) -> &'a str {
    known.iter().find(|(_, d)| *d == der).map_or("an unknown certificate", |(n, _)| n)
}

/// Polls new handshakes for SNI `name` until one presents `want`; every handshake must
/// succeed and present `want` or one of `allowed`. Returns how long it took.
async fn wait_for_cert(
    addr: SocketAddr,
    name: &str,
    ca: &TestCa,
    want: &[u8],
    allowed: &[&[u8]],
    within: Duration,
) -> Duration {
    let start = Instant::now();
    loop {
        let conn = tls_connect(addr, name, ca, &ClientOpts::default().any_name()).await.unwrap_or_else(|e| {
            panic!("a handshake failed after {:?} while certificates changed: {e}", start.elapsed())
        });
        if conn.peer_cert == want {
            return start.elapsed();
        }
        assert!(
            allowed.contains(&conn.peer_cert.as_slice()),
            "a handshake presented a certificate that is neither the old nor the new one"
        );
        assert!(start.elapsed() < within, "new handshakes still get the old certificate after {within:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn reload_failures(admin: SocketAddr) -> f64 {
    metric(&get(admin, "/metrics").await.text(), "balancer_config_reloads_total{result=\"failure\"}").unwrap_or(0.0)
}

/// The file name (last component) of `p`, to look for in error messages.
fn file_name(p: &Path) -> String {
    p.file_name().unwrap().to_string_lossy().into_owned()
}

// ---------------------------------------------------------------------------------------
// HTTPS listener
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn https_listener_proxies_next_to_plain_with_forwarded_proto() {
    let site = localhost_site(false, &[]).await;
    let (ca, s) = (&site.ca, &site.s);

    // One `listening` line per listener, each saying which protocol it speaks.
    assert_eq!(listeners(&s.b, "https", 1).len(), 1, "{:#?}", s.b.logs_matching("listening"));
    assert_eq!(listeners(&s.b, "http", 1).len(), 1, "{:#?}", s.b.logs_matching("listening"));
    assert_ne!(s.https, s.http);

    let (version, r) =
        https_get_with(s.https, "localhost", ca, "/over-tls?q=1", &ClientOpts::default().alpn(&["http/1.1"])).await;
    assert_eq!(version, Version::HTTP_11);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-upstream"), Some("a"));
    assert_eq!(r.json()["path"], "/over-tls?q=1");
    assert_eq!(echo_header(&r, "x-forwarded-proto").as_deref(), Some("https"));
    assert!(r.header("x-request-id").is_some());

    // The plain listener of the same config, side by side.
    let r = get(s.http, "/plain").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-upstream"), Some("a"));
    assert_eq!(echo_header(&r, "x-forwarded-proto").as_deref(), Some("http"));

    // And TLS again after the plain request: both keep working.
    let (_, r) = https_get(s.https, "localhost", ca, "/again").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(echo_header(&r, "x-forwarded-proto").as_deref(), Some("https"));
    assert_eq!(site.up.hits(), 3);
}

#[tokio::test(flavor = "multi_thread")]
async fn alpn_h2_gets_http2_and_http11_gets_http1() {
    let site = localhost_site(false, &[]).await;
    let (ca, s) = (&site.ca, &site.s);

    // Offering h2 first: h2 is chosen, and the client speaks HTTP/2 end to end.
    let conn = tls_connect(s.https, "localhost", ca, &ClientOpts::default().alpn(&["h2", "http/1.1"])).await.unwrap();
    assert_eq!(conn.alpn_str().as_deref(), Some("h2"));
    let mut h2 = conn.h2().await;
    for path in ["/h2/1", "/h2/2"] {
        let (version, r) = h2.get("localhost", path).await.unwrap();
        assert_eq!(version, Version::HTTP_2);
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.json()["path"], path);
        assert_eq!(echo_header(&r, "x-forwarded-proto").as_deref(), Some("https"));
    }

    // Offering only http/1.1: HTTP/1.1.
    let conn = tls_connect(s.https, "localhost", ca, &ClientOpts::default().alpn(&["http/1.1"])).await.unwrap();
    assert_eq!(conn.alpn_str().as_deref(), Some("http/1.1"));
    let (version, r) = conn.http1().await.get("localhost", "/h1").await.unwrap();
    assert_eq!(version, Version::HTTP_11);
    assert_eq!(r.status, 200, "{}", r.text());

    // Offering no ALPN at all (curl --no-alpn): HTTP/1.1 still works.
    let conn = tls_connect(s.https, "localhost", ca, &ClientOpts::default().alpn(&[])).await.unwrap();
    assert_eq!(conn.alpn_str(), None);
    let (version, r) = conn.http1().await.get("localhost", "/no-alpn").await.unwrap();
    assert_eq!(version, Version::HTTP_11);
    assert_eq!(r.status, 200, "{}", r.text());
}

#[tokio::test(flavor = "multi_thread")]
async fn tls12_only_and_tls13_only_clients_both_work() {
    let site = localhost_site(false, &[]).await;
    let (ca, s) = (&site.ca, &site.s);

    for (version, expect) in
        [(&rustls::version::TLS12, ProtocolVersion::TLSv1_2), (&rustls::version::TLS13, ProtocolVersion::TLSv1_3)]
    {
        for alpn in [&["h2"][..], &["http/1.1"][..]] {
            let conn = tls_connect(s.https, "localhost", ca, &ClientOpts::default().versions(&[version]).alpn(alpn))
                .await
                .unwrap_or_else(|e| panic!("{expect:?} handshake with ALPN {alpn:?} failed: {e}"));
            assert_eq!(conn.version, expect);
            let (_, r) = conn.http().await.get("localhost", "/v").await.unwrap();
            assert_eq!(r.status, 200, "{expect:?}: {}", r.text());
            assert_eq!(echo_header(&r, "x-forwarded-proto").as_deref(), Some("https"));
        }
    }
}

// ---------------------------------------------------------------------------------------
// Session resumption
// ---------------------------------------------------------------------------------------

/// How many of `clients` resume: each (its own config, so its own stored session)
/// connects and makes a request, then all come back once. Sixteen at a time.
async fn returning(s: &Site, clients: &[Arc<rustls::ClientConfig>]) -> (usize, usize) {
    let mut resumed = 0;
    for pass in ["first", "returning"] {
        for batch in clients.chunks(16) {
            let mut set = tokio::task::JoinSet::new();
            for config in batch {
                let (addr, config) = (s.https, config.clone());
                set.spawn(async move {
                    let conn = tls_connect_with(addr, "localhost", config).await.unwrap();
                    let kind = conn.kind;
                    // The request also reads the TLS 1.3 tickets sent after the handshake.
                    let (_, r) = conn.http1().await.get("localhost", "/v").await.unwrap();
                    assert_eq!(r.status, 200);
                    kind
                });
            }
            while let Some(kind) = set.join_next().await {
                if pass == "returning" && kind.unwrap() == rustls::HandshakeKind::Resumed {
                    resumed += 1;
                }
            }
        }
    }
    (resumed, clients.len())
}

/// `n` clients of TLS `version`; TLS 1.2 ones resume by session id when `!tickets`.
fn clients(
    ca: &TestCa,
    version: &'static rustls::SupportedProtocolVersion,
    tickets: bool,
    n: usize,
) -> Vec<Arc<rustls::ClientConfig>> {
    (0..n)
        .map(|_| {
            let mut config =
                (*client_config(ca, &ClientOpts::default().versions(&[version]).alpn(&["http/1.1"]))).clone();
            if !tickets {
                config.resumption = rustls::client::Resumption::default()
                    .tls12_resumption(rustls::client::Tls12Resumption::SessionIdOnly);
            }
            Arc::new(config)
        })
        .collect()
}

/// More returning clients than rustls's default session cache holds (256) all resume:
/// TLS 1.3 and TLS 1.2 by ticket, TLS 1.2 by session id; and they still do after a
/// reload (the ticket keys and the cache belong to the process, not to a config).
#[tokio::test(flavor = "multi_thread")]
async fn returning_clients_resume_their_sessions_across_a_reload() {
    let site = localhost_site(true, &[]).await;
    let (ca, s) = (&site.ca, &site.s);
    let n = 300;
    for (what, version, tickets) in [
        ("TLS 1.3", &rustls::version::TLS13, true),
        ("TLS 1.2 with tickets", &rustls::version::TLS12, true),
        ("TLS 1.2 by session id", &rustls::version::TLS12, false),
    ] {
        let (resumed, of) = returning(s, &clients(ca, version, tickets, n)).await;
        assert_eq!(resumed, of, "{what}: {resumed} of {of} returning clients resumed");
    }
    // Sessions made before a reload resume after it.
    let before_reload = clients(ca, &rustls::version::TLS13, true, 1)
        .into_iter()
        .chain(clients(ca, &rustls::version::TLS12, false, 1))
        .collect::<Vec<_>>();
    for config in &before_reload {
        let conn = tls_connect_with(s.https, "localhost", config.clone()).await.unwrap();
        conn.http1().await.get("localhost", "/v").await.unwrap();
    }
    let admin = s.b.admin();
    let r = send(admin, http::Request::post("/reload").body(http_body_util::Full::default()).unwrap()).await;
    assert_eq!(r.json()["ok"], true, "{}", r.text());
    for config in &before_reload {
        let conn = tls_connect_with(s.https, "localhost", config.clone()).await.unwrap();
        assert_eq!(conn.kind, rustls::HandshakeKind::Resumed, "{:?} after a reload", conn.version);
    }
}

// ---------------------------------------------------------------------------------------
// SNI
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn sni_chooses_the_certificate_and_falls_back_to_the_default() {
    let ca = TestCa::new("balancer test CA");
    let dir = tempfile::tempdir().unwrap();
    let (default, api, wild) = (ca.leaf(&["localhost"]), ca.leaf(&["api.test"]), ca.leaf(&["*.wild.test"]));
    let (cert, key) = default.write(dir.path(), "default");
    let (api_cert, api_key) = api.write(dir.path(), "api");
    let (wild_cert, wild_key) = wild.write(dir.path(), "wild");
    let sni =
        format!("{}{}", sni_entry("api.test", &api_cert, &api_key), sni_entry("*.wild.test", &wild_cert, &wild_key));
    let up = Upstream::start("a").await;
    let s = start_site(&[up.addr], &tls_section(&cert, &key, &sni), false, &[]);

    // The certificates compared are the ones in the files.
    let file_der = |p: &PathBuf| {
        use rustls::pki_types::pem::PemObject;
        rustls::pki_types::CertificateDer::from_pem_file(p).unwrap().to_vec()
    };
    let known: Vec<(&str, Vec<u8>)> =
        vec![("default", file_der(&cert)), ("api", file_der(&api_cert)), ("wild", file_der(&wild_cert))];
    let known_refs: Vec<(&str, &[u8])> = known.iter().map(|(n, d)| (*n, d.as_slice())).collect();

    for (name, expect) in [
        ("api.test", "api"),
        ("x.wild.test", "wild"),
        ("other-label.wild.test", "wild"),
        ("localhost", "default"),
        ("other.test", "default"),
        ("wild.test", "default"),
        ("api.test.example", "default"),
    ] {
        let got = peer_cert(s.https, name, &ca).await;
        assert_eq!(which(&got, &known_refs), expect, "SNI {name:?}");
    }
    // No SNI at all (an IP-literal client, or SNI turned off): the default.
    let conn = tls_connect(s.https, "localhost", &ca, &ClientOpts::default().no_sni().any_name()).await.unwrap();
    assert_eq!(which(&conn.peer_cert, &known_refs), "default", "no SNI");

    // Strict clients (name checked) are served under each name.
    for name in ["api.test", "x.wild.test", "localhost"] {
        let (_, r) = https_get(s.https, name, &ca, "/sni").await;
        assert_eq!(r.status, 200, "{name}: {}", r.text());
        assert_eq!(r.header("x-upstream"), Some("a"));
    }
}

// ---------------------------------------------------------------------------------------
// Certificate hot reload
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn renewed_certificate_written_in_place_is_served_without_restart() {
    let ca = TestCa::new("balancer test CA");
    let dir = tempfile::tempdir().unwrap();
    let old = ca.leaf(&["localhost"]);
    let (cert, key) = old.write(dir.path(), "site");
    let up = Upstream::start("a").await;
    let s = start_site(&[up.addr], &tls_section(&cert, &key, ""), false, &[]);
    let pid = s.b.pid();

    assert_eq!(peer_cert(s.https, "localhost", &ca).await, old.der);
    // A keep-alive connection opened before the renewal.
    let mut kept =
        tls_connect(s.https, "localhost", &ca, &ClientOpts::default().alpn(&["http/1.1"])).await.unwrap().http1().await;
    assert_eq!(kept.get("localhost", "/before").await.unwrap().1.status, 200);

    // certbot-style renewal: the certificate, then the key, rewritten in place.
    let new = ca.leaf(&["localhost"]);
    std::fs::write(&cert, &new.cert_pem).unwrap();
    std::fs::write(&key, &new.key_pem).unwrap();
    let took = wait_for_cert(s.https, "localhost", &ca, &new.der, &[&old.der], Duration::from_secs(4)).await;
    eprintln!("renewed certificate served after {took:?}");

    // New handshakes keep getting it, and requests over them work.
    let (_, r) = https_get(s.https, "localhost", &ca, "/after").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(peer_cert(s.https, "localhost", &ca).await, new.der);
    // The connection from before the renewal still serves requests.
    let (_, r) = kept.get("localhost", "/kept").await.expect("the pre-renewal keep-alive connection was dropped");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["path"], "/kept");
    assert_eq!(s.b.pid(), pid);
}

#[tokio::test(flavor = "multi_thread")]
async fn renewed_certificate_renamed_into_place_is_served_without_restart() {
    let ca = TestCa::new("balancer test CA");
    let dir = tempfile::tempdir().unwrap();
    let old = ca.leaf(&["localhost"]);
    let (cert, key) = old.write(dir.path(), "site");
    let up = Upstream::start("a").await;
    let s = start_site(&[up.addr], &tls_section(&cert, &key, ""), false, &[]);

    assert_eq!(peer_cert(s.https, "localhost", &ca).await, old.der);
    // An HTTP/2 connection opened before the renewal.
    let mut kept =
        tls_connect(s.https, "localhost", &ca, &ClientOpts::default().alpn(&["h2"])).await.unwrap().h2().await;
    assert_eq!(kept.get("localhost", "/before").await.unwrap().1.status, 200);

    // New files written beside the old ones, then renamed over them (atomic replace).
    let new = ca.leaf(&["localhost"]);
    let staging = dir.path().join("staging");
    std::fs::create_dir(&staging).unwrap();
    let (new_cert, new_key) = new.write(&staging, "site");
    std::fs::rename(&new_cert, &cert).unwrap();
    std::fs::rename(&new_key, &key).unwrap();
    let took = wait_for_cert(s.https, "localhost", &ca, &new.der, &[&old.der], Duration::from_secs(4)).await;
    eprintln!("renamed certificate served after {took:?}");

    let (_, r) = https_get(s.https, "localhost", &ca, "/after").await;
    assert_eq!(r.status, 200, "{}", r.text());
    let (version, r) = kept.get("localhost", "/kept").await.expect("the pre-renewal HTTP/2 connection was dropped");
    assert_eq!(version, Version::HTTP_2);
    assert_eq!(r.status, 200, "{}", r.text());

    // A second renewal through the renamed files is picked up too (the watch survives).
    let newer = ca.leaf(&["localhost"]);
    let (newer_cert, newer_key) = newer.write(&staging, "site");
    std::fs::rename(&newer_cert, &cert).unwrap();
    std::fs::rename(&newer_key, &key).unwrap();
    wait_for_cert(s.https, "localhost", &ca, &newer.der, &[&new.der], Duration::from_secs(4)).await;
}

/// Kubernetes mounts a Secret as `tls.crt -> ..data/tls.crt`, `..data -> ..TIMESTAMP`, and
/// renews it by pointing `..data` at a new directory (a symlink renamed over the old one).
#[tokio::test(flavor = "multi_thread")]
async fn renewed_certificate_swapped_by_symlink_as_in_kubernetes_is_served() {
    use std::os::unix::fs::symlink;
    let ca = TestCa::new("balancer test CA");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let old = ca.leaf(&["localhost"]);
    std::fs::create_dir(d.join("..v1")).unwrap();
    old.write(&d.join("..v1"), "tls");
    symlink("..v1", d.join("..data")).unwrap();
    symlink("..data/tls.pem", d.join("tls.pem")).unwrap();
    symlink("..data/tls.key", d.join("tls.key")).unwrap();
    let (cert, key) = (d.join("tls.pem"), d.join("tls.key"));
    let up = Upstream::start("a").await;
    let s = start_site(&[up.addr], &tls_section(&cert, &key, ""), false, &[]);
    assert_eq!(peer_cert(s.https, "localhost", &ca).await, old.der);

    let new = ca.leaf(&["localhost"]);
    std::fs::create_dir(d.join("..v2")).unwrap();
    new.write(&d.join("..v2"), "tls");
    symlink("..v2", d.join("..data_tmp")).unwrap();
    std::fs::rename(d.join("..data_tmp"), d.join("..data")).unwrap();
    std::fs::remove_dir_all(d.join("..v1")).unwrap();
    let took = wait_for_cert(s.https, "localhost", &ca, &new.der, &[&old.der], Duration::from_secs(4)).await;
    eprintln!("symlink-swapped certificate served after {took:?}");
    let (_, r) = https_get(s.https, "localhost", &ca, "/after").await;
    assert_eq!(r.status, 200, "{}", r.text());
}

#[tokio::test(flavor = "multi_thread")]
async fn mismatched_certificate_and_key_are_refused_and_the_old_pair_stays() {
    let ca = TestCa::new("balancer test CA");
    let dir = tempfile::tempdir().unwrap();
    let old = ca.leaf(&["localhost"]);
    let (cert, key) = old.write(dir.path(), "site");
    let up = Upstream::start("a").await;
    let s = start_site(&[up.addr], &tls_section(&cert, &key, ""), true, &[]);
    let admin = s.b.admin();
    assert_eq!(peer_cert(s.https, "localhost", &ca).await, old.der);
    let before = reload_failures(admin).await;
    let status: serde_json::Value = get(admin, "/status").await.json();
    let generation = status["generation"].as_u64().unwrap();

    // A new certificate, with the old key left in place: they do not belong together.
    let new = ca.leaf(&["localhost"]);
    std::fs::write(&cert, &new.cert_pem).unwrap();
    let start = Instant::now();
    while reload_failures(admin).await <= before {
        assert!(
            start.elapsed() < Duration::from_secs(4),
            "no failed reload counted within 4s of a mismatched certificate; /status: {}",
            get(admin, "/status").await.text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let status: serde_json::Value = get(admin, "/status").await.json();
    assert_eq!(status["last_reload"]["ok"], false, "{status}");
    assert_eq!(status["generation"].as_u64(), Some(generation), "a failed reload bumped the generation: {status}");
    let error = status["last_reload"]["error"].as_str().unwrap_or_default().to_owned();
    assert!(
        error.contains(&file_name(&cert)) || error.contains(&file_name(&key)),
        "last_reload.error does not name the certificate or key file: {error:?}"
    );

    // The old pair stays in force: new handshakes succeed and get the old certificate.
    for _ in 0..3 {
        assert_eq!(peer_cert(s.https, "localhost", &ca).await, old.der, "the broken pair was put in force");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (_, r) = https_get(s.https, "localhost", &ca, "/still").await;
    assert_eq!(r.status, 200, "{}", r.text());

    // Writing the matching key completes the pair, which is then served.
    std::fs::write(&key, &new.key_pem).unwrap();
    wait_for_cert(s.https, "localhost", &ca, &new.der, &[&old.der], Duration::from_secs(4)).await;
    let status: serde_json::Value = get(admin, "/status").await.json();
    assert_eq!(status["last_reload"]["ok"], true, "{status}");
}

// ---------------------------------------------------------------------------------------
// Config errors name the file
// ---------------------------------------------------------------------------------------

/// A dir holding a valid leaf (`site.pem`, `site.key`), a test CA (`ca.pem`), and whatever
/// a case adds.
struct Files {
    dir: tempfile::TempDir,
    ca: TestCa,
    cert: PathBuf,
    key: PathBuf,
    ca_pem: PathBuf,
}

fn files() -> Files {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("balancer test CA");
    let (cert, key) = ca.leaf(&["localhost"]).write(dir.path(), "site");
    let ca_pem = ca.write(dir.path(), "ca.pem");
    Files { dir, ca, cert, key, ca_pem }
}

impl Files {
    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn garbage(&self, name: &str) -> PathBuf {
        let p = self.path(name);
        std::fs::write(&p, "this is not PEM\nat all\n").unwrap();
        p
    }

    /// `balancer --check` on `[server] ... [server.tls] ... ` plus `upstream` (TOML for
    /// `[upstreams.app]`), run in the dir.
    fn check(&self, tls: &str, upstream: &str) -> (i32, String, String) {
        let text = format!(
            "[server]\nlisten = [\"127.0.0.1:0\"]\n\n[admin]\nlisten = \"off\"\n\n[upstreams.app]\n{upstream}\n{tls}\n"
        );
        std::fs::write(self.path("balancer.toml"), &text).unwrap();
        run_cli(&["--check"], self.dir.path())
    }
}

const PLAIN_UPSTREAM: &str = "backends = [\"http://127.0.0.1:8000\"]";

fn assert_fails_naming(result: (i32, String, String), file: &Path) {
    let (code, out, err) = result;
    assert_eq!(code, 1, "--check should fail; stdout={out:?} stderr={err:?}");
    let name = file_name(file);
    assert!(err.contains(&name), "stderr does not name {name:?}: {err:?}");
}

#[test]
fn check_accepts_a_valid_tls_config() {
    let f = files();
    let (api_cert, api_key) = f.ca.leaf(&["api.test"]).write(f.dir.path(), "api");
    let tls = tls_section(&f.cert, &f.key, &sni_entry("api.test", &api_cert, &api_key));
    let upstream = format!(
        "backends = [\"https://127.0.0.1:8443\"]\nca = {}\ntls_server_name = \"backend.internal\"",
        toml_path(&f.ca_pem)
    );
    let (code, out, err) = f.check(&tls, &upstream);
    assert_eq!(code, 0, "stdout={out:?} stderr={err:?}");
}

#[test]
fn check_missing_certificate_file_names_it() {
    let f = files();
    let missing = f.path("missing-site.pem");
    assert_fails_naming(f.check(&tls_section(&missing, &f.key, ""), PLAIN_UPSTREAM), &missing);
}

#[test]
fn check_missing_key_file_names_it() {
    let f = files();
    let missing = f.path("missing-site.key");
    assert_fails_naming(f.check(&tls_section(&f.cert, &missing, ""), PLAIN_UPSTREAM), &missing);
}

#[test]
fn check_certificate_that_is_not_pem_names_it() {
    let f = files();
    let garbage = f.garbage("garbage-site.pem");
    assert_fails_naming(f.check(&tls_section(&garbage, &f.key, ""), PLAIN_UPSTREAM), &garbage);
}

#[test]
fn check_key_that_is_not_pem_names_it() {
    let f = files();
    let garbage = f.garbage("garbage-site.key");
    assert_fails_naming(f.check(&tls_section(&f.cert, &garbage, ""), PLAIN_UPSTREAM), &garbage);
}

#[test]
fn check_key_that_does_not_match_the_certificate_names_it() {
    let f = files();
    let (_, other_key) = f.ca.leaf(&["localhost"]).write(f.dir.path(), "other");
    let (code, out, err) = f.check(&tls_section(&f.cert, &other_key, ""), PLAIN_UPSTREAM);
    assert_eq!(code, 1, "--check should fail; stdout={out:?} stderr={err:?}");
    assert!(
        err.contains(&file_name(&other_key)) || err.contains(&file_name(&f.cert)),
        "stderr names neither {:?} nor {:?}: {err:?}",
        other_key,
        f.cert
    );
}

#[test]
fn check_sni_entry_with_missing_or_mismatched_files_names_them() {
    let f = files();
    let missing = f.path("missing-api.pem");
    let tls = tls_section(&f.cert, &f.key, &sni_entry("api.test", &missing, &f.key));
    assert_fails_naming(f.check(&tls, PLAIN_UPSTREAM), &missing);

    let (api_cert, _) = f.ca.leaf(&["api.test"]).write(f.dir.path(), "api");
    let (_, wrong_key) = f.ca.leaf(&["api.test"]).write(f.dir.path(), "wrong-api");
    let tls = tls_section(&f.cert, &f.key, &sni_entry("api.test", &api_cert, &wrong_key));
    let (code, out, err) = f.check(&tls, PLAIN_UPSTREAM);
    assert_eq!(code, 1, "--check should fail; stdout={out:?} stderr={err:?}");
    assert!(
        err.contains(&file_name(&wrong_key)) || err.contains(&file_name(&api_cert)),
        "stderr names neither {wrong_key:?} nor {api_cert:?}: {err:?}"
    );
}

#[test]
fn check_missing_upstream_ca_names_it() {
    let f = files();
    let missing = f.path("missing-ca.pem");
    let upstream = format!("backends = [\"https://127.0.0.1:8443\"]\nca = {}", toml_path(&missing));
    assert_fails_naming(f.check("", &upstream), &missing);
}

#[test]
fn check_upstream_ca_that_is_not_pem_names_it() {
    let f = files();
    let garbage = f.garbage("garbage-ca.pem");
    let upstream = format!("backends = [\"https://127.0.0.1:8443\"]\nca = {}", toml_path(&garbage));
    assert_fails_naming(f.check("", &upstream), &garbage);
}

// ---------------------------------------------------------------------------------------
// Handshakes that stall or never start
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn a_stalled_handshake_is_closed_after_client_header() {
    let site = localhost_site(false, &["--set", "timeouts.client_header=500ms"]).await;
    let (ca, s) = (&site.ca, &site.s);

    // One connection sends nothing; another sends the start of a ClientHello record
    // (a handshake record header promising 512 bytes) and then nothing more.
    let start = Instant::now();
    let mut silent = TcpStream::connect(s.https).await.unwrap();
    let mut partial = TcpStream::connect(s.https).await.unwrap();
    partial.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01]).await.unwrap();
    let (a, b) = tokio::join!(
        async {
            let closed = closed_within(&mut silent, Duration::from_secs(3)).await;
            (closed, start.elapsed())
        },
        async {
            let closed = closed_within(&mut partial, Duration::from_secs(3)).await;
            (closed, start.elapsed())
        }
    );
    for (what, (closed, took)) in [("silent", a), ("partial ClientHello", b)] {
        assert!(closed, "{what}: the stalled handshake was still open after 3s");
        assert!(took >= Duration::from_millis(400), "{what}: closed after only {took:?}");
        assert!(took < Duration::from_millis(2000), "{what}: closed only after {took:?}");
    }
    // The listener still serves.
    let (_, r) = https_get(s.https, "localhost", ca, "/").await;
    assert_eq!(r.status, 200, "{}", r.text());
}

#[tokio::test(flavor = "multi_thread")]
async fn garbage_instead_of_client_hello_does_not_hold_up_real_clients() {
    let site = localhost_site(false, &[]).await;
    let (ca, s) = (&site.ca, &site.s);

    // 200 connections that send garbage instead of a ClientHello: half send bytes that
    // cannot start a TLS record (plain HTTP, binary noise) and should be dropped at once;
    // half send a handshake record header that promises more than they send, and stay.
    let mut refused = Vec::new();
    let mut stalled = Vec::new();
    for i in 0..200u32 {
        let mut c = TcpStream::connect(s.https).await.unwrap();
        let garbage: Vec<u8> = match i % 4 {
            0 => b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n".to_vec(),
            1 => std::iter::once(0xff)
                .chain((1..64u32).map(|j| (j.wrapping_mul(31).wrapping_add(i) % 251) as u8))
                .collect(),
            2 => vec![0x16, 0x03, 0x01, 0x40, 0x00, 0x01, 0x00],
            _ => vec![0x16, 0x03, 0x01, 0x02, 0x00],
        };
        let _ = c.write_all(&garbage).await;
        if i % 4 < 2 { refused.push(c) } else { stalled.push(c) }
    }

    // A real client is served promptly, several times over.
    for i in 0..5 {
        let start = Instant::now();
        let (_, r) =
            tokio::time::timeout(Duration::from_secs(2), https_get(s.https, "localhost", ca, &format!("/real/{i}")))
                .await
                .expect("an HTTPS request took over 2s while garbage connections were open");
        let took = start.elapsed();
        assert_eq!(r.status, 200, "{}", r.text());
        assert!(took < Duration::from_secs(1), "an HTTPS request took {took:?} next to 200 garbage connections");
    }
    // What cannot be TLS is not kept open.
    let n = refused.len();
    let closed = count_closed(refused, Duration::from_secs(2)).await;
    assert_eq!(closed, n, "only {closed} of {n} non-TLS connections were closed within 2s");
    drop(stalled);
}

/// How many of `conns` the server closes within `within` (all watched at once).
async fn count_closed(conns: Vec<TcpStream>, within: Duration) -> usize {
    let mut set = tokio::task::JoinSet::new();
    for mut c in conns {
        set.spawn(async move { closed_within(&mut c, within).await });
    }
    set.join_all().await.into_iter().filter(|c| *c).count()
}

// ---------------------------------------------------------------------------------------
// https:// backends
// ---------------------------------------------------------------------------------------

fn https_upstream_config(upstreams: &str) -> String {
    format!("[server]\nlisten = [\"127.0.0.1:0\"]\n\n[admin]\nlisten = \"off\"\n\n{upstreams}\n")
}

/// Log lines at WARN or above that talk about a certificate problem.
fn certificate_warnings(b: &Balancer) -> Vec<serde_json::Value> {
    b.logs()
        .into_iter()
        .filter(|l| l["level"] == "WARN" || l["level"] == "ERROR")
        .filter(|l| {
            let text = l.to_string();
            text.to_lowercase().contains("certificate") || text.contains("UnknownIssuer")
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn https_backend_verified_against_ca_file_with_reused_connection() {
    let ca = TestCa::new("balancer test CA");
    let dir = tempfile::tempdir().unwrap();
    let ca_pem = ca.write(dir.path(), "ca.pem");
    let up = TlsUpstream::start("tls-a", &ca.leaf(&["localhost", "127.0.0.1"])).await;
    let config = https_upstream_config(&format!(
        "[upstreams.app]\nbackends = [\"https://{}\"]\nca = {}\n",
        up.addr,
        toml_path(&ca_pem)
    ));
    // One worker thread: every client connection draws on its one idle list.
    let b = Balancer::start(&config, &["--set", "server.workers=1"]);

    for i in 0..5 {
        let r = get(b.addr(), &format!("/r/{i}")).await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.header("x-upstream"), Some("tls-a"));
        assert_eq!(r.json()["path"], format!("/r/{i}"));
        assert_eq!(echo_header(&r, "x-forwarded-proto").as_deref(), Some("http"));
    }
    // Requests over several client connections, and over one keep-alive one.
    let mut conn = Conn::open(b.addr()).await;
    for i in 0..3 {
        let r = conn.get(&format!("/k/{i}")).await.unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
    }
    assert_eq!(up.hits(), 8);
    assert_eq!(up.connections(), 1, "sequential requests should reuse one pooled TLS connection to the backend");
}

#[tokio::test(flavor = "multi_thread")]
async fn https_backend_not_trusted_by_system_roots_gets_502_and_a_certificate_warning() {
    let ca = TestCa::new("balancer test CA");
    let up = TlsUpstream::start("tls-a", &ca.leaf(&["localhost", "127.0.0.1"])).await;
    // No `ca`: verified against the system roots, which do not know the test CA.
    let config = https_upstream_config(&format!("[upstreams.app]\nbackends = [\"https://{}\"]\n", up.addr));
    let b = Balancer::start(&config, &[]);

    let r = get(b.addr(), "/").await;
    assert_eq!(r.status, 502, "{}", r.text());
    assert_eq!(up.hits(), 0, "a request reached a backend whose certificate is not trusted");
    assert!(up.connections() >= 1, "balancer never connected to the backend");
    let deadline = Instant::now() + Duration::from_secs(2);
    while certificate_warnings(&b).is_empty() {
        assert!(
            Instant::now() < deadline,
            "no WARN/ERROR log line mentions the certificate problem; logs: {:#?}",
            b.logs()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    eprintln!("{}", certificate_warnings(&b)[0]);
}

#[tokio::test(flavor = "multi_thread")]
async fn tls_server_name_overrides_the_name_checked_on_the_backend() {
    let ca = TestCa::new("balancer test CA");
    let dir = tempfile::tempdir().unwrap();
    let ca_pem = ca.write(dir.path(), "ca.pem");
    // A certificate for a DNS name only: no IP SAN for 127.0.0.1.
    let up = TlsUpstream::start("internal", &ca.leaf(&["backend.internal"])).await;
    let ca_line = format!("ca = {}", toml_path(&ca_pem));
    let config = https_upstream_config(&format!(
        "[upstreams.named]\nbackends = [\"https://{addr}\"]\n{ca_line}\ntls_server_name = \"backend.internal\"\n\n\
         [upstreams.unnamed]\nbackends = [\"https://{addr}\"]\n{ca_line}\n\n\
         [[routes]]\npath_prefix = \"/named\"\nupstream = \"named\"\n\n\
         [[routes]]\npath_prefix = \"/unnamed\"\nupstream = \"unnamed\"\n",
        addr = up.addr
    ));
    let b = Balancer::start(&config, &[]);

    let r = get(b.addr(), "/named/x").await;
    assert_eq!(r.status, 200, "with tls_server_name: {}", r.text());
    assert_eq!(r.header("x-upstream"), Some("internal"));

    let r = get(b.addr(), "/unnamed/x").await;
    assert_eq!(r.status, 502, "without tls_server_name the certificate is not valid for 127.0.0.1: {}", r.text());
    assert_eq!(up.hits(), 1);
}
