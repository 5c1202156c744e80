//! `cache = { ... }` on a route: the raw table and its validation into `CacheSettings`
//! (reusable for a named policy's `cache`).

use std::ops::RangeInclusive;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::problems::Problems;
use super::raw::{RawSize, Unknown};
use crate::cache::{CacheSettings, KeyPart};
use crate::limits;

/// Bytes a route's store may hold: 1 KiB to 64 GiB.
const MAX_SIZE: RangeInclusive<u64> = 1024..=64 << 30;

/// `cache = { ... }`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct RawCache {
    /// Bytes the route's store may hold. Default `256MiB`.
    pub max_size: RawSize,
    /// Larger answers stream through uncached. Default `8MiB`.
    pub max_object_size: RawSize,
    /// Freshness for cacheable answers without their own. Default `0s` (not stored).
    pub default_ttl: String,
    /// Key parts: `method`, `host`, `path`, `query`, `header:NAME`.
    pub key: Vec<String>,
    /// Serve stale while one request revalidates. Default `0s`.
    pub stale_while_revalidate: String,
    /// Serve stale when the upstream fails. Default `0s`.
    pub stale_if_error: String,
    /// Store answers that set cookies. Default false.
    pub cache_set_cookie: bool,
    /// How long concurrent misses wait for the one request sent upstream. Default `5s`.
    pub lock_timeout: String,
    /// Keys the model does not know; each is reported by `validate`.
    #[serde(flatten, skip_serializing)]
    pub unknown: Unknown,
}

impl Default for RawCache {
    fn default() -> Self {
        Self {
            max_size: RawSize::Text("256MiB".into()),
            max_object_size: RawSize::Text("8MiB".into()),
            default_ttl: "0s".into(),
            key: ["method", "host", "path", "query"].map(String::from).into(),
            stale_while_revalidate: "0s".into(),
            stale_if_error: "0s".into(),
            cache_set_cookie: false,
            lock_timeout: "5s".into(),
            unknown: Unknown::new(),
        }
    }
}

/// Validates `raw` found at `at` (e.g. `routes[2].cache`); `None` when a value is wrong (each
/// problem is recorded with its key path).
pub fn cache(c: &mut Problems, at: &str, raw: &RawCache) -> Option<CacheSettings> {
    let before = c.problems.len();
    c.unknown(at, &raw.unknown);
    let max_size = c.size_in(&format!("{at}.max_size"), &raw.max_size, MAX_SIZE);
    let max_object_size = c.size_in(
        &format!("{at}.max_object_size"),
        &raw.max_object_size,
        1..=*MAX_SIZE.end(),
    );
    if max_object_size > max_size {
        c.err(
            format!("{at}.max_object_size"),
            "must not exceed max_size (one answer cannot be larger than the whole store)",
        );
    }
    let default_ttl = c.duration(&format!("{at}.default_ttl"), &raw.default_ttl);
    let stale_while_revalidate = c.duration(
        &format!("{at}.stale_while_revalidate"),
        &raw.stale_while_revalidate,
    );
    let stale_if_error = c.duration(&format!("{at}.stale_if_error"), &raw.stale_if_error);
    let lock_timeout = c.duration_in(
        &format!("{at}.lock_timeout"),
        &raw.lock_timeout,
        Duration::from_millis(1)..=limits::MAX_DURATION,
    );
    let mut key = Vec::new();
    if raw.key.is_empty() {
        c.err(
            format!("{at}.key"),
            "must name at least one part: method, host, path, query, header:NAME",
        );
    }
    for (i, part) in raw.key.iter().enumerate() {
        match KeyPart::parse(part) {
            Ok(p) if key.contains(&p) => c.err(format!("{at}.key[{i}]"), "named twice"),
            Ok(p) => key.push(p),
            Err(m) => c.err(format!("{at}.key[{i}]"), m),
        }
    }
    (c.problems.len() == before).then_some(CacheSettings {
        max_size,
        max_object_size,
        default_ttl,
        key,
        stale_while_revalidate,
        stale_if_error,
        cache_set_cookie: raw.cache_set_cookie,
        lock_timeout,
    })
}
