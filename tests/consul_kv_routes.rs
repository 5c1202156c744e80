//! Routes kept in Consul KV (issue #13): added, changed and deleted keys take effect; an
//! invalid document keeps the last good version and shows a note; file routes win clashes.

mod support;

use std::time::Duration;

use support::consul::{ConsulEmulator, EmulatorOptions, Registration};
use support::gateway::{client, eventually, start, TestGateway};
use support::upstream::TestUpstream;

/// Upper bound for anything that should happen promptly; only reached when a test fails.
const LIMIT: Duration = Duration::from_secs(10);
const PREFIX: &str = "meshgate/routes/";

async fn start_consul() -> ConsulEmulator {
    ConsulEmulator::start_with(EmulatorOptions {
        jitter: false,
        ..EmulatorOptions::default()
    })
    .await
}

async fn upstream(name: &str) -> TestUpstream {
    TestUpstream::builder().name(name).start().await
}

/// A gateway on `consul` with KV routes on, and one file route `/file` to `file`.
async fn gateway(consul: &ConsulEmulator, file: &TestUpstream) -> TestGateway {
    let gw = start(&format!(
        r#"
        [discovery]
        provider = "consul"
        [discovery.consul]
        address = "{}"
        wait = "2s"
        startup_timeout = "5s"
        kv_prefix = "{PREFIX}"
        [[routes]]
        name = "file"
        path = "/file"
        targets = ["http://{}"]
        "#,
        consul.url(),
        file.addr()
    ))
    .await;
    let c = client();
    let url = gw.admin_url("/ready");
    assert!(
        eventually(LIMIT, || {
            let (c, url) = (c.clone(), url.clone());
            async move { c.get(url).send().await.unwrap().status() == 200 }
        })
        .await,
        "gateway never became ready"
    );
    gw
}

/// `(status, body)` of a GET on the main listener.
async fn get(gw: &TestGateway, path: &str) -> (u16, String) {
    let r = client().get(gw.url(path)).send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.text().await.unwrap())
}

/// Polls until `path` answers `status` with `body` (any body when `None`).
async fn answers(gw: &TestGateway, path: &str, status: u16, body: Option<&str>) -> bool {
    eventually(LIMIT, || async move {
        let (s, b) = get(gw, path).await;
        s == status && body.is_none_or(|want| b == want)
    })
    .await
}

async fn notes(gw: &TestGateway) -> Vec<String> {
    let v: serde_json::Value = client()
        .get(gw.admin_url("/status"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    v["notes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n.as_str().unwrap().to_owned())
        .collect()
}

async fn kv_errors(gw: &TestGateway) -> Option<f64> {
    let text = client()
        .get(gw.admin_url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find(|l| l.starts_with("meshgate_kv_route_errors "))
        .and_then(|l| l["meshgate_kv_route_errors ".len()..].parse().ok())
}

fn key(name: &str) -> String {
    format!("{PREFIX}{name}")
}

#[tokio::test]
async fn added_changed_and_deleted_keys_take_effect() {
    let consul = start_consul().await;
    let (file, a, b) = (
        upstream("file").await,
        upstream("a").await,
        upstream("b").await,
    );
    // A folder placeholder key is listed too and must be skipped.
    consul.kv_put(PREFIX, b"");
    consul.kv_put(
        &key("api"),
        format!(r#"{{"path": "/api", "targets": ["http://{}"]}}"#, a.addr()).as_bytes(),
    );
    let gw = gateway(&consul, &file).await;
    assert_eq!(get(&gw, "/api").await, (200, "a".to_owned()), "JSON route");

    // Changed target, now written as TOML.
    consul.kv_put(
        &key("api"),
        format!("path = \"/api\"\ntargets = [\"http://{}\"]\n", b.addr()).as_bytes(),
    );
    assert!(answers(&gw, "/api", 200, Some("b")).await, "TOML route");

    // Changed path.
    consul.kv_put(
        &key("api"),
        format!("path = \"/v2\"\ntargets = [\"http://{}\"]\n", b.addr()).as_bytes(),
    );
    assert!(answers(&gw, "/v2", 200, Some("b")).await);
    assert_eq!(get(&gw, "/api").await.0, 404, "old path gone");
    assert_eq!(
        gw.state
            .proxy
            .table
            .load()
            .routes()
            .iter()
            .filter(|r| &*r.name == "api")
            .count(),
        1,
        "the key's last segment names the route"
    );

    // Deleted.
    consul.kv_delete(&key("api"));
    assert!(
        answers(&gw, "/v2", 404, None).await,
        "deleted key stops routing"
    );
    assert_eq!(get(&gw, "/file").await, (200, "file".to_owned()));
    assert_eq!(kv_errors(&gw).await, Some(0.0));
}

#[tokio::test]
async fn a_route_naming_a_service_is_watched() {
    let consul = start_consul().await;
    let (file, orders) = (upstream("file").await, upstream("orders").await);
    consul.register(Registration::new(
        "orders-1",
        "orders",
        "127.0.0.1",
        orders.addr().port(),
    ));
    let gw = gateway(&consul, &file).await;
    assert_eq!(get(&gw, "/orders").await.0, 404);
    consul.kv_put(
        &key("orders"),
        br#"{"path": "/orders", "service": "orders", "load_balancer": "random"}"#,
    );
    assert!(
        answers(&gw, "/orders", 200, Some("orders")).await,
        "{:?}",
        notes(&gw).await
    );

    // A service Consul does not know: noted with the key, the other routes unaffected.
    consul.kv_put(&key("ghost"), br#"{"path": "/ghost", "service": "ghost"}"#);
    let noted = eventually(LIMIT, || async {
        notes(&gw).await.iter().any(|n| {
            n.starts_with("KV key meshgate/routes/ghost:")
                && n.contains("ghost is unknown to Consul")
        })
    })
    .await;
    assert!(noted, "{:?}", notes(&gw).await);
    assert_eq!(get(&gw, "/orders").await, (200, "orders".to_owned()));
}

#[tokio::test]
async fn invalid_document_keeps_last_good_version_with_a_note() {
    let consul = start_consul().await;
    let (file, a, b) = (
        upstream("file").await,
        upstream("a").await,
        upstream("b").await,
    );
    consul.kv_put(
        &key("api"),
        format!("path = \"/api\"\ntargets = [\"http://{}\"]\n", a.addr()).as_bytes(),
    );
    let gw = gateway(&consul, &file).await;
    assert_eq!(get(&gw, "/api").await, (200, "a".to_owned()));

    // Neither TOML nor JSON; and at the same time another key's valid change applies.
    consul.kv_put(&key("api"), b"this is not a route {");
    consul.kv_put(
        &key("other"),
        format!(
            r#"{{"path": "/other", "targets": ["http://{}"]}}"#,
            b.addr()
        )
        .as_bytes(),
    );
    assert!(answers(&gw, "/other", 200, Some("b")).await);
    let noted = eventually(LIMIT, || async {
        notes(&gw).await.iter().any(|n| {
            n.starts_with("KV key meshgate/routes/api:") && n.contains("last good version stays")
        })
    })
    .await;
    assert!(noted, "no note naming the key: {:?}", notes(&gw).await);
    assert_eq!(get(&gw, "/api").await, (200, "a".to_owned()), "last good");
    assert_eq!(kv_errors(&gw).await, Some(1.0));

    // Bad values: the note names the key path inside the document.
    consul.kv_put(
        &key("api"),
        format!(
            r#"{{"path": "/api", "targets": ["http://{}"], "timeout": "soon", "colour": 1}}"#,
            b.addr()
        )
        .as_bytes(),
    );
    let noted = eventually(LIMIT, || async {
        let n = notes(&gw).await;
        n.iter().any(|n| {
            n.starts_with("KV key meshgate/routes/api:")
                && n.contains("timeout:")
                && n.contains("colour: unknown key")
        })
    })
    .await;
    assert!(noted, "{:?}", notes(&gw).await);
    assert_eq!(
        get(&gw, "/api").await,
        (200, "a".to_owned()),
        "still last good"
    );

    // A new key that is invalid from the start is simply left out.
    consul.kv_put(&key("new"), br#"{"path": "/new"}"#);
    let noted = eventually(LIMIT, || async {
        notes(&gw).await.iter().any(|n| {
            n.starts_with("KV key meshgate/routes/new:")
                && n.contains("needs either targets or service")
                && n.ends_with("left out")
        })
    })
    .await;
    assert!(noted, "{:?}", notes(&gw).await);
    assert_eq!(get(&gw, "/new").await.0, 404);
    assert_eq!(kv_errors(&gw).await, Some(2.0));

    // Fixed and deleted: the notes go, the fixed version routes.
    consul.kv_put(
        &key("api"),
        format!(r#"{{"path": "/api", "targets": ["http://{}"]}}"#, b.addr()).as_bytes(),
    );
    consul.kv_delete(&key("new"));
    assert!(answers(&gw, "/api", 200, Some("b")).await);
    let clean = eventually(LIMIT, || async {
        !notes(&gw).await.iter().any(|n| n.starts_with("KV key"))
    })
    .await;
    assert!(clean, "{:?}", notes(&gw).await);
    assert_eq!(kv_errors(&gw).await, Some(0.0));
}

#[tokio::test]
async fn file_routes_win_clashes() {
    let consul = start_consul().await;
    let (file, a) = (upstream("file").await, upstream("a").await);
    consul.kv_put(
        &key("shadow"),
        format!(r#"{{"path": "/file", "targets": ["http://{}"]}}"#, a.addr()).as_bytes(),
    );
    consul.kv_put(
        &key("named"),
        format!(
            r#"{{"name": "file", "path": "/named", "targets": ["http://{}"]}}"#,
            a.addr()
        )
        .as_bytes(),
    );
    let gw = gateway(&consul, &file).await;
    let noted = eventually(LIMIT, || async {
        let n = notes(&gw).await;
        ["shadow", "named"].iter().all(|k| {
            n.iter().any(|n| {
                n.starts_with(&format!("KV key meshgate/routes/{k}:"))
                    && n.contains("clashes with configured route file")
            })
        })
    })
    .await;
    assert!(noted, "{:?}", notes(&gw).await);
    assert_eq!(get(&gw, "/file").await, (200, "file".to_owned()));
    assert_eq!(get(&gw, "/named").await.0, 404);
    assert_eq!(kv_errors(&gw).await, Some(2.0));
}

#[tokio::test]
async fn consul_errors_keep_the_last_good_table() {
    let consul = start_consul().await;
    let (file, a, b) = (
        upstream("file").await,
        upstream("a").await,
        upstream("b").await,
    );
    consul.kv_put(
        &key("api"),
        format!(r#"{{"path": "/api", "targets": ["http://{}"]}}"#, a.addr()).as_bytes(),
    );
    let gw = gateway(&consul, &file).await;
    assert_eq!(get(&gw, "/api").await, (200, "a".to_owned()));

    // The blocked query is cut and the next three KV reads fail.
    let before = consul.requests_to("/v1/kv/").len();
    consul.fail_next_on("/v1/kv/", 3, 500, "rpc error: No cluster leader");
    consul.drop_blocked();
    let retried = eventually(LIMIT, || async {
        assert_eq!(
            get(&gw, "/api").await,
            (200, "a".to_owned()),
            "during the outage"
        );
        consul.requests_to("/v1/kv/").len() >= before + 4
    })
    .await;
    assert!(retried, "the KV watch did not retry");
    assert_eq!(
        get(&gw, "/api").await,
        (200, "a".to_owned()),
        "after the outage"
    );

    // The watch is back: changes apply again.
    consul.kv_put(
        &key("api"),
        format!(r#"{{"path": "/api", "targets": ["http://{}"]}}"#, b.addr()).as_bytes(),
    );
    assert!(answers(&gw, "/api", 200, Some("b")).await);
}
