//! Rate limits (issue #14): exact counts at slow rates (so timing never decides), burst, keys,
//! missing keys, trusted proxies, named policies, the memory cap, and the global scope against
//! a real `redis-server` (stopped and restarted mid-stream, answering errors and garbage).
//!
//! Needs Debian's `redis-server` (`.ci/run` installs it). Without it the Redis tests fail when
//! `CI` is set, and skip with a loud message otherwise.

mod support;

use std::time::Duration;

use meshgate::config::{Config, Env};
use reqwest::StatusCode;
use std::sync::atomic::Ordering;

use support::gateway::{self, client, TestGateway};
use support::upstream::TestUpstream;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Sends `n` GETs to `path` with `headers`, returning the statuses in order.
async fn statuses(
    c: &reqwest::Client,
    gw: &TestGateway,
    path: &str,
    n: usize,
    headers: &[(&str, &str)],
) -> Vec<u16> {
    let mut out = Vec::new();
    for _ in 0..n {
        let mut req = c.get(gw.url(path));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        out.push(req.send().await.unwrap().status().as_u16());
    }
    out
}

/// Store failures counted by the rate limit of `route`.
fn store_errors(gw: &TestGateway, route: &str) -> u64 {
    let table = gw.state.proxy.table.load();
    let route = table.routes().iter().find(|r| &*r.name == route).unwrap();
    route
        .rate_limiter()
        .unwrap()
        .store_errors
        .load(Ordering::Relaxed)
}

fn count(statuses: &[u16], status: u16) -> usize {
    statuses.iter().filter(|s| **s == status).count()
}

fn problems(toml: &str) -> Vec<String> {
    match Config::from_toml(toml, &Env::default()) {
        Ok(_) => Vec::new(),
        Err(e) => e.to_string().lines().map(str::to_owned).collect(),
    }
}

#[tokio::test]
async fn exact_count_at_a_fixed_rate_with_headers_and_json_429() {
    let up = TestUpstream::builder().start().await;
    let gw = gateway::start(&format!(
        r#"
        [[routes]]
        name = "r"
        path = "/"
        targets = ["{}"]
        rate_limit = {{ rate = "3/m", burst = 3, key = "route" }}
        "#,
        up.url()
    ))
    .await;
    let c = client();
    let mut allowed_remaining = Vec::new();
    let mut refused = 0;
    for _ in 0..10 {
        let resp = c.get(gw.url("/x")).send().await.unwrap();
        let h = resp.headers().clone();
        assert_eq!(h["ratelimit-policy"], "\"r\";q=3;w=60");
        match resp.status() {
            StatusCode::OK => allowed_remaining.push(h["ratelimit"].to_str().unwrap().to_owned()),
            StatusCode::TOO_MANY_REQUESTS => {
                refused += 1;
                let retry: u64 = h["retry-after"].to_str().unwrap().parse().unwrap();
                // 3 a minute: the next token comes 20 s after the bucket ran dry.
                assert!((19..=20).contains(&retry), "retry-after {retry}");
                assert!(h["ratelimit"].to_str().unwrap().starts_with("\"r\";r=0;t="));
                assert_eq!(h["content-type"], "application/json");
                let body: serde_json::Value = resp.json().await.unwrap();
                assert_eq!(body["error"], "Too Many Requests");
            }
            s => panic!("unexpected {s}"),
        }
    }
    assert_eq!(refused, 7);
    assert_eq!(up.hits(), 3, "refused requests never reach the upstream");
    let r: Vec<&str> = allowed_remaining
        .iter()
        .map(|v| v.split(';').nth(1).unwrap())
        .collect();
    assert_eq!(r, ["r=2", "r=1", "r=0"]);

    // The admin side: /explain says the stage answers and why, /status and /metrics count.
    let mut u = reqwest::Url::parse(&gw.admin_url("/explain")).unwrap();
    u.query_pairs_mut().append_pair("url", "/x");
    let x: serde_json::Value = c.get(u).send().await.unwrap().json().await.unwrap();
    let outcome = x["outcome"].as_str().unwrap();
    assert!(outcome.contains("rate_limit stage answers"), "{outcome}");
    assert!(outcome.contains("429"), "{outcome}");
    assert_eq!(x["route"]["rate_limit"]["rate"], "3/m");
    assert_eq!(x["route"]["rate_limit"]["bucket_now"]["remaining"], 0);
    assert_eq!(x["route"]["stages"][0], "rate_limit");
    let s: serde_json::Value = c
        .get(gw.admin_url("/status"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let rl = &s["routes"][0]["rate_limit"];
    assert_eq!(
        (rl["allowed"].as_u64(), rl["limited"].as_u64()),
        (Some(3), Some(7))
    );
    assert_eq!(rl["scope"], "local");
    let m = c
        .get(gw.admin_url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for line in [
        "meshgate_rate_limit_decisions_total{route=\"r\",decision=\"limited\"} 7",
        "meshgate_rate_limit_decisions_total{route=\"r\",decision=\"allowed\"} 3",
        "meshgate_rate_limit_store_errors_total{route=\"r\"} 0",
    ] {
        assert!(m.lines().any(|l| l == line), "missing {line} in\n{m}");
    }
}

#[tokio::test]
async fn burst_defaults_to_one_second_of_rate_and_headers_can_be_off() {
    let up = TestUpstream::builder().start().await;
    let gw = gateway::start(&format!(
        r#"
        [[routes]]
        name = "default-burst"
        path = "/a"
        targets = ["{u}"]
        rate_limit = {{ rate = "7/h", key = "route" }}
        [[routes]]
        name = "burst-5"
        path = "/b"
        targets = ["{u}"]
        rate_limit = {{ rate = "7/h", burst = 5, key = "route", headers = false }}
        "#,
        u = up.url()
    ))
    .await;
    let c = client();
    // 7/h is under one request a second: a full bucket holds one.
    assert_eq!(count(&statuses(&c, &gw, "/a", 4, &[]).await, 200), 1);
    let resp = c.get(gw.url("/b")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.headers().get("ratelimit").is_none());
    assert!(resp.headers().get("ratelimit-policy").is_none());
    let s = statuses(&c, &gw, "/b", 9, &[]).await;
    assert_eq!(count(&s, 200), 4, "{s:?}");
    // Refusals still say when to come back.
    let resp = c.get(gw.url("/b")).send().await.unwrap();
    assert_eq!(resp.status(), 429);
    assert!(resp.headers().get("retry-after").is_some());
    assert!(resp.headers().get("ratelimit").is_some());
}

#[tokio::test]
async fn header_keys_missing_keys_and_required() {
    let up = TestUpstream::builder().start().await;
    let gw = gateway::start(&format!(
        r#"
        [[routes]]
        name = "shared-missing"
        path = "/a"
        targets = ["{u}"]
        rate_limit = {{ rate = "2/h", burst = 2, key = "header:X-Tenant" }}
        [[routes]]
        name = "required"
        path = "/b"
        targets = ["{u}"]
        rate_limit = {{ rate = "2/h", burst = 2, key = "header:X-Tenant", required = true }}
        [[routes]]
        name = "combined"
        path = "/c"
        targets = ["{u}"]
        rate_limit = {{ rate = "2/h", burst = 2, key = ["header:X-Tenant", "header:X-User"] }}
        "#,
        u = up.url()
    ))
    .await;
    let c = client();
    for tenant in ["t1", "t2"] {
        let s = statuses(&c, &gw, "/a", 4, &[("x-tenant", tenant)]).await;
        assert_eq!(s, [200, 200, 429, 429], "tenant {tenant}");
    }
    // Without the header: one shared bucket of its own.
    assert_eq!(statuses(&c, &gw, "/a", 3, &[]).await, [200, 200, 429]);
    // `required`: 400 with a JSON body, and the upstream never sees it.
    let hits = up.hits();
    let resp = c.get(gw.url("/b")).send().await.unwrap();
    assert_eq!(resp.status(), 400);
    let body: serde_json::Value = resp.json().await.unwrap();
    assert!(body["message"].as_str().unwrap().contains("rate limit"));
    assert_eq!(up.hits(), hits);
    assert_eq!(
        statuses(&c, &gw, "/b", 3, &[("x-tenant", "t1")]).await,
        [200, 200, 429]
    );
    // A list: each combination has its own bucket.
    for user in ["u1", "u2"] {
        let s = statuses(&c, &gw, "/c", 3, &[("x-tenant", "t"), ("x-user", user)]).await;
        assert_eq!(s, [200, 200, 429], "user {user}");
    }
}

#[tokio::test]
async fn custom_error_body_keeps_429_and_retry_after() {
    let up = TestUpstream::builder().start().await;
    let gw = gateway::start(&format!(
        r#"
        [[routes]]
        path = "/"
        targets = ["{}"]
        rate_limit = {{ rate = "1/h", burst = 1 }}
        error = {{ status = 503, content_type = "text/plain", body = "slow down please" }}
        "#,
        up.url()
    ))
    .await;
    let c = client();
    assert_eq!(c.get(gw.url("/")).send().await.unwrap().status(), 200);
    let resp = c.get(gw.url("/")).send().await.unwrap();
    assert_eq!(resp.status(), 429);
    assert!(resp.headers().get("retry-after").is_some());
    assert_eq!(resp.text().await.unwrap(), "slow down please");
}

#[tokio::test]
async fn trusted_proxies_pick_the_client_for_keys_ip_hash_and_forwarded_for() {
    let a = TestUpstream::builder().name("a").start().await;
    let b = TestUpstream::builder().name("b").start().await;
    let config = |trusted: &str| {
        format!(
            r#"
            [server]
            trusted_proxies = [{trusted}]
            [[routes]]
            path = "/"
            targets = ["{}", "{}"]
            load_balancer = "ip_hash"
            rate_limit = {{ rate = "1/h", burst = 1, key = "client_ip" }}
            "#,
            a.url(),
            b.url()
        )
    };
    let gw = gateway::start(&config(r#""127.0.0.0/8", "10.0.0.0/8""#)).await;
    let c = client();
    // Each forwarded client has its own bucket, and the entry the client wrote itself (left of
    // the first untrusted hop) is dropped from the chain sent upstream.
    for i in 1..=20 {
        let xff = format!("6.6.6.6, 203.0.113.{i}, 10.1.2.3");
        let s = statuses(&c, &gw, "/", 2, &[("x-forwarded-for", &xff)]).await;
        assert_eq!(s, [200, 429], "client {i}");
    }
    let seen = a
        .requests()
        .into_iter()
        .chain(b.requests())
        .map(|r| r.headers["x-forwarded-for"].to_str().unwrap().to_owned())
        .collect::<Vec<_>>();
    assert_eq!(seen.len(), 20);
    assert!(
        seen.contains(&"203.0.113.1, 10.1.2.3, 127.0.0.1".to_owned()),
        "{seen:?}"
    );
    // ip_hash spread twenty clients over both endpoints: it hashed the forwarded address, not
    // the one peer.
    assert!(
        a.hits() > 0 && b.hits() > 0,
        "a {} b {}",
        a.hits(),
        b.hits()
    );
    gw.stop().await;

    // An untrusted peer is the client, whatever it forwards.
    let gw = gateway::start(&config(r#""10.0.0.0/8""#)).await;
    let s = statuses(&c, &gw, "/", 1, &[("x-forwarded-for", "203.0.113.1")]).await;
    assert_eq!(s, [200]);
    let s = statuses(&c, &gw, "/", 1, &[("x-forwarded-for", "203.0.113.2")]).await;
    assert_eq!(s, [429]);
    let last = a.last_request().into_iter().chain(b.last_request());
    assert!(last
        .map(|r| r.headers["x-forwarded-for"].to_str().unwrap().to_owned())
        .any(|x| x == "127.0.0.1"));
}

#[tokio::test]
async fn routes_naming_one_policy_share_its_buckets() {
    let up = TestUpstream::builder().start().await;
    let gw = gateway::start(&format!(
        r#"
        [policies.team]
        rate_limit = {{ rate = "3/h", burst = 3 }}
        [[routes]]
        path = "/a"
        targets = ["{u}"]
        policies = ["team"]
        [[routes]]
        path = "/b"
        targets = ["{u}"]
        policies = ["team"]
        [[routes]]
        path = "/c"
        targets = ["{u}"]
        rate_limit = {{ rate = "3/h", burst = 3 }}
        "#,
        u = up.url()
    ))
    .await;
    let c = client();
    let mut s = statuses(&c, &gw, "/a", 2, &[]).await;
    s.extend(statuses(&c, &gw, "/b", 2, &[]).await);
    assert_eq!(s, [200, 200, 200, 429]);
    assert_eq!(statuses(&c, &gw, "/a", 1, &[]).await, [429]);
    // An inline limit is the route's own.
    assert_eq!(statuses(&c, &gw, "/c", 4, &[]).await, [200, 200, 200, 429]);
    let resp = c.get(gw.url("/b")).send().await.unwrap();
    assert_eq!(resp.headers()["ratelimit-policy"], "\"team\";q=3;w=3600");
}

#[test]
fn bad_rate_limit_settings_are_reported_with_their_key_path() {
    let p = problems(
        r#"
        [server]
        trusted_proxies = ["10.0.0.0/33"]
        [policies.p1]
        rate_limit = { rate = "1/s", colour = "red" }
        [policies.p2]
        rate_limit = { rate = "2/s" }
        [[routes]]
        path = "/a"
        targets = ["http://127.0.0.1:1"]
        rate_limit = { rate = "10/d", burst = 0, key = ["client_ip", "cookie"], scope = "global", on_store_error = "maybe" }
        [[routes]]
        path = "/b"
        targets = ["http://127.0.0.1:1"]
        policies = ["p1", "p2", "nope"]
        rate_limit = { rate = "1/s" }
        "#,
    );
    let text = p.join("\n");
    for needle in [
        "server.trusted_proxies: invalid CIDR",
        "policies.p1.rate_limit.colour: unknown key",
        "routes[0].rate_limit.rate: invalid rate",
        "routes[0].rate_limit.burst",
        "routes[0].rate_limit.key[1]: unknown key \"cookie\"",
        "routes[0].rate_limit.scope: \"global\" needs a [redis] section",
        "routes[0].rate_limit.on_store_error: unknown choice",
        "routes[1].policies[2]: unknown policy \"nope\"",
        "routes[1].policies: policies p1 and p2 each set a rate_limit",
        "routes[1].rate_limit: set inline and by policy",
    ] {
        assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
    }
    let p = problems(
        r#"
        [redis]
        url = "http://127.0.0.1:6379"
        timeout = "0ms"
        pool_size = 0
        "#,
    )
    .join("\n");
    for needle in ["redis.url: invalid URL", "redis.timeout", "redis.pool_size"] {
        assert!(p.contains(needle), "missing {needle:?} in:\n{p}");
    }
    // The password never shows in a problem.
    let p = problems("[redis]\nurl = \"http://user:hunter2@h:1\"\n").join("\n");
    assert!(p.contains("***") && !p.contains("hunter2"), "{p}");
}

#[tokio::test]
async fn a_key_rotation_flood_stays_under_the_key_cap() {
    let up = TestUpstream::builder().start().await;
    let gw = gateway::start(&format!(
        r#"
        [[routes]]
        path = "/"
        targets = ["{}"]
        rate_limit = {{ rate = "1/h", burst = 1, key = "header:X-Key", max_keys = 640 }}
        "#,
        up.url()
    ))
    .await;
    let c = client();
    let limiter = || {
        gw.state.proxy.table.load().routes()[0]
            .rate_limiter()
            .unwrap()
            .clone()
    };
    for i in 0..3000 {
        let key = format!("k{i}");
        let s = c
            .get(gw.url("/"))
            .header("x-key", &key)
            .send()
            .await
            .unwrap();
        // Every new key is admitted: evicting an old one never refuses a newcomer.
        assert_eq!(s.status(), 200, "key {i}");
    }
    let held = limiter().local_keys();
    assert!((600..=640).contains(&held), "{held} keys held, cap 640");
    // A key that was not evicted is still limited.
    assert_eq!(
        statuses(&c, &gw, "/", 1, &[("x-key", "k2999")]).await,
        [429]
    );
}

/// A gateway with a global limit on `/` keyed by route (`extra` adds its burst and more) and
/// on `/u` keyed by `X-User`.
async fn global_gateway(redis_url: &str, upstream: &str, extra: &str) -> TestGateway {
    global_gateway_with(redis_url, upstream, extra, "").await
}

/// [`global_gateway`] with more `[redis]` keys.
async fn global_gateway_with(
    redis_url: &str,
    upstream: &str,
    extra: &str,
    redis_extra: &str,
) -> TestGateway {
    gateway::start(&format!(
        r#"
        [redis]
        url = "{redis_url}"
        timeout = "500ms"
        {redis_extra}
        [[routes]]
        name = "g"
        path = "/"
        targets = ["{upstream}"]
        rate_limit = {{ rate = "3/h", key = "route", scope = "global", {extra} }}
        [[routes]]
        name = "u"
        path = "/u"
        targets = ["{upstream}"]
        rate_limit = {{ rate = "3/h", burst = 3, key = "header:X-User", scope = "global", on_store_error = "deny" }}
        "#
    ))
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gateways_share_one_global_limit() {
    let Some(redis) = support::redis::start("two_gateways_share_one_global_limit").await else {
        return;
    };
    let up = TestUpstream::builder().start().await;
    let g1 = global_gateway(&redis.url(), &up.url(), "burst = 6").await;
    let g2 = global_gateway(&redis.url(), &up.url(), "burst = 6").await;
    // Four clients at once on each gateway: the script's atomicity, not luck, keeps the count.
    let c = client();
    let mut tasks = Vec::new();
    for g in [&g1, &g2] {
        for _ in 0..4 {
            let (c, url) = (c.clone(), g.url("/x"));
            tasks.push(tokio::spawn(async move {
                let mut out = Vec::new();
                for _ in 0..5 {
                    out.push(c.get(&url).send().await.unwrap().status().as_u16());
                }
                out
            }));
        }
    }
    let mut s = Vec::new();
    for t in tasks {
        s.extend(t.await.unwrap());
    }
    assert_eq!(s.len(), 40);
    assert_eq!(count(&s, 200), 6, "{s:?}");
    assert_eq!(count(&s, 429), 34, "{s:?}");
    assert_eq!(up.hits(), 6);
    let resp = c.get(g1.url("/x")).send().await.unwrap();
    assert_eq!(resp.status(), 429);
    let after: u64 = resp.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    // 3 an hour: 1,200 s until the next token.
    assert!((1199..=1200).contains(&after), "{after}");
}

/// Redis goes away and comes back while requests flow; `mode` decides meanwhile. Returns the
/// statuses while Redis was down, or `None` when redis-server is not installed.
async fn redis_outage(mode: &str) -> Option<Vec<u16>> {
    let mut redis = support::redis::start(&format!("redis_outage_{mode}")).await?;
    let up = TestUpstream::builder().start().await;
    let extra = format!("burst = 3, on_store_error = \"{mode}\", replicas = 3");
    let gw = global_gateway(&redis.url(), &up.url(), &extra).await;
    let c = client();
    assert_eq!(statuses(&c, &gw, "/x", 4, &[]).await, [200, 200, 200, 429]);
    redis.stop();
    let down = statuses(&c, &gw, "/x", 4, &[]).await;
    assert_eq!(
        store_errors(&gw, "g"),
        4,
        "every decision without Redis is counted"
    );
    redis.start_again().await;
    // Recovery without a restart: the fresh Redis has a full bucket (3), then 429 again. Only
    // Redis can produce that sequence here (the fallback's bucket is spent, `allow` never
    // refuses, `deny` never admits).
    let mut back = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !back.ends_with(&[200, 200, 200, 429]) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no recovery after Redis came back: {back:?}"
        );
        back.extend(statuses(&c, &gw, "/x", 1, &[]).await);
    }
    Some(down)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_outage_with_on_store_error_local() {
    // The fallback admits burst / replicas = 1 for the same key.
    let Some(down) = redis_outage("local").await else {
        return;
    };
    assert_eq!(down, [200, 429, 429, 429]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_outage_with_on_store_error_allow() {
    let Some(down) = redis_outage("allow").await else {
        return;
    };
    assert_eq!(down, [200, 200, 200, 200]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_outage_with_on_store_error_deny() {
    let Some(down) = redis_outage("deny").await else {
        return;
    };
    assert_eq!(down, [429, 429, 429, 429]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conflicting_key_type_fails_one_key_not_the_policy() {
    let Some(redis) = support::redis::start("a_conflicting_key_type").await else {
        return;
    };
    let up = TestUpstream::builder().start().await;
    let gw = global_gateway(&redis.url(), &up.url(), "burst = 3").await;
    // The bucket of user "bad" is a hash, so the script's GET fails with WRONGTYPE.
    let key = "meshgate:rl:r:u:\u{3}\u{0}\u{0}\u{0}bad";
    redis.cmd(&["HSET", key, "f", "v"]).await.unwrap();
    let c = client();
    // on_store_error = "deny" on this route: refused, not a 5xx, nothing panics.
    let s = statuses(&c, &gw, "/u", 2, &[("x-user", "bad")]).await;
    assert_eq!(s, [429, 429]);
    // Other keys of the same policy are unaffected.
    let s = statuses(&c, &gw, "/u", 4, &[("x-user", "good")]).await;
    assert_eq!(s, [200, 200, 200, 429]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_client_keys_are_hashed_and_a_route_never_shares_a_policys_redis_keys() {
    let Some(redis) = support::redis::start("long_client_keys_are_hashed").await else {
        return;
    };
    let up = TestUpstream::builder().start().await;
    let limit = r#"rate = "3/h", burst = 3, key = "header:X-User", scope = "global", on_store_error = "deny""#;
    let gw = gateway::start(&format!(
        r#"
        [redis]
        url = "{}"
        timeout = "500ms"
        [policies.u]
        rate_limit = {{ {limit} }}
        [[routes]]
        name = "u"
        path = "/u"
        targets = ["{u}"]
        rate_limit = {{ {limit} }}
        [[routes]]
        path = "/p"
        targets = ["{u}"]
        policies = ["u"]
        "#,
        redis.url(),
        u = up.url()
    ))
    .await;
    let c = client();
    // A 4 KiB user name: still one bucket, exact.
    let long = "x".repeat(4096);
    let user = [("x-user", long.as_str())];
    assert_eq!(
        statuses(&c, &gw, "/u", 4, &user).await,
        [200, 200, 200, 429]
    );
    // The policy named like the route has buckets of its own.
    assert_eq!(
        statuses(&c, &gw, "/p", 4, &user).await,
        [200, 200, 200, 429]
    );
    let keys = match redis.cmd(&["KEYS", "meshgate:rl:*"]).await.unwrap() {
        redis::Value::Array(keys) => keys,
        other => panic!("KEYS answered {other:?}"),
    };
    let keys: Vec<Vec<u8>> = keys
        .into_iter()
        .map(|k| match k {
            redis::Value::BulkString(b) => b,
            other => panic!("a key {other:?}"),
        })
        .collect();
    assert_eq!(keys.len(), 2, "one bucket per namespace");
    for prefix in [&b"meshgate:rl:r:u:#"[..], b"meshgate:rl:p:u:#"] {
        let key = keys
            .iter()
            .find(|k| k.starts_with(prefix))
            .expect("hashed key");
        assert_eq!(key.len(), prefix.len() + 32, "stored as its SHA-256");
    }
}

/// A TCP server answering every read with `reply`.
async fn fake_redis(reply: &'static [u8]) -> String {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 || s.write_all(reply).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    format!("redis://{addr}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_answering_garbage_or_wrong_types_does_not_panic() {
    let up = TestUpstream::builder().start().await;
    let c = client();
    for (reply, what) in [
        (&b"+OK\r\n"[..], "a status where the script's array belongs"),
        (&b":7\r\n"[..], "an integer"),
        (
            &b"*2\r\n$1\r\nx\r\n:1\r\n"[..],
            "an array of the wrong types",
        ),
        (&b"-ERR nope\r\n"[..], "an error"),
        (&b"\x00\xffgarbage\r\n"[..], "bytes that are not RESP"),
    ] {
        let url = fake_redis(reply).await;
        let gw = global_gateway(&url, &up.url(), "burst = 3, on_store_error = \"allow\"").await;
        let s = statuses(&c, &gw, "/x", 3, &[]).await;
        assert_eq!(s, [200, 200, 200], "{what}");
        // Admitted by `allow` because the reply was refused, not read as a decision.
        assert_eq!(store_errors(&gw, "g"), 3, "{what}");
        let s = statuses(&c, &gw, "/u", 2, &[("x-user", "a")]).await;
        assert_eq!(s, [429, 429], "{what}");
        assert_eq!(store_errors(&gw, "u"), 2, "{what}");
        gw.stop().await;
    }
}

/// A `Write` into shared memory, for the access log.
#[derive(Clone, Default)]
struct SharedBuf(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for SharedBuf {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn the_access_log_shows_the_client_behind_a_trusted_proxy() {
    use meshgate::telemetry::{AccessFormat, AccessLog, RequestTelemetry};
    let up = TestUpstream::builder().start().await;
    let toml = format!(
        r#"
        [server]
        trusted_proxies = ["127.0.0.1"]
        [[routes]]
        path = "/"
        targets = ["{}"]
        "#,
        up.url()
    );
    let config = Config::from_toml(&toml, &Env::default()).unwrap();
    let buf = SharedBuf::default();
    let access = AccessLog::to_writer(AccessFormat::Json, buf.clone()).unwrap();
    let gw =
        meshgate::Gateway::build_with_telemetry(config, RequestTelemetry::new(None, Some(access)))
            .unwrap();
    let gw = gateway::start_gateway(gw).await;
    let c = client();
    let s = statuses(&c, &gw, "/", 1, &[("x-forwarded-for", "203.0.113.9")]).await;
    assert_eq!(s, [200]);
    gw.state
        .proxy
        .telemetry
        .access_log()
        .unwrap()
        .flush(Duration::from_secs(5))
        .await;
    let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
    let line: serde_json::Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    assert_eq!(line["client"], "203.0.113.9:0", "{text}");
}

#[tokio::test]
async fn a_reload_keeps_buckets_while_a_limit_is_unchanged() {
    let up = TestUpstream::builder().start().await;
    let body = |rate: &str, timeout: &str| {
        format!(
            r#"
            [server]
            drain_delay = "0s"
            [policies.team]
            rate_limit = {{ rate = "{rate}", burst = 3 }}
            [[routes]]
            path = "/a"
            targets = ["{u}"]
            policies = ["team"]
            [[routes]]
            path = "/b"
            targets = ["{u}"]
            timeout = "{timeout}"
            policies = ["team"]
            "#,
            u = up.url()
        )
    };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gateway.toml");
    std::fs::write(&path, body("3/h", "30s")).unwrap();
    let config = Config::load(&path, &Env::default()).unwrap();
    let gw =
        meshgate::Gateway::build(config)
            .unwrap()
            .with_reload(path.clone(), Env::default(), false);
    let gw = gateway::start_gateway(gw).await;
    let c = client();
    assert_eq!(statuses(&c, &gw, "/a", 2, &[]).await, [200, 200]);
    let reload = |c: reqwest::Client, url: String| async move {
        let resp = c.post(url).send().await.unwrap();
        assert_eq!(resp.status(), 200, "{}", resp.text().await.unwrap());
    };
    // Route /b changes, the policy does not: /b is rebuilt on the same buckets.
    std::fs::write(&path, body("3/h", "20s")).unwrap();
    reload(c.clone(), gw.admin_url("/reload")).await;
    assert_eq!(statuses(&c, &gw, "/b", 2, &[]).await, [200, 429]);
    assert_eq!(statuses(&c, &gw, "/a", 1, &[]).await, [429]);
    // A changed limit starts with full buckets, still shared.
    std::fs::write(&path, body("4/h", "20s")).unwrap();
    reload(c.clone(), gw.admin_url("/reload")).await;
    let mut s = statuses(&c, &gw, "/a", 2, &[]).await;
    s.extend(statuses(&c, &gw, "/b", 2, &[]).await);
    assert_eq!(s, [200, 200, 200, 429]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_credentials_from_keys_or_the_url() {
    let Some(redis) =
        support::redis::start_with_password("redis_credentials", Some("s3cret")).await
    else {
        return;
    };
    let up = TestUpstream::builder().start().await;
    let port = redis.port;
    let c = client();
    for (redis_section, works) in [
        (
            format!("url = \"redis://127.0.0.1:{port}\"\npassword = \"s3cret\""),
            true,
        ),
        (
            format!("url = \"redis://default:s3cret@127.0.0.1:{port}\""),
            true,
        ),
        (
            format!("url = \"redis://127.0.0.1:{port}\"\npassword = \"wrong\""),
            false,
        ),
    ] {
        let gw = gateway::start(&format!(
            r#"
            [redis]
            {redis_section}
            timeout = "500ms"
            [[routes]]
            path = "/"
            targets = ["{}"]
            rate_limit = {{ rate = "2/h", burst = 2, key = "route", scope = "global", on_store_error = "deny" }}
            "#,
            up.url()
        ))
        .await;
        let s = statuses(&c, &gw, "/", 3, &[]).await;
        // Refused credentials are a store error: `deny` answers 429 throughout.
        let want = if works {
            [200, 200, 429]
        } else {
            [429, 429, 429]
        };
        assert_eq!(s, want, "{redis_section}");
        redis.cmd(&["FLUSHALL"]).await.unwrap();
        gw.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_rediss_handshake_is_a_store_error() {
    // A plain-TCP server behind a rediss:// URL: the TLS handshake fails (rustls is set up
    // with the gateway's provider rather than panicking for lack of one) and deny decides.
    let up = TestUpstream::builder().start().await;
    let url = fake_redis(b"+OK\r\n")
        .await
        .replace("redis://", "rediss://");
    let gw = global_gateway(&url, &up.url(), "burst = 3, on_store_error = \"deny\"").await;
    let c = client();
    assert_eq!(statuses(&c, &gw, "/x", 2, &[]).await, [429, 429]);
    assert_eq!(store_errors(&gw, "g"), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rediss_store_is_used_over_tls_with_its_own_ca() {
    let cert = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()]).unwrap();
    let (cert_pem, key_pem) = (cert.cert.pem(), cert.signing_key.serialize_pem());
    let Some(redis) = support::redis::start_tls(
        "a_rediss_store_is_used_over_tls_with_its_own_ca",
        &cert_pem,
        &key_pem,
    )
    .await
    else {
        return;
    };
    let url = redis.tls_url().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, &cert_pem).unwrap();
    let up = TestUpstream::builder().start().await;
    let c = client();

    // Trusting the server's CA: Redis decides over TLS (three of five, no store error).
    let extra = "burst = 3, on_store_error = \"deny\"";
    let gw = global_gateway_with(&url, &up.url(), extra, &format!("ca_file = {:?}", ca)).await;
    assert_eq!(
        statuses(&c, &gw, "/x", 5, &[]).await,
        [200, 200, 200, 429, 429]
    );
    assert_eq!(store_errors(&gw, "g"), 0, "every decision came from Redis");
    assert!(
        redis
            .cmd(&["KEYS", "meshgate:rl:*"])
            .await
            .is_ok_and(|v| v != redis::Value::Array(vec![])),
        "the bucket lives in Redis"
    );

    // With the system roots the certificate is refused: TLS is verified, deny decides.
    let gw = global_gateway(&url, &up.url(), extra).await;
    assert_eq!(statuses(&c, &gw, "/x", 2, &[]).await, [429, 429]);
    assert_eq!(store_errors(&gw, "g"), 2);
}

#[test]
fn redis_ca_file_is_checked() {
    let problems = |redis: &str| {
        Config::from_toml(&format!("[redis]\n{redis}\n"), &Env::default())
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default()
    };
    let dir = tempfile::tempdir().unwrap();
    let text = dir.path().join("not.pem");
    std::fs::write(&text, "hello").unwrap();
    let plain = problems(&format!(
        "url = \"redis://127.0.0.1:6379\"\nca_file = {text:?}"
    ));
    assert!(
        plain.contains("redis.ca_file") && plain.contains("rediss://"),
        "{plain}"
    );
    let missing = problems("url = \"rediss://127.0.0.1:6379\"\nca_file = \"/nonexistent/ca.pem\"");
    assert!(
        missing.contains("redis.ca_file") && missing.contains("/nonexistent/ca.pem"),
        "{missing}"
    );
    let not_pem = problems(&format!(
        "url = \"rediss://127.0.0.1:6379\"\nca_file = {text:?}"
    ));
    assert!(not_pem.contains("no PEM certificate"), "{not_pem}");
}
