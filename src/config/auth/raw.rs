//! The serde model of a route's `auth` table (lenient strings, like the rest of `config::raw`);
//! it imports nothing from `config`, so `config::raw` can hold it.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// `auth = { ... }`: exactly one of the methods.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct RawAuth {
    /// JSON Web Tokens.
    pub jwt: Option<RawJwt>,
    /// API keys.
    pub api_keys: Option<RawApiKeys>,
    /// An external service decides.
    pub forward: Option<RawForwardAuth>,
    /// Keys the model does not know; each is reported by `validate`.
    #[serde(flatten, skip_serializing)]
    pub unknown: BTreeMap<String, serde_json::Value>,
}

/// `auth.jwt`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct RawJwt {
    /// Accepted `iss`. Default: any.
    pub issuer: Option<String>,
    /// Accepted `aud` values; a token without `aud` is refused when set. Default: any.
    pub audiences: Vec<String>,
    /// Keys fetched from this URL (JWKS).
    pub jwks_url: Option<String>,
    /// Keys read from this JWKS file.
    pub jwks_file: Option<String>,
    /// An HS256 secret read from this environment variable.
    pub hs256_secret_env: Option<String>,
    /// Refetch `jwks_url` once the keys are this old. Default `5m`.
    pub jwks_refresh: String,
    /// Least time between two fetches of `jwks_url` (also on an unknown `kid`). Default `30s`.
    pub jwks_min_refresh: String,
    /// Clock skew allowed on `exp` and `nbf`. Default `30s`.
    pub leeway: String,
    /// Claims a token must carry: a value, or a list of accepted values. Default none.
    pub required_claims: BTreeMap<String, serde_json::Value>,
    /// Claims sent upstream as headers, `claim = "Header-Name"`. Default none.
    pub forward_claims: BTreeMap<String, String>,
    /// The header carrying the token. Default `Authorization` (with `Bearer`).
    pub header: String,
    /// A cookie carrying the token when the header is absent. Default none.
    pub cookie: Option<String>,
    /// Keys the model does not know; each is reported by `validate`.
    #[serde(flatten, skip_serializing)]
    pub unknown: BTreeMap<String, serde_json::Value>,
}

impl Default for RawJwt {
    fn default() -> Self {
        Self {
            issuer: None,
            audiences: Vec::new(),
            jwks_url: None,
            jwks_file: None,
            hs256_secret_env: None,
            jwks_refresh: "5m".into(),
            jwks_min_refresh: "30s".into(),
            leeway: "30s".into(),
            required_claims: BTreeMap::new(),
            forward_claims: BTreeMap::new(),
            header: "Authorization".into(),
            cookie: None,
            unknown: BTreeMap::new(),
        }
    }
}

/// `auth.api_keys`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct RawApiKeys {
    /// The header carrying the key. Default `X-Api-Key`.
    pub header: String,
    /// A file of `NAME SHA256-HEX` lines.
    pub keys_file: Option<String>,
    /// An environment variable holding the same lines.
    pub keys_env: Option<String>,
    /// Remove the key header before forwarding. Default false.
    pub hide_credentials: bool,
    /// Keys the model does not know; each is reported by `validate`.
    #[serde(flatten, skip_serializing)]
    pub unknown: BTreeMap<String, serde_json::Value>,
}

impl Default for RawApiKeys {
    fn default() -> Self {
        Self {
            header: "X-Api-Key".into(),
            keys_file: None,
            keys_env: None,
            hide_credentials: false,
            unknown: BTreeMap::new(),
        }
    }
}

/// `auth.forward`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct RawForwardAuth {
    /// The service asked with `GET`.
    pub url: Option<String>,
    /// Request headers sent to it. Default: all but hop-by-hop ones.
    pub copy_request_headers: Option<Vec<String>>,
    /// Headers of its 2xx answer copied onto the upstream request. Default none.
    pub copy_response_headers: Vec<String>,
    /// Time allowed for its answer. Default `500ms`.
    pub timeout: String,
    /// `unavailable` (503, default) or `deny` (401) when it cannot be reached in time.
    pub on_error: String,
    /// Keys the model does not know; each is reported by `validate`.
    #[serde(flatten, skip_serializing)]
    pub unknown: BTreeMap<String, serde_json::Value>,
}

impl Default for RawForwardAuth {
    fn default() -> Self {
        Self {
            url: None,
            copy_request_headers: None,
            copy_response_headers: Vec::new(),
            timeout: "500ms".into(),
            on_error: "unavailable".into(),
            unknown: BTreeMap::new(),
        }
    }
}
