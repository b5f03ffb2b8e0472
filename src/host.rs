//! Host patterns, for routes and for choosing a certificate by SNI.

/// A route's host: exact (`api.example.com`) or a wildcard suffix (`*.example.com`
/// matches `a.example.com` and `a.b.example.com`, not `example.com`). Lower-case.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HostMatch {
    Exact(String),
    Suffix(String),
}

impl std::fmt::Display for HostMatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HostMatch::Exact(h) => f.write_str(h),
            HostMatch::Suffix(s) => write!(f, "*.{s}"),
        }
    }
}

impl HostMatch {
    pub fn matches(&self, host: &str) -> bool {
        match self {
            HostMatch::Exact(h) => h.eq_ignore_ascii_case(host),
            HostMatch::Suffix(s) => {
                host.len() > s.len() && host[host.len() - s.len()..].eq_ignore_ascii_case(s) && {
                    let cut = host.len() - s.len();
                    host.as_bytes()[cut - 1] == b'.' && cut > 1
                }
            }
        }
    }
}
