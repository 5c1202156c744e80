//! Self-test of the Consul emulator: each test pins one behaviour of a real agent
//! (API.md §9) that the discovery tests rely on, so a broken emulator fails here first.

mod support;

use std::collections::BTreeSet;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::{timeout, Instant};

use support::consul::{
    parse_go_duration, AclConfig, ConsulEmulator, EmulatorOptions, Registration, TokenScope,
};

const FIXTURE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/consul/health-service-1.16.2-two-instances.json"
);
/// Upper bound for anything that should happen promptly; only reached when a test fails.
const LIMIT: Duration = Duration::from_secs(5);
const META_HEADERS: [&str; 6] = [
    "x-consul-index",
    "x-consul-knownleader",
    "x-consul-lastcontact",
    "x-consul-effective-consistency",
    "x-consul-query-backend",
    "x-consul-default-acl-policy",
];

fn client() -> reqwest::Client {
    // reqwest is built without a default crypto provider, as in the main crate.
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("build reqwest client")
}

/// A fully read response.
#[derive(Debug)]
struct Answer {
    status: u16,
    headers: reqwest::header::HeaderMap,
    body: String,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    fn index(&self) -> u64 {
        self.header("x-consul-index")
            .expect("X-Consul-Index present")
            .parse()
            .expect("X-Consul-Index is a number")
    }

    fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {:?}", self.body))
    }

    /// Service IDs of a health/service answer, sorted.
    fn ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = self
            .json()
            .as_array()
            .expect("health answer is an array")
            .iter()
            .map(|e| e["Service"]["ID"].as_str().expect("Service.ID").to_owned())
            .collect();
        ids.sort();
        ids
    }
}

async fn send(req: reqwest::RequestBuilder) -> Result<Answer, reqwest::Error> {
    let resp = req.send().await?;
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp.text().await?;
    Ok(Answer {
        status,
        headers,
        body,
    })
}

async fn get(c: reqwest::Client, url: String) -> Answer {
    send(c.get(&url))
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"))
}

async fn put(c: &reqwest::Client, url: String, body: &str) -> Answer {
    send(c.put(&url).body(body.to_owned()))
        .await
        .unwrap_or_else(|e| panic!("PUT {url}: {e}"))
}

fn keys(v: &Value) -> BTreeSet<String> {
    v.as_object()
        .expect("a JSON object")
        .keys()
        .cloned()
        .collect()
}

fn fast_options() -> EmulatorOptions {
    EmulatorOptions {
        jitter: false,
        ..EmulatorOptions::default()
    }
}

// === blocking queries ===

#[tokio::test]
async fn blocking_query_returns_on_change_and_not_before() {
    let consul = ConsulEmulator::start().await;
    consul.register(Registration::new("web-1", "web", "10.0.0.1", 8080));
    let c = client();
    let first = get(c.clone(), format!("{}/v1/health/service/web", consul.url())).await;
    let idx = first.index();

    let url = format!("{}/v1/health/service/web?index={idx}&wait=5s", consul.url());
    let mut pending = tokio::spawn(get(c.clone(), url));
    timeout(LIMIT, consul.until_blocked(1))
        .await
        .expect("query blocks");
    // Per-service scope: a write to another service must not wake it.
    consul.register(Registration::new("api-1", "api", "10.0.0.2", 9090));
    assert!(
        timeout(Duration::from_millis(200), &mut pending)
            .await
            .is_err(),
        "woke up on an unrelated write"
    );
    assert_eq!(consul.blocked_now(), 1);

    let changed = consul.set_check("web-1", "critical", "connection refused");
    let answer = timeout(LIMIT, pending)
        .await
        .expect("woke up on the change")
        .expect("request task");
    assert_eq!(answer.status, 200);
    assert_eq!(answer.index(), changed);
    assert!(changed > idx);
    let checks = &answer.json()[0]["Checks"];
    assert_eq!(checks[0]["CheckID"], "serfHealth");
    assert_eq!(checks[1]["CheckID"], "service:web-1");
    assert_eq!(checks[1]["Status"], "critical");
    assert_eq!(checks[1]["Output"], "connection refused");
    assert_eq!(checks[1]["ModifyIndex"], changed);
}

#[tokio::test]
async fn held_answers_carry_the_data_of_their_moment_and_go_on_release() {
    let consul = ConsulEmulator::start_with(fast_options()).await;
    consul.register(Registration::new("web-1", "web", "10.0.0.1", 8080));
    let c = client();
    let hold = consul.hold_answers("/v1/health/service/web");
    let mut held = tokio::spawn(get(
        c.clone(),
        format!("{}/v1/health/service/web", consul.url()),
    ));
    timeout(LIMIT, consul.until_held(1))
        .await
        .expect("the answer is held");
    // Other paths are not held.
    let other = get(c.clone(), format!("{}/v1/catalog/services", consul.url())).await;
    assert_eq!(other.status, 200);
    consul.deregister("web-1");
    assert!(
        timeout(Duration::from_millis(100), &mut held)
            .await
            .is_err(),
        "answered while held"
    );
    hold.release();
    let answer = timeout(LIMIT, held)
        .await
        .expect("released")
        .expect("request task");
    assert_eq!(answer.status, 200);
    assert_eq!(
        answer.json()[0]["Service"]["ID"],
        "web-1",
        "computed before the hold"
    );
    assert_eq!(consul.held_now(), 0);
}

#[tokio::test]
async fn blocking_query_returns_current_data_when_the_wait_ends() {
    let consul = ConsulEmulator::start_with(EmulatorOptions {
        default_wait: Duration::from_millis(250),
        max_wait: Duration::from_millis(400),
        ..fast_options()
    })
    .await;
    consul.register(Registration::new("web-1", "web", "10.0.0.1", 8080));
    let idx = consul.index();
    let c = client();
    let timed = |query: &'static str| {
        let url = format!("{}/v1/health/service/web?index={idx}{query}", consul.url());
        let c = c.clone();
        async move {
            let start = Instant::now();
            let answer = get(c, url).await;
            (start.elapsed(), answer)
        }
    };
    let (explicit, clamped, defaulted, millis) = tokio::join!(
        timed("&wait=300ms"),
        timed("&wait=10m"),
        timed(""),
        timed("&wait=60000ms"),
    );
    for ((elapsed, answer), expected) in [
        (explicit, 300),
        (clamped, 400),
        (defaulted, 250),
        (millis, 400),
    ] {
        assert_eq!(answer.status, 200);
        assert_eq!(answer.index(), idx, "same index when nothing changed");
        assert_eq!(answer.ids(), ["web-1"]);
        assert!(
            elapsed >= Duration::from_millis(expected),
            "returned after {elapsed:?}, wanted {expected} ms"
        );
        assert!(
            elapsed < Duration::from_millis(expected + 1500),
            "{elapsed:?}"
        );
    }
}

#[tokio::test]
async fn wait_and_index_are_parsed_like_go() {
    let consul = ConsulEmulator::start().await;
    let c = client();
    let base = format!("{}/v1/health/service/web", consul.url());
    let bare = get(c.clone(), format!("{base}?index=1&wait=60")).await;
    assert_eq!(
        (bare.status, bare.body.as_str()),
        (400, "Invalid wait time")
    );
    assert!(bare.header("x-consul-index").is_none());
    let bad = get(c.clone(), format!("{base}?index=abc")).await;
    assert_eq!((bad.status, bad.body.as_str()), (400, "Invalid index"));
    // `wait` without `index` is accepted and does not block.
    let ok = get(c.clone(), format!("{base}?wait=1m30s")).await;
    assert_eq!(ok.status, 200);
    let both = get(c.clone(), format!("{base}?stale&consistent")).await;
    assert_eq!(
        (both.status, both.body.as_str()),
        (
            400,
            "Cannot specify ?stale with ?consistent, conflicting semantics."
        )
    );

    let s = 1_000_000_000;
    assert_eq!(parse_go_duration("60000ms"), Some(60 * s));
    assert_eq!(parse_go_duration("60s"), Some(60 * s));
    assert_eq!(parse_go_duration("1m30s"), Some(90 * s));
    assert_eq!(parse_go_duration("1.5s"), Some(s + s / 2));
    assert_eq!(parse_go_duration("250us"), Some(250_000));
    assert_eq!(parse_go_duration("-2s"), Some(-2 * s));
    assert_eq!(parse_go_duration("0"), Some(0));
    assert_eq!(parse_go_duration("60"), None);
    assert_eq!(parse_go_duration(""), None);
    assert_eq!(parse_go_duration("5x"), None);
}

#[tokio::test]
async fn index_is_never_zero_and_meta_headers_are_on_every_read() {
    let consul = ConsulEmulator::start().await;
    let c = client();
    let kv = get(c.clone(), format!("{}/v1/kv/missing", consul.url())).await;
    assert_eq!(kv.status, 404);
    assert_eq!(kv.body, "");
    // The KV table was never written: its index is 0 and goes out as 1.
    assert_eq!(kv.index(), 1);
    for path in [
        "/v1/kv/missing",
        "/v1/health/service/nope",
        "/v1/health/service/consul?stale",
        "/v1/health/state/any",
        "/v1/catalog/services",
    ] {
        let answer = get(c.clone(), format!("{}{path}", consul.url())).await;
        for name in META_HEADERS {
            assert!(answer.header(name).is_some(), "{path}: no {name}");
        }
        assert!(answer.index() >= 1, "{path}");
        assert_eq!(answer.header("x-consul-knownleader"), Some("true"));
        assert_eq!(answer.header("x-consul-lastcontact"), Some("0"));
        assert_eq!(
            answer.header("x-consul-query-backend"),
            Some("blocking-query")
        );
        assert_eq!(answer.header("x-consul-default-acl-policy"), Some("allow"));
        let consistency = if path.ends_with("stale") {
            "stale"
        } else {
            "leader"
        };
        assert_eq!(
            answer.header("x-consul-effective-consistency"),
            Some(consistency)
        );
    }
    let unknown = get(
        c.clone(),
        format!("{}/v1/health/service/nope", consul.url()),
    )
    .await;
    assert_eq!(unknown.body, "[]");

    // On the wire the names are Go-canonical, e.g. `X-Consul-Knownleader`.
    let mut tcp = tokio::net::TcpStream::connect(consul.addr())
        .await
        .expect("connect");
    tcp.write_all(
        b"GET /v1/catalog/services HTTP/1.1\r\nHost: consul\r\nConnection: close\r\n\r\n",
    )
    .await
    .expect("write request");
    let mut raw = String::new();
    timeout(LIMIT, tcp.read_to_string(&mut raw))
        .await
        .expect("response in time")
        .expect("read response");
    for name in [
        "X-Consul-Index: ",
        "X-Consul-Knownleader: true",
        "X-Consul-Lastcontact: 0",
        "X-Consul-Effective-Consistency: leader",
        "X-Consul-Default-Acl-Policy: allow",
        "Content-Type: application/json",
    ] {
        assert!(raw.contains(name), "no {name:?} in {raw}");
    }
}

#[tokio::test]
async fn unknown_datacenter_is_a_500_with_meta() {
    let consul = ConsulEmulator::start().await;
    let c = client();
    let answer = get(
        c.clone(),
        format!("{}/v1/health/service/web?dc=dc2", consul.url()),
    )
    .await;
    assert_eq!(answer.status, 500);
    assert_eq!(answer.body, "No path to datacenter");
    assert_eq!(
        answer.header("content-type"),
        Some("text/plain; charset=utf-8")
    );
    assert_eq!(answer.index(), 1);
    assert_eq!(answer.header("x-consul-knownleader"), Some("false"));
    let local = get(c, format!("{}/v1/health/service/web?dc=dc1", consul.url())).await;
    assert_eq!(local.status, 200);
}

// === health semantics and body shapes ===

#[tokio::test]
async fn passing_filter_drops_any_non_passing_check() {
    let consul = ConsulEmulator::start().await;
    consul.register(Registration::new("web-1", "web", "10.0.0.1", 8080));
    consul.register(Registration::new("web-2", "web", "10.0.0.2", 8080));
    consul.register(Registration::new("web-3", "web", "10.0.0.3", 8080).node("node2", "10.0.1.3"));
    consul.set_check("web-2", "warning", "slow");
    let c = client();
    let url = |q: &str| format!("{}/v1/health/service/web{q}", consul.url());

    let all = get(c.clone(), url("")).await;
    assert_eq!(all.ids(), ["web-1", "web-2", "web-3"]);
    let passing = get(c.clone(), url("?passing")).await;
    assert_eq!(passing.ids(), ["web-1", "web-3"]);
    // The filter runs after the RPC: the index is the unfiltered one.
    assert_eq!(passing.index(), all.index());

    consul.set_node_check("node2", "critical");
    assert_eq!(get(c.clone(), url("?passing=1")).await.ids(), ["web-1"]);
    assert_eq!(get(c.clone(), url("?passing=true")).await.ids(), ["web-1"]);
    assert_eq!(
        get(c.clone(), url("?passing=false")).await.ids(),
        ["web-1", "web-2", "web-3"]
    );
    let bad = get(c.clone(), url("?passing=maybe")).await;
    assert_eq!(
        (bad.status, bad.body.as_str()),
        (400, "Invalid value for ?passing")
    );

    let critical = get(
        c.clone(),
        format!("{}/v1/health/state/critical", consul.url()),
    )
    .await;
    let critical = critical.json();
    let failing: Vec<(&str, &str)> = critical
        .as_array()
        .expect("array")
        .iter()
        .map(|c| {
            (
                c["Node"].as_str().unwrap_or(""),
                c["CheckID"].as_str().unwrap_or(""),
            )
        })
        .collect();
    assert_eq!(failing, [("node2", "serfHealth")]);
}

#[tokio::test]
async fn tag_filter_is_case_insensitive_and_all_must_match() {
    let consul = ConsulEmulator::start().await;
    consul.register(Registration::new("web-1", "web", "10.0.0.1", 80).tags(["Primary", "v1"]));
    consul.register(Registration::new("web-2", "web", "10.0.0.2", 80).tags(["primary", "v2"]));
    let c = client();
    let url = |q: &str| format!("{}/v1/health/service/web{q}", consul.url());
    assert_eq!(
        get(c.clone(), url("?tag=PRIMARY")).await.ids(),
        ["web-1", "web-2"]
    );
    assert_eq!(
        get(c.clone(), url("?tag=primary&tag=V1")).await.ids(),
        ["web-1"]
    );
    assert_eq!(get(c.clone(), url("?tag=primary&tag=v3")).await.body, "[]");
    // Tags come back as registered.
    let one = get(c.clone(), url("?tag=v1")).await.json();
    assert_eq!(one[0]["Service"]["Tags"], json!(["Primary", "v1"]));
    assert_eq!(one[0]["Checks"][1]["ServiceTags"], json!(["Primary", "v1"]));
}

#[tokio::test]
async fn bodies_have_the_key_sets_of_the_real_capture() {
    let fixture: Value =
        serde_json::from_str(&std::fs::read_to_string(FIXTURE).expect("read fixture"))
            .expect("fixture is JSON");
    let real = &fixture[0];
    let consul = ConsulEmulator::start().await;
    consul.register(
        Registration::new("svc-1", "activator-default", "192.168.133.223", 39677)
            .tags(["noc", "svc-1"]),
    );
    let c = client();
    let answer = get(
        c.clone(),
        format!("{}/v1/health/service/activator-default", consul.url()),
    )
    .await;
    assert_eq!(answer.header("content-type"), Some("application/json"));
    let ours = &answer.json()[0];
    assert_eq!(keys(ours), keys(real));
    assert_eq!(keys(&ours["Node"]), keys(&real["Node"]));
    assert_eq!(keys(&ours["Service"]), keys(&real["Service"]));
    assert_eq!(
        keys(&ours["Service"]["TaggedAddresses"]),
        keys(&real["Service"]["TaggedAddresses"])
    );
    assert_eq!(
        ours["Service"]["TaggedAddresses"]["lan_ipv4"],
        json!({"Address": "192.168.133.223", "Port": 39677})
    );
    for (field, value) in ["Proxy", "Connect", "Weights", "Meta", "PeerName"]
        .iter()
        .map(|f| (*f, &real["Service"][*f]))
    {
        assert_eq!(&ours["Service"][field], value, "Service.{field}");
    }
    assert_eq!(
        keys(&ours["Node"]["TaggedAddresses"]),
        keys(&real["Node"]["TaggedAddresses"])
    );
    assert_eq!(keys(&ours["Node"]["Meta"]), keys(&real["Node"]["Meta"]));
    let (our_checks, real_checks) = (&ours["Checks"], &real["Checks"]);
    assert_eq!(our_checks.as_array().map(Vec::len), Some(2));
    for i in 0..2 {
        assert_eq!(keys(&our_checks[i]), keys(&real_checks[i]), "Checks[{i}]");
    }
    assert_eq!(our_checks[0]["Name"], real_checks[0]["Name"]);
    assert_eq!(our_checks[0]["Output"], real_checks[0]["Output"]);
    assert_eq!(our_checks[1]["Name"], real_checks[1]["Name"]);
    assert_eq!(our_checks[0]["ServiceTags"], json!([]));
}

#[tokio::test]
async fn address_less_service_omits_tagged_addresses_and_has_defaults() {
    let consul = ConsulEmulator::start().await;
    consul.register(Registration::new("db-1", "db", "", 5432));
    consul.register(
        Registration::new("db-2", "db", "db.internal", 5432)
            .weights(10, 2)
            .meta("env", "prod"),
    );
    let c = client();
    let body = get(c.clone(), format!("{}/v1/health/service/db", consul.url()))
        .await
        .json();
    let bare = &body[0]["Service"];
    assert_eq!(bare["ID"], "db-1");
    assert_eq!(bare["Address"], "");
    assert!(bare.get("TaggedAddresses").is_none(), "{bare}");
    assert_eq!(bare["Weights"], json!({"Passing": 1, "Warning": 1}));
    assert_eq!(bare["Meta"], Value::Null);
    assert_eq!(bare["Tags"], json!([]));
    assert_eq!(body[0]["Node"]["Address"], "127.0.0.1");
    // A hostname gets no auto-filled tagged addresses either.
    let named = &body[1]["Service"];
    assert!(named.get("TaggedAddresses").is_none(), "{named}");
    assert_eq!(named["Weights"], json!({"Passing": 10, "Warning": 2}));
    assert_eq!(named["Meta"], json!({"env": "prod"}));
}

#[tokio::test]
async fn maintenance_is_a_critical_check_with_a_reserved_id() {
    let consul = ConsulEmulator::start().await;
    consul.register(Registration::new("web-1", "web", "10.0.0.1", 80));
    let c = client();
    let url = |q: &str| format!("{}/v1/health/service/web{q}", consul.url());
    let before = consul.index();
    let idx = consul.set_maintenance("web-1", true, "");
    assert!(idx > before);
    assert_eq!(consul.set_maintenance("web-1", true, ""), idx, "idempotent");
    let body = get(c.clone(), url("")).await.json();
    let maint = body[0]["Checks"]
        .as_array()
        .expect("checks")
        .iter()
        .find(|c| c["CheckID"] == "_service_maintenance:web-1")
        .cloned()
        .expect("maintenance check present");
    assert_eq!(maint["Status"], "critical");
    assert_eq!(maint["Name"], "Service Maintenance Mode");
    assert_eq!(
        maint["Notes"],
        "Maintenance mode is enabled for this service, but no reason was provided. This is a default message."
    );
    assert_eq!(get(c.clone(), url("?passing")).await.body, "[]");

    let off = put(
        &c,
        format!(
            "{}/v1/agent/service/maintenance/web-1?enable=false",
            consul.url()
        ),
        "",
    )
    .await;
    assert_eq!((off.status, off.body.as_str()), (200, ""));
    assert_eq!(get(c.clone(), url("?passing")).await.ids(), ["web-1"]);
    let on = put(
        &c,
        format!(
            "{}/v1/agent/service/maintenance/web-1?enable=true&reason=deploy",
            consul.url()
        ),
        "",
    )
    .await;
    assert_eq!(on.status, 200);
    let notes = get(c.clone(), url("")).await.json()[0]["Checks"][1]["Notes"].clone();
    assert_eq!(notes, "deploy");
    let missing = put(
        &c,
        format!("{}/v1/agent/service/maintenance/web-1", consul.url()),
        "",
    )
    .await;
    assert_eq!(
        (missing.status, missing.body.as_str()),
        (400, "Missing value for enable")
    );
    let bad = put(
        &c,
        format!(
            "{}/v1/agent/service/maintenance/web-1?enable=maybe",
            consul.url()
        ),
        "",
    )
    .await;
    assert_eq!(
        (bad.status, bad.body.as_str()),
        (400, "Invalid value for enable: \"maybe\"")
    );
}

#[tokio::test]
async fn catalog_services_lists_tag_unions_and_ignores_check_flaps() {
    let consul = ConsulEmulator::start().await;
    consul.register(Registration::new("web-1", "web", "10.0.0.1", 80).tags(["a", "b"]));
    consul.register(Registration::new("web-2", "web", "10.0.0.2", 80).tags(["b", "c"]));
    let c = client();
    let url = format!("{}/v1/catalog/services", consul.url());
    let first = get(c.clone(), url.clone()).await;
    assert_eq!(first.json(), json!({"consul": [], "web": ["a", "b", "c"]}));
    consul.set_check("web-1", "critical", "down");
    assert_eq!(get(c.clone(), url.clone()).await.index(), first.index());
    let idx = consul.register(Registration::new("web-2", "web", "10.0.0.2", 80).tags(["d"]));
    let after = get(c.clone(), url).await;
    assert_eq!(after.index(), idx);
    assert_eq!(after.json()["web"], json!(["a", "b", "d"]));
    // Re-registering identical data is not a write.
    assert_eq!(
        consul.register(Registration::new("web-2", "web", "10.0.0.2", 80).tags(["d"])),
        idx
    );
}

// === ACLs ===

#[tokio::test]
async fn acl_tokens_filter_lists_and_unknown_tokens_are_rejected() {
    let acl = AclConfig::new()
        .token("root", TokenScope::All)
        .token("web-only", TokenScope::services(["web"]));
    let consul = ConsulEmulator::start_with(EmulatorOptions {
        acl: Some(acl),
        ..EmulatorOptions::default()
    })
    .await;
    consul.register(Registration::new("web-1", "web", "10.0.0.1", 80));
    consul.register(Registration::new("api-1", "api", "10.0.0.2", 80));
    let c = client();
    let url = |path: &str| format!("{}{path}", consul.url());
    const FILTERED: &str = "x-consul-results-filtered-by-acls";

    // Anonymous sees nothing and is not told about it.
    let anon = get(c.clone(), url("/v1/health/service/web")).await;
    assert_eq!((anon.status, anon.body.as_str()), (200, "[]"));
    assert!(anon.header(FILTERED).is_none());
    assert_eq!(anon.header("x-consul-default-acl-policy"), Some("deny"));

    let unknown = send(
        c.get(url("/v1/health/service/web"))
            .header("X-Consul-Token", "nope"),
    )
    .await
    .expect("request");
    assert_eq!(
        (unknown.status, unknown.body.as_str()),
        (403, "ACL not found")
    );

    let scoped = |path: &str| c.get(url(path)).bearer_auth("web-only");
    let web = send(scoped("/v1/health/service/web"))
        .await
        .expect("request");
    assert_eq!(web.ids(), ["web-1"]);
    assert!(web.header(FILTERED).is_none());
    let api = send(scoped("/v1/health/service/api"))
        .await
        .expect("request");
    assert_eq!((api.status, api.body.as_str()), (200, "[]"));
    assert_eq!(api.header(FILTERED), Some("true"));
    let catalog = send(scoped("/v1/catalog/services")).await.expect("request");
    assert_eq!(catalog.json(), json!({"web": []}));
    assert_eq!(catalog.header(FILTERED), Some("true"));
    let kv = send(scoped("/v1/kv/config")).await.expect("request");
    assert_eq!(kv.status, 403);
    assert!(
        kv.body
            .starts_with("Permission denied: token with AccessorID '"),
        "{}",
        kv.body
    );

    let root = get(c.clone(), url("/v1/health/service/api?token=root")).await;
    assert_eq!(root.ids(), ["api-1"]);
    assert!(root.header(FILTERED).is_none());

    let denied = send(
        c.put(url("/v1/agent/service/register"))
            .header("X-Consul-Token", "web-only")
            .body(r#"{"Name": "api", "Port": 1}"#),
    )
    .await
    .expect("request");
    assert_eq!(denied.status, 403);
    assert!(
        denied
            .body
            .ends_with("lacks permission 'service:write' on \"api\""),
        "{}",
        denied.body
    );
}

// === faults ===

#[tokio::test]
async fn fail_next_answers_plain_text_errors_then_recovers() {
    let consul = ConsulEmulator::start().await;
    let c = client();
    let url = format!("{}/v1/health/service/web", consul.url());
    consul.fail_next(2, 429, "Rate limit reached, try again later");
    for _ in 0..2 {
        let limited = get(c.clone(), url.clone()).await;
        assert_eq!(limited.status, 429);
        assert_eq!(limited.body, "Rate limit reached, try again later");
        assert_eq!(
            limited.header("content-type"),
            Some("text/plain; charset=utf-8")
        );
    }
    assert_eq!(get(c.clone(), url.clone()).await.status, 200);

    consul.fail_next(1, 500, "rpc error making call: EOF");
    let failed = get(c.clone(), url.clone()).await;
    assert_eq!(
        (failed.status, failed.body.as_str()),
        (500, "rpc error making call: EOF")
    );
    assert_eq!(failed.index(), 1);
    assert_eq!(failed.header("x-consul-knownleader"), Some("false"));

    consul.fail_next_on("/v1/kv/", 1, 429, "");
    assert_eq!(
        get(c.clone(), url).await.status,
        200,
        "other paths unaffected"
    );
    let empty = get(c.clone(), format!("{}/v1/kv/x", consul.url())).await;
    assert_eq!((empty.status, empty.body.as_str()), (429, ""));
    assert!(empty.header("content-type").is_none());
}

#[tokio::test]
async fn connection_limit_answers_429_and_drop_blocked_cuts_waiters() {
    let consul = ConsulEmulator::start_with(EmulatorOptions {
        max_conns_per_client: 2,
        ..EmulatorOptions::default()
    })
    .await;
    let c = client();
    let idx = get(c.clone(), format!("{}/v1/health/service/web", consul.url()))
        .await
        .index();
    let blocking = format!("{}/v1/health/service/web?index={idx}&wait=5s", consul.url());
    let waiters: Vec<_> = (0..2)
        .map(|_| tokio::spawn(send(c.get(blocking.clone()))))
        .collect();
    timeout(LIMIT, consul.until_blocked(2))
        .await
        .expect("both block");
    assert_eq!(consul.open_connections(), 2);

    let over = get(c.clone(), format!("{}/v1/status/leader", consul.url())).await;
    assert_eq!(over.status, 429);
    assert_eq!(
        over.body,
        "Your IP is issuing too many concurrent connections, please rate limit your calls\n"
    );
    assert_eq!(over.header("connection"), Some("close"));

    consul.drop_blocked();
    for waiter in waiters {
        let outcome = timeout(LIMIT, waiter)
            .await
            .expect("cut promptly")
            .expect("request task");
        assert!(
            outcome.is_err(),
            "expected a dropped connection, got {outcome:?}"
        );
    }
    assert_eq!(consul.blocked_now(), 0);
    let after = get(c.clone(), format!("{}/v1/status/leader", consul.url())).await;
    assert_eq!(after.status, 200);
}

#[tokio::test]
async fn snapshot_restore_moves_indexes_backwards() {
    let consul = ConsulEmulator::start_with(fast_options()).await;
    consul.register(Registration::new("web-1", "web", "10.0.0.1", 80));
    let high = consul.set_check("web-1", "warning", "busy");
    let c = client();
    let blocking = format!(
        "{}/v1/health/service/web?index={high}&wait=5s",
        consul.url()
    );
    let pending = tokio::spawn(get(c.clone(), blocking));
    timeout(LIMIT, consul.until_blocked(1))
        .await
        .expect("query blocks");

    consul.restore_snapshot(5);
    let aborted = timeout(LIMIT, pending)
        .await
        .expect("restore aborts the wait")
        .expect("request task");
    assert_eq!(aborted.index(), 5);
    assert_eq!(consul.index(), 5);

    // A client still holding the old, higher index waits the full time, then sees 5.
    let start = Instant::now();
    let stale = get(
        c.clone(),
        format!(
            "{}/v1/health/service/web?index={high}&wait=300ms",
            consul.url()
        ),
    )
    .await;
    assert!(start.elapsed() >= Duration::from_millis(300));
    assert_eq!(stale.index(), 5);
    assert_eq!(stale.ids(), ["web-1"]);
    assert_eq!(consul.set_check("web-1", "passing", ""), 6);
}

#[tokio::test]
async fn no_leader_fails_default_reads_but_serves_stale_ones() {
    let consul = ConsulEmulator::start().await;
    consul.set_leader(false);
    let c = client();
    let url = |q: &str| format!("{}/v1/health/service/consul{q}", consul.url());
    let leader = get(c.clone(), url("")).await;
    assert_eq!(
        (leader.status, leader.body.as_str()),
        (500, "No cluster leader")
    );
    assert_eq!(leader.header("x-consul-knownleader"), Some("false"));
    let stale = get(c.clone(), url("?stale")).await;
    assert_eq!(stale.status, 200);
    assert_eq!(stale.header("x-consul-knownleader"), Some("false"));
    assert_eq!(
        stale.header("x-consul-effective-consistency"),
        Some("stale")
    );
    assert_eq!(stale.ids(), ["consul"]);
    let status = get(c.clone(), format!("{}/v1/status/leader", consul.url())).await;
    assert_eq!(status.body, "\"\"");
    consul.set_leader(true);
    assert_eq!(get(c.clone(), url("")).await.status, 200);
    let status = get(c.clone(), format!("{}/v1/status/leader", consul.url())).await;
    assert_eq!(status.json(), json!("127.0.0.1:8300"));
}

#[tokio::test]
async fn latency_delays_every_answer() {
    let consul = ConsulEmulator::start().await;
    consul.set_latency(Duration::from_millis(250));
    let start = Instant::now();
    let answer = get(client(), format!("{}/v1/catalog/services", consul.url())).await;
    assert_eq!(answer.status, 200);
    assert!(start.elapsed() >= Duration::from_millis(250));
}

#[tokio::test]
async fn idempotent_write_wakes_with_an_identical_body() {
    let consul = ConsulEmulator::start().await;
    consul.register(Registration::new("web-1", "web", "10.0.0.1", 80));
    let c = client();
    let first = get(c.clone(), format!("{}/v1/health/service/web", consul.url())).await;
    let url = format!(
        "{}/v1/health/service/web?index={}&wait=5s",
        consul.url(),
        first.index()
    );
    let pending = tokio::spawn(get(c.clone(), url));
    timeout(LIMIT, consul.until_blocked(1))
        .await
        .expect("query blocks");
    let idx = consul.idempotent_write("web");
    let woken = timeout(LIMIT, pending)
        .await
        .expect("woke up")
        .expect("request task");
    assert_eq!(woken.index(), idx);
    assert!(idx > first.index());
    assert_eq!(woken.body, first.body);
}

#[tokio::test]
async fn restart_serves_the_same_state_on_the_same_port() {
    let consul = ConsulEmulator::start().await;
    consul.register(Registration::new("web-1", "web", "10.0.0.1", 80));
    let (addr, idx) = (consul.addr(), consul.index());
    let c = client();
    let blocking = format!("{}/v1/health/service/web?index={idx}&wait=5s", consul.url());
    let pending = tokio::spawn(send(c.get(blocking)));
    timeout(LIMIT, consul.until_blocked(1))
        .await
        .expect("query blocks");

    consul.stop().await;
    let cut = timeout(LIMIT, pending).await.expect("cut").expect("task");
    assert!(cut.is_err(), "blocked query survived stop: {cut:?}");
    let refused = send(c.get(format!("{}/v1/status/leader", consul.url()))).await;
    assert!(refused.is_err(), "still serving after stop");

    consul.restart().await;
    assert_eq!(consul.addr(), addr);
    let answer = get(c.clone(), format!("{}/v1/health/service/web", consul.url())).await;
    assert_eq!(answer.ids(), ["web-1"]);
    assert_eq!(answer.index(), idx);
}

// === agent writes, KV, recording ===

#[tokio::test]
async fn agent_register_decodes_like_go_and_rejects_unknown_fields() {
    let consul = ConsulEmulator::start().await;
    let c = client();
    let register = format!("{}/v1/agent/service/register", consul.url());
    // Lowercase and mixed-case keys, as sent by a real walkthrough (fixture
    // agent-service-register-http-check-lowercase-keys-real.json).
    let lowercase = r#"{"name":"httpd","tags":["httpd"],"port":80,"address":"10.42.1.39",
        "check":{"name":"HTTP API on port 80","http":"http://10.42.1.39:80","method":"GET",
        "Interval":"10s","Timeout":"5s"}}"#;
    let ok = put(&c, register.clone(), lowercase).await;
    assert_eq!((ok.status, ok.body.as_str()), (200, ""));
    let body = get(
        c.clone(),
        format!("{}/v1/health/service/httpd", consul.url()),
    )
    .await
    .json();
    let (svc, check) = (&body[0]["Service"], &body[0]["Checks"][1]);
    assert_eq!(svc["ID"], "httpd");
    assert_eq!(svc["Port"], 80);
    assert_eq!(svc["Tags"], json!(["httpd"]));
    assert_eq!(check["CheckID"], "service:httpd");
    assert_eq!(check["Name"], "HTTP API on port 80");
    assert_eq!(check["Status"], "critical", "new checks start critical");
    assert_eq!(check["Type"], "http");
    assert_eq!(
        (&check["Interval"], &check["Timeout"]),
        (&json!("10s"), &json!("5s"))
    );

    for (payload, status, message) in [
        (r#"{"Name":"x","Bogus":1}"#, 400, "Request decode failed: json: unknown field \"Bogus\""),
        (r#"{"Port":1}"#, 400, "Missing service name"),
        (r#"{"Name":"x","Address":"0.0.0.0"}"#, 400, "Invalid service address"),
        (r#"{"Name":"x","Weights":{"Passing":0,"Warning":1}}"#, 400, "Invalid Weights: Passing must be greater than 0"),
        (
            r#"{"Name":"x","Check":{"HTTP":"http://x"}}"#,
            400,
            "Invalid check: Interval must be > 0 for Script, HTTP, H2PING, TCP, UDP or OSService checks",
        ),
        (r#"{"Name":"x","Port":"80"}"#, 400, "Request decode failed: json: cannot unmarshal string into Go struct field structs.ServiceDefinition.Port of type int"),
        ("", 400, "Request decode failed: EOF"),
    ] {
        let answer = put(&c, register.clone(), payload).await;
        assert_eq!((answer.status, answer.body.as_str()), (status, message), "{payload}");
    }

    let wrong_method = get(c.clone(), register.clone()).await;
    assert_eq!(
        (wrong_method.status, wrong_method.body.as_str()),
        (405, "method GET not allowed")
    );
    assert_eq!(wrong_method.header("allow"), Some("OPTIONS,PUT"));

    let unknown = put(
        &c,
        format!("{}/v1/agent/service/deregister/nope", consul.url()),
        "",
    )
    .await;
    assert_eq!(unknown.status, 404);
    assert_eq!(
        unknown.body,
        "Unknown service ID \"nope\". Ensure that the service ID is passed, not the service name."
    );
    let gone = put(
        &c,
        format!("{}/v1/agent/service/deregister/httpd", consul.url()),
        "",
    )
    .await;
    assert_eq!((gone.status, gone.body.as_str()), (200, ""));
    let after = get(
        c.clone(),
        format!("{}/v1/health/service/httpd", consul.url()),
    )
    .await;
    assert_eq!(after.body, "[]");
    assert_eq!(
        after.index(),
        consul.index(),
        "extinction index of the removal"
    );
}

#[tokio::test]
async fn ttl_checks_are_updated_over_http_and_expire_to_critical() {
    let consul = ConsulEmulator::start().await;
    let c = client();
    let agent = |path: &str| format!("{}/v1/agent{path}", consul.url());
    let registered = put(
        &c,
        agent("/service/register"),
        r#"{"Name":"worker","Checks":[{"TTL":"400ms"},{"Name":"tcp","TCP":"127.0.0.1:1","Interval":"10s"}]}"#,
    )
    .await;
    assert_eq!(registered.status, 200);
    let passed = put(&c, agent("/check/pass/service:worker:1?note=alive"), "").await;
    assert_eq!((passed.status, passed.body.as_str()), (200, ""));
    let health = get(
        c.clone(),
        format!("{}/v1/health/service/worker", consul.url()),
    )
    .await;
    let ttl = &health.json()[0]["Checks"][1];
    assert_eq!(
        (&ttl["Status"], &ttl["Output"], &ttl["Type"]),
        (&json!("passing"), &json!("alive"), &json!("ttl"))
    );

    // Nothing else touches the check: the next change is the TTL expiring.
    let passed_at = Instant::now();
    let url = format!(
        "{}/v1/health/service/worker?index={}&wait=5s",
        consul.url(),
        health.index()
    );
    let expired = timeout(LIMIT, get(c.clone(), url))
        .await
        .expect("TTL expired");
    assert!(passed_at.elapsed() >= Duration::from_millis(300));
    let ttl = &expired.json()[0]["Checks"][1];
    assert_eq!(ttl["Status"], "critical");
    assert_eq!(
        ttl["Output"],
        "TTL expired (last output before timeout follows): alive"
    );

    let not_ttl = put(&c, agent("/check/pass/service:worker:2"), "").await;
    assert_eq!(
        (not_ttl.status, not_ttl.body.as_str()),
        (
            500,
            "CheckID \"service:worker:2\" does not have associated TTL"
        )
    );
    let unknown = put(&c, agent("/check/warn/nope"), "").await;
    assert_eq!(unknown.status, 404);
    let update = put(
        &c,
        agent("/check/update/service:worker:1"),
        r#"{"Status":"bogus"}"#,
    )
    .await;
    assert_eq!(
        (update.status, update.body.as_str()),
        (400, "Invalid check status: 'bogus'")
    );
}

#[tokio::test]
async fn kv_reads_block_on_the_key_and_values_are_base64() {
    let consul = ConsulEmulator::start().await;
    let c = client();
    let url = |q: &str| format!("{}/v1/kv/app/config{q}", consul.url());
    let stored = put(&c, url(""), "hello").await;
    assert_eq!((stored.status, stored.body.as_str()), (200, "true"));
    let read = get(c.clone(), url("")).await;
    let entry = &read.json()[0];
    assert_eq!(entry["Value"], "aGVsbG8=");
    assert_eq!(entry["Key"], "app/config");
    assert_eq!(
        read.index(),
        entry["ModifyIndex"].as_u64().expect("ModifyIndex")
    );
    assert_eq!(
        keys(entry),
        keys(&json!({"LockIndex":0,"Key":"","Flags":0,"Value":"","CreateIndex":0,"ModifyIndex":0}))
    );
    assert_eq!(get(c.clone(), url("?raw")).await.body, "hello");

    let pending = tokio::spawn(get(
        c.clone(),
        url(&format!("?index={}&wait=5s", read.index())),
    ));
    timeout(LIMIT, consul.until_blocked(1))
        .await
        .expect("KV read blocks");
    let idx = consul.kv_put("app/config", b"bye");
    let woken = timeout(LIMIT, pending).await.expect("woke").expect("task");
    assert_eq!(woken.index(), idx);
    assert_eq!(woken.json()[0]["Value"], "Ynll");

    consul.kv_put("app/other", b"");
    let listed = get(c.clone(), format!("{}/v1/kv/app/?keys", consul.url())).await;
    assert_eq!(listed.json(), json!(["app/config", "app/other"]));
    let all = get(c.clone(), format!("{}/v1/kv/app/?recurse", consul.url())).await;
    assert_eq!(all.json()[1]["Value"], Value::Null);
    let cas = put(&c, url("?cas=1"), "x").await;
    assert_eq!(cas.body, "false");
}

#[tokio::test]
async fn requests_are_recorded_with_decoded_query_pairs() {
    let consul = ConsulEmulator::start().await;
    let c = client();
    let url = format!(
        "{}/v1/health/service/web?tag=a%20b&tag=c+d&wait=60000ms&passing&index=0",
        consul.url()
    );
    let sent = send(c.get(url).header("X-Consul-Token", "secret"))
        .await
        .expect("request");
    assert_eq!(sent.status, 200);
    let seen = consul.requests_to("/v1/health/service/");
    assert_eq!(seen.len(), 1);
    let r = &seen[0];
    assert_eq!(r.method, http::Method::GET);
    assert_eq!(r.path, "/v1/health/service/web");
    let pairs: Vec<(&str, &str)> = r
        .query
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    assert_eq!(
        pairs,
        [
            ("tag", "a b"),
            ("tag", "c d"),
            ("wait", "60000ms"),
            ("passing", ""),
            ("index", "0")
        ]
    );
    assert_eq!(r.query_values("tag"), ["a b", "c d"]);
    assert_eq!(r.wait(), Some(Duration::from_secs(60)));
    assert_eq!(r.index(), Some(0));
    assert!(r.has_query("passing"));
    assert_eq!(r.token().as_deref(), Some("secret"));
    assert_eq!(consul.requests().len(), 1);
}
