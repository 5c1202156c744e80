//! The access log: one line per request, written by a thread of its own so that requests only
//! hand over their `RequestLog` (a bounded queue; when it is full the line is dropped and
//! counted). That thread collects the queue every 50 ms rather than being woken per line, and
//! formats and writes the lines in one batch.

use std::fmt::Write as _;
use std::io::Write;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TryRecvError, TrySendError};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use http::header::HeaderValue;
use http::uri::Authority;
use http::{Method, Request, Version};
use serde::Serialize;

use super::propagation::{traceparent_trace_id, TRACEPARENT};

/// Lines that may wait for the writer before new ones are dropped.
const QUEUE: usize = 16 * 1024;
/// How often the writer collects the queue. Senders never wake it: with a thread parked in
/// `recv`, every line would cost a wake-up, and the writer a context switch.
const POLL: Duration = Duration::from_millis(50);

/// The line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccessFormat {
    /// `key=value` pairs (logfmt); values with spaces or quotes are JSON-quoted, absent ones `-`.
    Text,
    /// One JSON object per line; absent values are `null`.
    Json,
}

/// Where access log lines go. Cheap to clone; the writer thread ends when the last clone is
/// dropped, after writing what was queued.
#[derive(Clone)]
pub struct AccessLog {
    inner: Arc<Inner>,
}

struct Inner {
    tx: SyncSender<Msg>,
    dropped: AtomicU64,
}

enum Msg {
    Entry(Box<RequestLog>),
    Flush(tokio::sync::oneshot::Sender<()>),
}

impl std::fmt::Debug for AccessLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccessLog")
            .field("dropped", &self.dropped())
            .finish()
    }
}

impl AccessLog {
    /// Lines on the process's standard output.
    pub fn stdout(format: AccessFormat) -> std::io::Result<Self> {
        Self::to_writer(format, std::io::stdout())
    }

    /// Lines to any writer (tests pass a buffer). The writer is flushed whenever the queue
    /// runs empty. Fails only when the writer thread cannot be started.
    pub fn to_writer(
        format: AccessFormat,
        writer: impl Write + Send + 'static,
    ) -> std::io::Result<Self> {
        let (tx, rx) = sync_channel(QUEUE);
        std::thread::Builder::new()
            .name("meshgate-access-log".into())
            .spawn(move || {
                write_lines(
                    rx,
                    std::io::BufWriter::with_capacity(64 * 1024, writer),
                    format,
                )
            })?;
        Ok(Self {
            inner: Arc::new(Inner {
                tx,
                dropped: AtomicU64::new(0),
            }),
        })
    }

    /// Lines dropped because the writer fell behind (or its thread is gone).
    pub fn dropped(&self) -> u64 {
        self.inner.dropped.load(Ordering::Relaxed)
    }

    /// Waits until every line queued so far is written and flushed, at most `limit`.
    pub async fn flush(&self, limit: Duration) {
        let (ack, done) = tokio::sync::oneshot::channel();
        // A flush marker may wait for room; it is rare (shutdown, tests), so a blocking send
        // on a blocking-pool thread is fine.
        let tx = self.inner.tx.clone();
        let sent = tokio::task::spawn_blocking(move || tx.send(Msg::Flush(ack)).is_ok());
        if let Ok(Ok(true)) = tokio::time::timeout(limit, sent).await {
            let _ = tokio::time::timeout(limit, done).await;
        }
    }

    pub(super) fn send(&self, entry: Box<RequestLog>) {
        match self.inner.tx.try_send(Msg::Entry(entry)) {
            Ok(()) => {}
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.inner.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

fn write_lines(rx: Receiver<Msg>, mut out: impl Write, format: AccessFormat) {
    let mut line = String::with_capacity(512);
    loop {
        std::thread::sleep(POLL);
        loop {
            match rx.try_recv() {
                Ok(Msg::Entry(e)) => {
                    line.clear();
                    match format {
                        AccessFormat::Text => e.text(&mut line),
                        AccessFormat::Json => e.json(&mut line),
                    }
                    line.push('\n');
                    // A closed stdout is no reason to stop serving; the line is lost.
                    let _ = out.write_all(line.as_bytes());
                }
                Ok(Msg::Flush(ack)) => {
                    let _ = out.flush();
                    let _ = ack.send(());
                }
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    let _ = out.flush();
                    return;
                }
            }
        }
        let _ = out.flush();
    }
}

/// The JSON shape of a line; the text format uses the same keys in the same order.
#[derive(Serialize)]
struct Line<'a> {
    time: String,
    client: String,
    method: &'a str,
    path: &'a str,
    proto: &'a str,
    status: u16,
    route: Option<&'a str>,
    service: Option<&'a str>,
    upstream: Option<&'a str>,
    attempts: u32,
    bytes_in: u64,
    bytes_out: u64,
    duration_ms: f64,
    upstream_ms: Option<f64>,
    ttfb_ms: f64,
    request_id: &'a str,
    trace_id: Option<&'a str>,
    complete: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    identity: Option<&'a str>,
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

fn proto(v: Version) -> &'static str {
    match v {
        Version::HTTP_09 => "HTTP/0.9",
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_11 => "HTTP/1.1",
        Version::HTTP_2 => "HTTP/2.0",
        Version::HTTP_3 => "HTTP/3.0",
        _ => "HTTP/?",
    }
}

// === RequestLog ===

/// What the proxy learns about a request while handling it, for its access log line; the
/// line itself at the end. Only allocated when the access log is on.
#[derive(Debug)]
pub struct RequestLog {
    time: SystemTime,
    pub(super) started: tokio::time::Instant,
    client: SocketAddr,
    method: Method,
    path: String,
    version: http::Version,
    declared_in: Option<u64>,
    request_id: HeaderValue,
    pub(super) trace_id: Option<String>,
    /// The matched route's name.
    pub route: Option<Arc<str>>,
    /// The route's service.
    pub service: Option<Arc<str>>,
    /// Who the route's `auth` let in: the API key's name or the JWT's `sub` (never a
    /// credential); the field is left out of the line when there is none.
    pub identity: Option<Arc<str>>,
    /// The last attempt's endpoint.
    pub upstream: Option<Authority>,
    /// Upstream attempts made.
    pub attempts: u32,
    /// The last attempt's time until response headers.
    pub upstream_duration: Option<Duration>,
    /// Request body bytes known up front (read whole for replay).
    pub bytes_in: Option<u64>,
    /// Request body bytes counted as they stream upstream.
    pub body_counter: Option<Arc<AtomicU64>>,
    // Filled in when the response ends.
    pub(super) status: u16,
    pub(super) ttfb: Duration,
    pub(super) duration: Duration,
    pub(super) bytes_out: u64,
    pub(super) complete: bool,
}

impl RequestLog {
    /// Starts the record for `req`, received at `started`.
    pub fn start<B>(
        req: &Request<B>,
        client: SocketAddr,
        started: tokio::time::Instant,
        request_id: &HeaderValue,
    ) -> Self {
        let headers = req.headers();
        Self {
            time: SystemTime::now(),
            started,
            client,
            method: req.method().clone(),
            path: req.uri().path().to_owned(),
            version: req.version(),
            declared_in: headers
                .get(http::header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok()),
            request_id: request_id.clone(),
            trace_id: headers
                .get(&TRACEPARENT)
                .and_then(|v| v.to_str().ok())
                .and_then(traceparent_trace_id),
            route: None,
            service: None,
            identity: None,
            upstream: None,
            attempts: 0,
            upstream_duration: None,
            bytes_in: None,
            body_counter: None,
            status: 0,
            ttfb: Duration::ZERO,
            duration: Duration::ZERO,
            bytes_out: 0,
            complete: false,
        }
    }

    /// A counter the request body adds to as it streams.
    pub fn body_counter(&mut self) -> Arc<AtomicU64> {
        self.body_counter
            .get_or_insert_with(Default::default)
            .clone()
    }

    /// Request body bytes: counted, else known, else declared.
    fn total_in(&self) -> u64 {
        let counted = self
            .body_counter
            .as_ref()
            .map(|c| c.load(Ordering::Relaxed));
        match (self.bytes_in, counted) {
            (Some(known), Some(more)) => known + more,
            (Some(n), None) | (None, Some(n)) => n,
            (None, None) => self.declared_in.unwrap_or(0),
        }
    }
}

impl RequestLog {
    fn line(&self) -> Line<'_> {
        Line {
            time: humantime::format_rfc3339_millis(self.time).to_string(),
            client: self.client.to_string(),
            method: self.method.as_str(),
            path: &self.path,
            proto: proto(self.version),
            status: self.status,
            route: self.route.as_deref(),
            service: self.service.as_deref(),
            upstream: self.upstream.as_ref().map(Authority::as_str),
            attempts: self.attempts,
            bytes_in: self.total_in(),
            bytes_out: self.bytes_out,
            duration_ms: ms(self.duration),
            upstream_ms: self.upstream_duration.map(ms),
            ttfb_ms: ms(self.ttfb),
            request_id: self.request_id.to_str().unwrap_or("-"),
            trace_id: self.trace_id.as_deref(),
            complete: self.complete,
            identity: self.identity.as_deref(),
        }
    }

    fn json(&self, out: &mut String) {
        if let Ok(s) = serde_json::to_string(&self.line()) {
            out.push_str(&s);
        }
    }

    fn text(&self, out: &mut String) {
        let l = self.line();
        let num = |n: f64| n.to_string();
        let fields: [(&str, Option<String>); 18] = [
            ("time", Some(l.time.clone())),
            ("client", Some(l.client.clone())),
            ("method", Some(l.method.to_owned())),
            ("path", Some(l.path.to_owned())),
            ("proto", Some(l.proto.to_owned())),
            ("status", Some(l.status.to_string())),
            ("route", l.route.map(str::to_owned)),
            ("service", l.service.map(str::to_owned)),
            ("upstream", l.upstream.map(str::to_owned)),
            ("attempts", Some(l.attempts.to_string())),
            ("bytes_in", Some(l.bytes_in.to_string())),
            ("bytes_out", Some(l.bytes_out.to_string())),
            ("duration_ms", Some(num(l.duration_ms))),
            ("upstream_ms", l.upstream_ms.map(num)),
            ("ttfb_ms", Some(num(l.ttfb_ms))),
            ("request_id", Some(l.request_id.to_owned())),
            ("trace_id", l.trace_id.map(str::to_owned)),
            ("complete", Some(l.complete.to_string())),
        ];
        for (i, (k, v)) in fields.iter().enumerate() {
            if i > 0 {
                out.push(' ');
            }
            let _ = match v {
                None => write!(out, "{k}=-"),
                Some(s) if needs_quotes(s) => {
                    write!(out, "{k}={}", serde_json::Value::from(s.as_str()))
                }
                Some(s) => write!(out, "{k}={s}"),
            };
        }
        if let Some(id) = l.identity {
            let _ = if needs_quotes(id) {
                write!(out, " identity={}", serde_json::Value::from(id))
            } else {
                write!(out, " identity={id}")
            };
        }
    }
}

fn needs_quotes(s: &str) -> bool {
    s.is_empty()
        || s == "-"
        || s.bytes()
            .any(|b| b <= b' ' || b == b'"' || b == b'=' || b == b'\\' || b >= 0x7f)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry() -> RequestLog {
        RequestLog {
            time: std::time::SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_000_123),
            started: tokio::time::Instant::now(),
            client: "127.0.0.1:5000".parse().unwrap(),
            method: http::Method::GET,
            path: "/api/a b".into(),
            version: Version::HTTP_11,
            declared_in: None,
            request_id: http::HeaderValue::from_static("req-1"),
            trace_id: None,
            route: Some("api".into()),
            service: Some("web".into()),
            identity: None,
            upstream: Some(Authority::from_static("127.0.0.1:8081")),
            attempts: 2,
            upstream_duration: None,
            bytes_in: None,
            body_counter: None,
            status: 200,
            ttfb: Duration::from_micros(1234),
            duration: Duration::from_micros(1500),
            bytes_out: 5,
            complete: true,
        }
    }

    #[test]
    fn text_line_is_logfmt() {
        let mut s = String::new();
        entry().text(&mut s);
        assert_eq!(
            s,
            "time=2023-11-14T22:13:20.123Z client=127.0.0.1:5000 method=GET path=\"/api/a b\" \
             proto=HTTP/1.1 status=200 route=api service=web upstream=127.0.0.1:8081 attempts=2 \
             bytes_in=0 bytes_out=5 duration_ms=1.5 upstream_ms=- ttfb_ms=1.234 request_id=req-1 \
             trace_id=- complete=true"
        );
    }

    #[test]
    fn json_line_has_every_key() {
        let mut s = String::new();
        entry().json(&mut s);
        let v: serde_json::Value = serde_json::from_str(&s).unwrap();
        assert_eq!(v["status"], 200);
        assert_eq!(v["upstream_ms"], serde_json::Value::Null);
        assert_eq!(v["duration_ms"], 1.5);
        assert_eq!(v.as_object().unwrap().len(), 18);
    }

    #[test]
    fn identity_is_added_only_when_auth_named_one() {
        let mut e = entry();
        e.identity = Some("acme key".into());
        let mut s = String::new();
        e.text(&mut s);
        assert!(s.ends_with(" complete=true identity=\"acme key\""), "{s}");
        let mut j = String::new();
        e.json(&mut j);
        let v: serde_json::Value = serde_json::from_str(&j).unwrap();
        assert_eq!(v["identity"], "acme key");
        assert_eq!(v.as_object().unwrap().len(), 19);
    }
}
