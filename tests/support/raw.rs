//! Raw HTTP/1.1 for request-head tests: one request written byte for byte with its answer's
//! status, and an upstream that answers each connection's first request head with fixed bytes
//! (a `101`, say) and records every byte it received, tunnelled ones included.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use super::util::{raw_exchange, RawReply};

/// The status code of a raw HTTP/1.1 answer (`HTTP/1.1 400 Bad Request` gives 400); 0 when
/// the text does not start with a status line.
pub fn status_of(text: &str) -> u16 {
    text.strip_prefix("HTTP/1.")
        .and_then(|rest| rest.get(2..5))
        .and_then(|code| code.parse().ok())
        .unwrap_or(0)
}

/// Writes `request` on a new connection to `addr` and reads until the gateway closes it (the
/// requests here say `Connection: close`) or 5 s pass. Returns the first answer's status.
pub async fn send(addr: SocketAddr, request: impl AsRef<[u8]>) -> (u16, RawReply) {
    let reply = raw_exchange(addr, request.as_ref(), Duration::from_secs(5)).await;
    (status_of(&reply.text), reply)
}

/// A loopback TCP upstream speaking just enough HTTP/1.1 to answer: on each connection it
/// reads up to the end of the first request head, writes its scripted reply, and then only
/// records whatever else arrives until the peer closes.
#[derive(Debug)]
pub struct RawUpstream {
    addr: SocketAddr,
    received: Arc<Mutex<Vec<u8>>>,
    heads: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl RawUpstream {
    /// Binds 127.0.0.1:0 and answers every connection's first request head with `reply`.
    pub async fn start(reply: &'static [u8]) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let received = Arc::new(Mutex::new(Vec::new()));
        let heads = Arc::new(AtomicUsize::new(0));
        let (rx, hx) = (received.clone(), heads.clone());
        let task = tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let (received, heads) = (rx.clone(), hx.clone());
                tokio::spawn(async move {
                    let mut mine = Vec::new();
                    let mut answered = false;
                    let mut buf = [0u8; 4096];
                    loop {
                        let n = match s.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        mine.extend_from_slice(&buf[..n]);
                        lock(&received).extend_from_slice(&buf[..n]);
                        if !answered && mine.windows(4).any(|w| w == b"\r\n\r\n") {
                            answered = true;
                            heads.fetch_add(1, Ordering::SeqCst);
                            if s.write_all(reply).await.is_err() {
                                break;
                            }
                        }
                    }
                });
            }
        });
        Self {
            addr,
            received,
            heads,
            task,
        }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every byte received on every connection, lossily decoded, in arrival order.
    pub fn received(&self) -> String {
        String::from_utf8_lossy(&lock(&self.received)).into_owned()
    }

    /// Request heads answered so far.
    pub fn heads(&self) -> usize {
        self.heads.load(Ordering::SeqCst)
    }
}

impl Drop for RawUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// std Mutex: test support only, never held across an await.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Reads from `s` until the end of a response head (the blank line), at most 5 s; returns
/// what was read. Bytes after the head stay in the returned text too.
pub async fn read_head(s: &mut tokio::net::TcpStream) -> String {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !out.windows(4).any(|w| w == b"\r\n\r\n") {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => out.extend_from_slice(&buf[..n]),
            _ => break,
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}
