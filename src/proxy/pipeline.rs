//! A route's request pipeline: an ordered list of stages, each of which may answer the request
//! itself or pass it on, ending in forwarding. Adding a policy adds a stage, not a branch in
//! `forward` or the server.

use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;

use http::header::HeaderValue;
use http::request::Parts;
use http::uri::PathAndQuery;
use http::Response;
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;

use super::body::ResponseBody;
use super::error::ProxyError;
use super::upgrade::Upgrades;
use crate::telemetry::RequestLog;

/// One request on its way through a route: the head as stages change it, and what the
/// downstream side told us. Stages read and write it; forwarding consumes what they left.
pub struct Exchange<'a> {
    /// The request head (method, URI, version, headers), changed in place by stages.
    pub head: Parts,
    /// The dot-normalised request path the route matched.
    pub path: &'a str,
    /// The path and query to send upstream: the client's when its path needed no normalising,
    /// or a stage's rewrite; `None` sends `path` and the client's query.
    pub upstream_path: Option<PathAndQuery>,
    /// Client address: the peer, or behind `server.trusted_proxies` the address it forwarded.
    pub client: IpAddr,
    /// The socket's peer (the last hop), appended to `X-Forwarded-For`.
    pub peer: IpAddr,
    /// The request's one validated host (`rules::head::validate`); `None` for HTTP/1.0
    /// without `Host`.
    pub host: Option<HeaderValue>,
    /// `http` or `https`.
    pub proto: &'static str,
    /// The request id, passed upstream and returned to the client.
    pub request_id: &'a HeaderValue,
    /// The client's side of a protocol upgrade, when it asked for one the route relays.
    pub upgrade: Option<hyper::upgrade::OnUpgrade>,
    /// Where upgraded connections are tracked.
    pub upgrades: &'a Upgrades,
    /// When the route's `timeout` runs out: stages that wait stop waiting then.
    pub deadline: Instant,
    /// A concurrency permit, held until the response body ends.
    pub permit: Option<OwnedSemaphorePermit>,
    /// The request's server span (disabled when the request is not traced).
    pub span: &'a tracing::Span,
    /// Facts for the access log line, when the access log is on.
    pub log: Option<&'a mut RequestLog>,
    /// The name of the API key the authentication stage accepted.
    pub api_key: Option<std::sync::Arc<str>>,
    /// The claims of the JWT the authentication stage verified.
    pub jwt_claims: Option<std::sync::Arc<serde_json::Map<String, serde_json::Value>>>,
    /// The rate limit's decision on an admitted request, for its response headers.
    pub rate_limit: Option<crate::ratelimit::Decision>,
}

/// What a stage decided, or will decide once its future resolves.
pub enum Step<'a> {
    /// Pass the request to the next stage.
    Next,
    /// Answer the request with this response; later stages and the upstream never see it.
    Answer(Response<ResponseBody>),
    /// Answer the client with this response now, and carry the request on through the later
    /// stages and forwarding in the background (a cache refreshing a stale copy it served).
    Detach(Response<ResponseBody>),
    /// Refuse the request with a gateway error (the route's error page applies).
    Fail(ProxyError),
    /// Decide after waiting (a queue, a remote store). Only waiting stages pay for the box.
    Wait(Pin<Box<dyn Future<Output = Result<Flow, ProxyError>> + Send + 'a>>),
}

/// The outcome of a stage that waited, and of the whole request phase.
// Returned by value and taken apart at once; boxing the response would cost an allocation.
#[allow(clippy::large_enum_variant)]
pub enum Flow {
    /// Go on: the next stage, or forwarding after the last.
    Next,
    /// Answered by a stage.
    Answer(Response<ResponseBody>),
    /// Answered by a stage, which asks for the request to go on in the background.
    Detach(Response<ResponseBody>),
}

/// One policy on a route's request path.
pub trait Stage: Send + Sync {
    /// The stage's name, for `/explain`, logs and the README's order table.
    fn name(&self) -> &'static str;

    /// Runs on the way in, in pipeline order.
    fn on_request<'a>(&'a self, ex: &'a mut Exchange<'_>) -> Step<'a>;

    /// Runs on the way out, in reverse order, on a response from the upstream or from a later
    /// stage (gateway error answers get the route's error page instead).
    fn on_response(&self, _ex: &Exchange<'_>, _resp: &mut Response<ResponseBody>) {}

    /// Runs when forwarding failed with no upstream answer, last stage first: a stage may answer
    /// instead of the gateway error (the cache serving a stale copy under `stale_if_error`).
    fn on_error(&self, _ex: &Exchange<'_>, _e: &ProxyError) -> Option<Response<ResponseBody>> {
        None
    }
}

/// A route's stages in order.
#[derive(Default)]
pub struct Pipeline {
    stages: Vec<Box<dyn Stage>>,
}

impl Pipeline {
    /// A pipeline of `stages`, run in this order on the way in.
    pub fn new(stages: Vec<Box<dyn Stage>>) -> Self {
        Self { stages }
    }

    /// The stages' names, in order.
    pub fn names(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.stages.iter().map(|s| s.name())
    }

    /// Runs the request phase. `Ok((Flow::Answer, n))` says which stage answered (the first
    /// `n` stages ran; `Flow::Detach` likewise); `Ok((Flow::Next, len))` asks for forwarding.
    pub async fn request(&self, ex: &mut Exchange<'_>) -> Result<(Flow, usize), ProxyError> {
        self.request_from(0, ex).await
    }

    /// The request phase from stage `first` on: where a detached request carries on.
    pub async fn request_from(
        &self,
        first: usize,
        ex: &mut Exchange<'_>,
    ) -> Result<(Flow, usize), ProxyError> {
        for (i, stage) in self.stages.iter().enumerate().skip(first) {
            let flow = match stage.on_request(ex) {
                Step::Next => Flow::Next,
                Step::Answer(resp) => Flow::Answer(resp),
                Step::Detach(resp) => Flow::Detach(resp),
                Step::Fail(e) => return Err(e),
                Step::Wait(wait) => wait.await?,
            };
            if !matches!(flow, Flow::Next) {
                return Ok((flow, i));
            }
        }
        Ok((Flow::Next, self.stages.len()))
    }

    /// Runs the response phase of the first `ran` stages, last one first.
    pub fn response(&self, ex: &Exchange<'_>, ran: usize, resp: &mut Response<ResponseBody>) {
        self.response_of(ex, 0..ran, resp)
    }

    /// Runs the response phase of the stages in `range`, last one first (a detached request's
    /// own stages; the ones before it answered the client).
    pub fn response_of(
        &self,
        ex: &Exchange<'_>,
        range: std::ops::Range<usize>,
        resp: &mut Response<ResponseBody>,
    ) {
        for stage in self.stages[range].iter().rev() {
            stage.on_response(ex, resp);
        }
    }
}

impl Pipeline {
    /// Asks the first `ran` stages, last one first, for an answer instead of the gateway error
    /// `e`; returns it with the index of the stage that gave it (the stages before it still run
    /// their response phase).
    pub fn recover(
        &self,
        ex: &Exchange<'_>,
        ran: usize,
        e: &ProxyError,
    ) -> Option<(Response<ResponseBody>, usize)> {
        self.stages[..ran]
            .iter()
            .enumerate()
            .rev()
            .find_map(|(i, stage)| stage.on_error(ex, e).map(|resp| (resp, i)))
    }
}

impl std::fmt::Debug for Pipeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.names()).finish()
    }
}
