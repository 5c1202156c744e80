//! A configuration that `check` accepts must run (issue #11): random configurations, drawn
//! key by key from each key's type (zero, negative, huge and boundary numbers; durations such
//! as "0s", "1ns" and "18446744073709551615s"; sizes such as "4GiB"), are validated, and every
//! valid one is started in front of a real upstream and must answer one request with no panic
//! anywhere in the process. The seed is printed; `MESHGATE_PROPS_SEED` replays it.

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use meshgate::config::{Config, Env};
use meshgate::telemetry::{RequestTelemetry, Tracing};
use meshgate::Gateway;
use support::gateway::start_gateway;
use support::upstream::TestUpstream;
use support::util::{dead_port, raw_exchange};

/// Cases per run: every key is drawn about 13 times; about 12 s in a debug build, most of it
/// building upstream clients (the platform certificate store is read per gateway).
const CASES: usize = 300;

/// Panics anywhere in the process (accept loops, connection tasks, the request path).
static PANICS: AtomicUsize = AtomicUsize::new(0);

#[derive(Clone, Copy, Debug)]
enum Kind {
    Duration,
    Count,
    Size,
    /// A float percentage or ratio.
    Float,
    /// `"20%"`.
    Percent,
}

#[derive(Clone, Copy, Debug)]
enum Place {
    Top,
    /// `[section]`; settable from the environment as `MESHGATE_SECTION__KEY`.
    Section(&'static str),
    Route,
    /// `routes[0].table = { key = .. }`.
    RouteTable(&'static str),
    /// `targets = [{ url = .., weight = .. }]`.
    Weight,
    /// An environment variable only (`OTEL_*`), numbers as text.
    OtelEnv,
}

const KEYS: &[(Place, &str, Kind)] = {
    use Kind::*;
    use Place::*;
    &[
        (Top, "workers", Count),
        (Section("upstream"), "connect_timeout", Duration),
        (Section("upstream"), "idle_timeout", Duration),
        (Section("upstream"), "max_idle_per_host", Count),
        (Section("server"), "max_header_bytes", Size),
        (Section("server"), "max_headers", Count),
        (Section("server"), "header_read_timeout", Duration),
        (Section("server"), "keep_alive_timeout", Duration),
        (Section("server"), "body_read_timeout", Duration),
        (Section("server"), "h2_max_concurrent_streams", Count),
        (Section("server"), "max_connections", Count),
        (Section("server"), "drain_delay", Duration),
        (Section("server"), "grace_period", Duration),
        (Section("cors"), "max_age", Duration),
        (Section("discovery.consul"), "wait", Duration),
        (Section("discovery.consul"), "startup_timeout", Duration),
        (Section("discovery.consul"), "max_watches", Count),
        (Section("tracing"), "sample_ratio", Float),
        (Route, "timeout", Duration),
        (Route, "websocket_idle_timeout", Duration),
        (Route, "stream_timeout", Duration),
        (Route, "slow_start", Duration),
        (Route, "max_body", Size),
        (Route, "max_requests", Count),
        (Route, "max_pending", Count),
        (Route, "panic_threshold", Float),
        (RouteTable("retry"), "attempts", Count),
        (RouteTable("retry"), "backoff", Duration),
        (RouteTable("retry"), "max_backoff", Duration),
        (RouteTable("retry"), "per_try_timeout", Duration),
        (RouteTable("retry"), "max_body", Size),
        (RouteTable("retry"), "budget", Percent),
        (RouteTable("health_check"), "interval", Duration),
        (RouteTable("health_check"), "timeout", Duration),
        (RouteTable("health_check"), "healthy_threshold", Count),
        (RouteTable("health_check"), "unhealthy_threshold", Count),
        (RouteTable("health_check"), "jitter", Duration),
        (RouteTable("outlier"), "consecutive_5xx", Count),
        (RouteTable("outlier"), "consecutive_gateway_failures", Count),
        (RouteTable("outlier"), "base_ejection_time", Duration),
        (RouteTable("outlier"), "max_ejection_time", Duration),
        (RouteTable("outlier"), "max_ejection_percent", Count),
        (RouteTable("error"), "status", Count),
        (Weight, "weight", Count),
        (OtelEnv, "OTEL_EXPORTER_OTLP_TIMEOUT", Count),
        (OtelEnv, "OTEL_BSP_SCHEDULE_DELAY", Count),
        (OtelEnv, "OTEL_BSP_MAX_QUEUE_SIZE", Count),
        (OtelEnv, "OTEL_BSP_MAX_EXPORT_BATCH_SIZE", Count),
    ]
};

/// A drawn value: as a TOML literal and as environment-variable text.
struct Value {
    toml: String,
    env: String,
}

impl Value {
    fn text(s: String) -> Self {
        Self {
            toml: format!("{s:?}"),
            env: s,
        }
    }
    fn raw(s: String) -> Self {
        Self {
            toml: s.clone(),
            env: s,
        }
    }
}

/// Boundary and extreme durations; ordinary ones are drawn too.
const DURATIONS: &[&str] = &[
    "0s",
    "1ns",
    "1ms",
    "24h",
    "86400001ms",
    "18446744073709551615s",
    "soon",
];

/// Boundary and extreme numbers, including values no TOML integer can hold.
const COUNTS: &[i128] = &[
    -1,
    0,
    1,
    10_000,
    1_000_001,
    4_294_967_295,
    1 << 61,
    i64::MAX as i128,
    u64::MAX as i128,
];

/// Boundary and extreme sizes, and one that is no size at all.
const SIZES: &[&str] = &[
    "0",
    "8191",
    "8KiB",
    "1MiB",
    "4GiB",
    "1025GiB",
    "10 parsecs",
    "-1",
];

/// Floats for percentages and ratios.
const FLOATS: &[&str] = &[
    "0.0", "1.0", "100.0", "100.5", "-1.0", "nan", "inf", "1e308",
];

fn draw(rng: &mut fastrand::Rng, kind: Kind) -> Value {
    // Two thirds boundary and extreme values, one third ordinary ones.
    let edge = rng.u8(..3) != 0;
    match kind {
        Kind::Duration if edge => Value::text(DURATIONS[rng.usize(..DURATIONS.len())].into()),
        Kind::Duration => Value::text(format!("{}ms", rng.u64(1..2000))),
        Kind::Count if edge => Value::raw(COUNTS[rng.usize(..COUNTS.len())].to_string()),
        Kind::Count => Value::raw(rng.u64(0..200).to_string()),
        Kind::Size if edge => {
            let s = SIZES[rng.usize(..SIZES.len())];
            match s.parse::<i64>() {
                Ok(_) => Value::raw(s.into()),
                Err(_) => Value::text(s.into()),
            }
        }
        Kind::Size => Value::text(format!("{}KiB", rng.u64(8..1024))),
        Kind::Float if edge => Value::raw(FLOATS[rng.usize(..FLOATS.len())].into()),
        Kind::Float => Value::raw(format!("{:.3}", rng.f64())),
        Kind::Percent if edge => Value::text(format!("{}%", FLOATS[rng.usize(..FLOATS.len())])),
        Kind::Percent => Value::text(format!("{}%", rng.u64(0..=100))),
    }
}

/// One random configuration: the TOML file and the environment.
struct Case {
    toml: String,
    env: Vec<(String, String)>,
}

fn generate(rng: &mut fastrand::Rng, upstream: &str, dead: u16) -> Case {
    let mut top = Vec::new();
    let mut sections: Vec<(&str, Vec<String>)> = Vec::new();
    let mut route = Vec::new();
    let mut tables: Vec<(&str, Vec<String>)> = Vec::new();
    let mut weight = None;
    let mut env = Vec::new();
    let push =
        |list: &mut Vec<(&'static str, Vec<String>)>, name: &'static str, line: String| match list
            .iter_mut()
            .find(|(n, _)| *n == name)
        {
            Some((_, lines)) => lines.push(line),
            None => list.push((name, vec![line])),
        };
    for _ in 0..rng.usize(1..=3) {
        let (place, key, kind) = KEYS[rng.usize(..KEYS.len())];
        let v = draw(rng, kind);
        match place {
            Place::Top => top.push(format!("{key} = {}", v.toml)),
            // Some values come from the environment instead, as operators often set them.
            Place::Section(s) if !s.contains('.') && rng.u8(..5) == 0 => env.push((
                format!(
                    "MESHGATE_{}__{}",
                    s.to_ascii_uppercase(),
                    key.to_ascii_uppercase()
                ),
                v.env,
            )),
            Place::Section(s) => push(&mut sections, s, format!("{key} = {}", v.toml)),
            Place::Route => route.push(format!("{key} = {}", v.toml)),
            Place::RouteTable(t) => push(&mut tables, t, format!("{key} = {}", v.toml)),
            Place::Weight => weight = Some(v.toml),
            Place::OtelEnv => env.push((key.to_owned(), v.env)),
        }
    }
    // What the drawn keys need around them to mean something.
    let has = |list: &Vec<(&str, Vec<String>)>, name: &str| list.iter().any(|(n, _)| *n == name);
    if has(&sections, "cors") {
        push(&mut sections, "cors", "allowed_origins = [\"*\"]".into());
    }
    if has(&sections, "discovery.consul") {
        push(&mut sections, "discovery", "provider = \"consul\"".into());
        push(
            &mut sections,
            "discovery.consul",
            format!("address = \"http://127.0.0.1:{dead}\""),
        );
    }
    if has(&sections, "tracing") || env.iter().any(|(k, _)| k.starts_with("OTEL_")) {
        push(&mut sections, "tracing", "enabled = true".into());
        push(
            &mut sections,
            "tracing",
            format!("endpoint = \"http://127.0.0.1:{dead}\""),
        );
    }
    if route.iter().any(|l| l.starts_with("max_pending")) && rng.bool() {
        route.push("max_requests = 1".into());
    }

    let mut toml = String::new();
    for l in &top {
        toml += &format!("{l}\n");
    }
    for (name, lines) in &sections {
        toml += &format!("[{name}]\n");
        for l in lines {
            toml += &format!("{l}\n");
        }
    }
    toml += "[[routes]]\npath = \"/\"\n";
    match weight {
        Some(w) => toml += &format!("targets = [{{ url = \"{upstream}\", weight = {w} }}]\n"),
        None => toml += &format!("targets = [\"{upstream}\"]\n"),
    }
    for l in &route {
        toml += &format!("{l}\n");
    }
    for (name, lines) in &tables {
        toml += &format!("{name} = {{ {} }}\n", lines.join(", "));
    }
    Case { toml, env }
}

#[tokio::test]
async fn every_configuration_that_validates_starts_and_answers() {
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        PANICS.fetch_add(1, Ordering::SeqCst);
        default_hook(info);
    }));
    let _ = rustls::crypto::ring::default_provider().install_default();
    let seed = std::env::var("MESHGATE_PROPS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| fastrand::u64(..));
    println!("seed {seed} (replay with MESHGATE_PROPS_SEED={seed})");
    let mut rng = fastrand::Rng::with_seed(seed);
    let up = TestUpstream::builder().start().await;
    let dead = dead_port().await;
    let (mut valid, mut refused) = (0, 0);
    for i in 0..CASES {
        let case = generate(&mut rng, &up.url(), dead);
        let about = || format!("seed {seed}, case {i}\nenv {:?}\n{}", case.env, case.toml);
        let mut config = match Config::from_toml(&case.toml, &Env::from_pairs(case.env.clone())) {
            Ok(c) => c,
            Err(e) => {
                assert!(!e.problems().is_empty(), "{}", about());
                refused += 1;
                continue;
            }
        };
        valid += 1;
        // Shutdown is not under test here: a drain delay would keep each gateway (and its
        // health probes) alive for its length; the grace period only matters for open requests.
        config.server.drain_delay = Duration::ZERO;
        config.server.grace_period = config.server.grace_period.min(Duration::from_secs(1));
        let tracing = Tracing::build(&config.tracing)
            .unwrap_or_else(|e| panic!("trace pipeline: {e}\n{}", about()));
        let telemetry = RequestTelemetry::from_config(&config.log, tracing.as_ref());
        let gateway = Gateway::build_with_telemetry(config, telemetry)
            .unwrap_or_else(|e| panic!("valid config did not build: {e}\n{}", about()));
        let gw = start_gateway(gateway).await;
        let reply = raw_exchange(
            gw.addr,
            b"GET /props HTTP/1.1\r\nHost: props\r\nConnection: close\r\n\r\n",
            Duration::from_secs(10),
        )
        .await;
        assert!(
            reply.text.starts_with("HTTP/1.1 "),
            "no HTTP answer ({:?} after {:?}) for\n{}",
            reply.text,
            reply.after,
            about()
        );
        assert_eq!(PANICS.load(Ordering::SeqCst), 0, "a panic for\n{}", about());
        gw.stop().await;
        drop(tracing);
        assert_eq!(PANICS.load(Ordering::SeqCst), 0, "a panic for\n{}", about());
    }
    println!("{valid} valid configurations served a request; {refused} refused");
    assert!(
        valid >= CASES / 6,
        "too few valid cases ({valid}) to mean much"
    );
}
