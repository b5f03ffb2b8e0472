//! Backends found by DNS (SPEC 12): the addresses each backend host name resolves to,
//! looked up at start and every `resolve_interval` by one task per runtime generation.
//!
//! The task only finds addresses. A change is handed to the reloader, which builds the next
//! runtime from the live one with the same config and generation, so an address that
//! appears or goes takes the same carry-over as a reload (health, in-flight counts and
//! pools of the others kept). A lookup that fails or finds nothing keeps the last known
//! addresses.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use hickory_resolver::config::{LookupIpStrategy, NameServerConfigGroup, ResolverConfig};
use hickory_resolver::name_server::TokioConnectionProvider;
use hickory_resolver::{ResolveError, TokioResolver};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// How long one lookup may take (per attempt, two attempts): it runs off the request path,
/// and a timeout keeps the last known addresses.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(2);
/// The shortest time between two lookups of a name, whatever its TTL says.
const MIN_REFRESH: Duration = Duration::from_secs(1);

/// Addresses by host name (lower case), each list sorted and without repeats. A name that
/// never resolved is absent; one that resolved keeps its last non-empty answer.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Resolved(BTreeMap<Arc<str>, Arc<[IpAddr]>>);

impl Resolved {
    /// The addresses `name` stands for now; none before its first answer.
    pub fn addresses(&self, name: &str) -> &[IpAddr] {
        self.0.get(name).map_or(&[], |a| a)
    }

    /// Sets `name`'s addresses (sorted, deduplicated here); whether that changed them.
    pub fn set(&mut self, name: &Arc<str>, mut addresses: Vec<IpAddr>) -> bool {
        addresses.sort_unstable();
        addresses.dedup();
        if self.0.get(name).is_some_and(|a| **a == addresses[..]) {
            return false;
        }
        self.0.insert(name.clone(), addresses.into());
        true
    }
}

/// A host name to follow, and who counts its failed lookups.
#[derive(Clone, Debug)]
pub struct Target {
    pub name: Arc<str>,
    /// The shortest `resolve_interval` of the upstreams that name it.
    pub interval: Duration,
    /// `balancer_dns_failures_total` of each upstream that names it.
    pub failures: Vec<Arc<AtomicU64>>,
}

/// A change of addresses, found by the task of runtime `generation`.
#[derive(Debug)]
pub struct Found {
    pub generation: u64,
    pub resolved: Resolved,
}

/// Why a name has no usable answer this time.
#[derive(Debug, thiserror::Error)]
enum LookupError {
    #[error("{0}")]
    Resolve(#[from] ResolveError),
    #[error("the answer has no address")]
    Empty,
    #[error("no resolver: {0}")]
    NoResolver(Arc<str>),
}

/// The resolver for `[resolver] nameservers` (UDP, and TCP for long answers), or for
/// `/etc/resolv.conf` when there are none. balancer keeps no cache of its own answers: each
/// lookup asks the name servers.
fn resolver(nameservers: &[SocketAddr]) -> Result<TokioResolver, ResolveError> {
    let provider = TokioConnectionProvider::default();
    let mut builder = if nameservers.is_empty() {
        TokioResolver::builder(provider)?
    } else {
        let mut group = NameServerConfigGroup::new();
        for ns in nameservers {
            group.merge(NameServerConfigGroup::from_ips_clear(&[ns.ip()], ns.port(), true));
        }
        TokioResolver::builder_with_config(ResolverConfig::from_parts(None, vec![], group), provider)
    };
    let opts = builder.options_mut();
    opts.ip_strategy = LookupIpStrategy::Ipv4AndIpv6;
    opts.timeout = LOOKUP_TIMEOUT;
    opts.attempts = 2;
    opts.cache_size = 0;
    Ok(builder.build())
}

/// One lookup: the addresses, and how long the answer may be kept (its TTL).
async fn lookup(
    resolver: &Result<TokioResolver, Arc<str>>,
    name: &str,
) -> Result<(Vec<IpAddr>, Duration), LookupError> {
    let resolver = resolver.as_ref().map_err(|e| LookupError::NoResolver(e.clone()))?;
    let answer = resolver.lookup_ip(name).await?;
    let addresses: Vec<IpAddr> = answer.iter().collect();
    if addresses.is_empty() {
        return Err(LookupError::Empty);
    }
    let ttl = answer.valid_until().saturating_duration_since(std::time::Instant::now());
    Ok((addresses, ttl))
}

/// Follows `targets` until `stop`: looks each up now, then again after its interval (or
/// its answer's TTL, when shorter, but not within a second), and sends every change of the
/// whole set to `found`. `known` is what the runtime already uses.
pub async fn follow(
    targets: Vec<Target>,
    nameservers: Vec<SocketAddr>,
    mut known: Resolved,
    generation: u64,
    found: mpsc::Sender<Found>,
    stop: CancellationToken,
) {
    if targets.is_empty() {
        return;
    }
    let resolver = Arc::new(resolver(&nameservers).map_err(|e| {
        tracing::error!(error = %e, "cannot set up the DNS resolver; backend host names keep their addresses");
        Arc::<str>::from(e.to_string())
    }));
    let mut due = vec![Instant::now(); targets.len()];
    let mut failing = vec![false; targets.len()];
    loop {
        let next = *due.iter().min().expect("targets is not empty");
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep_until(next) => {}
        }
        let now = Instant::now();
        let mut lookups = tokio::task::JoinSet::new();
        for (i, t) in targets.iter().enumerate().filter(|&(i, _)| due[i] <= now) {
            let (resolver, name) = (resolver.clone(), t.name.clone());
            lookups.spawn(async move { (i, lookup(&resolver, &name).await) });
        }
        let mut changed = false;
        loop {
            let done = tokio::select! {
                _ = stop.cancelled() => return,
                done = lookups.join_next() => done,
            };
            let Some(Ok((i, outcome))) = done else { break };
            let t = &targets[i];
            match outcome {
                Ok((addresses, ttl)) => {
                    due[i] = Instant::now() + t.interval.min(ttl.max(MIN_REFRESH));
                    if std::mem::replace(&mut failing[i], false) {
                        tracing::info!(name = %t.name, "backend host name resolves again");
                    }
                    if known.set(&t.name, addresses) {
                        changed = true;
                        let list: Vec<String> = known.addresses(&t.name).iter().map(ToString::to_string).collect();
                        tracing::info!(name = %t.name, addresses = %list.join(", "), "backend host name: new addresses");
                    }
                }
                Err(error) => {
                    due[i] = Instant::now() + t.interval;
                    t.failures.iter().for_each(|f| {
                        f.fetch_add(1, Relaxed);
                    });
                    if !std::mem::replace(&mut failing[i], true) {
                        tracing::warn!(
                            name = %t.name,
                            %error,
                            kept = known.addresses(&t.name).len(),
                            "backend host name lookup failed; keeping the last known addresses",
                        );
                    }
                }
            }
        }
        if changed && found.send(Found { generation, resolved: known.clone() }).await.is_err() {
            return;
        }
    }
}
