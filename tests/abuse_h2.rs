//! HTTP/2 clients that try to hold the gateway for free (issue #11, defect 7): a preface and
//! then silence, SETTINGS and then no stream, more streams than advertised, and a rapid-reset
//! flood. Raw frames over real sockets; every test checks what the upstream received.

mod support;

use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use support::gateway::{client, eventually, start, start_in_front_of, TestGateway};
use support::h2::{cert, tls_client};
use support::upstream::TestUpstream;
use support::util::raw_exchange;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

// Frame types and the codes the tests look for (RFC 9113, sections 6 and 7).
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const GOAWAY: u8 = 0x7;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const SETTINGS_MAX_CONCURRENT_STREAMS: u16 = 0x3;
const NO_ERROR: u32 = 0x0;
const CANCEL: u32 = 0x8;
const REFUSED_STREAM: u32 = 0x7;
const ENHANCE_YOUR_CALM: u32 = 0xb;

/// One frame: its header fields and payload.
#[derive(Debug)]
struct Frame {
    kind: u8,
    stream: u32,
    payload: Vec<u8>,
}

impl Frame {
    /// The error code of a RST_STREAM or GOAWAY frame.
    fn error_code(&self) -> u32 {
        let at = match self.kind {
            RST_STREAM => 0,
            GOAWAY => 4,
            k => panic!("frame type {k} has no error code"),
        };
        u32::from_be_bytes(self.payload[at..at + 4].try_into().unwrap())
    }

    /// A SETTINGS parameter, when the frame carries it.
    fn setting(&self, id: u16) -> Option<u32> {
        assert_eq!(self.kind, SETTINGS);
        self.payload.chunks_exact(6).find_map(|p| {
            (u16::from_be_bytes([p[0], p[1]]) == id)
                .then(|| u32::from_be_bytes([p[2], p[3], p[4], p[5]]))
        })
    }
}

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut out = len.to_be_bytes()[1..].to_vec();
    out.extend_from_slice(&[kind, flags]);
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// An empty SETTINGS frame: the client accepts every default.
fn settings() -> Vec<u8> {
    frame(SETTINGS, 0, 0, &[])
}

/// `GET path` on `stream`, HPACK-encoded with literals only (no dynamic table), the request
/// complete in one HEADERS frame.
fn get(stream: u32, path: &str) -> Vec<u8> {
    let mut block = vec![0x82, 0x86]; // :method GET, :scheme http (static table)
    for (name_index, value) in [(4u8, path), (1, "gw.test")] {
        // Literal without indexing, name from the static table (:path = 4, :authority = 1).
        block.push(name_index);
        block.push(value.len() as u8);
        block.extend_from_slice(value.as_bytes());
    }
    frame(HEADERS, END_HEADERS | END_STREAM, stream, &block)
}

fn rst(stream: u32, code: u32) -> Vec<u8> {
    frame(RST_STREAM, 0, stream, &code.to_be_bytes())
}

/// What reading the next frame gave.
#[derive(Debug)]
enum Next {
    Frame(Frame),
    /// The server closed the connection (EOF or reset).
    Closed,
    /// Nothing until the deadline.
    TimedOut,
}

/// A client that writes raw bytes and reads frames.
struct RawH2<S> {
    io: S,
    buf: Vec<u8>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> RawH2<S> {
    fn new(io: S) -> Self {
        Self {
            io,
            buf: Vec::new(),
        }
    }

    /// Writes `bytes`; false when the server had already closed the connection.
    async fn send(&mut self, bytes: &[u8]) -> bool {
        self.io.write_all(bytes).await.is_ok() && self.io.flush().await.is_ok()
    }

    async fn next(&mut self, deadline: Instant) -> Next {
        loop {
            if self.buf.len() >= 9 {
                let len = u32::from_be_bytes([0, self.buf[0], self.buf[1], self.buf[2]]) as usize;
                if self.buf.len() >= 9 + len {
                    let f = Frame {
                        kind: self.buf[3],
                        stream: u32::from_be_bytes(self.buf[5..9].try_into().unwrap())
                            & 0x7fff_ffff,
                        payload: self.buf[9..9 + len].to_vec(),
                    };
                    self.buf.drain(..9 + len);
                    return Next::Frame(f);
                }
            }
            let mut chunk = [0u8; 16 * 1024];
            match tokio::time::timeout_at(deadline, self.io.read(&mut chunk)).await {
                Err(_) => return Next::TimedOut,
                Ok(Ok(0)) | Ok(Err(_)) => return Next::Closed,
                Ok(Ok(n)) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// Reads frames until the server closes the connection or `limit` passes. Returns the
    /// frames, whether it closed, and when (from the call).
    async fn until_closed(
        &mut self,
        limit: Duration,
    ) -> (Vec<(Duration, Frame)>, Option<Duration>) {
        let start = Instant::now();
        let mut frames = Vec::new();
        loop {
            match self.next(start + limit).await {
                Next::Frame(f) => frames.push((start.elapsed(), f)),
                Next::Closed => return (frames, Some(start.elapsed())),
                Next::TimedOut => return (frames, None),
            }
        }
    }
}

/// Connects and sends the preface and an empty SETTINGS frame.
async fn h2c_settings_only(gw: &TestGateway) -> RawH2<TcpStream> {
    let mut c = RawH2::new(TcpStream::connect(gw.addr).await.unwrap());
    assert!(c.send(&[PREFACE, &settings()].concat()).await);
    c
}

#[tokio::test]
async fn h2c_preface_then_silence_is_closed_within_header_read_timeout() {
    let up = TestUpstream::builder().start().await;
    let gw = start_in_front_of(
        &up.url(),
        "header_read_timeout = \"300ms\"\nkeep_alive_timeout = \"60s\"",
    )
    .await;
    let reply = raw_exchange(gw.addr, PREFACE, Duration::from_secs(3)).await;
    assert!(
        reply.closed,
        "a preface without SETTINGS held the connection for 3 s"
    );
    assert!(
        reply.after < Duration::from_millis(900),
        "closed only after {:?}",
        reply.after
    );
    assert_eq!(up.hits(), 0, "nothing reaches the upstream");
}

#[tokio::test]
async fn tls_alpn_h2_then_silence_is_closed_within_header_read_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let c = cert(dir.path(), "gw", &["gw.test"]);
    let up = TestUpstream::builder().start().await;
    let gw = start(&format!(
        r#"
        [server]
        header_read_timeout = "300ms"
        keep_alive_timeout = "60s"
        [tls]
        listen = "127.0.0.1:0"
        cert_file = "{}"
        key_file = "{}"
        [[routes]]
        path = "/"
        targets = ["{}"]
        "#,
        c.cert.display(),
        c.key.display(),
        up.url()
    ))
    .await;
    let connector = tls_client(&[&c], &[b"h2"]);
    // Nothing after the handshake, then the preface alone.
    for first in [&b""[..], PREFACE] {
        let tcp = TcpStream::connect(gw.tls.unwrap()).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from("gw.test").unwrap();
        let tls = connector.connect(name, tcp).await.unwrap();
        assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
        let mut raw = RawH2::new(tls);
        assert!(raw.send(first).await);
        let (frames, closed) = raw.until_closed(Duration::from_secs(3)).await;
        let closed = closed.unwrap_or_else(|| {
            panic!(
                "{} bytes after the handshake held the connection for 3 s",
                first.len()
            )
        });
        assert!(
            closed < Duration::from_millis(900),
            "closed only after {closed:?}"
        );
        // The server's own SETTINGS may come first; it advertises the stream limit.
        if let Some((_, s)) = frames.iter().find(|(_, f)| f.kind == SETTINGS) {
            assert_eq!(s.setting(SETTINGS_MAX_CONCURRENT_STREAMS), Some(100));
        }
    }
    assert_eq!(up.hits(), 0, "nothing reaches the upstream");
}

#[tokio::test]
async fn settings_then_no_stream_gets_goaway_after_keep_alive_timeout() {
    let up = TestUpstream::builder().start().await;
    let gw = start_in_front_of(
        &up.url(),
        "header_read_timeout = \"300ms\"\nkeep_alive_timeout = \"700ms\"",
    )
    .await;
    let mut c = h2c_settings_only(&gw).await;
    let (frames, closed) = c.until_closed(Duration::from_secs(5)).await;
    let closed = closed.expect("an idle HTTP/2 connection stayed open for 5 s");
    let (goaway_at, goaway) = frames
        .iter()
        .find(|(_, f)| f.kind == GOAWAY)
        .expect("GOAWAY before the close");
    assert_eq!(goaway.error_code(), NO_ERROR);
    assert!(
        *goaway_at >= Duration::from_millis(650),
        "GOAWAY after {goaway_at:?}: SETTINGS arrived in time, so keep_alive_timeout applies, not header_read_timeout"
    );
    // The client does not answer the GOAWAY's PING; the gateway closes anyway.
    assert!(
        closed < Duration::from_millis(2500),
        "closed only after {closed:?}"
    );
    assert_eq!(up.hits(), 0);
}

#[tokio::test]
async fn h2_connection_idle_after_its_requests_is_closed_after_keep_alive_timeout() {
    let up = TestUpstream::builder().name("up").start().await;
    let gw = start_in_front_of(
        &up.url(),
        "header_read_timeout = \"300ms\"\nkeep_alive_timeout = \"700ms\"",
    )
    .await;
    let stream = TcpStream::connect(gw.addr).await.unwrap();
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    let conn = tokio::spawn(conn);
    for _ in 0..3 {
        let resp = send
            .send_request(
                Request::get(format!("http://{}/x", gw.addr))
                    .body(Full::new(Bytes::new()))
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(resp.into_body().collect().await.unwrap().to_bytes(), "up");
    }
    let idle = Instant::now();
    tokio::time::timeout(Duration::from_secs(5), conn)
        .await
        .expect("an idle HTTP/2 connection stayed open for 5 s")
        .unwrap()
        .expect("the gateway closes with GOAWAY, not an error");
    let after = idle.elapsed();
    assert!(
        after >= Duration::from_millis(600) && after < Duration::from_millis(2000),
        "closed {after:?} after the last response"
    );
    assert_eq!(up.hits(), 3);
}

#[tokio::test]
async fn silent_h2_connections_no_longer_starve_max_connections() {
    let up = TestUpstream::builder().name("up").start().await;
    let gw = start_in_front_of(
        &up.url(),
        "max_connections = 5\nheader_read_timeout = \"300ms\"\nkeep_alive_timeout = \"500ms\"",
    )
    .await;
    let mut silent = Vec::new();
    for _ in 0..5 {
        silent.push(h2c_settings_only(&gw).await);
    }
    // All five hold a permit before the sixth client comes.
    let metrics = &gw.state.proxy.metrics;
    assert!(
        eventually(Duration::from_secs(2), || async {
            metrics.connections_open.load(Ordering::Relaxed) == 5
        })
        .await
    );
    let sixth = client()
        .get(gw.url("/sixth"))
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .expect("a sixth client is served once the silent connections are closed");
    assert_eq!(sixth.status(), 200);
    assert_eq!(sixth.text().await.unwrap(), "up");
    for mut s in silent {
        let (_, closed) = s.until_closed(Duration::from_secs(3)).await;
        assert!(closed.is_some(), "a silent connection is still open");
    }
    let seen: Vec<_> = up.requests().iter().map(|r| r.uri.clone()).collect();
    assert_eq!(
        seen,
        ["/sixth"],
        "only the sixth client's request went upstream"
    );
}

#[tokio::test]
async fn streams_beyond_the_advertised_limit_are_refused() {
    let up = TestUpstream::builder()
        .name("up")
        .delay("/slow", Duration::from_millis(1500))
        .start()
        .await;
    // h2_max_concurrent_streams is left at its default, 100.
    let gw = start_in_front_of(&up.url(), "").await;
    let mut c = h2c_settings_only(&gw).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    let Next::Frame(first) = c.next(deadline).await else {
        panic!("no SETTINGS from the server");
    };
    assert_eq!(
        first.kind, SETTINGS,
        "the server speaks first with SETTINGS"
    );
    assert_eq!(
        first.setting(SETTINGS_MAX_CONCURRENT_STREAMS),
        Some(100),
        "advertised stream limit"
    );
    // 101 requests at once: streams 1, 3, ... 201; the last one is over the limit.
    let burst: Vec<u8> = (0..101).flat_map(|i| get(2 * i + 1, "/slow")).collect();
    assert!(c.send(&burst).await);
    let mut answered = 0;
    let mut refused = Vec::new();
    while answered + refused.len() < 101 {
        match c.next(deadline).await {
            Next::Frame(f) if f.kind == HEADERS => answered += 1,
            Next::Frame(f) if f.kind == RST_STREAM => refused.push((f.stream, f.error_code())),
            Next::Frame(_) => {}
            other => panic!("{other:?} after {answered} answers and refusals {refused:?}"),
        }
    }
    assert_eq!(
        refused,
        [(201, REFUSED_STREAM)],
        "the 101st stream is refused"
    );
    assert_eq!(answered, 100);
    assert_eq!(
        up.hits(),
        100,
        "the refused stream never reached the upstream"
    );
}

#[tokio::test]
async fn rapid_reset_flood_gets_goaway_and_reaches_the_upstream_a_bounded_number_of_times() {
    let up = TestUpstream::builder()
        .name("up")
        .delay("/", Duration::from_millis(200))
        .start()
        .await;
    let gw = start_in_front_of(&up.url(), "").await;
    let mut c = h2c_settings_only(&gw).await;
    // Open and cancel 5000 streams, in batches so the gateway processes them while we write.
    let mut sent = 0;
    'flood: for batch in 0..50u32 {
        let bytes: Vec<u8> = (0..100u32)
            .flat_map(|i| {
                let id = 2 * (batch * 100 + i) + 1;
                [get(id, "/"), rst(id, CANCEL)].concat()
            })
            .collect();
        if !c.send(&bytes).await {
            break 'flood;
        }
        sent += 100;
    }
    let (frames, closed) = c.until_closed(Duration::from_secs(5)).await;
    assert!(closed.is_some(), "the flooding connection is still open");
    let goaway = frames
        .iter()
        .find(|(_, f)| f.kind == GOAWAY)
        .map(|(_, f)| f)
        .unwrap_or_else(|| panic!("no GOAWAY after {sent} reset streams"));
    assert_eq!(goaway.error_code(), ENHANCE_YOUR_CALM);
    let hits = up.hits();
    assert!(
        hits <= 100,
        "{hits} of {sent} reset streams reached the upstream"
    );
}
