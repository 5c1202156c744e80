//! `[[routes]]` into `RouteConfig`s: each route's keys and tables (rewrite, headers, error page,
//! retry, upstream TLS, health check, outlier); `RouteSet` holds the checks across routes.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Method, StatusCode};

use super::problems::Problems;
use super::raw::{
    RawErrorPage, RawHeaderOps, RawHealthCheck, RawOutlier, RawRetry, RawRewrite, RawRoute,
    RawUpstreamTls,
};
use super::targets::parse_targets;
use crate::balancer::{OutlierConfig, Policy, PoolSettings};
use crate::health::HealthCheck;
use crate::limits;
use crate::proxy::settings::{Backend, ErrorPage, RouteConfig, ServiceSettings, StaticService};
use crate::rules::headers::HeaderOps;
use crate::rules::path::{normalise_prefix, Rewrite};
use crate::rules::retry::{RetryOn, RetryPolicy};
use crate::tls::UpstreamTls;

/// The services a route may name, from `[discovery]`.
pub(super) struct Services<'a> {
    /// `[discovery.static.services]`, already validated.
    pub(super) static_services: &'a BTreeMap<Arc<str>, StaticService>,
    /// `discovery.provider = "static"`: a route's `service` must then be a static one.
    pub(super) static_only: bool,
    /// `discovery.consul.connect.enabled`: the mesh default for routes naming a service.
    pub(super) connect_default: bool,
    /// `[policies.NAME]`, already validated.
    pub(super) policies: &'a BTreeMap<String, super::policies::NamedPolicy>,
    /// `[redis]` is configured (global rate limits need it).
    pub(super) redis: bool,
    /// The environment `auth` secrets are read from; `None` for routes from Consul KV, which
    /// may not name the gateway's variables.
    pub(super) env: Option<&'a super::env::Env>,
}

/// Every route in file order. A route with no usable backend is still checked, then left out
/// (its problems fail the whole configuration anyway).
pub(super) fn routes(
    c: &mut Problems,
    raw: &[RawRoute],
    services: Services<'_>,
) -> Vec<RouteConfig> {
    let mut set = RouteSet::new(services);
    raw.iter()
        .enumerate()
        .filter_map(|(i, r)| {
            let at = At {
                i,
                path: format!("routes[{i}]"),
                name: format!("route-{i}"),
            };
            route(c, &mut set, &at, r)
        })
        .collect()
}

/// One route on its own (a Consul KV document): the same checks as a file route, with `path`
/// as the key path prefix of its problems and `name` as its default name.
pub(super) fn single(
    c: &mut Problems,
    raw: &RawRoute,
    path: &str,
    name: &str,
    services: Services<'_>,
) -> Option<RouteConfig> {
    let mut set = RouteSet::new(services);
    let at = At {
        i: 0,
        path: path.to_owned(),
        name: name.to_owned(),
    };
    route(c, &mut set, &at, raw)
}

/// Where a route sits: its index among its set, the key path of its problems and the name it
/// gets when it sets none.
struct At {
    i: usize,
    path: String,
    name: String,
}

/// `routes[i]`. Problems come in key order, and the checks against earlier routes run where
/// their key is read, so a list of problems reads like the file.
fn route(c: &mut Problems, set: &mut RouteSet<'_>, at: &At, r: &RawRoute) -> Option<RouteConfig> {
    let (i, rp) = (at.i, at.path.as_str());
    c.unknown(rp, &r.unknown);
    let name: Arc<str> = r.name.clone().unwrap_or_else(|| at.name.clone()).into();
    set.unique_name(c, rp, &name);
    let path = route_path(c, rp, r.path.as_deref());
    set.unique_path(c, rp, i, &path);
    let backend = backend(c, set, rp, &name, r);
    let policy = policy(c, rp, &r.load_balancer);
    let rewrite = path_rewrite(c, rp, &r.path_rewrite);
    let timeout = c.duration_in(&format!("{rp}.timeout"), &r.timeout, limits::TIMEOUT);
    let request_headers = header_ops(c, &format!("{rp}.request_headers"), &r.request_headers);
    let response_headers = header_ops(c, &format!("{rp}.response_headers"), &r.response_headers);
    let error = r
        .error
        .as_ref()
        .map(|e| error_page(c, &format!("{rp}.error"), e));
    let max_body = r
        .max_body
        .as_ref()
        .map(|s| c.size(&format!("{rp}.max_body"), s));
    let retry = retry_policy(c, &format!("{rp}.retry"), &r.retry);
    let upstream_tls = r
        .upstream_tls
        .as_ref()
        .map(|t| upstream_tls(c, &format!("{rp}.upstream_tls"), t));
    let websocket_idle_timeout = r
        .websocket_idle_timeout
        .as_ref()
        .map(|t| c.duration_in(&format!("{rp}.websocket_idle_timeout"), t, limits::TIMEOUT));
    let stream_timeout = r
        .stream_timeout
        .as_ref()
        .map(|t| c.duration_in(&format!("{rp}.stream_timeout"), t, limits::TIMEOUT));
    let service_settings = service_settings(c, rp, r);
    set.one_owner(c, rp, i, backend.as_ref(), &service_settings);
    let connect = connect(c, set, rp, r, backend.as_ref());
    super::policies::unknown_names(c, rp, r, set.services.policies);
    let rate_limit = super::policies::route_rate_limit(
        c,
        rp,
        &name,
        r,
        set.services.policies,
        set.services.redis,
    );
    let auth = super::policies::route_auth(c, rp, r, set.services.policies, set.services.env);
    let cache = super::policies::route_cache(c, rp, r, set.services.policies);
    Some(RouteConfig {
        auth,
        cache,
        connect,
        name,
        path,
        backend: backend?,
        policy,
        rewrite,
        timeout,
        preserve_host: r.preserve_host,
        request_headers,
        response_headers,
        error,
        max_body,
        upstream_tls,
        websocket: r.websocket,
        websocket_idle_timeout,
        retry,
        stream_timeout,
        panic_threshold: r.panic_threshold,
        service_settings,
        rate_limit,
    })
}

/// `routes[i].connect`: only for a service found through Consul; the provider's default
/// otherwise.
fn connect(
    c: &mut Problems,
    set: &RouteSet<'_>,
    rp: &str,
    r: &RawRoute,
    backend: Option<&Backend>,
) -> bool {
    let consul_service = match backend {
        Some(Backend::Service(s)) => {
            !set.services.static_only && !set.services.static_services.contains_key(s)
        }
        _ => false,
    };
    match r.connect {
        Some(true) if !consul_service => {
            c.err(
                format!("{rp}.connect"),
                "the mesh is only for a `service` found through Consul (discovery.provider = \"consul\"), not for targets or static services",
            );
            false
        }
        Some(on) => on,
        None => consul_service && set.services.connect_default,
    }
}

/// `routes[i].path`, normalised; a missing path is reported and `/` stands in.
fn route_path(c: &mut Problems, rp: &str, path: Option<&str>) -> String {
    match path {
        None => {
            c.err(
                format!("{rp}.path"),
                "missing; every route needs a path prefix such as \"/api\"",
            );
            String::from("/")
        }
        Some(p) => {
            let p = prefix(c, &format!("{rp}.path"), p);
            normalise_prefix(&p)
        }
    }
}

/// Exactly one of `targets` (a service of the route's own name) and `service`.
fn backend(
    c: &mut Problems,
    set: &RouteSet<'_>,
    rp: &str,
    name: &str,
    r: &RawRoute,
) -> Option<Backend> {
    match (&r.targets, &r.service) {
        (Some(_), Some(_)) => {
            c.err(rp, "has both targets and service; give exactly one");
            None
        }
        (None, None) => {
            c.err(rp, "needs either targets or service");
            None
        }
        (Some(t), None) => {
            set.targets_own_name(c, rp, name);
            parse_targets(c, &format!("{rp}.targets"), t, false).map(Backend::Targets)
        }
        (None, Some(s)) => {
            set.known_service(c, rp, s);
            Some(Backend::Service(s.as_str().into()))
        }
    }
}

/// `routes[i].load_balancer`; round robin stands in for an unknown name.
fn policy(c: &mut Problems, rp: &str, name: &str) -> Policy {
    Policy::from_name(name).unwrap_or_else(|| {
        c.err(
            format!("{rp}.load_balancer"),
            format!(
                "unknown policy {:?}, expected one of {}",
                name,
                Policy::NAMES.join(", ")
            ),
        );
        Policy::RoundRobin
    })
}

/// `routes[i].path_rewrite`: each entry sets exactly one rule; a broken entry is skipped.
fn path_rewrite(c: &mut Problems, rp: &str, raw: &[RawRewrite]) -> Vec<Rewrite> {
    let mut rewrite = Vec::new();
    for (j, rw) in raw.iter().enumerate() {
        let wp = format!("{rp}.path_rewrite[{j}]");
        c.unknown(&wp, &rw.unknown);
        let set = [
            rw.strip_prefix.is_some(),
            rw.add_prefix.is_some(),
            rw.replace_prefix.is_some(),
        ]
        .iter()
        .filter(|x| **x)
        .count();
        if set != 1 {
            c.err(
                &wp,
                "needs exactly one of strip_prefix, add_prefix, replace_prefix",
            );
            continue;
        }
        if let Some(p) = &rw.strip_prefix {
            rewrite.push(Rewrite::StripPrefix(normalise_prefix(&prefix(
                c,
                &format!("{wp}.strip_prefix"),
                p,
            ))));
        } else if let Some(p) = &rw.add_prefix {
            rewrite.push(Rewrite::AddPrefix(normalise_prefix(&prefix(
                c,
                &format!("{wp}.add_prefix"),
                p,
            ))));
        } else if let Some(rp2) = &rw.replace_prefix {
            c.unknown(&format!("{wp}.replace_prefix"), &rp2.unknown);
            let from = prefix(c, &format!("{wp}.replace_prefix.from"), &rp2.from);
            let to = prefix(c, &format!("{wp}.replace_prefix.to"), &rp2.to);
            rewrite.push(Rewrite::ReplacePrefix {
                from: normalise_prefix(&from),
                to: normalise_prefix(&to),
            });
        }
    }
    rewrite
}

/// `routes[i].error`: the page the gateway answers with instead of its own error body.
fn error_page(c: &mut Problems, ep: &str, e: &RawErrorPage) -> ErrorPage {
    c.unknown(ep, &e.unknown);
    let status = e.status.and_then(|s| {
        match u16::try_from(s)
            .ok()
            .and_then(|s| StatusCode::from_u16(s).ok())
        {
            Some(st) if (100..=599).contains(&s) => Some(st),
            _ => {
                c.err(
                    format!("{ep}.status"),
                    format!("invalid status {s}; expected 100 to 599"),
                );
                None
            }
        }
    });
    let ct = e.content_type.as_deref().unwrap_or("application/json");
    let content_type = HeaderValue::from_str(ct).unwrap_or_else(|_| {
        c.err(
            format!("{ep}.content_type"),
            format!("invalid header value {ct:?}"),
        );
        HeaderValue::from_static("application/json")
    });
    ErrorPage {
        status,
        content_type,
        body: Bytes::from(e.body.clone()),
    }
}

/// `routes[i].upstream_tls`; the files are read now so a bad one fails the configuration.
fn upstream_tls(c: &mut Problems, tp: &str, t: &RawUpstreamTls) -> UpstreamTls {
    c.unknown(tp, &t.unknown);
    let client_cert = match (&t.cert_file, &t.key_file) {
        (Some(cert), Some(key)) => Some((PathBuf::from(cert), PathBuf::from(key))),
        (None, None) => None,
        _ => {
            c.err(tp, "cert_file and key_file go together");
            None
        }
    };
    let tls = UpstreamTls {
        ca_file: t.ca_file.as_ref().map(PathBuf::from),
        client_cert,
        server_name: t.server_name.clone(),
        insecure_skip_verify: t.insecure_skip_verify,
    };
    if let Err(e) = crate::tls::client_config(&tls) {
        c.err(tp, crate::error::Chain(&e).to_string());
    }
    tls
}

/// The keys that shape the route's service pool: `health_check`, `outlier`, `slow_start`,
/// `panic_threshold`, `max_requests`, `max_pending` and `start_unhealthy`.
fn service_settings(c: &mut Problems, rp: &str, r: &RawRoute) -> ServiceSettings {
    let health_check = r
        .health_check
        .as_ref()
        .map(|h| health_check(c, &format!("{rp}.health_check"), h));
    let outlier = r
        .outlier
        .as_ref()
        .map(|o| outlier(c, &format!("{rp}.outlier"), o));
    let slow_start = c.duration(&format!("{rp}.slow_start"), &r.slow_start);
    // Kept on the route itself (`RouteConfig::panic_threshold`), checked here in key order.
    if let Some(p) = r.panic_threshold {
        if !(0.0..=100.0).contains(&p) {
            c.err(
                format!("{rp}.panic_threshold"),
                format!("must be a percentage from 0 to 100, got {p}"),
            );
        }
    }
    let max_requests = r
        .max_requests
        .map(|n| c.count(&format!("{rp}.max_requests"), n, 1));
    let max_pending = r
        .max_pending
        .map_or(0, |n| c.count(&format!("{rp}.max_pending"), n, 0));
    if max_pending > 0 && max_requests.is_none() {
        c.err(
            format!("{rp}.max_pending"),
            "only means something together with max_requests",
        );
    }
    let service_settings = ServiceSettings {
        health_check,
        pool: PoolSettings {
            start_unhealthy: r.start_unhealthy,
            slow_start,
            outlier,
        },
        max_requests,
        max_pending,
    };
    if r.start_unhealthy && service_settings.health_check.is_none() {
        c.err(
            format!("{rp}.start_unhealthy"),
            "needs a health_check, or new endpoints would never take traffic",
        );
    }
    service_settings
}

/// What a route is checked against beyond its own keys: the routes before it and the
/// configured services.
struct RouteSet<'a> {
    services: Services<'a>,
    names: BTreeSet<Arc<str>>,
    /// Each normalised path and the first route that has it.
    paths: BTreeMap<String, usize>,
    /// The first route that gave each service non-default settings, and those settings.
    owners: BTreeMap<Arc<str>, (usize, ServiceSettings)>,
}

impl<'a> RouteSet<'a> {
    fn new(services: Services<'a>) -> Self {
        Self {
            services,
            names: BTreeSet::new(),
            paths: BTreeMap::new(),
            owners: BTreeMap::new(),
        }
    }

    /// Route names are unique (explicit ones and the `route-{i}` defaults alike).
    fn unique_name(&mut self, c: &mut Problems, rp: &str, name: &Arc<str>) {
        if !self.names.insert(name.clone()) {
            c.err(
                format!("{rp}.name"),
                format!("duplicate route name {name:?}"),
            );
        }
    }

    /// Normalised paths are unique: two routes with one prefix would never both match.
    fn unique_path(&mut self, c: &mut Problems, rp: &str, i: usize, path: &str) {
        if let Some(prev) = self.paths.insert(path.to_owned(), i) {
            c.err(
                format!("{rp}.path"),
                format!("{path:?} is already the path of routes[{prev}]"),
            );
        }
    }

    /// A route with targets owns a service of its name, so no static service may have it.
    fn targets_own_name(&self, c: &mut Problems, rp: &str, name: &str) {
        if self.services.static_services.contains_key(name) {
            c.err(
                format!("{rp}.name"),
                format!("{name:?} is also a service in discovery.static.services; a route with targets owns a service of its own name"),
            );
        }
    }

    /// With the static provider, a named service must be a static one.
    fn known_service(&self, c: &mut Problems, rp: &str, service: &str) {
        if self.services.static_only && !self.services.static_services.contains_key(service) {
            c.err(
                format!("{rp}.service"),
                format!("unknown service {service:?}: not in discovery.static.services and discovery.provider is \"static\""),
            );
        }
    }

    /// A shared service takes its health check, outlier, slow start and caps from one route.
    fn one_owner(
        &mut self,
        c: &mut Problems,
        rp: &str,
        i: usize,
        backend: Option<&Backend>,
        settings: &ServiceSettings,
    ) {
        let Some(Backend::Service(svc)) = backend else {
            return;
        };
        if settings == &ServiceSettings::default() {
            return;
        }
        if let Some((prev, owned)) = self.owners.get(svc) {
            if owned != settings {
                c.err(
                    rp,
                    format!("service {svc:?} already has other health_check/outlier/slow_start/max_requests settings in routes[{prev}]; set them on one route only"),
                );
            }
        } else {
            self.owners.insert(svc.clone(), (i, settings.clone()));
        }
    }
}

// === the route's tables ===

/// A header name as written in the file.
fn header_name(check: &mut Problems, path: &str, name: &str) -> Option<HeaderName> {
    match HeaderName::from_bytes(name.as_bytes()) {
        Ok(n) => Some(n),
        Err(_) => {
            check.err(path, format!("invalid header name {name:?}"));
            None
        }
    }
}

/// `request_headers` / `response_headers`: `add`, `set` and `remove`.
fn header_ops(check: &mut Problems, path: &str, raw: &RawHeaderOps) -> HeaderOps {
    check.unknown(path, &raw.unknown);
    let mut pairs =
        |kind: &str, map: &BTreeMap<String, String>| -> Vec<(HeaderName, HeaderValue)> {
            map.iter()
                .filter_map(|(k, v)| {
                    let p = format!("{path}.{kind}.{k}");
                    let name = header_name(check, &p, k)?;
                    match HeaderValue::from_str(v) {
                        Ok(v) => Some((name, v)),
                        Err(_) => {
                            check.err(p, format!("invalid header value {v:?}"));
                            None
                        }
                    }
                })
                .collect()
        };
    let add = pairs("add", &raw.add);
    let set = pairs("set", &raw.set);
    let remove = raw
        .remove
        .iter()
        .enumerate()
        .filter_map(|(i, n)| header_name(check, &format!("{path}.remove[{i}]"), n))
        .collect();
    HeaderOps::new(add, set, remove)
}

/// A path prefix; it must start with `/`.
fn prefix(check: &mut Problems, path: &str, p: &str) -> String {
    if !p.starts_with('/') {
        check.err(path, format!("{p:?} must start with \"/\""));
    }
    p.to_owned()
}

/// `routes[i].retry`.
fn retry_policy(c: &mut Problems, path: &str, r: &RawRetry) -> RetryPolicy {
    c.unknown(path, &r.unknown);
    let attempts = c.count_in(&format!("{path}.attempts"), r.attempts, limits::ATTEMPTS) as u32;
    // The list replaces the defaults (which the raw default list already spells out).
    let mut on = RetryOn {
        connect_failure: false,
        reset: false,
        timeout: false,
        statuses: Vec::new(),
    };
    for (i, cond) in r.on.iter().enumerate() {
        match cond.as_str() {
            "connect-failure" => on.connect_failure = true,
            "reset" => on.reset = true,
            "timeout" => on.timeout = true,
            code => match code.parse::<u16>() {
                Ok(s) if (500..=599).contains(&s) => on.statuses.push(s),
                _ => c.err(
                    format!("{path}.on[{i}]"),
                    format!("unknown retry condition {cond:?}, expected connect-failure, reset, timeout or a 5xx status such as \"503\""),
                ),
            },
        }
    }
    let budget = r
        .budget
        .trim()
        .trim_end_matches('%')
        .trim()
        .parse::<f64>()
        .ok()
        .filter(|b| (0.0..=100.0).contains(b));
    if budget.is_none() {
        c.err(
            format!("{path}.budget"),
            format!(
                "invalid budget {:?}; expected a percentage such as \"20%\"",
                r.budget
            ),
        );
    }
    RetryPolicy {
        attempts,
        backoff: c.duration(&format!("{path}.backoff"), &r.backoff),
        max_backoff: c.duration(&format!("{path}.max_backoff"), &r.max_backoff),
        per_try_timeout: r
            .per_try_timeout
            .as_ref()
            .map(|t| c.duration_in(&format!("{path}.per_try_timeout"), t, limits::TIMEOUT)),
        on,
        budget_percent: budget.unwrap_or(20.0),
        max_body: c.size_in(
            &format!("{path}.max_body"),
            &r.max_body,
            limits::RETRY_MAX_BODY,
        ),
    }
}

/// `routes[i].health_check`: the active probe of the route's service.
fn health_check(c: &mut Problems, path: &str, h: &RawHealthCheck) -> HealthCheck {
    c.unknown(path, &h.unknown);
    let method = Method::from_bytes(h.method.as_bytes()).unwrap_or_else(|_| {
        c.err(
            format!("{path}.method"),
            format!("invalid method {:?}", h.method),
        );
        Method::GET
    });
    let probe_path = prefix(c, &format!("{path}.path"), &h.path);
    if http::uri::PathAndQuery::try_from(probe_path.as_str()).is_err() {
        c.err(
            format!("{path}.path"),
            format!("invalid path {probe_path:?}"),
        );
    }
    let expected = crate::health::parse_status_ranges(&h.expected_status).unwrap_or_else(|| {
        c.err(
            format!("{path}.expected_status"),
            format!(
                "invalid status list {:?}; expected e.g. \"200-299\" or \"200,204\"",
                h.expected_status
            ),
        );
        vec![(200, 299)]
    });
    let interval = c.duration_in(
        &format!("{path}.interval"),
        &h.interval,
        limits::HEALTH_INTERVAL,
    );
    HealthCheck {
        path: probe_path,
        method,
        interval,
        timeout: c.duration_in(&format!("{path}.timeout"), &h.timeout, limits::TIMEOUT),
        expected,
        healthy_threshold: c.count_in(
            &format!("{path}.healthy_threshold"),
            h.healthy_threshold,
            limits::THRESHOLD,
        ) as u32,
        unhealthy_threshold: c.count_in(
            &format!("{path}.unhealthy_threshold"),
            h.unhealthy_threshold,
            limits::THRESHOLD,
        ) as u32,
        jitter: c.duration(&format!("{path}.jitter"), &h.jitter),
        tcp: h.tcp,
    }
}

/// `routes[i].outlier`: passive ejection of failing endpoints.
fn outlier(c: &mut Problems, path: &str, o: &RawOutlier) -> OutlierConfig {
    c.unknown(path, &o.unknown);
    let pct = o.max_ejection_percent;
    if !(0..=100).contains(&pct) {
        c.err(
            format!("{path}.max_ejection_percent"),
            format!("must be from 0 to 100, got {pct}"),
        );
    }
    OutlierConfig {
        consecutive_5xx: c.count_in(
            &format!("{path}.consecutive_5xx"),
            o.consecutive_5xx,
            limits::CONSECUTIVE,
        ) as u32,
        consecutive_gateway_failures: c.count_in(
            &format!("{path}.consecutive_gateway_failures"),
            o.consecutive_gateway_failures,
            limits::CONSECUTIVE,
        ) as u32,
        base_ejection_time: c
            .duration(&format!("{path}.base_ejection_time"), &o.base_ejection_time),
        max_ejection_time: c.duration(&format!("{path}.max_ejection_time"), &o.max_ejection_time),
        max_ejection_percent: pct.clamp(0, 100) as u32,
    }
}
