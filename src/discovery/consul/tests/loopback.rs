//! Loopback checks of the watch loops against a tiny hand-written Consul stand-in (one
//! global index, blocking until the index moves or `wait` expires, scripted failures).
//! The full emulator for integration tests lives in tests/support/consul.rs.

use std::collections::{BTreeMap, VecDeque};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;

use super::super::*;
use crate::discovery::{Discovered, InstanceStatus};

/// A scripted answer: path prefix it applies to, status, body, headers.
type Forced = (String, u16, String, Vec<(String, String)>);

#[derive(Default)]
struct State {
    index: u64,
    /// Bumped by `restore_to`; a restore releases blocked requests, as in Consul.
    restores: u64,
    services: BTreeMap<String, Vec<Value>>,
    /// Scripted answers, used before normal ones.
    forced: VecDeque<Forced>,
}

#[derive(Default)]
struct MiniConsul {
    state: Mutex<State>,
    changed: Notify,
    /// Every request's path and query, in arrival order.
    seen: Mutex<Vec<String>>,
}

impl MiniConsul {
    async fn start() -> (Arc<Self>, SocketAddr) {
        let consul = Arc::new(Self::default());
        consul.state.lock().unwrap().index = 1;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = consul.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let consul = server.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req| handle(consul.clone(), req));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        (consul, addr)
    }

    fn set_service(&self, name: &str, entries: Vec<Value>) {
        let mut st = self.state.lock().unwrap();
        st.index += 1;
        let index = st.index;
        // Stamp this service's checks like raft would; other services' stay untouched.
        let entries = entries
            .into_iter()
            .map(|mut e| {
                if let Some(checks) = e["Checks"].as_array_mut() {
                    for c in checks {
                        c["ModifyIndex"] = json!(index);
                    }
                }
                e
            })
            .collect();
        st.services.insert(name.to_owned(), entries);
        drop(st);
        self.changed.notify_waiters();
    }

    /// An index bump with identical content (an idempotent write).
    fn bump(&self) {
        self.state.lock().unwrap().index += 1;
        self.changed.notify_waiters();
    }

    /// A snapshot restore: the index goes backwards and waiters are released.
    fn restore_to(&self, index: u64) {
        let mut st = self.state.lock().unwrap();
        st.index = index;
        st.restores += 1;
        drop(st);
        self.changed.notify_waiters();
    }

    fn force(&self, prefix: &str, status: u16, body: &str, headers: &[(&str, &str)]) {
        self.state.lock().unwrap().forced.push_back((
            prefix.to_owned(),
            status,
            body.to_owned(),
            headers
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        ));
    }

    fn seen(&self) -> Vec<String> {
        self.seen.lock().unwrap().clone()
    }

    fn seen_matching(&self, prefix: &str) -> Vec<String> {
        self.seen()
            .into_iter()
            .filter(|s| s.starts_with(prefix))
            .collect()
    }
}

async fn handle(
    consul: Arc<MiniConsul>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let path = req.uri().path().to_owned();
    let query = req.uri().query().unwrap_or_default().to_owned();
    consul.seen.lock().unwrap().push(format!("{path}?{query}"));
    let param = |name: &str| {
        query
            .split('&')
            .filter_map(|kv| kv.split_once('='))
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.to_owned())
    };

    {
        let mut st = consul.state.lock().unwrap();
        let at = st
            .forced
            .iter()
            .position(|(p, ..)| path.starts_with(p.as_str()));
        if let Some(at) = at {
            let (_, status, body, headers) = st.forced.remove(at).unwrap();
            let mut resp = Response::builder().status(status);
            for (k, v) in headers {
                resp = resp.header(k, v);
            }
            return Ok(resp.body(Full::new(Bytes::from(body))).unwrap());
        }
    }

    // Like Consul: block while the index is <= the one sent; a snapshot restore releases
    // the waiters (with a lower index), but a request sent with a too-high index afterwards
    // hangs for the full wait.
    let min: u64 = param("index").and_then(|v| v.parse().ok()).unwrap_or(0);
    let restores = consul.state.lock().unwrap().restores;
    let wait_ms: u64 = param("wait")
        .and_then(|w| w.strip_suffix("ms").and_then(|n| n.parse().ok()))
        .unwrap_or(300_000);
    let deadline = tokio::time::Instant::now() + Duration::from_millis(wait_ms);
    loop {
        let notified = consul.changed.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        {
            let st = consul.state.lock().unwrap();
            if min == 0 || st.index > min || st.restores != restores {
                break;
            }
        }
        tokio::select! {
            _ = &mut notified => {}
            _ = tokio::time::sleep_until(deadline) => break,
        }
    }

    let st = consul.state.lock().unwrap();
    let body = if let Some(name) = path.strip_prefix("/v1/health/service/") {
        Value::Array(st.services.get(name).cloned().unwrap_or_default())
    } else if path == "/v1/health/state/any" {
        let checks: Vec<Value> = st
            .services
            .values()
            .flatten()
            .flat_map(|e| e["Checks"].as_array().cloned().unwrap_or_default())
            .collect();
        Value::Array(checks)
    } else if path == "/v1/catalog/services" {
        let mut map = serde_json::Map::new();
        for (name, entries) in &st.services {
            let mut tags: Vec<Value> = entries
                .iter()
                .flat_map(|e| e["Service"]["Tags"].as_array().cloned().unwrap_or_default())
                .collect();
            tags.dedup();
            map.insert(name.clone(), Value::Array(tags));
        }
        Value::Object(map)
    } else {
        return Ok(Response::builder()
            .status(404)
            .body(Full::new(Bytes::from_static(b"Invalid URL path")))
            .unwrap());
    };
    Ok(Response::builder()
        .header("X-Consul-Index", st.index.to_string())
        .header("X-Consul-Knownleader", "true")
        .header("X-Consul-Lastcontact", "0")
        .header("Content-Type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap())
}

fn instance(service: &str, node: &str, id: &str, port: u16, status: &str) -> Value {
    json!({
        "Node": {"Node": node, "Address": "10.9.0.1", "Meta": null},
        "Service": {"ID": id, "Service": service, "Tags": ["t"], "Address": "", "Port": port,
                    "Meta": null, "Weights": {"Passing": 1, "Warning": 1}},
        "Checks": [{"Node": node, "CheckID": format!("service:{id}"), "Status": status,
                    "ServiceID": id, "ServiceName": service}]
    })
}

fn client_for(addr: SocketAddr, wait: Duration) -> ConsulClient {
    let settings = RawConsul {
        address: Some(format!("http://{addr}")),
        wait,
        ..RawConsul::default()
    }
    .resolve(&|_| None)
    .unwrap();
    ConsulClient::new(&settings).unwrap()
}

/// Polls `cond` every 10ms for up to 5s.
async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn next_set(rx: &mut mpsc::UnboundedReceiver<Vec<Discovered>>) -> Vec<Discovered> {
    tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .expect("on_change within 5s")
        .expect("watch still running")
}

fn ports(set: &[Discovered]) -> Vec<u16> {
    set.iter().map(|d| d.port).collect()
}

#[tokio::test]
async fn watch_service_follows_index_rules_and_publishes_only_real_changes() {
    let (consul, addr) = MiniConsul::start().await;
    consul.set_service("web", vec![instance("web", "n1", "web-1", 8001, "passing")]);
    let client = client_for(addr, Duration::from_secs(2));
    let sync = Arc::new(ServiceSync::new());
    let (tx, mut rx) = mpsc::unbounded_channel();
    let cancel = CancellationToken::new();
    let task = tokio::spawn(watch_service(
        client,
        "web".into(),
        sync.clone(),
        move |set| {
            let _ = tx.send(set);
        },
        cancel.clone(),
    ));

    // First answer: no index sent, published, synced.
    let first = next_set(&mut rx).await;
    assert_eq!(
        first,
        vec![Discovered {
            host: "10.9.0.1".into(),
            port: 8001,
            weight: 1,
            status: InstanceStatus::Passing,
            id: "n1/web-1".into(),
        }]
    );
    assert!(sync.is_synced());
    assert_eq!(consul.seen()[0], "/v1/health/service/web?");
    // Then it blocks on that index with wait in ms.
    eventually("a blocking request", || {
        consul
            .seen()
            .iter()
            .any(|s| s == "/v1/health/service/web?index=2&wait=2000ms")
    })
    .await;

    // Idempotent write: new index, same set, no on_change.
    consul.bump();
    eventually("a request at index 3", || {
        consul.seen().iter().any(|s| s.contains("index=3&"))
    })
    .await;
    assert!(
        rx.try_recv().is_err(),
        "unchanged set must not be published"
    );

    // Real change.
    consul.set_service(
        "web",
        vec![
            instance("web", "n1", "web-1", 8001, "passing"),
            instance("web", "n2", "web-2", 8002, "passing"),
        ],
    );
    assert_eq!(ports(&next_set(&mut rx).await), [8001, 8002]);

    // Index goes backwards: the next request carries no index; same data is not republished.
    let before = consul.seen().len();
    consul.restore_to(2);
    eventually("a re-query without index after the reset", || {
        consul.seen()[before..]
            .iter()
            .any(|s| s == "/v1/health/service/web?")
    })
    .await;

    // A 500 publishes nothing and drops back to no index.
    let before = consul.seen().len();
    consul.force("/v1/health/service/web", 500, "No cluster leader", &[]);
    consul.bump();
    eventually("the error to be recorded", || {
        sync.snapshot().errors_total == 1
    })
    .await;
    eventually("a re-query without index after the error", || {
        consul.seen()[before..]
            .iter()
            .filter(|s| *s == "/v1/health/service/web?")
            .count()
            >= 1
    })
    .await;
    eventually("recovery", || sync.snapshot().consecutive_errors == 0).await;

    // ACL not found is surfaced in the sync status, and publishes nothing.
    consul.force("/v1/health/service/web", 403, "ACL not found", &[]);
    consul.bump();
    eventually("acl_denied", || sync.snapshot().acl_denied).await;
    assert_eq!(
        sync.snapshot().last_error.as_deref(),
        Some("Consul rejected the ACL token: ACL not found")
    );
    eventually("recovery after ACL error", || !sync.snapshot().acl_denied).await;

    // Zero instances is a real answer and is published.
    consul.set_service("web", vec![]);
    assert!(next_set(&mut rx).await.is_empty());
    assert_eq!(sync.snapshot().instances, 0);
    assert!(rx.try_recv().is_err(), "failures never published anything");

    cancel.cancel();
    tokio::time::timeout(Duration::from_secs(1), task)
        .await
        .expect("watch stops on cancel")
        .unwrap();
}

#[tokio::test]
async fn watch_service_honours_retry_after() {
    let (consul, addr) = MiniConsul::start().await;
    consul.set_service("web", vec![instance("web", "n1", "web-1", 8001, "passing")]);
    consul.force("/v1/health/service/web", 429, "", &[("Retry-After", "2")]);
    let client = client_for(addr, Duration::from_secs(2));
    let sync = Arc::new(ServiceSync::new());
    let cancel = CancellationToken::new();
    let started = tokio::time::Instant::now();
    tokio::spawn(watch_service(
        client,
        "web".into(),
        sync.clone(),
        |_| {},
        cancel.clone(),
    ));
    assert!(sync.wait_synced(Duration::from_secs(5)).await);
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(sync.snapshot().errors_total, 1);
    cancel.cancel();
}

#[tokio::test]
async fn watch_many_change_feed_refreshes_only_what_moved() {
    let (consul, addr) = MiniConsul::start().await;
    consul.set_service("web", vec![instance("web", "n1", "web-1", 8001, "passing")]);
    consul.set_service("api", vec![instance("api", "n1", "api-1", 9001, "passing")]);
    let client = client_for(addr, Duration::from_secs(2));
    let cancel = CancellationToken::new();

    let mut syncs = Vec::new();
    let mut receivers = Vec::new();
    let mut services: Vec<ServiceWatch> = Vec::new();
    for name in ["web", "api"] {
        let sync = Arc::new(ServiceSync::new());
        let (tx, rx) = mpsc::unbounded_channel();
        services.push(ServiceWatch::new(name.into(), sync.clone(), move |set| {
            let _ = tx.send(set);
        }));
        syncs.push(sync);
        receivers.push(rx);
    }
    // max_watches 1 < 2 services: change-feed mode.
    tokio::spawn(watch_many(client, services, 1, cancel.clone()));

    assert_eq!(ports(&next_set(&mut receivers[0]).await), [8001]);
    assert_eq!(ports(&next_set(&mut receivers[1]).await), [9001]);
    assert!(syncs.iter().all(|s| s.is_synced()));
    // Only the two feed queries block; per-service reads never carry an index.
    eventually("blocking feed queries", || {
        let seen = consul.seen();
        seen.iter()
            .any(|s| s.starts_with("/v1/health/state/any?index="))
            && seen
                .iter()
                .any(|s| s.starts_with("/v1/catalog/services?index="))
    })
    .await;
    assert!(consul
        .seen_matching("/v1/health/service/")
        .iter()
        .all(|s| !s.contains("index=")));

    // api's check goes critical: api is re-read and published empty; web is not re-read.
    let web_reads = consul.seen_matching("/v1/health/service/web").len();
    consul.set_service(
        "api",
        vec![instance("api", "n1", "api-1", 9001, "critical")],
    );
    assert!(next_set(&mut receivers[1]).await.is_empty());
    // Give a stray web refresh the chance to happen before checking it did not.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        consul.seen_matching("/v1/health/service/web").len(),
        web_reads
    );
    assert!(receivers[0].try_recv().is_err());

    // A new web instance (registration with a check) reaches web.
    consul.set_service(
        "web",
        vec![
            instance("web", "n1", "web-1", 8001, "passing"),
            instance("web", "n2", "web-2", 8002, "passing"),
        ],
    );
    assert_eq!(ports(&next_set(&mut receivers[0]).await), [8001, 8002]);

    // A feed failure shows on every service and publishes nothing.
    consul.force("/v1/health/state/any", 500, "No cluster leader", &[]);
    consul.bump();
    eventually("feed error on both services", || {
        syncs.iter().all(|s| s.snapshot().errors_total >= 1)
    })
    .await;
    eventually("recovery", || {
        syncs.iter().all(|s| s.snapshot().consecutive_errors == 0)
    })
    .await;
    assert!(receivers[0].try_recv().is_err());
    assert!(receivers[1].try_recv().is_err());
    cancel.cancel();
}

#[tokio::test]
async fn watch_many_within_max_watches_blocks_per_service() {
    let (consul, addr) = MiniConsul::start().await;
    consul.set_service("web", vec![instance("web", "n1", "web-1", 8001, "passing")]);
    let client = client_for(addr, Duration::from_secs(2));
    let cancel = CancellationToken::new();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut services: Vec<ServiceWatch> = Vec::new();
    for name in ["web", "missing"] {
        let tx = tx.clone();
        services.push(ServiceWatch::new(
            name.into(),
            Arc::new(ServiceSync::new()),
            move |set: Vec<Discovered>| {
                let _ = tx.send((name, set));
            },
        ));
    }
    let task = tokio::spawn(watch_many(client, services, 2, cancel.clone()));
    let mut got = BTreeMap::new();
    for _ in 0..2 {
        let (name, set) = tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .unwrap()
            .unwrap();
        got.insert(name, ports(&set));
    }
    assert_eq!(got["web"], [8001]);
    assert!(
        got["missing"].is_empty(),
        "an unknown service is an empty, synced set"
    );
    eventually("both services blocking on their own index", || {
        let seen = consul.seen();
        seen.iter()
            .any(|s| s.starts_with("/v1/health/service/web?index="))
            && seen
                .iter()
                .any(|s| s.starts_with("/v1/health/service/missing?index="))
    })
    .await;
    assert!(consul.seen_matching("/v1/health/state").is_empty());
    cancel.cancel();
    tokio::time::timeout(Duration::from_secs(1), task)
        .await
        .expect("watch_many stops on cancel")
        .unwrap();
}

#[tokio::test]
async fn watch_catalog_publishes_tag_filtered_service_list() {
    let (consul, addr) = MiniConsul::start().await;
    consul.set_service("web", vec![instance("web", "n1", "web-1", 8001, "passing")]);
    let mut other = instance("db", "n1", "db-1", 5432, "passing");
    other["Service"]["Tags"] = json!(["meshgate.route=/db"]);
    consul.set_service("db", vec![other]);
    let settings = RawConsul {
        address: Some(format!("http://{addr}")),
        wait: Duration::from_secs(2),
        tags: vec!["T".into()],
        ..RawConsul::default()
    }
    .resolve(&|_| None)
    .unwrap();
    let client = ConsulClient::new(&settings).unwrap();
    let sync = Arc::new(ServiceSync::new());
    let (tx, mut rx) = mpsc::unbounded_channel();
    let cancel = CancellationToken::new();
    tokio::spawn(watch_catalog(
        client,
        sync.clone(),
        move |services| {
            let _ = tx.send(services);
        },
        cancel.clone(),
    ));
    let services = tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .unwrap()
        .unwrap();
    // "db" lacks the required tag "t" (case-insensitive), so it is left out.
    assert_eq!(services.keys().collect::<Vec<_>>(), ["web"]);
    assert_eq!(services["web"], ["t"]);
    assert!(sync.is_synced());
    assert_eq!(sync.snapshot().instances, 1);

    // A health-only change moves the index but not the list: nothing published.
    consul.set_service(
        "web",
        vec![instance("web", "n1", "web-1", 8001, "critical")],
    );
    eventually("the catalog watch to see the new index", || {
        consul
            .seen()
            .iter()
            .any(|s| s.starts_with("/v1/catalog/services?index=4&"))
    })
    .await;
    assert!(rx.try_recv().is_err());
    cancel.cancel();
}

#[tokio::test]
async fn watch_service_publishes_when_registration_flips_under_an_empty_set() {
    let (consul, addr) = MiniConsul::start().await;
    consul.set_service(
        "web",
        vec![instance("web", "n1", "web-1", 8001, "critical")],
    );
    let client = client_for(addr, Duration::from_secs(2));
    let sync = Arc::new(ServiceSync::new());
    let (tx, mut rx) = mpsc::unbounded_channel();
    let cancel = CancellationToken::new();
    let seen = sync.clone();
    tokio::spawn(watch_service(
        client,
        "web".into(),
        sync.clone(),
        // What the registry reads: the registration is set before the callback.
        move |set| {
            let _ = tx.send((set, seen.registered()));
        },
        cancel.clone(),
    ));

    // Registered, nothing healthy.
    let (set, registered) = tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert!(set.is_empty() && registered);
    // Deregistered: still an empty set, but published again, as gone.
    consul.set_service("web", vec![]);
    let (set, registered) = tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert!(set.is_empty() && !registered);
    assert!(!sync.registered());
    cancel.cancel();
}
