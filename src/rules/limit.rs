//! Per-service concurrency caps (`max_requests`, `max_pending`). The uncontended path is one
//! atomic try-acquire; only requests that must queue touch the semaphore's waiter list.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

/// Caps concurrent requests to one service, with a bounded queue.
#[derive(Debug)]
pub struct Limiter {
    sem: Arc<Semaphore>,
    max_requests: usize,
    max_pending: usize,
    pending: AtomicUsize,
}

impl Limiter {
    /// At most `max_requests` at once and `max_pending` waiting.
    pub fn new(max_requests: usize, max_pending: usize) -> Self {
        Self {
            sem: Arc::new(Semaphore::new(max_requests)),
            max_requests,
            max_pending,
            pending: AtomicUsize::new(0),
        }
    }

    /// The configured limits, to tell whether a reload changed them.
    pub fn limits(&self) -> (usize, usize) {
        (self.max_requests, self.max_pending)
    }

    /// A permit when one is free now, without waiting.
    pub fn try_acquire(&self) -> Option<OwnedSemaphorePermit> {
        self.sem.clone().try_acquire_owned().ok()
    }

    /// A permit, waiting in the queue until `deadline` when there is room in it; `None` means
    /// the service is saturated (503).
    pub async fn acquire(&self, deadline: Instant) -> Option<OwnedSemaphorePermit> {
        if let Ok(p) = self.sem.clone().try_acquire_owned() {
            return Some(p);
        }
        if self.pending.fetch_add(1, Ordering::Relaxed) >= self.max_pending {
            self.pending.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        let got = tokio::time::timeout_at(deadline, self.sem.clone().acquire_owned()).await;
        self.pending.fetch_sub(1, Ordering::Relaxed);
        got.ok().and_then(Result::ok)
    }
}
