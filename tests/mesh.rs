//! The service mesh end to end: the real gateway, the Consul emulator's Connect CA, test sidecars
//! that demand mTLS from the mesh, and real upstreams behind them.

mod support;

use std::time::Duration;

use serde_json::Value;
use support::consul::{AclConfig, ConsulEmulator, EmulatorOptions, Registration, TokenScope};
use support::gateway::{client, eventually, start, TestGateway};

const LIMIT: Duration = Duration::from_secs(15);

/// Waits for `check` to hold (polling, bounded by `LIMIT`), or fails the test.
async fn until<F, Fut>(check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    assert!(
        eventually(LIMIT, check).await,
        "condition not met within {LIMIT:?}"
    );
}
use support::sidecar::{Alpn, Deny, Sidecar};
use support::upstream::TestUpstream;

fn options() -> EmulatorOptions {
    EmulatorOptions {
        jitter: false,
        ..EmulatorOptions::default()
    }
}

/// A gateway with one mesh route `/web` to service `web`.
async fn gateway(consul: &ConsulEmulator, extra: &str) -> TestGateway {
    let _ = rustls::crypto::ring::default_provider().install_default();
    start(&format!(
        r#"
        [discovery]
        provider = "consul"
        [discovery.consul]
        address = "{}"
        wait = "2s"
        startup_timeout = "5s"
        {extra}
        [[routes]]
        name = "web"
        path = "/web"
        service = "web"
        connect = true
        "#,
        consul.url()
    ))
    .await
}

/// An upstream named `name` behind a sidecar for `web`, registered in the emulator.
async fn sidecar(consul: &ConsulEmulator, name: &str, alpn: Alpn) -> (TestUpstream, Sidecar) {
    let up = TestUpstream::builder().name(name).start().await;
    let sc = Sidecar::start(consul, "web", alpn, up.addr()).await;
    consul.register(
        Registration::new(
            format!("{name}-sidecar-proxy"),
            "web-sidecar-proxy",
            "127.0.0.1",
            sc.addr().port(),
        )
        .sidecar_for("web"),
    );
    (up, sc)
}

async fn get(gw: &TestGateway, path: &str) -> (u16, String) {
    let resp = client().get(gw.url(path)).send().await.unwrap();
    (resp.status().as_u16(), resp.text().await.unwrap())
}

async fn ready(gw: &TestGateway) -> (u16, Value) {
    let resp = client().get(gw.admin_url("/ready")).send().await.unwrap();
    (resp.status().as_u16(), resp.json().await.unwrap())
}

#[tokio::test]
async fn mesh_route_balances_over_sidecars_with_pooled_mtls_and_the_gateway_identity() {
    let consul = ConsulEmulator::start_with(options()).await;
    let (a, sa) = sidecar(&consul, "web-1", Alpn::Http11).await;
    let (b, sb) = sidecar(&consul, "web-2", Alpn::H2).await;
    // A plain (non-mesh) instance of the service must never be used by a mesh route.
    let plain = TestUpstream::builder().name("plain").start().await;
    consul.register(Registration::new(
        "web-plain",
        "web",
        "127.0.0.1",
        plain.addr().port(),
    ));
    let gw = gateway(&consul, "").await;
    until(|| async { ready(&gw).await.0 == 200 }).await;
    for _ in 0..20 {
        let (status, body) = get(&gw, "/web/x").await;
        assert_eq!(status, 200, "{body}");
        assert!(body == "web-1" || body == "web-2", "{body}");
    }
    assert!(a.hits() >= 5 && b.hits() >= 5, "{} {}", a.hits(), b.hits());
    assert_eq!(plain.hits(), 0);
    // Every request was authenticated as the gateway, over a handful of pooled connections.
    let me = consul.service_uri("meshgate");
    for sc in [&sa, &sb] {
        assert!(sc.callers().iter().all(|c| c.as_deref() == Some(&*me)));
        assert!(sc.handshakes() <= 3, "handshakes {}", sc.handshakes());
    }
    let seen = a.last_request().unwrap();
    assert_eq!(
        seen.headers.get("x-forwarded-client-cert").unwrap(),
        &format!("URI={me}")
    );
    // /status shows the identity; /explain says the route is a mesh route and what it expects.
    let status: Value = client()
        .get(gw.admin_url("/status"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(status["mesh"]["leaf"]["spiffe_id"], me.as_str());
    assert_eq!(status["mesh"]["loaded"], true);
    let explain: Value = client()
        .get(gw.admin_url("/explain?url=/web/x"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        explain["route"]["mesh"]["expects"],
        consul.service_uri("web").as_str()
    );
    let metrics = client()
        .get(gw.admin_url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(metrics.contains("meshgate_mesh_leaf_expiry_seconds"));
}

#[tokio::test]
async fn a_sidecar_with_another_identity_or_a_foreign_ca_is_refused_and_the_next_one_used() {
    let consul = ConsulEmulator::start_with(options()).await;
    let (good, _sg) = sidecar(&consul, "good", Alpn::Http11).await;
    let (wrong, sw) = sidecar(&consul, "wrong", Alpn::Http11).await;
    sw.set_service(&consul, "api");
    let (foreign, sf) = sidecar(&consul, "foreign", Alpn::Http11).await;
    let (chain, key) = consul.foreign_ca().issue_leaf("web");
    sf.present(&consul, &chain, &key);
    let gw = gateway(&consul, "").await;
    until(|| async { ready(&gw).await.0 == 200 }).await;
    for _ in 0..12 {
        let (status, body) = get(&gw, "/web/x").await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body, "good");
    }
    assert_eq!(good.hits(), 12);
    assert_eq!(wrong.hits(), 0);
    assert_eq!(foreign.hits(), 0);
}

#[tokio::test]
async fn only_impostors_left_means_502_and_nothing_reaches_them() {
    let consul = ConsulEmulator::start_with(options()).await;
    let (wrong, sw) = sidecar(&consul, "wrong", Alpn::Http11).await;
    sw.set_service(&consul, "api");
    let gw = gateway(&consul, "").await;
    until(|| async { ready(&gw).await.0 == 200 }).await;
    let (status, body) = get(&gw, "/web/x").await;
    assert_eq!(status, 502, "{body}");
    assert_eq!(wrong.hits(), 0);
}

#[tokio::test]
async fn leaf_renewal_and_root_rotation_fail_no_request() {
    let consul = ConsulEmulator::start_with(options()).await;
    let (up, sc) = sidecar(&consul, "web-1", Alpn::Http11).await;
    let gw = gateway(&consul, "").await;
    until(|| async { ready(&gw).await.0 == 200 }).await;
    let serial = |s: &Value| s["mesh"]["leaf"]["serial"].clone();
    let status = || async {
        client()
            .get(gw.admin_url("/status"))
            .send()
            .await
            .unwrap()
            .json::<Value>()
            .await
            .unwrap()
    };
    let first = serial(&status().await);
    // Warm the pool so the handshakes counted next are the ones a change forces.
    assert_eq!(get(&gw, "/web/x").await.0, 200);
    let handshakes_before = sc.handshakes();
    let stream = async {
        let mut failed = 0;
        for _ in 0..60 {
            let (s, _) = get(&gw, "/web/x").await;
            failed += usize::from(s != 200);
        }
        failed
    };
    let rotate = async {
        consul.force_renew_leaf("meshgate");
        until(|| async { serial(&status().await) != first }).await;
        // Root rotation with a cross-signed intermediate: the sidecar moves to a new-root leaf
        // while the gateway still trusts both roots.
        consul.rotate_root(true);
        sc.reload(&consul);
        until(|| async {
            status().await["mesh"]["roots"]["ids"]
                .as_array()
                .is_some_and(|ids| ids.len() == 2)
        })
        .await;
    };
    let (failed, ()) = tokio::join!(stream, rotate);
    assert_eq!(failed, 0);
    for _ in 0..5 {
        assert_eq!(get(&gw, "/web/x").await.0, 200);
    }
    assert!(up.hits() >= 66);
    assert!(status().await["mesh"]["rotations"].as_u64().unwrap() >= 2);
    // The new leaf and roots were used on new connections (the pool was not kept across them).
    assert!(
        sc.handshakes() > handshakes_before,
        "{} handshakes before, {} after",
        handshakes_before,
        sc.handshakes()
    );
}

/// The `meshgate_mesh_denials_total` sample of route `web`.
async fn denials(gw: &TestGateway) -> String {
    let metrics = client()
        .get(gw.admin_url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    metrics
        .lines()
        .find(|l| l.starts_with("meshgate_mesh_denials_total{route=\"web\"}"))
        .unwrap_or_else(|| panic!("{metrics}"))
        .to_owned()
}

#[tokio::test]
async fn an_l7_denial_is_answered_403_by_the_gateway_and_not_retried() {
    let consul = ConsulEmulator::start_with(options()).await;
    let (a, sa) = sidecar(&consul, "web-1", Alpn::Http11).await;
    let (b, sb) = sidecar(&consul, "web-2", Alpn::Http11).await;
    let me = consul.service_uri("meshgate");
    sa.deny(&me, Deny::L7);
    sb.deny(&me, Deny::L7);
    let gw = gateway(&consul, "").await;
    until(|| async { ready(&gw).await.0 == 200 }).await;
    for path in ["/web/x", "/web/y"] {
        let resp = client().get(gw.url(path)).send().await.unwrap();
        assert_eq!(resp.status(), 403);
        let body: Value = resp.json().await.unwrap();
        let message = body["message"].as_str().unwrap();
        assert!(
            message.contains("intention")
                && message.contains("meshgate")
                && message.contains("web"),
            "{message}"
        );
    }
    // Each request reached one sidecar once: a denial is not retried on the other instance.
    assert_eq!(sa.forwarded() + sb.forwarded(), 0);
    assert_eq!(a.hits() + b.hits(), 0);
    assert!(denials(&gw).await.ends_with(" 2"));
    sa.allow(&me);
    sb.allow(&me);
    assert_eq!(get(&gw, "/web/z").await.0, 200);
    assert_eq!(a.hits() + b.hits(), 1);
}

#[tokio::test]
async fn an_l4_denial_is_answered_502_naming_the_intention_and_not_retried() {
    let consul = ConsulEmulator::start_with(options()).await;
    let (a, sa) = sidecar(&consul, "web-1", Alpn::None).await;
    let (b, sb) = sidecar(&consul, "web-2", Alpn::None).await;
    let me = consul.service_uri("meshgate");
    sa.deny(&me, Deny::L4);
    sb.deny(&me, Deny::L4);
    let gw = gateway(&consul, "").await;
    until(|| async { ready(&gw).await.0 == 200 }).await;
    let resp = client().get(gw.url("/web/x")).send().await.unwrap();
    assert_eq!(resp.status(), 502);
    let body: Value = resp.json().await.unwrap();
    assert!(
        body["message"].as_str().unwrap().contains("intention"),
        "{body}"
    );
    // One handshake in all: the denial was not retried on the other sidecar.
    assert_eq!(sa.handshakes() + sb.handshakes(), 1);
    assert_eq!(a.hits() + b.hits(), 0);
    assert!(denials(&gw).await.ends_with(" 1"));
}

#[tokio::test]
async fn ready_waits_for_the_identity_and_says_when_the_token_cannot_get_a_leaf() {
    let acl = AclConfig::new().token("reader", TokenScope::services(["web", "web-sidecar-proxy"]));
    let consul = ConsulEmulator::start_with(EmulatorOptions {
        acl: Some(acl),
        ..options()
    })
    .await;
    let (up, _sc) = sidecar(&consul, "web-1", Alpn::Http11).await;
    let gw = gateway(&consul, "token = \"reader\"").await;
    until(|| async {
        let (status, body) = ready(&gw).await;
        status == 503
            && body["mesh"]
                .as_str()
                .is_some_and(|m| m.contains("service:write on meshgate"))
    })
    .await;
    let (status, body) = get(&gw, "/web/x").await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("mesh identity"), "{body}");
    assert_eq!(up.hits(), 0);
}

#[tokio::test]
async fn an_expired_leaf_fails_mesh_requests_with_a_clear_502() {
    let consul = ConsulEmulator::start_with(options()).await;
    // Valid from a minute ago (Consul's skew buffer) for 62s: about 2 s left when issued, and
    // the emulator does not renew it on its own.
    let (_up, _sc) = sidecar(&consul, "web-1", Alpn::Http11).await;
    // Only the gateway's leaf, issued after the sidecar's, is short-lived.
    consul.set_leaf_ttl(Duration::from_secs(62));
    let gw = gateway(&consul, "").await;
    until(|| async { ready(&gw).await.0 == 200 }).await;
    // The agent is gone from now on: nobody renews the leaf.
    consul.fail_next_on(
        "/v1/agent/connect/ca/leaf/",
        usize::MAX,
        500,
        "agent unreachable",
    );
    until(|| async { get(&gw, "/web/x").await.0 == 502 }).await;
    let resp = client().get(gw.url("/web/x")).send().await.unwrap();
    let body: Value = resp.json().await.unwrap();
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("mesh certificate"),
        "{body}"
    );
}

#[tokio::test]
async fn websocket_upgrades_work_over_mesh_connections() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let consul = ConsulEmulator::start_with(options()).await;
    let echo = support::ws::WsEcho::start().await;
    let sc = Sidecar::start(&consul, "web", Alpn::H2, echo.addr).await;
    consul.register(
        Registration::new(
            "ws-sidecar",
            "web-sidecar-proxy",
            "127.0.0.1",
            sc.addr().port(),
        )
        .sidecar_for("web"),
    );
    let gw = gateway(&consul, "").await;
    until(|| async { ready(&gw).await.0 == 200 }).await;
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{}/web/ws", gw.addr))
        .await
        .unwrap();
    ws.send(Message::text("through the mesh")).await.unwrap();
    assert_eq!(
        ws.next().await.unwrap().unwrap(),
        Message::text("through the mesh")
    );
    // The upgrade went over mTLS as the gateway, on an HTTP/1.1 connection (an h2 sidecar too).
    assert_eq!(
        sc.callers().last().cloned().flatten(),
        Some(consul.service_uri("meshgate"))
    );
    assert_eq!(echo.handshakes.lock().unwrap().len(), 1);
}
