//! Forwarding one request upstream: endpoint pick, upstream request, timeouts, and retries on
//! another endpoint when the policy and the request's safety allow.

use std::net::IpAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue, CONTENT_LENGTH, HOST};
use http::uri::PathAndQuery;
use http::{Request, Response, Uri, Version};
use tokio::time::Instant;

use super::body::ResponseBody;
use super::client::UpstreamClient;
use super::error::{ProxyError, UpstreamError};
use super::route::Route;
use crate::balancer::{Endpoint, Outcome};
use crate::body::{ClientBody, RequestBody};
use crate::rules::headers;
use crate::rules::path::rewrite_path;
use crate::rules::retry::is_idempotent;
use crate::telemetry::{self, RequestLog};

static IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");

/// What the forwarder needs to know about the downstream side.
pub struct Downstream<'a> {
    /// Client address.
    pub client: IpAddr,
    /// The request's one validated host (`proxy::head::validate`): `Host` with
    /// `preserve_host`, and `X-Forwarded-Host`. `None` for HTTP/1.0 without `Host`.
    pub host: Option<HeaderValue>,
    /// `http` or `https`.
    pub proto: &'static str,
    /// Request id to pass upstream.
    pub request_id: &'a HeaderValue,
    /// The client's side of a protocol upgrade, when it asked for one.
    pub upgrade: Option<hyper::upgrade::OnUpgrade>,
    /// Where upgraded connections are tracked.
    pub upgrades: &'a super::upgrade::Upgrades,
    /// The request's server span (disabled when the request is not traced): each attempt gets
    /// a client span under it, whose `traceparent` goes upstream.
    pub span: &'a tracing::Span,
    /// Facts for the access log line, when the access log is on.
    pub log: Option<&'a mut RequestLog>,
}

/// The request body as the retry loop sees it.
enum Payload {
    /// Whole in memory: every attempt can send it.
    Replayable(Vec<Bytes>),
    /// Streams from the client: only one attempt can send it.
    Stream(Option<RequestBody>),
}

/// How an attempt failed, for the retry decision.
enum Failure {
    /// Nothing reached the upstream.
    Connect,
    /// The connection broke after sending started.
    Reset,
    /// The per-try timeout expired.
    Timeout,
}

/// Sends `req` to an endpoint of `route` and returns the upstream response with its body streaming.
/// `path` is the dot-normalised request path.
pub async fn forward(
    client: &UpstreamClient,
    http1: &super::pool::Http1Pool,
    route: &Route,
    req: Request<ClientBody>,
    path: &str,
    mut down: Downstream<'_>,
) -> Result<Response<ResponseBody>, ProxyError> {
    let started = Instant::now();
    let deadline = started + route.timeout;
    let (mut parts, body) = req.into_parts();
    let declared = parts
        .headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if let (Some(limit), Some(n)) = (route.max_body, declared) {
        if n > limit {
            return Err(ProxyError::BodyTooLarge { limit });
        }
    }
    let _active = route.budget.enter(route.retry.budget_percent);
    let permit = match &route.limiter {
        Some(l) => Some(
            l.acquire(deadline)
                .await
                .ok_or_else(|| ProxyError::Overloaded {
                    service: route.pool.name().clone(),
                })?,
        ),
        None => None,
    };

    let policy = &route.retry;
    let safe_to_resend =
        is_idempotent(&parts.method) || parts.headers.contains_key(&IDEMPOTENCY_KEY);
    // Raised once the client's body has been read to its end; a timeout before then is the
    // client's (a slow upload), not the upstream's.
    let body_end = body.end_flag().cloned();
    let mut payload = if hyper::body::Body::is_end_stream(&body) {
        Payload::Replayable(Vec::new())
    } else if policy.attempts > 1 && declared.is_none_or(|n| n <= policy.max_body) {
        // Small bodies are read first so that any attempt can send them (Envoy does the same).
        // The route's timeout bounds the read: a drip-fed body gets 408 without an upstream.
        let read = RequestBody::read_up_to(body, policy.max_body, route.max_body);
        match tokio::time::timeout_at(deadline, read).await {
            Ok(Ok(Ok(chunks))) => Payload::Replayable(chunks),
            Ok(Ok(Err(stream))) => Payload::Stream(Some(stream)),
            Ok(Err(e)) => return Err(e.into()),
            Err(_) => return Err(ProxyError::ClientTimeout { source: None }),
        }
    } else {
        Payload::Stream(Some(RequestBody::streaming(body, route.max_body)))
    };
    if let Some(log) = down.log.as_deref_mut() {
        match &mut payload {
            Payload::Replayable(chunks) => {
                log.bytes_in = Some(chunks.iter().map(|c| c.len() as u64).sum());
            }
            Payload::Stream(Some(body)) => body.count_into(log.body_counter()),
            Payload::Stream(None) => {}
        }
    }

    let host = down.host.take();
    if down.upgrade.is_some() {
        headers::remove_hop_by_hop_keep_upgrade(&mut parts.headers);
    } else {
        headers::remove_hop_by_hop(&mut parts.headers);
    }
    let via = if parts.version == Version::HTTP_2 {
        "2 meshgate"
    } else {
        "1.1 meshgate"
    };
    headers::add_forwarding(
        &mut parts.headers,
        down.client,
        down.proto,
        host.as_ref(),
        via,
    );
    parts
        .headers
        .insert(headers::X_REQUEST_ID.clone(), down.request_id.clone());
    if route.preserve_host {
        if let Some(h) = host {
            parts.headers.insert(HOST, h);
        }
    }
    route.request_headers.apply(&mut parts.headers);
    let path_and_query = upstream_path(path, parts.uri.query(), route)?;

    let mut avoid: Option<Arc<Endpoint>> = None;
    let mut attempt = 0u32;
    let mut _retry_slot = None;
    loop {
        attempt += 1;
        let lease = route
            .picker
            .pick(&route.pool, down.client, avoid.as_deref())
            .ok_or_else(|| ProxyError::NoEndpoint {
                service: route.pool.name().clone(),
            })?;
        let ep = lease.endpoint().clone();
        let span = telemetry::client_span(down.span, &parts.method, &ep, attempt);
        if let Some(log) = down.log.as_deref_mut() {
            log.attempts = attempt;
            log.upstream = Some(ep.authority.clone());
        }
        // Plain HTTP/1.1 to an IP address goes through the endpoint's own pool; the request
        // line then carries only the path (origin form).
        let pooled = match ep.socket_addr {
            Some(addr)
                if down.upgrade.is_none()
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
        let more_attempts = attempt < policy.attempts && matches!(payload, Payload::Replayable(_));
        let mut builder = Request::builder()
            .method(parts.method.clone())
            .uri(uri)
            .version(Version::HTTP_11);
        if let Some(h) = builder.headers_mut() {
            // Only a request that may be sent again needs to keep its headers.
            if more_attempts {
                h.clone_from(&parts.headers);
            } else {
                std::mem::swap(h, &mut parts.headers);
            }
            // Without a client host to preserve (HTTP/1.0), the endpoint's own.
            if !route.preserve_host || !h.contains_key(HOST) {
                h.insert(HOST, ep.host_header.clone());
            }
            telemetry::inject(&span, h);
        }
        let body = match &mut payload {
            Payload::Replayable(chunks) => RequestBody::from_chunks(chunks),
            Payload::Stream(s) => s.take().unwrap_or_default(),
        };
        let upstream_req = builder
            .body(body)
            .map_err(|source| ProxyError::InvalidRequest { source })?;
        let try_deadline = match policy.per_try_timeout {
            Some(t) => deadline.min(Instant::now() + t),
            None => deadline,
        };
        let sent = Instant::now();
        let client = match (&down.upgrade, &route.upgrade_client, &route.client) {
            (Some(_), Some(c), _) => c,
            (_, _, Some(c)) => c,
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
        if let Some(log) = down.log.as_deref_mut() {
            log.upstream_duration = Some(sent.elapsed());
        }
        let (failure, error) = match outcome {
            Ok(Ok(mut resp)) => {
                let status = resp.status().as_u16();
                route.metrics.observe_upstream(sent.elapsed());
                if route.metrics.enabled() {
                    ep.state.record_status(status);
                }
                route.pool.report(&ep, Outcome::Status(status));
                if status >= 500 {
                    lease.record_failure();
                }
                if policy.on.statuses.contains(&status) && safe_to_resend && more_attempts {
                    let pause = policy.backoff(attempt);
                    // This request's previous slot is given back before asking for the next.
                    _retry_slot = None;
                    if Instant::now() + pause < deadline {
                        if let Some(slot) = route.budget.try_retry(policy.budget_percent) {
                            // The answer is dropped unread; its connection is not reused.
                            tracing::debug!(route = %route.name, upstream.addr = %ep.authority, status, attempt, "retrying after status");
                            _retry_slot = Some(slot);
                            route.metrics.retries.fetch_add(1, Ordering::Relaxed);
                            drop(resp);
                            drop(lease);
                            avoid = Some(ep);
                            tokio::time::sleep(pause).await;
                            continue;
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
                    // A tunnel only for the protocol that was asked for (WebSocket, the one
                    // relayed); any other switch would carry bytes past the gateway's rules.
                    let asked = down.upgrade.is_some();
                    match down.upgrade {
                        Some(client_side)
                            if crate::rules::head::switches_to_websocket(resp.headers()) =>
                        {
                            let upstream_side = hyper::upgrade::on(&mut resp);
                            super::upgrade::splice(
                                down.upgrades,
                                client_side,
                                upstream_side,
                                lease,
                                permit,
                                route.websocket_idle_timeout,
                                true,
                            );
                            return Ok(resp.map(|_| ResponseBody::empty()));
                        }
                        _ => {
                            tracing::debug!(route = %route.name, upstream.addr = %ep.authority, asked, "101 for a protocol that was not asked for");
                            lease.record_failure();
                            return Err(ProxyError::UnexpectedUpgrade {
                                addr: ep.authority.clone(),
                            });
                        }
                    }
                }
                return Ok(resp.map(|b| {
                    ResponseBody::upstream(b, lease, permit, route.stream_timeout).reusing(reuse)
                }));
            }
            Ok(Err(source)) => {
                // A request that failed because the client's body did: the client's fault,
                // charged to no endpoint and not retried. Its upstream connection is dropped
                // with the failed request, never pooled.
                let source = match ProxyError::client_fault(source) {
                    Ok(e) => return Err(e),
                    Err(source) => source,
                };
                lease.record_failure();
                route.pool.report(&ep, Outcome::GatewayFailure);
                if source.is_connect() {
                    let e = ProxyError::Connect {
                        addr: ep.authority.clone(),
                        source,
                    };
                    (Failure::Connect, e)
                } else {
                    let e = ProxyError::Upstream {
                        addr: ep.authority.clone(),
                        source,
                    };
                    (Failure::Reset, e)
                }
            }
            Err(_) => {
                if body_end
                    .as_ref()
                    .is_some_and(|end| !end.load(Ordering::Acquire))
                {
                    // The upstream could not answer a body that had not fully arrived.
                    return Err(ProxyError::ClientTimeout { source: None });
                }
                lease.record_failure();
                route.pool.report(&ep, Outcome::GatewayFailure);
                let after = if try_deadline < deadline {
                    policy.per_try_timeout.unwrap_or(route.timeout)
                } else {
                    route.timeout
                };
                let e = ProxyError::UpstreamTimeout {
                    addr: ep.authority.clone(),
                    after,
                };
                (Failure::Timeout, e)
            }
        };
        let retryable = more_attempts
            && match failure {
                Failure::Connect => policy.on.connect_failure,
                Failure::Reset => policy.on.reset && safe_to_resend,
                // Envoy's `reset` covers an upstream that did not answer in time; `timeout`
                // names the per-try timeout alone.
                Failure::Timeout => {
                    (policy.on.timeout || policy.on.reset)
                        && safe_to_resend
                        && try_deadline < deadline
                }
            };
        if !retryable {
            if attempt > 1 {
                route.metrics.retried_failed.fetch_add(1, Ordering::Relaxed);
            }
            return Err(error);
        }
        // A refused connection put no load on anyone: go to the next endpoint at once. Backoff
        // is for upstreams that did receive the request and struggle with it.
        let pause = match failure {
            Failure::Connect => std::time::Duration::ZERO,
            Failure::Reset | Failure::Timeout => policy.backoff(attempt),
        };
        if Instant::now() + pause >= deadline {
            return Err(error);
        }
        // This request's previous slot is given back before asking for the next.
        _retry_slot = None;
        // The budget limits amplification: extra work for upstreams. A refused connection did
        // no work anywhere, so moving it to another endpoint amplifies nothing and is not charged.
        if !matches!(failure, Failure::Connect) {
            let Some(slot) = route.budget.try_retry(policy.budget_percent) else {
                tracing::debug!(route = %route.name, "retry budget exhausted");
                return Err(error);
            };
            _retry_slot = Some(slot);
        }
        route.metrics.retries.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(route = %route.name, upstream.addr = %ep.authority, attempt, backoff = ?pause, "retrying on another endpoint");
        drop(lease);
        avoid = Some(ep);
        if !pause.is_zero() {
            tokio::time::sleep(pause).await;
        }
    }
}

fn upstream_path(
    path: &str,
    query: Option<&str>,
    route: &Route,
) -> Result<PathAndQuery, ProxyError> {
    let path = if route.rewrite.is_empty() {
        std::borrow::Cow::Borrowed(path)
    } else {
        std::borrow::Cow::Owned(rewrite_path(path, &route.rewrite))
    };
    let pq = match query {
        Some(q) => PathAndQuery::try_from(format!("{path}?{q}")),
        None => PathAndQuery::try_from(path.as_ref()),
    };
    pq.map_err(|e| ProxyError::InvalidRequest { source: e.into() })
}
