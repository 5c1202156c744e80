//! `[discovery.consul]`: the serde model (`RawConsul`) and its resolution into typed
//! `ConsulSettings`, with Consul's own environment variables as fallbacks. No I/O here.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use reqwest::Url;
use serde::{Deserialize, Serialize};

use super::registration::{RawRegister, RegisterSettings};
use crate::limits;

/// The Consul HTTP API address used when neither the file nor `CONSUL_HTTP_ADDR` sets one.
pub const DEFAULT_ADDRESS: &str = "http://127.0.0.1:8500";
/// Longest `filter` accepted: it travels in every query string.
const MAX_FILTER: usize = 4096;

/// `[discovery.consul]` as written in the config file (serde model only).
///
/// Every key is optional; [`RawConsul::default`] holds the defaults. Keys typed `Option` are
/// the ones with an environment fallback, so [`RawConsul::resolve`] can tell "unset" from
/// "set to the default".
///
/// `Serialize` writes the token verbatim: never expose a serialized `RawConsul`. `Debug`
/// redacts it.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawConsul {
    /// Consul HTTP API base URL, e.g. `"http://127.0.0.1:8500"` or `"https://consul:8501"`.
    /// A value without scheme means `http://` (`https://` when `CONSUL_HTTP_SSL=true`).
    /// An `https` scheme turns TLS on. A path (e.g. `/consul` behind a proxy) is kept as a prefix.
    /// Default: `CONSUL_HTTP_ADDR` if set, else `"http://127.0.0.1:8500"`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    /// ACL token sent as `X-Consul-Token`. Mutually exclusive with `token_file`.
    /// Default: none in the file; then `CONSUL_HTTP_TOKEN_FILE`, then `CONSUL_HTTP_TOKEN`
    /// (the file wins, as in Consul's Go client); else no token (the agent's default token).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// File holding the ACL token (surrounding whitespace trimmed), read once when the client
    /// is built. Mutually exclusive with `token`. Default: none (see `token`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_file: Option<PathBuf>,
    /// Datacenter to query (`?dc=`). Default: none, i.e. the agent's own datacenter.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub datacenter: Option<String>,
    /// Instances must carry **all** of these tags (case-insensitive). Sent as repeated
    /// `?tag=` and enforced again client-side. Default: `[]` (no filter).
    pub tags: Vec<String>,
    /// A Consul filter expression (go-bexpr, e.g. `Service.Meta.version == "v2"`) sent as
    /// `?filter=` with every service read, on the health endpoint's selectors. Consul refusing
    /// it is a configuration error: reported, not retried. Default: none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub filter: Option<String>,
    /// How long one blocking query may hang on the server (1ms to 600s). Default: `"60s"`.
    #[serde(with = "humantime_serde")]
    pub wait: Duration,
    /// Allow any Consul server to answer (`?stale`), not only the leader. Keeps discovery
    /// working without a leader at the price of slightly old data. Default: `false`.
    pub stale: bool,
    /// What an instance with a `warning` check gets: `"degrade"` (stays, weighted with
    /// `Weights.Warning`), `"exclude"` (removed), `"include"` (stays with `Weights.Passing`).
    /// Default: `"degrade"`, which is Consul's own DNS/Envoy behaviour.
    pub warning: String,
    /// PEM file of the CA(s) that sign Consul's certificate; replaces the system roots, as
    /// `CONSUL_CACERT` does for the Consul CLI. Default: `CONSUL_CACERT`, else system roots.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate (chain) for mutual TLS; needs `key_file`.
    /// Default: `CONSUL_CLIENT_CERT`, else none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cert_file: Option<PathBuf>,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1) for `cert_file`.
    /// Default: `CONSUL_CLIENT_KEY`, else none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_file: Option<PathBuf>,
    /// Accept any server certificate. For lab setups only; logged at `warn` when used.
    /// Default: `false`, or `true` when `CONSUL_HTTP_SSL_VERIFY=false`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub insecure_skip_verify: Option<bool>,
    /// Build routes from service tags (`meshgate.route=...`, fabio's `urlprefix-...`).
    /// Default: `false`.
    pub routes_from_tags: bool,
    /// How long startup waits for each watched service's first successful Consul answer
    /// before giving up on it (the watch itself keeps retrying); 1ms to 24h. Default: `"10s"`.
    #[serde(with = "humantime_serde")]
    pub startup_timeout: Duration,
    /// Up to this many services get their own blocking query (one HTTP connection each).
    /// Beyond it, one change feed (`/v1/health/state/any` + `/v1/catalog/services`) drives
    /// targeted refreshes instead. Consul agents allow 200 connections per client by default
    /// (`limits.http_max_conns_per_client`), so stay well below that; 1 to 10000. Default: `64`.
    pub max_watches: usize,
    /// `[discovery.consul.connect]`: the service mesh (Connect mTLS to mesh upstreams).
    pub connect: RawConnect,
    /// `[discovery.consul.register]`: register the gateway itself with the agent. Default:
    /// absent (no registration).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub register: Option<RawRegister>,
    /// KV prefix whose keys each hold one route (TOML or JSON, the schema of one `[[routes]]`
    /// entry), watched with one blocking `?recurse` query. Must end with `/` (Consul's prefix
    /// is a string prefix). Default: none, i.e. no routes from KV.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kv_prefix: Option<String>,
}

/// `[discovery.consul.connect]` as written in the config file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawConnect {
    /// Reach every route that names a `service` through the mesh (a route's own `connect`
    /// wins). Never applies to routes with fixed `targets`. Default: `false`.
    pub enabled: bool,
    /// The gateway's own mesh identity: its leaf certificate is requested for this name, and
    /// intentions name it as the source. The ACL token needs `service:write` on it.
    /// Default: `"meshgate"`.
    pub service: String,
}

impl Default for RawConnect {
    fn default() -> Self {
        Self {
            enabled: false,
            service: "meshgate".to_owned(),
        }
    }
}

/// Validated `[discovery.consul.connect]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectSettings {
    /// Mesh by default for routes naming a service.
    pub enabled: bool,
    /// The gateway's identity name.
    pub service: String,
}

impl Default for RawConsul {
    fn default() -> Self {
        Self {
            address: None,
            token: None,
            token_file: None,
            datacenter: None,
            tags: Vec::new(),
            filter: None,
            // consul-template's choice: short enough to notice dead connections within a
            // minute, long enough to cost almost nothing when idle.
            wait: Duration::from_secs(60),
            stale: false,
            warning: "degrade".to_owned(),
            ca_file: None,
            cert_file: None,
            key_file: None,
            insecure_skip_verify: None,
            routes_from_tags: false,
            startup_timeout: Duration::from_secs(10),
            max_watches: 64,
            connect: RawConnect::default(),
            register: None,
            kv_prefix: None,
        }
    }
}

impl fmt::Debug for RawConsul {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RawConsul")
            .field("address", &self.address)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("token_file", &self.token_file)
            .field("datacenter", &self.datacenter)
            .field("tags", &self.tags)
            .field("filter", &self.filter)
            .field("wait", &self.wait)
            .field("stale", &self.stale)
            .field("warning", &self.warning)
            .field("ca_file", &self.ca_file)
            .field("cert_file", &self.cert_file)
            .field("key_file", &self.key_file)
            .field("insecure_skip_verify", &self.insecure_skip_verify)
            .field("routes_from_tags", &self.routes_from_tags)
            .field("startup_timeout", &self.startup_timeout)
            .field("max_watches", &self.max_watches)
            .field("connect", &self.connect)
            .field("register", &self.register)
            .field("kv_prefix", &self.kv_prefix)
            .finish()
    }
}

/// How instances whose aggregated status is `warning` are treated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum WarningMode {
    /// Keep them, weighted with `Weights.Warning` (Consul DNS / Envoy behaviour). The default.
    #[default]
    Degrade,
    /// Drop them, like `?passing` would.
    Exclude,
    /// Keep them at full `Weights.Passing` weight.
    Include,
}

impl WarningMode {
    /// Parses `degrade`, `exclude` or `include` (ASCII case-insensitive, surrounding
    /// whitespace ignored).
    pub fn parse(value: &str) -> Option<Self> {
        match value.trim().to_ascii_lowercase().as_str() {
            "degrade" => Some(Self::Degrade),
            "exclude" => Some(Self::Exclude),
            "include" => Some(Self::Include),
            _ => None,
        }
    }
}

/// Where the ACL token comes from.
#[derive(Clone, PartialEq, Eq)]
pub enum TokenSource {
    /// The token itself (from the file's `token` or `CONSUL_HTTP_TOKEN`).
    Inline(String),
    /// A file read once when the client is built (from `token_file` or
    /// `CONSUL_HTTP_TOKEN_FILE`).
    File(PathBuf),
}

impl fmt::Debug for TokenSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Inline(_) => f.write_str("Inline(<redacted>)"),
            Self::File(path) => f.debug_tuple("File").field(path).finish(),
        }
    }
}

/// TLS material for the Consul connection. Files are only read when the client is built.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsSettings {
    /// CA bundle replacing the system roots; `None` = system roots.
    pub ca_file: Option<PathBuf>,
    /// Client certificate and key for mutual TLS (always both or neither).
    pub client_cert: Option<(PathBuf, PathBuf)>,
    /// Accept any server certificate.
    pub insecure_skip_verify: bool,
}

/// Validated `[discovery.consul]`, ready to build a [`super::ConsulClient`].
#[derive(Debug, Clone, PartialEq)]
pub struct ConsulSettings {
    /// Base URL (`http` or `https`, no query); API paths are appended to its path.
    pub address: Url,
    /// ACL token, if any.
    pub token: Option<TokenSource>,
    /// `?dc=` value, if any.
    pub datacenter: Option<String>,
    /// Required tags (AND, case-insensitive), in config order.
    pub tags: Vec<String>,
    /// `?filter=` on every service read, trimmed; `None` when unset.
    pub filter: Option<String>,
    /// Blocking-query wait, in `1ms..=600s`.
    pub wait: Duration,
    /// Send `?stale`.
    pub stale: bool,
    /// Treatment of `warning` instances.
    pub warning: WarningMode,
    /// TLS material; only used when `address` is `https`.
    pub tls: TlsSettings,
    /// Derive routes from service tags.
    pub routes_from_tags: bool,
    /// Startup budget for the first successful answer of each service (non-zero).
    pub startup_timeout: Duration,
    /// Services beyond this count are served by the change feed (at least 1).
    pub max_watches: usize,
    /// The service mesh.
    pub connect: ConnectSettings,
    /// The gateway's own registration, when the `register` table is present.
    pub register: Option<RegisterSettings>,
    /// KV prefix of the routes kept in Consul (ends with `/`); `None` = no KV routes.
    pub kv_prefix: Option<String>,
}

impl ConsulSettings {
    /// True when the address uses `https`.
    pub fn is_tls(&self) -> bool {
        self.address.scheme() == "https"
    }
}

impl RawConsul {
    /// Validates the section and fills unset keys from Consul's environment variables.
    ///
    /// `env` looks a variable up (`|k| std::env::var(k).ok()` in production, a map in tests);
    /// empty values count as unset, as in the Consul CLI. Variables read: `CONSUL_HTTP_ADDR`,
    /// `CONSUL_HTTP_SSL`, `CONSUL_HTTP_TOKEN`, `CONSUL_HTTP_TOKEN_FILE`, `CONSUL_CACERT`,
    /// `CONSUL_CLIENT_CERT`, `CONSUL_CLIENT_KEY`, `CONSUL_HTTP_SSL_VERIFY`. A value from the
    /// file always beats the environment.
    ///
    /// Returns every problem at once as `(key, message)` pairs, keys relative to
    /// `discovery.consul` (`"address"`, `"tags[2]"`, ...). Never touches the filesystem and
    /// never panics.
    pub fn resolve(
        &self,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<ConsulSettings, Vec<(String, String)>> {
        let env = |key: &str| env(key).filter(|v| !v.trim().is_empty());
        let mut errors: Vec<(String, String)> = Vec::new();
        let mut err = |key: &str, msg: String| errors.push((key.to_owned(), msg));

        // === address ===
        let https_default = match env("CONSUL_HTTP_SSL") {
            None => false,
            Some(v) => match parse_bool(&v) {
                Some(b) => b,
                None => {
                    err(
                        "address",
                        format!("CONSUL_HTTP_SSL={v:?} is not a boolean (true/false)"),
                    );
                    false
                }
            },
        };
        let (address_text, origin) = match (&self.address, env("CONSUL_HTTP_ADDR")) {
            (Some(a), _) => (a.clone(), None),
            (None, Some(a)) => (a, Some("CONSUL_HTTP_ADDR")),
            (None, None) => (DEFAULT_ADDRESS.to_owned(), None),
        };
        let address = match parse_address(&address_text, https_default) {
            Ok(url) => Some(url),
            Err(msg) => {
                let from = origin.map(|o| format!(" (from {o})")).unwrap_or_default();
                err("address", format!("{msg}{from}"));
                None
            }
        };

        // === token ===
        let token = match (&self.token, &self.token_file) {
            (Some(_), Some(_)) => {
                err(
                    "token",
                    "token and token_file are both set; keep one".to_owned(),
                );
                None
            }
            (Some(t), None) => match check_token(t) {
                Ok(()) => Some(TokenSource::Inline(t.trim().to_owned())),
                Err(msg) => {
                    err("token", msg);
                    None
                }
            },
            (None, Some(path)) if path.as_os_str().is_empty() => {
                err("token_file", "must not be empty".to_owned());
                None
            }
            (None, Some(path)) => Some(TokenSource::File(path.clone())),
            (None, None) => {
                if let Some(path) = env("CONSUL_HTTP_TOKEN_FILE") {
                    Some(TokenSource::File(PathBuf::from(path)))
                } else if let Some(t) = env("CONSUL_HTTP_TOKEN") {
                    match check_token(&t) {
                        Ok(()) => Some(TokenSource::Inline(t.trim().to_owned())),
                        Err(msg) => {
                            err("token", format!("{msg} (from CONSUL_HTTP_TOKEN)"));
                            None
                        }
                    }
                } else {
                    None
                }
            }
        };

        // === datacenter, tags ===
        let datacenter = match &self.datacenter {
            Some(dc) if dc.trim().is_empty() => {
                err(
                    "datacenter",
                    "must not be empty; omit it to use the agent's datacenter".to_owned(),
                );
                None
            }
            Some(dc) => Some(dc.trim().to_owned()),
            None => None,
        };
        for (i, tag) in self.tags.iter().enumerate() {
            if tag.is_empty() {
                err(&format!("tags[{i}]"), "tag must not be empty".to_owned());
            }
        }
        let filter = match self.filter.as_deref().map(str::trim) {
            Some("") => {
                err(
                    "filter",
                    "must not be empty; omit it to read every instance".to_owned(),
                );
                None
            }
            Some(f) if f.len() > MAX_FILTER => {
                err("filter", format!("longer than {MAX_FILTER} bytes"));
                None
            }
            Some(f) if f.chars().any(char::is_control) => {
                err(
                    "filter",
                    "must be one line without control characters".to_owned(),
                );
                None
            }
            other => other.map(str::to_owned),
        };

        // === durations, modes, limits ===
        let shown = |d: Duration| humantime::format_duration(d).to_string();
        if let Err(m) = limits::check_duration(self.wait, &limits::CONSUL_WAIT, &shown(self.wait)) {
            err("wait", format!("{m} (600s is Consul's max_query_time)"));
        }
        let warning = WarningMode::parse(&self.warning).unwrap_or_else(|| {
            err(
                "warning",
                format!(
                    "unknown warning mode {:?}, expected one of degrade, exclude, include",
                    self.warning
                ),
            );
            WarningMode::default()
        });
        if let Err(m) = limits::check_duration(
            self.startup_timeout,
            &limits::TIMEOUT,
            &shown(self.startup_timeout),
        ) {
            err("startup_timeout", m);
        }
        if let Err(m) = limits::check_number(self.max_watches, &limits::CONSUL_MAX_WATCHES) {
            err("max_watches", m);
        }

        // === connect ===
        let connect_service = self.connect.service.trim();
        if connect_service.is_empty()
            || !connect_service
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        {
            err(
                "connect.service",
                format!(
                    "{:?} is not a Consul service name (letters, digits, '-', '_', '.')",
                    self.connect.service
                ),
            );
        }

        // === TLS ===
        let from_env = |key: &str| env(key).map(PathBuf::from);
        let ca_file = self.ca_file.clone().or_else(|| from_env("CONSUL_CACERT"));
        let cert_file = self
            .cert_file
            .clone()
            .or_else(|| from_env("CONSUL_CLIENT_CERT"));
        let key_file = self
            .key_file
            .clone()
            .or_else(|| from_env("CONSUL_CLIENT_KEY"));
        let insecure_skip_verify = match self.insecure_skip_verify {
            Some(b) => b,
            None => match env("CONSUL_HTTP_SSL_VERIFY") {
                None => false,
                Some(v) => match parse_bool(&v) {
                    Some(verify) => !verify,
                    None => {
                        err(
                            "insecure_skip_verify",
                            format!("CONSUL_HTTP_SSL_VERIFY={v:?} is not a boolean (true/false)"),
                        );
                        false
                    }
                },
            },
        };
        for (key, path) in [
            ("ca_file", &ca_file),
            ("cert_file", &cert_file),
            ("key_file", &key_file),
        ] {
            if path.as_ref().is_some_and(|p| p.as_os_str().is_empty()) {
                err(key, "must not be empty".to_owned());
            }
        }
        let client_cert = match (cert_file, key_file) {
            (Some(c), Some(k)) => Some((c, k)),
            (Some(_), None) => {
                err(
                    "key_file",
                    "cert_file is set but key_file is not; a client certificate needs its key"
                        .to_owned(),
                );
                None
            }
            (None, Some(_)) => {
                err(
                    "cert_file",
                    "key_file is set but cert_file is not; a client key needs its certificate"
                        .to_owned(),
                );
                None
            }
            (None, None) => None,
        };
        // TLS keys written in the file next to a plain-http address are almost certainly a
        // mistake; the same keys inherited from a shell environment are ignored, as the
        // Consul CLI does.
        if address.as_ref().is_some_and(|a| a.scheme() == "http") {
            for (key, set) in [
                ("ca_file", self.ca_file.is_some()),
                ("cert_file", self.cert_file.is_some()),
                ("key_file", self.key_file.is_some()),
                (
                    "insecure_skip_verify",
                    self.insecure_skip_verify == Some(true),
                ),
            ] {
                if set {
                    err(
                        key,
                        "is set but address uses http://; use an https:// address".to_owned(),
                    );
                }
            }
        }

        if let Some(prefix) = &self.kv_prefix {
            if let Err(msg) = check_kv_prefix(prefix) {
                err("kv_prefix", msg);
            }
        }
        let register = match self.register.as_ref().map(RawRegister::resolve) {
            None => None,
            Some(Ok(r)) => Some(r),
            Some(Err(problems)) => {
                errors.extend(problems);
                None
            }
        };

        match address {
            Some(address) if errors.is_empty() => Ok(ConsulSettings {
                address,
                token,
                datacenter,
                tags: self.tags.clone(),
                filter,
                wait: self.wait,
                stale: self.stale,
                warning,
                tls: TlsSettings {
                    ca_file,
                    client_cert,
                    insecure_skip_verify,
                },
                routes_from_tags: self.routes_from_tags,
                startup_timeout: self.startup_timeout,
                max_watches: self.max_watches,
                connect: ConnectSettings {
                    enabled: self.connect.enabled,
                    service: connect_service.to_owned(),
                },
                register,
                kv_prefix: self.kv_prefix.clone(),
            }),
            _ => Err(errors),
        }
    }
}

/// A KV prefix is a string prefix in Consul, so `meshgate/routes` would also list
/// `meshgate/routes2/...`: it must end with `/`, and Consul keys never start with one.
fn check_kv_prefix(prefix: &str) -> Result<(), String> {
    if prefix.starts_with('/') {
        return Err(format!(
            "{prefix:?} must not start with \"/\"; Consul keys have no leading slash"
        ));
    }
    if !prefix.ends_with('/') || prefix.len() < 2 {
        return Err(format!(
            "{prefix:?} must be a folder ending with \"/\", such as \"meshgate/routes/\""
        ));
    }
    Ok(())
}

/// Go's `strconv.ParseBool` spellings, which the Consul CLI uses for its variables.
fn parse_bool(v: &str) -> Option<bool> {
    match v.trim() {
        "1" | "t" | "T" | "true" | "TRUE" | "True" => Some(true),
        "0" | "f" | "F" | "false" | "FALSE" | "False" => Some(false),
        _ => None,
    }
}

/// A token becomes an HTTP header value, so it must be visible ASCII.
fn check_token(token: &str) -> Result<(), String> {
    let t = token.trim();
    if t.is_empty() {
        return Err("must not be empty; omit it to use the agent's default token".to_owned());
    }
    if !t.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("must be printable ASCII without spaces".to_owned());
    }
    Ok(())
}

/// Parses an address with or without scheme (`consul:8500` means `http://consul:8500`, or
/// `https://` when `https_default`).
fn parse_address(text: &str, https_default: bool) -> Result<Url, String> {
    let text = text.trim();
    if text.is_empty() {
        return Err("must not be empty".to_owned());
    }
    if text.starts_with("unix://") {
        return Err(format!(
            "{text:?}: unix sockets are not supported; use an http:// or https:// address"
        ));
    }
    let with_scheme = if text.contains("://") {
        text.to_owned()
    } else if https_default {
        format!("https://{text}")
    } else {
        format!("http://{text}")
    };
    let url = Url::parse(&with_scheme).map_err(|e| format!("{text:?} is not a valid URL: {e}"))?;
    match url.scheme() {
        "http" | "https" => {}
        other => {
            return Err(format!(
                "{text:?}: unsupported scheme {other:?}, expected http or https"
            ))
        }
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(format!("{text:?} has no host"));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(format!("{text:?} must not carry a query or fragment"));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(format!(
            "{text:?} must not carry credentials; use token or token_file"
        ));
    }
    Ok(url)
}
