//! Consul discovery end to end: the real gateway, the Consul API emulator and real upstreams.

mod support;

use std::collections::HashMap;
use std::time::Duration;

use support::consul::{AclConfig, ConsulEmulator, EmulatorOptions, Registration, TokenScope};
use support::gateway::{client, eventually, start, TestGateway};
use support::upstream::TestUpstream;

fn emulator_options() -> EmulatorOptions {
    EmulatorOptions {
        jitter: false,
        ..EmulatorOptions::default()
    }
}

fn config(consul: &str, extra_consul: &str, routes: &str) -> String {
    format!(
        r#"
        [discovery]
        provider = "consul"
        [discovery.consul]
        address = "{consul}"
        wait = "2s"
        startup_timeout = "5s"
        {extra_consul}
        {routes}
        "#
    )
}

fn web_route(policy: &str) -> String {
    format!(
        r#"
        [[routes]]
        name = "web"
        path = "/web"
        service = "web"
        load_balancer = "{policy}"
        "#
    )
}

fn reg(id: &str, up: &TestUpstream) -> Registration {
    Registration::new(id, "web", "127.0.0.1", up.addr().port())
}

/// Sends `n` requests and counts which upstream (by name) answered.
async fn tally(gw: &TestGateway, n: usize) -> HashMap<String, usize> {
    let c = client();
    let mut out = HashMap::new();
    for _ in 0..n {
        let resp = c.get(gw.url("/web/x")).send().await.unwrap();
        assert_eq!(resp.status(), 200);
        *out.entry(resp.text().await.unwrap()).or_insert(0) += 1;
    }
    out
}

/// The `/status` entry of one service.
async fn service_status(gw: &TestGateway, name: &str) -> serde_json::Value {
    let s: serde_json::Value = client()
        .get(gw.admin_url("/status"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    s["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == name)
        .cloned()
        .unwrap_or_default()
}

async fn pool_len(gw: &TestGateway, service: &str, n: usize) -> bool {
    let pool = gw.pool(service);
    eventually(Duration::from_secs(5), || async {
        pool.snapshot().len() == n
    })
    .await
}

#[tokio::test]
async fn instances_come_and_go_with_consul() {
    let consul = ConsulEmulator::start_with(emulator_options()).await;
    let a = TestUpstream::builder().name("a").start().await;
    let b = TestUpstream::builder().name("b").start().await;
    consul.register(reg("web-a", &a));
    consul.register(reg("web-b", &b));
    let gw = start(&config(&consul.url(), "", &web_route("round_robin"))).await;
    assert!(pool_len(&gw, "web", 2).await);
    let t = tally(&gw, 20).await;
    assert_eq!((t["a"], t["b"]), (10, 10), "both instances get traffic");

    // Deregistered: not one more request reaches it.
    consul.deregister("web-a");
    assert!(pool_len(&gw, "web", 1).await);
    let before = a.hits();
    let t = tally(&gw, 20).await;
    assert_eq!(t.get("a"), None);
    assert_eq!(a.hits(), before);

    // The first query had no index; later ones sent index and wait.
    let reqs = consul.requests_to("/v1/health/service/web");
    assert!(reqs[0].index().is_none(), "first query has no index");
    assert!(
        !reqs[0].has_query("passing"),
        "warning instances must stay visible"
    );
    let blocking: Vec<_> = reqs.iter().filter(|r| r.index().is_some()).collect();
    assert!(!blocking.is_empty());
    assert!(blocking
        .iter()
        .all(|r| r.index() != Some(0) && r.wait() == Some(Duration::from_secs(2))));

    // /status shows the Consul sync state.
    let web = service_status(&gw, "web").await;
    assert_eq!(web["source"], "consul");
    assert_eq!(web["discovery"]["synced_once"], true);
    assert!(web["discovery"]["staleness_seconds"].as_f64().unwrap() < 5.0);
}

#[tokio::test]
async fn warning_uses_warning_weight_and_critical_or_maintenance_exclude() {
    let consul = ConsulEmulator::start_with(emulator_options()).await;
    let a = TestUpstream::builder().name("a").start().await;
    let b = TestUpstream::builder().name("b").start().await;
    consul.register(reg("web-a", &a).weights(10, 1));
    consul.register(reg("web-b", &b).weights(10, 1));
    let gw = start(&config(
        &consul.url(),
        "",
        &web_route("weighted_round_robin"),
    ))
    .await;
    assert!(pool_len(&gw, "web", 2).await);
    let pool = gw.pool("web");

    consul.set_check("web-a", "warning", "slow disk");
    assert!(
        eventually(Duration::from_secs(5), || async {
            pool.snapshot().list().iter().any(|e| e.weight() == 1)
        })
        .await
    );
    // Weights 1 (warning) and 10 (passing): exactly 10 to 100 over ten full cycles.
    let t = tally(&gw, 110).await;
    assert_eq!((t["a"], t["b"]), (10, 100));

    consul.set_check("web-a", "critical", "down");
    assert!(pool_len(&gw, "web", 1).await);
    let t = tally(&gw, 10).await;
    assert_eq!(t.get("a"), None);

    consul.set_check("web-a", "passing", "");
    assert!(pool_len(&gw, "web", 2).await);
    consul.set_maintenance("web-b", true, "upgrade");
    assert!(pool_len(&gw, "web", 1).await);
    let t = tally(&gw, 10).await;
    assert_eq!(t.get("b"), None, "maintenance excludes");

    // Everything gone: an explicit empty answer empties the pool (503).
    consul.set_maintenance("web-a", true, "upgrade");
    assert!(pool_len(&gw, "web", 0).await);
    assert_eq!(
        client()
            .get(gw.url("/web/x"))
            .send()
            .await
            .unwrap()
            .status(),
        503
    );
}

#[tokio::test]
async fn index_reset_recovers_without_waiting_out_the_wait() {
    let consul = ConsulEmulator::start_with(emulator_options()).await;
    let a = TestUpstream::builder().name("a").start().await;
    let b = TestUpstream::builder().name("b").start().await;
    consul.register(reg("web-a", &a));
    let gw = start(
        &config(&consul.url(), "", &web_route("round_robin"))
            .replace("wait = \"2s\"", "wait = \"30s\""),
    )
    .await;
    assert!(pool_len(&gw, "web", 1).await);
    consul.until_blocked(1).await;
    // A snapshot restore: indexes go backwards, then a change lands at a lower index.
    consul.restore_snapshot(5);
    consul.register(reg("web-b", &b));
    let started = tokio::time::Instant::now();
    assert!(pool_len(&gw, "web", 2).await, "the new instance shows up");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "well before the 30 s wait ran out"
    );
}

#[tokio::test]
async fn consul_down_for_10s_under_load_fails_no_request() {
    let consul = ConsulEmulator::start_with(emulator_options()).await;
    let a = TestUpstream::builder().name("a").start().await;
    let b = TestUpstream::builder().name("b").start().await;
    let c_up = TestUpstream::builder().name("c").start().await;
    consul.register(reg("web-a", &a));
    consul.register(reg("web-b", &b));
    let gw = start(&config(&consul.url(), "", &web_route("round_robin"))).await;
    assert!(pool_len(&gw, "web", 2).await);
    let pool = gw.pool("web");
    let revision = pool.revision();

    consul.stop().await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let c = client();
    let mut sent = 0;
    while tokio::time::Instant::now() < deadline {
        let resp = c.get(gw.url("/web/x")).send().await.unwrap();
        assert_eq!(
            resp.status(),
            200,
            "request {sent} failed while Consul was down"
        );
        sent += 1;
    }
    assert!(sent > 100, "steady load: {sent}");
    assert_eq!(pool.revision(), revision, "the pool did not change");
    assert_eq!(pool.snapshot().len(), 2);
    // /status says the service is stale and why.
    let web = service_status(&gw, "web").await;
    assert!(
        web["discovery"]["consecutive_errors"].as_u64().unwrap() >= 1,
        "{web}"
    );
    assert!(
        web["discovery"]["staleness_seconds"].as_f64().unwrap() >= 9.0,
        "{web}"
    );

    // Back up: updates flow again.
    consul.restart().await;
    consul.register(reg("web-c", &c_up));
    let pool2 = pool.clone();
    assert!(
        eventually(Duration::from_secs(20), || async {
            pool2.snapshot().len() == 3
        })
        .await
    );
    let t = tally(&gw, 30).await;
    assert_eq!(t.get("c"), Some(&10));
}

#[tokio::test]
async fn token_is_sent_and_a_bad_one_shows_in_status() {
    let acl = AclConfig::new().token("good", TokenScope::All);
    let consul = ConsulEmulator::start_with(EmulatorOptions {
        acl: Some(acl),
        ..emulator_options()
    })
    .await;
    let a = TestUpstream::builder().name("a").start().await;
    consul.register(reg("web-a", &a));
    let gw = start(&config(
        &consul.url(),
        r#"token = "good""#,
        &web_route("round_robin"),
    ))
    .await;
    assert!(pool_len(&gw, "web", 1).await);
    let reqs = consul.requests_to("/v1/health/service/web");
    assert!(reqs.iter().all(|r| r
        .headers
        .get("x-consul-token")
        .map(|v| v == "good")
        .unwrap_or(false)));

    let bad = start(&config(
        &consul.url(),
        r#"token = "typo""#,
        &web_route("round_robin"),
    ))
    .await;
    let c = client();
    let seen = eventually(Duration::from_secs(5), || async {
        service_status(&bad, "web").await["discovery"]["acl_denied"] == true
    })
    .await;
    let web = service_status(&bad, "web").await;
    assert!(seen, "{web}");
    assert!(
        web["discovery"]["last_error"]
            .as_str()
            .unwrap()
            .contains("ACL not found"),
        "{web}"
    );
    assert_eq!(c.get(bad.url("/web/x")).send().await.unwrap().status(), 503);
}

#[tokio::test]
async fn ready_waits_for_the_first_sync() {
    let consul = ConsulEmulator::start_with(emulator_options()).await;
    consul.set_latency(Duration::from_millis(700));
    let a = TestUpstream::builder().name("a").start().await;
    consul.register(reg("web-a", &a));
    let gw = start(&config(&consul.url(), "", &web_route("round_robin"))).await;
    let c = client();
    assert_eq!(
        c.get(gw.admin_url("/ready")).send().await.unwrap().status(),
        503,
        "not synced yet"
    );
    assert!(
        eventually(Duration::from_secs(5), || {
            let c = c.clone();
            let url = gw.admin_url("/ready");
            async move { c.get(url).send().await.unwrap().status() == 200 }
        })
        .await
    );
    assert_eq!(gw.pool("web").snapshot().len(), 1, "ready means synced");
}

#[tokio::test]
async fn routes_from_tags_appear_and_disappear() {
    let consul = ConsulEmulator::start_with(emulator_options()).await;
    let a = TestUpstream::builder().name("orders").start().await;
    let b = TestUpstream::builder().name("legacy").start().await;
    let gw = start(&config(&consul.url(), "routes_from_tags = true", "")).await;
    let c = client();
    assert_eq!(
        c.get(gw.url("/api/v1/orders/1"))
            .send()
            .await
            .unwrap()
            .status(),
        404
    );

    consul.register(
        Registration::new("orders-1", "orders", "127.0.0.1", a.addr().port()).tags([
            "meshgate.route=/api/v1/orders",
            "meshgate.strip=/api/v1",
            "meshgate.lb=least_connections",
        ]),
    );
    consul.register(
        Registration::new("legacy-1", "legacy", "127.0.0.1", b.addr().port())
            .tags(["urlprefix-/legacy strip=/legacy"]),
    );
    assert!(
        eventually(Duration::from_secs(5), || {
            let c = c.clone();
            let url = gw.url("/api/v1/orders/1");
            async move { c.get(url).send().await.unwrap().status() == 200 }
        })
        .await
    );
    assert_eq!(
        a.last_request().unwrap().uri,
        "/orders/1",
        "meshgate.strip applied"
    );
    assert!(
        eventually(Duration::from_secs(5), || {
            let c = c.clone();
            let url = gw.url("/legacy/x");
            async move { c.get(url).send().await.unwrap().status() == 200 }
        })
        .await
    );
    assert_eq!(b.last_request().unwrap().uri, "/x", "fabio's strip applied");
    let s: serde_json::Value = c
        .get(gw.admin_url("/status"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let orders = s["routes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["path"] == "/api/v1/orders")
        .unwrap();
    assert_eq!(orders["load_balancer"], "least_connections");

    consul.deregister("orders-1");
    assert!(
        eventually(Duration::from_secs(5), || {
            let c = c.clone();
            let url = gw.url("/api/v1/orders/1");
            async move { c.get(url).send().await.unwrap().status() == 404 }
        })
        .await,
        "the route goes with its service"
    );
}

#[tokio::test]
async fn config_routes_win_over_tag_routes_and_the_conflict_is_reported() {
    let consul = ConsulEmulator::start_with(emulator_options()).await;
    let a = TestUpstream::builder().name("configured").start().await;
    let b = TestUpstream::builder().name("tagged").start().await;
    let routes = format!(
        r#"
        [discovery.static.services]
        fixed = ["{}"]
        [[routes]]
        name = "fixed"
        path = "/shop"
        service = "fixed"
        "#,
        a.url()
    );
    let gw = start(&config(&consul.url(), "routes_from_tags = true", &routes)).await;
    consul.register(
        Registration::new("shop-1", "shop", "127.0.0.1", b.addr().port())
            .tags(["meshgate.route=/shop"]),
    );
    let c = client();
    let found = eventually(Duration::from_secs(5), || {
        let c = c.clone();
        let url = gw.admin_url("/status");
        async move {
            let s: serde_json::Value = c.get(url).send().await.unwrap().json().await.unwrap();
            s["notes"]
                .as_array()
                .unwrap()
                .iter()
                .any(|n| n.as_str().unwrap().contains("conflicts"))
        }
    })
    .await;
    assert!(found);
    let body = c
        .get(gw.url("/shop/x"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(body, "configured");
}

#[tokio::test]
async fn a_thousand_services_stay_under_the_connection_limit_and_idle_cheaply() {
    let consul = ConsulEmulator::start_with(emulator_options()).await;
    let up = TestUpstream::builder().name("svc").start().await;
    let mut routes = String::new();
    for i in 0..1000 {
        consul.register(Registration::new(
            format!("s{i}-1"),
            format!("s{i}"),
            "127.0.0.1",
            up.addr().port(),
        ));
        routes.push_str(&format!(
            "[[routes]]\nname = \"r{i}\"\npath = \"/s{i}\"\nservice = \"s{i}\"\n"
        ));
    }
    let gw = start(
        &config(&consul.url(), "", &routes)
            .replace("startup_timeout = \"5s\"", "startup_timeout = \"20s\""),
    )
    .await;
    let c = client();
    assert!(
        eventually(Duration::from_secs(20), || {
            let c = c.clone();
            let url = gw.admin_url("/ready");
            async move { c.get(url).send().await.unwrap().status() == 200 }
        })
        .await,
        "all 1,000 services synced"
    );
    assert_eq!(c.get(gw.url("/s999/x")).send().await.unwrap().status(), 200);
    assert!(
        consul.open_connections() < 200,
        "{} connections",
        consul.open_connections()
    );
    assert!(
        consul
            .requests()
            .iter()
            .all(|r| r.path != "/v1/status/leader"),
        "sanity: only discovery traffic"
    );
    // Idle cost: over a few waits, about one request per service per wait at most.
    let before = consul.requests().len();
    let window = Duration::from_secs(6);
    tokio::time::sleep(window).await; // measuring a rate over a fixed window, not synchronising
    let made = consul.requests().len() - before;
    let per_service_per_wait = made as f64 / 1000.0 / (window.as_secs_f64() / 2.0);
    assert!(
        per_service_per_wait <= 1.2,
        "{made} requests in {window:?}: {per_service_per_wait:.2} per service per wait"
    );
}

#[tokio::test]
async fn filter_selects_instances_and_a_bad_one_is_reported_not_retried() {
    let consul = ConsulEmulator::start_with(emulator_options()).await;
    let a = TestUpstream::builder().name("a").start().await;
    let b = TestUpstream::builder().name("b").start().await;
    consul.register(reg("web-a", &a).meta("version", "v1"));
    consul.register(reg("web-b", &b).meta("version", "v2"));
    let gw = start(&config(
        &consul.url(),
        r#"filter = 'Service.Meta.version == "v2"'"#,
        &web_route("round_robin"),
    ))
    .await;
    assert!(pool_len(&gw, "web", 1).await);
    let t = tally(&gw, 10).await;
    assert_eq!((t.get("a"), t.get("b")), (None, Some(&10)), "{t:?}");
    let reqs = consul.requests_to("/v1/health/service/web");
    assert!(
        reqs.iter()
            .all(|r| r.query_value("filter") == Some(r#"Service.Meta.version == "v2""#)),
        "every read carries the filter as a query parameter"
    );
    // A change Consul's filter lets through reaches the pool like any other.
    consul.register(reg("web-a", &a).meta("version", "v2"));
    assert!(pool_len(&gw, "web", 2).await);

    // Consul refuses a filter with a 500 naming its evaluator: a configuration error.
    let bad = start(&config(
        &consul.url(),
        r#"filter = 'Service.Meta.version =='"#,
        &web_route("round_robin"),
    ))
    .await;
    let seen = eventually(Duration::from_secs(5), || async {
        service_status(&bad, "web").await["discovery"]["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("Failed to create boolean expression evaluator"))
    })
    .await;
    let web = service_status(&bad, "web").await;
    assert!(seen, "{web}");
    assert!(
        web["discovery"]["last_error"]
            .as_str()
            .unwrap()
            .contains("discovery.consul.filter"),
        "{web}"
    );
    assert_eq!(
        client()
            .get(bad.url("/web/x"))
            .send()
            .await
            .unwrap()
            .status(),
        503
    );
    let refused = |consul: &ConsulEmulator| {
        consul
            .requests_to("/v1/health/service/web")
            .iter()
            .filter(|r| r.query_value("filter") == Some("Service.Meta.version =="))
            .count()
    };
    // An observation window, not synchronisation: a transient error would have been retried
    // within the first backoff (0.5 s) several times over.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(refused(&consul), 1, "the refused filter is not asked again");
}
