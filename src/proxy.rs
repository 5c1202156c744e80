//! The request path: route, pick, forward, respond. Errors become responses here, once.

pub mod auth;
pub mod body;
pub mod cache;
pub mod client;
pub mod error;
pub mod forward;
pub mod mesh;
pub mod pipeline;
pub mod pool;
pub mod ratelimit;
pub mod route;
pub mod settings;
pub mod stages;
pub mod upgrade;

use std::net::SocketAddr;
use std::sync::Arc;

use arc_swap::{ArcSwap, ArcSwapOption};
use http::header::{HeaderValue, CONTENT_TYPE, ORIGIN};
use http::{Request, Response, StatusCode};

use crate::body::ClientBody;
use crate::error::Chain;
use crate::metrics::GlobalMetrics;
use crate::rules::cors::CorsConfig;
use crate::rules::head;
use crate::rules::headers;
use crate::rules::path::{normalise_path, LivePathRules};
use crate::telemetry::{self, BodyTap, RequestLog};
pub use body::ResponseBody;
use client::UpstreamClient;
pub use error::ProxyError;
use pipeline::{Exchange, Flow};
pub use route::{ErrorHandler, Route, RouteTable};

/// Everything the request path reads. Swapped parts are `ArcSwap`s; nothing here is locked.
pub struct ProxyState {
    /// The route table; replaced whole on reload.
    pub table: ArcSwap<RouteTable>,
    /// Upstream connection pool.
    pub client: UpstreamClient,
    /// Pooled HTTP/1.1 to plain-HTTP endpoints with IP addresses (the common case).
    pub http1: pool::Http1Pool,
    /// Global CORS policy; replaced on reload.
    pub cors: ArcSwapOption<CorsConfig>,
    /// Gateway-wide counters.
    pub metrics: GlobalMetrics,
    /// Upgraded (WebSocket) connections, for shutdown.
    pub upgrades: upgrade::Upgrades,
    /// Request spans and the access log (fixed at build).
    pub telemetry: telemetry::RequestTelemetry,
    /// `server.escaped_slashes` and `server.merge_slashes`; replaced on reload.
    pub path_rules: LivePathRules,
    /// `server.trusted_proxies`; replaced on reload.
    pub trusted_proxies: ArcSwap<crate::ratelimit::TrustedProxies>,
}

/// Requests the gateway answers itself before routing. The server decides which (admin's
/// `/health` and `/status` on the main listener when exposed); the request path only asks.
pub trait LocalAnswer: Send + Sync {
    /// The answer to `req` when it is not for a route.
    fn answer(&self, req: &Request<ClientBody>) -> Option<Response<ResponseBody>>;
}

/// Handles one downstream request. Never fails: every error becomes a response.
pub async fn handle(
    state: &Arc<ProxyState>,
    req: Request<ClientBody>,
    client: SocketAddr,
    proto: &'static str,
    local: &dyn LocalAnswer,
) -> Response<ResponseBody> {
    // A guard, so a request whose client went away (future dropped) is uncounted too.
    struct InFlight<'a>(&'a std::sync::atomic::AtomicI64);
    impl Drop for InFlight<'_> {
        fn drop(&mut self) {
            self.0.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        }
    }
    state
        .metrics
        .in_flight
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let _in_flight = InFlight(&state.metrics.in_flight);
    handle_inner(state, req, client, proto, local).await
}

async fn handle_inner(
    state: &Arc<ProxyState>,
    mut req: Request<ClientBody>,
    client: SocketAddr,
    proto: &'static str,
    local: &dyn LocalAnswer,
) -> Response<ResponseBody> {
    let started = tokio::time::Instant::now();
    let peer = client.ip();
    // The client behind trusted proxies, for everything after this point: the span, the access
    // log, `ip_hash`, rate-limit keys and the `X-Forwarded-For` sent upstream.
    let client = {
        let trusted = state.trusted_proxies.load();
        if trusted.is_empty() {
            client
        } else {
            let r = trusted.client(peer, req.headers());
            crate::ratelimit::client_ip::keep_trusted_chain(req.headers_mut(), r.kept);
            match r.kept {
                0 => client,
                // The port of a forwarded client is unknown.
                _ => SocketAddr::new(r.client, 0),
            }
        }
    };
    let request_id = headers::request_id(req.headers());
    let obs = &state.telemetry;
    let (span, traceparent) = obs.server_span(&req, client);
    if let Some(tp) = traceparent {
        req.headers_mut().insert(telemetry::TRACEPARENT.clone(), tp);
    }
    let mut log = obs
        .access_log()
        .map(|_| RequestLog::start(&req, client, started, &request_id));
    let cors = state.cors.load();
    let origin = match &*cors {
        Some(_) => req.headers().get(ORIGIN).cloned(),
        None => None,
    };
    let mut resp = match &*cors {
        Some(cors) if CorsConfig::is_preflight(&req) => {
            let mut resp = Response::new(ResponseBody::empty());
            *resp.status_mut() = StatusCode::NO_CONTENT;
            cors.preflight(origin.as_ref(), resp.headers_mut());
            resp
        }
        _ => {
            let down = Downstream {
                client,
                peer,
                proto,
                local,
                request_id: &request_id,
                span: &span,
            };
            let mut resp = route_request(state, req, &down, log.as_mut()).await;
            if let Some(cors) = &*cors {
                cors.decorate(origin.as_ref(), resp.headers_mut());
            }
            resp
        }
    };
    resp.headers_mut()
        .insert(headers::X_REQUEST_ID.clone(), request_id);
    telemetry::record_status(&span, resp.status());
    match BodyTap::new(obs, span, log, resp.status()) {
        Some(tap) => resp.map(|b| b.with_tap(tap)),
        None => resp,
    }
}

/// What the listener and the edge steps know about a request before it is routed.
struct Downstream<'a> {
    client: SocketAddr,
    peer: std::net::IpAddr,
    proto: &'static str,
    local: &'a dyn LocalAnswer,
    request_id: &'a HeaderValue,
    span: &'a tracing::Span,
}

async fn route_request(
    state: &Arc<ProxyState>,
    mut req: Request<ClientBody>,
    down: &Downstream<'_>,
    mut log: Option<&mut RequestLog>,
) -> Response<ResponseBody> {
    let Downstream {
        client,
        peer,
        proto,
        local,
        request_id,
        span,
    } = *down;
    // Before anything else reads the head: the one host, and framing nobody can read two ways.
    let host = match head::validate(req.version(), req.uri(), req.headers()) {
        Ok(host) => host,
        Err(source) => {
            tracing::debug!(error = %Chain(&source), "request head refused");
            return error_response(&ProxyError::InvalidHead { source }, None, request_id);
        }
    };
    if let Some(resp) = local.answer(&req) {
        return resp;
    }
    // The path outlives `req` (moved upstream below): a clone of the URI's path is a reference
    // count, so only a path that had something to normalise is a new string.
    let uri_path = req.uri().path_and_query().cloned();
    let rules = state.path_rules.load();
    let path = match normalise_path(
        uri_path.as_ref().map_or("", |pq| pq.path()),
        rules.escaped_slashes,
        rules.merge_slashes,
    ) {
        Ok(path) => path,
        Err(source) => {
            tracing::debug!(error = %Chain(&source), "request path refused");
            return error_response(&ProxyError::InvalidPath { source }, None, request_id);
        }
    };
    let table = state.table.load();
    let Some(route) = table.find(&path).cloned() else {
        state
            .metrics
            .no_route
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = path.into_owned();
        return error_response(&ProxyError::NoRoute { path }, None, request_id);
    };
    drop(table);
    telemetry::record_route(span, req.method(), &route.path, &route.name);
    if let Some(log) = log.as_deref_mut() {
        log.route = Some(route.name.clone());
        log.service = Some(route.pool.name().clone());
    }
    let started = tokio::time::Instant::now();
    // Only a WebSocket upgrade travels, and only where the route allows it; any other
    // `Upgrade` is removed here, so no upstream can answer it with a tunnel.
    let upgrade = head::filter_upgrade(req.version(), req.headers_mut(), route.websocket)
        .then(|| hyper::upgrade::on(&mut req));
    let (head, body) = req.into_parts();
    let method = head.method.clone();
    // A path that needed no normalising goes upstream as the client sent it, query and all:
    // the same bytes, so no new target is parsed or allocated.
    let upstream_path = match &path {
        std::borrow::Cow::Borrowed(_) => uri_path.clone(),
        std::borrow::Cow::Owned(_) => None,
    };
    let mut ex = Exchange {
        head,
        path: &path,
        upstream_path,
        client: client.ip(),
        peer,
        host,
        proto,
        request_id,
        upgrade,
        upgrades: &state.upgrades,
        deadline: started + route.timeout,
        permit: None,
        span,
        log,
        api_key: None,
        jwt_claims: None,
        rate_limit: None,
    };
    let result = match route.pipeline.request(&mut ex).await {
        Ok((Flow::Next, ran)) => {
            match forward::forward(&state.client, &state.http1, &route, &mut ex, body).await {
                Ok(resp) => Ok((resp, ran)),
                // A stage may answer instead (a stale cached copy); the failure is still logged.
                Err(e) => match route.pipeline.recover(&ex, ran, &e) {
                    Some(answer) => {
                        let entered = span.enter();
                        log_error(&e, &route);
                        drop(entered);
                        Ok(answer)
                    }
                    None => Err(e),
                },
            }
        }
        Ok((Flow::Answer(resp), ran)) => Ok((resp, ran)),
        Ok((Flow::Detach(resp), ran)) => {
            // Only a request without a body can go on alone: the body belongs to the client's
            // connection. One with a body is answered and not carried on (a stage detaches only
            // to refresh, which the next request can do).
            if hyper::body::Body::is_end_stream(&body) {
                detach(state, &route, &mut ex, body, ran);
            }
            Ok((resp, ran))
        }
        Err(e) => Err(e),
    };
    match result {
        Ok((mut resp, ran)) => {
            route.record(resp.status().is_server_error());
            route
                .metrics
                .record(&method, resp.status().as_u16(), started.elapsed());
            route.pipeline.response(&ex, ran, &mut resp);
            resp
        }
        Err(e) => {
            route.record(!e.is_client_fault());
            // Inside the request's span, so a traced request carries its failure as an event.
            let entered = span.enter();
            log_error(&e, &route);
            drop(entered);
            let resp = error_response(&e, Some(&route), request_id);
            route
                .metrics
                .record(&method, resp.status().as_u16(), started.elapsed());
            resp
        }
    }
}

const BACKGROUND_READ_LIMIT: std::time::Duration = std::time::Duration::from_secs(60);

/// Carries a request a stage answered with `Flow::Detach` on in a task of its own: the stages
/// after `stage`, forwarding, and their response phase; the answer is read to its end (so a
/// cache stores it) and dropped. The client's exchange keeps what the earlier stages need.
fn detach(
    state: &Arc<ProxyState>,
    route: &Arc<Route>,
    ex: &mut Exchange<'_>,
    body: ClientBody,
    stage: usize,
) {
    let mut head = Request::new(()).into_parts().0;
    head.method = ex.head.method.clone();
    head.uri = ex.head.uri.clone();
    head.version = ex.head.version;
    head.headers = ex.head.headers.clone();
    head.extensions = std::mem::take(&mut ex.head.extensions);
    let path = ex.path.to_owned();
    let request_id = ex.request_id.clone();
    let (client, peer, host, proto) = (ex.client, ex.peer, ex.host.clone(), ex.proto);
    let (api_key, jwt_claims) = (ex.api_key.clone(), ex.jwt_claims.clone());
    let state = state.clone();
    let route = route.clone();
    tokio::spawn(async move {
        let span = tracing::Span::none();
        let mut ex = Exchange {
            head,
            path: &path,
            upstream_path: None,
            client,
            peer,
            host,
            proto,
            request_id: &request_id,
            upgrade: None,
            upgrades: &state.upgrades,
            deadline: tokio::time::Instant::now() + route.timeout,
            permit: None,
            span: &span,
            log: None,
            api_key,
            jwt_claims,
            rate_limit: None,
        };
        let answer = match route.pipeline.request_from(stage + 1, &mut ex).await {
            Ok((Flow::Next, ran)) => {
                forward::forward(&state.client, &state.http1, &route, &mut ex, body)
                    .await
                    .map(|resp| (resp, ran))
            }
            Ok((Flow::Answer(resp) | Flow::Detach(resp), ran)) => Ok((resp, ran)),
            Err(e) => Err(e),
        };
        match answer {
            Ok((mut resp, ran)) => {
                route.pipeline.response_of(&ex, stage..ran, &mut resp);
                // Read and dropped frame by frame: an answer too large to store keeps memory flat.
                let mut body = resp.into_body();
                let read = async {
                    while let Some(Ok(_)) = http_body_util::BodyExt::frame(&mut body).await {}
                };
                // Nobody waits for it: the route's stream limit, else a minute, bounds it.
                let limit = route.stream_timeout.unwrap_or(BACKGROUND_READ_LIMIT);
                if tokio::time::timeout(limit, read).await.is_err() {
                    tracing::debug!(route = %route.name, "background answer cut off: too slow");
                }
            }
            Err(e) => log_error(&e, &route),
        }
    });
}

fn log_error(e: &ProxyError, route: &Route) {
    match e {
        // Once per route and minute: every request would repeat it while the intention is missing.
        ProxyError::MeshDenied { .. } => {
            if route.mesh.as_ref().is_some_and(|m| m.denial_log_due()) {
                tracing::warn!(route = %route.name, service = %route.pool.name(), error = %Chain(e), "mesh denied the gateway (logged once a minute per route)")
            }
        }
        ProxyError::NoRoute { .. }
        | ProxyError::BodyTooLarge { .. }
        | ProxyError::InvalidRequest { .. }
        | ProxyError::InvalidHead { .. }
        | ProxyError::InvalidPath { .. }
        | ProxyError::ClientBody { .. }
        | ProxyError::ClientTimeout { .. }
        | ProxyError::RateLimited(_)
        | ProxyError::RateLimitKeyMissing { .. }
        | ProxyError::AuthRefused { .. } => {
            tracing::debug!(route = %route.name, error = %Chain(e), "request refused")
        }
        ProxyError::NoEndpoint { .. } | ProxyError::Overloaded { .. } => {
            tracing::debug!(route = %route.name, error = %Chain(e), "no endpoint")
        }
        ProxyError::Connect { .. }
        | ProxyError::UpstreamTimeout { .. }
        | ProxyError::UnexpectedUpgrade { .. }
        | ProxyError::MeshUnavailable { .. }
        | ProxyError::MeshCertExpired { .. }
        | ProxyError::AuthUnavailable { .. }
        | ProxyError::Upstream { .. } => {
            tracing::warn!(route = %route.name, service = %route.pool.name(), error = %Chain(e), "proxy failed")
        }
    }
}

/// The answer for a gateway error: the route's handler or page when set, else the JSON default.
/// An authentication refusal carries its `WWW-Authenticate` challenge either way.
pub fn error_response(
    e: &ProxyError,
    route: Option<&Route>,
    request_id: &HeaderValue,
) -> Response<ResponseBody> {
    let mut resp = error_body(e, route, request_id);
    // A refusal by the rate limit says when to come back, whoever wrote the body.
    if let ProxyError::RateLimited(r) = e {
        let secs = crate::ratelimit::ceil_secs(r.retry_after).max(1);
        let h = resp.headers_mut();
        h.insert(http::header::RETRY_AFTER, HeaderValue::from(secs));
        h.insert(ratelimit::RATELIMIT_POLICY.clone(), r.policy.clone());
        h.insert(ratelimit::RATELIMIT.clone(), r.state.clone());
    }
    if let ProxyError::AuthRefused {
        challenge: Some(c), ..
    } = e
    {
        resp.headers_mut()
            .insert(http::header::WWW_AUTHENTICATE, c.clone());
    }
    resp
}

fn error_body(
    e: &ProxyError,
    route: Option<&Route>,
    request_id: &HeaderValue,
) -> Response<ResponseBody> {
    if let Some(route) = route {
        if let Some(custom) = route.error_handler.as_ref().and_then(|h| h(e)) {
            return custom.map(ResponseBody::full);
        }
        if let Some(page) = &route.error {
            let mut resp = Response::new(ResponseBody::full(page.body.clone()));
            // The page's body, but a refusal by the rate limit stays a 429, and one by `auth`
            // its 401 or 403: a client must not read either as something else.
            *resp.status_mut() = match e {
                ProxyError::RateLimited(_) | ProxyError::AuthRefused { .. } => e.status(),
                _ => page.status.unwrap_or_else(|| e.status()),
            };
            resp.headers_mut()
                .insert(CONTENT_TYPE, page.content_type.clone());
            return resp;
        }
    }
    let status = e.status();
    let retry_after = matches!(
        e,
        ProxyError::Overloaded { .. }
            | ProxyError::NoEndpoint { .. }
            | ProxyError::AuthUnavailable { .. }
    );
    let body = serde_json::json!({
        "error": status.canonical_reason().unwrap_or("Error"),
        "message": e.message(),
        "request_id": request_id.to_str().unwrap_or(""),
    });
    let mut resp = json_response(status, &body);
    if retry_after {
        resp.headers_mut()
            .insert(http::header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    resp
}

/// A JSON answer made by the gateway.
pub fn json_response(status: StatusCode, body: &serde_json::Value) -> Response<ResponseBody> {
    let mut resp = Response::new(ResponseBody::full(body.to_string()));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}
