//! Live reload of the real gateway from its file: `POST /reload` applies a new route, keeps
//! traffic flowing and pool counters intact, refuses an invalid file while the old config
//! keeps serving, and `watch` picks up edits by itself.

mod support;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use meshgate::config::{Config, Env};
use meshgate::Gateway;
use serde_json::Value;
use support::gateway::{client, eventually, start_gateway, TestGateway};
use support::upstream::TestUpstream;
use support::util::{endpoint_status, status};
use tempfile::TempDir;

/// Every config here ends with this: no drain on stop.
const SERVER: &str = "[server]\ndrain_delay = \"0s\"\n";

/// Replaces the file in one step (write a sibling, rename), so a watcher never reads half of it.
fn write_config(path: &Path, body: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, format!("{body}\n{SERVER}")).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// Writes `body` to a temp file and starts a gateway from it with reloading enabled.
async fn from_file(body: &str, watch: bool) -> (TestGateway, PathBuf, TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gateway.toml");
    write_config(&path, body);
    let config = Config::load(&path, &Env::default()).unwrap();
    let gw = Gateway::build(config)
        .unwrap()
        .with_reload(path.clone(), Env::default(), watch);
    (start_gateway(gw).await, path, dir)
}

async fn post_reload(c: &reqwest::Client, gw: &TestGateway) -> (u16, Value) {
    let resp = c.post(gw.admin_url("/reload")).send().await.unwrap();
    let code = resp.status().as_u16();
    (code, resp.json().await.unwrap())
}

async fn get(c: &reqwest::Client, url: String) -> (u16, String) {
    let resp = c.get(url).send().await.unwrap();
    (resp.status().as_u16(), resp.text().await.unwrap())
}

fn route(name: &str, path: &str, target: &TestUpstream) -> String {
    format!(
        "[[routes]]\nname = \"{name}\"\npath = \"{path}\"\ntargets = [\"{}\"]\n",
        target.url()
    )
}

#[tokio::test]
async fn post_reload_applies_a_new_route() {
    let c = client();
    let a = TestUpstream::builder().name("a").start().await;
    let b = TestUpstream::builder().name("b").start().await;
    let (gw, path, _dir) = from_file(&route("a", "/a", &a), false).await;
    assert_eq!(get(&c, gw.url("/a/x")).await, (200, "a".into()));
    assert_eq!(get(&c, gw.url("/b/x")).await.0, 404);

    // A new route, plus a setting that only a restart can change.
    write_config(
        &path,
        &format!(
            "listen = \"127.0.0.1:1\"\n{}{}",
            route("a", "/a", &a),
            route("b", "/b", &b)
        ),
    );
    let (code, body) = post_reload(&c, &gw).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["reloaded"], true);
    let restart = body["restart_needed"].as_array().unwrap();
    assert!(
        restart
            .iter()
            .any(|r| r.as_str().unwrap().starts_with("listen")),
        "{body}"
    );

    assert_eq!(get(&c, gw.url("/b/x")).await, (200, "b".into()));
    assert_eq!(get(&c, gw.url("/a/x")).await, (200, "a".into()));
    let doc = status(&c, &gw).await;
    let paths: Vec<&str> = doc["routes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["path"].as_str().unwrap())
        .collect();
    assert!(paths.contains(&"/b") && paths.contains(&"/a"), "{paths:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_requests_across_twenty_reloads_never_fail() {
    const REQUESTS: usize = 2000;
    const RELOADS: usize = 20;
    let one = TestUpstream::builder().name("one").start().await;
    let two = TestUpstream::builder().name("two").start().await;
    // The same route on `/`, once with its own target, once through a static service: every
    // reload swaps the route and its pool.
    let config_a = route("main", "/", &one);
    let config_b = format!(
        "[discovery.static.services]\nsvc = [\"{}\"]\n[[routes]]\nname = \"main\"\npath = \"/\"\nservice = \"svc\"\ntimeout = \"5s\"\n",
        two.url()
    );
    let (gw, path, _dir) = from_file(&config_a, false).await;
    let gw = Arc::new(gw);

    let issued = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    let failures = Arc::new(Mutex::new(Vec::new()));
    let mut workers = Vec::new();
    for _ in 0..8 {
        let (c, url) = (client(), gw.url("/work"));
        let (issued, done, failures) = (issued.clone(), done.clone(), failures.clone());
        workers.push(tokio::spawn(async move {
            while issued.fetch_add(1, Ordering::SeqCst) < REQUESTS {
                let outcome = match c.get(&url).send().await {
                    Ok(r) if r.status() == 200 => r.text().await.map_err(|e| e.to_string()),
                    Ok(r) => Err(format!("status {}", r.status())),
                    Err(e) => Err(e.to_string()),
                };
                match outcome {
                    Ok(body) if body == "one" || body == "two" => {}
                    Ok(body) => failures.lock().unwrap().push(format!("body {body:?}")),
                    Err(e) => failures.lock().unwrap().push(e),
                }
                done.fetch_add(1, Ordering::SeqCst);
            }
        }));
    }

    // Reloads are paced by progress, not by sleeping: the next one waits for more requests.
    let c = client();
    let mut last_reload_at = 0;
    for i in 0..RELOADS {
        let next = if i % 2 == 0 { &config_b } else { &config_a };
        write_config(&path, next);
        let (code, body) = post_reload(&c, &gw).await;
        assert_eq!(code, 200, "reload {i}: {body}");
        last_reload_at = done.load(Ordering::SeqCst);
        let target = (i + 1) * REQUESTS / (RELOADS + 2);
        assert!(
            eventually(Duration::from_secs(10), || async {
                done.load(Ordering::SeqCst) >= target
            })
            .await,
            "requests stalled after reload {i}"
        );
    }
    for w in workers {
        w.await.unwrap();
    }

    let failures = failures.lock().unwrap();
    assert!(
        failures.is_empty(),
        "{} failures: {:?}",
        failures.len(),
        &failures[..failures.len().min(10)]
    );
    assert_eq!(done.load(Ordering::SeqCst), REQUESTS);
    assert!(
        last_reload_at < REQUESTS,
        "the reloads happened while requests flowed"
    );
    assert_eq!(one.hits() + two.hits(), REQUESTS);
    assert!(one.hits() > 0 && two.hits() > 0, "both configs served");
}

#[tokio::test]
async fn an_invalid_file_is_refused_and_the_old_config_keeps_serving() {
    let c = client();
    let up = TestUpstream::builder().name("up").start().await;
    let (gw, path, _dir) = from_file(&route("main", "/", &up), false).await;

    write_config(
        &path,
        &format!(
            "[[routes]]\nname = \"main\"\npath = \"/\"\ntargets = [\"{}\"]\nload_balancer = \"bogus\"\ntimeout = \"soon\"\ncolour = \"red\"\n",
            up.url()
        ),
    );
    let (code, body) = post_reload(&c, &gw).await;
    assert_eq!(code, 400, "{body}");
    assert_eq!(body["reloaded"], false);
    let problems: Vec<&str> = body["problems"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap())
        .collect();
    // Every problem at once, each with its key path.
    for key in [
        "routes[0].load_balancer",
        "routes[0].timeout",
        "routes[0].colour",
    ] {
        assert!(
            problems.iter().any(|p| p.starts_with(key)),
            "{key} missing: {problems:?}"
        );
    }
    assert_eq!(get(&c, gw.url("/x")).await, (200, "up".into()));

    // Not even TOML.
    write_config(&path, "[[routes]\npath = ");
    let (code, body) = post_reload(&c, &gw).await;
    assert_eq!(code, 400, "{body}");
    assert!(!body["problems"].as_array().unwrap().is_empty(), "{body}");
    assert_eq!(get(&c, gw.url("/x")).await, (200, "up".into()));

    // Gone altogether.
    std::fs::remove_file(&path).unwrap();
    let (code, body) = post_reload(&c, &gw).await;
    assert_eq!(code, 400, "{body}");
    assert_eq!(get(&c, gw.url("/x")).await, (200, "up".into()));
    let doc = status(&c, &gw).await;
    assert_eq!(doc["routes"][0]["name"], "main");
    assert_eq!(doc["routes"][0]["load_balancer"], "round_robin");
}

#[tokio::test]
async fn unchanged_services_keep_their_pools_and_counters() {
    let c = client();
    let keep = TestUpstream::builder().name("keep").start().await;
    let other = TestUpstream::builder().name("other").start().await;
    let kept_service = format!(
        "[discovery.static.services]\nkeep = [\"{}\"]\n[[routes]]\nname = \"k\"\npath = \"/k\"\nservice = \"keep\"\n",
        keep.url()
    );
    let (gw, path, _dir) = from_file(
        &format!(
            "{kept_service}{}timeout = \"1s\"\n",
            route("o", "/o", &other)
        ),
        false,
    )
    .await;
    for _ in 0..5 {
        assert_eq!(get(&c, gw.url("/k")).await.0, 200);
    }
    let pool = gw.pool("keep");
    let requests = |v: Value| v["requests"].as_u64().unwrap();
    assert_eq!(
        requests(endpoint_status(&c, &gw, "keep", keep.addr()).await),
        5
    );

    // Another route changes and one is added; service `keep` and route `k` do not.
    write_config(
        &path,
        &format!(
            "{kept_service}{}timeout = \"2s\"\n{}",
            route("o", "/o", &other),
            route("n", "/n", &other)
        ),
    );
    let (code, body) = post_reload(&c, &gw).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(get(&c, gw.url("/n")).await.0, 200, "the reload took effect");

    assert!(Arc::ptr_eq(&pool, &gw.pool("keep")), "same pool");
    assert_eq!(
        requests(endpoint_status(&c, &gw, "keep", keep.addr()).await),
        5
    );
    for _ in 0..3 {
        assert_eq!(get(&c, gw.url("/k")).await.0, 200);
    }
    assert_eq!(
        requests(endpoint_status(&c, &gw, "keep", keep.addr()).await),
        8
    );
    // The unchanged route kept its own counters too.
    let health: Value = c
        .get(gw.admin_url("/health"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let k = health["routes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == "k")
        .unwrap();
    assert_eq!(k["requests"], 8, "{k}");
}

#[tokio::test]
async fn a_watched_file_is_reloaded_when_it_changes() {
    let c = client();
    let a = TestUpstream::builder().name("a").start().await;
    let w = TestUpstream::builder().name("w").start().await;
    let (gw, path, _dir) = from_file(&route("a", "/a", &a), true).await;
    assert_eq!(get(&c, gw.url("/w")).await.0, 404);

    write_config(
        &path,
        &format!("{}{}", route("a", "/a", &a), route("w", "/w", &w)),
    );
    assert!(
        eventually(Duration::from_secs(5), || async {
            get(&c, gw.url("/w")).await == (200, "w".to_owned())
        })
        .await,
        "the edit was not picked up"
    );
    assert_eq!(get(&c, gw.url("/a")).await, (200, "a".into()));
}

#[tokio::test]
async fn probes_follow_the_reloaded_health_check() {
    let c = client();
    let good = TestUpstream::builder().name("good").start().await;
    let sick = TestUpstream::builder()
        .name("sick")
        .route("/health", 500, "down")
        .start()
        .await;
    let services = format!(
        "[discovery.static.services]\nsvc = [\"{}\", \"{}\"]\n",
        good.url(),
        sick.url()
    );
    let probed = format!(
        "{services}[[routes]]\nname = \"main\"\npath = \"/\"\nservice = \"svc\"\nhealth_check = {{ interval = \"50ms\", timeout = \"200ms\", jitter = \"0s\" }}\n"
    );
    let (gw, path, _dir) = from_file(&probed, false).await;
    let healthy = |v: Value| v["healthy"].as_bool().unwrap();
    assert!(
        eventually(Duration::from_secs(3), || async {
            !healthy(endpoint_status(&c, &gw, "svc", sick.addr()).await)
        })
        .await
    );

    // The same check after an unrelated change: the verdict stands.
    write_config(&path, &format!("{probed}timeout = \"5s\"\n"));
    assert_eq!(post_reload(&c, &gw).await.0, 200);
    assert!(!healthy(endpoint_status(&c, &gw, "svc", sick.addr()).await));
    for _ in 0..6 {
        assert_eq!(get(&c, gw.url("/x")).await, (200, "good".into()));
    }

    // Without a check nothing would ever mark it healthy again, so the reload does.
    write_config(
        &path,
        &format!("{services}[[routes]]\nname = \"main\"\npath = \"/\"\nservice = \"svc\"\n"),
    );
    assert_eq!(post_reload(&c, &gw).await.0, 200);
    assert!(healthy(endpoint_status(&c, &gw, "svc", sick.addr()).await));
    let before = sick.hits_on("/x");
    for _ in 0..6 {
        assert_eq!(get(&c, gw.url("/x")).await.0, 200);
    }
    assert_eq!(sick.hits_on("/x") - before, 3, "back in the rotation");
    // And the probe task is gone: over four probe intervals of traffic, no new round starts.
    let probes = sick.hits_on("/health");
    let started = tokio::time::Instant::now();
    while started.elapsed() < Duration::from_millis(200) {
        assert_eq!(get(&c, gw.url("/x")).await.0, 200);
    }
    assert!(sick.hits_on("/health") <= probes + 1, "probing continued");
}
