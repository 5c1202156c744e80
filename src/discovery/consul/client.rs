//! `ConsulClient`: the reqwest client (rustls + ring) and the three reads discovery uses:
//! `/v1/health/service/:name`, `/v1/catalog/services`, `/v1/health/state/any`; plus the agent
//! calls of self-registration. Every request asks for gzip, which reqwest decodes.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::header::{HeaderMap, HeaderValue, RETRY_AFTER};
use http::StatusCode;
use reqwest::Url;
use rustls::RootCertStore;

use super::decode::{decode_catalog, CheckEntry, HealthEntry, RawLeaf, RawRoots};
use super::error::ConsulError;
use super::settings::{ConsulSettings, TokenSource, WarningMode};
use crate::mesh::{LeafAnswer, RootsAnswer};

/// Largest success body we accept. A health answer is ~1.5 KiB per instance, so this is
/// tens of thousands of instances; anything bigger is a misbehaving proxy.
pub(super) const MAX_BODY: usize = 64 << 20;
/// Error bodies are one-line plain text; keep at most this much of them.
const ERROR_BODY_LIMIT: usize = 4096;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Agent calls (register, deregister, read one service) answer at once; no blocking.
const AGENT_TIMEOUT: Duration = Duration::from_secs(10);
/// Servers add up to `wait/16` of jitter, and hold RPCs for a few seconds during leader
/// elections (CLIENTS.md §7.1: timeout >= `wait * 17/16 + 10s`).
const TIMEOUT_SLACK: Duration = Duration::from_secs(10);

/// Metadata Consul returns in headers on every blocking-capable read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct QueryMeta {
    pub(super) index: u64,
    pub(super) known_leader: bool,
    pub(super) last_contact: Duration,
    pub(super) filtered_by_acls: bool,
}

/// Lets the generic watch loop read the headers of any answer type.
pub(super) trait Answer {
    fn meta(&self) -> QueryMeta;
}

macro_rules! answer_type {
    ($(#[$doc:meta])* $name:ident { $(#[$fdoc:meta])* $field:ident: $ty:ty }) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq)]
        pub struct $name {
            /// `X-Consul-Index` as sent (old servers may send 0; see [`super::next_index`]).
            pub index: u64,
            $(#[$fdoc])*
            pub $field: $ty,
            /// `X-Consul-Knownleader`; `true` when absent.
            pub known_leader: bool,
            /// `X-Consul-Lastcontact`: how long ago the answering server heard from the leader.
            pub last_contact: Duration,
            /// `X-Consul-Results-Filtered-By-ACLs: true`: the token hid some results, so an
            /// empty or short list may be an ACL scoping problem rather than reality.
            pub filtered_by_acls: bool,
        }

        impl $name {
            fn from_parts(meta: QueryMeta, $field: $ty) -> Self {
                Self {
                    index: meta.index,
                    $field,
                    known_leader: meta.known_leader,
                    last_contact: meta.last_contact,
                    filtered_by_acls: meta.filtered_by_acls,
                }
            }
        }

        impl Answer for $name {
            fn meta(&self) -> QueryMeta {
                QueryMeta {
                    index: self.index,
                    known_leader: self.known_leader,
                    last_contact: self.last_contact,
                    filtered_by_acls: self.filtered_by_acls,
                }
            }
        }
    };
}

answer_type!(
    /// Answer of `GET /v1/health/service/:name` (all instances, any status).
    HealthAnswer {
        /// Instances with their node and checks, in Consul's order.
        entries: Vec<HealthEntry>
    }
);

answer_type!(
    /// Answer of `GET /v1/catalog/services`.
    CatalogAnswer {
        /// Service name → sorted, deduplicated union of its instances' tags.
        services: BTreeMap<String, Vec<String>>
    }
);

answer_type!(
    /// Answer of `GET /v1/health/state/any`: every check in the datacenter.
    StateAnswer {
        /// All checks, node-level ones with an empty `service_name`.
        checks: Vec<CheckEntry>
    }
);

answer_type!(
    /// Answer of `GET /v1/agent/connect/ca/roots`.
    ConnectRootsAnswer {
        /// The roots, decoded.
        roots: RootsAnswer
    }
);

answer_type!(
    /// Answer of `GET /v1/agent/connect/ca/leaf/<service>`: the leaf, or why its fields do not
    /// parse (kept as an answer so the watch's index still moves on).
    ConnectLeafAnswer {
        /// The leaf, decoded.
        leaf: Result<LeafAnswer, String>
    }
);

/// HTTP client for one Consul agent. Cheap to clone (one `Arc`); clones share the
/// connection pool.
///
/// Requests carry the token as `X-Consul-Token`, `?dc`, `?stale` as configured, and for
/// blocking reads `index` plus `wait` in milliseconds (what Consul's Go client sends). Every
/// request has a total timeout of `wait * 17/16 + 10s`.
#[derive(Clone)]
pub struct ConsulClient {
    inner: Arc<Inner>,
}

struct Inner {
    http: reqwest::Client,
    base: Url,
    datacenter: Option<String>,
    tags: Vec<String>,
    filter: Option<String>,
    wait: Duration,
    stale: bool,
    warning: WarningMode,
    request_timeout: Duration,
}

impl fmt::Debug for ConsulClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConsulClient")
            .field("address", &self.inner.base.as_str())
            .field("datacenter", &self.inner.datacenter)
            .field("wait", &self.inner.wait)
            .finish_non_exhaustive()
    }
}

impl ConsulClient {
    /// Builds the client: reads the token file and TLS files (synchronously: call it at
    /// startup, not on a hot path) and sets up rustls with the ring provider.
    ///
    /// A plain-`http` address still gets a rustls config (with no roots): reqwest built with
    /// `rustls-no-provider` panics if it has to make one itself without a process-wide
    /// provider. For `https` the roots are `ca_file` if set, else the system trust store.
    pub fn new(settings: &ConsulSettings) -> Result<Self, ConsulError> {
        let tls = tls_config(settings)?;
        let mut headers = HeaderMap::new();
        if let Some(token) = &settings.token {
            let mut value = token_header(token)?;
            value.set_sensitive(true);
            headers.insert("x-consul-token", value);
        }
        let request_timeout = request_timeout(settings.wait);
        let http = reqwest::Client::builder()
            .tls_backend_preconfigured(tls)
            .default_headers(headers)
            .user_agent(concat!("meshgate/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(CONNECT_TIMEOUT)
            .read_timeout(request_timeout)
            // Consul never redirects API reads; following one could leak the token.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|source| ConsulError::Build { source })?;
        Ok(Self {
            inner: Arc::new(Inner {
                http,
                base: settings.address.clone(),
                datacenter: settings.datacenter.clone(),
                tags: settings.tags.clone(),
                filter: settings.filter.clone(),
                wait: settings.wait,
                stale: settings.stale,
                warning: settings.warning,
                request_timeout,
            }),
        })
    }

    /// The agent's base URL.
    pub fn address(&self) -> &Url {
        &self.inner.base
    }

    /// How `warning` instances are treated when answers are normalised.
    pub fn warning_mode(&self) -> WarningMode {
        self.inner.warning
    }

    /// Tags every instance must carry (sent as `?tag=` and re-checked client-side).
    pub fn required_tags(&self) -> &[String] {
        &self.inner.tags
    }

    /// The `wait` sent with blocking reads.
    pub fn wait(&self) -> Duration {
        self.inner.wait
    }

    /// Total per-request timeout: `wait * 17/16 + 10s`.
    pub fn request_timeout(&self) -> Duration {
        self.inner.request_timeout
    }

    /// `GET /v1/health/service/<name>`, never with `?passing` (warning weights need the
    /// warning instances; critical ones are filtered in [`super::to_discovered`]).
    ///
    /// `index: None` or `Some(0)` is a plain read answered at once; `Some(n)` with `n > 0`
    /// blocks until the service's index passes `n` or `wait` expires. An unknown service
    /// is `Ok` with no entries (Consul answers `200 []`).
    pub async fn health_service(
        &self,
        name: &str,
        index: Option<u64>,
    ) -> Result<HealthAnswer, ConsulError> {
        let url = self.url(&["health", "service", name], index, true);
        let (meta, body) = self.get(url).await?;
        let entries = decode_json(&body)?;
        Ok(HealthAnswer::from_parts(meta, entries))
    }

    /// `GET /v1/health/connect/<name>`: the service's mesh endpoints (its sidecar proxies and
    /// Connect-native instances), in the same shape and with the same blocking as
    /// [`Self::health_service`].
    pub async fn health_connect(
        &self,
        name: &str,
        index: Option<u64>,
    ) -> Result<HealthAnswer, ConsulError> {
        let url = self.url(&["health", "connect", name], index, true);
        let (meta, body) = self.get(url).await?;
        let entries = decode_json(&body)?;
        Ok(HealthAnswer::from_parts(meta, entries))
    }

    /// [`Self::health_connect`] when `connect`, else [`Self::health_service`].
    pub async fn health(
        &self,
        name: &str,
        connect: bool,
        index: Option<u64>,
    ) -> Result<HealthAnswer, ConsulError> {
        if connect {
            self.health_connect(name, index).await
        } else {
            self.health_service(name, index).await
        }
    }

    /// `GET /v1/agent/connect/ca/roots`, blocking on the roots' index.
    pub async fn connect_roots(
        &self,
        index: Option<u64>,
    ) -> Result<ConnectRootsAnswer, ConsulError> {
        let url = self.agent_url(&["agent", "connect", "ca", "roots"], index);
        let (meta, body) = self.get(url).await?;
        let raw: RawRoots = decode_json(&body)?;
        Ok(ConnectRootsAnswer::from_parts(meta, raw.into()))
    }

    /// `GET /v1/agent/connect/ca/leaf/<service>`, blocking until a new leaf is issued.
    pub async fn connect_leaf(
        &self,
        service: &str,
        index: Option<u64>,
    ) -> Result<ConnectLeafAnswer, ConsulError> {
        let url = self.agent_url(&["agent", "connect", "ca", "leaf", service], index);
        let (meta, body) = self.get(url).await?;
        let raw: RawLeaf = decode_json(&body)?;
        Ok(ConnectLeafAnswer::from_parts(
            meta,
            LeafAnswer::try_from(raw),
        ))
    }

    /// `GET /v1/catalog/services`: every service name with the union of its tags. Its index
    /// moves on registrations and instance updates, not on check status changes.
    pub async fn catalog_services(&self, index: Option<u64>) -> Result<CatalogAnswer, ConsulError> {
        let url = self.url(&["catalog", "services"], index, false);
        let (meta, body) = self.get(url).await?;
        let services = decode_catalog(&body).map_err(|source| ConsulError::Decode { source })?;
        Ok(CatalogAnswer::from_parts(meta, services))
    }

    /// `GET /v1/health/state/any`: every check of the datacenter. Its index moves on any
    /// check change, which makes it the change feed for many services.
    pub async fn health_state_any(&self, index: Option<u64>) -> Result<StateAnswer, ConsulError> {
        let url = self.url(&["health", "state", "any"], index, false);
        let (meta, body) = self.get(url).await?;
        let checks = decode_json(&body)?;
        Ok(StateAnswer::from_parts(meta, checks))
    }

    /// `PUT /v1/agent/service/register` with `payload` as JSON (re-registering the same ID
    /// replaces the entry). 403 is an ACL problem ([`ConsulError::is_acl`]).
    pub async fn register_service<T: serde::Serialize>(
        &self,
        payload: &T,
    ) -> Result<(), ConsulError> {
        let url = self.agent_url(&["agent", "service", "register"], None);
        self.agent_call(self.inner.http.put(url).json(payload))
            .await
            .map(drop)
    }

    /// `PUT /v1/agent/service/deregister/<id>`; an unknown ID is a 404 `Status` error.
    pub async fn deregister_service(&self, id: &str) -> Result<(), ConsulError> {
        let url = self.agent_url(&["agent", "service", "deregister", id], None);
        self.agent_call(self.inner.http.put(url)).await.map(drop)
    }

    /// `GET /v1/agent/service/<id>`: `true` when the local agent knows the service ID,
    /// `false` on 404.
    pub async fn agent_service(&self, id: &str) -> Result<bool, ConsulError> {
        let url = self.agent_url(&["agent", "service", id], None);
        match self.agent_call(self.inner.http.get(url)).await {
            Ok(_) => Ok(true),
            Err(ConsulError::Status { status, .. }) if status == StatusCode::NOT_FOUND => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Sends an agent request; non-2xx answers become errors with their plain-text body.
    async fn agent_call(&self, request: reqwest::RequestBuilder) -> Result<Bytes, ConsulError> {
        let mut response = request
            .timeout(AGENT_TIMEOUT)
            .send()
            .await
            .map_err(|e| map_reqwest(e, AGENT_TIMEOUT))?;
        let status = response.status();
        if !status.is_success() {
            let retry_after = parse_retry_after(response.headers());
            let body = read_body(&mut response, ERROR_BODY_LIMIT, AGENT_TIMEOUT)
                .await
                .unwrap_or_default();
            let body = String::from_utf8_lossy(&body).trim().to_owned();
            return Err(classify_status(status, body, retry_after));
        }
        read_body(&mut response, ERROR_BODY_LIMIT, AGENT_TIMEOUT).await
    }

    /// Builds `<base>/v1/<segments..>?dc=&tag=&stale&index=&wait=`. Segments are
    /// percent-encoded, so a service name cannot escape its path segment.
    pub(super) fn url(&self, segments: &[&str], index: Option<u64>, with_tags: bool) -> Url {
        let inner = &self.inner;
        let mut url = inner.base.clone();
        // Always Ok: resolve() only admits http(s) URLs with a host, which can be a base.
        if let Ok(mut path) = url.path_segments_mut() {
            path.pop_if_empty().push("v1").extend(segments);
        }
        {
            let mut query = url.query_pairs_mut();
            if let Some(dc) = &inner.datacenter {
                query.append_pair("dc", dc);
            }
            if with_tags {
                for tag in &inner.tags {
                    query.append_pair("tag", tag);
                }
                // A query parameter: in a body Consul silently ignores it (CONNECT.md §10.2).
                if let Some(filter) = &inner.filter {
                    query.append_pair("filter", filter);
                }
            }
            if inner.stale {
                query.append_key_only("stale");
            }
            // index=0 never blocks (a busy loop), so it is never sent.
            if let Some(index) = index.filter(|i| *i > 0) {
                query.append_pair("index", &index.to_string());
                query.append_pair("wait", &wait_param(inner.wait));
            }
        }
        if url.query() == Some("") {
            url.set_query(None);
        }
        url
    }

    /// An agent endpoint's URL: `index` and `wait` only (the agent serves its own datacenter,
    /// and `stale` and `tag` do not apply).
    fn agent_url(&self, segments: &[&str], index: Option<u64>) -> Url {
        let mut url = self.inner.base.clone();
        if let Ok(mut path) = url.path_segments_mut() {
            path.pop_if_empty().push("v1").extend(segments);
        }
        if let Some(index) = index.filter(|i| *i > 0) {
            url.query_pairs_mut()
                .append_pair("index", &index.to_string())
                .append_pair("wait", &wait_param(self.inner.wait));
        }
        url
    }

    async fn get(&self, url: Url) -> Result<(QueryMeta, Bytes), ConsulError> {
        let (meta, body) = self.get_or_missing(url, false).await?;
        Ok((meta, body.unwrap_or_default()))
    }

    /// [`Self::get`], where with `missing_ok` a 404 carrying index headers is `None` (a KV
    /// prefix with no keys, API.md §5) rather than an error.
    pub(super) async fn get_or_missing(
        &self,
        url: Url,
        missing_ok: bool,
    ) -> Result<(QueryMeta, Option<Bytes>), ConsulError> {
        let timeout = self.inner.request_timeout;
        let mut response = self
            .inner
            .http
            .get(url)
            .timeout(timeout)
            .send()
            .await
            .map_err(|e| map_reqwest(e, timeout))?;
        let status = response.status();
        if missing_ok && status == StatusCode::NOT_FOUND {
            if let Ok(meta) = parse_meta(response.headers()) {
                return Ok((meta, None));
            }
        }
        if !status.is_success() {
            let retry_after = parse_retry_after(response.headers());
            // The body only explains the status; failing to read it must not hide the status.
            let body = read_body(&mut response, ERROR_BODY_LIMIT, timeout)
                .await
                .unwrap_or_default();
            let body = String::from_utf8_lossy(&body).trim().to_owned();
            return Err(classify_status(status, body, retry_after));
        }
        let meta = parse_meta(response.headers())?;
        let body = read_body(&mut response, MAX_BODY, timeout).await?;
        if body.len() > MAX_BODY {
            return Err(ConsulError::BodyTooLarge { limit: MAX_BODY });
        }
        Ok((meta, Some(body)))
    }
}

/// `wait * 17/16 + 10s`, computed without overflow for any configured wait.
fn request_timeout(wait: Duration) -> Duration {
    wait.saturating_add(wait / 16).saturating_add(TIMEOUT_SLACK)
}

/// Go duration syntax in milliseconds, as Consul's Go client sends it (`60000ms`); a
/// positive sub-millisecond wait rounds up to `1ms` rather than to the 5-minute default.
pub(super) fn wait_param(wait: Duration) -> String {
    format!("{}ms", wait.as_millis().max(1))
}

fn decode_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ConsulError> {
    serde_json::from_slice(body).map_err(|source| ConsulError::Decode { source })
}

fn map_reqwest(source: reqwest::Error, after: Duration) -> ConsulError {
    if source.is_timeout() {
        ConsulError::Timeout { after, source }
    } else {
        ConsulError::Transport { source }
    }
}

/// Reads at most `limit + 1` bytes, so callers can tell "exactly at the limit" from "over".
async fn read_body(
    response: &mut reqwest::Response,
    limit: usize,
    timeout: Duration,
) -> Result<Bytes, ConsulError> {
    let mut buf = BytesMut::new();
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|e| map_reqwest(e, timeout))?
    {
        let room = (limit + 1).saturating_sub(buf.len());
        buf.extend_from_slice(&chunk[..chunk.len().min(room)]);
        if buf.len() > limit {
            break;
        }
    }
    Ok(buf.freeze())
}

/// Header names are matched case-insensitively by construction: `HeaderMap` stores them
/// lower-cased, whatever spelling Consul (`X-Consul-Knownleader`) or a proxy used.
pub(super) fn parse_meta(headers: &HeaderMap) -> Result<QueryMeta, ConsulError> {
    let text = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
    };
    let raw_index = text("x-consul-index");
    let index = raw_index
        .and_then(|v| v.parse::<u64>().ok())
        .ok_or_else(|| ConsulError::MissingIndex {
            value: raw_index.map(str::to_owned),
        })?;
    Ok(QueryMeta {
        index,
        known_leader: text("x-consul-knownleader").is_none_or(|v| !v.eq_ignore_ascii_case("false")),
        last_contact: text("x-consul-lastcontact")
            .and_then(|v| v.parse::<u64>().ok())
            .map(Duration::from_millis)
            .unwrap_or_default(),
        filtered_by_acls: text("x-consul-results-filtered-by-acls")
            .is_some_and(|v| v.eq_ignore_ascii_case("true")),
    })
}

/// `Retry-After` in its delta-seconds form; the HTTP-date form is ignored (Consul does not
/// send it), which falls back to the normal backoff.
pub(super) fn parse_retry_after(headers: &HeaderMap) -> Option<Duration> {
    headers
        .get(RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse::<u64>()
        .ok()
        .map(Duration::from_secs)
}

pub(super) fn classify_status(
    status: StatusCode,
    body: String,
    retry_after: Option<Duration>,
) -> ConsulError {
    // Consul may prefix RPC errors ("rpc error making call: ACL not found").
    if status == StatusCode::FORBIDDEN && body.to_ascii_lowercase().contains("acl not found") {
        return ConsulError::AclNotFound;
    }
    if status == StatusCode::TOO_MANY_REQUESTS {
        return ConsulError::RateLimited { retry_after };
    }
    // A bad `?filter=` is a 500 raised in the server's RPC (CONNECT.md §10.2); its text is the
    // only way to tell it from a transient server error.
    if status == StatusCode::INTERNAL_SERVER_ERROR
        && body.contains("Failed to create boolean expression evaluator")
    {
        return ConsulError::BadFilter { message: body };
    }
    ConsulError::Status { status, body }
}

fn token_header(token: &TokenSource) -> Result<HeaderValue, ConsulError> {
    match token {
        // resolve() already checked inline tokens are visible ASCII.
        TokenSource::Inline(t) => {
            HeaderValue::from_str(t).map_err(|source| ConsulError::InvalidToken { source })
        }
        TokenSource::File(path) => {
            let text = std::fs::read_to_string(path).map_err(|source| ConsulError::File {
                path: path.clone(),
                source,
            })?;
            let token = text.trim();
            if token.is_empty() {
                return Err(ConsulError::InvalidFile {
                    path: path.clone(),
                    reason: "token file is empty",
                });
            }
            if !token.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(ConsulError::InvalidFile {
                    path: path.clone(),
                    reason: "token must be printable ASCII without spaces",
                });
            }
            HeaderValue::from_str(token).map_err(|_| ConsulError::InvalidFile {
                path: path.clone(),
                reason: "token must be printable ASCII without spaces",
            })
        }
    }
}

// === TLS ===

fn tls_config(settings: &ConsulSettings) -> Result<rustls::ClientConfig, ConsulError> {
    if !settings.is_tls() {
        // Nothing to verify over plain http; empty roots make any stray https fail closed.
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        return Ok(rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| ConsulError::Tls { source: e.into() })?
            .with_root_certificates(RootCertStore::empty())
            .with_no_client_auth());
    }
    let tls = &settings.tls;
    if tls.insecure_skip_verify {
        tracing::warn!(
            consul.address = %settings.address,
            "TLS certificate verification for Consul is disabled (insecure_skip_verify)"
        );
    }
    // Same TLS building as for upstreams: one place knows rustls.
    let upstream = crate::tls::UpstreamTls {
        ca_file: tls.ca_file.clone(),
        client_cert: tls.client_cert.clone(),
        server_name: None,
        insecure_skip_verify: tls.insecure_skip_verify,
    };
    crate::tls::client_config(&upstream).map_err(|source| ConsulError::Tls { source })
}
