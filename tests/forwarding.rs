//! Forwarding through the real gateway to real loopback upstreams: headers in both directions,
//! rewrites, the query string, dot segments and request ids.

mod support;

use support::gateway::{client, start};
use support::upstream::TestUpstream;

fn config(upstream: &str, extra: &str) -> String {
    format!(
        r#"
        [[routes]]
        name = "api"
        path = "/api/v1/users/*"
        targets = ["{upstream}"]
        path_rewrite = [{{ strip_prefix = "/api/v1" }}, {{ replace_prefix = {{ from = "/users", to = "/people" }} }}, {{ add_prefix = "/internal" }}]
        request_headers = {{ add = {{ "X-Gateway" = "meshgate" }}, set = {{ "X-Env" = "test" }}, remove = ["X-Secret"] }}
        response_headers = {{ add = {{ "X-Served-By" = "meshgate" }}, set = {{ "X-Version" = "2" }}, remove = ["Server"] }}
        {extra}

        [[routes]]
        name = "root"
        path = "/"
        targets = ["{upstream}"]
        preserve_host = false
        "#
    )
}

#[tokio::test]
async fn rewrite_chain_headers_and_forwarding_headers() {
    let up = TestUpstream::builder()
        .route("/internal/people/7", 200, "seven")
        .header("*", "Server", "upstream/1.0")
        .header("*", "X-Version", "1")
        .header("*", "Connection", "X-Hop")
        .header("*", "X-Hop", "must-go")
        .header("*", "Keep-Alive", "timeout=5")
        .start()
        .await;
    let gw = start(&config(&up.url(), "")).await;
    let resp = client()
        .get(gw.url("/api/v1/users/7"))
        .header("Host", "shop.example.com")
        .header("X-Forwarded-For", "203.0.113.9")
        .header("X-Secret", "hunter2")
        .header("X-Env", "prod")
        .header("Connection", "X-Client-Hop")
        .header("X-Client-Hop", "must-go")
        .header("Via", "1.0 edge")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let h = resp.headers().clone();
    assert_eq!(resp.text().await.unwrap(), "seven");
    // Response side: configured changes, hop-by-hop removed, request id present.
    assert_eq!(h["x-served-by"], "meshgate");
    assert_eq!(h["x-version"], "2");
    assert!(!h.contains_key("server"));
    assert!(!h.contains_key("x-hop"));
    assert!(!h.contains_key("keep-alive"));
    assert_eq!(h["x-request-id"].len(), 32);

    let seen = up.last_request().unwrap();
    assert_eq!(seen.uri, "/internal/people/7");
    let sh = &seen.headers;
    assert_eq!(
        sh["host"], "shop.example.com",
        "Host passes through by default"
    );
    assert_eq!(sh["x-forwarded-for"], "203.0.113.9, 127.0.0.1");
    assert_eq!(sh["x-forwarded-proto"], "http");
    assert_eq!(sh["x-forwarded-host"], "shop.example.com");
    assert_eq!(
        sh.get_all("via").iter().collect::<Vec<_>>(),
        ["1.0 edge", "1.1 meshgate"]
    );
    assert_eq!(sh["x-gateway"], "meshgate");
    assert_eq!(sh["x-env"], "test");
    assert!(!sh.contains_key("x-secret"));
    assert!(
        !sh.contains_key("x-client-hop"),
        "headers named in Connection are hop-by-hop"
    );
    assert_eq!(
        sh["x-request-id"], h["x-request-id"],
        "upstream and client see the same request id"
    );
}

#[tokio::test]
async fn client_request_id_is_kept() {
    let up = TestUpstream::builder().start().await;
    let gw = start(&config(&up.url(), "")).await;
    let resp = client()
        .get(gw.url("/anything"))
        .header("X-Request-Id", "req-42")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.headers()["x-request-id"], "req-42");
    assert_eq!(up.last_request().unwrap().headers["x-request-id"], "req-42");
}

#[tokio::test]
async fn preserve_host_false_sends_the_endpoint_authority() {
    let up = TestUpstream::builder().start().await;
    let gw = start(&config(&up.url(), "")).await;
    client()
        .get(gw.url("/x"))
        .header("Host", "shop.example.com")
        .send()
        .await
        .unwrap();
    let seen = up.last_request().unwrap();
    assert_eq!(seen.headers["host"], up.addr().to_string().as_str());
    assert_eq!(seen.headers["x-forwarded-host"], "shop.example.com");
}

#[tokio::test]
async fn query_string_reaches_upstream_byte_for_byte() {
    let up = TestUpstream::builder().start().await;
    let gw = start(&config(&up.url(), "")).await;
    let query = "a=1&b=%2F%20x&a=2&empty=&flag&q=caf%C3%A9+ok&%5Bk%5D=v";
    let resp = client()
        .get(gw.url(&format!("/api/v1/users/7?{query}")))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let seen = up.last_request().unwrap();
    assert_eq!(seen.uri, format!("/internal/people/7?{query}"));
}

#[tokio::test]
async fn percent_escapes_in_paths_are_not_decoded() {
    let up = TestUpstream::builder().start().await;
    let gw = start(&config(&up.url(), "")).await;
    client()
        .get(gw.url("/api/v1/users/a%2Fb%20c"))
        .send()
        .await
        .unwrap();
    assert_eq!(up.last_request().unwrap().uri, "/internal/people/a%2Fb%20c");
}

/// Sends a raw request line, since HTTP clients normalise dot segments themselves.
async fn raw_get(addr: std::net::SocketAddr, target: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(
        format!("GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

#[tokio::test]
async fn dot_segments_never_leave_the_route_prefix() {
    let users = TestUpstream::builder().name("users").start().await;
    let admin = TestUpstream::builder().name("admin").start().await;
    let gw = start(&format!(
        r#"
        [[routes]]
        name = "users"
        path = "/api/v1/users"
        targets = ["{}"]
        [[routes]]
        name = "admin"
        path = "/admin"
        targets = ["{}"]
        "#,
        users.url(),
        admin.url()
    ))
    .await;
    // Climbing out of /api/v1/users lands on /admin after normalisation, so it is routed as
    // /admin (to the admin upstream, which is what the normalised path means), never sent to
    // the users upstream with dots it might resolve itself.
    let out = raw_get(gw.addr, "/api/v1/users/../../../admin").await;
    assert!(out.ends_with("admin"), "{out}");
    assert_eq!(users.hits(), 0);
    assert_eq!(admin.last_request().unwrap().uri, "/admin");
    // Encoded dots are dots too.
    let out = raw_get(gw.addr, "/api/v1/users/%2e%2e/%2E%2E/%2e%2e/admin/x").await;
    assert!(out.ends_with("admin"), "{out}");
    assert_eq!(users.hits(), 0);
    // Dots that stay inside the prefix are resolved before forwarding.
    let out = raw_get(gw.addr, "/api/v1/users/a/../b/./c").await;
    assert!(out.ends_with("users"), "{out}");
    assert_eq!(users.last_request().unwrap().uri, "/api/v1/users/b/c");
    // Climbing above the root of a prefix-less gateway stays at the root: no route, 404.
    let out = raw_get(gw.addr, "/../../etc/passwd").await;
    assert!(out.starts_with("HTTP/1.1 404"), "{out}");
}

#[tokio::test]
async fn upstream_connections_are_pooled_and_survive_an_upstream_restart() {
    let c = client();
    let up = TestUpstream::builder()
        .route("/p", 200, "pooled")
        .start()
        .await;
    let addr = up.addr();
    let gw = start(&format!(
        r#"
        [[routes]]
        path = "/"
        targets = ["http://{addr}"]
        "#
    ))
    .await;
    for _ in 0..50 {
        let r = c.get(gw.url("/p")).send().await.unwrap();
        assert_eq!(r.text().await.unwrap(), "pooled");
    }
    // Sequential requests share one pooled upstream connection.
    assert_eq!(up.hits(), 50);
    assert_eq!(up.connections(), 1);
    // HEAD has no body to read: its connection goes back to the pool all the same.
    for _ in 0..5 {
        let r = c.head(gw.url("/p")).send().await.unwrap();
        assert_eq!(r.status(), 200);
    }
    assert_eq!(up.connections(), 1);

    // The upstream restarts on the same address: the pooled connection is dead, and the next
    // request goes out on a new one without an error reaching the client.
    up.shutdown().await;
    let up = TestUpstream::builder()
        .route("/p", 200, "again")
        .start_on(addr)
        .await;
    for _ in 0..5 {
        let r = c.get(gw.url("/p")).send().await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.text().await.unwrap(), "again");
    }
    assert_eq!(up.connections(), 1);
}

#[tokio::test]
async fn an_idle_upstream_connection_is_closed_after_idle_timeout() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // A bare upstream, to see the gateway close the pooled connection.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let gw = start(&format!(
        r#"
        [upstream]
        idle_timeout = "300ms"
        [[routes]]
        path = "/"
        targets = ["http://{addr}"]
        "#
    ))
    .await;
    let upstream = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut buf = vec![0u8; 4096];
        let mut got = Vec::new();
        while !got.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = s.read(&mut buf).await.unwrap();
            got.extend_from_slice(&buf[..n]);
        }
        s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
            .await
            .unwrap();
        let answered = tokio::time::Instant::now();
        // Then silence until the gateway closes its end (bounded).
        let n = tokio::time::timeout(std::time::Duration::from_secs(5), s.read(&mut buf))
            .await
            .expect("the idle connection was closed within 5 s")
            .unwrap_or(0);
        assert_eq!(n, 0, "EOF expected");
        answered.elapsed()
    });
    let r = client().get(gw.url("/x")).send().await.unwrap();
    assert_eq!(r.text().await.unwrap(), "ok");
    let idle_for = upstream.await.unwrap();
    assert!(
        idle_for >= std::time::Duration::from_millis(250),
        "closed after {idle_for:?}"
    );
}

#[tokio::test]
async fn a_connection_whose_chunked_response_ended_is_reused() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // A bare upstream answering every request with a chunked body (no Content-Length: the
    // body's end is only known from its last chunk), counting the connections it accepts.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let counter = accepted.clone();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = listener.accept().await.unwrap();
            counter.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let mut got = Vec::new();
                loop {
                    while let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
                        got.drain(..end + 4);
                        let reply = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n\
                            3\r\nchu\r\n4\r\nnked\r\n0\r\n\r\n";
                        if s.write_all(reply).await.is_err() {
                            return;
                        }
                    }
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                }
            });
        }
    });
    let gw = start(&format!(
        r#"
        [[routes]]
        path = "/"
        targets = ["http://{addr}"]
        "#
    ))
    .await;
    let c = client();
    for _ in 0..20 {
        let r = c.get(gw.url("/c")).send().await.unwrap();
        assert_eq!(r.text().await.unwrap(), "chunked");
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 1);
}
