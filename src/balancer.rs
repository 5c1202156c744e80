//! Service pools: each service's live endpoint set as one `ArcSwap` snapshot, plus the leases
//! that count requests in flight. Discovery writes pools; the request path only loads them.

pub mod endpoint;
pub mod hash;
pub mod idle;
pub mod policy;
#[cfg(test)]
mod policy_tests;

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use http::uri::{Authority, Scheme};
use tokio::sync::watch;

use crate::discovery::{Discovered, InstanceStatus};
pub use endpoint::{Endpoint, EndpointState, Endpoints, Outcome, OutlierConfig, PoolSettings};
pub use policy::{Picker, Policy};

/// A service's live pool. Discovery calls [`ServicePool::replace`]; requests call
/// [`Picker::pick`] with it, which costs one atomic snapshot load.
pub struct ServicePool {
    name: Arc<str>,
    scheme: Scheme,
    current: ArcSwap<Endpoints>,
    /// Bumped after each effective `replace`; tests and readiness await it.
    revision: watch::Sender<u64>,
    /// Serialises writers only (discovery, the static provider); never taken by a request.
    writer: Mutex<()>,
}

impl std::fmt::Debug for ServicePool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServicePool")
            .field("name", &self.name)
            .field("endpoints", &self.current.load().len())
            .finish()
    }
}

impl ServicePool {
    /// An empty pool; requests get 503 until the first `replace`.
    pub fn new(name: impl Into<Arc<str>>, scheme: Scheme) -> Self {
        Self {
            name: name.into(),
            scheme,
            current: ArcSwap::from_pointee(Endpoints::default()),
            revision: watch::Sender::new(0),
            writer: Mutex::new(()),
        }
    }

    /// The service name.
    pub fn name(&self) -> &Arc<str> {
        &self.name
    }

    /// The scheme used to reach every endpoint of this service.
    pub fn scheme(&self) -> &Scheme {
        &self.scheme
    }

    /// The current snapshot (for admin views; the request path uses [`Picker::pick`]).
    pub fn snapshot(&self) -> Arc<Endpoints> {
        self.current.load_full()
    }

    /// The number of effective replacements so far.
    pub fn revision(&self) -> u64 {
        *self.revision.borrow()
    }

    /// A receiver that sees every effective replacement.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.revision.subscribe()
    }

    /// Installs a new endpoint set and returns whether anything changed.
    ///
    /// The set is normalised (sorted, one entry per `host:port`) first; an identical set is not
    /// swapped in. Endpoints whose `host:port` stays keep their counters and health.
    pub fn replace(&self, mut discovered: Vec<Discovered>) -> bool {
        discovered.sort();
        discovered.dedup_by(|a, b| a.host == b.host && a.port == b.port);
        // Poisoning only means another writer panicked; the snapshot itself is always whole.
        let _writer = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        let old = self.current.load();
        if old.list.len() == discovered.len()
            && old
                .list
                .iter()
                .zip(&discovered)
                .all(|(e, d)| &e.source == d)
        {
            return false;
        }
        let mut kept: HashMap<(Arc<str>, u16), &Arc<EndpointState>> = old
            .list
            .iter()
            .map(|e| ((e.source.host.clone(), e.source.port), &e.state))
            .collect();
        let mut list = Vec::with_capacity(discovered.len());
        let start_healthy = !old.settings.start_unhealthy;
        for d in discovered {
            let state = kept
                .remove(&(d.host.clone(), d.port))
                .cloned()
                .unwrap_or_else(|| Arc::new(EndpointState::new(start_healthy)));
            match endpoint(d, state) {
                Some(ep) => list.push(Arc::new(ep)),
                None => {
                    tracing::warn!(service = %self.name, "discovered endpoint has an invalid address; skipped")
                }
            }
        }
        let settings = old.settings.clone();
        self.current
            .store(Arc::new(Endpoints::build(list, settings)));
        drop(old);
        self.revision.send_modify(|r| *r += 1);
        true
    }

    /// Installs new settings, keeping the endpoints; returns whether anything changed.
    pub fn set_settings(&self, settings: PoolSettings) -> bool {
        let _writer = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        let old = self.current.load();
        if *old.settings == settings {
            return false;
        }
        let list = old.list.to_vec();
        self.current
            .store(Arc::new(Endpoints::build(list, Arc::new(settings))));
        true
    }

    /// Feeds passive ejection with how a request to `ep` ended.
    pub fn report(&self, ep: &Endpoint, outcome: Outcome) {
        let eps = self.current.load();
        let Some(cfg) = &eps.settings.outlier else {
            return;
        };
        let s = &ep.state;
        let (c5, cg) = match outcome {
            Outcome::Status(code) if code < 500 => {
                // Stores only when needed: a healthy stream of 2xx touches no shared line.
                if s.consecutive_5xx.load(Ordering::Relaxed) != 0 {
                    s.consecutive_5xx.store(0, Ordering::Relaxed);
                }
                if s.consecutive_gateway_failures.load(Ordering::Relaxed) != 0 {
                    s.consecutive_gateway_failures.store(0, Ordering::Relaxed);
                }
                return;
            }
            Outcome::Status(code) => {
                let c5 = s.consecutive_5xx.fetch_add(1, Ordering::Relaxed) + 1;
                let cg = if (502..=504).contains(&code) {
                    s.consecutive_gateway_failures
                        .fetch_add(1, Ordering::Relaxed)
                        + 1
                } else {
                    s.consecutive_gateway_failures.store(0, Ordering::Relaxed);
                    0
                };
                (c5, cg)
            }
            Outcome::GatewayFailure => (
                s.consecutive_5xx.fetch_add(1, Ordering::Relaxed) + 1,
                s.consecutive_gateway_failures
                    .fetch_add(1, Ordering::Relaxed)
                    + 1,
            ),
        };
        let trip = (cfg.consecutive_5xx > 0 && c5 >= cfg.consecutive_5xx)
            || (cfg.consecutive_gateway_failures > 0 && cg >= cfg.consecutive_gateway_failures);
        if !trip || s.is_ejected() {
            return;
        }
        let ejected = eps.list.iter().filter(|e| e.state.is_ejected()).count();
        if (ejected + 1) * 100 > cfg.max_ejection_percent as usize * eps.list.len() {
            tracing::debug!(service = %self.name, upstream.addr = %ep.authority, "not ejecting: max_ejection_percent reached");
            return;
        }
        let n = s.ejections.fetch_add(1, Ordering::Relaxed) + 1;
        let time = cfg
            .base_ejection_time
            .saturating_mul(n)
            .min(cfg.max_ejection_time.max(cfg.base_ejection_time));
        s.ejected_until_ms.store(
            crate::clock::now_ms() + time.as_millis() as u64,
            Ordering::Relaxed,
        );
        s.consecutive_5xx.store(0, Ordering::Relaxed);
        s.consecutive_gateway_failures.store(0, Ordering::Relaxed);
        tracing::warn!(service = %self.name, upstream.addr = %ep.authority, ejection_time = ?time, ejections = n, "endpoint ejected");
    }
}

fn endpoint(source: Discovered, state: Arc<EndpointState>) -> Option<Endpoint> {
    let authority = if source.host.contains(':') {
        // IPv6 literals need brackets inside an authority.
        format!("[{}]:{}", source.host, source.port)
    } else {
        format!("{}:{}", source.host, source.port)
    };
    let key_hash = hash::hash_bytes(authority.as_bytes());
    let host_header = http::HeaderValue::from_str(&authority).ok()?;
    let socket_addr = authority.parse().ok();
    let authority = Authority::try_from(authority).ok()?;
    Some(Endpoint {
        source,
        authority,
        host_header,
        key_hash,
        state,
        socket_addr,
    })
}

/// A request's claim on an endpoint: counts it in flight until dropped, which happens when the
/// response body ends (or the upgraded connection closes), not when headers arrive.
#[derive(Debug)]
pub struct Lease {
    endpoint: Arc<Endpoint>,
}

impl Lease {
    fn new(endpoint: &Arc<Endpoint>) -> Self {
        endpoint.state.in_flight.fetch_add(1, Ordering::Relaxed);
        endpoint.state.requests.fetch_add(1, Ordering::Relaxed);
        Self {
            endpoint: endpoint.clone(),
        }
    }

    /// The leased endpoint.
    pub fn endpoint(&self) -> &Arc<Endpoint> {
        &self.endpoint
    }

    /// Counts a gateway-side failure against the endpoint.
    pub fn record_failure(&self) {
        self.endpoint.state.failures.fetch_add(1, Ordering::Relaxed);
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.endpoint
            .state
            .in_flight
            .fetch_sub(1, Ordering::Relaxed);
    }
}

impl Picker {
    /// Picks an available endpoint of `pool` for a client, skipping `avoid` when another exists.
    /// Returns `None` when no endpoint is available (the caller answers 503).
    pub fn pick(
        &self,
        pool: &ServicePool,
        client: IpAddr,
        avoid: Option<&Endpoint>,
    ) -> Option<Lease> {
        let eps = pool.current.load();
        let idx = self.choose(&eps, client, avoid)?;
        Some(Lease::new(&eps.list[idx]))
    }
}

impl InstanceStatus {
    /// Lower-case name, as shown in admin views.
    pub fn as_str(&self) -> &'static str {
        match self {
            InstanceStatus::Passing => "passing",
            InstanceStatus::Warning => "warning",
            InstanceStatus::Critical => "critical",
            InstanceStatus::Maintenance => "maintenance",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(host: &str, port: u16, weight: u32) -> Discovered {
        Discovered::new(host, port, weight)
    }

    #[test]
    fn replace_skips_identical_sets_and_keeps_state() {
        let pool = ServicePool::new("svc", Scheme::HTTP);
        assert!(pool.replace(vec![d("10.0.0.2", 80, 1), d("10.0.0.1", 80, 1)]));
        assert_eq!(pool.revision(), 1);
        // Same set in another order: no swap.
        assert!(!pool.replace(vec![d("10.0.0.1", 80, 1), d("10.0.0.2", 80, 1)]));
        assert_eq!(pool.revision(), 1);
        let before = pool.snapshot().list()[0].state.clone();
        before.requests.fetch_add(7, Ordering::Relaxed);
        // Weight change on 10.0.0.1 and a new endpoint: state of the kept one survives.
        assert!(pool.replace(vec![d("10.0.0.1", 80, 5), d("10.0.0.3", 80, 1)]));
        let snap = pool.snapshot();
        assert_eq!(snap.len(), 2);
        assert!(Arc::ptr_eq(&snap.list()[0].state, &before));
        assert_eq!(snap.list()[0].state.requests(), 7);
        assert_eq!(snap.list()[0].weight(), 5);
        assert_eq!(snap.list()[1].state.requests(), 0);
    }

    #[test]
    fn lease_counts_in_flight_until_dropped() {
        let pool = ServicePool::new("svc", Scheme::HTTP);
        pool.replace(vec![d("127.0.0.1", 1, 1)]);
        let picker = Picker::new(Policy::RoundRobin);
        let ip = IpAddr::from([127, 0, 0, 1]);
        let a = picker.pick(&pool, ip, None).unwrap();
        let b = picker.pick(&pool, ip, None).unwrap();
        assert_eq!(a.endpoint().state.in_flight(), 2);
        drop(a);
        assert_eq!(b.endpoint().state.in_flight(), 1);
        drop(b);
        assert_eq!(pool.snapshot().list()[0].state.in_flight(), 0);
        assert_eq!(pool.snapshot().list()[0].state.requests(), 2);
    }

    #[test]
    fn ipv6_and_hostnames_make_valid_authorities() {
        let pool = ServicePool::new("svc", Scheme::HTTP);
        pool.replace(vec![d("::1", 8080, 1), d("web.service.consul", 80, 1)]);
        let snap = pool.snapshot();
        let names: Vec<_> = snap.list().iter().map(|e| e.authority.as_str()).collect();
        assert_eq!(names, ["[::1]:8080", "web.service.consul:80"]);
    }

    #[test]
    fn empty_answer_empties_the_pool() {
        let pool = ServicePool::new("svc", Scheme::HTTP);
        pool.replace(vec![d("127.0.0.1", 1, 1)]);
        assert!(pool.replace(vec![]));
        let picker = Picker::new(Policy::RoundRobin);
        assert!(picker
            .pick(&pool, IpAddr::from([127, 0, 0, 1]), None)
            .is_none());
    }
}
