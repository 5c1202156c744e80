//! The `rate_limit` stage: charges the request to its key's bucket, refuses it with 429 when
//! the bucket is empty, and adds the RateLimit headers to admitted responses.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use http::header::HeaderName;
use http::Response;

use super::body::ResponseBody;
use super::error::{ProxyError, RateLimitRefusal};
use super::pipeline::{Exchange, Flow, Stage, Step};
use crate::metrics::RateLimitMetrics;
use crate::ratelimit::{Decision, KeySource, RateLimiter, Scope, Via};

/// `RateLimit-Policy` (draft-ietf-httpapi-ratelimit-headers).
pub static RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
/// `RateLimit`.
pub static RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");

/// A route's rate limit; the limiter may be shared with other routes (a named policy).
pub struct RateLimit {
    /// The buckets.
    pub limiter: Arc<RateLimiter>,
    /// The route, for `key = "route"`.
    pub route: Arc<str>,
    /// The route's counters.
    pub metrics: Arc<RateLimitMetrics>,
}

impl RateLimit {
    fn decide(&self, ex: &mut Exchange<'_>, d: Decision) -> Result<(), ProxyError> {
        if matches!(d.via, Via::StoreError(_)) {
            self.metrics.store_errors.fetch_add(1, Ordering::Relaxed);
        }
        let settings = self.limiter.settings();
        if d.allowed {
            self.metrics.allowed.fetch_add(1, Ordering::Relaxed);
            if settings.headers {
                ex.rate_limit = Some(d);
            }
            return Ok(());
        }
        self.metrics.limited.fetch_add(1, Ordering::Relaxed);
        Err(ProxyError::RateLimited(Box::new(RateLimitRefusal {
            name: settings.name.clone(),
            via: d.via.as_str(),
            retry_after: d.retry_after,
            policy: self.limiter.policy_header().clone(),
            state: self.limiter.state_header(&d),
        })))
    }

    fn missing(&self) -> ProxyError {
        self.metrics.missing_key.fetch_add(1, Ordering::Relaxed);
        ProxyError::RateLimitKeyMissing {
            name: self.limiter.settings().name.clone(),
        }
    }
}

impl Stage for RateLimit {
    fn name(&self) -> &'static str {
        "rate_limit"
    }

    fn on_request<'a>(&'a self, ex: &'a mut Exchange<'_>) -> Step<'a> {
        let src = KeySource {
            client: ex.client,
            route: &self.route,
            headers: &ex.head.headers,
            jwt_claims: ex.jwt_claims.as_deref(),
            api_key: ex.api_key.as_deref(),
        };
        match self.limiter.settings().scope {
            // Decided at once, in process: no box, no allocation.
            Scope::Local => match self.limiter.check_local(&src) {
                None => Step::Fail(self.missing()),
                Some(d) => match self.decide(ex, d) {
                    Ok(()) => Step::Next,
                    Err(e) => Step::Fail(e),
                },
            },
            Scope::Global => match self.limiter.global_key(&src) {
                None => Step::Fail(self.missing()),
                Some(key) => Step::Wait(Box::pin(async move {
                    let d = self.limiter.check_global(&key).await;
                    self.decide(ex, d).map(|()| Flow::Next)
                })),
            },
        }
    }

    fn on_response(&self, ex: &Exchange<'_>, resp: &mut Response<ResponseBody>) {
        if let Some(d) = &ex.rate_limit {
            let h = resp.headers_mut();
            h.insert(
                RATELIMIT_POLICY.clone(),
                self.limiter.policy_header().clone(),
            );
            h.insert(RATELIMIT.clone(), self.limiter.state_header(d));
        }
    }
}
