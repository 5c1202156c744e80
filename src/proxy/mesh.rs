//! Mesh upstreams: mTLS clients that present the gateway's leaf and accept only the route's
//! destination service, rebuilt (so connections are new) whenever the leaf or the roots change.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::SystemTime;

use arc_swap::ArcSwapOption;

use super::client::{build, Transport, UpstreamClient};
use super::error::ProxyError;
use super::settings::UpstreamConfig;
use crate::mesh::{service_path, service_sni, MeshIdentity};

/// A route's mesh destination.
pub struct MeshUpstream {
    identity: Arc<MeshIdentity>,
    service: Arc<str>,
    datacenter: Option<String>,
    upstream: UpstreamConfig,
    clients: ArcSwapOption<MeshClients>,
    denials: AtomicU64,
    /// When a denial was last logged (`clock::now_ms`), so the log says it once a minute.
    denial_logged_ms: AtomicU64,
}

/// The clients of one identity generation.
pub struct MeshClients {
    generation: u64,
    /// TLS with ALPN h2 and http/1.1 (HTTP/1.1 when the sidecar negotiates nothing).
    pub client: UpstreamClient,
    /// HTTP/1.1 only, for WebSocket upgrades.
    pub http1: UpstreamClient,
    /// The SPIFFE path the destination must present.
    pub expected: String,
}

impl MeshUpstream {
    /// A destination `service` reached with `identity`; `datacenter` is where the service lives
    /// (`None`: the gateway's own, read from its leaf).
    pub fn new(
        identity: Arc<MeshIdentity>,
        service: Arc<str>,
        datacenter: Option<String>,
        upstream: UpstreamConfig,
    ) -> Self {
        Self {
            identity,
            service,
            datacenter,
            upstream,
            clients: ArcSwapOption::empty(),
            denials: AtomicU64::new(0),
            denial_logged_ms: AtomicU64::new(0),
        }
    }

    /// The destination service.
    pub fn service(&self) -> &Arc<str> {
        &self.service
    }

    /// Counts one refusal by the destination's intentions.
    pub fn record_denial(&self) {
        self.denials.fetch_add(1, Ordering::Relaxed);
    }

    /// Refusals by the destination's intentions so far.
    pub fn denials(&self) -> u64 {
        self.denials.load(Ordering::Relaxed)
    }

    /// True at most once a minute: whether a denial should be logged now.
    pub fn denial_log_due(&self) -> bool {
        let now = crate::clock::now_ms();
        let last = self.denial_logged_ms.load(Ordering::Relaxed);
        (last == 0 || now.saturating_sub(last) >= 60_000)
            && self
                .denial_logged_ms
                .compare_exchange(last, now.max(1), Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
    }

    /// The identity this route's requests present.
    pub fn identity(&self) -> &MeshIdentity {
        &self.identity
    }

    /// The SPIFFE ID the destination must present, once the identity has loaded.
    pub fn expected_id(&self) -> Option<String> {
        let snap = self.identity.snapshot()?;
        let dc = self.datacenter.as_deref().or(snap.leaf.datacenter())?;
        Some(format!(
            "spiffe://{}{}",
            snap.roots.trust_domain,
            service_path(dc, &self.service)
        ))
    }

    /// The clients for the current leaf and roots; built on first use after each change.
    pub fn clients(&self) -> Result<Arc<MeshClients>, ProxyError> {
        let identity = || self.identity.service.clone();
        let Some(snap) = self.identity.snapshot() else {
            return Err(ProxyError::MeshUnavailable {
                identity: identity(),
            });
        };
        if snap.leaf.expired(SystemTime::now()) {
            return Err(ProxyError::MeshCertExpired {
                identity: identity(),
            });
        }
        if let Some(c) = self.clients.load_full() {
            if c.generation == snap.generation {
                return Ok(c);
            }
        }
        let dc = self
            .datacenter
            .as_deref()
            .or(snap.leaf.datacenter())
            .unwrap_or("dc1");
        let expected = service_path(dc, &self.service);
        let sni = service_sni(&snap.roots.trust_domain, dc, &self.service);
        let tls = snap.client_config(expected.clone());
        let clients = Arc::new(MeshClients {
            generation: snap.generation,
            client: build(
                &self.upstream,
                tls.clone(),
                Some(sni.clone()),
                Transport::Auto,
            ),
            http1: build(&self.upstream, tls, Some(sni), Transport::Http1),
            expected,
        });
        // Requests racing here build the same clients; the last store wins, which is harmless.
        self.clients.store(Some(clients.clone()));
        Ok(clients)
    }
}
