//! Telemetry: the log subscriber (a `RUST_LOG`-style filter, text or JSON lines), OpenTelemetry
//! trace export over OTLP with W3C trace-context propagation, and the access log. The only
//! module that touches opentelemetry; the request path calls the small helpers at the bottom.
//!
//! # Process-wide state
//! [`Tracing::build`] touches no global: spans reach its pipeline only through the layer from
//! [`Tracing::layer`], added to whatever subscriber the caller installs ([`init`] installs the
//! global one in `main`; tests install [`subscriber`] per thread with
//! `tracing::subscriber::set_default`). Propagation uses a `TraceContextPropagator` value, not
//! the global propagator. The gateway learns that tracing is on from the [`RequestTelemetry`]
//! given to `Gateway::build_with_telemetry`.

mod access;
mod export;
mod propagation;
pub mod settings;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::header::{HeaderMap, HeaderValue, HOST};
use http::uri::Authority;
use http::{Method, Request, Response, StatusCode};
use opentelemetry::propagation::TextMapPropagator as _;
use opentelemetry::trace::{SpanKind, TraceContextExt as _, TracerProvider as _};
use opentelemetry::{InstrumentationScope, KeyValue};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{
    IdGenerator as _, RandomIdGenerator, Sampler, SamplingDecision, SdkTracer, SdkTracerProvider,
    ShouldSample as _,
};
use opentelemetry_sdk::Resource;
use tracing::field::Empty;
use tracing::{Level, Metadata, Span, Subscriber};
use tracing_opentelemetry::OpenTelemetrySpanExt as _;
use tracing_subscriber::filter::{filter_fn, FilterExt as _};
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::{EnvFilter, Layer, Registry};

pub use access::{AccessFormat, AccessLog, RequestLog};
pub use export::{ExportStats, TracingError};
pub use propagation::TRACEPARENT;

use crate::balancer::Endpoint;
use propagation::{HeaderExtractor, HeaderInjector, TRACESTATE};
use settings::{AccessLogFormat, LogConfig};
use settings::{RootSampler, TracingConfig};

/// Target of the request and upstream spans. Only spans with this target (and warnings inside
/// them, as span events) reach OpenTelemetry; the log output leaves these spans out.
pub const TRACE_TARGET: &str = "meshgate::trace";

/// How long [`Tracing::shutdown`] waits for the last batches at most.
const SHUTDOWN_LIMIT: Duration = Duration::from_secs(5);

/// A running trace pipeline: tracer provider, bounded span queue and export thread.
///
/// Dropping it (or [`Tracing::shutdown`]) exports what is queued, waiting 5 s at most, and
/// stops the thread; call it after `Gateway::run` returns so the last requests' spans go out.
pub struct Tracing {
    provider: SdkTracerProvider,
    tracer: SdkTracer,
    /// The configured sampler; applied by the request path before a span exists.
    sampler: Sampler,
    stats: Arc<ExportStats>,
    worker: export::Worker,
}

impl std::fmt::Debug for Tracing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tracing")
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

impl Tracing {
    /// Builds the pipeline from `[tracing]`; `Ok(None)` when tracing is off.
    pub fn build(cfg: &TracingConfig) -> Result<Option<Self>, TracingError> {
        if !cfg.enabled {
            return Ok(None);
        }
        let resource = Resource::builder_empty()
            .with_detector(Box::new(
                opentelemetry_sdk::resource::TelemetryResourceDetector,
            ))
            .with_attributes(
                cfg.resource
                    .iter()
                    .map(|(k, v)| KeyValue::new(k.clone(), v.clone())),
            )
            .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
            .with_service_name(cfg.service_name.clone())
            .build();
        let stats = Arc::new(ExportStats::default());
        let (processor, receiver) = export::queue(&cfg.batch, stats.clone());
        let worker = export::Worker::spawn(cfg, resource.clone(), receiver)?;
        let root = match cfg.sampler.root {
            RootSampler::AlwaysOn => Sampler::AlwaysOn,
            RootSampler::AlwaysOff => Sampler::AlwaysOff,
            RootSampler::TraceIdRatio(r) => Sampler::TraceIdRatioBased(r),
        };
        let sampler = if cfg.sampler.parent_based {
            Sampler::ParentBased(Box::new(root))
        } else {
            root
        };
        // Requests are sampled before their span is created (see `RequestTelemetry::server_span`),
        // so every span that reaches the SDK is one to record.
        let provider = SdkTracerProvider::builder()
            .with_span_processor(processor)
            .with_sampler(Sampler::AlwaysOn)
            .with_resource(resource)
            .build();
        let tracer = provider.tracer_with_scope(
            InstrumentationScope::builder("meshgate")
                .with_version(env!("CARGO_PKG_VERSION"))
                .build(),
        );
        Ok(Some(Self {
            provider,
            tracer,
            sampler,
            stats,
            worker,
        }))
    }

    /// The layer that turns the gateway's request and upstream spans into OpenTelemetry spans
    /// for this pipeline. Add it to the subscriber that sees the gateway's tasks.
    pub fn layer<S>(&self) -> impl Layer<S> + Send + Sync + 'static
    where
        S: Subscriber + for<'a> LookupSpan<'a> + Send + Sync,
    {
        tracing_opentelemetry::OpenTelemetryLayer::new(self.tracer.clone())
            // Spans are parented through the tracing span tree; no OTel context is attached
            // on every poll, and nothing else per span is recorded.
            .with_context_activation(false)
            .with_tracked_inactivity(false)
            .with_location(false)
            .with_threads(false)
            .with_target(false)
            .with_filter(filter_fn(otel_interest))
    }

    /// Export counters, for `/metrics`.
    pub fn stats(&self) -> Arc<ExportStats> {
        self.stats.clone()
    }

    /// Exports what is queued (at most 5 s) and stops. Same as dropping.
    pub fn shutdown(self) {}
}

impl Drop for Tracing {
    fn drop(&mut self) {
        self.worker.stop(SHUTDOWN_LIMIT);
        let _ = self.provider.shutdown();
    }
}

fn otel_interest(m: &Metadata<'_>) -> bool {
    m.target() == TRACE_TARGET || (m.is_event() && *m.level() <= Level::WARN)
}

/// The subscriber `main` installs: the log layer (filter from `rust_log` when set and valid,
/// else `[log] level`) plus, with `tracing`, the trace layer.
pub fn subscriber(
    log: &LogConfig,
    rust_log: Option<String>,
    tracing: Option<&Tracing>,
) -> impl Subscriber + Send + Sync + 'static {
    let filter = rust_log
        .and_then(|f| EnvFilter::try_new(f).ok())
        .or_else(|| EnvFilter::try_new(&log.level).ok())
        .unwrap_or_else(|| EnvFilter::new("info"));
    // Request spans exist for OpenTelemetry; log lines stay as they were without them.
    let not_trace_spans =
        filter_fn(|m: &Metadata<'_>| !(m.is_span() && m.target() == TRACE_TARGET));
    let fmt: Box<dyn Layer<Registry> + Send + Sync> = if log.json {
        tracing_subscriber::fmt::layer()
            .with_target(false)
            .json()
            .flatten_event(true)
            .boxed()
    } else {
        tracing_subscriber::fmt::layer().with_target(false).boxed()
    };
    let mut layers = vec![fmt.with_filter(filter.and(not_trace_spans)).boxed()];
    if let Some(t) = tracing {
        layers.push(t.layer().boxed());
    }
    tracing_subscriber::registry().with(layers)
}

/// Installs [`subscriber`] as the global default. `RUST_LOG`, when set, wins over
/// `[log] level`. Returns false when a subscriber was already installed (tests, embedding
/// applications).
pub fn init(log: &LogConfig, rust_log: Option<String>, tracing: Option<&Tracing>) -> bool {
    tracing::subscriber::set_global_default(subscriber(log, rust_log, tracing)).is_ok()
}

// === request path ===

/// What the request path needs from telemetry, fixed when the gateway is built.
#[derive(Debug, Clone, Default)]
pub struct RequestTelemetry {
    trace: Option<Arc<TracePlan>>,
    access: Option<AccessLog>,
}

#[derive(Debug)]
struct TracePlan {
    sampler: Sampler,
    stats: Arc<ExportStats>,
}

impl RequestTelemetry {
    /// Traces requests into `tracing`'s pipeline (its layer must be installed by the caller)
    /// and writes access log lines to `access`.
    pub fn new(tracing: Option<&Tracing>, access: Option<AccessLog>) -> Self {
        Self {
            trace: tracing.map(|t| {
                Arc::new(TracePlan {
                    sampler: t.sampler.clone(),
                    stats: t.stats.clone(),
                })
            }),
            access,
        }
    }

    /// [`RequestTelemetry::new`] with the access log on stdout when `[log] access` asks for it.
    /// An access log thread that cannot start is logged and left off.
    pub fn from_config(log: &LogConfig, tracing: Option<&Tracing>) -> Self {
        let format = match log.access {
            AccessLogFormat::Off => None,
            AccessLogFormat::Text => Some(AccessFormat::Text),
            AccessLogFormat::Json => Some(AccessFormat::Json),
        };
        let access = format.and_then(|f| match AccessLog::stdout(f) {
            Ok(a) => Some(a),
            Err(e) => {
                tracing::error!(error = %e, "cannot start the access log");
                None
            }
        });
        Self::new(tracing, access)
    }

    /// Whether requests are traced (and `traceparent` is read and written).
    pub fn tracing(&self) -> bool {
        self.trace.is_some()
    }

    /// The access log, when on.
    pub fn access_log(&self) -> Option<&AccessLog> {
        self.access.as_ref()
    }

    /// Sampled spans dropped (queue full, export failed); 0 when tracing is off.
    pub fn spans_dropped(&self) -> u64 {
        self.trace.as_ref().map_or(0, |t| t.stats.dropped())
    }

    /// Spans the collector accepted; 0 when tracing is off.
    pub fn spans_exported(&self) -> u64 {
        self.trace.as_ref().map_or(0, |t| t.stats.exported())
    }

    /// Access log lines dropped because the writer fell behind.
    pub fn access_lines_dropped(&self) -> u64 {
        self.access.as_ref().map_or(0, AccessLog::dropped)
    }

    /// Decides whether `req` is traced, before anything is allocated for it, and returns its
    /// server span: disabled when tracing is off (nothing is read then) or the request is not
    /// sampled.
    ///
    /// The configured sampler (parent-based by default) sees the caller's `traceparent`. A
    /// sampled request gets its span, parented to the caller. An unsampled one gets none, so
    /// it costs a header parse and no more; when it came without a `traceparent`, the second
    /// value is one to add to the request (a new trace id, flags `00`), so that the services
    /// behind see one trace and know it is not sampled. An unsampled caller's own
    /// `traceparent` passes through as it came.
    pub fn server_span<B>(
        &self,
        req: &Request<B>,
        client: SocketAddr,
    ) -> (Span, Option<HeaderValue>) {
        let Some(plan) = &self.trace else {
            return (Span::none(), None);
        };
        let headers = req.headers();
        let parent = TraceContextPropagator::new().extract(&HeaderExtractor(headers));
        let remote = parent.span().span_context().is_valid();
        let trace_id = if remote {
            parent.span().span_context().trace_id()
        } else {
            RandomIdGenerator::default().new_trace_id()
        };
        let decision = plan
            .sampler
            .should_sample(
                Some(&parent),
                trace_id,
                "request",
                &SpanKind::Server,
                &[],
                &[],
            )
            .decision;
        if decision != SamplingDecision::RecordAndSample {
            let fresh = (!remote).then(|| {
                let span_id = RandomIdGenerator::default().new_span_id();
                HeaderValue::from_str(&format!("00-{trace_id}-{span_id}-00"))
                    .expect("hex digits and dashes")
            });
            return (Span::none(), fresh);
        }
        let host = headers
            .get(HOST)
            .and_then(|h| h.to_str().ok())
            .or_else(|| req.uri().authority().map(Authority::as_str))
            .and_then(|h| h.parse::<Authority>().ok());
        let span = tracing::info_span!(
            target: TRACE_TARGET,
            "request",
            otel.name = req.method().as_str(),
            otel.kind = "server",
            otel.status_code = Empty,
            http.request.method = req.method().as_str(),
            http.route = Empty,
            http.response.status_code = Empty,
            url.path = req.uri().path(),
            url.scheme = req.uri().scheme_str().unwrap_or("http"),
            client.address = %client.ip(),
            server.address = host.as_ref().map(Authority::host),
            server.port = host.as_ref().and_then(Authority::port_u16),
            meshgate.route = Empty,
        );
        if remote {
            let _ = span.set_parent(parent);
        }
        (span, None)
    }
}

/// Names the server span after its route (`"{METHOD} {route}"`, with `http.route`); call it
/// before anything starts a child span. No-op on a disabled span.
pub fn record_route(span: &Span, method: &Method, route: &str, name: &str) {
    if span.is_none() {
        return;
    }
    span.record("http.route", route);
    span.record("otel.name", format!("{} {route}", method.as_str()));
    span.record("meshgate.route", name);
}

/// Records the response status on the server span (5xx marks it failed).
pub fn record_status(span: &Span, status: StatusCode) {
    if span.is_none() {
        return;
    }
    span.record("http.response.status_code", status.as_u16());
    if status.is_server_error() {
        span.record("otel.status_code", "error");
    }
}

/// A client span for one upstream attempt, a child of the request's server span (a disabled
/// span when that one is). `attempt` counts from 1; retries carry `http.request.resend_count`.
pub fn client_span(parent: &Span, method: &Method, ep: &Endpoint, attempt: u32) -> Span {
    if parent.is_none() {
        return Span::none();
    }
    tracing::info_span!(
        target: TRACE_TARGET,
        parent: parent,
        "upstream",
        otel.name = method.as_str(),
        otel.kind = "client",
        otel.status_code = Empty,
        http.request.method = method.as_str(),
        http.response.status_code = Empty,
        http.request.resend_count = (attempt > 1).then_some(attempt - 1),
        server.address = ep.authority.host(),
        server.port = ep.authority.port_u16(),
        error.type = Empty,
        meshgate.attempt = attempt,
    )
}

/// Writes `span`'s context into the upstream request as `traceparent` (and `tracestate` when
/// the trace has one), replacing what the client sent.
pub fn inject(span: &Span, headers: &mut HeaderMap) {
    if span.is_none() {
        return;
    }
    let cx = span.context();
    if cx.span().span_context().is_valid() {
        headers.remove(&TRACESTATE);
        TraceContextPropagator::new().inject_context(&cx, &mut HeaderInjector(headers));
    }
}

/// Records how an upstream attempt ended on its client span: the status (5xx is an error),
/// or the failure (`timeout` when the per-try deadline passed).
pub fn record_attempt<B, E: std::fmt::Display>(
    span: &Span,
    outcome: &Result<Result<Response<B>, E>, tokio::time::error::Elapsed>,
) {
    if span.is_none() {
        return;
    }
    match outcome {
        Ok(Ok(resp)) => {
            span.record("http.response.status_code", resp.status().as_u16());
            if resp.status().is_server_error() {
                span.record("otel.status_code", "error");
                span.record("error.type", resp.status().as_str());
            }
        }
        Ok(Err(e)) => {
            span.record("otel.status_code", "error");
            span.record("error.type", tracing::field::display(e));
        }
        Err(_) => {
            span.record("otel.status_code", "error");
            span.record("error.type", "timeout");
        }
    }
}

// === access log bookkeeping ===

/// Rides in the response body until it ends: counts the bytes sent, then closes the server
/// span and hands the access log line to its writer.
#[derive(Debug)]
pub struct BodyTap {
    span: Span,
    access: Option<(AccessLog, Box<RequestLog>)>,
    sent: u64,
}

impl BodyTap {
    /// A tap for a response with `status`, whose headers are ready now. Returns `None` when
    /// there is nothing to do (no span, no access log).
    pub fn new(
        telemetry: &RequestTelemetry,
        span: Span,
        log: Option<RequestLog>,
        status: StatusCode,
    ) -> Option<Self> {
        let access = match (&telemetry.access, log) {
            (Some(a), Some(mut log)) => {
                log.ttfb = log.started.elapsed();
                log.status = status.as_u16();
                if !span.is_none() {
                    let id = span.context().span().span_context().trace_id();
                    if id != opentelemetry::trace::TraceId::INVALID {
                        log.trace_id = Some(id.to_string());
                    }
                }
                Some((a.clone(), Box::new(log)))
            }
            _ => None,
        };
        if span.is_none() && access.is_none() {
            return None;
        }
        Some(Self {
            span,
            access,
            sent: 0,
        })
    }

    /// Counts body bytes sent to the client.
    pub fn sent(&mut self, n: usize) {
        self.sent += n as u64;
    }

    /// The body ended (`complete`) or was dropped early.
    pub fn finish(self, complete: bool) {
        if !self.span.is_none() {
            // Entering and leaving the span moves its recorded end to now, the end of the body.
            drop(self.span.enter());
        }
        let Some((sink, mut log)) = self.access else {
            return;
        };
        log.duration = log.started.elapsed();
        log.bytes_out = self.sent;
        log.complete = complete;
        sink.send(log);
    }
}
