//! The data plane's own settings: `[upstream]` and one validated route with its backend, as
//! `config` builds them and the control plane turns them into live routes.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::uri::Scheme;
use http::{HeaderValue, StatusCode};

use crate::balancer::{Policy, PoolSettings};
use crate::discovery::Discovered;
use crate::health::HealthCheck;
use crate::rules::headers::HeaderOps;
use crate::rules::path::Rewrite;
use crate::rules::retry::RetryPolicy;

/// `[upstream]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamConfig {
    /// TCP connect timeout.
    pub connect_timeout: Duration,
    /// Idle pooled connection lifetime.
    pub idle_timeout: Duration,
    /// Idle connections kept per endpoint.
    pub max_idle_per_host: usize,
}

/// A service with fixed endpoints.
#[derive(Debug, Clone, PartialEq)]
pub struct StaticService {
    /// How endpoints are reached: `http` or `https` (TLS; `wss` too).
    pub scheme: Scheme,
    /// HTTP/2 with prior knowledge over plain TCP (`h2c://` targets).
    pub h2c: bool,
    /// The endpoints.
    pub endpoints: Vec<Discovered>,
}

/// What a route sends traffic to.
#[derive(Debug, Clone, PartialEq)]
pub enum Backend {
    /// A named service fed by discovery.
    Service(Arc<str>),
    /// The route's own fixed targets.
    Targets(StaticService),
}

/// Settings that belong to the service a route names (shared by every route on it).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ServiceSettings {
    /// Active probes.
    pub health_check: Option<HealthCheck>,
    /// Start state, slow start, passive ejection.
    pub pool: PoolSettings,
    /// Concurrent requests to the service.
    pub max_requests: Option<usize>,
    /// Requests that may queue for `max_requests`.
    pub max_pending: usize,
}

/// One validated route.
#[derive(Debug, Clone, PartialEq)]
pub struct RouteConfig {
    /// Unique name.
    pub name: Arc<str>,
    /// Normalised prefix (no trailing slash except for `/`).
    pub path: String,
    /// Where traffic goes.
    pub backend: Backend,
    /// Balancing policy.
    pub policy: Policy,
    /// Rewrites in order.
    pub rewrite: Vec<Rewrite>,
    /// Until response headers arrive.
    pub timeout: Duration,
    /// Pass the client's Host.
    pub preserve_host: bool,
    /// Request header changes.
    pub request_headers: HeaderOps,
    /// Response header changes.
    pub response_headers: HeaderOps,
    /// Custom error answer.
    pub error: Option<ErrorPage>,
    /// Request body limit.
    pub max_body: Option<u64>,
    /// TLS to `https`/`wss` targets.
    pub upstream_tls: Option<crate::tls::UpstreamTls>,
    /// Reach the service through the Consul service mesh (Connect mTLS to its sidecars).
    pub connect: bool,
    /// Relay HTTP/1.1 upgrades.
    pub websocket: bool,
    /// Idle limit for upgraded connections.
    pub websocket_idle_timeout: Option<Duration>,
    /// Retry policy.
    pub retry: RetryPolicy,
    /// Limit on a streaming response once headers arrived.
    pub stream_timeout: Option<Duration>,
    /// Panic threshold in percent.
    pub panic_threshold: Option<f64>,
    /// Settings of the route's service.
    pub service_settings: ServiceSettings,
    /// `rate_limit`, inline or from a named policy.
    pub rate_limit: Option<crate::ratelimit::RateLimitSettings>,
    /// `auth`: the route's authentication, the first of its policies.
    pub auth: Option<crate::auth::AuthSettings>,
    /// Response caching.
    pub cache: Option<crate::cache::CacheSettings>,
}

impl RouteConfig {
    /// A route with default settings, as routes declared by Consul tags get.
    pub fn for_service(name: &str, path: &str, service: &str) -> Self {
        Self {
            name: name.into(),
            path: crate::rules::path::normalise_prefix(path),
            backend: Backend::Service(service.into()),
            policy: Policy::RoundRobin,
            rewrite: Vec::new(),
            timeout: Duration::from_secs(30),
            preserve_host: true,
            request_headers: HeaderOps::default(),
            response_headers: HeaderOps::default(),
            error: None,
            max_body: None,
            upstream_tls: None,
            connect: false,
            websocket: true,
            websocket_idle_timeout: None,
            retry: RetryPolicy::default(),
            stream_timeout: None,
            panic_threshold: None,
            service_settings: ServiceSettings::default(),
            rate_limit: None,
            auth: None,
            cache: None,
        }
    }

    /// The service this route's pool is registered under.
    pub fn service_name(&self) -> &Arc<str> {
        match &self.backend {
            Backend::Service(s) => s,
            Backend::Targets(_) => &self.name,
        }
    }
}

/// A route's custom error answer.
#[derive(Debug, Clone, PartialEq)]
pub struct ErrorPage {
    /// Overrides the error's own status when set.
    pub status: Option<StatusCode>,
    /// Content type of `body`.
    pub content_type: HeaderValue,
    /// Sent as is.
    pub body: Bytes,
}
