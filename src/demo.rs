//! `meshgate demo`: the embedded seed topology with a built-in mock service behind every
//! loopback target, so the README's curl commands work with nothing else running.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use tokio_util::sync::CancellationToken;

use crate::config::{Backend, Config, StaticService};
use crate::discovery::Discovered;

/// One mock service started for the demo.
#[derive(Debug, Clone)]
pub struct DemoService {
    /// Service name the mock answers with.
    pub name: String,
    /// Where it listens.
    pub addr: SocketAddr,
}

/// Starts a mock service for every loopback target of `config`, named after its service.
///
/// With `ephemeral`, each mock binds port 0 and the config is rewritten to point at it (the
/// tests use this); otherwise mocks bind the configured ports, as the README's demo does.
pub async fn start_mocks(
    config: &mut Config,
    ephemeral: bool,
    shutdown: &CancellationToken,
) -> std::io::Result<Vec<DemoService>> {
    let mut started = Vec::new();
    let mut services: Vec<(String, &mut StaticService)> = Vec::new();
    for (name, svc) in config.discovery.static_services.iter_mut() {
        services.push((name.to_string(), svc));
    }
    for route in config.routes.iter_mut() {
        let name = route.name.to_string();
        if let Backend::Targets(svc) = &mut route.backend {
            services.push((name, svc));
        }
    }
    for (name, svc) in services {
        for ep in svc.endpoints.iter_mut() {
            let ip: IpAddr = match &*ep.host {
                "localhost" => Ipv4Addr::LOCALHOST.into(),
                h => match h.parse() {
                    Ok(ip) => ip,
                    Err(_) => continue,
                },
            };
            if !ip.is_loopback() {
                continue;
            }
            let port = if ephemeral { 0 } else { ep.port };
            let addr = crate::mock::spawn(SocketAddr::new(ip, port), &name, shutdown.clone())
                .await
                .map_err(|e| {
                    std::io::Error::new(
                        e.kind(),
                        format!("starting demo {name} on {ip}:{port}: {e}"),
                    )
                })?;
            if ephemeral {
                *ep = Discovered::new(ep.host.clone(), addr.port(), ep.weight);
            }
            started.push(DemoService {
                name: name.clone(),
                addr,
            });
        }
    }
    Ok(started)
}

/// The curl commands printed by `meshgate demo` (and shown in the README).
pub fn curl_commands(gateway: SocketAddr, admin: Option<SocketAddr>) -> Vec<String> {
    let g = format!("http://{gateway}");
    let mut cmds = vec![
        format!("curl {g}/api/v1/users            # round robin across two user-service instances"),
        format!("curl {g}/api/v1/users/1"),
        format!(
            "curl {g}/api/v1/orders           # weighted 3:1 across two order-service instances"
        ),
        format!("curl {g}/api/v1/products"),
        format!("curl {g}/api/v1/unknown          # 404 with a JSON error"),
        format!("curl {g}/health"),
        format!("curl {g}/status"),
    ];
    if let Some(a) = admin {
        cmds.push(format!("curl http://{a}/ready"));
    }
    cmds
}
