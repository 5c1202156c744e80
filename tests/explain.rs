//! Admin `/explain` and `/config` end to end: every reason an endpoint takes no traffic, Consul
//! health included, and secrets kept out of the configuration view.

mod support;

use std::time::Duration;

use serde_json::Value;
use support::consul::{ConsulEmulator, EmulatorOptions, Registration};
use support::gateway::{client, eventually, start, TestGateway};
use support::upstream::TestUpstream;

const TOKEN: &str = "adm1n-s3cret";

async fn explain(gw: &TestGateway, url: &str) -> Value {
    let mut u = reqwest::Url::parse(&gw.admin_url("/explain")).unwrap();
    u.query_pairs_mut().append_pair("url", url);
    let resp = client().get(u).bearer_auth(TOKEN).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    resp.json().await.unwrap()
}

fn entry<'a>(list: &'a Value, addr: &str) -> Option<&'a Value> {
    list.as_array()
        .unwrap()
        .iter()
        .find(|e| e["address"] == addr)
}

#[tokio::test]
async fn explain_names_every_reason_an_endpoint_is_left_out() {
    let weight0 = TestUpstream::builder()
        .name("a")
        .route("/health", 200, "ok")
        .start()
        .await;
    let unhealthy = TestUpstream::builder()
        .name("b")
        .route("/health", 500, "sick")
        .start()
        .await;
    let good = TestUpstream::builder()
        .name("d")
        .route("/health", 200, "ok")
        .start()
        .await;
    // Passive ejection on a route of its own: a passing probe would end an ejection early.
    let failing = TestUpstream::builder()
        .name("c")
        .route("/y", 502, "bad gateway")
        .start()
        .await;
    let other = TestUpstream::builder().name("e").start().await;
    let toml = format!(
        r#"
        admin_token = "{TOKEN}"
        [[routes]]
        name = "mixed"
        path = "/x"
        targets = [{{ url = "{a}", weight = 0 }}, "{b}", "{d}"]
        path_rewrite = [{{ strip_prefix = "/x" }}]
        slow_start = "10m"
        health_check = {{ path = "/health", interval = "50ms", timeout = "1s", unhealthy_threshold = 1, healthy_threshold = 1, jitter = "0s" }}
        [[routes]]
        name = "outlier"
        path = "/o"
        targets = ["{c}", "{e}"]
        path_rewrite = [{{ strip_prefix = "/o" }}]
        outlier = {{ consecutive_gateway_failures = 1, base_ejection_time = "60s" }}
        "#,
        a = weight0.url(),
        b = unhealthy.url(),
        c = failing.url(),
        d = good.url(),
        e = other.url(),
    );
    let gw = start(&toml).await;
    let c = client();
    // Probes mark the sick endpoint; traffic gets the 502 one ejected (its retry succeeds).
    let settled = eventually(Duration::from_secs(10), || async {
        let _ = c.get(gw.url("/o/y")).send().await;
        let x = explain(&gw, "/x/y").await;
        let o = explain(&gw, "/o/y").await;
        entry(&x["excluded"], &unhealthy.addr().to_string()).is_some()
            && entry(&o["excluded"], &failing.addr().to_string()).is_some()
    })
    .await;
    assert!(settled, "{:#}", explain(&gw, "/x/y").await);

    // Dot segments are removed before matching, as for real requests.
    let doc = explain(&gw, "/other/../x/y?z=1").await;
    assert_eq!(doc["request"]["normalised_path"], "/x/y");
    assert_eq!(doc["request"]["query"], "z=1");
    assert_eq!(doc["route"]["name"], "mixed");
    assert_eq!(doc["route"]["path"], "/x");
    assert_eq!(doc["route"]["upstream_path"], "/y");
    assert_eq!(doc["pool"]["endpoints"], 3);
    let reasons = |doc: &Value, addr: std::net::SocketAddr| -> Vec<String> {
        entry(&doc["excluded"], &addr.to_string())
            .unwrap_or_else(|| panic!("{addr} not excluded: {doc:#}"))["reasons"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r.as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(reasons(&doc, weight0.addr()), ["weight 0"]);
    assert_eq!(
        reasons(&doc, unhealthy.addr()),
        ["failed active health checks"]
    );
    let cands = &doc["candidates"];
    assert_eq!(cands.as_array().unwrap().len(), 1, "{doc:#}");
    let d = entry(cands, &good.addr().to_string()).unwrap();
    let share = d["share"].as_f64().unwrap();
    assert!(share > 0.0 && share < 0.5, "slow start share {share}");
    assert!(
        d["notes"][0].as_str().unwrap().starts_with("slow start: "),
        "{d:#}"
    );
    assert!(doc["outcome"]
        .as_str()
        .unwrap()
        .starts_with("forwarded to one of 1 endpoint"));

    let doc = explain(&gw, "/o/y").await;
    let ejected = reasons(&doc, failing.addr());
    assert_eq!(ejected.len(), 1, "{ejected:?}");
    assert!(
        ejected[0].starts_with("ejected after consecutive failures (")
            && ejected[0].contains("s left, ejection #1)"),
        "{ejected:?}"
    );
    assert!(entry(&doc["candidates"], &other.addr().to_string()).is_some());

    // No route: said so, with the answer it gets.
    let none = explain(&gw, "http://example.com/elsewhere").await;
    assert_eq!(none["route"], Value::Null);
    assert!(
        none["outcome"].as_str().unwrap().contains("404"),
        "{none:#}"
    );
    gw.stop().await;
}

#[tokio::test]
async fn explain_shows_consul_health() {
    let consul = ConsulEmulator::start_with(EmulatorOptions {
        jitter: false,
        ..EmulatorOptions::default()
    })
    .await;
    let ups: Vec<TestUpstream> =
        futures_util::future::join_all((0..4).map(|_| TestUpstream::builder().start())).await;
    let reg = |id: &str, up: &TestUpstream| {
        Registration::new(id, "web", "127.0.0.1", up.addr().port()).weights(10, 2)
    };
    consul.register(reg("web-pass", &ups[0]));
    consul.register(reg("web-warn", &ups[1]));
    consul.register(
        Registration::new("web-warn0", "web", "127.0.0.1", ups[2].addr().port()).weights(10, 0),
    );
    consul.register(reg("web-crit", &ups[3]));
    consul.set_check("web-warn", "warning", "slow disk");
    consul.set_check("web-warn0", "warning", "slow disk");
    consul.set_check("web-crit", "critical", "down");
    let gw = start(&format!(
        r#"
        admin_token = "{TOKEN}"
        [discovery]
        provider = "consul"
        [discovery.consul]
        address = "{}"
        wait = "2s"
        startup_timeout = "5s"
        [[routes]]
        name = "web"
        path = "/web"
        service = "web"
        "#,
        consul.url()
    ))
    .await;
    let pool = gw.pool("web");
    assert!(
        eventually(Duration::from_secs(5), || async {
            pool.snapshot().len() == 3
        })
        .await,
        "passing and both warning instances are in the pool"
    );

    let doc = explain(&gw, "/web/z").await;
    let cands = &doc["candidates"];
    let pass = entry(cands, &ups[0].addr().to_string()).unwrap();
    assert_eq!(
        (pass["status"].as_str(), pass["weight"].as_u64()),
        (Some("passing"), Some(10))
    );
    let warn = entry(cands, &ups[1].addr().to_string()).unwrap();
    assert_eq!(
        (warn["status"].as_str(), warn["weight"].as_u64()),
        (Some("warning"), Some(2))
    );
    assert!(
        warn["notes"][0]
            .as_str()
            .unwrap()
            .contains("warning weight"),
        "{warn:#}"
    );

    let warn0 = entry(&doc["excluded"], &ups[2].addr().to_string()).unwrap();
    assert_eq!(warn0["status"], "warning");
    assert!(
        warn0["reasons"][0]
            .as_str()
            .unwrap()
            .contains("warning weight is 0"),
        "{warn0:#}"
    );

    let gone = &doc["not_in_pool"];
    assert_eq!(gone.as_array().unwrap().len(), 1, "{doc:#}");
    assert_eq!(gone[0]["status"], "critical");
    assert_eq!(gone[0]["reason"], "Consul health check critical");
    assert_eq!(gone[0]["address"], ups[3].addr().to_string());
    assert!(gone[0]["id"].as_str().unwrap().ends_with("/web-crit"));
    gw.stop().await;
}

#[tokio::test]
async fn config_is_shown_with_secrets_redacted_and_both_views_need_the_token() {
    let up = TestUpstream::builder().start().await;
    let consul = ConsulEmulator::start_with(EmulatorOptions {
        jitter: false,
        ..EmulatorOptions::default()
    })
    .await;
    let gw = start(&format!(
        r#"
        admin_token = "{TOKEN}"
        [discovery]
        provider = "consul"
        [discovery.consul]
        address = "{consul}"
        token = "c0nsul-s3cret"
        startup_timeout = "1s"
        [discovery.static.services]
        api = ["{up}"]
        [[routes]]
        name = "api"
        path = "/api"
        service = "api"
        request_headers = {{ set = {{ Authorization = "Bearer upstr3am-s3cret", X-Team = "edge" }} }}
        "#,
        consul = consul.url(),
        up = up.url()
    ))
    .await;
    let c = client();
    for path in ["/config", "/explain?url=/api"] {
        let resp = c.get(gw.admin_url(path)).send().await.unwrap();
        assert_eq!(resp.status(), 401, "{path} needs the token");
    }
    let resp = c
        .get(gw.admin_url("/config"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let text = resp.text().await.unwrap();
    for secret in [TOKEN, "c0nsul-s3cret", "upstr3am-s3cret"] {
        assert!(!text.contains(secret), "{secret} leaked: {text}");
    }
    let doc: Value = serde_json::from_str(&text).unwrap();
    let cfg = &doc["config"];
    assert_eq!(cfg["admin_token"], "<redacted>");
    assert_eq!(cfg["discovery"]["consul"]["token"], "<redacted>");
    assert_eq!(cfg["discovery"]["consul"]["address"], consul.url());
    let set = &cfg["routes"][0]["request_headers"]["set"];
    assert_eq!(set["Authorization"], "<redacted>");
    assert_eq!(set["X-Team"], "edge", "ordinary values stay");
    assert_eq!(cfg["routes"][0]["path"], "/api");
    assert_eq!(doc["resolved"]["consul"]["token"], "<redacted>");
    assert_eq!(doc["resolved"]["admin_token"], "<redacted>");
    assert_eq!(doc["resolved"]["tracing"]["enabled"], false);
    assert_eq!(doc["resolved"]["tracing"]["service_name"], "meshgate");
    gw.stop().await;
}
