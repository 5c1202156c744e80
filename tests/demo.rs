//! The README walkthrough against the embedded demo config, with the demo's own mock services
//! (on free ports here; `meshgate demo` uses the configured ones).

mod support;

use meshgate::config::{Config, Env, DEMO_TOML};
use support::gateway::{client, start_config};
use tokio_util::sync::CancellationToken;

#[tokio::test]
async fn readme_walkthrough_works_against_the_demo() {
    let mut config = Config::from_toml(DEMO_TOML, &Env::default()).unwrap();
    config.server.drain_delay = std::time::Duration::ZERO;
    let stop = CancellationToken::new();
    let mocks = meshgate::demo::start_mocks(&mut config, true, &stop)
        .await
        .unwrap();
    assert_eq!(mocks.len(), 5, "two users, two orders, one product");
    let gw = start_config(config).await;
    let c = client();
    let get = |path: &str| {
        let c = c.clone();
        let url = gw.url(path);
        async move {
            let r = c.get(url).send().await.unwrap();
            let status = r.status().as_u16();
            (status, r.json::<serde_json::Value>().await.unwrap())
        }
    };

    // Round robin across the two user-service instances is visible in the port field.
    let (s1, a) = get("/api/v1/users").await;
    let (s2, b) = get("/api/v1/users").await;
    assert_eq!((s1, s2), (200, 200));
    assert_eq!(a["service"], "user-service");
    assert_eq!(b["service"], "user-service");
    assert_ne!(a["port"], b["port"]);
    assert!(a["users"].as_array().unwrap().len() >= 2);

    let (s, one) = get("/api/v1/users/1").await;
    assert_eq!(s, 200);
    assert_eq!(one["user"]["id"], 1);

    // Orders: weighted 3:1 over a full cycle.
    let mut ports = std::collections::HashMap::new();
    for _ in 0..8 {
        let (s, o) = get("/api/v1/orders").await;
        assert_eq!(s, 200);
        assert_eq!(o["service"], "order-service");
        *ports.entry(o["port"].as_u64().unwrap()).or_insert(0) += 1;
    }
    let mut counts: Vec<_> = ports.values().copied().collect();
    counts.sort();
    assert_eq!(counts, [2, 6]);

    let (s, p) = get("/api/v1/products").await;
    assert_eq!(s, 200);
    assert_eq!(p["service"], "product-service");

    let (s, e) = get("/api/v1/unknown").await;
    assert_eq!(s, 404);
    assert_eq!(e["error"], "Not Found");

    let (s, h) = get("/health").await;
    assert_eq!(s, 200);
    assert_eq!(h["status"], "healthy");
    let (s, st) = get("/status").await;
    assert_eq!(s, 200);
    assert_eq!(st["routes"].as_array().unwrap().len(), 3);
    stop.cancel();
}

#[test]
fn shipped_config_file_is_the_demo_default() {
    let file = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config/gateway.toml"))
        .unwrap();
    assert_eq!(file, DEMO_TOML);
    let lines = meshgate::demo::curl_commands("127.0.0.1:8080".parse().unwrap(), None);
    assert!(lines[0].starts_with("curl http://127.0.0.1:8080/api/v1/users"));
}
