//! Listeners: the accept loops, one task per connection, connection limits, and graceful drain.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use http::{Method, Response};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::Request;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::body::ClientBody;
use crate::proxy::{self, LocalAnswer, ProxyState, ResponseBody};

pub(crate) mod conn;
pub mod settings;
pub mod threads;

pub use settings::{ServerConfig, TlsListener};

/// The admin side of the gateway as the server sees it: the admin listener's whole service, and
/// the admin paths the main listener answers. Implemented by `admin::Admin`.
pub trait AdminService: Send + Sync + 'static {
    /// Answers one admin request.
    fn respond(&self, req: &Request<ClientBody>) -> Response<ResponseBody>;

    /// Answers an admin request whose body it needs (`POST /cache/purge`), read whole first.
    fn respond_with_body(&self, req: &Request<bytes::Bytes>) -> Response<ResponseBody>;
}

/// Admin request bodies (small JSON documents) are read whole up to this size.
const ADMIN_BODY_LIMIT: usize = 64 * 1024;

/// Reads an admin request's body, bounded in size and time.
async fn admin_body(req: Request<ClientBody>) -> Result<Request<bytes::Bytes>, http::StatusCode> {
    use http_body_util::BodyExt;
    let (parts, body) = req.into_parts();
    let read = http_body_util::Limited::new(body, ADMIN_BODY_LIMIT).collect();
    match tokio::time::timeout(Duration::from_secs(10), read).await {
        Ok(Ok(collected)) => Ok(Request::from_parts(parts, collected.to_bytes())),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => {
            Err(http::StatusCode::PAYLOAD_TOO_LARGE)
        }
        Ok(Err(_)) => Err(http::StatusCode::BAD_REQUEST),
        Err(_) => Err(http::StatusCode::REQUEST_TIMEOUT),
    }
}

/// What the listeners serve: the request path, the admin service, and the TLS listener's
/// configuration (replaced on reload).
pub struct Serving {
    /// The request path's state.
    pub proxy: Arc<ProxyState>,
    /// The admin service.
    pub admin: Arc<dyn AdminService>,
    /// The TLS listener's configuration; new handshakes read the latest.
    pub tls: Arc<ArcSwapOption<rustls::ServerConfig>>,
    /// Answer `/health` and `/status` on the main listener (`admin.expose_on_main`).
    pub expose_admin: bool,
}

impl LocalAnswer for Serving {
    /// The server, not the request path, decides which admin paths the main listener answers.
    fn answer(&self, req: &Request<ClientBody>) -> Option<Response<ResponseBody>> {
        let admin_path = self.expose_admin
            && req.method() == Method::GET
            && matches!(req.uri().path(), "/health" | "/status");
        admin_path.then(|| self.admin.respond(req))
    }
}

/// Builds the TLS connection builder: HTTP/1.1 with keep-alive, or HTTP/2 by ALPN.
fn tls_builder(cfg: &ServerConfig) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(cfg.header_read_timeout)
        .max_buf_size(cfg.max_header_bytes)
        .max_headers(cfg.max_headers)
        .keep_alive(true);
    // HTTP/2 chosen by ALPN is served by `conn::serve_h2` with the plain builder; this one
    // only sees clients that speak h2 over TLS without ALPN.
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(cfg.max_header_bytes as u32)
        .max_concurrent_streams(cfg.h2_max_concurrent_streams)
        .max_pending_accept_reset_streams(H2_MAX_PENDING_ACCEPT_RESETS)
        .max_local_error_reset_streams(H2_MAX_LOCAL_ERROR_RESETS);
    builder
}

/// Streams a client may open and reset before the gateway takes them up; one more and the
/// connection gets GOAWAY (ENHANCE_YOUR_CALM). This bounds the rapid-reset flood
/// (CVE-2023-44487). h2's own default, set here so a dependency update cannot loosen it.
const H2_MAX_PENDING_ACCEPT_RESETS: usize = 20;

/// Streams the gateway may reset because the client broke the protocol on them before the
/// connection gets GOAWAY ("MadeYouReset", CVE-2025-8671). hyper's default, set here for the
/// same reason.
const H2_MAX_LOCAL_ERROR_RESETS: usize = 1024;

/// Builds the plain-TCP builders: HTTP/1.1 (hyper only while a request is in flight) and h2c
/// by prior knowledge (also used for TLS connections that chose h2 by ALPN).
fn plain_builders(cfg: &ServerConfig) -> conn::Plain {
    let mut h1 = hyper::server::conn::http1::Builder::new();
    h1.timer(TokioTimer::new())
        .header_read_timeout(cfg.header_read_timeout)
        .max_buf_size(cfg.max_header_bytes)
        .max_headers(cfg.max_headers)
        // Zero keep-alive means one request per connection, announced with `Connection: close`.
        .keep_alive(!cfg.keep_alive_timeout.is_zero());
    let mut h2 = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    h2.timer(TokioTimer::new())
        .max_header_list_size(cfg.max_header_bytes as u32)
        .max_concurrent_streams(cfg.h2_max_concurrent_streams)
        .max_pending_accept_reset_streams(H2_MAX_PENDING_ACCEPT_RESETS)
        .max_local_error_reset_streams(H2_MAX_LOCAL_ERROR_RESETS);
    conn::Plain {
        h1,
        h2,
        header_read_timeout: cfg.header_read_timeout,
        keep_alive_timeout: cfg.keep_alive_timeout,
        quiet: conn::Plain::quiet_for(cfg.header_read_timeout),
    }
}

impl<I, S, E> conn::Graceful for auto::UpgradeableConnection<'_, I, S, E>
where
    Self: std::future::Future,
    S: hyper::service::Service<Request<Incoming>, Response = hyper::Response<proxy::ResponseBody>>,
    S::Future: 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    E: hyper::rt::bounds::Http2ServerConnExec<S::Future, proxy::ResponseBody>,
{
    fn start_graceful(self: std::pin::Pin<&mut Self>) {
        self.graceful_shutdown();
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// What a listener serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// The proxy (and the seed's `/health` and `/status`).
    Main,
    /// The proxy behind TLS (HTTP/2 or HTTP/1.1 by ALPN).
    Tls,
    /// Admin endpoints only.
    Admin,
}

/// Connections being served, and the signal that asks them to finish.
#[derive(Debug, Default)]
pub struct Drain {
    signal: CancellationToken,
    tracker: TaskTracker,
}

impl Drain {
    /// Asks every connection to finish its in-flight requests and close, then waits for them.
    pub async fn shutdown(&self) {
        self.signal.cancel();
        self.tracker.close();
        self.tracker.wait().await;
    }
}

/// One listener's accept loop and what it shares with the other loops on the same listener
/// (one per serving thread): the connection limit and the drain.
#[derive(Clone)]
pub struct Acceptor {
    /// What the listener serves.
    pub role: Role,
    /// The listener's view of the request path and admin.
    pub serving: Arc<Serving>,
    /// `[server]`.
    pub cfg: ServerConfig,
    /// Tracks the connections, and asks them to finish.
    pub drain: Arc<Drain>,
    /// Ends the accept loop.
    pub stop: CancellationToken,
    /// Closes the connections still open when the grace period is over.
    pub force_close: CancellationToken,
    /// `server.max_connections`, shared by every loop on the listener.
    pub limit: Arc<Semaphore>,
}

impl Acceptor {
    /// The loop for `role`, with its own connection limit from `cfg`.
    pub fn new(
        role: Role,
        serving: Arc<Serving>,
        cfg: ServerConfig,
        drain: Arc<Drain>,
        stop: CancellationToken,
        force_close: CancellationToken,
    ) -> Self {
        let limit = Arc::new(Semaphore::new(cfg.max_connections));
        Self {
            role,
            serving,
            cfg,
            drain,
            stop,
            force_close,
            limit,
        }
    }
}

/// Accepts connections until `stop` is cancelled; every connection is tracked by `drain`.
pub async fn serve(listener: TcpListener, acceptor: Acceptor) {
    let Acceptor {
        role,
        serving,
        cfg,
        drain,
        stop,
        force_close,
        limit,
    } = acceptor;
    let tls_builder = Arc::new(tls_builder(&cfg));
    let plain = Arc::new(plain_builders(&cfg));
    loop {
        let permit = tokio::select! {
            _ = stop.cancelled() => break,
            p = limit.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let (stream, peer) = tokio::select! {
            _ = stop.cancelled() => break,
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    accept_error(&e).await;
                    continue;
                }
            },
        };
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(error = %e, "set_nodelay failed");
        }
        serving
            .proxy
            .metrics
            .connections_accepted
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        serving
            .proxy
            .metrics
            .connections_open
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let conn_state = serving.clone();
        let state = serving.clone();
        let shared = crate::conn::ConnShared::new(plain.quiet);
        let body_read_timeout = cfg.body_read_timeout;
        let service = {
            let shared = shared.clone();
            service_fn(move |req: Request<Incoming>| {
                let state = state.clone();
                let mark = shared.begin(&req);
                let version = req.version();
                let (parts, body) = req.into_parts();
                let (body, end) = ClientBody::new(body, body_read_timeout);
                let req = Request::from_parts(parts, body);
                async move {
                    let mut resp = dispatch(&state, role, req, peer).await;
                    if end.is_some_and(|end| !end.load(std::sync::atomic::Ordering::Acquire)) {
                        // Answered before the body was read to its end: what follows on the
                        // socket is body, never a request. Close, reading out the rest first.
                        mark.end_unread();
                        if version <= http::Version::HTTP_11 {
                            resp.headers_mut().insert(
                                http::header::CONNECTION,
                                http::HeaderValue::from_static("close"),
                            );
                        }
                    }
                    Ok::<_, Infallible>(resp.map(|b| b.hold_connection(mark)))
                }
            })
        };
        let tls = match role {
            Role::Tls => conn_state
                .tls
                .load_full()
                .map(tokio_rustls::TlsAcceptor::from),
            Role::Main | Role::Admin => None,
        };
        let tls_builder = tls_builder.clone();
        let plain = plain.clone();
        let signal = drain.signal.clone();
        let force_close = force_close.clone();
        let first_byte_timeout = cfg.header_read_timeout;
        // Tracked from here, so a shutdown signalled before the task first runs still waits.
        let tracked = drain.tracker.token();
        tokio::spawn(async move {
            let _tracked = tracked;
            // The TLS arm is boxed: the task's size is that of its largest state, and a plain
            // connection's idle state should be small.
            let serve: std::pin::Pin<
                Box<dyn std::future::Future<Output = Result<(), BoxError>> + Send>,
            > = match tls {
                None => Box::pin(async move {
                    conn::serve(stream, service, shared, &plain, &signal)
                        .await
                        .map_err(BoxError::from)
                }),
                Some(acceptor) => Box::pin(async move {
                    let settings_by = tokio::time::Instant::now() + first_byte_timeout;
                    match tokio::time::timeout(first_byte_timeout, acceptor.accept(stream)).await {
                        Ok(Ok(tls)) if tls.get_ref().1.alpn_protocol() == Some(b"h2") => {
                            conn::serve_h2(tls, service, &plain, settings_by, &signal)
                                .await
                                .map_err(BoxError::from)
                        }
                        Ok(Ok(tls)) => {
                            let c = tls_builder
                                .serve_connection_with_upgrades(TokioIo::new(tls), service);
                            conn::graceful(std::pin::pin!(c), &signal).await
                        }
                        Ok(Err(e)) => {
                            tracing::debug!(client.addr = %peer, error = %e, "TLS handshake failed");
                            Ok(())
                        }
                        Err(_) => {
                            tracing::debug!(client.addr = %peer, "TLS handshake timed out");
                            Ok(())
                        }
                    }
                }),
            };
            let result = match conn::or_cancelled(&force_close, serve).await {
                Some(r) => r,
                None => {
                    tracing::debug!(client.addr = %peer, "connection closed at the end of the grace period");
                    Ok(())
                }
            };
            if let Err(e) = result {
                tracing::debug!(client.addr = %peer, error = %e, "connection ended with an error");
            }
            drop(permit);
            conn_state
                .proxy
                .metrics
                .connections_open
                .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        });
    }
    tracing::debug!(?role, "stopped accepting");
}

async fn dispatch(
    serving: &Serving,
    role: Role,
    req: Request<ClientBody>,
    peer: SocketAddr,
) -> Response<ResponseBody> {
    match role {
        Role::Main => proxy::handle(&serving.proxy, req, peer, "http", serving).await,
        Role::Tls => proxy::handle(&serving.proxy, req, peer, "https", serving).await,
        Role::Admin if req.method() == Method::POST && req.uri().path() == "/cache/purge" => {
            match admin_body(req).await {
                Ok(req) => serving.admin.respond_with_body(&req),
                Err(status) => proxy::json_response(
                    status,
                    &serde_json::json!({"error": status.canonical_reason(), "message": "the admin request body could not be read (64 KiB at most)"}),
                ),
            }
        }
        Role::Admin => serving.admin.respond(&req),
    }
}

/// Accept errors are per-connection (the peer went away) or resource exhaustion; neither ends
/// the loop. Out of file descriptors, pause briefly so we do not spin.
async fn accept_error(e: &std::io::Error) {
    let exhausted = matches!(e.raw_os_error(), Some(23) | Some(24)); // ENFILE, EMFILE
    tracing::warn!(error = %e, "accept failed");
    if exhausted {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Resolves on SIGTERM or SIGINT (Ctrl-C).
pub async fn shutdown_signal() {
    {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            match signal(SignalKind::terminate()) {
                Ok(mut term) => {
                    tokio::select! {
                        _ = term.recv() => {}
                        _ = tokio::signal::ctrl_c() => {}
                    }
                }
                Err(_) => {
                    let _ = tokio::signal::ctrl_c().await;
                }
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
