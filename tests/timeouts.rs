//! Timeouts and caps through the real gateway: `retry.per_try_timeout`, the route `timeout`
//! (which ends at response headers), `stream_timeout`, `[server] header_read_timeout`, and the
//! `max_requests` / `max_pending` concurrency caps.

mod support;

use std::time::Duration;

use support::gateway::{client, eventually, start, TestGateway};
use support::upstream::TestUpstream;
use support::util::raw_exchange;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

#[tokio::test]
async fn per_try_timeout_moves_a_slow_attempt_to_another_endpoint() {
    let c = client();
    let slow = TestUpstream::builder()
        .name("slow")
        .delay("/x", Duration::from_millis(600))
        .start()
        .await;
    let fast = TestUpstream::builder().name("fast").start().await;
    let gw = start(&format!(
        r#"
        [discovery.static.services]
        svc = ["{}", "{}"]
        [[routes]]
        name = "retrying"
        path = "/x"
        service = "svc"
        timeout = "2s"
        retry = {{ per_try_timeout = "100ms", on = ["timeout"], backoff = "10ms" }}
        "#,
        slow.url(),
        fast.url()
    ))
    .await;
    // Round robin: find whose turn it is, so that the next first attempt goes to `slow`.
    let mut tries = 0;
    while slow.hits_on("/x") == 0 {
        tries += 1;
        assert!(tries <= 2, "round robin never reached the slow endpoint");
        let started = Instant::now();
        let resp = c.get(gw.url("/x")).send().await.unwrap();
        let took = started.elapsed();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.text().await.unwrap(), "fast");
        if slow.hits_on("/x") == 1 {
            // The slow attempt was abandoned after 100 ms, long before its 600 ms answer.
            assert!(
                took >= Duration::from_millis(100) && took < Duration::from_millis(500),
                "took {took:?}"
            );
        }
    }
    assert_eq!(slow.hits_on("/x"), 1);
}

/// Two upstreams that take `delay` to answer `/x`, behind service `svc` on route `/x` with the
/// given route settings (TOML lines).
async fn slow_pair(delay: Duration, route: &str) -> (TestUpstream, TestUpstream, TestGateway) {
    let slow = || TestUpstream::builder().delay("/x", delay).start();
    let (a, b) = (slow().await, slow().await);
    let gw = start(&format!(
        r#"
        [discovery.static.services]
        svc = ["{}", "{}"]
        [[routes]]
        path = "/x"
        service = "svc"
        {route}
        "#,
        a.url(),
        b.url()
    ))
    .await;
    (a, b, gw)
}

/// Envoy's users expect `reset` (in the default `retry.on`) to cover an attempt that did not
/// answer in time: with two slow endpoints, both are tried within the route's `timeout`, and
/// the request ends with 504 when that runs out.
#[tokio::test]
async fn default_retry_on_moves_a_per_try_timeout_to_the_other_endpoint() {
    let c = client();
    let (a, b, gw) = slow_pair(
        Duration::from_secs(3),
        r#"timeout = "1s"
        retry = { attempts = 3, per_try_timeout = "400ms", backoff = "10ms", max_backoff = "10ms" }"#,
    )
    .await;
    let started = Instant::now();
    let resp = c.get(gw.url("/x")).send().await.unwrap();
    let took = started.elapsed();
    assert_eq!(resp.status(), 504);
    // Three attempts of 400 ms within 1 s: both endpoints tried, the third cut by the timeout.
    assert!(
        a.hits_on("/x") >= 1 && b.hits_on("/x") >= 1,
        "both endpoints tried"
    );
    assert_eq!(a.hits_on("/x") + b.hits_on("/x"), 3);
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_millis(1800),
        "the route's timeout ends the request: took {took:?}"
    );
    // A POST (not safe to resend) is not moved.
    let resp = c.post(gw.url("/x")).body("x").send().await.unwrap();
    assert_eq!(resp.status(), 504);
    assert_eq!(a.hits_on("/x") + b.hits_on("/x"), 4);
}

#[tokio::test]
async fn per_try_timeout_without_timeout_retries_is_a_504() {
    let c = client();
    let slow = TestUpstream::builder()
        .delay("/x", Duration::from_millis(800))
        .start()
        .await;
    let gw = start(&format!(
        r#"
        [[routes]]
        path = "/x"
        targets = ["{}"]
        timeout = "2s"
        retry = {{ per_try_timeout = "100ms", on = ["connect-failure", "502", "503", "504"] }}
        "#,
        slow.url()
    ))
    .await;
    let started = Instant::now();
    let resp = c.get(gw.url("/x")).send().await.unwrap();
    let took = started.elapsed();
    assert_eq!(resp.status(), 504);
    assert!(
        took >= Duration::from_millis(100) && took < Duration::from_millis(600),
        "took {took:?}"
    );
    assert_eq!(slow.hits_on("/x"), 1);
}

#[tokio::test]
async fn the_route_timeout_bounds_every_attempt_together() {
    let c = client();
    let (a, b, gw) = slow_pair(
        Duration::from_secs(2),
        r#"timeout = "300ms"
        retry = { attempts = 3, per_try_timeout = "100ms", on = ["timeout"], backoff = "10ms", max_backoff = "10ms" }"#,
    )
    .await;
    let started = Instant::now();
    let resp = c.get(gw.url("/x")).send().await.unwrap();
    let took = started.elapsed();
    assert_eq!(resp.status(), 504);
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["error"], "Gateway Timeout");
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_millis(1000),
        "took {took:?}"
    );
    // Three tries of at most 100 ms each fit in 300 ms; the last one ends at the deadline.
    assert_eq!(a.hits_on("/x") + b.hits_on("/x"), 3);
}

/// Starts the mock service (it has `/stream`) and returns its URL and its stop token.
async fn mock_service() -> (String, CancellationToken) {
    let stop = CancellationToken::new();
    let addr = meshgate::mock::spawn("127.0.0.1:0".parse().unwrap(), "mock", stop.clone())
        .await
        .unwrap();
    (format!("http://{addr}"), stop)
}

/// Reads a streamed body to its end or its first error; returns the bytes read and whether it
/// ended cleanly.
async fn read_stream(mut resp: reqwest::Response) -> (usize, bool) {
    let mut n = 0;
    loop {
        match resp.chunk().await {
            Ok(Some(chunk)) => n += chunk.len(),
            Ok(None) => return (n, true),
            Err(_) => return (n, false),
        }
    }
}

#[tokio::test]
async fn the_route_timeout_ends_at_response_headers_and_stream_timeout_cuts_the_body() {
    let c = client();
    let (mock, stop) = mock_service().await;
    let _stop = stop.drop_guard();
    let gw = start(&format!(
        r#"
        [[routes]]
        name = "patient"
        path = "/stream"
        targets = ["{mock}"]
        timeout = "200ms"
        [[routes]]
        name = "impatient"
        path = "/cut/stream"
        targets = ["{mock}"]
        timeout = "200ms"
        stream_timeout = "250ms"
        path_rewrite = [{{ strip_prefix = "/cut" }}]
        "#
    ))
    .await;
    // Five 16-byte chunks, 100 ms apart: the body takes 400 ms, twice the route timeout.
    let started = Instant::now();
    let resp = c
        .get(gw.url("/stream?chunks=5&interval_ms=100"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let (n, clean) = read_stream(resp).await;
    assert!(clean, "the stream ended with an error after {n} bytes");
    assert_eq!(n, 80);
    assert!(started.elapsed() >= Duration::from_millis(400));

    let started = Instant::now();
    let resp = c
        .get(gw.url("/cut/stream?chunks=5&interval_ms=100"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "headers arrive at once");
    let (n, clean) = read_stream(resp).await;
    let took = started.elapsed();
    assert!(!clean, "a cut stream must not look complete");
    assert!((16..80).contains(&n), "read {n} bytes");
    assert!(
        took >= Duration::from_millis(250) && took < Duration::from_millis(1000),
        "cut after {took:?}"
    );
}

#[tokio::test]
async fn header_read_timeout_cuts_a_slow_client() {
    let up = TestUpstream::builder().start().await;
    let gw = start(&format!(
        r#"
        [server]
        header_read_timeout = "200ms"
        [[routes]]
        path = "/"
        targets = ["{}"]
        "#,
        up.url()
    ))
    .await;
    // Half a head, then silence.
    let reply = raw_exchange(
        gw.addr,
        b"GET /slow HTTP/1.1\r\nHost: gw\r\nX-Partial: ",
        Duration::from_secs(3),
    )
    .await;
    assert!(reply.closed, "still open after {:?}", reply.after);
    assert!(
        reply.after >= Duration::from_millis(190) && reply.after < Duration::from_millis(1500),
        "closed after {:?}",
        reply.after
    );
    assert!(
        reply.text.is_empty() || reply.text.starts_with("HTTP/1.1 408"),
        "{}",
        reply.text
    );
    assert_eq!(up.hits(), 0);

    // A complete head in time is served as usual.
    let reply = raw_exchange(
        gw.addr,
        b"GET /ok HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n",
        Duration::from_secs(3),
    )
    .await;
    assert!(reply.text.starts_with("HTTP/1.1 200"), "{}", reply.text);
}

#[tokio::test]
async fn header_read_timeout_cuts_a_silent_client() {
    let up = TestUpstream::builder().start().await;
    let gw = start(&format!(
        r#"
        [server]
        header_read_timeout = "200ms"
        [[routes]]
        path = "/"
        targets = ["{}"]
        "#,
        up.url()
    ))
    .await;
    let reply = raw_exchange(gw.addr, b"", Duration::from_secs(2)).await;
    assert!(reply.closed, "still open after {:?}", reply.after);
    assert!(reply.after < Duration::from_millis(1500));
}

#[tokio::test]
async fn max_requests_with_no_queue_answers_503_with_retry_after() {
    let c = client();
    let up = TestUpstream::builder()
        .delay("/slow", Duration::from_millis(500))
        .start()
        .await;
    let gw = start(&format!(
        r#"
        [[routes]]
        name = "capped"
        path = "/"
        targets = ["{}"]
        max_requests = 1
        max_pending = 0
        "#,
        up.url()
    ))
    .await;
    let first = tokio::spawn({
        let (c, url) = (c.clone(), gw.url("/slow"));
        async move { c.get(url).send().await.unwrap().status() }
    });
    assert!(
        eventually(Duration::from_secs(2), || async {
            up.hits_on("/slow") == 1
        })
        .await
    );

    let started = Instant::now();
    let second = c.get(gw.url("/slow")).send().await.unwrap();
    assert_eq!(second.status(), 503);
    assert!(
        started.elapsed() < Duration::from_millis(300),
        "refused at once"
    );
    assert_eq!(second.headers()["retry-after"], "1");
    let body: serde_json::Value = second.json().await.unwrap();
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("concurrency limit"),
        "{body}"
    );
    assert_eq!(
        up.hits_on("/slow"),
        1,
        "the refused request never went upstream"
    );

    assert_eq!(first.await.unwrap(), 200);
    // The permit came back with the end of the first response.
    assert_eq!(c.get(gw.url("/slow")).send().await.unwrap().status(), 200);
}

#[tokio::test]
async fn max_pending_queues_the_next_request_until_a_permit_frees() {
    let c = client();
    let up = TestUpstream::builder()
        .delay("/slow", Duration::from_millis(300))
        .start()
        .await;
    let gw = start(&format!(
        r#"
        [[routes]]
        path = "/"
        targets = ["{}"]
        max_requests = 1
        max_pending = 1
        "#,
        up.url()
    ))
    .await;
    let send = |path: &str| {
        let (c, url) = (c.clone(), gw.url(path));
        tokio::spawn(async move {
            let started = Instant::now();
            let status = c.get(url).send().await.unwrap().status().as_u16();
            (status, started.elapsed())
        })
    };
    let first = send("/slow");
    assert!(
        eventually(Duration::from_secs(2), || async {
            up.hits_on("/slow") == 1
        })
        .await
    );
    // Two more at once: whichever arrives first waits in the queue, the other finds it full.
    let (x, y) = (send("/slow"), send("/slow"));
    let mut outcomes = [x.await.unwrap(), y.await.unwrap()];
    outcomes.sort_by_key(|(status, _)| *status);
    let [(ok, queued_for), (refused, refused_after)] = outcomes;
    assert_eq!((ok, refused), (200, 503), "{outcomes:?}");
    assert!(
        queued_for >= Duration::from_millis(250),
        "queued for {queued_for:?}"
    );
    assert!(
        refused_after < Duration::from_millis(250),
        "refused after {refused_after:?}"
    );
    assert_eq!(first.await.unwrap().0, 200);
    assert_eq!(up.hits_on("/slow"), 2);
}
