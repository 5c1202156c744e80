//! The static provider: services with fixed endpoints that the demo and tests change while the
//! gateway runs, through the same `ServicePool::replace` as a Consul answer.

use std::sync::Arc;

use super::{ControlState, Source};
use crate::discovery::Discovered;

/// The static provider: an in-memory map of service name to endpoints that can change at run time.
///
/// The demo and the tests change it while the gateway runs; each change goes through the same
/// `ServicePool::replace` as a Consul answer does. A reload puts the configured endpoints back.
#[derive(Clone)]
pub struct StaticDiscovery {
    control: Arc<ControlState>,
}

impl StaticDiscovery {
    pub(crate) fn new(control: Arc<ControlState>) -> Self {
        Self { control }
    }

    /// Replaces the endpoints of a static `service`; false when no such static service exists.
    pub fn set(&self, service: &str, endpoints: Vec<Discovered>) -> bool {
        match self.control.services.load().get(service) {
            Some(s) if s.source == Source::Static => {
                s.pool.replace(endpoints);
                true
            }
            _ => false,
        }
    }
}
