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

/// Where a relayed WebSocket byte stream is: inside a frame header, inside a payload, or
/// between frames. Only between frames may the gateway add a frame of its own.
#[derive(Debug, Default)]
struct FrameCursor {
    header: [u8; 14],
    have: usize,
    payload_left: u64,
}

impl FrameCursor {
    fn at_boundary(&self) -> bool {
        self.have == 0 && self.payload_left == 0
    }

    /// Header length once its first two bytes are known (RFC 6455 section 5.2).
    fn header_len(&self) -> usize {
        let b1 = self.header[1];
        let ext = match b1 & 0x7f {
            126 => 2,
            127 => 8,
            _ => 0,
        };
        2 + ext + if b1 & 0x80 != 0 { 4 } else { 0 }
    }

    fn advance(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            if self.payload_left > 0 {
                let n = (self.payload_left.min(data.len() as u64)) as usize;
                self.payload_left -= n as u64;
                data = &data[n..];
                continue;
            }
            let need = if self.have < 2 { 2 } else { self.header_len() };
            let n = (need - self.have).min(data.len());
            self.header[self.have..self.have + n].copy_from_slice(&data[..n]);
            self.have += n;
            data = &data[n..];
            if self.have >= 2 && self.have == self.header_len() {
                let h = &self.header;
                self.payload_left = match h[1] & 0x7f {
                    126 => u64::from(u16::from_be_bytes([h[2], h[3]])),
                    127 => u64::from_be_bytes([h[2], h[3], h[4], h[5], h[6], h[7], h[8], h[9]]),
                    n => u64::from(n),
                };
                self.have = 0;
            }
        }
    }
}

/// Close frame with status 1001 (going away), unmasked as a server sends it.
const CLOSE_1001_TO_CLIENT: [u8; 4] = [0x88, 0x02, 0x03, 0xE9];

/// The same, masked as a client must send it (RFC 6455 section 5.3).
fn close_1001_to_upstream() -> [u8; 8] {
    let m = fastrand::u32(..).to_be_bytes();
    [0x88, 0x82, m[0], m[1], m[2], m[3], 0x03 ^ m[0], 0xE9 ^ m[1]]
}

/// Size of the copy buffer a direction holds while bytes are flowing.
const COPY_BUF: usize = 8192;

/// Relays one direction until end of stream (propagating the half-close), or until `stop`,
/// when it waits for a frame boundary, adds `close`, and shuts the writer down.
///
/// The copy buffer exists only while bytes flow: as soon as a read would block, the buffer is
/// freed and the direction waits on a one-byte read, so an idle WebSocket holds no copy
/// buffers at all (most proxied WebSockets are idle most of the time). The price is one extra
/// read and one 8 KiB allocation per burst; back-to-back data keeps the buffer.
async fn pump<R, W>(
    mut r: R,
    mut w: W,
    stop: CancellationToken,
    close: Option<Vec<u8>>,
) -> std::io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut cursor = FrameCursor::default();
    let mut buf: Vec<u8> = Vec::new();
    loop {
        let stopping = stop.is_cancelled() && cursor.at_boundary();
        if stopping {
            if let Some(frame) = &close {
                w.write_all(frame).await?;
            }
            w.flush().await?;
            return w.shutdown().await;
        }
        let n = if buf.is_empty() {
            let mut first = [0u8; 1];
            let n = tokio::select! {
                r = r.read(&mut first) => r?,
                _ = stop.cancelled(), if !stop.is_cancelled() => continue,
            };
            if n == 0 {
                return w.shutdown().await;
            }
            buf = vec![0u8; COPY_BUF];
            buf[0] = first[0];
            // Whatever else already arrived goes out with the first byte.
            1 + read_now(&mut r, &mut buf[1..]).await?.unwrap_or(0)
        } else {
            match read_now(&mut r, &mut buf).await? {
                Some(0) => return w.shutdown().await,
                Some(n) => n,
                None => {
                    // Nothing pending: free the buffer and wait on the one-byte read.
                    buf = Vec::new();
                    continue;
                }
            }
        };
        w.write_all(&buf[..n]).await?;
        if close.is_some() {
            cursor.advance(&buf[..n]);
        }
    }
}

/// One read attempt that does not wait: `Some(n)` (0 at end of stream) when bytes or the end
/// were there, `None` when the reader would block.
async fn read_now<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut [u8],
) -> std::io::Result<Option<usize>> {
    std::future::poll_fn(|cx| {
        let mut rb = ReadBuf::new(buf);
        match Pin::new(&mut *r).poll_read(cx, &mut rb) {
            Poll::Ready(Ok(())) => Poll::Ready(Ok(Some(rb.filled().len()))),
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => Poll::Ready(Ok(None)),
        }
    })
    .await
}

/// Splices the client's and the upstream's upgraded connections in a tracked task. For a
/// WebSocket, shutdown ends both sides with a 1001 close frame at a frame boundary.
pub fn splice(
    upgrades: &Upgrades,
    client: OnUpgrade,
    upstream: OnUpgrade,
    lease: Lease,
    permit: Option<OwnedSemaphorePermit>,
    idle_timeout: Option<Duration>,
    websocket: bool,
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
        let (down_r, down_w) = tokio::io::split(&mut down);
        let (up_r, up_w) = tokio::io::split(&mut up);
        let (to_client, to_upstream) = match websocket {
            true => (
                Some(CLOSE_1001_TO_CLIENT.to_vec()),
                Some(close_1001_to_upstream().to_vec()),
            ),
            false => (None, None),
        };
        let relay = async {
            tokio::try_join!(
                pump(down_r, up_w, stop.clone(), to_upstream),
                pump(up_r, down_w, stop.clone(), to_client),
            )
        };
        // After shutdown began, a peer stuck mid-frame gets one second to reach a boundary.
        let hard_stop = async {
            stop.cancelled().await;
            tokio::time::sleep(Duration::from_secs(1)).await;
        };
        tokio::select! {
            r = relay => {
                if let Err(e) = r {
                    tracing::debug!(error = %e, "upgraded connection ended with an error");
                }
            }
            _ = watchdog => tracing::debug!("upgraded connection closed after idle timeout"),
            _ = hard_stop => tracing::debug!("upgraded connection closed at shutdown, mid-frame"),
        }
        drop(lease);
        drop(permit);
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn pump_relays_across_idle_gaps_bursts_and_the_half_close() {
        let (mut client, a) = tokio::io::duplex(4096);
        let (b, mut server) = tokio::io::duplex(4096);
        let (a_r, _a_w) = tokio::io::split(a);
        let (_b_r, b_w) = tokio::io::split(b);
        let relay = tokio::spawn(pump(a_r, b_w, CancellationToken::new(), None));
        // Single bytes with the direction idle (buffer freed) between them.
        for byte in [b'a', b'b', b'c'] {
            client.write_all(&[byte]).await.unwrap();
            let mut got = [0u8; 1];
            server.read_exact(&mut got).await.unwrap();
            assert_eq!(got[0], byte);
        }
        // A burst far larger than the copy buffer and the pipe, read while it is written.
        let big: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let sent = big.clone();
        let writer = tokio::spawn(async move {
            client.write_all(&sent).await.unwrap();
            client
        });
        let mut got = vec![0u8; big.len()];
        server.read_exact(&mut got).await.unwrap();
        assert!(got == big, "the burst arrived changed");
        // End of stream on one side is a half-close on the other.
        drop(writer.await.unwrap());
        let mut rest = Vec::new();
        assert_eq!(server.read_to_end(&mut rest).await.unwrap(), 0);
        relay.await.unwrap().unwrap();
    }

    #[test]
    fn frame_cursor_tracks_boundaries_across_reads() {
        let mut c = FrameCursor::default();
        assert!(c.at_boundary());
        // A masked 5-byte text frame, split in the middle of its header and its payload.
        let frame = [
            0x81,
            0x85,
            1,
            2,
            3,
            4,
            b'h' ^ 1,
            b'e' ^ 2,
            b'l' ^ 3,
            b'l' ^ 4,
            b'o' ^ 1,
        ];
        c.advance(&frame[..1]);
        assert!(!c.at_boundary());
        c.advance(&frame[1..8]);
        assert!(!c.at_boundary());
        c.advance(&frame[8..]);
        assert!(c.at_boundary());
        // 16-bit and 64-bit lengths, unmasked, two frames in one read.
        let mut two = vec![0x82, 126, 0x01, 0x00];
        two.extend(vec![0u8; 256]);
        two.extend([0x82, 127, 0, 0, 0, 0, 0, 0x01, 0x00, 0x00]);
        c.advance(&two);
        assert!(!c.at_boundary());
        c.advance(&vec![0u8; 65_536]);
        assert!(c.at_boundary());
    }
}
