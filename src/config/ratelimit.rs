//! `rate_limit = { ... }` (on a route or in a named policy) and `[redis]`: validation of their
//! raw types (`ratelimit/raw.rs`, apart so `raw.rs` can hold them) into the limiter's settings.

pub mod raw;

pub use raw::{RawKey, RawRateLimit, RawRedis};

use std::sync::Arc;

use super::problems::Problems;
use crate::limits;
use crate::ratelimit::{
    KeyPart, OnStoreError, Rate, RateLimitSettings, RedisSettings, Scope, DEFAULT_MAX_KEYS,
};

/// `[redis]`, checked.
pub(in crate::config) fn redis(c: &mut Problems, raw: &RawRedis) -> Option<RedisSettings> {
    c.unknown("redis", &raw.unknown);
    let timeout = c.duration_in(
        "redis.timeout",
        &raw.timeout,
        std::time::Duration::from_millis(1)..=std::time::Duration::from_secs(10),
    );
    let pool_size = c.count_in("redis.pool_size", raw.pool_size, 1..=64);
    let Some(url) = raw.url.clone() else {
        c.err(
            "redis.url",
            "missing; give the store's address such as \"redis://127.0.0.1:6379\"",
        );
        return None;
    };
    if !(url.starts_with("redis://") || url.starts_with("rediss://")) {
        c.err(
            "redis.url",
            format!(
                "invalid URL {:?}; expected redis://HOST:PORT or rediss://HOST:PORT",
                crate::error::redact_url(&url)
            ),
        );
        return None;
    }
    if let Err(e) = redis::IntoConnectionInfo::into_connection_info(url.as_str()) {
        c.err(
            "redis.url",
            format!("invalid URL {:?}: {e}", crate::error::redact_url(&url)),
        );
        return None;
    }
    let ca_pem = raw.ca_file.as_ref().and_then(|path| {
        if !url.starts_with("rediss://") {
            c.err(
                "redis.ca_file",
                "only used with a rediss:// url (TLS); remove it or use rediss://",
            );
            return None;
        }
        match std::fs::read(path) {
            Ok(pem) if pem.windows(27).any(|w| w == b"-----BEGIN CERTIFICATE-----") => Some(pem),
            Ok(_) => {
                c.err(
                    "redis.ca_file",
                    format!("{}: no PEM certificate in it", path.display()),
                );
                None
            }
            Err(e) => {
                c.err("redis.ca_file", format!("{}: {e}", path.display()));
                None
            }
        }
    });
    Some(RedisSettings {
        url,
        username: raw.username.clone(),
        password: raw.password.clone(),
        pool_size,
        timeout,
        ca_pem,
    })
}

/// One `rate_limit` at key path `at`, named `name` (its route, or its policy when `shared`).
/// `redis` says whether `[redis]` is configured (the global scope needs it).
pub(in crate::config) fn rate_limit(
    c: &mut Problems,
    at: &str,
    raw: &RawRateLimit,
    name: &str,
    shared: bool,
    redis: bool,
) -> Option<RateLimitSettings> {
    c.unknown(at, &raw.unknown);
    let rate = match raw.rate.as_deref() {
        None => {
            c.err(
                format!("{at}.rate"),
                "missing; give a rate such as \"100/s\", \"20/m\" or \"1000/h\"",
            );
            None
        }
        Some(text) => Rate::parse(text)
            .map_err(|e| c.err(format!("{at}.rate"), e))
            .ok(),
    };
    let burst = raw
        .burst
        .map(|b| c.count_in(&format!("{at}.burst"), b, 1..=limits::MAX_COUNT) as u64);
    let texts: Vec<String> = match &raw.key {
        None => vec!["client_ip".into()],
        Some(RawKey::One(k)) => vec![k.clone()],
        Some(RawKey::Many(ks)) => ks.clone(),
    };
    if texts.is_empty() {
        c.err(
            format!("{at}.key"),
            "empty list; give at least one key part such as \"client_ip\"",
        );
    }
    let key: Vec<KeyPart> = texts
        .iter()
        .enumerate()
        .filter_map(|(i, t)| {
            let path = match &raw.key {
                Some(RawKey::Many(_)) => format!("{at}.key[{i}]"),
                _ => format!("{at}.key"),
            };
            KeyPart::parse(t.trim()).map_err(|e| c.err(path, e)).ok()
        })
        .collect();
    let scope = match raw.scope.as_deref().unwrap_or("local") {
        "local" => Scope::Local,
        "global" => {
            if !redis {
                c.err(
                    format!("{at}.scope"),
                    "\"global\" needs a [redis] section with the store's url",
                );
            }
            Scope::Global
        }
        other => {
            c.err(
                format!("{at}.scope"),
                format!("unknown scope {other:?}; expected \"local\" or \"global\""),
            );
            Scope::Local
        }
    };
    let on_store_error = match raw.on_store_error.as_deref().unwrap_or("local") {
        "local" => OnStoreError::Local,
        "allow" => OnStoreError::Allow,
        "deny" => OnStoreError::Deny,
        other => {
            c.err(
                format!("{at}.on_store_error"),
                format!("unknown choice {other:?}; expected \"local\", \"allow\" or \"deny\""),
            );
            OnStoreError::Local
        }
    };
    let replicas = raw.replicas.map_or(1, |n| {
        c.count_in(&format!("{at}.replicas"), n, 1..=10_000) as u32
    });
    let max_keys = raw.max_keys.map_or(DEFAULT_MAX_KEYS, |n| {
        c.count_in(&format!("{at}.max_keys"), n, 64..=10_000_000)
    });
    let rate = rate?;
    if key.len() != texts.len() || texts.is_empty() {
        return None;
    }
    Some(RateLimitSettings {
        name: Arc::from(name),
        shared,
        rate,
        burst: burst.unwrap_or_else(|| rate.per_second_ceil()),
        key,
        required: raw.required,
        scope,
        on_store_error,
        replicas,
        headers: raw.headers.unwrap_or(true),
        max_keys,
    })
}
