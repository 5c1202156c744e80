//! Consul discovery client: settings, the HTTP client for the health/catalog API, decoding
//! into `Discovered` sets, the blocking-query watch loops and the gateway's own registration.
//! Pools are not touched here: callers receive endpoint sets through `on_change` callbacks.

mod client;
mod connect;
mod decode;
mod error;
mod feed;
mod kv;
mod publish;
mod register;
mod registration;
mod settings;
mod sync;
mod tags;
mod watch;

#[cfg(test)]
mod tests;

pub use client::{
    CatalogAnswer, ConnectLeafAnswer, ConnectRootsAnswer, ConsulClient, HealthAnswer, StateAnswer,
};
pub use connect::{watch_identity, IdentitySyncs};
pub use decode::{
    aggregate_status, excluded_instances, has_all_tags, to_discovered, CheckEntry,
    ExcludedInstance, HealthEntry, Node, Service, Weights, MAX_WEIGHT,
};
pub use error::ConsulError;
pub use feed::{watch_many, ServiceWatch};
pub use kv::{decode_kv, watch_kv, KvAnswer};
pub use register::{spawn_registration, RegistrationState, RegistrationStatus, RegistrationTask};
pub use registration::{
    CheckPayload, ConnectPayload, RawRegister, RegisterSettings, ServicePayload,
};
pub use settings::{
    ConnectSettings, ConsulSettings, RawConnect, RawConsul, TlsSettings, TokenSource, WarningMode,
    DEFAULT_ADDRESS,
};
pub use sync::{ServiceSync, SyncSnapshot};
pub use tags::{parse_tag_routes, parse_tag_routes_with_warnings, TagRoute};
pub use watch::{next_index, watch_catalog, watch_service, Backoff, IndexStep, TokenBucket};
