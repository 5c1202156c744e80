//! Routes declared in Consul service tags: ours (`meshgate.route=...`) and fabio's
//! (`urlprefix-...`). Parsing only; the route table decides what to do with them.

/// A route read from a service's tags.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TagRoute {
    /// Service the route sends traffic to.
    pub service: String,
    /// Host to match (lower-cased), or `None` for any host.
    pub host: Option<String>,
    /// Path prefix to match; always starts with `/`.
    pub path: String,
    /// Prefix to strip before forwarding (starts with `/`).
    pub strip: Option<String>,
    /// Balancing policy name as written (validated by the route table, not here).
    pub lb: Option<String>,
}

/// [`parse_tag_routes_with_warnings`], logging each warning at `warn` with the service
/// name instead of returning it.
pub fn parse_tag_routes(service: &str, tags: &[String]) -> Vec<TagRoute> {
    let (routes, warnings) = parse_tag_routes_with_warnings(service, tags);
    for warning in warnings {
        tracing::warn!(service, warning = %warning, "ignored part of a route tag");
    }
    routes
}

/// Reads routes from a service's tags. Tags that are neither ours nor fabio's are ignored.
///
/// Our form (service-wide settings apply to every `meshgate.route` of the service):
/// - `meshgate.route=/api/v1/orders` or `meshgate.route=shop.example.com/api` (host form);
///   repeat the tag for several routes;
/// - `meshgate.strip=/api/v1`: prefix stripped before forwarding;
/// - `meshgate.lb=least_connections`: balancing policy.
///
/// fabio's form: `urlprefix-/path`, `urlprefix-host/path`, optionally followed by
/// space-separated options of which `strip=/prefix` is used; other options (`proto=`,
/// `weight=`, `redirect=`, ...) are reported and ignored. TCP routes (`urlprefix-:3306`) are
/// reported and skipped.
///
/// Returns the routes sorted and deduplicated, plus one warning per problem; never panics.
pub fn parse_tag_routes_with_warnings(
    service: &str,
    tags: &[String],
) -> (Vec<TagRoute>, Vec<String>) {
    let mut warnings = Vec::new();
    let mut ours: Vec<(Option<String>, String)> = Vec::new();
    let mut strip: Option<String> = None;
    let mut lb: Option<String> = None;
    let mut routes = Vec::new();

    for tag in tags {
        let tag = tag.trim();
        if let Some(rest) = tag.strip_prefix("meshgate.") {
            let Some((key, value)) = rest.split_once('=') else {
                warnings.push(format!("tag {tag:?}: expected meshgate.<key>=<value>"));
                continue;
            };
            let value = value.trim();
            match key.trim() {
                "route" => match split_host_path(value) {
                    Ok(hp) => ours.push(hp),
                    Err(why) => warnings.push(format!("tag {tag:?}: {why}")),
                },
                "strip" => {
                    if !value.starts_with('/') {
                        warnings.push(format!("tag {tag:?}: strip prefix must start with '/'"));
                    } else if strip.as_deref().is_some_and(|s| s != value) {
                        warnings.push(format!(
                            "tag {tag:?}: another meshgate.strip is already set; keeping {:?}",
                            strip.as_deref().unwrap_or_default()
                        ));
                    } else {
                        strip = Some(value.to_owned());
                    }
                }
                "lb" => {
                    if value.is_empty() {
                        warnings.push(format!("tag {tag:?}: empty balancing policy"));
                    } else if lb.as_deref().is_some_and(|l| l != value) {
                        warnings.push(format!(
                            "tag {tag:?}: another meshgate.lb is already set; keeping {:?}",
                            lb.as_deref().unwrap_or_default()
                        ));
                    } else {
                        lb = Some(value.to_owned());
                    }
                }
                other => warnings.push(format!(
                    "tag {tag:?}: unknown key {other:?}, expected route, strip or lb"
                )),
            }
        } else if let Some(rest) = tag.strip_prefix("urlprefix-") {
            let mut parts = rest.split_whitespace();
            let spec = parts.next().unwrap_or_default();
            if spec.starts_with(':') {
                warnings.push(format!("tag {tag:?}: fabio TCP routes are not supported"));
                continue;
            }
            let (host, path) = match split_host_path(spec) {
                Ok(hp) => hp,
                Err(why) => {
                    warnings.push(format!("tag {tag:?}: {why}"));
                    continue;
                }
            };
            let mut route_strip = None;
            for option in parts {
                match option.split_once('=') {
                    Some(("strip", prefix)) if prefix.starts_with('/') => {
                        route_strip = Some(prefix.to_owned());
                    }
                    Some(("strip", _)) => {
                        warnings.push(format!("tag {tag:?}: strip prefix must start with '/'"));
                    }
                    _ => warnings.push(format!(
                        "tag {tag:?}: fabio option {option:?} is not supported; ignored"
                    )),
                }
            }
            routes.push(TagRoute {
                service: service.to_owned(),
                host,
                path,
                strip: route_strip,
                lb: None,
            });
        }
    }

    if ours.is_empty() && (strip.is_some() || lb.is_some()) {
        warnings.push("meshgate.strip / meshgate.lb without any meshgate.route tag".to_owned());
    }
    for (host, path) in ours {
        if let Some(s) = &strip {
            if !path.starts_with(s.as_str()) {
                warnings.push(format!(
                    "meshgate.strip={s} is not a prefix of route {path}; it will not apply there"
                ));
            }
        }
        routes.push(TagRoute {
            service: service.to_owned(),
            host,
            path,
            strip: strip.clone(),
            lb: lb.clone(),
        });
    }
    routes.sort();
    routes.dedup();
    (routes, warnings)
}

/// `/path` → (None, "/path"); `host/path` → (Some(host), "/path"); `host` → (Some(host), "/").
fn split_host_path(spec: &str) -> Result<(Option<String>, String), &'static str> {
    if spec.is_empty() {
        return Err("empty route");
    }
    if spec.chars().any(char::is_whitespace) {
        return Err("route must not contain spaces");
    }
    if spec.starts_with('/') {
        return Ok((None, spec.to_owned()));
    }
    let (host, path) = match spec.find('/') {
        Some(at) => (&spec[..at], &spec[at..]),
        None => (spec, "/"),
    };
    if host.contains(['?', '#', '@']) {
        return Err("invalid host");
    }
    Ok((Some(host.to_ascii_lowercase()), path.to_owned()))
}
