//! The mock upstream service (`mock-service` binary and integration tests): a small JSON API
//! whose every answer names the service and port, plus echo, streaming, SSE and download routes.
//! It owns nothing of the gateway and never proxies.

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

/// How long in-flight requests may run after shutdown is requested before connections are cut.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// Largest JSON body accepted by `POST /users`; bigger bodies get 413.
const MAX_JSON_BODY: usize = 64 * 1024;
/// Upper bounds on query parameters, so a typo cannot pin the mock for hours or exhaust memory.
const MAX_CHUNKS: u64 = 100_000;
const MAX_CHUNK_SIZE: u64 = 16 * 1024 * 1024;
const MAX_INTERVAL_MS: u64 = 60_000;
const MAX_DELAY_MS: u64 = 600_000;

/// Serves the mock service on an already-bound listener until `shutdown` is cancelled.
///
/// Every connection speaks HTTP/1.1 (keep-alive) or h2c (prior knowledge), with TCP_NODELAY.
/// On cancel the listener is closed at once, in-flight requests get up to 5 s to finish, and
/// whatever is still running after that is aborted. Accept errors are logged and retried, so
/// the only error returned is failing to read the listener's local address.
pub async fn serve(
    listener: TcpListener,
    name: Arc<str>,
    shutdown: CancellationToken,
) -> io::Result<()> {
    let port = listener.local_addr()?.port();
    let mock = Arc::new(Mock {
        name,
        port,
        next_user_id: AtomicU64::new(USERS.len() as u64 + 1),
    });

    let mut builder = auto::Builder::new(TokioExecutor::new());
    // Without a timer hyper silently skips its 30 s header_read_timeout (slowloris guard).
    builder.http1().keep_alive(true).timer(TokioTimer::new());
    builder.http2().timer(TokioTimer::new());

    let graceful = GracefulShutdown::new();
    // Owning the connection tasks lets shutdown abort stragglers instead of leaking them.
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            biased;
            () = shutdown.cancelled() => break,
            Some(joined) = conns.join_next() => {
                if let Err(e) = joined {
                    warn!(service = %mock.name, error = %e, "mock connection task failed");
                }
            }
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(pair) => pair,
                    Err(e) => {
                        warn!(service = %mock.name, error = %e, "mock accept failed");
                        // Out of descriptors (EMFILE/ENFILE) would otherwise spin the loop.
                        if !is_connection_error(&e) {
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                        continue;
                    }
                };
                if let Err(e) = stream.set_nodelay(true) {
                    debug!(%peer, error = %e, "set_nodelay failed");
                }
                let mock = Arc::clone(&mock);
                let svc = service_fn(move |req| {
                    let mock = Arc::clone(&mock);
                    async move { Ok::<_, Infallible>(mock.handle(req).await) }
                });
                let conn = builder.serve_connection(TokioIo::new(stream), svc).into_owned();
                let conn = graceful.watch(conn);
                conns.spawn(async move {
                    if let Err(e) = conn.await {
                        debug!(%peer, error = %e, "mock connection closed with error");
                    }
                });
            }
        }
    }

    // Close the listening socket first so new connects are refused while we drain.
    drop(listener);
    if tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown())
        .await
        .is_err()
    {
        warn!(service = %mock.name, grace = ?SHUTDOWN_GRACE, "mock shutdown grace expired; aborting connections");
    }
    conns.shutdown().await;
    Ok(())
}

/// Binds `addr` (tests pass `127.0.0.1:0` for any free port) and spawns [`serve`] on it.
///
/// Returns the bound address once the socket is listening, so a request sent right after
/// this returns is never refused. The task ends when `shutdown` is cancelled.
pub async fn spawn(
    addr: SocketAddr,
    name: &str,
    shutdown: CancellationToken,
) -> io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let name: Arc<str> = Arc::from(name);
    tokio::spawn(async move {
        if let Err(e) = serve(listener, Arc::clone(&name), shutdown).await {
            warn!(service = %name, error = %e, "mock service stopped with error");
        }
    });
    Ok(bound)
}

/// Errors that concern one half-accepted connection, not the listener; no backoff needed.
fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::Interrupted
    )
}

// === data ===

#[derive(Debug, Clone, Serialize)]
struct User {
    id: u64,
    name: &'static str,
}

#[derive(Debug, Clone, Serialize)]
struct Order {
    id: u64,
    user_id: u64,
    product_id: u64,
    quantity: u32,
    status: &'static str,
}

#[derive(Debug, Clone, Serialize)]
struct Product {
    id: u64,
    name: &'static str,
    price: f64,
}

const USERS: &[User] = &[
    User {
        id: 1,
        name: "Alice",
    },
    User { id: 2, name: "Bob" },
    User {
        id: 3,
        name: "Carol",
    },
];

const ORDERS: &[Order] = &[
    Order {
        id: 1,
        user_id: 1,
        product_id: 2,
        quantity: 1,
        status: "shipped",
    },
    Order {
        id: 2,
        user_id: 2,
        product_id: 1,
        quantity: 2,
        status: "pending",
    },
    Order {
        id: 3,
        user_id: 1,
        product_id: 3,
        quantity: 1,
        status: "delivered",
    },
];

const PRODUCTS: &[Product] = &[
    Product {
        id: 1,
        name: "Keyboard",
        price: 49.99,
    },
    Product {
        id: 2,
        name: "Mouse",
        price: 19.99,
    },
    Product {
        id: 3,
        name: "Monitor",
        price: 199.0,
    },
];

#[derive(Debug, Deserialize)]
struct NewUser {
    name: String,
}

// === impl Mock ===

type MockBody = BoxBody<Bytes, Infallible>;

struct Mock {
    name: Arc<str>,
    port: u16,
    /// Ids handed out by `POST /users`. Created users are not stored: replicas behind a
    /// balancer must answer `GET /users` identically, whichever one took the POST.
    next_user_id: AtomicU64,
}

impl Mock {
    async fn handle(&self, req: Request<Incoming>) -> Response<MockBody> {
        let path = req.uri().path().to_owned();
        let method = req.method().clone();
        let read = method == Method::GET || method == Method::HEAD;

        if path == "/echo" || path.starts_with("/echo/") {
            return self.echo(req).await;
        }
        match path.as_str() {
            "/health" if read => self.json(
                StatusCode::OK,
                json!({"status": "healthy", "service": &*self.name, "port": self.port}),
            ),
            "/users" if read => self.list("users", USERS),
            "/users" if method == Method::POST => self.create_user(req).await,
            "/orders" if read => self.list("orders", ORDERS),
            "/products" if read => self.list("products", PRODUCTS),
            "/stream" if read => self.stream(req.uri().query()),
            "/sse" if read => self.sse(req.uri().query()),
            "/bytes" if read => self.bytes(req.uri().query()),
            "/health" | "/users" | "/orders" | "/products" | "/stream" | "/sse" | "/bytes" => {
                self.method_not_allowed(&method, &path)
            }
            _ => self.by_prefix(&method, &path, read).await,
        }
    }

    /// Routes carrying a path parameter: `/users/{id}`, `/status/{code}`, `/delay/{ms}`, ...
    async fn by_prefix(&self, method: &Method, path: &str, read: bool) -> Response<MockBody> {
        if let Some(id) = path.strip_prefix("/users/") {
            if !read {
                return self.method_not_allowed(method, path);
            }
            return self.item(
                "user",
                USERS.iter().find(|u| Some(u.id) == parse_id(id)),
                path,
            );
        }
        if let Some(id) = path.strip_prefix("/orders/") {
            if !read {
                return self.method_not_allowed(method, path);
            }
            return self.item(
                "order",
                ORDERS.iter().find(|o| Some(o.id) == parse_id(id)),
                path,
            );
        }
        if let Some(id) = path.strip_prefix("/products/") {
            if !read {
                return self.method_not_allowed(method, path);
            }
            let product = PRODUCTS.iter().find(|p| Some(p.id) == parse_id(id));
            return self.item("product", product, path);
        }
        if let Some(code) = path.strip_prefix("/status/") {
            return self.status(code);
        }
        if let Some(ms) = path.strip_prefix("/delay/") {
            return self.delay(ms).await;
        }
        self.not_found(path)
    }

    fn list<T: Serialize>(&self, key: &str, items: &[T]) -> Response<MockBody> {
        let mut body = self.base();
        body.insert(key.to_owned(), json!(items));
        self.json(StatusCode::OK, Value::Object(body))
    }

    fn item<T: Serialize>(&self, key: &str, item: Option<&T>, path: &str) -> Response<MockBody> {
        match item {
            Some(item) => {
                let mut body = self.base();
                body.insert(key.to_owned(), json!(item));
                self.json(StatusCode::OK, Value::Object(body))
            }
            None => self.not_found(path),
        }
    }

    async fn create_user(&self, req: Request<Incoming>) -> Response<MockBody> {
        let bytes = match Limited::new(req.into_body(), MAX_JSON_BODY).collect().await {
            Ok(collected) => collected.to_bytes(),
            Err(e) if e.is::<http_body_util::LengthLimitError>() => {
                return self.error(StatusCode::PAYLOAD_TOO_LARGE, "request body too large");
            }
            Err(_) => return self.error(StatusCode::BAD_REQUEST, "request body unreadable"),
        };
        let new: NewUser = match serde_json::from_slice(&bytes) {
            Ok(new) => new,
            Err(_) => {
                return self.error(
                    StatusCode::BAD_REQUEST,
                    "expected a JSON object like {\"name\":\"Dave\"}",
                )
            }
        };
        let id = self.next_user_id.fetch_add(1, Ordering::Relaxed);
        let mut body = self.base();
        body.insert("user".to_owned(), json!({"id": id, "name": new.name}));
        self.json(StatusCode::CREATED, Value::Object(body))
    }

    /// Reports what arrived. The body is counted frame by frame, never buffered, so a
    /// 100 MiB upload costs no memory.
    async fn echo(&self, req: Request<Incoming>) -> Response<MockBody> {
        let (parts, mut body) = req.into_parts();
        let mut body_size: u64 = 0;
        while let Some(frame) = body.frame().await {
            match frame {
                Ok(frame) => {
                    if let Some(data) = frame.data_ref() {
                        body_size += data.len() as u64;
                    }
                }
                Err(_) => return self.error(StatusCode::BAD_REQUEST, "request body unreadable"),
            }
        }

        let mut headers = serde_json::Map::new();
        for name in parts.headers.keys() {
            let values: Vec<Value> = parts
                .headers
                .get_all(name)
                .iter()
                .map(|v| Value::String(String::from_utf8_lossy(v.as_bytes()).into_owned()))
                .collect();
            headers.insert(name.as_str().to_owned(), Value::Array(values));
        }

        let mut out = self.base();
        out.insert("method".to_owned(), json!(parts.method.as_str()));
        out.insert("path".to_owned(), json!(parts.uri.path()));
        out.insert("query".to_owned(), json!(parts.uri.query()));
        out.insert("headers".to_owned(), Value::Object(headers));
        out.insert("body_size".to_owned(), json!(body_size));
        out.insert("version".to_owned(), json!(format!("{:?}", parts.version)));
        self.json(StatusCode::OK, Value::Object(out))
    }

    /// `/stream?chunks=N&interval_ms=M&size=S`: N chunks of S bytes (`x`), the first at
    /// once and the rest M ms apart. Defaults: 5 chunks, 100 ms, 16 bytes.
    fn stream(&self, query: Option<&str>) -> Response<MockBody> {
        let params = (
            param(query, "chunks", 5, MAX_CHUNKS),
            param(query, "interval_ms", 100, MAX_INTERVAL_MS),
            param(query, "size", 16, MAX_CHUNK_SIZE),
        );
        let (chunks, interval_ms, size) = match params {
            (Ok(c), Ok(i), Ok(s)) => (c, i, s),
            (Err(e), _, _) | (_, Err(e), _) | (_, _, Err(e)) => {
                return self.error(StatusCode::BAD_REQUEST, &e)
            }
        };
        // Bounded by MAX_CHUNK_SIZE above, so the conversion cannot fail on 32-bit either.
        let chunk = Bytes::from(vec![b'x'; usize::try_from(size).unwrap_or(0)]);
        let body = paced(chunks, Duration::from_millis(interval_ms), move |_| {
            chunk.clone()
        });
        self.streaming(body, "application/octet-stream")
    }

    /// `/sse?events=N&interval_ms=M`: N events `data: {"seq":i}`, the first at once and the
    /// rest M ms apart. Defaults: 5 events, 100 ms.
    fn sse(&self, query: Option<&str>) -> Response<MockBody> {
        let (events, interval_ms) = match (
            param(query, "events", 5, MAX_CHUNKS),
            param(query, "interval_ms", 100, MAX_INTERVAL_MS),
        ) {
            (Ok(e), Ok(i)) => (e, i),
            (Err(e), _) | (_, Err(e)) => return self.error(StatusCode::BAD_REQUEST, &e),
        };
        let body = paced(events, Duration::from_millis(interval_ms), |seq| {
            Bytes::from(format!("data: {{\"seq\":{seq}}}\n\n"))
        });
        let mut resp = self.streaming(body, "text/event-stream");
        resp.headers_mut()
            .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        resp
    }

    /// `/bytes?size=N`: N bytes (default 1024) with Content-Length, generated while sending.
    /// Byte at offset k is `k % 251`, so a client can check a large download arrived intact.
    fn bytes(&self, query: Option<&str>) -> Response<MockBody> {
        match param(query, "size", 1024, u64::MAX) {
            Ok(size) => self.streaming(
                PatternBody { remaining: size }.boxed(),
                "application/octet-stream",
            ),
            Err(e) => self.error(StatusCode::BAD_REQUEST, &e),
        }
    }

    /// `/status/{code}`: answers with that status (200..=599) and a JSON body naming it.
    fn status(&self, code: &str) -> Response<MockBody> {
        let status = match code.parse::<u16>().ok().filter(|c| (200..=599).contains(c)) {
            Some(c) => StatusCode::from_u16(c).unwrap_or(StatusCode::OK),
            None => return self.error(StatusCode::BAD_REQUEST, "status must be 200..=599"),
        };
        let mut body = self.base();
        body.insert("status".to_owned(), json!(status.as_u16()));
        let mut resp = self.json(status, Value::Object(body));
        // These statuses forbid a body; sending one would corrupt the next keep-alive response.
        if matches!(status.as_u16(), 204 | 205 | 304) {
            *resp.body_mut() = Full::new(Bytes::new()).boxed();
            resp.headers_mut().remove(header::CONTENT_TYPE);
        }
        resp
    }

    /// `/delay/{ms}`: sleeps, then answers 200. At most ten minutes.
    async fn delay(&self, ms: &str) -> Response<MockBody> {
        let ms = match ms.parse::<u64>().ok().filter(|ms| *ms <= MAX_DELAY_MS) {
            Some(ms) => ms,
            None => {
                return self.error(
                    StatusCode::BAD_REQUEST,
                    &format!("delay must be 0..={MAX_DELAY_MS} ms"),
                )
            }
        };
        tokio::time::sleep(Duration::from_millis(ms)).await;
        let mut body = self.base();
        body.insert("delay_ms".to_owned(), json!(ms));
        self.json(StatusCode::OK, Value::Object(body))
    }

    fn not_found(&self, path: &str) -> Response<MockBody> {
        let mut body = self.base();
        body.insert("error".to_owned(), json!("not found"));
        body.insert("path".to_owned(), json!(path));
        self.json(StatusCode::NOT_FOUND, Value::Object(body))
    }

    fn method_not_allowed(&self, method: &Method, path: &str) -> Response<MockBody> {
        let mut body = self.base();
        body.insert("error".to_owned(), json!("method not allowed"));
        body.insert("method".to_owned(), json!(method.as_str()));
        body.insert("path".to_owned(), json!(path));
        self.json(StatusCode::METHOD_NOT_ALLOWED, Value::Object(body))
    }

    fn error(&self, status: StatusCode, message: &str) -> Response<MockBody> {
        let mut body = self.base();
        body.insert("error".to_owned(), json!(message));
        self.json(status, Value::Object(body))
    }

    /// The two fields every body carries, so tests can tell which replica answered.
    fn base(&self) -> serde_json::Map<String, Value> {
        let mut map = serde_json::Map::new();
        map.insert("service".to_owned(), json!(&*self.name));
        map.insert("port".to_owned(), json!(self.port));
        map
    }

    fn json(&self, status: StatusCode, body: Value) -> Response<MockBody> {
        let mut resp = Response::new(Full::new(Bytes::from(body.to_string())).boxed());
        *resp.status_mut() = status;
        self.decorate(&mut resp, "application/json");
        resp
    }

    fn streaming(&self, body: MockBody, content_type: &'static str) -> Response<MockBody> {
        let mut resp = Response::new(body);
        self.decorate(&mut resp, content_type);
        resp
    }

    fn decorate(&self, resp: &mut Response<MockBody>, content_type: &'static str) {
        let headers = resp.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
        // Names that are not valid header values simply go without the header.
        if let Ok(name) = HeaderValue::from_str(&self.name) {
            headers.insert("x-mock-service", name);
        }
    }
}

/// Parses an id path segment; anything else (empty, signs, text) is simply "not found".
fn parse_id(segment: &str) -> Option<u64> {
    segment.parse().ok()
}

/// Reads a numeric query parameter (first occurrence wins), bounded by `max`.
fn param(query: Option<&str>, key: &str, default: u64, max: u64) -> Result<u64, String> {
    let raw = query
        .into_iter()
        .flat_map(|q| q.split('&'))
        .find_map(|pair| match pair.split_once('=') {
            Some((k, v)) if k == key => Some(v),
            None if pair == key => Some(""),
            _ => None,
        });
    match raw {
        None => Ok(default),
        Some(v) => match v.parse::<u64>() {
            Ok(n) if n <= max => Ok(n),
            _ => Err(format!("{key} must be an integer in 0..={max}")),
        },
    }
}

/// A body fed by a task that produces `count` frames, the first at once and then one per
/// `interval`. The task stops as soon as the client goes away.
fn paced<F>(count: u64, interval: Duration, mut frame: F) -> MockBody
where
    F: FnMut(u64) -> Bytes + Send + 'static,
{
    // Capacity 1 keeps the producer in step with the connection: chunks are not queued up
    // ahead of a slow reader, so timing seen by the client matches the requested interval.
    let (tx, rx) = mpsc::channel(1);
    tokio::spawn(async move {
        for seq in 0..count {
            if seq > 0 {
                tokio::select! {
                    () = tokio::time::sleep(interval) => {}
                    () = tx.closed() => return,
                }
            }
            if tx.send(frame(seq)).await.is_err() {
                return;
            }
        }
    });
    ChannelBody { rx }.boxed()
}

// === bodies ===

/// Streams whatever the producer task sends; ends when the sender is dropped.
struct ChannelBody {
    rx: mpsc::Receiver<Bytes>,
}

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.rx.poll_recv(cx).map(|b| b.map(|b| Ok(Frame::data(b))))
    }
}

/// Length of the repeating download pattern: a multiple of 251, so every full slice
/// continues the `k % 251` sequence where the previous one stopped.
const PATTERN_LEN: usize = 251 * 256;
static PATTERN: [u8; PATTERN_LEN] = pattern();

const fn pattern() -> [u8; PATTERN_LEN] {
    let mut out = [0u8; PATTERN_LEN];
    let mut i = 0;
    while i < PATTERN_LEN {
        out[i] = (i % 251) as u8;
        i += 1;
    }
    out
}

/// `remaining` bytes of the `k % 251` pattern, served as slices of one static buffer, so
/// a 100 MiB download allocates nothing.
struct PatternBody {
    remaining: u64,
}

impl Body for PatternBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.remaining == 0 {
            return Poll::Ready(None);
        }
        let len = usize::try_from(self.remaining).map_or(PATTERN_LEN, |r| r.min(PATTERN_LEN));
        self.remaining -= len as u64;
        Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(&PATTERN[..len])))))
    }

    fn is_end_stream(&self) -> bool {
        self.remaining == 0
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.remaining)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn param_defaults_bounds_and_garbage() {
        assert_eq!(param(None, "size", 7, 10), Ok(7));
        assert_eq!(param(Some("a=1&size=3"), "size", 7, 10), Ok(3));
        assert_eq!(param(Some("size=3&size=4"), "size", 7, 10), Ok(3));
        assert!(param(Some("size=11"), "size", 7, 10).is_err());
        assert!(param(Some("size=-1"), "size", 7, 10).is_err());
        assert!(param(Some("size"), "size", 7, 10).is_err());
        assert_eq!(param(Some("sizes=3"), "size", 7, 10), Ok(7));
    }

    #[test]
    fn pattern_body_continues_across_frames() {
        let mut body = PatternBody {
            remaining: PATTERN_LEN as u64 + 10,
        };
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        let mut seen = Vec::new();
        while let Poll::Ready(Some(Ok(frame))) = Pin::new(&mut body).poll_frame(&mut cx) {
            seen.extend_from_slice(frame.data_ref().expect("data frame"));
        }
        assert_eq!(seen.len(), PATTERN_LEN + 10);
        assert!(seen.iter().enumerate().all(|(k, b)| *b as usize == k % 251));
    }
}
