//! Listeners: the accept loops, one task per connection, connection limits, and graceful drain.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::Request;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::config::ServerConfig;
use crate::proxy::{self, ProxyState};

/// Builds the downstream connection builder: HTTP/1.1 with keep-alive and h2c by prior knowledge.
pub fn connection_builder(cfg: &ServerConfig) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(cfg.header_read_timeout)
        .max_buf_size(cfg.max_header_bytes)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(cfg.max_header_bytes as u32);
    builder
}

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

/// Accepts connections until `stop` is cancelled; every connection is watched by `graceful`.
pub async fn serve(
    listener: TcpListener,
    role: Role,
    state: Arc<ProxyState>,
    cfg: ServerConfig,
    graceful: Arc<GracefulShutdown>,
    stop: CancellationToken,
    force_close: CancellationToken,
) {
    let builder = Arc::new(connection_builder(&cfg));
    let limit = Arc::new(Semaphore::new(cfg.max_connections));
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
        state
            .metrics
            .connections_accepted
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        state
            .metrics
            .connections_open
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let conn_state = state.clone();
        let state = state.clone();
        let service = service_fn(move |req: Request<Incoming>| {
            let state = state.clone();
            async move { Ok::<_, Infallible>(dispatch(&state, role, req, peer).await) }
        });
        let tls = match role {
            Role::Tls => conn_state
                .tls
                .load_full()
                .map(tokio_rustls::TlsAcceptor::from),
            Role::Main | Role::Admin => None,
        };
        let builder = builder.clone();
        // A watcher per connection, taken before the task starts, so a shutdown signalled in
        // between is still seen; the tasks never hold the GracefulShutdown itself.
        let watcher = graceful.watcher();
        let force_close = force_close.clone();
        let first_byte_timeout = cfg.header_read_timeout;
        tokio::spawn(async move {
            let serve = async {
                match tls {
                    None => {
                        // hyper's protocol detection waits for the first byte without a timer;
                        // a client that connects and says nothing must not hold a slot forever.
                        let mut probe = [0u8; 1];
                        match tokio::time::timeout(first_byte_timeout, stream.peek(&mut probe))
                            .await
                        {
                            Ok(Ok(n)) if n > 0 => {}
                            _ => {
                                tracing::debug!(client.addr = %peer, "no request within header_read_timeout");
                                return Ok(());
                            }
                        }
                        let conn =
                            builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
                        watcher.watch(conn.into_owned()).await
                    }
                    Some(acceptor) => {
                        match tokio::time::timeout(first_byte_timeout, acceptor.accept(stream))
                            .await
                        {
                            Ok(Ok(tls)) => {
                                let conn = builder
                                    .serve_connection_with_upgrades(TokioIo::new(tls), service);
                                watcher.watch(conn.into_owned()).await
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
                    }
                }
            };
            let result = tokio::select! {
                r = serve => r,
                _ = force_close.cancelled() => {
                    tracing::debug!(client.addr = %peer, "connection closed at the end of the grace period");
                    Ok(())
                }
            };
            if let Err(e) = result {
                tracing::debug!(client.addr = %peer, error = %e, "connection ended with an error");
            }
            drop(permit);
            conn_state
                .metrics
                .connections_open
                .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        });
    }
    tracing::debug!(?role, "stopped accepting");
}

async fn dispatch(
    state: &ProxyState,
    role: Role,
    req: Request<Incoming>,
    peer: SocketAddr,
) -> hyper::Response<proxy::ResponseBody> {
    match role {
        Role::Main => proxy::handle(state, req, peer, "http").await,
        Role::Tls => proxy::handle(state, req, peer, "https").await,
        Role::Admin => crate::admin::respond(state, &req),
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
