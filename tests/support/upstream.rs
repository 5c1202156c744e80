//! Scriptable loopback HTTP/1.1 upstream for integration tests: fixed answers per path, delays,
//! hang-ups, and counters of what arrived. It records requests; judging them is the test's job.

use std::any::Any;
use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue, CONTENT_TYPE};
use http::{HeaderMap, Method, Request, Response, StatusCode, Version};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use serde_json::{json, Value};
use tokio::net::{TcpListener, TcpSocket};
use tokio::task::{JoinHandle, JoinSet};
use tokio_util::sync::CancellationToken;

/// How long `shutdown` lets in-flight requests finish before cutting their connections.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(1);

/// One request as the upstream received it.
#[derive(Debug, Clone)]
pub struct SeenRequest {
    /// Request method.
    pub method: Method,
    /// Path and query exactly as sent on the request line (no normalisation, no decoding).
    pub uri: String,
    /// All request headers, repeated names included, in arrival order.
    pub headers: HeaderMap,
    /// Request body bytes read; less than sent if the client went away mid-body.
    pub body_len: u64,
    /// HTTP version of the request.
    pub version: Version,
}

impl SeenRequest {
    /// The path part of [`SeenRequest::uri`].
    pub fn path(&self) -> &str {
        self.uri
            .split_once('?')
            .map_or(self.uri.as_str(), |(p, _)| p)
    }

    /// The raw query string, `None` when the request line had no `?` at all.
    pub fn query(&self) -> Option<&str> {
        self.uri.split_once('?').map(|(_, q)| q)
    }
}

/// What one path is scripted to do. Unset parts fall back to the defaults.
#[derive(Debug, Clone, Default)]
struct Script {
    response: Option<(StatusCode, Bytes)>,
    headers: Vec<(HeaderName, HeaderValue)>,
    delay: Option<Duration>,
    reset: bool,
    etag: Option<HeaderValue>,
}

/// Configures a [`TestUpstream`]; every method takes and returns the builder.
#[derive(Debug, Clone)]
pub struct TestUpstreamBuilder {
    name: String,
    routes: HashMap<String, Script>,
    all_headers: Vec<(HeaderName, HeaderValue)>,
    echo: bool,
}

/// A loopback HTTP/1.1 server (keep-alive on) that answers as scripted and counts requests.
///
/// Panics inside the server are re-raised by [`TestUpstream::shutdown`], or on drop if the
/// test never called it, so a broken upstream fails the test instead of hiding in a log.
#[derive(Debug)]
pub struct TestUpstream {
    addr: SocketAddr,
    state: Arc<State>,
    shutdown: CancellationToken,
    /// The accept loop; taken by `shutdown`, which joins it.
    task: Option<JoinHandle<()>>,
}

/// Shared between the handle and the server tasks.
#[derive(Debug)]
struct State {
    name: Arc<str>,
    port: u16,
    routes: HashMap<String, Script>,
    all_headers: Vec<(HeaderName, HeaderValue)>,
    echo: bool,
    hits: AtomicUsize,
    connections: AtomicUsize,
    // std Mutexes are fine here: test support only, tiny critical sections, never held
    // across an await.
    hits_on: Mutex<HashMap<String, usize>>,
    requests: Mutex<Vec<SeenRequest>>,
    /// First panic caught in a request or connection task, re-raised in the test.
    panic: Mutex<Option<Box<dyn Any + Send>>>,
}

// === impl TestUpstream ===

impl TestUpstream {
    /// Starts configuring an upstream named `"upstream"` with no routes.
    pub fn builder() -> TestUpstreamBuilder {
        TestUpstreamBuilder {
            name: "upstream".to_owned(),
            routes: HashMap::new(),
            all_headers: Vec::new(),
            echo: false,
        }
    }

    /// The bound address (always loopback).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`, without a trailing slash.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Requests seen on all paths, counted as soon as their head arrives.
    pub fn hits(&self) -> usize {
        self.state.hits.load(Ordering::SeqCst)
    }

    /// Requests seen on exactly `path` (the query is ignored), counted when the head arrives.
    pub fn hits_on(&self, path: &str) -> usize {
        lock(&self.state.hits_on).get(path).copied().unwrap_or(0)
    }

    /// Requests whose body has been read (or abandoned by the client), in that order.
    /// A request still sending its body is counted by `hits` but not listed yet.
    pub fn requests(&self) -> Vec<SeenRequest> {
        lock(&self.state.requests).clone()
    }

    /// The most recent entry of [`TestUpstream::requests`].
    pub fn last_request(&self) -> Option<SeenRequest> {
        lock(&self.state.requests).last().cloned()
    }

    /// TCP connections accepted so far (keep-alive reuse shows as hits > connections).
    pub fn connections(&self) -> usize {
        self.state.connections.load(Ordering::SeqCst)
    }

    /// Stops accepting and frees the port, lets in-flight requests finish for up to 1 s,
    /// then cuts the remaining connections. Re-raises any panic from the server tasks.
    /// After this returns, [`TestUpstreamBuilder::start_on`] can rebind the same address.
    pub async fn shutdown(mut self) {
        self.shutdown.cancel();
        if let Some(task) = self.task.take() {
            if let Err(e) = task.await {
                if e.is_panic() {
                    std::panic::resume_unwind(e.into_panic());
                }
            }
        }
        self.state.reraise();
    }
}

impl Drop for TestUpstream {
    fn drop(&mut self) {
        self.shutdown.cancel();
        // Do not turn an already failing test into an abort by panicking twice.
        if !std::thread::panicking() {
            self.state.reraise();
        }
    }
}

// === impl TestUpstreamBuilder ===

impl TestUpstreamBuilder {
    /// Names the upstream; default responses carry this name as their whole body, so tests
    /// can see which upstream answered. Default `"upstream"`.
    pub fn name(mut self, name: &str) -> Self {
        name.clone_into(&mut self.name);
        self
    }

    /// Answers requests for exactly `path` (query ignored) with `status` and `body`.
    ///
    /// # Panics
    /// If `status` is not a valid status code (100..=999).
    pub fn route(mut self, path: &str, status: u16, body: &str) -> Self {
        let status = StatusCode::from_u16(status).expect("route status must be 100..=999");
        self.script(path).response = Some((status, Bytes::copy_from_slice(body.as_bytes())));
        self
    }

    /// Adds a response header on `path`, or on every response when `path` is `"*"`.
    /// Repeated calls append, so a name can carry several values. Hop-by-hop names
    /// (`Connection`, `Keep-Alive`, `Proxy-Connection`, ...) are sent as given, for tests of
    /// their removal; note hyper closes the connection after a `Connection: close`.
    ///
    /// # Panics
    /// If `name` or `value` is not valid in an HTTP header.
    pub fn header(mut self, path: &str, name: &str, value: &str) -> Self {
        let name = HeaderName::from_bytes(name.as_bytes()).expect("invalid header name");
        let value = HeaderValue::from_str(value).expect("invalid header value");
        if path == "*" {
            self.all_headers.push((name, value));
        } else {
            self.script(path).headers.push((name, value));
        }
        self
    }

    /// Waits `delay` after reading the request body and before answering on `path`.
    pub fn delay(mut self, path: &str, delay: Duration) -> Self {
        self.script(path).delay = Some(delay);
        self
    }

    /// On `path`, reads the whole request, then closes the TCP connection without sending
    /// a single response byte (for retry tests). The request still counts in `hits` and
    /// `requests`.
    pub fn reset_after_read(mut self, path: &str) -> Self {
        self.script(path).reset = true;
        self
    }

    /// Answers on `path` carry `ETag: etag`; a request whose `If-None-Match` names it gets a
    /// 304 carrying only the ETag and the path's `Cache-Control` headers (for cache tests).
    pub fn etag(mut self, path: &str, etag: &str) -> Self {
        self.script(path).etag = Some(HeaderValue::from_str(etag).expect("invalid etag"));
        self
    }

    /// Paths without a scripted response answer 200 with JSON of what arrived, shaped like
    /// the mock service's `/echo`: `service`, `port`, `method`, `path`, `query` (raw, or
    /// null), `headers` (lowercase name to all values), `body_size`, `version`.
    pub fn echo(mut self) -> Self {
        self.echo = true;
        self
    }

    /// Binds `127.0.0.1:0` and starts serving.
    pub async fn start(self) -> TestUpstream {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind test upstream on 127.0.0.1:0");
        self.serve(listener)
    }

    /// Binds `addr` (typically the address of an upstream that was just shut down, for
    /// restart tests) with SO_REUSEADDR, so leftover TIME_WAIT sockets do not block it.
    pub async fn start_on(self, addr: SocketAddr) -> TestUpstream {
        let socket = if addr.is_ipv4() {
            TcpSocket::new_v4()
        } else {
            TcpSocket::new_v6()
        }
        .expect("create test upstream socket");
        socket.set_reuseaddr(true).expect("set SO_REUSEADDR");
        socket
            .bind(addr)
            .unwrap_or_else(|e| panic!("bind test upstream on {addr}: {e}"));
        let listener = socket.listen(1024).expect("listen on test upstream");
        self.serve(listener)
    }

    fn script(&mut self, path: &str) -> &mut Script {
        self.routes.entry(path.to_owned()).or_default()
    }

    fn serve(self, listener: TcpListener) -> TestUpstream {
        let addr = listener.local_addr().expect("test upstream local_addr");
        let state = Arc::new(State {
            name: Arc::from(self.name),
            port: addr.port(),
            routes: self.routes,
            all_headers: self.all_headers,
            echo: self.echo,
            hits: AtomicUsize::new(0),
            connections: AtomicUsize::new(0),
            hits_on: Mutex::new(HashMap::new()),
            requests: Mutex::new(Vec::new()),
            panic: Mutex::new(None),
        });
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(accept_loop(listener, Arc::clone(&state), shutdown.clone()));
        TestUpstream {
            addr,
            state,
            shutdown,
            task: Some(task),
        }
    }
}

// === server ===

async fn accept_loop(listener: TcpListener, state: Arc<State>, shutdown: CancellationToken) {
    let graceful = GracefulShutdown::new();
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            biased;
            () = shutdown.cancelled() => break,
            Some(joined) = conns.join_next() => state.note_join(joined),
            accepted = listener.accept() => {
                let Ok((stream, _peer)) = accepted else {
                    // Transient (aborted handshake, fd pressure); a short pause avoids spinning.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                state.connections.fetch_add(1, Ordering::SeqCst);
                // Nagle would add ~40 ms to small responses and skew timeout tests.
                let _ = stream.set_nodelay(true);
                let svc_state = Arc::clone(&state);
                let svc = service_fn(move |req| {
                    let state = Arc::clone(&svc_state);
                    async move {
                        match CatchPanic(Box::pin(handle(Arc::clone(&state), req))).await {
                            Ok(result) => result,
                            Err(payload) => {
                                state.record_panic(payload);
                                Err(Hangup("request handler panicked"))
                            }
                        }
                    }
                });
                let conn = http1::Builder::new()
                    .keep_alive(true)
                    // Above any gateway's `server.max_headers`, so the gateway's limit is the
                    // one under test.
                    .max_headers(1_000)
                    .timer(TokioTimer::new())
                    .serve_connection(TokioIo::new(stream), svc);
                let conn = graceful.watch(conn);
                conns.spawn(async move {
                    // Errors here are hang-ups we caused or clients going away: both normal.
                    let _ = conn.await;
                });
            }
        }
    }
    // Free the port first, so restart tests can rebind while stragglers drain.
    drop(listener);
    let _ = tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown()).await;
    conns.abort_all();
    while let Some(joined) = conns.join_next().await {
        state.note_join(joined);
    }
}

async fn handle(
    state: Arc<State>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Hangup> {
    let path = req.uri().path().to_owned();
    state.hits.fetch_add(1, Ordering::SeqCst);
    *lock(&state.hits_on).entry(path.clone()).or_insert(0) += 1;

    let (parts, mut body) = req.into_parts();
    // Count frames as they come: a 100 MiB upload must not be held in memory.
    let mut body_len = 0u64;
    let mut body_ok = true;
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(frame) => body_len += frame.data_ref().map_or(0, |d| d.len() as u64),
            Err(_) => {
                body_ok = false;
                break;
            }
        }
    }
    let seen = SeenRequest {
        method: parts.method,
        uri: parts
            .uri
            .path_and_query()
            .map_or_else(|| parts.uri.to_string(), |pq| pq.as_str().to_owned()),
        headers: parts.headers,
        body_len,
        version: parts.version,
    };
    lock(&state.requests).push(seen.clone());
    if !body_ok {
        return Err(Hangup("client went away mid-body"));
    }

    let script = state.routes.get(&path);
    if script.is_some_and(|s| s.reset) {
        // Returning an error makes hyper drop the connection without writing anything.
        return Err(Hangup("scripted reset_after_read"));
    }
    if let Some(delay) = script.and_then(|s| s.delay) {
        tokio::time::sleep(delay).await;
    }

    if let Some(etag) = script.and_then(|s| s.etag.as_ref()) {
        let matched = seen
            .headers
            .get_all(http::header::IF_NONE_MATCH)
            .iter()
            .any(|v| {
                v.to_str()
                    .is_ok_and(|v| v.split(',').any(|t| t.trim() == etag))
            });
        if matched {
            let mut resp = Response::new(Full::new(Bytes::new()));
            *resp.status_mut() = StatusCode::NOT_MODIFIED;
            resp.headers_mut().insert(http::header::ETAG, etag.clone());
            let route_headers = script.map(|s| s.headers.as_slice()).unwrap_or_default();
            for (name, value) in route_headers {
                if name == http::header::CACHE_CONTROL {
                    resp.headers_mut().append(name.clone(), value.clone());
                }
            }
            return Ok(resp);
        }
    }
    let mut resp = match script.and_then(|s| s.response.clone()) {
        Some((status, body)) => {
            let mut resp = Response::new(Full::new(body));
            *resp.status_mut() = status;
            resp
        }
        None if state.echo => {
            let mut resp = Response::new(Full::new(Bytes::from(echo_json(&state, &seen))));
            resp.headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            resp
        }
        None => Response::new(Full::new(Bytes::copy_from_slice(state.name.as_bytes()))),
    };
    let route_headers = script.map(|s| s.headers.as_slice()).unwrap_or_default();
    for (name, value) in state.all_headers.iter().chain(route_headers) {
        resp.headers_mut().append(name.clone(), value.clone());
    }
    if let Some(etag) = script.and_then(|s| s.etag.as_ref()) {
        resp.headers_mut().insert(http::header::ETAG, etag.clone());
    }
    Ok(resp)
}

fn echo_json(state: &State, seen: &SeenRequest) -> String {
    let mut headers = serde_json::Map::new();
    for name in seen.headers.keys() {
        let values = seen
            .headers
            .get_all(name)
            .iter()
            .map(|v| Value::String(String::from_utf8_lossy(v.as_bytes()).into_owned()))
            .collect();
        headers.insert(name.as_str().to_owned(), Value::Array(values));
    }
    json!({
        "service": &*state.name,
        "port": state.port,
        "method": seen.method.as_str(),
        "path": seen.path(),
        "query": seen.query(),
        "headers": headers,
        "body_size": seen.body_len,
        "version": format!("{:?}", seen.version),
    })
    .to_string()
}

// === impl State ===

impl State {
    fn record_panic(&self, payload: Box<dyn Any + Send>) {
        lock(&self.panic).get_or_insert(payload);
    }

    fn note_join(&self, joined: Result<(), tokio::task::JoinError>) {
        if let Err(e) = joined {
            if e.is_panic() {
                self.record_panic(e.into_panic());
            }
        }
    }

    fn reraise(&self) {
        let payload = lock(&self.panic).take();
        if let Some(payload) = payload {
            std::panic::resume_unwind(payload);
        }
    }
}

/// Locks, ignoring poisoning: a panicking handler is reported through `State::panic`, and
/// the counters it may have been updating are still meaningful.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The service error that makes hyper close the connection without a response.
#[derive(Debug)]
struct Hangup(&'static str);

impl std::fmt::Display for Hangup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0)
    }
}

impl std::error::Error for Hangup {}

/// Polls a future, turning a panic into `Err(payload)` so the test can re-raise it later
/// (the futures crate's `catch_unwind`, without the dependency).
struct CatchPanic<F>(Pin<Box<F>>);

impl<F: Future> Future for CatchPanic<F> {
    type Output = Result<F::Output, Box<dyn Any + Send>>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let inner = self.0.as_mut();
        match std::panic::catch_unwind(AssertUnwindSafe(|| inner.poll(cx))) {
            Ok(poll) => poll.map(Ok),
            Err(payload) => Poll::Ready(Err(payload)),
        }
    }
}
