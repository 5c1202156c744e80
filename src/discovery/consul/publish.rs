//! When a service's endpoint set is handed to its caller: decode, record, dedupe, publish.
//! Shared by the per-service watch and the change feed; knows nothing of queries or pools.

use std::sync::Arc;

use super::client::HealthAnswer;
use super::decode::{excluded_instances, to_discovered};
use super::settings::WarningMode;
use super::sync::ServiceSync;
use crate::discovery::Discovered;

/// Turns the successful health answers of one service into calls of `publish`.
///
/// The rules, for [`super::watch_service`] and both modes of [`super::watch_many`]:
/// - The first answer is always published, even when its set is empty.
/// - After that, an answer whose set and registration ([`ServiceSync::registered`]) equal the
///   last published ones publishes nothing. A set of zero instances is published (as
///   `vec![]`) when it differs, also when the service went from "all instances unhealthy" to
///   "not registered" or back, so the caller can tell the two apart.
/// - Failures never publish: only a successful answer reaches [`Publisher::apply`], and the
///   callers record errors on the [`ServiceSync`] instead, so the last good set stays.
/// - The instance count, excluded instances and registration are stored on the
///   [`ServiceSync`] before `publish` runs, and it is marked synced only after `publish`
///   returns (so /ready implies published).
pub(super) struct Publisher<F> {
    service: Arc<str>,
    sync: Arc<ServiceSync>,
    publish: F,
    warning: WarningMode,
    required_tags: Vec<String>,
    /// Last published set and registration; `None` until the first answer.
    last: Option<(Vec<Discovered>, bool)>,
}

impl<F: FnMut(Vec<Discovered>)> Publisher<F> {
    /// A publisher for `service` that has published nothing yet. `warning` and
    /// `required_tags` are the client's, as [`super::to_discovered`] takes them.
    pub(super) fn new(
        service: Arc<str>,
        sync: Arc<ServiceSync>,
        publish: F,
        warning: WarningMode,
        required_tags: Vec<String>,
    ) -> Self {
        Self {
            service,
            sync,
            publish,
            warning,
            required_tags,
            last: None,
        }
    }

    /// The watched service's name.
    pub(super) fn service(&self) -> &Arc<str> {
        &self.service
    }

    /// The service's status, written here and by the caller's error handling.
    pub(super) fn sync(&self) -> &Arc<ServiceSync> {
        &self.sync
    }

    /// Applies one successful answer by the rules above; returns whether `publish` ran.
    pub(super) fn apply(&mut self, answer: &HealthAnswer) -> bool {
        let set = to_discovered(&answer.entries, &self.warning, &self.required_tags);
        // No `?passing` is sent, so an empty answer means Consul lists no instance at all.
        let registered = !answer.entries.is_empty();
        self.sync.set_instances(set.len());
        self.sync.set_excluded(excluded_instances(
            &answer.entries,
            &self.warning,
            &self.required_tags,
        ));
        self.sync.set_registered(registered);
        let changed = self
            .last
            .as_ref()
            .is_none_or(|(last, was)| *last != set || *was != registered);
        if changed {
            tracing::info!(
                service = %self.service,
                consul.index = answer.index,
                instances = set.len(),
                "endpoint set changed"
            );
            (self.publish)(set.clone());
            self.last = Some((set, registered));
        }
        self.sync.mark_synced();
        changed
    }
}
