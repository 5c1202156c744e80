//! The control plane's shared state: live services, notes, the configuration in force, the
//! reloader, readiness and the Prometheus registry, next to the request path's state it feeds.

pub mod prometheus;
pub mod registry;
pub mod reload;
pub mod static_discovery;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use arc_swap::{ArcSwap, ArcSwapOption};
use tokio::time::Instant;

use crate::balancer::ServicePool;
use crate::config::Config;
use crate::discovery::consul::{RegistrationStatus, ServiceSync};
use crate::mesh::MeshIdentity;
use crate::proxy::ProxyState;

/// What the control plane reads and writes. The request path's part is `proxy`; everything else
/// here is for admin views, reloads and readiness.
pub struct ControlState {
    /// The request path's state, which the registry publishes routes and pools into.
    pub proxy: Arc<ProxyState>,
    /// The TLS listener's configuration; replaced on reload so renewed certificates apply.
    pub tls: Arc<ArcSwapOption<rustls::ServerConfig>>,
    /// Every live service by name (admin views; the request path reaches pools through routes).
    pub services: ArcSwap<BTreeMap<Arc<str>, Arc<LiveService>>>,
    /// Route conflicts and tag problems, shown in `/status`.
    pub notes: ArcSwap<Vec<String>>,
    /// KV keys whose route is invalid or clashes now (`meshgate_kv_route_errors`); registry-written.
    pub kv_route_errors: AtomicUsize,
    /// The configuration in force, for the admin `/config` view; published by the registry.
    pub config: ArcSwapOption<Config>,
    /// The gateway's own Consul registration, when `discovery.consul.register` is set; stored
    /// by `Gateway::run` once the listeners are up.
    pub registration: ArcSwapOption<RegistrationStatus>,
    /// Readiness and uptime.
    pub readiness: Readiness,
    /// The gateway's Connect identity, while any route goes through the mesh.
    pub mesh: ArcSwapOption<MeshIdentity>,
    /// What `/metrics` encodes (set once at build, by [`prometheus::install`]).
    pub prometheus: OnceLock<prometheus_client::registry::Registry>,
    /// Threads serving the main and TLS listeners (`workers`), for `/status`.
    pub serving_threads: AtomicUsize,
}

impl ControlState {
    /// Control state around the request path's `proxy` state, not ready yet.
    pub fn new(proxy: Arc<ProxyState>, tls: Arc<ArcSwapOption<rustls::ServerConfig>>) -> Arc<Self> {
        Arc::new(Self {
            proxy,
            tls,
            services: ArcSwap::default(),
            notes: ArcSwap::default(),
            kv_route_errors: AtomicUsize::new(0),
            config: ArcSwapOption::empty(),
            registration: ArcSwapOption::empty(),
            readiness: Readiness::default(),
            mesh: ArcSwapOption::empty(),
            prometheus: OnceLock::new(),
            serving_threads: AtomicUsize::new(1),
        })
    }
}

/// Readiness and uptime. Readiness starts false and is set once discovery has synced; it goes
/// false again first thing on shutdown so load balancers stop sending before we stop accepting.
#[derive(Debug)]
pub struct Readiness {
    ready: AtomicBool,
    shutting_down: AtomicBool,
    started: Instant,
}

impl Default for Readiness {
    fn default() -> Self {
        Self {
            ready: AtomicBool::new(false),
            shutting_down: AtomicBool::new(false),
            started: Instant::now(),
        }
    }
}

impl Readiness {
    /// Marks the gateway ready or not; once shutdown began it stays not ready.
    pub fn set_ready(&self, ready: bool) {
        let ready = ready && !self.shutting_down.load(Ordering::SeqCst);
        self.ready.store(ready, Ordering::SeqCst);
    }

    /// First step of shutdown: readiness fails from now on.
    pub fn begin_shutdown(&self) {
        self.shutting_down.store(true, Ordering::SeqCst);
        self.ready.store(false, Ordering::SeqCst);
    }

    /// Whether `/ready` answers 200.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
    }

    /// Time since the gateway was built.
    pub fn uptime(&self) -> std::time::Duration {
        self.started.elapsed()
    }
}

/// Where a live service's endpoints come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// `[discovery.static]` or a route's `targets`.
    Static,
    /// A Consul blocking query.
    Consul,
}

/// A live service as admin views see it.
#[derive(Debug)]
pub struct LiveService {
    /// The pool.
    pub pool: Arc<ServicePool>,
    /// Where endpoints come from.
    pub source: Source,
    /// Consul sync state, for Consul services.
    pub sync: Option<Arc<ServiceSync>>,
    /// Whether active probes run.
    pub probed: bool,
}
