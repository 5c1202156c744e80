//! RFC 9111 shared-cache rules: what may be stored, its freshness lifetime and age, normalised
//! `Vary` values, and client conditionals answered from a stored response.

use std::time::{Duration, SystemTime};

use http::header::{
    self, HeaderMap, HeaderName, AGE, CACHE_CONTROL, DATE, ETAG, EXPIRES, IF_MODIFIED_SINCE,
    IF_NONE_MATCH, LAST_MODIFIED, PRAGMA, SET_COOKIE, VARY,
};
use http::StatusCode;

use super::settings::CacheSettings;

/// Statuses stored on `default_ttl` when the response gives no freshness of its own (RFC 9110
/// "heuristically cacheable"; 206 is left out: ranges are not cached).
const HEURISTIC: [u16; 11] = [200, 203, 204, 300, 301, 308, 404, 405, 410, 414, 501];
/// Statuses stored only with explicit freshness (`max-age`, `s-maxage`, `Expires`).
const EXPLICIT_ONLY: [u16; 3] = [302, 307, 451];

/// Request headers some frameworks read as the request's real URL, host or method. The gateway
/// overwrites `X-Forwarded-Host` and `X-Forwarded-Proto`; answers to requests carrying one of
/// these are never stored, so an unkeyed header cannot change what other clients receive.
pub const OVERRIDE_HEADERS: [&str; 11] = [
    "x-original-url",
    "x-forwarded-prefix",
    "x-forwarded-port",
    "x-rewrite-url",
    "x-forwarded-server",
    "x-forwarded-scheme",
    "x-host",
    "x-http-method-override",
    "x-http-method",
    "x-method-override",
    "forwarded",
];

/// Delta-seconds beyond this are taken as this (RFC 9111 1.2.2), so no sum of them overflows.
const MAX_DELTA: u64 = 2_147_483_648;

/// Cache-Control directives, names lowercased, values unquoted.
#[derive(Debug, Default)]
pub struct Directives(Vec<(String, Option<String>)>);

impl Directives {
    /// Every `Cache-Control` line of `headers`.
    pub fn parse(headers: &HeaderMap) -> Self {
        let mut out = Vec::new();
        for v in headers.get_all(CACHE_CONTROL) {
            let Ok(v) = v.to_str() else { continue };
            for d in split_list(v) {
                let (name, value) = match d.split_once('=') {
                    Some((n, v)) => (n.trim(), Some(v.trim().trim_matches('"').to_owned())),
                    None => (d, None),
                };
                if !name.is_empty() {
                    out.push((name.to_ascii_lowercase(), value));
                }
            }
        }
        Self(out)
    }

    /// Whether `name` is present.
    pub fn has(&self, name: &str) -> bool {
        self.0.iter().any(|(n, _)| n == name)
    }

    /// `name=SECONDS`: `None` when absent, `Some(0)` when its value is not a number (RFC 9111
    /// says to treat an invalid lifetime as stale), saturating on overflow.
    pub fn seconds(&self, name: &str) -> Option<u64> {
        let (_, v) = self.0.iter().find(|(n, _)| n == name)?;
        let v = v.as_deref().unwrap_or("");
        if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
            return Some(0);
        }
        Some(v.parse().unwrap_or(MAX_DELTA).min(MAX_DELTA))
    }
}

/// The comma-separated items of a header value, trimmed, empty ones dropped.
fn split_list(v: &str) -> impl Iterator<Item = &str> {
    v.split(',').map(str::trim).filter(|s| !s.is_empty())
}

/// Whether the request asks to skip stored answers (`no-cache`, or `Pragma: no-cache` without
/// `Cache-Control`).
pub fn request_wants_revalidation(req: &HeaderMap, cc: &Directives) -> bool {
    cc.has("no-cache")
        || (!req.contains_key(CACHE_CONTROL)
            && req
                .get_all(PRAGMA)
                .iter()
                .any(|v| v.to_str().is_ok_and(|v| v.contains("no-cache"))))
}

/// How long a stored response stays usable, worked out when it is stored.
#[derive(Debug, Clone)]
pub struct Freshness {
    /// Its age when it was received (`Age`, `Date` and the round trip, RFC 9111 4.2.3).
    pub initial_age: Duration,
    /// Its freshness lifetime (`s-maxage`, `max-age`, `Expires`, else the route's `default_ttl`).
    pub lifetime: Duration,
    /// How long past its lifetime it may be served while it is revalidated.
    pub stale_while_revalidate: Duration,
    /// How long past its lifetime it may be served when the upstream fails.
    pub stale_if_error: Duration,
    /// `must-revalidate` or `proxy-revalidate`: never served stale.
    pub no_stale: bool,
    /// `public`, `s-maxage` or `must-revalidate`: may answer requests with `Authorization`.
    pub shareable_with_auth: bool,
}

/// Why a response is not stored, for logs and tests.
pub type Refusal = &'static str;

/// Whether a response to a GET may be stored, and how fresh it is. `request_time` is when the
/// request went upstream, `response_time` when the answer arrived.
pub fn storable(
    settings: &CacheSettings,
    req: &HeaderMap,
    authorized: bool,
    status: StatusCode,
    resp: &HeaderMap,
    request_time: SystemTime,
    response_time: SystemTime,
) -> Result<Freshness, Refusal> {
    let cc = Directives::parse(resp);
    let code = status.as_u16();
    let explicit = cc.has("s-maxage") || cc.has("max-age") || resp.contains_key(EXPIRES);
    if !(HEURISTIC.contains(&code) || (EXPLICIT_ONLY.contains(&code) && explicit)) {
        return Err("status not cacheable");
    }
    if cc.has("no-store") {
        return Err("Cache-Control: no-store");
    }
    if cc.has("private") {
        return Err("Cache-Control: private");
    }
    if vary_names(resp).any(|n| n == "*") {
        return Err("Vary: *");
    }
    let shareable_with_auth = cc.has("public") || cc.has("s-maxage") || cc.has("must-revalidate");
    if authorized && !shareable_with_auth {
        return Err("request was authenticated and the response is not public");
    }
    if resp.contains_key(SET_COOKIE) && !settings.cache_set_cookie {
        return Err("response sets a cookie (cache_set_cookie is off)");
    }
    if OVERRIDE_HEADERS.iter().any(|h| req.contains_key(*h)) {
        return Err("request carries a URL or method override header");
    }
    let date = resp.get(DATE).and_then(|v| parse_date(v.as_bytes()));
    let lifetime = if cc.has("no-cache") {
        Duration::ZERO
    } else if let Some(s) = cc.seconds("s-maxage") {
        Duration::from_secs(s)
    } else if let Some(s) = cc.seconds("max-age") {
        Duration::from_secs(s)
    } else if let Some(expires) = resp.get(EXPIRES) {
        // An invalid date (often "0") means already expired.
        match parse_date(expires.as_bytes()) {
            Some(t) => t
                .duration_since(date.unwrap_or(response_time))
                .unwrap_or_default(),
            None => Duration::ZERO,
        }
    } else {
        settings.default_ttl
    };
    // `s-maxage` implies `proxy-revalidate` for a shared cache (RFC 9111 5.2.2.10), and a
    // `no-cache` answer may never be used without asking the origin (5.2.2.4).
    let no_stale = cc.has("must-revalidate")
        || cc.has("proxy-revalidate")
        || cc.has("s-maxage")
        || cc.has("no-cache");
    let window = |name: &str, route: Duration| match cc.seconds(name) {
        _ if no_stale => Duration::ZERO,
        Some(s) => Duration::from_secs(s),
        None => route,
    };
    let fresh = Freshness {
        initial_age: initial_age(resp, date, request_time, response_time),
        lifetime,
        stale_while_revalidate: window("stale-while-revalidate", settings.stale_while_revalidate),
        stale_if_error: window("stale-if-error", settings.stale_if_error),
        no_stale,
        shareable_with_auth,
    };
    let validator = resp.contains_key(ETAG) || resp.contains_key(LAST_MODIFIED);
    let usable = fresh
        .lifetime
        .saturating_add(fresh.stale_if_error.max(fresh.stale_while_revalidate));
    if !validator && usable <= fresh.initial_age {
        return Err("no freshness left and no validator");
    }
    Ok(fresh)
}

/// RFC 9111 4.2.3: the larger of the apparent age (`Date` to arrival) and `Age` plus the round
/// trip.
fn initial_age(
    resp: &HeaderMap,
    date: Option<SystemTime>,
    request_time: SystemTime,
    response_time: SystemTime,
) -> Duration {
    let apparent = date
        .and_then(|d| response_time.duration_since(d).ok())
        .unwrap_or_default();
    let age_value = resp
        .get(AGE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(|s| Duration::from_secs(s.min(MAX_DELTA)))
        .unwrap_or_default();
    let delay = response_time
        .duration_since(request_time)
        .unwrap_or_default();
    apparent.max(age_value.saturating_add(delay))
}

/// An HTTP date (IMF-fixdate, RFC 850 or asctime).
pub fn parse_date(v: &[u8]) -> Option<SystemTime> {
    httpdate::parse_http_date(std::str::from_utf8(v).ok()?.trim()).ok()
}

/// The header names a response's `Vary` lists, lowercased.
pub fn vary_names(resp: &HeaderMap) -> impl Iterator<Item = String> + '_ {
    resp.get_all(VARY)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(split_list)
        .map(str::to_ascii_lowercase)
}

/// The request's `Vary` values for `resp`'s `Vary` names, normalised so that equivalent requests
/// share an entry: items trimmed and whitespace collapsed, case folded for the `Accept*`
/// headers, `Accept-Encoding` items sorted. `None` for a name the request does not carry.
pub fn vary_values(resp: &HeaderMap, req: &HeaderMap) -> Vec<(HeaderName, Option<String>)> {
    let mut out: Vec<(HeaderName, Option<String>)> = Vec::new();
    for name in vary_names(resp) {
        let Ok(name) = HeaderName::from_bytes(name.as_bytes()) else {
            continue;
        };
        if out.iter().any(|(n, _)| *n == name) {
            continue;
        }
        let value = normalise(&name, req);
        out.push((name, value));
    }
    out
}

/// One request header's normalised value, `None` when absent.
pub fn normalise(name: &HeaderName, req: &HeaderMap) -> Option<String> {
    let mut items: Vec<String> = Vec::new();
    let mut any = false;
    for v in req.get_all(name) {
        any = true;
        let text = String::from_utf8_lossy(v.as_bytes());
        for item in split_list(&text) {
            let item = item
                .split([' ', '\t'])
                .filter(|s| !s.is_empty())
                .collect::<Vec<_>>()
                .join(" ")
                .replace(" ;", ";")
                .replace("; ", ";");
            items.push(item);
        }
    }
    if !any {
        return None;
    }
    let folded = [
        header::ACCEPT,
        header::ACCEPT_ENCODING,
        header::ACCEPT_LANGUAGE,
        header::ACCEPT_CHARSET,
    ];
    if folded.contains(name) {
        for i in &mut items {
            i.make_ascii_lowercase();
        }
    }
    if *name == header::ACCEPT_ENCODING {
        items.sort();
        items.dedup();
    }
    Some(items.join(","))
}

/// Whether the client's conditional request (`If-None-Match`, else `If-Modified-Since`) is
/// satisfied by the stored response, so a 304 answers it.
pub fn not_modified(req: &HeaderMap, stored: &HeaderMap) -> bool {
    let mut inm = req
        .get_all(IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(split_list)
        .peekable();
    if inm.peek().is_some() {
        let Some(etag) = stored.get(ETAG).and_then(|v| v.to_str().ok()) else {
            return false;
        };
        return inm.any(|t| t == "*" || weak_eq(t, etag));
    }
    let since = req
        .get(IF_MODIFIED_SINCE)
        .and_then(|v| parse_date(v.as_bytes()));
    let modified = stored
        .get(LAST_MODIFIED)
        .and_then(|v| parse_date(v.as_bytes()));
    matches!((since, modified), (Some(s), Some(m)) if m <= s)
}

/// RFC 9110 weak comparison: equal opaque tags, `W/` ignored.
fn weak_eq(a: &str, b: &str) -> bool {
    let strip = |t: &str| t.trim().trim_start_matches("W/").to_owned();
    strip(a) == strip(b)
}

/// The headers a 304 carries from the stored response (RFC 9110 15.4.5).
pub const NOT_MODIFIED_HEADERS: [HeaderName; 6] = [
    CACHE_CONTROL,
    header::CONTENT_LOCATION,
    DATE,
    ETAG,
    EXPIRES,
    VARY,
];

/// Headers a 304 must not change in the stored response when it refreshes it.
pub fn keeps_stored(name: &HeaderName) -> bool {
    matches!(
        *name,
        header::CONTENT_LENGTH | header::CONTENT_ENCODING | header::TRANSFER_ENCODING
    ) || name.as_str() == "x-cache"
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn h(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut m = HeaderMap::new();
        for (k, v) in pairs {
            m.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        m
    }

    fn check(resp: &[(&str, &str)]) -> Result<Freshness, Refusal> {
        let now = SystemTime::now();
        storable(
            &CacheSettings::default(),
            &HeaderMap::new(),
            false,
            StatusCode::OK,
            &h(resp),
            now,
            now,
        )
    }

    #[test]
    fn lifetime_prefers_s_maxage_then_max_age_then_expires() {
        let f = check(&[("cache-control", "max-age=10, s-maxage=20")]).unwrap();
        assert_eq!(f.lifetime, Duration::from_secs(20));
        let f = check(&[("cache-control", "max-age=10"), ("expires", "0")]).unwrap();
        assert_eq!(f.lifetime, Duration::from_secs(10));
        let f = check(&[
            ("date", "Sun, 06 Nov 1994 08:49:37 GMT"),
            ("expires", "Sun, 06 Nov 1994 08:50:37 GMT"),
            ("etag", "\"a\""),
        ])
        .unwrap();
        assert_eq!(f.lifetime, Duration::from_secs(60));
        assert!(check(&[("cache-control", "max-age=ten")]).is_err());
    }

    #[test]
    fn refusals() {
        assert!(check(&[("cache-control", "no-store, max-age=5")]).is_err());
        assert!(check(&[("cache-control", "private, max-age=5")]).is_err());
        assert!(check(&[("cache-control", "max-age=5"), ("vary", "Accept, *")]).is_err());
        assert!(check(&[("cache-control", "max-age=5"), ("set-cookie", "a=b")]).is_err());
        assert!(check(&[]).is_err(), "no freshness, no validator");
        assert!(check(&[("cache-control", "no-cache"), ("etag", "\"x\"")]).is_ok());
    }

    #[test]
    fn huge_values_do_not_overflow() {
        let f = check(&[
            (
                "cache-control",
                "max-age=99999999999999999999999, stale-if-error=18446744073709551615",
            ),
            ("age", "18446744073709551615"),
            ("etag", "\"x\""),
        ])
        .unwrap();
        assert_eq!(f.lifetime, Duration::from_secs(MAX_DELTA));
        assert!(f.initial_age >= Duration::from_secs(MAX_DELTA));
    }

    #[test]
    fn age_counts_the_age_header() {
        let f = check(&[("cache-control", "max-age=50"), ("age", "30")]).unwrap();
        assert!(f.initial_age >= Duration::from_secs(30));
    }

    #[test]
    fn vary_values_are_normalised() {
        let resp = h(&[("vary", "Accept-Encoding, accept-language")]);
        let a = vary_values(&resp, &h(&[("accept-encoding", "gzip,  br")]));
        let b = vary_values(&resp, &h(&[("accept-encoding", "BR , gzip")]));
        assert_eq!(a, b);
        let c = vary_values(&resp, &h(&[("accept-encoding", "gzip")]));
        assert_ne!(a, c);
    }

    #[test]
    fn conditionals() {
        let stored = h(&[
            ("etag", "\"v1\""),
            ("last-modified", "Sun, 06 Nov 1994 08:49:37 GMT"),
        ]);
        assert!(not_modified(&h(&[("if-none-match", "W/\"v1\"")]), &stored));
        assert!(!not_modified(&h(&[("if-none-match", "\"v2\"")]), &stored));
        assert!(not_modified(
            &h(&[("if-modified-since", "Sun, 06 Nov 1994 08:49:37 GMT")]),
            &stored
        ));
        assert!(!not_modified(
            &h(&[("if-modified-since", "Sun, 06 Nov 1994 08:49:36 GMT")]),
            &stored
        ));
        assert!(!not_modified(&HeaderMap::new(), &stored));
    }
}
