//! Blocking-query loops (one service, the catalog) with Consul's index rules, a success rate
//! limit and error backoff, reporting to a `ServiceSync`. Publishing into pools is the
//! caller's `on_change`.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::client::{Answer, CatalogAnswer, ConsulClient, HealthAnswer, QueryMeta};
use super::decode::has_all_tags;
use super::error::ConsulError;
use super::publish::Publisher;
use super::sync::ServiceSync;
use crate::discovery::Discovered;
use crate::error::Chain;

/// Re-polls allowed back to back before the rate limit bites (Consul docs: burst 2).
pub(super) const QUERY_BURST: u32 = 2;
/// While an index churns, at most one query per this interval after the burst.
pub(super) const QUERY_REFILL: Duration = Duration::from_secs(1);
/// First error backoff: short enough to ride out a blip (agent restart, leader election).
pub(super) const BACKOFF_BASE: Duration = Duration::from_millis(500);
/// Backoff ceiling. The last good endpoints keep serving meanwhile, so this bounds how late
/// we notice Consul is back; 30s keeps that under a minute while costing a down cluster at
/// most one query per 15-30s per watch.
pub(super) const BACKOFF_CAP: Duration = Duration::from_secs(30);
/// A `Retry-After` longer than this is capped: one bad header must not stop discovery.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(300);

// === IndexStep ===

/// What a watch does with the `X-Consul-Index` of a successful answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IndexStep {
    /// New data (first answer, or the index moved forward): block on this index next and
    /// look at the answer (which may still be identical to the last one).
    Advance(u64),
    /// Same index as sent: the block timed out (or an idempotent write); nothing changed.
    Unchanged,
    /// The index went backwards (snapshot restore, reaped tombstone, upgrade): forget it and
    /// re-query at once without an index. Keeping the higher index would hang every request
    /// for a full `wait`.
    Reset,
}

/// Consul's index rules for blocking queries (API.md §1.3).
///
/// `prev` is the index the request was sent with (`None` for a plain read). An index of 0
/// is read as 1: 0 never blocks, so adopting it would busy-loop (Consul servers already
/// rewrite 0 to 1; this guards older ones and proxies).
pub fn next_index(prev: Option<u64>, got: u64) -> IndexStep {
    let got = got.max(1);
    match prev {
        None => IndexStep::Advance(got),
        Some(prev) if got > prev => IndexStep::Advance(got),
        Some(prev) if got == prev => IndexStep::Unchanged,
        Some(_) => IndexStep::Reset,
    }
}

// === Backoff ===

/// Exponential error backoff with jitter: the ceiling doubles from `base` up to `cap`, and
/// each delay is drawn uniformly from `[ceiling/2, ceiling]` ("equal jitter": spread enough
/// that many watches do not retry in lockstep, never shorter than half the ceiling).
///
/// Defaults: base 500ms, cap 30s, i.e. ~0.5s, 1s, 2s, 4s, 8s, 16s, 30s, 30s ...
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    attempts: u32,
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new(BACKOFF_BASE, BACKOFF_CAP)
    }
}

impl Backoff {
    /// A backoff starting at `base` and never exceeding `cap`.
    pub fn new(base: Duration, cap: Duration) -> Self {
        Self {
            base,
            cap,
            attempts: 0,
        }
    }

    /// Upper bound of the next delay: `min(base * 2^attempts, cap)`.
    pub fn ceiling(&self) -> Duration {
        // 2^20 * base is far past any sane cap; stop shifting before it can overflow.
        let factor = 1u32 << self.attempts.min(20);
        self.base.saturating_mul(factor).min(self.cap)
    }

    /// The delay before the next retry; grows the ceiling for the one after.
    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self.ceiling();
        self.attempts = self.attempts.saturating_add(1);
        let half = ceiling / 2;
        half + half.mul_f64(fastrand::f64())
    }

    /// Failures since the last reset.
    pub fn attempts(&self) -> u32 {
        self.attempts
    }

    /// Back to `base` after a success.
    pub fn reset(&mut self) {
        self.attempts = 0;
    }
}

// === TokenBucket ===

/// Success-path rate limit: `burst` requests back to back, then one per `every`
/// (Consul's docs recommend a token bucket with burst 2 for blocking loops).
///
/// Implemented as GCRA on `tokio::time::Instant`, so it is exact and testable with paused
/// time. Starts full.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    every: Duration,
    /// How far ahead of `tat` a request may come: `every * (burst - 1)`.
    tolerance: Duration,
    /// Theoretical arrival time of the next request at the steady rate.
    tat: Instant,
}

impl TokenBucket {
    /// A full bucket of `burst` tokens (at least 1) refilled one per `every`.
    pub fn new(burst: u32, every: Duration) -> Self {
        Self {
            every,
            tolerance: every.saturating_mul(burst.max(1) - 1),
            tat: Instant::now(),
        }
    }

    /// Takes a token if one is available at `now`; otherwise returns how long to wait.
    pub fn try_take(&mut self, now: Instant) -> Result<(), Duration> {
        let earliest = now + self.tolerance;
        if earliest < self.tat {
            return Err(self.tat - earliest);
        }
        self.tat = self.tat.max(now) + self.every;
        Ok(())
    }

    /// Waits until a token is available and takes it.
    pub async fn take(&mut self) {
        while let Err(wait) = self.try_take(Instant::now()) {
            tokio::time::sleep(wait).await;
        }
    }
}

// === generic blocking loop ===

/// Where a loop reports each query's outcome.
pub(super) trait Recorder: Send + Sync {
    fn on_success(&self, meta: &QueryMeta);
    fn on_error(&self, error: &ConsulError);
}

impl Recorder for ServiceSync {
    fn on_success(&self, meta: &QueryMeta) {
        self.record_success(meta);
    }
    fn on_error(&self, error: &ConsulError) {
        self.record_error(error);
    }
}

/// Runs one blocking query until `cancel`, applying every client duty:
/// - first request (and the first after an error or a reset) without index;
/// - [`next_index`] on each answer; `on_answer(answer, fresh)` only for `Advance`, with
///   `fresh = true` when the request had no index (so nothing can be assumed about what
///   happened since the previous answer);
/// - a [`TokenBucket`] before every request, a [`Backoff`] (or `Retry-After`) after every
///   error, reset on success.
///
/// Errors never reach `on_answer`: callers keep their last good state.
pub(super) async fn blocking_loop<A, F, Fut>(
    label: &str,
    recorder: &dyn Recorder,
    cancel: &CancellationToken,
    mut fetch: F,
    mut on_answer: impl FnMut(A, bool),
) where
    A: Answer,
    F: FnMut(Option<u64>) -> Fut,
    Fut: Future<Output = Result<A, ConsulError>>,
{
    let mut index: Option<u64> = None;
    let mut bucket = TokenBucket::new(QUERY_BURST, QUERY_REFILL);
    let mut backoff = Backoff::default();
    let mut errors_in_row: u64 = 0;
    let mut filtered = false;
    let mut leaderless = false;
    loop {
        if cancel.run_until_cancelled(bucket.take()).await.is_none() {
            return;
        }
        let Some(result) = cancel.run_until_cancelled(fetch(index)).await else {
            return;
        };
        let answer = match result {
            Ok(answer) => answer,
            Err(error) if error.is_config() => {
                // Asking again gets the same refusal (a bad filter): report it and stop
                // until a reload with a fixed configuration replaces this watch.
                recorder.on_error(&error);
                tracing::error!(
                    consul.watch = label,
                    error = %Chain(&error),
                    "Consul refused the query as configured; not retrying until the configuration is fixed and reloaded"
                );
                cancel.cancelled().await;
                return;
            }
            Err(error) => {
                errors_in_row += 1;
                // A restarted or restored server may never reach our old index again.
                index = None;
                recorder.on_error(&error);
                let mut delay = backoff.next_delay();
                if let Some(retry_after) = error.retry_after() {
                    delay = delay.max(retry_after.min(MAX_RETRY_AFTER));
                }
                log_error(label, &error, errors_in_row, delay);
                if cancel
                    .run_until_cancelled(tokio::time::sleep(delay))
                    .await
                    .is_none()
                {
                    return;
                }
                continue;
            }
        };
        let meta = answer.meta();
        if errors_in_row > 0 {
            tracing::info!(
                consul.watch = label,
                consul.index = meta.index,
                errors = errors_in_row,
                "Consul answers again"
            );
        }
        errors_in_row = 0;
        backoff.reset();
        recorder.on_success(&meta);
        if meta.filtered_by_acls != filtered {
            filtered = meta.filtered_by_acls;
            if filtered {
                tracing::warn!(
                    consul.watch = label,
                    "Consul's ACLs hid some results from this token; missing instances may be an ACL policy problem"
                );
            } else {
                tracing::info!(consul.watch = label, "Consul no longer hides results (ACL)");
            }
        }
        if meta.known_leader == leaderless {
            leaderless = !meta.known_leader;
            if leaderless {
                tracing::warn!(
                    consul.watch = label,
                    consul.last_contact = ?meta.last_contact,
                    "Consul server has no known leader; answers may be stale"
                );
            } else {
                tracing::info!(consul.watch = label, "Consul server knows its leader again");
            }
        }
        match next_index(index, meta.index) {
            IndexStep::Advance(next) => {
                let fresh = index.is_none();
                index = Some(next);
                tracing::debug!(
                    consul.watch = label,
                    consul.index = next,
                    "new Consul index"
                );
                on_answer(answer, fresh);
            }
            IndexStep::Unchanged => {}
            IndexStep::Reset => {
                tracing::info!(
                    consul.watch = label,
                    consul.index = meta.index,
                    consul.previous_index = index,
                    "Consul index went backwards; re-querying without index"
                );
                index = None;
            }
        }
    }
}

/// Logs the first error of a run and every tenth after it at `warn`, the rest at `debug`,
/// so an outage does not flood the log (the backoff already spaces them out).
fn log_error(label: &str, error: &ConsulError, errors_in_row: u64, retry_in: Duration) {
    let loud = errors_in_row == 1 || errors_in_row % 10 == 0;
    let chain = Chain(error).to_string();
    if !loud {
        tracing::debug!(consul.watch = label, error = %chain, errors = errors_in_row, ?retry_in, "Consul query failed");
    } else if matches!(error, ConsulError::AclNotFound) {
        tracing::warn!(
            consul.watch = label,
            error = %chain,
            errors = errors_in_row,
            ?retry_in,
            "Consul does not know the ACL token (ACL not found): check token, token_file or CONSUL_HTTP_TOKEN; keeping the last known endpoints"
        );
    } else if error.is_acl() {
        tracing::warn!(
            consul.watch = label,
            error = %chain,
            errors = errors_in_row,
            ?retry_in,
            "Consul denied the query: the ACL token lacks permission; keeping the last known endpoints"
        );
    } else {
        tracing::warn!(
            consul.watch = label,
            error = %chain,
            errors = errors_in_row,
            ?retry_in,
            "Consul query failed; keeping the last known endpoints"
        );
    }
}

// === watch_service / watch_catalog ===

/// Watches one service with a blocking query on `/v1/health/service/<service>` until
/// `cancel`, and calls `on_change` with the normalised endpoint set (see
/// [`super::to_discovered`]) whenever it, or [`ServiceSync::registered`], really changed.
///
/// When `on_change` runs is decided in one place for this watch and [`super::watch_many`]
/// (`Publisher`, in `consul/publish.rs`): the first successful answer always, even when
/// empty; an unchanged set and registration never twice; a failed query never, so the last
/// good set stays in the pool. `sync` is marked synced after the first `on_change` returns.
/// Failures show in `sync` and in logs; the loop retries with backoff, without index.
pub async fn watch_service(
    client: ConsulClient,
    service: Arc<str>,
    sync: Arc<ServiceSync>,
    on_change: impl FnMut(Vec<Discovered>) + Send,
    cancel: CancellationToken,
) {
    watch_health(client, service, false, sync, on_change, cancel).await
}

/// [`watch_service`] on the service's instances, or with `connect` on its mesh endpoints
/// (`/v1/health/connect/<name>`: sidecars and Connect-native instances).
pub(super) async fn watch_health(
    client: ConsulClient,
    service: Arc<str>,
    connect: bool,
    sync: Arc<ServiceSync>,
    on_change: impl FnMut(Vec<Discovered>) + Send,
    cancel: CancellationToken,
) {
    let span = tracing::info_span!("consul_watch", service = %service);
    let kind = if connect { "connect" } else { "service" };
    let label = format!("health/{kind}/{service}");
    let mut publisher = Publisher::new(
        service.clone(),
        sync.clone(),
        on_change,
        client.warning_mode(),
        client.required_tags().to_vec(),
    );
    let fetch = |index| {
        let client = client.clone();
        let service = service.clone();
        async move { client.health(&service, connect, index).await }
    };
    let on_answer = |answer: HealthAnswer, _fresh: bool| {
        if !publisher.apply(&answer) {
            tracing::debug!(service = %service, consul.index = answer.index, "index moved, endpoint set unchanged");
        }
    };
    blocking_loop(&label, &*sync, &cancel, fetch, on_answer)
        .instrument(span)
        .await;
}

/// Watches `/v1/catalog/services` until `cancel` and calls `on_change` with the service
/// list (name → sorted union of tags) whenever it really changed; used for routes from
/// tags ([`super::parse_tag_routes`]).
///
/// Services whose tag union lacks one of the configured `tags` are left out (none of their
/// instances could qualify; the endpoint has no `?tag=`). The `consul` service itself is
/// kept; callers ignore it unless configured. Same duties and guarantees as
/// [`watch_service`]: failures never publish, the first success always does.
pub async fn watch_catalog(
    client: ConsulClient,
    sync: Arc<ServiceSync>,
    mut on_change: impl FnMut(BTreeMap<String, Vec<String>>) + Send,
    cancel: CancellationToken,
) {
    let span = tracing::info_span!("consul_watch", consul.watch = "catalog/services");
    let tags = client.required_tags().to_vec();
    let mut last: Option<BTreeMap<String, Vec<String>>> = None;
    let fetch = |index| {
        let client = client.clone();
        async move { client.catalog_services(index).await }
    };
    let on_answer = |answer: CatalogAnswer, _fresh: bool| {
        let mut services = answer.services;
        services.retain(|_, service_tags| has_all_tags(service_tags, &tags));
        sync.set_instances(services.len());
        if last.as_ref() != Some(&services) {
            tracing::info!(
                consul.index = answer.index,
                services = services.len(),
                "Consul service catalog changed"
            );
            on_change(services.clone());
            last = Some(services);
        }
        sync.mark_synced();
    };
    blocking_loop("catalog/services", &*sync, &cancel, fetch, on_answer)
        .instrument(span)
        .await;
}
