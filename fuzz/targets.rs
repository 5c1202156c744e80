//! Fuzz target bodies: each takes arbitrary bytes and must neither panic nor hang. Shared by the
//! cargo-fuzz binaries (fuzz_targets/) and tests/fuzz_corpus.rs, which replays the saved corpus.

use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::{Uri, Version};
use meshgate::config::{Config, Env};
use meshgate::discovery::consul::{
    excluded_instances, parse_tag_routes_with_warnings, to_discovered, HealthEntry, WarningMode,
};
use meshgate::rules::path::{
    normalise_path, remove_dot_segments, rewrite_path, EscapedSlashes, Rewrite,
};
use meshgate::rules::{head, headers};

/// Configuration loading and validation: any text either validates or yields errors.
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Err(e) = Config::from_toml(text, &Env::default()) {
        // Formatting the error walks every message and key path.
        let _ = e.to_string();
    }
}

/// Consul answer decoding: a health answer's JSON, normalised in every warning mode, and the
/// tag routes of every instance.
pub fn consul(data: &[u8]) {
    let Ok(entries) = serde_json::from_slice::<Vec<HealthEntry>>(data) else {
        return;
    };
    let required = ["web".to_owned()];
    for mode in [
        WarningMode::Include,
        WarningMode::Exclude,
        WarningMode::Degrade,
    ] {
        let _ = to_discovered(&entries, &mode, &[]);
        let _ = to_discovered(&entries, &mode, &required);
        let _ = excluded_instances(&entries, &mode, &required);
    }
    for e in &entries {
        let _ = parse_tag_routes_with_warnings(&e.service.service, &e.service.tags);
    }
}

/// Request-head rules applied on top of hyper (Host, framing headers, upgrades, hop-by-hop
/// removal): the input is read as a request head, `METHOD TARGET VERSION` on the first line and
/// `name: value` lines after it, built with the `http` crate's own checks.
pub fn request_head(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let mut lines = text.split("\r\n");
    let first = lines.next().unwrap_or_default();
    let mut parts = first.split(' ').skip(1);
    let Ok(uri) = parts.next().unwrap_or_default().parse::<Uri>() else {
        return;
    };
    let version = match parts.next() {
        Some("HTTP/1.0") => Version::HTTP_10,
        Some("HTTP/2") => Version::HTTP_2,
        _ => Version::HTTP_11,
    };
    let mut map = HeaderMap::new();
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_bytes(value.trim().as_bytes()),
        ) else {
            continue;
        };
        map.append(name, value);
    }
    if let Ok(Some(host)) = head::validate(version, &uri, &map) {
        assert!(
            head::is_valid_host(host.as_bytes()),
            "validated an invalid host {host:?}"
        );
    }
    for websocket in [false, true] {
        let mut h = map.clone();
        let relayed = head::filter_upgrade(version, &mut h, websocket);
        assert!(!h.contains_key("http2-settings"));
        let upgrade: Vec<_> = h.get_all(http::header::UPGRADE).iter().collect();
        assert!(
            upgrade.is_empty() || (relayed && upgrade == ["websocket"]),
            "an upgrade other than websocket survives: {upgrade:?}"
        );
    }
    let mut h = map.clone();
    let named: Vec<String> = h
        .get_all(http::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .collect();
    headers::remove_hop_by_hop(&mut h);
    for name in named {
        if name == "te" {
            continue;
        }
        if let Ok(name) = HeaderName::from_bytes(name.as_bytes()) {
            assert!(
                !h.contains_key(&name),
                "{name} named in Connection survives"
            );
        }
    }
    for te in h.get_all(http::header::TE) {
        assert_eq!(te, "trailers");
    }
    let _ = head::parse_content_length(data);
}

/// Path normalisation and rewriting. Checked beyond "no panic": in `unescape` mode the result
/// holds no escaped separator and no dot segment, merging leaves no `//`, and normalising
/// twice changes nothing.
pub fn path(data: &[u8]) {
    let Ok(raw) = std::str::from_utf8(data) else {
        return;
    };
    let _ = remove_dot_segments(raw);
    for mode in [
        EscapedSlashes::Keep,
        EscapedSlashes::Reject,
        EscapedSlashes::Unescape,
    ] {
        for merge in [false, true] {
            let Ok(once) = normalise_path(raw, mode, merge) else {
                continue;
            };
            let twice = normalise_path(&once, mode, merge).expect("a normalised path stays valid");
            assert_eq!(once, twice, "normalising {raw:?} twice differs");
            if mode == EscapedSlashes::Unescape {
                let lower = once.to_ascii_lowercase();
                assert!(!lower.contains("%2f") && !lower.contains("%5c") && !once.contains('\\'));
                assert!(
                    remove_dot_segments(&once).is_none(),
                    "{once:?} has dot segments"
                );
            }
            if merge {
                assert!(!once.contains("//"), "{once:?} has //");
            }
            let chain = [
                Rewrite::StripPrefix("/api".into()),
                Rewrite::AddPrefix("/v1".into()),
                Rewrite::ReplacePrefix {
                    from: "/v1/a".into(),
                    to: "/".into(),
                },
            ];
            let _ = rewrite_path(&once, &chain);
        }
    }
}
