//! [`RawConfig`] -> [`Config`]: every check that the file's shape cannot express. Errors
//! name the key (`upstreams.app.backends[1].weight`) so `load` can point at the file.

use std::collections::{BTreeMap, HashSet};
use std::net::{IpAddr, SocketAddr};

use http::Uri;
use http::uri::Scheme;
use ipnet::IpNet;

use std::path::{Path, PathBuf};

use super::raw::{OneOrMany, RawConfig, RawHealthCheck, RawTimeoutOverrides, RawTimeouts, RawTls, RawUpstream};
use super::*;

/// The largest backend weight: keeps the round-robin schedule small.
pub const MAX_WEIGHT: u32 = 1000;

/// A config error at `key`.
#[derive(Debug)]
pub struct KeyError {
    pub key: String,
    pub message: String,
}

pub(super) fn err<T>(key: impl Into<String>, message: impl Into<String>) -> Result<T, KeyError> {
    Err(KeyError { key: key.into(), message: message.into() })
}

/// Checks `raw`; relative file names are resolved against `base` (the config's directory).
pub fn validate(raw: &RawConfig, base: &Path) -> Result<Config, KeyError> {
    let mut files: Vec<PathBuf> = Vec::new();
    let timeouts = base_timeouts(&raw.timeouts)?;
    let s = &raw.server;
    let listen = addrs(&s.listen, "server.listen")?;
    if listen.is_empty() {
        return err("server.listen", "at least one listen address is needed");
    }
    if s.max_connections == 0 {
        return err("server.max_connections", "must be at least 1");
    }
    let max_header_bytes = s.max_header_bytes.0;
    if !(1024..=16 << 20).contains(&max_header_bytes) {
        return err("server.max_header_bytes", "must be between 1KiB and 16MiB");
    }
    let trusted_proxies = s
        .trusted_proxies
        .iter()
        .enumerate()
        .map(|(i, p)| {
            p.parse::<IpNet>().or_else(|_| p.parse::<IpAddr>().map(IpNet::from)).or_else(|_| {
                err(
                    format!("server.trusted_proxies[{i}]"),
                    format!(r#""{p}" is not an IP address or CIDR (e.g. "10.0.0.0/8")"#),
                )
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let tls = match &s.tls {
        None => None,
        Some(t) => Some(tls_listeners(t, &listen, base, &mut files)?),
    };

    let admin = match raw.admin.listen.trim() {
        "off" => None,
        a => Some(addr(a, "admin.listen")?),
    };

    let rate_limits = raw
        .rate_limits
        .iter()
        .map(|(name, rl)| {
            let key = format!("rate_limits.{name}");
            if rl.rate == 0 {
                return err(format!("{key}.rate"), "must be at least 1");
            }
            if rl.per.0.is_zero() {
                return err(format!("{key}.per"), "must be longer than 0s");
            }
            let burst = rl.burst.unwrap_or(rl.rate);
            if burst == 0 {
                return err(format!("{key}.burst"), "must be at least 1");
            }
            let limit_key = match rl.key.as_str() {
                "client_ip" => LimitKey::ClientIp,
                "global" => LimitKey::Global,
                k => match k.strip_prefix("header:").map(|h| http::HeaderName::from_bytes(h.trim().as_bytes())) {
                    Some(Ok(h)) => LimitKey::Header(h),
                    _ => {
                        return err(
                            format!("{key}.key"),
                            format!(r#"unknown key "{k}", expected "client_ip", "global" or "header:NAME""#),
                        );
                    }
                },
            };
            if rl.shared && raw.limit_store.is_none() {
                return err(format!("{key}.shared"), "a shared limit needs a [limit_store]");
            }
            let config = RateLimitConfig { rate: rl.rate, per: rl.per.0, burst, key: limit_key, shared: rl.shared };
            Ok((name.clone(), config))
        })
        .collect::<Result<BTreeMap<_, _>, _>>()?;
    let limit_names = |list: &OneOrMany, key: &str| -> Result<Vec<String>, KeyError> {
        for (i, name) in list.0.iter().enumerate() {
            if !rate_limits.contains_key(name) {
                return err(format!("{key}[{i}]"), format!(r#"no [rate_limits.{name}] is defined"#));
            }
            if list.0[..i].contains(name) {
                return err(format!("{key}[{i}]"), format!(r#""{name}" is listed twice"#));
            }
        }
        Ok(list.0.clone())
    };
    let server_limits = limit_names(&s.rate_limit, "server.rate_limit")?;
    let limit_store = raw.limit_store.as_ref().map(super::limit_store::validate).transpose()?;
    let nameservers = match &raw.resolver {
        None => Vec::new(),
        Some(r) => r.nameservers.iter().enumerate().map(|(i, n)| nameserver(n, i)).collect::<Result<_, _>>()?,
    };
    let otlp_endpoint = raw.tracing.as_ref().and_then(|t| t.otlp_endpoint.as_deref()).map(otlp_endpoint).transpose()?;

    if raw.upstreams.is_empty() {
        return err("upstreams", "no upstreams are configured: add an [upstreams.NAME] table or pass --backend URL");
    }
    let upstreams = raw
        .upstreams
        .iter()
        .map(|(name, up)| upstream(name, up, &timeouts, base, &mut files))
        .collect::<Result<Vec<_>, _>>()?;

    let caches = raw
        .caches
        .iter()
        .map(|(name, c)| {
            let key = format!("caches.{name}");
            if c.max_size.0 == 0 {
                return err(format!("{key}.max_size"), "must be larger than 0");
            }
            if c.max_object.0 == 0 || c.max_object.0 > c.max_size.0 {
                return err(format!("{key}.max_object"), "must be larger than 0 and at most max_size");
            }
            // One entry's weight is counted in a u32 by the store.
            if c.max_object.0 > u64::from(u32::MAX) / 2 {
                return err(format!("{key}.max_object"), "must be at most 2GiB");
            }
            Ok((name.clone(), CacheConfig { max_size: c.max_size.0, max_object: c.max_object.0 }))
        })
        .collect::<Result<BTreeMap<_, _>, _>>()?;

    let mut routes = Vec::with_capacity(raw.routes.len());
    for (i, r) in raw.routes.iter().enumerate() {
        let key = format!("routes[{i}]");
        if !raw.upstreams.contains_key(&r.upstream) {
            let known: Vec<&str> = raw.upstreams.keys().map(String::as_str).collect();
            return err(
                format!("{key}.upstream"),
                format!(r#"no upstream named "{}" (defined: {})"#, r.upstream, known.join(", ")),
            );
        }
        if !r.path_prefix.starts_with('/') {
            return err(format!("{key}.path_prefix"), r#"must start with "/""#);
        }
        let host = match &r.host {
            None => None,
            Some(h) => Some(host_match(h).ok_or_else(|| KeyError {
                key: format!("{key}.host"),
                message: format!(r#""{h}" is not a host name or "*.domain" pattern"#),
            })?),
        };
        let normalised = crate::path::normalise(&r.path_prefix);
        let path_prefix = match normalised.trim_end_matches('/') {
            "" => "/".to_owned(),
            p => p.to_owned(),
        };
        routes.push(RouteConfig {
            host,
            path_prefix,
            upstream: r.upstream.clone(),
            rate_limit: limit_names(&r.rate_limit, &format!("{key}.rate_limit"))?,
            strip_prefix: r.strip_prefix,
            cache: match &r.cache {
                Some(name) if !caches.contains_key(name) => {
                    return err(format!("{key}.cache"), format!(r#"no [caches.{name}] is defined"#));
                }
                c => c.clone(),
            },
        });
    }

    Ok(Config {
        server: ServerConfig {
            listen,
            workers: if s.workers == 0 {
                std::thread::available_parallelism().map_or(1, |n| n.get())
            } else {
                s.workers
            },
            max_connections: s.max_connections,
            max_request_body: s.max_request_body.0,
            max_header_bytes: max_header_bytes as usize,
            shutdown_grace: s.shutdown_grace.0,
            trusted_proxies,
            underscores_in_headers: s.underscores_in_headers,
            rate_limit: server_limits,
            timeouts,
            tls,
        },
        admin,
        log: LogConfig { level: raw.log.level, format: raw.log.format, access: raw.log.access },
        upstreams,
        rate_limits,
        caches,
        routes,
        limit_store,
        nameservers,
        otlp_endpoint,
        files,
        // Rendered from the raw config by `config::finish`.
        effective_toml: Default::default(),
    })
}

/// A file name from the config, relative to the config's directory.
fn resolve(base: &Path, file: &str) -> PathBuf {
    base.join(file)
}

fn tls_listeners(
    t: &RawTls,
    plain: &[SocketAddr],
    base: &Path,
    files: &mut Vec<PathBuf>,
) -> Result<TlsListeners, KeyError> {
    let listen = addrs(&t.listen, "server.tls.listen")?;
    if listen.is_empty() {
        return err("server.tls.listen", "at least one listen address is needed");
    }
    if let Some((i, a)) = listen.iter().enumerate().find(|(_, a)| a.port() != 0 && plain.contains(a)) {
        return err(format!("server.tls.listen[{i}]"), format!("{a} is also a plain listen address"));
    }
    let mut pair = |cert: &str, key: &str, at: &str| {
        let (cert, key) = (resolve(base, cert), resolve(base, key));
        let loaded =
            crate::tls::load_certified_key(&cert, &key).map_err(|m| KeyError { key: at.to_owned(), message: m });
        files.extend([cert, key]);
        loaded
    };
    let default = pair(&t.cert, &t.key, "server.tls.cert")?;
    let mut sni = Vec::with_capacity(t.sni.len());
    for (i, entry) in t.sni.iter().enumerate() {
        let at = format!("server.tls.sni[{i}]");
        let host = host_match(&entry.host).ok_or_else(|| KeyError {
            key: format!("{at}.host"),
            message: format!(r#""{}" is not a host name or "*.domain" pattern"#, entry.host),
        })?;
        sni.push((host, pair(&entry.cert, &entry.key, &format!("{at}.cert"))?));
    }
    Ok(TlsListeners { listen, certs: crate::tls::ServerCerts { default, sni } })
}

/// `[tracing] otlp_endpoint`: an `http://host[:port][/path]` URL (OTLP/HTTP; spans are
/// POSTed to its `/v1/traces`). TLS to the collector is not built: a local collector or
/// agent is the usual hop.
fn otlp_endpoint(url: &str) -> Result<http::Uri, KeyError> {
    const KEY: &str = "tracing.otlp_endpoint";
    let uri: http::Uri = url.trim().parse().or_else(|e| err(KEY, format!(r#""{url}" is not a URL: {e}"#)))?;
    match uri.scheme_str() {
        Some("http") => {}
        Some("https") => {
            return err(KEY, "https is not supported: send to a local collector or agent over http://");
        }
        _ => return err(KEY, format!(r#""{url}" is not an http:// URL: write e.g. "http://127.0.0.1:4318""#)),
    }
    if uri.host().is_none_or(str::is_empty) || uri.query().is_some() {
        return err(KEY, format!(r#""{url}" needs a host and no query: write e.g. "http://127.0.0.1:4318""#));
    }
    Ok(uri)
}

fn addr(a: &str, key: &str) -> Result<SocketAddr, KeyError> {
    a.trim().parse().or_else(|_| {
        err(key, format!(r#""{a}" is not a listen address: write IP:PORT, e.g. "127.0.0.1:8080" or "[::1]:8080""#))
    })
}

fn addrs(list: &OneOrMany, key: &str) -> Result<Vec<SocketAddr>, KeyError> {
    let mut out: Vec<SocketAddr> = Vec::with_capacity(list.0.len());
    for (i, a) in list.0.iter().enumerate() {
        let parsed = addr(a, &format!("{key}[{i}]"))?;
        // Port 0 (any free port) may be asked for more than once.
        if parsed.port() != 0 && out.contains(&parsed) {
            return err(format!("{key}[{i}]"), format!("{parsed} is listed twice"));
        }
        out.push(parsed);
    }
    Ok(out)
}

fn nonzero(d: &units::HumanDuration, key: &str) -> Result<std::time::Duration, KeyError> {
    if d.0.is_zero() { err(key, "must be longer than 0s") } else { Ok(d.0) }
}

fn base_timeouts(t: &RawTimeouts) -> Result<Timeouts, KeyError> {
    Ok(Timeouts {
        connect: nonzero(&t.connect, "timeouts.connect")?,
        client_header: nonzero(&t.client_header, "timeouts.client_header")?,
        upstream_header: nonzero(&t.upstream_header, "timeouts.upstream_header")?,
        idle: nonzero(&t.idle, "timeouts.idle")?,
    })
}

fn upstream_timeouts(base: &Timeouts, o: Option<&RawTimeoutOverrides>, key: &str) -> Result<Timeouts, KeyError> {
    let Some(o) = o else { return Ok(*base) };
    let pick = |v: &Option<units::HumanDuration>, name: &str, dflt| match v {
        Some(d) => nonzero(d, &format!("{key}.timeouts.{name}")),
        None => Ok(dflt),
    };
    Ok(Timeouts {
        connect: pick(&o.connect, "connect", base.connect)?,
        client_header: pick(&o.client_header, "client_header", base.client_header)?,
        upstream_header: pick(&o.upstream_header, "upstream_header", base.upstream_header)?,
        idle: pick(&o.idle, "idle", base.idle)?,
    })
}

fn upstream(
    name: &str,
    up: &RawUpstream,
    base: &Timeouts,
    dir: &Path,
    files: &mut Vec<PathBuf>,
) -> Result<UpstreamConfig, KeyError> {
    let key = format!("upstreams.{name}");
    if up.backends.is_empty() {
        return err(format!("{key}.backends"), "an upstream needs at least one backend");
    }
    let mut seen = HashSet::new();
    let mut backends = Vec::with_capacity(up.backends.len());
    for (i, b) in up.backends.iter().enumerate() {
        let bkey = format!("{key}.backends[{i}]");
        let weight = b.weight.unwrap_or(1);
        if weight == 0 {
            return err(bkey, "weight must be at least 1 (remove the backend to stop sending it traffic)");
        }
        if weight > MAX_WEIGHT {
            return err(bkey, format!("weight must be at most {MAX_WEIGHT}"));
        }
        let (scheme, authority) = backend_url(&b.url).map_err(|m| KeyError { key: bkey.clone(), message: m })?;
        if !seen.insert(authority.clone()) {
            return err(bkey, format!(r#""{}" is listed twice in this upstream"#, b.url));
        }
        let host = authority.host().trim_start_matches('[').trim_end_matches(']');
        let name = host.parse::<std::net::IpAddr>().is_err().then(|| host.to_ascii_lowercase());
        backends.push(BackendConfig { url: b.url.trim_end_matches('/').to_owned(), scheme, authority, weight, name });
    }
    if let Some(b) = up.retry_budget
        && !(0.0..=1.0).contains(&b)
    {
        return err(format!("{key}.retry_budget"), "must be a share of requests, 0.0 to 1.0");
    }
    let queue = match &up.queue {
        None => None,
        Some(_) if up.max_inflight == 0 => {
            return err(
                format!("{key}.queue"),
                "a queue needs max_inflight: requests wait for a backend under its cap",
            );
        }
        Some(q) if q.max == 0 || q.timeout.0.is_zero() => {
            return err(format!("{key}.queue"), "max and timeout must be more than 0 (remove [queue] for none)");
        }
        Some(q) => Some(QueueConfig { max: q.max as usize, timeout: q.timeout.0 }),
    };
    if up.passive.max_ejected_percent > 100 {
        return err(format!("{key}.passive.max_ejected_percent"), "must be a percentage, 0 to 100");
    }
    let timeouts = upstream_timeouts(base, up.timeouts.as_ref(), &key)?;
    let health_check = match &up.health_check {
        None => None,
        Some(hc) => Some(health_check(hc, &format!("{key}.health_check"))?),
    };
    let any_https = backends.iter().any(|b| b.scheme == Scheme::HTTPS);
    let tls = if any_https {
        let ca = up.ca.as_deref().map(|f| resolve(dir, f));
        let tls = crate::tls::backend_tls(ca.as_deref(), up.tls_server_name.as_deref()).map_err(|m| KeyError {
            key: format!("{key}.{}", if up.ca.is_some() { "ca" } else { "backends" }),
            message: m,
        })?;
        files.extend(ca);
        Some(tls)
    } else if up.ca.is_some() || up.tls_server_name.is_some() {
        let which = if up.ca.is_some() { "ca" } else { "tls_server_name" };
        return err(format!("{key}.{which}"), "set, but no backend of this upstream is https://");
    } else {
        None
    };
    Ok(UpstreamConfig {
        name: name.to_owned(),
        strategy: up.strategy,
        backends,
        preserve_host: up.preserve_host,
        retries: up.retries,
        pool: PoolConfig {
            keepalive: up.keepalive,
            idle_timeout: up.pool_idle_timeout.0,
            connect_timeout: timeouts.connect,
        },
        timeouts,
        health_check,
        passive: PassiveConfig {
            max_fails: up.passive.max_fails,
            fail_timeout: up.passive.fail_timeout.0,
            max_ejected_percent: up.passive.max_ejected_percent,
        },
        tls,
        max_inflight: up.max_inflight,
        retry_budget: up.retry_budget,
        queue,
        hash_key: super::strategy::hash_key(up, &key)?,
        sticky: super::strategy::sticky(up, &key)?,
        resolve_interval: match up.resolve_interval {
            None => DEFAULT_RESOLVE_INTERVAL,
            Some(d) => nonzero(&d, &format!("{key}.resolve_interval"))?,
        },
        slow_start: up.slow_start.map_or(Duration::ZERO, |d| d.0),
    })
}

/// How often backend host names are looked up again when `resolve_interval` is not set.
const DEFAULT_RESOLVE_INTERVAL: Duration = Duration::from_secs(5);

/// `resolver.nameservers[i]`: `ip` or `ip:port`, port 53 by default.
fn nameserver(text: &str, i: usize) -> Result<SocketAddr, KeyError> {
    text.parse::<SocketAddr>()
        .or_else(|_| text.trim_matches(['[', ']']).parse::<std::net::IpAddr>().map(|ip| SocketAddr::new(ip, 53)))
        .or_else(|_| err(format!("resolver.nameservers[{i}]"), format!(r#""{text}" is not an IP address or IP:port"#)))
}

fn backend_url(url: &str) -> Result<(Scheme, http::uri::Authority), String> {
    let bad = |why: &str| format!(r#"invalid backend URL "{url}": {why} (write e.g. "http://127.0.0.1:8000")"#);
    let uri: Uri = url.trim().parse().map_err(|e| bad(&format!("{e}")))?;
    let scheme = uri.scheme().cloned().ok_or_else(|| bad("no scheme"))?;
    if scheme != Scheme::HTTP && scheme != Scheme::HTTPS {
        return Err(bad("the scheme must be http or https"));
    }
    let authority = uri.authority().cloned().ok_or_else(|| bad("no host"))?;
    if authority.as_str().contains('@') {
        return Err(bad("user info is not allowed"));
    }
    if authority.host().is_empty() {
        return Err(bad("no host"));
    }
    if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
        return Err(bad("a backend URL has no path or query"));
    }
    // Always carry an explicit port so the pool key and Host header are stable.
    let authority = if authority.port().is_none() {
        let port = if scheme == Scheme::HTTPS { 443 } else { 80 };
        format!("{}:{port}", authority.host()).parse().map_err(|_| bad("bad host"))?
    } else {
        authority
    };
    Ok((scheme, authority))
}

fn health_check(hc: &RawHealthCheck, key: &str) -> Result<HealthCheckConfig, KeyError> {
    if !hc.path.starts_with('/') {
        return err(format!("{key}.path"), r#"must start with "/""#);
    }
    let interval = nonzero(&hc.interval, &format!("{key}.interval"))?;
    let timeout = nonzero(&hc.timeout, &format!("{key}.timeout"))?;
    if hc.healthy_threshold == 0 {
        return err(format!("{key}.healthy_threshold"), "must be at least 1");
    }
    if hc.unhealthy_threshold == 0 {
        return err(format!("{key}.unhealthy_threshold"), "must be at least 1");
    }
    let mut expect_status = Vec::new();
    for (i, item) in hc.expect_status.0.iter().enumerate() {
        for part in item.split(',') {
            let range = parse_status_range(part.trim()).ok_or_else(|| KeyError {
                key: format!("{key}.expect_status[{i}]"),
                message: format!(r#""{part}" is not a status or range such as "200-399""#),
            })?;
            expect_status.push(range);
        }
    }
    if expect_status.is_empty() {
        return err(format!("{key}.expect_status"), "list at least one status or range");
    }
    Ok(HealthCheckConfig {
        path: hc.path.clone(),
        interval,
        timeout,
        healthy_threshold: hc.healthy_threshold,
        unhealthy_threshold: hc.unhealthy_threshold,
        expect_status,
    })
}

fn parse_status_range(s: &str) -> Option<(u16, u16)> {
    let (lo, hi) = match s.split_once('-') {
        Some((a, b)) => (a.trim().parse().ok()?, b.trim().parse().ok()?),
        None => {
            let v = s.parse().ok()?;
            (v, v)
        }
    };
    ((100..=599).contains(&lo) && (100..=599).contains(&hi) && lo <= hi).then_some((lo, hi))
}

fn host_match(h: &str) -> Option<HostMatch> {
    let h = h.trim().to_ascii_lowercase();
    let valid = |s: &str| {
        !s.is_empty()
            && s.split('.').all(|l| !l.is_empty() && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'))
    };
    match h.strip_prefix("*.") {
        Some(suffix) if valid(suffix) => Some(HostMatch::Suffix(suffix.to_owned())),
        Some(_) => None,
        None if valid(&h) => Some(HostMatch::Exact(h)),
        None => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_ranges() {
        assert_eq!(parse_status_range("200-399"), Some((200, 399)));
        assert_eq!(parse_status_range("204"), Some((204, 204)));
        assert_eq!(parse_status_range("399-200"), None);
        assert_eq!(parse_status_range("99"), None);
    }

    #[test]
    fn wildcard_hosts() {
        let m = host_match("*.example.com").unwrap();
        assert!(m.matches("a.example.com"));
        assert!(m.matches("A.B.Example.com"));
        assert!(!m.matches("example.com"));
        assert!(!m.matches("badexample.com"));
        assert!(host_match("exa mple.com").is_none());
    }

    #[test]
    fn backend_urls() {
        assert_eq!(backend_url("http://127.0.0.1:8000").unwrap().1.as_str(), "127.0.0.1:8000");
        assert_eq!(backend_url("http://app").unwrap().1.as_str(), "app:80");
        assert!(backend_url("127.0.0.1:8000").is_err());
        assert!(backend_url("http://h:1/path").is_err());
        assert!(backend_url("ftp://h:1").is_err());
    }

    #[test]
    fn otlp_endpoints() {
        assert_eq!(otlp_endpoint("http://127.0.0.1:4318").unwrap().port_u16(), Some(4318));
        assert!(otlp_endpoint("http://collector/otlp").is_ok());
        assert!(otlp_endpoint("https://collector:4318").unwrap_err().message.contains("https"));
        assert!(otlp_endpoint("127.0.0.1:4318").is_err());
        assert!(otlp_endpoint("grpc://c:4317").is_err());
        assert!(otlp_endpoint("http://c:4318/?x=1").is_err());
    }
}
