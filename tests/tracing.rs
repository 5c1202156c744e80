//! Trace export end to end: the real gateway, a real OTLP collector stand-in on loopback
//! (OTLP/HTTP protobuf, and gRPC over h2c) and real upstreams.
//!
//! Each test installs its own subscriber with `tracing::subscriber::set_default`. The tests run
//! on Tokio's current-thread runtime, so every gateway task polls on the test's thread and
//! sees that subscriber, and tests running in parallel never see each other's spans.

mod support;

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, HeaderValue, Request, Response};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use meshgate::config::{Config, Env};
use meshgate::telemetry::{self, AccessFormat, AccessLog, RequestTelemetry, Tracing};
use meshgate::Gateway;
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use opentelemetry_proto::tonic::trace::v1::status::StatusCode as OtelStatus;
use prost::Message as _;
use support::gateway::{client, eventually, start_gateway, TestGateway};
use support::upstream::TestUpstream;
use support::util::dead_port;
use tokio::net::TcpListener;
use tokio::time::Instant;
use tracing::subscriber::DefaultGuard;

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT_ID: &str = "00f067aa0ba902b7";

// === a collector stand-in ===

/// One received span, flattened for assertions.
#[derive(Debug, Clone)]
struct Got {
    trace_id: String,
    span_id: String,
    parent_span_id: String,
    name: String,
    kind: SpanKind,
    status: OtelStatus,
    attrs: HashMap<String, String>,
    service_name: String,
}

impl Got {
    fn attr(&self, key: &str) -> Option<&str> {
        self.attrs.get(key).map(String::as_str)
    }
}

/// Spans received so far; requests counted.
#[derive(Debug, Default)]
struct Received {
    spans: Mutex<Vec<Got>>,
}

impl Received {
    fn spans(&self) -> Vec<Got> {
        self.spans.lock().unwrap().clone()
    }

    fn of_trace(&self, trace_id: &str) -> Vec<Got> {
        self.spans()
            .into_iter()
            .filter(|s| s.trace_id == trace_id)
            .collect()
    }

    fn record(&self, req: ExportTraceServiceRequest) {
        let mut out = self.spans.lock().unwrap();
        for rs in req.resource_spans {
            let service_name = rs
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|kv| kv.key == "service.name")
                .map(|kv| value(kv.value.as_ref()))
                .unwrap_or_default();
            for ss in rs.scope_spans {
                for s in ss.spans {
                    out.push(Got {
                        trace_id: hex(&s.trace_id),
                        span_id: hex(&s.span_id),
                        parent_span_id: hex(&s.parent_span_id),
                        name: s.name.clone(),
                        kind: SpanKind::try_from(s.kind).unwrap_or(SpanKind::Unspecified),
                        status: s
                            .status
                            .as_ref()
                            .and_then(|st| OtelStatus::try_from(st.code).ok())
                            .unwrap_or(OtelStatus::Unset),
                        attrs: s
                            .attributes
                            .iter()
                            .map(|kv| (kv.key.clone(), value(kv.value.as_ref())))
                            .collect(),
                        service_name: service_name.clone(),
                    });
                }
            }
        }
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn value(v: Option<&opentelemetry_proto::tonic::common::v1::AnyValue>) -> String {
    match v.and_then(|v| v.value.as_ref()) {
        Some(AnyValue::StringValue(s)) => s.clone(),
        Some(AnyValue::IntValue(i)) => i.to_string(),
        Some(AnyValue::BoolValue(b)) => b.to_string(),
        Some(AnyValue::DoubleValue(d)) => d.to_string(),
        other => format!("{other:?}"),
    }
}

/// An OTLP/HTTP receiver: `POST /v1/traces` with a protobuf body, answered 200.
async fn otlp_http_receiver() -> (SocketAddr, Arc<Received>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let received = Arc::new(Received::default());
    let rx = received.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let rx = rx.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<Incoming>| {
                    let rx = rx.clone();
                    async move {
                        assert_eq!(req.uri().path(), "/v1/traces");
                        assert_eq!(
                            req.headers()["content-type"],
                            "application/x-protobuf",
                            "OTLP/HTTP protobuf"
                        );
                        let body = req.into_body().collect().await.unwrap().to_bytes();
                        rx.record(ExportTraceServiceRequest::decode(body).unwrap());
                        let answer = ExportTraceServiceResponse::default().encode_to_vec();
                        let mut resp = Response::new(Full::new(Bytes::from(answer)));
                        resp.headers_mut().insert(
                            "content-type",
                            HeaderValue::from_static("application/x-protobuf"),
                        );
                        Ok::<_, Infallible>(resp)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    (addr, received)
}

/// An OTLP/gRPC receiver over h2c: the TraceService `Export` call, length-prefixed protobuf,
/// answered with `grpc-status: 0` in the trailers.
async fn otlp_grpc_receiver() -> (SocketAddr, Arc<Received>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let received = Arc::new(Received::default());
    let rx = received.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let rx = rx.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<Incoming>| {
                    let rx = rx.clone();
                    async move {
                        assert_eq!(
                            req.uri().path(),
                            "/opentelemetry.proto.collector.trace.v1.TraceService/Export"
                        );
                        assert_eq!(req.headers()["x-team"], "edge", "OTEL headers as metadata");
                        let body = req.into_body().collect().await.unwrap().to_bytes();
                        assert_eq!(body[0], 0, "uncompressed gRPC message");
                        rx.record(ExportTraceServiceRequest::decode(&body[5..]).unwrap());
                        let msg = ExportTraceServiceResponse::default().encode_to_vec();
                        let mut framed = BytesMut::new();
                        framed.extend_from_slice(&[0]);
                        framed.extend_from_slice(&(msg.len() as u32).to_be_bytes());
                        framed.extend_from_slice(&msg);
                        let mut trailers = HeaderMap::new();
                        trailers.insert("grpc-status", HeaderValue::from_static("0"));
                        let frames: Vec<Result<Frame<Bytes>, Infallible>> = vec![
                            Ok(Frame::data(framed.freeze())),
                            Ok(Frame::trailers(trailers)),
                        ];
                        let mut resp =
                            Response::new(StreamBody::new(futures_util::stream::iter(frames)));
                        resp.headers_mut()
                            .insert("content-type", HeaderValue::from_static("application/grpc"));
                        Ok::<_, Infallible>(resp)
                    }
                });
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    (addr, received)
}

/// A collector that accepts connections and never answers.
async fn black_hole() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = listener.accept().await {
            held.push(s);
        }
    });
    addr
}

// === the gateway with tracing ===

struct Traced {
    gw: TestGateway,
    tracing: Option<Tracing>,
    _subscriber: DefaultGuard,
}

impl Traced {
    /// Stops the gateway, then the pipeline (exporting what is queued) off this thread, so
    /// the receivers on this thread keep answering meanwhile.
    async fn stop(mut self) {
        self.gw.stop().await;
        let tracing = self.tracing.take();
        tokio::task::spawn_blocking(move || drop(tracing))
            .await
            .unwrap();
    }
}

/// Builds the config with `vars` as its whole environment, the pipeline, and a thread-local
/// subscriber with the trace layer; starts the gateway.
async fn start_traced(toml: &str, vars: &[(&str, String)], access: Option<AccessLog>) -> Traced {
    let env = Env::from_pairs(vars.iter().map(|(k, v)| (k.to_string(), v.clone())));
    let config = Config::from_toml(toml, &env).unwrap_or_else(|e| panic!("{e}"));
    let tracing = Tracing::build(&config.tracing)
        .unwrap()
        .expect("tracing is on");
    let subscriber = telemetry::subscriber(&config.log, Some("warn".into()), Some(&tracing));
    let guard = tracing::subscriber::set_default(subscriber);
    let gateway =
        Gateway::build_with_telemetry(config, RequestTelemetry::new(Some(&tracing), access))
            .unwrap();
    Traced {
        gw: start_gateway(gateway).await,
        tracing: Some(tracing),
        _subscriber: guard,
    }
}

fn route(targets: &str, extra: &str) -> String {
    format!(
        r#"
        [server]
        drain_delay = "0s"
        [tracing]
        service_name = "edge-test"
        [[routes]]
        name = "api"
        path = "/api"
        targets = [{targets}]
        {extra}
        "#
    )
}

async fn metric(gw: &TestGateway, name: &str) -> f64 {
    let text = client()
        .get(gw.admin_url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in\n{text}"))
}

/// The trace id and parent span id of a `traceparent` value.
fn traceparent(v: &HeaderValue) -> (String, String, String) {
    let parts: Vec<&str> = v.to_str().unwrap().split('-').collect();
    assert_eq!(parts.len(), 4, "{v:?}");
    assert_eq!(parts[0], "00");
    (parts[1].into(), parts[2].into(), parts[3].into())
}

// === tests ===

#[tokio::test]
async fn spans_follow_the_callers_trace_with_a_client_span_per_attempt() {
    let (collector, received) = otlp_http_receiver().await;
    // The dead endpoint sorts first (127.0.0.1 < 127.0.0.2), so round robin tries it first
    // and the retry goes to the live one: two attempts.
    let dead = dead_port().await;
    let up = TestUpstream::builder()
        .route("/api/x", 200, "hello")
        .start_on("127.0.0.2:0".parse().unwrap())
        .await;
    let buf = SharedBuf::default();
    let access = AccessLog::to_writer(AccessFormat::Json, buf.clone()).unwrap();
    let t = start_traced(
        &route(
            &format!(r#""http://127.0.0.1:{dead}", "{}""#, up.url()),
            r#"retry = { attempts = 2, backoff = "1ms" }"#,
        ),
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://{collector}")),
            ("OTEL_BSP_SCHEDULE_DELAY", "20".into()),
        ],
        Some(access),
    )
    .await;

    let resp = client()
        .get(t.gw.url("/api/x"))
        .header("traceparent", format!("00-{TRACE_ID}-{PARENT_ID}-01"))
        .header("tracestate", "vendor=abc")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.text().await.unwrap(), "hello");

    // Upstream: same trace, a new parent (the gateway's client span), sampled.
    let seen = up.last_request().unwrap();
    let (trace, parent, flags) = traceparent(&seen.headers["traceparent"]);
    assert_eq!(trace, TRACE_ID);
    assert_ne!(
        parent, PARENT_ID,
        "the upstream's parent is the gateway's span"
    );
    assert_eq!(flags, "01");
    assert_eq!(seen.headers["tracestate"], "vendor=abc");

    assert!(
        eventually(Duration::from_secs(10), || async {
            received.of_trace(TRACE_ID).len() >= 3
        })
        .await,
        "spans did not arrive: {:?}",
        received.spans()
    );
    let spans = received.of_trace(TRACE_ID);
    assert_eq!(spans.len(), 3, "{spans:#?}");
    let server = spans.iter().find(|s| s.kind == SpanKind::Server).unwrap();
    assert_eq!(server.parent_span_id, PARENT_ID, "parented to the caller");
    assert_eq!(server.name, "GET /api");
    assert_eq!(server.service_name, "edge-test");
    assert_eq!(server.attr("http.request.method"), Some("GET"));
    assert_eq!(server.attr("http.route"), Some("/api"));
    assert_eq!(server.attr("http.response.status_code"), Some("200"));
    assert_eq!(server.attr("url.path"), Some("/api/x"));
    assert_eq!(server.attr("client.address"), Some("127.0.0.1"));
    assert_eq!(
        server.attr("server.address"),
        Some("127.0.0.1"),
        "{server:?}"
    );
    assert_eq!(server.attr("meshgate.route"), Some("api"));

    let mut attempts: Vec<&Got> = spans
        .iter()
        .filter(|s| s.kind == SpanKind::Client)
        .collect();
    attempts.sort_by_key(|s| s.attr("meshgate.attempt").map(str::to_owned));
    assert_eq!(attempts.len(), 2, "one client span per attempt");
    for a in &attempts {
        assert_eq!(
            a.parent_span_id, server.span_id,
            "attempts are children of the request"
        );
        assert_eq!(a.attr("http.request.method"), Some("GET"));
    }
    let (first, second) = (attempts[0], attempts[1]);
    assert_eq!(first.attr("meshgate.attempt"), Some("1"));
    assert_eq!(first.attr("server.port"), Some(dead.to_string().as_str()));
    assert_eq!(first.status, OtelStatus::Error);
    assert!(first.attr("error.type").is_some());
    assert_eq!(first.attr("http.request.resend_count"), None);
    assert_eq!(second.attr("meshgate.attempt"), Some("2"));
    assert_eq!(second.attr("http.request.resend_count"), Some("1"));
    assert_eq!(second.attr("server.address"), Some("127.0.0.2"));
    assert_eq!(
        second.attr("server.port"),
        Some(up.addr().port().to_string().as_str())
    );
    assert_eq!(second.attr("http.response.status_code"), Some("200"));
    assert_eq!(
        second.span_id, parent,
        "the upstream's traceparent names the attempt that reached it"
    );

    // The access log line carries the trace id too.
    t.gw.state
        .proxy
        .telemetry
        .access_log()
        .unwrap()
        .flush(Duration::from_secs(2))
        .await;
    let line: serde_json::Value = serde_json::from_str(buf.text().lines().next().unwrap()).unwrap();
    assert_eq!(line["trace_id"], TRACE_ID);
    assert_eq!(line["attempts"], 2);
    t.stop().await;
}

#[tokio::test]
async fn a_request_without_traceparent_starts_a_trace() {
    let (collector, received) = otlp_http_receiver().await;
    let up = TestUpstream::builder().start().await;
    let t = start_traced(
        &route(&format!(r#""{}""#, up.url()), ""),
        &[
            (
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                format!("http://{collector}/v1/traces"),
            ),
            ("OTEL_BSP_SCHEDULE_DELAY", "20".into()),
        ],
        None,
    )
    .await;
    let resp = client().get(t.gw.url("/api/new")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let (trace, parent, flags) = traceparent(&up.last_request().unwrap().headers["traceparent"]);
    assert_eq!(flags, "01");
    assert!(up
        .last_request()
        .unwrap()
        .headers
        .get("tracestate")
        .is_none());
    assert!(
        eventually(Duration::from_secs(10), || async {
            received.of_trace(&trace).len() >= 2
        })
        .await
    );
    let spans = received.of_trace(&trace);
    let server = spans.iter().find(|s| s.kind == SpanKind::Server).unwrap();
    assert_eq!(server.parent_span_id, "", "a root span");
    let client_span = spans.iter().find(|s| s.kind == SpanKind::Client).unwrap();
    assert_eq!(client_span.span_id, parent);
    assert_eq!(client_span.parent_span_id, server.span_id);
    t.stop().await;
}

#[tokio::test]
async fn unsampled_requests_propagate_but_export_nothing() {
    let (collector, received) = otlp_http_receiver().await;
    let up = TestUpstream::builder().start().await;
    // Ratio 0: new traces are not sampled; a caller's sampled flag is still followed.
    let t = start_traced(
        &route(&format!(r#""{}""#, up.url()), "").replace(
            "service_name = \"edge-test\"",
            "service_name = \"edge-test\"\nsample_ratio = 0.0",
        ),
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://{collector}")),
            ("OTEL_BSP_SCHEDULE_DELAY", "20".into()),
        ],
        None,
    )
    .await;
    let c = client();
    assert_eq!(
        c.get(t.gw.url("/api/a")).send().await.unwrap().status(),
        200
    );
    let (unsampled, _, flags) = traceparent(&up.last_request().unwrap().headers["traceparent"]);
    assert_eq!(flags, "00", "not sampled, still propagated");

    // An unsampled caller's context passes through untouched: the gateway records nothing.
    let theirs = format!("00-{}-{PARENT_ID}-00", "1".repeat(32));
    let resp = c
        .get(t.gw.url("/api/c"))
        .header("traceparent", &theirs)
        .header("tracestate", "vendor=abc")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let seen = up.last_request().unwrap();
    assert_eq!(seen.headers["traceparent"], theirs.as_str());
    assert_eq!(seen.headers["tracestate"], "vendor=abc");

    // A sampled caller afterwards: once its spans are in, the unsampled ones would have been too.
    let resp = c
        .get(t.gw.url("/api/b"))
        .header("traceparent", format!("00-{TRACE_ID}-{PARENT_ID}-01"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(
        eventually(Duration::from_secs(10), || async {
            received.of_trace(TRACE_ID).len() >= 2
        })
        .await
    );
    assert!(received.of_trace(&unsampled).is_empty());
    assert!(received.of_trace(&"1".repeat(32)).is_empty());
    t.stop().await;
}

#[tokio::test]
async fn spans_arrive_over_grpc() {
    let (collector, received) = otlp_grpc_receiver().await;
    let up = TestUpstream::builder().start().await;
    let t = start_traced(
        &route(&format!(r#""{}""#, up.url()), ""),
        &[
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc".into()),
            ("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://{collector}")),
            ("OTEL_EXPORTER_OTLP_HEADERS", "x-team=edge".into()),
            ("OTEL_BSP_SCHEDULE_DELAY", "20".into()),
        ],
        None,
    )
    .await;
    let resp = client()
        .get(t.gw.url("/api/grpc"))
        .header("traceparent", format!("00-{TRACE_ID}-{PARENT_ID}-01"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(
        eventually(Duration::from_secs(10), || async {
            received.of_trace(TRACE_ID).len() >= 2
        })
        .await,
        "no spans over gRPC"
    );
    // Counted once the collector's answer is in, just after it recorded the spans.
    let gw = &t.gw;
    assert!(
        eventually(Duration::from_secs(5), || async {
            metric(gw, "meshgate_trace_spans_exported_total").await >= 2.0
        })
        .await
    );
    t.stop().await;
}

#[tokio::test]
async fn queued_spans_are_exported_at_shutdown() {
    let (collector, received) = otlp_http_receiver().await;
    let up = TestUpstream::builder().start().await;
    // Batches would wait a minute: only the shutdown flush can deliver them in time.
    let t = start_traced(
        &route(&format!(r#""{}""#, up.url()), ""),
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://{collector}")),
            ("OTEL_BSP_SCHEDULE_DELAY", "60000".into()),
        ],
        None,
    )
    .await;
    let resp = client()
        .get(t.gw.url("/api/last"))
        .header("traceparent", format!("00-{TRACE_ID}-{PARENT_ID}-01"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(received.spans().is_empty());
    t.stop().await;
    assert_eq!(received.of_trace(TRACE_ID).len(), 2);
}

#[tokio::test]
async fn a_collector_that_never_answers_slows_nothing_and_drops_are_counted() {
    let collector = black_hole().await;
    let up = TestUpstream::builder().start().await;
    let t = start_traced(
        &route(&format!(r#""{}""#, up.url()), ""),
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://{collector}")),
            ("OTEL_EXPORTER_OTLP_TIMEOUT", "3000".into()),
            ("OTEL_BSP_SCHEDULE_DELAY", "5".into()),
            ("OTEL_BSP_MAX_QUEUE_SIZE", "8".into()),
            ("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "4".into()),
        ],
        None,
    )
    .await;
    let c = client();
    let mut slowest = Duration::ZERO;
    for i in 0..60 {
        let sent = Instant::now();
        let resp = c
            .get(t.gw.url(&format!("/api/{i}")))
            .header("traceparent", format!("00-{TRACE_ID}-{PARENT_ID}-01"))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        slowest = slowest.max(sent.elapsed());
    }
    // Every export hangs for 3 s; a request that waited for one would show it.
    assert!(
        slowest < Duration::from_secs(1),
        "slowest request took {slowest:?}"
    );
    // 60 requests make 120 spans; the queue holds 8 while an export hangs.
    let dropped = metric(&t.gw, "meshgate_trace_spans_dropped_total").await;
    assert!(dropped >= 60.0, "dropped {dropped}");
    assert_eq!(
        metric(&t.gw, "meshgate_trace_spans_exported_total").await,
        0.0
    );
    t.gw.stop().await;
    // The pipeline gives up on the hung collector within its shutdown bound.
    let tracing = t.tracing;
    let stopped = Instant::now();
    tokio::task::spawn_blocking(move || drop(tracing))
        .await
        .unwrap();
    assert!(stopped.elapsed() < Duration::from_secs(8));
}

#[tokio::test]
async fn an_unreachable_collector_counts_the_lost_spans() {
    let port = dead_port().await;
    let up = TestUpstream::builder().start().await;
    let t = start_traced(
        &route(&format!(r#""{}""#, up.url()), ""),
        &[
            (
                "OTEL_EXPORTER_OTLP_ENDPOINT",
                format!("http://127.0.0.1:{port}"),
            ),
            ("OTEL_EXPORTER_OTLP_TIMEOUT", "500".into()),
            ("OTEL_BSP_SCHEDULE_DELAY", "5".into()),
        ],
        None,
    )
    .await;
    let resp = client()
        .get(t.gw.url("/api/x"))
        .header("traceparent", format!("00-{TRACE_ID}-{PARENT_ID}-01"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let gw = &t.gw;
    assert!(
        eventually(Duration::from_secs(10), || async {
            metric(gw, "meshgate_trace_spans_dropped_total").await >= 2.0
        })
        .await,
        "the failed export's spans are counted"
    );
    t.stop().await;
}

/// A `Write` into shared memory, for the access log.
#[derive(Clone, Default)]
struct SharedBuf(Arc<Mutex<Vec<u8>>>);

impl SharedBuf {
    fn text(&self) -> String {
        String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
    }
}

impl std::io::Write for SharedBuf {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
