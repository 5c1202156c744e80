//! Span export: a bounded queue that finished spans enter without waiting, and one thread of
//! its own (with a small Tokio runtime) that batches them and sends them over OTLP. A slow or
//! dead collector fills the queue, and further spans are dropped and counted; requests never
//! wait for export. The thread is woken once per full batch or when the delay runs out, never
//! per span (as the SDK's own batch processor does).

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TryRecvError};
use std::sync::Arc;
use std::time::Duration;

use opentelemetry::Context;
use opentelemetry_otlp::{SpanExporter, WithExportConfig as _};
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{Span, SpanData, SpanExporter as _, SpanProcessor};
use opentelemetry_sdk::Resource;
use tokio::sync::{oneshot, Notify};

use super::settings::{BatchConfig, OtlpProtocol, TracingConfig};

/// Why the trace pipeline could not start.
#[derive(Debug, thiserror::Error)]
pub enum TracingError {
    /// The OTLP exporter refused its settings.
    #[error("building the OTLP exporter")]
    Exporter(#[source] opentelemetry_otlp::ExporterBuildError),
    /// The export thread or its runtime could not start.
    #[error("starting the trace export thread")]
    Thread(#[source] std::io::Error),
}

/// What happened to finished spans; read by `/metrics`.
#[derive(Debug, Default)]
pub struct ExportStats {
    dropped: AtomicU64,
    exported: AtomicU64,
}

impl ExportStats {
    /// Sampled spans that were never delivered: the queue was full, or the export that carried
    /// them failed or timed out.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Spans the collector accepted.
    pub fn exported(&self) -> u64 {
        self.exported.load(Ordering::Relaxed)
    }
}

/// Shared by both ends of the queue.
#[derive(Debug)]
struct Shared {
    /// Spans in the queue, as far as the two ends have told each other.
    queued: AtomicUsize,
    /// Signalled when `queued` reaches a full batch.
    batch_ready: Notify,
    max_batch: usize,
    stats: Arc<ExportStats>,
}

/// The SDK side of the queue: `on_end` only tries to enqueue.
#[derive(Debug)]
pub(super) struct QueueProcessor {
    tx: SyncSender<SpanData>,
    shared: Arc<Shared>,
}

/// The export thread's side of the queue.
#[derive(Debug)]
pub(super) struct QueueReceiver {
    rx: Receiver<SpanData>,
    shared: Arc<Shared>,
}

/// A queue of `batch.max_queue` spans.
pub(super) fn queue(
    batch: &BatchConfig,
    stats: Arc<ExportStats>,
) -> (QueueProcessor, QueueReceiver) {
    let (tx, rx) = sync_channel(batch.max_queue.max(1));
    let shared = Arc::new(Shared {
        queued: AtomicUsize::new(0),
        batch_ready: Notify::new(),
        max_batch: batch.max_batch.max(1),
        stats,
    });
    (
        QueueProcessor {
            tx,
            shared: shared.clone(),
        },
        QueueReceiver { rx, shared },
    )
}

impl SpanProcessor for QueueProcessor {
    fn on_start(&self, _span: &mut Span, _cx: &Context) {}

    fn on_end(&self, span: SpanData) {
        if !span.span_context.is_sampled() {
            return;
        }
        // Counted before it is sent, so the export thread never takes an uncounted span.
        let queued = self.shared.queued.fetch_add(1, Ordering::Relaxed) + 1;
        // The export thread never blocks in `recv`, so this wakes nobody...
        if self.tx.try_send(span).is_err() {
            self.shared.queued.fetch_sub(1, Ordering::Relaxed);
            self.shared.stats.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        // ...except this, once per full batch.
        if queued == self.shared.max_batch {
            self.shared.batch_ready.notify_one();
        }
    }

    // Flushing and shutdown belong to `Worker`, which owns the exporter; the provider's own
    // calls (on drop) must not block whatever thread they happen on.
    fn force_flush(&self) -> OTelSdkResult {
        Ok(())
    }

    fn shutdown_with_timeout(&self, _timeout: Duration) -> OTelSdkResult {
        Ok(())
    }
}

/// The export thread. Dropping it without [`Worker::stop`] also ends the thread, without waiting.
#[derive(Debug)]
pub(super) struct Worker {
    stop: Option<oneshot::Sender<()>>,
    done: std::sync::mpsc::Receiver<()>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Worker {
    /// Starts the thread and builds the exporter on it (the gRPC channel needs its runtime).
    /// Returns once the exporter is built, or with the reason it could not be.
    pub(super) fn spawn(
        cfg: &TracingConfig,
        resource: Resource,
        rx: QueueReceiver,
    ) -> Result<Self, TracingError> {
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(), TracingError>>();
        let (stop_tx, stop_rx) = oneshot::channel();
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let cfg = cfg.clone();
        let thread = std::thread::Builder::new()
            .name("meshgate-otlp".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = ready_tx.send(Err(TracingError::Thread(e)));
                        return;
                    }
                };
                rt.block_on(async move {
                    let mut exporter = match build_exporter(&cfg) {
                        Ok(e) => e,
                        Err(e) => {
                            let _ = ready_tx.send(Err(TracingError::Exporter(e)));
                            return;
                        }
                    };
                    exporter.set_resource(&resource);
                    let _ = ready_tx.send(Ok(()));
                    run(&exporter, rx, stop_rx, cfg.batch, cfg.timeout).await;
                    let _ = exporter.shutdown();
                });
                let _ = done_tx.send(());
            })
            .map_err(TracingError::Thread)?;
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(Self {
                stop: Some(stop_tx),
                done: done_rx,
                thread: Some(thread),
            }),
            Ok(Err(e)) => {
                let _ = thread.join();
                Err(e)
            }
            Err(_) => {
                let _ = thread.join();
                Err(TracingError::Thread(std::io::Error::other(
                    "the export thread ended before building the exporter",
                )))
            }
        }
    }

    /// Exports what is queued and stops the thread, waiting at most `limit`. Spans still
    /// unsent then are lost (the collector is not answering).
    pub(super) fn stop(&mut self, limit: Duration) {
        let Some(stop) = self.stop.take() else {
            return;
        };
        let _ = stop.send(());
        match self.done.recv_timeout(limit) {
            Ok(()) | Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                if let Some(t) = self.thread.take() {
                    let _ = t.join();
                }
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                tracing::warn!(after = ?limit, "trace export did not finish in time; unsent spans are lost");
            }
        }
    }
}

fn build_exporter(
    cfg: &TracingConfig,
) -> Result<SpanExporter, opentelemetry_otlp::ExporterBuildError> {
    use opentelemetry_otlp::ExporterBuildError;
    match cfg.protocol {
        OtlpProtocol::HttpProtobuf => {
            use opentelemetry_otlp::WithHttpConfig as _;
            // The crate's own reqwest (0.13, rustls); the provider is installed by whoever
            // builds the first TLS client, so install it here too for https collectors.
            let _ = rustls::crypto::ring::default_provider().install_default();
            let client = reqwest::Client::builder()
                .timeout(cfg.timeout)
                .connect_timeout(cfg.timeout.min(Duration::from_secs(5)))
                .build()
                .map_err(|e| {
                    ExporterBuildError::InternalFailure(format!(
                        "building the HTTP client: {}",
                        crate::error::Chain(&e)
                    ))
                })?;
            SpanExporter::builder()
                .with_http()
                .with_http_client(client)
                .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
                .with_endpoint(cfg.endpoint.clone())
                .with_timeout(cfg.timeout)
                .with_headers(cfg.headers.0.iter().cloned().collect())
                .build()
        }
        OtlpProtocol::Grpc => {
            use opentelemetry_otlp::tonic_types::metadata::MetadataMap;
            use opentelemetry_otlp::WithTonicConfig as _;
            let mut headers = http::HeaderMap::new();
            for (k, v) in &cfg.headers.0 {
                // Validated in config; anything odd is skipped rather than failing start-up.
                if let (Ok(k), Ok(v)) = (
                    http::HeaderName::from_bytes(k.as_bytes()),
                    http::HeaderValue::from_str(v),
                ) {
                    headers.append(k, v);
                }
            }
            let mut builder = SpanExporter::builder()
                .with_tonic()
                .with_endpoint(cfg.endpoint.clone())
                .with_timeout(cfg.timeout)
                .with_metadata(MetadataMap::from_headers(headers));
            if cfg.endpoint.starts_with("https:") {
                let _ = rustls::crypto::ring::default_provider().install_default();
                builder = builder.with_tls_config(
                    opentelemetry_otlp::tonic_types::transport::ClientTlsConfig::new()
                        .with_native_roots(),
                );
            }
            builder.build()
        }
    }
}

/// Exports what is queued whenever a full batch is ready or `schedule_delay` has passed, one
/// batch at a time, until told to stop; then exports what is left.
async fn run(
    exporter: &SpanExporter,
    queue: QueueReceiver,
    mut stop: oneshot::Receiver<()>,
    batch: BatchConfig,
    timeout: Duration,
) {
    let shared = &queue.shared;
    let stats = &*shared.stats;
    let max = shared.max_batch;
    let mut buf: Vec<SpanData> = Vec::with_capacity(max);
    let mut failing = false;
    let mut stopping = false;
    while !stopping {
        stopping = tokio::select! {
            biased;
            _ = &mut stop => true,
            _ = shared.batch_ready.notified() => false,
            _ = tokio::time::sleep(batch.schedule_delay) => false,
        };
        // Full batches go out back to back; a partial one waits for the next round, and so
        // does everything while the collector fails.
        while !stopping {
            let open = take(&queue, &mut buf, max);
            if buf.is_empty() {
                break;
            }
            let full = buf.len() == max;
            export(exporter, &mut buf, stats, timeout, &mut failing).await;
            if !full || !open || failing {
                break;
            }
            stopping = !matches!(stop.try_recv(), Err(oneshot::error::TryRecvError::Empty));
        }
    }
    // Shutdown: what is queued now goes out too (the caller bounds how long it waits), unless
    // the collector is failing: then it would only delay the exit.
    loop {
        take(&queue, &mut buf, max);
        if buf.is_empty() {
            return;
        }
        if failing {
            stats.dropped.fetch_add(buf.len() as u64, Ordering::Relaxed);
            buf.clear();
        } else {
            export(exporter, &mut buf, stats, timeout, &mut failing).await;
        }
    }
}

/// Moves up to `max` queued spans into `buf`; false once every sender is gone.
fn take(queue: &QueueReceiver, buf: &mut Vec<SpanData>, max: usize) -> bool {
    let before = buf.len();
    let mut open = true;
    while buf.len() < max {
        match queue.rx.try_recv() {
            Ok(span) => buf.push(span),
            Err(TryRecvError::Empty) => break,
            Err(TryRecvError::Disconnected) => {
                open = false;
                break;
            }
        }
    }
    queue
        .shared
        .queued
        .fetch_sub(buf.len() - before, Ordering::Relaxed);
    open
}

async fn export(
    exporter: &SpanExporter,
    buf: &mut Vec<SpanData>,
    stats: &ExportStats,
    timeout: Duration,
    failing: &mut bool,
) {
    let batch = std::mem::replace(buf, Vec::with_capacity(buf.capacity()));
    let n = batch.len() as u64;
    // The exporter bounds itself by `timeout`, retries included; this is only a backstop.
    let outcome = tokio::time::timeout(timeout + Duration::from_secs(1), exporter.export(batch))
        .await
        .unwrap_or(Err(opentelemetry_sdk::error::OTelSdkError::Timeout(
            timeout,
        )));
    match outcome {
        Ok(()) => {
            stats.exported.fetch_add(n, Ordering::Relaxed);
            if std::mem::take(failing) {
                tracing::info!("trace export works again");
            }
        }
        Err(e) => {
            stats.dropped.fetch_add(n, Ordering::Relaxed);
            // One warning per outage; the dropped count in /metrics tells the rest.
            if std::mem::replace(failing, true) {
                tracing::debug!(error = %e, spans = n, "trace export failed; spans dropped");
            } else {
                tracing::warn!(error = %e, spans = n, "trace export failed; spans are dropped until the collector answers");
            }
        }
    }
}
