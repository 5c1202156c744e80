//! The stages a route runs today, in this order: body limit, concurrency cap, forwarding
//! headers, header rules, rewrite. Forwarding with retries follows the last one.

use std::sync::Arc;

use http::header::HOST;
use http::uri::PathAndQuery;
use http::{Response, Version};

use super::body::ResponseBody;
use super::error::ProxyError;
use super::pipeline::{Exchange, Flow, Stage, Step};
use crate::rules::headers::{self, HeaderOps};
use crate::rules::limit::Limiter;
use crate::rules::path::{rewrite_path, Rewrite};

/// `max_body`: a request that declares a longer body is refused with 413 before anything is
/// read; a body that turns out longer is cut off while it streams (see `body::RequestBody`).
pub struct BodyLimit {
    /// The limit in bytes.
    pub limit: u64,
}

impl Stage for BodyLimit {
    fn name(&self) -> &'static str {
        "body_limit"
    }

    fn on_request<'a>(&'a self, ex: &'a mut Exchange<'_>) -> Step<'a> {
        match headers::declared_length(&ex.head.headers) {
            Some(n) if n > self.limit => Step::Fail(ProxyError::BodyTooLarge { limit: self.limit }),
            _ => Step::Next,
        }
    }
}

/// The service's `max_requests` and `max_pending`: a permit held until the response body ends,
/// a bounded queue until the route's deadline, 503 beyond.
pub struct Concurrency {
    /// The service's limiter, shared by every route on it.
    pub limiter: Arc<Limiter>,
    /// The service, for the 503's message.
    pub service: Arc<str>,
}

impl Stage for Concurrency {
    fn name(&self) -> &'static str {
        "concurrency"
    }

    fn on_request<'a>(&'a self, ex: &'a mut Exchange<'_>) -> Step<'a> {
        // The uncontended case decides at once; only a request that must queue waits.
        if let Some(permit) = self.limiter.try_acquire() {
            ex.permit = Some(permit);
            return Step::Next;
        }
        Step::Wait(Box::pin(async move {
            match self.limiter.acquire(ex.deadline).await {
                Some(permit) => {
                    ex.permit = Some(permit);
                    Ok(Flow::Next)
                }
                None => Err(ProxyError::Overloaded {
                    service: self.service.clone(),
                }),
            }
        }))
    }
}

/// What every proxied request carries upstream: hop-by-hop headers removed (`Upgrade` kept for
/// a relayed upgrade), `Forwarded`/`X-Forwarded-*` and `Via` added, the request id, and the
/// client's host where `preserve_host` asks for it.
pub struct ForwardingHeaders {
    /// `preserve_host`.
    pub preserve_host: bool,
}

impl Stage for ForwardingHeaders {
    fn name(&self) -> &'static str {
        "forwarding_headers"
    }

    fn on_request<'a>(&'a self, ex: &'a mut Exchange<'_>) -> Step<'a> {
        let host = ex.host.take();
        let h = &mut ex.head.headers;
        if ex.upgrade.is_some() {
            headers::remove_hop_by_hop_keep_upgrade(h);
        } else {
            headers::remove_hop_by_hop(h);
        }
        let via = if ex.head.version == Version::HTTP_2 {
            "2 meshgate"
        } else {
            "1.1 meshgate"
        };
        // The peer is the hop this gateway saw; the client is already in the chain when a
        // trusted proxy forwarded it (`server.trusted_proxies`), or is the peer.
        headers::add_forwarding(h, ex.peer, ex.proto, host.as_ref(), via);
        h.insert(headers::X_REQUEST_ID.clone(), ex.request_id.clone());
        if self.preserve_host {
            if let Some(host) = host {
                h.insert(HOST, host);
            }
        }
        Step::Next
    }
}

/// `request_headers` and `response_headers`: the route's own header changes, applied after
/// the gateway's (so a route can override them).
pub struct HeaderRules {
    /// Changes to the request.
    pub request: HeaderOps,
    /// Changes to the upstream's response.
    pub response: HeaderOps,
}

impl Stage for HeaderRules {
    fn name(&self) -> &'static str {
        "header_rules"
    }

    fn on_request<'a>(&'a self, ex: &'a mut Exchange<'_>) -> Step<'a> {
        self.request.apply(&mut ex.head.headers);
        Step::Next
    }

    fn on_response(&self, _ex: &Exchange<'_>, resp: &mut Response<ResponseBody>) {
        self.response.apply(resp.headers_mut());
    }
}

/// `rewrite`: the path sent upstream, with the client's query kept.
pub struct RewritePath {
    /// The chain, applied in order.
    pub chain: Vec<Rewrite>,
}

impl Stage for RewritePath {
    fn name(&self) -> &'static str {
        "rewrite"
    }

    fn on_request<'a>(&'a self, ex: &'a mut Exchange<'_>) -> Step<'a> {
        let path = rewrite_path(ex.path, &self.chain);
        match path_and_query(&path, ex.head.uri.query()) {
            Ok(pq) => {
                ex.upstream_path = Some(pq);
                Step::Next
            }
            Err(e) => Step::Fail(e),
        }
    }
}

/// `path` with `query` as one request target.
pub fn path_and_query(path: &str, query: Option<&str>) -> Result<PathAndQuery, ProxyError> {
    let pq = match query {
        Some(q) => PathAndQuery::try_from(format!("{path}?{q}")),
        None => PathAndQuery::try_from(path),
    };
    pq.map_err(|e| ProxyError::InvalidRequest { source: e.into() })
}
