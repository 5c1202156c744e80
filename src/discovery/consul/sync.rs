//! `ServiceSync`: the discovery status of one watched service (or of the catalog), written by
//! its watch and read by /status, /ready and /explain.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use serde::Serialize;
use tokio::sync::watch;
use tokio::time::Instant;

use super::client::QueryMeta;
use super::decode::ExcludedInstance;
use super::error::ConsulError;
use crate::error::Chain;

/// Discovery status of one service (or of the catalog watch), shared with /status and
/// /ready. Written only by its watch; readers never block it.
///
/// Counters are atomics; the last error text sits in a `std::sync::Mutex`, which is fine
/// because neither the writer (once per Consul answer) nor /status is on the request path
/// and the lock is never held across an `.await`.
#[derive(Debug)]
pub struct ServiceSync {
    /// Fixed reference point so `last_success` fits in an atomic.
    origin: Instant,
    synced: watch::Sender<bool>,
    /// Nanoseconds after `origin` plus one; 0 = never.
    last_success: AtomicU64,
    last_index: AtomicU64,
    consecutive_errors: AtomicU64,
    acl_filtered: AtomicBool,
    acl_denied: AtomicBool,
    queries_total: AtomicU64,
    errors_total: AtomicU64,
    instances: AtomicU64,
    /// The last answer listed the service at all (see [`ServiceSync::registered`]).
    registered: AtomicBool,
    last_error: Mutex<Option<String>>,
    /// Instances of the last answer left out of the pool, with the reason (for `/explain`).
    excluded: arc_swap::ArcSwap<Vec<ExcludedInstance>>,
}

impl Default for ServiceSync {
    fn default() -> Self {
        Self::new()
    }
}

/// Point-in-time copy of a [`ServiceSync`], for /status.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SyncSnapshot {
    /// At least one successful answer was published.
    pub synced_once: bool,
    /// Seconds since the last successful answer; `None` before the first one.
    pub staleness_seconds: Option<f64>,
    /// Last `X-Consul-Index` seen (0 before the first answer).
    pub last_index: u64,
    /// Failed queries since the last success.
    pub consecutive_errors: u64,
    /// Text of the last error (with its causes); cleared by the next success.
    pub last_error: Option<String>,
    /// The last answer said ACLs hid some results (`X-Consul-Results-Filtered-By-ACLs`).
    pub acl_filtered: bool,
    /// The last query was refused for ACL reasons (403).
    pub acl_denied: bool,
    /// Queries sent, successful or not.
    pub queries_total: u64,
    /// Failed queries.
    pub errors_total: u64,
    /// Endpoints (or catalog services) in the last published set.
    pub instances: u64,
}

impl ServiceSync {
    /// A fresh, never-synced status.
    pub fn new() -> Self {
        Self {
            origin: Instant::now(),
            synced: watch::Sender::new(false),
            last_success: AtomicU64::new(0),
            last_index: AtomicU64::new(0),
            consecutive_errors: AtomicU64::new(0),
            acl_filtered: AtomicBool::new(false),
            acl_denied: AtomicBool::new(false),
            queries_total: AtomicU64::new(0),
            errors_total: AtomicU64::new(0),
            instances: AtomicU64::new(0),
            registered: AtomicBool::new(false),
            last_error: Mutex::new(None),
            excluded: Default::default(),
        }
    }

    /// True once the first successful answer has been published via `on_change`.
    pub fn is_synced(&self) -> bool {
        *self.synced.borrow()
    }

    /// Resolves once the first successful answer has been published (at once if it was).
    /// Never resolves if Consul never answers: wrap it in a timeout (`startup_timeout`).
    pub async fn synced(&self) {
        let mut rx = self.synced.subscribe();
        // Err only if the sender is dropped, and it lives as long as `self`.
        let _ = rx.wait_for(|synced| *synced).await;
    }

    /// [`Self::synced`] bounded by `timeout`; returns whether it synced in time.
    pub async fn wait_synced(&self, timeout: Duration) -> bool {
        tokio::time::timeout(timeout, self.synced()).await.is_ok()
    }

    /// When the last successful answer arrived, if any.
    pub fn last_success(&self) -> Option<Instant> {
        match self.last_success.load(Ordering::Relaxed) {
            0 => None,
            n => Some(self.origin + Duration::from_nanos(n - 1)),
        }
    }

    /// Instances of the last answer that are not in the pool, and why.
    pub fn excluded(&self) -> Arc<Vec<ExcludedInstance>> {
        self.excluded.load_full()
    }

    pub(super) fn set_excluded(&self, excluded: Vec<ExcludedInstance>) {
        if excluded.is_empty() && self.excluded.load().is_empty() {
            return;
        }
        self.excluded.store(Arc::new(excluded));
    }

    /// True when the last successful answer listed at least one instance of the service,
    /// whatever its health: false before the first answer and once Consul no longer knows
    /// the service (deregistered; or hidden by the required tags or ACLs). Set before the
    /// watch's `on_change` runs, so `on_change` can tell "gone" from "all unhealthy".
    pub fn registered(&self) -> bool {
        self.registered.load(Ordering::Relaxed)
    }

    pub(super) fn set_registered(&self, registered: bool) {
        self.registered.store(registered, Ordering::Relaxed);
    }

    /// Failed queries since the last success.
    pub fn consecutive_errors(&self) -> u64 {
        self.consecutive_errors.load(Ordering::Relaxed)
    }

    /// A consistent-enough copy for /status (each field is read atomically on its own).
    pub fn snapshot(&self) -> SyncSnapshot {
        let now = Instant::now();
        SyncSnapshot {
            synced_once: self.is_synced(),
            staleness_seconds: self
                .last_success()
                .map(|at| now.saturating_duration_since(at).as_secs_f64()),
            last_index: self.last_index.load(Ordering::Relaxed),
            consecutive_errors: self.consecutive_errors(),
            last_error: self.lock_error().clone(),
            acl_filtered: self.acl_filtered.load(Ordering::Relaxed),
            acl_denied: self.acl_denied.load(Ordering::Relaxed),
            queries_total: self.queries_total.load(Ordering::Relaxed),
            errors_total: self.errors_total.load(Ordering::Relaxed),
            instances: self.instances.load(Ordering::Relaxed),
        }
    }

    fn lock_error(&self) -> std::sync::MutexGuard<'_, Option<String>> {
        // A panic while holding this lock cannot leave the Option half-written.
        self.last_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    pub(super) fn record_success(&self, meta: &QueryMeta) {
        self.queries_total.fetch_add(1, Ordering::Relaxed);
        self.touch();
        self.last_index.store(meta.index, Ordering::Relaxed);
        self.consecutive_errors.store(0, Ordering::Relaxed);
        self.acl_filtered
            .store(meta.filtered_by_acls, Ordering::Relaxed);
        self.acl_denied.store(false, Ordering::Relaxed);
        *self.lock_error() = None;
    }

    pub(super) fn record_error(&self, error: &ConsulError) {
        self.queries_total.fetch_add(1, Ordering::Relaxed);
        self.errors_total.fetch_add(1, Ordering::Relaxed);
        self.consecutive_errors.fetch_add(1, Ordering::Relaxed);
        self.acl_denied.store(error.is_acl(), Ordering::Relaxed);
        *self.lock_error() = Some(Chain(error).to_string());
    }

    /// Marks the data as confirmed current without a query of its own (change-feed mode).
    pub(super) fn touch(&self) {
        let nanos = self.origin.elapsed().as_nanos();
        let nanos = u64::try_from(nanos).unwrap_or(u64::MAX - 1);
        self.last_success.store(nanos + 1, Ordering::Relaxed);
    }

    pub(super) fn set_instances(&self, n: usize) {
        self.instances
            .store(u64::try_from(n).unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    pub(super) fn mark_synced(&self) {
        self.synced
            .send_if_modified(|synced| !std::mem::replace(synced, true));
    }
}
