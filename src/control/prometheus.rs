//! `/metrics`: a prometheus-client `Collector` that reads the request path's atomics at scrape
//! time, so labels are bounded (route, service, endpoint, method class, status class).

use std::sync::atomic::Ordering;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, NoLabelSet};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use super::ControlState;
use crate::metrics::{Histogram, CLASSES, METHODS};

/// Builds the registry that `/metrics` encodes and stores it in `state`.
pub fn install(state: &std::sync::Arc<ControlState>) {
    let mut r = Registry::default();
    r.register_collector(Box::new(GatewayCollector {
        state: std::sync::Arc::downgrade(state),
    }));
    let _ = state.prometheus.set(r);
}

/// Encodes the registry in the Prometheus text format.
pub fn render(registry: &Registry) -> String {
    let mut out = String::new();
    if prometheus_client::encoding::text::encode(&mut out, registry).is_err() {
        out.clear();
    }
    out
}

#[derive(Debug)]
struct GatewayCollector {
    state: std::sync::Weak<ControlState>,
}

fn counter(
    enc: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    rows: &[(Vec<(&str, String)>, u64)],
) -> Result<(), std::fmt::Error> {
    let mut m = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (labels, v) in rows {
        ConstCounter::new(*v).encode(m.encode_family(labels)?)?;
    }
    Ok(())
}

/// `meshgate_cache_*{route}` for every route with a cache.
fn cache_metrics(
    enc: &mut DescriptorEncoder<'_>,
    routes: &[std::sync::Arc<crate::proxy::Route>],
) -> Result<(), std::fmt::Error> {
    let mut requests = Vec::new();
    let (mut stored, mut invalidated, mut revalidated) = (Vec::new(), Vec::new(), Vec::new());
    let (mut bytes, mut entries) = (Vec::new(), Vec::new());
    for r in routes {
        let Some(c) = &r.cache else { continue };
        let route = vec![("route", r.name.to_string())];
        let n = &c.counters;
        for (result, v) in [
            ("hit", &n.hits),
            ("miss", &n.misses),
            ("stale", &n.stale),
            ("bypass", &n.bypass),
        ] {
            let mut labels = route.clone();
            labels.push(("result", result.to_owned()));
            requests.push((labels, v.load(Ordering::Relaxed)));
        }
        stored.push((route.clone(), n.stored.load(Ordering::Relaxed)));
        invalidated.push((route.clone(), n.invalidated.load(Ordering::Relaxed)));
        revalidated.push((route.clone(), n.revalidated.load(Ordering::Relaxed)));
        bytes.push((route.clone(), c.bytes() as f64));
        entries.push((route, c.entries() as f64));
    }
    if requests.is_empty() {
        return Ok(());
    }
    counter(
        enc,
        "meshgate_cache_requests",
        "Requests on cached routes by result (hit, miss, stale, bypass), by route",
        &requests,
    )?;
    counter(
        enc,
        "meshgate_cache_stored",
        "Answers stored, by route",
        &stored,
    )?;
    counter(
        enc,
        "meshgate_cache_invalidated",
        "Stored answers removed by unsafe requests and purges, by route",
        &invalidated,
    )?;
    counter(
        enc,
        "meshgate_cache_revalidated",
        "Stale answers refreshed by a 304 from the upstream, by route",
        &revalidated,
    )?;
    gauge(
        enc,
        "meshgate_cache_bytes",
        "Bytes held by the route's cache",
        &bytes,
    )?;
    gauge(
        enc,
        "meshgate_cache_entries",
        "Answers held by the route's cache",
        &entries,
    )
}

fn gauge(
    enc: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    rows: &[(Vec<(&str, String)>, f64)],
) -> Result<(), std::fmt::Error> {
    let mut m = enc.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (labels, v) in rows {
        ConstGauge::new(*v).encode(m.encode_family(labels)?)?;
    }
    Ok(())
}

fn histograms(
    enc: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    rows: &[(Vec<(&str, String)>, &Histogram)],
) -> Result<(), std::fmt::Error> {
    let mut m = enc.encode_descriptor(name, help, None, MetricType::Histogram)?;
    for (labels, h) in rows {
        let (sum, count, buckets) = h.snapshot();
        m.encode_family(labels)?
            .encode_histogram::<NoLabelSet>(sum, count, &buckets, None)?;
    }
    Ok(())
}

impl Collector for GatewayCollector {
    fn encode(&self, mut enc: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let Some(state) = self.state.upgrade() else {
            return Ok(());
        };
        let table = state.proxy.table.load();
        let services = state.services.load();
        let s = |v: &str| v.to_owned();

        let mut requests = Vec::new();
        let mut latency = Vec::new();
        let mut upstream_latency = Vec::new();
        let mut retries = Vec::new();
        let mut retry_outcomes = Vec::new();
        let mut rate_limit = Vec::new();
        let mut rate_limit_store = Vec::new();
        let mut auth_allowed = Vec::new();
        let mut auth_refused = Vec::new();
        for r in table.routes() {
            if r.rate_limiter().is_some() {
                let m = &r.metrics.rate_limit;
                for (decision, n) in [
                    ("allowed", &m.allowed),
                    ("limited", &m.limited),
                    ("missing_key", &m.missing_key),
                ] {
                    let labels = vec![("route", s(&r.name)), ("decision", s(decision))];
                    rate_limit.push((labels, n.load(Ordering::Relaxed)));
                }
                rate_limit_store.push((
                    vec![("route", s(&r.name))],
                    m.store_errors.load(Ordering::Relaxed),
                ));
            }
            if r.pipeline.names().any(|n| n == "auth") {
                let a = &r.metrics.auth;
                auth_allowed.push((
                    vec![("route", s(&r.name))],
                    a.allowed.load(Ordering::Relaxed),
                ));
                for reason in crate::auth::Refusal::ALL {
                    let n = a.refused[reason.index()].load(Ordering::Relaxed);
                    if n > 0 {
                        let labels = vec![("route", s(&r.name)), ("reason", s(reason.label()))];
                        auth_refused.push((labels, n));
                    }
                }
            }
            let (route, service) = (s(&r.name), s(r.pool.name()));
            for (mi, method) in METHODS.iter().enumerate() {
                for (ci, class) in CLASSES.iter().enumerate() {
                    let n = r.metrics.requests[mi][ci].load(Ordering::Relaxed);
                    if n > 0 {
                        let labels = vec![
                            ("route", route.clone()),
                            ("service", service.clone()),
                            ("method", s(method)),
                            ("class", s(class)),
                        ];
                        requests.push((labels, n));
                    }
                }
            }
            let rl = vec![("route", route.clone()), ("service", service.clone())];
            latency.push((rl.clone(), &r.metrics.latency));
            upstream_latency.push((rl.clone(), &r.metrics.upstream_latency));
            retries.push((rl.clone(), r.metrics.retries.load(Ordering::Relaxed)));
            let mut ok = rl.clone();
            ok.push(("outcome", s("success")));
            retry_outcomes.push((ok, r.metrics.retried_ok.load(Ordering::Relaxed)));
            let mut failed = rl;
            failed.push(("outcome", s("failure")));
            retry_outcomes.push((failed, r.metrics.retried_failed.load(Ordering::Relaxed)));
        }
        counter(
            &mut enc,
            "meshgate_requests",
            "Requests answered, by route, service, method and status class.",
            &requests,
        )?;
        histograms(
            &mut enc,
            "meshgate_request_duration_seconds",
            "Time until response headers were sent to the client.",
            &latency,
        )?;
        histograms(
            &mut enc,
            "meshgate_upstream_duration_seconds",
            "Time until the upstream's response headers arrived (final attempt).",
            &upstream_latency,
        )?;
        counter(&mut enc, "meshgate_retries", "Retries sent.", &retries)?;
        counter(
            &mut enc,
            "meshgate_retried_requests",
            "Requests that were retried, by final outcome.",
            &retry_outcomes,
        )?;
        counter(
            &mut enc,
            "meshgate_rate_limit_decisions",
            "Rate-limit decisions by route: allowed, limited (429), missing_key (400).",
            &rate_limit,
        )?;
        counter(
            &mut enc,
            "meshgate_rate_limit_store_errors",
            "Global rate-limit decisions Redis failed to make (on_store_error decided).",
            &rate_limit_store,
        )?;
        counter(
            &mut enc,
            "meshgate_auth_allowed",
            "Requests the route's auth let through.",
            &auth_allowed,
        )?;
        counter(
            &mut enc,
            "meshgate_auth_refused",
            "Requests the route's auth refused, by reason.",
            &auth_refused,
        )?;

        let g = &state.proxy.metrics;
        gauge(
            &mut enc,
            "meshgate_requests_in_flight",
            "Requests being handled now.",
            &[(vec![], g.in_flight.load(Ordering::Relaxed) as f64)],
        )?;
        counter(
            &mut enc,
            "meshgate_no_route",
            "Requests that matched no route.",
            &[(vec![], g.no_route.load(Ordering::Relaxed))],
        )?;
        counter(
            &mut enc,
            "meshgate_connections_accepted",
            "Downstream connections accepted.",
            &[(vec![], g.connections_accepted.load(Ordering::Relaxed))],
        )?;
        gauge(
            &mut enc,
            "meshgate_connections_open",
            "Downstream connections open now.",
            &[(vec![], g.connections_open.load(Ordering::Relaxed) as f64)],
        )?;
        let t = &state.proxy.telemetry;
        counter(
            &mut enc,
            "meshgate_trace_spans_dropped",
            "Sampled spans never delivered: export queue full, or the export failed or timed out.",
            &[(vec![], t.spans_dropped())],
        )?;
        counter(
            &mut enc,
            "meshgate_trace_spans_exported",
            "Spans the OTLP collector accepted.",
            &[(vec![], t.spans_exported())],
        )?;
        counter(
            &mut enc,
            "meshgate_access_log_dropped",
            "Access log lines dropped because the writer fell behind.",
            &[(vec![], t.access_lines_dropped())],
        )?;

        let mut ep_requests = Vec::new();
        let mut ep_failures = Vec::new();
        let mut ep_healthy = Vec::new();
        let mut ep_ejected = Vec::new();
        let mut ep_ejections = Vec::new();
        let mut ep_in_flight = Vec::new();
        let mut ep_weight = Vec::new();
        let mut pool_total = Vec::new();
        let mut pool_available = Vec::new();
        let mut consul_queries = Vec::new();
        let mut consul_errors = Vec::new();
        let mut consul_index = Vec::new();
        let mut consul_staleness = Vec::new();
        let mut consul_instances = Vec::new();
        let mut consul_synced = Vec::new();
        for (name, entry) in services.iter() {
            let service = s(name);
            let snap = entry.pool.snapshot();
            pool_total.push((vec![("service", service.clone())], snap.len() as f64));
            pool_available.push((vec![("service", service.clone())], snap.available() as f64));
            for ep in snap.list() {
                let l = vec![
                    ("service", service.clone()),
                    ("endpoint", s(ep.authority.as_str())),
                ];
                for (ci, class) in CLASSES.iter().enumerate() {
                    let n = ep.state.status_count(ci);
                    if n > 0 {
                        let mut lc = l.clone();
                        lc.push(("class", s(class)));
                        ep_requests.push((lc, n));
                    }
                }
                ep_failures.push((l.clone(), ep.state.failures()));
                ep_healthy.push((l.clone(), f64::from(u8::from(ep.state.is_healthy()))));
                ep_ejected.push((l.clone(), f64::from(u8::from(ep.state.is_ejected()))));
                ep_ejections.push((l.clone(), u64::from(ep.state.ejections())));
                ep_in_flight.push((l.clone(), ep.state.in_flight() as f64));
                ep_weight.push((l, f64::from(ep.weight())));
            }
            if let Some(sync) = &entry.sync {
                let snap = sync.snapshot();
                let l = vec![("service", service.clone())];
                consul_queries.push((l.clone(), snap.queries_total));
                consul_errors.push((l.clone(), snap.errors_total));
                consul_index.push((l.clone(), snap.last_index as f64));
                consul_staleness.push((l.clone(), snap.staleness_seconds.unwrap_or(-1.0)));
                consul_instances.push((l.clone(), snap.instances as f64));
                consul_synced.push((l, f64::from(u8::from(snap.synced_once))));
            }
        }
        counter(
            &mut enc,
            "meshgate_upstream_requests",
            "Upstream answers by endpoint and status class.",
            &ep_requests,
        )?;
        counter(
            &mut enc,
            "meshgate_upstream_failures",
            "Gateway-side failures (connect, reset, timeout) and 5xx by endpoint.",
            &ep_failures,
        )?;
        gauge(
            &mut enc,
            "meshgate_endpoint_healthy",
            "1 when active health checks pass (or none run).",
            &ep_healthy,
        )?;
        gauge(
            &mut enc,
            "meshgate_endpoint_ejected",
            "1 while passive ejection keeps the endpoint out.",
            &ep_ejected,
        )?;
        counter(
            &mut enc,
            "meshgate_endpoint_ejections",
            "Times the endpoint was ejected.",
            &ep_ejections,
        )?;
        gauge(
            &mut enc,
            "meshgate_endpoint_in_flight",
            "Requests holding the endpoint now.",
            &ep_in_flight,
        )?;
        gauge(
            &mut enc,
            "meshgate_endpoint_weight",
            "The endpoint's weight.",
            &ep_weight,
        )?;
        gauge(
            &mut enc,
            "meshgate_pool_endpoints",
            "Endpoints in the service's pool.",
            &pool_total,
        )?;
        gauge(
            &mut enc,
            "meshgate_pool_endpoints_available",
            "Endpoints that can take traffic now.",
            &pool_available,
        )?;
        counter(
            &mut enc,
            "meshgate_consul_queries",
            "Consul queries made for the service.",
            &consul_queries,
        )?;
        counter(
            &mut enc,
            "meshgate_consul_errors",
            "Consul queries that failed.",
            &consul_errors,
        )?;
        gauge(
            &mut enc,
            "meshgate_consul_last_index",
            "Last X-Consul-Index seen.",
            &consul_index,
        )?;
        gauge(
            &mut enc,
            "meshgate_consul_staleness_seconds",
            "Seconds since the last successful sync (-1: never).",
            &consul_staleness,
        )?;
        gauge(
            &mut enc,
            "meshgate_consul_instances",
            "Instances in the last Consul answer.",
            &consul_instances,
        )?;
        gauge(
            &mut enc,
            "meshgate_consul_synced",
            "1 once the service synced from Consul.",
            &consul_synced,
        )?;
        gauge(
            &mut enc,
            "meshgate_kv_route_errors",
            "Consul KV route keys currently invalid or clashing (see /status notes).",
            &[(
                Vec::new(),
                state.kv_route_errors.load(Ordering::Relaxed) as f64,
            )],
        )?;

        // Counts every task the runtime has spawned and not yet finished (connections, splices,
        // watches, probes): a soak watches it for tasks that never end.
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            gauge(
                &mut enc,
                "meshgate_runtime_alive_tasks",
                "Tokio tasks alive now (spawned and not yet finished).",
                &[(vec![], rt.metrics().num_alive_tasks() as f64)],
            )?;
        }

        cache_metrics(&mut enc, table.routes())?;

        let denials: Vec<_> = table
            .routes()
            .iter()
            .filter_map(|r| {
                let m = r.mesh.as_ref()?;
                Some((vec![("route", r.name.to_string())], m.denials()))
            })
            .collect();
        if !denials.is_empty() {
            counter(
                &mut enc,
                "meshgate_mesh_denials",
                "Requests a mesh destination refused by intention (L7 403 or L4 close), by route",
                &denials,
            )?;
        }
        if let Some(mesh) = state.mesh.load_full() {
            let id = vec![("identity", mesh.service.clone())];
            if let Some(leaf) = mesh.leaf() {
                gauge(
                    &mut enc,
                    "meshgate_mesh_leaf_expiry_seconds",
                    "Seconds until the gateway's Connect leaf certificate expires",
                    &[(id.clone(), leaf.seconds_left(std::time::SystemTime::now()))],
                )?;
            }
            counter(
                &mut enc,
                "meshgate_mesh_rotations",
                "Leaf renewals and CA root changes installed since start",
                &[(id, mesh.rotations())],
            )?;
        }

        if let Some(p) = process_figures() {
            let mut m = enc.encode_descriptor(
                "process_cpu_seconds",
                "User and system CPU time spent.",
                None,
                MetricType::Counter,
            )?;
            ConstCounter::new(p.cpu_seconds)
                .encode(m.encode_family(&Vec::<(&str, String)>::new())?)?;
            gauge(
                &mut enc,
                "process_resident_memory_bytes",
                "Resident memory size in bytes.",
                &[(vec![], p.rss_bytes)],
            )?;
            gauge(
                &mut enc,
                "process_open_fds",
                "Open file descriptors.",
                &[(vec![], p.open_fds)],
            )?;
            gauge(
                &mut enc,
                "process_threads",
                "OS threads.",
                &[(vec![], p.threads)],
            )?;
        }
        Ok(())
    }
}

struct ProcessFigures {
    cpu_seconds: f64,
    rss_bytes: f64,
    open_fds: f64,
    threads: f64,
}

fn process_figures() -> Option<ProcessFigures> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the parenthesised command name; utime and stime are the 12th and 13th.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = 100.0; // USER_HZ is 100 on every Linux we run on.
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    let threads: f64 = fields.get(17)?.parse().ok()?;
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let rss_kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())?;
    let open_fds = std::fs::read_dir("/proc/self/fd")
        .map(|d| d.count())
        .unwrap_or(0) as f64;
    Some(ProcessFigures {
        cpu_seconds: (utime + stime) / ticks,
        rss_bytes: rss_kib * 1024.0,
        open_fds,
        threads,
    })
}
