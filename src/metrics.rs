//! Prometheus metrics. The request path only bumps atomics that live on routes and endpoints;
//! `/metrics` reads them at scrape time through a prometheus-client `Collector`, so labels are
//! bounded (route, service, endpoint, method class, status class) and no lock is taken per request.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use http::Method;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, NoLabelSet};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::proxy::ProxyState;

/// Histogram bucket bounds in seconds.
pub const BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// A lock-free fixed-bucket latency histogram.
#[derive(Debug, Default)]
pub struct Histogram {
    buckets: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    sum_micros: AtomicU64,
}

impl Histogram {
    /// Records one observation.
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        if let Some(i) = BUCKETS.iter().position(|b| secs <= *b) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_micros
            .fetch_add(d.as_micros() as u64, Ordering::Relaxed);
    }

    /// Sum in seconds, count, and per-bucket (not cumulative) counts ending with `+Inf`, the
    /// shape prometheus-client's encoder expects (it accumulates them itself).
    pub fn snapshot(&self) -> (f64, u64, Vec<(f64, u64)>) {
        let mut buckets: Vec<(f64, u64)> = BUCKETS
            .iter()
            .zip(&self.buckets)
            .map(|(b, c)| (*b, c.load(Ordering::Relaxed)))
            .collect();
        let finite: u64 = buckets.iter().map(|(_, c)| c).sum();
        let count = self.count.load(Ordering::Relaxed).max(finite);
        buckets.push((f64::INFINITY, count - finite));
        (
            self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6,
            count,
            buckets,
        )
    }

    /// Estimated quantile (0..1) in seconds by linear interpolation inside its bucket.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        let (_, count, buckets) = self.snapshot();
        if count == 0 {
            return None;
        }
        let rank = q * count as f64;
        let mut prev = (0.0, 0u64);
        let mut cum = 0u64;
        for (bound, n) in buckets {
            cum += n;
            if cum as f64 >= rank {
                if bound.is_infinite() {
                    return Some(prev.0);
                }
                let inside = (cum - prev.1) as f64;
                let frac = if inside > 0.0 {
                    (rank - prev.1 as f64) / inside
                } else {
                    1.0
                };
                return Some(prev.0 + (bound - prev.0) * frac.clamp(0.0, 1.0));
            }
            prev = (bound, cum);
        }
        Some(prev.0)
    }
}

/// Method classes used as label values (bounded, unlike raw methods).
pub const METHODS: [&str; 8] = [
    "GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "OTHER",
];
/// Status classes used as label values.
pub const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

fn method_index(m: &Method) -> usize {
    match *m {
        Method::GET => 0,
        Method::HEAD => 1,
        Method::POST => 2,
        Method::PUT => 3,
        Method::DELETE => 4,
        Method::PATCH => 5,
        Method::OPTIONS => 6,
        _ => 7,
    }
}

/// Index into [`CLASSES`] for a status code.
pub fn class_index(status: u16) -> usize {
    (status / 100).clamp(1, 5) as usize - 1
}

/// Per-route request figures.
#[derive(Debug)]
pub struct RouteMetrics {
    /// `[metrics] enabled`: when false the request path records nothing here.
    enabled: bool,
    requests: [[AtomicU64; 5]; 8],
    /// Time until the response headers went to the client.
    pub latency: Histogram,
    /// Time until the final attempt's upstream response headers arrived.
    pub upstream_latency: Histogram,
    /// Retries sent.
    pub retries: AtomicU64,
    /// Requests that needed a retry and then succeeded (non-5xx).
    pub retried_ok: AtomicU64,
    /// Requests that needed a retry and still failed.
    pub retried_failed: AtomicU64,
}

impl Default for RouteMetrics {
    fn default() -> Self {
        Self {
            enabled: true,
            requests: Default::default(),
            latency: Histogram::default(),
            upstream_latency: Histogram::default(),
            retries: AtomicU64::new(0),
            retried_ok: AtomicU64::new(0),
            retried_failed: AtomicU64::new(0),
        }
    }
}

impl RouteMetrics {
    /// Turns recording on or off (from `[metrics] enabled`).
    pub fn set_enabled(&mut self, enabled: bool) {
        self.enabled = enabled;
    }

    /// Whether the request path records figures.
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Counts one answered request.
    pub fn record(&self, method: &Method, status: u16, elapsed: Duration) {
        if !self.enabled {
            return;
        }
        self.requests[method_index(method)][class_index(status)].fetch_add(1, Ordering::Relaxed);
        self.latency.observe(elapsed);
    }

    /// Records the final attempt's time to upstream response headers.
    pub fn observe_upstream(&self, elapsed: Duration) {
        if self.enabled {
            self.upstream_latency.observe(elapsed);
        }
    }
}

/// Gateway-wide figures.
#[derive(Debug, Default)]
pub struct GlobalMetrics {
    /// Requests being handled now.
    pub in_flight: AtomicI64,
    /// Requests no route matched.
    pub no_route: AtomicU64,
    /// Downstream connections accepted.
    pub connections_accepted: AtomicU64,
    /// Downstream connections open now.
    pub connections_open: AtomicI64,
}

/// Builds the registry that `/metrics` encodes.
pub fn registry(state: std::sync::Weak<ProxyState>) -> Registry {
    let mut r = Registry::default();
    r.register_collector(Box::new(GatewayCollector { state }));
    r
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
    state: std::sync::Weak<ProxyState>,
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
        let table = state.table.load();
        let services = state.services.load();
        let s = |v: &str| v.to_owned();

        let mut requests = Vec::new();
        let mut latency = Vec::new();
        let mut upstream_latency = Vec::new();
        let mut retries = Vec::new();
        let mut retry_outcomes = Vec::new();
        for r in table.routes() {
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

        let g = &state.metrics;
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
        let t = &state.telemetry;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_and_quantiles() {
        let h = Histogram::default();
        for _ in 0..90 {
            h.observe(Duration::from_millis(2));
        }
        for _ in 0..10 {
            h.observe(Duration::from_millis(200));
        }
        let (sum, count, buckets) = h.snapshot();
        assert_eq!(count, 100);
        assert!((sum - (0.18 + 2.0)).abs() < 1e-6, "{sum}");
        assert_eq!(buckets.iter().find(|(b, _)| *b == 0.0025).unwrap().1, 90);
        assert_eq!(buckets.iter().find(|(b, _)| *b == 0.25).unwrap().1, 10);
        assert_eq!(buckets.iter().map(|(_, n)| n).sum::<u64>(), 100);
        assert_eq!(buckets.last().unwrap().1, 0);
        let p50 = h.quantile(0.5).unwrap();
        assert!(p50 > 0.001 && p50 <= 0.0025, "{p50}");
        let p99 = h.quantile(0.99).unwrap();
        assert!(p99 > 0.1 && p99 <= 0.25, "{p99}");
    }

    #[test]
    fn classes() {
        assert_eq!(CLASSES[class_index(204)], "2xx");
        assert_eq!(CLASSES[class_index(503)], "5xx");
        assert_eq!(CLASSES[class_index(99)], "1xx");
        assert_eq!(CLASSES[class_index(700)], "5xx");
    }
}
