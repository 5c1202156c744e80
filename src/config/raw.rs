//! The serde model of the configuration file: lenient types (strings for durations, sizes and
//! policies) so that `validate` can report every problem at once with its key path.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Keys that are not part of the model; collected so each can be reported with its path.
pub type Unknown = BTreeMap<String, serde_json::Value>;

/// The whole file.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct RawConfig {
    /// Main listener address. Default `0.0.0.0:8080`.
    pub listen: String,
    /// Runtime worker threads; default: one per core.
    pub workers: Option<usize>,
    /// Bearer token for the admin listener (`MESHGATE_ADMIN_TOKEN`).
    pub admin_token: Option<String>,
    /// Where services come from.
    pub discovery: RawDiscovery,
    /// Connection pool to upstreams.
    pub upstream: RawUpstream,
    /// Downstream connection limits and timeouts.
    pub server: RawServer,
    /// Global CORS policy; absent means the gateway adds no CORS headers.
    pub cors: Option<RawCors>,
    /// TLS listener.
    pub tls: Option<RawTls>,
    /// Admin listener.
    pub admin: RawAdmin,
    /// Prometheus metrics.
    pub metrics: RawMetrics,
    /// Logging.
    pub log: RawLog,
    /// OpenTelemetry trace export.
    pub tracing: RawTracing,
    /// The route table.
    pub routes: Vec<RawRoute>,
    /// Named edge policies routes refer to.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub policies: BTreeMap<String, RawPolicy>,
    /// The store of global rate limits.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub redis: Option<super::ratelimit::raw::RawRedis>,
    /// Keys the model does not know; each is reported by `validate`.
    #[serde(flatten, skip_serializing)]
    pub unknown: Unknown,
}

impl Default for RawConfig {
    fn default() -> Self {
        Self {
            listen: "0.0.0.0:8080".into(),
            workers: None,
            admin_token: None,
            discovery: RawDiscovery::default(),
            upstream: RawUpstream::default(),
            server: RawServer::default(),
            cors: None,
            tls: None,
            admin: RawAdmin::default(),
            metrics: RawMetrics::default(),
            log: RawLog::default(),
            tracing: RawTracing::default(),
            routes: Vec::new(),
            policies: BTreeMap::new(),
            redis: None,
            unknown: Unknown::new(),
        }
    }
}

/// `[discovery]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct RawDiscovery {
    /// `static` (default) or `consul`.
    pub provider: String,
    /// `[discovery.static]`: named services with fixed endpoints; usable with either provider.
    #[serde(rename = "static")]
    pub static_: RawStatic,
    /// `[discovery.consul]`: used when `provider = "consul"`.
    pub consul: crate::discovery::consul::RawConsul,
    /// Keys the model does not know; each is reported by `validate`.
    #[serde(flatten, skip_serializing)]
    pub unknown: Unknown,
}

impl Default for RawDiscovery {
    fn default() -> Self {
        Self {
            provider: "static".into(),
            static_: RawStatic::default(),
            consul: crate::discovery::consul::RawConsul::default(),
            unknown: Unknown::new(),
        }
    }
}

/// `[discovery.static]`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct RawStatic {
    /// Service name to targets.
    pub services: BTreeMap<String, Vec<RawTarget>>,
    /// Keys the model does not know; each is reported by `validate`.
    #[serde(flatten, skip_serializing)]
    pub unknown: Unknown,
}

/// A target: `"http://host:port"` or `{ url = "...", weight = 3 }`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
pub enum RawTarget {
    /// A bare URL with weight 1.
    Url(String),
    /// A URL with a weight.
    Weighted {
        /// `http://host:port`.
        url: String,
        /// Relative weight, default 1; 0 takes no traffic.
        #[serde(default)]
        weight: Option<i64>,
    },
}

/// `[upstream]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct RawUpstream {
    /// TCP connect timeout. Default `2s`.
    pub connect_timeout: String,
    /// How long an idle pooled connection is kept. Default `90s`.
    pub idle_timeout: String,
    /// Idle connections kept per endpoint. Default 64.
    pub max_idle_per_host: i64,
    /// Keys the model does not know; each is reported by `validate`.
    #[serde(flatten, skip_serializing)]
    pub unknown: Unknown,
}

impl Default for RawUpstream {
    fn default() -> Self {
        Self {
            connect_timeout: "2s".into(),
            idle_timeout: "90s".into(),
            max_idle_per_host: 64,
            unknown: Unknown::new(),
        }
    }
}

/// `[server]`: the downstream side.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct RawServer {
    /// Largest request head (request line plus headers); beyond it the answer is 431. Default `64KiB`.
    pub max_header_bytes: RawSize,
    /// Most header fields in an HTTP/1.1 request head; beyond it the answer is 431. Default 100.
    pub max_headers: i64,
    /// Time a client has to send its request head. Default `10s`.
    pub header_read_timeout: String,
    /// How long an idle keep-alive connection waits for its next request. Default `60s`.
    pub keep_alive_timeout: String,
    /// The longest silence between two reads of a request body; then 408. Default `30s`.
    pub body_read_timeout: String,
    /// Most concurrent downstream connections; further ones wait in the accept queue. Default 10000.
    pub max_connections: i64,
    /// On shutdown, how long `/ready` fails before the listener closes. Default `5s`.
    pub drain_delay: String,
    /// On shutdown, how long in-flight requests may take to finish. Default `30s`.
    pub grace_period: String,
    /// `%2F`, `%5C` and `\` in a path: `keep`, `reject` (400) or `unescape` (to `/`, then
    /// dot segments removed). Default `keep`.
    pub escaped_slashes: String,
    /// Collapse runs of `/` in a path before routing. Default `false`.
    pub merge_slashes: bool,
    /// Streams one HTTP/2 connection may have open at once; more are refused. Default 100.
    pub h2_max_concurrent_streams: i64,
    /// `SO_REUSEPORT` on the listeners, so a new process can bind the same ports while this
    /// one drains (zero-downtime restart). Default false.
    pub reuse_port: bool,
    /// Proxies (CIDRs) whose `X-Forwarded-For` names the client. Default none.
    pub trusted_proxies: Vec<String>,
    /// Keys the model does not know; each is reported by `validate`.
    #[serde(flatten, skip_serializing)]
    pub unknown: Unknown,
}

impl Default for RawServer {
    fn default() -> Self {
        Self {
            max_header_bytes: RawSize::Text("64KiB".into()),
            max_headers: 100,
            header_read_timeout: "10s".into(),
            keep_alive_timeout: "60s".into(),
            body_read_timeout: "30s".into(),
            max_connections: 10_000,
            drain_delay: "5s".into(),
            grace_period: "30s".into(),
            escaped_slashes: "keep".into(),
            merge_slashes: false,
            h2_max_concurrent_streams: 100,
            reuse_port: false,
            trusted_proxies: Vec::new(),
            unknown: Unknown::new(),
        }
    }
}

/// A byte size: a number of bytes or a string such as `"10MiB"`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
pub enum RawSize {
    /// Bytes.
    Bytes(i64),
    /// With a unit: B, KB, KiB, MB, MiB, GB, GiB.
    Text(String),
}

/// `[cors]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct RawCors {
    /// Allowed origins, or `["*"]`.
    pub allowed_origins: Vec<String>,
    /// Methods a preflight may ask for.
    pub allowed_methods: Vec<String>,
    /// Request headers a preflight may ask for.
    pub allowed_headers: Vec<String>,
    /// Response headers scripts may read.
    pub expose_headers: Vec<String>,
    /// Whether credentials are allowed; refused together with `"*"`.
    pub allow_credentials: bool,
    /// How long browsers may cache a preflight. Default `10m`.
    pub max_age: String,
    /// Keys the model does not know; each is reported by `validate`.
    #[serde(flatten, skip_serializing)]
    pub unknown: Unknown,
}

impl Default for RawCors {
    fn default() -> Self {
        Self {
            allowed_origins: Vec::new(),
            allowed_methods: ["GET", "POST", "PUT", "DELETE", "OPTIONS"]
                .map(String::from)
                .into(),
            allowed_headers: ["Content-Type", "Authorization"].map(String::from).into(),
            expose_headers: Vec::new(),
            allow_credentials: false,
            max_age: "10m".into(),
            unknown: Unknown::new(),
        }
    }
}

/// `[tls]`: a TLS listener serving HTTP/1.1 and HTTP/2 (ALPN) next to the plain one.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct RawTls {
    /// TLS listener address, e.g. `"0.0.0.0:8443"`.
    pub listen: Option<String>,
    /// Default certificate chain (PEM).
    pub cert_file: Option<String>,
    /// Its private key (PEM).
    pub key_file: Option<String>,
    /// More certificates, chosen by SNI.
    pub certificates: Vec<RawCert>,
    /// Keys the model does not know; each is reported by `validate`.
    #[serde(flatten, skip_serializing)]
    pub unknown: Unknown,
}

/// One SNI certificate.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct RawCert {
    /// Certificate chain (PEM).
    pub cert_file: String,
    /// Private key (PEM).
    pub key_file: String,
    /// Names it serves; default: the certificate's DNS names.
    pub names: Vec<String>,
    /// Keys the model does not know; each is reported by `validate`.
    #[serde(flatten, skip_serializing)]
    pub unknown: Unknown,
}

/// `upstream_tls = { ... }` on a route with `https://` or `wss://` targets.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct RawUpstreamTls {
    /// Trust these CAs (PEM) instead of the system's.
    pub ca_file: Option<String>,
    /// Client certificate (PEM) for mutual TLS.
    pub cert_file: Option<String>,
    /// Its key.
    pub key_file: Option<String>,
    /// Name to verify and send as SNI instead of the endpoint's host.
    pub server_name: Option<String>,
    /// Do not verify the upstream's certificate.
    pub insecure_skip_verify: bool,
    /// Keys the model does not know; each is reported by `validate`.
    #[serde(flatten, skip_serializing)]
    pub unknown: Unknown,
}

/// `[admin]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct RawAdmin {
    /// Admin listener; `""` turns it off. Default `127.0.0.1:9901`.
    pub listen: String,
    /// Also answer `/health` and `/status` on the main listener, as the seed does. Default true.
    pub expose_on_main: bool,
    /// Keys the model does not know; each is reported by `validate`.
    #[serde(flatten, skip_serializing)]
    pub unknown: Unknown,
}

impl Default for RawAdmin {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:9901".into(),
            expose_on_main: true,
            unknown: Unknown::new(),
        }
    }
}

/// `[metrics]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct RawMetrics {
    /// Record per-route and per-endpoint figures on the request path. Default true.
    pub enabled: bool,
    /// Keys the model does not know; each is reported by `validate`.
    #[serde(flatten, skip_serializing)]
    pub unknown: Unknown,
}

impl Default for RawMetrics {
    fn default() -> Self {
        Self {
            enabled: true,
            unknown: Unknown::new(),
        }
    }
}

/// `[log]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct RawLog {
    /// A `RUST_LOG`-style filter. Default `info`; `RUST_LOG` wins when set.
    pub level: String,
    /// `text` (default) or `json`.
    pub format: String,
    /// Access log, one line per request on stdout: `off` (default), `text` or `json`.
    pub access: String,
    /// Keys the model does not know; each is reported by `validate`.
    #[serde(flatten, skip_serializing)]
    pub unknown: Unknown,
}

impl Default for RawLog {
    fn default() -> Self {
        Self {
            level: "info".into(),
            format: "text".into(),
            access: "off".into(),
            unknown: Unknown::new(),
        }
    }
}

/// `[tracing]`: OpenTelemetry trace export. Unset keys fall back to the standard `OTEL_*`
/// variables (a value here always beats the environment), then to the defaults.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct RawTracing {
    /// Export spans. Default: on when an endpoint is configured here or in
    /// `OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT` (and `OTEL_SDK_DISABLED` is not true).
    pub enabled: Option<bool>,
    /// The collector's base URL, e.g. `"http://otel-collector:4318"`; `/v1/traces` is appended
    /// for `http/protobuf`. Default `OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT`, else
    /// `http://localhost:4318` (`http://localhost:4317` for gRPC).
    pub endpoint: Option<String>,
    /// `http/protobuf` (default) or `grpc`. Default `OTEL_EXPORTER_OTLP_[TRACES_]PROTOCOL`.
    pub protocol: Option<String>,
    /// Share of new traces recorded, 0 to 1, parent-based (a caller's sampled flag is followed).
    /// Default `OTEL_TRACES_SAMPLER`/`OTEL_TRACES_SAMPLER_ARG`, else every request.
    pub sample_ratio: Option<f64>,
    /// `service.name`. Default `OTEL_SERVICE_NAME`, else `"meshgate"`.
    pub service_name: Option<String>,
    /// Keys the model does not know; each is reported by `validate`.
    #[serde(flatten, skip_serializing)]
    pub unknown: Unknown,
}

/// One `[[routes]]` entry.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct RawRoute {
    /// Name used in logs, metrics and `/status`; default `route-<index>`.
    pub name: Option<String>,
    /// Path prefix matched on segment boundaries; `/x/*` means the same as `/x`.
    pub path: Option<String>,
    /// Fixed upstreams for this route (an anonymous service).
    pub targets: Option<Vec<RawTarget>>,
    /// A discovered service.
    pub service: Option<String>,
    /// Balancing policy. Default `round_robin`.
    pub load_balancer: String,
    /// Path rewrites, applied in order.
    pub path_rewrite: Vec<RawRewrite>,
    /// Time allowed until the upstream's response headers arrive. Default `30s`.
    pub timeout: String,
    /// Pass the client's Host upstream (true) or use the endpoint's authority. Default true.
    pub preserve_host: bool,
    /// Changes to the request on its way upstream.
    pub request_headers: RawHeaderOps,
    /// Changes to the response on its way back.
    pub response_headers: RawHeaderOps,
    /// Custom error answer used for every gateway error on this route.
    pub error: Option<RawErrorPage>,
    /// Largest request body accepted (413 beyond). Default unlimited.
    pub max_body: Option<RawSize>,
    /// TLS settings for `https://` and `wss://` targets.
    pub upstream_tls: Option<RawUpstreamTls>,
    /// Relay WebSocket and other HTTP/1.1 upgrades. Default true.
    pub websocket: bool,
    /// Reach the route's `service` through the Consul service mesh (Connect mTLS to its
    /// sidecars); default `discovery.consul.connect.enabled`. Not for `targets`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connect: Option<bool>,
    /// Close an upgraded connection after this much silence in both directions. Default: never.
    pub websocket_idle_timeout: Option<String>,
    /// Retry policy.
    pub retry: RawRetry,
    /// Once response headers arrived, the longest a response may stream. Default: no limit.
    pub stream_timeout: Option<String>,
    /// Active health probes for the route's service.
    pub health_check: Option<RawHealthCheck>,
    /// New endpoints wait for a passing probe before taking traffic. Default false.
    pub start_unhealthy: bool,
    /// Passive ejection of failing endpoints of the route's service.
    pub outlier: Option<RawOutlier>,
    /// Ramp a (re)joining endpoint's share up over this time. Default `"0s"` (off).
    pub slow_start: String,
    /// Below this percentage of available endpoints, spread over all of them. Default off.
    pub panic_threshold: Option<f64>,
    /// Concurrent requests to the route's service; beyond them requests queue. Default unlimited.
    pub max_requests: Option<i64>,
    /// Requests allowed to queue for `max_requests`; beyond them the answer is 503. Default 0.
    pub max_pending: Option<i64>,
    /// Rate limit for this route (see `[policies.NAME]` for one shared by several routes).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<super::ratelimit::raw::RawRateLimit>,
    /// Named policies (`[policies.NAME]`) this route uses.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub policies: Vec<String>,
    /// Authentication (JWT, API keys or forward auth). Default: none.
    pub auth: Option<super::auth::raw::RawAuth>,
    /// Response caching. Default off.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cache: Option<RawCache>,
    /// Keys the model does not know; each is reported by `validate`.
    #[serde(flatten, skip_serializing)]
    pub unknown: Unknown,
}

/// `retry = { ... }`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct RawRetry {
    /// Attempts in all, the first included; 1 turns retries off. Default 3.
    pub attempts: i64,
    /// First backoff; doubles per retry with jitter. Default `100ms`.
    pub backoff: String,
    /// Backoff cap. Default `1s`.
    pub max_backoff: String,
    /// Time for one attempt's response headers. Default: the route's `timeout`.
    pub per_try_timeout: Option<String>,
    /// Conditions: `connect-failure`, `reset`, `timeout`, or status codes such as `"503"`.
    pub on: Vec<String>,
    /// Retries allowed as a share of requests in flight, e.g. `"20%"`; at least 10 at a time,
    /// and beyond that what earlier requests saved (this share of a retry each, up to 100).
    pub budget: String,
    /// Bodies up to this size are kept for replay; larger ones stream and are not retried. Default `64KiB`.
    pub max_body: RawSize,
    /// Keys the model does not know; each is reported by `validate`.
    #[serde(flatten, skip_serializing)]
    pub unknown: Unknown,
}

impl Default for RawRetry {
    fn default() -> Self {
        Self {
            attempts: 3,
            backoff: "100ms".into(),
            max_backoff: "1s".into(),
            per_try_timeout: None,
            on: ["connect-failure", "reset", "502", "503", "504"]
                .map(String::from)
                .into(),
            budget: "20%".into(),
            max_body: RawSize::Text("64KiB".into()),
            unknown: Unknown::new(),
        }
    }
}

/// `health_check = { ... }`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct RawHealthCheck {
    /// Probe path. Default `/health`.
    pub path: String,
    /// Probe method. Default `GET`.
    pub method: String,
    /// Time between probes of one endpoint. Default `10s`.
    pub interval: String,
    /// Probe timeout. Default `2s`.
    pub timeout: String,
    /// Passing statuses, e.g. `"200-299"` or `"200,204"`. Default `200-299`.
    pub expected_status: String,
    /// Passing probes in a row before an unhealthy endpoint is healthy again. Default 2.
    pub healthy_threshold: i64,
    /// Failing probes in a row before a healthy endpoint is unhealthy. Default 3.
    pub unhealthy_threshold: i64,
    /// Random extra delay per round, so probes of many gateways do not align. Default `1s`.
    pub jitter: String,
    /// A plain TCP connect instead of an HTTP request. Default false.
    pub tcp: bool,
    /// Keys the model does not know; each is reported by `validate`.
    #[serde(flatten, skip_serializing)]
    pub unknown: Unknown,
}

impl Default for RawHealthCheck {
    fn default() -> Self {
        Self {
            path: "/health".into(),
            method: "GET".into(),
            interval: "10s".into(),
            timeout: "2s".into(),
            expected_status: "200-299".into(),
            healthy_threshold: 2,
            unhealthy_threshold: 3,
            jitter: "1s".into(),
            tcp: false,
            unknown: Unknown::new(),
        }
    }
}

/// `outlier = { ... }`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct RawOutlier {
    /// 5xx answers in a row that eject; 0 = off. Default 5.
    pub consecutive_5xx: i64,
    /// Gateway failures (502, 503, 504, connect failures, timeouts) in a row that eject; 0 = off. Default 3.
    pub consecutive_gateway_failures: i64,
    /// Ejection time, multiplied by the number of ejections so far. Default `30s`.
    pub base_ejection_time: String,
    /// Cap on one ejection. Default `300s`.
    pub max_ejection_time: String,
    /// Most of the pool that may be ejected at once, in percent. Default 50.
    pub max_ejection_percent: i64,
    /// Keys the model does not know; each is reported by `validate`.
    #[serde(flatten, skip_serializing)]
    pub unknown: Unknown,
}

impl Default for RawOutlier {
    fn default() -> Self {
        Self {
            consecutive_5xx: 5,
            consecutive_gateway_failures: 3,
            base_ejection_time: "30s".into(),
            max_ejection_time: "300s".into(),
            max_ejection_percent: 50,
            unknown: Unknown::new(),
        }
    }
}

impl Default for RawRoute {
    fn default() -> Self {
        Self {
            name: None,
            path: None,
            targets: None,
            service: None,
            load_balancer: "round_robin".into(),
            path_rewrite: Vec::new(),
            timeout: "30s".into(),
            preserve_host: true,
            request_headers: RawHeaderOps::default(),
            response_headers: RawHeaderOps::default(),
            error: None,
            max_body: None,
            upstream_tls: None,
            websocket: true,
            connect: None,
            websocket_idle_timeout: None,
            retry: RawRetry::default(),
            stream_timeout: None,
            health_check: None,
            start_unhealthy: false,
            outlier: None,
            slow_start: "0s".into(),
            panic_threshold: None,
            max_requests: None,
            max_pending: None,
            rate_limit: None,
            policies: Vec::new(),
            auth: None,
            cache: None,
            unknown: Unknown::new(),
        }
    }
}

/// One rewrite step: exactly one of the keys.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct RawRewrite {
    /// Remove this prefix (on a segment boundary) when present.
    pub strip_prefix: Option<String>,
    /// Put this prefix in front.
    pub add_prefix: Option<String>,
    /// Replace prefix `from` with `to` when present.
    pub replace_prefix: Option<RawReplace>,
    /// Keys the model does not know; each is reported by `validate`.
    #[serde(flatten, skip_serializing)]
    pub unknown: Unknown,
}

/// `{ from = "/a", to = "/b" }`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct RawReplace {
    /// Prefix to look for.
    pub from: String,
    /// Its replacement.
    pub to: String,
    /// Keys the model does not know; each is reported by `validate`.
    #[serde(flatten, skip_serializing)]
    pub unknown: Unknown,
}

/// Header changes: `add` appends, `set` replaces, `remove` deletes (applied remove, set, add).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct RawHeaderOps {
    /// Appended values.
    pub add: BTreeMap<String, String>,
    /// Values that replace any existing ones.
    pub set: BTreeMap<String, String>,
    /// Headers removed.
    pub remove: Vec<String>,
    /// Keys the model does not know; each is reported by `validate`.
    #[serde(flatten, skip_serializing)]
    pub unknown: Unknown,
}

/// A custom error answer.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct RawErrorPage {
    /// Status to answer with; default: the error's own status.
    pub status: Option<i64>,
    /// Default `application/json`.
    pub content_type: Option<String>,
    /// The body, sent as is.
    pub body: String,
    /// Keys the model does not know; each is reported by `validate`.
    #[serde(flatten, skip_serializing)]
    pub unknown: Unknown,
}

/// `[policies.NAME]`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct RawPolicy {
    /// A rate limit whose buckets every route naming this policy shares.
    pub rate_limit: Option<super::ratelimit::raw::RawRateLimit>,
    /// Authentication for every route naming this policy.
    pub auth: Option<super::auth::raw::RawAuth>,
    /// Cache settings for every route naming this policy (each route keeps its own store).
    pub cache: Option<RawCache>,
    /// Keys the model does not know; each is reported by `validate`.
    #[serde(flatten, skip_serializing)]
    pub unknown: Unknown,
}

/// `cache = { ... }`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct RawCache {
    /// Bytes the route's store may hold. Default `256MiB`.
    pub max_size: RawSize,
    /// Larger answers stream through uncached. Default `8MiB`.
    pub max_object_size: RawSize,
    /// Freshness for cacheable answers without their own. Default `0s` (not stored).
    pub default_ttl: String,
    /// Key parts: `method`, `host`, `path`, `query`, `header:NAME`.
    pub key: Vec<String>,
    /// Serve stale while one request revalidates. Default `0s`.
    pub stale_while_revalidate: String,
    /// Serve stale when the upstream fails. Default `0s`.
    pub stale_if_error: String,
    /// Store answers that set cookies. Default false.
    pub cache_set_cookie: bool,
    /// How long concurrent misses wait for the one request sent upstream. Default `5s`.
    pub lock_timeout: String,
    /// Keys the model does not know; each is reported by `validate`.
    #[serde(flatten, skip_serializing)]
    pub unknown: Unknown,
}

impl Default for RawCache {
    fn default() -> Self {
        Self {
            max_size: RawSize::Text("256MiB".into()),
            max_object_size: RawSize::Text("8MiB".into()),
            default_ttl: "0s".into(),
            key: ["method", "host", "path", "query"].map(String::from).into(),
            stale_while_revalidate: "0s".into(),
            stale_if_error: "0s".into(),
            cache_set_cookie: false,
            lock_timeout: "5s".into(),
            unknown: Unknown::new(),
        }
    }
}
