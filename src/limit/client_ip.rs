//! The client address a limit is keyed by: the peer, or, when the peer is a trusted
//! proxy, the right-most `X-Forwarded-For` entry that is not itself trusted.

use std::net::IpAddr;

use http::HeaderMap;
use ipnet::IpNet;

pub fn client_ip(peer: IpAddr, headers: &HeaderMap, trusted: &[IpNet]) -> IpAddr {
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|n| n.contains(ip));
    if trusted.is_empty() || !is_trusted(&peer) {
        return peer;
    }
    let values: Vec<&str> = headers.get_all("x-forwarded-for").iter().filter_map(|v| v.to_str().ok()).collect();
    let mut leftmost = peer;
    for entry in values.iter().rev().flat_map(|v| v.rsplit(',')) {
        let Some(ip) = parse_entry(entry) else {
            // Garbage in the chain: nothing further left can be believed.
            return leftmost;
        };
        if !is_trusted(&ip) {
            return ip;
        }
        leftmost = ip;
    }
    leftmost
}

/// An X-Forwarded-For entry: an IP, possibly with a port (`1.2.3.4:5`, `[::1]:5`).
fn parse_entry(s: &str) -> Option<IpAddr> {
    let s = s.trim();
    if let Ok(ip) = s.parse() {
        return Some(ip);
    }
    if let Ok(sa) = s.parse::<std::net::SocketAddr>() {
        return Some(sa.ip());
    }
    s.strip_prefix('[').and_then(|r| r.strip_suffix(']')).and_then(|r| r.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(xff: &[&str]) -> HeaderMap {
        let mut m = HeaderMap::new();
        for v in xff {
            m.append("x-forwarded-for", v.parse().unwrap());
        }
        m
    }

    #[test]
    fn untrusted_peers_cannot_choose_their_key() {
        let peer: IpAddr = "203.0.113.5".parse().unwrap();
        let trusted = ["10.0.0.0/8".parse().unwrap()];
        assert_eq!(client_ip(peer, &h(&["1.1.1.1"]), &trusted), peer);
        assert_eq!(client_ip(peer, &h(&["1.1.1.1"]), &[]), peer);
    }

    #[test]
    fn trusted_chains_give_the_rightmost_untrusted_entry() {
        let trusted: Vec<IpNet> = vec!["10.0.0.0/8".parse().unwrap(), "192.168.1.1/32".parse().unwrap()];
        let proxy: IpAddr = "10.1.1.1".parse().unwrap();
        // spoofed, real client, trusted hop
        let headers = h(&["6.6.6.6, 198.51.100.7", "192.168.1.1"]);
        assert_eq!(client_ip(proxy, &headers, &trusted), "198.51.100.7".parse::<IpAddr>().unwrap());
        assert_eq!(client_ip(proxy, &h(&[]), &trusted), proxy);
        assert_eq!(client_ip(proxy, &h(&["10.2.2.2"]), &trusted), "10.2.2.2".parse::<IpAddr>().unwrap());
        assert_eq!(client_ip(proxy, &h(&["198.51.100.7:4711"]), &trusted), "198.51.100.7".parse::<IpAddr>().unwrap());
        assert_eq!(client_ip(proxy, &h(&["junk, 10.3.3.3"]), &trusted), "10.3.3.3".parse::<IpAddr>().unwrap());
    }
}
