//! Discovery's vocabulary (an endpoint as a provider reports it, and its health) and the Consul
//! provider. Every provider's answer ends in `ServicePool::replace` in the control plane.

pub mod consul;

use std::sync::Arc;

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
