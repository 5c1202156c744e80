//! Request-head rules checked before routing: the one Host (RFC 9112 section 3.2), message
//! framing (Transfer-Encoding and Content-Length, section 6) and which upgrade may travel.
//! Pure functions, panic-free on any input; `proxy.rs` turns their errors into answers.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{StatusCode, Uri, Version};

static HTTP2_SETTINGS: HeaderName = HeaderName::from_static("http2-settings");

/// Why a request head is refused. Nothing of such a request is forwarded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HeadError {
    /// An HTTP/1.1 request without `Host`, or an HTTP/2 one with neither `:authority` nor `Host`.
    #[error("the request has no Host")]
    MissingHost,
    /// More than one `Host` field line.
    #[error("the request has more than one Host")]
    DuplicateHost,
    /// `Host` is not `uri-host [":" port]`.
    #[error("the Host value is not a valid host and port")]
    InvalidHost,
    /// The request target's authority (absolute form, `:authority`) is not `uri-host [":" port]`
    /// (user information included).
    #[error("the request target's authority is not a valid host and port")]
    InvalidAuthority,
    /// An HTTP/2 request whose `Host` names another host than its `:authority`.
    #[error("Host differs from the request's :authority")]
    AuthorityMismatch,
    /// A transfer coding other than `chunked` (`gzip, chunked`, `identity, chunked`): the
    /// gateway does not decode them (RFC 9112 section 6.1 answers 501).
    #[error("transfer coding not implemented")]
    UnsupportedTransferCoding,
    /// `Transfer-Encoding` whose final coding is not exactly one `chunked`, or on a request
    /// that may not carry it (HTTP/1.0, HTTP/2).
    #[error("invalid Transfer-Encoding")]
    InvalidTransferEncoding,
    /// Both `Content-Length` and `Transfer-Encoding`.
    #[error("Content-Length together with Transfer-Encoding")]
    ContentLengthWithTransferEncoding,
    /// `Content-Length` more than once, or not a plain decimal number.
    #[error("invalid Content-Length")]
    InvalidContentLength,
}

impl HeadError {
    /// The status the client gets: 501 for a transfer coding the gateway does not implement,
    /// 400 for everything else. Exhaustive on purpose.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::UnsupportedTransferCoding => StatusCode::NOT_IMPLEMENTED,
            Self::MissingHost
            | Self::DuplicateHost
            | Self::InvalidHost
            | Self::InvalidAuthority
            | Self::AuthorityMismatch
            | Self::InvalidTransferEncoding
            | Self::ContentLengthWithTransferEncoding
            | Self::InvalidContentLength => StatusCode::BAD_REQUEST,
        }
    }
}

/// Checks a request head and returns the one host the request is for: the request target's
/// authority when it has one (absolute form, HTTP/2 `:authority`, RFC 9112 section 3.2.2),
/// else the single `Host`. `None` only for an HTTP/1.0 request without `Host`.
///
/// Refused: framing that is not exactly one final `chunked` or one plain `Content-Length`
/// ([`check_framing`]); an HTTP/1.1 request without `Host`; more than one `Host`; a `Host`
/// or authority that is not `uri-host [":" port]` (empty, user information, spaces, bad
/// port); an HTTP/2 `Host` naming another host than `:authority`.
pub fn validate(
    version: Version,
    uri: &Uri,
    headers: &HeaderMap,
) -> Result<Option<HeaderValue>, HeadError> {
    check_framing(version, headers)?;
    resolve_host(version, uri, headers)
}

/// The host part of [`validate`]: Host resolution without the framing rules.
pub fn resolve_host(
    version: Version,
    uri: &Uri,
    headers: &HeaderMap,
) -> Result<Option<HeaderValue>, HeadError> {
    let mut lines = headers.get_all(header::HOST).iter();
    let host = lines.next();
    if lines.next().is_some() {
        return Err(HeadError::DuplicateHost);
    }
    // An invalid Host is refused even when the target's authority replaces it: the field is
    // still part of a malformed message (RFC 9112 section 3.2).
    if host.is_some_and(|h| !is_valid_host(h.as_bytes())) {
        return Err(HeadError::InvalidHost);
    }
    if version == Version::HTTP_11 && host.is_none() {
        return Err(HeadError::MissingHost);
    }
    match uri.authority() {
        Some(authority) => {
            let authority = authority.as_str();
            if !is_valid_host(authority.as_bytes()) {
                return Err(HeadError::InvalidAuthority);
            }
            let h2 = matches!(version, Version::HTTP_2 | Version::HTTP_3);
            if h2 && host.is_some_and(|h| !h.as_bytes().eq_ignore_ascii_case(authority.as_bytes()))
            {
                return Err(HeadError::AuthorityMismatch);
            }
            match host {
                // The common HTTP/2 case, and an absolute form repeating its Host: no new value.
                Some(h) if h.as_bytes() == authority.as_bytes() => Ok(Some(h.clone())),
                _ => HeaderValue::from_str(authority)
                    .map(Some)
                    .map_err(|_| HeadError::InvalidAuthority),
            }
        }
        None => match (host, version) {
            (Some(h), _) => Ok(Some(h.clone())),
            (None, Version::HTTP_09 | Version::HTTP_10) => Ok(None),
            (None, _) => Err(HeadError::MissingHost),
        },
    }
}

/// `uri-host [":" port]` (RFC 3986 section 3.2.2 and 3.2.3) with a non-empty host, since an
/// `http` URI with an empty host is invalid (RFC 9110 section 4.2.1), and a port that fits
/// TCP (an empty port is allowed by the grammar).
pub fn is_valid_host(value: &[u8]) -> bool {
    let (host, port) = if value.first() == Some(&b'[') {
        let Some(end) = value.iter().position(|&b| b == b']') else {
            return false;
        };
        let (literal, rest) = value.split_at(end + 1);
        if !is_ip_literal(literal) {
            return false;
        }
        match rest {
            [] => return true,
            [b':', port @ ..] => (literal, port),
            _ => return false,
        }
    } else {
        match value.iter().position(|&b| b == b':') {
            Some(i) => (&value[..i], &value[i + 1..]),
            None => (value, &[][..]),
        }
    };
    if host.is_empty() || port.len() > 5 || !port.iter().all(u8::is_ascii_digit) {
        return false;
    }
    let port_ok =
        port.is_empty() || port.iter().fold(0u32, |n, &d| n * 10 + u32::from(d - b'0')) <= 65_535;
    port_ok && (host.first() == Some(&b'[') || is_reg_name(host))
}

/// `IP-literal = "[" ( IPv6address / IPvFuture ) "]"`, brackets included.
fn is_ip_literal(literal: &[u8]) -> bool {
    let Some(inner) = literal
        .strip_prefix(b"[")
        .and_then(|l| l.strip_suffix(b"]"))
    else {
        return false;
    };
    match inner.first() {
        // IPvFuture = "v" 1*HEXDIG "." 1*( unreserved / sub-delims / ":" )
        Some(b'v' | b'V') => {
            let Some(dot) = inner.iter().position(|&b| b == b'.') else {
                return false;
            };
            let (version, rest) = (&inner[1..dot], &inner[dot + 1..]);
            !version.is_empty()
                && version.iter().all(u8::is_ascii_hexdigit)
                && !rest.is_empty()
                && rest
                    .iter()
                    .all(|&b| is_unreserved(b) || is_sub_delim(b) || b == b':')
        }
        // std's parser takes exactly the RFC 4291 text forms, and no zone identifier.
        _ => std::str::from_utf8(inner).is_ok_and(|s| s.parse::<std::net::Ipv6Addr>().is_ok()),
    }
}

/// `reg-name = *( unreserved / pct-encoded / sub-delims )`; IPv4 addresses are reg-names too.
fn is_reg_name(host: &[u8]) -> bool {
    let mut i = 0;
    while let Some(&b) = host.get(i) {
        if b == b'%' {
            match host.get(i + 1..i + 3) {
                Some([a, b]) if a.is_ascii_hexdigit() && b.is_ascii_hexdigit() => i += 3,
                _ => return false,
            }
        } else if is_unreserved(b) || is_sub_delim(b) {
            i += 1;
        } else {
            return false;
        }
    }
    true
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

fn is_sub_delim(b: u8) -> bool {
    matches!(
        b,
        b'!' | b'$' | b'&' | b'\'' | b'(' | b')' | b'*' | b'+' | b',' | b';' | b'='
    )
}

/// The framing rules of RFC 9112 section 6: `Transfer-Encoding` only on HTTP/1.1, only
/// without `Content-Length`, with exactly one `chunked` as its final coding and no other
/// coding (the gateway implements none: 501); at most one `Content-Length`, a plain decimal
/// number. Field lines are taken together, so split lines count as one list.
pub fn check_framing(version: Version, headers: &HeaderMap) -> Result<(), HeadError> {
    let mut content_lengths = headers.get_all(header::CONTENT_LENGTH).iter();
    let content_length = content_lengths.next();
    if content_lengths.next().is_some() {
        return Err(HeadError::InvalidContentLength);
    }
    if content_length.is_some_and(|v| parse_content_length(v.as_bytes()).is_none()) {
        return Err(HeadError::InvalidContentLength);
    }
    let mut codings = headers.get_all(header::TRANSFER_ENCODING).iter().peekable();
    if codings.peek().is_none() {
        return Ok(());
    }
    if version != Version::HTTP_11 {
        return Err(HeadError::InvalidTransferEncoding);
    }
    if content_length.is_some() {
        return Err(HeadError::ContentLengthWithTransferEncoding);
    }
    let mut chunked = 0usize;
    let mut last_chunked = false;
    let mut other = false;
    for line in codings {
        let Ok(line) = line.to_str() else {
            return Err(HeadError::InvalidTransferEncoding);
        };
        // Empty list elements are allowed and ignored (RFC 9110 section 5.6.1).
        for coding in line.split(',').map(|c| c.trim_matches([' ', '\t'])) {
            if coding.is_empty() {
                continue;
            }
            if coding.eq_ignore_ascii_case("chunked") {
                chunked += 1;
                last_chunked = true;
            } else {
                other = true;
                last_chunked = false;
            }
        }
    }
    if !last_chunked || chunked > 1 {
        return Err(HeadError::InvalidTransferEncoding);
    }
    if other {
        return Err(HeadError::UnsupportedTransferCoding);
    }
    Ok(())
}

/// `Content-Length = 1*DIGIT`, within `u64`: no sign, no spaces inside, no list.
pub fn parse_content_length(value: &[u8]) -> Option<u64> {
    if value.is_empty() {
        return None;
    }
    value.iter().try_fold(0u64, |n, &b| {
        if b.is_ascii_digit() {
            n.checked_mul(10)?.checked_add(u64::from(b - b'0'))
        } else {
            None
        }
    })
}

/// Decides which protocol switch travels upstream: only `Upgrade: websocket` on an HTTP/1.1
/// request that lists `upgrade` in `Connection`, and only when `websocket` (the route's
/// setting) allows it. Then `Upgrade` is cut down to that one token and `true` comes back.
/// Otherwise `Upgrade` is removed (an `h2c` upgrade must never reach an upstream, whose `101`
/// would open a tunnel past the gateway's rules). `HTTP2-Settings` always goes: it belongs
/// to the connection (RFC 7540 section 3.2.1).
pub fn filter_upgrade(version: Version, headers: &mut HeaderMap, websocket: bool) -> bool {
    headers.remove(&HTTP2_SETTINGS);
    if !headers.contains_key(header::UPGRADE) {
        return false;
    }
    let relay = websocket
        && version == Version::HTTP_11
        && list_has(headers, &header::CONNECTION, "upgrade")
        && list_has(headers, &header::UPGRADE, "websocket");
    if relay {
        headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    } else {
        headers.remove(header::UPGRADE);
    }
    relay
}

/// True when an upstream's `101` switches to WebSocket, the one protocol the gateway relays:
/// exactly one `Upgrade` token, `websocket`. Any other `101` must not open a tunnel.
pub fn switches_to_websocket(headers: &HeaderMap) -> bool {
    let mut lines = headers.get_all(header::UPGRADE).iter();
    match (lines.next(), lines.next()) {
        (Some(v), None) => v.to_str().is_ok_and(|v| {
            v.trim_matches([' ', '\t'])
                .eq_ignore_ascii_case("websocket")
        }),
        _ => false,
    }
}

/// True when a comma-separated header lists `token` (case-insensitive) on any of its lines.
fn list_has(headers: &HeaderMap, name: &HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim_matches([' ', '\t']).eq_ignore_ascii_case(token))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A header name and its raw value.
    type Pair<'a> = (&'a str, &'a [u8]);

    fn headers(pairs: &[Pair<'_>]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (name, value) in pairs {
            h.append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_bytes(value).unwrap(),
            );
        }
        h
    }

    fn host_of(
        version: Version,
        target: &str,
        pairs: &[(&str, &[u8])],
    ) -> Result<Option<HeaderValue>, HeadError> {
        validate(version, &target.parse().unwrap(), &headers(pairs))
    }

    #[test]
    fn host_values_follow_the_uri_grammar() {
        let valid: &[&[u8]] = &[
            b"example.com",
            b"example.com:8080",
            b"example.com:",
            b"EXAMPLE.com:65535",
            b"127.0.0.1",
            b"127.0.0.1:80",
            b"[::1]",
            b"[::1]:443",
            b"[2001:db8::7]:1",
            b"[v1.fe80::a+en1]",
            b"ex%41mple.com",
            b"a-b_c~d.e!$&'()*+,;=",
        ];
        for v in valid {
            assert!(is_valid_host(v), "{}", String::from_utf8_lossy(v));
        }
        let invalid: &[&[u8]] = &[
            b"",
            b":80",
            b"a b.example",
            b"user@example.com",
            b"user:pw@example.com",
            b"example.com:80x",
            b"example.com:65536",
            b"example.com:99999",
            b"example.com:-1",
            b"example.com:+1",
            b"example.com:000000080",
            b"example.com:80:80",
            b"example.com/x",
            b"example.com?x",
            b"example.com#x",
            b"ex%4mple.com",
            b"ex%",
            b"[::1",
            b"::1",
            b"[::1]x",
            b"[::1]:x",
            b"[fe80::1%25eth0]",
            b"[v.x]",
            b"[vz.x]",
            b"[1.2.3.4]",
            b"[]",
            b"exa\tmple",
            b"\xc3\xa9.example",
            b"[",
            b"]",
        ];
        for v in invalid {
            assert!(!is_valid_host(v), "{}", String::from_utf8_lossy(v));
        }
    }

    #[test]
    fn the_host_comes_from_one_valid_host_or_the_target_authority() {
        let h11 = Version::HTTP_11;
        assert_eq!(
            host_of(h11, "/x", &[("host", b"a.example")])
                .unwrap()
                .unwrap(),
            "a.example"
        );
        assert_eq!(host_of(h11, "/x", &[]), Err(HeadError::MissingHost));
        assert_eq!(
            host_of(h11, "/x", &[("host", b"a.example"), ("host", b"a.example")]),
            Err(HeadError::DuplicateHost)
        );
        assert_eq!(
            host_of(h11, "/x", &[("host", b"")]),
            Err(HeadError::InvalidHost)
        );
        // Absolute form: the authority wins over Host, which must still be there and valid.
        assert_eq!(
            host_of(h11, "http://b.example:81/x", &[("host", b"a.example")])
                .unwrap()
                .unwrap(),
            "b.example:81"
        );
        assert_eq!(
            host_of(h11, "http://b.example/x", &[]),
            Err(HeadError::MissingHost)
        );
        assert_eq!(
            host_of(h11, "http://b.example/x", &[("host", b"a b")]),
            Err(HeadError::InvalidHost)
        );
        assert_eq!(
            host_of(h11, "http://u@b.example/x", &[("host", b"b.example")]),
            Err(HeadError::InvalidAuthority)
        );
        // HTTP/1.0 may go without Host.
        assert_eq!(host_of(Version::HTTP_10, "/x", &[]), Ok(None));
        assert_eq!(
            host_of(Version::HTTP_10, "/x", &[("host", b"a"), ("host", b"b")]),
            Err(HeadError::DuplicateHost)
        );
        // HTTP/2: :authority is the host; a Host naming another one is refused.
        let h2 = Version::HTTP_2;
        assert_eq!(
            host_of(h2, "http://c.example/x", &[]).unwrap().unwrap(),
            "c.example"
        );
        assert_eq!(
            host_of(h2, "http://c.example/x", &[("host", b"C.example")])
                .unwrap()
                .unwrap(),
            "c.example"
        );
        assert_eq!(
            host_of(h2, "http://c.example/x", &[("host", b"d.example")]),
            Err(HeadError::AuthorityMismatch)
        );
        assert_eq!(
            host_of(h2, "/x", &[("host", b"d.example")])
                .unwrap()
                .unwrap(),
            "d.example"
        );
        assert_eq!(host_of(h2, "/x", &[]), Err(HeadError::MissingHost));
    }

    #[test]
    fn framing_allows_one_final_chunked_or_one_plain_length() {
        use HeadError::*;
        let h11 = Version::HTTP_11;
        let cases: &[(&[Pair<'_>], Result<(), HeadError>)] = &[
            (&[], Ok(())),
            (&[("transfer-encoding", b"chunked")], Ok(())),
            (&[("transfer-encoding", b"CHUNKED")], Ok(())),
            (&[("transfer-encoding", b", chunked")], Ok(())),
            (&[("content-length", b"0")], Ok(())),
            (&[("content-length", b"18446744073709551615")], Ok(())),
            (
                &[("transfer-encoding", b"chunked, chunked")],
                Err(InvalidTransferEncoding),
            ),
            (
                &[
                    ("transfer-encoding", b"chunked"),
                    ("transfer-encoding", b"chunked"),
                ],
                Err(InvalidTransferEncoding),
            ),
            (
                &[("transfer-encoding", b"gzip, chunked")],
                Err(UnsupportedTransferCoding),
            ),
            (
                &[
                    ("transfer-encoding", b"gzip"),
                    ("transfer-encoding", b"chunked"),
                ],
                Err(UnsupportedTransferCoding),
            ),
            (
                &[("transfer-encoding", b"identity, chunked")],
                Err(UnsupportedTransferCoding),
            ),
            (
                &[("transfer-encoding", b"identity")],
                Err(InvalidTransferEncoding),
            ),
            (
                &[("transfer-encoding", b"chunked, gzip")],
                Err(InvalidTransferEncoding),
            ),
            (&[("transfer-encoding", b"chunked,")], Ok(())),
            (&[("transfer-encoding", b"")], Err(InvalidTransferEncoding)),
            (
                &[("transfer-encoding", b"chunked;x=1")],
                Err(InvalidTransferEncoding),
            ),
            (
                &[("transfer-encoding", b"\xffchunked")],
                Err(InvalidTransferEncoding),
            ),
            (
                &[("transfer-encoding", b"chunked"), ("content-length", b"5")],
                Err(ContentLengthWithTransferEncoding),
            ),
            (
                &[("content-length", b"5"), ("content-length", b"5")],
                Err(InvalidContentLength),
            ),
            (
                &[("content-length", b"5"), ("content-length", b"6")],
                Err(InvalidContentLength),
            ),
            (&[("content-length", b"5, 5")], Err(InvalidContentLength)),
            (&[("content-length", b"+5")], Err(InvalidContentLength)),
            (&[("content-length", b"-5")], Err(InvalidContentLength)),
            (&[("content-length", b"5 5")], Err(InvalidContentLength)),
            (&[("content-length", b"")], Err(InvalidContentLength)),
            (&[("content-length", b"0x10")], Err(InvalidContentLength)),
            (
                &[("content-length", b"18446744073709551616")],
                Err(InvalidContentLength),
            ),
        ];
        for (pairs, want) in cases {
            assert_eq!(check_framing(h11, &headers(pairs)), *want, "{pairs:?}");
        }
        let chunked = headers(&[("transfer-encoding", b"chunked")]);
        assert_eq!(
            check_framing(Version::HTTP_10, &chunked),
            Err(InvalidTransferEncoding)
        );
        assert_eq!(
            check_framing(Version::HTTP_2, &chunked),
            Err(InvalidTransferEncoding)
        );
        assert_eq!(
            UnsupportedTransferCoding.status(),
            StatusCode::NOT_IMPLEMENTED
        );
        assert_eq!(InvalidTransferEncoding.status(), StatusCode::BAD_REQUEST);
    }

    #[test]
    fn only_a_websocket_upgrade_travels() {
        let h11 = Version::HTTP_11;
        let mut h = headers(&[
            ("connection", b"Upgrade, HTTP2-Settings"),
            ("upgrade", b"h2c"),
            ("http2-settings", b"AAMAAABkAAQAAP__"),
        ]);
        assert!(!filter_upgrade(h11, &mut h, true));
        assert!(!h.contains_key("upgrade") && !h.contains_key("http2-settings"));

        let mut h = headers(&[
            ("connection", b"keep-alive, Upgrade"),
            ("upgrade", b"h2c, WebSocket"),
        ]);
        assert!(filter_upgrade(h11, &mut h, true));
        assert_eq!(
            h.get_all("upgrade").iter().collect::<Vec<_>>(),
            ["websocket"]
        );

        let ws = [("connection", &b"upgrade"[..]), ("upgrade", b"websocket")];
        assert!(
            !filter_upgrade(h11, &mut headers(&ws), false),
            "route says websocket = false"
        );
        assert!(!filter_upgrade(Version::HTTP_10, &mut headers(&ws), true));
        assert!(
            !filter_upgrade(h11, &mut headers(&ws[1..]), true),
            "no Connection: upgrade"
        );
        let mut none = headers(&[("connection", b"keep-alive")]);
        assert!(!filter_upgrade(h11, &mut none, true));
        assert_eq!(none.len(), 1);

        assert!(switches_to_websocket(&headers(&[(
            "upgrade",
            b"WebSocket"
        )])));
        assert!(!switches_to_websocket(&headers(&[("upgrade", b"h2c")])));
        assert!(!switches_to_websocket(&headers(&[])));
        assert!(!switches_to_websocket(&headers(&[(
            "upgrade",
            b"websocket, h2c"
        )])));
        assert!(!switches_to_websocket(&headers(&[
            ("upgrade", b"websocket"),
            ("upgrade", b"websocket")
        ])));
    }

    #[test]
    fn no_input_panics() {
        // Every byte at every position of short values, through every function.
        let alphabet: Vec<u8> = (0u8..=255).collect();
        for &a in &alphabet {
            for &b in &alphabet[..] {
                let v = [b'[', a, b, b']', b':', a, b'%', b];
                for len in 0..=v.len() {
                    let _ = is_valid_host(&v[..len]);
                    let _ = parse_content_length(&v[..len]);
                }
            }
        }
        for v in [
            &b"%"[..],
            b"%4",
            b"[v",
            b"[v1",
            b"[v1.",
            b":",
            b"[]:",
            b"\xff",
        ] {
            let _ = is_valid_host(v);
        }
    }
}
