//! Retries through the real gateway: which failures are retried for which requests, body replay
//! within `retry.max_body`, the retry budget, and `attempts = 1`.

mod support;

use std::time::Duration;

use reqwest::Client;
use support::gateway::{client, start, TestGateway};
use support::upstream::TestUpstream;
use support::util::{chunked_request, dead_port, endpoint_status, raw_exchange};

/// Round robin alternates between the two endpoints. A throwaway GET shows whose turn it is,
/// so that the next request's first attempt goes to `target`.
async fn aim_at(c: &Client, gw: &TestGateway, target: &TestUpstream) {
    let before = target.hits_on("/turn");
    assert_eq!(c.get(gw.url("/turn")).send().await.unwrap().status(), 200);
    if target.hits_on("/turn") > before {
        assert_eq!(c.get(gw.url("/turn")).send().await.unwrap().status(), 200);
    }
}

/// Two upstreams behind service `svc` on `/`, with the given `retry` table.
async fn pair(a: &str, b: &str, retry: &str) -> TestGateway {
    start(&format!(
        r#"
        [discovery.static.services]
        svc = ["{a}", "{b}"]
        [[routes]]
        path = "/"
        service = "svc"
        retry = {retry}
        "#
    ))
    .await
}

#[tokio::test]
async fn connect_failure_is_retried_on_the_other_endpoint_whatever_the_method() {
    let c = client();
    let dead = dead_port().await;
    let live = TestUpstream::builder().name("live").start().await;
    let gw = pair(
        &format!("http://127.0.0.1:{dead}"),
        &live.url(),
        r#"{ backoff = "10ms" }"#,
    )
    .await;
    for _ in 0..10 {
        let resp = c.get(gw.url("/get")).send().await.unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.text().await.unwrap(), "live");
    }
    // Nothing reached the dead endpoint, so even a POST may go elsewhere.
    for _ in 0..2 {
        let resp = c
            .post(gw.url("/post"))
            .body("payload")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
    }
    assert_eq!(live.hits(), 12, "one upstream request per client request");
    assert_eq!(live.last_request().unwrap().body_len, 7);
    let dead_ep =
        endpoint_status(&c, &gw, "svc", format!("127.0.0.1:{dead}").parse().unwrap()).await;
    assert!(
        dead_ep["failures"].as_u64().unwrap() >= 6,
        "the dead endpoint was tried first, and failed: {dead_ep}"
    );
}

#[tokio::test]
async fn a_reset_post_is_retried_only_when_safe_to_resend() {
    let c = client();
    let resetter = TestUpstream::builder()
        .name("resetter")
        .reset_after_read("/submit")
        .start()
        .await;
    let other = TestUpstream::builder().name("other").start().await;
    let gw = pair(&resetter.url(), &other.url(), r#"{ backoff = "10ms" }"#).await;

    // The upstream read the POST and then hung up: it may have acted on it.
    aim_at(&c, &gw, &resetter).await;
    let resp = c
        .post(gw.url("/submit"))
        .body("order-1")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 502);
    assert_eq!(resetter.hits_on("/submit"), 1);
    assert_eq!(other.hits_on("/submit"), 0, "a POST is not sent twice");

    // An Idempotency-Key makes it safe.
    aim_at(&c, &gw, &resetter).await;
    let resp = c
        .post(gw.url("/submit"))
        .header("Idempotency-Key", "k-1")
        .body("order-2")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.text().await.unwrap(), "other");
    assert_eq!(resetter.hits_on("/submit"), 2);
    assert_eq!(other.hits_on("/submit"), 1);
    let seen = other.last_request().unwrap();
    assert_eq!(seen.headers["idempotency-key"], "k-1");
    assert_eq!(seen.body_len, 7);

    // So does an idempotent method.
    aim_at(&c, &gw, &resetter).await;
    let resp = c
        .put(gw.url("/submit"))
        .body("order-3")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resetter.hits_on("/submit"), 3);
    assert_eq!(other.hits_on("/submit"), 2);
}

#[tokio::test]
async fn bodies_are_replayed_up_to_retry_max_body_only() {
    let c = client();
    let resetter = TestUpstream::builder()
        .name("resetter")
        .reset_after_read("/submit")
        .start()
        .await;
    let other = TestUpstream::builder().name("other").start().await;
    let gw = pair(
        &resetter.url(),
        &other.url(),
        r#"{ backoff = "10ms", max_body = "1KiB" }"#,
    )
    .await;
    let keyed = |body: Vec<u8>| {
        c.post(gw.url("/submit"))
            .header("Idempotency-Key", "k")
            .body(body)
    };

    // Within max_body: the second endpoint gets the whole body again.
    aim_at(&c, &gw, &resetter).await;
    assert_eq!(keyed(vec![b'a'; 1000]).send().await.unwrap().status(), 200);
    assert_eq!(resetter.last_request().unwrap().body_len, 1000);
    assert_eq!(other.hits_on("/submit"), 1);
    assert_eq!(other.last_request().unwrap().body_len, 1000);

    // Beyond it the body streams through once and cannot be sent again.
    aim_at(&c, &gw, &resetter).await;
    assert_eq!(keyed(vec![b'b'; 4096]).send().await.unwrap().status(), 502);
    assert_eq!(resetter.last_request().unwrap().body_len, 4096);
    assert_eq!(other.hits_on("/submit"), 1, "not retried");

    // The same rule for chunked bodies, whose size is only known while reading them.
    let head = "POST /submit HTTP/1.1\r\nHost: gw\r\nIdempotency-Key: k";
    aim_at(&c, &gw, &resetter).await;
    let small = raw_exchange(
        gw.addr,
        &chunked_request(head, &[&[b'c'; 400], &[b'c'; 400]]),
        Duration::from_secs(5),
    )
    .await;
    assert!(small.text.starts_with("HTTP/1.1 200"), "{}", small.text);
    assert_eq!(other.hits_on("/submit"), 2);
    assert_eq!(other.last_request().unwrap().body_len, 800);

    aim_at(&c, &gw, &resetter).await;
    let big = raw_exchange(
        gw.addr,
        &chunked_request(head, &[&[b'd'; 600], &[b'd'; 600], &[b'd'; 600]]),
        Duration::from_secs(5),
    )
    .await;
    assert!(big.text.starts_with("HTTP/1.1 502"), "{}", big.text);
    // What was read ahead while deciding went upstream first, then the rest of the stream.
    assert_eq!(resetter.last_request().unwrap().body_len, 1800);
    assert_eq!(other.hits_on("/submit"), 2, "not retried");

    // And a large chunked body that meets no failure arrives whole.
    let plain = raw_exchange(
        gw.addr,
        &chunked_request(
            "POST /plain HTTP/1.1\r\nHost: gw",
            &[&[b'e'; 600], &[b'e'; 600], &[b'e'; 600]],
        ),
        Duration::from_secs(5),
    )
    .await;
    assert!(plain.text.starts_with("HTTP/1.1 200"), "{}", plain.text);
    let got: Vec<u64> = [&resetter, &other]
        .iter()
        .filter_map(|u| u.requests().into_iter().find(|r| r.path() == "/plain"))
        .map(|r| r.body_len)
        .collect();
    assert_eq!(got, [1800]);
}

#[tokio::test]
async fn status_503_is_retried_for_get_but_not_for_post() {
    let c = client();
    let busy = TestUpstream::builder()
        .name("busy")
        .route("/flaky", 503, "busy")
        .start()
        .await;
    let fine = TestUpstream::builder().name("fine").start().await;
    let gw = pair(&busy.url(), &fine.url(), r#"{ backoff = "10ms" }"#).await;

    aim_at(&c, &gw, &busy).await;
    let resp = c.get(gw.url("/flaky")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.text().await.unwrap(), "fine");
    assert_eq!((busy.hits_on("/flaky"), fine.hits_on("/flaky")), (1, 1));

    aim_at(&c, &gw, &busy).await;
    let resp = c.post(gw.url("/flaky")).body("x").send().await.unwrap();
    assert_eq!(resp.status(), 503);
    assert_eq!(
        resp.text().await.unwrap(),
        "busy",
        "the upstream's own answer"
    );
    assert_eq!((busy.hits_on("/flaky"), fine.hits_on("/flaky")), (2, 1));
}

#[tokio::test]
async fn attempts_1_turns_retries_off() {
    let c = client();
    let dead = dead_port().await;
    let live = TestUpstream::builder().name("live").start().await;
    let gw = pair(
        &format!("http://127.0.0.1:{dead}"),
        &live.url(),
        r#"{ attempts = 1 }"#,
    )
    .await;
    let mut statuses = Vec::new();
    for _ in 0..10 {
        statuses.push(c.get(gw.url("/")).send().await.unwrap().status().as_u16());
    }
    // Strict alternation: every other request met the dead endpoint and stayed failed.
    assert_eq!(
        statuses.iter().filter(|s| **s == 502).count(),
        5,
        "{statuses:?}"
    );
    assert_eq!(
        statuses.iter().filter(|s| **s == 200).count(),
        5,
        "{statuses:?}"
    );
    assert_eq!(live.hits(), 5);
}

#[tokio::test]
async fn retry_on_lists_exactly_the_conditions_retried() {
    let c = client();
    let busy = TestUpstream::builder()
        .name("busy")
        .route("/flaky", 503, "busy")
        .reset_after_read("/reset")
        .start()
        .await;
    let fine = TestUpstream::builder().name("fine").start().await;
    let gw = pair(
        &busy.url(),
        &fine.url(),
        r#"{ backoff = "10ms", on = ["connect-failure"] }"#,
    )
    .await;

    aim_at(&c, &gw, &busy).await;
    let resp = c.get(gw.url("/flaky")).send().await.unwrap();
    assert_eq!(resp.status(), 503, "503 is not in the list");
    assert_eq!(fine.hits_on("/flaky"), 0);

    aim_at(&c, &gw, &busy).await;
    let resp = c.get(gw.url("/reset")).send().await.unwrap();
    assert_eq!(resp.status(), 502, "reset is not in the list");
    assert_eq!(fine.hits_on("/reset"), 0);
}

/// Sends `n` GETs to `url` all at once and returns their statuses.
async fn burst(c: &Client, url: String, n: usize) -> Vec<u16> {
    let mut tasks = Vec::new();
    for _ in 0..n {
        let (c, url) = (c.clone(), url.clone());
        tasks.push(tokio::spawn(async move {
            c.get(url).send().await.unwrap().status().as_u16()
        }));
    }
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_retry_budget_caps_amplification_when_everything_fails() {
    const N: usize = 100;
    const ATTEMPTS: usize = 3;
    let c = client();
    // Slow failures keep every request in flight at once, which is when a budget matters.
    let delay = Duration::from_millis(300);
    let failing = || {
        TestUpstream::builder()
            .route("/capped", 503, "busy")
            .delay("/capped", delay)
            .route("/free", 503, "busy")
            .delay("/free", delay)
            .start()
    };
    let (a, b) = (failing().await, failing().await);
    let gw = start(&format!(
        r#"
        [discovery.static.services]
        svc = ["{}", "{}"]
        [[routes]]
        path = "/capped"
        service = "svc"
        retry = {{ attempts = {ATTEMPTS}, backoff = "10ms", max_backoff = "10ms", budget = "20%" }}
        [[routes]]
        path = "/free"
        service = "svc"
        retry = {{ attempts = {ATTEMPTS}, backoff = "10ms", max_backoff = "10ms", budget = "100%" }}
        "#,
        a.url(),
        b.url()
    ))
    .await;
    let (capped, free) = tokio::join!(
        burst(&c, gw.url("/capped"), N),
        burst(&c, gw.url("/free"), N)
    );
    assert!(capped.iter().chain(&free).all(|s| *s == 503));

    let capped_hits = a.hits_on("/capped") + b.hits_on("/capped");
    let free_hits = a.hits_on("/free") + b.hits_on("/free");
    // At most 20 % of the requests in flight may be retries (with a floor of 10 at a time).
    // With every request in flight together, that is N * 1.2, plus the savings the N requests
    // deposited (20 % of a retry each, N / 5 in all), plus what the floor lets through as the
    // burst drains (at most the floor per further attempt).
    let bound = N + N / 5 + N / 5 + 10 * (ATTEMPTS - 1);
    assert!(
        (N..=bound).contains(&capped_hits),
        "budget 20%: {capped_hits} upstream requests for {N} (bound {bound})"
    );
    assert!(capped_hits > N, "the budget still allows some retries");
    // The same storm with the budget wide open multiplies the load.
    assert!(
        (2 * N..=ATTEMPTS * N).contains(&free_hits),
        "budget 100%: {free_hits} upstream requests for {N}"
    );
}

#[tokio::test]
async fn a_full_budget_allows_every_attempt() {
    const N: usize = 20;
    let c = client();
    let failing = || {
        TestUpstream::builder()
            .route("/fail", 503, "busy")
            .delay("/fail", Duration::from_millis(200))
            .start()
    };
    let (a, b) = (failing().await, failing().await);
    let gw = pair(
        &a.url(),
        &b.url(),
        r#"{ attempts = 3, backoff = "10ms", max_backoff = "10ms", budget = "100%" }"#,
    )
    .await;
    let statuses = burst(&c, gw.url("/fail"), N).await;
    assert!(statuses.iter().all(|s| *s == 503));
    // One retry in flight per request never exceeds 100 % of the requests in flight.
    assert_eq!(a.hits_on("/fail") + b.hits_on("/fail"), 3 * N);
}
