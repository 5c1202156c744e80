//! One endpoint of a pool: its address, its mutable state (health, ejection, counters, idle
//! connections) shared across snapshots, and the snapshot the balancers pick from.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::uri::Authority;

use super::hash;
use super::idle;
use crate::discovery::Discovered;

/// Mutable per-endpoint facts. Shared by every snapshot that contains the same `host:port`,
/// so counters and health survive discovery updates.
#[derive(Debug)]
pub struct EndpointState {
    /// Written only by active health probes.
    pub(super) healthy: AtomicBool,
    /// Passive ejection: `clock::now_ms()` until which no traffic goes here; 0 = not ejected.
    pub(super) ejected_until_ms: AtomicU64,
    /// How often this endpoint has been ejected (multiplies the ejection time).
    pub(super) ejections: AtomicU32,
    pub(super) consecutive_5xx: AtomicU32,
    pub(super) consecutive_gateway_failures: AtomicU32,
    /// When the endpoint last became eligible (new, healthy again, back from ejection); slow
    /// start ramps its share from here. 0 = ramp over.
    pub(super) ramp_start_ms: AtomicU64,
    pub(super) in_flight: AtomicUsize,
    pub(super) requests: AtomicU64,
    pub(super) failures: AtomicU64,
    /// Upstream answers by status class (1xx..5xx).
    pub(super) statuses: [AtomicU64; 5],
    /// Idle pooled HTTP/1.1 connections to this endpoint (plain HTTP routes; made on first use).
    pub(crate) idle_conns: std::sync::OnceLock<idle::IdleConns>,
}

impl EndpointState {
    pub(super) fn new(healthy: bool) -> Self {
        Self {
            healthy: AtomicBool::new(healthy),
            ejected_until_ms: AtomicU64::new(0),
            ejections: AtomicU32::new(0),
            consecutive_5xx: AtomicU32::new(0),
            consecutive_gateway_failures: AtomicU32::new(0),
            ramp_start_ms: AtomicU64::new(if healthy { crate::clock::now_ms() } else { 0 }),
            in_flight: AtomicUsize::new(0),
            requests: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            idle_conns: std::sync::OnceLock::new(),
            statuses: Default::default(),
        }
    }

    /// Counts an upstream answer's status.
    pub fn record_status(&self, status: u16) {
        self.statuses[crate::metrics::class_index(status)].fetch_add(1, Ordering::Relaxed);
    }

    /// Upstream answers in status class `class` (0 = 1xx .. 4 = 5xx).
    pub fn status_count(&self, class: usize) -> u64 {
        self.statuses
            .get(class)
            .map_or(0, |c| c.load(Ordering::Relaxed))
    }

    /// Whether active health checking lets traffic through (true unless probes failed it).
    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// Sets the probe verdict; only the health module calls this. Returns whether it changed.
    /// Becoming healthy also ends any ejection and starts the slow-start ramp.
    pub fn set_healthy(&self, healthy: bool) -> bool {
        let was = self.healthy.swap(healthy, Ordering::Relaxed);
        if healthy && !was {
            self.ejected_until_ms.store(0, Ordering::Relaxed);
            self.ramp_start_ms
                .store(crate::clock::now_ms(), Ordering::Relaxed);
        }
        was != healthy
    }

    /// Whether passive ejection currently keeps traffic away. Reads the clock only while an
    /// ejection is recorded; an expired one is cleared here and the ramp starts.
    pub fn is_ejected(&self) -> bool {
        let until = self.ejected_until_ms.load(Ordering::Relaxed);
        if until == 0 {
            return false;
        }
        let now = crate::clock::now_ms();
        if now < until {
            return true;
        }
        if self
            .ejected_until_ms
            .compare_exchange(until, 0, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
        {
            self.ramp_start_ms.store(now, Ordering::Relaxed);
            tracing::info!("endpoint returns from ejection");
        }
        false
    }

    /// How much longer the current ejection lasts; `None` when not ejected.
    pub fn ejected_for(&self) -> Option<Duration> {
        let until = self.ejected_until_ms.load(Ordering::Relaxed);
        let now = crate::clock::now_ms();
        (until > now).then(|| Duration::from_millis(until - now))
    }

    /// Ends an ejection early (a passing active probe); returns whether one was in force.
    pub fn end_ejection(&self) -> bool {
        if self.ejected_until_ms.swap(0, Ordering::Relaxed) != 0 {
            self.ramp_start_ms
                .store(crate::clock::now_ms(), Ordering::Relaxed);
            return true;
        }
        false
    }

    /// Times this endpoint was ejected.
    pub fn ejections(&self) -> u32 {
        self.ejections.load(Ordering::Relaxed)
    }

    /// Share of its weight the endpoint gets now, in (0, 1]: below 1 during slow start.
    pub fn ramp(&self, slow_start: Duration) -> f64 {
        let start = self.ramp_start_ms.load(Ordering::Relaxed);
        if start == 0 || slow_start.is_zero() {
            return 1.0;
        }
        let elapsed = crate::clock::now_ms().saturating_sub(start) as f64;
        let total = slow_start.as_millis() as f64;
        if elapsed >= total {
            let _ =
                self.ramp_start_ms
                    .compare_exchange(start, 0, Ordering::Relaxed, Ordering::Relaxed);
            return 1.0;
        }
        // A small floor so a fresh endpoint gets a first request and can prove itself.
        (elapsed / total).max(0.05)
    }

    /// Requests currently holding a lease on this endpoint (open response bodies included).
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Requests sent to this endpoint since it first appeared.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// Requests to this endpoint that ended in a gateway error (connect failure, timeout, reset).
    pub fn failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }
}

/// Passive ejection (outlier detection) settings of a pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutlierConfig {
    /// Eject after this many 5xx answers (gateway failures included) in a row; 0 = off.
    pub consecutive_5xx: u32,
    /// Eject after this many 502/503/504 answers, connect failures or timeouts in a row; 0 = off.
    pub consecutive_gateway_failures: u32,
    /// Ejection time, multiplied by how often the endpoint has been ejected.
    pub base_ejection_time: Duration,
    /// Cap on one ejection's time.
    pub max_ejection_time: Duration,
    /// Never eject more than this share of the pool (percent).
    pub max_ejection_percent: u32,
}

/// Settings that shape how a pool treats its endpoints; carried in every snapshot.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PoolSettings {
    /// New endpoints wait for a passing probe before taking traffic.
    pub start_unhealthy: bool,
    /// Ramp an endpoint's share up over this time after it becomes eligible; zero = off.
    pub slow_start: Duration,
    /// Passive ejection; `None` = off.
    pub outlier: Option<OutlierConfig>,
}

/// How one request to an endpoint ended, for passive ejection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The endpoint answered with this status.
    Status(u16),
    /// Connect failure, reset or timeout: the endpoint did not answer.
    GatewayFailure,
}

/// One endpoint of a snapshot: immutable address and weight plus the shared mutable state.
#[derive(Debug)]
pub struct Endpoint {
    /// Where it came from, as discovery reported it.
    pub source: Discovered,
    /// `host:port`, prebuilt so forwarding never formats it per request.
    pub authority: Authority,
    /// `host:port` as a Host header value, for routes with `preserve_host = false`.
    pub host_header: http::HeaderValue,
    /// Stable hash of `host:port`, for rendezvous hashing.
    pub(crate) key_hash: u64,
    /// Counters and health, shared across snapshots.
    pub state: Arc<EndpointState>,
    /// The address when the host is an IP literal: the pooled HTTP/1.1 path connects to it
    /// directly (names go through the general client, which resolves them).
    pub(crate) socket_addr: Option<std::net::SocketAddr>,
}

impl Endpoint {
    /// Relative weight; 0 takes no traffic.
    pub fn weight(&self) -> u32 {
        self.source.weight
    }

    /// Eligible for new requests: positive weight, healthy, not ejected.
    pub fn is_available(&self) -> bool {
        self.source.weight > 0 && self.state.is_healthy() && !self.state.is_ejected()
    }

    /// Why the endpoint takes no traffic now, or `None` when it is available.
    pub fn exclusion(&self) -> Option<&'static str> {
        if self.source.weight == 0 {
            Some("weight 0")
        } else if !self.state.is_healthy() {
            Some("failed active health checks")
        } else if self.state.is_ejected() {
            Some("ejected after consecutive failures")
        } else {
            None
        }
    }
}

/// An immutable endpoint set: everything a pick needs, built once per real change.
#[derive(Debug, Default)]
pub struct Endpoints {
    pub(super) list: Box<[Arc<Endpoint>]>,
    pub(super) settings: Arc<PoolSettings>,
    /// Smooth weighted round-robin order (nginx's algorithm), as indices into `list`.
    pub(super) wrr: Box<[u32]>,
    /// Running weight totals, for weighted random picks.
    pub(super) cumulative: Box<[u64]>,
}

impl Endpoints {
    pub(super) fn build(list: Vec<Arc<Endpoint>>, settings: Arc<PoolSettings>) -> Self {
        let weights: Vec<u32> = list.iter().map(|e| e.weight()).collect();
        let wrr = hash::smooth_wrr_sequence(&weights).into_boxed_slice();
        let mut total = 0u64;
        let cumulative = weights
            .iter()
            .map(|w| {
                total += u64::from(*w);
                total
            })
            .collect();
        Self {
            list: list.into_boxed_slice(),
            settings,
            wrr,
            cumulative,
        }
    }

    /// The pool settings this snapshot was built with.
    pub fn settings(&self) -> &PoolSettings {
        &self.settings
    }

    /// The endpoints in discovery order (sorted by host and port).
    pub fn list(&self) -> &[Arc<Endpoint>] {
        &self.list
    }

    /// Number of endpoints, available or not.
    pub fn len(&self) -> usize {
        self.list.len()
    }

    /// True when discovery reported no endpoint at all.
    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// How many endpoints can take traffic now.
    pub fn available(&self) -> usize {
        self.list.iter().filter(|e| e.is_available()).count()
    }
}
