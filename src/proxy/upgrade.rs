//! HTTP/1.1 Upgrade (WebSocket) relaying: after the upstream's own 101, both upgraded
//! connections are spliced until either side closes. The lease lives as long as the splice,
//! so least-connections counts open WebSockets.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::OwnedSemaphorePermit;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::balancer::Lease;

/// Upgraded connections in flight, so shutdown can wait for them and then close them.
#[derive(Debug, Default)]
pub struct Upgrades {
    /// Splice tasks.
    pub tracker: TaskTracker,
    /// Cancelled when the grace period is over.
    pub stop: CancellationToken,
}

/// Counts bytes moved in either direction, so the idle watchdog can tell silence from traffic.
struct Activity<T> {
    io: T,
    seen: Arc<AtomicU64>,
}

impl<T: AsyncRead + Unpin> AsyncRead for Activity<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.io).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if n > 0 {
            self.seen.fetch_add(n as u64, Ordering::Relaxed);
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Activity<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// Splices the client's and the upstream's upgraded connections in a tracked task.
pub fn splice(
    upgrades: &Upgrades,
    client: OnUpgrade,
    upstream: OnUpgrade,
    lease: Lease,
    permit: Option<OwnedSemaphorePermit>,
    idle_timeout: Option<Duration>,
) {
    let stop = upgrades.stop.clone();
    upgrades.tracker.spawn(async move {
        let (client, upstream) = match tokio::try_join!(client, upstream) {
            Ok(pair) => pair,
            Err(e) => {
                tracing::debug!(error = %e, "upgrade did not complete");
                return;
            }
        };
        let seen = Arc::new(AtomicU64::new(0));
        let mut down = Activity {
            io: TokioIo::new(client),
            seen: seen.clone(),
        };
        let mut up = Activity {
            io: TokioIo::new(upstream),
            seen: seen.clone(),
        };
        let watchdog = async {
            let Some(idle) = idle_timeout else {
                return std::future::pending::<()>().await;
            };
            let mut last = u64::MAX;
            loop {
                tokio::time::sleep(idle).await;
                let now = seen.load(Ordering::Relaxed);
                if now == last {
                    return;
                }
                last = now;
            }
        };
        tokio::select! {
            r = tokio::io::copy_bidirectional(&mut down, &mut up) => {
                if let Err(e) = r {
                    tracing::debug!(error = %e, "upgraded connection ended with an error");
                }
            }
            _ = watchdog => tracing::debug!("upgraded connection closed after idle timeout"),
            _ = stop.cancelled() => tracing::debug!("upgraded connection closed at shutdown"),
        }
        drop(lease);
        drop(permit);
    });
}
