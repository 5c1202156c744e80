//! The task that keeps the gateway registered with its Consul agent (registering again when
//! the agent forgot it) until shutdown deregisters it.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use serde::Serialize;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::client::ConsulClient;
use super::registration::ServicePayload;
use super::watch::Backoff;
use crate::error::Chain;

/// How long shutdown waits for the deregistration answer before draining anyway.
const DEREGISTER_TIMEOUT: Duration = Duration::from_secs(5);
const RETRY_BASE: Duration = Duration::from_millis(500);
const RETRY_CAP: Duration = Duration::from_secs(30);

/// Where the gateway's registration stands, for `/status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "state", rename_all = "lowercase")]
pub enum RegistrationState {
    /// Not registered yet (first attempt in flight).
    Pending,
    /// The agent accepted the registration (and, at the last look, still had it).
    Registered,
    /// The last attempt failed; retried with backoff.
    Error {
        /// The error with its causes.
        message: String,
    },
    /// Deregistered on shutdown.
    Deregistered,
}

/// The gateway's registration as admin views see it: its service ID and state. Written only
/// by the registration task and its [`RegistrationTask::deregister`].
#[derive(Debug)]
pub struct RegistrationStatus {
    id: String,
    name: String,
    state: ArcSwap<RegistrationState>,
}

impl RegistrationStatus {
    /// The registered service ID.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The current state.
    pub fn state(&self) -> RegistrationState {
        (**self.state.load()).clone()
    }

    /// `{"id", "name", "state", "message"?}` for `/status`.
    pub fn to_json(&self) -> serde_json::Value {
        let mut v = serde_json::to_value(self.state()).unwrap_or_default();
        v["id"] = self.id.clone().into();
        v["name"] = self.name.clone().into();
        v
    }

    fn set(&self, state: RegistrationState) {
        self.state.store(Arc::new(state));
    }
}

/// The running registration task; [`RegistrationTask::deregister`] ends it.
#[derive(Debug)]
pub struct RegistrationTask {
    client: ConsulClient,
    status: Arc<RegistrationStatus>,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

/// Registers `payload` with the agent and keeps it registered: every `interval` it reads
/// `/v1/agent/service/<id>` and registers again when the agent answers 404 (restarted agent,
/// critical check reaped). Failures (403, agent down) are logged and retried with backoff
/// (0.5s doubling to 30s); they never stop the gateway.
pub fn spawn_registration(
    client: ConsulClient,
    payload: ServicePayload,
    interval: Duration,
) -> RegistrationTask {
    let status = Arc::new(RegistrationStatus {
        id: payload.id.clone(),
        name: payload.name.clone(),
        state: ArcSwap::from_pointee(RegistrationState::Pending),
    });
    let stop = CancellationToken::new();
    let task = tokio::spawn(keep_registered(
        client.clone(),
        payload,
        interval,
        status.clone(),
        stop.clone(),
    ));
    RegistrationTask {
        client,
        status,
        stop,
        task,
    }
}

impl RegistrationTask {
    /// The state shown in `/status`.
    pub fn status(&self) -> &Arc<RegistrationStatus> {
        &self.status
    }

    /// Stops re-registering, then deregisters (waiting at most 5 s for the agent). Failures
    /// are logged: Consul's `DeregisterCriticalServiceAfter` removes the entry eventually.
    pub async fn deregister(self) {
        self.stop.cancel();
        // The loop must be over before the deregistration, or it could register again after it.
        let _ = self.task.await;
        let id = self.status.id.as_str();
        match tokio::time::timeout(DEREGISTER_TIMEOUT, self.client.deregister_service(id)).await {
            Ok(Ok(())) => {
                tracing::info!(service.id = id, "deregistered the gateway from Consul");
                self.status.set(RegistrationState::Deregistered);
            }
            Ok(Err(e)) => {
                tracing::warn!(service.id = id, error = %Chain(&e), "deregistering the gateway from Consul failed; Consul removes it once its check stays critical");
                self.status.set(RegistrationState::Error {
                    message: Chain(&e).to_string(),
                });
            }
            Err(_) => {
                tracing::warn!(service.id = id, timeout = ?DEREGISTER_TIMEOUT, "Consul did not answer the deregistration in time; Consul removes the gateway once its check stays critical");
            }
        }
    }
}

async fn keep_registered(
    client: ConsulClient,
    payload: ServicePayload,
    interval: Duration,
    status: Arc<RegistrationStatus>,
    stop: CancellationToken,
) {
    let id = payload.id.as_str();
    let mut backoff = Backoff::new(RETRY_BASE, RETRY_CAP);
    let mut registered = false;
    loop {
        let outcome = if registered {
            // Cheap look: does the agent still know us? 404 means it forgot (agent restart).
            match stop.run_until_cancelled(client.agent_service(id)).await {
                None => return,
                Some(Ok(true)) => Ok(()),
                Some(Ok(false)) => {
                    tracing::warn!(
                        service.id = id,
                        "the Consul agent no longer knows the gateway; registering again"
                    );
                    registered = false;
                    continue;
                }
                Some(Err(e)) => Err(e),
            }
        } else {
            match stop
                .run_until_cancelled(client.register_service(&payload))
                .await
            {
                None => return,
                Some(Ok(())) => {
                    tracing::info!(
                        service.id = id,
                        service.name = %payload.name,
                        connect.native = payload.connect.is_some(),
                        "registered the gateway in Consul"
                    );
                    registered = true;
                    Ok(())
                }
                Some(Err(e)) => Err(e),
            }
        };
        let pause = match outcome {
            Ok(()) => {
                backoff.reset();
                status.set(RegistrationState::Registered);
                interval
            }
            Err(e) => {
                let delay = backoff.next_delay();
                let message = Chain(&e).to_string();
                if e.is_acl() {
                    tracing::warn!(service.id = id, error = %message, retry_in = ?delay, "Consul refused the gateway's registration: the ACL token needs service:write on its name");
                } else {
                    tracing::warn!(service.id = id, error = %message, retry_in = ?delay, "registering the gateway in Consul failed");
                }
                // Whatever failed, the next attempt registers again (idempotent for one ID).
                registered = false;
                status.set(RegistrationState::Error { message });
                delay
            }
        };
        if stop
            .run_until_cancelled(tokio::time::sleep(pause))
            .await
            .is_none()
        {
            return;
        }
    }
}
