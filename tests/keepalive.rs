//! Downstream keep-alive through the real gateway: hyper serves a connection only while a
//! request is in flight, so these check what happens around that hand-back: pipelined and
//! split requests, `keep_alive_timeout`, `Connection: close`, and HTTP/1.0.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use support::gateway::{start_in_front_of, TestGateway};
use support::upstream::TestUpstream;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// One response read off a raw connection.
struct Reply {
    head: String,
    body: Vec<u8>,
}

/// Reads one response with a `Content-Length` body; `buf` keeps bytes of later responses.
async fn read_reply(s: &mut TcpStream, buf: &mut Vec<u8>) -> Reply {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).into_owned();
            let len = head
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse::<usize>().unwrap())
                })
                .expect("content-length");
            if buf.len() >= end + 4 + len {
                let body = buf[end + 4..end + 4 + len].to_vec();
                buf.drain(..end + 4 + len);
                return Reply { head, body };
            }
        }
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout_at(deadline, s.read(&mut chunk))
            .await
            .expect("reply within 5 s")
            .unwrap();
        assert!(
            n > 0,
            "closed before a full reply; got {:?}",
            String::from_utf8_lossy(buf)
        );
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Waits (bounded) until the server closes `s`; returns how long that took.
async fn closed_within(s: &mut TcpStream, limit: Duration) -> Option<Duration> {
    let start = Instant::now();
    let mut chunk = [0u8; 64];
    match tokio::time::timeout_at(start + limit, s.read(&mut chunk)).await {
        Err(_) => None,
        Ok(Ok(0)) | Ok(Err(_)) => Some(start.elapsed()),
        Ok(Ok(n)) => panic!(
            "unexpected bytes: {:?}",
            String::from_utf8_lossy(&chunk[..n])
        ),
    }
}

async fn gateway(up: &TestUpstream, server: &str) -> TestGateway {
    start_in_front_of(&up.url(), server).await
}

/// A gateway whose hyper header timer (150 ms) is far shorter than its keep-alive timeout.
async fn short_header_timer(up: &TestUpstream) -> TestGateway {
    gateway(
        up,
        r#"header_read_timeout = "150ms"
        keep_alive_timeout = "30s""#,
    )
    .await
}

fn get(path: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nHost: gw\r\n\r\n").into_bytes()
}

async fn connect(addr: SocketAddr) -> TcpStream {
    TcpStream::connect(addr).await.unwrap()
}

#[tokio::test]
async fn an_idle_connection_outlives_the_header_timeout_and_serves_the_next_request() {
    let up = TestUpstream::builder()
        .route("/a", 200, "first")
        .route("/b", 200, "second")
        .start()
        .await;
    // hyper's header timer runs while hyper waits for a next request; the gateway gives the
    // socket back to its own idle wait instead, where only keep_alive_timeout applies.
    let gw = short_header_timer(&up).await;
    let mut s = connect(gw.addr).await;
    let mut buf = Vec::new();
    s.write_all(&get("/a")).await.unwrap();
    let r = read_reply(&mut s, &mut buf).await;
    assert!(r.head.starts_with("HTTP/1.1 200"), "{}", r.head);
    assert_eq!(r.body, b"first");
    // Three header timeouts of silence (a duration under test, not a synchronisation).
    assert_eq!(
        closed_within(&mut s, Duration::from_millis(450)).await,
        None
    );
    s.write_all(&get("/b")).await.unwrap();
    let r = read_reply(&mut s, &mut buf).await;
    assert_eq!(r.body, b"second");
    assert_eq!(up.hits(), 2);
}

#[tokio::test]
async fn a_busy_connection_that_goes_quiet_is_handed_back_too() {
    let up = TestUpstream::builder().route("/a", 200, "a").start().await;
    let gw = short_header_timer(&up).await;
    let mut s = connect(gw.addr).await;
    let mut buf = Vec::new();
    // Back-to-back requests: hyper keeps the connection between them...
    for _ in 0..20 {
        s.write_all(&get("/a")).await.unwrap();
        assert_eq!(read_reply(&mut s, &mut buf).await.body, b"a");
    }
    // ...until it has been quiet for a while; then hyper's header timer no longer applies.
    assert_eq!(
        closed_within(&mut s, Duration::from_millis(450)).await,
        None
    );
    s.write_all(&get("/a")).await.unwrap();
    assert_eq!(read_reply(&mut s, &mut buf).await.body, b"a");
    assert_eq!(up.hits(), 21);
}

#[tokio::test]
async fn keep_alive_timeout_closes_an_idle_connection() {
    let up = TestUpstream::builder().route("/a", 200, "a").start().await;
    let gw = gateway(&up, r#"keep_alive_timeout = "200ms""#).await;
    let mut s = connect(gw.addr).await;
    let mut buf = Vec::new();
    s.write_all(&get("/a")).await.unwrap();
    read_reply(&mut s, &mut buf).await;
    let after = closed_within(&mut s, Duration::from_secs(5))
        .await
        .expect("closed within 5 s");
    assert!(
        after >= Duration::from_millis(150),
        "closed after {after:?}"
    );
}

#[tokio::test]
async fn zero_keep_alive_timeout_answers_with_connection_close() {
    let up = TestUpstream::builder().route("/a", 200, "a").start().await;
    let gw = gateway(&up, r#"keep_alive_timeout = "0s""#).await;
    let mut s = connect(gw.addr).await;
    let mut buf = Vec::new();
    s.write_all(&get("/a")).await.unwrap();
    let r = read_reply(&mut s, &mut buf).await;
    assert!(
        r.head.to_ascii_lowercase().contains("connection: close"),
        "{}",
        r.head
    );
    assert!(closed_within(&mut s, Duration::from_secs(5))
        .await
        .is_some());
}

#[tokio::test]
async fn pipelined_requests_are_answered_in_order() {
    let up = TestUpstream::builder()
        .route("/1", 200, "one")
        .route("/2", 200, "two")
        .route("/3", 200, "three")
        .start()
        .await;
    let gw = gateway(&up, "").await;
    let mut s = connect(gw.addr).await;
    let mut all = get("/1");
    all.extend(get("/2"));
    all.extend(get("/3"));
    s.write_all(&all).await.unwrap();
    let mut buf = Vec::new();
    for want in [&b"one"[..], b"two", b"three"] {
        assert_eq!(read_reply(&mut s, &mut buf).await.body, want);
    }
    // And the connection is still usable afterwards.
    s.write_all(&get("/1")).await.unwrap();
    assert_eq!(read_reply(&mut s, &mut buf).await.body, b"one");
}

#[tokio::test]
async fn a_request_split_across_writes_after_an_idle_spell_is_served() {
    let up = TestUpstream::builder()
        .route("/a", 200, "a")
        .echo()
        .start()
        .await;
    let gw = gateway(&up, "").await;
    let mut s = connect(gw.addr).await;
    s.set_nodelay(true).unwrap();
    let mut buf = Vec::new();
    s.write_all(&get("/a")).await.unwrap();
    read_reply(&mut s, &mut buf).await;
    // The next request arrives in separate segments: part of the request line, then the rest
    // of the head and the body, so the gateway's first read after the idle spell is partial.
    let body = "x".repeat(10_000);
    let head = format!(
        "POST /echo HTTP/1.1\r\nHost: gw\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(&head.as_bytes()[..3]).await.unwrap();
    s.write_all(&head.as_bytes()[3..]).await.unwrap();
    s.write_all(body.as_bytes()).await.unwrap();
    let r = read_reply(&mut s, &mut buf).await;
    assert!(r.head.starts_with("HTTP/1.1 200"), "{}", r.head);
    let echo: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(echo["method"], "POST");
    assert_eq!(echo["body_size"], body.len());
}

#[tokio::test]
async fn connection_close_and_http_1_0_end_the_connection() {
    let up = TestUpstream::builder().route("/a", 200, "a").start().await;
    let gw = gateway(&up, "").await;

    let mut s = connect(gw.addr).await;
    s.write_all(b"GET /a HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let r = read_reply(&mut s, &mut buf).await;
    assert_eq!(r.body, b"a");
    assert!(closed_within(&mut s, Duration::from_secs(5))
        .await
        .is_some());

    let mut s = connect(gw.addr).await;
    s.write_all(b"GET /a HTTP/1.0\r\nHost: gw\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let r = read_reply(&mut s, &mut buf).await;
    assert!(r.head.starts_with("HTTP/1.0 200"), "{}", r.head);
    assert!(closed_within(&mut s, Duration::from_secs(5))
        .await
        .is_some());
}

#[tokio::test]
async fn many_requests_on_one_connection_all_succeed() {
    let up = TestUpstream::builder().route("/a", 200, "a").start().await;
    let gw = gateway(&up, "").await;
    let mut s = connect(gw.addr).await;
    let mut buf = Vec::new();
    for _ in 0..500 {
        s.write_all(&get("/a")).await.unwrap();
        assert_eq!(read_reply(&mut s, &mut buf).await.body, b"a");
    }
    assert_eq!(up.hits(), 500);
}
