//! Consul Connect from the gateway's side: the CA roots and the gateway's leaf certificate, each
//! watched by blocking query and installed into the mesh identity as they change.

use std::sync::Arc;
use std::time::SystemTime;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::client::{ConnectLeafAnswer, ConnectRootsAnswer, ConsulClient};
use super::error::ConsulError;
use super::sync::ServiceSync;
use super::watch::blocking_loop;
use crate::error::Chain;
use crate::mesh::{MeshIdentity, EXPIRY_WARNING_EVERY};

/// Readiness of the mesh identity: synced once both roots and leaf have loaded.
#[derive(Debug, Default)]
pub struct IdentitySyncs {
    /// The roots watch.
    pub roots: Arc<ServiceSync>,
    /// The leaf watch.
    pub leaf: Arc<ServiceSync>,
}

/// Watches the CA roots and the leaf of `identity.service` until `cancel`, installing each new
/// answer; a bad answer keeps the last good state and is logged and shown in `/status`.
pub async fn watch_identity(
    client: ConsulClient,
    identity: Arc<MeshIdentity>,
    syncs: Arc<IdentitySyncs>,
    cancel: CancellationToken,
) {
    let roots = {
        let (client, identity, syncs, cancel) = (
            client.clone(),
            identity.clone(),
            syncs.clone(),
            cancel.clone(),
        );
        async move {
            let fetch = |index| {
                let client = client.clone();
                async move { client.connect_roots(index).await }
            };
            let on_answer = |answer: ConnectRootsAnswer, _fresh: bool| match identity
                .set_roots(&answer.roots)
            {
                Ok(()) => {
                    identity.set_error(None);
                    syncs.roots.mark_synced();
                }
                Err(e) => {
                    tracing::error!(error = %Chain(&e), "Consul CA roots refused; the last good roots stay");
                    identity.set_error(Some(format!("CA roots: {}", Chain(&e))));
                }
            };
            blocking_loop("connect/ca/roots", &*syncs.roots, &cancel, fetch, on_answer).await
        }
    };
    let leaf = {
        let name = identity.service.clone();
        let identity = identity.clone();
        let cancel = cancel.clone();
        async move {
            let fetch = |index| {
                let client = client.clone();
                let name = name.clone();
                let identity = identity.clone();
                async move {
                    client.connect_leaf(&name, index).await.inspect_err(|e| {
                        if let ConsulError::Status { status, .. } = e {
                            if *status != http::StatusCode::FORBIDDEN {
                                return;
                            }
                            identity.set_error(Some(format!(
                                "leaf certificate: the ACL token needs service:write on {name} ({})",
                                Chain(e)
                            )));
                        }
                    })
                }
            };
            let on_answer = |answer: ConnectLeafAnswer, _fresh: bool| {
                let installed = answer
                    .leaf
                    .map_err(|e| e.to_string())
                    .and_then(|leaf| identity.set_leaf(&leaf).map_err(|e| Chain(&e).to_string()));
                match installed {
                    Ok(()) => {
                        identity.set_error(None);
                        syncs.leaf.mark_synced();
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "Consul leaf certificate refused; the last good leaf stays");
                        identity.set_error(Some(format!("leaf certificate: {e}")));
                    }
                }
            };
            blocking_loop("connect/ca/leaf", &*syncs.leaf, &cancel, fetch, on_answer).await
        }
    };
    // A leaf in its last tenth that Consul has not renewed (agent down) is worth a warning a
    // minute: once it expires, mesh requests fail.
    let warn = async {
        loop {
            if cancel
                .run_until_cancelled(tokio::time::sleep(EXPIRY_WARNING_EVERY))
                .await
                .is_none()
            {
                return;
            }
            let Some(leaf) = identity.leaf() else {
                continue;
            };
            let now = SystemTime::now();
            if leaf.renewal_overdue(now) {
                tracing::warn!(
                    spiffe_id = %leaf.uri,
                    seconds_left = leaf.seconds_left(now).floor(),
                    "the mesh leaf certificate is in its last tenth of validity and Consul has not renewed it"
                );
            }
        }
    };
    let span = tracing::info_span!("consul_watch", consul.watch = "connect");
    async { tokio::join!(roots, leaf, warn) }
        .instrument(span)
        .await;
}
