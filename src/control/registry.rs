//! The registry: turns the configured routes (plus routes from Consul KV and tags) into live
//! pools, routes, Consul watches and health probes, and republishes the route table whenever
//! the configuration, KV or the tag routes change. Writers serialise on a mutex; requests never see it.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use http::uri::Scheme;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{ControlState, LiveService, Source};
use crate::balancer::{Policy, ServicePool};
use crate::config::{Backend, Config, RouteConfig, ServiceSettings, StaticService};
use crate::discovery::consul::{
    self, ConsulClient, ConsulError, IdentitySyncs, ServiceSync, TagRoute,
};
use crate::discovery::Discovered;
use crate::health::{HealthCallback, HealthCheck};
use crate::mesh::MeshIdentity;
use crate::proxy::client::{client_for, Transport};
use crate::proxy::mesh::MeshUpstream;
use crate::proxy::route::{ErrorHandler, Route, RouteTable};
use crate::ratelimit::{RateLimiter, RedisStore, Scope};
use crate::rules::limit::Limiter;
use crate::rules::path::Rewrite;
use crate::tls::UpstreamTls;

struct Probe {
    check: HealthCheck,
    /// TLS for `https` endpoints: the `upstream_tls` of a route on the service.
    tls: UpstreamTls,
    cancel: CancellationToken,
}

/// A watched Consul service and whether it is read through the mesh (`/v1/health/connect`).
type WatchedService = (Arc<str>, bool);

/// The mesh identity and the readiness of its watch.
struct Mesh {
    identity: Arc<MeshIdentity>,
    syncs: Arc<IdentitySyncs>,
    started: bool,
}

struct Inner {
    config: Config,
    tag_routes: Vec<RouteConfig>,
    notes: Vec<String>,
    pools: BTreeMap<Arc<str>, Arc<ServicePool>>,
    syncs: BTreeMap<Arc<str>, Arc<ServiceSync>>,
    /// Per Consul service, whether its last health answer listed it ([`ServiceSync::registered`]);
    /// absent until the first answer. Tag routes are published only while this is `true`.
    answered: BTreeMap<Arc<str>, bool>,
    routes: BTreeMap<Arc<str>, (RouteConfig, Arc<Route>)>,
    probes: BTreeMap<Arc<str>, Probe>,
    limiters: BTreeMap<Arc<str>, Arc<Limiter>>,
    /// Rate limiters by (named policy?, name): kept while their settings stay the same, so a
    /// reload keeps buckets and routes naming one policy share one limiter.
    rate_limiters: BTreeMap<(bool, Arc<str>), Arc<RateLimiter>>,
    /// The `[redis]` store, kept while its settings stay the same.
    redis: Option<Arc<RedisStore>>,
    watching: Option<(Vec<WatchedService>, CancellationToken)>,
    /// The gateway's Connect identity and its watch, once a route needs the mesh.
    mesh: Option<Mesh>,
    catalog_watch: Option<Arc<ServiceSync>>,
    /// Documents under `discovery.consul.kv_prefix` by full key, as the KV watch last saw them.
    kv_docs: BTreeMap<String, Vec<u8>>,
    /// Per KV key, the last version that made it into the table: it stays while the key's
    /// newer document is invalid or clashes.
    kv_good: BTreeMap<String, RouteConfig>,
    /// KV notes as last logged, so each problem is logged once per change, not per rebuild.
    kv_logged: Vec<String>,
    kv_watch: Option<Arc<ServiceSync>>,
}

/// Owns everything discovery-driven; see the module docs.
pub struct Registry {
    control: Arc<ControlState>,
    consul: Option<ConsulClient>,
    background: CancellationToken,
    tracker: TaskTracker,
    handlers: HashMap<String, ErrorHandler>,
    on_health_change: Option<HealthCallback>,
    inner: Mutex<Inner>,
    me: Weak<Registry>,
}

/// Why the registry could not start.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The Consul client could not be built (token or TLS files).
    #[error("setting up the Consul client")]
    Consul(#[from] ConsulError),
}

impl Registry {
    /// Builds the registry and publishes the first route table (static pools filled, Consul
    /// pools empty until their first answer). Background tasks start with [`Registry::start`].
    pub fn new(
        config: Config,
        control: Arc<ControlState>,
        handlers: HashMap<String, ErrorHandler>,
        on_health_change: Option<HealthCallback>,
    ) -> Result<Arc<Self>, RegistryError> {
        let consul = match &config.discovery.consul {
            Some(settings) => Some(ConsulClient::new(settings)?),
            None => None,
        };
        let registry = Arc::new_cyclic(|me| Registry {
            control,
            consul,
            background: CancellationToken::new(),
            tracker: TaskTracker::new(),
            handlers,
            on_health_change,
            inner: Mutex::new(Inner {
                config,
                tag_routes: Vec::new(),
                notes: Vec::new(),
                pools: BTreeMap::new(),
                syncs: BTreeMap::new(),
                answered: BTreeMap::new(),
                routes: BTreeMap::new(),
                probes: BTreeMap::new(),
                limiters: BTreeMap::new(),
                rate_limiters: BTreeMap::new(),
                redis: None,
                watching: None,
                catalog_watch: None,
                mesh: None,
                kv_docs: BTreeMap::new(),
                kv_good: BTreeMap::new(),
                kv_logged: Vec::new(),
                kv_watch: None,
            }),
            me: me.clone(),
        });
        // Publishing only: tasks start in `start`, inside the runtime the gateway runs on.
        registry.apply(false);
        Ok(registry)
    }

    /// Starts watches and probes.
    pub fn start(&self) {
        self.apply(true);
    }

    /// Background tasks, for the gateway's shutdown.
    pub fn tracker(&self) -> &TaskTracker {
        &self.tracker
    }

    /// Cancels every background task.
    pub fn stop(&self) {
        self.background.cancel();
    }

    /// The Consul sync states to wait for before the gateway is ready, plus the catalog's when
    /// routes come from tags and the KV watch's when routes come from KV.
    pub fn pending_syncs(&self) -> Vec<Arc<ServiceSync>> {
        let inner = self.lock();
        inner
            .syncs
            .values()
            .chain(&inner.catalog_watch)
            .chain(
                inner
                    .mesh
                    .iter()
                    .flat_map(|m| [&m.syncs.roots, &m.syncs.leaf]),
            )
            .chain(&inner.kv_watch)
            .cloned()
            .collect()
    }

    /// How long readiness may wait for Consul.
    pub fn startup_timeout(&self) -> Option<Duration> {
        self.lock()
            .config
            .discovery
            .consul
            .as_ref()
            .map(|c| c.startup_timeout)
    }

    /// The configuration in force.
    pub fn config(&self) -> Config {
        self.lock().config.clone()
    }

    /// Installs a new, already validated configuration: routes and pools swap atomically,
    /// unchanged services keep their pools, counters and health. Returns what needs a restart.
    pub fn reload(&self, config: Config) -> Vec<String> {
        let mut restart = Vec::new();
        {
            let mut inner = self.lock();
            let old = &inner.config;
            if old.listen != config.listen {
                restart.push(format!("listen ({} -> {})", old.listen, config.listen));
            }
            if old.admin.listen != config.admin.listen {
                restart.push("admin.listen".to_owned());
            }
            if old.tls.as_ref().map(|t| t.listen) != config.tls.as_ref().map(|t| t.listen) {
                restart.push("tls.listen".to_owned());
            }
            if old.metrics_enabled != config.metrics_enabled {
                restart.push("metrics.enabled".to_owned());
            }
            if old.workers != config.workers {
                restart.push("workers".to_owned());
            }
            if old.discovery.provider != config.discovery.provider
                || old.discovery.consul != config.discovery.consul
            {
                restart.push("discovery.provider / discovery.consul".to_owned());
            }
            if old.upstream != config.upstream {
                restart.push("upstream".to_owned());
            }
            if old.tracing != config.tracing {
                restart.push("tracing".to_owned());
            }
            if old.log.access != config.log.access {
                restart.push("log.access".to_owned());
            }
            let mut keep = config;
            // What cannot change live stays as it was, so /status tells the truth.
            keep.listen = inner.config.listen;
            keep.admin.listen = inner.config.admin.listen;
            keep.workers = inner.config.workers;
            keep.metrics_enabled = inner.config.metrics_enabled;
            keep.discovery.provider = inner.config.discovery.provider;
            keep.discovery.consul = inner.config.discovery.consul.clone();
            keep.upstream = inner.config.upstream.clone();
            keep.tracing = inner.config.tracing.clone();
            keep.log.access = inner.config.log.access;
            // The `/config` view shows the same: the file as loaded, with the kept settings.
            let (old_src, mut src) = (&inner.config.source, (*keep.source).clone());
            src.listen.clone_from(&old_src.listen);
            src.admin.listen.clone_from(&old_src.admin.listen);
            src.workers = old_src.workers;
            src.discovery
                .provider
                .clone_from(&old_src.discovery.provider);
            src.discovery.consul = old_src.discovery.consul.clone();
            src.upstream = old_src.upstream.clone();
            src.tracing = old_src.tracing.clone();
            src.log.access.clone_from(&old_src.log.access);
            keep.source = Arc::new(src);
            inner.config = keep;
        }
        {
            let inner = self.lock();
            let proxy = &self.control.proxy;
            proxy.cors.store(inner.config.cors.clone());
            proxy.path_rules.store(inner.config.server.path_rules());
            proxy
                .trusted_proxies
                .store(Arc::new(inner.config.server.trusted_proxies.clone()));
            // Certificates were read again by validation: renewed files apply to new handshakes.
            self.control
                .tls
                .store(inner.config.tls.as_ref().map(|t| t.server_config.clone()));
        }
        self.apply(true);
        restart
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding it cannot leave a half-published table: publishing is one store.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn set_tag_routes(&self, catalog: BTreeMap<String, Vec<String>>) {
        // Tag routes take the provider's mesh default, as configured routes do.
        let connect = self
            .lock()
            .config
            .discovery
            .consul
            .as_ref()
            .is_some_and(|c| c.connect.enabled);
        let mut routes = Vec::new();
        let mut notes = Vec::new();
        for (service, tags) in &catalog {
            let (found, warnings) = consul::parse_tag_routes_with_warnings(service, tags);
            notes.extend(
                warnings
                    .into_iter()
                    .map(|w| format!("service {service}: {w}")),
            );
            for t in found {
                match tag_route(&t) {
                    Ok(mut r) => {
                        r.connect = connect;
                        routes.push(r);
                    }
                    Err(note) => notes.push(note),
                }
            }
        }
        {
            let mut inner = self.lock();
            if inner.tag_routes == routes && inner.notes == notes {
                return;
            }
            tracing::info!(routes = routes.len(), "routes from Consul tags changed");
            inner.tag_routes = routes;
            inner.notes = notes;
        }
        self.apply(true);
    }

    /// Installs the documents under the KV prefix (the whole set, so a missing key was deleted)
    /// and rebuilds the table.
    fn set_kv_routes(&self, docs: BTreeMap<String, Vec<u8>>) {
        {
            let mut inner = self.lock();
            inner.kv_good.retain(|key, _| docs.contains_key(key));
            inner.kv_docs = docs;
        }
        self.apply(true);
    }

    /// Recomputes everything from the current config, KV and tag routes and publishes it.
    fn apply(&self, spawn: bool) {
        let mut guard = self.lock();
        let inner = &mut *guard;

        // Config routes win over KV routes, and both over tag routes, on the same path or name.
        let mut all: Vec<RouteConfig> = inner.config.routes.clone();
        let kv_notes = kv_routes(inner, &mut all);
        let kv_errors = kv_notes.len();
        for n in kv_notes.iter().filter(|n| !inner.kv_logged.contains(n)) {
            tracing::warn!(problem = %n, "route from Consul KV not applied as written");
        }
        inner.kv_logged.clone_from(&kv_notes);
        self.control
            .kv_route_errors
            .store(kv_errors, Ordering::Relaxed);
        let cfg = &inner.config;
        let mut notes: Vec<String> = inner.notes.clone();
        let mut from_tags: BTreeSet<Arc<str>> = BTreeSet::new();
        for t in &inner.tag_routes {
            if let Some(c) = all.iter().find(|r| r.path == t.path || r.name == t.name) {
                let note = format!(
                    "tag route {} ({}) for service {} conflicts with configured route {} ({}); the configured route wins",
                    t.name,
                    t.path,
                    t.service_name(),
                    c.name,
                    c.path
                );
                notes.push(note);
                continue;
            }
            from_tags.insert(t.name.clone());
            all.push(t.clone());
        }
        for n in notes.iter().skip(inner.notes.len()) {
            tracing::warn!(conflict = %n, "route conflict");
        }
        notes.extend(kv_notes);

        // Consul services reached over TLS when a route on them configures upstream_tls.
        let tls_services: Vec<Arc<str>> = all
            .iter()
            .filter(|r| r.upstream_tls.is_some() && matches!(r.backend, Backend::Service(_)))
            .map(|r| r.service_name().clone())
            .collect();
        // Services reached through the mesh (Connect mTLS to their sidecars).
        let mesh_services: BTreeSet<Arc<str>> = all
            .iter()
            .filter(|r| r.connect && matches!(r.backend, Backend::Service(_)))
            .map(|r| r.service_name().clone())
            .collect();
        if !mesh_services.is_empty() && inner.mesh.is_none() {
            if let Some(settings) = &cfg.discovery.consul {
                let identity = Arc::new(MeshIdentity::new(settings.connect.service.clone()));
                self.control.mesh.store(Some(identity.clone()));
                inner.mesh = Some(Mesh {
                    identity,
                    syncs: Arc::default(),
                    started: false,
                });
            }
        }
        // What probes of a service speak TLS with: the first route on it that sets upstream_tls.
        let mut probe_tls: BTreeMap<Arc<str>, UpstreamTls> = BTreeMap::new();
        for r in &all {
            if let Some(t) = &r.upstream_tls {
                probe_tls
                    .entry(r.service_name().clone())
                    .or_insert_with(|| t.clone());
            }
        }
        // Services and their sources.
        let mut wanted: BTreeMap<Arc<str>, (Source, Option<StaticService>, ServiceSettings)> =
            BTreeMap::new();
        for r in &all {
            let name = r.service_name().clone();
            let (source, fixed) = match &r.backend {
                Backend::Targets(svc) => (Source::Static, Some(svc.clone())),
                Backend::Service(s) => match cfg.discovery.static_services.get(s) {
                    Some(svc) => (Source::Static, Some(svc.clone())),
                    None => (Source::Consul, None),
                },
            };
            let entry = wanted
                .entry(name)
                .or_insert_with(|| (source, fixed, ServiceSettings::default()));
            if entry.2 == ServiceSettings::default() {
                entry.2 = r.service_settings.clone();
            }
        }
        // Static services nobody routes to still exist (the static provider may feed them).
        for (name, svc) in &cfg.discovery.static_services {
            wanted.entry(name.clone()).or_insert_with(|| {
                (
                    Source::Static,
                    Some(svc.clone()),
                    ServiceSettings::default(),
                )
            });
        }

        // Pools: reuse by name, so endpoints keep their state.
        let mut pools = BTreeMap::new();
        for (name, (_, fixed, settings)) in &wanted {
            let scheme = match fixed {
                Some(f) => f.scheme.clone(),
                None if tls_services.contains(name) || mesh_services.contains(name) => {
                    Scheme::HTTPS
                }
                None => Scheme::HTTP,
            };
            let pool = match inner.pools.get(name) {
                Some(p) if p.scheme() == &scheme => p.clone(),
                _ => Arc::new(ServicePool::new(name.clone(), scheme)),
            };
            pool.set_settings(settings.pool.clone());
            if let Some(f) = fixed {
                pool.replace(f.endpoints.clone());
            }
            pools.insert(name.clone(), pool);
        }
        inner.pools = pools;

        // Concurrency limiters: kept while their limits stay the same.
        let mut limiters = BTreeMap::new();
        for (name, (_, _, settings)) in &wanted {
            if let Some(max) = settings.max_requests {
                let l = match inner.limiters.get(name) {
                    Some(l) if l.limits() == (max, settings.max_pending) => l.clone(),
                    _ => Arc::new(Limiter::new(max, settings.max_pending)),
                };
                limiters.insert(name.clone(), l);
            }
        }
        inner.limiters = limiters;

        // The Redis store and rate limiters: kept while their settings stay the same.
        let redis = match (&inner.redis, &inner.config.redis) {
            (Some(old), Some(s)) if old.settings() == s => Some(old.clone()),
            (_, Some(s)) => Some(Arc::new(RedisStore::new(s.clone()))),
            (_, None) => None,
        };
        let mut rate_limiters = BTreeMap::new();
        for r in &all {
            if let Some(s) = &r.rate_limit {
                let id = (s.shared, s.name.clone());
                if rate_limiters.contains_key(&id) {
                    continue;
                }
                let store = s.scope == Scope::Global;
                let l = match inner.rate_limiters.get(&id) {
                    Some(l)
                        if l.settings() == s
                            && (!store || same_store(l.store(), redis.as_ref())) =>
                    {
                        l.clone()
                    }
                    _ => Arc::new(RateLimiter::new(s.clone(), redis.clone().filter(|_| store))),
                };
                rate_limiters.insert(id, l);
            }
        }
        inner.rate_limiters = rate_limiters;
        inner.redis = redis;

        // A service that comes back later starts unanswered again.
        inner.answered.retain(|name, _| {
            wanted
                .get(name)
                .is_some_and(|(source, _, _)| *source == Source::Consul)
        });

        // Routes: an unchanged route keeps its counters and cursor.
        let mut routes = BTreeMap::new();
        for r in &all {
            // A tag route waits for its service's first health answer (404 until then, not
            // 503 from an empty pool) and leaves as soon as Consul no longer lists it.
            let waiting = from_tags.contains(&r.name)
                && wanted[r.service_name()].0 == Source::Consul
                && inner.answered.get(r.service_name()) != Some(&true);
            if waiting {
                continue;
            }
            let pool = inner.pools[r.service_name()].clone();
            let limiter = inner.limiters.get(r.service_name()).cloned();
            let rate_limiter = r.rate_limit.as_ref().and_then(|s| {
                inner
                    .rate_limiters
                    .get(&(s.shared, s.name.clone()))
                    .cloned()
            });
            let live = match inner.routes.get(&r.name) {
                Some((old_cfg, old))
                    if old_cfg == r
                        && Arc::ptr_eq(&old.pool, &pool)
                        && same_limiter(old.rate_limiter(), rate_limiter.as_ref()) =>
                {
                    old.clone()
                }
                _ => {
                    let h2c = wanted
                        .get(r.service_name())
                        .and_then(|w| w.1.as_ref())
                        .is_some_and(|f| f.h2c);
                    let mut route = Route::new(
                        r,
                        pool,
                        self.handlers.get(&*r.name).cloned(),
                        limiter,
                        rate_limiter,
                    );
                    match (&inner.mesh, r.connect) {
                        (Some(mesh), true) => {
                            route.mesh = Some(MeshUpstream::new(
                                mesh.identity.clone(),
                                r.service_name().clone(),
                                inner
                                    .config
                                    .discovery
                                    .consul
                                    .as_ref()
                                    .and_then(|c| c.datacenter.clone()),
                                inner.config.upstream.clone(),
                            ));
                        }
                        _ => self.route_clients(&mut route, r, h2c, &inner.config.upstream),
                    }
                    route.metrics.set_enabled(inner.config.metrics_enabled);
                    Arc::new(route)
                }
            };
            routes.insert(r.name.clone(), (r.clone(), live));
        }
        inner.routes = routes;

        // Consul syncs: one per Consul service, kept across changes.
        let consul_services: Vec<Arc<str>> = wanted
            .iter()
            .filter(|(_, (s, _, _))| *s == Source::Consul)
            .map(|(n, _)| n.clone())
            .collect();
        let mut syncs = BTreeMap::new();
        for name in &consul_services {
            let sync = inner
                .syncs
                .get(name)
                .cloned()
                .unwrap_or_else(|| Arc::new(ServiceSync::new()));
            syncs.insert(name.clone(), sync);
        }
        inner.syncs = syncs;

        if spawn {
            self.spawn_identity(inner);
            let consul_services: Vec<(Arc<str>, bool)> = consul_services
                .iter()
                .map(|n| (n.clone(), mesh_services.contains(n)))
                .collect();
            self.spawn_watches(inner, &consul_services);
            self.spawn_probes(inner, &wanted, &probe_tls);
        }

        // Publish.
        let table = RouteTable::new(inner.routes.values().map(|(_, r)| r.clone()).collect());
        let services: BTreeMap<Arc<str>, Arc<LiveService>> = wanted
            .iter()
            .map(|(name, (source, _, _))| {
                let entry = LiveService {
                    pool: inner.pools[name].clone(),
                    source: *source,
                    sync: inner.syncs.get(name).cloned(),
                    probed: inner.probes.contains_key(name),
                };
                (name.clone(), Arc::new(entry))
            })
            .collect();
        self.control.proxy.table.store(Arc::new(table));
        self.control.services.store(Arc::new(services));
        self.control.notes.store(Arc::new(notes));
        self.control
            .config
            .store(Some(Arc::new(inner.config.clone())));
    }

    /// Gives a route its own upstream clients when it needs TLS settings or h2c.
    fn route_clients(
        &self,
        route: &mut Route,
        cfg: &RouteConfig,
        h2c: bool,
        upstream: &crate::config::UpstreamConfig,
    ) {
        let tls_pool = route.pool.scheme() == &Scheme::HTTPS;
        let build = |transport| match client_for(upstream, cfg.upstream_tls.as_ref(), transport) {
            Ok(c) => Some(c),
            Err(e) => {
                // Validation read the same files; they changed since. The shared client stays.
                tracing::error!(route = %cfg.name, error = %crate::error::Chain(&e), "upstream TLS settings unusable");
                None
            }
        };
        if h2c {
            route.client = build(Transport::H2c);
        } else if tls_pool || cfg.upstream_tls.is_some() {
            route.client = build(Transport::Auto);
            if cfg.websocket {
                route.upgrade_client = build(Transport::Http1);
            }
        }
    }

    /// Starts watching the CA roots and the gateway's leaf, once.
    fn spawn_identity(&self, inner: &mut Inner) {
        let (Some(client), Some(mesh)) = (&self.consul, &mut inner.mesh) else {
            return;
        };
        if mesh.started {
            return;
        }
        mesh.started = true;
        self.tracker.spawn(consul::watch_identity(
            client.clone(),
            mesh.identity.clone(),
            mesh.syncs.clone(),
            self.background.child_token(),
        ));
    }

    fn spawn_watches(&self, inner: &mut Inner, consul_services: &[(Arc<str>, bool)]) {
        let Some(client) = &self.consul else { return };
        let settings = inner.config.discovery.consul.clone();
        if settings.as_ref().is_some_and(|s| s.routes_from_tags) && inner.catalog_watch.is_none() {
            let cancel = self.background.child_token();
            let me = self.me.clone();
            let sync = Arc::new(ServiceSync::new());
            self.tracker.spawn(consul::watch_catalog(
                client.clone(),
                sync.clone(),
                move |catalog| {
                    if let Some(r) = me.upgrade() {
                        r.set_tag_routes(catalog);
                    }
                },
                cancel,
            ));
            inner.catalog_watch = Some(sync);
        }
        let kv_prefix = settings.as_ref().and_then(|s| s.kv_prefix.clone());
        if let (Some(prefix), None) = (kv_prefix, &inner.kv_watch) {
            let cancel = self.background.child_token();
            let me = self.me.clone();
            let sync = Arc::new(ServiceSync::new());
            self.tracker.spawn(consul::watch_kv(
                client.clone(),
                prefix.into(),
                sync.clone(),
                move |docs| {
                    if let Some(r) = me.upgrade() {
                        r.set_kv_routes(docs);
                    }
                },
                cancel,
            ));
            inner.kv_watch = Some(sync);
        }
        if inner
            .watching
            .as_ref()
            .is_some_and(|(names, _)| names == consul_services)
        {
            return;
        }
        // The set changed: restart the whole group. Pools keep their endpoints meanwhile, and
        // the first answers are identical sets, which `replace` skips.
        if let Some((_, cancel)) = inner.watching.take() {
            cancel.cancel();
        }
        if consul_services.is_empty() {
            return;
        }
        let cancel = self.background.child_token();
        let watches: Vec<consul::ServiceWatch> = consul_services
            .iter()
            .map(|(name, connect)| {
                let sync = inner.syncs[name].clone();
                let (me, service, own) = (self.me.clone(), name.clone(), sync.clone());
                let publish = move |eps: Vec<Discovered>| {
                    if let Some(registry) = me.upgrade() {
                        registry.publish_consul(&service, &own, eps);
                    }
                };
                consul::ServiceWatch::new(name.clone(), sync, publish).connect(*connect)
            })
            .collect();
        let max = settings.map_or(64, |s| s.max_watches);
        self.tracker.spawn(consul::watch_many(
            client.clone(),
            watches,
            max,
            cancel.clone(),
        ));
        inner.watching = Some((consul_services.to_vec(), cancel));
    }

    /// Installs a Consul answer for `service` (called by its watch, before the watch marks it
    /// synced, so /ready implies published) and republishes the routes when one of its tag
    /// routes appears or leaves.
    fn publish_consul(&self, service: &Arc<str>, sync: &Arc<ServiceSync>, eps: Vec<Discovered>) {
        let registered = sync.registered();
        let republish = {
            let mut inner = self.lock();
            // A watch of a removed service (maybe added again since, with a new sync) is late.
            if !inner
                .syncs
                .get(service)
                .is_some_and(|s| Arc::ptr_eq(s, sync))
            {
                return;
            }
            let Some(pool) = inner.pools.get(service).cloned() else {
                return;
            };
            let configured = inner
                .config
                .routes
                .iter()
                .chain(inner.kv_good.values())
                .any(|r| r.service_name() == service);
            // Gone from Consul and only reachable through tag routes: keep the endpoints, so
            // the route and its pool leave together in the next swap instead of the route
            // answering 503 from an emptied pool until then.
            if registered || configured {
                if pool.replace(eps) {
                    tracing::info!(service = %pool.name(), endpoints = pool.snapshot().len(), "pool updated from Consul");
                }
            } else {
                tracing::info!(service = %service, "Consul lists no instance of the service; its tag routes wait for it");
            }
            let was = inner.answered.insert(service.clone(), registered);
            was != Some(registered)
                && (inner.tag_routes.iter().any(|t| t.service_name() == service)
                    || inner.kv_good.values().any(|r| r.service_name() == service))
        };
        if republish {
            self.apply(true);
        }
    }

    fn spawn_probes(
        &self,
        inner: &mut Inner,
        wanted: &BTreeMap<Arc<str>, (Source, Option<StaticService>, ServiceSettings)>,
        probe_tls: &BTreeMap<Arc<str>, UpstreamTls>,
    ) {
        let mut probes = BTreeMap::new();
        for (name, (_, _, settings)) in wanted {
            let Some(check) = &settings.health_check else {
                continue;
            };
            let tls = probe_tls.get(name).cloned().unwrap_or_default();
            match inner.probes.remove(name) {
                Some(p) if &p.check == check && p.tls == tls => {
                    probes.insert(name.clone(), p);
                }
                old => {
                    if let Some(p) = old {
                        p.cancel.cancel();
                    }
                    let cancel = self.background.child_token();
                    self.tracker.spawn(crate::health::run_probes(
                        inner.pools[name].clone(),
                        check.clone(),
                        tls.clone(),
                        self.on_health_change.clone(),
                        cancel.clone(),
                    ));
                    probes.insert(
                        name.clone(),
                        Probe {
                            check: check.clone(),
                            tls,
                            cancel,
                        },
                    );
                }
            }
        }
        // Probing stopped for these: nothing will ever mark them healthy again, so do it now.
        for (name, p) in std::mem::take(&mut inner.probes) {
            p.cancel.cancel();
            if let Some(pool) = inner.pools.get(&name) {
                for ep in pool.snapshot().list() {
                    ep.state.set_healthy(true);
                }
            }
        }
        inner.probes = probes;
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.background.cancel();
    }
}

/// Adds the KV routes to `all` (the configured routes) in key order and returns one note per
/// key in error. Each key stands alone: its current document if valid and clash-free, else its
/// last good version if that fits, else nothing.
fn kv_routes(inner: &mut Inner, all: &mut Vec<RouteConfig>) -> Vec<String> {
    let configured = inner.config.routes.len();
    let mut notes = Vec::new();
    for (key, doc) in &inner.kv_docs {
        let clash = |all: &[RouteConfig], r: &RouteConfig| {
            all.iter()
                .position(|o| o.path == r.path || o.name == r.name)
                .map(|i| {
                    let whose = if i < configured {
                        "configured route"
                    } else {
                        "route from KV"
                    };
                    format!(
                        "route {} ({}) clashes with {whose} {} ({}), which wins",
                        r.name, r.path, all[i].name, all[i].path
                    )
                })
        };
        let (current, problem) = match crate::config::kv_route(key, doc, &inner.config) {
            Ok(r) => match clash(all, &r) {
                None => (Some(r), None),
                Some(why) => (None, Some(why)),
            },
            Err(problems) => {
                let text: Vec<String> = problems
                    .iter()
                    .map(|p| match p.path.as_str() {
                        "" => p.message.clone(),
                        path => format!("{path}: {}", p.message),
                    })
                    .collect();
                (None, Some(text.join("; ")))
            }
        };
        let placed = match current {
            Some(r) => Some(r),
            None => inner
                .kv_good
                .get(key)
                .filter(|g| clash(all, g).is_none())
                .cloned(),
        };
        if let Some(problem) = problem {
            let outcome = if placed.is_some() {
                "its last good version stays"
            } else {
                "left out"
            };
            notes.push(format!("KV key {key}: {problem}; {outcome}"));
        }
        match placed {
            Some(r) => {
                if let Backend::Service(svc) = &r.backend {
                    let from_consul = !inner.config.discovery.static_services.contains_key(svc);
                    if from_consul && inner.answered.get(svc) == Some(&false) {
                        notes.push(format!(
                            "KV key {key}: service {svc} is unknown to Consul; the route answers 503 until it is registered"
                        ));
                    }
                }
                inner.kv_good.insert(key.clone(), r.clone());
                all.push(r);
            }
            None => {
                inner.kv_good.remove(key);
            }
        }
    }
    notes
}

/// A route declared by Consul tags, with the gateway's defaults for everything else.
fn tag_route(t: &TagRoute) -> Result<RouteConfig, String> {
    if let Some(host) = &t.host {
        return Err(format!(
            "service {}: host {host:?} in a tag route is not supported yet; use a path route",
            t.service
        ));
    }
    let mut r = RouteConfig::for_service(
        &format!("tag:{}:{}", t.service, t.path),
        &t.path,
        &t.service,
    );
    if let Some(lb) = &t.lb {
        r.policy = Policy::from_name(lb).ok_or_else(|| {
            format!(
                "service {}: unknown load balancer {lb:?} in meshgate.lb, expected one of {}",
                t.service,
                Policy::NAMES.join(", ")
            )
        })?;
    }
    if let Some(strip) = &t.strip {
        r.rewrite
            .push(Rewrite::StripPrefix(crate::rules::path::normalise_prefix(
                strip,
            )));
    }
    Ok(r)
}

/// Both the same store (or both none).
fn same_store(a: Option<&Arc<RedisStore>>, b: Option<&Arc<RedisStore>>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => Arc::ptr_eq(a, b),
        (None, None) => true,
        _ => false,
    }
}

/// Both the same rate limiter (or both none).
fn same_limiter(a: Option<&Arc<RateLimiter>>, b: Option<&Arc<RateLimiter>>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => Arc::ptr_eq(a, b),
        (None, None) => true,
        _ => false,
    }
}
