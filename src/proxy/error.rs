//! `ProxyError`: everything that can go wrong on the request path, its one mapping to an HTTP
//! status, and whether it is safe to retry.

use std::sync::Arc;
use std::time::Duration;

use http::uri::Authority;
use http::StatusCode;

use crate::body::{ClientBodyError, RequestBodyError};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Why an upstream request failed, from either client (the general one, or the pooled
/// HTTP/1.1 path of `pool.rs`).
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// The general client (TLS, h2c, upgrades, host names).
    #[error(transparent)]
    Client(#[from] hyper_util::client::legacy::Error),
    /// Opening the TCP connection failed or timed out.
    #[error("tcp connect error")]
    Connect(#[source] std::io::Error),
    /// The HTTP/1.1 handshake on a new connection failed.
    #[error("connection handshake failed")]
    Handshake(#[source] hyper::Error),
    /// Sending the request or reading the response head failed.
    #[error("request failed")]
    Request(#[source] hyper::Error),
}

impl UpstreamError {
    /// Nothing reached the upstream: the connection itself could not be made.
    pub fn is_connect(&self) -> bool {
        match self {
            Self::Client(e) => e.is_connect(),
            Self::Connect(_) | Self::Handshake(_) => true,
            Self::Request(_) => false,
        }
    }

    /// The upstream closed the connection before any response byte (what a sidecar's L4
    /// intention deny looks like after the handshake).
    pub fn closed_before_response(&self) -> bool {
        let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(self);
        while let Some(e) = cur {
            if e.downcast_ref::<hyper::Error>()
                .is_some_and(|h| h.is_incomplete_message())
            {
                return true;
            }
            // Over TLS, a close without close_notify surfaces as an I/O error instead.
            if let Some(io) = e.downcast_ref::<std::io::Error>() {
                if matches!(
                    io.kind(),
                    std::io::ErrorKind::UnexpectedEof
                        | std::io::ErrorKind::ConnectionReset
                        | std::io::ErrorKind::ConnectionAborted
                        | std::io::ErrorKind::BrokenPipe
                ) {
                    return true;
                }
            }
            cur = e.source();
        }
        false
    }
}

/// What a 429 from the rate limit carries (boxed: refusals are rare next to the `Result`s
/// every request passes).
#[derive(Debug)]
pub struct RateLimitRefusal {
    /// The limit (route or named policy).
    pub name: Arc<str>,
    /// Who decided (local buckets, Redis, or `on_store_error`).
    pub via: &'static str,
    /// Until the bucket admits a request again.
    pub retry_after: Duration,
    /// `RateLimit-Policy`.
    pub policy: http::HeaderValue,
    /// `RateLimit`.
    pub state: http::HeaderValue,
}

/// A request-path failure. Mapped to a status exactly once, in [`ProxyError::status`].
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// No route matches the path.
    #[error("no route for {path}")]
    NoRoute {
        /// The normalised request path.
        path: String,
    },
    /// The route's service has no available endpoint.
    #[error("service {service} has no healthy endpoints")]
    NoEndpoint {
        /// The service.
        service: Arc<str>,
    },
    /// The upstream could not be connected to; nothing was sent.
    #[error("connecting to {addr} failed")]
    Connect {
        /// The endpoint.
        addr: Authority,
        /// Why.
        #[source]
        source: UpstreamError,
    },
    /// No response headers arrived in time.
    #[error("{addr} sent no response headers within {after:?}")]
    UpstreamTimeout {
        /// The endpoint.
        addr: Authority,
        /// The route's timeout.
        after: Duration,
    },
    /// The upstream connection failed after the request started.
    #[error("{addr} failed before answering")]
    Upstream {
        /// The endpoint.
        addr: Authority,
        /// Why.
        #[source]
        source: UpstreamError,
    },
    /// The request body is larger than the route allows.
    #[error("request body exceeds {limit} bytes")]
    BodyTooLarge {
        /// The route's `max_body`.
        limit: u64,
    },
    /// The service is at `max_requests` with a full queue.
    #[error("service {service} is at its concurrency limit")]
    Overloaded {
        /// The service.
        service: Arc<str>,
    },
    /// The client's body is malformed (bad chunked framing); the client's fault.
    #[error("reading the request body failed")]
    ClientBody {
        /// Why: a [`ClientBodyError`], alone or inside the upstream request's failure.
        #[source]
        source: BoxError,
    },
    /// The client did not finish its body in time, or went away before its end; the client's
    /// fault, never charged to the upstream.
    #[error("the request body did not arrive in time")]
    ClientTimeout {
        /// Why: stalled or aborted (a [`ClientBodyError`], alone or inside the upstream
        /// request's failure), or `None` when the route's timeout ran out while reading.
        #[source]
        source: Option<BoxError>,
    },
    /// The upstream request could not be built from the client's request.
    #[error("invalid upstream request")]
    InvalidRequest {
        /// Why.
        #[source]
        source: http::Error,
    },
    /// The request head breaks HTTP's rules (Host, framing); nothing was forwarded.
    #[error("invalid request head")]
    InvalidHead {
        /// Which rule.
        #[source]
        source: crate::rules::head::HeadError,
    },
    /// The request path is refused by `server.escaped_slashes`; nothing was forwarded.
    #[error("invalid request path")]
    InvalidPath {
        /// Why.
        #[source]
        source: crate::rules::path::PathError,
    },
    /// The upstream answered 101 to a request whose upgrade was not relayed, or switched to
    /// another protocol than the one asked for; no tunnel was opened.
    #[error("{addr} switched protocols unasked")]
    UnexpectedUpgrade {
        /// The endpoint.
        addr: Authority,
    },
    /// The destination's sidecar refused the gateway's identity: an L7 intention answered
    /// `403 RBAC: access denied`, or an L4 one closed the connection without an answer.
    #[error("the mesh refused {identity} -> {service} ({})", if *.l7 { "L7 403" } else { "L4 close" })]
    MeshDenied {
        /// The gateway's identity name.
        identity: String,
        /// The destination service.
        service: Arc<str>,
        /// An HTTP 403 rather than a closed connection.
        l7: bool,
    },
    /// A mesh route was asked before the gateway's Connect identity (leaf and roots) loaded.
    #[error("the mesh identity {identity} has not loaded yet")]
    MeshUnavailable {
        /// The gateway's identity name.
        identity: String,
    },
    /// The gateway's leaf certificate expired and Consul has not renewed it.
    #[error("the mesh certificate of {identity} expired")]
    MeshCertExpired {
        /// The gateway's identity name.
        identity: String,
    },
    /// The request's rate-limit bucket is empty; the client's fault.
    #[error("rate limit {} exceeded ({})", .0.name, .0.via)]
    RateLimited(Box<RateLimitRefusal>),
    /// The request lacks a part of its rate-limit key and the limit is `required`.
    #[error("the request lacks the key of rate limit {name}")]
    RateLimitKeyMissing {
        /// The limit.
        name: Arc<str>,
    },
}

impl From<RequestBodyError> for ProxyError {
    /// Reading the client's body failed: always the client's fault.
    fn from(e: RequestBodyError) -> Self {
        match e {
            RequestBodyError::TooLarge { limit } => Self::BodyTooLarge { limit },
            RequestBodyError::Read(ClientBodyError::Malformed(_)) => Self::ClientBody {
                source: Box::new(e),
            },
            RequestBodyError::Read(_) => Self::ClientTimeout {
                source: Some(Box::new(e)),
            },
        }
    }
}

impl ProxyError {
    /// The client's fault when `err` (or an error in its source chain) says the request body
    /// failed on the client's side; `None` when the fault is elsewhere.
    pub fn client_fault<E>(err: E) -> Result<Self, E>
    where
        E: std::error::Error + Send + Sync + 'static,
    {
        let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(&err);
        while let Some(e) = cur {
            match e.downcast_ref::<RequestBodyError>() {
                Some(RequestBodyError::TooLarge { limit }) => {
                    return Ok(Self::BodyTooLarge { limit: *limit })
                }
                Some(RequestBodyError::Read(ClientBodyError::Malformed(_))) => {
                    return Ok(Self::ClientBody {
                        source: Box::new(err),
                    })
                }
                Some(RequestBodyError::Read(_)) => {
                    return Ok(Self::ClientTimeout {
                        source: Some(Box::new(err)),
                    })
                }
                None => cur = e.source(),
            }
        }
        Err(err)
    }

    /// The status the client gets. Exhaustive on purpose: a new variant forces a decision.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::NoRoute { .. } => StatusCode::NOT_FOUND,
            Self::NoEndpoint { .. } | Self::Overloaded { .. } => StatusCode::SERVICE_UNAVAILABLE,
            Self::Connect { .. } | Self::Upstream { .. } => StatusCode::BAD_GATEWAY,
            Self::UpstreamTimeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            Self::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::InvalidRequest { .. } | Self::ClientBody { .. } => StatusCode::BAD_REQUEST,
            Self::ClientTimeout { .. } => StatusCode::REQUEST_TIMEOUT,
            Self::InvalidHead { source } => source.status(),
            Self::InvalidPath { .. } => StatusCode::BAD_REQUEST,
            Self::UnexpectedUpgrade { .. } => StatusCode::BAD_GATEWAY,
            Self::MeshUnavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            Self::MeshDenied { l7: true, .. } => StatusCode::FORBIDDEN,
            Self::MeshDenied { l7: false, .. } => StatusCode::BAD_GATEWAY,
            Self::MeshCertExpired { .. } => StatusCode::BAD_GATEWAY,
            Self::RateLimited(_) => StatusCode::TOO_MANY_REQUESTS,
            Self::RateLimitKeyMissing { .. } => StatusCode::BAD_REQUEST,
        }
    }

    /// The client caused this (its request or its body), so no endpoint or route health
    /// figure may count it. Exhaustive on purpose, like `status`.
    pub fn is_client_fault(&self) -> bool {
        match self {
            Self::NoRoute { .. }
            | Self::BodyTooLarge { .. }
            | Self::ClientBody { .. }
            | Self::ClientTimeout { .. }
            | Self::InvalidRequest { .. }
            | Self::InvalidHead { .. }
            | Self::InvalidPath { .. }
            | Self::RateLimited(_)
            | Self::RateLimitKeyMissing { .. } => true,
            Self::NoEndpoint { .. }
            | Self::Overloaded { .. }
            | Self::Connect { .. }
            | Self::UpstreamTimeout { .. }
            | Self::Upstream { .. }
            | Self::UnexpectedUpgrade { .. }
            | Self::MeshUnavailable { .. }
            | Self::MeshDenied { .. }
            | Self::MeshCertExpired { .. } => false,
        }
    }

    /// A short human message for the JSON error body.
    pub fn message(&self) -> String {
        match self {
            Self::NoRoute { .. } => "no route matches this path".into(),
            Self::NoEndpoint { service } => format!("service {service} has no available endpoint"),
            Self::Connect { .. } => "the upstream service could not be reached".into(),
            Self::UpstreamTimeout { after, .. } => {
                format!("the upstream service did not answer within {after:?}")
            }
            Self::Upstream { .. } => "the upstream service failed before answering".into(),
            Self::BodyTooLarge { limit } => {
                format!("request body exceeds the limit of {limit} bytes")
            }
            Self::InvalidRequest { .. } => "the request cannot be forwarded".into(),
            Self::Overloaded { service } => {
                format!("service {service} is at its concurrency limit; retry later")
            }
            Self::ClientBody { .. } => "the request body is malformed".into(),
            Self::ClientTimeout { .. } => "the request body did not arrive in time".into(),
            Self::InvalidHead { source } => format!("{source}"),
            Self::InvalidPath { source } => format!("{source}"),
            Self::UnexpectedUpgrade { .. } => {
                "the upstream service switched protocols unasked".into()
            }
            Self::MeshUnavailable { identity } => format!(
                "the gateway's mesh identity {identity} has not loaded from Consul yet; retry later"
            ),
            Self::MeshDenied {
                identity, service, ..
            } => format!(
                "the service mesh refused the gateway: check that an intention allows {identity} to call {service}"
            ),
            Self::MeshCertExpired { identity } => format!(
                "the gateway's mesh certificate ({identity}) expired and Consul has not renewed it"
            ),
            Self::RateLimited(r) => format!(
                "rate limit exceeded; retry in {} s",
                crate::ratelimit::ceil_secs(r.retry_after).max(1)
            ),
            Self::RateLimitKeyMissing { .. } => {
                "the request lacks what this route's rate limit is keyed on".into()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_table() {
        let addr: Authority = "127.0.0.1:1".parse().unwrap();
        let cases = [
            (ProxyError::NoRoute { path: "/x".into() }, 404),
            (
                ProxyError::NoEndpoint {
                    service: "s".into(),
                },
                503,
            ),
            (
                ProxyError::UpstreamTimeout {
                    addr,
                    after: Duration::from_secs(1),
                },
                504,
            ),
            (ProxyError::BodyTooLarge { limit: 1 }, 413),
            (ProxyError::ClientTimeout { source: None }, 408),
            (
                ProxyError::InvalidHead {
                    source: crate::rules::head::HeadError::MissingHost,
                },
                400,
            ),
            (
                ProxyError::InvalidHead {
                    source: crate::rules::head::HeadError::UnsupportedTransferCoding,
                },
                501,
            ),
            (
                ProxyError::InvalidPath {
                    source: crate::rules::path::PathError::EscapedSlash,
                },
                400,
            ),
            (
                ProxyError::UnexpectedUpgrade {
                    addr: "127.0.0.1:1".parse().unwrap(),
                },
                502,
            ),
        ];
        for (e, status) in cases {
            assert_eq!(e.status().as_u16(), status, "{e}");
        }
    }
}
