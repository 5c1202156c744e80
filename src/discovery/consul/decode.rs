//! Serde shapes of Consul's health and catalog answers, and their normalisation into
//! `Discovered` sets. Pure: no I/O, no clock.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::SystemTime;

use serde::{Deserialize, Deserializer};

use super::settings::WarningMode;
use crate::discovery::{Discovered, InstanceStatus};
use crate::mesh::{CaRoot, LeafAnswer, RootsAnswer};

/// Largest weight handed to a pool. Consul accepts up to 65535. We clamp because:
/// - a pool may sum the weights of all its endpoints in a `u32`: at 10 000 that cannot
///   overflow below ~429 000 endpoints;
/// - weighted policies that pre-expand a table grow with the weight sum;
/// - a ratio of 10 000:1 is finer than any traffic split needs.
pub const MAX_WEIGHT: u32 = 10_000;

/// One element of a `GET /v1/health/service/:name` answer (Consul's `CheckServiceNode`):
/// an instance with its node and checks. Not the registry's `ServiceEntry` (a live service
/// in the gateway).
///
/// Every field tolerates being missing or `null`; unknown fields are ignored, because newer
/// Consul versions keep adding some.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct HealthEntry {
    /// The node the instance runs on.
    #[serde(rename = "Node", default, deserialize_with = "nullable")]
    pub node: Node,
    /// The service instance itself.
    #[serde(rename = "Service", default, deserialize_with = "nullable")]
    pub service: Service,
    /// All checks of the instance: node-level (`ServiceID == ""`) and its own.
    #[serde(rename = "Checks", default, deserialize_with = "nullable")]
    pub checks: Vec<CheckEntry>,
}

/// The node part of a health entry.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct Node {
    /// Node UUID.
    #[serde(rename = "ID", default, deserialize_with = "nullable")]
    pub id: String,
    /// Node name; first half of [`Discovered::id`].
    #[serde(rename = "Node", default, deserialize_with = "nullable")]
    pub node: String,
    /// Node address: what to dial when `Service.Address` is empty.
    #[serde(rename = "Address", default, deserialize_with = "nullable")]
    pub address: String,
    /// Datacenter of the node.
    #[serde(rename = "Datacenter", default, deserialize_with = "nullable")]
    pub datacenter: String,
    /// Node metadata (`null` becomes empty).
    #[serde(rename = "Meta", default, deserialize_with = "nullable")]
    pub meta: BTreeMap<String, String>,
}

/// The service-instance part of a health entry.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct Service {
    /// Instance ID, unique per agent; second half of [`Discovered::id`].
    #[serde(rename = "ID", default, deserialize_with = "nullable")]
    pub id: String,
    /// Service name.
    #[serde(rename = "Service", default, deserialize_with = "nullable")]
    pub service: String,
    /// Tags (`null` becomes empty; `[""]` is kept as sent).
    #[serde(rename = "Tags", default, deserialize_with = "nullable")]
    pub tags: Vec<String>,
    /// Address to dial; may be `""` (use the node's) or a DNS name.
    #[serde(rename = "Address", default, deserialize_with = "nullable")]
    pub address: String,
    /// Port as Consul stores it (an int, so kept wide; out-of-range instances are dropped).
    #[serde(rename = "Port", default, deserialize_with = "nullable")]
    pub port: i64,
    /// Weights; missing or `null` means Consul's default `{Passing: 1, Warning: 1}`.
    #[serde(rename = "Weights", default, deserialize_with = "nullable")]
    pub weights: Weights,
    /// Service metadata (`null` becomes empty).
    #[serde(rename = "Meta", default, deserialize_with = "nullable")]
    pub meta: BTreeMap<String, String>,
}

/// `Service.Weights`. Each missing or `null` field defaults to 1, as Consul does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(from = "RawWeights")]
pub struct Weights {
    /// Weight while every check passes.
    pub passing: u32,
    /// Weight while some check warns.
    pub warning: u32,
}

impl Default for Weights {
    fn default() -> Self {
        Self {
            passing: 1,
            warning: 1,
        }
    }
}

#[derive(Deserialize)]
struct RawWeights {
    #[serde(rename = "Passing", default)]
    passing: Option<u32>,
    #[serde(rename = "Warning", default)]
    warning: Option<u32>,
}

impl From<RawWeights> for Weights {
    fn from(raw: RawWeights) -> Self {
        Self {
            passing: raw.passing.unwrap_or(1),
            warning: raw.warning.unwrap_or(1),
        }
    }
}

/// One check of a health answer: an element of [`HealthEntry::checks`] and of the
/// `/v1/health/state/any` list (Consul's `HealthCheck`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Deserialize)]
pub struct CheckEntry {
    /// Node the check belongs to.
    #[serde(rename = "Node", default, deserialize_with = "nullable")]
    pub node: String,
    /// Check ID; `_node_maintenance` and `_service_maintenance:<id>` are reserved.
    #[serde(rename = "CheckID", default, deserialize_with = "nullable")]
    pub check_id: String,
    /// `passing`, `warning` or `critical` (anything else is treated as `warning`).
    #[serde(rename = "Status", default, deserialize_with = "nullable")]
    pub status: String,
    /// Owning instance; `""` for node-level checks such as `serfHealth`.
    #[serde(rename = "ServiceID", default, deserialize_with = "nullable")]
    pub service_id: String,
    /// Owning service name; `""` for node-level checks.
    #[serde(rename = "ServiceName", default, deserialize_with = "nullable")]
    pub service_name: String,
    /// Raft index of the check's last change.
    #[serde(rename = "ModifyIndex", default, deserialize_with = "nullable")]
    pub modify_index: u64,
}

/// Reserved check ID Consul adds while a node is in maintenance.
const NODE_MAINTENANCE: &str = "_node_maintenance";
/// Prefix of the reserved check ID Consul adds while a service instance is in maintenance.
const SERVICE_MAINTENANCE_PREFIX: &str = "_service_maintenance:";

/// Missing and `null` both become `T::default()` (Consul emits `null` for unset maps).
fn nullable<'de, D, T>(de: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(de)?.unwrap_or_default())
}

/// Decodes `GET /v1/catalog/services` (service name → union of its instances' tags);
/// `null` tag lists become empty.
pub(super) fn decode_catalog(bytes: &[u8]) -> serde_json::Result<BTreeMap<String, Vec<String>>> {
    let raw: BTreeMap<String, Option<Vec<String>>> = serde_json::from_slice(bytes)?;
    Ok(raw
        .into_iter()
        .map(|(name, tags)| {
            let mut tags = tags.unwrap_or_default();
            tags.sort();
            tags.dedup();
            (name, tags)
        })
        .collect())
}

/// Aggregated status of one entry over **all** its checks (node and service), with Consul's
/// precedence maintenance > critical > warning > passing (`api.HealthChecks.AggregatedStatus`).
///
/// An entry without checks is `Passing` (Consul treats "no checks" as healthy). A status
/// string Consul does not define counts as `Warning`: still routable, visibly degraded, so
/// a future status value cannot silently empty a pool nor get full traffic.
pub fn aggregate_status(checks: &[CheckEntry]) -> InstanceStatus {
    let mut status = InstanceStatus::Passing;
    for check in checks {
        let this = if check.check_id == NODE_MAINTENANCE
            || check.check_id.starts_with(SERVICE_MAINTENANCE_PREFIX)
        {
            InstanceStatus::Maintenance
        } else {
            match check.status.as_str() {
                "passing" => InstanceStatus::Passing,
                "critical" => InstanceStatus::Critical,
                _ => InstanceStatus::Warning,
            }
        };
        // InstanceStatus's Ord follows declaration order, which is exactly the precedence.
        status = status.max(this);
    }
    status
}

/// True when `tags` contains every one of `required` (ASCII case-insensitive, like Consul's
/// server-side `?tag=` filter).
pub fn has_all_tags(tags: &[String], required: &[String]) -> bool {
    required
        .iter()
        .all(|want| tags.iter().any(|t| t.eq_ignore_ascii_case(want)))
}

/// Turns a health answer into the endpoint set a pool should hold.
///
/// - address: `Service.Address`, or `Node.Address` when empty; entries with neither, or a
///   port outside 1..=65535, are dropped;
/// - status: [`aggregate_status`]; `Critical` and `Maintenance` are dropped;
/// - weight: `Weights.Passing`; for `Warning` instances `Weights.Warning` under
///   [`WarningMode::Degrade`], `Weights.Passing` under `Include`, dropped under `Exclude`;
///   clamped to [`MAX_WEIGHT`]; weight 0 is kept (the pool sends it no traffic);
/// - `required_tags` are enforced again here (AND, case-insensitive);
/// - id: `"<Node.Node>/<Service.ID>"`.
///
/// The result is sorted and deduplicated, so two answers describing the same endpoints
/// compare equal whatever order Consul used.
pub fn to_discovered(
    entries: &[HealthEntry],
    warning: &WarningMode,
    required_tags: &[String],
) -> Vec<Discovered> {
    let mut out: Vec<Discovered> = entries
        .iter()
        .filter_map(|entry| discover_one(entry, *warning, required_tags))
        .collect();
    out.sort();
    out.dedup();
    out
}

/// An instance of a Consul answer that is not in the pool, and why (for `/explain`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ExcludedInstance {
    /// `"<Node.Node>/<Service.ID>"`.
    pub id: String,
    /// `address:port` as Consul reported it (may be incomplete: that can be the reason).
    pub address: String,
    /// Aggregated health.
    pub status: InstanceStatus,
    /// Why [`to_discovered`] left it out.
    pub reason: &'static str,
}

/// The instances of an answer that [`to_discovered`] leaves out, with the reason for each.
pub fn excluded_instances(
    entries: &[HealthEntry],
    warning: &WarningMode,
    required_tags: &[String],
) -> Vec<ExcludedInstance> {
    entries
        .iter()
        .filter_map(|entry| {
            let svc = &entry.service;
            let status = aggregate_status(&entry.checks);
            let host = if svc.address.is_empty() {
                entry.node.address.as_str()
            } else {
                svc.address.as_str()
            };
            let reason = if !has_all_tags(&svc.tags, required_tags) {
                "lacks a required tag (discovery.consul.tags)"
            } else {
                match (status, warning) {
                    (InstanceStatus::Critical, _) => "Consul health check critical",
                    (InstanceStatus::Maintenance, _) => "in Consul maintenance mode",
                    (InstanceStatus::Warning, WarningMode::Exclude) => {
                        "Consul health check warning (warning = \"exclude\")"
                    }
                    _ if u16::try_from(svc.port).ok().filter(|p| *p != 0).is_none() => {
                        "no usable port"
                    }
                    _ if host.is_empty() => "no address",
                    _ => return None,
                }
            };
            Some(ExcludedInstance {
                id: format!("{}/{}", entry.node.node, svc.id),
                address: format!("{host}:{}", svc.port),
                status,
                reason,
            })
        })
        .collect()
}

fn discover_one(
    entry: &HealthEntry,
    warning: WarningMode,
    required_tags: &[String],
) -> Option<Discovered> {
    let svc = &entry.service;
    if !has_all_tags(&svc.tags, required_tags) {
        return None;
    }
    let status = aggregate_status(&entry.checks);
    let weight = match (status, warning) {
        (InstanceStatus::Passing, _) | (InstanceStatus::Warning, WarningMode::Include) => {
            svc.weights.passing
        }
        (InstanceStatus::Warning, WarningMode::Degrade) => svc.weights.warning,
        (InstanceStatus::Warning, WarningMode::Exclude)
        | (InstanceStatus::Critical | InstanceStatus::Maintenance, _) => return None,
    };
    let host = if svc.address.is_empty() {
        entry.node.address.as_str()
    } else {
        svc.address.as_str()
    };
    let id = format!("{}/{}", entry.node.node, svc.id);
    let Some(port) = u16::try_from(svc.port).ok().filter(|p| *p != 0) else {
        tracing::debug!(instance = %id, port = svc.port, "Consul instance has no usable port; skipped");
        return None;
    };
    if host.is_empty() {
        tracing::debug!(instance = %id, "Consul instance has no address; skipped");
        return None;
    }
    Some(Discovered {
        host: Arc::from(host),
        port,
        weight: weight.min(MAX_WEIGHT),
        status,
        id: Arc::from(id),
    })
}

/// `GET /v1/agent/connect/ca/roots` as Consul sends it (unknown fields ignored).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub(super) struct RawRoots {
    #[serde(rename = "ActiveRootID", default)]
    active_root_id: String,
    #[serde(default)]
    trust_domain: String,
    #[serde(default)]
    roots: Option<Vec<RawRoot>>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub(super) struct RawRoot {
    #[serde(rename = "ID", default)]
    id: String,
    #[serde(default)]
    root_cert: String,
    #[serde(default)]
    active: bool,
}

impl From<RawRoots> for RootsAnswer {
    fn from(raw: RawRoots) -> Self {
        Self {
            trust_domain: raw.trust_domain,
            active_root_id: raw.active_root_id,
            roots: raw
                .roots
                .unwrap_or_default()
                .into_iter()
                .map(|r| CaRoot {
                    id: r.id,
                    pem: r.root_cert,
                    active: r.active,
                })
                .collect(),
        }
    }
}

/// `GET /v1/agent/connect/ca/leaf/<service>` as Consul sends it.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub(super) struct RawLeaf {
    #[serde(rename = "CertPEM")]
    cert_pem: String,
    #[serde(rename = "PrivateKeyPEM")]
    private_key_pem: String,
    #[serde(default)]
    serial_number: String,
    #[serde(rename = "ServiceURI", default)]
    service_uri: String,
    valid_after: String,
    valid_before: String,
}

impl TryFrom<RawLeaf> for LeafAnswer {
    type Error = String;

    fn try_from(raw: RawLeaf) -> Result<Self, String> {
        let time = |field: &str, text: &str| -> Result<SystemTime, String> {
            humantime::parse_rfc3339_weak(text.trim_end_matches('Z'))
                .or_else(|_| humantime::parse_rfc3339(text))
                .map_err(|e| format!("{field} {text:?}: {e}"))
        };
        Ok(Self {
            valid_after: time("ValidAfter", &raw.valid_after)?,
            valid_before: time("ValidBefore", &raw.valid_before)?,
            cert_pem: raw.cert_pem,
            key_pem: raw.private_key_pem,
            serial: raw.serial_number,
            service_uri: raw.service_uri,
        })
    }
}
