//! Endpoint eligibility through the real gateway: active probes (thresholds both ways, TCP
//! probes, `start_unhealthy`, the library callback), passive ejection and its cap, panic mode,
//! and the slow-start ramp.

mod support;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use meshgate::builder::{GatewayBuilder, RouteBuilder};
use meshgate::config::raw::RawHealthCheck;
use meshgate::config::{Config, Env};
use meshgate::discovery::Discovered;
use meshgate::health::HealthChange;
use meshgate::Gateway;
use support::gateway::{client, eventually, start, start_gateway};
use support::upstream::TestUpstream;
use support::util::endpoint_status;
use tokio::sync::mpsc;
use tokio::time::Instant;

/// The issue's probe settings: 50 ms rounds, 3 failures to go unhealthy, 2 passes to return.
const PROBES: &str = r#"{ path = "/health", interval = "50ms", timeout = "200ms", healthy_threshold = 2, unhealthy_threshold = 3, jitter = "0s" }"#;

/// The upstream under watch. Tests swap it when they restart it on the same port, so the
/// callback always counts the probes of the instance that is listening now.
type Watched = Arc<Mutex<Option<TestUpstream>>>;

/// One transition as the library callback saw it, with the watched upstream's probe count
/// read inside the callback, at the very moment of the transition.
#[derive(Debug)]
struct Transition {
    change: HealthChange,
    probes_seen: Option<usize>,
}

fn watch(up: TestUpstream) -> Watched {
    Arc::new(Mutex::new(Some(up)))
}

/// Builds a gateway from `toml` whose health callback reports every transition on a channel,
/// counting the watched upstream's probes with `count`.
fn probed_gateway(
    toml: &str,
    watched: &Watched,
    count: fn(&TestUpstream) -> usize,
) -> (Gateway, mpsc::UnboundedReceiver<Transition>) {
    let mut config = Config::from_toml(toml, &Env::default()).unwrap();
    config.server.drain_delay = Duration::ZERO;
    let (tx, rx) = mpsc::unbounded_channel();
    let watched = Arc::clone(watched);
    let callback = Arc::new(move |change: &HealthChange| {
        let probes_seen = watched.lock().unwrap().as_ref().map(count);
        let _ = tx.send(Transition {
            change: change.clone(),
            probes_seen,
        });
    });
    let gw = Gateway::build_with(config, HashMap::new(), Some(callback)).unwrap();
    (gw, rx)
}

async fn next_transition(rx: &mut mpsc::UnboundedReceiver<Transition>) -> Transition {
    tokio::time::timeout(Duration::from_secs(3), rx.recv())
        .await
        .expect("no health transition within 3s")
        .expect("callback channel closed")
}

/// Sends `n` GETs one after another and returns the bodies by count.
async fn tally(c: &reqwest::Client, url: &str, n: usize) -> HashMap<String, usize> {
    let mut out = HashMap::new();
    for _ in 0..n {
        let resp = c.get(url).send().await.unwrap();
        assert_eq!(resp.status(), 200);
        *out.entry(resp.text().await.unwrap()).or_insert(0) += 1;
    }
    out
}

fn hits_on(watched: &Watched, path: &str) -> usize {
    watched.lock().unwrap().as_ref().unwrap().hits_on(path)
}

async fn restart(watched: &Watched, name: &str) {
    let old = watched.lock().unwrap().take().expect("watched upstream");
    let addr = old.addr();
    old.shutdown().await;
    let new = TestUpstream::builder().name(name).start_on(addr).await;
    *watched.lock().unwrap() = Some(new);
}

#[tokio::test]
async fn http_probes_flip_an_endpoint_only_after_their_thresholds() {
    let c = client();
    let good = TestUpstream::builder().name("good").start().await;
    // Healthy at first (no probe has failed yet), but every probe will fail.
    let sick = TestUpstream::builder()
        .name("sick")
        .route("/health", 500, "down")
        .start()
        .await;
    let sick_addr = sick.addr();
    let watched = watch(sick);
    let (gw, mut changes) = probed_gateway(
        &format!(
            r#"
            [discovery.static.services]
            svc = ["{}", "http://{sick_addr}"]
            [[routes]]
            path = "/"
            service = "svc"
            health_check = {PROBES}
            "#,
            good.url()
        ),
        &watched,
        |u| u.hits_on("/health"),
    );
    let gw = start_gateway(gw).await;

    let down = next_transition(&mut changes).await;
    assert_eq!(down.change.endpoint, sick_addr.to_string());
    assert_eq!(&*down.change.service, "svc");
    assert!(!down.change.healthy);
    assert_eq!(down.change.reason, "status 500");
    assert_eq!(
        down.probes_seen,
        Some(3),
        "unhealthy after exactly unhealthy_threshold failed probes"
    );
    let ep = endpoint_status(&c, &gw, "svc", sick_addr).await;
    assert_eq!(ep["healthy"], false, "{ep}");
    assert_eq!(ep["available"], false, "{ep}");

    let t = tally(&c, &gw.url("/"), 20).await;
    assert_eq!(t.get("good"), Some(&20), "{t:?}");
    assert_eq!(
        hits_on(&watched, "/"),
        0,
        "no traffic to an unhealthy endpoint"
    );

    // Same port, /health passing again.
    restart(&watched, "back").await;
    let up = next_transition(&mut changes).await;
    assert_eq!(up.change.endpoint, sick_addr.to_string());
    assert!(up.change.healthy);
    assert_eq!(
        up.probes_seen,
        Some(2),
        "healthy after exactly healthy_threshold passing probes"
    );
    let ep = endpoint_status(&c, &gw, "svc", sick_addr).await;
    assert_eq!(ep["healthy"], true, "{ep}");

    let t = tally(&c, &gw.url("/"), 20).await;
    assert_eq!(t.get("back"), Some(&10), "round robin again: {t:?}");
    assert_eq!(hits_on(&watched, "/"), 10);

    // `good` passed every probe: it never transitioned.
    while let Ok(extra) = changes.try_recv() {
        assert_eq!(extra.change.endpoint, sick_addr.to_string(), "{extra:?}");
    }
    assert!(good.hits_on("/health") >= 3);
}

#[tokio::test]
async fn tcp_probes_follow_the_listener_not_the_http_status() {
    let c = client();
    let good = TestUpstream::builder().name("good").start().await;
    // An HTTP probe would fail this one; a TCP probe only connects.
    let flaky = TestUpstream::builder()
        .name("flaky")
        .route("/health", 500, "down")
        .start()
        .await;
    let flaky_addr = flaky.addr();
    let watched = watch(flaky);
    let (gw, mut changes) = probed_gateway(
        &format!(
            r#"
            [[routes]]
            name = "svc"
            path = "/"
            targets = ["{}", "http://{flaky_addr}"]
            health_check = {{ tcp = true, interval = "50ms", timeout = "200ms", healthy_threshold = 2, unhealthy_threshold = 3, jitter = "0s" }}
            "#,
            good.url()
        ),
        &watched,
        |u| u.connections(),
    );
    let gw = start_gateway(gw).await;

    // Five probe connections, more than the unhealthy threshold, and still healthy.
    assert!(
        eventually(Duration::from_secs(2), || async {
            watched.lock().unwrap().as_ref().unwrap().connections() >= 5
        })
        .await
    );
    assert_eq!(
        hits_on(&watched, "/health"),
        0,
        "a TCP probe sends no request"
    );
    assert!(
        changes.try_recv().is_err(),
        "no transition while it accepts"
    );
    assert_eq!(
        endpoint_status(&c, &gw, "svc", flaky_addr).await["healthy"],
        true
    );

    let stopped = Instant::now();
    let old = watched.lock().unwrap().take().unwrap();
    old.shutdown().await;
    let down = next_transition(&mut changes).await;
    assert!(!down.change.healthy);
    assert!(down.change.reason.contains("connect"), "{down:?}");
    assert!(
        stopped.elapsed() >= Duration::from_millis(100),
        "three failing rounds take at least two intervals, took {:?}",
        stopped.elapsed()
    );
    assert_eq!(
        endpoint_status(&c, &gw, "svc", flaky_addr).await["healthy"],
        false
    );
    let t = tally(&c, &gw.url("/"), 10).await;
    assert_eq!(t.get("good"), Some(&10), "{t:?}");

    let new = TestUpstream::builder()
        .name("back")
        .start_on(flaky_addr)
        .await;
    *watched.lock().unwrap() = Some(new);
    let up = next_transition(&mut changes).await;
    assert!(up.change.healthy);
    // Only probes connect to an unhealthy endpoint, so connections count probes exactly.
    assert_eq!(up.probes_seen, Some(2));
    let t = tally(&c, &gw.url("/"), 10).await;
    assert_eq!(t.get("back"), Some(&5), "{t:?}");
}

#[tokio::test]
async fn start_unhealthy_sends_nothing_until_two_probes_pass() {
    let c = client();
    let up = Arc::new(TestUpstream::builder().name("late").start().await);
    let seen = Arc::clone(&up);
    let (tx, mut changes) = mpsc::unbounded_channel();
    // The library path: the builder with the callback, raw keys for what it has no method for.
    let mut builder = GatewayBuilder::new()
        .route(RouteBuilder::new("svc", "/").targets([up.url().as_str()]))
        .on_health_change(move |c| {
            let _ = tx.send((c.clone(), seen.hits_on("/health")));
        });
    let raw = builder.raw_mut();
    raw.server.drain_delay = "0s".into();
    raw.routes[0].start_unhealthy = true;
    raw.routes[0].health_check = Some(RawHealthCheck {
        interval: "150ms".into(),
        timeout: "200ms".into(),
        jitter: "0s".into(),
        ..RawHealthCheck::default()
    });
    let gw = start_gateway(builder.build().unwrap()).await;

    // The second probe round is at least 150 ms away.
    let resp = c.get(gw.url("/")).send().await.unwrap();
    assert_eq!(resp.status(), 503);
    assert_eq!(resp.headers()["retry-after"], "1");
    assert_eq!(up.hits_on("/"), 0);

    let (change, probes) = tokio::time::timeout(Duration::from_secs(3), changes.recv())
        .await
        .expect("endpoint never became healthy")
        .unwrap();
    assert!(change.healthy);
    assert_eq!(&*change.service, "svc");
    assert_eq!(change.endpoint, up.addr().to_string());
    assert_eq!(probes, 2, "healthy after exactly two passing probes");
    let resp = c.get(gw.url("/")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.text().await.unwrap(), "late");
    assert_eq!(up.hits_on("/"), 1);
}

fn outlier_config(a: &TestUpstream, b: &TestUpstream, outlier: &str, extra: &str) -> String {
    format!(
        r#"
        [discovery.static.services]
        svc = ["{}", "{}"]
        [[routes]]
        path = "/"
        service = "svc"
        retry = {{ attempts = 1 }}
        outlier = {outlier}
        {extra}
        "#,
        a.url(),
        b.url()
    )
}

#[tokio::test]
async fn consecutive_5xx_eject_an_endpoint_until_the_ejection_time_passes() {
    let c = client();
    let good = TestUpstream::builder().name("good").start().await;
    let bad = TestUpstream::builder()
        .name("bad")
        .route("/x", 500, "bad")
        .start()
        .await;
    let gw = start(&outlier_config(
        &good,
        &bad,
        r#"{ consecutive_5xx = 3, base_ejection_time = "300ms", max_ejection_percent = 50 }"#,
        "",
    ))
    .await;
    // Round robin alternates, so six requests give `bad` its three 500s in a row.
    for _ in 0..6 {
        c.get(gw.url("/x")).send().await.unwrap();
    }
    let ejected_at = Instant::now();
    assert_eq!(bad.hits_on("/x"), 3);
    let ep = endpoint_status(&c, &gw, "svc", bad.addr()).await;
    assert_eq!(ep["ejected"], true, "{ep}");
    assert_eq!(ep["ejections"], 1, "{ep}");

    for _ in 0..10 {
        let resp = c.get(gw.url("/x")).send().await.unwrap();
        assert_eq!(resp.status(), 200);
    }
    assert_eq!(bad.hits_on("/x"), 3, "no traffic while ejected");

    // Back once the ejection time is over.
    assert!(
        eventually(Duration::from_secs(2), || async {
            c.get(gw.url("/x")).send().await.unwrap();
            bad.hits_on("/x") > 3
        })
        .await
    );
    let out_for = ejected_at.elapsed();
    // The ejection starts when the gateway sees the third 500, a little before the client
    // has its answer (and the gateway's clock counts whole milliseconds): hence the margin.
    assert!(
        out_for >= Duration::from_millis(250) && out_for < Duration::from_millis(1300),
        "ejected for {out_for:?}, expected about 300ms"
    );
}

#[tokio::test]
async fn max_ejection_percent_keeps_the_last_endpoints_in() {
    let c = client();
    let a = TestUpstream::builder().route("/x", 500, "a").start().await;
    let b = TestUpstream::builder().route("/x", 500, "b").start().await;
    let gw = start(&outlier_config(
        &a,
        &b,
        r#"{ consecutive_5xx = 3, base_ejection_time = "10s", max_ejection_percent = 50 }"#,
        "",
    ))
    .await;
    for _ in 0..30 {
        assert_eq!(c.get(gw.url("/x")).send().await.unwrap().status(), 500);
    }
    // The first to fail three times is ejected; the other keeps every request after that.
    let mut hits = [a.hits_on("/x"), b.hits_on("/x")];
    hits.sort_unstable();
    assert_eq!(hits, [3, 27]);
    let (kept, out) = if a.hits_on("/x") == 27 {
        (&a, &b)
    } else {
        (&b, &a)
    };
    let kept = endpoint_status(&c, &gw, "svc", kept.addr()).await;
    assert_eq!(
        (&kept["ejected"], &kept["ejections"]),
        (&false.into(), &0.into())
    );
    assert_eq!(
        endpoint_status(&c, &gw, "svc", out.addr()).await["ejected"],
        true
    );

    // The same failures with the cap at 100 %: both go, and the service has nothing left.
    let a2 = TestUpstream::builder().route("/x", 500, "a").start().await;
    let b2 = TestUpstream::builder().route("/x", 500, "b").start().await;
    let gw = start(&outlier_config(
        &a2,
        &b2,
        r#"{ consecutive_5xx = 3, base_ejection_time = "10s", max_ejection_percent = 100 }"#,
        "",
    ))
    .await;
    for _ in 0..6 {
        assert_eq!(c.get(gw.url("/x")).send().await.unwrap().status(), 500);
    }
    assert_eq!(c.get(gw.url("/x")).send().await.unwrap().status(), 503);
    assert_eq!(a2.hits_on("/x") + b2.hits_on("/x"), 6);
}

#[tokio::test]
async fn panic_threshold_spreads_traffic_over_unavailable_endpoints() {
    let c = client();
    let a = TestUpstream::builder().route("/x", 500, "a").start().await;
    let b = TestUpstream::builder().route("/x", 500, "b").start().await;
    let gw = start(&outlier_config(
        &a,
        &b,
        r#"{ consecutive_5xx = 3, base_ejection_time = "10s", max_ejection_percent = 100 }"#,
        "panic_threshold = 50",
    ))
    .await;
    for _ in 0..6 {
        c.get(gw.url("/x")).send().await.unwrap();
    }
    let doc = support::util::status(&c, &gw).await;
    assert_eq!(doc["services"][0]["endpoints_available"], 0, "{doc:#}");
    // Nothing is available, which is below 50 %: the balancer uses every endpoint anyway.
    for _ in 0..4 {
        assert_eq!(c.get(gw.url("/x")).send().await.unwrap().status(), 500);
    }
    assert_eq!(a.hits_on("/x") + b.hits_on("/x"), 10);
}

#[tokio::test]
async fn slow_start_ramps_a_new_endpoint_up() {
    let old = TestUpstream::builder().name("old").start().await;
    let new = TestUpstream::builder().name("new").start().await;
    let gw = start(&format!(
        r#"
        [discovery.static.services]
        svc = ["{}"]
        [[routes]]
        path = "/"
        service = "svc"
        slow_start = "1s"
        "#,
        old.url()
    ))
    .await;
    let slow_start = Duration::from_secs(1);
    let pool = gw.pool("svc");
    // The first endpoint ramps from the gateway's start; wait until it takes its full share.
    assert!(
        eventually(Duration::from_secs(3), || async {
            pool.snapshot().list()[0].state.ramp(slow_start) >= 1.0
        })
        .await
    );

    // Clients are built and connected first: building one takes long enough to skew the
    // first window.
    let mut clients = Vec::new();
    for _ in 0..4 {
        let c = client();
        assert_eq!(
            c.get(gw.url("/"))
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap(),
            "old"
        );
        clients.push(c);
    }
    let ep = |u: &TestUpstream| Discovered::new("127.0.0.1", u.addr().port(), 1);
    assert!(gw.discovery.set("svc", vec![ep(&old), ep(&new)]));
    let joined = Instant::now();
    let until = Duration::from_millis(1500);
    let mut workers = Vec::new();
    for c in clients {
        let url = gw.url("/");
        workers.push(tokio::spawn(async move {
            let mut samples = Vec::new();
            loop {
                let at = joined.elapsed();
                if at >= until {
                    return samples;
                }
                let body = c.get(&url).send().await.unwrap().text().await.unwrap();
                samples.push((at, body == "new"));
            }
        }));
    }
    let mut samples = Vec::new();
    for w in workers {
        samples.extend(w.await.unwrap());
    }
    let share = |from: u64, to: u64| {
        let window: Vec<bool> = samples
            .iter()
            .filter(|(at, _)| *at >= Duration::from_millis(from) && *at < Duration::from_millis(to))
            .map(|(_, is_new)| *is_new)
            .collect();
        assert!(
            window.len() >= 20,
            "too few samples in {from}..{to} ms: {} (of {}, last at {:?})",
            window.len(),
            samples.len(),
            samples.iter().map(|s| s.0).max()
        );
        window.iter().filter(|n| **n).count() as f64 / window.len() as f64
    };
    let early = share(0, 200);
    let middle = share(400, 700);
    let late = share(1100, 1500);
    // Round robin over two endpoints: the full share is 1/2; while ramping it is r/(1+r).
    assert!(
        early < 0.3,
        "early share {early:.2} (middle {middle:.2}, late {late:.2})"
    );
    assert!(early < middle, "early {early:.2} vs middle {middle:.2}");
    assert!(middle < late + 0.05, "middle {middle:.2} vs late {late:.2}");
    assert!(late > 0.4, "late share {late:.2}");
    assert!(new.hits() > 0 && old.hits() > 0);
}
