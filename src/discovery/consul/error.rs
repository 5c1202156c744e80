//! `ConsulError`: every way a query to Consul or building its client can fail, and how the
//! watch loops classify it (ACL, rate limit, configuration).

use std::path::PathBuf;
use std::time::Duration;

/// Everything that can go wrong between meshgate and Consul.
///
/// Request errors (`Transport` .. `BodyTooLarge`) are retried by the watch loops, except
/// `BadFilter`; it and the build errors (`File` .. `Build`, from
/// [`ConsulClient::new`](super::ConsulClient::new)) mean the configuration must change.
#[derive(Debug, thiserror::Error)]
pub enum ConsulError {
    /// Connecting, sending or reading failed (refused, reset, DNS, TLS handshake, ...).
    #[error("request to Consul failed")]
    Transport {
        /// The underlying client error.
        #[source]
        source: reqwest::Error,
    },
    /// No complete answer within the request timeout (`wait * 17/16 + 10s`).
    #[error("Consul did not answer within {after:?}")]
    Timeout {
        /// The timeout that expired.
        after: Duration,
        /// The underlying client error.
        #[source]
        source: reqwest::Error,
    },
    /// Consul answered with a non-success status. `body` is Consul's plain-text message
    /// (trimmed, at most 4 KiB), e.g. `No cluster leader` or `No path to datacenter`.
    #[error("Consul answered {status}: {body}")]
    Status {
        /// HTTP status.
        status: http::StatusCode,
        /// Plain-text body.
        body: String,
    },
    /// 500 `Failed to create boolean expression evaluator: ...`: Consul refused
    /// `discovery.consul.filter`. Asking again gives the same answer, so it is not retried.
    #[error("Consul refused discovery.consul.filter: {message}")]
    BadFilter {
        /// Consul's plain-text message (position and parser error).
        message: String,
    },
    /// 403 `ACL not found`: the token does not exist (typo, expired, wrong datacenter).
    #[error("Consul rejected the ACL token: ACL not found")]
    AclNotFound,
    /// 429: the agent's rate limiter refused the request.
    #[error("Consul rate-limited the request (retry after {retry_after:?})")]
    RateLimited {
        /// Parsed `Retry-After` (seconds form only), if sent.
        retry_after: Option<Duration>,
    },
    /// The body was not the JSON we expect.
    #[error("decoding Consul's answer")]
    Decode {
        /// The JSON error.
        #[source]
        source: serde_json::Error,
    },
    /// A success answer without a usable `X-Consul-Index` (a proxy stripped it?). Without it
    /// blocking is impossible, so this is an error, as in Consul's Go client.
    #[error("Consul's answer has no valid X-Consul-Index header (got {value:?})")]
    MissingIndex {
        /// The raw header value, if any.
        value: Option<String>,
    },
    /// The answer exceeded the body limit (64 MiB).
    #[error("Consul's answer exceeds {limit} bytes")]
    BodyTooLarge {
        /// The limit in bytes.
        limit: usize,
    },
    /// Reading a token, CA, certificate or key file failed.
    #[error("reading {}", path.display())]
    File {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A file was readable but holds nothing usable (no certificate, empty token, ...).
    #[error("{}: {reason}", path.display())]
    InvalidFile {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The inline token cannot be sent as an HTTP header (resolve() normally rejects it).
    #[error("the Consul token is not a valid HTTP header value")]
    InvalidToken {
        /// The header error.
        #[source]
        source: http::header::InvalidHeaderValue,
    },
    /// The TLS settings for Consul are unusable (unreadable or invalid CA, certificate or key).
    #[error("building the TLS configuration for Consul")]
    Tls {
        /// What was wrong, with the file's path.
        #[source]
        source: crate::tls::TlsError,
    },
    /// The HTTP client could not be built.
    #[error("building the Consul HTTP client")]
    Build {
        /// The client error.
        #[source]
        source: reqwest::Error,
    },
}

impl ConsulError {
    /// True for ACL problems: 403 `ACL not found` or any other 403 (`Permission denied`,
    /// blocked endpoint). Retrying will not help until the token or its policy changes.
    pub fn is_acl(&self) -> bool {
        match self {
            Self::AclNotFound => true,
            Self::Status { status, .. } => *status == http::StatusCode::FORBIDDEN,
            _ => false,
        }
    }

    /// True for 429.
    pub fn is_rate_limited(&self) -> bool {
        matches!(self, Self::RateLimited { .. })
    }

    /// The server-requested pause for 429 answers that carried `Retry-After`.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::RateLimited { retry_after } => *retry_after,
            _ => None,
        }
    }

    /// True when the configuration must change: building the client failed (files, TLS) or
    /// Consul refused the filter; false for per-request errors, which the loops retry.
    pub fn is_config(&self) -> bool {
        match self {
            Self::BadFilter { .. }
            | Self::File { .. }
            | Self::InvalidFile { .. }
            | Self::InvalidToken { .. }
            | Self::Tls { .. }
            | Self::Build { .. } => true,
            Self::Transport { .. }
            | Self::Timeout { .. }
            | Self::Status { .. }
            | Self::AclNotFound
            | Self::RateLimited { .. }
            | Self::Decode { .. }
            | Self::MissingIndex { .. }
            | Self::BodyTooLarge { .. } => false,
        }
    }
}
