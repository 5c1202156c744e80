//! CORS: the gateway answers preflights itself and marks simple responses, for allowed origins only.

use std::time::Duration;

use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request};

/// A validated CORS policy with its header values prebuilt.
#[derive(Debug, Clone)]
pub struct CorsConfig {
    any_origin: bool,
    origins: Vec<String>,
    methods: HeaderValue,
    headers: HeaderValue,
    expose: Option<HeaderValue>,
    credentials: bool,
    max_age: HeaderValue,
}

fn join(items: &[String]) -> HeaderValue {
    HeaderValue::from_str(&items.join(", ")).unwrap_or_else(|_| HeaderValue::from_static(""))
}

impl CorsConfig {
    /// Builds the policy; inputs were validated by the config module.
    pub fn new(
        origins: &[String],
        methods: &[String],
        headers: &[String],
        expose: &[String],
        credentials: bool,
        max_age: Duration,
    ) -> Self {
        Self {
            any_origin: origins.iter().any(|o| o == "*"),
            origins: origins
                .iter()
                .map(|o| o.trim_end_matches('/').to_ascii_lowercase())
                .collect(),
            methods: join(methods),
            headers: join(headers),
            expose: (!expose.is_empty()).then(|| join(expose)),
            credentials,
            max_age: HeaderValue::from(max_age.as_secs()),
        }
    }

    fn allows(&self, origin: &HeaderValue) -> bool {
        self.any_origin
            || origin
                .to_str()
                .map(|o| self.origins.iter().any(|a| a.eq_ignore_ascii_case(o)))
                .unwrap_or(false)
    }

    /// True for a CORS preflight: `OPTIONS` with `Origin` and `Access-Control-Request-Method`.
    pub fn is_preflight<B>(req: &Request<B>) -> bool {
        req.method() == Method::OPTIONS
            && req.headers().contains_key(header::ORIGIN)
            && req
                .headers()
                .contains_key(header::ACCESS_CONTROL_REQUEST_METHOD)
    }

    fn allow_origin(&self, origin: &HeaderValue, out: &mut HeaderMap) {
        // With credentials the origin must be echoed; a wildcard is refused by browsers.
        let value = if self.any_origin && !self.credentials {
            HeaderValue::from_static("*")
        } else {
            origin.clone()
        };
        out.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, value);
        if self.credentials {
            out.insert(
                header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
                HeaderValue::from_static("true"),
            );
        }
    }

    /// Headers for a preflight answer; empty (apart from `Vary`) when the origin is not allowed.
    pub fn preflight(&self, origin: Option<&HeaderValue>, out: &mut HeaderMap) {
        out.append(header::VARY, HeaderValue::from_static("Origin"));
        let Some(origin) = origin.filter(|o| self.allows(o)) else {
            return;
        };
        self.allow_origin(origin, out);
        out.insert(header::ACCESS_CONTROL_ALLOW_METHODS, self.methods.clone());
        out.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, self.headers.clone());
        out.insert(header::ACCESS_CONTROL_MAX_AGE, self.max_age.clone());
    }

    /// Adds CORS headers to an ordinary response for an allowed origin.
    pub fn decorate(&self, origin: Option<&HeaderValue>, out: &mut HeaderMap) {
        out.append(header::VARY, HeaderValue::from_static("Origin"));
        let Some(origin) = origin.filter(|o| self.allows(o)) else {
            return;
        };
        self.allow_origin(origin, out);
        if let Some(e) = &self.expose {
            out.insert(header::ACCESS_CONTROL_EXPOSE_HEADERS, e.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(origins: &[&str], creds: bool) -> CorsConfig {
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        CorsConfig::new(
            &s(origins),
            &s(&["GET", "POST"]),
            &s(&["Content-Type"]),
            &[],
            creds,
            Duration::from_secs(600),
        )
    }

    #[test]
    fn allowed_origin_gets_full_preflight() {
        let c = cfg(&["https://app.example.com"], true);
        let mut h = HeaderMap::new();
        c.preflight(
            Some(&HeaderValue::from_static("https://app.example.com")),
            &mut h,
        );
        assert_eq!(h["access-control-allow-origin"], "https://app.example.com");
        assert_eq!(h["access-control-allow-methods"], "GET, POST");
        assert_eq!(h["access-control-max-age"], "600");
        assert_eq!(h["access-control-allow-credentials"], "true");
        assert_eq!(h["vary"], "Origin");
    }

    #[test]
    fn other_origins_get_nothing() {
        let c = cfg(&["https://app.example.com"], false);
        let mut h = HeaderMap::new();
        c.preflight(
            Some(&HeaderValue::from_static("https://evil.example.com")),
            &mut h,
        );
        assert!(!h.contains_key("access-control-allow-origin"));
        let mut h = HeaderMap::new();
        c.decorate(None, &mut h);
        assert!(!h.contains_key("access-control-allow-origin"));
    }

    #[test]
    fn wildcard_without_credentials_answers_star() {
        let c = cfg(&["*"], false);
        let mut h = HeaderMap::new();
        c.decorate(Some(&HeaderValue::from_static("https://x.example")), &mut h);
        assert_eq!(h["access-control-allow-origin"], "*");
    }
}
