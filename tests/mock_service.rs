//! The mock service's routes over real loopback HTTP, and the `TestUpstream` support server
//! that the gateway's integration tests script.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::Value;
use support::upstream::TestUpstream;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// A loopback-only client. reqwest is built with `rustls-no-provider` in this crate, so it
/// panics on build unless a crypto provider is installed (installing twice is harmless).
fn client() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

/// Starts a mock on 127.0.0.1:0; cancel the token to stop it.
async fn start_mock(name: &str) -> (SocketAddr, CancellationToken) {
    let shutdown = CancellationToken::new();
    let addr = meshgate::mock::spawn("127.0.0.1:0".parse().unwrap(), name, shutdown.clone())
        .await
        .unwrap();
    (addr, shutdown)
}

async fn get_json(client: &reqwest::Client, url: &str) -> (StatusCode, Value) {
    let resp = client.get(url).send().await.unwrap();
    json_of(resp).await
}

async fn json_of(resp: reqwest::Response) -> (StatusCode, Value) {
    let status = resp.status();
    let content_type = resp.headers()["content-type"].to_str().unwrap().to_owned();
    assert_eq!(content_type, "application/json", "{}", resp.url());
    let body: Value = serde_json::from_slice(&resp.bytes().await.unwrap()).unwrap();
    (status, body)
}

/// Every mock body names who answered.
fn assert_names(body: &Value, name: &str, addr: SocketAddr) {
    assert_eq!(body["service"], name, "{body}");
    assert_eq!(body["port"], addr.port(), "{body}");
}

#[tokio::test]
async fn health_names_service_and_port() {
    let (addr, _stop) = start_mock("user-service").await;
    let resp = client()
        .get(format!("http://{addr}/health"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.headers()["x-mock-service"], "user-service");
    let (status, body) = json_of(resp).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["status"], "healthy");
    assert_names(&body, "user-service", addr);
}

#[tokio::test]
async fn users_list_item_missing_and_create() {
    let (addr, _stop) = start_mock("users").await;
    let client = client();
    let base = format!("http://{addr}");

    let (status, body) = get_json(&client, &format!("{base}/users")).await;
    assert_eq!(status, StatusCode::OK);
    assert_names(&body, "users", addr);
    assert_eq!(body["users"][0]["id"], 1);
    assert_eq!(body["users"][0]["name"], "Alice");
    assert_eq!(body["users"][1]["name"], "Bob");

    let (status, body) = get_json(&client, &format!("{base}/users/2")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["user"]["name"], "Bob");
    assert_names(&body, "users", addr);

    for missing in ["/users/99", "/users/abc", "/users/", "/users/-1"] {
        let (status, body) = get_json(&client, &format!("{base}{missing}")).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{missing}");
        assert_eq!(body["error"], "not found");
        assert_names(&body, "users", addr);
    }

    let resp = client
        .post(format!("{base}/users"))
        .body(r#"{"name":"Dave"}"#)
        .send()
        .await
        .unwrap();
    let (status, body) = json_of(resp).await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(body["user"]["name"], "Dave");
    assert!(body["user"]["id"].as_u64().unwrap() > 3, "{body}");
    assert_names(&body, "users", addr);

    let resp = client
        .post(format!("{base}/users"))
        .body("not json")
        .send()
        .await
        .unwrap();
    let (status, body) = json_of(resp).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_names(&body, "users", addr);

    let resp = client
        .delete(format!("{base}/users/1"))
        .send()
        .await
        .unwrap();
    assert_eq!(json_of(resp).await.0, StatusCode::METHOD_NOT_ALLOWED);
}

#[tokio::test]
async fn orders_and_products() {
    let (addr, _stop) = start_mock("shop").await;
    let client = client();
    let base = format!("http://{addr}");

    let (status, body) = get_json(&client, &format!("{base}/orders")).await;
    assert_eq!(status, StatusCode::OK);
    assert_names(&body, "shop", addr);
    assert!(body["orders"].as_array().unwrap().len() >= 2);

    let (status, body) = get_json(&client, &format!("{base}/orders/1")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["order"]["id"], 1);

    let (status, body) = get_json(&client, &format!("{base}/products")).await;
    assert_eq!(status, StatusCode::OK);
    assert_names(&body, "shop", addr);
    assert!(body["products"].as_array().unwrap().len() >= 2);

    let (status, body) = get_json(&client, &format!("{base}/products/2")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["product"]["id"], 2);

    let (status, _) = get_json(&client, &format!("{base}/products/42")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn echo_reports_what_arrived() {
    let (addr, _stop) = start_mock("echo").await;
    let payload = vec![7u8; 1024 * 1024];
    let resp = client()
        // Raw query with escapes and a repeated key: must come back byte for byte.
        .put(format!("http://{addr}/echo/a/b?x=1&y=%20z&x=2"))
        .header("x-multi", "one")
        .header("x-multi", "two")
        .header("X-Upper", "v")
        .body(payload)
        .send()
        .await
        .unwrap();
    let (status, body) = json_of(resp).await;
    assert_eq!(status, StatusCode::OK);
    assert_names(&body, "echo", addr);
    assert_eq!(body["method"], "PUT");
    assert_eq!(body["path"], "/echo/a/b");
    assert_eq!(body["query"], "x=1&y=%20z&x=2");
    assert_eq!(
        body["headers"]["x-multi"],
        serde_json::json!(["one", "two"])
    );
    assert_eq!(body["headers"]["x-upper"], serde_json::json!(["v"]));
    assert_eq!(
        body["headers"]["content-length"],
        serde_json::json!(["1048576"])
    );
    assert_eq!(body["body_size"], 1024 * 1024);
    assert_eq!(body["version"], "HTTP/1.1");

    let (_, body) = get_json(&client(), &format!("http://{addr}/echo")).await;
    assert_eq!(body["query"], Value::Null);
    assert_eq!(body["body_size"], 0);
    assert_eq!(body["method"], "GET");
}

#[tokio::test]
async fn status_and_delay() {
    let (addr, _stop) = start_mock("codes").await;
    let client = client();

    let (status, body) = get_json(&client, &format!("http://{addr}/status/503")).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(body["status"], 503);
    assert_names(&body, "codes", addr);

    let resp = client
        .get(format!("http://{addr}/status/204"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);
    assert!(resp.bytes().await.unwrap().is_empty());

    for bad in [
        "/status/99",
        "/status/600",
        "/status/x",
        "/delay/x",
        "/delay/999999999",
    ] {
        let (status, body) = get_json(&client, &format!("http://{addr}{bad}")).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}");
        assert_names(&body, "codes", addr);
    }

    let started = Instant::now();
    let (status, body) = get_json(&client, &format!("http://{addr}/delay/150")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["delay_ms"], 150);
    assert!(started.elapsed() >= Duration::from_millis(150));
}

#[tokio::test]
async fn unknown_path_is_json_404() {
    let (addr, _stop) = start_mock("edge").await;
    let (status, body) = get_json(&client(), &format!("http://{addr}/nope/../x?y")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body["error"], "not found");
    assert_names(&body, "edge", addr);
}

#[tokio::test]
async fn stream_sends_paced_chunks() {
    let (addr, _stop) = start_mock("streamer").await;
    let started = Instant::now();
    let mut resp = client()
        .get(format!(
            "http://{addr}/stream?chunks=4&interval_ms=40&size=10"
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(resp.content_length().is_none(), "must be chunked");
    let mut chunks = Vec::new();
    while let Some(chunk) = resp.chunk().await.unwrap() {
        chunks.push(chunk);
    }
    // 40 ms apart, each chunk is its own HTTP chunk and its own read.
    assert_eq!(chunks.len(), 4, "{chunks:?}");
    assert!(chunks.iter().all(|c| c.as_ref() == b"xxxxxxxxxx"));
    assert!(started.elapsed() >= Duration::from_millis(120));

    let (status, _) = get_json(&client(), &format!("http://{addr}/stream?chunks=x")).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn sse_sends_events_one_by_one() {
    let (addr, _stop) = start_mock("events").await;
    let mut resp = client()
        .get(format!("http://{addr}/sse?events=3&interval_ms=30"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let first = resp.chunk().await.unwrap().unwrap();
    assert_eq!(first.as_ref(), b"data: {\"seq\":0}\n\n");
    let mut rest = Vec::new();
    while let Some(chunk) = resp.chunk().await.unwrap() {
        rest.extend_from_slice(&chunk);
    }
    assert_eq!(rest, b"data: {\"seq\":1}\n\ndata: {\"seq\":2}\n\n");
}

#[tokio::test]
async fn bytes_streams_100_mib_pattern() {
    let (addr, _stop) = start_mock("bulk").await;
    let size: u64 = 100 * 1024 * 1024;
    let mut resp = client()
        .get(format!("http://{addr}/bytes?size={size}"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.content_length(), Some(size));
    // Checked chunk by chunk, never held whole: byte k must be k % 251.
    let mut offset: u64 = 0;
    while let Some(chunk) = resp.chunk().await.unwrap() {
        for (i, b) in chunk.iter().enumerate() {
            assert_eq!(
                u64::from(*b),
                (offset + i as u64) % 251,
                "offset {offset}+{i}"
            );
        }
        offset += chunk.len() as u64;
    }
    assert_eq!(offset, size);
}

#[tokio::test]
async fn cancel_stops_the_listener() {
    let (addr, stop) = start_mock("stopper").await;
    let (status, _) = get_json(&client(), &format!("http://{addr}/health")).await;
    assert_eq!(status, StatusCode::OK);
    stop.cancel();
    // The listener closes asynchronously; poll with a bound instead of sleeping.
    let deadline = Instant::now() + Duration::from_secs(5);
    while tokio::net::TcpStream::connect(addr).await.is_ok() {
        assert!(
            Instant::now() < deadline,
            "mock still accepting after cancel"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn test_upstream_scripts_and_records() {
    let up = TestUpstream::builder()
        .name("alpha")
        .route("/ok", 201, "created")
        .header("/ok", "x-route", "1")
        .header("*", "x-all", "yes")
        .header("/hop", "Keep-Alive", "timeout=5")
        .header("/hop", "Proxy-Connection", "keep-alive")
        .delay("/slow", Duration::from_millis(100))
        .reset_after_read("/flaky")
        .start()
        .await;
    assert_eq!(up.url(), format!("http://{}", up.addr()));
    let client = client();

    let resp = client.get(format!("{}/ok", up.url())).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::CREATED);
    assert_eq!(resp.headers()["x-route"], "1");
    assert_eq!(resp.headers()["x-all"], "yes");
    assert_eq!(resp.text().await.unwrap(), "created");

    let resp = client
        .get(format!("{}/other?q=%20a&q", up.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["x-all"], "yes");
    assert!(resp.headers().get("x-route").is_none());
    assert_eq!(resp.text().await.unwrap(), "alpha");

    let resp = client
        .get(format!("{}/hop", up.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.headers()["keep-alive"], "timeout=5");
    assert_eq!(resp.headers()["proxy-connection"], "keep-alive");

    let started = Instant::now();
    let resp = client
        .get(format!("{}/slow", up.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.text().await.unwrap(), "alpha");
    assert!(started.elapsed() >= Duration::from_millis(100));

    let err = client
        .post(format!("{}/flaky", up.url()))
        .body(vec![1u8; 1000])
        .send()
        .await
        .unwrap_err();
    assert!(!err.is_timeout(), "{err:?}");

    assert_eq!(up.hits(), 5);
    assert_eq!(up.hits_on("/ok"), 1);
    assert_eq!(up.hits_on("/other"), 1);
    assert_eq!(up.hits_on("/flaky"), 1);
    assert_eq!(up.hits_on("/missing"), 0);
    // Keep-alive reuses the first connection; only the reset forces no new one before it.
    assert_eq!(up.connections(), 1);

    let seen = up.requests();
    assert_eq!(seen.len(), 5);
    assert_eq!(seen[1].uri, "/other?q=%20a&q");
    assert_eq!(seen[1].path(), "/other");
    assert_eq!(seen[1].query(), Some("q=%20a&q"));
    assert_eq!(seen[1].version, http::Version::HTTP_11);
    assert_eq!(seen[0].method, http::Method::GET);
    let last = up.last_request().unwrap();
    assert_eq!(last.method, http::Method::POST);
    assert_eq!(last.uri, "/flaky");
    assert_eq!(last.body_len, 1000);
    assert_eq!(last.headers["content-length"], "1000");

    // Restart on the same port: a fresh upstream with fresh counters answers there.
    let addr = up.addr();
    up.shutdown().await;
    assert!(client
        .get(format!("http://{addr}/ok"))
        .send()
        .await
        .is_err());
    let up = TestUpstream::builder().name("beta").start_on(addr).await;
    let resp = client
        .get(format!("http://{addr}/ok"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.text().await.unwrap(), "beta");
    assert_eq!(up.hits(), 1);
    up.shutdown().await;
}

#[tokio::test]
async fn test_upstream_echo() {
    let up = TestUpstream::builder()
        .name("mirror")
        .route("/fixed", 200, "fixed")
        .echo()
        .start()
        .await;
    let client = client();
    let resp = client
        .post(format!("{}/any/path?a=%2F&b", up.url()))
        .header("x-twice", "1")
        .header("x-twice", "2")
        .body(vec![0u8; 4096])
        .send()
        .await
        .unwrap();
    let (status, body) = json_of(resp).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["service"], "mirror");
    assert_eq!(body["port"], up.addr().port());
    assert_eq!(body["method"], "POST");
    assert_eq!(body["path"], "/any/path");
    assert_eq!(body["query"], "a=%2F&b");
    assert_eq!(body["headers"]["x-twice"], serde_json::json!(["1", "2"]));
    assert_eq!(body["body_size"], 4096);
    assert_eq!(body["version"], "HTTP/1.1");

    let resp = client
        .get(format!("{}/fixed", up.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.text().await.unwrap(), "fixed");
    up.shutdown().await;
}
