//! Admin endpoints: `/live`, `/ready`, `/health`, `/status` (routes, services, endpoints),
//! `/metrics`, `/config` (redacted) and `/explain` (why a request goes where it goes). Served on
//! the admin listener; `/health` and `/status` also on the main listener unless turned off.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use http::header::{HeaderValue, ACCEPT, AUTHORIZATION, CONTENT_TYPE};
use http::{Method, Request, Response, StatusCode};
use serde_json::{json, Value};

use crate::balancer::Endpoint;
use crate::body::ClientBody;
use crate::control::reload::Reloader;
use crate::control::{ControlState, LiveService};
use crate::proxy::{json_response, ResponseBody};
use crate::server::AdminService;

/// The self-contained dashboard page (no external assets).
const DASHBOARD: &str = include_str!("admin/dashboard.html");

/// The admin service: admin views over the control state, behind an optional bearer token.
pub struct Admin {
    control: Arc<ControlState>,
    token: Option<String>,
    reloader: Option<Arc<Reloader>>,
}

impl Admin {
    /// `token`, when set, is required for everything but `/live`, `/ready` and `/dashboard`;
    /// `reloader` answers `POST /reload` when the gateway was started from a file.
    pub fn new(
        control: Arc<ControlState>,
        token: Option<String>,
        reloader: Option<Arc<Reloader>>,
    ) -> Self {
        Self {
            control,
            token,
            reloader,
        }
    }

    fn authorized<B>(&self, req: &Request<B>) -> bool {
        let Some(token) = &self.token else {
            return true;
        };
        let expected = format!("Bearer {token}");
        req.headers()
            .get(AUTHORIZATION)
            .is_some_and(|v| constant_time_eq(v.as_bytes(), expected.as_bytes()))
    }
}

impl AdminService for Admin {
    fn respond(&self, req: &Request<ClientBody>) -> Response<ResponseBody> {
        respond(self, req, None)
    }

    fn respond_with_body(&self, req: &Request<bytes::Bytes>) -> Response<ResponseBody> {
        respond(self, req, Some(req.body()))
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Answers an admin request (the admin listener's whole service).
fn respond<B>(admin: &Admin, req: &Request<B>, body: Option<&[u8]>) -> Response<ResponseBody> {
    let path = req.uri().path();
    let state = &*admin.control;
    match (req.method(), path) {
        (&Method::GET, "/live") => json_response(StatusCode::OK, &json!({"status": "alive"})),
        (&Method::GET, "/ready") => {
            if state.readiness.is_ready() {
                json_response(StatusCode::OK, &json!({"ready": true}))
            } else {
                // Why, when the mesh identity is what is missing (a 403 on the leaf, say).
                let mesh = state.mesh.load_full().filter(|m| !m.is_loaded()).map(|m| {
                    m.error()
                        .unwrap_or_else(|| "waiting for the mesh identity".into())
                });
                let body = match mesh {
                    Some(reason) => json!({"ready": false, "mesh": reason}),
                    None => json!({"ready": false}),
                };
                json_response(StatusCode::SERVICE_UNAVAILABLE, &body)
            }
        }
        // The page holds no data; its fetches carry the token (`?token=`).
        (&Method::GET, "/dashboard") => {
            let mut resp = Response::new(ResponseBody::full(DASHBOARD));
            resp.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static("text/html; charset=utf-8"),
            );
            resp.headers_mut()
                .insert("cache-control", HeaderValue::from_static("no-cache"));
            resp
        }
        _ if !admin.authorized(req) => {
            let mut resp = json_response(
                StatusCode::UNAUTHORIZED,
                &json!({"error": "Unauthorized", "message": "this admin endpoint needs Authorization: Bearer <MESHGATE_ADMIN_TOKEN>"}),
            );
            resp.headers_mut()
                .insert("www-authenticate", HeaderValue::from_static("Bearer"));
            resp
        }
        (&Method::GET, "/health") => json_response(StatusCode::OK, &health(state)),
        (&Method::GET, "/config") => json_response(StatusCode::OK, &config_view(state)),
        (&Method::GET, "/explain") => explain(state, req.uri().query()),
        (&Method::GET, "/metrics") => {
            let text = state
                .prometheus
                .get()
                .map(crate::control::prometheus::render)
                .unwrap_or_default();
            let mut resp = Response::new(ResponseBody::full(text));
            resp.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            resp
        }
        (&Method::POST, "/reload") => match &admin.reloader {
            None => json_response(
                StatusCode::CONFLICT,
                &json!({"error": "Conflict", "message": "this gateway was not started from a config file"}),
            ),
            Some(r) => match r.reload() {
                Ok(done) => json_response(
                    StatusCode::OK,
                    &json!({"reloaded": true, "restart_needed": done.restart_needed}),
                ),
                Err(e) => json_response(
                    StatusCode::BAD_REQUEST,
                    &json!({"reloaded": false, "error": "invalid configuration", "problems": e.problems()}),
                ),
            },
        },
        (&Method::POST, "/cache/purge") => cache_purge(state, body.unwrap_or_default()),
        (&Method::GET, "/status") => {
            let text = req
                .headers()
                .get(ACCEPT)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|a| a.contains("text/plain") && !a.contains("json"));
            if text {
                let mut resp = Response::new(ResponseBody::full(status_text(state)));
                resp.headers_mut().insert(
                    CONTENT_TYPE,
                    HeaderValue::from_static("text/plain; charset=utf-8"),
                );
                resp
            } else {
                json_response(StatusCode::OK, &status(state))
            }
        }
        _ => json_response(
            StatusCode::NOT_FOUND,
            &json!({"error": "Not Found", "message": "admin endpoints: /live /ready /health /status /metrics /config /explain?url=PATH /dashboard, POST /reload, POST /cache/purge"}),
        ),
    }
}

// === /cache/purge ===

/// `POST /cache/purge` with `{"route": NAME}`, `{"prefix": "/path"}` or `{"all": true}`:
/// removes stored answers and says how many.
fn cache_purge(state: &ControlState, body: &[u8]) -> Response<ResponseBody> {
    let bad = |message: &str| {
        json_response(
            StatusCode::BAD_REQUEST,
            &json!({"error": "Bad Request", "message": message}),
        )
    };
    let usage =
        "expected a JSON body: {\"route\": NAME}, {\"prefix\": \"/path\"} or {\"all\": true}";
    let Ok(Value::Object(req)) = serde_json::from_slice::<Value>(body) else {
        return bad(usage);
    };
    let table = state.proxy.table.load();
    let cached = table
        .routes()
        .iter()
        .filter_map(|r| r.cache.as_ref().map(|c| (r, c)));
    let purged: usize = match (req.get("route"), req.get("prefix"), req.get("all")) {
        (Some(Value::String(name)), None, None) => {
            if !table.routes().iter().any(|r| *r.name == **name) {
                return json_response(
                    StatusCode::NOT_FOUND,
                    &json!({"error": "Not Found", "message": format!("no route named {name:?}")}),
                );
            }
            cached
                .filter(|(r, _)| *r.name == **name)
                .map(|(_, c)| c.purge(None))
                .sum()
        }
        (None, Some(Value::String(prefix)), None) if prefix.starts_with('/') => {
            cached.map(|(_, c)| c.purge(Some(prefix))).sum()
        }
        (None, None, Some(Value::Bool(true))) => cached.map(|(_, c)| c.purge(None)).sum(),
        _ => return bad(usage),
    };
    json_response(StatusCode::OK, &json!({"purged": purged}))
}

// === /config ===

/// What replaces a secret in `/config`.
const REDACTED: &str = "<redacted>";

/// The `/config` document: the file as loaded (merged with `MESHGATE_*`), with secrets
/// redacted, plus settings resolved from the environment (trace export, the Consul address).
pub fn config_view(state: &ControlState) -> Value {
    let Some(config) = state.config.load_full() else {
        return json!({"config": null});
    };
    let mut file = serde_json::to_value(&*config.source).unwrap_or(Value::Null);
    redact(&mut file);
    let consul = config.discovery.consul.as_ref().map(|c| {
        json!({
            "address": c.address.as_str(),
            "token": c.token.as_ref().map(|_| REDACTED),
            "datacenter": c.datacenter,
            "warning": format!("{:?}", c.warning).to_ascii_lowercase(),
        })
    });
    json!({
        "config": file,
        "resolved": {
            "tracing": serde_json::to_value(&config.tracing).unwrap_or(Value::Null),
            "consul": consul,
            "admin_token": config.admin.token.as_ref().map(|_| REDACTED),
        },
    })
}

/// Replaces the values of keys that name secrets (tokens, passwords, API keys, cookies,
/// authorization headers) anywhere in the document. Paths to files (`*_file`) stay.
fn redact(v: &mut Value) {
    match v {
        Value::Object(map) => {
            for (k, v) in map.iter_mut() {
                if is_secret_key(k) && !v.is_null() {
                    *v = Value::String(REDACTED.to_owned());
                } else {
                    redact(v);
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(redact),
        _ => {}
    }
}

fn is_secret_key(k: &str) -> bool {
    let k = k.to_ascii_lowercase().replace('-', "_");
    if k.ends_with("_file") {
        return false;
    }
    [
        "token",
        "password",
        "secret",
        "api_key",
        "apikey",
        "authorization",
        "cookie",
    ]
    .iter()
    .any(|s| k.contains(s))
}

// === /explain ===

/// `GET /explain?url=PATH&method=GET`: the route the request would take (after
/// dot-normalisation), the endpoints that could serve it, and why each other one cannot.
fn explain(state: &ControlState, query: Option<&str>) -> Response<ResponseBody> {
    let bad = |message: String| {
        json_response(
            StatusCode::BAD_REQUEST,
            &json!({"error": "Bad Request", "message": message}),
        )
    };
    let params: Vec<(String, String)> = query
        .and_then(|q| reqwest::Url::parse(&format!("http://admin/?{q}")).ok())
        .map(|u| u.query_pairs().into_owned().collect())
        .unwrap_or_default();
    let param = |name: &str| {
        params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    let Some(url) = param("url") else {
        return bad("explain needs ?url=/some/path (a path or a full URL, percent-encoded) and optionally &method=GET".into());
    };
    let method = param("method").unwrap_or("GET").to_ascii_uppercase();
    if Method::from_bytes(method.as_bytes()).is_err() {
        return bad(format!("invalid method {method:?}"));
    }
    let uri: http::Uri = match url.parse() {
        Ok(u) => u,
        Err(e) => return bad(format!("invalid url {url:?}: {e}")),
    };
    let raw_path = match uri.path() {
        "" => "/",
        p => p,
    };
    let normalised = crate::rules::path::remove_dot_segments(raw_path);
    let path = normalised.as_deref().unwrap_or(raw_path);
    let request = json!({
        "method": method,
        "url": url,
        "path": raw_path,
        "normalised_path": path,
        "query": uri.query(),
    });
    let table = state.proxy.table.load();
    let Some(route) = table.find(path).cloned() else {
        return json_response(
            StatusCode::OK,
            &json!({
                "request": request,
                "route": null,
                "outcome": format!("no route matches {path}: the answer is 404"),
            }),
        );
    };
    drop(table);
    let snap = route.pool.snapshot();
    let settings = snap.settings();
    let panic = route.picker.in_panic(&snap);
    let mut candidates = Vec::new();
    let mut excluded = Vec::new();
    for ep in snap.list() {
        let s = &ep.state;
        let warning = ep.source.status == crate::discovery::InstanceStatus::Warning;
        let mut reasons = Vec::new();
        if ep.weight() == 0 {
            reasons.push(if warning {
                "weight 0: Consul health check warning, and the service's warning weight is 0"
                    .to_owned()
            } else {
                "weight 0".to_owned()
            });
        }
        if !s.is_healthy() {
            reasons.push("failed active health checks".to_owned());
        }
        if s.is_ejected() {
            let left = s.ejected_for().map_or(0.0, |d| d.as_secs_f64());
            reasons.push(format!(
                "ejected after consecutive failures ({left:.1}s left, ejection #{})",
                s.ejections()
            ));
        }
        let base = json!({
            "address": ep.authority.as_str(),
            "id": &*ep.source.id,
            "status": ep.source.status.as_str(),
            "weight": ep.weight(),
            "healthy": s.is_healthy(),
            "ejected": s.is_ejected(),
            "in_flight": s.in_flight(),
        });
        // Panic mode sends traffic to every endpoint with a weight, available or not.
        let eligible = reasons.is_empty() || (panic && ep.weight() > 0);
        if eligible {
            let share = s.ramp(settings.slow_start);
            let mut notes = Vec::new();
            if warning {
                notes.push(
                    "Consul health check warning: the weight is the service's warning weight"
                        .to_owned(),
                );
            }
            if share < 1.0 {
                notes.push(format!(
                    "slow start: {:.0}% of its weight for now",
                    share * 100.0
                ));
            }
            if !reasons.is_empty() {
                notes.push(format!(
                    "panic mode: takes traffic although {}",
                    reasons.join(", ")
                ));
            }
            let mut c = base;
            c["share"] = json!((share * 1000.0).round() / 1000.0);
            c["effective_weight"] =
                json!((f64::from(ep.weight()) * share * 1000.0).round() / 1000.0);
            c["notes"] = json!(notes);
            candidates.push(c);
        } else {
            let mut x = base;
            x["reasons"] = json!(reasons);
            excluded.push(x);
        }
    }
    let not_in_pool: Vec<Value> = state
        .services
        .load()
        .get(route.pool.name())
        .and_then(|e| e.sync.as_ref())
        .map(|sync| {
            sync.excluded()
                .iter()
                .map(|x| serde_json::to_value(x).unwrap_or(Value::Null))
                .collect()
        })
        .unwrap_or_default();
    let upstream_path = crate::rules::path::rewrite_path(path, &route.rewrite);
    let rate_limit = route.rate_limiter().map(|l| {
        let mut v = l.describe();
        v["answers"] = json!(
            "429 with Retry-After when the bucket of the request's key is empty; 400 when a key part is missing and required is set"
        );
        if let Some(d) = l.peek_route(&route.name) {
            v["bucket_now"] = json!({
                "remaining": d.remaining,
                "retry_after_s": crate::ratelimit::ceil_secs(d.retry_after),
            });
        }
        v
    });
    let limited = route
        .rate_limiter()
        .and_then(|l| l.peek_route(&route.name))
        .filter(|d| !d.allowed);
    let cache = route
        .cache
        .as_deref()
        .map(|c| explain_cache(c, &method, &uri, path));
    let cache_hit = cache
        .as_ref()
        .and_then(|c| c["decision"].as_str())
        .is_some_and(|d| d.starts_with("HIT"));
    let outcome = if let Some(d) = limited {
        format!(
            "the rate_limit stage answers: the route's bucket ({}) is empty, so the answer is 429 with Retry-After: {}",
            route.rate_limiter().map_or("", |l| &*l.settings().name),
            crate::ratelimit::ceil_secs(d.retry_after).max(1)
        )
    } else if cache_hit {
        "answered by the cache stage from a fresh stored answer (X-Cache: HIT); not forwarded"
            .to_owned()
    } else if candidates.is_empty() {
        format!(
            "no endpoint of service {} can take it: the answer is 503",
            route.pool.name()
        )
    } else {
        format!(
            "forwarded to one of {} endpoint(s) of service {} ({})",
            candidates.len(),
            route.pool.name(),
            route.picker.policy().name()
        )
    };
    json_response(
        StatusCode::OK,
        &json!({
            "request": request,
            "route": {
                "name": &*route.name,
                "path": route.path,
                "service": &**route.pool.name(),
                "load_balancer": route.picker.policy().name(),
                "upstream_path": upstream_path,
                "timeout_ms": route.timeout.as_millis() as u64,
                "retry_attempts": route.retry.attempts,
                "stages": route.pipeline.names().collect::<Vec<_>>(),
                "rate_limit": rate_limit,
                "mesh": route.mesh.as_ref().map(|m| json!({
                    "identity": m.identity().service,
                    "expects": m.expected_id(),
                })),
                "cache": cache,
            },
            "pool": {
                "endpoints": snap.len(),
                "available": snap.available(),
                "panic_threshold": route.picker.panic_threshold(),
                "panic_mode": panic,
                "slow_start_ms": settings.slow_start.as_millis() as u64,
            },
            "outcome": outcome,
            "auth": auth_json(&route, true),
            "candidates": candidates,
            "excluded": excluded,
            "not_in_pool": not_in_pool,
        }),
    )
}

/// A route's `auth` for `/status` (counts) and `/explain` (what passes, the last refusal and
/// why). Never a credential: settings describe themselves without secrets.
fn auth_json(route: &crate::proxy::Route, explain: bool) -> Value {
    use crate::auth::Refusal;
    let Some(a) = &route.auth else {
        return Value::Null;
    };
    let c = &route.metrics.auth;
    let mut refused = serde_json::Map::new();
    for r in Refusal::ALL {
        let n = c.refused[r.index()].load(std::sync::atomic::Ordering::Relaxed);
        if n > 0 {
            refused.insert(r.label().into(), json!(n));
        }
    }
    let mut out = json!({
        "method": a.kind(),
        "allowed": c.allowed.load(std::sync::atomic::Ordering::Relaxed),
        "refused": refused,
    });
    if let crate::auth::AuthSettings::Jwt(j) = a {
        if let crate::auth::jwt::KeySource::Remote(r) = &j.keys {
            out["jwks"] = json!({
                "url": r.url().as_str(),
                "keys": r.loaded().map(|(n, _)| n),
                "age_s": r.loaded().map(|(_, age)| age.as_secs()),
            });
        }
    }
    if explain {
        out["requires"] = json!(a.requirement());
        out["answers"] = json!(
            "the auth stage runs first: without valid credentials the gateway answers 401 (400 for unreadable ones, 403 for a valid identity the route's claims refuse, 503 when keys or the auth service are unreachable) and nothing reaches the upstream"
        );
        let last = c.last_refusal.load(std::sync::atomic::Ordering::Relaxed);
        if let Some(r) = last.checked_sub(1).and_then(|i| Refusal::ALL.get(i)) {
            out["last_refusal"] = json!(r.label());
            out["last_refusal_message"] = json!(r.message());
        }
    }
    out
}

/// A route's cache in `/status`: its settings and what it did.
fn cache_json(c: &crate::cache::Cache) -> Value {
    use std::sync::atomic::Ordering::Relaxed;
    let s = c.settings();
    let n = &c.counters;
    json!({
        "max_size": s.max_size,
        "max_object_size": s.max_object_size,
        "default_ttl_ms": s.default_ttl.as_millis() as u64,
        "stale_while_revalidate_ms": s.stale_while_revalidate.as_millis() as u64,
        "stale_if_error_ms": s.stale_if_error.as_millis() as u64,
        "entries": c.entries(),
        "bytes": c.bytes(),
        "hits": n.hits.load(Relaxed),
        "misses": n.misses.load(Relaxed),
        "stale": n.stale.load(Relaxed),
        "bypass": n.bypass.load(Relaxed),
        "stored": n.stored.load(Relaxed),
        "revalidated": n.revalidated.load(Relaxed),
        "invalidated": n.invalidated.load(Relaxed),
    })
}

/// What the route's cache would do with the explained request (no request headers: `Vary`
/// and `Authorization` are not considered).
fn explain_cache(c: &crate::cache::Cache, method: &str, uri: &http::Uri, path: &str) -> Value {
    let method = Method::from_bytes(method.as_bytes()).unwrap_or(Method::GET);
    let host = uri
        .authority()
        .and_then(|a| HeaderValue::from_str(a.as_str()).ok());
    let decision = if method != Method::GET && method != Method::HEAD {
        if matches!(method, Method::OPTIONS | Method::TRACE | Method::CONNECT) {
            "BYPASS: only GET and HEAD are answered from the cache".to_owned()
        } else {
            "BYPASS: an unsafe method; a successful answer removes this URL's stored answers"
                .to_owned()
        }
    } else if host.is_none() && c.settings().key.contains(&crate::cache::KeyPart::Host) {
        "unknown: the cache key includes the host; explain a full URL (http://host/path)".to_owned()
    } else {
        let key = c.key(
            &method,
            host.as_ref(),
            path,
            uri.query(),
            &http::HeaderMap::new(),
        );
        let now = tokio::time::Instant::now();
        match c.peek(&key) {
            Some(e) if e.is_fresh(now) => format!(
                "HIT: answered by the cache stage, a fresh answer is stored (age {}s of {}s)",
                e.age(now).as_secs(),
                e.fresh.lifetime.as_secs()
            ),
            Some(e) if e.serves_while_revalidating(now) => format!(
                "STALE or revalidation: the stored answer is {}s past its lifetime; one request revalidates it upstream, others get it stale",
                e.staleness(now).as_secs()
            ),
            Some(_) => "MISS: the stored answer is stale; the request is sent upstream (with its validators when it has them)".to_owned(),
            None => "MISS: nothing stored for this URL; the request is sent upstream and its answer stored if the rules allow".to_owned(),
        }
    };
    json!({ "settings": cache_json(c), "decision": decision })
}

fn rate(part: u64, total: u64) -> f64 {
    if total == 0 {
        0.0
    } else {
        ((part as f64 / total as f64) * 10_000.0).round() / 10_000.0
    }
}

fn endpoint_json(ep: &Endpoint) -> Value {
    let s = &ep.state;
    let (req, fail) = (s.requests(), s.failures());
    json!({
        "address": ep.authority.as_str(),
        "id": &*ep.source.id,
        "weight": ep.weight(),
        "status": ep.source.status.as_str(),
        "healthy": s.is_healthy(),
        "ejected": s.is_ejected(),
        "ejections": s.ejections(),
        "available": ep.is_available(),
        "excluded_because": ep.exclusion(),
        "in_flight": s.in_flight(),
        "requests": req,
        "failures": fail,
        "success_rate": if req == 0 { 1.0 } else { 1.0 - rate(fail, req) },
        "failure_rate": rate(fail, req),
    })
}

fn service_json(entry: &LiveService) -> Value {
    let pool = &entry.pool;
    let snap = pool.snapshot();
    let discovery = match &entry.sync {
        Some(sync) => serde_json::to_value(sync.snapshot()).unwrap_or(Value::Null),
        None => Value::Null,
    };
    json!({
        "name": &**pool.name(),
        "source": entry.source,
        "discovery": discovery,
        "probed": entry.probed,
        "revision": pool.revision(),
        "endpoints_total": snap.len(),
        "endpoints_available": snap.available(),
        "endpoints": snap.list().iter().map(|e| endpoint_json(e)).collect::<Vec<_>>(),
    })
}

fn latency_ms(h: &crate::metrics::Histogram) -> Value {
    let ms = |q| h.quantile(q).map(|s| (s * 1e5).round() / 100.0);
    match (ms(0.5), ms(0.99)) {
        (Some(p50), Some(p99)) => json!({"p50": p50, "p99": p99}),
        _ => Value::Null,
    }
}

/// The `/health` document: overall status plus request counts and rates per route and endpoint.
pub fn health(state: &ControlState) -> Value {
    let table = state.proxy.table.load();
    let mut degraded = false;
    let routes: Vec<Value> = table
        .routes()
        .iter()
        .map(|r| {
            let available = r.pool.snapshot().available();
            degraded |= available == 0;
            let (req, fail) = (r.requests(), r.failures());
            json!({
                "name": &*r.name,
                "path": r.path,
                "service": &**r.pool.name(),
                "healthy": available > 0,
                "requests": req,
                "failures": fail,
                "success_rate": if req == 0 { 1.0 } else { 1.0 - rate(fail, req) },
                "failure_rate": rate(fail, req),
                "latency_ms": latency_ms(&r.metrics.latency),
            })
        })
        .collect();
    json!({
        "status": if degraded { "degraded" } else { "healthy" },
        "ready": state.readiness.is_ready(),
        "uptime_seconds": state.readiness.uptime().as_secs(),
        "routes": routes,
        "services": state.services.load().values().map(|p| service_json(p)).collect::<Vec<_>>(),
    })
}

/// The `/status` document: routes with their settings, and every service's endpoints.
pub fn status(state: &ControlState) -> Value {
    let table = state.proxy.table.load();
    let routes: Vec<Value> = table
        .routes()
        .iter()
        .map(|r| {
            json!({
                "name": &*r.name,
                "path": r.path,
                "service": &**r.pool.name(),
                "load_balancer": r.picker.policy().name(),
                "rewrite": r.rewrite.iter().map(|w| format!("{w:?}")).collect::<Vec<_>>(),
                "timeout_ms": r.timeout.as_millis() as u64,
                "preserve_host": r.preserve_host,
                "rate_limit": r.rate_limiter().map(|l| {
                    let m = &r.metrics.rate_limit;
                    let mut v = l.describe();
                    v["allowed"] = json!(m.allowed.load(Ordering::Relaxed));
                    v["limited"] = json!(m.limited.load(Ordering::Relaxed));
                    v["missing_key"] = json!(m.missing_key.load(Ordering::Relaxed));
                    v
                }),
                "auth": auth_json(r, false),
                "cache": r.cache.as_deref().map(cache_json),
            })
        })
        .collect();
    json!({
        "ready": state.readiness.is_ready(),
        "workers": state.serving_threads.load(Ordering::Relaxed),
        "routes": routes,
        "services": state.services.load().values().map(|p| service_json(p)).collect::<Vec<_>>(),
        "notes": &**state.notes.load(),
        "mesh": state.mesh.load_full().map(|m| m.status()),
        "registration": state.registration.load().as_ref().map(|r| r.to_json()),
    })
}

fn status_text(state: &ControlState) -> String {
    let mut out = String::new();
    let table = state.proxy.table.load();
    let _ = writeln!(out, "routes:");
    for r in table.routes() {
        let _ = writeln!(
            out,
            "  {:<16} {:<24} -> {} ({})",
            r.name,
            r.path,
            r.pool.name(),
            r.picker.policy().name()
        );
    }
    let _ = writeln!(out, "services:");
    for entry in state.services.load().values() {
        let p = &entry.pool;
        let snap = p.snapshot();
        let _ = writeln!(
            out,
            "  {} ({} of {} available)",
            p.name(),
            snap.available(),
            snap.len()
        );
        for e in snap.list() {
            let _ = writeln!(
                out,
                "    {:<24} weight={} status={} healthy={} in_flight={} requests={} failures={}",
                e.authority.as_str(),
                e.weight(),
                e.source.status.as_str(),
                e.state.is_healthy(),
                e.state.in_flight(),
                e.state.requests(),
                e.state.failures()
            );
        }
    }
    out
}

/// True when `addr` is only reachable from this machine.
pub fn is_loopback(addr: &SocketAddr) -> bool {
    addr.ip().is_loopback()
}
