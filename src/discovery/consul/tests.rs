//! Unit tests for the Consul client: fixture decoding, settings, tags, index/backoff/rate
//! logic, and a loopback check of the watch loops against a tiny scripted server.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderMap, HeaderValue, StatusCode};
use tokio::time::Instant;

use super::client::{classify_status, parse_meta, parse_retry_after, wait_param};
use super::feed::fingerprints;
use super::publish::Publisher;
use super::*;
use crate::discovery::{Discovered, InstanceStatus};

fn fixture(name: &str) -> Vec<u8> {
    let path = format!(
        "{}/tests/fixtures/consul/{name}",
        env!("CARGO_MANIFEST_DIR")
    );
    std::fs::read(&path).unwrap_or_else(|e| panic!("reading {path}: {e}"))
}

fn entries(name: &str) -> Vec<HealthEntry> {
    serde_json::from_slice(&fixture(name)).unwrap_or_else(|e| panic!("decoding {name}: {e}"))
}

fn discovered(host: &str, port: u16, weight: u32, status: InstanceStatus, id: &str) -> Discovered {
    Discovered {
        host: host.into(),
        port,
        weight,
        status,
        id: id.into(),
    }
}

fn no_env(_: &str) -> Option<String> {
    None
}

// === decoding fixtures ===

#[test]
fn fixture_1_16_2_two_instances() {
    // Real capture: two instances on node sovadev3, Meta null, capitalised TaggedAddresses.
    let entries = entries("health-service-1.16.2-two-instances.json");
    assert_eq!(entries.len(), 2);
    let first = &entries[0];
    assert_eq!(first.node.node, "sovadev3");
    assert_eq!(first.node.address, "192.168.133.223");
    assert_eq!(first.node.datacenter, "promavto");
    assert_eq!(
        first.node.meta.get("consul-version").map(String::as_str),
        Some("1.16.2")
    );
    assert_eq!(first.service.service, "activator-default");
    assert_eq!(first.service.port, 39677);
    assert!(first.service.meta.is_empty(), "Meta: null decodes as empty");
    assert_eq!(
        first.service.weights,
        Weights {
            passing: 1,
            warning: 1
        }
    );
    assert_eq!(first.checks.len(), 2);
    assert_eq!(first.checks[0].check_id, "serfHealth");
    assert_eq!(first.checks[1].modify_index, 5100678);
    assert_eq!(aggregate_status(&first.checks), InstanceStatus::Passing);

    let got = to_discovered(&entries, &WarningMode::Degrade, &[]);
    assert_eq!(
        got,
        vec![
            // Sorted: same host, so by port.
            discovered(
                "192.168.133.223",
                20395,
                1,
                InstanceStatus::Passing,
                "sovadev3/svc-a31a1c88-0633-4e1b-ab74-418e7b39c7cd"
            ),
            discovered(
                "192.168.133.223",
                39677,
                1,
                InstanceStatus::Passing,
                "sovadev3/svc-6b484ced-b392-44dc-aaa4-5186bf5bfb7b"
            ),
        ]
    );
    // Tag filter, case-insensitive, both server tags present.
    assert_eq!(
        to_discovered(&entries, &WarningMode::Degrade, &["NOC".to_owned()]).len(),
        2
    );
    assert!(to_discovered(&entries, &WarningMode::Degrade, &["prod".to_owned()]).is_empty());
}

#[test]
fn fixture_1_16_2_empty_service_address_uses_node_address() {
    // Real capture: Service.Address "" and no TaggedAddresses key; Tags [""].
    let entries = entries("health-service-1.16.2-empty-service-address.json");
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0].service.address, "");
    assert_eq!(entries[0].service.tags, vec![String::new()]);
    assert_eq!(
        to_discovered(&entries, &WarningMode::Degrade, &[]),
        vec![discovered(
            "192.168.133.223",
            27017,
            1,
            InstanceStatus::Passing,
            "sovadev3/mongo"
        )]
    );
}

#[test]
fn fixture_derived_mixed_address_and_weights() {
    // DERIVED from the 1.16.2 capture: instance 0 has Weights {10, 1}; instance 1 has
    // Address "" (fallback to the node) and no TaggedAddresses.
    let entries = entries("health-service-DERIVED-mixed-address-and-weights.json");
    assert_eq!(
        entries[0].service.weights,
        Weights {
            passing: 10,
            warning: 1
        }
    );
    assert_eq!(entries[1].service.address, "");
    assert_eq!(
        to_discovered(&entries, &WarningMode::Degrade, &[]),
        vec![
            discovered(
                "192.168.133.223",
                20395,
                1,
                InstanceStatus::Passing,
                "sovadev3/svc-a31a1c88-0633-4e1b-ab74-418e7b39c7cd"
            ),
            discovered(
                "192.168.133.223",
                39677,
                10,
                InstanceStatus::Passing,
                "sovadev3/svc-6b484ced-b392-44dc-aaa4-5186bf5bfb7b"
            ),
        ]
    );
}

#[test]
fn fixture_1_21_3_passing_then_critical() {
    // Real capture: the same instance before and after its HTTP check failed.
    let passing = entries("health-service-1.21.3-passing.json");
    assert_eq!(passing[0].checks[1].modify_index, 240);
    assert_eq!(
        to_discovered(&passing, &WarningMode::Degrade, &[]),
        vec![discovered(
            "172.16.3.3",
            3000,
            1,
            InstanceStatus::Passing,
            "example-consul/example_http_service_3000"
        )]
    );

    let critical = entries("health-service-1.21.3-critical.json");
    assert_eq!(critical[0].checks[1].status, "critical");
    assert_eq!(critical[0].checks[1].modify_index, 264);
    assert_eq!(
        aggregate_status(&critical[0].checks),
        InstanceStatus::Critical
    );
    for mode in [
        WarningMode::Degrade,
        WarningMode::Exclude,
        WarningMode::Include,
    ] {
        assert!(to_discovered(&critical, &mode, &[]).is_empty(), "{mode:?}");
    }
}

#[test]
fn fixture_docs_sample() {
    // Docs sample: lowercase tagged-address keys, no indexes, Weights {10, 1}, Namespace.
    let entries = entries("health-service-docs-sample.json");
    assert_eq!(
        entries[0]
            .node
            .meta
            .get("instance_type")
            .map(String::as_str),
        Some("t2.medium")
    );
    assert_eq!(
        entries[0]
            .service
            .meta
            .get("redis_version")
            .map(String::as_str),
        Some("4.0")
    );
    assert_eq!(
        entries[0].checks[0].modify_index, 0,
        "missing ModifyIndex defaults to 0"
    );
    assert_eq!(
        to_discovered(&entries, &WarningMode::Degrade, &["primary".to_owned()]),
        vec![discovered(
            "10.1.10.12",
            8000,
            10,
            InstanceStatus::Passing,
            "foobar/redis"
        )]
    );
}

#[test]
fn catalog_fixtures_decode() {
    let docs = decode::decode_catalog(&fixture("catalog-services-docs-sample.json")).unwrap();
    let want: BTreeMap<String, Vec<String>> = [
        ("consul", vec![]),
        ("postgresql", vec!["primary", "secondary"]),
        ("redis", vec![]),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.into_iter().map(str::to_owned).collect()))
    .collect();
    assert_eq!(docs, want);

    let real = decode::decode_catalog(&fixture("catalog-services-real-capture.json")).unwrap();
    assert_eq!(real.keys().collect::<Vec<_>>(), vec!["consul", "nginx"]);

    // null tag lists, duplicates and order are normalised.
    let odd = decode::decode_catalog(br#"{"a":null,"b":["y","x","y"]}"#).unwrap();
    assert_eq!(odd["a"], Vec::<String>::new());
    assert_eq!(odd["b"], vec!["x", "y"]);
}

// === decoding edge cases (synthetic) ===

fn entry_json(node: &str, svc: &str, checks: &str) -> String {
    format!(r#"{{"Node":{node},"Service":{svc},"Checks":{checks}}}"#)
}

fn decode_one(json: &str) -> HealthEntry {
    serde_json::from_str(json).unwrap_or_else(|e| panic!("{e}: {json}"))
}

#[test]
fn decode_tolerates_nulls_missing_fields_and_unknown_fields() {
    let e = decode_one(&entry_json(
        r#"{"Node":"n1","Address":"10.0.0.1","Meta":null,"TaggedAddresses":null,"Locality":{"Region":"x"}}"#,
        r#"{"ID":"web-1","Service":"web","Tags":null,"Address":null,"Meta":null,"Port":8080,"SomethingNew":[1,2]}"#,
        "null",
    ));
    assert!(e.service.tags.is_empty());
    assert_eq!(e.service.address, "");
    assert_eq!(
        e.service.weights,
        Weights {
            passing: 1,
            warning: 1
        },
        "missing Weights"
    );
    assert!(e.checks.is_empty());
    assert_eq!(
        aggregate_status(&e.checks),
        InstanceStatus::Passing,
        "no checks = passing"
    );
    assert_eq!(
        to_discovered(&[e], &WarningMode::Degrade, &[]),
        vec![discovered(
            "10.0.0.1",
            8080,
            1,
            InstanceStatus::Passing,
            "n1/web-1"
        )]
    );

    let w = decode_one(&entry_json(
        r#"{"Node":"n1","Address":"10.0.0.1"}"#,
        r#"{"ID":"a","Port":1,"Weights":null}"#,
        "[]",
    ));
    assert_eq!(
        w.service.weights,
        Weights {
            passing: 1,
            warning: 1
        },
        "null Weights"
    );
    let w = decode_one(&entry_json(
        r#"{"Node":"n1","Address":"10.0.0.1"}"#,
        r#"{"ID":"a","Port":1,"Weights":{"Passing":5}}"#,
        "[]",
    ));
    assert_eq!(
        w.service.weights,
        Weights {
            passing: 5,
            warning: 1
        },
        "partial Weights"
    );

    // Missing Node and Service entirely still decode (and are dropped: no address/port).
    let bare = decode_one("{}");
    assert!(to_discovered(&[bare], &WarningMode::Degrade, &[]).is_empty());
}

fn check(id: &str, status: &str, service_id: &str) -> CheckEntry {
    CheckEntry {
        node: "n1".into(),
        check_id: id.into(),
        status: status.into(),
        service_id: service_id.into(),
        service_name: if service_id.is_empty() {
            String::new()
        } else {
            "web".into()
        },
        modify_index: 1,
    }
}

#[test]
fn aggregate_status_precedence() {
    use InstanceStatus::*;
    let cases: &[(&[CheckEntry], InstanceStatus)] = &[
        (&[], Passing),
        (
            &[
                check("serfHealth", "passing", ""),
                check("c", "passing", "w"),
            ],
            Passing,
        ),
        (
            &[check("c", "warning", "w"), check("d", "passing", "w")],
            Warning,
        ),
        (
            &[check("c", "warning", "w"), check("d", "critical", "w")],
            Critical,
        ),
        // A node-level check counts too.
        (
            &[
                check("serfHealth", "critical", ""),
                check("c", "passing", "w"),
            ],
            Critical,
        ),
        (
            &[
                check("_service_maintenance:w", "critical", "w"),
                check("c", "passing", "w"),
            ],
            Maintenance,
        ),
        (
            &[
                check("_node_maintenance", "critical", ""),
                check("c", "critical", "w"),
            ],
            Maintenance,
        ),
        // Unknown status strings degrade rather than drop or pass.
        (&[check("c", "bogus", "w")], Warning),
    ];
    for (checks, want) in cases {
        assert_eq!(aggregate_status(checks), *want, "{checks:?}");
    }
}

fn synthetic(
    id: &str,
    addr: &str,
    port: i64,
    weights: (u32, u32),
    status: &str,
    tags: &[&str],
) -> HealthEntry {
    HealthEntry {
        node: Node {
            node: "n1".into(),
            address: "10.0.0.1".into(),
            ..Node::default()
        },
        service: Service {
            id: id.into(),
            service: "web".into(),
            tags: tags.iter().map(|t| (*t).to_owned()).collect(),
            address: addr.into(),
            port,
            weights: Weights {
                passing: weights.0,
                warning: weights.1,
            },
            ..Service::default()
        },
        checks: vec![check(&format!("service:{id}"), status, id)],
    }
}

#[test]
fn warning_modes() {
    let all = vec![
        synthetic("ok", "10.0.0.2", 80, (5, 2), "passing", &[]),
        synthetic("warn", "10.0.0.3", 80, (5, 2), "warning", &[]),
        synthetic("down", "10.0.0.4", 80, (5, 2), "critical", &[]),
    ];
    use InstanceStatus::*;
    assert_eq!(
        to_discovered(&all, &WarningMode::Degrade, &[]),
        vec![
            discovered("10.0.0.2", 80, 5, Passing, "n1/ok"),
            discovered("10.0.0.3", 80, 2, Warning, "n1/warn"),
        ]
    );
    assert_eq!(
        to_discovered(&all, &WarningMode::Include, &[]),
        vec![
            discovered("10.0.0.2", 80, 5, Passing, "n1/ok"),
            discovered("10.0.0.3", 80, 5, Warning, "n1/warn"),
        ]
    );
    assert_eq!(
        to_discovered(&all, &WarningMode::Exclude, &[]),
        vec![discovered("10.0.0.2", 80, 5, Passing, "n1/ok")]
    );
}

#[test]
fn weights_zero_kept_and_large_clamped() {
    let all = vec![
        synthetic("zero", "10.0.0.2", 80, (1, 0), "warning", &[]),
        synthetic("big", "10.0.0.3", 80, (65535, 1), "passing", &[]),
    ];
    let got = to_discovered(&all, &WarningMode::Degrade, &[]);
    assert_eq!(got[0].weight, 0, "weight 0 stays in the set");
    assert_eq!(got[1].weight, MAX_WEIGHT);
}

#[test]
fn unusable_instances_dropped() {
    let all = vec![
        synthetic("noport", "10.0.0.2", 0, (1, 1), "passing", &[]),
        synthetic("hugeport", "10.0.0.3", 70000, (1, 1), "passing", &[]),
        synthetic("negport", "10.0.0.3", -1, (1, 1), "passing", &[]),
        synthetic("dns", "web.example.internal", 443, (1, 1), "passing", &[]),
    ];
    assert_eq!(
        to_discovered(&all, &WarningMode::Degrade, &[]),
        vec![discovered(
            "web.example.internal",
            443,
            1,
            InstanceStatus::Passing,
            "n1/dns"
        )]
    );
}

#[test]
fn tags_filter_is_case_insensitive_and() {
    let all = vec![
        synthetic("a", "10.0.0.2", 80, (1, 1), "passing", &["Prod", "v2"]),
        synthetic("b", "10.0.0.3", 80, (1, 1), "passing", &["prod"]),
    ];
    let want = ["prod".to_owned(), "V2".to_owned()];
    let got = to_discovered(&all, &WarningMode::Degrade, &want);
    assert_eq!(got.len(), 1);
    assert_eq!(&*got[0].id, "n1/a");
}

#[test]
fn output_is_sorted_and_deduplicated() {
    let a = synthetic("a", "10.0.0.9", 80, (1, 1), "passing", &[]);
    let b = synthetic("b", "10.0.0.2", 80, (1, 1), "passing", &[]);
    let one = to_discovered(&[a.clone(), b.clone()], &WarningMode::Degrade, &[]);
    let two = to_discovered(&[b.clone(), a.clone(), b], &WarningMode::Degrade, &[]);
    assert_eq!(one, two);
    assert_eq!(&*one[0].host, "10.0.0.2");
}

// === settings ===

fn env_of(pairs: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
    move |key| {
        pairs
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| (*v).to_owned())
    }
}

#[test]
fn settings_defaults() {
    let s = RawConsul::default().resolve(&no_env).unwrap();
    assert_eq!(s.address.as_str(), "http://127.0.0.1:8500/");
    assert!(!s.is_tls());
    assert_eq!(s.token, None);
    assert_eq!(s.datacenter, None);
    assert!(s.tags.is_empty());
    assert_eq!(s.wait, Duration::from_secs(60));
    assert!(!s.stale);
    assert_eq!(s.warning, WarningMode::Degrade);
    assert_eq!(s.tls, TlsSettings::default());
    assert!(!s.routes_from_tags);
    assert_eq!(s.startup_timeout, Duration::from_secs(10));
    assert_eq!(s.max_watches, 64);
}

#[test]
fn settings_deserialize_with_humantime_and_deny_unknown() {
    let raw: RawConsul = serde_json::from_str(
        r#"{"address":"https://consul:8501","wait":"250ms","startup_timeout":"1m","warning":"exclude","tags":["a"]}"#,
    )
    .unwrap();
    assert_eq!(raw.wait, Duration::from_millis(250));
    assert_eq!(raw.startup_timeout, Duration::from_secs(60));
    assert_eq!(raw.max_watches, 64, "unset keys keep defaults");
    let s = raw.resolve(&no_env).unwrap();
    assert!(s.is_tls());
    assert_eq!(s.warning, WarningMode::Exclude);

    let err = serde_json::from_str::<RawConsul>(r#"{"adress":"x"}"#).unwrap_err();
    assert!(err.to_string().contains("unknown field `adress`"), "{err}");

    // Serialize round-trips (Option::None keys are skipped).
    let back: RawConsul = serde_json::from_value(serde_json::to_value(&raw).unwrap()).unwrap();
    assert_eq!(back, raw);
}

#[test]
fn settings_env_fallbacks() {
    let env = env_of(&[
        ("CONSUL_HTTP_ADDR", "consul.internal:8501"),
        ("CONSUL_HTTP_TOKEN", "env-token"),
        ("CONSUL_CACERT", "/etc/consul/ca.pem"),
        ("CONSUL_CLIENT_CERT", "/etc/consul/c.pem"),
        ("CONSUL_CLIENT_KEY", "/etc/consul/k.pem"),
    ]);
    let s = RawConsul::default().resolve(&env).unwrap();
    assert_eq!(
        s.address.as_str(),
        "http://consul.internal:8501/",
        "no scheme means http"
    );
    assert_eq!(s.token, Some(TokenSource::Inline("env-token".into())));
    assert_eq!(
        s.tls.ca_file.as_deref(),
        Some(std::path::Path::new("/etc/consul/ca.pem"))
    );
    assert!(s.tls.client_cert.is_some());

    let env = env_of(&[
        ("CONSUL_HTTP_ADDR", "consul.internal:8501"),
        ("CONSUL_HTTP_SSL", "true"),
        ("CONSUL_HTTP_SSL_VERIFY", "false"),
        ("CONSUL_HTTP_TOKEN", "env-token"),
        ("CONSUL_HTTP_TOKEN_FILE", "/run/token"),
    ]);
    let s = RawConsul::default().resolve(&env).unwrap();
    assert_eq!(s.address.as_str(), "https://consul.internal:8501/");
    assert!(s.tls.insecure_skip_verify);
    assert_eq!(
        s.token,
        Some(TokenSource::File("/run/token".into())),
        "token file wins"
    );

    let env = env_of(&[("CONSUL_HTTP_ADDR", "https://10.0.0.5:8501")]);
    let s = RawConsul::default().resolve(&env).unwrap();
    assert!(s.is_tls());

    // The file beats the environment; empty env values count as unset.
    let raw = RawConsul {
        address: Some("http://file:8500".into()),
        token: Some("file-token".into()),
        ..RawConsul::default()
    };
    let env = env_of(&[
        ("CONSUL_HTTP_ADDR", "env:1"),
        ("CONSUL_HTTP_TOKEN", "env-token"),
    ]);
    let s = raw.resolve(&env).unwrap();
    assert_eq!(s.address.as_str(), "http://file:8500/");
    assert_eq!(s.token, Some(TokenSource::Inline("file-token".into())));
    let s = RawConsul::default()
        .resolve(&env_of(&[("CONSUL_HTTP_ADDR", " ")]))
        .unwrap();
    assert_eq!(s.address.as_str(), "http://127.0.0.1:8500/");
}

#[test]
fn settings_collect_all_errors_with_key_paths() {
    let raw = RawConsul {
        address: Some("ftp://consul".into()),
        token: Some("t".into()),
        token_file: Some("/run/token".into()),
        datacenter: Some(" ".into()),
        tags: vec!["ok".into(), String::new()],
        wait: Duration::ZERO,
        warning: "foo".into(),
        cert_file: Some("/c.pem".into()),
        startup_timeout: Duration::ZERO,
        max_watches: 0,
        ..RawConsul::default()
    };
    let errors = raw.resolve(&no_env).unwrap_err();
    let keys: Vec<&str> = errors.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(
        keys,
        [
            "address",
            "token",
            "datacenter",
            "tags[1]",
            "wait",
            "warning",
            "startup_timeout",
            "max_watches",
            "key_file"
        ]
    );
    let warning = errors.iter().find(|(k, _)| k == "warning").unwrap();
    assert_eq!(
        warning.1,
        r#"unknown warning mode "foo", expected one of degrade, exclude, include"#
    );
}

#[test]
fn settings_address_and_tls_errors() {
    let bad = |address: &str| {
        RawConsul {
            address: Some(address.into()),
            ..RawConsul::default()
        }
        .resolve(&no_env)
        .unwrap_err()
    };
    for address in [
        "",
        "unix:///var/run/consul.sock",
        "http://",
        "http://h:1/?x=1",
        "http://u:p@h:1",
    ] {
        let errors = bad(address);
        assert_eq!(errors[0].0, "address", "{address:?}: {errors:?}");
    }
    // Env-sourced problems name their variable.
    let errors = RawConsul::default()
        .resolve(&env_of(&[("CONSUL_HTTP_ADDR", "gopher://x")]))
        .unwrap_err();
    assert!(errors[0].1.contains("CONSUL_HTTP_ADDR"), "{errors:?}");

    // TLS keys in the file with an http address are a mistake...
    let errors = RawConsul {
        ca_file: Some("/ca.pem".into()),
        ..RawConsul::default()
    }
    .resolve(&no_env)
    .unwrap_err();
    assert_eq!(errors[0].0, "ca_file");
    // ...but inherited from the environment they are ignored, like the Consul CLI does.
    assert!(RawConsul::default()
        .resolve(&env_of(&[("CONSUL_CACERT", "/ca.pem")]))
        .is_ok());

    // A path prefix is kept.
    let s = RawConsul {
        address: Some("https://proxy.example/consul".into()),
        ..RawConsul::default()
    }
    .resolve(&no_env)
    .unwrap();
    assert_eq!(s.address.path(), "/consul");
}

#[test]
fn debug_redacts_tokens() {
    let raw = RawConsul {
        token: Some("s3cr3t".into()),
        ..RawConsul::default()
    };
    assert!(!format!("{raw:?}").contains("s3cr3t"));
    let s = raw.resolve(&no_env).unwrap();
    assert!(!format!("{s:?}").contains("s3cr3t"));
}

// === client request/response plumbing ===

fn test_client(raw: RawConsul) -> ConsulClient {
    ConsulClient::new(&raw.resolve(&no_env).unwrap()).unwrap()
}

#[tokio::test]
async fn urls_carry_index_wait_tags_dc_stale() {
    let client = test_client(RawConsul {
        address: Some("http://127.0.0.1:8500".into()),
        datacenter: Some("dc2".into()),
        tags: vec!["prod".into(), "v 2".into()],
        stale: true,
        wait: Duration::from_secs(60),
        ..RawConsul::default()
    });
    let first = client.url(&["health", "service", "web"], None, true);
    assert_eq!(
        first.as_str(),
        "http://127.0.0.1:8500/v1/health/service/web?dc=dc2&tag=prod&tag=v+2&stale"
    );
    let zero = client.url(&["health", "service", "web"], Some(0), true);
    assert_eq!(zero, first, "index 0 is never sent");
    let blocking = client.url(&["health", "service", "web"], Some(42), true);
    assert_eq!(
        blocking.as_str(),
        "http://127.0.0.1:8500/v1/health/service/web?dc=dc2&tag=prod&tag=v+2&stale&index=42&wait=60000ms"
    );
    let odd = client.url(&["health", "service", "a/b?c"], None, false);
    assert!(
        odd.path().ends_with("/v1/health/service/a%2Fb%3Fc"),
        "{odd}"
    );

    let plain = test_client(RawConsul {
        address: Some("https://proxy.example/consul/".into()),
        ..RawConsul::default()
    });
    assert_eq!(
        plain.url(&["catalog", "services"], None, false).as_str(),
        "https://proxy.example/consul/v1/catalog/services"
    );
    assert_eq!(
        plain.request_timeout(),
        Duration::from_millis(60_000 + 3_750 + 10_000)
    );
}

#[test]
fn wait_is_sent_in_milliseconds() {
    assert_eq!(wait_param(Duration::from_secs(60)), "60000ms");
    assert_eq!(wait_param(Duration::from_micros(10)), "1ms");
}

#[test]
fn meta_headers_are_case_insensitive_and_index_is_required() {
    let mut h = HeaderMap::new();
    h.insert("X-Consul-Index", HeaderValue::from_static("5100254"));
    h.insert("X-Consul-Knownleader", HeaderValue::from_static("false"));
    h.insert("x-consul-lastcontact", HeaderValue::from_static("1500"));
    h.insert(
        "X-CONSUL-RESULTS-FILTERED-BY-ACLS",
        HeaderValue::from_static("true"),
    );
    let meta = parse_meta(&h).unwrap();
    assert_eq!(meta.index, 5100254);
    assert!(!meta.known_leader);
    assert_eq!(meta.last_contact, Duration::from_millis(1500));
    assert!(meta.filtered_by_acls);

    let mut h = HeaderMap::new();
    h.insert("x-consul-index", HeaderValue::from_static("1"));
    let meta = parse_meta(&h).unwrap();
    assert!(meta.known_leader, "absent Knownleader is not alarming");
    assert!(!meta.filtered_by_acls);

    assert!(matches!(
        parse_meta(&HeaderMap::new()),
        Err(ConsulError::MissingIndex { value: None })
    ));
    let mut h = HeaderMap::new();
    h.insert("x-consul-index", HeaderValue::from_static("abc"));
    assert!(matches!(
        parse_meta(&h),
        Err(ConsulError::MissingIndex { value: Some(_) })
    ));
}

#[test]
fn error_statuses_are_classified() {
    let e = classify_status(StatusCode::FORBIDDEN, "ACL not found".into(), None);
    assert!(matches!(e, ConsulError::AclNotFound));
    assert!(e.is_acl());
    let e = classify_status(
        StatusCode::FORBIDDEN,
        "rpc error making call: ACL not found".into(),
        None,
    );
    assert!(matches!(e, ConsulError::AclNotFound));
    let e = classify_status(
        StatusCode::FORBIDDEN,
        "Permission denied: token lacks 'service:read'".into(),
        None,
    );
    assert!(matches!(e, ConsulError::Status { .. }) && e.is_acl());

    let mut h = HeaderMap::new();
    h.insert("retry-after", HeaderValue::from_static("7"));
    let e = classify_status(
        StatusCode::TOO_MANY_REQUESTS,
        String::new(),
        parse_retry_after(&h),
    );
    assert!(e.is_rate_limited());
    assert_eq!(e.retry_after(), Some(Duration::from_secs(7)));

    let e = classify_status(
        StatusCode::INTERNAL_SERVER_ERROR,
        "No cluster leader".into(),
        None,
    );
    assert_eq!(
        e.to_string(),
        "Consul answered 500 Internal Server Error: No cluster leader"
    );
    assert!(!e.is_acl() && !e.is_config() && e.retry_after().is_none());

    // CONNECT.md §10.2: a bad filter is a 500 whose text names the evaluator (possibly
    // prefixed by the RPC layer); it is a configuration error, not a transient one.
    let text = "rpc error making call: Failed to create boolean expression evaluator: 1:17 (16): rule \"number\": Invalid number literal";
    let e = classify_status(StatusCode::INTERNAL_SERVER_ERROR, text.into(), None);
    assert!(
        matches!(&e, ConsulError::BadFilter { message } if message == text),
        "{e:?}"
    );
    assert!(e.is_config() && !e.is_acl());
    assert_eq!(
        e.to_string(),
        format!("Consul refused discovery.consul.filter: {text}")
    );
}

#[tokio::test]
async fn filter_is_a_query_parameter_of_service_reads_only() {
    let client = test_client(RawConsul {
        address: Some("http://127.0.0.1:8500".into()),
        filter: Some(" Service.Meta.version == \"v2\" ".into()),
        ..RawConsul::default()
    });
    let read = client.url(&["health", "service", "web"], Some(7), true);
    let pairs: Vec<(String, String)> = read.query_pairs().into_owned().collect();
    assert!(
        pairs.contains(&("filter".into(), "Service.Meta.version == \"v2\"".into())),
        "{read}"
    );
    let catalog = client.url(&["catalog", "services"], None, false);
    assert_eq!(catalog.query(), None, "{catalog}");
}

#[test]
fn filter_must_be_one_non_empty_line() {
    for (bad, msg) in [
        ("  ", "must not be empty"),
        ("a ==\n\"b\"", "one line"),
        (&"x".repeat(5000)[..], "longer than 4096"),
    ] {
        let errs = RawConsul {
            filter: Some(bad.into()),
            ..RawConsul::default()
        }
        .resolve(&no_env)
        .unwrap_err();
        assert!(
            errs.iter().any(|(k, m)| k == "filter" && m.contains(msg)),
            "{bad:?}: {errs:?}"
        );
    }
}

#[test]
fn client_build_reports_file_errors_with_path() {
    let settings = RawConsul {
        address: Some("https://consul:8501".into()),
        ca_file: Some("/nonexistent/ca.pem".into()),
        ..RawConsul::default()
    }
    .resolve(&no_env)
    .unwrap();
    match ConsulClient::new(&settings) {
        Err(ConsulError::Tls {
            source: crate::tls::TlsError::Read { path, .. },
        }) => assert_eq!(path, std::path::Path::new("/nonexistent/ca.pem")),
        other => panic!("expected a read error naming the file, got {other:?}"),
    }

    let dir = std::env::temp_dir().join(format!("meshgate-consul-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let not_pem = dir.join("ca.pem");
    std::fs::write(&not_pem, "hello").unwrap();
    let settings = ConsulSettings {
        tls: TlsSettings {
            ca_file: Some(not_pem.clone()),
            ..TlsSettings::default()
        },
        ..settings
    };
    let err = ConsulClient::new(&settings).unwrap_err();
    assert!(
        matches!(&err, ConsulError::Tls { source: crate::tls::TlsError::Pem { path, .. } } if path == &not_pem),
        "{err:?}"
    );
    assert!(err.is_config());

    let empty_token = dir.join("token");
    std::fs::write(&empty_token, "  \n").unwrap();
    let settings = RawConsul {
        token_file: Some(empty_token),
        ..RawConsul::default()
    }
    .resolve(&no_env)
    .unwrap();
    assert!(matches!(
        ConsulClient::new(&settings),
        Err(ConsulError::InvalidFile { .. })
    ));
    let _ = std::fs::remove_dir_all(&dir);

    // https without ca_file uses the system roots, or skips verification when asked.
    let insecure = RawConsul {
        address: Some("https://consul:8501".into()),
        insecure_skip_verify: Some(true),
        ..RawConsul::default()
    }
    .resolve(&no_env)
    .unwrap();
    assert!(ConsulClient::new(&insecure).is_ok());
}

// === tags ===

fn tags(list: &[&str]) -> Vec<String> {
    list.iter().map(|t| (*t).to_owned()).collect()
}

fn route(path: &str, host: Option<&str>, strip: Option<&str>, lb: Option<&str>) -> TagRoute {
    TagRoute {
        service: "orders".into(),
        host: host.map(str::to_owned),
        path: path.into(),
        strip: strip.map(str::to_owned),
        lb: lb.map(str::to_owned),
    }
}

#[test]
fn tag_routes_our_form() {
    let (routes, warnings) = parse_tag_routes_with_warnings(
        "orders",
        &tags(&[
            "meshgate.route=/api/v1/orders",
            "meshgate.route=Shop.Example.com/orders",
            "meshgate.strip=/api/v1",
            "meshgate.lb=least_connections",
            "unrelated",
            "meshgate.route=/api/v1/orders",
        ]),
    );
    assert_eq!(
        routes,
        vec![
            route(
                "/api/v1/orders",
                None,
                Some("/api/v1"),
                Some("least_connections")
            ),
            route(
                "/orders",
                Some("shop.example.com"),
                Some("/api/v1"),
                Some("least_connections")
            ),
        ]
    );
    // The strip prefix does not match the host route's path.
    assert_eq!(warnings.len(), 1, "{warnings:?}");
}

#[test]
fn tag_routes_fabio_form() {
    let (routes, warnings) = parse_tag_routes_with_warnings(
        "orders",
        &tags(&[
            "urlprefix-/orders",
            "urlprefix-/api/orders strip=/api",
            "urlprefix-shop.example.com/cart",
            "urlprefix-Admin.example.com",
            "urlprefix-/x proto=https",
        ]),
    );
    assert_eq!(
        routes,
        vec![
            route("/api/orders", None, Some("/api"), None),
            route("/orders", None, None, None),
            route("/x", None, None, None),
            route("/", Some("admin.example.com"), None, None),
            route("/cart", Some("shop.example.com"), None, None),
        ]
    );
    assert_eq!(warnings.len(), 1);
    assert!(warnings[0].contains("proto=https"), "{warnings:?}");
}

#[test]
fn tag_routes_invalid_tags_are_warnings() {
    let (routes, warnings) = parse_tag_routes_with_warnings(
        "orders",
        &tags(&[
            "meshgate.route",
            "meshgate.route=",
            "meshgate.strip=api",
            "meshgate.color=blue",
            "meshgate.lb=",
            "urlprefix-",
            "urlprefix-:3306 proto=tcp",
            "urlprefix-/a strip=nope",
        ]),
    );
    assert_eq!(routes, vec![route("/a", None, None, None)]);
    // One warning per bad tag; fabio's TCP route skips its options.
    assert_eq!(warnings.len(), 8, "{warnings:#?}");
    assert!(parse_tag_routes("orders", &[]).is_empty());
}

// === index, backoff, rate limit ===

#[test]
fn next_index_rules() {
    use IndexStep::*;
    assert_eq!(next_index(None, 10), Advance(10), "first answer");
    assert_eq!(next_index(None, 0), Advance(1), "0 is read as 1");
    assert_eq!(next_index(Some(10), 11), Advance(11));
    assert_eq!(next_index(Some(10), 10), Unchanged);
    assert_eq!(next_index(Some(10), 9), Reset, "backwards");
    assert_eq!(next_index(Some(1), 0), Unchanged, "0 read as 1 equals 1");
    assert_eq!(next_index(Some(5), 0), Reset);
    assert_eq!(next_index(Some(u64::MAX - 1), u64::MAX), Advance(u64::MAX));
}

#[test]
fn backoff_grows_caps_jitters_and_resets() {
    let mut b = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
    let ceilings: Vec<u64> = (0..10)
        .map(|_| {
            let ceiling = b.ceiling();
            let delay = b.next_delay();
            assert!(
                delay >= ceiling / 2 && delay <= ceiling,
                "{delay:?} outside [{:?}, {ceiling:?}]",
                ceiling / 2
            );
            ceiling.as_millis() as u64
        })
        .collect();
    assert_eq!(
        ceilings,
        [500, 1000, 2000, 4000, 8000, 16000, 30000, 30000, 30000, 30000]
    );
    assert_eq!(b.attempts(), 10);
    // Jitter actually varies.
    let mut spread = std::collections::BTreeSet::new();
    for _ in 0..20 {
        let mut b = Backoff::default();
        spread.insert(b.next_delay());
    }
    assert!(spread.len() > 1);
    b.reset();
    assert_eq!(b.ceiling(), Duration::from_millis(500));
    // Many failures never overflow.
    for _ in 0..200 {
        b.next_delay();
    }
    assert_eq!(b.ceiling(), Duration::from_secs(30));
}

#[tokio::test(start_paused = true)]
async fn token_bucket_bursts_then_paces() {
    let mut bucket = TokenBucket::new(2, Duration::from_secs(1));
    let t0 = Instant::now();
    assert_eq!(bucket.try_take(t0), Ok(()));
    assert_eq!(bucket.try_take(t0), Ok(()));
    assert_eq!(bucket.try_take(t0), Err(Duration::from_secs(1)));
    assert_eq!(
        bucket.try_take(t0 + Duration::from_millis(400)),
        Err(Duration::from_millis(600))
    );

    // take() sleeps on paused time: the third request goes out exactly 1s later, the
    // fourth 1s after that.
    bucket.take().await;
    assert_eq!(t0.elapsed(), Duration::from_secs(1));
    bucket.take().await;
    assert_eq!(t0.elapsed(), Duration::from_secs(2));

    // After being idle the burst is available again, but not more than the burst.
    tokio::time::advance(Duration::from_secs(60)).await;
    let now = Instant::now();
    assert_eq!(bucket.try_take(now), Ok(()));
    assert_eq!(bucket.try_take(now), Ok(()));
    assert!(bucket.try_take(now).is_err());
}

#[tokio::test(start_paused = true)]
async fn service_sync_records_and_snapshots() {
    let sync = Arc::new(ServiceSync::new());
    let snap = sync.snapshot();
    assert!(!snap.synced_once);
    assert_eq!(snap.staleness_seconds, None);

    let waiter = {
        let sync = sync.clone();
        tokio::spawn(async move { sync.synced().await })
    };
    assert!(!sync.wait_synced(Duration::from_millis(100)).await);

    sync.record_error(&ConsulError::AclNotFound);
    let snap = sync.snapshot();
    assert_eq!(
        (
            snap.consecutive_errors,
            snap.errors_total,
            snap.queries_total
        ),
        (1, 1, 1)
    );
    assert!(snap.acl_denied);
    assert_eq!(
        snap.last_error.as_deref(),
        Some("Consul rejected the ACL token: ACL not found")
    );

    sync.record_success(&client::QueryMeta {
        index: 42,
        known_leader: true,
        last_contact: Duration::ZERO,
        filtered_by_acls: true,
    });
    sync.set_instances(3);
    sync.mark_synced();
    waiter.await.unwrap();
    assert!(sync.wait_synced(Duration::from_millis(1)).await);

    tokio::time::advance(Duration::from_millis(2500)).await;
    let snap = sync.snapshot();
    assert_eq!(
        snap,
        SyncSnapshot {
            synced_once: true,
            staleness_seconds: Some(2.5),
            last_index: 42,
            consecutive_errors: 0,
            last_error: None,
            acl_filtered: true,
            acl_denied: false,
            queries_total: 2,
            errors_total: 1,
            instances: 3,
        }
    );
    let json = serde_json::to_value(&snap).unwrap();
    assert_eq!(json["staleness_seconds"], 2.5);
}

#[test]
fn fingerprints_ignore_order_and_split_node_checks() {
    let mut a = check("c1", "passing", "web-1");
    a.modify_index = 10;
    let mut b = check("c2", "passing", "web-2");
    b.modify_index = 11;
    let serf = check("serfHealth", "passing", "");
    let one = fingerprints(&[a.clone(), b.clone(), serf.clone()]);
    let two = fingerprints(&[serf.clone(), b.clone(), a.clone()]);
    assert!(one == two);
    assert_eq!(one.services.len(), 1);
    assert_eq!(one.nodes.len(), 1);
    // A deregistered instance (its check gone) changes the fingerprint even though the
    // highest ModifyIndex did not move.
    let fewer = fingerprints(&[b.clone(), serf]);
    assert_ne!(one.services["web"], fewer.services["web"]);
    assert_eq!(one.nodes["n1"], fewer.nodes["n1"]);
}

fn health_answer(index: u64, entries: Vec<HealthEntry>) -> HealthAnswer {
    HealthAnswer {
        index,
        entries,
        known_leader: true,
        last_contact: Duration::ZERO,
        filtered_by_acls: false,
    }
}

#[test]
fn publisher_publishes_first_answer_then_only_changes() {
    let sync = Arc::new(ServiceSync::new());
    let seen = sync.clone();
    let (tx, rx) = std::sync::mpsc::channel();
    // Records what the callback could observe: registration already stored, not yet synced.
    let publish = move |set: Vec<Discovered>| {
        tx.send((set, seen.registered(), seen.is_synced())).unwrap();
    };
    let mut publisher = Publisher::new(
        "web".into(),
        sync.clone(),
        publish,
        WarningMode::Degrade,
        Vec::new(),
    );

    // The first answer publishes even when empty, and syncs only after publishing.
    assert!(publisher.apply(&health_answer(1, vec![])));
    assert_eq!(rx.try_recv().unwrap(), (vec![], false, false));
    assert!(sync.is_synced());
    assert!(!publisher.apply(&health_answer(2, vec![])));

    // "Not registered" -> "registered but all critical": same empty set, published again.
    let down = vec![synthetic("a", "10.0.0.2", 80, (1, 1), "critical", &[])];
    assert!(publisher.apply(&health_answer(3, down.clone())));
    assert_eq!(rx.try_recv().unwrap(), (vec![], true, true));
    assert_eq!(sync.excluded().len(), 1);
    assert!(!publisher.apply(&health_answer(4, down)));

    let up = vec![synthetic("a", "10.0.0.2", 80, (1, 1), "passing", &[])];
    assert!(publisher.apply(&health_answer(5, up.clone())));
    assert_eq!(rx.try_recv().unwrap().0.len(), 1);
    assert_eq!(sync.snapshot().instances, 1);
    assert!(sync.excluded().is_empty());
    assert!(!publisher.apply(&health_answer(6, up)));
    assert!(rx.try_recv().is_err());
}

mod loopback;
