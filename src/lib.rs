//! meshgate: a Consul-centric HTTP edge gateway.
//!
//! # Request flow
//! A connection is accepted by [`server`], which hands each request to [`proxy::handle`]:
//! the path is dot-normalised, [`routes::RouteTable`] picks the longest matching prefix, the
//! route's [`balancer::Picker`] leases an endpoint from its service's [`balancer::ServicePool`]
//! (one atomic snapshot load), and [`proxy::forward`] sends the rewritten request over the
//! pooled upstream client, streaming bodies both ways. Errors become responses once, in `proxy`.
//!
//! # Who writes what
//! [`discovery`] is the only writer of pools (`ServicePool::replace`); the request path only
//! reads snapshots and bumps per-endpoint atomics, which survive discovery updates.
//! [`admin`] reads everything for `/health` and `/status`. [`config`] turns the file and the
//! environment into a validated [`config::Config`] before anything starts.

#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]
#![warn(missing_docs)]

pub mod admin;
pub mod balancer;
pub mod builder;
pub mod config;
pub mod demo;
pub mod discovery;
pub mod mock;
pub mod proxy;
pub mod routes;
pub mod server;
pub mod telemetry;

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use admin::AdminState;
use balancer::ServicePool;
use config::{Backend, Config};
use discovery::StaticDiscovery;
use proxy::{ErrorHandler, ProxyState};
use routes::{Route, RouteTable};

/// Already-bound listeners; `main` binds the configured addresses, tests bind port 0.
#[derive(Debug)]
pub struct Listeners {
    /// The proxy listener.
    pub main: TcpListener,
    /// The admin listener, when enabled.
    pub admin: Option<TcpListener>,
}

impl Listeners {
    /// Binds the addresses in `config`.
    pub async fn bind(config: &Config) -> std::io::Result<Self> {
        let main = TcpListener::bind(config.listen)
            .await
            .map_err(|e| with_addr(e, config.listen))?;
        let admin = match config.admin.listen {
            Some(a) => Some(TcpListener::bind(a).await.map_err(|e| with_addr(e, a))?),
            None => None,
        };
        Ok(Self { main, admin })
    }
}

fn with_addr(e: std::io::Error, addr: SocketAddr) -> std::io::Error {
    std::io::Error::new(e.kind(), format!("binding {addr}: {e}"))
}

/// A built gateway: pools, routes and providers, ready to [`run`](Gateway::run).
pub struct Gateway {
    config: Config,
    state: Arc<ProxyState>,
    static_discovery: StaticDiscovery,
}

impl Gateway {
    /// Builds pools and routes from a validated config.
    pub fn build(config: Config) -> Self {
        Self::build_with(config, HashMap::new())
    }

    /// Like [`Gateway::build`], with error handlers written in code, by route name.
    pub fn build_with(config: Config, mut error_handlers: HashMap<String, ErrorHandler>) -> Self {
        let mut pools: BTreeMap<Arc<str>, Arc<ServicePool>> = BTreeMap::new();
        let mut static_pools = BTreeMap::new();
        for (name, svc) in &config.discovery.static_services {
            let pool = Arc::new(ServicePool::new(name.clone(), svc.scheme.clone()));
            pool.replace(svc.endpoints.clone());
            pools.insert(name.clone(), pool.clone());
            static_pools.insert(name.clone(), pool);
        }
        let mut routes = Vec::new();
        for rc in &config.routes {
            let pool = match &rc.backend {
                Backend::Targets(svc) => {
                    let pool = Arc::new(ServicePool::new(rc.name.clone(), svc.scheme.clone()));
                    pool.replace(svc.endpoints.clone());
                    static_pools.insert(rc.name.clone(), pool.clone());
                    pool
                }
                Backend::Service(name) => pools
                    .entry(name.clone())
                    .or_insert_with(|| {
                        Arc::new(ServicePool::new(name.clone(), http::uri::Scheme::HTTP))
                    })
                    .clone(),
            };
            pools.insert(rc.service_name().clone(), pool.clone());
            let handler = error_handlers.remove(&*rc.name);
            routes.push(Arc::new(Route::new(rc, pool, handler)));
        }
        let state = Arc::new(ProxyState {
            table: ArcSwap::from_pointee(RouteTable::new(routes)),
            pools,
            client: proxy::forward::client(&config.upstream),
            cors: config.cors.clone(),
            expose_admin: config.admin.expose_on_main,
            admin: Arc::new(AdminState::new(config.admin.token.clone())),
        });
        Self {
            config,
            state,
            static_discovery: StaticDiscovery::new(static_pools),
        }
    }

    /// The static provider, to change static services while the gateway runs.
    pub fn static_discovery(&self) -> &StaticDiscovery {
        &self.static_discovery
    }

    /// A service's pool.
    pub fn pool(&self, service: &str) -> Option<Arc<ServicePool>> {
        self.state.pools.get(service).cloned()
    }

    /// The request-path state (for admin views and tests).
    pub fn state(&self) -> &Arc<ProxyState> {
        &self.state
    }

    /// Runs until `shutdown` resolves, then shuts down in order: fail readiness, wait the
    /// drain delay, stop accepting, let in-flight requests finish within the grace period,
    /// and stop background tasks.
    pub async fn run(
        self,
        listeners: Listeners,
        shutdown: impl Future<Output = ()>,
    ) -> std::io::Result<()> {
        let stop_accepting = CancellationToken::new();
        let background = CancellationToken::new();
        let tracker = TaskTracker::new();
        let graceful = Arc::new(GracefulShutdown::new());
        let server_cfg = self.config.server.clone();

        let main_addr = listeners.main.local_addr()?;
        let mut accept_loops = Vec::new();
        accept_loops.push(tokio::spawn(server::serve(
            listeners.main,
            server::Role::Main,
            self.state.clone(),
            server_cfg.clone(),
            graceful.clone(),
            stop_accepting.clone(),
        )));
        let admin_addr = match listeners.admin {
            Some(l) => {
                let addr = l.local_addr()?;
                // The admin listener is not drained: it must keep answering /ready during drain.
                accept_loops.push(tokio::spawn(server::serve(
                    l,
                    server::Role::Admin,
                    self.state.clone(),
                    server_cfg.clone(),
                    Arc::new(GracefulShutdown::new()),
                    background.clone(),
                )));
                Some(addr)
            }
            None => None,
        };
        // Static pools are complete at build time; Consul readiness arrives with its provider.
        self.state.admin.set_ready(true);
        tracing::info!(listen = %main_addr, admin = ?admin_addr, routes = self.config.routes.len(), "meshgate ready");

        shutdown.await;
        self.state.admin.set_ready(false);
        if !server_cfg.drain_delay.is_zero() {
            tracing::info!(drain_delay = ?server_cfg.drain_delay, "shutting down: readiness failed, draining");
            tokio::time::sleep(server_cfg.drain_delay).await;
        }
        stop_accepting.cancel();
        let main_loop = accept_loops.remove(0);
        let _ = main_loop.await;
        // The accept loop has ended, so this is the last handle to the main listener's watcher.
        match Arc::try_unwrap(graceful) {
            Ok(graceful) => {
                if tokio::time::timeout(server_cfg.grace_period, graceful.shutdown())
                    .await
                    .is_err()
                {
                    tracing::warn!(grace_period = ?server_cfg.grace_period, "grace period over; closing remaining connections");
                }
            }
            Err(_) => tracing::warn!(
                "connection watcher still shared; not waiting for in-flight requests"
            ),
        }
        background.cancel();
        for l in accept_loops {
            let _ = l.await;
        }
        tracker.close();
        tracker.wait().await;
        tracing::info!("meshgate stopped");
        Ok(())
    }
}
