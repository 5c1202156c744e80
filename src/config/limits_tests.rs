//! Every range boundary: the bound itself is accepted, one step past it is refused with the
//! key path; the values from issue #11 are refused.

use crate::config::{Config, Env};

const ROUTE: &str = "[[routes]]\npath = \"/\"\ntargets = [\"http://127.0.0.1:1\"]\n";

fn top(key: &str, v: &str) -> String {
    format!("{key} = {v}\n{ROUTE}")
}

fn section(section: &str, key: &str, v: &str) -> String {
    let extra = match section {
        "cors" => "allowed_origins = [\"*\"]\n",
        _ => "",
    };
    format!("[{section}]\n{extra}{key} = {v}\n{ROUTE}")
}

fn route(key: &str, v: &str) -> String {
    // max_pending means nothing without max_requests.
    let extra = match key {
        "max_pending" => "max_requests = 1\n",
        _ => "",
    };
    format!("{ROUTE}{extra}{key} = {v}\n")
}

fn route_table(table: &str, key: &str, v: &str) -> String {
    format!("{ROUTE}{table} = {{ {key} = {v} }}\n")
}

fn consul(key: &str, v: &str) -> String {
    format!("[discovery]\nprovider = \"consul\"\n[discovery.consul]\n{key} = {v}\n{ROUTE}")
}

fn problems(toml: &str, env: &Env) -> Vec<String> {
    match Config::from_toml(toml, env) {
        Ok(_) => Vec::new(),
        Err(e) => e.problems(),
    }
}

const DELAY_IN: &[&str] = &["\"0s\"", "\"24h\""];
const DELAY_OUT: &[&str] = &["\"86400001ms\"", "\"18446744073709551615s\""];
const TIMEOUT_IN: &[&str] = &["\"1ms\"", "\"24h\""];
const TIMEOUT_OUT: &[&str] = &[
    "\"0s\"",
    "\"999us\"",
    "\"86400001ms\"",
    "\"18446744073709551615s\"",
];

/// One value of one key: its path in messages, the TOML that sets it, the value, and whether
/// it is inside the key's range.
struct Case {
    path: String,
    toml: String,
    value: &'static str,
    inside: bool,
}

fn cases() -> Vec<Case> {
    let mut out = Vec::new();
    let mut add = |path: &str,
                   make: &dyn Fn(&str) -> String,
                   inside: &'static [&'static str],
                   outside: &'static [&'static str]| {
        let marked = inside.iter().map(|v| (v, true));
        for (value, inside) in marked.chain(outside.iter().map(|v| (v, false))) {
            out.push(Case {
                path: path.to_owned(),
                toml: make(value),
                value,
                inside,
            });
        }
    };
    add(
        "workers",
        &|v| top("workers", v),
        &["1", "1024"],
        &["0", "1025"],
    );
    for (sec, key, ins, outs) in [
        ("upstream", "connect_timeout", TIMEOUT_IN, TIMEOUT_OUT),
        ("upstream", "idle_timeout", DELAY_IN, DELAY_OUT),
        (
            "upstream",
            "max_idle_per_host",
            &["0", "10000"][..],
            &["-1", "10001", "4294967295"][..],
        ),
        (
            "server",
            "max_header_bytes",
            &["8192", "\"8KiB\"", "\"1MiB\"", "1048576"][..],
            &["8191", "\"1025KiB\"", "\"4GiB\""][..],
        ),
        (
            "server",
            "max_headers",
            &["1", "100", "10000"][..],
            &["0", "-1", "10001"][..],
        ),
        (
            "server",
            "header_read_timeout",
            &["\"100ms\"", "\"24h\""][..],
            &["\"0s\"", "\"99ms\"", "\"86400001ms\""][..],
        ),
        ("server", "keep_alive_timeout", DELAY_IN, DELAY_OUT),
        (
            "server",
            "max_connections",
            &["1", "1000000"][..],
            &["0", "1000001", "2305843009213693952", "9223372036854775807"][..],
        ),
        ("server", "drain_delay", DELAY_IN, DELAY_OUT),
        ("server", "grace_period", DELAY_IN, DELAY_OUT),
        ("cors", "max_age", DELAY_IN, DELAY_OUT),
    ] {
        add(
            &format!("{sec}.{key}"),
            &|v| section(sec, key, v),
            ins,
            outs,
        );
    }
    for (key, ins, outs) in [
        ("timeout", TIMEOUT_IN, TIMEOUT_OUT),
        ("websocket_idle_timeout", TIMEOUT_IN, TIMEOUT_OUT),
        ("stream_timeout", TIMEOUT_IN, TIMEOUT_OUT),
        ("slow_start", DELAY_IN, DELAY_OUT),
        (
            "max_body",
            &["0", "\"1024GiB\""][..],
            &["-1", "\"1025GiB\""][..],
        ),
        ("max_requests", &["1", "1000000"][..], &["0", "1000001"][..]),
        ("max_pending", &["0", "1000000"][..], &["-1", "1000001"][..]),
    ] {
        add(&format!("routes[0].{key}"), &|v| route(key, v), ins, outs);
    }
    for (table, key, ins, outs) in [
        ("retry", "attempts", &["1", "10"][..], &["0", "11"][..]),
        ("retry", "backoff", DELAY_IN, DELAY_OUT),
        ("retry", "max_backoff", DELAY_IN, DELAY_OUT),
        ("retry", "per_try_timeout", TIMEOUT_IN, TIMEOUT_OUT),
        (
            "retry",
            "max_body",
            &["0", "\"64MiB\"", "67108864"][..],
            &["67108865", "\"65MiB\"", "\"4GiB\""][..],
        ),
        (
            "health_check",
            "interval",
            &["\"10ms\"", "\"24h\""][..],
            &["\"9ms\"", "\"0s\"", "\"86400001ms\""][..],
        ),
        ("health_check", "timeout", TIMEOUT_IN, TIMEOUT_OUT),
        ("health_check", "jitter", DELAY_IN, DELAY_OUT),
        (
            "health_check",
            "healthy_threshold",
            &["1", "10000"][..],
            &["0", "10001"][..],
        ),
        (
            "health_check",
            "unhealthy_threshold",
            &["1", "10000"][..],
            &["0", "10001"][..],
        ),
        (
            "outlier",
            "consecutive_5xx",
            &["0", "10000"][..],
            &["-1", "10001"][..],
        ),
        (
            "outlier",
            "consecutive_gateway_failures",
            &["0", "10000"][..],
            &["-1", "10001"][..],
        ),
        ("outlier", "base_ejection_time", DELAY_IN, DELAY_OUT),
        ("outlier", "max_ejection_time", DELAY_IN, DELAY_OUT),
    ] {
        add(
            &format!("routes[0].{table}.{key}"),
            &|v| route_table(table, key, v),
            ins,
            outs,
        );
    }
    for (key, ins, outs) in [
        (
            "wait",
            &["\"1ms\"", "\"600s\""][..],
            &["\"0s\"", "\"601s\"", "\"18446744073709551615s\""][..],
        ),
        ("startup_timeout", TIMEOUT_IN, TIMEOUT_OUT),
        ("max_watches", &["1", "10000"][..], &["0", "10001"][..]),
    ] {
        add(
            &format!("discovery.consul.{key}"),
            &|v| consul(key, v),
            ins,
            outs,
        );
    }
    out
}

#[test]
fn every_bound_is_accepted_and_one_past_it_refused_with_the_key_path() {
    let env = Env::default();
    let cases = cases();
    assert!(cases.len() > 100, "{}", cases.len());
    for Case {
        path,
        toml,
        value,
        inside,
    } in cases
    {
        let p = problems(&toml, &env);
        if inside {
            assert!(p.is_empty(), "{path} = {value} should be valid: {p:#?}");
        } else {
            assert_eq!(p.len(), 1, "{path} = {value}: {p:#?}");
            assert!(
                p[0].starts_with(&format!("{path}: must be from ")),
                "{path} = {value}: {p:#?}"
            );
        }
    }
}

#[test]
fn the_values_from_the_issue_are_refused() {
    let env = Env::default();
    for (toml, expected) in [
        (
            section("upstream", "max_idle_per_host", "4294967295"),
            "upstream.max_idle_per_host: must be from 0 to 10000, got 4294967295",
        ),
        (
            section("server", "max_connections", "2305843009213693952"),
            "server.max_connections: must be from 1 to 1000000, got 2305843009213693952",
        ),
        (
            route("timeout", "\"18446744073709551615s\""),
            "routes[0].timeout: must be from 1ms to 24h, got \"18446744073709551615s\"",
        ),
        (
            section("server", "header_read_timeout", "\"0s\""),
            "server.header_read_timeout: must be from 100ms to 24h, got \"0s\"",
        ),
        (
            section("server", "max_header_bytes", "\"4GiB\""),
            "server.max_header_bytes: must be from 8KiB to 1MiB, got 4GiB",
        ),
        (
            consul("wait", "\"0s\""),
            "discovery.consul.wait: must be from 1ms to 600s, got 0s (600s is Consul's max_query_time)",
        ),
    ] {
        assert_eq!(problems(&toml, &env), [expected]);
    }
}

#[test]
fn a_bad_duration_is_reported_once() {
    let p = problems(&route("timeout", "\"soon\""), &Env::default());
    assert_eq!(p.len(), 1, "{p:#?}");
    assert!(p[0].starts_with("routes[0].timeout: invalid duration \"soon\""));
}

#[test]
fn accepted_values_arrive_in_the_config() {
    let c = Config::from_toml(&section("server", "max_headers", "200"), &Env::default()).unwrap();
    assert_eq!(c.server.max_headers, 200);
    let c = Config::from_toml(ROUTE, &Env::default()).unwrap();
    assert_eq!(c.server.max_headers, 100, "hyper's default");
    let c = Config::from_toml(&route_table("retry", "attempts", "10"), &Env::default()).unwrap();
    assert_eq!(c.routes[0].retry.attempts, 10);
}

#[test]
fn environment_only_numbers_have_ranges_too() {
    for (var, inside, outside) in [
        (
            "OTEL_EXPORTER_OTLP_TIMEOUT",
            ["1", "86400000"],
            ["0", "86400001"],
        ),
        (
            "OTEL_BSP_SCHEDULE_DELAY",
            ["1", "86400000"],
            ["0", "18446744073709551615"],
        ),
        ("OTEL_BSP_MAX_QUEUE_SIZE", ["1", "65536"], ["0", "65537"]),
        (
            "OTEL_BSP_MAX_EXPORT_BATCH_SIZE",
            ["1", "65536"],
            ["0", "4294967296"],
        ),
    ] {
        for v in inside {
            let p = problems(ROUTE, &Env::from_pairs([(var, v)]));
            assert!(p.is_empty(), "{var}={v}: {p:#?}");
        }
        for v in outside {
            let p = problems(ROUTE, &Env::from_pairs([(var, v)]));
            assert_eq!(p.len(), 1, "{var}={v}: {p:#?}");
            assert!(p[0].starts_with(&format!("{var}: ")), "{p:#?}");
            assert!(p[0].contains(" from 1 to "), "{p:#?}");
        }
    }
    let p = problems(
        ROUTE,
        &Env::from_pairs([("MESHGATE_SERVER__MAX_HEADERS", "0")]),
    );
    assert_eq!(p, ["server.max_headers: must be from 1 to 10000, got 0"]);
}
