//! The telemetry's own settings: the access log and log filter (`[log]`) and OpenTelemetry trace
//! export (`[tracing]` with the `OTEL_*` variables), as `config` resolves them.

use std::fmt;
use std::time::Duration;

use serde::{Serialize, Serializer};

/// The OTLP transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum OtlpProtocol {
    /// `http/protobuf`: `POST {endpoint}` with a protobuf body (the default).
    #[serde(rename = "http/protobuf")]
    HttpProtobuf,
    /// `grpc`: the OTLP gRPC service over HTTP/2.
    #[serde(rename = "grpc")]
    Grpc,
}

/// The sampler for spans that start a trace (the root sampler).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RootSampler {
    /// Every trace.
    AlwaysOn,
    /// No trace.
    AlwaysOff,
    /// This share of traces (0 to 1), decided from the trace id.
    TraceIdRatio(f64),
}

/// Which requests are traced.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct SamplerConfig {
    /// Decides for requests without a parent (no `traceparent`), or for all when not parent-based.
    pub root: RootSampler,
    /// Follow the caller's decision (`traceparent` flags) when there is one.
    pub parent_based: bool,
}

impl SamplerConfig {
    /// The `OTEL_TRACES_SAMPLER` name of this sampler.
    pub fn name(&self) -> &'static str {
        match (self.parent_based, self.root) {
            (false, RootSampler::AlwaysOn) => "always_on",
            (false, RootSampler::AlwaysOff) => "always_off",
            (false, RootSampler::TraceIdRatio(_)) => "traceidratio",
            (true, RootSampler::AlwaysOn) => "parentbased_always_on",
            (true, RootSampler::AlwaysOff) => "parentbased_always_off",
            (true, RootSampler::TraceIdRatio(_)) => "parentbased_traceidratio",
        }
    }
}

/// Headers sent with every export (`OTEL_EXPORTER_OTLP_HEADERS`). They usually carry API keys,
/// so `Debug` and `Serialize` show the names only.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct ExportHeaders(pub Vec<(String, String)>);

impl fmt::Debug for ExportHeaders {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map()
            .entries(self.0.iter().map(|(k, _)| (k, "<redacted>")))
            .finish()
    }
}

impl Serialize for ExportHeaders {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(self.0.iter().map(|(k, _)| (k, "<redacted>")))
    }
}

/// Batching of finished spans before export (`OTEL_BSP_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct BatchConfig {
    /// Longest time a finished span waits before its batch is sent (`OTEL_BSP_SCHEDULE_DELAY`,
    /// milliseconds; default 5000).
    #[serde(with = "humantime_serde")]
    pub schedule_delay: Duration,
    /// Finished spans held while waiting; beyond it new spans are dropped and counted
    /// (`OTEL_BSP_MAX_QUEUE_SIZE`, default 2048).
    pub max_queue: usize,
    /// Most spans in one export request (`OTEL_BSP_MAX_EXPORT_BATCH_SIZE`, default 512).
    pub max_batch: usize,
}

/// Validated `[tracing]`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TracingConfig {
    /// Export spans. Default: on when an endpoint is configured (file or environment).
    pub enabled: bool,
    /// Transport.
    pub protocol: OtlpProtocol,
    /// Where spans go: the full URL for `http/protobuf` (`.../v1/traces`), the collector's
    /// base URL for `grpc`.
    pub endpoint: String,
    /// Extra request headers (gRPC metadata).
    pub headers: ExportHeaders,
    /// Limit on one export request (`OTEL_EXPORTER_OTLP_TIMEOUT`, default 10s).
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Which requests are traced.
    pub sampler: SamplerConfig,
    /// `service.name` of the resource.
    pub service_name: String,
    /// Other resource attributes (`OTEL_RESOURCE_ATTRIBUTES`), in the given order.
    pub resource: Vec<(String, String)>,
    /// Batching.
    pub batch: BatchConfig,
}

impl Default for TracingConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            protocol: OtlpProtocol::HttpProtobuf,
            endpoint: format!("{DEFAULT_HTTP_ENDPOINT}{TRACES_PATH}"),
            headers: ExportHeaders::default(),
            timeout: Duration::from_secs(10),
            sampler: SamplerConfig {
                root: RootSampler::AlwaysOn,
                parent_based: true,
            },
            service_name: DEFAULT_SERVICE_NAME.to_owned(),
            resource: Vec::new(),
            batch: BatchConfig {
                schedule_delay: Duration::from_secs(5),
                max_queue: 2048,
                max_batch: 512,
            },
        }
    }
}

/// `service.name` when neither the file nor `OTEL_SERVICE_NAME` sets one.
pub const DEFAULT_SERVICE_NAME: &str = "meshgate";
/// The OTLP/HTTP collector when no endpoint is given.
pub const DEFAULT_HTTP_ENDPOINT: &str = "http://localhost:4318";
/// The OTLP/gRPC collector when no endpoint is given.
pub const DEFAULT_GRPC_ENDPOINT: &str = "http://localhost:4317";
/// The OTLP/HTTP traces path appended to a base endpoint.
pub const TRACES_PATH: &str = "/v1/traces";

/// `[log]`.
#[derive(Debug, Clone)]
pub struct LogConfig {
    /// Filter directives.
    pub level: String,
    /// JSON lines instead of text.
    pub json: bool,
    /// One line per request on stdout (`[log] access`).
    pub access: AccessLogFormat,
}

/// `[log] access`: the access log's format, or off.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AccessLogFormat {
    /// No access log (the default).
    #[default]
    Off,
    /// `key=value` pairs (logfmt).
    Text,
    /// One JSON object per line.
    Json,
}
