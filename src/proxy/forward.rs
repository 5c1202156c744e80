//! Forwarding one request upstream: endpoint pick, upstream request, timeout, and a retry on
//! another endpoint when the connection failed before anything was sent.

use std::net::IpAddr;
use std::sync::Arc;

use http::header::{HeaderValue, CONTENT_LENGTH, HOST};
use http::uri::PathAndQuery;
use http::{Request, Response, Uri, Version};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::time::Instant;

use super::body::{RequestBody, RequestBodyError, ResponseBody};
use super::error::ProxyError;
use super::headers;
use crate::balancer::Endpoint;
use crate::config::UpstreamConfig;
use crate::routes::{rewrite_path, Route};

/// The pooled upstream client shared by every route.
pub type UpstreamClient = Client<HttpConnector, RequestBody>;

/// Connect-failure retries on other endpoints for a request without a body.
const CONNECT_RETRIES: usize = 2;

/// Builds the keep-alive client pool to upstreams.
pub fn client(cfg: &UpstreamConfig) -> UpstreamClient {
    let mut http = HttpConnector::new();
    http.set_nodelay(true);
    http.set_connect_timeout(Some(cfg.connect_timeout));
    http.set_keepalive(Some(std::time::Duration::from_secs(60)));
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(cfg.idle_timeout)
        .pool_max_idle_per_host(cfg.max_idle_per_host)
        .pool_timer(TokioTimer::new())
        .build(http)
}

/// What the forwarder needs to know about the downstream side.
pub struct Downstream<'a> {
    /// Client address.
    pub client: IpAddr,
    /// `http` or `https`.
    pub proto: &'static str,
    /// Request id to pass upstream.
    pub request_id: &'a HeaderValue,
}

/// Sends `req` to an endpoint of `route` and returns the upstream response with its body streaming.
/// `path` is the dot-normalised request path.
pub async fn forward(
    client: &UpstreamClient,
    route: &Route,
    req: Request<Incoming>,
    path: &str,
    down: Downstream<'_>,
) -> Result<Response<ResponseBody>, ProxyError> {
    let (mut parts, body) = req.into_parts();
    if let Some(limit) = route.max_body {
        let declared = parts
            .headers
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > limit) {
            return Err(ProxyError::BodyTooLarge { limit });
        }
    }
    let bodyless = hyper::body::Body::is_end_stream(&body);
    let host = parts.headers.get(HOST).cloned().or_else(|| {
        parts
            .uri
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
    });
    headers::remove_hop_by_hop(&mut parts.headers);
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
    parts.version = Version::HTTP_11;

    let deadline = Instant::now() + route.timeout;
    let mut body = Some(RequestBody::new(body, route.max_body));
    let mut avoid: Option<Arc<Endpoint>> = None;
    let mut retries_left = if bodyless { CONNECT_RETRIES } else { 0 };
    loop {
        let lease = route
            .picker
            .pick(&route.pool, down.client, avoid.as_deref())
            .ok_or_else(|| ProxyError::NoEndpoint {
                service: route.pool.name().clone(),
            })?;
        let ep = lease.endpoint().clone();
        let uri = Uri::builder()
            .scheme(route.pool.scheme().clone())
            .authority(ep.authority.clone())
            .path_and_query(path_and_query.clone())
            .build()
            .map_err(|source| ProxyError::InvalidRequest { source })?;
        let mut builder = Request::builder()
            .method(parts.method.clone())
            .uri(uri)
            .version(Version::HTTP_11);
        if let Some(h) = builder.headers_mut() {
            // Only a request that may be retried needs to keep its headers for another attempt.
            if retries_left > 0 {
                h.clone_from(&parts.headers);
            } else {
                std::mem::swap(h, &mut parts.headers);
            }
            if !route.preserve_host {
                h.insert(HOST, ep.host_header.clone());
            }
        }
        let upstream_req = builder
            .body(body.take().unwrap_or_else(RequestBody::empty))
            .map_err(|source| ProxyError::InvalidRequest { source })?;
        let remaining = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(remaining, client.request(upstream_req)).await {
            Err(_) => {
                lease.record_failure();
                return Err(ProxyError::UpstreamTimeout {
                    addr: ep.authority.clone(),
                    after: route.timeout,
                });
            }
            Ok(Ok(resp)) => {
                if resp.status().is_server_error() {
                    lease.record_failure();
                }
                return Ok(resp.map(|b| ResponseBody::upstream(b, lease)));
            }
            Ok(Err(source)) => {
                lease.record_failure();
                if source.is_connect() {
                    let err = ProxyError::Connect {
                        addr: ep.authority.clone(),
                        source,
                    };
                    if retries_left > 0 && route.pool.snapshot().available() > 1 {
                        retries_left -= 1;
                        tracing::debug!(route = %route.name, upstream.addr = %ep.authority, "connect failed; retrying on another endpoint");
                        avoid = Some(ep);
                        continue;
                    }
                    return Err(err);
                }
                if let Some(limit) = body_limit_hit(&source) {
                    return Err(ProxyError::BodyTooLarge { limit });
                }
                return Err(ProxyError::Upstream {
                    addr: ep.authority.clone(),
                    source,
                });
            }
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

/// The route's limit when the upstream request failed because the client body exceeded it.
fn body_limit_hit(err: &(dyn std::error::Error + 'static)) -> Option<u64> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = cur {
        if let Some(RequestBodyError::TooLarge { limit }) = e.downcast_ref::<RequestBodyError>() {
            return Some(*limit);
        }
        cur = e.source();
    }
    None
}
