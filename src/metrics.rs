//! Metric atomics: the request path only bumps counters and histograms that live on routes,
//! endpoints and the gateway; `control::prometheus` reads them at scrape time, so no lock is
//! taken per request and labels stay bounded.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use http::Method;

/// Histogram bucket bounds in seconds.
pub const BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// A lock-free fixed-bucket latency histogram.
#[derive(Debug, Default)]
pub struct Histogram {
    buckets: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    sum_micros: AtomicU64,
}

impl Histogram {
    /// Records one observation.
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        if let Some(i) = BUCKETS.iter().position(|b| secs <= *b) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_micros
            .fetch_add(d.as_micros() as u64, Ordering::Relaxed);
    }

    /// Sum in seconds, count, and per-bucket (not cumulative) counts ending with `+Inf`, the
    /// shape prometheus-client's encoder expects (it accumulates them itself).
    pub fn snapshot(&self) -> (f64, u64, Vec<(f64, u64)>) {
        let mut buckets: Vec<(f64, u64)> = BUCKETS
            .iter()
            .zip(&self.buckets)
            .map(|(b, c)| (*b, c.load(Ordering::Relaxed)))
            .collect();
        let finite: u64 = buckets.iter().map(|(_, c)| c).sum();
        let count = self.count.load(Ordering::Relaxed).max(finite);
        buckets.push((f64::INFINITY, count - finite));
        (
            self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6,
            count,
            buckets,
        )
    }

    /// Estimated quantile (0..1) in seconds by linear interpolation inside its bucket.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        let (_, count, buckets) = self.snapshot();
        if count == 0 {
            return None;
        }
        let rank = q * count as f64;
        let mut prev = (0.0, 0u64);
        let mut cum = 0u64;
        for (bound, n) in buckets {
            cum += n;
            if cum as f64 >= rank {
                if bound.is_infinite() {
                    return Some(prev.0);
                }
                let inside = (cum - prev.1) as f64;
                let frac = if inside > 0.0 {
                    (rank - prev.1 as f64) / inside
                } else {
                    1.0
                };
                return Some(prev.0 + (bound - prev.0) * frac.clamp(0.0, 1.0));
            }
            prev = (bound, cum);
        }
        Some(prev.0)
    }
}

/// Method classes used as label values (bounded, unlike raw methods).
pub const METHODS: [&str; 8] = [
    "GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "OTHER",
];
/// Status classes used as label values.
pub const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

fn method_index(m: &Method) -> usize {
    match *m {
        Method::GET => 0,
        Method::HEAD => 1,
        Method::POST => 2,
        Method::PUT => 3,
        Method::DELETE => 4,
        Method::PATCH => 5,
        Method::OPTIONS => 6,
        _ => 7,
    }
}

/// Index into [`CLASSES`] for a status code.
pub fn class_index(status: u16) -> usize {
    (status / 100).clamp(1, 5) as usize - 1
}

/// Per-route request figures.
#[derive(Debug)]
pub struct RouteMetrics {
    /// `[metrics] enabled`: when false the request path records nothing here.
    enabled: bool,
    /// Requests by method ([`METHODS`]) and status class ([`CLASSES`]).
    pub requests: [[AtomicU64; 5]; 8],
    /// Time until the response headers went to the client.
    pub latency: Histogram,
    /// Time until the final attempt's upstream response headers arrived.
    pub upstream_latency: Histogram,
    /// Retries sent.
    pub retries: AtomicU64,
    /// Requests that needed a retry and then succeeded (non-5xx).
    pub retried_ok: AtomicU64,
    /// Requests that needed a retry and still failed.
    pub retried_failed: AtomicU64,
    /// The route's rate limit, shared with its stage.
    pub rate_limit: std::sync::Arc<RateLimitMetrics>,
}

/// A route's rate-limit counters.
#[derive(Debug, Default)]
pub struct RateLimitMetrics {
    /// Requests admitted.
    pub allowed: AtomicU64,
    /// Requests refused with 429.
    pub limited: AtomicU64,
    /// Requests refused with 400 for lacking a `required` key part.
    pub missing_key: AtomicU64,
    /// Decisions Redis failed to make (`on_store_error` decided).
    pub store_errors: AtomicU64,
}

impl Default for RouteMetrics {
    fn default() -> Self {
        Self {
            enabled: true,
            requests: Default::default(),
            latency: Histogram::default(),
            upstream_latency: Histogram::default(),
            retries: AtomicU64::new(0),
            retried_ok: AtomicU64::new(0),
            retried_failed: AtomicU64::new(0),
            rate_limit: Default::default(),
        }
    }
}

impl RouteMetrics {
    /// Turns recording on or off (from `[metrics] enabled`).
    pub fn set_enabled(&mut self, enabled: bool) {
        self.enabled = enabled;
    }

    /// Whether the request path records figures.
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Counts one answered request.
    pub fn record(&self, method: &Method, status: u16, elapsed: Duration) {
        if !self.enabled {
            return;
        }
        self.requests[method_index(method)][class_index(status)].fetch_add(1, Ordering::Relaxed);
        self.latency.observe(elapsed);
    }

    /// Records the final attempt's time to upstream response headers.
    pub fn observe_upstream(&self, elapsed: Duration) {
        if self.enabled {
            self.upstream_latency.observe(elapsed);
        }
    }
}

/// Gateway-wide figures.
#[derive(Debug, Default)]
pub struct GlobalMetrics {
    /// Requests being handled now.
    pub in_flight: AtomicI64,
    /// Requests no route matched.
    pub no_route: AtomicU64,
    /// Downstream connections accepted.
    pub connections_accepted: AtomicU64,
    /// Downstream connections open now.
    pub connections_open: AtomicI64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_and_quantiles() {
        let h = Histogram::default();
        for _ in 0..90 {
            h.observe(Duration::from_millis(2));
        }
        for _ in 0..10 {
            h.observe(Duration::from_millis(200));
        }
        let (sum, count, buckets) = h.snapshot();
        assert_eq!(count, 100);
        assert!((sum - (0.18 + 2.0)).abs() < 1e-6, "{sum}");
        assert_eq!(buckets.iter().find(|(b, _)| *b == 0.0025).unwrap().1, 90);
        assert_eq!(buckets.iter().find(|(b, _)| *b == 0.25).unwrap().1, 10);
        assert_eq!(buckets.iter().map(|(_, n)| n).sum::<u64>(), 100);
        assert_eq!(buckets.last().unwrap().1, 0);
        let p50 = h.quantile(0.5).unwrap();
        assert!(p50 > 0.001 && p50 <= 0.0025, "{p50}");
        let p99 = h.quantile(0.99).unwrap();
        assert!(p99 > 0.1 && p99 <= 0.25, "{p99}");
    }

    #[test]
    fn classes() {
        assert_eq!(CLASSES[class_index(204)], "2xx");
        assert_eq!(CLASSES[class_index(503)], "5xx");
        assert_eq!(CLASSES[class_index(99)], "1xx");
        assert_eq!(CLASSES[class_index(700)], "5xx");
    }
}
