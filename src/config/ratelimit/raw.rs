//! The serde model of `rate_limit` and `[redis]` (no imports from the rest of `config`, so the
//! file model in `raw.rs` can hold them).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Keys that are not part of the model (the same type as `raw::Unknown`).
type Unknown = BTreeMap<String, serde_json::Value>;

/// `rate_limit = { rate = "100/s", burst = 50, key = "client_ip", scope = "local" }`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct RawRateLimit {
    /// `COUNT/s`, `COUNT/m` or `COUNT/h`. Required.
    pub rate: Option<String>,
    /// Requests a full bucket admits at once. Default: one second's worth of `rate` (at least 1).
    pub burst: Option<i64>,
    /// `client_ip`, `route`, `header:NAME`, `jwt:CLAIM`, `api_key`, or a list of them.
    /// Default `client_ip`.
    pub key: Option<RawKey>,
    /// Refuse a request lacking a key part with 400 (default false: such requests share one
    /// bucket).
    pub required: bool,
    /// `local` (default) or `global` (Redis).
    pub scope: Option<String>,
    /// Global scope, Redis failing: `local` (default), `allow` or `deny`.
    pub on_store_error: Option<String>,
    /// Gateway replicas: the local fallback admits `rate / replicas`. Default 1.
    pub replicas: Option<i64>,
    /// `RateLimit-Policy` and `RateLimit` on admitted responses. Default true.
    pub headers: Option<bool>,
    /// Most keys one limiter keeps in process. Default 100000.
    pub max_keys: Option<i64>,
    /// Keys the model does not know; each is reported by `validate`.
    #[serde(flatten, skip_serializing)]
    pub unknown: Unknown,
}

/// One key part or a list of them.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
pub enum RawKey {
    /// One part.
    One(String),
    /// Parts combined.
    Many(Vec<String>),
}

/// `[redis]`: the store of global rate limits.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct RawRedis {
    /// `redis://[user[:password]@]host[:port][/db]` or `rediss://` (TLS).
    #[serde(serialize_with = "redacted_url")]
    pub url: Option<String>,
    /// ACL user name (overrides the URL's).
    pub username: Option<String>,
    /// Password (overrides the URL's; `MESHGATE_REDIS__PASSWORD`).
    pub password: Option<String>,
    /// Connections, each multiplexing many requests. Default 4.
    pub pool_size: i64,
    /// Longest wait for one decision before `on_store_error` decides. Default `20ms`.
    pub timeout: String,
    /// PEM file of the CA(s) that sign a `rediss://` server's certificate, in place of the
    /// system roots. Default: the system roots.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<std::path::PathBuf>,
    /// Keys the model does not know; each is reported by `validate`.
    #[serde(flatten, skip_serializing)]
    pub unknown: Unknown,
}

impl Default for RawRedis {
    fn default() -> Self {
        Self {
            url: None,
            username: None,
            password: None,
            pool_size: 4,
            timeout: "20ms".into(),
            ca_file: None,
            unknown: Unknown::new(),
        }
    }
}

fn redacted_url<S: serde::Serializer>(url: &Option<String>, s: S) -> Result<S::Ok, S::Error> {
    match url {
        Some(u) => s.serialize_some(&crate::error::redact_url(u)),
        None => s.serialize_none(),
    }
}
