//! The response cache through the real gateway and a real upstream that counts requests:
//! storage rules, Vary, conditionals, revalidation, stale answers, coalescing, invalidation,
//! purge, size bounds and a cache-poisoning attempt.

mod support;

use std::time::Duration;

use reqwest::{Client, Response};
use support::gateway::{client, start, TestGateway};
use support::upstream::{TestUpstream, TestUpstreamBuilder};

/// A gateway with one route `/` to `up` and `cache = { <cache> }`; `extra` goes before the
/// routes (top-level keys).
async fn gateway(up: &TestUpstream, cache: &str, extra: &str) -> TestGateway {
    start(&format!(
        r#"
        {extra}
        [[routes]]
        name = "cached"
        path = "/"
        targets = ["{}"]
        cache = {{ {cache} }}
        "#,
        up.url()
    ))
    .await
}

async fn get(c: &Client, gw: &TestGateway, path: &str) -> Response {
    c.get(gw.url(path)).send().await.unwrap()
}

fn x_cache(r: &Response) -> String {
    r.headers()
        .get("x-cache")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default()
}

/// An upstream answering `path` with `body` and these headers.
fn upstream(path: &str, body: &str, headers: &[(&str, &str)]) -> TestUpstreamBuilder {
    let mut b = TestUpstream::builder().route(path, 200, body);
    for (k, v) in headers {
        b = b.header(path, k, v);
    }
    b
}

/// Two GETs; returns their X-Cache values and the upstream's request count.
async fn twice(up: &TestUpstream, gw: &TestGateway, path: &str) -> (String, String, usize) {
    let c = client();
    let a = get(&c, gw, path).await;
    let xa = x_cache(&a);
    assert_eq!(a.status(), 200);
    a.bytes().await.unwrap();
    let b = get(&c, gw, path).await;
    let xb = x_cache(&b);
    b.bytes().await.unwrap();
    (xa, xb, up.hits_on(path))
}

#[tokio::test]
async fn fresh_answer_is_served_from_the_cache_with_age() {
    let up = upstream("/a", "hello", &[("cache-control", "max-age=60")])
        .start()
        .await;
    let gw = gateway(&up, "", "").await;
    let c = client();
    let first = get(&c, &gw, "/a").await;
    assert_eq!(x_cache(&first), "MISS");
    assert_eq!(first.text().await.unwrap(), "hello");
    let second = get(&c, &gw, "/a").await;
    assert_eq!(x_cache(&second), "HIT");
    assert!(second.headers().contains_key("age"));
    assert_eq!(second.text().await.unwrap(), "hello");
    assert_eq!(up.hits_on("/a"), 1);
    // HEAD is answered from the stored GET, without a body.
    let head = c.head(gw.url("/a")).send().await.unwrap();
    assert_eq!(x_cache(&head), "HIT");
    assert_eq!(head.headers()["content-length"], "5");
    assert_eq!(up.hits_on("/a"), 1);
    // The query is part of the key.
    let other = get(&c, &gw, "/a?x=1").await;
    assert_eq!(x_cache(&other), "MISS");
}

#[tokio::test]
async fn answers_the_rules_forbid_are_not_stored() {
    for (headers, why) in [
        (&[("cache-control", "no-store, max-age=60")][..], "no-store"),
        (&[("cache-control", "private, max-age=60")][..], "private"),
        (
            &[("cache-control", "max-age=60"), ("vary", "*")][..],
            "Vary: *",
        ),
        (
            &[("cache-control", "max-age=60"), ("set-cookie", "s=1")][..],
            "Set-Cookie",
        ),
        (&[][..], "no freshness and default_ttl 0"),
    ] {
        let up = upstream("/r", "x", headers).start().await;
        let gw = gateway(&up, "", "").await;
        let (a, b, hits) = twice(&up, &gw, "/r").await;
        assert_eq!((a.as_str(), b.as_str(), hits), ("MISS", "MISS", 2), "{why}");
    }
    // 500 is not cacheable even with max-age.
    let up = TestUpstream::builder()
        .route("/e", 500, "boom")
        .header("/e", "cache-control", "max-age=60")
        .start()
        .await;
    let gw = gateway(&up, "", "").await;
    let c = client();
    get(&c, &gw, "/e").await;
    get(&c, &gw, "/e").await;
    assert_eq!(up.hits_on("/e"), 2);
}

#[tokio::test]
async fn default_ttl_and_set_cookie_opt_in() {
    let up = upstream("/c", "x", &[("set-cookie", "s=1")]).start().await;
    let gw = gateway(&up, r#"default_ttl = "60s", cache_set_cookie = true"#, "").await;
    let (a, b, hits) = twice(&up, &gw, "/c").await;
    assert_eq!((a.as_str(), b.as_str(), hits), ("MISS", "HIT", 1));
}

#[tokio::test]
async fn authorization_is_cached_only_when_the_answer_allows_it() {
    let up = TestUpstream::builder()
        .route("/plain", 200, "p")
        .header("/plain", "cache-control", "max-age=60")
        .route("/public", 200, "q")
        .header("/public", "cache-control", "public, max-age=60")
        .start()
        .await;
    let gw = gateway(&up, "", "").await;
    let c = client();
    for _ in 0..2 {
        let r = c
            .get(gw.url("/plain"))
            .header("authorization", "Bearer a")
            .send()
            .await
            .unwrap();
        assert_eq!(x_cache(&r), "MISS");
    }
    assert_eq!(up.hits_on("/plain"), 2);
    // Stored without Authorization: not given to a request that carries it.
    get(&c, &gw, "/plain").await;
    let r = c
        .get(gw.url("/plain"))
        .header("authorization", "Bearer a")
        .send()
        .await
        .unwrap();
    assert_eq!(x_cache(&r), "MISS");
    for expected in ["MISS", "HIT"] {
        let r = c
            .get(gw.url("/public"))
            .header("authorization", "Bearer a")
            .send()
            .await
            .unwrap();
        assert_eq!(x_cache(&r), expected);
    }
    assert_eq!(up.hits_on("/public"), 1);
}

#[tokio::test]
async fn vary_uses_normalised_request_values() {
    let up = TestUpstream::builder()
        .echo()
        .header("*", "cache-control", "max-age=60")
        .header("*", "vary", "Accept-Encoding")
        .start()
        .await;
    let gw = gateway(&up, "", "").await;
    let c = client();
    let ask = |ae: &'static str| {
        let c = c.clone();
        let url = gw.url("/v");
        async move {
            let r = c
                .get(url)
                .header("accept-encoding", ae)
                .send()
                .await
                .unwrap();
            x_cache(&r)
        }
    };
    assert_eq!(ask("gzip, br").await, "MISS");
    assert_eq!(ask("BR,gzip").await, "HIT");
    assert_eq!(ask("identity").await, "MISS");
    assert_eq!(ask("identity").await, "HIT");
    assert_eq!(ask("gzip,br").await, "HIT");
    assert_eq!(up.hits_on("/v"), 2);
}

#[tokio::test]
async fn client_conditionals_are_answered_304_from_the_cache() {
    let up = upstream(
        "/e",
        "body",
        &[
            ("cache-control", "max-age=60"),
            ("last-modified", "Sun, 06 Nov 1994 08:49:37 GMT"),
        ],
    )
    .etag("/e", "\"v1\"")
    .start()
    .await;
    let gw = gateway(&up, "", "").await;
    let c = client();
    assert_eq!(get(&c, &gw, "/e").await.status(), 200);
    let r = c
        .get(gw.url("/e"))
        .header("if-none-match", "\"v1\"")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 304);
    assert_eq!(x_cache(&r), "HIT");
    assert_eq!(r.headers()["etag"], "\"v1\"");
    let r = c
        .get(gw.url("/e"))
        .header("if-modified-since", "Sun, 06 Nov 1994 08:49:37 GMT")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 304);
    let r = c
        .get(gw.url("/e"))
        .header("if-none-match", "\"v0\"")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "body");
    assert_eq!(up.hits_on("/e"), 1);
}

#[tokio::test]
async fn stale_entries_are_revalidated_and_a_304_refreshes_them() {
    // `Age: 100` over `max-age=60`: stored already stale, so the next request revalidates.
    let up = upstream(
        "/s",
        "stored body",
        &[("cache-control", "max-age=60"), ("age", "100")],
    )
    .etag("/s", "\"e1\"")
    .start()
    .await;
    let gw = gateway(&up, "", "").await;
    let c = client();
    assert_eq!(x_cache(&get(&c, &gw, "/s").await), "MISS");
    let r = get(&c, &gw, "/s").await;
    assert_eq!(r.status(), 200);
    assert_eq!(x_cache(&r), "HIT");
    assert_eq!(r.text().await.unwrap(), "stored body");
    let seen = up.last_request().unwrap();
    assert_eq!(seen.headers["if-none-match"], "\"e1\"");
    assert_eq!(up.hits_on("/s"), 2);
    // The 304 (no Age) made it fresh again: no upstream request now.
    let r = get(&c, &gw, "/s").await;
    assert_eq!(x_cache(&r), "HIT");
    assert_eq!(up.hits_on("/s"), 2);
    // A client's `no-cache` goes upstream again (conditionally).
    let r = c
        .get(gw.url("/s"))
        .header("cache-control", "no-cache")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(up.hits_on("/s"), 3);
}

/// A gateway with `cache` whose answer for `path` ("kept") was stored already stale, and whose
/// upstream has since gone away; returns the upstream's address, to start another there.
async fn stored_stale_then_upstream_gone(
    path: &str,
    cache: &str,
) -> (TestGateway, Client, std::net::SocketAddr) {
    let up = upstream(
        path,
        "kept",
        &[("cache-control", "max-age=60"), ("age", "100")],
    )
    .start()
    .await;
    let addr = up.addr();
    let gw = gateway(&up, cache, "").await;
    let c = client();
    assert_eq!(x_cache(&get(&c, &gw, path).await), "MISS");
    up.shutdown().await;
    (gw, c, addr)
}

#[tokio::test]
async fn stale_if_error_serves_the_stored_answer_when_the_upstream_fails() {
    let (gw, c, addr) = stored_stale_then_upstream_gone("/f", r#"stale_if_error = "1h""#).await;
    // Connection refused: the stale copy answers instead of a 502.
    let r = get(&c, &gw, "/f").await;
    assert_eq!(r.status(), 200);
    assert_eq!(x_cache(&r), "STALE");
    assert_eq!(r.text().await.unwrap(), "kept");
    // A 5xx answer too.
    let up = TestUpstream::builder()
        .route("/f", 503, "down")
        .start_on(addr)
        .await;
    let r = get(&c, &gw, "/f").await;
    assert_eq!(r.status(), 200);
    assert_eq!(x_cache(&r), "STALE");
    assert!(up.hits_on("/f") >= 1);
}

/// The cache's counter `name` from `/status`.
async fn cache_counter(gw: &TestGateway, name: &str) -> u64 {
    let status = support::util::status(&client(), gw).await;
    let route = status["routes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == "cached")
        .unwrap();
    route["cache"][name].as_u64().unwrap()
}

#[tokio::test]
async fn stale_while_revalidate_answers_at_once_and_refreshes_in_the_background() {
    // Stored already stale (`Age: 100` over `max-age=60`); the upstream takes 800 ms to answer.
    let up = upstream(
        "/w",
        "old",
        &[("cache-control", "max-age=60"), ("age", "100")],
    )
    .etag("/w", "\"w\"")
    .delay("/w", Duration::from_millis(800))
    .start()
    .await;
    let gw = gateway(&up, r#"stale_while_revalidate = "1h""#, "").await;
    let c = client();
    assert_eq!(x_cache(&get(&c, &gw, "/w").await), "MISS");
    assert_eq!(up.hits_on("/w"), 1);
    // The first stale request is answered at once and starts the refresh; it does not wait for it.
    let started = tokio::time::Instant::now();
    let r = c
        .get(gw.url("/w"))
        .header("if-none-match", "\"client-copy\"")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(x_cache(&r), "STALE");
    assert_eq!(r.text().await.unwrap(), "old");
    assert!(started.elapsed() < Duration::from_millis(700));
    assert!(
        support::gateway::eventually(Duration::from_secs(5), || async { up.hits_on("/w") == 2 })
            .await
    );
    // The refresh carries the store's validator, not the client's.
    assert_eq!(up.last_request().unwrap().headers["if-none-match"], "\"w\"");
    // While it is under way, others get the stale copy too, and no second refresh starts.
    let r = get(&c, &gw, "/w").await;
    assert_eq!(x_cache(&r), "STALE");
    assert_eq!(r.text().await.unwrap(), "old");
    // The 304 (no Age) makes the entry fresh: later requests are hits, with no upstream request.
    assert!(
        support::gateway::eventually(Duration::from_secs(5), || async {
            cache_counter(&gw, "revalidated").await == 1
        })
        .await
    );
    let r = get(&c, &gw, "/w").await;
    assert_eq!(x_cache(&r), "HIT");
    assert_eq!(r.text().await.unwrap(), "old");
    assert_eq!(up.hits_on("/w"), 2);
    // The background request is not a client's: counted neither as a hit nor as a miss.
    assert_eq!(cache_counter(&gw, "misses").await, 1);
    assert_eq!(cache_counter(&gw, "stale").await, 2);
    assert_eq!(cache_counter(&gw, "hits").await, 1);
}

#[tokio::test]
async fn a_failed_background_refresh_keeps_the_stale_copy_and_the_next_request_tries_again() {
    let (gw, c, addr) =
        stored_stale_then_upstream_gone("/g", r#"stale_while_revalidate = "1h""#).await;
    // The upstream is gone: the stale copy still answers, and the refresh fails quietly.
    for _ in 0..3 {
        let r = get(&c, &gw, "/g").await;
        assert_eq!(r.status(), 200);
        assert_eq!(x_cache(&r), "STALE");
        assert_eq!(r.text().await.unwrap(), "kept");
    }
    // A 503 in the background does not replace the stored answer either.
    let up = TestUpstream::builder()
        .route("/g", 503, "down")
        .header("/g", "cache-control", "max-age=600")
        .start_on(addr)
        .await;
    let r = get(&c, &gw, "/g").await;
    assert_eq!(x_cache(&r), "STALE");
    assert!(
        support::gateway::eventually(Duration::from_secs(5), || async { up.hits_on("/g") >= 1 })
            .await
    );
    let r = get(&c, &gw, "/g").await;
    assert_eq!(r.status(), 200);
    assert_eq!(x_cache(&r), "STALE");
    assert_eq!(r.text().await.unwrap(), "kept");
}

#[tokio::test]
async fn concurrent_misses_send_one_request_upstream() {
    let up = upstream("/slow", "shared", &[("cache-control", "max-age=60")])
        .delay("/slow", Duration::from_millis(500))
        .start()
        .await;
    let gw = gateway(&up, "", "").await;
    let c = client();
    let mut tasks = Vec::new();
    for _ in 0..100 {
        let c = c.clone();
        let url = gw.url("/slow");
        tasks.push(tokio::spawn(async move {
            let r = c.get(url).send().await.unwrap();
            (r.status().as_u16(), r.text().await.unwrap())
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), (200, "shared".to_owned()));
    }
    assert_eq!(up.hits_on("/slow"), 1);
}

#[tokio::test]
async fn waiters_go_upstream_themselves_after_lock_timeout() {
    let up = upstream("/slow", "x", &[("cache-control", "max-age=60")])
        .delay("/slow", Duration::from_millis(1500))
        .start()
        .await;
    let gw = gateway(&up, r#"lock_timeout = "100ms""#, "").await;
    let c = client();
    let first = tokio::spawn({
        let c = c.clone();
        let url = gw.url("/slow");
        async move { c.get(url).send().await.unwrap().status() }
    });
    assert!(
        support::gateway::eventually(Duration::from_secs(5), || async {
            up.hits_on("/slow") == 1
        })
        .await
    );
    let r = get(&c, &gw, "/slow").await;
    assert_eq!(r.status(), 200);
    assert_eq!(up.hits_on("/slow"), 2);
    assert_eq!(first.await.unwrap(), 200);
}

#[tokio::test]
async fn unsafe_methods_invalidate_the_url() {
    let up = upstream("/i", "x", &[("cache-control", "max-age=60")])
        .start()
        .await;
    let gw = gateway(&up, "", "").await;
    let c = client();
    get(&c, &gw, "/i").await;
    assert_eq!(x_cache(&get(&c, &gw, "/i").await), "HIT");
    for method in ["POST", "PUT", "PATCH", "DELETE"] {
        let m = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let r = c.request(m, gw.url("/i")).send().await.unwrap();
        assert_eq!(x_cache(&r), "BYPASS");
        assert_eq!(x_cache(&get(&c, &gw, "/i").await), "MISS", "{method}");
        assert_eq!(x_cache(&get(&c, &gw, "/i").await), "HIT");
    }
}

#[tokio::test]
async fn purge_removes_entries_behind_the_admin_token() {
    let up = TestUpstream::builder()
        .header("*", "cache-control", "max-age=60")
        .start()
        .await;
    let gw = gateway(&up, "", r#"admin_token = "t0k""#).await;
    let c = client();
    for p in ["/a/1", "/a/2", "/b"] {
        get(&c, &gw, p).await;
        assert_eq!(x_cache(&get(&c, &gw, p).await), "HIT");
    }
    let purge = |body: &'static str, token: Option<&'static str>| {
        let c = c.clone();
        let url = gw.admin_url("/cache/purge");
        async move {
            let mut req = c.post(url).body(body);
            if let Some(t) = token {
                req = req.bearer_auth(t);
            }
            let r = req.send().await.unwrap();
            let status = r.status().as_u16();
            (status, r.json::<serde_json::Value>().await.unwrap())
        }
    };
    assert_eq!(purge(r#"{"all": true}"#, None).await.0, 401);
    assert_eq!(purge(r#"{"nothing": 1}"#, Some("t0k")).await.0, 400);
    assert_eq!(purge("not json", Some("t0k")).await.0, 400);
    assert_eq!(purge(r#"{"route": "nope"}"#, Some("t0k")).await.0, 404);
    let (status, body) = purge(r#"{"prefix": "/a"}"#, Some("t0k")).await;
    assert_eq!((status, &body["purged"]), (200, &serde_json::json!(2)));
    assert_eq!(x_cache(&get(&c, &gw, "/a/1").await), "MISS");
    assert_eq!(x_cache(&get(&c, &gw, "/b").await), "HIT");
    let (_, body) = purge(r#"{"route": "cached"}"#, Some("t0k")).await;
    assert_eq!(body["purged"], 2);
    get(&c, &gw, "/b").await;
    let (_, body) = purge(r#"{"all": true}"#, Some("t0k")).await;
    assert_eq!(body["purged"], 1);
    assert_eq!(x_cache(&get(&c, &gw, "/b").await), "MISS");
}

#[tokio::test]
async fn large_answers_stream_through_uncached() {
    let big = "x".repeat(4096);
    let up = upstream("/big", &big, &[("cache-control", "max-age=60")])
        .route("/small", 200, "s")
        .header("/small", "cache-control", "max-age=60")
        .start()
        .await;
    let gw = gateway(&up, r#"max_object_size = "1KiB""#, "").await;
    let c = client();
    for _ in 0..2 {
        let r = get(&c, &gw, "/big").await;
        assert_eq!(x_cache(&r), "MISS");
        assert_eq!(r.text().await.unwrap().len(), 4096);
    }
    assert_eq!(up.hits_on("/big"), 2);
    let (_, b, _) = twice(&up, &gw, "/small").await;
    assert_eq!(b, "HIT");
}

#[tokio::test]
async fn the_store_stays_within_max_size() {
    let up = TestUpstream::builder()
        .header("*", "cache-control", "max-age=60")
        .start()
        .await;
    let gw = gateway(&up, r#"max_size = "8KiB", max_object_size = "1KiB""#, "").await;
    let c = client();
    for i in 0..200 {
        get(&c, &gw, &format!("/k/{i}"))
            .await
            .bytes()
            .await
            .unwrap();
    }
    let status = support::util::status(&c, &gw).await;
    let cache = &status["routes"][0]["cache"];
    let bytes = cache["bytes"].as_u64().unwrap();
    assert!(bytes <= 8 * 1024, "{cache}");
    assert!(cache["entries"].as_u64().unwrap() < 200, "{cache}");
    assert_eq!(cache["stored"], 200);
}

#[tokio::test]
async fn unkeyed_headers_cannot_poison_what_others_receive() {
    // The upstream reflects every request header in its body, like a framework building
    // absolute links from X-Forwarded-Host would.
    let up = TestUpstream::builder()
        .echo()
        .header("*", "cache-control", "max-age=60")
        .start()
        .await;
    let gw = gateway(&up, "", "").await;
    let c = client();
    for (name, path) in [
        ("x-forwarded-host", "/p1"),
        ("x-original-url", "/p2"),
        ("forwarded", "/p3"),
    ] {
        let attack = c
            .get(gw.url(path))
            .header(name, "evil.example")
            .send()
            .await
            .unwrap();
        attack.text().await.unwrap();
        let victim = get(&c, &gw, path).await;
        let body = victim.text().await.unwrap();
        assert!(!body.contains("evil.example"), "{name}: {body}");
    }
}

#[tokio::test]
async fn bad_cache_settings_are_reported_with_their_key_paths() {
    let err = meshgate::config::Config::from_toml(
        r#"
        [[routes]]
        path = "/"
        targets = ["http://127.0.0.1:1"]
        cache = { max_size = "1KiB", max_object_size = "1MiB", default_ttl = "soon", key = ["path", "cookie"], color = 1 }
        "#,
        &meshgate::config::Env::default(),
    )
    .unwrap_err()
    .to_string();
    for needle in [
        "routes[0].cache.max_object_size",
        "routes[0].cache.default_ttl",
        "routes[0].cache.key[1]",
        "routes[0].cache.color",
    ] {
        assert!(err.contains(needle), "{needle} missing in:\n{err}");
    }
}

#[tokio::test]
async fn status_metrics_and_explain_show_the_cache() {
    let up = upstream("/m", "x", &[("cache-control", "max-age=60")])
        .start()
        .await;
    let gw = gateway(&up, "", "").await;
    let c = client();
    twice(&up, &gw, "/m").await;
    let metrics = c
        .get(gw.admin_url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains(r#"meshgate_cache_requests_total{route="cached",result="hit"} 1"#),
        "{metrics}"
    );
    let explain: serde_json::Value = c
        .get(gw.admin_url(&format!("/explain?url=http://{}/m", gw.addr)))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let decision = explain["route"]["cache"]["decision"].as_str().unwrap();
    assert!(decision.starts_with("HIT"), "{explain}");
    assert!(
        explain["outcome"].as_str().unwrap().contains("cache"),
        "{explain}"
    );
    let status = support::util::status(&c, &gw).await;
    assert_eq!(status["routes"][0]["cache"]["hits"], 1);
}

/// A raw upstream answering every connection with `head` and `body` sent as `chunks` chunks.
async fn raw_chunked(body_len: usize, chunks: usize) -> support::raw::RawUpstream {
    let mut reply = String::from(
        "HTTP/1.1 200 OK\r\nCache-Control: max-age=60\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n",
    );
    let part = body_len / chunks;
    for _ in 0..chunks {
        reply.push_str(&format!("{part:x}\r\n{}\r\n", "z".repeat(part)));
    }
    reply.push_str("0\r\n\r\n");
    support::raw::RawUpstream::start(Box::leak(reply.into_bytes().into_boxed_slice())).await
}

async fn raw_gateway(up: &support::raw::RawUpstream, cache: &str) -> TestGateway {
    // The raw upstream never closes: a body it leaves unfinished ends with `stream_timeout`.
    start(&format!(
        r#"
        [[routes]]
        path = "/"
        targets = ["{}"]
        retry = {{ attempts = 1 }}
        stream_timeout = "500ms"
        cache = {{ {cache} }}
        "#,
        up.url()
    ))
    .await
}

#[tokio::test]
async fn answers_of_unknown_length_are_stored_only_within_max_object_size() {
    let c = client();
    // 4 KiB in 4 chunks, no Content-Length: copied until it passes 1 KiB, then only streamed.
    let big = raw_chunked(4096, 4).await;
    let gw = raw_gateway(&big, r#"max_object_size = "1KiB""#).await;
    for _ in 0..2 {
        let r = get(&c, &gw, "/u").await;
        assert_eq!(x_cache(&r), "MISS");
        assert_eq!(r.bytes().await.unwrap().len(), 4096);
    }
    assert_eq!(big.heads(), 2);
    // 512 bytes in 2 chunks: stored once it ended.
    let small = raw_chunked(512, 2).await;
    let gw = raw_gateway(&small, r#"max_object_size = "1KiB""#).await;
    assert_eq!(get(&c, &gw, "/u").await.bytes().await.unwrap().len(), 512);
    let r = get(&c, &gw, "/u").await;
    assert_eq!(x_cache(&r), "HIT");
    assert_eq!(r.bytes().await.unwrap().len(), 512);
    assert_eq!(small.heads(), 1);
}

#[tokio::test]
async fn a_body_shorter_than_its_content_length_is_never_stored() {
    let up = support::raw::RawUpstream::start(
        b"HTTP/1.1 200 OK\r\nCache-Control: max-age=60\r\nContent-Length: 100\r\nConnection: close\r\n\r\nonly-half",
    )
    .await;
    let gw = raw_gateway(&up, "").await;
    let c = client();
    for _ in 0..2 {
        // The upstream never sends the rest: the client's read fails or stops short.
        let r = tokio::time::timeout(Duration::from_secs(10), async {
            let r = get(&c, &gw, "/h").await;
            let x = x_cache(&r);
            (x, r.bytes().await.map(|b| b.len()))
        })
        .await;
        if let Ok((x, body)) = r {
            assert_eq!(x, "MISS");
            assert!(body.map_or(true, |n| n < 100));
        }
    }
    assert_eq!(up.heads(), 2);
}

#[tokio::test]
async fn a_named_cache_policy_caches_every_route_that_names_it_in_its_own_store() {
    let up = TestUpstream::builder()
        .route("/a/x", 200, "a")
        .route("/b/x", 200, "b")
        .start()
        .await;
    let gw = start(&format!(
        r#"
        [policies.static]
        cache = {{ default_ttl = "1h" }}

        [[routes]]
        name = "a"
        path = "/a"
        targets = ["{0}"]
        policies = ["static"]

        [[routes]]
        name = "b"
        path = "/b"
        targets = ["{0}"]
        policies = ["static"]
        "#,
        up.url()
    ))
    .await;
    for path in ["/a/x", "/b/x"] {
        let (first, second, hits) = twice(&up, &gw, path).await;
        assert_eq!((first.as_str(), second.as_str(), hits), ("MISS", "HIT", 1));
    }
    // Purging one route's store leaves the other's.
    let purged: serde_json::Value = client()
        .post(gw.admin_url("/cache/purge"))
        .json(&serde_json::json!({"route": "a"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(purged["purged"], 1, "{purged}");
    assert_eq!(x_cache(&get(&client(), &gw, "/b/x").await), "HIT");
    assert_eq!(x_cache(&get(&client(), &gw, "/a/x").await), "MISS");
}

#[tokio::test]
async fn must_revalidate_and_proxy_revalidate_answers_are_never_served_stale() {
    for directive in ["must-revalidate", "proxy-revalidate"] {
        // Stored already stale (`Age` past `max-age`), on a route that would serve stale on error.
        let cc = format!("max-age=1, {directive}");
        let up = upstream(
            "/m",
            "kept",
            &[("cache-control", cc.as_str()), ("age", "30")],
        )
        .start()
        .await;
        let gw = gateway(&up, r#"stale_if_error = "1h""#, "").await;
        let c = client();
        assert_eq!(x_cache(&get(&c, &gw, "/m").await), "MISS", "{directive}");
        up.shutdown().await;
        let r = get(&c, &gw, "/m").await;
        assert!(
            r.status().is_server_error(),
            "{directive}: a stale answer was served: {} {}",
            r.status(),
            x_cache(&r)
        );
        assert_ne!(x_cache(&r), "STALE", "{directive}");
    }
}

#[tokio::test]
async fn a_stale_answer_with_only_last_modified_is_revalidated_with_if_modified_since() {
    let lm = "Wed, 21 Oct 2026 07:28:00 GMT";
    let up = upstream(
        "/lm",
        "dated",
        &[
            ("cache-control", "max-age=60"),
            ("age", "100"),
            ("last-modified", lm),
        ],
    )
    .start()
    .await;
    let gw = gateway(&up, "", "").await;
    let c = client();
    assert_eq!(x_cache(&get(&c, &gw, "/lm").await), "MISS");
    let r = get(&c, &gw, "/lm").await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "dated");
    let seen = up.last_request().unwrap();
    assert_eq!(seen.headers["if-modified-since"], lm);
    assert!(!seen.headers.contains_key("if-none-match"));
    assert_eq!(up.hits_on("/lm"), 2);
}

#[tokio::test]
async fn on_a_route_with_auth_only_answers_marked_shareable_are_cached() {
    // API keys in a custom header (removed before forwarding): no `Authorization` anywhere.
    let up = upstream("/me", "alice's page", &[("cache-control", "max-age=60")])
        .route("/pub", 200, "for everyone")
        .header("/pub", "cache-control", "public, max-age=60")
        .start()
        .await;
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys.txt");
    std::fs::write(
        &keys,
        format!(
            "alice {}\nbob {}\n",
            meshgate::auth::api_keys::sha256_hex("alice-key"),
            meshgate::auth::api_keys::sha256_hex("bob-key")
        ),
    )
    .unwrap();
    let gw = start(&format!(
        r#"
        [[routes]]
        name = "cached"
        path = "/"
        targets = ["{}"]
        auth = {{ api_keys = {{ keys_file = {:?}, hide_credentials = true }} }}
        cache = {{ }}
        "#,
        up.url(),
        keys.display().to_string()
    ))
    .await;
    let c = client();
    let as_user = |key: &'static str, path: &'static str| {
        let (c, url) = (c.clone(), gw.url(path));
        async move {
            let r = c.get(url).header("x-api-key", key).send().await.unwrap();
            (x_cache(&r), r.text().await.unwrap())
        }
    };
    // A per-user answer is not stored: Bob's request goes upstream.
    assert_eq!(as_user("alice-key", "/me").await.0, "MISS");
    assert_eq!(as_user("bob-key", "/me").await.0, "MISS");
    assert_eq!(up.hits_on("/me"), 2);
    // An answer the upstream marked public is shared.
    assert_eq!(as_user("alice-key", "/pub").await.0, "MISS");
    assert_eq!(
        as_user("bob-key", "/pub").await,
        ("HIT".to_owned(), "for everyone".to_owned())
    );
    assert_eq!(up.hits_on("/pub"), 1);
}

#[tokio::test]
async fn no_cache_and_s_maxage_answers_are_never_served_stale() {
    for (path, cc) in [("/nc", "no-cache"), ("/sm", "s-maxage=1")] {
        let up = upstream(path, "kept", &[("cache-control", cc), ("age", "100")])
            .start()
            .await;
        let gw = gateway(
            &up,
            r#"stale_if_error = "1h", stale_while_revalidate = "1h""#,
            "",
        )
        .await;
        let c = client();
        assert_eq!(x_cache(&get(&c, &gw, path).await), "MISS");
        up.shutdown().await;
        // The upstream is gone: no stale copy instead of the 502.
        let r = get(&c, &gw, path).await;
        assert_eq!(r.status(), 502, "{cc}");
    }
}

#[tokio::test]
async fn a_stored_answer_that_is_not_2xx_ignores_the_clients_validators() {
    let up = TestUpstream::builder()
        .route("/gone", 404, "not here")
        .header("/gone", "cache-control", "max-age=60")
        .etag("/gone", "\"g\"")
        .start()
        .await;
    let gw = gateway(&up, "", "").await;
    let c = client();
    assert_eq!(x_cache(&get(&c, &gw, "/gone").await), "MISS");
    let r = c
        .get(gw.url("/gone"))
        .header("if-none-match", "\"g\"")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(x_cache(&r), "HIT");
    assert_eq!(r.text().await.unwrap(), "not here");
}
