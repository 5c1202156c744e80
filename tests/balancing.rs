//! Each balancer's distribution through the real gateway, and pools that change at run time.

mod support;

use std::collections::HashMap;
use std::time::Duration;

use meshgate::discovery::Discovered;
use support::gateway::{client, eventually, start};
use support::upstream::TestUpstream;

async fn upstreams(n: usize) -> Vec<TestUpstream> {
    let mut v = Vec::new();
    for i in 0..n {
        v.push(TestUpstream::builder().name(&format!("u{i}")).start().await);
    }
    v
}

fn targets(ups: &[TestUpstream], weights: &[u32]) -> String {
    ups.iter()
        .zip(weights)
        .map(|(u, w)| format!("{{ url = \"{}\", weight = {w} }}", u.url()))
        .collect::<Vec<_>>()
        .join(", ")
}

async fn gateway_for(
    policy: &str,
    ups: &[TestUpstream],
    weights: &[u32],
) -> support::gateway::TestGateway {
    start(&format!(
        r#"
        [discovery.static.services]
        svc = [{}]
        [[routes]]
        path = "/"
        service = "svc"
        load_balancer = "{policy}"
        "#,
        targets(ups, weights)
    ))
    .await
}

/// Sends `n` requests one after another and counts who answered.
async fn tally(url: &str, n: usize) -> HashMap<String, usize> {
    let c = client();
    let mut out = HashMap::new();
    for _ in 0..n {
        let body = c.get(url).send().await.unwrap().text().await.unwrap();
        *out.entry(body).or_insert(0) += 1;
    }
    out
}

#[tokio::test]
async fn round_robin_alternates_exactly() {
    let ups = upstreams(2).await;
    let gw = gateway_for("round_robin", &ups, &[1, 5]).await;
    let c = client();
    let mut seq = Vec::new();
    for _ in 0..6 {
        seq.push(
            c.get(gw.url("/"))
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap(),
        );
    }
    assert!(seq.windows(2).all(|w| w[0] != w[1]), "{seq:?}");
    assert_eq!(ups[0].hits(), 3);
    assert_eq!(ups[1].hits(), 3);
}

#[tokio::test]
async fn weighted_round_robin_is_smooth_and_exact() {
    let ups = upstreams(3).await;
    let gw = gateway_for("weighted_round_robin", &ups, &[5, 1, 1]).await;
    let c = client();
    let mut seq = String::new();
    for _ in 0..7 {
        let body = c
            .get(gw.url("/"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        seq.push(match body.as_str() {
            "u0" => 'a',
            "u1" => 'b',
            _ => 'c',
        });
    }
    // b and c weigh the same, so which of them comes first depends on endpoint order.
    assert!(
        seq == "aabacaa" || seq == "aacabaa",
        "nginx's smooth order, not bursts: {seq}"
    );
    let t = tally(&gw.url("/"), 700).await;
    assert_eq!((t["u0"], t["u1"], t["u2"]), (500, 100, 100));
}

#[tokio::test]
async fn random_follows_weights_within_bounds() {
    let ups = upstreams(2).await;
    let gw = gateway_for("random", &ups, &[3, 1]).await;
    let t = tally(&gw.url("/"), 2000).await;
    // Expected 1500; 4 sigma is about 78.
    assert!((1400..=1600).contains(&t["u0"]), "{t:?}");
}

#[tokio::test]
async fn least_connections_avoids_the_busy_endpoint() {
    let slow = TestUpstream::builder()
        .name("slow")
        .delay("/", Duration::from_secs(3))
        .start()
        .await;
    let fast = TestUpstream::builder().name("fast").start().await;
    let gw = start(&format!(
        r#"
        [[routes]]
        path = "/"
        targets = ["{}", "{}"]
        load_balancer = "least_connections"
        "#,
        slow.url(),
        fast.url()
    ))
    .await;
    let c = client();
    let pool = gw.pool("route-0");
    let slow_in_flight = || {
        let snap = pool.snapshot();
        let ep = snap
            .list()
            .iter()
            .find(|e| e.source.port == slow.addr().port())
            .unwrap();
        ep.state.in_flight()
    };
    // Send requests until one is held by the slow endpoint.
    let mut held = Vec::new();
    while slow_in_flight() == 0 {
        assert!(held.len() < 50, "the slow endpoint never got a request");
        let (c, url) = (c.clone(), gw.url("/"));
        held.push(tokio::spawn(async move {
            c.get(url).send().await.map(|r| r.status())
        }));
        eventually(Duration::from_secs(1), || async {
            slow.hits() + fast.hits() >= held.len()
        })
        .await;
    }
    // Now every comparison sees slow busy and fast idle: all quick requests go to fast.
    let t = tally(&gw.url("/"), 20).await;
    assert_eq!(t.get("fast"), Some(&20), "{t:?}");
    assert!(slow_in_flight() >= 1);
    for h in held {
        h.abort();
    }
}

#[tokio::test]
async fn ip_hash_sticks_to_one_endpoint_per_client() {
    let ups = upstreams(3).await;
    let gw = gateway_for("ip_hash", &ups, &[1, 1, 1]).await;
    let t = tally(&gw.url("/"), 50).await;
    assert_eq!(t.len(), 1, "one client address, one endpoint: {t:?}");
}

#[tokio::test]
async fn static_pool_changes_apply_to_the_next_request_and_keep_counters() {
    let ups = upstreams(3).await;
    let gw = gateway_for("round_robin", &ups, &[1, 1, 0]).await;
    let t = tally(&gw.url("/"), 10).await;
    assert_eq!(t.get("u2"), None, "weight 0 takes no traffic");
    let pool = gw.pool("svc");
    let before = pool.revision();
    let ep = |u: &TestUpstream| Discovered::new("127.0.0.1", u.addr().port(), 1);
    let requests_of = |u: &TestUpstream| {
        let snap = pool.snapshot();
        snap.list()
            .iter()
            .find(|e| e.source.port == u.addr().port())
            .map(|e| e.state.requests())
    };
    let u1_before = requests_of(&ups[1]).unwrap();
    assert!(u1_before > 0);
    // Remove u0, add u2: the very next requests use the new set.
    assert!(gw.discovery.set("svc", vec![ep(&ups[1]), ep(&ups[2])]));
    assert_eq!(pool.revision(), before + 1);
    let t = tally(&gw.url("/"), 10).await;
    assert_eq!(t.get("u0"), None);
    assert_eq!((t["u1"], t["u2"]), (5, 5));
    // u1 stayed: its request counter continued across the change.
    assert_eq!(requests_of(&ups[1]), Some(u1_before + 5));
    // An empty set answers 503 at once.
    gw.discovery.set("svc", vec![]);
    assert_eq!(
        client().get(gw.url("/")).send().await.unwrap().status(),
        503
    );
    assert!(
        eventually(Duration::from_secs(2), || async {
            pool.snapshot().is_empty()
        })
        .await,
        "pool emptied"
    );
}
