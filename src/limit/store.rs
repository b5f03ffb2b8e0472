//! `[limit_store]`: the Redis (or Valkey) that `shared` limits keep their buckets in.
//!
//! One auto-reconnecting, multiplexed connection (redis-rs `ConnectionManager`), made by
//! the store's background task so that neither start-up nor a request waits on
//! connecting. Every operation is bounded by `timeout`; a failure flips the store to down,
//! and while it is down requests do not touch it (`on_error` decides). The same task keeps
//! this instance's presence every second (which counts the live instances for
//! `on_error = "local"`) and, while down, probes every half second, so shared decisions
//! resume within a second or so of the store answering again.
//!
//! Each decision is one atomic script on one key: a client-chosen key is only hashed
//! (SHA-1, its type in the hashed bytes) and the script's inputs are arguments, never
//! code, so no header value can reach another key space or change the script. The
//! hashed part is a Redis Cluster hash tag: every key a script touches is in one slot.

use std::sync::atomic::{AtomicU8, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio_util::sync::CancellationToken;

use super::Key;
use crate::config::{LimitStoreConfig, RateLimitConfig, hide_password};

/// The token bucket, run in the store. KEYS[1]: the bucket (a hash of `tokens` and `at`,
/// the last refill in ms of the store's clock, so instances with skewed clocks agree).
/// ARGV: tokens per ms, burst, `take` or `give`. Returns {admitted, ms until one token,
/// ms until full}.
const BUCKET_SCRIPT: &str = r"
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local per_ms = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local state = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens = burst
if state[1] and state[2] then
  tokens = math.min(burst, tonumber(state[1]) + math.max(0, now - tonumber(state[2])) * per_ms)
end
local admitted = 0
if ARGV[3] == 'give' then
  if not state[1] then return {1, 0, 0} end
  tokens = math.min(burst, tokens + 1)
  admitted = 1
elseif tokens >= 1 then
  tokens = tokens - 1
  admitted = 1
end
if admitted == 1 then
  redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'at', tostring(now))
  redis.call('PEXPIRE', KEYS[1], math.ceil((burst - tokens) / per_ms) + 1000)
end
local to_one = 0
if tokens < 1 then to_one = math.ceil((1 - tokens) / per_ms) end
return {admitted, to_one, math.ceil((burst - tokens) / per_ms)}
";

/// Presence: KEYS[1] a sorted set of instance ids scored by when they expire (store
/// clock). ARGV: this instance's id, the expiry in ms. Returns the live instances.
const PRESENCE_SCRIPT: &str = r"
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[2])
redis.call('ZADD', KEYS[1], now + ttl, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('PEXPIRE', KEYS[1], ttl)
return redis.call('ZCARD', KEYS[1])
";

/// How long an instance counts as live after its last presence refresh.
const PRESENCE_TTL: Duration = Duration::from_secs(3);
/// Presence refresh while the store is up.
const PRESENCE_EVERY: Duration = Duration::from_secs(1);
/// The background task's tick; while down, each tick probes.
const TICK: Duration = Duration::from_millis(500);
/// One connection attempt (in the background; requests never wait on it).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

const UNKNOWN: u8 = 0;
const UP: u8 = 1;
const DOWN: u8 = 2;

/// What the store said about one request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Admitted,
    Refused { to_one_ms: u64, to_full_ms: u64 },
}

/// The live `[limit_store]`. Kept across reloads while its config is unchanged.
pub struct LimitStore {
    pub config: LimitStoreConfig,
    client: Result<redis::Client, String>,
    /// Set by the background task once connected; the request path only loads it.
    conn: ArcSwapOption<ConnectionManager>,
    /// UNKNOWN until the first contact, then UP or DOWN. Written on every outcome,
    /// read by every shared decision.
    state: AtomicU8,
    /// Live instances at the last good presence refresh (at least 1).
    instances: AtomicU64,
    /// Process-wide, shared with the metrics.
    errors: Arc<AtomicU64>,
    last_error: Mutex<Option<String>>,
    bucket: redis::Script,
    presence: redis::Script,
}

impl std::fmt::Debug for LimitStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LimitStore").field("url", &self.url()).field("up", &self.is_up()).finish_non_exhaustive()
    }
}

impl LimitStore {
    pub fn new(config: LimitStoreConfig, errors: Arc<AtomicU64>) -> LimitStore {
        let client = redis::Client::open(config.url.as_str()).map_err(|e| e.to_string());
        LimitStore {
            config,
            client,
            conn: ArcSwapOption::empty(),
            state: AtomicU8::new(UNKNOWN),
            instances: AtomicU64::new(1),
            errors,
            last_error: Mutex::new(None),
            bucket: redis::Script::new(BUCKET_SCRIPT),
            presence: redis::Script::new(PRESENCE_SCRIPT),
        }
    }

    /// The URL with its password hidden.
    pub fn url(&self) -> String {
        hide_password(&self.config.url)
    }

    pub fn is_up(&self) -> bool {
        self.state.load(Relaxed) == UP
    }

    /// Instances that used the store at its last good contact (1 before any).
    pub fn instances(&self) -> u64 {
        self.instances.load(Relaxed)
    }

    pub fn last_error(&self) -> Option<String> {
        self.last_error.lock().expect("last_error lock").clone()
    }

    /// The store's key of one bucket: the prefix, the limit's name and definition (so a
    /// changed limit starts afresh, as a local one does), and a hash of the client key
    /// as the hash tag.
    pub fn bucket_key(&self, name: &str, limit: &RateLimitConfig, key: &Key) -> String {
        let mut h = sha1_smol::Sha1::new();
        match key {
            Key::Ip(ip) => {
                h.update(b"ip:");
                h.update(ip.to_string().as_bytes());
            }
            Key::Header(v) => {
                h.update(b"header:");
                h.update(v.as_bytes());
            }
            Key::NoHeader(ip) => {
                h.update(b"noheader:");
                h.update(ip.to_string().as_bytes());
            }
            Key::Global => h.update(b"global"),
        }
        let digest = h.digest().bytes();
        let mut hex = String::with_capacity(32);
        for b in &digest[..16] {
            hex.push_str(&format!("{b:02x}"));
        }
        format!("{}{name}:{}-{}ms-{}:{{{hex}}}", self.config.key_prefix, limit.rate, limit.per.as_millis(), limit.burst)
    }

    /// Takes a token from (or, with `give`, returns one to) the shared bucket of `key`.
    /// `None`: the store is down or just failed; the caller applies `on_error`.
    pub async fn decide(&self, name: &str, limit: &RateLimitConfig, key: &Key, give: bool) -> Option<Verdict> {
        if !self.is_up() {
            return None;
        }
        let mut conn = ConnectionManager::clone(&*self.conn.load_full()?);
        let per_ms = limit.rate as f64 / limit.per.as_secs_f64() / 1000.0;
        let mut call = self.bucket.key(self.bucket_key(name, limit, key));
        call.arg(per_ms).arg(limit.burst).arg(if give { "give" } else { "take" });
        let reply: Result<(i64, i64, i64), String> =
            match tokio::time::timeout(self.config.timeout, call.invoke_async(&mut conn)).await {
                Ok(r) => r.map_err(|e| e.to_string()),
                Err(_) => Err(self.timed_out()),
            };
        match reply {
            Ok((1, _, _)) => Some(Verdict::Admitted),
            Ok((_, one, full)) => {
                Some(Verdict::Refused { to_one_ms: one.max(0) as u64, to_full_ms: full.max(0) as u64 })
            }
            Err(e) => {
                self.failed(e);
                None
            }
        }
    }

    fn timed_out(&self) -> String {
        format!("no answer within {}", humantime::format_duration(self.config.timeout))
    }

    fn failed(&self, error: String) {
        self.errors.fetch_add(1, Relaxed);
        let before = self.state.swap(DOWN, Relaxed);
        if before != DOWN {
            tracing::warn!(
                url = %self.url(),
                error = %error,
                on_error = ?self.config.on_error,
                "limit store is failing; shared limits follow on_error until it answers again"
            );
        }
        *self.last_error.lock().expect("last_error lock") = Some(error);
    }

    fn answered(&self, instances: u64) {
        self.instances.store(instances.max(1), Relaxed);
        match self.state.swap(UP, Relaxed) {
            UP => {}
            UNKNOWN => tracing::info!(url = %self.url(), instances, "limit store connected"),
            _ => tracing::warn!(url = %self.url(), instances, "limit store answers again; shared decisions resume"),
        }
    }

    /// Connects, keeps this instance's presence and probes while down, until `stop`.
    /// Started for each runtime generation (the connection and state stay with the store).
    pub async fn run(self: Arc<Self>, stop: CancellationToken) {
        let mut ticker = tokio::time::interval(TICK);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let mut last_presence: Option<tokio::time::Instant> = None;
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = ticker.tick() => {}
            }
            if self.conn.load().is_none() && !self.connect().await {
                continue;
            }
            let due = last_presence.is_none_or(|at| at.elapsed() + TICK / 2 >= PRESENCE_EVERY);
            if self.is_up() && !due {
                continue;
            }
            last_presence = Some(tokio::time::Instant::now());
            self.refresh_presence().await;
        }
    }

    async fn connect(&self) -> bool {
        let client = match &self.client {
            Ok(c) => c.clone(),
            Err(e) => {
                self.failed(e.clone());
                return false;
            }
        };
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_number_of_retries(2)
            .set_min_delay(Duration::from_millis(50))
            .set_max_delay(Duration::from_millis(500));
        match tokio::time::timeout(CONNECT_TIMEOUT, ConnectionManager::new_with_config(client, config)).await {
            Ok(Ok(conn)) => {
                self.conn.store(Some(Arc::new(conn)));
                true
            }
            Ok(Err(e)) => {
                self.failed(e.to_string());
                false
            }
            Err(_) => {
                self.failed(format!("cannot connect within {}", humantime::format_duration(CONNECT_TIMEOUT)));
                false
            }
        }
    }

    async fn refresh_presence(&self) {
        let Some(conn) = self.conn.load_full() else { return };
        let mut conn = ConnectionManager::clone(&conn);
        let mut call = self.presence.key(format!("{}instances", self.config.key_prefix));
        call.arg(instance_id()).arg(PRESENCE_TTL.as_millis() as u64);
        match tokio::time::timeout(self.config.timeout.max(Duration::from_millis(250)), call.invoke_async(&mut conn))
            .await
        {
            Ok(Ok(n)) => self.answered(n),
            Ok(Err(e)) => self.failed(e.to_string()),
            Err(_) => self.failed(self.timed_out()),
        }
    }
}

/// This process's member in the presence set: the same across reloads, so a store
/// replaced by a reload does not count this instance twice.
fn instance_id() -> &'static str {
    static ID: OnceLock<String> = OnceLock::new();
    ID.get_or_init(|| {
        use std::hash::BuildHasher;
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos();
        format!("{}-{:016x}", std::process::id(), std::hash::RandomState::new().hash_one(nanos))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{LimitKey, OnError};

    #[test]
    fn keys_are_hashed_apart_by_type_and_tagged() {
        let store = LimitStore::new(
            LimitStoreConfig {
                url: "redis://127.0.0.1:1".into(),
                key_prefix: "b:".into(),
                timeout: Duration::from_millis(50),
                on_error: OnError::Local,
            },
            Arc::default(),
        );
        let limit =
            RateLimitConfig { rate: 5, per: Duration::from_secs(1), burst: 5, key: LimitKey::ClientIp, shared: true };
        let ip: std::net::IpAddr = "1.2.3.4".parse().unwrap();
        let a = store.bucket_key("l", &limit, &Key::Ip(ip));
        let b = store.bucket_key("l", &limit, &Key::NoHeader(ip));
        let c = store.bucket_key("l", &limit, &Key::Header(http::HeaderValue::from_static("1.2.3.4")));
        assert!(a != b && b != c && a != c);
        assert!(a.starts_with("b:l:5-1000ms-5:{") && a.ends_with('}'), "{a}");
        assert_eq!(a.matches('{').count(), 1);
        let odd = store.bucket_key("l", &limit, &Key::Header(http::HeaderValue::from_static("}{\" ') end --")));
        assert_eq!(odd.len(), a.len());
        assert!(!store.is_up(), "down until the first contact");
    }
}
