//! Consul discovery client: settings, the HTTP client for the health/catalog API, decoding
//! into `Discovered` sets, and the blocking-query watch loops. Pools are not touched here:
//! callers receive endpoint sets through `on_change` callbacks.

mod client;
mod decode;
mod error;
mod feed;
mod kv;
mod publish;
mod settings;
mod sync;
mod tags;
mod watch;

#[cfg(test)]
mod tests;

pub use client::{CatalogAnswer, ConsulClient, HealthAnswer, StateAnswer};
pub use decode::{
    aggregate_status, excluded_instances, has_all_tags, to_discovered, CheckEntry,
    ExcludedInstance, HealthEntry, Node, Service, Weights, MAX_WEIGHT,
};
pub use error::ConsulError;
pub use feed::{watch_many, ServiceWatch};
pub use kv::{decode_kv, watch_kv, KvAnswer};
pub use settings::{
    ConsulSettings, RawConsul, TlsSettings, TokenSource, WarningMode, DEFAULT_ADDRESS,
};
pub use sync::{ServiceSync, SyncSnapshot};
pub use tags::{parse_tag_routes, parse_tag_routes_with_warnings, TagRoute};
pub use watch::{next_index, watch_catalog, watch_service, Backoff, IndexStep, TokenBucket};
