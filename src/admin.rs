//! Admin endpoints: `/live`, `/ready`, `/health` (the seed's per-endpoint monitoring numbers)
//! and `/status` (routes, services, endpoints). Served on the admin listener and, unless turned
//! off, `/health` and `/status` on the main listener too.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use http::header::{HeaderValue, ACCEPT, AUTHORIZATION, CONTENT_TYPE};
use http::{Method, Request, Response, StatusCode};
use serde_json::{json, Value};
use tokio::time::Instant;

use crate::balancer::Endpoint;
use crate::discovery::registry::ServiceEntry;
use crate::proxy::{json_response, ProxyState, ResponseBody};

/// The self-contained dashboard page (no external assets).
const DASHBOARD: &str = include_str!("admin/dashboard.html");

/// Readiness and uptime. Readiness starts false and is set once discovery has synced; it goes
/// false again first thing on shutdown so load balancers stop sending before we stop accepting.
#[derive(Debug)]
pub struct AdminState {
    ready: AtomicBool,
    shutting_down: AtomicBool,
    started: Instant,
    token: Option<String>,
}

impl AdminState {
    /// Not ready yet; `token`, when set, is required for everything but `/live` and `/ready`.
    pub fn new(token: Option<String>) -> Self {
        Self {
            ready: AtomicBool::new(false),
            shutting_down: AtomicBool::new(false),
            started: Instant::now(),
            token,
        }
    }

    /// Marks the gateway ready or not; once shutdown began it stays not ready.
    pub fn set_ready(&self, ready: bool) {
        let ready = ready && !self.shutting_down.load(Ordering::SeqCst);
        self.ready.store(ready, Ordering::SeqCst);
    }

    /// First step of shutdown: readiness fails from now on.
    pub fn begin_shutdown(&self) {
        self.shutting_down.store(true, Ordering::SeqCst);
        self.ready.store(false, Ordering::SeqCst);
    }

    /// Whether `/ready` answers 200.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
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

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Answers an admin request (the admin listener's whole service).
pub fn respond<B>(state: &ProxyState, req: &Request<B>) -> Response<ResponseBody> {
    let path = req.uri().path();
    let admin = &state.admin;
    match (req.method(), path) {
        (&Method::GET, "/live") => json_response(StatusCode::OK, &json!({"status": "alive"})),
        (&Method::GET, "/ready") => {
            if admin.is_ready() {
                json_response(StatusCode::OK, &json!({"ready": true}))
            } else {
                json_response(StatusCode::SERVICE_UNAVAILABLE, &json!({"ready": false}))
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
        (&Method::GET, "/metrics") => {
            let text = state
                .registry
                .get()
                .map(crate::metrics::render)
                .unwrap_or_default();
            let mut resp = Response::new(ResponseBody::full(text));
            resp.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            resp
        }
        (&Method::POST, "/reload") => match state.reloader.get() {
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
            &json!({"error": "Not Found", "message": "admin endpoints: /live /ready /health /status"}),
        ),
    }
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

fn service_json(entry: &ServiceEntry) -> Value {
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
pub fn health(state: &ProxyState) -> Value {
    let table = state.table.load();
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
        "ready": state.admin.is_ready(),
        "uptime_seconds": state.admin.started.elapsed().as_secs(),
        "routes": routes,
        "services": state.services.load().values().map(|p| service_json(p)).collect::<Vec<_>>(),
    })
}

/// The `/status` document: routes with their settings, and every service's endpoints.
pub fn status(state: &ProxyState) -> Value {
    let table = state.table.load();
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
            })
        })
        .collect();
    json!({
        "ready": state.admin.is_ready(),
        "routes": routes,
        "services": state.services.load().values().map(|p| service_json(p)).collect::<Vec<_>>(),
        "notes": &**state.notes.load(),
    })
}

fn status_text(state: &ProxyState) -> String {
    let mut out = String::new();
    let table = state.table.load();
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

/// Shared handle type for the admin state.
pub type SharedAdmin = Arc<AdminState>;
