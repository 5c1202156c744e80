//! `cache = { ... }` on a route: validation of the raw table (`raw::RawCache`) into
//! `CacheSettings`, reusable for a named policy's `cache`.

use std::ops::RangeInclusive;
use std::time::Duration;

use super::problems::Problems;
use super::raw::RawCache;
use crate::cache::{CacheSettings, KeyPart};
use crate::limits;

/// Bytes a route's store may hold: 1 KiB to 64 GiB.
const MAX_SIZE: RangeInclusive<u64> = 1024..=64 << 30;

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
