//! Memory an idle keep-alive connection keeps in the gateway, counted by the allocator: after
//! its request, a connection holds only its socket and task, not hyper's buffers. Alone in its
//! test binary so no other test allocates while it counts.

mod support;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};
use std::time::Duration;

use support::gateway::{eventually, start};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

/// Bytes currently allocated by the whole process.
static LIVE: AtomicIsize = AtomicIsize::new(0);

struct Counting;

// SAFETY: forwards to the system allocator and only adds bookkeeping.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(
            new_size as isize - layout.size() as isize,
            Ordering::Relaxed,
        );
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const CONNS: usize = 400;

/// Opens a connection, sends one request and reads the whole (small) response.
async fn one_request(addr: std::net::SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /health HTTP/1.1\r\nHost: gw\r\n\r\n")
        .await
        .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    while !got.ends_with(b"}") {
        let n = s.read(&mut buf).await.unwrap();
        assert!(n > 0, "closed: {:?}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    s
}

#[tokio::test(flavor = "current_thread")]
async fn an_idle_keep_alive_connection_costs_under_3_kib() {
    // The project's mock service as the upstream: it keeps nothing per request (the test
    // upstream records every request, which would be counted too).
    let stop = CancellationToken::new();
    let up = meshgate::mock::spawn("127.0.0.1:0".parse().unwrap(), "up", stop.clone())
        .await
        .unwrap();
    let gw = start(&format!(
        r#"
        [[routes]]
        path = "/"
        targets = ["http://{up}"]
        "#
    ))
    .await;
    // Warm up: the upstream pool, lazily built state, the allocator's own caches.
    let warm: Vec<_> = futures_util::future::join_all((0..8).map(|_| one_request(gw.addr))).await;
    drop(warm);
    let open = || {
        gw.state
            .proxy
            .metrics
            .connections_open
            .load(Ordering::Relaxed)
    };
    assert!(eventually(Duration::from_secs(5), || async { open() == 0 }).await);

    let before = LIVE.load(Ordering::Relaxed);
    let mut held = Vec::with_capacity(CONNS);
    for _ in 0..CONNS {
        held.push(one_request(gw.addr).await);
    }
    // Let every connection task reach its idle wait (bounded; the count settles).
    let mut last = isize::MAX;
    assert!(
        eventually(Duration::from_secs(5), || {
            let now = LIVE.load(Ordering::Relaxed);
            let settled = now == last;
            last = now;
            async move { settled }
        })
        .await
    );
    let per_conn = (LIVE.load(Ordering::Relaxed) - before) / CONNS as isize;
    // Counted here: the gateway's socket, task and state per connection, and the test's own
    // client socket. hyper's buffers alone would be 16 KiB.
    assert!(per_conn < 3 * 1024, "{per_conn} bytes per idle connection");

    // The connections still work.
    for s in held.iter_mut().take(10) {
        s.write_all(b"GET /health HTTP/1.1\r\nHost: gw\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 1024];
        let n = s.read(&mut buf).await.unwrap();
        assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
    }
    stop.cancel();
}
