//! The `register` table of `[discovery.consul]` and the agent registration payload built from
//! it once the listeners are bound. No I/O here; the task that registers lives in `register`.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::limits;

/// Consul refuses `DeregisterCriticalServiceAfter` below one minute (API.md §4.1).
const MIN_DEREGISTER_AFTER: Duration = Duration::from_secs(60);

/// `[discovery.consul.register]` as written in the config file (serde model only). The table
/// being present turns self-registration on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawRegister {
    /// Service name. Default: `"meshgate"`.
    pub name: String,
    /// Service ID, unique on the agent. Default: `<name>-<main listen port>`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// Address other services dial. Default: the main listener's IP, or none (Consul then
    /// uses the node's address) when it listens on `0.0.0.0`/`::`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    /// Port other services dial. Default: the main listener's port.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// Service tags. Default: `[]`.
    pub tags: Vec<String>,
    /// Service meta (keys `[A-Za-z0-9_-]`, at most 64 pairs). Default: empty.
    pub meta: BTreeMap<String, String>,
    /// Interval of the HTTP check on the admin `/ready`, and of the gateway's own look at
    /// whether the agent still knows it. Default: `"10s"`.
    #[serde(with = "humantime_serde")]
    pub check_interval: Duration,
    /// Consul removes the registration after its check stayed critical this long (at least
    /// `1m`, Consul's minimum). Default: `"1m"`.
    #[serde(with = "humantime_serde")]
    pub deregister_critical_after: Duration,
}

impl Default for RawRegister {
    fn default() -> Self {
        Self {
            name: "meshgate".to_owned(),
            id: None,
            address: None,
            port: None,
            tags: Vec::new(),
            meta: BTreeMap::new(),
            check_interval: Duration::from_secs(10),
            deregister_critical_after: MIN_DEREGISTER_AFTER,
        }
    }
}

/// Validated `register` table; the listener-derived defaults are filled in by
/// [`RegisterSettings::payload`], once the listeners are bound.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegisterSettings {
    /// Service name.
    pub name: String,
    /// Service ID, if set.
    pub id: Option<String>,
    /// Advertised address, if set (never an unspecified IP).
    pub address: Option<String>,
    /// Advertised port, if set (non-zero).
    pub port: Option<u16>,
    /// Tags.
    pub tags: Vec<String>,
    /// Meta.
    pub meta: BTreeMap<String, String>,
    /// Check interval, also the period of the "does the agent still know us" read.
    pub check_interval: Duration,
    /// `DeregisterCriticalServiceAfter`, at least one minute.
    pub deregister_critical_after: Duration,
}

impl RawRegister {
    /// Validates the table; every problem as `(key, message)`, keys relative to
    /// `discovery.consul` (`"register.meta.a b"`).
    pub fn resolve(&self) -> Result<RegisterSettings, Vec<(String, String)>> {
        let mut errors = Vec::new();
        let mut err = |key: &str, msg: String| errors.push((format!("register.{key}"), msg));
        if self.name.trim().is_empty() {
            err("name", "must not be empty".to_owned());
        }
        if self.id.as_deref().is_some_and(|id| id.trim().is_empty()) {
            err(
                "id",
                "must not be empty; omit it for <name>-<listen port>".to_owned(),
            );
        }
        match self.address.as_deref().map(str::trim) {
            Some("") => err(
                "address",
                "must not be empty; omit it to use the listener's IP".to_owned(),
            ),
            Some(a) if a.parse::<IpAddr>().is_ok_and(|ip| ip.is_unspecified()) => err(
                "address",
                format!("{a} is refused by Consul; omit address to use the node's address"),
            ),
            _ => {}
        }
        if self.port == Some(0) {
            err(
                "port",
                "must not be 0; omit it to use the listen port".to_owned(),
            );
        }
        for (i, tag) in self.tags.iter().enumerate() {
            if tag.is_empty() {
                err(&format!("tags[{i}]"), "tag must not be empty".to_owned());
            }
        }
        if self.meta.len() > 64 {
            err("meta", "Consul allows at most 64 meta pairs".to_owned());
        }
        for key in self.meta.keys() {
            let valid = !key.is_empty()
                && key.len() <= 128
                && key
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
            if !valid {
                err(
                    &format!("meta.{key}"),
                    "meta keys are 1-128 characters of A-Z, a-z, 0-9, '_' and '-'".to_owned(),
                );
            }
        }
        let shown = |d: Duration| humantime::format_duration(d).to_string();
        if let Err(m) = limits::check_duration(
            self.check_interval,
            &limits::HEALTH_INTERVAL,
            &shown(self.check_interval),
        ) {
            err("check_interval", m);
        }
        if self.deregister_critical_after < MIN_DEREGISTER_AFTER {
            err(
                "deregister_critical_after",
                format!(
                    "{} is below Consul's minimum of 1m",
                    shown(self.deregister_critical_after)
                ),
            );
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        Ok(RegisterSettings {
            name: self.name.trim().to_owned(),
            id: self.id.as_deref().map(|s| s.trim().to_owned()),
            address: self.address.as_deref().map(|s| s.trim().to_owned()),
            port: self.port,
            tags: self.tags.clone(),
            meta: self.meta.clone(),
            check_interval: self.check_interval,
            deregister_critical_after: self.deregister_critical_after,
        })
    }
}

/// Body of `PUT /v1/agent/service/register` (Consul's field names).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct ServicePayload {
    /// Service ID.
    #[serde(rename = "ID")]
    pub id: String,
    /// Service name.
    pub name: String,
    /// Tags, omitted when empty.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    /// Address; omitted when empty so Consul uses the node's address.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub address: String,
    /// Port.
    pub port: u16,
    /// Meta, omitted when empty.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub meta: BTreeMap<String, String>,
    /// `{"Native": true}` for a Connect-native gateway.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connect: Option<ConnectPayload>,
    /// The HTTP check on the admin `/ready`, when the admin listener is on.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub check: Option<CheckPayload>,
}

/// The `Connect` block of a registration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct ConnectPayload {
    /// The process speaks mTLS with its own leaf itself (no sidecar).
    pub native: bool,
}

/// The embedded HTTP check of a registration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct CheckPayload {
    /// Check name shown in Consul's UI.
    pub name: String,
    /// URL the agent polls; 2xx is passing.
    #[serde(rename = "HTTP")]
    pub http: String,
    /// Go duration string (`"10000ms"`).
    pub interval: String,
    /// Go duration string.
    pub deregister_critical_service_after: String,
}

impl RegisterSettings {
    /// The registration for a gateway whose main listener is `main` and admin listener
    /// `admin`; `native` registers it Connect-native (mesh routes exist).
    ///
    /// Defaults: ID `<name>-<main port>`, Address the main IP (none when unspecified), Port the
    /// main port. The check URL's host is the admin IP, or when that is unspecified the
    /// configured address, else `127.0.0.1` (the agent is expected on the same host).
    pub fn payload(
        &self,
        main: SocketAddr,
        admin: Option<SocketAddr>,
        native: bool,
    ) -> ServicePayload {
        let address = match &self.address {
            Some(a) => a.clone(),
            None if main.ip().is_unspecified() => String::new(),
            None => main.ip().to_string(),
        };
        let check = admin.map(|admin| {
            let host = if !admin.ip().is_unspecified() {
                admin.ip().to_string()
            } else if !address.is_empty() {
                address.clone()
            } else {
                "127.0.0.1".to_owned()
            };
            let authority = match host.parse::<IpAddr>() {
                Ok(ip) => SocketAddr::new(ip, admin.port()).to_string(),
                Err(_) => format!("{host}:{}", admin.port()),
            };
            CheckPayload {
                name: format!("{} readiness", self.name),
                http: format!("http://{authority}/ready"),
                interval: go_duration(self.check_interval),
                deregister_critical_service_after: go_duration(self.deregister_critical_after),
            }
        });
        ServicePayload {
            id: self
                .id
                .clone()
                .unwrap_or_else(|| format!("{}-{}", self.name, main.port())),
            name: self.name.clone(),
            tags: self.tags.clone(),
            address,
            port: self.port.unwrap_or(main.port()),
            meta: self.meta.clone(),
            connect: native.then_some(ConnectPayload { native: true }),
            check,
        }
    }
}

/// Go's duration syntax in milliseconds, which Consul parses.
fn go_duration(d: Duration) -> String {
    format!("{}ms", d.as_millis().max(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> RegisterSettings {
        RawRegister::default()
            .resolve()
            .expect("defaults are valid")
    }

    #[test]
    fn payload_defaults_follow_the_listeners() {
        let main: SocketAddr = "10.0.0.9:8080".parse().unwrap();
        let admin: SocketAddr = "0.0.0.0:9000".parse().unwrap();
        let p = settings().payload(main, Some(admin), true);
        assert_eq!(p.id, "meshgate-8080");
        assert_eq!(p.address, "10.0.0.9");
        assert_eq!(p.port, 8080);
        let json = serde_json::to_value(&p).unwrap();
        assert_eq!(json["Connect"], serde_json::json!({"Native": true}));
        assert_eq!(json["Check"]["HTTP"], "http://10.0.0.9:9000/ready");
        assert_eq!(json["Check"]["Interval"], "10000ms");
        assert_eq!(json["Check"]["DeregisterCriticalServiceAfter"], "60000ms");
        assert!(json.get("Tags").is_none() && json.get("Meta").is_none());
    }

    #[test]
    fn unspecified_main_ip_leaves_address_empty_and_no_admin_means_no_check() {
        let main: SocketAddr = "0.0.0.0:8080".parse().unwrap();
        let p = settings().payload(main, None, false);
        let json = serde_json::to_value(&p).unwrap();
        assert!(json.get("Address").is_none(), "{json}");
        assert!(json.get("Check").is_none() && json.get("Connect").is_none());
    }

    #[test]
    fn resolve_collects_every_problem() {
        let raw = RawRegister {
            name: " ".to_owned(),
            address: Some("0.0.0.0".to_owned()),
            port: Some(0),
            meta: [("a b".to_owned(), "x".to_owned())].into(),
            check_interval: Duration::ZERO,
            deregister_critical_after: Duration::from_secs(30),
            ..RawRegister::default()
        };
        let keys: Vec<String> = raw
            .resolve()
            .unwrap_err()
            .into_iter()
            .map(|e| e.0)
            .collect();
        assert_eq!(
            keys,
            [
                "register.name",
                "register.address",
                "register.port",
                "register.meta.a b",
                "register.check_interval",
                "register.deregister_critical_after"
            ]
        );
    }
}
