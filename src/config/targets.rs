//! Target lists (`["http://host:port", { url = .., weight = .. }]`) into a `StaticService`:
//! shared by `[discovery.static.services]` and routes with `targets`.

use http::uri::Scheme;

use super::problems::Problems;
use super::raw::RawTarget;
use crate::discovery::Discovered;
use crate::proxy::settings::StaticService;

/// Parses `http://host:port` into scheme and endpoint.
fn parse_target(
    check: &mut Problems,
    path: &str,
    target: &RawTarget,
) -> Option<((Scheme, bool), Discovered)> {
    let (url, weight) = match target {
        RawTarget::Url(u) => (u.as_str(), 1),
        RawTarget::Weighted { url, weight } => (url.as_str(), weight.unwrap_or(1)),
    };
    let weight = match u32::try_from(weight) {
        Ok(w) => w,
        Err(_) => {
            check.err(
                format!("{path}.weight"),
                format!("weight must be between 0 and {}, got {weight}", u32::MAX),
            );
            return None;
        }
    };
    let uri: http::Uri = match url.parse() {
        Ok(u) => u,
        Err(e) => {
            check.err(path, format!("invalid target URL {url:?}: {e}"));
            return None;
        }
    };
    let (scheme, h2c) = match uri.scheme_str() {
        Some("http") | Some("ws") => (Scheme::HTTP, false),
        Some("https") | Some("wss") => (Scheme::HTTPS, false),
        Some("h2c") => (Scheme::HTTP, true),
        Some(other) => {
            check.err(
                path,
                format!(
                    "target {url:?}: unknown scheme {other:?}; use http, https, ws, wss or h2c"
                ),
            );
            return None;
        }
        None => {
            check.err(
                path,
                format!("target {url:?} needs a scheme, e.g. \"http://{url}\""),
            );
            return None;
        }
    };
    let Some(host) = uri.host() else {
        check.err(path, format!("target {url:?} has no host"));
        return None;
    };
    if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
        check.err(
            path,
            format!("target {url:?} must not carry a path or query; use path_rewrite"),
        );
        return None;
    }
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let port = uri
        .port_u16()
        .unwrap_or(if scheme == Scheme::HTTPS { 443 } else { 80 });
    Some(((scheme, h2c), Discovered::new(host, port, weight)))
}

/// A static service may be empty (it answers 503 until changed at run time); route targets may not.
pub(super) fn parse_targets(
    check: &mut Problems,
    path: &str,
    targets: &[RawTarget],
    allow_empty: bool,
) -> Option<StaticService> {
    let mut scheme = None;
    let mut endpoints = Vec::new();
    for (i, t) in targets.iter().enumerate() {
        let tp = format!("{path}[{i}]");
        if let Some((s, d)) = parse_target(check, &tp, t) {
            if scheme.get_or_insert_with(|| s.clone()) != &s {
                check.err(tp, "all targets of one service must use the same scheme");
            }
            endpoints.push(d);
        }
    }
    if targets.is_empty() {
        if allow_empty {
            scheme = Some((Scheme::HTTP, false));
        } else {
            check.err(path, "needs at least one target");
        }
    }
    let (scheme, h2c) = scheme?;
    Some(StaticService {
        scheme,
        h2c,
        endpoints,
    })
}
