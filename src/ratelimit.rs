//! Rate limits (GCRA): validated settings, the request key, and a limiter that decides in
//! process (`local`) or in Redis (`global`) with a local fallback when the store fails.

pub mod client_ip;
pub mod decision;
pub mod local;
pub mod store;

use std::hash::Hasher;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderMap, HeaderName, HeaderValue};

pub use client_ip::TrustedProxies;
pub use decision::{Decision, OnStoreError, Via};
pub use local::Buckets;
pub use store::{RedisSettings, RedisStore, StoreError};

/// A rate: `count` requests per `per`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    /// Requests.
    pub count: u64,
    /// Per this much time (1 s, 1 min or 1 h).
    pub per: Duration,
}

impl Rate {
    /// Parses `100/s`, `20/m`, `1000/h`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let bad = || {
            format!("invalid rate {text:?}; expected COUNT/s, COUNT/m or COUNT/h such as \"100/s\"")
        };
        let (count, unit) = text.trim().split_once('/').ok_or_else(bad)?;
        let count: u64 = count.trim().parse().map_err(|_| bad())?;
        let per = match unit.trim() {
            "s" => Duration::from_secs(1),
            "m" => Duration::from_secs(60),
            "h" => Duration::from_secs(3600),
            _ => return Err(bad()),
        };
        if count == 0 {
            return Err(format!(
                "rate {text:?} admits nothing; the count must be at least 1"
            ));
        }
        let rate = Self { count, per };
        // Redis keeps times in microseconds: one request per microsecond is the finest step.
        if rate.interval_us() == 0 {
            return Err(format!("rate {text:?} is above the limit of 1000000/s"));
        }
        Ok(rate)
    }

    /// The time one request uses up (GCRA's emission interval), in nanoseconds.
    pub fn interval_ns(&self) -> u64 {
        (self.per.as_nanos() / u128::from(self.count)) as u64
    }

    /// The emission interval in microseconds (Redis's unit).
    pub fn interval_us(&self) -> u64 {
        (self.per.as_micros() / u128::from(self.count)) as u64
    }

    /// The requests in one second of this rate, rounded up (the default `burst`).
    pub fn per_second_ceil(&self) -> u64 {
        self.count.div_ceil(self.per.as_secs().max(1)).max(1)
    }
}

/// One part of a rate-limit key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyPart {
    /// The client address (after `server.trusted_proxies`).
    ClientIp,
    /// The route's name: one bucket per route.
    Route,
    /// A request header's value.
    Header(HeaderName),
    /// A claim of the JWT the authentication stage verified.
    JwtClaim(String),
    /// The name of the API key the authentication stage accepted.
    ApiKey,
}

impl KeyPart {
    /// Parses one `key` entry.
    pub fn parse(text: &str) -> Result<Self, String> {
        match text {
            "client_ip" => Ok(Self::ClientIp),
            "route" => Ok(Self::Route),
            "api_key" => Ok(Self::ApiKey),
            _ => {
                if let Some(h) = text.strip_prefix("header:") {
                    HeaderName::try_from(h.trim())
                        .map(Self::Header)
                        .map_err(|_| format!("invalid header name {h:?} in key {text:?}"))
                } else if let Some(c) = text.strip_prefix("jwt:") {
                    if c.is_empty() {
                        Err("key \"jwt:\" needs a claim name such as \"jwt:sub\"".into())
                    } else {
                        Ok(Self::JwtClaim(c.to_owned()))
                    }
                } else {
                    Err(format!(
                        "unknown key {text:?}; use client_ip, route, header:NAME, jwt:CLAIM or api_key"
                    ))
                }
            }
        }
    }
}

/// Where buckets live.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// In this process.
    Local,
    /// In Redis, shared by every gateway using it.
    Global,
}

/// Default `max_keys`: buckets one limiter keeps (about 40 bytes each, ~4 MiB at the cap).
pub const DEFAULT_MAX_KEYS: usize = 100_000;

/// One validated `rate_limit`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateLimitSettings {
    /// The name in `RateLimit-Policy`, Redis keys and logs: the named policy, or the route.
    pub name: Arc<str>,
    /// From a named policy (shared by its routes) rather than inline.
    pub shared: bool,
    /// Steady rate.
    pub rate: Rate,
    /// Requests a full bucket admits at once.
    pub burst: u64,
    /// The key's parts; requests with equal parts share a bucket.
    pub key: Vec<KeyPart>,
    /// Refuse requests lacking a key part with 400 instead of sharing one bucket.
    pub required: bool,
    /// Local or global.
    pub scope: Scope,
    /// Global scope: what to do when Redis fails.
    pub on_store_error: OnStoreError,
    /// Global scope: gateway replicas, dividing the local fallback's rate.
    pub replicas: u32,
    /// Informational headers on allowed responses.
    pub headers: bool,
    /// Most buckets kept in this process.
    pub max_keys: usize,
}

/// The request facts a key is made of.
pub struct KeySource<'a> {
    /// Client address.
    pub client: IpAddr,
    /// Route name.
    pub route: &'a str,
    /// Request headers.
    pub headers: &'a HeaderMap,
    /// Verified JWT claims, when the authentication stage ran.
    pub jwt_claims: Option<&'a serde_json::Map<String, serde_json::Value>>,
    /// The accepted API key's name, when the authentication stage ran.
    pub api_key: Option<&'a str>,
}

/// A limiter: one per inline `rate_limit`, one per named policy (shared by its routes).
pub struct RateLimiter {
    settings: RateLimitSettings,
    /// The buckets for `local` scope; for `global`, the fallback at `rate / replicas`.
    local: Buckets,
    store: Option<Arc<RedisStore>>,
    /// Redis key prefix, `meshgate:rl:p:<policy>:` or `meshgate:rl:r:<route>:`.
    prefix: Vec<u8>,
    policy: HeaderValue,
    /// `"name";r=`: the start of every `RateLimit` value, quoted once.
    state_prefix: Vec<u8>,
    hasher: std::collections::hash_map::RandomState,
    last_store_log_ms: AtomicU64,
    /// Store errors since start.
    pub store_errors: AtomicU64,
}

impl std::fmt::Debug for RateLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimiter")
            .field("name", &self.settings.name)
            .finish()
    }
}

impl RateLimiter {
    /// A limiter for `settings`; `store` is required for the global scope (without it the
    /// limiter behaves as if Redis failed).
    pub fn new(settings: RateLimitSettings, store: Option<Arc<RedisStore>>) -> Self {
        let local = match settings.scope {
            Scope::Local => Buckets::new(
                settings.rate.interval_ns(),
                settings.burst,
                settings.max_keys,
            ),
            Scope::Global => {
                let n = u64::from(settings.replicas.max(1));
                Buckets::new(
                    settings.rate.interval_ns().saturating_mul(n),
                    (settings.burst / n).max(1),
                    settings.max_keys,
                )
            }
        };
        let policy = policy_header(&settings);
        let mut state_prefix = quoted_name(&settings).into_bytes();
        state_prefix.extend_from_slice(b";r=");
        // Named policies and routes have separate namespaces, as they have locally: a route
        // named like a policy must not share its buckets.
        let mut prefix = match settings.shared {
            true => b"meshgate:rl:p:".to_vec(),
            false => b"meshgate:rl:r:".to_vec(),
        };
        prefix.extend_from_slice(settings.name.as_bytes());
        prefix.push(b':');
        Self {
            local,
            store,
            prefix,
            policy,
            state_prefix,
            hasher: Default::default(),
            last_store_log_ms: AtomicU64::new(0),
            store_errors: AtomicU64::new(0),
            settings,
        }
    }

    /// The settings.
    pub fn settings(&self) -> &RateLimitSettings {
        &self.settings
    }

    /// The Redis store of a global limit.
    pub fn store(&self) -> Option<&Arc<RedisStore>> {
        self.store.as_ref()
    }

    /// Keys held in process now.
    pub fn local_keys(&self) -> usize {
        self.local.len()
    }

    /// `RateLimit-Policy` for this limit.
    pub fn policy_header(&self) -> &HeaderValue {
        &self.policy
    }

    /// Decides locally (the `local` scope). `None` when a key part is missing and `required`.
    /// Allocates nothing: the key is hashed as it is read.
    pub fn check_local(&self, src: &KeySource<'_>) -> Option<Decision> {
        let mut h = std::hash::BuildHasher::build_hasher(&self.hasher);
        if !visit_key(&self.settings.key, src, |b| h.write(b)) && self.settings.required {
            return None;
        }
        Some(self.local.check(h.finish(), local::now_ns()))
    }

    /// What a local limit keyed by `route` alone would decide for the next request on
    /// `route`, without charging it (for `/explain`); `None` for other keys and scopes.
    pub fn peek_route(&self, route: &str) -> Option<Decision> {
        if self.settings.scope != Scope::Local || self.settings.key != [KeyPart::Route] {
            return None;
        }
        let headers = HeaderMap::new();
        let src = KeySource {
            client: IpAddr::from([0, 0, 0, 0]),
            route,
            headers: &headers,
            jwt_claims: None,
            api_key: None,
        };
        let mut h = std::hash::BuildHasher::build_hasher(&self.hasher);
        visit_key(&self.settings.key, &src, |b| h.write(b));
        Some(self.local.peek(h.finish(), local::now_ns()))
    }

    /// A summary for `/status` and `/explain`.
    pub fn describe(&self) -> serde_json::Value {
        let s = &self.settings;
        let key: Vec<String> = s
            .key
            .iter()
            .map(|k| match k {
                KeyPart::ClientIp => "client_ip".to_owned(),
                KeyPart::Route => "route".to_owned(),
                KeyPart::Header(h) => format!("header:{h}"),
                KeyPart::JwtClaim(c) => format!("jwt:{c}"),
                KeyPart::ApiKey => "api_key".to_owned(),
            })
            .collect();
        let per = match s.rate.per.as_secs() {
            1 => "s",
            60 => "m",
            _ => "h",
        };
        serde_json::json!({
            "name": &*s.name,
            "policy": s.shared,
            "rate": format!("{}/{per}", s.rate.count),
            "burst": s.burst,
            "key": key,
            "required": s.required,
            "scope": match s.scope { Scope::Local => "local", Scope::Global => "global" },
            "on_store_error": match s.on_store_error {
                OnStoreError::Local => "local",
                OnStoreError::Allow => "allow",
                OnStoreError::Deny => "deny",
            },
            "replicas": s.replicas,
            "headers": s.headers,
            "max_keys": s.max_keys,
            "keys_held": self.local.len(),
            "store_errors": self.store_errors.load(Ordering::Relaxed),
        })
    }

    /// The Redis key of a request (the global scope). `None` when a key part is missing and
    /// `required`. Parts longer than [`MAX_RAW_KEY`] in all (a header or claim the client
    /// chose) are stored as their SHA-256, so no client can make Redis hold large keys.
    pub fn global_key(&self, src: &KeySource<'_>) -> Option<Vec<u8>> {
        let mut key = self.prefix.clone();
        if !visit_key(&self.settings.key, src, |b| key.extend_from_slice(b))
            && self.settings.required
        {
            return None;
        }
        if key.len() - self.prefix.len() > MAX_RAW_KEY {
            let digest = ring::digest::digest(&ring::digest::SHA256, &key[self.prefix.len()..]);
            key.truncate(self.prefix.len());
            key.push(b'#');
            key.extend_from_slice(digest.as_ref());
        }
        Some(key)
    }

    /// Decides in Redis (the global scope); on a store failure `on_store_error` decides.
    pub async fn check_global(&self, key: &[u8]) -> Decision {
        let err = match &self.store {
            Some(store) => {
                let r = self.settings.rate;
                match store.gcra(key, r.interval_us(), self.settings.burst).await {
                    Ok(d) => return d,
                    Err(e) => e,
                }
            }
            None => StoreError::NotConfigured,
        };
        self.store_errors.fetch_add(1, Ordering::Relaxed);
        let mode = self.settings.on_store_error;
        self.log_store_error(&err, mode);
        match mode {
            OnStoreError::Local => {
                let mut h = std::hash::BuildHasher::build_hasher(&self.hasher);
                h.write(key);
                let mut d = self.local.check(h.finish(), local::now_ns());
                d.via = Via::StoreError(mode);
                d
            }
            OnStoreError::Allow | OnStoreError::Deny => Decision {
                allowed: mode == OnStoreError::Allow,
                remaining: 0,
                reset: Duration::ZERO,
                retry_after: if mode == OnStoreError::Deny {
                    Duration::from_secs(1)
                } else {
                    Duration::ZERO
                },
                via: Via::StoreError(mode),
            },
        }
    }

    /// Once a minute per limiter: every request repeats the failure while Redis is down.
    fn log_store_error(&self, err: &StoreError, mode: OnStoreError) {
        let now = crate::clock::now_ms();
        let last = self.last_store_log_ms.load(Ordering::Relaxed);
        if (last == 0 || now.saturating_sub(last) >= 60_000)
            && self
                .last_store_log_ms
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            let mode = match mode {
                OnStoreError::Local => "local",
                OnStoreError::Allow => "allow",
                OnStoreError::Deny => "deny",
            };
            tracing::warn!(
                rate_limit = %self.settings.name,
                error = %crate::error::Chain(err),
                on_store_error = mode,
                errors = self.store_errors.load(Ordering::Relaxed),
                "rate limit store failed; on_store_error decides (logged once a minute)"
            );
        }
    }
}

/// The longest key (after the prefix) stored in Redis as it is; longer ones are hashed.
pub const MAX_RAW_KEY: usize = 64;

/// The limit's name as a structured-field string: `"name"`, keeping visible ASCII and spaces
/// other than `"` and `\\`.
fn quoted_name(s: &RateLimitSettings) -> String {
    let mut out = String::with_capacity(s.name.len() + 2);
    out.push('"');
    out.extend(
        s.name
            .chars()
            .filter(|c| c.is_ascii_graphic() && *c != '"' && *c != '\\' || *c == ' '),
    );
    out.push('"');
    out
}

/// `"name";q=COUNT;w=SECONDS` (draft-ietf-httpapi-ratelimit-headers-10).
fn policy_header(s: &RateLimitSettings) -> HeaderValue {
    let v = format!(
        "{};q={};w={}",
        quoted_name(s),
        s.rate.count,
        s.rate.per.as_secs()
    );
    HeaderValue::from_str(&v).unwrap_or_else(|_| HeaderValue::from_static("\"default\""))
}

impl RateLimiter {
    /// `RateLimit: "name";r=REMAINING;t=SECONDS` for a decision: one allocation, since it is
    /// on every admitted response (the name was quoted when the limiter was built).
    pub fn state_header(&self, d: &Decision) -> HeaderValue {
        let mut remaining = itoa::Buffer::new();
        let mut reset = itoa::Buffer::new();
        let (r, t) = (
            remaining.format(d.remaining),
            reset.format(ceil_secs(d.reset)),
        );
        let mut v = bytes::BytesMut::with_capacity(self.state_prefix.len() + r.len() + 3 + t.len());
        v.extend_from_slice(&self.state_prefix);
        v.extend_from_slice(r.as_bytes());
        v.extend_from_slice(b";t=");
        v.extend_from_slice(t.as_bytes());
        // Always valid: the prefix is visible ASCII and the rest digits.
        HeaderValue::from_maybe_shared(v.freeze())
            .unwrap_or_else(|_| HeaderValue::from_static("\"default\""))
    }
}

/// Whole seconds, rounded up (Retry-After and `t` are integers).
pub fn ceil_secs(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

/// Feeds the key's parts to `out`, each length-prefixed so no two keys run together; a
/// missing part feeds a marker (one shared bucket). False when a part was missing.
fn visit_key(parts: &[KeyPart], src: &KeySource<'_>, mut out: impl FnMut(&[u8])) -> bool {
    let mut complete = true;
    let mut part = |bytes: Option<&[u8]>, out: &mut dyn FnMut(&[u8])| match bytes {
        Some(b) => {
            out(&(b.len() as u32).to_le_bytes());
            out(b);
        }
        None => {
            complete = false;
            out(&u32::MAX.to_le_bytes());
        }
    };
    for p in parts {
        match p {
            KeyPart::ClientIp => match src.client {
                IpAddr::V4(v4) => part(Some(&v4.octets()), &mut out),
                IpAddr::V6(v6) => part(Some(&v6.octets()), &mut out),
            },
            KeyPart::Route => part(Some(src.route.as_bytes()), &mut out),
            KeyPart::Header(name) => part(src.headers.get(name).map(|v| v.as_bytes()), &mut out),
            KeyPart::ApiKey => part(src.api_key.map(str::as_bytes), &mut out),
            KeyPart::JwtClaim(claim) => match src.jwt_claims.and_then(|c| c.get(claim)) {
                Some(serde_json::Value::String(s)) => part(Some(s.as_bytes()), &mut out),
                Some(serde_json::Value::Null) | None => part(None, &mut out),
                Some(other) => part(Some(other.to_string().as_bytes()), &mut out),
            },
        }
    }
    complete
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_quote_the_name_once_and_carry_the_numbers() {
        let limiter = RateLimiter::new(
            RateLimitSettings {
                name: "team \"a\"\\x\u{e9}".into(),
                shared: false,
                rate: Rate::parse("100/s").unwrap(),
                burst: 50,
                key: vec![KeyPart::Route],
                required: false,
                scope: Scope::Local,
                on_store_error: OnStoreError::Local,
                replicas: 1,
                headers: true,
                max_keys: 64,
            },
            None,
        );
        assert_eq!(limiter.policy_header(), "\"team ax\";q=100;w=1");
        let d = Decision {
            allowed: true,
            remaining: 49,
            reset: Duration::from_millis(10_001),
            retry_after: Duration::ZERO,
            via: Via::Local,
        };
        assert_eq!(limiter.state_header(&d), "\"team ax\";r=49;t=11");
        let d = Decision {
            remaining: 0,
            reset: Duration::ZERO,
            ..d
        };
        assert_eq!(limiter.state_header(&d), "\"team ax\";r=0;t=0");
    }

    #[test]
    fn rates_parse() {
        let r = Rate::parse("3/m").unwrap();
        assert_eq!(r.interval_ns(), 20_000_000_000);
        assert_eq!(r.per_second_ceil(), 1);
        assert_eq!(Rate::parse("100/s").unwrap().per_second_ceil(), 100);
        for bad in ["", "3", "0/s", "x/s", "3/d", "2000000/s", "-1/s"] {
            assert!(Rate::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn keys_parse() {
        assert_eq!(KeyPart::parse("client_ip").unwrap(), KeyPart::ClientIp);
        assert_eq!(
            KeyPart::parse("header:X-Tenant").unwrap(),
            KeyPart::Header(HeaderName::from_static("x-tenant"))
        );
        assert!(KeyPart::parse("header:bad name").is_err());
        assert!(KeyPart::parse("jwt:").is_err());
        assert!(KeyPart::parse("cookie").is_err());
    }

    #[test]
    fn parts_do_not_run_together() {
        let headers = HeaderMap::new();
        let src = |route: &'static str| KeySource {
            client: IpAddr::from([10, 0, 0, 1]),
            route,
            headers: &headers,
            jwt_claims: None,
            api_key: None,
        };
        let mut a = Vec::new();
        let mut b = Vec::new();
        let parts = [
            KeyPart::Route,
            KeyPart::Header(HeaderName::from_static("x-a")),
        ];
        assert!(!visit_key(&parts, &src("ab"), |x| a.extend_from_slice(x)));
        assert!(!visit_key(&parts, &src("a"), |x| b.extend_from_slice(x)));
        assert_ne!(a, b);
    }

    #[test]
    fn identity_parts_from_the_authentication_stage() {
        let headers = HeaderMap::new();
        let claims: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(r#"{"sub": "alice", "tier": 3, "gone": null}"#).unwrap();
        let key = |parts: &[KeyPart], claims: Option<&serde_json::Map<_, _>>, api: Option<&str>| {
            let src = KeySource {
                client: IpAddr::from([10, 0, 0, 1]),
                route: "r",
                headers: &headers,
                jwt_claims: claims,
                api_key: api,
            };
            let mut out = Vec::new();
            let complete = visit_key(parts, &src, |b| out.extend_from_slice(b));
            (complete, out)
        };
        let sub = [KeyPart::JwtClaim("sub".into())];
        let tier = [KeyPart::JwtClaim("tier".into())];
        let gone = [KeyPart::JwtClaim("gone".into())];
        assert_eq!(
            key(&sub, Some(&claims), None),
            (true, [&5u32.to_le_bytes()[..], b"alice"].concat())
        );
        assert_eq!(
            key(&tier, Some(&claims), None).1,
            [&1u32.to_le_bytes()[..], b"3"].concat()
        );
        // A null claim, or no token at all, is a missing part: one shared bucket.
        assert_eq!(key(&gone, Some(&claims), None), key(&sub, None, None));
        assert!(!key(&gone, Some(&claims), None).0);
        let api = [KeyPart::ApiKey];
        assert_eq!(
            key(&api, None, Some("team-a")),
            (true, [&6u32.to_le_bytes()[..], b"team-a"].concat())
        );
        assert!(!key(&api, None, None).0);
    }
}
