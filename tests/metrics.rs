//! `/metrics` parsed with a Prometheus text parser after known traffic.

mod support;

use prometheus_parse::{Sample, Scrape, Value};
use support::gateway::{client, start};
use support::upstream::TestUpstream;

fn find<'a>(scrape: &'a Scrape, name: &str, labels: &[(&str, &str)]) -> Option<&'a Sample> {
    scrape
        .samples
        .iter()
        .find(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
}

fn value(scrape: &Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    match find(scrape, name, labels).map(|s| &s.value) {
        Some(Value::Counter(v)) | Some(Value::Gauge(v)) | Some(Value::Untyped(v)) => *v,
        other => panic!("{name} {labels:?}: {other:?}"),
    }
}

#[tokio::test]
async fn metrics_reflect_known_traffic() {
    let up = TestUpstream::builder()
        .route("/api/fail", 500, "no")
        .start()
        .await;
    let gw = start(&format!(
        r#"
        [[routes]]
        name = "api"
        path = "/api"
        targets = ["{}"]
        retry = {{ attempts = 1 }}
        "#,
        up.url()
    ))
    .await;
    let c = client();
    for _ in 0..5 {
        assert_eq!(c.get(gw.url("/api/ok")).send().await.unwrap().status(), 200);
    }
    for _ in 0..2 {
        c.post(gw.url("/api/ok")).body("x").send().await.unwrap();
    }
    assert_eq!(
        c.get(gw.url("/api/fail")).send().await.unwrap().status(),
        500
    );
    assert_eq!(
        c.get(gw.url("/nowhere")).send().await.unwrap().status(),
        404
    );

    let resp = c.get(gw.admin_url("/metrics")).send().await.unwrap();
    assert!(resp.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain"));
    let text = resp.text().await.unwrap();
    let scrape = Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).unwrap();

    let api = [("route", "api"), ("service", "api")];
    assert_eq!(
        value(
            &scrape,
            "meshgate_requests_total",
            &[api[0], api[1], ("method", "GET"), ("class", "2xx")]
        ),
        5.0
    );
    assert_eq!(
        value(
            &scrape,
            "meshgate_requests_total",
            &[api[0], ("method", "POST"), ("class", "2xx")]
        ),
        2.0
    );
    assert_eq!(
        value(
            &scrape,
            "meshgate_requests_total",
            &[api[0], ("method", "GET"), ("class", "5xx")]
        ),
        1.0
    );
    assert_eq!(value(&scrape, "meshgate_no_route_total", &[]), 1.0);
    let endpoint = up.addr().to_string();
    let ep = [("service", "api"), ("endpoint", endpoint.as_str())];
    assert_eq!(
        value(
            &scrape,
            "meshgate_upstream_requests_total",
            &[ep[0], ep[1], ("class", "2xx")]
        ),
        7.0
    );
    assert_eq!(
        value(
            &scrape,
            "meshgate_upstream_requests_total",
            &[ep[0], ep[1], ("class", "5xx")]
        ),
        1.0
    );
    assert_eq!(value(&scrape, "meshgate_endpoint_healthy", &ep), 1.0);
    assert_eq!(value(&scrape, "meshgate_endpoint_in_flight", &ep), 0.0);
    assert_eq!(
        value(&scrape, "meshgate_pool_endpoints", &[("service", "api")]),
        1.0
    );
    assert_eq!(
        value(
            &scrape,
            "meshgate_pool_endpoints_available",
            &[("service", "api")]
        ),
        1.0
    );
    assert_eq!(value(&scrape, "meshgate_retries_total", &api), 0.0);
    // The scrape itself is in flight on the admin listener, not the proxy.
    assert_eq!(value(&scrape, "meshgate_requests_in_flight", &[]), 0.0);
    assert!(value(&scrape, "process_resident_memory_bytes", &[]) > 1e6);
    assert!(value(&scrape, "meshgate_connections_accepted_total", &[]) >= 1.0);
    // At least the accept loops and the connection serving this scrape are alive.
    assert!(value(&scrape, "meshgate_runtime_alive_tasks", &[]) >= 2.0);

    // The whole-request histogram counted all 8 routed requests.
    match &find(&scrape, "meshgate_request_duration_seconds", &api)
        .unwrap()
        .value
    {
        Value::Histogram(buckets) => {
            let inf = buckets.iter().find(|b| b.less_than.is_infinite()).unwrap();
            assert_eq!(inf.count, 8.0);
            assert!(
                buckets.windows(2).all(|w| w[0].count <= w[1].count),
                "cumulative"
            );
        }
        other => panic!("not a histogram: {other:?}"),
    }
    // No raw paths as labels.
    assert!(!text.contains("/api/ok"), "paths must not become labels");
}

#[tokio::test]
async fn metrics_can_be_turned_off() {
    let up = TestUpstream::builder().start().await;
    let gw = start(&format!(
        r#"
        [metrics]
        enabled = false
        [[routes]]
        name = "api"
        path = "/api"
        targets = ["{}"]
        "#,
        up.url()
    ))
    .await;
    let c = client();
    for _ in 0..3 {
        assert_eq!(c.get(gw.url("/api/ok")).send().await.unwrap().status(), 200);
    }
    let text = c
        .get(gw.admin_url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let scrape = Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).unwrap();
    assert!(
        find(&scrape, "meshgate_requests_total", &[("route", "api")]).is_none(),
        "nothing recorded per request"
    );
    // Gauges read from live state still answer, and /health keeps its own counters.
    assert_eq!(
        value(&scrape, "meshgate_pool_endpoints", &[("service", "api")]),
        1.0
    );
    let health: serde_json::Value = c
        .get(gw.admin_url("/health"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(health["routes"][0]["requests"], 3);
}
