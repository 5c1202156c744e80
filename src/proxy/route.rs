//! A live route (its settings resolved with its pool, picker, clients and counters) and the
//! route table that picks one by longest prefix.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::Response;

use super::error::ProxyError;
use super::pipeline::{Pipeline, Stage};
use super::ratelimit::RateLimit;
use super::settings::{ErrorPage, RouteConfig};
use super::stages::{BodyLimit, Concurrency, ForwardingHeaders, HeaderRules, RewritePath};
use crate::balancer::{Picker, ServicePool};
use crate::ratelimit::RateLimiter;
use crate::rules::limit::Limiter;
use crate::rules::path::{strip_segment_prefix, Rewrite};

/// A route's custom error answer written in code (the library API); `None` falls back to the
/// route's configured `error` page, then to the JSON default.
pub type ErrorHandler = Arc<dyn Fn(&ProxyError) -> Option<Response<Bytes>> + Send + Sync>;

/// A live route: its settings plus its pool and picker, resolved once when the table is built.
pub struct Route {
    /// Unique name.
    pub name: Arc<str>,
    /// Normalised prefix.
    pub path: String,
    /// The service's pool.
    pub pool: Arc<ServicePool>,
    /// Policy and cursor.
    pub picker: Picker,
    /// Rewrite chain.
    pub rewrite: Vec<Rewrite>,
    /// Until response headers arrive.
    pub timeout: Duration,
    /// Pass the client's Host.
    pub preserve_host: bool,
    /// Custom error answer from the config.
    pub error: Option<ErrorPage>,
    /// Custom error answer from the library API; wins over `error`.
    pub error_handler: Option<ErrorHandler>,
    /// Request body limit.
    pub max_body: Option<u64>,
    /// Retry policy.
    pub retry: crate::rules::retry::RetryPolicy,
    /// Requests and retries in flight, for the retry budget.
    pub budget: crate::rules::retry::RetryBudget,
    /// The stages a request runs before forwarding.
    pub pipeline: Pipeline,
    /// Limit on a streaming response once its headers arrived.
    pub stream_timeout: Option<Duration>,
    /// This route's own upstream client (TLS settings, h2c); `None` uses the shared one.
    pub client: Option<super::client::UpstreamClient>,
    /// An HTTP/1.1-only client for protocol upgrades to TLS upstreams (ALPN could pick h2).
    pub upgrade_client: Option<super::client::UpstreamClient>,
    /// The mesh destination when the route's service is reached over Connect mTLS.
    pub mesh: Option<super::mesh::MeshUpstream>,
    /// Relay HTTP/1.1 upgrades (WebSocket).
    pub websocket: bool,
    /// Close an upgraded connection after this much silence.
    pub websocket_idle_timeout: Option<Duration>,
    /// Request counts by method and status class, latency histograms, retries.
    pub metrics: crate::metrics::RouteMetrics,
    /// The route's response store, when `cache` is on (shared with its stage; purged by admin).
    pub cache: Option<Arc<crate::cache::Cache>>,
    rate_limiter: Option<Arc<RateLimiter>>,
    /// The route's `auth`, for `/status` and `/explain` (its stage holds its own copy).
    pub auth: Option<crate::auth::AuthSettings>,
    requests: AtomicU64,
    failures: AtomicU64,
}

impl std::fmt::Debug for Route {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Route")
            .field("name", &self.name)
            .field("path", &self.path)
            .finish()
    }
}

impl Route {
    /// Builds the live route from its config and its service's pool.
    pub fn new(
        cfg: &RouteConfig,
        pool: Arc<ServicePool>,
        error_handler: Option<ErrorHandler>,
        limiter: Option<Arc<Limiter>>,
        rate_limiter: Option<Arc<RateLimiter>>,
    ) -> Self {
        let pool_name = pool.name().clone();
        let metrics = crate::metrics::RouteMetrics::default();
        let cache = cfg.cache.clone().map(crate::cache::Cache::new);
        let stages = Stages {
            limiter,
            rate_limiter: rate_limiter.clone(),
            rate_limit_metrics: metrics.rate_limit.clone(),
            auth_counters: metrics.auth.clone(),
            cache: cache.clone(),
        };
        Self {
            name: cfg.name.clone(),
            path: cfg.path.clone(),
            pool,
            picker: Picker::new(cfg.policy).with_panic_threshold(cfg.panic_threshold),
            retry: cfg.retry.clone(),
            budget: Default::default(),
            pipeline: pipeline(cfg, pool_name, stages),
            cache,
            stream_timeout: cfg.stream_timeout,
            metrics,
            rate_limiter,
            auth: cfg.auth.clone(),
            client: None,
            upgrade_client: None,
            mesh: None,
            websocket: cfg.websocket,
            websocket_idle_timeout: cfg.websocket_idle_timeout,
            rewrite: cfg.rewrite.clone(),
            timeout: cfg.timeout,
            preserve_host: cfg.preserve_host,
            error: cfg.error.clone(),
            error_handler,
            max_body: cfg.max_body,
            requests: AtomicU64::new(0),
            failures: AtomicU64::new(0),
        }
    }

    /// Counts one request and whether the gateway failed it.
    pub fn record(&self, failed: bool) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        if failed {
            self.failures.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The route's rate limiter (shared with the routes of its named policy).
    pub fn rate_limiter(&self) -> Option<&Arc<RateLimiter>> {
        self.rate_limiter.as_ref()
    }

    /// Requests routed here.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// Requests the gateway answered with an error of its own.
    pub fn failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }
}

/// The shared live objects a route's stages use, made by the registry.
struct Stages {
    limiter: Option<Arc<Limiter>>,
    rate_limiter: Option<Arc<RateLimiter>>,
    rate_limit_metrics: Arc<crate::metrics::RateLimitMetrics>,
    auth_counters: Arc<crate::metrics::AuthCounters>,
    cache: Option<Arc<crate::cache::Cache>>,
}

/// A route's stages from its settings, in the documented order; stages with nothing to do are
/// left out, so a plain route runs only the forwarding headers.
fn pipeline(cfg: &RouteConfig, service: Arc<str>, live: Stages) -> Pipeline {
    let mut stages: Vec<Box<dyn Stage>> = Vec::new();
    if let Some(settings) = &cfg.auth {
        stages.push(Box::new(super::auth::Auth {
            settings: settings.clone(),
            counters: live.auth_counters,
            route: cfg.name.clone(),
        }));
    }
    if let Some(limiter) = live.rate_limiter {
        stages.push(Box::new(RateLimit {
            limiter,
            route: cfg.name.clone(),
            metrics: live.rate_limit_metrics,
        }));
    }
    if let Some(cache) = live.cache {
        stages.push(Box::new(super::cache::CacheStage {
            cache,
            authenticated: cfg.auth.is_some(),
        }));
    }
    if let Some(limit) = cfg.max_body {
        stages.push(Box::new(BodyLimit { limit }));
    }
    if let Some(limiter) = live.limiter {
        stages.push(Box::new(Concurrency { limiter, service }));
    }
    stages.push(Box::new(ForwardingHeaders {
        preserve_host: cfg.preserve_host,
    }));
    if !cfg.request_headers.is_empty() || !cfg.response_headers.is_empty() {
        stages.push(Box::new(HeaderRules {
            request: cfg.request_headers.clone(),
            response: cfg.response_headers.clone(),
        }));
    }
    if !cfg.rewrite.is_empty() {
        stages.push(Box::new(RewritePath {
            chain: cfg.rewrite.clone(),
        }));
    }
    Pipeline::new(stages)
}

/// Routes ordered for longest-prefix matching.
#[derive(Debug, Default)]
pub struct RouteTable {
    /// Longest prefix first.
    routes: Vec<Arc<Route>>,
}

impl RouteTable {
    /// Orders routes so the first match is the longest prefix.
    pub fn new(mut routes: Vec<Arc<Route>>) -> Self {
        routes.sort_by(|a, b| {
            b.path
                .len()
                .cmp(&a.path.len())
                .then_with(|| a.path.cmp(&b.path))
        });
        Self { routes }
    }

    /// The route whose prefix matches `path` (already dot-normalised) on a segment boundary.
    pub fn find(&self, path: &str) -> Option<&Arc<Route>> {
        self.routes
            .iter()
            .find(|r| strip_segment_prefix(path, &r.path).is_some())
    }

    /// All routes, longest prefix first.
    pub fn routes(&self) -> &[Arc<Route>] {
        &self.routes
    }
}
