//! meshgate: a Consul-centric HTTP edge gateway.
//!
//! # Layers
//! Modules import only from their own layer or below, and no two files import each other
//! (`tests/architecture.rs` checks both):
//!
//! | layer | modules |
//! |---|---|
//! | leaf | [`clock`], [`error`], [`tls`], [`limits`], [`metrics`], [`discovery`] (vocabulary), [`body`], [`conn`], [`rules`], [`mock`] |
//! | domain | [`balancer`], [`health`], [`mesh`] (Connect identity), [`discovery::consul`], [`telemetry`], [`ratelimit`], [`auth`], [`cache`] (response store) |
//! | data plane | [`proxy`]: route and table, stage pipeline, forwarding, pool, response body, upgrades |
//! | serving | [`server`] (decides which admin paths the main listener answers) |
//! | configuration | [`config`]: figment, raw, validated, from the lower layers' settings types |
//! | control plane | [`control`]: shared control state, registry, reload, static discovery, `/metrics` |
//! | admin | [`admin`] |
//! | root | this crate root ([`Gateway`]), [`builder`], [`demo`], `main` |
//!
//! # Request flow
//! [`server`] accepts a connection and hands each request to [`proxy::handle`]: head rules, path
//! normalisation and CORS, then [`proxy::RouteTable`] picks the longest matching prefix and the
//! route's [`proxy::pipeline::Pipeline`] runs its stages; [`proxy::forward`] leases an endpoint
//! from the service's [`balancer::ServicePool`] (one atomic snapshot load) and streams the
//! request and the answer. Errors become responses once, in [`proxy`].
//!
//! # Who writes what
//! The control plane's registry is the only writer of pools (`ServicePool::replace`, fed by
//! Consul and the static map) and of the route table; the request path only reads snapshots and
//! bumps atomics, which survive discovery updates.

#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]
#![deny(clippy::disallowed_methods, clippy::disallowed_types)]
#![warn(missing_docs)]

pub mod admin;
pub mod auth;
pub mod balancer;
pub mod body;
pub mod builder;
pub mod cache;
pub mod clock;
pub mod config;
pub mod conn;
pub mod control;
pub mod demo;
pub mod discovery;
pub mod error;
pub mod health;
pub mod limits;
pub mod mesh;
pub mod metrics;
pub mod mock;
pub mod proxy;
pub mod ratelimit;
pub mod rules;
pub mod server;
pub mod telemetry;
pub mod tls;

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::{ArcSwap, ArcSwapOption};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use admin::Admin;
use balancer::ServicePool;
use config::{Config, ConfigError, Env};
use control::registry::{Registry, RegistryError};
use control::reload::Reloader;
use control::static_discovery::StaticDiscovery;
use control::{ControlState, Readiness};
use discovery::consul::{ConsulClient, RegisterSettings};
use health::HealthCallback;
use proxy::route::{ErrorHandler, RouteTable};
use proxy::ProxyState;

/// Already-bound listeners; `main` binds the configured addresses, tests bind port 0.
#[derive(Debug)]
pub struct Listeners {
    /// The proxy listener.
    pub main: TcpListener,
    /// The admin listener, when enabled.
    pub admin: Option<TcpListener>,
    /// The TLS listener, when `[tls]` is configured.
    pub tls: Option<TcpListener>,
}

impl Listeners {
    /// Binds the addresses in `config`. With `server.reuse_port` every listener is bound with
    /// `SO_REUSEPORT`, so a new process can bind the same ports while this one drains.
    pub async fn bind(config: &Config) -> std::io::Result<Self> {
        let reuse_port = config.server.reuse_port;
        let main = bind_listener(config.listen, reuse_port)?;
        let admin = match config.admin.listen {
            Some(a) => Some(bind_listener(a, reuse_port)?),
            None => None,
        };
        let tls = match &config.tls {
            Some(t) => Some(bind_listener(t.listen, reuse_port)?),
            None => None,
        };
        Ok(Self { main, admin, tls })
    }
}

/// Binds one listener as tokio does (`SO_REUSEADDR` on Unix, backlog 1024), plus
/// `SO_REUSEPORT` when asked for.
fn bind_listener(addr: SocketAddr, reuse_port: bool) -> std::io::Result<TcpListener> {
    let bind = || -> std::io::Result<TcpListener> {
        let socket = socket2::Socket::new(
            socket2::Domain::for_address(addr),
            socket2::Type::STREAM,
            Some(socket2::Protocol::TCP),
        )?;
        // Lets a restarted gateway bind while the old one's connections sit in TIME_WAIT.
        #[cfg(unix)]
        socket.set_reuse_address(true)?;
        // Validation rejects `reuse_port` elsewhere.
        #[cfg(unix)]
        if reuse_port {
            socket.set_reuse_port(true)?;
        }
        socket.set_nonblocking(true)?;
        socket.bind(&addr.into())?;
        socket.listen(1024)?;
        TcpListener::from_std(socket.into())
    };
    bind().map_err(|e| with_addr(e, addr, reuse_port))
}

fn with_addr(e: std::io::Error, addr: SocketAddr, reuse_port: bool) -> std::io::Error {
    let hint = match (e.kind(), reuse_port) {
        (std::io::ErrorKind::AddrInUse, false) => {
            " (to start a new gateway while the old one drains, set server.reuse_port = true in both)"
        }
        (std::io::ErrorKind::AddrInUse, true) => {
            " (the process holding it was started without server.reuse_port, or as another user)"
        }
        _ => "",
    };
    std::io::Error::new(e.kind(), format!("binding {addr}: {e}{hint}"))
}

/// Why a gateway could not be built.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Discovery could not be set up.
    #[error(transparent)]
    Registry(#[from] RegistryError),
}

/// Whether the gateway takes part in the Consul service mesh (`discovery.consul.connect.enabled`
/// or a route with `connect = true`); it then registers itself Connect-native.
pub fn mesh_enabled(config: &Config) -> bool {
    config.routes.iter().any(|r| r.connect)
        || config
            .discovery
            .consul
            .as_ref()
            .is_some_and(|c| c.connect.enabled)
}

/// A built gateway: pools, routes and providers, ready to [`run`](Gateway::run).
pub struct Gateway {
    server: config::ServerConfig,
    expose_admin: bool,
    admin_token: Option<String>,
    state: Arc<ControlState>,
    registry: Arc<Registry>,
    reloader: Option<Arc<Reloader>>,
    static_discovery: StaticDiscovery,
    watch_file: bool,
    /// `discovery.consul.register` with its own client and whether to register Connect-native.
    register: Option<(ConsulClient, RegisterSettings, bool)>,
    /// Threads that serve the main and TLS listeners, this one included.
    serving_threads: usize,
}

impl Gateway {
    /// Builds pools and routes from a validated config.
    pub fn build(config: Config) -> Result<Self, GatewayError> {
        Self::build_with(config, HashMap::new(), None)
    }

    /// Like [`Gateway::build`], with error handlers written in code (by route name) and a
    /// callback for every health transition.
    pub fn build_with(
        config: Config,
        error_handlers: HashMap<String, ErrorHandler>,
        on_health_change: Option<HealthCallback>,
    ) -> Result<Self, GatewayError> {
        let telemetry = telemetry::RequestTelemetry::from_config(&config.log, None);
        Self::assemble(config, error_handlers, on_health_change, telemetry)
    }

    /// Like [`Gateway::build`], with the request path's telemetry given rather than taken from
    /// `[log] access`: the trace pipeline (`main` builds it with `telemetry::Tracing::build` and
    /// installs its layer; tests install it per thread) and the access log's destination.
    /// Nothing process-wide is touched here.
    pub fn build_with_telemetry(
        config: Config,
        telemetry: telemetry::RequestTelemetry,
    ) -> Result<Self, GatewayError> {
        Self::assemble(config, HashMap::new(), None, telemetry)
    }

    fn assemble(
        config: Config,
        error_handlers: HashMap<String, ErrorHandler>,
        on_health_change: Option<HealthCallback>,
        telemetry: telemetry::RequestTelemetry,
    ) -> Result<Self, GatewayError> {
        let proxy = Arc::new(ProxyState {
            table: ArcSwap::from_pointee(RouteTable::default()),
            client: proxy::client::client(&config.upstream),
            http1: proxy::pool::Http1Pool::new(&config.upstream),
            cors: ArcSwapOption::new(config.cors.clone()),
            metrics: Default::default(),
            upgrades: Default::default(),
            telemetry,
            path_rules: rules::path::LivePathRules::new(config.server.path_rules()),
            trusted_proxies: ArcSwap::from_pointee(config.server.trusted_proxies.clone()),
        });
        let tls = Arc::new(ArcSwapOption::new(
            config.tls.as_ref().map(|t| t.server_config.clone()),
        ));
        let state = ControlState::new(proxy, tls);
        control::prometheus::install(&state);
        let server = config.server.clone();
        let expose_admin = config.admin.expose_on_main;
        let admin_token = config.admin.token.clone();
        let register = match config.discovery.consul.as_ref() {
            Some(consul) => match &consul.register {
                Some(r) => Some((
                    ConsulClient::new(consul).map_err(RegistryError::Consul)?,
                    r.clone(),
                    mesh_enabled(&config),
                )),
                None => None,
            },
            None => None,
        };
        let registry = Registry::new(config, state.clone(), error_handlers, on_health_change)?;
        Ok(Self {
            server,
            expose_admin,
            admin_token,
            static_discovery: StaticDiscovery::new(state.clone()),
            state,
            registry,
            reloader: None,
            watch_file: false,
            register,
            serving_threads: 1,
        })
    }

    /// Enables reloading from `path` (SIGHUP in `main`, `POST /reload`, and with `watch` the
    /// file's own changes).
    pub fn with_reload(self, path: PathBuf, env: Env, watch: bool) -> Self {
        let reloader = Reloader::new(Arc::downgrade(&self.registry), path, env);
        Self {
            reloader: Some(Arc::new(reloader)),
            watch_file: watch,
            ..self
        }
    }

    /// Serves the main and TLS listeners on `n` threads: the one running [`Gateway::run`] and
    /// `n - 1` more, each with a single-threaded runtime of its own (`workers` in `main`).
    /// A connection stays on the thread that accepted it, with the upstream connections it
    /// opens, so a request wakes no other thread; the control plane stays on the first.
    pub fn with_serving_threads(self, n: usize) -> Self {
        self.state.proxy.http1.set_shards(n);
        self.state
            .serving_threads
            .store(n.max(1), std::sync::atomic::Ordering::Relaxed);
        Self {
            serving_threads: n,
            ..self
        }
    }

    /// The reloader, when enabled.
    pub fn reloader(&self) -> Option<Arc<Reloader>> {
        self.reloader.clone()
    }

    /// The static provider, to change static services while the gateway runs.
    pub fn static_discovery(&self) -> &StaticDiscovery {
        &self.static_discovery
    }

    /// A service's pool.
    pub fn pool(&self, service: &str) -> Option<Arc<ServicePool>> {
        self.state
            .services
            .load()
            .get(service)
            .map(|s| s.pool.clone())
    }

    /// The control state, with the request path's state in it (for admin views and tests).
    pub fn state(&self) -> &Arc<ControlState> {
        &self.state
    }

    /// Runs until `shutdown` resolves, then shuts down in order: fail readiness, deregister
    /// from Consul (with `discovery.consul.register`), wait the drain delay, stop accepting,
    /// let in-flight requests finish within the grace period, and stop background tasks.
    ///
    /// With `discovery.consul.register` the gateway registers itself once its listeners are
    /// up; that table is read at build time only (a reload does not change it).
    pub async fn run(
        self,
        listeners: Listeners,
        shutdown: impl Future<Output = ()>,
    ) -> std::io::Result<()> {
        let stop_accepting = CancellationToken::new();
        let graceful = Arc::new(server::Drain::default());
        // Cancelled when the grace period is over: connections still open are closed then.
        let force_close = CancellationToken::new();
        let server_cfg = self.server.clone();
        self.registry.start();
        let admin = Admin::new(
            self.state.clone(),
            self.admin_token.clone(),
            self.reloader.clone(),
        );
        let serving = Arc::new(server::Serving {
            proxy: self.state.proxy.clone(),
            admin: Arc::new(admin),
            tls: self.state.tls.clone(),
            expose_admin: self.expose_admin,
        });

        let main_addr = listeners.main.local_addr()?;
        let acceptor = |role| {
            server::Acceptor::new(
                role,
                serving.clone(),
                server_cfg.clone(),
                graceful.clone(),
                stop_accepting.clone(),
                force_close.clone(),
            )
        };
        let mut proxied = vec![(listeners.main, acceptor(server::Role::Main))];
        if let Some(l) = listeners.tls {
            tracing::info!(listen = %l.local_addr()?, "TLS listener (HTTP/2 and HTTP/1.1 by ALPN)");
            proxied.push((l, acceptor(server::Role::Tls)));
        }
        // The other serving threads accept on copies of the same sockets, so the main and TLS
        // listeners' connections are spread over every thread; admin stays on this one.
        let mut threads = None;
        if self.serving_threads > 1 {
            // This thread serves too: it takes the first of the idle queues.
            balancer::idle::set_thread_index(0);
            let more = self.serving_threads - 1;
            threads = Some(server::threads::ServingThreads::start(more, &proxied)?);
        }
        let mut accept_loops: Vec<_> = proxied
            .into_iter()
            .map(|(l, a)| tokio::spawn(server::serve(l, a)))
            .collect();
        let admin_stop = CancellationToken::new();
        let admin_addr = match listeners.admin {
            Some(l) => {
                let addr = l.local_addr()?;
                // The admin listener is not drained: it must keep answering /ready during drain.
                let admin = server::Acceptor::new(
                    server::Role::Admin,
                    serving.clone(),
                    server_cfg.clone(),
                    Arc::new(server::Drain::default()),
                    admin_stop.clone(),
                    admin_stop.clone(),
                );
                accept_loops.push(tokio::spawn(server::serve(l, admin)));
                Some(addr)
            }
            None => None,
        };
        self.registry
            .tracker()
            .spawn(become_ready(self.registry.clone(), self.state.clone()));
        if self.watch_file {
            if let Some(r) = &self.reloader {
                let reloader = Arc::downgrade(r);
                let mut last = r.fingerprint();
                let stop = admin_stop.clone();
                self.registry.tracker().spawn(async move {
                    loop {
                        tokio::select! {
                            _ = stop.cancelled() => return,
                            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                        }
                        let Some(r) = reloader.upgrade() else { return };
                        let now = r.fingerprint();
                        if now.is_some() && now != last {
                            last = now;
                            r.reload_and_log("file change");
                        }
                    }
                });
            }
        }
        tracing::info!(listen = %main_addr, admin = ?admin_addr, "meshgate listening");
        // Registered only now, so the agent's first check of /ready finds a listener.
        let registration = self.register.as_ref().map(|(client, settings, native)| {
            let payload = settings.payload(main_addr, admin_addr, *native);
            let task = discovery::consul::spawn_registration(
                client.clone(),
                payload,
                settings.check_interval,
            );
            self.state.registration.store(Some(task.status().clone()));
            task
        });

        shutdown.await;
        self.state.readiness.begin_shutdown();
        // Before the drain delay, so Consul-fed load balancers stop sending while we still serve.
        if let Some(task) = registration {
            task.deregister().await;
        }
        if !server_cfg.drain_delay.is_zero() {
            tracing::info!(drain_delay = ?server_cfg.drain_delay, "shutting down: readiness failed, draining");
            tokio::time::sleep(server_cfg.drain_delay).await;
        }
        stop_accepting.cancel();
        // The main and TLS accept loops end on `stop_accepting`; the admin one stays up.
        let admin_loop = if admin_addr.is_some() {
            accept_loops.pop()
        } else {
            None
        };
        for l in accept_loops.drain(..) {
            let _ = l.await;
        }
        if let Some(t) = &mut threads {
            t.stopped_accepting().await;
        }
        accept_loops.extend(admin_loop);
        if tokio::time::timeout(server_cfg.grace_period, graceful.shutdown())
            .await
            .is_err()
        {
            tracing::warn!(grace_period = ?server_cfg.grace_period, "grace period over; closing remaining connections");
            force_close.cancel();
        }
        // Upgraded connections get what is left of the grace period, then are closed.
        let upgrades = &self.state.proxy.upgrades;
        upgrades.tracker.close();
        if tokio::time::timeout(server_cfg.grace_period, upgrades.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                open = upgrades.tracker.len(),
                "closing upgraded connections at the end of the grace period"
            );
            upgrades.stop.cancel();
            upgrades.tracker.wait().await;
        }
        admin_stop.cancel();
        self.registry.stop();
        for l in accept_loops {
            let _ = l.await;
        }
        self.registry.tracker().close();
        self.registry.tracker().wait().await;
        if let Some(t) = threads {
            t.stop().await;
        }
        if let Some(access) = self.state.proxy.telemetry.access_log() {
            access.flush(Duration::from_secs(2)).await;
        }
        tracing::info!("meshgate stopped");
        Ok(())
    }
}

/// Marks the gateway ready once every Consul service (and the catalog, with tag routes) has
/// synced once, or once `startup_timeout` has passed.
async fn become_ready(registry: Arc<Registry>, control: Arc<ControlState>) {
    let readiness: &Readiness = &control.readiness;
    let Some(limit) = registry.startup_timeout() else {
        readiness.set_ready(true);
        return;
    };
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let pending: Vec<_> = registry
            .pending_syncs()
            .into_iter()
            .filter(|s| !s.is_synced())
            .collect();
        if pending.is_empty() {
            tracing::info!("all services synced from Consul; ready");
            break;
        }
        let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
        if remaining.is_zero() {
            tracing::warn!(
                unsynced = pending.len(),
                startup_timeout = ?limit,
                "startup_timeout passed before every service synced; starting with what we have"
            );
            break;
        }
        // New services may appear meanwhile (routes from tags), so look again after each wait.
        let _ = pending[0].wait_synced(remaining).await;
    }
    readiness.set_ready(true);
}
