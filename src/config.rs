//! Configuration: figment layers (defaults, file, `MESHGATE_*` environment) into `RawConfig`,
//! then `validate` into the typed `Config`, collecting every problem with its key path.
//! Only this module knows figment; the rest of the crate sees `Config`.

#[cfg(test)]
mod limits_tests;
pub mod otel;
mod problems;
pub mod raw;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use figment::providers::{Format, Json, Serialized, Toml, Yaml};
use figment::Figment;
use http::uri::Scheme;
use http::{HeaderName, HeaderValue, Method, StatusCode};

use crate::balancer::{OutlierConfig, Policy, PoolSettings};
use crate::discovery::consul::ConsulSettings;
use crate::discovery::Discovered;
use crate::health::HealthCheck;
pub use crate::limits;
pub use crate::proxy::settings::{
    Backend, ErrorPage, RouteConfig, ServiceSettings, StaticService, UpstreamConfig,
};
use crate::rules::cors::CorsConfig;
use crate::rules::headers::HeaderOps;
use crate::rules::path::{EscapedSlashes, Rewrite};
use crate::rules::retry::{RetryOn, RetryPolicy};
pub use crate::server::settings::{ServerConfig, TlsListener};
pub use crate::telemetry::settings::{AccessLogFormat, LogConfig};
pub use problems::Problem;
use problems::Problems;
use raw::*;

/// The embedded default: the seed's topology, also shipped as `config/gateway.toml`.
pub const DEMO_TOML: &str = include_str!("../config/gateway.toml");

/// The environment as a set of variables, so tests never touch the process environment.
#[derive(Debug, Clone, Default)]
pub struct Env {
    vars: BTreeMap<String, String>,
}

impl Env {
    /// A snapshot of the process environment (non-UTF-8 variables are skipped).
    pub fn from_process() -> Self {
        Self::from_pairs(
            std::env::vars_os()
                .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?))),
        )
    }

    /// An environment made of the given variables only.
    pub fn from_pairs<K: Into<String>, V: Into<String>>(
        pairs: impl IntoIterator<Item = (K, V)>,
    ) -> Self {
        Self {
            vars: pairs
                .into_iter()
                .map(|(k, v)| (k.into(), v.into()))
                .collect(),
        }
    }

    /// One variable, when set and not empty.
    pub fn get(&self, name: &str) -> Option<String> {
        self.vars.get(name).filter(|v| !v.is_empty()).cloned()
    }

    /// `MESHGATE_A__B=v` as the figment layer `a.b = v` (values parsed as TOML-like scalars).
    fn provider(&self) -> Figment {
        let mut fig = Figment::new();
        for (key, value) in &self.vars {
            let Some(rest) = key.strip_prefix("MESHGATE_") else {
                continue;
            };
            if rest.is_empty() {
                continue;
            }
            let path = rest.to_ascii_lowercase().replace("__", ".");
            let value: figment::value::Value = value
                .parse()
                .unwrap_or_else(|e: std::convert::Infallible| match e {});
            fig = fig.merge(Serialized::defaults(figment::util::nest(&path, value)));
        }
        fig
    }
}

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file is missing or unreadable.
    #[error("cannot read config file {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file does not parse, or a value has the wrong type.
    #[error("{0}")]
    Parse(#[from] Box<figment::Error>),
    /// The file parses but some values are invalid; every problem is listed.
    #[error("{}", ProblemList(.0))]
    Invalid(Vec<Problem>),
}

struct ProblemList<'a>(&'a [Problem]);

impl fmt::Display for ProblemList<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{p}")?;
        }
        Ok(())
    }
}

impl ConfigError {
    /// Every problem, one per line, with key paths where known.
    pub fn problems(&self) -> Vec<String> {
        match self {
            ConfigError::Invalid(p) => p.iter().map(ToString::to_string).collect(),
            ConfigError::Parse(e) => e
                .as_ref()
                .clone()
                .into_iter()
                .map(|e| e.to_string())
                .collect(),
            ConfigError::Read { path, source } => vec![format!("{}: {source}", path.display())],
        }
    }
}

/// The validated, typed configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Main listener.
    pub listen: SocketAddr,
    /// Runtime worker threads; `None` means one per core.
    pub workers: Option<usize>,
    /// Admin listener and its exposure.
    pub admin: AdminConfig,
    /// Where services come from.
    pub discovery: DiscoveryConfig,
    /// Upstream connection pool.
    pub upstream: UpstreamConfig,
    /// Downstream limits.
    pub server: ServerConfig,
    /// Global CORS policy.
    pub cors: Option<Arc<CorsConfig>>,
    /// TLS listener.
    pub tls: Option<TlsListener>,
    /// Record metrics on the request path (`[metrics] enabled`).
    pub metrics_enabled: bool,
    /// Logging.
    pub log: LogConfig,
    /// OpenTelemetry trace export.
    pub tracing: otel::TracingConfig,
    /// Routes in file order (matching picks the longest prefix).
    pub routes: Vec<RouteConfig>,
    /// The file merged with `MESHGATE_*` as it was read, for the admin `/config` view.
    pub source: Arc<RawConfig>,
}

/// `[admin]` plus the token.
#[derive(Debug, Clone)]
pub struct AdminConfig {
    /// `None` when the admin listener is off.
    pub listen: Option<SocketAddr>,
    /// Serve `/health` and `/status` on the main listener too.
    pub expose_on_main: bool,
    /// Bearer token required on the admin listener (`MESHGATE_ADMIN_TOKEN`).
    pub token: Option<String>,
}

/// Which provider feeds pools, and the static services (usable with either provider).
#[derive(Debug, Clone)]
pub struct DiscoveryConfig {
    /// The provider for services not listed statically.
    pub provider: Provider,
    /// Statically defined services.
    pub static_services: BTreeMap<Arc<str>, StaticService>,
    /// Consul settings when the provider is Consul.
    pub consul: Option<ConsulSettings>,
}

/// A discovery provider.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Provider {
    /// Services come only from `[discovery.static]` and route targets.
    Static,
    /// Services come from Consul.
    Consul,
}

impl Config {
    /// Loads a file (TOML, or JSON/YAML by extension) with `MESHGATE_*` variables from `env` on top.
    pub fn load(path: &Path, env: &Env) -> Result<Self, ConfigError> {
        if let Err(source) = std::fs::metadata(path) {
            return Err(ConfigError::Read {
                path: path.to_owned(),
                source,
            });
        }
        let file = match path.extension().and_then(|e| e.to_str()) {
            Some("json") => Figment::from(Json::file_exact(path)),
            Some("yaml" | "yml") => Figment::from(Yaml::file_exact(path)),
            _ => Figment::from(Toml::file_exact(path)),
        };
        Self::from_figment(file.merge(env.provider()), env)
    }

    /// Parses TOML text with `MESHGATE_*` variables from `env` on top.
    pub fn from_toml(text: &str, env: &Env) -> Result<Self, ConfigError> {
        Self::from_figment(Figment::from(Toml::string(text)).merge(env.provider()), env)
    }

    /// Validates an already-built raw configuration (the library builder's path).
    pub fn from_raw(raw: RawConfig, env: &Env) -> Result<Self, ConfigError> {
        validate(raw, env).map_err(ConfigError::Invalid)
    }

    fn from_figment(fig: Figment, env: &Env) -> Result<Self, ConfigError> {
        let raw: RawConfig = fig.extract().map_err(Box::new)?;
        Self::from_raw(raw, env)
    }
}

/// Parses `http://host:port` into scheme and endpoint.
fn parse_target(
    check: &mut Problems,
    path: &str,
    target: &RawTarget,
) -> Option<((Scheme, bool), Discovered)> {
    let (url, weight) = match target {
        RawTarget::Url(u) => (u.as_str(), 1),
        RawTarget::Weighted { url, weight } => (url.as_str(), weight.unwrap_or(1)),
    };
    let weight = match u32::try_from(weight) {
        Ok(w) => w,
        Err(_) => {
            check.err(
                format!("{path}.weight"),
                format!("weight must be between 0 and {}, got {weight}", u32::MAX),
            );
            return None;
        }
    };
    let uri: http::Uri = match url.parse() {
        Ok(u) => u,
        Err(e) => {
            check.err(path, format!("invalid target URL {url:?}: {e}"));
            return None;
        }
    };
    let (scheme, h2c) = match uri.scheme_str() {
        Some("http") | Some("ws") => (Scheme::HTTP, false),
        Some("https") | Some("wss") => (Scheme::HTTPS, false),
        Some("h2c") => (Scheme::HTTP, true),
        Some(other) => {
            check.err(
                path,
                format!(
                    "target {url:?}: unknown scheme {other:?}; use http, https, ws, wss or h2c"
                ),
            );
            return None;
        }
        None => {
            check.err(
                path,
                format!("target {url:?} needs a scheme, e.g. \"http://{url}\""),
            );
            return None;
        }
    };
    let Some(host) = uri.host() else {
        check.err(path, format!("target {url:?} has no host"));
        return None;
    };
    if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
        check.err(
            path,
            format!("target {url:?} must not carry a path or query; use path_rewrite"),
        );
        return None;
    }
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let port = uri
        .port_u16()
        .unwrap_or(if scheme == Scheme::HTTPS { 443 } else { 80 });
    Some(((scheme, h2c), Discovered::new(host, port, weight)))
}

/// A static service may be empty (it answers 503 until changed at run time); route targets may not.
fn parse_targets(
    check: &mut Problems,
    path: &str,
    targets: &[RawTarget],
    allow_empty: bool,
) -> Option<StaticService> {
    let mut scheme = None;
    let mut endpoints = Vec::new();
    for (i, t) in targets.iter().enumerate() {
        let tp = format!("{path}[{i}]");
        if let Some((s, d)) = parse_target(check, &tp, t) {
            if scheme.get_or_insert_with(|| s.clone()) != &s {
                check.err(tp, "all targets of one service must use the same scheme");
            }
            endpoints.push(d);
        }
    }
    if targets.is_empty() {
        if allow_empty {
            scheme = Some((Scheme::HTTP, false));
        } else {
            check.err(path, "needs at least one target");
        }
    }
    let (scheme, h2c) = scheme?;
    Some(StaticService {
        scheme,
        h2c,
        endpoints,
    })
}

fn header_name(check: &mut Problems, path: &str, name: &str) -> Option<HeaderName> {
    match HeaderName::from_bytes(name.as_bytes()) {
        Ok(n) => Some(n),
        Err(_) => {
            check.err(path, format!("invalid header name {name:?}"));
            None
        }
    }
}

fn header_ops(check: &mut Problems, path: &str, raw: &RawHeaderOps) -> HeaderOps {
    check.unknown(path, &raw.unknown);
    let mut pairs =
        |kind: &str, map: &BTreeMap<String, String>| -> Vec<(HeaderName, HeaderValue)> {
            map.iter()
                .filter_map(|(k, v)| {
                    let p = format!("{path}.{kind}.{k}");
                    let name = header_name(check, &p, k)?;
                    match HeaderValue::from_str(v) {
                        Ok(v) => Some((name, v)),
                        Err(_) => {
                            check.err(p, format!("invalid header value {v:?}"));
                            None
                        }
                    }
                })
                .collect()
        };
    let add = pairs("add", &raw.add);
    let set = pairs("set", &raw.set);
    let remove = raw
        .remove
        .iter()
        .enumerate()
        .filter_map(|(i, n)| header_name(check, &format!("{path}.remove[{i}]"), n))
        .collect();
    HeaderOps::new(add, set, remove)
}

fn prefix(check: &mut Problems, path: &str, p: &str) -> String {
    if !p.starts_with('/') {
        check.err(path, format!("{p:?} must start with \"/\""));
    }
    p.to_owned()
}

fn retry_policy(c: &mut Problems, path: &str, r: &RawRetry) -> RetryPolicy {
    c.unknown(path, &r.unknown);
    let attempts = c.count_in(&format!("{path}.attempts"), r.attempts, limits::ATTEMPTS) as u32;
    // The list replaces the defaults (which the raw default list already spells out).
    let mut on = RetryOn {
        connect_failure: false,
        reset: false,
        timeout: false,
        statuses: Vec::new(),
    };
    for (i, cond) in r.on.iter().enumerate() {
        match cond.as_str() {
            "connect-failure" => on.connect_failure = true,
            "reset" => on.reset = true,
            "timeout" => on.timeout = true,
            code => match code.parse::<u16>() {
                Ok(s) if (500..=599).contains(&s) => on.statuses.push(s),
                _ => c.err(
                    format!("{path}.on[{i}]"),
                    format!("unknown retry condition {cond:?}, expected connect-failure, reset, timeout or a 5xx status such as \"503\""),
                ),
            },
        }
    }
    let budget = r
        .budget
        .trim()
        .trim_end_matches('%')
        .trim()
        .parse::<f64>()
        .ok()
        .filter(|b| (0.0..=100.0).contains(b));
    if budget.is_none() {
        c.err(
            format!("{path}.budget"),
            format!(
                "invalid budget {:?}; expected a percentage such as \"20%\"",
                r.budget
            ),
        );
    }
    RetryPolicy {
        attempts,
        backoff: c.duration(&format!("{path}.backoff"), &r.backoff),
        max_backoff: c.duration(&format!("{path}.max_backoff"), &r.max_backoff),
        per_try_timeout: r
            .per_try_timeout
            .as_ref()
            .map(|t| c.duration_in(&format!("{path}.per_try_timeout"), t, limits::TIMEOUT)),
        on,
        budget_percent: budget.unwrap_or(20.0),
        max_body: c.size_in(
            &format!("{path}.max_body"),
            &r.max_body,
            limits::RETRY_MAX_BODY,
        ),
    }
}

fn health_check(c: &mut Problems, path: &str, h: &RawHealthCheck) -> HealthCheck {
    c.unknown(path, &h.unknown);
    let method = Method::from_bytes(h.method.as_bytes()).unwrap_or_else(|_| {
        c.err(
            format!("{path}.method"),
            format!("invalid method {:?}", h.method),
        );
        Method::GET
    });
    let probe_path = prefix(c, &format!("{path}.path"), &h.path);
    if http::uri::PathAndQuery::try_from(probe_path.as_str()).is_err() {
        c.err(
            format!("{path}.path"),
            format!("invalid path {probe_path:?}"),
        );
    }
    let expected = crate::health::parse_status_ranges(&h.expected_status).unwrap_or_else(|| {
        c.err(
            format!("{path}.expected_status"),
            format!(
                "invalid status list {:?}; expected e.g. \"200-299\" or \"200,204\"",
                h.expected_status
            ),
        );
        vec![(200, 299)]
    });
    let interval = c.duration_in(
        &format!("{path}.interval"),
        &h.interval,
        limits::HEALTH_INTERVAL,
    );
    HealthCheck {
        path: probe_path,
        method,
        interval,
        timeout: c.duration_in(&format!("{path}.timeout"), &h.timeout, limits::TIMEOUT),
        expected,
        healthy_threshold: c.count_in(
            &format!("{path}.healthy_threshold"),
            h.healthy_threshold,
            limits::THRESHOLD,
        ) as u32,
        unhealthy_threshold: c.count_in(
            &format!("{path}.unhealthy_threshold"),
            h.unhealthy_threshold,
            limits::THRESHOLD,
        ) as u32,
        jitter: c.duration(&format!("{path}.jitter"), &h.jitter),
        tcp: h.tcp,
    }
}

fn outlier(c: &mut Problems, path: &str, o: &RawOutlier) -> OutlierConfig {
    c.unknown(path, &o.unknown);
    let pct = o.max_ejection_percent;
    if !(0..=100).contains(&pct) {
        c.err(
            format!("{path}.max_ejection_percent"),
            format!("must be from 0 to 100, got {pct}"),
        );
    }
    OutlierConfig {
        consecutive_5xx: c.count_in(
            &format!("{path}.consecutive_5xx"),
            o.consecutive_5xx,
            limits::CONSECUTIVE,
        ) as u32,
        consecutive_gateway_failures: c.count_in(
            &format!("{path}.consecutive_gateway_failures"),
            o.consecutive_gateway_failures,
            limits::CONSECUTIVE,
        ) as u32,
        base_ejection_time: c
            .duration(&format!("{path}.base_ejection_time"), &o.base_ejection_time),
        max_ejection_time: c.duration(&format!("{path}.max_ejection_time"), &o.max_ejection_time),
        max_ejection_percent: pct.clamp(0, 100) as u32,
    }
}

fn validate(raw: RawConfig, env: &Env) -> Result<Config, Vec<Problem>> {
    let source = Arc::new(raw.clone());
    let mut c = Problems {
        problems: Vec::new(),
    };
    c.unknown("", &raw.unknown);
    let listen = c.socket("listen", &raw.listen);
    if let Some(Err(m)) = raw
        .workers
        .map(|w| limits::check_number(w, &limits::WORKERS))
    {
        c.err("workers", m);
    }

    // Discovery.
    c.unknown("discovery", &raw.discovery.unknown);
    c.unknown("discovery.static", &raw.discovery.static_.unknown);
    let provider = match raw.discovery.provider.as_str() {
        "static" => Provider::Static,
        "consul" => Provider::Consul,
        other => {
            c.err(
                "discovery.provider",
                format!("unknown provider {other:?}, expected one of static, consul"),
            );
            Provider::Static
        }
    };
    let consul = match provider {
        Provider::Consul => match raw.discovery.consul.resolve(&|k| env.get(k)) {
            Ok(s) => Some(s),
            Err(problems) => {
                for (key, message) in problems {
                    c.err(format!("discovery.consul.{key}"), message);
                }
                None
            }
        },
        Provider::Static => None,
    };
    let mut static_services = BTreeMap::new();
    for (name, targets) in &raw.discovery.static_.services {
        let path = format!("discovery.static.services.{name}");
        if let Some(svc) = parse_targets(&mut c, &path, targets, true) {
            static_services.insert(Arc::<str>::from(name.as_str()), svc);
        }
    }

    // Upstream and server.
    c.unknown("upstream", &raw.upstream.unknown);
    let upstream = UpstreamConfig {
        connect_timeout: c.duration_in(
            "upstream.connect_timeout",
            &raw.upstream.connect_timeout,
            limits::TIMEOUT,
        ),
        idle_timeout: c.duration("upstream.idle_timeout", &raw.upstream.idle_timeout),
        max_idle_per_host: c.count_in(
            "upstream.max_idle_per_host",
            raw.upstream.max_idle_per_host,
            limits::MAX_IDLE_PER_HOST,
        ),
    };
    c.unknown("server", &raw.server.unknown);
    let max_header_bytes = c.size_in(
        "server.max_header_bytes",
        &raw.server.max_header_bytes,
        limits::MAX_HEADER_BYTES,
    );
    let server = ServerConfig {
        max_header_bytes: max_header_bytes as usize,
        max_headers: c.count_in(
            "server.max_headers",
            raw.server.max_headers,
            limits::MAX_HEADERS,
        ),
        header_read_timeout: c.duration_in(
            "server.header_read_timeout",
            &raw.server.header_read_timeout,
            limits::HEADER_READ_TIMEOUT,
        ),
        keep_alive_timeout: c.duration("server.keep_alive_timeout", &raw.server.keep_alive_timeout),
        body_read_timeout: c.duration_in(
            "server.body_read_timeout",
            &raw.server.body_read_timeout,
            limits::TIMEOUT,
        ),
        max_connections: c.count_in(
            "server.max_connections",
            raw.server.max_connections,
            limits::MAX_CONNECTIONS,
        ),
        drain_delay: c.duration("server.drain_delay", &raw.server.drain_delay),
        grace_period: c.duration("server.grace_period", &raw.server.grace_period),
        escaped_slashes: match raw.server.escaped_slashes.as_str() {
            "keep" => EscapedSlashes::Keep,
            "reject" => EscapedSlashes::Reject,
            "unescape" => EscapedSlashes::Unescape,
            other => {
                c.err(
                    "server.escaped_slashes",
                    format!("unknown action {other:?}, expected one of keep, reject, unescape"),
                );
                EscapedSlashes::Keep
            }
        },
        merge_slashes: raw.server.merge_slashes,
        h2_max_concurrent_streams: c.count_in(
            "server.h2_max_concurrent_streams",
            raw.server.h2_max_concurrent_streams,
            limits::H2_MAX_CONCURRENT_STREAMS,
        ) as u32,
        reuse_port: raw.server.reuse_port,
    };
    if raw.server.reuse_port && !cfg!(unix) {
        c.err(
            "server.reuse_port",
            "SO_REUSEPORT is only available on Unix systems",
        );
    }

    // CORS.
    let cors = raw.cors.as_ref().map(|rc| {
        c.unknown("cors", &rc.unknown);
        let max_age = c.duration("cors.max_age", &rc.max_age);
        let any = rc.allowed_origins.iter().any(|o| o == "*");
        if any && rc.allow_credentials {
            c.err(
                "cors.allow_credentials",
                "cannot be true with allowed_origins = [\"*\"]: browsers refuse credentials for a wildcard origin; list the origins",
            );
        }
        if rc.allowed_origins.is_empty() {
            c.err("cors.allowed_origins", "needs at least one origin, or [\"*\"]");
        }
        for (i, m) in rc.allowed_methods.iter().enumerate() {
            if Method::from_bytes(m.as_bytes()).is_err() {
                c.err(format!("cors.allowed_methods[{i}]"), format!("invalid method {m:?}"));
            }
        }
        for (i, h) in rc.allowed_headers.iter().chain(&rc.expose_headers).enumerate() {
            if h != "*" && HeaderName::from_bytes(h.as_bytes()).is_err() {
                c.err(format!("cors.allowed_headers[{i}]"), format!("invalid header name {h:?}"));
            }
        }
        Arc::new(CorsConfig::new(
            &rc.allowed_origins,
            &rc.allowed_methods,
            &rc.allowed_headers,
            &rc.expose_headers,
            rc.allow_credentials,
            max_age,
        ))
    });

    // TLS listener.
    let tls = raw.tls.as_ref().and_then(|t| {
        c.unknown("tls", &t.unknown);
        let listen = match &t.listen {
            Some(l) => c.socket("tls.listen", l),
            None => {
                c.err(
                    "tls.listen",
                    "missing; the TLS listener needs an address such as \"0.0.0.0:8443\"",
                );
                None
            }
        };
        let mut certs = Vec::new();
        match (&t.cert_file, &t.key_file) {
            (Some(cert), Some(key)) => certs.push(crate::tls::CertPair {
                cert_file: cert.into(),
                key_file: key.into(),
                names: Vec::new(),
            }),
            (None, None) => {}
            _ => c.err("tls", "cert_file and key_file go together"),
        }
        for (i, extra) in t.certificates.iter().enumerate() {
            c.unknown(&format!("tls.certificates[{i}]"), &extra.unknown);
            certs.push(crate::tls::CertPair {
                cert_file: extra.cert_file.clone().into(),
                key_file: extra.key_file.clone().into(),
                names: extra.names.clone(),
            });
        }
        if certs.is_empty() {
            c.err("tls", "needs cert_file and key_file, or certificates");
            return None;
        }
        match crate::tls::server_config(&certs) {
            Ok(server_config) => Some(TlsListener {
                listen: listen?,
                certs,
                server_config,
            }),
            Err(e) => {
                c.err("tls", crate::error::Chain(&e).to_string());
                None
            }
        }
    });

    // Admin and log.
    c.unknown("admin", &raw.admin.unknown);
    let admin_listen = match raw.admin.listen.trim() {
        "" | "off" => None,
        text => c.socket("admin.listen", text),
    };
    let admin = AdminConfig {
        listen: admin_listen,
        expose_on_main: raw.admin.expose_on_main,
        token: raw
            .admin_token
            .clone()
            .or_else(|| env.get("MESHGATE_ADMIN_TOKEN")),
    };
    if let (Some(addr), None) = (admin.listen, &admin.token) {
        if !addr.ip().is_loopback() {
            c.err(
                "admin.listen",
                format!("{addr} is reachable from other machines; set MESHGATE_ADMIN_TOKEN (admin_token) to protect it, or bind 127.0.0.1"),
            );
        }
    }
    c.unknown("metrics", &raw.metrics.unknown);
    c.unknown("log", &raw.log.unknown);
    let json = match raw.log.format.as_str() {
        "text" => false,
        "json" => true,
        other => {
            c.err(
                "log.format",
                format!("unknown format {other:?}, expected one of text, json"),
            );
            false
        }
    };
    if let Err(e) = tracing_subscriber::EnvFilter::try_new(&raw.log.level) {
        c.err(
            "log.level",
            format!("invalid filter {:?}: {e}", raw.log.level),
        );
    }
    let access = match raw.log.access.as_str() {
        "off" => AccessLogFormat::Off,
        "text" => AccessLogFormat::Text,
        "json" => AccessLogFormat::Json,
        other => {
            c.err(
                "log.access",
                format!("unknown access log format {other:?}, expected one of off, text, json"),
            );
            AccessLogFormat::Off
        }
    };
    c.unknown("tracing", &raw.tracing.unknown);
    let tracing = otel::resolve(&raw.tracing, env).unwrap_or_else(|problems| {
        for (path, message) in problems {
            c.err(path, message);
        }
        otel::TracingConfig::default()
    });
    let log = LogConfig {
        level: raw.log.level.clone(),
        json,
        access,
    };

    // Routes.
    let mut routes = Vec::new();
    let mut names = BTreeSet::new();
    let mut paths = BTreeMap::new();
    let mut service_owner: BTreeMap<Arc<str>, (usize, ServiceSettings)> = BTreeMap::new();
    for (i, r) in raw.routes.iter().enumerate() {
        let rp = format!("routes[{i}]");
        c.unknown(&rp, &r.unknown);
        let name: Arc<str> = r
            .name
            .clone()
            .unwrap_or_else(|| format!("route-{i}"))
            .into();
        if !names.insert(name.clone()) {
            c.err(
                format!("{rp}.name"),
                format!("duplicate route name {name:?}"),
            );
        }
        let path = match &r.path {
            None => {
                c.err(
                    format!("{rp}.path"),
                    "missing; every route needs a path prefix such as \"/api\"",
                );
                String::from("/")
            }
            Some(p) => {
                let p = prefix(&mut c, &format!("{rp}.path"), p);
                crate::rules::path::normalise_prefix(&p)
            }
        };
        if let Some(prev) = paths.insert(path.clone(), i) {
            c.err(
                format!("{rp}.path"),
                format!("{path:?} is already the path of routes[{prev}]"),
            );
        }
        let backend = match (&r.targets, &r.service) {
            (Some(_), Some(_)) => {
                c.err(&rp, "has both targets and service; give exactly one");
                None
            }
            (None, None) => {
                c.err(&rp, "needs either targets or service");
                None
            }
            (Some(t), None) => {
                if static_services.contains_key(&name) {
                    c.err(
                        format!("{rp}.name"),
                        format!("{name:?} is also a service in discovery.static.services; a route with targets owns a service of its own name"),
                    );
                }
                parse_targets(&mut c, &format!("{rp}.targets"), t, false).map(Backend::Targets)
            }
            (None, Some(s)) => {
                if provider == Provider::Static && !static_services.contains_key(s.as_str()) {
                    c.err(
                        format!("{rp}.service"),
                        format!("unknown service {s:?}: not in discovery.static.services and discovery.provider is \"static\""),
                    );
                }
                Some(Backend::Service(s.as_str().into()))
            }
        };
        let policy = Policy::from_name(&r.load_balancer).unwrap_or_else(|| {
            c.err(
                format!("{rp}.load_balancer"),
                format!(
                    "unknown policy {:?}, expected one of {}",
                    r.load_balancer,
                    Policy::NAMES.join(", ")
                ),
            );
            Policy::RoundRobin
        });
        let mut rewrite = Vec::new();
        for (j, rw) in r.path_rewrite.iter().enumerate() {
            let wp = format!("{rp}.path_rewrite[{j}]");
            c.unknown(&wp, &rw.unknown);
            let set = [
                rw.strip_prefix.is_some(),
                rw.add_prefix.is_some(),
                rw.replace_prefix.is_some(),
            ]
            .iter()
            .filter(|x| **x)
            .count();
            if set != 1 {
                c.err(
                    &wp,
                    "needs exactly one of strip_prefix, add_prefix, replace_prefix",
                );
                continue;
            }
            if let Some(p) = &rw.strip_prefix {
                rewrite.push(Rewrite::StripPrefix(crate::rules::path::normalise_prefix(
                    &prefix(&mut c, &format!("{wp}.strip_prefix"), p),
                )));
            } else if let Some(p) = &rw.add_prefix {
                rewrite.push(Rewrite::AddPrefix(crate::rules::path::normalise_prefix(
                    &prefix(&mut c, &format!("{wp}.add_prefix"), p),
                )));
            } else if let Some(rp2) = &rw.replace_prefix {
                c.unknown(&format!("{wp}.replace_prefix"), &rp2.unknown);
                let from = prefix(&mut c, &format!("{wp}.replace_prefix.from"), &rp2.from);
                let to = prefix(&mut c, &format!("{wp}.replace_prefix.to"), &rp2.to);
                rewrite.push(Rewrite::ReplacePrefix {
                    from: crate::rules::path::normalise_prefix(&from),
                    to: crate::rules::path::normalise_prefix(&to),
                });
            }
        }
        let timeout = c.duration_in(&format!("{rp}.timeout"), &r.timeout, limits::TIMEOUT);
        let request_headers =
            header_ops(&mut c, &format!("{rp}.request_headers"), &r.request_headers);
        let response_headers = header_ops(
            &mut c,
            &format!("{rp}.response_headers"),
            &r.response_headers,
        );
        let error = r.error.as_ref().map(|e| {
            let ep = format!("{rp}.error");
            c.unknown(&ep, &e.unknown);
            let status = e.status.and_then(|s| {
                match u16::try_from(s)
                    .ok()
                    .and_then(|s| StatusCode::from_u16(s).ok())
                {
                    Some(st) if (100..=599).contains(&s) => Some(st),
                    _ => {
                        c.err(
                            format!("{ep}.status"),
                            format!("invalid status {s}; expected 100 to 599"),
                        );
                        None
                    }
                }
            });
            let ct = e.content_type.as_deref().unwrap_or("application/json");
            let content_type = HeaderValue::from_str(ct).unwrap_or_else(|_| {
                c.err(
                    format!("{ep}.content_type"),
                    format!("invalid header value {ct:?}"),
                );
                HeaderValue::from_static("application/json")
            });
            ErrorPage {
                status,
                content_type,
                body: Bytes::from(e.body.clone()),
            }
        });
        let max_body = r
            .max_body
            .as_ref()
            .map(|s| c.size(&format!("{rp}.max_body"), s));
        let retry = retry_policy(&mut c, &format!("{rp}.retry"), &r.retry);
        let upstream_tls = r.upstream_tls.as_ref().map(|t| {
            let tp = format!("{rp}.upstream_tls");
            c.unknown(&tp, &t.unknown);
            let client_cert = match (&t.cert_file, &t.key_file) {
                (Some(cert), Some(key)) => Some((PathBuf::from(cert), PathBuf::from(key))),
                (None, None) => None,
                _ => {
                    c.err(&tp, "cert_file and key_file go together");
                    None
                }
            };
            let tls = crate::tls::UpstreamTls {
                ca_file: t.ca_file.as_ref().map(PathBuf::from),
                client_cert,
                server_name: t.server_name.clone(),
                insecure_skip_verify: t.insecure_skip_verify,
            };
            if let Err(e) = crate::tls::client_config(&tls) {
                c.err(&tp, crate::error::Chain(&e).to_string());
            }
            tls
        });
        let websocket_idle_timeout = r
            .websocket_idle_timeout
            .as_ref()
            .map(|t| c.duration_in(&format!("{rp}.websocket_idle_timeout"), t, limits::TIMEOUT));
        let stream_timeout = r
            .stream_timeout
            .as_ref()
            .map(|t| c.duration_in(&format!("{rp}.stream_timeout"), t, limits::TIMEOUT));
        let health_check = r
            .health_check
            .as_ref()
            .map(|h| health_check(&mut c, &format!("{rp}.health_check"), h));
        let outlier = r
            .outlier
            .as_ref()
            .map(|o| outlier(&mut c, &format!("{rp}.outlier"), o));
        let slow_start = c.duration(&format!("{rp}.slow_start"), &r.slow_start);
        if let Some(p) = r.panic_threshold {
            if !(0.0..=100.0).contains(&p) {
                c.err(
                    format!("{rp}.panic_threshold"),
                    format!("must be a percentage from 0 to 100, got {p}"),
                );
            }
        }
        let max_requests = r
            .max_requests
            .map(|n| c.count(&format!("{rp}.max_requests"), n, 1));
        let max_pending = r
            .max_pending
            .map_or(0, |n| c.count(&format!("{rp}.max_pending"), n, 0));
        if max_pending > 0 && max_requests.is_none() {
            c.err(
                format!("{rp}.max_pending"),
                "only means something together with max_requests",
            );
        }
        let service_settings = ServiceSettings {
            health_check,
            pool: PoolSettings {
                start_unhealthy: r.start_unhealthy,
                slow_start,
                outlier,
            },
            max_requests,
            max_pending,
        };
        if r.start_unhealthy && service_settings.health_check.is_none() {
            c.err(
                format!("{rp}.start_unhealthy"),
                "needs a health_check, or new endpoints would never take traffic",
            );
        }
        if let Some(Backend::Service(svc)) = &backend {
            if service_settings != ServiceSettings::default() {
                if let Some((prev, settings)) = service_owner.get(svc) {
                    if settings != &service_settings {
                        c.err(
                            &rp,
                            format!("service {svc:?} already has other health_check/outlier/slow_start/max_requests settings in routes[{prev}]; set them on one route only"),
                        );
                    }
                } else {
                    service_owner.insert(svc.clone(), (i, service_settings.clone()));
                }
            }
        }
        if let Some(backend) = backend {
            routes.push(RouteConfig {
                connect: false,
                name,
                path,
                backend,
                policy,
                rewrite,
                timeout,
                preserve_host: r.preserve_host,
                request_headers,
                response_headers,
                error,
                max_body,
                upstream_tls,
                websocket: r.websocket,
                websocket_idle_timeout,
                retry,
                stream_timeout,
                panic_threshold: r.panic_threshold,
                service_settings,
            });
        }
    }

    if !c.problems.is_empty() {
        return Err(c.problems);
    }
    Ok(Config {
        listen: listen.expect("listen was validated"),
        workers: raw.workers,
        admin,
        discovery: DiscoveryConfig {
            provider,
            static_services,
            consul,
        },
        upstream,
        server,
        cors,
        tls,
        metrics_enabled: raw.metrics.enabled,
        log,
        tracing,
        routes,
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::problems::parse_size;
    use super::*;

    fn problems(toml: &str) -> Vec<String> {
        match Config::from_toml(toml, &Env::default()) {
            Ok(_) => panic!("expected errors"),
            Err(e) => e.problems(),
        }
    }

    #[test]
    fn demo_config_is_valid() {
        let c = Config::from_toml(DEMO_TOML, &Env::default()).unwrap();
        assert_eq!(c.routes.len(), 3);
        assert_eq!(c.listen, "127.0.0.1:8080".parse().unwrap());
    }

    #[test]
    fn every_problem_is_reported_with_its_path() {
        let p = problems(
            r#"
            listen = "nope"
            [upstream]
            connect_timeout = "2 parsecs"
            [cors]
            allowed_origins = ["*"]
            allow_credentials = true
            [[routes]]
            path = "/a"
            targets = ["http://127.0.0.1:1"]
            [[routes]]
            path = "/b"
            targets = ["127.0.0.1:2"]
            [[routes]]
            name = "c"
            path = "/c"
            service = "missing"
            load_balancer = "round-robbin"
            lod_balancer = "x"
            path_rewrite = [{ strip_prefix = "/a", add_prefix = "/b" }]
            "#,
        );
        let expect = [
            "listen: invalid address",
            "upstream.connect_timeout: invalid duration",
            "cors.allow_credentials: cannot be true",
            "routes[1].targets[0]: target \"127.0.0.1:2\"",
            "routes[2].lod_balancer: unknown key",
            "routes[2].service: unknown service \"missing\"",
            "routes[2].load_balancer: unknown policy \"round-robbin\", expected one of round_robin, weighted_round_robin, random, least_connections, ip_hash",
            "routes[2].path_rewrite[0]: needs exactly one of",
        ];
        for e in expect {
            assert!(
                p.iter().any(|x| x.starts_with(e)),
                "missing {e:?} in {p:#?}"
            );
        }
        assert_eq!(p.len(), expect.len(), "{p:#?}");
    }

    #[test]
    fn env_overrides_file_with_nesting() {
        let env = Env::from_pairs([
            ("MESHGATE_LISTEN", "127.0.0.1:9000"),
            ("MESHGATE_UPSTREAM__MAX_IDLE_PER_HOST", "7"),
            ("MESHGATE_ADMIN_TOKEN", "s3cret"),
            ("OTHER", "ignored"),
        ]);
        let c = Config::from_toml(DEMO_TOML, &env).unwrap();
        assert_eq!(c.listen, "127.0.0.1:9000".parse().unwrap());
        assert_eq!(c.upstream.max_idle_per_host, 7);
        assert_eq!(c.admin.token.as_deref(), Some("s3cret"));
    }

    #[test]
    fn path_rules_parse_from_file_and_environment() {
        let c = Config::from_toml("", &Env::default()).unwrap();
        assert_eq!(c.server.escaped_slashes, EscapedSlashes::Keep);
        assert!(!c.server.merge_slashes);
        let env = Env::from_pairs([
            ("MESHGATE_SERVER__ESCAPED_SLASHES", "unescape"),
            ("MESHGATE_SERVER__MERGE_SLASHES", "true"),
        ]);
        let c = Config::from_toml("", &env).unwrap();
        assert_eq!(c.server.escaped_slashes, EscapedSlashes::Unescape);
        assert!(c.server.merge_slashes);
        let p = problems("[server]\nescaped_slashes = \"decode\"\n");
        assert_eq!(
            p,
            ["server.escaped_slashes: unknown action \"decode\", expected one of keep, reject, unescape"]
        );
    }

    #[test]
    fn h2_stream_limit_and_reuse_port() {
        let c = Config::from_toml(DEMO_TOML, &Env::default()).unwrap();
        assert_eq!(c.server.h2_max_concurrent_streams, 100);
        assert!(!c.server.reuse_port);
        let env = Env::from_pairs([
            ("MESHGATE_SERVER__REUSE_PORT", "true"),
            ("MESHGATE_SERVER__H2_MAX_CONCURRENT_STREAMS", "250"),
        ]);
        let c = Config::from_toml(DEMO_TOML, &env).unwrap();
        assert_eq!(c.server.h2_max_concurrent_streams, 250);
        assert!(c.server.reuse_port);
        for (n, message) in [
            (0, "must be from 1 to 10000, got 0"),
            (10_001, "must be from 1 to 10000, got 10001"),
        ] {
            let p = problems(&format!("[server]\nh2_max_concurrent_streams = {n}"));
            assert_eq!(
                p,
                [format!("server.h2_max_concurrent_streams: {message}")],
                "{n}"
            );
        }
    }

    #[test]
    fn sizes_parse_with_units() {
        assert_eq!(parse_size(&RawSize::Text("64KiB".into())), Ok(65536));
        assert_eq!(parse_size(&RawSize::Text("10 MB".into())), Ok(10_000_000));
        assert_eq!(parse_size(&RawSize::Bytes(5)), Ok(5));
        assert!(parse_size(&RawSize::Text("5 parsecs".into())).is_err());
        assert!(parse_size(&RawSize::Bytes(-1)).is_err());
    }

    #[test]
    fn both_targets_and_service_is_an_error() {
        let p = problems(
            r#"
            [discovery.static.services]
            s = ["http://127.0.0.1:1"]
            [[routes]]
            path = "/x/*"
            service = "s"
            targets = ["http://127.0.0.1:1"]
            "#,
        );
        assert_eq!(
            p,
            ["routes[0]: has both targets and service; give exactly one"]
        );
    }
}
