//! Forwarding one request upstream: endpoint pick, upstream request, timeouts, and retries on
//! another endpoint when the policy and the request's safety allow.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderName, HOST};
use http::uri::PathAndQuery;
use http::{Request, Response, StatusCode, Uri, Version};
use hyper::body::Incoming;
use tokio::time::Instant;

use super::body::ResponseBody;
use super::client::UpstreamClient;
use super::error::{ProxyError, UpstreamError};
use super::pipeline::Exchange;
use super::pool::{Http1Pool, Reuse};
use super::route::Route;
use super::stages::path_and_query;
use crate::balancer::{Endpoint, Lease, Outcome};
use crate::body::{BodyEnd, ClientBody, RequestBody};
use crate::rules::head::switches_to_websocket;
use crate::rules::headers;
use crate::rules::retry::{is_idempotent, RetryGuard};
use crate::telemetry;

static IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");

/// The request body as the retry loop sees it.
enum Payload {
    /// Whole in memory: every attempt can send it.
    Replayable(Vec<Bytes>),
    /// Streams from the client: only one attempt can send it.
    Stream(Option<RequestBody>),
}

/// How an attempt failed, for the retry decision.
#[derive(Clone, Copy)]
enum Failure {
    /// Nothing reached the upstream.
    Connect,
    /// The connection broke after sending started.
    Reset,
    /// The per-try timeout expired.
    Timeout,
}

/// What the retry loop carries from one attempt to the next.
struct Attempts<'r> {
    /// The attempt being made, from 1.
    number: u32,
    /// The endpoint the last attempt failed on, avoided by the next pick.
    avoid: Option<Arc<Endpoint>>,
    /// The retry budget's slot of the retry in progress, given back before asking for the next.
    retry_slot: Option<RetryGuard<'r>>,
    /// Raised once the client's body has been read to its end; a timeout before then is the
    /// client's (a slow upload), not the upstream's.
    body_end: Option<BodyEnd>,
}

/// What one attempt ended in.
enum Attempt {
    /// Response headers arrived.
    Answered {
        resp: Response<Incoming>,
        lease: Lease,
        ep: Arc<Endpoint>,
        reuse: Option<Reuse>,
        sent: Instant,
    },
    /// It failed in a way the route may retry.
    Failed {
        failure: Failure,
        error: ProxyError,
        ep: Arc<Endpoint>,
        try_deadline: Instant,
    },
}

/// What the loop does after an attempt.
// Returned by value once per attempt and taken apart at once; boxing the response would cost an
// allocation per request.
#[allow(clippy::large_enum_variant)]
enum Decision {
    /// Send again, to another endpoint, after this pause.
    Retry(Duration),
    /// This is the answer.
    Done(Result<Response<ResponseBody>, ProxyError>),
}

/// Sends the request the stages prepared to an endpoint of `route` and returns the upstream
/// response with its body streaming, retrying on another endpoint when the policy and the
/// request's safety allow. The upstream response's hop-by-hop headers are removed here.
pub async fn forward(
    client: &UpstreamClient,
    http1: &Http1Pool,
    route: &Route,
    ex: &mut Exchange<'_>,
    body: ClientBody,
) -> Result<Response<ResponseBody>, ProxyError> {
    let _active = route.budget.enter(route.retry.budget_percent);
    let body_end = body.end_flag().cloned();
    let mut payload = prepare(route, ex, body).await?;
    let safe_to_resend =
        is_idempotent(&ex.head.method) || ex.head.headers.contains_key(&IDEMPOTENCY_KEY);
    let path_and_query = match ex.upstream_path.take() {
        Some(pq) => pq,
        None => path_and_query(ex.path, ex.head.uri.query())?,
    };
    let mut tries = Attempts {
        number: 0,
        avoid: None,
        retry_slot: None,
        body_end,
    };
    loop {
        tries.number += 1;
        let outcome = attempt(
            client,
            http1,
            route,
            ex,
            &mut payload,
            &path_and_query,
            &tries,
        )
        .await?;
        match decide(route, ex, outcome, &payload, safe_to_resend, &mut tries) {
            Decision::Done(Ok(resp))
                if resp.status() == StatusCode::FORBIDDEN && route.mesh.is_some() =>
            {
                return l7_denial(route, ex, resp).await.map(strip_hop_by_hop);
            }
            Decision::Done(result) => return result.map(strip_hop_by_hop),
            Decision::Retry(pause) => {
                if !pause.is_zero() {
                    tokio::time::sleep(pause).await;
                }
            }
        }
    }
}

/// Reads the body ahead when a retry may need to send it again, else streams it; counts it for
/// the access log.
async fn prepare(
    route: &Route,
    ex: &mut Exchange<'_>,
    body: ClientBody,
) -> Result<Payload, ProxyError> {
    let policy = &route.retry;
    let declared = headers::declared_length(&ex.head.headers);
    let mut payload = if hyper::body::Body::is_end_stream(&body) {
        Payload::Replayable(Vec::new())
    } else if policy.attempts > 1 && declared.is_none_or(|n| n <= policy.max_body) {
        // Small bodies are read first so that any attempt can send them (Envoy does the same).
        // The route's timeout bounds the read: a drip-fed body gets 408 without an upstream.
        let read = RequestBody::read_up_to(body, policy.max_body, route.max_body);
        match tokio::time::timeout_at(ex.deadline, read).await {
            Ok(Ok(Ok(chunks))) => Payload::Replayable(chunks),
            Ok(Ok(Err(stream))) => Payload::Stream(Some(stream)),
            Ok(Err(e)) => return Err(e.into()),
            Err(_) => return Err(ProxyError::ClientTimeout { source: None }),
        }
    } else {
        Payload::Stream(Some(RequestBody::streaming(body, route.max_body)))
    };
    if let Some(log) = ex.log.as_deref_mut() {
        match &mut payload {
            Payload::Replayable(chunks) => {
                log.bytes_in = Some(chunks.iter().map(|c| c.len() as u64).sum());
            }
            Payload::Stream(Some(body)) => body.count_into(log.body_counter()),
            Payload::Stream(None) => {}
        }
    }
    Ok(payload)
}

/// Picks an endpoint and sends one attempt. `Err` only when no endpoint is left, the request
/// cannot be built, or the client's body failed (the client's fault, never retried).
async fn attempt(
    client: &UpstreamClient,
    http1: &Http1Pool,
    route: &Route,
    ex: &mut Exchange<'_>,
    payload: &mut Payload,
    path_and_query: &PathAndQuery,
    tries: &Attempts<'_>,
) -> Result<Attempt, ProxyError> {
    let policy = &route.retry;
    let lease = route
        .picker
        .pick(&route.pool, ex.client, tries.avoid.as_deref())
        .ok_or_else(|| ProxyError::NoEndpoint {
            service: route.pool.name().clone(),
        })?;
    let ep = lease.endpoint().clone();
    let span = telemetry::client_span(ex.span, &ex.head.method, &ep, tries.number);
    if let Some(log) = ex.log.as_deref_mut() {
        log.attempts = tries.number;
        log.upstream = Some(ep.authority.clone());
    }
    // Plain HTTP/1.1 to an IP address goes through the endpoint's own pool; the request
    // line then carries only the path (origin form).
    let pooled = match ep.socket_addr {
        Some(addr)
            if ex.upgrade.is_none()
                && route.client.is_none()
                && *route.pool.scheme() == http::uri::Scheme::HTTP =>
        {
            Some(addr)
        }
        _ => None,
    };
    let uri = match pooled {
        Some(_) => Uri::from(path_and_query.clone()),
        None => Uri::builder()
            .scheme(route.pool.scheme().clone())
            .authority(ep.authority.clone())
            .path_and_query(path_and_query.clone())
            .build()
            .map_err(|source| ProxyError::InvalidRequest { source })?,
    };
    let more_attempts = more_attempts(route, tries.number, payload);
    let mut builder = Request::builder()
        .method(ex.head.method.clone())
        .uri(uri)
        .version(Version::HTTP_11);
    if let Some(h) = builder.headers_mut() {
        // Only a request that may be sent again needs to keep its headers.
        if more_attempts {
            h.clone_from(&ex.head.headers);
        } else {
            std::mem::swap(h, &mut ex.head.headers);
        }
        // Without a client host to preserve (HTTP/1.0), the endpoint's own.
        if !route.preserve_host || !h.contains_key(HOST) {
            h.insert(HOST, ep.host_header.clone());
        }
        telemetry::inject(&span, h);
    }
    let body = match payload {
        Payload::Replayable(chunks) => RequestBody::from_chunks(chunks),
        Payload::Stream(s) => s.take().unwrap_or_default(),
    };
    let upstream_req = builder
        .body(body)
        .map_err(|source| ProxyError::InvalidRequest { source })?;
    let try_deadline = match policy.per_try_timeout {
        Some(t) => ex.deadline.min(Instant::now() + t),
        None => ex.deadline,
    };
    let mesh = match &route.mesh {
        Some(m) => Some(m.clients()?),
        None => None,
    };
    let sent = Instant::now();
    let client = match (&mesh, &ex.upgrade, &route.upgrade_client, &route.client) {
        (Some(m), Some(_), _, _) => &m.http1,
        (Some(m), None, _, _) => &m.client,
        (None, Some(_), Some(c), _) => c,
        (None, _, _, Some(c)) => c,
        _ => client,
    };
    let mut reuse = None;
    let outcome = match pooled {
        Some(addr) => {
            let sent = http1.send(&ep.state, addr, upstream_req);
            tokio::time::timeout_at(try_deadline, sent).await.map(|r| {
                r.map(|(resp, r)| {
                    reuse = Some(r);
                    resp
                })
            })
        }
        None => tokio::time::timeout_at(try_deadline, client.request(upstream_req))
            .await
            .map(|r| r.map_err(UpstreamError::from)),
    };
    // The attempt's span ends with its response headers (or its failure).
    telemetry::record_attempt(&span, &outcome);
    drop(span);
    if let Some(log) = ex.log.as_deref_mut() {
        log.upstream_duration = Some(sent.elapsed());
    }
    let (failure, error) = match outcome {
        Ok(Ok(resp)) => {
            return Ok(Attempt::Answered {
                resp,
                lease,
                ep,
                reuse,
                sent,
            })
        }
        Ok(Err(source)) => {
            // A request that failed because the client's body did: the client's fault,
            // charged to no endpoint and not retried. Its upstream connection is dropped
            // with the failed request, never pooled.
            let source = match ProxyError::client_fault(source) {
                Ok(e) => return Err(e),
                Err(source) => source,
            };
            // A mesh handshake that succeeded, then a close before any answer: the
            // destination's L4 intention refused the gateway. Another instance would too, and
            // the endpoint is healthy, so it is neither retried nor charged.
            if let Some(mesh) = &route.mesh {
                if !source.is_connect() && source.closed_before_response() {
                    mesh.record_denial();
                    return Err(mesh_denied(route, mesh, false));
                }
            }
            lease.record_failure();
            route.pool.report(&ep, Outcome::GatewayFailure);
            if source.is_connect() {
                let addr = ep.authority.clone();
                (Failure::Connect, ProxyError::Connect { addr, source })
            } else {
                let addr = ep.authority.clone();
                (Failure::Reset, ProxyError::Upstream { addr, source })
            }
        }
        Err(_) => {
            if tries
                .body_end
                .as_ref()
                .is_some_and(|end| !end.load(Ordering::Acquire))
            {
                // The upstream could not answer a body that had not fully arrived.
                return Err(ProxyError::ClientTimeout { source: None });
            }
            lease.record_failure();
            route.pool.report(&ep, Outcome::GatewayFailure);
            let after = if try_deadline < ex.deadline {
                policy.per_try_timeout.unwrap_or(route.timeout)
            } else {
                route.timeout
            };
            let addr = ep.authority.clone();
            (
                Failure::Timeout,
                ProxyError::UpstreamTimeout { addr, after },
            )
        }
    };
    Ok(Attempt::Failed {
        failure,
        error,
        ep,
        try_deadline,
    })
}

/// Whether another attempt may follow this one: the policy allows more, and the body can be
/// sent again.
fn more_attempts(route: &Route, number: u32, payload: &Payload) -> bool {
    number < route.retry.attempts && matches!(payload, Payload::Replayable(_))
}

/// The retry decision after one attempt: the answer, or a retry after a pause. Every retry
/// needs attempts left, a resendable body and a request safe to send twice (connect failures
/// aside), time before the deadline, and room in the retry budget (connect failures aside).
fn decide<'r>(
    route: &'r Route,
    ex: &mut Exchange<'_>,
    outcome: Attempt,
    payload: &Payload,
    safe_to_resend: bool,
    tries: &mut Attempts<'r>,
) -> Decision {
    let policy = &route.retry;
    let more = more_attempts(route, tries.number, payload);
    let attempt = tries.number;
    let (failure, error, ep, try_deadline) = match outcome {
        Attempt::Answered {
            resp,
            lease,
            ep,
            reuse,
            sent,
        } => {
            let status = resp.status().as_u16();
            route.metrics.observe_upstream(sent.elapsed());
            if route.metrics.enabled() {
                ep.state.record_status(status);
            }
            route.pool.report(&ep, Outcome::Status(status));
            if status >= 500 {
                lease.record_failure();
            }
            if policy.on.statuses.contains(&status) && safe_to_resend && more {
                let pause = policy.backoff(attempt);
                // This request's previous slot is given back before asking for the next.
                tries.retry_slot = None;
                if Instant::now() + pause < ex.deadline {
                    if let Some(slot) = route.budget.try_retry(policy.budget_percent) {
                        // The answer is dropped unread; its connection is not reused.
                        tracing::debug!(route = %route.name, upstream.addr = %ep.authority, status, attempt, "retrying after status");
                        tries.retry_slot = Some(slot);
                        route.metrics.retries.fetch_add(1, Ordering::Relaxed);
                        drop(resp);
                        drop(lease);
                        tries.avoid = Some(ep);
                        return Decision::Retry(pause);
                    }
                }
            }
            if attempt > 1 {
                let outcome = if status >= 500 {
                    &route.metrics.retried_failed
                } else {
                    &route.metrics.retried_ok
                };
                outcome.fetch_add(1, Ordering::Relaxed);
            }
            if status == 101 {
                return Decision::Done(tunnel(route, ex, resp, lease, ep));
            }
            let permit = ex.permit.take();
            return Decision::Done(Ok(resp.map(|b| {
                ResponseBody::upstream(b, lease, permit, route.stream_timeout).reusing(reuse)
            })));
        }
        Attempt::Failed {
            failure,
            error,
            ep,
            try_deadline,
        } => (failure, error, ep, try_deadline),
    };
    let retryable = more
        && match failure {
            Failure::Connect => policy.on.connect_failure,
            Failure::Reset => policy.on.reset && safe_to_resend,
            // Envoy's `reset` covers an upstream that did not answer in time; `timeout`
            // names the per-try timeout alone.
            Failure::Timeout => {
                (policy.on.timeout || policy.on.reset)
                    && safe_to_resend
                    && try_deadline < ex.deadline
            }
        };
    if !retryable {
        if attempt > 1 {
            route.metrics.retried_failed.fetch_add(1, Ordering::Relaxed);
        }
        return Decision::Done(Err(error));
    }
    // A refused connection put no load on anyone: go to the next endpoint at once. Backoff
    // is for upstreams that did receive the request and struggle with it.
    let pause = match failure {
        Failure::Connect => Duration::ZERO,
        Failure::Reset | Failure::Timeout => policy.backoff(attempt),
    };
    if Instant::now() + pause >= ex.deadline {
        return Decision::Done(Err(error));
    }
    // This request's previous slot is given back before asking for the next.
    tries.retry_slot = None;
    // The budget limits amplification: extra work for upstreams. A refused connection did
    // no work anywhere, so moving it to another endpoint amplifies nothing and is not charged.
    if !matches!(failure, Failure::Connect) {
        let Some(slot) = route.budget.try_retry(policy.budget_percent) else {
            tracing::debug!(route = %route.name, "retry budget exhausted");
            return Decision::Done(Err(error));
        };
        tries.retry_slot = Some(slot);
    }
    route.metrics.retries.fetch_add(1, Ordering::Relaxed);
    tracing::debug!(route = %route.name, upstream.addr = %ep.authority, attempt, backoff = ?pause, "retrying on another endpoint");
    tries.avoid = Some(ep);
    Decision::Retry(pause)
}

/// A 101: a tunnel only for the protocol that was asked for (WebSocket, the one relayed); any
/// other switch would carry bytes past the gateway's rules.
fn tunnel(
    route: &Route,
    ex: &mut Exchange<'_>,
    mut resp: Response<Incoming>,
    lease: Lease,
    ep: Arc<Endpoint>,
) -> Result<Response<ResponseBody>, ProxyError> {
    let asked = ex.upgrade.is_some();
    match ex.upgrade.take() {
        Some(client_side) if switches_to_websocket(resp.headers()) => {
            let upstream_side = hyper::upgrade::on(&mut resp);
            super::upgrade::splice(
                ex.upgrades,
                client_side,
                upstream_side,
                lease,
                ex.permit.take(),
                route.websocket_idle_timeout,
                true,
            );
            Ok(resp.map(|_| ResponseBody::empty()))
        }
        _ => {
            tracing::debug!(route = %route.name, upstream.addr = %ep.authority, asked, "101 for a protocol that was not asked for");
            lease.record_failure();
            Err(ProxyError::UnexpectedUpgrade {
                addr: ep.authority.clone(),
            })
        }
    }
}

/// A 403 from a mesh destination: when its body is the sidecar's own `RBAC: access denied`, an
/// L7 intention refused the gateway (answered with the gateway's own 403 naming the likely
/// cause); any other 403 is the service's and goes back as it was.
async fn l7_denial(
    route: &Route,
    ex: &Exchange<'_>,
    resp: Response<ResponseBody>,
) -> Result<Response<ResponseBody>, ProxyError> {
    const RBAC: &[u8] = b"RBAC: access denied";
    let small = resp
        .headers()
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .is_some_and(|n| n <= 64);
    if !small {
        return Ok(resp);
    }
    let (parts, body) = resp.into_parts();
    let read = http_body_util::BodyExt::collect(body);
    let bytes = match tokio::time::timeout_at(ex.deadline, read).await {
        Ok(Ok(collected)) => collected.to_bytes(),
        // The short body failed: what the client gets is the status with no body.
        _ => Bytes::new(),
    };
    if let Some(mesh) = &route.mesh {
        if bytes.trim_ascii() == RBAC {
            mesh.record_denial();
            return Err(mesh_denied(route, mesh, true));
        }
    }
    Ok(Response::from_parts(parts, ResponseBody::full(bytes)))
}

fn mesh_denied(route: &Route, mesh: &super::mesh::MeshUpstream, l7: bool) -> ProxyError {
    ProxyError::MeshDenied {
        identity: mesh.identity().service.clone(),
        service: route.pool.name().clone(),
        l7,
    }
}

/// The upstream's hop-by-hop headers stay on its connection; a 101's `Upgrade` goes back as
/// it is, since it is the handshake's answer.
fn strip_hop_by_hop(mut resp: Response<ResponseBody>) -> Response<ResponseBody> {
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        headers::remove_hop_by_hop_keep_upgrade(resp.headers_mut());
    } else {
        headers::remove_hop_by_hop(resp.headers_mut());
    }
    resp
}
