//! Building a gateway in code: the same keys as the config file, plus error handlers written
//! as closures. Everything goes through the same validation as a file does.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::Response;

use crate::balancer::Policy;
use crate::config::raw::{RawConfig, RawReplace, RawRewrite, RawRoute, RawSize, RawTarget};
use crate::config::{Config, ConfigError, Env};
use crate::health::{HealthCallback, HealthChange};
use crate::proxy::{ErrorHandler, ProxyError};
use crate::{Gateway, GatewayError};

/// Builds a [`Gateway`] in code.
#[derive(Default)]
pub struct GatewayBuilder {
    raw: RawConfig,
    handlers: HashMap<String, ErrorHandler>,
    on_health_change: Option<HealthCallback>,
}

impl GatewayBuilder {
    /// Defaults as in the config file (listen `0.0.0.0:8080`, admin `127.0.0.1:9901`).
    pub fn new() -> Self {
        Self::default()
    }

    /// Main listener address.
    pub fn listen(mut self, addr: &str) -> Self {
        self.raw.listen = addr.to_owned();
        self
    }

    /// Admin listener address; `""` turns it off.
    pub fn admin(mut self, addr: &str) -> Self {
        self.raw.admin.listen = addr.to_owned();
        self
    }

    /// A static service: `(url, weight)` pairs.
    pub fn static_service<'a>(
        mut self,
        name: &str,
        targets: impl IntoIterator<Item = (&'a str, u32)>,
    ) -> Self {
        let targets = targets
            .into_iter()
            .map(|(url, w)| RawTarget::Weighted {
                url: url.to_owned(),
                weight: Some(i64::from(w)),
            })
            .collect();
        self.raw
            .discovery
            .static_
            .services
            .insert(name.to_owned(), targets);
        self
    }

    /// Adds a route.
    pub fn route(mut self, route: RouteBuilder) -> Self {
        if let Some(h) = route.handler {
            self.handlers
                .insert(route.raw.name.clone().unwrap_or_default(), h);
        }
        self.raw.routes.push(route.raw);
        self
    }

    /// Validates and returns the config plus the error handlers by route name.
    pub fn into_parts(self) -> Result<(Config, HashMap<String, ErrorHandler>), ConfigError> {
        Ok((Config::from_raw(self.raw, &Env::default())?, self.handlers))
    }

    /// Called on every endpoint health transition (the seed's `OnHealthChange`).
    pub fn on_health_change(mut self, f: impl Fn(&HealthChange) + Send + Sync + 'static) -> Self {
        self.on_health_change = Some(Arc::new(f));
        self
    }

    /// The raw configuration, for settings the builder has no method for.
    pub fn raw_mut(&mut self) -> &mut RawConfig {
        &mut self.raw
    }

    /// Validates and builds the gateway.
    pub fn build(self) -> Result<Gateway, GatewayError> {
        let on_health_change = self.on_health_change.clone();
        let (config, handlers) = self.into_parts()?;
        Gateway::build_with(config, handlers, on_health_change)
    }
}

/// Builds one route.
pub struct RouteBuilder {
    raw: RawRoute,
    handler: Option<ErrorHandler>,
}

impl RouteBuilder {
    /// A route named `name` on path prefix `path`.
    pub fn new(name: &str, path: &str) -> Self {
        Self {
            raw: RawRoute {
                name: Some(name.to_owned()),
                path: Some(path.to_owned()),
                ..RawRoute::default()
            },
            handler: None,
        }
    }

    /// Fixed targets (URLs, weight 1).
    pub fn targets<'a>(mut self, urls: impl IntoIterator<Item = &'a str>) -> Self {
        self.raw.targets = Some(
            urls.into_iter()
                .map(|u| RawTarget::Url(u.to_owned()))
                .collect(),
        );
        self
    }

    /// A discovered service instead of targets.
    pub fn service(mut self, name: &str) -> Self {
        self.raw.service = Some(name.to_owned());
        self
    }

    /// The balancing policy.
    pub fn balancer(mut self, policy: Policy) -> Self {
        self.raw.load_balancer = policy.name().to_owned();
        self
    }

    /// Appends a `strip_prefix` rewrite.
    pub fn strip_prefix(mut self, prefix: &str) -> Self {
        self.raw.path_rewrite.push(RawRewrite {
            strip_prefix: Some(prefix.to_owned()),
            ..RawRewrite::default()
        });
        self
    }

    /// Appends an `add_prefix` rewrite.
    pub fn add_prefix(mut self, prefix: &str) -> Self {
        self.raw.path_rewrite.push(RawRewrite {
            add_prefix: Some(prefix.to_owned()),
            ..RawRewrite::default()
        });
        self
    }

    /// Appends a `replace_prefix` rewrite.
    pub fn replace_prefix(mut self, from: &str, to: &str) -> Self {
        self.raw.path_rewrite.push(RawRewrite {
            replace_prefix: Some(RawReplace {
                from: from.to_owned(),
                to: to.to_owned(),
                ..RawReplace::default()
            }),
            ..RawRewrite::default()
        });
        self
    }

    /// Time allowed until response headers arrive.
    pub fn timeout(mut self, d: Duration) -> Self {
        self.raw.timeout = format!("{}ms", d.as_millis());
        self
    }

    /// Keep (true) or replace (false) the client's Host.
    pub fn preserve_host(mut self, keep: bool) -> Self {
        self.raw.preserve_host = keep;
        self
    }

    /// Appends a request header.
    pub fn add_request_header(mut self, name: &str, value: &str) -> Self {
        self.raw
            .request_headers
            .add
            .insert(name.to_owned(), value.to_owned());
        self
    }

    /// Sets (replaces) a request header.
    pub fn set_request_header(mut self, name: &str, value: &str) -> Self {
        self.raw
            .request_headers
            .set
            .insert(name.to_owned(), value.to_owned());
        self
    }

    /// Removes a request header.
    pub fn remove_request_header(mut self, name: &str) -> Self {
        self.raw.request_headers.remove.push(name.to_owned());
        self
    }

    /// Appends a response header.
    pub fn add_response_header(mut self, name: &str, value: &str) -> Self {
        self.raw
            .response_headers
            .add
            .insert(name.to_owned(), value.to_owned());
        self
    }

    /// Removes a response header.
    pub fn remove_response_header(mut self, name: &str) -> Self {
        self.raw.response_headers.remove.push(name.to_owned());
        self
    }

    /// Largest request body in bytes.
    pub fn max_body(mut self, bytes: u64) -> Self {
        self.raw.max_body = Some(RawSize::Bytes(bytes as i64));
        self
    }

    /// A custom error answer; return `None` to fall back to the default JSON error.
    pub fn error_handler(
        mut self,
        f: impl Fn(&ProxyError) -> Option<Response<Bytes>> + Send + Sync + 'static,
    ) -> Self {
        self.handler = Some(Arc::new(f));
        self
    }
}
