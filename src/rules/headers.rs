//! Header handling on both sides: hop-by-hop removal (RFC 9110 section 7.6.1), `X-Forwarded-*`
//! and `Via`, request ids, and each route's configured add, set and remove.

use std::net::IpAddr;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

/// `X-Request-Id`.
pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// Configured header changes, applied as remove, then set, then add.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HeaderOps {
    add: Vec<(HeaderName, HeaderValue)>,
    set: Vec<(HeaderName, HeaderValue)>,
    remove: Vec<HeaderName>,
}

impl HeaderOps {
    /// Builds the change set.
    pub fn new(
        add: Vec<(HeaderName, HeaderValue)>,
        set: Vec<(HeaderName, HeaderValue)>,
        remove: Vec<HeaderName>,
    ) -> Self {
        Self { add, set, remove }
    }

    /// True when there is nothing to do.
    pub fn is_empty(&self) -> bool {
        self.add.is_empty() && self.set.is_empty() && self.remove.is_empty()
    }

    /// Applies the changes.
    pub fn apply(&self, headers: &mut HeaderMap) {
        for name in &self.remove {
            headers.remove(name);
        }
        for (name, value) in &self.set {
            headers.insert(name.clone(), value.clone());
        }
        for (name, value) in &self.add {
            headers.append(name.clone(), value.clone());
        }
    }
}

/// The fixed hop-by-hop headers, each with its bit in `remove_hop_by_hop`'s presence mask.
static HOP_BY_HOP: [&HeaderName; 7] = [
    &header::CONNECTION,
    &header::TE,
    &header::TRAILER,
    &header::TRANSFER_ENCODING,
    &header::UPGRADE,
    &KEEP_ALIVE,
    &PROXY_CONNECTION,
];

/// `name`'s bit in the presence mask (its index in `HOP_BY_HOP`), or 0. The length decides
/// first: most names have none of the set's lengths and are never compared.
fn hop_bit(name: &HeaderName) -> u8 {
    let is = |i: usize| u8::from(name == HOP_BY_HOP[i]) << i;
    match name.as_str().len() {
        2 => is(1),
        7 => is(2) | is(4),
        10 => is(0) | is(5),
        16 => is(6),
        17 => is(3),
        _ => 0,
    }
}

/// Removes hop-by-hop headers: the fixed set plus every header named in `Connection`.
pub fn remove_hop_by_hop(headers: &mut HeaderMap) {
    // One pass over the names, comparing without hashing, notes which of the set are present
    // (most requests carry none; most upstream responses only `Connection: keep-alive`).
    let mut present = 0u8;
    for k in headers.keys() {
        present |= hop_bit(k);
    }
    if present == 0 {
        return;
    }
    const CONNECTION: u8 = 1;
    const TE: u8 = 1 << 1;
    // Tokens listed in Connection are hop-by-hop too. The usual ones (`keep-alive`, `close`,
    // `upgrade`) name nothing beyond the fixed set, so nothing is allocated for them.
    if present & CONNECTION != 0 {
        let listed: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .filter(|t| {
                !["keep-alive", "close", "upgrade", "te", "trailer"]
                    .iter()
                    .any(|known| t.eq_ignore_ascii_case(known))
            })
            .filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok())
            .collect();
        for name in listed {
            headers.remove(name);
        }
    }
    // `TE: trailers` is the one TE value that must travel: gRPC servers insist on it.
    let trailers = present & TE != 0
        && headers
            .get_all(header::TE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("trailers"));
    for (i, name) in HOP_BY_HOP.iter().enumerate() {
        if present & (1 << i) != 0 {
            headers.remove(*name);
        }
    }
    if trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
}

/// Like [`remove_hop_by_hop`], but keeps the protocol switch (`Connection: upgrade` and `Upgrade`).
pub fn remove_hop_by_hop_keep_upgrade(headers: &mut HeaderMap) {
    let upgrade = headers.get(header::UPGRADE).cloned();
    remove_hop_by_hop(headers);
    if let Some(u) = upgrade {
        headers.insert(header::UPGRADE, u);
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
}

/// Adds the forwarding headers: appends the client to `X-Forwarded-For`, sets
/// `X-Forwarded-Proto` and `X-Forwarded-Host`, appends to `Via`.
pub fn add_forwarding(
    headers: &mut HeaderMap,
    client: IpAddr,
    proto: &'static str,
    host: Option<&HeaderValue>,
    via: &'static str,
) {
    let xff = match headers.get(&X_FORWARDED_FOR).and_then(|v| v.to_str().ok()) {
        Some(prev) if !prev.trim().is_empty() => {
            HeaderValue::from_str(&format!("{prev}, {client}")).ok()
        }
        _ => Some(client_value(client)),
    };
    if let Some(v) = xff {
        // Several X-Forwarded-For lines are folded into one so the chain stays in order.
        headers.insert(X_FORWARDED_FOR.clone(), v);
    }
    headers.insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static(proto));
    match host {
        Some(h) => {
            headers.insert(X_FORWARDED_HOST.clone(), h.clone());
        }
        None => {
            headers.remove(&X_FORWARDED_HOST);
        }
    }
    headers.append(header::VIA, HeaderValue::from_static(via));
}

/// `client` as a header value. Consecutive requests on a thread mostly come from the same
/// address (a keep-alive connection, or a load balancer in front), so the last one formatted
/// is kept: a clone of it is a reference count, formatting is an allocation and `fmt`.
fn client_value(client: IpAddr) -> HeaderValue {
    thread_local! {
        static LAST: std::cell::RefCell<Option<(IpAddr, HeaderValue)>> =
            const { std::cell::RefCell::new(None) };
    }
    LAST.with(|last| {
        let mut last = last.borrow_mut();
        match &*last {
            Some((ip, v)) if *ip == client => v.clone(),
            _ => {
                let v = HeaderValue::from_str(&client.to_string())
                    .expect("an IP address is a valid header value");
                *last = Some((client, v.clone()));
                v
            }
        }
    })
}

/// The client's request id when it sent a usable one, else a new random one.
pub fn request_id(headers: &HeaderMap) -> HeaderValue {
    if let Some(v) = headers.get(&X_REQUEST_ID) {
        if !v.is_empty() && v.len() <= 200 {
            return v.clone();
        }
    }
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut id = [0u8; 32];
    let mut n = fastrand::u128(..);
    for b in id.iter_mut().rev() {
        *b = HEX[(n & 0xf) as usize];
        n >>= 4;
    }
    HeaderValue::from_bytes(&id).expect("hex digits are a valid header value")
}

/// The body length a request declares in `Content-Length`, when it is one plain number (the
/// head rules have refused any other form before this is read).
pub fn declared_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_hop_by_hop_name_has_its_own_bit_and_no_other_name_has_one() {
        for (i, name) in HOP_BY_HOP.iter().enumerate() {
            assert_eq!(hop_bit(name), 1 << i, "{name}");
        }
        for name in [
            "host",
            "content-length",
            "accept",
            "x-te",
            "upgrades",
            "keep-alive2",
        ] {
            assert_eq!(hop_bit(&HeaderName::from_static(name)), 0, "{name}");
        }
    }

    #[test]
    fn hop_by_hop_headers_go_including_connection_tokens() {
        let mut h = HeaderMap::new();
        h.insert(
            "connection",
            HeaderValue::from_static("keep-alive, X-Secret"),
        );
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("proxy-connection", HeaderValue::from_static("keep-alive"));
        h.insert("te", HeaderValue::from_static("gzip"));
        h.insert("upgrade", HeaderValue::from_static("h2c"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        remove_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-kept"));
    }

    #[test]
    fn forwarding_headers_append_and_set() {
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", HeaderValue::from_static("10.0.0.1"));
        h.insert("via", HeaderValue::from_static("1.0 edge"));
        let host = HeaderValue::from_static("example.com");
        add_forwarding(
            &mut h,
            IpAddr::from([127, 0, 0, 1]),
            "http",
            Some(&host),
            "1.1 meshgate",
        );
        assert_eq!(h["x-forwarded-for"], "10.0.0.1, 127.0.0.1");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["x-forwarded-host"], "example.com");
        let via: Vec<_> = h.get_all("via").iter().collect();
        assert_eq!(via, ["1.0 edge", "1.1 meshgate"]);
    }

    #[test]
    fn ops_apply_remove_set_add() {
        let ops = HeaderOps::new(
            vec![(
                HeaderName::from_static("x-a"),
                HeaderValue::from_static("2"),
            )],
            vec![(
                HeaderName::from_static("x-b"),
                HeaderValue::from_static("new"),
            )],
            vec![HeaderName::from_static("server")],
        );
        let mut h = HeaderMap::new();
        h.insert("x-a", HeaderValue::from_static("1"));
        h.insert("x-b", HeaderValue::from_static("old"));
        h.append("x-b", HeaderValue::from_static("older"));
        h.insert("server", HeaderValue::from_static("nginx"));
        ops.apply(&mut h);
        assert_eq!(h.get_all("x-a").iter().collect::<Vec<_>>(), ["1", "2"]);
        assert_eq!(h.get_all("x-b").iter().collect::<Vec<_>>(), ["new"]);
        assert!(!h.contains_key("server"));
    }

    #[test]
    fn te_trailers_survives_even_when_connection_lists_te() {
        let mut h = HeaderMap::new();
        h.insert("connection", HeaderValue::from_static("keep-alive, TE"));
        h.insert("te", HeaderValue::from_static("trailers"));
        h.insert("content-type", HeaderValue::from_static("application/grpc"));
        remove_hop_by_hop(&mut h);
        assert_eq!(h.len(), 2);
        assert_eq!(h["te"], "trailers");

        let mut h = HeaderMap::new();
        h.insert("connection", HeaderValue::from_static("keep-alive"));
        h.insert("content-length", HeaderValue::from_static("5"));
        remove_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("content-length"));
    }

    #[test]
    fn the_client_address_cache_follows_the_address() {
        let v4: IpAddr = "10.1.2.3".parse().unwrap();
        let v6: IpAddr = "2001:db8::7".parse().unwrap();
        for ip in [v4, v4, v6, v4, v6, v6] {
            let mut h = HeaderMap::new();
            add_forwarding(&mut h, ip, "http", None, "1.1 meshgate");
            assert_eq!(h[&X_FORWARDED_FOR], ip.to_string());
        }
    }

    #[test]
    fn request_ids_are_kept_or_generated() {
        let mut h = HeaderMap::new();
        let a = request_id(&h);
        assert_eq!(a.len(), 32);
        assert!(
            a.as_bytes().iter().all(|b| b"0123456789abcdef".contains(b)),
            "{a:?}"
        );
        assert_ne!(a, request_id(&h));
        h.insert("x-request-id", HeaderValue::from_static("abc"));
        assert_eq!(request_id(&h), "abc");
    }
}
