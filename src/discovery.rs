//! Discovery: feeds every service's pool, from the static map or from Consul.
//! Both providers end in `ServicePool::replace`, so pools behave the same whatever feeds them.

pub mod consul;
pub mod registry;

use std::sync::Arc;

use crate::proxy::ProxyState;

/// Aggregated health of one discovered instance (Consul's order: maintenance > critical > warning > passing).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum InstanceStatus {
    /// Every check passes.
    Passing,
    /// At least one check warns; Consul's `Weights.Warning` may apply.
    Warning,
    /// At least one check is critical; never reaches a pool.
    Critical,
    /// The instance or its node is in maintenance; never reaches a pool.
    Maintenance,
}

/// One endpoint as discovery reports it, before it joins a pool.
/// Pools compare these sets (sorted) to decide whether anything really changed.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Discovered {
    /// IP literal or DNS name; names are resolved when connecting.
    pub host: Arc<str>,
    /// TCP port.
    pub port: u16,
    /// Relative weight; 0 means "keep in the set but send no traffic".
    pub weight: u32,
    /// Passing or Warning (critical/maintenance never reach a pool).
    pub status: InstanceStatus,
    /// Human id for /status and logs, e.g. "node1/web-1" (Consul Node/Service.ID).
    pub id: Arc<str>,
}

impl Discovered {
    /// A passing endpoint with the given weight, as the static provider reports it.
    pub fn new(host: impl Into<Arc<str>>, port: u16, weight: u32) -> Self {
        let host = host.into();
        let id: Arc<str> = format!("{host}:{port}").into();
        Self {
            host,
            port,
            weight,
            status: InstanceStatus::Passing,
            id,
        }
    }
}

/// The static provider: an in-memory map of service name to endpoints that can change at run time.
///
/// The demo and the tests change it while the gateway runs; each change goes through the same
/// `ServicePool::replace` as a Consul answer does. A reload puts the configured endpoints back.
#[derive(Clone)]
pub struct StaticDiscovery {
    state: Arc<ProxyState>,
}

impl StaticDiscovery {
    pub(crate) fn new(state: Arc<ProxyState>) -> Self {
        Self { state }
    }

    /// Replaces the endpoints of a static `service`; false when no such static service exists.
    pub fn set(&self, service: &str, endpoints: Vec<Discovered>) -> bool {
        match self.state.services.load().get(service) {
            Some(s) if s.source == registry::Source::Static => {
                s.pool.replace(endpoints);
                true
            }
            _ => false,
        }
    }
}
