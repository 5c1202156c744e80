//! Abuse suite, connections: pipelining after errors, hop-by-hop abuse (`Connection` naming the
//! headers the gateway adds or needs), and slow request heads. Every test asserts what the
//! upstream received.

mod support;

use std::time::Duration;

use support::gateway::{start, TestGateway};
use support::upstream::TestUpstream;
use support::wire::Wire;

const WAIT: Duration = Duration::from_secs(5);

async fn gateway(up: &TestUpstream, server: &str) -> TestGateway {
    start(&format!(
        r#"
        [server]
        {server}
        [[routes]]
        name = "api"
        path = "/api"
        targets = ["{}"]
        "#,
        up.url()
    ))
    .await
}

/// Pipelined requests after an error without a body are still answered in order (the error
/// did not desynchronise the connection), and each reaches the upstream exactly once.
#[tokio::test]
async fn pipelined_requests_after_an_error_without_body_are_answered_in_order() {
    let up = TestUpstream::builder().start().await;
    let gw = gateway(&up, "").await;
    let mut w = Wire::connect(gw.addr).await;
    w.send(
        b"GET /nowhere HTTP/1.1\r\nHost: gw\r\n\r\n\
          GET /api/one HTTP/1.1\r\nHost: gw\r\n\r\n\
          GET /nowhere HTTP/1.1\r\nHost: gw\r\n\r\n\
          GET /api/two HTTP/1.1\r\nHost: gw\r\n\r\n",
    )
    .await
    .unwrap();
    let mut statuses = Vec::new();
    for _ in 0..4 {
        statuses.push(w.response(WAIT).await.expect("an answer").status);
    }
    assert_eq!(statuses, [404, 200, 404, 200]);
    let seen: Vec<String> = up.requests().iter().map(|r| r.uri.clone()).collect();
    assert_eq!(seen, ["/api/one", "/api/two"]);
}

/// A pipelined request behind a request whose body was refused unread is never run: the
/// refused body's framing cannot be trusted, so the connection ends after the answer.
#[tokio::test]
async fn pipelined_requests_after_a_refused_body_are_not_run() {
    let up = TestUpstream::builder().start().await;
    let gw = gateway(&up, "").await;
    let mut w = Wire::connect(gw.addr).await;
    w.send(
        b"POST /nowhere HTTP/1.1\r\nHost: gw\r\nContent-Length: 5\r\n\r\nhello\
          GET /api/after HTTP/1.1\r\nHost: gw\r\n\r\n",
    )
    .await
    .unwrap();
    let first = w.response(WAIT).await.expect("an answer");
    assert_eq!(first.status, 404);
    // Either the pipelined request is answered normally (the body was fully in the buffer and
    // hyper drained it) or the connection closed; it is never run twice or out of order.
    match w.response(Duration::from_millis(500)).await {
        Some(r) => {
            assert_eq!(r.status, 200);
            assert_eq!(up.hits_on("/api/after"), 1);
        }
        None => assert!(first.closes() && up.hits() == 0, "{first:?}"),
    }
    assert!(up.hits_on("/api/after") <= 1);
}

/// `Connection` may name any header as hop-by-hop, but never strips what the gateway itself
/// adds or needs: the upstream still gets the client's address, the request id, the host,
/// and the body with its length.
#[tokio::test]
async fn connection_cannot_strip_headers_the_gateway_adds() {
    let up = TestUpstream::builder().start().await;
    let gw = gateway(&up, "").await;
    let mut w = Wire::connect(gw.addr).await;
    w.send(
        b"POST /api/x HTTP/1.1\r\nHost: gw.example\r\n\
          Connection: keep-alive, X-Forwarded-For, X-Forwarded-Host, X-Forwarded-Proto, X-Request-Id, Via, Host, Content-Length\r\n\
          X-Request-Id: client-chosen\r\nContent-Length: 5\r\n\r\nhello",
    )
    .await
    .unwrap();
    let resp = w.response(WAIT).await.expect("an answer");
    assert_eq!(resp.status, 200);
    let seen = up.last_request().expect("the upstream got the request");
    let h = |n: &str| {
        seen.headers
            .get(n)
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default()
    };
    assert_eq!(h("x-forwarded-for"), "127.0.0.1");
    assert_eq!(h("x-forwarded-host"), "gw.example");
    assert_eq!(h("x-forwarded-proto"), "http");
    assert_eq!(h("x-request-id"), "client-chosen");
    assert!(h("via").contains("meshgate"));
    assert!(!h("host").is_empty());
    assert_eq!(seen.body_len, 5);
    assert!(seen.headers.get("connection").is_none_or(|v| {
        !v.to_str()
            .unwrap()
            .to_ascii_lowercase()
            .contains("x-forwarded")
    }));
    assert_eq!(up.hits(), 1);
}

/// A request head drip-fed a byte at a time (slowloris) is cut off by `header_read_timeout`
/// and never reaches the upstream.
#[tokio::test]
async fn a_drip_fed_request_head_is_cut_off() {
    let up = TestUpstream::builder().start().await;
    let gw = gateway(&up, r#"header_read_timeout = "400ms""#).await;
    let mut w = Wire::connect(gw.addr).await;
    let head = b"GET /api/slow HTTP/1.1\r\nHost: gw\r\nX-A: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n\r\n";
    let started = tokio::time::Instant::now();
    let mut closed = false;
    for b in head {
        if w.send(&[*b]).await.is_err() {
            closed = true;
            break;
        }
        // The client's pace; the test waits on the close below, not on this.
        if w.closed_within(Duration::from_millis(50)).await {
            closed = true;
            break;
        }
    }
    assert!(closed, "the gateway kept a drip-fed head open");
    // Two header_read_timeouts at most (the first bytes are sniffed for HTTP/2 first).
    assert!(
        started.elapsed() < Duration::from_millis(1500),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(up.hits(), 0);
}

/// A request with both `Content-Length` and `Transfer-Encoding` is framed by the chunked coding
/// and ends its connection (RFC 9112 §6.3): nothing sent after it on that connection is run,
/// whenever it arrives.
#[tokio::test]
async fn a_request_with_content_length_and_chunked_ends_its_connection() {
    let up = TestUpstream::builder().start().await;
    let gw = gateway(&up, "").await;
    let mut w = Wire::connect(gw.addr).await;
    w.send(
        b"POST /api/x HTTP/1.1\r\nHost: gw\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    )
    .await
    .unwrap();
    let first = w.response(WAIT).await.expect("an answer");
    assert!(matches!(first.status, 200 | 400), "{first:?}");
    let _ = w.send(b"GET /api/after HTTP/1.1\r\nHost: gw\r\n\r\n").await;
    let second = w.response(Duration::from_millis(500)).await;
    assert!(
        second.is_none(),
        "a request after CL+TE was answered: {second:?}"
    );
    assert_eq!(up.hits_on("/api/after"), 0);
    assert!(up.hits() <= 1);
}
