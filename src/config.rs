//! Configuration: figment layers (defaults, file, `MESHGATE_*` environment) into `RawConfig`,
//! then `validate` into the typed `Config`, collecting every problem with its key path.
//! Only this module knows figment; the rest of the crate sees `Config`.

pub mod auth;
pub mod cache;
mod env;
#[cfg(test)]
mod limits_tests;
pub mod otel;
pub mod policies;
mod problems;
pub mod ratelimit;
pub mod raw;
mod routes;
mod targets;

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use figment::providers::{Format, Json, Toml, Yaml};
use figment::Figment;
use http::{HeaderName, Method};

use crate::discovery::consul::{ConsulSettings, RawConsul};
pub use crate::limits;
pub use crate::proxy::settings::{
    Backend, ErrorPage, RouteConfig, ServiceSettings, StaticService, UpstreamConfig,
};
use crate::rules::cors::CorsConfig;
use crate::rules::path::EscapedSlashes;
pub use crate::server::settings::{ServerConfig, TlsListener};
pub use crate::telemetry::settings::{AccessLogFormat, LogConfig};
pub use env::Env;
pub use problems::Problem;
use problems::Problems;
use raw::*;
use routes::Services;
use targets::parse_targets;

/// The embedded default: the seed's topology, also shipped as `config/gateway.toml`.
pub const DEMO_TOML: &str = include_str!("../config/gateway.toml");

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
    /// `[policies.NAME]`, validated (routes already carry what they use).
    pub policies: BTreeMap<String, policies::NamedPolicy>,
    /// `[redis]`: the store of global rate limits.
    pub redis: Option<crate::ratelimit::RedisSettings>,
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

/// A route kept in Consul KV under `key`: JSON when the document starts with `{`, TOML
/// otherwise, with the schema of one `[[routes]]` entry; the key's last segment is the default
/// name. The file's route validator checks it against `config`'s services; each problem's path
/// is the key path inside the document (empty for the document as a whole).
pub fn kv_route(key: &str, document: &[u8], config: &Config) -> Result<RouteConfig, Vec<Problem>> {
    let whole = |message: String| {
        vec![Problem {
            path: String::new(),
            message,
        }]
    };
    let Ok(text) = std::str::from_utf8(document) else {
        return Err(whole("not UTF-8 text, so neither JSON nor TOML".to_owned()));
    };
    let json = text.trim_start().starts_with('{');
    let fig = if json {
        Figment::from(Json::string(text))
    } else {
        Figment::from(Toml::string(text))
    };
    let raw: RawRoute = fig.extract().map_err(|e| {
        e.into_iter()
            .map(|e| Problem {
                path: e.path.join("."),
                message: if json {
                    format!("invalid JSON: {}", e.kind)
                } else {
                    format!("neither JSON nor valid TOML: {}", e.kind)
                },
            })
            .collect::<Vec<_>>()
    })?;
    let name = key.rsplit('/').next().unwrap_or(key);
    let mut c = Problems {
        problems: Vec::new(),
    };
    let services = Services {
        static_services: &config.discovery.static_services,
        static_only: config.discovery.provider == Provider::Static,
        connect_default: config
            .discovery
            .consul
            .as_ref()
            .is_some_and(|c| c.connect.enabled),
        policies: &config.policies,
        redis: config.redis.is_some(),
        env: None,
    };
    let route = routes::single(&mut c, &raw, "", name, services);
    for p in &mut c.problems {
        if let Some(rest) = p.path.strip_prefix('.') {
            p.path = rest.to_owned();
        }
    }
    match route {
        Some(r) if c.problems.is_empty() => Ok(r),
        _ => Err(c.problems),
    }
}

/// Every section in turn, then the assembly. The order of the calls is the order of the
/// problems, which tests compare as lists.
fn validate(raw: RawConfig, env: &Env) -> Result<Config, Vec<Problem>> {
    let source = Arc::new(raw.clone());
    let mut c = Problems {
        problems: Vec::new(),
    };
    let listen = top_level(&mut c, &raw);
    let discovery = discovery(&mut c, &raw.discovery, env);
    let upstream = upstream(&mut c, &raw.upstream);
    let server = server(&mut c, &raw.server);
    let cors = raw.cors.as_ref().map(|rc| cors(&mut c, rc));
    let tls = raw.tls.as_ref().and_then(|t| tls(&mut c, t));
    let admin = admin(&mut c, &raw.admin, raw.admin_token.as_deref(), env);
    let metrics_enabled = metrics(&mut c, &raw.metrics);
    let log = log(&mut c, &raw.log);
    let tracing = tracing(&mut c, &raw.tracing, env);
    let redis = raw.redis.as_ref().and_then(|r| ratelimit::redis(&mut c, r));
    let redis_set = raw.redis.is_some();
    let policies = policies::policies(&mut c, &raw.policies, redis_set, env);
    let routes = routes::routes(
        &mut c,
        &raw.routes,
        Services {
            static_services: &discovery.static_services,
            static_only: discovery.provider == Provider::Static,
            connect_default: discovery.consul.as_ref().is_some_and(|c| c.connect.enabled),
            policies: &policies,
            redis: redis_set,
            env: Some(env),
        },
    );

    if !c.problems.is_empty() {
        return Err(c.problems);
    }
    Ok(Config {
        listen: listen.expect("listen was validated"),
        workers: raw.workers,
        admin,
        discovery,
        upstream,
        server,
        cors,
        tls,
        metrics_enabled,
        log,
        tracing,
        routes,
        policies,
        redis,
        source,
    })
}

/// The top level: unknown keys, `listen` (`None` when invalid) and `workers`.
fn top_level(c: &mut Problems, raw: &RawConfig) -> Option<SocketAddr> {
    c.unknown("", &raw.unknown);
    let listen = c.socket("listen", &raw.listen);
    if let Some(Err(m)) = raw
        .workers
        .map(|w| limits::check_number(w, &limits::WORKERS))
    {
        c.err("workers", m);
    }
    listen
}

/// `[discovery]`: the provider, `[discovery.consul]` when it is Consul, and the static services.
fn discovery(c: &mut Problems, raw: &RawDiscovery, env: &Env) -> DiscoveryConfig {
    c.unknown("discovery", &raw.unknown);
    c.unknown("discovery.static", &raw.static_.unknown);
    let provider = match raw.provider.as_str() {
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
        Provider::Consul => consul(c, &raw.consul, env),
        Provider::Static => None,
    };
    DiscoveryConfig {
        provider,
        static_services: static_services(c, &raw.static_.services),
        consul,
    }
}

/// `[discovery.consul]`, with Consul's own variables (`CONSUL_HTTP_ADDR`, ..) as fallbacks.
fn consul(c: &mut Problems, raw: &RawConsul, env: &Env) -> Option<ConsulSettings> {
    match raw.resolve(&|k| env.get(k)) {
        Ok(s) => Some(s),
        Err(problems) => {
            for (key, message) in problems {
                c.err(format!("discovery.consul.{key}"), message);
            }
            None
        }
    }
}

/// `[discovery.static.services]`; a service with a bad target is left out.
fn static_services(
    c: &mut Problems,
    raw: &BTreeMap<String, Vec<RawTarget>>,
) -> BTreeMap<Arc<str>, StaticService> {
    let mut static_services = BTreeMap::new();
    for (name, targets) in raw {
        let path = format!("discovery.static.services.{name}");
        if let Some(svc) = parse_targets(c, &path, targets, true) {
            static_services.insert(Arc::<str>::from(name.as_str()), svc);
        }
    }
    static_services
}

/// `[upstream]`: the connection pool to upstreams.
fn upstream(c: &mut Problems, raw: &RawUpstream) -> UpstreamConfig {
    c.unknown("upstream", &raw.unknown);
    UpstreamConfig {
        connect_timeout: c.duration_in(
            "upstream.connect_timeout",
            &raw.connect_timeout,
            limits::TIMEOUT,
        ),
        idle_timeout: c.duration("upstream.idle_timeout", &raw.idle_timeout),
        max_idle_per_host: c.count_in(
            "upstream.max_idle_per_host",
            raw.max_idle_per_host,
            limits::MAX_IDLE_PER_HOST,
        ),
    }
}

/// `[server]`: downstream limits, timeouts and path rules.
fn server(c: &mut Problems, raw: &RawServer) -> ServerConfig {
    c.unknown("server", &raw.unknown);
    let max_header_bytes = c.size_in(
        "server.max_header_bytes",
        &raw.max_header_bytes,
        limits::MAX_HEADER_BYTES,
    );
    let server = ServerConfig {
        max_header_bytes: max_header_bytes as usize,
        max_headers: c.count_in("server.max_headers", raw.max_headers, limits::MAX_HEADERS),
        header_read_timeout: c.duration_in(
            "server.header_read_timeout",
            &raw.header_read_timeout,
            limits::HEADER_READ_TIMEOUT,
        ),
        keep_alive_timeout: c.duration("server.keep_alive_timeout", &raw.keep_alive_timeout),
        body_read_timeout: c.duration_in(
            "server.body_read_timeout",
            &raw.body_read_timeout,
            limits::TIMEOUT,
        ),
        max_connections: c.count_in(
            "server.max_connections",
            raw.max_connections,
            limits::MAX_CONNECTIONS,
        ),
        drain_delay: c.duration("server.drain_delay", &raw.drain_delay),
        grace_period: c.duration("server.grace_period", &raw.grace_period),
        escaped_slashes: match raw.escaped_slashes.as_str() {
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
        merge_slashes: raw.merge_slashes,
        h2_max_concurrent_streams: c.count_in(
            "server.h2_max_concurrent_streams",
            raw.h2_max_concurrent_streams,
            limits::H2_MAX_CONCURRENT_STREAMS,
        ) as u32,
        reuse_port: raw.reuse_port,
        trusted_proxies: crate::ratelimit::TrustedProxies::parse(&raw.trusted_proxies)
            .unwrap_or_else(|e| {
                c.err("server.trusted_proxies", e);
                Default::default()
            }),
    };
    if raw.reuse_port && !cfg!(unix) {
        c.err(
            "server.reuse_port",
            "SO_REUSEPORT is only available on Unix systems",
        );
    }
    server
}

/// `[cors]`: the global CORS policy.
fn cors(c: &mut Problems, rc: &RawCors) -> Arc<CorsConfig> {
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
        c.err(
            "cors.allowed_origins",
            "needs at least one origin, or [\"*\"]",
        );
    }
    for (i, m) in rc.allowed_methods.iter().enumerate() {
        if Method::from_bytes(m.as_bytes()).is_err() {
            c.err(
                format!("cors.allowed_methods[{i}]"),
                format!("invalid method {m:?}"),
            );
        }
    }
    for (i, h) in rc
        .allowed_headers
        .iter()
        .chain(&rc.expose_headers)
        .enumerate()
    {
        if h != "*" && HeaderName::from_bytes(h.as_bytes()).is_err() {
            c.err(
                format!("cors.allowed_headers[{i}]"),
                format!("invalid header name {h:?}"),
            );
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
}

/// `[tls]`: the TLS listener; the certificates are loaded now so a bad file fails the config.
fn tls(c: &mut Problems, t: &RawTls) -> Option<TlsListener> {
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
}

/// `[admin]` and the token (`admin_token`, else `MESHGATE_ADMIN_TOKEN`).
fn admin(c: &mut Problems, raw: &RawAdmin, token: Option<&str>, env: &Env) -> AdminConfig {
    c.unknown("admin", &raw.unknown);
    let listen = match raw.listen.trim() {
        "" | "off" => None,
        text => c.socket("admin.listen", text),
    };
    let admin = AdminConfig {
        listen,
        expose_on_main: raw.expose_on_main,
        token: token
            .map(str::to_owned)
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
    admin
}

/// `[metrics]`: whether the request path records metrics.
fn metrics(c: &mut Problems, raw: &RawMetrics) -> bool {
    c.unknown("metrics", &raw.unknown);
    raw.enabled
}

/// `[log]`: level filter, format and access log.
fn log(c: &mut Problems, raw: &RawLog) -> LogConfig {
    c.unknown("log", &raw.unknown);
    let json = match raw.format.as_str() {
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
    if let Err(e) = tracing_subscriber::EnvFilter::try_new(&raw.level) {
        c.err("log.level", format!("invalid filter {:?}: {e}", raw.level));
    }
    let access = match raw.access.as_str() {
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
    LogConfig {
        level: raw.level.clone(),
        json,
        access,
    }
}

/// `[tracing]` with the `OTEL_*` variables; see `otel::resolve`.
fn tracing(c: &mut Problems, raw: &RawTracing, env: &Env) -> otel::TracingConfig {
    c.unknown("tracing", &raw.unknown);
    otel::resolve(raw, env).unwrap_or_else(|problems| {
        for (path, message) in problems {
            c.err(path, message);
        }
        otel::TracingConfig::default()
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
    fn kv_route_reads_json_and_toml_with_the_route_validator() {
        let c = Config::from_toml("[discovery]\nprovider = \"consul\"", &Env::default()).unwrap();
        let key = "meshgate/routes/orders";
        let json = kv_route(key, br#" {"path": "/o", "service": "orders"}"#, &c).unwrap();
        assert_eq!((&*json.name, json.path.as_str()), ("orders", "/o"));
        let toml = kv_route(
            key,
            b"name = \"x\"\npath = \"/o\"\nservice = \"orders\"",
            &c,
        );
        assert_eq!(&*toml.unwrap().name, "x");

        let show = |doc: &[u8]| -> Vec<String> {
            kv_route(key, doc, &c)
                .unwrap_err()
                .iter()
                .map(ToString::to_string)
                .collect()
        };
        assert_eq!(
            show(br#"{"path": "o", "service": "s", "timeout": "x", "bogus": 1}"#),
            [
                "bogus: unknown key",
                "path: \"o\" must start with \"/\"",
                "timeout: invalid duration \"x\" (expected number at 0); use e.g. \"250ms\", \"10s\", \"5m\"",
            ]
        );
        assert!(show(b"not a route {")[0].contains("neither JSON nor valid TOML"));
        assert!(show(b"{ broken")[0].contains("invalid JSON"));
        assert!(show(&[0xff, 0xfe])[0].contains("not UTF-8"));
        assert_eq!(
            show(b"path = \"/p\""),
            [": needs either targets or service"]
        );
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
