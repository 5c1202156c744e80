//! One plain-TCP downstream connection: HTTP/1.1 served by hyper while a request is in flight,
//! and nothing but the socket while the connection idles between requests, so an idle
//! keep-alive connection costs a few hundred bytes instead of hyper's read and write buffers.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http::{Request, Response};
use hyper::body::Incoming;
use hyper::server::conn::{http1, http2};
use hyper::service::Service;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::conn::ConnShared;
use crate::proxy::ResponseBody;

/// How long a busy connection must be quiet before its buffers are released; also what
/// "busy" means (requests less than this apart). Short, so that a burst of new connections
/// (a reconnect storm, a load test's ramp) does not pile up buffers; long enough that a
/// connection serving back-to-back requests keeps hyper's state instead of rebuilding it.
/// Halved when `header_read_timeout` is shorter, since hyper closes the connection then.
const QUIET: Duration = Duration::from_millis(100);

/// The socket, with bytes already read from it (hyper's leftover buffer, or a sniffed
/// preface) replayed first.
#[derive(Debug)]
struct ConnIo {
    stream: TcpStream,
    prefix: Bytes,
    shared: Arc<ConnShared>,
}

impl AsyncRead for ConnIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for ConnIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // hyper flushes everything it wrote before it calls this.
        if self.shared.releasing.load(Ordering::Relaxed) {
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// The protocol builders and timeouts every plain connection uses.
pub struct Plain {
    /// HTTP/1.1, built anew for each busy stretch of a connection.
    pub h1: http1::Builder,
    /// h2c by prior knowledge.
    pub h2: http2::Builder<TokioExecutor>,
    /// Time for the first byte of a connection's first request.
    pub header_read_timeout: Duration,
    /// Time an idle connection waits for its next request.
    pub keep_alive_timeout: Duration,
    /// How long a busy connection must be quiet before hyper's state is released.
    pub quiet: Duration,
}

impl Plain {
    /// The quiet period for a `header_read_timeout`: `QUIET`, or less than the timeout.
    pub fn quiet_for(header_read_timeout: Duration) -> Duration {
        QUIET.min(header_read_timeout / 2)
    }
}

/// Once the drain has started, how long a connection accepted before it may take to send its
/// first request.
const DRAIN_FIRST_REQUEST: Duration = Duration::from_secs(1);

const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Serves one plain-TCP connection until the client closes it, it idles past
/// `keep_alive_timeout`, or `shutdown` is cancelled (then the request in flight finishes
/// first). HTTP/2 by prior knowledge is detected from the first bytes.
pub async fn serve<S>(
    mut stream: TcpStream,
    service: S,
    shared: Arc<ConnShared>,
    plain: &Plain,
    shutdown: &CancellationToken,
) -> hyper::Result<()>
where
    S: Service<Request<Incoming>, Response = Response<ResponseBody>, Error = Infallible>
        + Clone
        + Unpin
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    let accepted = tokio::time::Instant::now();
    // A connection accepted before the listener closed gets its first request answered even
    // when the drain starts meanwhile (a restart must not drop requests already sent), but waits
    // for it no longer than `DRAIN_FIRST_REQUEST` once draining.
    let first = {
        let deadline = tokio::time::sleep_until(accepted + plain.header_read_timeout);
        let (mut deadline, mut sniffed) = (pin!(deadline), pin!(sniff(&stream)));
        let mut draining = false;
        loop {
            tokio::select! {
                r = sniffed.as_mut() => break Ok(r),
                _ = deadline.as_mut() => break Err(()),
                _ = shutdown.cancelled(), if !draining => {
                    draining = true;
                    let sooner = tokio::time::Instant::now() + DRAIN_FIRST_REQUEST;
                    if sooner < deadline.deadline() {
                        deadline.as_mut().reset(sooner);
                    }
                }
            }
        }
    };
    let mut prefix = match first {
        Ok(Ok(Sniffed::Http1(prefix))) => prefix,
        Ok(Ok(Sniffed::Http2(prefix))) => {
            let io = ConnIo {
                stream,
                prefix,
                shared,
            };
            let settings_by = accepted + plain.header_read_timeout;
            // Boxed: an HTTP/2 connection's state must not size every connection's task.
            return Box::pin(serve_h2(io, service, plain, settings_by, shutdown)).await;
        }
        Ok(Ok(Sniffed::Closed)) | Ok(Err(_)) => return Ok(()),
        Err(_) => {
            tracing::debug!("no request within header_read_timeout");
            return Ok(());
        }
    };
    loop {
        if shutdown.is_cancelled() {
            // Draining with a request already read from the socket: answer it, with
            // `Connection: close`, rather than close it unanswered.
            let last = {
                let mut h1 = plain.h1.clone();
                h1.keep_alive(false);
                let io = ConnIo {
                    stream,
                    prefix,
                    shared: shared.clone(),
                };
                Box::pin(
                    h1.serve_connection(TokioIo::new(io), service)
                        .with_upgrades(),
                )
            };
            return last.await;
        }
        shared.releasing.store(false, Ordering::Relaxed);
        shared.reusable.store(true, Ordering::Relaxed);
        let before = shared.started.load(Ordering::Relaxed);
        let io = ConnIo {
            stream,
            prefix,
            shared: shared.clone(),
        };
        // Boxed, so the buffers and state are freed while the connection idles.
        let mut conn = Box::pin(
            plain
                .h1
                .serve_connection(TokioIo::new(io), service.clone())
                .with_upgrades(),
        );
        let mut cancelled = pin!(shutdown.cancelled());
        let mut registered = false;
        let mut draining = false;
        // For a hot connection: a timer, and the request count when it was armed.
        let mut quiet: Option<(Pin<Box<tokio::time::Sleep>>, u32)> = None;
        std::future::poll_fn(|cx| {
            // See `or_cancelled` for why the token's flag is read before its waiter is polled.
            if !draining && (!registered || shutdown.is_cancelled()) {
                registered = true;
                if cancelled.as_mut().poll(cx).is_ready() {
                    draining = true;
                    shared.releasing.store(false, Ordering::Relaxed);
                    conn.as_mut().graceful_shutdown();
                }
            }
            if let Poll::Ready(r) = conn.as_mut().poll(cx) {
                return Poll::Ready(r);
            }
            if draining || shared.releasing.load(Ordering::Relaxed) || !shared.idle_after(before) {
                return Poll::Pending;
            }
            let release = if shared.hot.load(Ordering::Relaxed) {
                let started = shared.started.load(Ordering::Relaxed);
                quiet_for_a_while(&mut quiet, plain.quiet, started, cx)
            } else {
                true
            };
            if release {
                // Every response is written: let hyper finish without closing the socket.
                shared.releasing.store(true, Ordering::Relaxed);
                conn.as_mut().graceful_shutdown();
                return conn.as_mut().poll(cx);
            }
            Poll::Pending
        })
        .await?;
        if draining || !shared.releasing.load(Ordering::Relaxed) {
            if shared.unread.load(Ordering::Relaxed) {
                if let Some(parts) = Pin::into_inner(conn).into_parts() {
                    let io = parts.io.into_inner();
                    // Boxed: a rare state must not size every connection's task.
                    or_cancelled(shutdown, Box::pin(linger(io.stream))).await;
                }
            }
            return Ok(());
        }
        // None: the connection was upgraded and now belongs to the upgrade.
        let Some(parts) = Pin::into_inner(conn).into_parts() else {
            return Ok(());
        };
        let io = parts.io.into_inner();
        stream = io.stream;
        prefix = join(parts.read_buf, io.prefix);
        if prefix.is_empty() {
            let next = tokio::time::timeout(plain.keep_alive_timeout, read_some(&stream));
            prefix = match or_cancelled(shutdown, next).await {
                Some(Ok(Ok(Some(bytes)))) => bytes,
                // Shutdown, closed by the client, a read error, or idle too long.
                _ => return Ok(()),
            };
        }
    }
}

/// Lingering close (as nginx's `lingering_close`): after an answer that left the request body
/// unread, hyper has written the answer and shut down the write side; the rest of the body is
/// read and discarded so that closing does not reset the connection before the client has read
/// the answer. Bounded: a pause of `LINGER_PAUSE`, `LINGER_TIME` in all, or `LINGER_BYTES`.
async fn linger(stream: TcpStream) {
    const LINGER_PAUSE: Duration = Duration::from_secs(2);
    const LINGER_TIME: Duration = Duration::from_secs(30);
    const LINGER_BYTES: usize = 16 << 20;
    let until = tokio::time::Instant::now() + LINGER_TIME;
    let mut discarded = 0usize;
    while discarded < LINGER_BYTES {
        let next = tokio::time::Instant::now() + LINGER_PAUSE;
        match tokio::time::timeout_at(next.min(until), read_some(&stream)).await {
            Ok(Ok(Some(bytes))) => discarded += bytes.len(),
            _ => break,
        }
    }
}

/// True once no request has started for a full `QUIET` period; otherwise (re)arms the timer
/// so the task wakes to check again.
fn quiet_for_a_while(
    quiet: &mut Option<(Pin<Box<tokio::time::Sleep>>, u32)>,
    period: Duration,
    started: u32,
    cx: &mut Context<'_>,
) -> bool {
    let Some((timer, armed_at)) = quiet else {
        let mut timer = Box::pin(tokio::time::sleep(period));
        let _ = timer.as_mut().poll(cx);
        *quiet = Some((timer, started));
        return false;
    };
    loop {
        if timer.as_mut().poll(cx).is_pending() {
            return false;
        }
        if *armed_at == started {
            return true;
        }
        *armed_at = started;
        timer.as_mut().reset(tokio::time::Instant::now() + period);
    }
}

/// Bytes hyper had read but not parsed, then bytes it had not read from the prefix yet, in
/// a new allocation: hyper's leftover shares its whole read buffer, which must not stay alive
/// while the connection idles.
fn join(read: Bytes, rest: Bytes) -> Bytes {
    if read.is_empty() {
        return rest;
    }
    let mut b = BytesMut::with_capacity(read.len() + rest.len());
    b.extend_from_slice(&read);
    b.extend_from_slice(&rest);
    b.freeze()
}

enum Sniffed {
    Http1(Bytes),
    Http2(Bytes),
    Closed,
}

/// Reads what the client has sent so far, without holding a buffer while waiting for it (the
/// bytes are then replayed to hyper). `None`: the client closed the connection.
async fn read_some(stream: &TcpStream) -> io::Result<Option<Bytes>> {
    loop {
        stream.readable().await?;
        let mut buf = [0u8; 4096];
        match stream.try_read(&mut buf) {
            Ok(0) => return Ok(None),
            Ok(n) => return Ok(Some(Bytes::copy_from_slice(&buf[..n]))),
            // The readiness was stale; wait for the next event.
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
}

/// Reads the first bytes of a connection; only a first `P` (`POST`, `PUT`, `PATCH` or the
/// HTTP/2 preface) can need more of them to tell HTTP/2 by prior knowledge from HTTP/1.
async fn sniff(stream: &TcpStream) -> io::Result<Sniffed> {
    let mut seen = BytesMut::new();
    loop {
        let Some(more) = read_some(stream).await? else {
            return Ok(Sniffed::Closed);
        };
        if seen.is_empty() && !H2_PREFACE.starts_with(&more[..1]) {
            return Ok(Sniffed::Http1(more));
        }
        seen.extend_from_slice(&more);
        let n = seen.len().min(H2_PREFACE.len());
        if seen[..n] != H2_PREFACE[..n] {
            return Ok(Sniffed::Http1(seen.freeze()));
        }
        if n == H2_PREFACE.len() {
            return Ok(Sniffed::Http2(seen.freeze()));
        }
    }
}

/// Connections that can finish their in-flight work and then close.
pub trait Graceful: Future {
    /// Stop taking new requests; finish the ones in flight.
    fn start_graceful(self: Pin<&mut Self>);
}

/// Runs `fut` to its end, or until `token` is cancelled (`None`). The cancellation waiter is
/// polled once to register and then only after the token's flag says it fired: every poll of
/// a registered tokio waiter takes the lock on its waiter list, and a connection's task is
/// woken several times per request.
pub async fn or_cancelled<F: Future>(token: &CancellationToken, fut: F) -> Option<F::Output> {
    let mut fut = pin!(fut);
    let mut cancelled = pin!(token.cancelled());
    let mut registered = false;
    std::future::poll_fn(|cx| {
        if !registered || token.is_cancelled() {
            registered = true;
            if cancelled.as_mut().poll(cx).is_ready() {
                return Poll::Ready(None);
            }
        }
        fut.as_mut().poll(cx).map(Some)
    })
    .await
}

/// Drives `conn` to its end; once `shutdown` is cancelled it stops taking new requests.
pub async fn graceful<C: Graceful>(
    mut conn: Pin<&mut C>,
    shutdown: &CancellationToken,
) -> C::Output {
    tokio::select! {
        r = conn.as_mut() => return r,
        _ = shutdown.cancelled() => conn.as_mut().start_graceful(),
    }
    conn.await
}

// === HTTP/2 ===

/// What an HTTP/2 connection's watchdog knows: written by the connection's IO (SETTINGS) and
/// by its streams (open count, last end), read by [`serve_h2`]. Atomics only: the streams run
/// in their own tasks, on the request path.
#[derive(Debug, Default)]
struct H2Watch {
    /// The client's first SETTINGS frame has been read in full.
    settings_seen: AtomicBool,
    /// Streams whose response body has not been dropped yet.
    open: AtomicU32,
    /// When the latest stream ended (`clock::now_ms`); 0 before the first.
    last_end_ms: AtomicU64,
}

/// Where an HTTP/2 connection's watchdog is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum H2Phase {
    /// Waiting for the client's first SETTINGS frame.
    Settings,
    /// Serving; GOAWAY once no stream has been open for `keep_alive_timeout`.
    Serving,
    /// GOAWAY sent: hyper closes once the open streams end and the client answers the PING;
    /// a client that never answers is closed once it has no stream open.
    GoingAway,
}

/// The shortest period at which a busy connection's watchdog looks again, so that zero
/// timeouts cannot make it spin.
const H2_RECHECK_FLOOR: Duration = Duration::from_millis(100);

/// Serves an HTTP/2 connection (h2c by prior knowledge, or TLS that chose h2 by ALPN) with the
/// bounds hyper has no setting for: the preface and the client's first SETTINGS frame must
/// have arrived by `settings_by` or the connection is closed, and once no stream has been open
/// for `keep_alive_timeout` the connection gets GOAWAY. After a GOAWAY (idle or `shutdown`),
/// a client that leaves it unanswered is closed within `header_read_timeout` of its last
/// stream ending.
pub async fn serve_h2<I, S>(
    io: I,
    service: S,
    plain: &Plain,
    settings_by: tokio::time::Instant,
    shutdown: &CancellationToken,
) -> hyper::Result<()>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: Service<Request<Incoming>, Response = Response<ResponseBody>, Error = Infallible>
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    let watch = Arc::new(H2Watch::default());
    let io = FirstSettings {
        io,
        watch: watch.clone(),
        seen: 0,
        header: [0; 9],
        done: false,
    };
    let service = CountStreams {
        inner: service,
        watch: watch.clone(),
    };
    // The caller boxes this future (plain) or the task (TLS), so these stay inline.
    let mut conn = pin!(plain.h2.serve_connection(TokioIo::new(io), service));
    let mut timer = pin!(tokio::time::sleep_until(settings_by));
    let mut phase = H2Phase::Settings;
    // When the connection last became idle without a stream ending (SETTINGS arrival).
    let mut idle_from_ms = 0;
    let keep_alive = plain.keep_alive_timeout;
    let recheck = keep_alive.max(H2_RECHECK_FLOOR);
    let answer_within = plain.header_read_timeout.max(H2_RECHECK_FLOOR);
    let mut cancelled = pin!(shutdown.cancelled());
    let mut registered = false;
    std::future::poll_fn(|cx| {
        // See `or_cancelled` for why the token's flag is read before its waiter is polled.
        if phase != H2Phase::GoingAway && (!registered || shutdown.is_cancelled()) {
            registered = true;
            if cancelled.as_mut().poll(cx).is_ready() {
                conn.as_mut().graceful_shutdown();
                phase = H2Phase::GoingAway;
                timer
                    .as_mut()
                    .reset(tokio::time::Instant::now() + answer_within);
            }
        }
        if let Poll::Ready(r) = conn.as_mut().poll(cx) {
            return Poll::Ready(r);
        }
        loop {
            match phase {
                H2Phase::Settings => {
                    if watch.settings_seen.load(Ordering::Acquire) {
                        phase = H2Phase::Serving;
                        idle_from_ms = crate::clock::now_ms();
                        timer
                            .as_mut()
                            .reset(tokio::time::Instant::now() + keep_alive);
                        continue;
                    }
                    if timer.as_mut().poll(cx).is_ready() {
                        tracing::debug!("no HTTP/2 SETTINGS within header_read_timeout");
                        return Poll::Ready(Ok(()));
                    }
                    return Poll::Pending;
                }
                H2Phase::Serving => {
                    if timer.as_mut().poll(cx).is_pending() {
                        return Poll::Pending;
                    }
                    // The timer fires at most once per `keep_alive_timeout`; no stream start
                    // or end has to wake this task.
                    let wait = if watch.open.load(Ordering::Acquire) > 0 {
                        recheck
                    } else {
                        let idle_since =
                            idle_from_ms.max(watch.last_end_ms.load(Ordering::Acquire));
                        let idle_for = crate::clock::now_ms().saturating_sub(idle_since);
                        keep_alive.saturating_sub(Duration::from_millis(idle_for))
                    };
                    if !wait.is_zero() {
                        timer.as_mut().reset(tokio::time::Instant::now() + wait);
                        continue;
                    }
                    tracing::debug!("HTTP/2 connection idle for keep_alive_timeout; GOAWAY");
                    conn.as_mut().graceful_shutdown();
                    phase = H2Phase::GoingAway;
                    timer
                        .as_mut()
                        .reset(tokio::time::Instant::now() + answer_within);
                    // hyper writes the GOAWAY when it is polled next.
                    cx.waker().wake_by_ref();
                    return Poll::Pending;
                }
                H2Phase::GoingAway => {
                    if timer.as_mut().poll(cx).is_pending() {
                        return Poll::Pending;
                    }
                    if watch.open.load(Ordering::Acquire) == 0 {
                        tracing::debug!("client left GOAWAY unanswered; closing");
                        return Poll::Ready(Ok(()));
                    }
                    timer
                        .as_mut()
                        .reset(tokio::time::Instant::now() + answer_within);
                }
            }
        }
    })
    .await
}

/// The connection's IO, watching the bytes read for the preface and the first frame, which
/// must be SETTINGS (RFC 9113, 3.4); once that frame is complete it only passes bytes on.
struct FirstSettings<I> {
    io: I,
    watch: Arc<H2Watch>,
    /// Bytes read so far, until `done`.
    seen: usize,
    /// The first frame's header.
    header: [u8; 9],
    done: bool,
}

impl<I> FirstSettings<I> {
    fn observe(&mut self, bytes: &[u8]) {
        const HEAD: usize = H2_PREFACE.len() + 9;
        for (&b, at) in bytes.iter().zip(self.seen..HEAD) {
            if at >= H2_PREFACE.len() {
                self.header[at - H2_PREFACE.len()] = b;
            }
        }
        self.seen = self.seen.saturating_add(bytes.len());
        if self.seen < HEAD {
            return;
        }
        let [l0, l1, l2, kind, ..] = self.header;
        if kind != 0x4 {
            // Not SETTINGS: hyper ends the connection with a protocol error.
            self.done = true;
            return;
        }
        let len = u32::from_be_bytes([0, l0, l1, l2]) as usize;
        if self.seen >= HEAD + len {
            self.done = true;
            self.watch.settings_seen.store(true, Ordering::Release);
        }
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for FirstSettings<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let this = &mut *self;
        let r = Pin::new(&mut this.io).poll_read(cx, buf);
        if !this.done && matches!(r, Poll::Ready(Ok(()))) {
            this.observe(&buf.filled()[before..]);
        }
        r
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for FirstSettings<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// The service of an HTTP/2 connection, counting each stream as open from its request until
/// its response body is dropped (finished, or reset by the client).
struct CountStreams<S> {
    inner: S,
    watch: Arc<H2Watch>,
}

impl<S, B> Service<Request<Incoming>> for CountStreams<S>
where
    S: Service<Request<Incoming>, Response = Response<B>>,
{
    type Response = Response<Counted<B>>;
    type Error = S::Error;
    type Future = CountedFuture<S::Future>;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        self.watch.open.fetch_add(1, Ordering::AcqRel);
        CountedFuture {
            inner: self.inner.call(req),
            stream: Some(OpenStream(self.watch.clone())),
        }
    }
}

/// One open stream; dropping it counts the stream out.
struct OpenStream(Arc<H2Watch>);

impl Drop for OpenStream {
    fn drop(&mut self) {
        // The end time first: the watchdog reads it after seeing no stream open.
        self.0
            .last_end_ms
            .store(crate::clock::now_ms(), Ordering::Release);
        self.0.open.fetch_sub(1, Ordering::AcqRel);
    }
}

pin_project_lite::pin_project! {
    /// A response future that moves its stream's count into the response body.
    struct CountedFuture<F> {
        #[pin]
        inner: F,
        stream: Option<OpenStream>,
    }
}

impl<F, B, E> Future for CountedFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = Result<Response<Counted<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let r = std::task::ready!(this.inner.poll(cx));
        let stream = this.stream.take();
        Poll::Ready(r.map(|resp| resp.map(|body| Counted { body, stream })))
    }
}

pin_project_lite::pin_project! {
    /// A response body that keeps its stream counted as open until it is dropped.
    struct Counted<B> {
        #[pin]
        body: B,
        stream: Option<OpenStream>,
    }
}

impl<B: http_body::Body> http_body::Body for Counted<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<B::Data>, B::Error>>> {
        self.project().body.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn first_settings() -> FirstSettings<()> {
        FirstSettings {
            io: (),
            watch: Arc::default(),
            seen: 0,
            header: [0; 9],
            done: false,
        }
    }

    #[test]
    fn first_settings_is_seen_only_once_complete_however_the_reads_split() {
        // Preface, SETTINGS with one parameter (6 bytes), then a HEADERS frame's start.
        let mut bytes = H2_PREFACE.to_vec();
        bytes.extend_from_slice(&[0, 0, 6, 0x4, 0, 0, 0, 0, 0]);
        bytes.extend_from_slice(&[0, 3, 0, 0, 0, 100]);
        let complete = bytes.len();
        bytes.extend_from_slice(&[0, 0, 9, 0x1]);
        for split in 0..bytes.len() {
            let mut w = first_settings();
            w.observe(&bytes[..split]);
            assert_eq!(
                w.watch.settings_seen.load(Ordering::Relaxed),
                split >= complete,
                "one read of {split} bytes"
            );
            w.observe(&bytes[split..]);
            assert!(
                w.watch.settings_seen.load(Ordering::Relaxed),
                "split at {split}"
            );
            assert!(w.done);
        }
    }

    #[test]
    fn a_first_frame_other_than_settings_is_never_taken_for_it() {
        let mut w = first_settings();
        let mut bytes = H2_PREFACE.to_vec();
        bytes.extend_from_slice(&[0, 0, 0, 0x6, 0, 0, 0, 0, 0]); // PING, empty
        w.observe(&bytes);
        assert!(w.done);
        assert!(!w.watch.settings_seen.load(Ordering::Relaxed));
    }
}
