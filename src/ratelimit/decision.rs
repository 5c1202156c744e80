//! What a rate limit decided and who decided it: plain data shared by the local buckets, the
//! Redis store and the limiter.

use std::time::Duration;

/// What a global limit does when Redis fails or is slow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnStoreError {
    /// A local limit of `rate / replicas`.
    Local,
    /// Let the request through.
    Allow,
    /// Refuse it with 429.
    Deny,
}

/// How a request was decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    /// The in-process buckets.
    Local,
    /// Redis.
    Store,
    /// Redis failed; `on_store_error` decided.
    StoreError(OnStoreError),
}

impl Via {
    /// For `/explain` and logs.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Local => "local",
            Self::Store => "redis",
            Self::StoreError(OnStoreError::Local) => "redis failed: local fallback",
            Self::StoreError(OnStoreError::Allow) => "redis failed: allowed",
            Self::StoreError(OnStoreError::Deny) => "redis failed: denied",
        }
    }
}

/// One decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    /// Let through.
    pub allowed: bool,
    /// Requests the bucket still admits at once.
    pub remaining: u64,
    /// Until the bucket is full again.
    pub reset: Duration,
    /// Until the next request would be admitted (zero when allowed).
    pub retry_after: Duration,
    /// Who decided.
    pub via: Via,
}
