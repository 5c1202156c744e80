//! CORS preflight and simple requests, and the admin endpoints on both listeners.

mod support;

use support::gateway::{client, start};
use support::upstream::TestUpstream;

fn config(up: &str, cors: &str) -> String {
    format!(
        r#"
        {cors}
        [[routes]]
        name = "api"
        path = "/api"
        targets = ["{up}"]
        "#
    )
}

const CORS: &str = r#"
[cors]
allowed_origins = ["https://app.example.com"]
allowed_methods = ["GET", "POST"]
allowed_headers = ["Content-Type", "Authorization"]
allow_credentials = true
max_age = "10m"
"#;

#[tokio::test]
async fn preflight_is_answered_by_the_gateway() {
    let up = TestUpstream::builder().start().await;
    let gw = start(&config(&up.url(), CORS)).await;
    let resp = client()
        .request(reqwest::Method::OPTIONS, gw.url("/api/x"))
        .header("Origin", "https://app.example.com")
        .header("Access-Control-Request-Method", "POST")
        .header("Access-Control-Request-Headers", "content-type")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 204);
    let h = resp.headers();
    assert_eq!(h["access-control-allow-origin"], "https://app.example.com");
    assert_eq!(h["access-control-allow-methods"], "GET, POST");
    assert_eq!(
        h["access-control-allow-headers"],
        "Content-Type, Authorization"
    );
    assert_eq!(h["access-control-allow-credentials"], "true");
    assert_eq!(h["access-control-max-age"], "600");
    assert_eq!(h["vary"], "Origin");
    assert_eq!(up.hits(), 0, "preflights never reach the upstream");

    // Another origin: answered, but without any allowance.
    let resp = client()
        .request(reqwest::Method::OPTIONS, gw.url("/api/x"))
        .header("Origin", "https://evil.example.com")
        .header("Access-Control-Request-Method", "POST")
        .send()
        .await
        .unwrap();
    assert!(!resp.headers().contains_key("access-control-allow-origin"));
    assert!(!resp.headers().contains_key("access-control-allow-methods"));
}

#[tokio::test]
async fn simple_requests_get_cors_headers_for_allowed_origins_only() {
    let up = TestUpstream::builder().start().await;
    let gw = start(&config(&up.url(), CORS)).await;
    let resp = client()
        .get(gw.url("/api/x"))
        .header("Origin", "https://app.example.com")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers()["access-control-allow-origin"],
        "https://app.example.com"
    );
    assert_eq!(resp.headers()["vary"], "Origin");
    // The upstream saw the Origin header (CORS is the gateway's answer, not a filter).
    assert_eq!(
        up.last_request().unwrap().headers["origin"],
        "https://app.example.com"
    );
    let resp = client()
        .get(gw.url("/api/x"))
        .header("Origin", "https://evil.example.com")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(!resp.headers().contains_key("access-control-allow-origin"));
    // A plain OPTIONS (not a preflight) is proxied.
    let resp = client()
        .request(reqwest::Method::OPTIONS, gw.url("/api/x"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(up.hits(), 3);
}

#[tokio::test]
async fn no_cors_section_means_no_cors_headers() {
    let up = TestUpstream::builder().start().await;
    let gw = start(&config(&up.url(), "")).await;
    let resp = client()
        .get(gw.url("/api/x"))
        .header("Origin", "https://app.example.com")
        .send()
        .await
        .unwrap();
    assert!(!resp.headers().contains_key("access-control-allow-origin"));
    assert!(!resp.headers().contains_key("vary"));
}

#[tokio::test]
async fn health_counts_requests_and_failures_per_route_and_endpoint() {
    let up = TestUpstream::builder()
        .route("/api/fail", 500, "boom")
        .start()
        .await;
    let gw = start(&config(&up.url(), "")).await;
    let c = client();
    for _ in 0..3 {
        c.get(gw.url("/api/ok")).send().await.unwrap();
    }
    c.get(gw.url("/api/fail")).send().await.unwrap();
    for url in [gw.url("/health"), gw.admin_url("/health")] {
        let h: serde_json::Value = c.get(&url).send().await.unwrap().json().await.unwrap();
        assert_eq!(h["status"], "healthy");
        let route = &h["routes"][0];
        assert_eq!(route["name"], "api");
        assert_eq!(route["requests"], 4);
        assert_eq!(route["failures"], 1);
        assert_eq!(route["success_rate"], 0.75);
        let ep = &h["services"][0]["endpoints"][0];
        assert_eq!(ep["address"], up.addr().to_string().as_str());
        assert_eq!(ep["requests"], 4);
        assert_eq!(ep["failures"], 1);
        assert_eq!(ep["healthy"], true);
        assert_eq!(ep["in_flight"], 0);
    }
}

#[tokio::test]
async fn status_lists_routes_services_and_endpoints() {
    let up = TestUpstream::builder().start().await;
    let gw = start(&config(&up.url(), "")).await;
    let c = client();
    let s: serde_json::Value = c
        .get(gw.admin_url("/status"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(s["routes"][0]["name"], "api");
    assert_eq!(s["routes"][0]["path"], "/api");
    assert_eq!(s["routes"][0]["load_balancer"], "round_robin");
    assert_eq!(s["services"][0]["name"], "api");
    assert_eq!(s["services"][0]["endpoints"][0]["weight"], 1);
    let text = c
        .get(gw.url("/status"))
        .header("Accept", "text/plain")
        .send()
        .await
        .unwrap();
    assert!(text.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain"));
    let text = text.text().await.unwrap();
    assert!(text.contains("/api"), "{text}");
    assert!(text.contains(&up.addr().to_string()), "{text}");
    // Liveness and readiness on the admin listener.
    assert_eq!(
        c.get(gw.admin_url("/live")).send().await.unwrap().status(),
        200
    );
    assert_eq!(
        c.get(gw.admin_url("/ready")).send().await.unwrap().status(),
        200
    );
}

#[tokio::test]
async fn admin_paths_can_be_kept_off_the_main_listener() {
    let up = TestUpstream::builder()
        .route("/health", 200, "upstream health")
        .start()
        .await;
    let gw = start(&format!(
        r#"
        [admin]
        expose_on_main = false
        [[routes]]
        path = "/"
        targets = ["{}"]
        "#,
        up.url()
    ))
    .await;
    let body = client()
        .get(gw.url("/health"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(body, "upstream health");
    let admin = client().get(gw.admin_url("/health")).send().await.unwrap();
    assert_eq!(admin.status(), 200);
}

#[tokio::test]
async fn admin_token_protects_all_but_probes() {
    let up = TestUpstream::builder().start().await;
    let gw = start(&format!(
        r#"
        admin_token = "s3cret"
        [[routes]]
        path = "/"
        targets = ["{}"]
        "#,
        up.url()
    ))
    .await;
    let c = client();
    assert_eq!(
        c.get(gw.admin_url("/status"))
            .send()
            .await
            .unwrap()
            .status(),
        401
    );
    let ok = c
        .get(gw.admin_url("/status"))
        .bearer_auth("s3cret")
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    assert_eq!(
        c.get(gw.admin_url("/ready")).send().await.unwrap().status(),
        200
    );
    assert_eq!(
        c.get(gw.admin_url("/live")).send().await.unwrap().status(),
        200
    );
}
