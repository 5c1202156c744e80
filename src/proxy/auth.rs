//! The `auth` stage, first of a route's policies: checks the request's credentials with the
//! route's method (`crate::auth`); a refusal never reaches the upstream, a pass carries the
//! identity on (claim headers, `Exchange::api_key`, `Exchange::jwt_claims`).

use std::sync::Arc;

use http::header::{HeaderMap, HeaderName, HeaderValue, AUTHORIZATION, COOKIE};
use http::Response;

use super::body::ResponseBody;
use super::error::ProxyError;
use super::pipeline::{Exchange, Flow, Stage, Step};
use crate::auth::api_keys::ApiKeys;
use crate::auth::forward::{Asked, ForwardAuth, OnError, Verdict};
use crate::auth::jwt::{self, JwtSettings, KeySet, KeySource, Lookup, TokenSource};
use crate::auth::{AuthSettings, Refusal, MAX_CREDENTIAL};
use crate::metrics::AuthCounters;

/// A route's `auth`.
pub struct Auth {
    /// The method and its keys.
    pub settings: AuthSettings,
    /// Outcomes, shared with the route's metrics.
    pub counters: Arc<AuthCounters>,
    /// The route, for logs.
    pub route: Arc<str>,
}

impl Stage for Auth {
    fn name(&self) -> &'static str {
        "auth"
    }

    fn on_request<'a>(&'a self, ex: &'a mut Exchange<'_>) -> Step<'a> {
        match &self.settings {
            AuthSettings::Jwt(s) => self.jwt(s, ex),
            AuthSettings::ApiKeys(k) => step(self.api_key(k, ex)),
            AuthSettings::Forward(f) => self.forward(f, ex),
        }
    }
}

fn step<'a>(r: Result<(), ProxyError>) -> Step<'a> {
    match r {
        Ok(()) => Step::Next,
        Err(e) => Step::Fail(e),
    }
}

impl Auth {
    /// Counts and builds a refusal with its challenge.
    fn refuse(&self, refusal: Refusal, challenge: Option<HeaderValue>) -> ProxyError {
        self.counters.refuse(refusal.index());
        tracing::debug!(route = %self.route, auth.refusal = refusal.label(), "authentication refused");
        ProxyError::AuthRefused { refusal, challenge }
    }

    fn allow(&self, ex: &mut Exchange<'_>, identity: Option<Arc<str>>) {
        self.counters
            .allowed
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if let Some(id) = &identity {
            tracing::debug!(route = %self.route, auth.identity = %id, "authenticated");
        }
        if let Some(log) = ex.log.as_deref_mut() {
            log.identity = identity;
        }
    }

    // === JWT ===

    fn jwt<'a>(&'a self, s: &'a JwtSettings, ex: &'a mut Exchange<'_>) -> Step<'a> {
        // Before anything can fail: a client never sets what the gateway vouches for.
        for (_, h) in &s.forward_claims {
            ex.head.headers.remove(h);
        }
        let token = match token(&ex.head.headers, &s.token) {
            Ok(t) => t,
            Err(r) => return Step::Fail(self.refuse(r, bearer_challenge(r))),
        };
        let header = match jwt::header(&token) {
            Ok(h) => h,
            Err(r) => return Step::Fail(self.refuse(r, bearer_challenge(r))),
        };
        let remote = match &s.keys {
            KeySource::Static(keys) => return step(self.finish_jwt(s, keys, &token, &header, ex)),
            KeySource::Remote(r) => r,
        };
        match remote.lookup(header.kid.as_deref()) {
            Lookup::Ready(keys) => step(self.finish_jwt(s, &keys, &token, &header, ex)),
            Lookup::Unavailable => Step::Fail(self.unavailable()),
            Lookup::Fetch => Step::Wait(Box::pin(async move {
                match remote.fetch_and_wait(ex.deadline).await {
                    Some(keys) => self
                        .finish_jwt(s, &keys, &token, &header, ex)
                        .map(|()| Flow::Next),
                    None => Err(self.unavailable()),
                }
            })),
        }
    }

    fn unavailable(&self) -> ProxyError {
        self.counters.refuse(Refusal::Unavailable.index());
        ProxyError::AuthUnavailable { source: None }
    }

    fn finish_jwt(
        &self,
        s: &JwtSettings,
        keys: &KeySet,
        token: &str,
        header: &jsonwebtoken::Header,
        ex: &mut Exchange<'_>,
    ) -> Result<(), ProxyError> {
        let claims = keys
            .verify(token, header)
            .and_then(|c| s.check_claims(&c, jwt::unix_now()).map(|()| c))
            .map_err(|r| self.refuse(r, bearer_challenge(r)))?;
        for (claim, h) in &s.forward_claims {
            let Some(v) = claims.get(claim) else { continue };
            match HeaderValue::from_str(&jwt::claim_text(v)) {
                Ok(v) => {
                    ex.head.headers.insert(h.clone(), v);
                }
                Err(_) => {
                    tracing::debug!(route = %self.route, claim = %claim, "claim not forwarded: not a valid header value")
                }
            }
        }
        let sub = claims
            .get("sub")
            .and_then(|v| v.as_str())
            .map(Arc::<str>::from);
        ex.jwt_claims = Some(Arc::new(claims));
        self.allow(ex, sub);
        Ok(())
    }

    // === API keys ===

    fn api_key(&self, k: &ApiKeys, ex: &mut Exchange<'_>) -> Result<(), ProxyError> {
        let challenge = || api_key_challenge(&k.header);
        let mut values = ex.head.headers.get_all(&k.header).iter();
        let (Some(v), None) = (values.next(), values.next()) else {
            let r = if ex.head.headers.contains_key(&k.header) {
                Refusal::InvalidRequest
            } else {
                Refusal::Missing
            };
            return Err(self.refuse(r, challenge()));
        };
        if v.len() > MAX_CREDENTIAL {
            return Err(self.refuse(Refusal::TooLarge, challenge()));
        }
        let Some(name) = k.find(v.as_bytes()).cloned() else {
            return Err(self.refuse(Refusal::UnknownApiKey, challenge()));
        };
        if k.hide {
            ex.head.headers.remove(&k.header);
        }
        ex.api_key = Some(name.clone());
        self.allow(ex, Some(name));
        Ok(())
    }

    // === Forward auth ===

    fn forward<'a>(&'a self, f: &'a ForwardAuth, ex: &'a mut Exchange<'_>) -> Step<'a> {
        for h in &f.copy_response_headers {
            ex.head.headers.remove(h);
        }
        Step::Wait(Box::pin(async move {
            let uri = ex
                .head
                .uri
                .path_and_query()
                .map_or("/", |pq| pq.as_str())
                .to_owned();
            let asked = Asked {
                method: &ex.head.method,
                proto: ex.proto,
                host: ex.host.as_ref(),
                uri: &uri,
                client: ex.client,
            };
            match f.check(asked, &ex.head.headers).await {
                Ok(Verdict::Allow(add)) => {
                    for (name, v) in add.iter() {
                        ex.head.headers.append(name.clone(), v.clone());
                    }
                    self.allow(ex, None);
                    Ok(Flow::Next)
                }
                Ok(Verdict::Deny {
                    status,
                    headers,
                    body,
                }) => {
                    self.counters.refuse(Refusal::Denied.index());
                    tracing::debug!(route = %self.route, status = status.as_u16(), "forward auth refused the request");
                    let mut resp = Response::new(ResponseBody::full(body));
                    *resp.status_mut() = status;
                    resp.headers_mut().extend(headers);
                    Ok(Flow::Answer(resp))
                }
                Err(e) => {
                    tracing::warn!(route = %self.route, error = %crate::error::Chain(&e), on_error = ?f.on_error, "forward auth failed");
                    match f.on_error {
                        OnError::Deny => Err(self.refuse(
                            Refusal::Unavailable,
                            Some(HeaderValue::from_static("Bearer realm=\"meshgate\"")),
                        )),
                        OnError::Unavailable => {
                            self.counters.refuse(Refusal::Unavailable.index());
                            Err(ProxyError::AuthUnavailable {
                                source: Some(Box::new(e)),
                            })
                        }
                    }
                }
            }
        }))
    }
}

/// The token from the configured header (with the `Bearer` scheme for `Authorization`; optional
/// elsewhere), else from the cookie. The size is checked before anything else reads it.
fn token(headers: &HeaderMap, src: &TokenSource) -> Result<String, Refusal> {
    let mut values = headers.get_all(&src.header).iter();
    if let Some(v) = values.next() {
        if values.next().is_some() {
            return Err(Refusal::InvalidRequest);
        }
        if v.len() > MAX_CREDENTIAL + "Bearer ".len() {
            return Err(Refusal::TooLarge);
        }
        let text = v.to_str().map_err(|_| Refusal::Malformed)?.trim();
        let token = match split_scheme(text) {
            Some(t) => t,
            None if src.header == AUTHORIZATION => return Err(Refusal::InvalidRequest),
            None => text,
        };
        return checked(token);
    }
    if let Some(name) = &src.cookie {
        // The Cookie header's own size is bounded by `server.max_header_bytes`; only the
        // token found in it is held to the credential limit.
        for v in headers.get_all(COOKIE) {
            let Ok(text) = v.to_str() else { continue };
            for pair in text.split(';') {
                if let Some((k, val)) = pair.trim().split_once('=') {
                    if k == name {
                        return checked(val.trim_matches('"'));
                    }
                }
            }
        }
    }
    Err(Refusal::Missing)
}

fn split_scheme(text: &str) -> Option<&str> {
    let (scheme, rest) = text.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| rest.trim_start())
}

fn checked(token: &str) -> Result<String, Refusal> {
    if token.len() > MAX_CREDENTIAL {
        Err(Refusal::TooLarge)
    } else if token.is_empty() {
        Err(Refusal::Malformed)
    } else {
        Ok(token.to_owned())
    }
}

/// RFC 6750 §3: `Bearer realm`, and for a request that carried a token the error code and a
/// description (fixed text, never the token).
fn bearer_challenge(r: Refusal) -> Option<HeaderValue> {
    let text = match r.bearer_error() {
        None => "Bearer realm=\"meshgate\"".to_owned(),
        Some(code) => format!(
            "Bearer realm=\"meshgate\", error=\"{code}\", error_description=\"{}\"",
            r.message()
        ),
    };
    HeaderValue::from_str(&text).ok()
}

fn api_key_challenge(header: &HeaderName) -> Option<HeaderValue> {
    HeaderValue::from_str(&format!("ApiKey realm=\"meshgate\", header=\"{header}\"")).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn src(header: &str, cookie: Option<&str>) -> TokenSource {
        TokenSource {
            header: HeaderName::from_bytes(header.as_bytes()).unwrap(),
            cookie: cookie.map(str::to_owned),
        }
    }

    fn headers(list: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in list {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn token_sources() {
        let auth = src("authorization", Some("session"));
        assert_eq!(
            token(&headers(&[("authorization", "Bearer abc")]), &auth).unwrap(),
            "abc"
        );
        assert_eq!(
            token(&headers(&[("authorization", "bearer  abc")]), &auth).unwrap(),
            "abc"
        );
        assert_eq!(
            token(&headers(&[("authorization", "Basic abc")]), &auth),
            Err(Refusal::InvalidRequest)
        );
        assert_eq!(
            token(
                &headers(&[("authorization", "Bearer a"), ("authorization", "Bearer b")]),
                &auth
            ),
            Err(Refusal::InvalidRequest)
        );
        assert_eq!(
            token(&headers(&[("cookie", "a=1; session=tok; b=2")]), &auth).unwrap(),
            "tok"
        );
        let many = format!("big={}; session=tok", "x".repeat(3 * MAX_CREDENTIAL));
        assert_eq!(token(&headers(&[("cookie", &many)]), &auth).unwrap(), "tok");
        let huge = format!("session={}", "x".repeat(MAX_CREDENTIAL + 1));
        assert_eq!(
            token(&headers(&[("cookie", &huge)]), &auth),
            Err(Refusal::TooLarge)
        );
        assert_eq!(token(&headers(&[]), &auth), Err(Refusal::Missing));
        let big = format!("Bearer {}", "a".repeat(MAX_CREDENTIAL + 1));
        assert_eq!(
            token(&headers(&[("authorization", &big)]), &auth),
            Err(Refusal::TooLarge)
        );
        let custom = src("x-token", None);
        assert_eq!(
            token(&headers(&[("x-token", "abc")]), &custom).unwrap(),
            "abc"
        );
    }

    #[test]
    fn challenges_follow_rfc_6750() {
        let missing = bearer_challenge(Refusal::Missing).unwrap();
        assert_eq!(missing, "Bearer realm=\"meshgate\"");
        let expired = bearer_challenge(Refusal::Expired).unwrap();
        assert!(expired
            .to_str()
            .unwrap()
            .contains("error=\"invalid_token\""));
        let scope = bearer_challenge(Refusal::Claims).unwrap();
        assert!(scope
            .to_str()
            .unwrap()
            .contains("error=\"insufficient_scope\""));
    }
}
