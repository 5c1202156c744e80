//! Every gateway error status with its JSON body, custom error pages, and the limits on
//! malformed or oversized requests.

mod support;

use std::time::Duration;

use meshgate::builder::{GatewayBuilder, RouteBuilder};
use meshgate::proxy::ProxyError;
use support::gateway::{client, start, start_gateway};
use support::upstream::TestUpstream;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn json(resp: reqwest::Response) -> (u16, serde_json::Value, String) {
    let status = resp.status().as_u16();
    let id = resp.headers()["x-request-id"].to_str().unwrap().to_owned();
    assert_eq!(resp.headers()["content-type"], "application/json");
    (status, resp.json().await.unwrap(), id)
}

/// A port with nothing listening: bind, note the port, close.
async fn dead_port() -> u16 {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    l.local_addr().unwrap().port()
}

#[tokio::test]
async fn gateway_errors_have_status_and_json_body() {
    let slow = TestUpstream::builder()
        .delay("/slow", Duration::from_secs(5))
        .start()
        .await;
    let dead = dead_port().await;
    let gw = start(&format!(
        r#"
        [discovery.static.services]
        empty = []
        [[routes]]
        name = "dead"
        path = "/dead"
        targets = ["http://127.0.0.1:{dead}"]
        [[routes]]
        name = "slow"
        path = "/slow"
        targets = ["{}"]
        timeout = "200ms"
        [[routes]]
        name = "small"
        path = "/small"
        targets = ["{}"]
        max_body = "1KiB"
        [[routes]]
        name = "none"
        path = "/none"
        service = "empty"
        "#,
        slow.url(),
        slow.url()
    ))
    .await;
    let c = client();
    let (s, body, id) = json(c.get(gw.url("/nowhere")).send().await.unwrap()).await;
    assert_eq!(s, 404);
    assert_eq!(body["error"], "Not Found");
    assert_eq!(body["request_id"], id.as_str());
    assert!(body["message"].as_str().unwrap().contains("no route"));

    let (s, body, _) = json(c.get(gw.url("/dead")).send().await.unwrap()).await;
    assert_eq!(s, 502);
    assert_eq!(body["error"], "Bad Gateway");

    let started = tokio::time::Instant::now();
    let (s, body, _) = json(c.get(gw.url("/slow")).send().await.unwrap()).await;
    assert_eq!(s, 504);
    assert_eq!(body["error"], "Gateway Timeout");
    assert!(started.elapsed() < Duration::from_secs(3));

    let (s, body, _) = json(c.get(gw.url("/none")).send().await.unwrap()).await;
    assert_eq!(s, 503);
    assert_eq!(body["error"], "Service Unavailable");

    // Declared too large: refused before anything is sent upstream.
    let (s, body, _) = json(
        c.post(gw.url("/small"))
            .body(vec![b'x'; 4096])
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(s, 413);
    assert_eq!(body["error"], "Payload Too Large");
    assert_eq!(slow.hits_on("/small"), 0);
    // Within the limit passes.
    let ok = c
        .post(gw.url("/small"))
        .body(vec![b'x'; 512])
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
}

#[tokio::test]
async fn chunked_body_over_the_limit_is_413() {
    let up = TestUpstream::builder().start().await;
    let gw = start(&format!(
        r#"
        [[routes]]
        path = "/"
        targets = ["{}"]
        max_body = 1000
        "#,
        up.url()
    ))
    .await;
    let mut s = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let chunk = "x".repeat(800);
    let req = format!(
        "POST /up HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n320\r\n{chunk}\r\n320\r\n{chunk}\r\n0\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out).await;
    assert!(out.starts_with("HTTP/1.1 413"), "{out}");
}

#[tokio::test]
async fn oversized_headers_get_431_and_garbage_gets_400() {
    let up = TestUpstream::builder().start().await;
    let gw = start(&format!(
        r#"
        [server]
        max_header_bytes = "16KiB"
        [[routes]]
        path = "/"
        targets = ["{}"]
        "#,
        up.url()
    ))
    .await;
    let mut s = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let big = "a".repeat(32 * 1024);
    let _ = s
        .write_all(format!("GET / HTTP/1.1\r\nHost: x\r\nX-Big: {big}\r\n\r\n").as_bytes())
        .await;
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out).await;
    let out = String::from_utf8_lossy(&out);
    assert!(out.starts_with("HTTP/1.1 431"), "{out}");

    let mut s = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    s.write_all(b"NOT A REQUEST\r\n\r\n").await.unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out).await;
    let out = String::from_utf8_lossy(&out);
    assert!(out.starts_with("HTTP/1.1 400"), "{out}");
    assert_eq!(up.hits(), 0);
    // The gateway is still fine.
    assert_eq!(
        client().get(gw.url("/")).send().await.unwrap().status(),
        200
    );
}

#[tokio::test]
async fn route_error_page_replaces_the_default() {
    let dead = dead_port().await;
    let gw = start(&format!(
        r#"
        [[routes]]
        path = "/"
        targets = ["http://127.0.0.1:{dead}"]
        error = {{ status = 503, content_type = "application/json", body = '{{"error":"Service unavailable","message":"Please try again later"}}' }}
        "#
    ))
    .await;
    let resp = client().get(gw.url("/x")).send().await.unwrap();
    assert_eq!(resp.status(), 503);
    assert!(resp.headers().contains_key("x-request-id"));
    assert_eq!(
        resp.text().await.unwrap(),
        r#"{"error":"Service unavailable","message":"Please try again later"}"#
    );
}

#[tokio::test]
async fn error_handler_closure_from_the_library_api() {
    let dead = dead_port().await;
    let gateway = GatewayBuilder::new()
        .route(
            RouteBuilder::new("custom", "/")
                .targets([format!("http://127.0.0.1:{dead}").as_str()])
                .error_handler(|e: &ProxyError| {
                    let body = format!("custom: {}", e.status().as_u16());
                    Some(
                        http::Response::builder()
                            .status(599)
                            .body(body.into())
                            .unwrap(),
                    )
                }),
        )
        .build()
        .unwrap();
    let gw = start_gateway(gateway).await;
    let resp = client().get(gw.url("/x")).send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 599);
    assert_eq!(resp.text().await.unwrap(), "custom: 502");
}

#[tokio::test]
async fn connect_failure_on_a_get_is_retried_on_another_endpoint() {
    let up = TestUpstream::builder().name("alive").start().await;
    let dead = dead_port().await;
    let gw = start(&format!(
        r#"
        [[routes]]
        path = "/"
        targets = ["http://127.0.0.1:{dead}", "{}"]
        "#,
        up.url()
    ))
    .await;
    for _ in 0..10 {
        let resp = client().get(gw.url("/x")).send().await.unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.text().await.unwrap(), "alive");
    }
}
