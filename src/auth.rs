//! Route authentication: validated settings for JWT, API keys and forward auth, the key material
//! they check against, and why a request was refused. The request-path stage is `proxy::auth`.

pub mod api_keys;
pub mod forward;
pub mod jwt;
pub mod refusal;

use std::sync::Arc;

pub use refusal::{Refusal, MAX_CREDENTIAL};

/// A route's `auth`: exactly one method.
#[derive(Debug, Clone, PartialEq)]
pub enum AuthSettings {
    /// `auth.jwt`: a signed token checked against keys and claims.
    Jwt(Arc<jwt::JwtSettings>),
    /// `auth.api_keys`: a key from a header, found by its SHA-256.
    ApiKeys(Arc<api_keys::ApiKeys>),
    /// `auth.forward`: an external service decides.
    Forward(Arc<forward::ForwardAuth>),
}

impl AuthSettings {
    /// The method's name for `/status`, `/explain` and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Jwt(_) => "jwt",
            Self::ApiKeys(_) => "api_keys",
            Self::Forward(_) => "forward",
        }
    }

    /// What a request needs to pass, in one sentence for `/explain` (no secrets).
    pub fn requirement(&self) -> String {
        match self {
            Self::Jwt(s) => s.describe(),
            Self::ApiKeys(k) => format!(
                "an API key in the {} header whose SHA-256 is one of {} configured keys",
                k.header,
                k.len()
            ),
            Self::Forward(f) => format!(
                "a 2xx answer from {} within {:?} (other answers go back to the client as they came)",
                crate::error::redact_url(f.url.as_str()),
                f.timeout
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::StatusCode;

    #[test]
    fn labels_are_unique_and_indexed() {
        for (i, r) in Refusal::ALL.iter().enumerate() {
            assert_eq!(r.index(), i);
            assert_eq!(
                Refusal::ALL
                    .iter()
                    .filter(|o| o.label() == r.label())
                    .count(),
                1
            );
        }
        assert!(Refusal::ALL.len() <= crate::metrics::AUTH_REASON_SLOTS);
        assert_eq!(Refusal::Claims.status(), StatusCode::FORBIDDEN);
        assert_eq!(Refusal::Missing.bearer_error(), None);
        assert_eq!(Refusal::Expired.bearer_error(), Some("invalid_token"));
    }
}
