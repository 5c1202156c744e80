//! Graceful shutdown of the real gateway: readiness fails first, the listener keeps serving for
//! `drain_delay` and then refuses connections, in-flight requests finish within
//! `grace_period`, and `run` returns `Ok`.

mod support;

use std::time::Duration;

use support::gateway::{client, eventually, start_in_front_of, TestGateway};
use support::upstream::TestUpstream;
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// How long the upstream takes to answer `/slow`.
const SLOW: Duration = Duration::from_millis(800);

/// A gateway with `server` settings in front of an upstream whose `/slow` takes [`SLOW`] and
/// whose `/stuck` takes 3 s.
async fn slow_gateway(server: &str) -> (TestGateway, TestUpstream) {
    let up = TestUpstream::builder()
        .name("up")
        .delay("/slow", SLOW)
        .delay("/stuck", Duration::from_secs(3))
        .start()
        .await;
    let gw = start_in_front_of(&up.url(), server).await;
    (gw, up)
}

/// Sends `GET path` and returns once the upstream has it; the task yields the status and body,
/// or the client error.
async fn in_flight(
    c: &reqwest::Client,
    gw: &TestGateway,
    up: &TestUpstream,
    path: &str,
) -> JoinHandle<reqwest::Result<(u16, String)>> {
    let task = tokio::spawn({
        let (c, url) = (c.clone(), gw.url(path));
        async move {
            let resp = c.get(url).send().await?;
            let status = resp.status().as_u16();
            Ok((status, resp.text().await?))
        }
    });
    assert!(eventually(Duration::from_secs(2), || async { up.hits_on(path) == 1 }).await);
    task
}

async fn ready_status(c: &reqwest::Client, url: &str) -> u16 {
    c.get(url).send().await.unwrap().status().as_u16()
}

#[tokio::test]
async fn readiness_fails_first_and_new_connections_are_refused_after_the_drain() {
    let c = client();
    let (mut gw, up) = slow_gateway("drain_delay = \"300ms\"\ngrace_period = \"5s\"").await;
    let ready_url = gw.admin_url("/ready");
    assert!(
        eventually(Duration::from_secs(2), || async {
            ready_status(&c, &ready_url).await == 200
        })
        .await
    );
    let sent = Instant::now();
    let slow = in_flight(&c, &gw, &up, "/slow").await;

    let signalled = Instant::now();
    gw.signal_stop();
    // Readiness fails first, well inside the drain delay.
    assert!(
        eventually(Duration::from_secs(1), || async {
            ready_status(&c, &ready_url).await == 503
        })
        .await
    );
    assert!(
        signalled.elapsed() < Duration::from_millis(300),
        "/ready still 200 {:?} after the signal",
        signalled.elapsed()
    );
    // During the drain the listener still takes new connections: load balancers are still
    // catching up with the failed readiness.
    let fresh = client();
    let during = fresh.get(gw.url("/during")).send().await.unwrap();
    assert_eq!(during.status(), 200);

    // After it, new connections are refused.
    assert!(
        eventually(Duration::from_secs(2), || async {
            TcpStream::connect(gw.addr).await.is_err()
        })
        .await,
        "the listener still accepts"
    );
    let refused_at = Instant::now();
    assert!(
        refused_at - signalled >= Duration::from_millis(300),
        "refused {:?} after the signal, before the drain delay",
        refused_at - signalled
    );

    // The request that was in flight all along still gets its whole answer.
    let (status, body) = slow.await.unwrap().unwrap();
    assert_eq!((status, body.as_str()), (200, "up"));
    assert!(
        refused_at - sent < SLOW,
        "the listener closed while the request was still waiting for its answer"
    );
    gw.join(Duration::from_secs(3)).await.unwrap();
    assert!(
        TcpStream::connect(gw.admin).await.is_err(),
        "admin listener closed too"
    );
    assert_eq!(up.hits_on("/slow"), 1);
}

#[tokio::test]
async fn run_waits_for_in_flight_requests() {
    let c = client();
    let (mut gw, up) = slow_gateway("drain_delay = \"0s\"\ngrace_period = \"5s\"").await;
    let sent = Instant::now();
    let slow = in_flight(&c, &gw, &up, "/slow").await;
    gw.signal_stop();
    gw.join(Duration::from_secs(3)).await.unwrap();
    let stopped = sent.elapsed();
    // The upstream answers 800 ms after the request arrived; run may not return before that.
    assert!(
        stopped >= SLOW,
        "run returned {stopped:?} after the request started, before its answer"
    );
    let (status, body) = slow.await.unwrap().unwrap();
    assert_eq!((status, body.as_str()), (200, "up"));
}

#[tokio::test]
async fn run_returns_promptly_when_nothing_is_in_flight() {
    let (mut gw, _up) = slow_gateway("drain_delay = \"100ms\"").await;
    // An idle keep-alive connection must not hold shutdown up.
    let c = client();
    assert_eq!(c.get(gw.url("/")).send().await.unwrap().status(), 200);
    let signalled = Instant::now();
    gw.signal_stop();
    gw.join(Duration::from_secs(2)).await.unwrap();
    let took = signalled.elapsed();
    assert!(
        took >= Duration::from_millis(100) && took < Duration::from_millis(1000),
        "stopped after {took:?}"
    );
}

#[tokio::test]
async fn the_grace_period_bounds_the_wait_for_a_stuck_request() {
    let c = client();
    let (mut gw, up) = slow_gateway("drain_delay = \"0s\"\ngrace_period = \"300ms\"").await;
    let _stuck = in_flight(&c, &gw, &up, "/stuck").await;
    let signalled = Instant::now();
    gw.signal_stop();
    gw.join(Duration::from_secs(2)).await.unwrap();
    let took = signalled.elapsed();
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_millis(1500),
        "run returned after {took:?}"
    );
}

#[tokio::test]
async fn connections_left_after_the_grace_period_are_closed() {
    let c = client();
    let (mut gw, up) = slow_gateway("drain_delay = \"0s\"\ngrace_period = \"300ms\"").await;
    let stuck = in_flight(&c, &gw, &up, "/stuck").await;
    gw.signal_stop();
    gw.join(Duration::from_secs(2)).await.unwrap();
    // The stuck request must fail now, not get the upstream's late 200 three seconds later.
    let outcome = tokio::time::timeout(Duration::from_secs(1), stuck)
        .await
        .expect("the stuck connection outlived the gateway's run by more than 1s")
        .unwrap();
    assert!(outcome.is_err(), "{outcome:?}");
}

/// A connection accepted before the listener closed whose first request arrives after the
/// drain started is answered (with `Connection: close`), not closed unanswered: a restart must
/// not drop requests already on their way.
#[tokio::test]
async fn a_connection_accepted_before_the_drain_gets_its_first_request_answered() {
    let up = TestUpstream::builder().name("up").start().await;
    let mut gw = start_in_front_of(&up.url(), "").await;
    let mut w = support::wire::Wire::connect(gw.addr).await;
    let open = || {
        gw.state
            .proxy
            .metrics
            .connections_open
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    assert!(eventually(Duration::from_secs(5), || async { open() == 1 }).await);
    let addr = gw.addr;
    gw.signal_stop();
    // The listener is closed (drain_delay is zero here), so the drain has begun.
    assert!(
        eventually(Duration::from_secs(5), || async {
            TcpStream::connect(addr).await.is_err()
        })
        .await
    );
    w.send(b"GET /late HTTP/1.1\r\nHost: gw\r\n\r\n")
        .await
        .unwrap();
    let resp = w
        .response(Duration::from_secs(5))
        .await
        .expect("the request was dropped unanswered");
    assert_eq!(resp.status, 200);
    assert!(resp.closes(), "{:?}", resp.headers);
    assert_eq!(up.hits_on("/late"), 1);
    gw.join(Duration::from_secs(5)).await.unwrap();
}
