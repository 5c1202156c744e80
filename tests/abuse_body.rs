//! Abuse suite, request bodies: an answer given before the request body was read to its end
//! must never let the body's bytes be parsed as a request (smuggling), client body faults are
//! the client's (400/408, nothing charged to the endpoint), and slow bodies are bounded.
//! Every test asserts what the upstream received.

mod support;

use std::time::Duration;

use support::gateway::{client, start, TestGateway};
use support::upstream::TestUpstream;
use support::util::{dead_port, endpoint_status};
use support::wire::{hidden_get, Wire};

const WAIT: Duration = Duration::from_secs(5);
/// The smuggled request's target: served by the catch-all route if it were ever parsed.
const SECRET: &str = "/admin/secret";

async fn gateway(up: &TestUpstream, extra: &str) -> TestGateway {
    let dead = dead_port().await;
    // An API-key route refuses before reading the body; the file holds no key of the tests.
    let keys = std::env::temp_dir().join(format!("meshgate-abuse-keys-{}", std::process::id()));
    std::fs::write(&keys, format!("nobody {}\n", "0".repeat(64))).unwrap();
    start(&format!(
        r#"
        {extra}
        [discovery.static.services]
        empty = []
        [[routes]]
        name = "locked"
        path = "/locked"
        targets = ["{up}"]
        auth = {{ api_keys = {{ keys_file = {keys:?} }} }}
        [[routes]]
        name = "limited"
        path = "/limited"
        targets = ["{up}"]
        rate_limit = {{ rate = "1/h", key = "header:X-Tenant", required = true }}
        [[routes]]
        name = "small"
        path = "/small"
        targets = ["{up}"]
        max_body = "1KiB"
        [[routes]]
        name = "none"
        path = "/none"
        service = "empty"
        # Streamed: the answer comes before any body byte is read (a buffered route reads
        # the body first).
        retry = {{ attempts = 1 }}
        [[routes]]
        name = "dead"
        path = "/dead"
        targets = ["http://127.0.0.1:{dead}"]
        retry = {{ attempts = 1 }}
        [[routes]]
        name = "api"
        path = "/api"
        targets = ["{up}"]
        [[routes]]
        name = "admin"
        path = "/admin"
        targets = ["{up}"]
        "#,
        up = up.url()
    ))
    .await
}

/// Sends `head` with a body that is a complete hidden request, either in the same write or
/// after the gateway's answer, and checks the answer's status, that the connection closes
/// or at least never answers a second time, and that the upstream never saw the hidden request.
async fn early_answer_never_smuggles(head: &str, body_len: usize, expect: u16) {
    for late in [false, true] {
        let up = TestUpstream::builder().start().await;
        let gw = gateway(&up, "").await;
        let hidden = hidden_get(SECRET, body_len);
        let mut w = Wire::connect(gw.addr).await;
        let mut first = head.as_bytes().to_vec();
        if !late {
            first.extend_from_slice(&hidden);
        }
        w.send(&first).await.unwrap();
        let resp = w
            .response(WAIT)
            .await
            .unwrap_or_else(|| panic!("no answer to {head:?} (late: {late})"));
        assert_eq!(resp.status, expect, "{head:?} late={late}");
        if late {
            // The server may already have closed: then the write fails, which is fine.
            let _ = w.send(&hidden).await;
        }
        // Whatever follows, no second answer: the hidden bytes were a body, not a request.
        let second = w.response(Duration::from_millis(500)).await;
        assert!(
            second.is_none(),
            "{head:?} late={late}: the body was answered as a request: {second:?}"
        );
        assert_eq!(
            up.hits_on(SECRET),
            0,
            "{head:?} late={late}: the upstream received the smuggled request"
        );
        gw.stop().await;
    }
}

#[tokio::test]
async fn body_of_a_request_refused_by_auth_is_never_parsed_as_a_request() {
    early_answer_never_smuggles(
        "POST /locked/x HTTP/1.1\r\nHost: gw\r\nContent-Length: 300\r\n\r\n",
        300,
        401,
    )
    .await;
}

#[tokio::test]
async fn body_of_a_request_refused_by_the_rate_limit_is_never_parsed_as_a_request() {
    early_answer_never_smuggles(
        "POST /limited/x HTTP/1.1\r\nHost: gw\r\nContent-Length: 300\r\n\r\n",
        300,
        400,
    )
    .await;
}

#[tokio::test]
async fn body_over_max_body_is_never_parsed_as_a_request() {
    early_answer_never_smuggles(
        "POST /small/x HTTP/1.1\r\nHost: gw\r\nContent-Length: 2000\r\n\r\n",
        2000,
        413,
    )
    .await;
}

#[tokio::test]
async fn body_sent_to_an_unknown_route_is_never_parsed_as_a_request() {
    early_answer_never_smuggles(
        "POST /nowhere HTTP/1.1\r\nHost: gw\r\nContent-Length: 300\r\n\r\n",
        300,
        404,
    )
    .await;
}

#[tokio::test]
async fn body_sent_to_health_and_status_is_never_parsed_as_a_request() {
    for path in ["/health", "/status"] {
        early_answer_never_smuggles(
            &format!("GET {path} HTTP/1.1\r\nHost: gw\r\nContent-Length: 300\r\n\r\n"),
            300,
            200,
        )
        .await;
    }
}

#[tokio::test]
async fn body_after_a_refused_expect_continue_is_never_parsed_as_a_request() {
    early_answer_never_smuggles(
        "POST /small/x HTTP/1.1\r\nHost: gw\r\nExpect: 100-continue\r\nContent-Length: 2000\r\n\r\n",
        2000,
        413,
    )
    .await;
    early_answer_never_smuggles(
        "PUT /nowhere HTTP/1.1\r\nHost: gw\r\nExpect: 100-continue\r\nContent-Length: 300\r\n\r\n",
        300,
        404,
    )
    .await;
}

#[tokio::test]
async fn body_sent_to_a_service_without_endpoints_is_never_parsed_as_a_request() {
    early_answer_never_smuggles(
        "POST /none HTTP/1.1\r\nHost: gw\r\nContent-Length: 300\r\n\r\n",
        300,
        503,
    )
    .await;
}

#[tokio::test]
async fn body_of_a_request_that_failed_upstream_is_never_parsed_as_a_request() {
    early_answer_never_smuggles(
        "POST /dead HTTP/1.1\r\nHost: gw\r\nContent-Length: 300\r\n\r\n",
        300,
        502,
    )
    .await;
}

/// A chunked body over the limit, whose next bytes after the chunk that crossed it are a
/// complete request (hyper's parser skips the blank line before it).
#[tokio::test]
async fn chunked_body_over_max_body_is_never_parsed_as_a_request() {
    for late in [false, true] {
        let up = TestUpstream::builder().start().await;
        let gw = gateway(&up, "").await;
        let data = "x".repeat(1500);
        let head = format!(
            "POST /small/x HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\r\n5dc\r\n{data}\r\n"
        );
        let hidden = format!("GET {SECRET} HTTP/1.1\r\nHost: smuggled\r\n\r\n");
        let mut w = Wire::connect(gw.addr).await;
        let mut first = head.into_bytes();
        if !late {
            first.extend_from_slice(hidden.as_bytes());
        }
        w.send(&first).await.unwrap();
        let resp = w.response(WAIT).await.expect("an answer");
        assert_eq!(resp.status, 413, "late={late}");
        if late {
            let _ = w.send(hidden.as_bytes()).await;
        }
        let second = w.response(Duration::from_millis(500)).await;
        assert!(second.is_none(), "late={late}: {second:?}");
        assert_eq!(up.hits_on(SECRET), 0, "late={late}");
        assert_eq!(up.hits(), 0, "late={late}: nothing reaches the upstream");
        gw.stop().await;
    }
}

/// An early answer closes the connection: it says `Connection: close`, and the client sees
/// the answer (the gateway reads and discards the rest of the body instead of resetting).
#[tokio::test]
async fn an_early_answer_says_close_and_the_client_reads_it_whole() {
    let up = TestUpstream::builder().start().await;
    let gw = gateway(&up, "").await;
    let mut w = Wire::connect(gw.addr).await;
    w.send(b"POST /small/x HTTP/1.1\r\nHost: gw\r\nContent-Length: 200000\r\n\r\n")
        .await
        .unwrap();
    let resp = w.response(WAIT).await.expect("an answer");
    assert_eq!(resp.status, 413);
    assert!(resp.closes(), "{:?}", resp.headers);
    // The client goes on sending its body; the gateway discards it and then closes.
    let body = vec![b'y'; 200_000];
    let _ = w.send(&body).await;
    assert!(w.closed_within(WAIT).await, "the connection stays open");
    assert_eq!(up.hits(), 0);
}

/// A request whose body was read to its end keeps the connection: the fix must not close every
/// connection that carried a body.
#[tokio::test]
async fn connections_stay_open_after_bodies_that_were_read() {
    let up = TestUpstream::builder().start().await;
    let gw = gateway(&up, "").await;
    let mut w = Wire::connect(gw.addr).await;
    for i in 0..3 {
        let req = format!("POST /api/{i} HTTP/1.1\r\nHost: gw\r\nContent-Length: 5\r\n\r\nhello");
        w.send(req.as_bytes()).await.unwrap();
        let resp = w.response(WAIT).await.expect("an answer");
        assert_eq!(resp.status, 200);
        assert!(!resp.closes());
    }
    assert_eq!(up.hits(), 3);
    assert!(up.requests().iter().all(|r| r.body_len == 5));
}

/// A gateway with one route `stream` to `up` without retries, so bodies stream upstream instead
/// of being read first, whose endpoint one gateway failure ejects: anything charged to it shows.
async fn streamed_gateway(up: &TestUpstream) -> TestGateway {
    start(&format!(
        r#"
        [[routes]]
        name = "stream"
        path = "/"
        targets = ["{}"]
        retry = {{ attempts = 1 }}
        outlier = {{ consecutive_gateway_failures = 1, max_ejection_percent = 100 }}
        "#,
        up.url()
    ))
    .await
}

/// Sends a chunked POST with `body` as the raw chunked framing to a streamed route and returns
/// the status; then checks nothing was charged to the endpoint.
async fn malformed_chunked(framing: &str) {
    let up = TestUpstream::builder().echo().start().await;
    let gw = streamed_gateway(&up).await;
    let mut w = Wire::connect(gw.addr).await;
    let head = "POST /upload HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\r\n";
    w.send(format!("{head}{framing}").as_bytes()).await.unwrap();
    let resp = w
        .response(WAIT)
        .await
        .unwrap_or_else(|| panic!("no answer for {framing:?}"));
    assert_eq!(resp.status, 400, "{framing:?}: {resp:?}");
    // Nothing counted against the endpoint: it still serves, is not ejected, has no failures.
    let c = client();
    let ep = endpoint_status(&c, &gw, "stream", up.addr()).await;
    assert_eq!(ep["ejected"], false, "{framing:?}: {ep}");
    assert_eq!(ep["healthy"], true, "{framing:?}: {ep}");
    let ok = c.get(gw.url("/after")).send().await.unwrap();
    assert_eq!(ok.status(), 200, "{framing:?}");
    gw.stop().await;
}

#[tokio::test]
async fn malformed_chunked_bodies_are_the_clients_fault() {
    for framing in [
        // Negative size.
        "-5\r\nhello\r\n0\r\n\r\n",
        // Size overflowing 64 bits.
        "5\r\nhello\r\n1ffffffffffffffff\r\nx\r\n0\r\n\r\n",
        // Hex prefix.
        "0x5\r\nhello\r\n0\r\n\r\n",
        // Bare LF after the size.
        "5\nhello\r\n0\r\n\r\n",
        // Missing CRLF after the data.
        "5\r\nhelloXX0\r\n\r\n",
        // Bare CR in a chunk extension.
        "5;a=b\rc\r\nhello\r\n0\r\n\r\n",
        // Oversize chunk extension.
        &format!("5;{}\r\nhello\r\n0\r\n\r\n", "e".repeat(100_000)),
        // Obs-fold in a trailer.
        "5\r\nhello\r\n0\r\nX-T: a\r\n b\r\n\r\n",
    ] {
        malformed_chunked(framing).await;
    }
}

/// Malformed bodies sent again and again never eject a healthy endpoint (today four did).
#[tokio::test]
async fn repeated_malformed_bodies_do_not_eject_the_endpoint() {
    let up = TestUpstream::builder().start().await;
    let gw = streamed_gateway(&up).await;
    for _ in 0..8 {
        let mut w = Wire::connect(gw.addr).await;
        w.send(b"POST /u HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nzz\r\n\r\n")
            .await
            .unwrap();
        let resp = w.response(WAIT).await.expect("an answer");
        assert_eq!(resp.status, 400);
    }
    let c = client();
    let ep = endpoint_status(&c, &gw, "stream", up.addr()).await;
    assert_eq!(ep["ejected"], false, "{ep}");
    let ok = c.get(gw.url("/after")).send().await.unwrap();
    assert_eq!(ok.status(), 200);
}

/// A client that stops sending its body mid-way gets 408 once `body_read_timeout` passes, on a
/// buffered route and on a streamed one, and the endpoint is not charged.
#[tokio::test]
async fn a_stalled_body_is_408_and_not_the_upstreams_fault() {
    for (route, attempts) in [("buffered", 3), ("streamed", 1)] {
        let up = TestUpstream::builder().start().await;
        let gw = start(&format!(
            r#"
            [server]
            body_read_timeout = "300ms"
            [[routes]]
            name = "{route}"
            path = "/"
            targets = ["{}"]
            timeout = "10s"
            retry = {{ attempts = {attempts} }}
            outlier = {{ consecutive_gateway_failures = 1, max_ejection_percent = 100 }}
            "#,
            up.url()
        ))
        .await;
        let mut w = Wire::connect(gw.addr).await;
        w.send(b"POST /u HTTP/1.1\r\nHost: gw\r\nContent-Length: 100\r\n\r\nonly-part")
            .await
            .unwrap();
        let started = tokio::time::Instant::now();
        let resp = w.response(WAIT).await.expect("an answer");
        assert_eq!(resp.status, 408, "{route}: {resp:?}");
        assert!(started.elapsed() < Duration::from_secs(3), "{route}");
        assert!(resp.closes(), "{route}");
        let c = client();
        let ep = endpoint_status(&c, &gw, route, up.addr()).await;
        assert_eq!(ep["ejected"], false, "{route}: {ep}");
        let ok = c.get(gw.url("/after")).send().await.unwrap();
        assert_eq!(ok.status(), 200, "{route}");
        gw.stop().await;
    }
}

/// A drip-fed body (a byte every 50 ms, never silent for `body_read_timeout`) on a buffered
/// route is bounded by the route's timeout: 408, and the upstream never contacted.
#[tokio::test]
async fn a_drip_fed_body_is_bounded_by_the_route_timeout() {
    let up = TestUpstream::builder().start().await;
    let gw = start(&format!(
        r#"
        [server]
        body_read_timeout = "1s"
        [[routes]]
        name = "drip"
        path = "/"
        targets = ["{}"]
        timeout = "500ms"
        outlier = {{ consecutive_gateway_failures = 1, max_ejection_percent = 100 }}
        "#,
        up.url()
    ))
    .await;
    let mut w = Wire::connect(gw.addr).await;
    w.send(b"POST /u HTTP/1.1\r\nHost: gw\r\nContent-Length: 1000\r\n\r\n")
        .await
        .unwrap();
    let started = tokio::time::Instant::now();
    let resp = w
        .drip_until_answer(b'x', Duration::from_millis(50), WAIT)
        .await
        .expect("an answer while dripping");
    assert_eq!(resp.status, 408, "{resp:?}");
    assert!(started.elapsed() < Duration::from_secs(3));
    assert_eq!(up.hits(), 0, "a buffered body never reached its end");
    let c = client();
    let ep = endpoint_status(&c, &gw, "drip", up.addr()).await;
    assert_eq!(ep["ejected"], false, "{ep}");
}

/// A client that goes away mid-upload: the upstream connection it was streaming to is closed
/// (never pooled for the next request), and the endpoint is not charged.
#[tokio::test]
async fn an_aborted_upload_is_not_charged_and_its_upstream_connection_is_not_reused() {
    let up = TestUpstream::builder().start().await;
    let gw = streamed_gateway(&up).await;
    let c = client();
    // One normal request first opens (and pools) one upstream connection.
    assert_eq!(c.get(gw.url("/warm")).send().await.unwrap().status(), 200);
    let before = up.connections();
    let mut w = Wire::connect(gw.addr).await;
    w.send(b"POST /u HTTP/1.1\r\nHost: gw\r\nContent-Length: 100000\r\n\r\n")
        .await
        .unwrap();
    w.send(&vec![b'z'; 50_000]).await.unwrap();
    // Wait until the upstream has the request (its head arrives before the body).
    assert!(
        support::gateway::eventually(WAIT, || async { up.hits() == 2 }).await,
        "the upload never reached the upstream"
    );
    drop(w);
    // The aborted request shows up upstream as an abandoned body.
    assert!(
        support::gateway::eventually(WAIT, || async { up.requests().len() == 2 }).await,
        "the upstream never saw the upload end"
    );
    assert!(up.requests()[1].body_len < 100_000);
    let ep = endpoint_status(&c, &gw, "stream", up.addr()).await;
    assert_eq!(ep["ejected"], false, "{ep}");
    assert_eq!(c.get(gw.url("/after")).send().await.unwrap().status(), 200);
    // The connection that carried the aborted upload was not reused for `/after`.
    assert!(
        up.connections() > before,
        "the aborted upload's connection was reused"
    );
}
