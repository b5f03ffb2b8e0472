//! The route table: host (exact or `*.suffix`) and longest segment-boundary path prefix.

use std::sync::Arc;

use crate::cache::Cache;
use crate::config::{HostMatch, RouteConfig};

#[derive(Debug)]
pub struct Route {
    pub host: Option<HostMatch>,
    pub prefix: String,
    /// Index into `Runtime::upstreams`.
    pub upstream: usize,
    pub strip_prefix: bool,
    /// Indices into `Runtime::limits` of every limit this route's requests must pass
    /// (server-wide and the route's own), ascending: the order their locks are taken in.
    pub limits: Vec<usize>,
    /// `cache = "NAME"`: where its GET and HEAD responses are kept.
    pub cache: Option<Arc<Cache>>,
}

#[derive(Debug, Default)]
pub struct Router {
    /// Longest prefix first; equal lengths keep the order of the file (first listed wins).
    routes: Vec<Route>,
}

impl Router {
    pub fn new(mut routes: Vec<Route>) -> Router {
        routes.sort_by_key(|r| std::cmp::Reverse(r.prefix.len()));
        Router { routes }
    }

    /// Builds one route from the config (`upstream` and `limits` already resolved).
    pub fn route(cfg: &RouteConfig, upstream: usize, limits: Vec<usize>, cache: Option<Arc<Cache>>) -> Route {
        Route {
            host: cfg.host.clone(),
            prefix: cfg.path_prefix.clone(),
            upstream,
            strip_prefix: cfg.strip_prefix,
            limits,
            cache,
        }
    }

    /// The route for a request; `host` without port, `path` normalised.
    pub fn find(&self, host: Option<&str>, path: &str) -> Option<&Route> {
        self.routes.iter().find(|r| {
            let host_ok = match (&r.host, host) {
                (None, _) => true,
                (Some(m), Some(h)) => m.matches(h),
                (Some(_), None) => false,
            };
            host_ok && prefix_matches(&r.prefix, path)
        })
    }
}

/// `/api` matches `/api` and `/api/...`, never `/apix`.
pub fn prefix_matches(prefix: &str, path: &str) -> bool {
    prefix == "/" || (path.starts_with(prefix) && matches!(path.as_bytes().get(prefix.len()), None | Some(b'/')))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(host: Option<HostMatch>, prefix: &str, upstream: usize) -> Route {
        Route { host, prefix: prefix.into(), upstream, strip_prefix: false, limits: vec![], cache: None }
    }

    #[test]
    fn longest_prefix_wins_and_ties_go_to_the_first() {
        let router = Router::new(vec![
            r(Some(HostMatch::Exact("admin.example.com".into())), "/", 4),
            r(None, "/", 0),
            r(None, "/api", 1),
            r(None, "/api/v2", 2),
            r(None, "/api", 3),
        ]);
        let up = |h, p| router.find(h, p).map(|r| r.upstream);
        assert_eq!(up(None, "/api/v2/x"), Some(2));
        assert_eq!(up(None, "/api"), Some(1));
        assert_eq!(up(None, "/apix"), Some(0));
        assert_eq!(up(Some("admin.example.com"), "/x"), Some(4));
        assert_eq!(up(Some("admin.example.com"), "/api"), Some(1));
        assert_eq!(up(Some("www.example.com"), "/x"), Some(0));
    }

    #[test]
    fn no_match_is_none() {
        let router = Router::new(vec![r(Some(HostMatch::Suffix("example.com".into())), "/app", 0)]);
        assert!(router.find(Some("a.example.com"), "/other").is_none());
        assert!(router.find(Some("example.com"), "/app").is_none());
        assert!(router.find(None, "/app").is_none());
        assert!(router.find(Some("a.example.com"), "/app/1").is_some());
    }
}
