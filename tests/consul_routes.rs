//! Routes from Consul tags under a steady request stream: a service coming or going switches
//! its route between 404 and 200 in one step, never through a 503 (issue #11, defect 12).

mod support;

use std::sync::Arc;
use std::time::Duration;

use meshgate::discovery::consul::ServiceSync;
use support::consul::{ConsulEmulator, EmulatorOptions, Registration};
use support::gateway::{client, eventually, start, TestGateway};
use support::upstream::TestUpstream;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

/// Upper bound for anything that should happen promptly; only reached when a test fails.
const LIMIT: Duration = Duration::from_secs(10);
/// Pace of the request stream.
const EVERY: Duration = Duration::from_millis(5);
/// The stream stops by itself after this many requests (20 s at the pace above).
const MAX_REQUESTS: usize = 4000;
/// Answers the stream must see while the emulator holds the answer that would close the gap.
const IN_WINDOW: usize = 10;
/// Answers the stream must see after the switch before it stops.
const AFTER_SWITCH: usize = 20;

/// How the gateway watches services' health.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// One blocking query per service.
    PerService,
    /// The shared change feed (`max_watches = 1` and a second tagged service, `users`).
    Feed,
}

fn gateway_config(consul: &str) -> String {
    config_for(consul, Mode::PerService)
}

fn config_for(consul: &str, mode: Mode) -> String {
    let max_watches = match mode {
        Mode::PerService => 64,
        Mode::Feed => 1,
    };
    format!(
        r#"
        [discovery]
        provider = "consul"
        [discovery.consul]
        address = "{consul}"
        wait = "2s"
        startup_timeout = "5s"
        routes_from_tags = true
        max_watches = {max_watches}
        "#
    )
}

/// Registers what `mode` needs besides `orders`.
fn prepare(consul: &ConsulEmulator, mode: Mode, up: &TestUpstream) {
    if mode == Mode::Feed {
        consul.register(
            Registration::new("users-1", "users", "127.0.0.1", up.addr().port())
                .tags(["meshgate.route=/users"]),
        );
    }
}

fn orders(up: &TestUpstream) -> Registration {
    Registration::new("orders-1", "orders", "127.0.0.1", up.addr().port())
        .tags(["meshgate.route=/orders"])
}

async fn start_consul() -> ConsulEmulator {
    ConsulEmulator::start_with(EmulatorOptions {
        jitter: false,
        ..EmulatorOptions::default()
    })
    .await
}

async fn ready(gw: &TestGateway) -> bool {
    let c = client();
    eventually(LIMIT, || {
        let c = c.clone();
        let url = gw.admin_url("/ready");
        async move { c.get(url).send().await.unwrap().status() == 200 }
    })
    .await
}

/// One GET to `path` every 5 ms from a task of its own, recording each status in order.
/// Stops when told or after `MAX_REQUESTS`.
struct StatusStream {
    seen: watch::Receiver<Vec<u16>>,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl StatusStream {
    fn start(url: String) -> Self {
        let (tx, seen) = watch::channel(Vec::new());
        let (stop, mut stopped) = oneshot::channel();
        let task = tokio::spawn(async move {
            let c = client();
            let mut tick = tokio::time::interval(EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            for _ in 0..MAX_REQUESTS {
                tokio::select! {
                    _ = &mut stopped => break,
                    _ = tick.tick() => {}
                }
                let status = c.get(&url).send().await.unwrap().status().as_u16();
                tx.send_modify(|s| s.push(status));
            }
        });
        Self {
            seen,
            stop: Some(stop),
            task,
        }
    }

    fn len(&self) -> usize {
        self.seen.borrow().len()
    }

    /// Waits until the statuses so far satisfy `done`.
    async fn until(&mut self, what: &str, done: impl Fn(&[u16]) -> bool) {
        let reached = tokio::time::timeout(LIMIT, self.seen.wait_for(|s| done(s)))
            .await
            .is_ok_and(|r| r.is_ok());
        assert!(
            reached,
            "stream never reached: {what}; statuses: {:?}",
            compress(&self.seen.borrow())
        );
    }

    /// Waits for `n` more answers than seen so far.
    async fn more(&mut self, n: usize) {
        let target = self.len() + n;
        self.until(&format!("{target} answers"), |s| s.len() >= target)
            .await;
    }

    /// Waits for the first `status` and `AFTER_SWITCH` answers after it.
    async fn past_first(&mut self, status: u16) {
        self.until(
            &format!("{AFTER_SWITCH} answers after the first {status}"),
            |s| {
                s.iter()
                    .position(|&x| x == status)
                    .is_some_and(|i| s.len() > i + AFTER_SWITCH)
            },
        )
        .await;
    }

    async fn finish(mut self) -> Vec<u16> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.task.await.expect("stream task");
        let out = self.seen.borrow().clone();
        out
    }
}

/// Runs of equal statuses, for readable failures: `[(404, 12), (503, 40), (200, 21)]`.
fn compress(statuses: &[u16]) -> Vec<(u16, usize)> {
    let mut runs: Vec<(u16, usize)> = Vec::new();
    for &s in statuses {
        match runs.last_mut() {
            Some((last, n)) if *last == s => *n += 1,
            _ => runs.push((s, 1)),
        }
    }
    runs
}

/// `statuses` is some `before`s then only `after`s: one switch, nothing in between.
fn assert_one_switch(statuses: &[u16], before: u16, after: u16) {
    let runs = compress(statuses);
    assert!(!statuses.contains(&503), "503 during the switch: {runs:?}");
    assert!(
        runs.len() == 2 && runs[0].0 == before && runs[1].0 == after,
        "expected {before}s then {after}s: {runs:?}"
    );
}

fn sync_of(gw: &TestGateway, service: &str) -> Arc<ServiceSync> {
    gw.state.services.load()[service]
        .sync
        .clone()
        .expect("a Consul service")
}

#[tokio::test]
async fn a_new_tag_route_answers_404_until_its_first_200_never_503() {
    new_route_switches_once(Mode::PerService).await;
}

#[tokio::test]
async fn a_new_tag_route_in_feed_mode_answers_404_until_its_first_200_never_503() {
    new_route_switches_once(Mode::Feed).await;
}

#[tokio::test]
async fn a_removed_tag_route_answers_200_until_its_first_404_never_503() {
    removed_route_switches_once(Mode::PerService).await;
}

#[tokio::test]
async fn a_removed_tag_route_in_feed_mode_answers_200_until_its_first_404_never_503() {
    removed_route_switches_once(Mode::Feed).await;
}

async fn new_route_switches_once(mode: Mode) {
    let consul = start_consul().await;
    let up = TestUpstream::builder().name("orders").start().await;
    let other = TestUpstream::builder().name("users").start().await;
    prepare(&consul, mode, &other);
    let gw = start(&config_for(&consul.url(), mode)).await;
    assert!(ready(&gw).await, "catalog synced");

    let mut stream = StatusStream::start(gw.url("/orders/1"));
    stream.more(3).await;
    // Hold the new service's first health answer: the catalog already declares its route,
    // but its pool cannot have endpoints yet. That window must answer 404, not 503.
    let hold = consul.hold_answers("/v1/health/service/orders");
    consul.register(orders(&up));
    tokio::time::timeout(LIMIT, consul.until_held(1))
        .await
        .expect("the gateway asks for the new service's health");
    stream.more(IN_WINDOW).await;
    hold.release();
    stream.past_first(200).await;
    let statuses = stream.finish().await;

    assert_one_switch(&statuses, 404, 200);
    let ok = statuses.iter().filter(|&&s| s == 200).count();
    assert_eq!(
        up.hits(),
        ok,
        "the upstream got exactly the requests answered 200"
    );
}

async fn removed_route_switches_once(mode: Mode) {
    let consul = start_consul().await;
    let up = TestUpstream::builder().name("orders").start().await;
    let other = TestUpstream::builder().name("users").start().await;
    prepare(&consul, mode, &other);
    consul.register(orders(&up));
    let gw = start(&config_for(&consul.url(), mode)).await;
    assert!(ready(&gw).await, "synced");
    let sync = sync_of(&gw, "orders");
    let hits_before = up.hits();

    let mut stream = StatusStream::start(gw.url("/orders/1"));
    stream.more(3).await;
    // Hold the catalog's answer: the service's health watch learns of the deregistration
    // first, as it often does (the catalog loop is rate-limited). Its empty answer must not
    // leave the route pointing at an empty pool.
    let hold = consul.hold_answers("/v1/catalog/services");
    let gone = consul.deregister("orders-1");
    assert!(
        eventually(LIMIT, || async {
            let s = sync.snapshot();
            s.last_index >= gone && s.instances == 0
        })
        .await,
        "the health watch saw the deregistration"
    );
    stream.more(IN_WINDOW).await;
    hold.release();
    stream.past_first(404).await;
    let statuses = stream.finish().await;

    assert_one_switch(&statuses, 200, 404);
    let ok = statuses.iter().filter(|&&s| s == 200).count();
    assert_eq!(
        up.hits() - hits_before,
        ok,
        "the upstream got exactly the requests answered 200"
    );
}

#[tokio::test]
async fn ready_waits_for_tag_services_whose_routes_wait_for_their_first_answer() {
    let consul = start_consul().await;
    let up = TestUpstream::builder().name("orders").start().await;
    consul.register(orders(&up));
    let hold = consul.hold_answers("/v1/health/service/orders");
    let gw = start(&gateway_config(&consul.url())).await;
    tokio::time::timeout(LIMIT, consul.until_held(1))
        .await
        .expect("the gateway asks for the service's health");

    let c = client();
    // Not ready, and the route is not there yet rather than there without endpoints.
    for _ in 0..IN_WINDOW {
        let ready = c.get(gw.admin_url("/ready")).send().await.unwrap();
        assert_eq!(ready.status(), 503, "ready before the service synced");
        let answer = c.get(gw.url("/orders/1")).send().await.unwrap();
        assert_eq!(
            answer.status(),
            404,
            "route published before its first answer"
        );
    }
    assert_eq!(up.hits(), 0);

    hold.release();
    assert!(ready(&gw).await, "ready once the service synced");
    // Ready means the route is published with its endpoints: no retry needed.
    let answer = c.get(gw.url("/orders/1")).send().await.unwrap();
    assert_eq!(answer.status(), 200);
    assert_eq!(up.hits(), 1);
}

#[tokio::test]
async fn a_tag_service_with_no_passing_instance_is_routed_and_answers_503() {
    let consul = start_consul().await;
    let up = TestUpstream::builder().name("orders").start().await;
    consul.register(orders(&up));
    consul.set_check("orders-1", "critical", "connection refused");
    let gw = start(&gateway_config(&consul.url())).await;
    assert!(ready(&gw).await, "an empty first answer is still an answer");
    let sync = sync_of(&gw, "orders");
    assert!(sync.registered() && sync.snapshot().instances == 0);
    // Registered with no healthy instance: the route exists and says so.
    let answer = client().get(gw.url("/orders/1")).send().await.unwrap();
    assert_eq!(answer.status(), 503);
    assert_eq!(up.hits(), 0);
}

#[tokio::test]
async fn a_tag_service_back_before_the_catalog_noticed_gets_its_route_back() {
    let consul = start_consul().await;
    let up = TestUpstream::builder().name("orders").start().await;
    consul.register(orders(&up));
    let gw = start(&gateway_config(&consul.url())).await;
    assert!(ready(&gw).await, "synced");
    let c = client();
    let status_is = |want: u16| {
        let c = c.clone();
        let url = gw.url("/orders/1");
        move || {
            let (c, url) = (c.clone(), url.clone());
            async move { c.get(url).send().await.unwrap().status() == want }
        }
    };
    assert!(eventually(LIMIT, status_is(200)).await);

    // The catalog never answers meanwhile, so only the service's own watch sees both steps.
    let hold = consul.hold_answers("/v1/catalog/services");
    consul.deregister("orders-1");
    assert!(
        eventually(LIMIT, status_is(404)).await,
        "gone with its service"
    );
    consul.register(orders(&up));
    assert!(
        eventually(LIMIT, status_is(200)).await,
        "back with its service"
    );
    hold.release();
    assert_eq!(
        c.get(gw.url("/orders/1")).send().await.unwrap().status(),
        200
    );
}

#[tokio::test]
async fn a_tag_route_keeps_its_last_pool_while_consul_fails() {
    let consul = start_consul().await;
    let up = TestUpstream::builder().name("orders").start().await;
    consul.register(orders(&up));
    let gw = start(&gateway_config(&consul.url())).await;
    assert!(ready(&gw).await, "synced");
    let sync = sync_of(&gw, "orders");

    let mut stream = StatusStream::start(gw.url("/orders/1"));
    stream.more(3).await;
    consul.stop().await;
    assert!(
        eventually(LIMIT, || async { sync.consecutive_errors() >= 1 }).await,
        "the health watch saw Consul fail"
    );
    stream.more(IN_WINDOW).await;
    let statuses = stream.finish().await;
    assert!(
        statuses.iter().all(|&s| s == 200),
        "{:?}",
        compress(&statuses)
    );
}
