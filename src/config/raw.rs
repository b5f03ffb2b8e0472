//! The config file as written: serde types that mirror the TOML one to one.
//!
//! Nothing here is checked beyond its shape; `validate` turns a [`RawConfig`] into a
//! [`crate::config::Config`]. Every struct denies unknown keys so a typo is an error with
//! its file position, and every default lives here so `--print-config` shows it.

use std::collections::BTreeMap;
use std::fmt;

use serde::de::{self, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::units::{ByteSize, HumanDuration};

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawConfig {
    pub server: RawServer,
    pub admin: RawAdmin,
    pub log: RawLog,
    pub timeouts: RawTimeouts,
    pub upstreams: BTreeMap<String, RawUpstream>,
    pub rate_limits: BTreeMap<String, RawRateLimit>,
    /// `[caches.NAME]`: response caches that routes name with `cache = "NAME"`.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub caches: BTreeMap<String, RawCache>,
    pub routes: Vec<RawRoute>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limit_store: Option<RawLimitStore>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resolver: Option<RawResolver>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tracing: Option<RawTracing>,
}

/// `[resolver]`: where backend host names are looked up (default: `/etc/resolv.conf`).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawResolver {
    /// `ip` or `ip:port` (port 53 by default).
    #[serde(default)]
    pub nameservers: Vec<String>,
}

/// `[tracing]`: where spans go.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawTracing {
    /// An OTLP/HTTP collector (`http://host:4318`): a span per request is exported there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub otlp_endpoint: Option<String>,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawServer {
    pub listen: OneOrMany,
    pub workers: usize,
    pub max_connections: usize,
    pub max_request_body: ByteSize,
    pub max_header_bytes: ByteSize,
    pub shutdown_grace: HumanDuration,
    pub trusted_proxies: Vec<String>,
    /// Forward header fields whose names contain `_` (dropped by default).
    pub underscores_in_headers: bool,
    pub rate_limit: OneOrMany,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Option<RawTls>,
}

impl Default for RawServer {
    fn default() -> Self {
        RawServer {
            listen: OneOrMany(vec!["127.0.0.1:8080".into()]),
            workers: 0,
            max_connections: 10_000,
            max_request_body: ByteSize::mib(10),
            max_header_bytes: ByteSize::kib(64),
            shutdown_grace: HumanDuration::secs(30),
            trusted_proxies: Vec::new(),
            underscores_in_headers: false,
            rate_limit: OneOrMany(Vec::new()),
            tls: None,
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawTls {
    pub listen: OneOrMany,
    pub cert: String,
    pub key: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sni: Vec<RawSni>,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawSni {
    pub host: String,
    pub cert: String,
    pub key: String,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawAdmin {
    /// An address, or `"off"`.
    pub listen: String,
}

impl Default for RawAdmin {
    fn default() -> Self {
        RawAdmin { listen: "127.0.0.1:9901".into() }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawLog {
    pub level: LogLevel,
    pub format: LogFormat,
    pub access: bool,
}

impl Default for RawLog {
    fn default() -> Self {
        RawLog { level: LogLevel::Info, format: LogFormat::Text, access: true }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum LogLevel {
    Error,
    Warn,
    Info,
    Debug,
    Trace,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawTimeouts {
    pub connect: HumanDuration,
    pub client_header: HumanDuration,
    pub upstream_header: HumanDuration,
    pub idle: HumanDuration,
}

impl Default for RawTimeouts {
    fn default() -> Self {
        RawTimeouts {
            connect: HumanDuration::secs(2),
            client_header: HumanDuration::secs(10),
            upstream_header: HumanDuration::secs(30),
            idle: HumanDuration::secs(60),
        }
    }
}

/// Per-upstream timeout overrides: any key left out falls back to `[timeouts]`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawTimeoutOverrides {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connect: Option<HumanDuration>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_header: Option<HumanDuration>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upstream_header: Option<HumanDuration>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub idle: Option<HumanDuration>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum StrategyName {
    #[default]
    RoundRobin,
    LeastConnections,
    ConsistentHash,
    LeastLatency,
}

impl<'de> Deserialize<'de> for StrategyName {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let name = String::deserialize(d)?;
        match name.as_str() {
            "round-robin" => Ok(StrategyName::RoundRobin),
            "least-connections" => Ok(StrategyName::LeastConnections),
            "consistent-hash" => Ok(StrategyName::ConsistentHash),
            "least-latency" => Ok(StrategyName::LeastLatency),
            other => Err(de::Error::custom(format!(
                r#"unknown strategy "{other}", expected one of "round-robin", "least-connections", "consistent-hash", "least-latency""#
            ))),
        }
    }
}

impl fmt::Display for StrategyName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            StrategyName::RoundRobin => "round-robin",
            StrategyName::LeastConnections => "least-connections",
            StrategyName::ConsistentHash => "consistent-hash",
            StrategyName::LeastLatency => "least-latency",
        })
    }
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawUpstream {
    #[serde(default)]
    pub strategy: StrategyName,
    pub backends: Vec<RawBackend>,
    #[serde(default = "yes")]
    pub preserve_host: bool,
    #[serde(default = "one")]
    pub retries: u32,
    #[serde(default = "default_keepalive")]
    pub keepalive: usize,
    #[serde(default = "default_pool_idle")]
    pub pool_idle_timeout: HumanDuration,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeouts: Option<RawTimeoutOverrides>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_check: Option<RawHealthCheck>,
    #[serde(default)]
    pub passive: RawPassive,
    /// PEM file of CAs that `https://` backends are verified against (instead of system roots).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_server_name: Option<String>,
    /// Requests in flight per backend; 0: no cap.
    #[serde(default)]
    pub max_inflight: u32,
    /// Retries at most this share of requests (10 s window), at least 3 a second.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_budget: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue: Option<RawQueue>,
    /// What consistent-hash hashes: `client_ip`, `header:NAME`, `cookie:NAME`,
    /// `query:NAME` or `path` (default `client_ip`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hash_key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sticky: Option<RawSticky>,
    /// How often backend host names are looked up again (default 5s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resolve_interval: Option<HumanDuration>,
    /// A new or recovered backend's share of traffic grows over this (default 0: at once).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slow_start: Option<HumanDuration>,
}

/// `[upstreams.NAME.sticky]`: a cookie pins a client to the backend that first served it.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawSticky {
    pub cookie: String,
    /// The cookie's `Max-Age`; omitted: a session cookie.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_age: Option<HumanDuration>,
    /// Keys the cookie's value, so that several balancers (and restarts) agree on it;
    /// omitted: a random key per process.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
}

/// `[upstreams.NAME.queue]`: requests wait here while every backend is at `max_inflight`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawQueue {
    pub max: u32,
    pub timeout: HumanDuration,
}

impl Default for RawQueue {
    fn default() -> Self {
        RawQueue { max: 100, timeout: HumanDuration::secs(5) }
    }
}

fn yes() -> bool {
    true
}
fn one() -> u32 {
    1
}
fn default_keepalive() -> usize {
    64
}
fn default_pool_idle() -> HumanDuration {
    HumanDuration::secs(1)
}

/// A backend as `"http://host:port"` or `{ url = "...", weight = 2 }`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RawBackend {
    pub url: String,
    pub weight: Option<u32>,
}

impl Serialize for RawBackend {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        match self.weight {
            None => s.serialize_str(&self.url),
            Some(w) => {
                let mut m = s.serialize_map(Some(2))?;
                m.serialize_entry("url", &self.url)?;
                m.serialize_entry("weight", &w)?;
                m.end()
            }
        }
    }
}

impl<'de> Deserialize<'de> for RawBackend {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Table {
            url: String,
            weight: Option<u32>,
        }
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = RawBackend;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(r#"a backend URL string or a table { url = "...", weight = N }"#)
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<RawBackend, E> {
                Ok(RawBackend { url: v.to_owned(), weight: None })
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<RawBackend, A::Error> {
                let t = Table::deserialize(de::value::MapAccessDeserializer::new(map))?;
                Ok(RawBackend { url: t.url, weight: t.weight })
            }
        }
        d.deserialize_any(V)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawHealthCheck {
    pub path: String,
    pub interval: HumanDuration,
    pub timeout: HumanDuration,
    pub healthy_threshold: u32,
    pub unhealthy_threshold: u32,
    pub expect_status: OneOrMany,
}

impl Default for RawHealthCheck {
    fn default() -> Self {
        RawHealthCheck {
            path: "/healthz".into(),
            interval: HumanDuration::secs(2),
            timeout: HumanDuration::secs(1),
            healthy_threshold: 2,
            unhealthy_threshold: 2,
            expect_status: OneOrMany(vec!["200-399".into()]),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawPassive {
    /// 0 turns passive checks off.
    pub max_fails: u32,
    pub fail_timeout: HumanDuration,
    /// The most of the upstream's backends (in percent) passive checks may take out.
    pub max_ejected_percent: u32,
}

impl Default for RawPassive {
    fn default() -> Self {
        RawPassive { max_fails: 3, fail_timeout: HumanDuration::secs(10), max_ejected_percent: 50 }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawRateLimit {
    pub rate: u64,
    pub per: HumanDuration,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst: Option<u64>,
    #[serde(default = "default_limit_key")]
    pub key: String,
    /// The buckets live in `[limit_store]`, shared by every instance.
    #[serde(default)]
    pub shared: bool,
}

/// `[limit_store]`: where shared rate limits keep their buckets (Redis or Valkey).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawLimitStore {
    pub url: String,
    #[serde(default = "default_key_prefix")]
    pub key_prefix: String,
    #[serde(default = "default_store_timeout")]
    pub timeout: HumanDuration,
    #[serde(default)]
    pub on_error: OnError,
}

/// What a shared limit does while the store fails.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnError {
    /// Each instance enforces its share of the limit by itself.
    #[default]
    Local,
    /// Admit.
    Allow,
    /// 503 with `Retry-After: 1`.
    Deny,
}

fn default_key_prefix() -> String {
    "balancer:".into()
}

fn default_store_timeout() -> HumanDuration {
    HumanDuration::millis(50)
}

fn default_limit_key() -> String {
    "client_ip".into()
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawRoute {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    #[serde(default = "root_prefix")]
    pub path_prefix: String,
    pub upstream: String,
    #[serde(default)]
    pub rate_limit: OneOrMany,
    #[serde(default)]
    pub strip_prefix: bool,
    /// The `[caches.NAME]` this route's GET and HEAD responses are kept in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<String>,
}

/// `[caches.NAME]`: an in-memory response cache (SPEC 14).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawCache {
    /// Heads and bodies together; least recently used entries go first.
    #[serde(default = "default_cache_size")]
    pub max_size: ByteSize,
    /// Larger responses pass through unstored.
    #[serde(default = "default_cache_object")]
    pub max_object: ByteSize,
}

fn default_cache_size() -> ByteSize {
    ByteSize::mib(256)
}

fn default_cache_object() -> ByteSize {
    ByteSize::mib(8)
}

fn root_prefix() -> String {
    "/".into()
}

/// A string or a list of strings (`listen`, `rate_limit`, `expect_status`); integers are
/// accepted as strings so `expect_status = 200` works.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OneOrMany(pub Vec<String>);

impl Serialize for OneOrMany {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(s)
    }
}

impl<'de> Deserialize<'de> for OneOrMany {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = OneOrMany;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string or a list of strings")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<OneOrMany, E> {
                Ok(OneOrMany(vec![v.to_owned()]))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<OneOrMany, E> {
                Ok(OneOrMany(vec![v.to_string()]))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<OneOrMany, A::Error> {
                let mut out = Vec::new();
                while let Some(item) = seq.next_element::<StrOrInt>()? {
                    out.push(item.0);
                }
                Ok(OneOrMany(out))
            }
        }
        d.deserialize_any(V)
    }
}

struct StrOrInt(String);

impl<'de> Deserialize<'de> for StrOrInt {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = StrOrInt;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<StrOrInt, E> {
                Ok(StrOrInt(v.to_owned()))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<StrOrInt, E> {
                Ok(StrOrInt(v.to_string()))
            }
        }
        d.deserialize_any(V)
    }
}
