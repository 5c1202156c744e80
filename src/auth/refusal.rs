//! Why an authentication refused a request: the reasons, their statuses, RFC 6750 error codes
//! and client messages, shared by every method and the request-path stage.

use http::StatusCode;

/// Tokens and keys longer than this are refused before any decoding (`Refusal::TooLarge`).
pub const MAX_CREDENTIAL: usize = 8 * 1024;

/// Why a request was refused; each is a label of `meshgate_auth_refused_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// No credentials at all.
    Missing,
    /// Credentials in a shape the method cannot read (not `Bearer`, sent twice).
    InvalidRequest,
    /// A token or key over [`MAX_CREDENTIAL`] bytes.
    TooLarge,
    /// Not a JWT: bad base64, JSON or structure, or an algorithm such as `none`.
    Malformed,
    /// The token names a key the key set does not hold.
    UnknownKey,
    /// The token's algorithm is not its key's algorithm (RS/HS confusion included).
    Algorithm,
    /// The signature does not verify.
    Signature,
    /// `exp` passed (with the leeway), or missing or not a number.
    Expired,
    /// `nbf` not reached yet (with the leeway), or not a number.
    NotYetValid,
    /// `iss` is not the configured issuer.
    Issuer,
    /// `aud` missing or none of the configured audiences.
    Audience,
    /// A valid identity without the route's required claims (403).
    Claims,
    /// No configured API key has this hash.
    UnknownApiKey,
    /// The forward-auth service answered with something other than 2xx.
    Denied,
    /// The key set or the forward-auth service could not be reached.
    Unavailable,
}

impl Refusal {
    /// Every reason, in label order (metrics slots).
    pub const ALL: [Refusal; 15] = [
        Self::Missing,
        Self::InvalidRequest,
        Self::TooLarge,
        Self::Malformed,
        Self::UnknownKey,
        Self::Algorithm,
        Self::Signature,
        Self::Expired,
        Self::NotYetValid,
        Self::Issuer,
        Self::Audience,
        Self::Claims,
        Self::UnknownApiKey,
        Self::Denied,
        Self::Unavailable,
    ];

    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Self::Missing => "missing",
            Self::InvalidRequest => "invalid_request",
            Self::TooLarge => "too_large",
            Self::Malformed => "malformed",
            Self::UnknownKey => "unknown_key",
            Self::Algorithm => "algorithm",
            Self::Signature => "signature",
            Self::Expired => "expired",
            Self::NotYetValid => "not_yet_valid",
            Self::Issuer => "issuer",
            Self::Audience => "audience",
            Self::Claims => "claims",
            Self::UnknownApiKey => "unknown_api_key",
            Self::Denied => "denied",
            Self::Unavailable => "unavailable",
        }
    }

    /// Index into [`Refusal::ALL`] (and the metric slots).
    pub fn index(self) -> usize {
        Self::ALL.iter().position(|r| *r == self).unwrap_or(0)
    }

    /// The status of the gateway's own refusal (a forward-auth denial keeps the service's).
    pub fn status(self) -> StatusCode {
        match self {
            Self::InvalidRequest => StatusCode::BAD_REQUEST,
            Self::Claims => StatusCode::FORBIDDEN,
            Self::Missing
            | Self::TooLarge
            | Self::Malformed
            | Self::UnknownKey
            | Self::Algorithm
            | Self::Signature
            | Self::Expired
            | Self::NotYetValid
            | Self::Issuer
            | Self::Audience
            | Self::UnknownApiKey
            | Self::Denied
            | Self::Unavailable => StatusCode::UNAUTHORIZED,
        }
    }

    /// The RFC 6750 error code for a bearer challenge; `None` when the request carried no
    /// credentials (the RFC's rule: no error code then).
    pub fn bearer_error(self) -> Option<&'static str> {
        match self {
            Self::Missing | Self::Unavailable | Self::Denied => None,
            Self::InvalidRequest => Some("invalid_request"),
            Self::Claims => Some("insufficient_scope"),
            Self::TooLarge
            | Self::Malformed
            | Self::UnknownKey
            | Self::Algorithm
            | Self::Signature
            | Self::Expired
            | Self::NotYetValid
            | Self::Issuer
            | Self::Audience
            | Self::UnknownApiKey => Some("invalid_token"),
        }
    }

    /// A short message for the client (never any part of the credential).
    pub fn message(self) -> &'static str {
        match self {
            Self::Missing => "credentials are required",
            Self::InvalidRequest => "the credentials are not in the expected form",
            Self::TooLarge => "the credential exceeds 8 KiB",
            Self::Malformed => "the token is malformed",
            Self::UnknownKey => "the token was signed with an unknown key",
            Self::Algorithm => "the token's algorithm does not match its key",
            Self::Signature => "the token's signature is invalid",
            Self::Expired => "the token has expired",
            Self::NotYetValid => "the token is not valid yet",
            Self::Issuer => "the token's issuer is not accepted",
            Self::Audience => "the token's audience is not accepted",
            Self::Claims => "the identity is not allowed on this route",
            Self::UnknownApiKey => "the API key is not valid",
            Self::Denied => "the authentication service refused the request",
            Self::Unavailable => "the authentication service is unavailable",
        }
    }
}
