//! Watching many services: one blocking query each up to `max_watches`, beyond that a
//! change feed (`/v1/health/state/any` + `/v1/catalog/services`) driving targeted refreshes.

use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::client::{Answer, CatalogAnswer, ConsulClient, HealthAnswer, QueryMeta, StateAnswer};
use super::decode::CheckEntry;
use super::error::ConsulError;
use super::publish::Publisher;
use super::sync::ServiceSync;
use super::watch::{
    blocking_loop, watch_health, Backoff, Recorder, TokenBucket, QUERY_BURST, QUERY_REFILL,
};
use crate::discovery::Discovered;
use crate::error::Chain;

/// One service for [`watch_many`]: its name, its status, and where its endpoint sets go.
pub struct ServiceWatch {
    /// The Consul service name.
    name: Arc<str>,
    /// Written by the watch, read by /status and /ready.
    sync: Arc<ServiceSync>,
    /// Receives each changed endpoint set (when: see [`watch_service`]).
    publish: Box<dyn FnMut(Vec<Discovered>) + Send>,
    /// Read the service's mesh endpoints (`/v1/health/connect`) instead of its instances.
    connect: bool,
}

impl ServiceWatch {
    /// Watches `name`, records its status on `sync` and hands changed sets to `publish`.
    pub fn new(
        name: Arc<str>,
        sync: Arc<ServiceSync>,
        publish: impl FnMut(Vec<Discovered>) + Send + 'static,
    ) -> Self {
        Self {
            name,
            sync,
            publish: Box::new(publish),
            connect: false,
        }
    }

    /// Watches the service's mesh endpoints (its sidecars and Connect-native instances, from
    /// `/v1/health/connect/<name>`) instead of its instances.
    pub fn connect(mut self, connect: bool) -> Self {
        self.connect = connect;
        self
    }
}

/// Concurrent non-blocking health reads during a refresh round.
const REFRESH_CONCURRENCY: usize = 8;
/// Safety net: refresh every service this often even if the feed saw nothing (see the
/// trade-off on [`watch_many`]).
const RESYNC_EVERY: Duration = Duration::from_secs(300);

/// Watches every service in `services` until `cancel`, publishing by the same rules as
/// [`watch_service`] (both go through one `Publisher`).
///
/// - `services.len() <= max_watches`: one [`watch_service`] task each, i.e. that many
///   concurrent long polls (one HTTP connection each).
/// - More: a change feed. One blocking query on `/v1/health/state/any` (its index moves on
///   any check change) and one on `/v1/catalog/services` (registrations and instance
///   updates). When either wakes, only the affected services are re-read with plain
///   (non-blocking) `/v1/health/service/<name>` requests, at most 8 at a time, rounds
///   rate-limited like the loops (burst 2, then one per second). A service is affected when
///   the fingerprint of its checks (node, ID, status, ModifyIndex) moved, when a node-level
///   check (e.g. `serfHealth`) moved on a node hosting it, when its catalog tags changed, or
///   on any catalog wake if it has no checks. Every service is re-read on the first feed
///   answer, after a feed error, after an index reset, and every 5 minutes.
///
/// Trade-off: the feed costs 2 connections instead of N and wakes on *any* check change in
/// the datacenter (one `state/any` answer lists every check, so it is big on big clusters),
/// but it re-reads only what moved. An instance update that touches no check (e.g. a
/// re-registration with a new port and unchanged checks) is seen at the next check change,
/// catalog-triggered refresh or 5-minute resync, not instantly. In feed mode a service's
/// `sync` also reflects feed errors, and successful feed answers refresh its staleness.
pub async fn watch_many(
    client: ConsulClient,
    services: Vec<ServiceWatch>,
    max_watches: usize,
    cancel: CancellationToken,
) {
    if services.is_empty() {
        return;
    }
    if services.len() <= max_watches {
        let mut tasks = JoinSet::new();
        for ServiceWatch {
            name,
            sync,
            publish,
            connect,
        } in services
        {
            tasks.spawn(watch_health(
                client.clone(),
                name,
                connect,
                sync,
                publish,
                cancel.clone(),
            ));
        }
        while let Some(joined) = tasks.join_next().await {
            if let Err(error) = joined {
                if error.is_panic() {
                    tracing::error!(error = %error, "a Consul service watch panicked; that service is no longer updated");
                }
            }
        }
        return;
    }
    tracing::info!(
        services = services.len(),
        max_watches,
        "more services than max_watches; using the Consul change feed"
    );
    run_feed(client, services, cancel)
        .instrument(tracing::info_span!("consul_feed"))
        .await;
}

/// What the two feed loops tell the coordinator.
enum Wake {
    State {
        checks: Vec<CheckEntry>,
        fresh: bool,
    },
    Catalog {
        services: BTreeMap<String, Vec<String>>,
        fresh: bool,
    },
}

/// Records a feed loop's outcome on the feed itself and on every watched service.
struct FeedRecorder {
    services: Vec<Arc<ServiceSync>>,
}

impl Recorder for FeedRecorder {
    fn on_success(&self, _meta: &QueryMeta) {
        // The feed answered and (whatever it woke) every service not marked dirty is still
        // current; only vouch for services whose own last read succeeded.
        for sync in &self.services {
            if sync.is_synced() && sync.consecutive_errors() == 0 {
                sync.touch();
            }
        }
    }

    fn on_error(&self, error: &ConsulError) {
        for sync in &self.services {
            sync.record_error(error);
        }
    }
}

struct Watched {
    publisher: Publisher<Box<dyn FnMut(Vec<Discovered>) + Send>>,
    /// Read from `/v1/health/connect`.
    connect: bool,
    /// Nodes hosting the service at its last read, to map node-level checks to it.
    nodes: BTreeSet<String>,
}

/// Order-independent fingerprints of the checks, per service name and per node (node-level
/// checks only).
#[derive(Default, PartialEq)]
pub(super) struct Fingerprints {
    pub(super) services: HashMap<String, u64>,
    pub(super) nodes: HashMap<String, u64>,
}

pub(super) fn fingerprints(checks: &[CheckEntry]) -> Fingerprints {
    let mut fp = Fingerprints::default();
    for check in checks {
        let mut h = DefaultHasher::new();
        (
            &check.node,
            &check.check_id,
            &check.service_id,
            &check.status,
            check.modify_index,
        )
            .hash(&mut h);
        // Wrapping sum: independent of the order Consul lists checks in.
        let slot = if check.service_id.is_empty() {
            fp.nodes.entry(check.node.clone()).or_default()
        } else {
            fp.services.entry(check.service_name.clone()).or_default()
        };
        *slot = slot.wrapping_add(h.finish());
    }
    fp
}

async fn run_feed(client: ConsulClient, services: Vec<ServiceWatch>, cancel: CancellationToken) {
    let syncs: Vec<Arc<ServiceSync>> = services.iter().map(|w| w.sync.clone()).collect();
    let mut watched: Vec<Watched> = services
        .into_iter()
        .map(|w| Watched {
            connect: w.connect,
            publisher: Publisher::new(
                w.name,
                w.sync,
                w.publish,
                client.warning_mode(),
                client.required_tags().to_vec(),
            ),
            nodes: BTreeSet::new(),
        })
        .collect();

    // Unbounded is fine: each producer is rate-limited to about one answer per second and
    // the coordinator drains everything pending on each wake.
    let (tx, mut rx) = mpsc::unbounded_channel::<Wake>();
    let mut loops = JoinSet::new();
    {
        let client = client.clone();
        let cancel = cancel.clone();
        let tx = tx.clone();
        let recorder = FeedRecorder {
            services: syncs.clone(),
        };
        loops.spawn(
            async move {
                let fetch = |index| {
                    let client = client.clone();
                    async move { client.health_state_any(index).await }
                };
                blocking_loop(
                    "health/state/any",
                    &recorder,
                    &cancel,
                    fetch,
                    |answer: StateAnswer, fresh| {
                        // Send fails only once the coordinator is gone, i.e. on shutdown.
                        let _ = tx.send(Wake::State {
                            checks: answer.checks,
                            fresh,
                        });
                    },
                )
                .await;
            }
            .in_current_span(),
        );
    }
    {
        let client = client.clone();
        let cancel = cancel.clone();
        let recorder = FeedRecorder {
            services: syncs.clone(),
        };
        loops.spawn(
            async move {
                let fetch = |index| {
                    let client = client.clone();
                    async move { client.catalog_services(index).await }
                };
                blocking_loop(
                    "catalog/services",
                    &recorder,
                    &cancel,
                    fetch,
                    |answer: CatalogAnswer, fresh| {
                        let _ = tx.send(Wake::Catalog {
                            services: answer.services,
                            fresh,
                        });
                    },
                )
                .await;
            }
            .in_current_span(),
        );
    }

    let mut prints: Option<Fingerprints> = None;
    let mut catalog: Option<BTreeMap<String, Vec<String>>> = None;
    let mut pending: BTreeSet<usize> = BTreeSet::new();
    let mut bucket = TokenBucket::new(QUERY_BURST, QUERY_REFILL);
    let mut backoff = Backoff::default();
    let mut retry_at: Option<Instant> = None;
    let mut resync = tokio::time::interval_at(Instant::now() + RESYNC_EVERY, RESYNC_EVERY);
    resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

    loop {
        tokio::select! {
            _ = cancel.cancelled() => break,
            wake = rx.recv() => {
                let Some(wake) = wake else { break };
                let mut next = Some(wake);
                while let Some(wake) = next {
                    apply_wake(wake, &watched, &mut prints, &mut catalog, &mut pending);
                    next = rx.try_recv().ok();
                }
            }
            _ = sleep_until_opt(retry_at) => {
                retry_at = None;
            }
            _ = resync.tick() => {
                pending.extend(0..watched.len());
            }
        }
        // While backing off, failed services wait for the timer; new wakes still add to
        // `pending` and are served together when it fires.
        if pending.is_empty() || retry_at.is_some() {
            continue;
        }
        if cancel.run_until_cancelled(bucket.take()).await.is_none() {
            break;
        }
        let round = std::mem::take(&mut pending);
        let Some(failed) = cancel
            .run_until_cancelled(refresh(&client, &mut watched, round))
            .await
        else {
            break;
        };
        if failed.is_empty() {
            backoff.reset();
        } else {
            retry_at = Some(Instant::now() + backoff.next_delay());
            pending.extend(failed);
        }
    }
    loops.shutdown().await;
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Folds one feed answer into the coordinator's view and marks affected services pending.
fn apply_wake(
    wake: Wake,
    watched: &[Watched],
    prints: &mut Option<Fingerprints>,
    catalog: &mut Option<BTreeMap<String, Vec<String>>>,
    pending: &mut BTreeSet<usize>,
) {
    match wake {
        Wake::State { checks, fresh } => {
            let new = fingerprints(&checks);
            match prints.as_ref() {
                Some(old) if !fresh => {
                    for (i, w) in watched.iter().enumerate() {
                        let name: &str = w.publisher.service();
                        let moved = old.services.get(name) != new.services.get(name)
                            || w.nodes.iter().any(|n| old.nodes.get(n) != new.nodes.get(n));
                        if moved {
                            pending.insert(i);
                        }
                    }
                }
                _ => pending.extend(0..watched.len()),
            }
            *prints = Some(new);
        }
        Wake::Catalog { services, fresh } => {
            match catalog.as_ref() {
                Some(old) if !fresh => {
                    for (i, w) in watched.iter().enumerate() {
                        let name: &str = w.publisher.service();
                        let no_checks = prints
                            .as_ref()
                            .is_none_or(|p| !p.services.contains_key(name));
                        if no_checks || old.get(name) != services.get(name) {
                            pending.insert(i);
                        }
                    }
                }
                _ => pending.extend(0..watched.len()),
            }
            *catalog = Some(services);
        }
    }
}

/// Re-reads the given services (no index, at most [`REFRESH_CONCURRENCY`] at a time),
/// publishes real changes, and returns the ones that failed.
async fn refresh(
    client: &ConsulClient,
    watched: &mut [Watched],
    round: BTreeSet<usize>,
) -> BTreeSet<usize> {
    let mut queue = round.into_iter();
    let mut tasks: JoinSet<(usize, Result<HealthAnswer, ConsulError>)> = JoinSet::new();
    let mut failed = BTreeSet::new();
    loop {
        while tasks.len() < REFRESH_CONCURRENCY {
            let Some(i) = queue.next() else { break };
            let client = client.clone();
            let name = watched[i].publisher.service().clone();
            let connect = watched[i].connect;
            tasks.spawn(
                async move { (i, client.health(&name, connect, None).await) }.in_current_span(),
            );
        }
        let Some(joined) = tasks.join_next().await else {
            break;
        };
        let (i, result) = match joined {
            Ok(done) => done,
            Err(error) => {
                tracing::error!(error = %error, "a Consul refresh task failed");
                continue;
            }
        };
        let w = &mut watched[i];
        match result {
            Ok(answer) => {
                w.publisher.sync().record_success(&answer.meta());
                w.nodes = answer.entries.iter().map(|e| e.node.node.clone()).collect();
                w.publisher.apply(&answer);
            }
            // The same question gets the same refusal: wait for a reload, not a retry.
            Err(error) if error.is_config() => {
                w.publisher.sync().record_error(&error);
                tracing::error!(
                    service = %w.publisher.service(),
                    error = %Chain(&error),
                    "Consul refused the service read as configured; fix the configuration and reload"
                );
            }
            Err(error) => {
                w.publisher.sync().record_error(&error);
                tracing::warn!(
                    service = %w.publisher.service(),
                    error = %Chain(&error),
                    "Consul refresh failed; keeping the last known endpoints"
                );
                failed.insert(i);
            }
        }
    }
    failed
}
