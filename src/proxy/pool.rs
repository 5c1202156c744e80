//! Pooled HTTP/1.1 connections to plain-HTTP endpoints, kept in each endpoint's state: a
//! lock-free queue of idle `SendRequest` handles, so a request takes no pool-wide map lookup,
//! hash or lock (TLS, h2c, upgrades and host names use the general client).

use std::net::SocketAddr;
use std::pin::pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::error::UpstreamError;
use super::settings::UpstreamConfig;
use crate::balancer::idle::{Idle, IdleConns, BUSY};
use crate::balancer::EndpointState;
use crate::body::RequestBody;

/// A connection in use; give it back with [`Reuse::release`] once its response has ended.
#[derive(Debug)]
pub struct Reuse {
    sender: http1::SendRequest<RequestBody>,
    state: Arc<EndpointState>,
    /// When the connection last finished a request (`clock::now_ms`), or `BUSY`; its task
    /// closes it after `idle_timeout` without use.
    last_used: Arc<AtomicU64>,
}

impl Reuse {
    /// Returns the connection to the endpoint's idle queue (dropped, so closed, when full).
    pub fn release(self) {
        if self.sender.is_closed() {
            return;
        }
        self.last_used
            .store(crate::clock::now_ms(), Ordering::Relaxed);
        if let Some(idle) = self.state.idle_conns.get() {
            let _ = idle.local().push(Idle {
                sender: self.sender,
                last_used: self.last_used,
            });
        }
    }
}

/// Connection settings for the pooled HTTP/1.1 path.
#[derive(Debug)]
pub struct Http1Pool {
    connect_timeout: Duration,
    idle_timeout_ms: u64,
    max_idle: usize,
    /// Serving threads: each keeps its own idle queue per endpoint.
    shards: AtomicUsize,
}

impl Http1Pool {
    /// From `[upstream]`.
    pub fn new(cfg: &UpstreamConfig) -> Self {
        Self {
            connect_timeout: cfg.connect_timeout,
            idle_timeout_ms: cfg.idle_timeout.as_millis() as u64,
            max_idle: cfg.max_idle_per_host.max(1),
            shards: AtomicUsize::new(1),
        }
    }

    /// Splits each endpoint's idle connections (`max_idle_per_host` in all) between `n`
    /// serving threads; takes effect for endpoints not used yet, so it is set before serving.
    pub fn set_shards(&self, n: usize) {
        self.shards.store(n.max(1), Ordering::Relaxed);
    }

    /// Sends `req` (origin-form URI, Host set) on an idle connection to `addr`, or a new one.
    pub async fn send(
        &self,
        state: &Arc<EndpointState>,
        addr: SocketAddr,
        mut req: Request<RequestBody>,
    ) -> Result<(Response<Incoming>, Reuse), UpstreamError> {
        let idle = state
            .idle_conns
            .get_or_init(|| IdleConns::new(self.shards.load(Ordering::Relaxed), self.max_idle));
        let now = crate::clock::now_ms();
        let queue = idle.local();
        while let Some(Idle {
            mut sender,
            last_used,
        }) = queue.pop()
        {
            let idle_for = now.saturating_sub(last_used.load(Ordering::Relaxed));
            if sender.is_closed() || idle_for > self.idle_timeout_ms {
                continue;
            }
            last_used.store(BUSY, Ordering::Relaxed);
            // Given back as its response ended; the connection's task may not have caught up.
            if sender.ready().await.is_err() {
                continue;
            }
            match sender.try_send_request(req).await {
                Ok(resp) => {
                    let reuse = Reuse {
                        sender,
                        state: state.clone(),
                        last_used,
                    };
                    return Ok((resp, reuse));
                }
                // Closed before the request was written: nothing was sent, try another.
                Err(mut e) => match e.take_message() {
                    Some(back) => req = back,
                    None => return Err(UpstreamError::Request(e.into_error())),
                },
            }
        }
        let (mut sender, last_used) = self.connect(addr).await?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(UpstreamError::Request)?;
        let reuse = Reuse {
            sender,
            state: state.clone(),
            last_used,
        };
        Ok((resp, reuse))
    }

    async fn connect(
        &self,
        addr: SocketAddr,
    ) -> Result<(http1::SendRequest<RequestBody>, Arc<AtomicU64>), UpstreamError> {
        let stream =
            match tokio::time::timeout(self.connect_timeout, TcpStream::connect(addr)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => return Err(UpstreamError::Connect(e)),
                Err(_) => {
                    return Err(UpstreamError::Connect(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!("connect timed out after {:?}", self.connect_timeout),
                    )))
                }
            };
        let _ = stream.set_nodelay(true);
        let keepalive = socket2::TcpKeepalive::new().with_time(Duration::from_secs(60));
        let _ = socket2::SockRef::from(&stream).set_tcp_keepalive(&keepalive);
        let (sender, conn) = http1::Builder::new()
            .handshake(TokioIo::new(stream))
            .await
            .map_err(UpstreamError::Handshake)?;
        let last_used = Arc::new(AtomicU64::new(BUSY));
        tokio::spawn(drive(conn, last_used.clone(), self.idle_timeout_ms));
        Ok((sender, last_used))
    }
}

/// Runs a connection until it closes, or until it has been idle for `idle_timeout_ms` (then
/// dropping it closes the socket; its handle in the idle queue reports closed).
async fn drive(
    conn: http1::Connection<TokioIo<TcpStream>, RequestBody>,
    last_used: Arc<AtomicU64>,
    idle_timeout_ms: u64,
) {
    let mut conn = pin!(conn);
    if idle_timeout_ms == 0 {
        // Nothing is kept idle: the checkout drops every handle it finds.
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "upstream connection ended with an error");
        }
        return;
    }
    let mut wait = idle_timeout_ms;
    loop {
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(error = %e, "upstream connection ended with an error");
                }
                return;
            }
            _ = tokio::time::sleep(Duration::from_millis(wait)) => {
                let used = last_used.load(Ordering::Relaxed);
                let idle_for = crate::clock::now_ms().saturating_sub(used);
                if used != BUSY && idle_for >= idle_timeout_ms {
                    return;
                }
                wait = if used == BUSY { idle_timeout_ms } else { idle_timeout_ms - idle_for };
            }
        }
    }
}
