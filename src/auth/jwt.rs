//! JWT verification: key sets (a JWKS document, or an HS256 secret), the algorithm taken from
//! the key and never from the token, and meshgate's own strict checks of `exp`, `nbf`, `iss`,
//! `aud` and the route's required claims. The remote JWKS cache lives in `jwt/remote.rs`.

mod keys;
mod remote;

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::HeaderName;
use serde_json::Value;

pub use keys::{Claims, JwksError, KeySet};
pub use remote::{Lookup, RemoteJwks};

use crate::auth::refusal::{Refusal, MAX_CREDENTIAL};

/// `auth.jwt`, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct JwtSettings {
    /// Accepted `iss`; `None` accepts any issuer.
    pub issuer: Option<String>,
    /// Accepted `aud` values; when not empty a token must carry one of them.
    pub audiences: Vec<String>,
    /// Where the keys come from.
    pub keys: KeySource,
    /// Clock skew allowed on `exp` and `nbf`.
    pub leeway: Duration,
    /// Claims a token must carry with one of the listed values (403 otherwise).
    pub required_claims: BTreeMap<String, Vec<Value>>,
    /// Claims copied into request headers (the incoming copies are always removed first).
    pub forward_claims: Vec<(String, HeaderName)>,
    /// Where the token is read.
    pub token: TokenSource,
}

/// Where a request carries its token.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenSource {
    /// The header (`Authorization` by default, which then needs the `Bearer` scheme).
    pub header: HeaderName,
    /// A cookie read when the header is absent.
    pub cookie: Option<String>,
}

/// Where a route's verification keys come from.
#[derive(Clone, PartialEq)]
pub enum KeySource {
    /// Read once from `jwks_file`, or the `hs256_secret_env` secret (read again on reload).
    Static(Arc<KeySet>),
    /// Fetched from `jwks_url`, cached and refreshed.
    Remote(Arc<RemoteJwks>),
}

impl fmt::Debug for KeySource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Static(k) => write!(f, "Static({} keys)", k.len()),
            Self::Remote(r) => write!(f, "Remote({})", r.url()),
        }
    }
}

/// The token's header, read without trusting it: a token that is not three base64url parts
/// with a JSON header naming a supported algorithm (never `none`) is `Malformed`.
pub fn header(token: &str) -> Result<jsonwebtoken::Header, Refusal> {
    if token.len() > MAX_CREDENTIAL {
        return Err(Refusal::TooLarge);
    }
    if token.split('.').count() != 3 {
        return Err(Refusal::Malformed);
    }
    jsonwebtoken::decode_header(token).map_err(|_| Refusal::Malformed)
}

impl JwtSettings {
    /// Checks verified claims: `exp` (required), `nbf`, `iss`, `aud`, each with strict types,
    /// then the required claims. `now` is seconds since the Unix epoch.
    pub fn check_claims(&self, claims: &Claims, now: f64) -> Result<(), Refusal> {
        let leeway = self.leeway.as_secs_f64();
        match claims.get("exp").map(Value::as_f64) {
            Some(Some(exp)) if now <= exp + leeway => {}
            _ => return Err(Refusal::Expired),
        }
        match claims.get("nbf").map(Value::as_f64) {
            None => {}
            Some(Some(nbf)) if now + leeway >= nbf => {}
            Some(_) => return Err(Refusal::NotYetValid),
        }
        if let Some(iss) = &self.issuer {
            if claims.get("iss").and_then(Value::as_str) != Some(iss.as_str()) {
                return Err(Refusal::Issuer);
            }
        }
        if !self.audiences.is_empty() {
            let ok = match claims.get("aud") {
                Some(Value::String(a)) => self.audiences.contains(a),
                Some(Value::Array(list)) => list
                    .iter()
                    .filter_map(Value::as_str)
                    .any(|a| self.audiences.iter().any(|x| x == a)),
                _ => false,
            };
            if !ok {
                return Err(Refusal::Audience);
            }
        }
        for (name, allowed) in &self.required_claims {
            if !claim_matches(claims.get(name), allowed) {
                return Err(Refusal::Claims);
            }
        }
        Ok(())
    }

    /// One sentence for `/explain`.
    pub fn describe(&self) -> String {
        let source = match &self.keys {
            KeySource::Static(k) => format!("one of {} configured keys", k.len()),
            KeySource::Remote(r) => {
                format!("a key from {}", crate::error::redact_url(r.url().as_str()))
            }
        };
        let mut s = format!("a JWT in the {} header", self.token.header);
        if let Some(c) = &self.token.cookie {
            s.push_str(&format!(" or the {c} cookie"));
        }
        s.push_str(&format!(", signed with {source}"));
        if let Some(iss) = &self.issuer {
            s.push_str(&format!(", issuer {iss}"));
        }
        if !self.audiences.is_empty() {
            s.push_str(&format!(", audience one of {:?}", self.audiences));
        }
        if !self.required_claims.is_empty() {
            let names: Vec<&str> = self.required_claims.keys().map(String::as_str).collect();
            s.push_str(&format!(
                ", with the required claims {names:?} (403 otherwise)"
            ));
        }
        s
    }
}

/// A claim matches when it equals one of the allowed values, or (for an array claim such as
/// `groups`) contains one of them.
fn claim_matches(claim: Option<&Value>, allowed: &[Value]) -> bool {
    match claim {
        None => false,
        Some(Value::Array(items)) => items.iter().any(|i| allowed.contains(i)),
        Some(v) => allowed.contains(v),
    }
}

/// A claim's value as a header value: strings as they are, anything else as compact JSON.
pub fn claim_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Seconds since the Unix epoch, for `check_claims`.
pub fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

#[cfg(test)]
mod tests;
