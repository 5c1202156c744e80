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

// === Connect CA (CONNECT.md §2, §3) ===

const ROOTS_FIXTURE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/consul/connect-ca-roots-docs-sample.json"
);
const LEAF_FIXTURE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/consul/connect-ca-leaf-docs-sample.json"
);
const CATALOG_FIXTURE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/consul/catalog-service-docs-sample.json"
);
const CATALOG_PROXY_FIXTURE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/consul/catalog-service-connect-proxy-real-capture-sanitized.json"
);

fn fixture(path: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).expect("read fixture"))
        .expect("fixture JSON")
}

/// JSON kind of every field of an object, to compare shapes with a fixture.
fn kinds(v: &Value) -> std::collections::BTreeMap<String, &'static str> {
    let kind = |v: &Value| match v {
        Value::Null => "null",
        Value::Bool(_) => "bool",
        Value::Number(n) if n.is_u64() => "uint",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    };
    v.as_object()
        .expect("a JSON object")
        .iter()
        .map(|(k, v)| (k.clone(), kind(v)))
        .collect()
}

fn is_colon_hex(s: &str, bytes: usize) -> bool {
    let parts: Vec<&str> = s.split(':').collect();
    parts.len() == bytes
        && parts.iter().all(|p| {
            p.len() == 2
                && p.bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        })
}

/// Whether the leaf chain (leaf + intermediates) verifies for client auth against `roots_pem`.
fn chains_to(chain_pem: &str, roots_pem: &str) -> bool {
    use rustls::pki_types::{CertificateDer, UnixTime};
    let chain: Vec<CertificateDer<'static>> = support::consul::pem_blocks(chain_pem)
        .into_iter()
        .map(CertificateDer::from)
        .collect();
    let roots: Vec<CertificateDer<'static>> = support::consul::pem_blocks(roots_pem)
        .into_iter()
        .map(CertificateDer::from)
        .collect();
    let anchors: Vec<_> = roots
        .iter()
        .map(|r| webpki::anchor_from_trusted_cert(r).expect("anchor"))
        .collect();
    let leaf = webpki::EndEntityCert::try_from(&chain[0]).expect("leaf parses");
    leaf.verify_for_usage(
        rustls::crypto::ring::default_provider()
            .signature_verification_algorithms
            .all,
        &anchors,
        &chain[1..],
        UnixTime::now(),
        webpki::KeyUsage::client_auth(),
        None,
        None,
    )
    .is_ok()
}

#[tokio::test]
async fn connect_roots_have_the_fixture_shape_and_a_spiffe_root() {
    let consul = ConsulEmulator::start().await;
    let answer = get(
        client(),
        format!("{}/v1/agent/connect/ca/roots", consul.url()),
    )
    .await;
    assert_eq!(answer.status, 200);
    assert!(answer.index() > 0);
    let body = answer.json();
    let want = fixture(ROOTS_FIXTURE);
    assert_eq!(kinds(&body), kinds(&want));
    let mut want_root = kinds(&want["Roots"][0]);
    // The sample root is the active one without a cross-signed certificate: null.
    assert_eq!(want_root.get("IntermediateCerts"), Some(&"null"));
    want_root.insert("IntermediateCerts".to_owned(), "null");
    assert_eq!(kinds(&body["Roots"][0]), want_root);

    let root = &body["Roots"][0];
    assert_eq!(body["TrustDomain"], consul.trust_domain());
    assert!(consul.trust_domain().ends_with(".consul"));
    assert_eq!(body["ActiveRootID"], root["ID"]);
    assert!(
        is_colon_hex(root["ID"].as_str().unwrap(), 20),
        "{}",
        root["ID"]
    );
    assert!(root["SerialNumber"].is_u64());
    assert_eq!(root["Active"], true);
    assert_eq!(root["PrivateKeyType"], "ec");
    let der = &support::consul::pem_blocks(root["RootCert"].as_str().unwrap())[0];
    assert_eq!(
        support::consul::uri_sans(der),
        vec![format!("spiffe://{}", consul.trust_domain())]
    );
    assert_eq!(root["RootCert"].as_str(), Some(consul.roots_pem().as_str()));
}

#[tokio::test]
async fn connect_leaf_has_the_fixture_shape_and_blocks_until_renewed() {
    let consul = ConsulEmulator::start_with(fast_options()).await;
    let c = client();
    let url = format!("{}/v1/agent/connect/ca/leaf/web", consul.url());
    let first = get(c.clone(), url.clone()).await;
    assert_eq!(first.status, 200);
    let leaf = first.json();
    let mut want = kinds(&fixture(LEAF_FIXTURE));
    // The docs sample is from Enterprise; CE leaves carry no Namespace.
    want.remove("Namespace");
    assert_eq!(kinds(&leaf), want);
    assert_eq!(first.index(), leaf["ModifyIndex"].as_u64().unwrap());
    assert_eq!(leaf["Service"], "web");
    assert_eq!(leaf["ServiceURI"], consul.service_uri("web"));
    assert!(is_colon_hex(leaf["SerialNumber"].as_str().unwrap(), 1));
    let key = leaf["PrivateKeyPEM"].as_str().unwrap();
    assert!(key.starts_with("-----BEGIN EC PRIVATE KEY-----\n"), "{key}");
    let chain = leaf["CertPEM"].as_str().unwrap();
    let blocks = support::consul::pem_blocks(chain);
    assert_eq!(blocks.len(), 1, "no intermediates before a rotation");
    assert_eq!(
        support::consul::uri_sans(&blocks[0]),
        vec![consul.service_uri("web")]
    );
    assert!(chains_to(chain, &consul.roots_pem()));
    assert!(!chains_to(chain, &consul.foreign_ca().root_pem()));

    // A revalidating read returns the cached leaf.
    let again = get(c.clone(), url.clone()).await;
    assert_eq!(again.json()["SerialNumber"], leaf["SerialNumber"]);

    let idx = first.index();
    let pending = tokio::spawn(get(c.clone(), format!("{url}?index={idx}&wait=5s")));
    timeout(LIMIT, consul.until_blocked(1))
        .await
        .expect("leaf query blocks");
    let renewed_at = consul.force_renew_leaf("web");
    let renewed = timeout(LIMIT, pending)
        .await
        .expect("woke on renewal")
        .expect("request task");
    assert_eq!(renewed.index(), renewed_at);
    assert!(renewed_at > idx);
    let body = renewed.json();
    assert_ne!(body["SerialNumber"], leaf["SerialNumber"]);
    assert_ne!(body["PrivateKeyPEM"], leaf["PrivateKeyPEM"]);
    assert_eq!(body["CreateIndex"], leaf["CreateIndex"]);
}

#[tokio::test]
async fn set_leaf_ttl_sets_valid_before() {
    let consul = ConsulEmulator::start().await;
    consul.set_leaf_ttl(Duration::from_secs(2 * 3600));
    let leaf = get(
        client(),
        format!("{}/v1/agent/connect/ca/leaf/web", consul.url()),
    )
    .await
    .json();
    let hour = |s: &Value| -> u32 { s.as_str().unwrap()[11..13].parse().unwrap() };
    let (after, before) = (hour(&leaf["ValidAfter"]), hour(&leaf["ValidBefore"]));
    assert_eq!((after + 2) % 24, before, "{leaf}");
}

#[tokio::test]
async fn root_rotation_lists_both_roots_and_renews_leaves_with_the_cross_signed_intermediate() {
    let consul = ConsulEmulator::start_with(fast_options()).await;
    let c = client();
    let roots_url = format!("{}/v1/agent/connect/ca/roots", consul.url());
    let leaf_url = format!("{}/v1/agent/connect/ca/leaf/web", consul.url());
    let old_roots_pem = consul.roots_pem();
    let roots = get(c.clone(), roots_url.clone()).await;
    let leaf = get(c.clone(), leaf_url.clone()).await;
    let (roots_idx, leaf_idx) = (roots.index(), leaf.index());

    let roots_wait = tokio::spawn(get(
        c.clone(),
        format!("{roots_url}?index={roots_idx}&wait=5s"),
    ));
    let leaf_wait = tokio::spawn(get(
        c.clone(),
        format!("{leaf_url}?index={leaf_idx}&wait=5s"),
    ));
    timeout(LIMIT, consul.until_blocked(2))
        .await
        .expect("both queries block");
    let rotated_at = consul.rotate_root(true);

    let roots = timeout(LIMIT, roots_wait)
        .await
        .expect("roots woke")
        .expect("task");
    assert_eq!(roots.index(), rotated_at);
    let body = roots.json();
    let list = body["Roots"].as_array().unwrap();
    assert_eq!(list.len(), 2);
    let old = &list[0];
    let new = &list[1];
    assert_eq!(old["Active"], false);
    assert_eq!(old["ModifyIndex"], rotated_at);
    assert_eq!(new["Active"], true);
    assert_eq!(body["ActiveRootID"], new["ID"]);
    assert_ne!(old["ID"], new["ID"]);
    let cross = new["IntermediateCerts"][0]
        .as_str()
        .expect("cross-signed cert");

    let leaf = timeout(LIMIT, leaf_wait)
        .await
        .expect("leaf woke")
        .expect("task");
    assert_eq!(leaf.index(), rotated_at);
    let chain = leaf.json()["CertPEM"].as_str().unwrap().to_owned();
    let blocks = support::consul::pem_blocks(&chain);
    assert_eq!(blocks.len(), 2);
    assert_eq!(blocks[1], support::consul::pem_blocks(cross)[0]);
    // A peer that only knows the old root still accepts the new leaf, thanks to the
    // cross-signed intermediate; without it, it does not.
    assert!(chains_to(&chain, &old_roots_pem));
    let bare_leaf = String::from_utf8(
        chain.as_bytes()[..chain.find("-----END CERTIFICATE-----").unwrap() + 26].to_vec(),
    )
    .unwrap();
    assert!(!chains_to(&bare_leaf, &old_roots_pem));
    assert!(chains_to(&chain, &consul.roots_pem()));

    let pruned_at = consul.prune_old_roots();
    let roots = get(c.clone(), roots_url.clone()).await;
    assert_eq!(roots.index(), pruned_at);
    assert!(pruned_at > rotated_at);
    assert_eq!(roots.json()["Roots"].as_array().unwrap().len(), 1);
    assert_eq!(consul.prune_old_roots(), pruned_at, "nothing left to prune");

    // Without cross-signing, new leaves carry no intermediate.
    consul.rotate_root(false);
    let leaf = get(c.clone(), leaf_url).await.json();
    assert_eq!(
        support::consul::pem_blocks(leaf["CertPEM"].as_str().unwrap()).len(),
        1
    );
    assert!(!chains_to(
        leaf["CertPEM"].as_str().unwrap(),
        &old_roots_pem
    ));
}

#[tokio::test]
async fn leaf_needs_service_write_on_the_name() {
    let consul = ConsulEmulator::start_with(EmulatorOptions {
        acl: Some(AclConfig::new().token("gw-token", TokenScope::services(["meshgate"]))),
        ..fast_options()
    })
    .await;
    let c = client();
    let url = |name: &str| format!("{}/v1/agent/connect/ca/leaf/{name}", consul.url());
    let ok = send(c.get(url("meshgate")).header("X-Consul-Token", "gw-token"))
        .await
        .unwrap();
    assert_eq!(ok.status, 200);
    let denied = send(c.get(url("web")).header("X-Consul-Token", "gw-token"))
        .await
        .unwrap();
    assert_eq!(denied.status, 403);
    assert!(
        denied.body.starts_with("Permission denied") && denied.body.contains("service:write"),
        "{}",
        denied.body
    );
    let anonymous = get(c.clone(), url("meshgate")).await;
    assert_eq!(anonymous.status, 403);
    assert!(anonymous.body.starts_with("Permission denied"));
    // Roots need no token.
    let roots = get(c, format!("{}/v1/agent/connect/ca/roots", consul.url())).await;
    assert_eq!(roots.status, 200);
}

// === health/connect, catalog/service, ?filter= (CONNECT.md §4, §10) ===

fn mesh_catalog(consul: &ConsulEmulator) {
    consul.register(Registration::new("web-1", "web", "10.0.0.1", 8080).meta("env", "prod"));
    consul.register(
        Registration::new(
            "web-1-sidecar-proxy",
            "web-sidecar-proxy",
            "10.0.0.1",
            21000,
        )
        .sidecar_for("web")
        .tags(["v2"])
        .meta("env", "prod"),
    );
    consul.register(
        Registration::new(
            "web-2-sidecar-proxy",
            "web-sidecar-proxy",
            "10.0.0.2",
            21000,
        )
        .sidecar_for("web")
        .meta("env", "staging")
        .node("node2", "10.0.0.2"),
    );
    consul.register(Registration::new("web-native", "web", "10.0.0.3", 8443).connect_native());
    consul.register(
        Registration::new(
            "api-1-sidecar-proxy",
            "api-sidecar-proxy",
            "10.0.0.4",
            21000,
        )
        .sidecar_for("api"),
    );
}

#[tokio::test]
async fn health_connect_lists_sidecars_and_native_instances() {
    let consul = ConsulEmulator::start_with(fast_options()).await;
    mesh_catalog(&consul);
    let c = client();
    let url = format!("{}/v1/health/connect/web", consul.url());
    let answer = get(c.clone(), url.clone()).await;
    assert_eq!(answer.status, 200);
    assert_eq!(
        answer.ids(),
        ["web-1-sidecar-proxy", "web-2-sidecar-proxy", "web-native"]
    );
    let body = answer.json();
    let sidecar = body
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["Service"]["ID"] == "web-1-sidecar-proxy")
        .unwrap();
    assert_eq!(sidecar["Service"]["Kind"], "connect-proxy");
    assert_eq!(sidecar["Service"]["Proxy"]["DestinationServiceName"], "web");
    assert_eq!(sidecar["Service"]["Port"], 21000);
    assert_eq!(sidecar["Service"]["Connect"], json!({}));
    let native = body
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["Service"]["ID"] == "web-native")
        .unwrap();
    assert_eq!(native["Service"]["Connect"]["Native"], true);
    assert!(
        native["Service"].get("Kind").is_none(),
        "typical services omit Kind"
    );
    // Plain instances are not mesh endpoints; health/service is unchanged.
    let plain = get(c.clone(), format!("{}/v1/health/service/web", consul.url())).await;
    assert_eq!(plain.ids(), ["web-1", "web-native"]);
    let none = get(c.clone(), format!("{}/v1/health/connect/db", consul.url())).await;
    assert_eq!((none.status, none.body.as_str()), (200, "[]"));

    // Blocking: a sidecar's check change wakes the query at the change's index.
    let idx = answer.index();
    let pending = tokio::spawn(get(c.clone(), format!("{url}?index={idx}&wait=5s")));
    timeout(LIMIT, consul.until_blocked(1))
        .await
        .expect("query blocks");
    let changed = consul.set_check("web-2-sidecar-proxy", "critical", "down");
    let woke = timeout(LIMIT, pending).await.expect("woke").expect("task");
    assert_eq!(woke.index(), changed);
    let passing = get(c.clone(), format!("{url}?passing")).await;
    assert_eq!(passing.ids(), ["web-1-sidecar-proxy", "web-native"]);
}

#[tokio::test]
async fn agent_registration_keeps_kind_proxy_and_connect() {
    let consul = ConsulEmulator::start().await;
    let c = client();
    let reg = json!({
        "Name": "web-sidecar-proxy", "ID": "web-sidecar-proxy", "Kind": "connect-proxy",
        "Port": 21000, "Proxy": {"DestinationServiceName": "web", "LocalServicePort": 8080}
    });
    let native = json!({"Name": "meshgate", "ID": "meshgate-1", "Port": 8443,
        "Connect": {"Native": true}});
    for body in [reg, native] {
        let answer = put(
            &c,
            format!("{}/v1/agent/service/register", consul.url()),
            &body.to_string(),
        )
        .await;
        assert_eq!(answer.status, 200, "{}", answer.body);
    }
    let web = get(c.clone(), format!("{}/v1/health/connect/web", consul.url())).await;
    assert_eq!(web.ids(), ["web-sidecar-proxy"]);
    let gw = get(c, format!("{}/v1/health/connect/meshgate", consul.url())).await;
    assert_eq!(gw.ids(), ["meshgate-1"]);
}

#[tokio::test]
async fn catalog_service_has_the_fixture_shapes() {
    let consul = ConsulEmulator::start().await;
    mesh_catalog(&consul);
    let c = client();
    let answer = get(
        c.clone(),
        format!("{}/v1/catalog/service/web-sidecar-proxy", consul.url()),
    )
    .await;
    assert_eq!(answer.status, 200);
    let health = get(
        c.clone(),
        format!("{}/v1/health/service/web-sidecar-proxy", consul.url()),
    )
    .await;
    assert_eq!(answer.index(), health.index());
    let body = answer.json();
    let entry = &body[0];
    let capture = fixture(CATALOG_PROXY_FIXTURE);
    assert_eq!(keys(entry), keys(&capture[0]));
    let mut want = kinds(&capture[0]);
    // The capture's service has Meta; ours too. Both are objects.
    want.insert("ServiceMeta".to_owned(), "object");
    assert_eq!(kinds(entry), want);
    assert_eq!(entry["ServiceKind"], "connect-proxy");
    assert_eq!(entry["ServiceProxy"]["DestinationServiceName"], "web");
    assert_eq!(entry["ServiceTaggedAddresses"]["lan_ipv4"]["Port"], 21000);
    // The docs sample (no tagged service addresses, older build) is a subset.
    let docs = fixture(CATALOG_FIXTURE);
    let plain = get(c, format!("{}/v1/catalog/service/web", consul.url()))
        .await
        .json();
    assert!(keys(&docs[0]).is_subset(&keys(&plain[0])));
    // No health: critical instances are listed too.
    consul.set_check("web-1", "critical", "down");
    assert_eq!(plain.as_array().unwrap().len(), 2);
}

async fn filtered(consul: &ConsulEmulator, path: &str, filter: &str) -> Answer {
    let c = client();
    let encoded: String = filter
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' => {
                char::from(b).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect();
    send(c.get(format!("{}{path}?filter={encoded}", consul.url())))
        .await
        .expect("filtered GET")
}

#[tokio::test]
async fn filters_select_entries_and_bad_filters_answer_500() {
    let consul = ConsulEmulator::start().await;
    mesh_catalog(&consul);
    consul.set_check("web-2-sidecar-proxy", "critical", "down");
    let ids = |a: &Answer, field: &str| -> Vec<String> {
        let mut v: Vec<String> = a
            .json()
            .as_array()
            .expect("array")
            .iter()
            .map(|e| {
                let id = if field == "ServiceID" {
                    &e["ServiceID"]
                } else {
                    &e["Service"]["ID"]
                };
                id.as_str().unwrap().to_owned()
            })
            .collect();
        v.sort();
        v
    };
    let connect = "/v1/health/connect/web";
    let cases: &[(&str, &str, &[&str])] = &[
        (
            connect,
            r#"Service.Kind == "connect-proxy""#,
            &["web-1-sidecar-proxy", "web-2-sidecar-proxy"],
        ),
        (
            connect,
            r#"Service.Kind != "connect-proxy""#,
            &["web-native"],
        ),
        (connect, r#""v2" in Service.Tags"#, &["web-1-sidecar-proxy"]),
        (
            connect,
            r#""v2" not in Service.Tags"#,
            &["web-2-sidecar-proxy", "web-native"],
        ),
        (
            connect,
            r#"Service.Meta.env == "prod" and Service.Proxy.DestinationServiceName == "web""#,
            &["web-1-sidecar-proxy"],
        ),
        (
            connect,
            r#"Service.Meta["env"] == "staging" or Service.Connect.Native == true"#,
            &["web-2-sidecar-proxy", "web-native"],
        ),
        (
            connect,
            r#"(Node.Datacenter == "dc1" and Checks.Status == "critical") or Service.Port == 8443"#,
            &["web-2-sidecar-proxy", "web-native"],
        ),
        (
            connect,
            r#"not (Service.Kind == "connect-proxy")"#,
            &["web-native"],
        ),
        (
            "/v1/health/service/web",
            r#"Service.Meta.env == "prod""#,
            &["web-1"],
        ),
    ];
    for (path, filter, want) in cases {
        let answer = filtered(&consul, path, filter).await;
        assert_eq!(answer.status, 200, "{filter}: {}", answer.body);
        assert_eq!(ids(&answer, ""), *want, "{path} {filter}");
    }
    let catalog = "/v1/catalog/service/web-sidecar-proxy";
    let answer = filtered(
        &consul,
        catalog,
        r#"ServiceMeta.env == "prod" and ServiceKind == "connect-proxy""#,
    )
    .await;
    assert_eq!(ids(&answer, "ServiceID"), ["web-1-sidecar-proxy"]);
    let answer = filtered(&consul, catalog, r#""v2" in ServiceTags"#).await;
    assert_eq!(ids(&answer, "ServiceID"), ["web-1-sidecar-proxy"]);

    for (path, bad, why) in [
        (connect, "Service.Meta.env == prod-1", "no match found"),
        (catalog, "Address == 10.10.10.10", "Invalid number literal"),
        (connect, r#"Service.Kind == "a" and"#, "no match found"),
        (connect, r#"Nope == "x""#, "is not valid"),
        (catalog, r#"Service.Kind == "x""#, "is not valid"),
    ] {
        let answer = filtered(&consul, path, bad).await;
        assert_eq!(answer.status, 500, "{bad}");
        assert!(answer
            .header("content-type")
            .is_some_and(|ct| ct.starts_with("text/plain")));
        assert!(
            answer
                .body
                .starts_with("Failed to create boolean expression evaluator: ")
                && answer.body.contains(why),
            "{bad}: {}",
            answer.body
        );
    }
}

// === test sidecar ===

/// One HTTP/1.1 request over a mesh TLS connection; the raw answer (empty if closed).
async fn mesh_get(
    addr: std::net::SocketAddr,
    config: std::sync::Arc<rustls::ClientConfig>,
) -> Result<(Option<Vec<u8>>, String), std::io::Error> {
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let name = rustls::pki_types::ServerName::try_from("web.default.dc1.internal.mesh")
        .expect("server name");
    let mut tls = tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await?;
    let alpn = tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
    tls.write_all(b"GET /hello HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n")
        .await?;
    let mut out = Vec::new();
    tls.read_to_end(&mut out).await?;
    Ok((alpn, String::from_utf8_lossy(&out).into_owned()))
}

#[tokio::test]
async fn sidecar_accepts_emulator_leaves_refuses_foreign_ones_and_plays_intentions() {
    use support::sidecar::{mesh_client_config, Alpn, Deny, Sidecar};
    let _ = rustls::crypto::ring::default_provider().install_default();
    let consul = ConsulEmulator::start().await;
    let upstream = support::upstream::TestUpstream::builder()
        .name("web-app")
        .start()
        .await;
    let sidecar = Sidecar::start(&consul, "web", Alpn::Http11, upstream.addr()).await;
    let (chain, key) = consul.issue_leaf("meshgate");
    let roots = consul.roots_pem();
    let web_uri = consul.service_uri("web");
    let offer: &[&[u8]] = &[b"h2", b"http/1.1"];
    let good = mesh_client_config(&chain, &key, &roots, Some(&web_uri), offer);

    let (alpn, answer) = timeout(LIMIT, mesh_get(sidecar.addr(), good.clone()))
        .await
        .expect("in time")
        .expect("mesh request");
    assert_eq!(alpn.as_deref(), Some(&b"http/1.1"[..]));
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.ends_with("web-app"), "{answer}");
    assert_eq!(sidecar.callers(), [Some(consul.service_uri("meshgate"))]);
    assert_eq!((sidecar.handshakes(), sidecar.forwarded()), (1, 1));
    let seen = upstream.last_request().expect("forwarded");
    assert_eq!(
        seen.headers.get("x-forwarded-client-cert").unwrap(),
        &format!("URI={}", consul.service_uri("meshgate"))
    );

    // A leaf from a foreign CA is refused: no request reaches the upstream.
    let (fchain, fkey) = consul.foreign_ca().issue_leaf("meshgate");
    let foreign = mesh_client_config(&fchain, &fkey, &roots, Some(&web_uri), offer);
    let refused = timeout(LIMIT, mesh_get(sidecar.addr(), foreign))
        .await
        .expect("in time");
    assert!(
        refused.as_ref().map_or(true, |(_, a)| a.is_empty()),
        "{refused:?}"
    );
    assert_eq!(sidecar.handshakes(), 1);
    assert_eq!(upstream.hits(), 1);

    // The client refuses a sidecar presenting another service's identity.
    let api_uri = consul.service_uri("api");
    let strict = mesh_client_config(&chain, &key, &roots, Some(&api_uri), offer);
    let err = timeout(LIMIT, mesh_get(sidecar.addr(), strict))
        .await
        .expect("in time")
        .expect_err("identity mismatch");
    assert!(
        err.to_string().contains("peer certificate mismatch"),
        "{err}"
    );

    // L7 deny: 403 RBAC; L4 deny: closed without a byte.
    let meshgate = consul.service_uri("meshgate");
    sidecar.deny(&meshgate, Deny::L7);
    let (_, answer) = mesh_get(sidecar.addr(), good.clone())
        .await
        .expect("L7 answer");
    assert!(answer.starts_with("HTTP/1.1 403"), "{answer}");
    assert!(answer.ends_with("RBAC: access denied"), "{answer}");
    sidecar.deny(&meshgate, Deny::L4);
    let closed = mesh_get(sidecar.addr(), good.clone()).await;
    assert!(
        closed.as_ref().map_or(true, |(_, a)| a.is_empty()),
        "{closed:?}"
    );
    sidecar.allow(&meshgate);
    assert_eq!(upstream.hits(), 1, "denied requests never reach the app");

    // h2 sidecars negotiate h2; tcp sidecars negotiate nothing and proxy bytes.
    let h2 = Sidecar::start(&consul, "web", Alpn::H2, upstream.addr()).await;
    let tcp = tokio::net::TcpStream::connect(h2.addr()).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("web").unwrap();
    let tls = tokio_rustls::TlsConnector::from(good.clone())
        .connect(name, tcp)
        .await
        .unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let raw = Sidecar::start(&consul, "web", Alpn::None, upstream.addr()).await;
    let (alpn, answer) = mesh_get(raw.addr(), good.clone())
        .await
        .expect("tcp sidecar");
    assert_eq!(alpn, None);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");

    // After a rotation the sidecar presents a new-root leaf once reloaded.
    consul.rotate_root(true);
    sidecar.allow(&meshgate);
    sidecar.reload(&consul);
    let (chain2, key2) = consul.issue_leaf("meshgate");
    let rotated = mesh_client_config(&chain2, &key2, &consul.roots_pem(), Some(&web_uri), offer);
    let (_, answer) = mesh_get(sidecar.addr(), rotated)
        .await
        .expect("after rotation");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
}

#[tokio::test]
async fn sidecar_forwards_h2_and_websocket_and_can_present_a_foreign_leaf() {
    use futures_util::{SinkExt, StreamExt};
    use support::sidecar::{mesh_client_config, Alpn, Sidecar};
    use tokio_tungstenite::tungstenite::Message;
    let _ = rustls::crypto::ring::default_provider().install_default();
    let consul = ConsulEmulator::start().await;
    let upstream = support::upstream::TestUpstream::builder()
        .name("web-app")
        .start()
        .await;
    let (chain, key) = consul.issue_leaf("meshgate");
    let web_uri = consul.service_uri("web");
    let offer: &[&[u8]] = &[b"h2", b"http/1.1"];
    let config = mesh_client_config(&chain, &key, &consul.roots_pem(), Some(&web_uri), offer);
    let connect = |addr| {
        let config = config.clone();
        async move {
            let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
            let name = rustls::pki_types::ServerName::try_from("web").unwrap();
            tokio_rustls::TlsConnector::from(config)
                .connect(name, tcp)
                .await
        }
    };

    // h2 downstream, HTTP/1.1 to the app.
    let h2 = Sidecar::start(&consul, "web", Alpn::H2, upstream.addr()).await;
    let tls = connect(h2.addr()).await.expect("h2 handshake");
    let (mut sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tls),
    )
    .await
    .expect("h2 connection");
    tokio::spawn(conn);
    let req = http::Request::get("https://web/hello")
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let resp = timeout(LIMIT, sender.send_request(req))
        .await
        .expect("in time")
        .expect("h2 answer");
    assert_eq!(resp.status(), 200);
    assert_eq!(upstream.last_request().unwrap().path(), "/hello");
    assert_eq!(h2.forwarded(), 1);

    // WebSocket through an http sidecar.
    let echo = support::ws::WsEcho::start().await;
    let http = Sidecar::start(&consul, "web", Alpn::Http11, echo.addr).await;
    let tls = connect(http.addr()).await.expect("handshake");
    let (mut ws, _) = timeout(LIMIT, tokio_tungstenite::client_async("ws://web/echo", tls))
        .await
        .expect("in time")
        .expect("upgrade through the sidecar");
    ws.send(Message::text("hello")).await.unwrap();
    let back = timeout(LIMIT, ws.next()).await.expect("echo in time");
    assert_eq!(back.unwrap().unwrap(), Message::text("hello"));

    // A sidecar presenting a foreign CA's leaf for the right name is refused by a mesh client.
    let (fchain, fkey) = consul.foreign_ca().issue_leaf("web");
    http.present(&consul, &fchain, &fkey);
    let err = connect(http.addr()).await.expect_err("foreign server leaf");
    assert!(err.to_string().contains("mesh chain"), "{err}");
}
