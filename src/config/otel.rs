//! `[tracing]`: OpenTelemetry trace export settings, from the file and the standard `OTEL_*`
//! variables (a value from the file always beats the environment). Validation only: the
//! pipeline itself is built by `telemetry`.

use std::ops::RangeInclusive;
use std::time::Duration;

use super::env::Env;
use super::raw::RawTracing;
use crate::limits;
pub use crate::telemetry::settings::{
    BatchConfig, ExportHeaders, OtlpProtocol, RootSampler, SamplerConfig, TracingConfig,
};
use crate::telemetry::settings::{
    DEFAULT_GRPC_ENDPOINT, DEFAULT_HTTP_ENDPOINT, DEFAULT_SERVICE_NAME, TRACES_PATH,
};

/// Resolves `[tracing]` against the environment.
///
/// Variables read (empty counts as unset): `OTEL_SDK_DISABLED`, `OTEL_TRACES_EXPORTER`
/// (`otlp` or `none`), `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` (used as is),
/// `OTEL_EXPORTER_OTLP_ENDPOINT` (`/v1/traces` appended for `http/protobuf`),
/// `OTEL_EXPORTER_OTLP[_TRACES]_PROTOCOL`, `OTEL_EXPORTER_OTLP[_TRACES]_HEADERS`,
/// `OTEL_EXPORTER_OTLP[_TRACES]_TIMEOUT`, `OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`,
/// `OTEL_TRACES_SAMPLER`, `OTEL_TRACES_SAMPLER_ARG`, `OTEL_BSP_SCHEDULE_DELAY`,
/// `OTEL_BSP_MAX_QUEUE_SIZE`, `OTEL_BSP_MAX_EXPORT_BATCH_SIZE`.
///
/// Returns every problem at once as `(key path, message)`: `tracing.<key>` for settings the
/// file can hold, the variable's name for those only the environment sets.
pub fn resolve(raw: &RawTracing, env: &Env) -> Result<TracingConfig, Vec<(String, String)>> {
    let mut problems: Vec<(String, String)> = Vec::new();
    let mut err = |key: &str, msg: String| problems.push((key.to_owned(), msg));
    let mut out = TracingConfig::default();

    // Protocol first: it decides the default endpoint and the path rule.
    let (protocol_text, origin) = first_of(
        raw.protocol.clone(),
        env,
        &[
            "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
            "OTEL_EXPORTER_OTLP_PROTOCOL",
        ],
    );
    if let Some(p) = protocol_text {
        match p.trim() {
            "http/protobuf" => out.protocol = OtlpProtocol::HttpProtobuf,
            "grpc" => out.protocol = OtlpProtocol::Grpc,
            other => err(
                "tracing.protocol",
                format!(
                    "unsupported protocol {other:?}{}; expected \"http/protobuf\" or \"grpc\"",
                    from(origin)
                ),
            ),
        }
    }

    // Endpoint.
    let grpc = out.protocol == OtlpProtocol::Grpc;
    let (endpoint, origin, configured) = match (
        &raw.endpoint,
        env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"),
        env.get("OTEL_EXPORTER_OTLP_ENDPOINT"),
    ) {
        (Some(e), _, _) => (base_to_traces(e, grpc, true), None, true),
        (None, Some(e), _) => (e, Some("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"), true),
        (None, None, Some(e)) => (
            base_to_traces(&e, grpc, false),
            Some("OTEL_EXPORTER_OTLP_ENDPOINT"),
            true,
        ),
        (None, None, None) if grpc => (DEFAULT_GRPC_ENDPOINT.to_owned(), None, false),
        (None, None, None) => (format!("{DEFAULT_HTTP_ENDPOINT}{TRACES_PATH}"), None, false),
    };
    match endpoint.trim().parse::<http::Uri>() {
        Ok(u)
            if matches!(u.scheme_str(), Some("http" | "https"))
                && u.host().is_some_and(|h| !h.is_empty()) =>
        {
            out.endpoint = endpoint.trim().to_owned();
        }
        _ => err(
            "tracing.endpoint",
            format!(
                "invalid endpoint {endpoint:?}{}; expected a URL such as \"http://otel-collector:4318\"",
                from(origin)
            ),
        ),
    }

    // On or off.
    let mut env_off = false;
    if let Some(v) = env.get("OTEL_SDK_DISABLED") {
        match parse_bool(&v) {
            Some(b) => env_off |= b,
            None => err(
                "OTEL_SDK_DISABLED",
                format!("{v:?} is not a boolean (true/false)"),
            ),
        }
    }
    if let Some(v) = env.get("OTEL_TRACES_EXPORTER") {
        match v.trim() {
            "otlp" => {}
            "none" => env_off = true,
            other => err(
                "OTEL_TRACES_EXPORTER",
                format!("unsupported exporter {other:?}; meshgate exports \"otlp\" (or \"none\")"),
            ),
        }
    }
    out.enabled = raw.enabled.unwrap_or(configured && !env_off);

    // Headers.
    let (headers, origin) = first_of(
        None,
        env,
        &[
            "OTEL_EXPORTER_OTLP_TRACES_HEADERS",
            "OTEL_EXPORTER_OTLP_HEADERS",
        ],
    );
    if let (Some(text), Some(var)) = (headers, origin) {
        for (k, v) in parse_pairs(&text) {
            let name_ok = http::HeaderName::from_bytes(k.as_bytes()).is_ok();
            let value_ok = http::HeaderValue::from_str(&v).is_ok();
            if k.is_empty() || !name_ok || !value_ok {
                // The value may be a secret: name the header only.
                err(
                    var,
                    format!("invalid header {k:?}; expected name=value pairs separated by commas"),
                );
            } else {
                out.headers.0.push((k.to_ascii_lowercase(), v));
            }
        }
    }

    // Export timeout.
    let (timeout, origin) = first_of(
        None,
        env,
        &[
            "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT",
            "OTEL_EXPORTER_OTLP_TIMEOUT",
        ],
    );
    if let (Some(t), Some(var)) = (timeout, origin) {
        match t.trim().parse::<u64>() {
            Ok(ms) if limits::OTEL_MILLIS.contains(&ms) => out.timeout = Duration::from_millis(ms),
            _ => err(
                var,
                format!(
                    "{t:?} is not a number of milliseconds from {} to {}",
                    limits::OTEL_MILLIS.start(),
                    limits::OTEL_MILLIS.end()
                ),
            ),
        }
    }

    // Sampler: the file's ratio wins over OTEL_TRACES_SAMPLER.
    if let Some(r) = raw.sample_ratio {
        if (0.0..=1.0).contains(&r) {
            out.sampler = SamplerConfig {
                root: RootSampler::TraceIdRatio(r),
                parent_based: true,
            };
        } else {
            err(
                "tracing.sample_ratio",
                format!("must be from 0 to 1 (0.01 = 1% of requests), got {r}"),
            );
        }
    } else if let Some(name) = env.get("OTEL_TRACES_SAMPLER") {
        let ratio = || -> Result<f64, String> {
            match env.get("OTEL_TRACES_SAMPLER_ARG") {
                None => Ok(1.0),
                Some(a) => a
                    .trim()
                    .parse::<f64>()
                    .ok()
                    .filter(|r| (0.0..=1.0).contains(r))
                    .ok_or_else(|| format!("{a:?} is not a ratio from 0 to 1")),
            }
        };
        let (root, parent_based) = match name.trim() {
            "always_on" => (Some(RootSampler::AlwaysOn), false),
            "always_off" => (Some(RootSampler::AlwaysOff), false),
            "parentbased_always_on" => (Some(RootSampler::AlwaysOn), true),
            "parentbased_always_off" => (Some(RootSampler::AlwaysOff), true),
            "traceidratio" | "parentbased_traceidratio" => match ratio() {
                Ok(r) => (
                    Some(RootSampler::TraceIdRatio(r)),
                    name.trim().starts_with("parentbased_"),
                ),
                Err(m) => {
                    err("OTEL_TRACES_SAMPLER_ARG", m);
                    (None, false)
                }
            },
            other => {
                err(
                    "OTEL_TRACES_SAMPLER",
                    format!("unsupported sampler {other:?}; expected one of always_on, always_off, traceidratio, parentbased_always_on, parentbased_always_off, parentbased_traceidratio"),
                );
                (None, false)
            }
        };
        if let Some(root) = root {
            out.sampler = SamplerConfig { root, parent_based };
        }
    }

    // Resource.
    let mut service_from_attrs = None;
    if let Some(text) = env.get("OTEL_RESOURCE_ATTRIBUTES") {
        for (k, v) in parse_pairs(&text) {
            if k.is_empty() {
                err(
                    "OTEL_RESOURCE_ATTRIBUTES",
                    "expected key=value pairs separated by commas".to_owned(),
                );
            } else if k == "service.name" {
                service_from_attrs = Some(v);
            } else {
                out.resource.push((k, v));
            }
        }
    }
    out.service_name = raw
        .service_name
        .clone()
        .filter(|s| !s.trim().is_empty())
        .or_else(|| env.get("OTEL_SERVICE_NAME"))
        .or(service_from_attrs)
        .unwrap_or_else(|| DEFAULT_SERVICE_NAME.to_owned());

    // Batching.
    let mut number = |var: &str, range: RangeInclusive<u64>| -> Option<u64> {
        let v = env.get(var)?;
        match v.trim().parse::<u64>() {
            Ok(n) if range.contains(&n) => Some(n),
            _ => {
                err(
                    var,
                    format!(
                        "{v:?} is not a whole number from {} to {}",
                        range.start(),
                        range.end()
                    ),
                );
                None
            }
        }
    };
    if let Some(ms) = number("OTEL_BSP_SCHEDULE_DELAY", limits::OTEL_MILLIS) {
        out.batch.schedule_delay = Duration::from_millis(ms);
    }
    if let Some(n) = number("OTEL_BSP_MAX_QUEUE_SIZE", limits::OTEL_SPANS) {
        out.batch.max_queue = n as usize;
    }
    if let Some(n) = number("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", limits::OTEL_SPANS) {
        out.batch.max_batch = n as usize;
    }
    out.batch.max_batch = out.batch.max_batch.min(out.batch.max_queue);

    if problems.is_empty() {
        Ok(out)
    } else {
        Err(problems)
    }
}

/// The first set value: the file's, then each variable in order, with where it came from.
fn first_of(
    file: Option<String>,
    env: &Env,
    vars: &[&'static str],
) -> (Option<String>, Option<&'static str>) {
    if file.is_some() {
        return (file, None);
    }
    for var in vars {
        if let Some(v) = env.get(var) {
            return (Some(v), Some(var));
        }
    }
    (None, None)
}

fn from(origin: Option<&str>) -> String {
    origin.map(|o| format!(" (from {o})")).unwrap_or_default()
}

/// A base URL turned into the traces URL: gRPC takes it as is; HTTP appends `/v1/traces`.
/// A file value that already ends with `/v1/traces` is kept, so both spellings work there.
fn base_to_traces(base: &str, grpc: bool, lenient: bool) -> String {
    let base = base.trim();
    if grpc || (lenient && base.trim_end_matches('/').ends_with(TRACES_PATH)) {
        return base.to_owned();
    }
    format!("{}{TRACES_PATH}", base.trim_end_matches('/'))
}

fn parse_bool(v: &str) -> Option<bool> {
    match v.trim().to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" => Some(true),
        "false" | "0" | "no" => Some(false),
        _ => None,
    }
}

/// `k1=v1,k2=v2` as the OTel spec writes headers and resource attributes: surrounding
/// whitespace trimmed, values percent-decoded.
fn parse_pairs(text: &str) -> Vec<(String, String)> {
    text.split(',')
        .filter(|p| !p.trim().is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) => (k.trim().to_owned(), percent_decode(v.trim())),
            None => (String::new(), String::new()),
        })
        .collect()
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let hex = |b: u8| (b as char).to_digit(16);
            if let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resolve_env(
        raw: RawTracing,
        vars: &[(&str, &str)],
    ) -> Result<TracingConfig, Vec<(String, String)>> {
        resolve(&raw, &Env::from_pairs(vars.iter().copied()))
    }

    #[test]
    fn off_without_an_endpoint_and_on_with_one() {
        let c = resolve_env(RawTracing::default(), &[]).unwrap();
        assert!(!c.enabled);
        let c = resolve_env(
            RawTracing::default(),
            &[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318/")],
        )
        .unwrap();
        assert!(c.enabled);
        assert_eq!(c.endpoint, "http://collector:4318/v1/traces");
        assert_eq!(c.service_name, "meshgate");
        assert_eq!(c.sampler.name(), "parentbased_always_on");
    }

    #[test]
    fn file_beats_environment() {
        let raw = RawTracing {
            endpoint: Some("http://file:4318".into()),
            sample_ratio: Some(0.25),
            service_name: Some("edge".into()),
            ..RawTracing::default()
        };
        let c = resolve_env(
            raw,
            &[
                (
                    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                    "http://env:4318/custom",
                ),
                ("OTEL_TRACES_SAMPLER", "always_off"),
                ("OTEL_SERVICE_NAME", "env-name"),
            ],
        )
        .unwrap();
        assert_eq!(c.endpoint, "http://file:4318/v1/traces");
        assert_eq!(c.sampler.root, RootSampler::TraceIdRatio(0.25));
        assert!(c.sampler.parent_based);
        assert_eq!(c.service_name, "edge");
    }

    #[test]
    fn standard_variables() {
        let c = resolve_env(
            RawTracing::default(),
            &[
                (
                    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                    "https://env:4318/custom/path",
                ),
                (
                    "OTEL_EXPORTER_OTLP_HEADERS",
                    "x-api-key=s%3Dcret, x-team = edge",
                ),
                ("OTEL_TRACES_SAMPLER", "parentbased_traceidratio"),
                ("OTEL_TRACES_SAMPLER_ARG", "0.01"),
                (
                    "OTEL_RESOURCE_ATTRIBUTES",
                    "service.name=gw,deployment.environment=prod",
                ),
                ("OTEL_EXPORTER_OTLP_TIMEOUT", "2500"),
                ("OTEL_BSP_SCHEDULE_DELAY", "100"),
            ],
        )
        .unwrap();
        assert!(c.enabled);
        assert_eq!(c.endpoint, "https://env:4318/custom/path");
        assert_eq!(
            c.headers.0,
            [
                ("x-api-key".to_owned(), "s=cret".to_owned()),
                ("x-team".to_owned(), "edge".to_owned())
            ]
        );
        assert!(
            !format!("{c:?}").contains("s=cret"),
            "secrets stay out of Debug"
        );
        assert_eq!(c.sampler.root, RootSampler::TraceIdRatio(0.01));
        assert_eq!(c.service_name, "gw");
        assert_eq!(
            c.resource,
            [("deployment.environment".to_owned(), "prod".to_owned())]
        );
        assert_eq!(c.timeout, Duration::from_millis(2500));
        assert_eq!(c.batch.schedule_delay, Duration::from_millis(100));
    }

    #[test]
    fn grpc_keeps_the_base_url_and_defaults_to_4317() {
        let raw = RawTracing {
            protocol: Some("grpc".into()),
            enabled: Some(true),
            ..RawTracing::default()
        };
        let c = resolve_env(raw, &[]).unwrap();
        assert_eq!(c.protocol, OtlpProtocol::Grpc);
        assert_eq!(c.endpoint, "http://localhost:4317");
        let c = resolve_env(
            RawTracing::default(),
            &[
                ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4317"),
            ],
        )
        .unwrap();
        assert_eq!(c.endpoint, "http://collector:4317");
        assert!(c.enabled);
    }

    #[test]
    fn disabled_by_the_environment_unless_the_file_insists() {
        let vars = [
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318"),
            ("OTEL_SDK_DISABLED", "true"),
        ];
        assert!(!resolve_env(RawTracing::default(), &vars).unwrap().enabled);
        let raw = RawTracing {
            enabled: Some(true),
            ..RawTracing::default()
        };
        assert!(resolve_env(raw, &vars).unwrap().enabled);
        let none = [
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318"),
            ("OTEL_TRACES_EXPORTER", "none"),
        ];
        assert!(!resolve_env(RawTracing::default(), &none).unwrap().enabled);
    }

    #[test]
    fn every_problem_is_reported() {
        let raw = RawTracing {
            protocol: Some("http/json".into()),
            endpoint: Some("collector:4318".into()),
            sample_ratio: Some(2.0),
            ..RawTracing::default()
        };
        let p = resolve_env(
            raw,
            &[
                ("OTEL_EXPORTER_OTLP_HEADERS", "bad header=x"),
                ("OTEL_TRACES_EXPORTER", "zipkin"),
                ("OTEL_BSP_MAX_QUEUE_SIZE", "lots"),
            ],
        )
        .unwrap_err();
        let keys: Vec<&str> = p.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            keys,
            [
                "tracing.protocol",
                "tracing.endpoint",
                "OTEL_TRACES_EXPORTER",
                "OTEL_EXPORTER_OTLP_HEADERS",
                "tracing.sample_ratio",
                "OTEL_BSP_MAX_QUEUE_SIZE"
            ],
            "{p:?}"
        );
    }

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode("a%20b%2Cc"), "a b,c");
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%zz"), "%zz");
    }
}
