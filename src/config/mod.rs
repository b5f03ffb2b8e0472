//! Configuration: `balancer.toml` + command-line overrides -> [`RawConfig`] (serde, the
//! file as written) -> `validate` -> [`Config`] (checked, typed) -> `runtime::build`.
//!
//! The same [`load`] runs at start-up and on every reload, so overrides keep winning.

mod limit_store;
mod raw;
mod redact;
mod source;
mod strategy;
pub mod units;
mod validate;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::uri::{Authority, Scheme};
use ipnet::IpNet;

pub use crate::host::HostMatch;
pub use limit_store::hide_password;
pub use raw::{LogFormat, LogLevel, OnError, RawConfig, StrategyName};
pub use redact::{HIDDEN, redacted_toml};
pub use source::{Location, Overrides};
pub use validate::MAX_WEIGHT;

/// Why a config could not be loaded; `Display` is the one line an operator sees.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{}: cannot read config file: {source}", path.display())]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{location}: {message}")]
    Invalid { location: Location, message: String },
}

/// A loaded config: the checked form for the runtime, and the merged raw form for
/// `--print-config`.
#[derive(Debug)]
pub struct Loaded {
    pub config: Config,
    pub raw: RawConfig,
}

/// Reads `path` (missing is fine unless `required`), applies `overrides`, validates.
pub fn load(path: &Path, required: bool, overrides: &Overrides) -> Result<Loaded, ConfigError> {
    finish(source::Source::read(path, required)?, overrides)
}

/// Like [`load`], from text already in memory; `path` names it in errors and is where
/// relative file names start. (Also the fuzzing entry point for the config parser.)
pub fn parse(text: &str, path: &Path, overrides: &Overrides) -> Result<Loaded, ConfigError> {
    finish(source::Source { path: path.to_owned(), text: text.to_owned(), exists: true }, overrides)
}

fn finish(src: source::Source, overrides: &Overrides) -> Result<Loaded, ConfigError> {
    let path = src.path.as_path();
    let merged = src.merge(overrides)?;
    // Relative file names in the config (certificates, keys, CAs) are relative to its directory.
    let base = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let mut config = validate::validate(&merged.raw, base)
        .map_err(|e| ConfigError::Invalid { location: merged.index.locate(&e.key), message: e.message })?;
    config.effective_toml =
        redacted_toml(&merged.raw).unwrap_or_else(|e| format!("# cannot render the config as TOML: {e}\n")).into();
    Ok(Loaded { config, raw: merged.raw })
}

/// The checked config. Everything the runtime needs, in its own types, no serde.
#[derive(Clone, Debug)]
pub struct Config {
    pub server: ServerConfig,
    /// `None` when the admin listener is `off`.
    pub admin: Option<SocketAddr>,
    pub log: LogConfig,
    pub upstreams: Vec<UpstreamConfig>,
    pub rate_limits: BTreeMap<String, RateLimitConfig>,
    /// `[caches.*]`, by name.
    pub caches: BTreeMap<String, CacheConfig>,
    pub routes: Vec<RouteConfig>,
    /// `[limit_store]`: where `shared` limits keep their buckets.
    pub limit_store: Option<LimitStoreConfig>,
    /// `[resolver]`: the name servers backend host names are looked up on; empty: those
    /// of `/etc/resolv.conf`.
    pub nameservers: Vec<SocketAddr>,
    /// `[tracing] otlp_endpoint`: the OTLP/HTTP collector spans are exported to.
    pub otlp_endpoint: Option<http::Uri>,
    /// Every file this config reads besides itself (certificates, keys, CAs): a change to
    /// any of them is a reason to reload.
    pub files: Vec<PathBuf>,
    /// The effective config (file + overrides) this was checked from, as TOML with secrets
    /// as `"***"`: what admin `GET /config` shows. Shared, since every generation keeps one.
    pub effective_toml: std::sync::Arc<str>,
}

#[derive(Clone, Debug)]
pub struct ServerConfig {
    pub listen: Vec<SocketAddr>,
    /// Worker threads; already resolved (0 in the file means one per core).
    pub workers: usize,
    pub max_connections: usize,
    pub max_request_body: u64,
    pub max_header_bytes: usize,
    pub shutdown_grace: Duration,
    pub trusted_proxies: Vec<IpNet>,
    /// Forward header fields whose names contain `_` (a WSGI app reads `X_Forwarded_For`
    /// as `X-Forwarded-For`, so they are dropped unless this is set).
    pub underscores_in_headers: bool,
    pub rate_limit: Vec<String>,
    /// Timeouts that apply to client connections (`[timeouts]`).
    pub timeouts: Timeouts,
    /// HTTPS listeners, when `[server.tls]` is set.
    pub tls: Option<TlsListeners>,
}

/// `[server.tls]`, with its certificates loaded and checked.
#[derive(Clone, Debug)]
pub struct TlsListeners {
    pub listen: Vec<SocketAddr>,
    pub certs: crate::tls::ServerCerts,
}

#[derive(Clone, Debug)]
pub struct LogConfig {
    pub level: LogLevel,
    pub format: LogFormat,
    pub access: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    pub connect: Duration,
    pub client_header: Duration,
    pub upstream_header: Duration,
    pub idle: Duration,
}

#[derive(Clone, Debug)]
pub struct UpstreamConfig {
    pub name: String,
    pub strategy: StrategyName,
    pub backends: Vec<BackendConfig>,
    pub preserve_host: bool,
    pub retries: u32,
    pub pool: PoolConfig,
    pub timeouts: Timeouts,
    pub health_check: Option<HealthCheckConfig>,
    pub passive: PassiveConfig,
    /// How `https://` backends are verified; set when the upstream has any.
    pub tls: Option<crate::tls::BackendTls>,
    /// Requests in flight per backend; 0: no cap.
    pub max_inflight: u32,
    /// Retries at most this share of requests over 10 s (at least 3 a second); `None`: no budget.
    pub retry_budget: Option<f64>,
    /// Where requests wait while every backend is at `max_inflight`; `None`: they get 503.
    pub queue: Option<QueueConfig>,
    /// What a request is hashed by; set exactly when the strategy is consistent-hash.
    pub hash_key: Option<HashKey>,
    /// `[sticky]`: a cookie pins a client to a backend, under any strategy.
    pub sticky: Option<StickyConfig>,
    /// How often the host names of `backends` are looked up again.
    pub resolve_interval: Duration,
    /// A new or recovered backend's share grows from a tenth of its weight to all of it
    /// over this; zero: at once.
    pub slow_start: Duration,
}

/// What consistent-hash hashes of a request (`hash_key`). A request without it is
/// hashed by its client IP.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HashKey {
    ClientIp,
    Header(http::HeaderName),
    Cookie(String),
    /// A query parameter, by name; its value is hashed as sent (not percent-decoded).
    Query(String),
    /// The path routing saw (normalised), without the query.
    Path,
}

/// `[upstreams.NAME.sticky]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StickyConfig {
    /// The cookie's name, a valid token.
    pub cookie: String,
    /// `Max-Age`; `None`: a session cookie.
    pub max_age: Option<Duration>,
    /// The key of the cookie's value; `None`: a random one per process.
    pub secret: Option<String>,
}

/// `[upstreams.NAME.queue]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QueueConfig {
    /// Requests that may wait at once.
    pub max: usize,
    /// The longest wait.
    pub timeout: Duration,
}

/// How connections to one backend are pooled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PoolConfig {
    /// Idle connections kept per backend.
    pub keepalive: usize,
    pub idle_timeout: Duration,
    pub connect_timeout: Duration,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendConfig {
    /// As written, for logs, metrics and `/status`.
    pub url: String,
    pub scheme: Scheme,
    /// `host:port`: the `Host` sent (with `preserve_host = false`) and the TLS name.
    pub authority: Authority,
    pub weight: u32,
    /// The host when it is a name, not an IP literal: the entry stands for every address
    /// the name resolves to (SPEC 12).
    pub name: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthCheckConfig {
    pub path: String,
    pub interval: Duration,
    pub timeout: Duration,
    pub healthy_threshold: u32,
    pub unhealthy_threshold: u32,
    /// Inclusive status ranges that count as healthy.
    pub expect_status: Vec<(u16, u16)>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PassiveConfig {
    /// 0: passive checks off.
    pub max_fails: u32,
    pub fail_timeout: Duration,
    /// Passive checks never have more than this share (percent, 0 to 100) of the
    /// upstream's backends out at once.
    pub max_ejected_percent: u32,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RateLimitConfig {
    pub rate: u64,
    pub per: Duration,
    pub burst: u64,
    pub key: LimitKey,
    /// The buckets live in `[limit_store]` (which is then set).
    pub shared: bool,
}

/// `[limit_store]`, checked (the URL parses; nothing is connected).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LimitStoreConfig {
    /// As written (it may hold a password: show it through [`hide_password`]).
    pub url: String,
    pub key_prefix: String,
    /// The longest one store operation may take before the store counts as failing.
    pub timeout: Duration,
    pub on_error: OnError,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LimitKey {
    ClientIp,
    Header(http::HeaderName),
    Global,
}

#[derive(Clone, Debug)]
pub struct RouteConfig {
    pub host: Option<HostMatch>,
    /// Normalised, without a trailing slash unless it is `/`.
    pub path_prefix: String,
    pub upstream: String,
    pub rate_limit: Vec<String>,
    pub strip_prefix: bool,
    /// The name of a `[caches.*]` entry (checked to exist).
    pub cache: Option<String>,
}

/// `[caches.NAME]`, checked: both sizes in bytes, `max_object <= max_size`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CacheConfig {
    pub max_size: u64,
    pub max_object: u64,
}

/// Where the config came from, so it can be read again the same way.
#[derive(Clone, Debug)]
pub struct ConfigSource {
    pub path: std::path::PathBuf,
    pub required: bool,
    pub overrides: Overrides,
}
