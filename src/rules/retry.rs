//! Retry policy: which failures may be retried, the jittered backoff, and the retry budget
//! that keeps retries from multiplying load when everything fails.

use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::time::Duration;

use http::Method;

/// Conditions under which a failed attempt is retried.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryOn {
    /// The connection failed before anything was sent: retried whatever the method.
    pub connect_failure: bool,
    /// The connection broke after the request was sent, or (as in Envoy) the attempt did not
    /// answer within its `per_try_timeout`.
    pub reset: bool,
    /// An attempt's `per_try_timeout` expired.
    pub timeout: bool,
    /// Upstream answers with these statuses.
    pub statuses: Vec<u16>,
}

impl Default for RetryOn {
    fn default() -> Self {
        Self {
            connect_failure: true,
            reset: true,
            timeout: false,
            statuses: vec![502, 503, 504],
        }
    }
}

/// A route's retry policy.
#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    /// Attempts in all, the first included.
    pub attempts: u32,
    /// First backoff.
    pub backoff: Duration,
    /// Backoff cap.
    pub max_backoff: Duration,
    /// Time for one attempt's response headers; `None` = the route's timeout.
    pub per_try_timeout: Option<Duration>,
    /// Retry conditions.
    pub on: RetryOn,
    /// Retries allowed in flight as a share (percent) of requests in flight.
    pub budget_percent: f64,
    /// Largest body kept for replay.
    pub max_body: u64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            attempts: 3,
            backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(1),
            per_try_timeout: None,
            on: RetryOn::default(),
            budget_percent: 20.0,
            max_body: 64 * 1024,
        }
    }
}

/// Retries always allowed at once, whatever the balance. Envoy uses 3; a burst of resets when
/// one upstream dies (every request in flight on it at once) needs more.
const MIN_RETRY_CONCURRENCY: usize = 10;

/// Most retries the balance can save up: the largest burst a route that was healthy for a
/// while can retry at once (on top of `MIN_RETRY_CONCURRENCY`).
const MAX_SAVED_RETRIES: i64 = 100;

impl RetryPolicy {
    /// Jittered exponential backoff before retry number `retry` (1-based): half fixed, half random.
    pub fn backoff(&self, retry: u32) -> Duration {
        let exp = self
            .backoff
            .saturating_mul(1u32 << (retry.saturating_sub(1)).min(16))
            .min(self.max_backoff);
        let half = exp / 2;
        half + half.mul_f64(fastrand::f64())
    }
}

/// Whether a method may be sent twice without changing the outcome (RFC 9110 section 9.2.2).
pub fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE
    )
}

/// A route's retry budget. Retries in flight may be `percent` of the requests in flight (at
/// least `MIN_RETRY_CONCURRENCY`), as in Envoy. Beyond that, a retry can spend savings: every
/// request deposits `percent` of a retry (as in Finagle), so a burst of failures (every request
/// in flight on an upstream that just died) is retried in full when the route was healthy
/// before, while a lasting storm stays capped.
#[derive(Debug, Default)]
pub struct RetryBudget {
    active: AtomicUsize,
    retries: AtomicUsize,
    /// Saved retries, in thousandths.
    balance: AtomicI64,
}

/// Holds one request in the budget's count until dropped.
#[derive(Debug)]
pub struct ActiveGuard<'a>(&'a RetryBudget);

impl Drop for ActiveGuard<'_> {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Holds one retry in the budget's count until dropped.
#[derive(Debug)]
pub struct RetryGuard<'a>(&'a RetryBudget);

impl Drop for RetryGuard<'_> {
    fn drop(&mut self) {
        self.0.retries.fetch_sub(1, Ordering::Relaxed);
    }
}

impl RetryBudget {
    /// Counts a request in flight and deposits its share of a retry.
    pub fn enter(&self, percent: f64) -> ActiveGuard<'_> {
        self.active.fetch_add(1, Ordering::Relaxed);
        let share = (percent * 10.0) as i64;
        let prev = self.balance.fetch_add(share, Ordering::Relaxed);
        if prev + share > MAX_SAVED_RETRIES * 1000 {
            // Racing deposits may overshoot a little; the cap is a bound, not an exact value.
            self.balance
                .fetch_min(MAX_SAVED_RETRIES * 1000, Ordering::Relaxed);
        }
        ActiveGuard(self)
    }

    /// Takes a retry slot when `percent` of the active requests (at least a few) allows one,
    /// or else when a whole saved retry can be spent.
    pub fn try_retry(&self, percent: f64) -> Option<RetryGuard<'_>> {
        let active = self.active.load(Ordering::Relaxed);
        let allowed = ((active as f64 * percent / 100.0) as usize).max(MIN_RETRY_CONCURRENCY);
        let prev = self.retries.fetch_add(1, Ordering::Relaxed);
        if prev < allowed {
            return Some(RetryGuard(self));
        }
        if self.balance.fetch_sub(1000, Ordering::Relaxed) >= 1000 {
            return Some(RetryGuard(self));
        }
        self.balance.fetch_add(1000, Ordering::Relaxed);
        self.retries.fetch_sub(1, Ordering::Relaxed);
        None
    }

    /// Retries in flight now.
    pub fn retries_in_flight(&self) -> usize {
        self.retries.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_with_jitter_and_caps() {
        let p = RetryPolicy::default();
        for retry in 1..=8u32 {
            let d = p.backoff(retry);
            let exp = (Duration::from_millis(100) * (1 << (retry - 1))).min(Duration::from_secs(1));
            assert!(d >= exp / 2 && d <= exp, "retry {retry}: {d:?}");
        }
    }

    #[test]
    fn budget_allows_a_share_with_a_minimum_plus_savings() {
        let b = RetryBudget::default();
        // 100 requests in flight at 20 %: 20 retries by share, and 20 saved by their deposits.
        let active: Vec<_> = (0..100).map(|_| b.enter(20.0)).collect();
        let retries: Vec<_> = (0..60).filter_map(|_| b.try_retry(20.0)).collect();
        assert_eq!(retries.len(), 40);
        drop(retries);
        drop(active);
        // Savings spent: one request in flight gets the floor (its deposit is a fifth of one).
        let _one = b.enter(20.0);
        let few: Vec<_> = (0..20).filter_map(|_| b.try_retry(20.0)).collect();
        assert_eq!(few.len(), MIN_RETRY_CONCURRENCY);
        drop(few);
        assert_eq!(b.retries_in_flight(), 0);
    }

    #[test]
    fn savings_are_capped() {
        let b = RetryBudget::default();
        for _ in 0..100_000 {
            drop(b.enter(20.0));
        }
        let burst: Vec<_> = (0..1000).filter_map(|_| b.try_retry(20.0)).collect();
        assert_eq!(
            burst.len(),
            MIN_RETRY_CONCURRENCY + MAX_SAVED_RETRIES as usize
        );
    }

    #[test]
    fn idempotent_methods() {
        assert!(is_idempotent(&Method::GET));
        assert!(is_idempotent(&Method::PUT));
        assert!(!is_idempotent(&Method::POST));
        assert!(!is_idempotent(&Method::PATCH));
    }
}
