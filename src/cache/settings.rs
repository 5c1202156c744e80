//! A route's validated `cache` settings and the parts its key is made of.

use std::time::Duration;

use http::header::HeaderName;

/// One part of the cache key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyPart {
    /// The method (HEAD is looked up as GET).
    Method,
    /// The request's host, lowercased.
    Host,
    /// The normalised path.
    Path,
    /// The raw query string.
    Query,
    /// A request header's normalised value (`header:NAME`).
    Header(HeaderName),
}

impl KeyPart {
    /// `method`, `host`, `path`, `query` or `header:NAME`.
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "method" => Ok(Self::Method),
            "host" => Ok(Self::Host),
            "path" => Ok(Self::Path),
            "query" => Ok(Self::Query),
            _ => match s.strip_prefix("header:") {
                Some(name) => HeaderName::from_bytes(name.trim().as_bytes())
                    .map(Self::Header)
                    .map_err(|_| format!("invalid header name {name:?}")),
                None => Err(format!(
                    "unknown key part {s:?}; expected method, host, path, query or header:NAME"
                )),
            },
        }
    }
}

/// A route's `cache` settings, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheSettings {
    /// Bytes the route's store may hold (bodies, headers and keys).
    pub max_size: u64,
    /// Larger answers stream through uncached.
    pub max_object_size: u64,
    /// Freshness for cacheable answers that give none of their own.
    pub default_ttl: Duration,
    /// What identifies a stored answer.
    pub key: Vec<KeyPart>,
    /// How long past freshness a stored answer is served while one request revalidates it,
    /// unless the answer says otherwise.
    pub stale_while_revalidate: Duration,
    /// How long past freshness a stored answer is served when the upstream fails.
    pub stale_if_error: Duration,
    /// Store answers that set cookies.
    pub cache_set_cookie: bool,
    /// How long concurrent misses wait for the one request sent upstream for them.
    pub lock_timeout: Duration,
}

impl Default for CacheSettings {
    fn default() -> Self {
        Self {
            max_size: 256 << 20,
            max_object_size: 8 << 20,
            default_ttl: Duration::ZERO,
            key: vec![
                KeyPart::Method,
                KeyPart::Host,
                KeyPart::Path,
                KeyPart::Query,
            ],
            stale_while_revalidate: Duration::ZERO,
            stale_if_error: Duration::ZERO,
            cache_set_cookie: false,
            lock_timeout: Duration::from_secs(5),
        }
    }
}
