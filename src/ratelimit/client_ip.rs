//! The client address behind trusted proxies: `X-Forwarded-For` read right to left past the
//! hops `server.trusted_proxies` lists (nginx's realip with `real_ip_recursive on`).

use std::net::IpAddr;

use http::header::HeaderValue;
use http::HeaderMap;
use ipnet::IpNet;

static X_FORWARDED_FOR: http::HeaderName = http::HeaderName::from_static("x-forwarded-for");

/// `server.trusted_proxies`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustedProxies {
    nets: Vec<IpNet>,
}

impl TrustedProxies {
    /// Parses CIDRs (`10.0.0.0/8`, `::1/128`) or single addresses.
    pub fn parse(list: &[String]) -> Result<Self, String> {
        let nets = list
            .iter()
            .map(|s| {
                let s = s.trim();
                s.parse::<IpNet>()
                    .or_else(|_| s.parse::<IpAddr>().map(IpNet::from))
                    .map_err(|_| {
                        format!("invalid CIDR {s:?}; expected an address or ADDRESS/PREFIX such as \"10.0.0.0/8\"")
                    })
            })
            .collect::<Result<_, _>>()?;
        Ok(Self { nets })
    }

    /// No proxy is trusted (the default): the peer is the client.
    pub fn is_empty(&self) -> bool {
        self.nets.is_empty()
    }

    /// The CIDRs, for `/status`.
    pub fn nets(&self) -> &[IpNet] {
        &self.nets
    }

    fn trusts(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        self.nets.iter().any(|n| n.contains(&ip))
    }

    /// The client address of a request from `peer`. With a trusted peer, the rightmost
    /// `X-Forwarded-For` entry that is not itself trusted; the leftmost entry when every one
    /// is trusted; the peer when the header is missing or an entry is not an address (a hop
    /// we cannot read ends the walk, as it ends trust).
    pub fn client(&self, peer: IpAddr, headers: &HeaderMap) -> Resolved {
        if self.nets.is_empty() || !self.trusts(peer) {
            return Resolved {
                client: peer,
                kept: 0,
            };
        }
        let mut client = peer;
        let mut kept = 0;
        // Entries right to left, over every X-Forwarded-For line in order.
        // Entries are read one by one as bytes: what a client wrote further left on the same
        // line (a proxy appending to it) cannot spoil the entries the proxies added.
        for line in headers.get_all(&X_FORWARDED_FOR).iter().rev() {
            for entry in line.as_bytes().rsplit(|&b| b == b',') {
                let Some(ip) = parse_entry(entry) else {
                    return Resolved { client, kept };
                };
                client = ip;
                kept += 1;
                if !self.trusts(ip) {
                    return Resolved { client, kept };
                }
            }
        }
        Resolved { client, kept }
    }
}

/// The client address and how many `X-Forwarded-For` entries (from the right) lead to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resolved {
    /// The client.
    pub client: IpAddr,
    /// Entries read, the client's own included; 0 when the peer is the client.
    pub kept: usize,
}

/// An `X-Forwarded-For` entry: an address, maybe with a port (`1.2.3.4:5`, `[::1]:5`).
fn parse_entry(entry: &[u8]) -> Option<IpAddr> {
    let e = std::str::from_utf8(entry).ok()?.trim();
    if let Ok(ip) = e.parse::<IpAddr>() {
        return Some(canonical(ip));
    }
    e.parse::<std::net::SocketAddr>()
        .ok()
        .map(|s| canonical(s.ip()))
}

/// IPv4-mapped IPv6 addresses compare as the IPv4 address.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// The `X-Forwarded-For` to send upstream behind trusted proxies: the entries from the client
/// rightwards (the ones the gateway vouches for); entries the client wrote itself are dropped,
/// so the leftmost address upstream sees is the one the gateway used. `None` removes the header.
pub fn trusted_chain(headers: &HeaderMap, kept: usize) -> Option<HeaderValue> {
    if kept == 0 {
        return None;
    }
    let mut entries: Vec<&[u8]> = Vec::with_capacity(kept);
    'lines: for line in headers.get_all(&X_FORWARDED_FOR).iter().rev() {
        for e in line.as_bytes().rsplit(|&b| b == b',') {
            if entries.len() == kept {
                break 'lines;
            }
            entries.push(e.trim_ascii());
        }
    }
    entries.reverse();
    HeaderValue::from_bytes(&entries.join(&b", "[..])).ok()
}

/// Rewrites `X-Forwarded-For` to [`trusted_chain`].
pub fn keep_trusted_chain(headers: &mut HeaderMap, kept: usize) {
    match trusted_chain(headers, kept) {
        Some(v) => {
            headers.insert(X_FORWARDED_FOR.clone(), v);
        }
        None => {
            headers.remove(&X_FORWARDED_FOR);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(xff: &[&str]) -> HeaderMap {
        let mut m = HeaderMap::new();
        for v in xff {
            m.append("x-forwarded-for", HeaderValue::from_str(v).unwrap());
        }
        m
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn right_to_left_past_trusted_hops() {
        let t = TrustedProxies::parse(&["10.0.0.0/8".into(), "192.168.1.1".into()]).unwrap();
        let headers = h(&["6.6.6.6, 203.0.113.5", "10.1.1.1"]);
        let r = t.client(ip("192.168.1.1"), &headers);
        assert_eq!(r.client, ip("203.0.113.5"));
        assert_eq!(r.kept, 2);
        assert_eq!(
            trusted_chain(&headers, r.kept).unwrap(),
            "203.0.113.5, 10.1.1.1"
        );
        // An untrusted peer is the client whatever it claims.
        let r = t.client(ip("198.51.100.1"), &headers);
        assert_eq!(
            r,
            Resolved {
                client: ip("198.51.100.1"),
                kept: 0
            }
        );
        // All trusted: the leftmost.
        let r = t.client(ip("10.0.0.1"), &h(&["10.0.0.9"]));
        assert_eq!(r.client, ip("10.0.0.9"));
        // Garbage stops the walk at the last readable hop.
        let r = t.client(ip("10.0.0.1"), &h(&["bogus, 10.0.0.7"]));
        assert_eq!(r.client, ip("10.0.0.7"));
        // Ports and mapped addresses.
        let r = t.client(ip("::ffff:10.0.0.1"), &h(&["[2001:db8::1]:443"]));
        assert_eq!(r.client, ip("2001:db8::1"));
    }

    #[test]
    fn bytes_a_client_wrote_on_a_proxys_line_do_not_hide_the_client() {
        let t = TrustedProxies::parse(&["10.0.0.0/8".into()]).unwrap();
        // A proxy appending to the client's own line: its left part is not ASCII.
        let mut headers = HeaderMap::new();
        headers.append(
            "x-forwarded-for",
            HeaderValue::from_bytes(b"\xff\xfe, 203.0.113.5").unwrap(),
        );
        headers.append("x-forwarded-for", HeaderValue::from_static("10.1.1.1"));
        let r = t.client(ip("10.0.0.1"), &headers);
        assert_eq!(r.client, ip("203.0.113.5"));
        assert_eq!(r.kept, 2);
        assert_eq!(
            trusted_chain(&headers, r.kept).unwrap(),
            "203.0.113.5, 10.1.1.1"
        );
    }

    #[test]
    fn bad_cidrs_are_refused() {
        assert!(TrustedProxies::parse(&["10.0.0.0/33".into()]).is_err());
        assert!(TrustedProxies::parse(&["nope".into()]).is_err());
    }
}
