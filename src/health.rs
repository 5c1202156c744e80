//! Active health probes: one task per probed service, with its own small client (never the
//! request path's pool). Counters live in the task; only the verdict is written to the endpoint.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request};
use http_body_util::Empty;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::balancer::{Endpoint, ServicePool};
use crate::tls::{TlsError, UpstreamTls};

/// A validated `health_check`.
#[derive(Debug, Clone, PartialEq)]
pub struct HealthCheck {
    /// Probe path (and query).
    pub path: String,
    /// Probe method.
    pub method: Method,
    /// Time between rounds.
    pub interval: Duration,
    /// One probe's timeout.
    pub timeout: Duration,
    /// Passing status ranges, inclusive.
    pub expected: Vec<(u16, u16)>,
    /// Passes in a row to become healthy.
    pub healthy_threshold: u32,
    /// Failures in a row to become unhealthy.
    pub unhealthy_threshold: u32,
    /// Random extra delay per round.
    pub jitter: Duration,
    /// TCP connect only.
    pub tcp: bool,
}

/// Parses `"200-299"`, `"200,204"` or `"200-204,301"`.
pub fn parse_status_ranges(text: &str) -> Option<Vec<(u16, u16)>> {
    let mut out = Vec::new();
    for part in text.split(',') {
        let part = part.trim();
        let (lo, hi) = match part.split_once('-') {
            Some((a, b)) => (a.trim().parse().ok()?, b.trim().parse().ok()?),
            None => {
                let v: u16 = part.parse().ok()?;
                (v, v)
            }
        };
        if !(100..=599).contains(&lo) || !(100..=599).contains(&hi) || lo > hi {
            return None;
        }
        out.push((lo, hi));
    }
    (!out.is_empty()).then_some(out)
}

/// A health transition, as the library's `on_health_change` callback sees it.
#[derive(Debug, Clone)]
pub struct HealthChange {
    /// The service.
    pub service: Arc<str>,
    /// The endpoint's `host:port`.
    pub endpoint: String,
    /// The new verdict.
    pub healthy: bool,
    /// What the last probe saw.
    pub reason: String,
}

/// Called on every transition (the seed's `OnHealthChange`).
pub type HealthCallback = Arc<dyn Fn(&HealthChange) + Send + Sync>;

type ProbeClient = Client<HttpsConnector<HttpConnector>, Empty<Bytes>>;

/// A probe client for plain and TLS endpoints: `https` (and `wss`) services are probed over
/// TLS with the route's `upstream_tls` settings (system roots when it has none), HTTP/1.1.
fn probe_client(timeout: Duration, tls: &UpstreamTls) -> Result<ProbeClient, TlsError> {
    let mut http = HttpConnector::new();
    http.set_connect_timeout(Some(timeout));
    http.set_nodelay(true);
    http.enforce_http(false);
    let connector = crate::tls::https_connector(
        crate::tls::client_config(tls)?,
        tls.server_name.clone(),
        http,
        true,
    );
    // A fresh connection per probe: a probe must notice a dead listener, not a pooled socket.
    Ok(Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(0)
        .build(connector))
}

/// Probes one endpoint; `Err` says why it failed.
async fn probe(
    client: &ProbeClient,
    check: &HealthCheck,
    scheme: &http::uri::Scheme,
    ep: &Endpoint,
) -> Result<(), String> {
    if check.tcp {
        let addr = ep.authority.as_str().to_owned();
        return match tokio::time::timeout(check.timeout, tokio::net::TcpStream::connect(addr)).await
        {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(format!("connect: {e}")),
            Err(_) => Err(format!("connect timed out after {:?}", check.timeout)),
        };
    }
    let uri = format!("{scheme}://{}{}", ep.authority, check.path);
    let req = Request::builder()
        .method(check.method.clone())
        .uri(uri)
        .header(http::header::USER_AGENT, "meshgate-health-check")
        .body(Empty::new())
        .map_err(|e| e.to_string())?;
    match tokio::time::timeout(check.timeout, client.request(req)).await {
        Ok(Ok(resp)) => {
            let code = resp.status().as_u16();
            if check
                .expected
                .iter()
                .any(|(lo, hi)| (*lo..=*hi).contains(&code))
            {
                Ok(())
            } else {
                Err(format!("status {code}"))
            }
        }
        Ok(Err(e)) => Err(format!("request: {}", crate::error::Chain(&e))),
        Err(_) => Err(format!("timed out after {:?}", check.timeout)),
    }
}

#[derive(Default)]
struct Streak {
    passes: u32,
    failures: u32,
}

/// Probes every endpoint of `pool` each interval until `cancel`, flipping endpoints only after
/// their threshold is met.
pub async fn run_probes(
    pool: Arc<ServicePool>,
    check: HealthCheck,
    tls: UpstreamTls,
    on_change: Option<HealthCallback>,
    cancel: CancellationToken,
) {
    let client = match probe_client(check.timeout, &tls) {
        Ok(c) => c,
        Err(e) => {
            // Only a broken system trust store or unreadable files get here; config
            // validation read the same files already. Endpoints keep their state.
            tracing::warn!(service = %pool.name(), error = %crate::error::Chain(&e), "health probes cannot start: TLS settings unusable");
            return;
        }
    };
    let mut streaks: HashMap<String, Streak> = HashMap::new();
    let first_delay = check.jitter.mul_f64(fastrand::f64());
    tokio::select! {
        _ = cancel.cancelled() => return,
        _ = tokio::time::sleep(first_delay) => {}
    }
    loop {
        let snap = pool.snapshot();
        let mut round = JoinSet::new();
        for ep in snap.list().iter().cloned() {
            let (client, check, scheme) = (client.clone(), check.clone(), pool.scheme().clone());
            round.spawn(async move {
                let result = probe(&client, &check, &scheme, &ep).await;
                (ep, result)
            });
        }
        let results = tokio::select! {
            _ = cancel.cancelled() => return,
            r = round.join_all() => r,
        };
        streaks.retain(|k, _| snap.list().iter().any(|e| e.authority.as_str() == k));
        for (ep, result) in results {
            let streak = streaks.entry(ep.authority.as_str().to_owned()).or_default();
            let healthy = ep.state.is_healthy();
            match &result {
                Ok(()) => {
                    streak.passes += 1;
                    streak.failures = 0;
                    if healthy && ep.state.end_ejection() {
                        tracing::info!(service = %pool.name(), upstream.addr = %ep.authority, "ejection ended by a passing probe");
                    }
                }
                Err(_) => {
                    streak.failures += 1;
                    streak.passes = 0;
                }
            }
            let flip = match (healthy, &result) {
                (false, Ok(())) => streak.passes >= check.healthy_threshold,
                (true, Err(_)) => streak.failures >= check.unhealthy_threshold,
                _ => false,
            };
            if flip && ep.state.set_healthy(!healthy) {
                let reason = match &result {
                    Ok(()) => "probe passed".to_owned(),
                    Err(e) => e.clone(),
                };
                if healthy {
                    tracing::warn!(service = %pool.name(), upstream.addr = %ep.authority, reason = %reason, "endpoint unhealthy");
                } else {
                    tracing::info!(service = %pool.name(), upstream.addr = %ep.authority, "endpoint healthy");
                }
                if let Some(cb) = &on_change {
                    cb(&HealthChange {
                        service: pool.name().clone(),
                        endpoint: ep.authority.as_str().to_owned(),
                        healthy: !healthy,
                        reason,
                    });
                }
            }
        }
        let delay = check.interval + check.jitter.mul_f64(fastrand::f64());
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_ranges_parse() {
        assert_eq!(parse_status_ranges("200-299"), Some(vec![(200, 299)]));
        assert_eq!(
            parse_status_ranges("200, 204-206"),
            Some(vec![(200, 200), (204, 206)])
        );
        assert_eq!(parse_status_ranges("299-200"), None);
        assert_eq!(parse_status_ranges("abc"), None);
        assert_eq!(parse_status_ranges("700"), None);
    }
}
