//! `auth = { jwt | api_keys | forward }`: the raw tables and their validation into
//! `auth::AuthSettings`, reading key files and secrets (so `meshgate check` and every reload
//! read them again). Reusable for `[policies.NAME]`.

pub mod raw;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use http::header::AUTHORIZATION;
use http::HeaderName;

pub use raw::{RawApiKeys, RawAuth, RawForwardAuth, RawJwt};

use super::env::Env;
use super::problems::Problems;
use crate::auth::api_keys::{self, ApiKeys};
use crate::auth::forward::{ForwardAuth, OnError};
use crate::auth::jwt::{JwtSettings, KeySet, KeySource, RemoteJwks, TokenSource};
use crate::auth::AuthSettings;
use crate::limits;

/// Validates `auth` at key path `at`; `env` is `None` where the environment may not be named
/// (routes from Consul KV).
pub fn auth(c: &mut Problems, at: &str, raw: &RawAuth, env: Option<&Env>) -> Option<AuthSettings> {
    c.unknown(at, &raw.unknown);
    let given = [
        raw.jwt.is_some(),
        raw.api_keys.is_some(),
        raw.forward.is_some(),
    ]
    .iter()
    .filter(|x| **x)
    .count();
    if given != 1 {
        c.err(
            at,
            "needs exactly one of jwt, api_keys or forward (one method per route)",
        );
        return None;
    }
    if let Some(j) = &raw.jwt {
        return jwt(c, &format!("{at}.jwt"), j, env).map(|s| AuthSettings::Jwt(Arc::new(s)));
    }
    if let Some(k) = &raw.api_keys {
        return keys(c, &format!("{at}.api_keys"), k, env)
            .map(|k| AuthSettings::ApiKeys(Arc::new(k)));
    }
    raw.forward
        .as_ref()
        .and_then(|f| forward(c, &format!("{at}.forward"), f))
        .map(|f| AuthSettings::Forward(Arc::new(f)))
}

fn header(c: &mut Problems, path: &str, name: &str) -> Option<HeaderName> {
    match HeaderName::from_bytes(name.as_bytes()) {
        Ok(n) => Some(n),
        Err(_) => {
            c.err(path, format!("invalid header name {name:?}"));
            None
        }
    }
}

fn http_url(c: &mut Problems, path: &str, text: &str) -> Option<reqwest::Url> {
    match reqwest::Url::parse(text) {
        Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => Some(u),
        _ => {
            c.err(
                path,
                format!("invalid URL {text:?}; expected http:// or https:// with a host"),
            );
            None
        }
    }
}

fn env_var(c: &mut Problems, path: &str, name: &str, env: Option<&Env>) -> Option<String> {
    let Some(env) = env else {
        c.err(
            path,
            "environment variables are read only for routes in the configuration file, not for routes from Consul KV",
        );
        return None;
    };
    let value = env.get(name);
    if value.is_none() {
        c.err(path, format!("environment variable {name} is not set"));
    }
    value
}

fn jwt(c: &mut Problems, at: &str, raw: &RawJwt, env: Option<&Env>) -> Option<JwtSettings> {
    c.unknown(at, &raw.unknown);
    let leeway = c.duration_in(&format!("{at}.leeway"), &raw.leeway, limits::DELAY);
    let refresh = c.duration_in(
        &format!("{at}.jwks_refresh"),
        &raw.jwks_refresh,
        Duration::from_secs(1)..=limits::MAX_DURATION,
    );
    let min_gap = c.duration_in(
        &format!("{at}.jwks_min_refresh"),
        &raw.jwks_min_refresh,
        Duration::from_millis(100)..=limits::MAX_DURATION,
    );
    let sources = [&raw.jwks_url, &raw.jwks_file, &raw.hs256_secret_env];
    let keys = if sources.iter().filter(|s| s.is_some()).count() != 1 {
        c.err(
            at,
            "needs exactly one key source: jwks_url, jwks_file or hs256_secret_env",
        );
        None
    } else if let Some(url) = &raw.jwks_url {
        http_url(c, &format!("{at}.jwks_url"), url)
            .map(|u| KeySource::Remote(Arc::new(RemoteJwks::new(u, refresh, min_gap))))
    } else if let Some(file) = &raw.jwks_file {
        let path = format!("{at}.jwks_file");
        match std::fs::read(file) {
            Err(e) => {
                c.err(path, format!("cannot read {file:?}: {e}"));
                None
            }
            Ok(doc) => match KeySet::from_jwks(&doc) {
                Ok((keys, skipped)) => {
                    if !skipped.is_empty() {
                        tracing::info!(jwks.file = %file, skipped = %skipped.join("; "), "JWKS keys skipped");
                    }
                    Some(KeySource::Static(Arc::new(keys)))
                }
                Err(e) => {
                    c.err(path, format!("{file:?}: {e}"));
                    None
                }
            },
        }
    } else {
        let var = raw.hs256_secret_env.as_deref().unwrap_or_default();
        let path = format!("{at}.hs256_secret_env");
        env_var(c, &path, var, env).and_then(|secret| {
            // RFC 7518 §3.2: an HS256 key at least as long as the hash.
            if secret.len() < 32 {
                c.err(
                    path,
                    format!(
                        "the secret in {var} is shorter than 32 bytes; HS256 needs at least 32"
                    ),
                );
                return None;
            }
            Some(KeySource::Static(Arc::new(KeySet::from_secret(
                secret.as_bytes(),
            ))))
        })
    };
    let mut required_claims = BTreeMap::new();
    for (name, v) in &raw.required_claims {
        let allowed = match v {
            serde_json::Value::Array(list) => list.clone(),
            other => vec![other.clone()],
        };
        if allowed.is_empty()
            || allowed
                .iter()
                .any(|a| a.is_null() || a.is_object() || a.is_array())
        {
            c.err(
                format!("{at}.required_claims.{name}"),
                "expected a string, number or boolean, or a non-empty list of them",
            );
            continue;
        }
        required_claims.insert(name.clone(), allowed);
    }
    let mut forward_claims = Vec::new();
    for (claim, h) in &raw.forward_claims {
        if let Some(h) = header(c, &format!("{at}.forward_claims.{claim}"), h) {
            forward_claims.push((claim.clone(), h));
        }
    }
    let token_header = header(c, &format!("{at}.header"), &raw.header);
    if let Some(cookie) = &raw.cookie {
        if cookie.is_empty()
            || cookie.contains(|ch: char| ch == '=' || ch == ';' || ch.is_whitespace())
        {
            c.err(
                format!("{at}.cookie"),
                format!("invalid cookie name {cookie:?}"),
            );
        }
    }
    for (i, a) in raw.audiences.iter().enumerate() {
        if a.is_empty() {
            c.err(format!("{at}.audiences[{i}]"), "must not be empty");
        }
    }
    Some(JwtSettings {
        issuer: raw.issuer.clone(),
        audiences: raw.audiences.clone(),
        keys: keys?,
        leeway,
        required_claims,
        forward_claims,
        token: TokenSource {
            header: token_header.unwrap_or(AUTHORIZATION),
            cookie: raw.cookie.clone(),
        },
    })
}

fn keys(c: &mut Problems, at: &str, raw: &RawApiKeys, env: Option<&Env>) -> Option<ApiKeys> {
    c.unknown(at, &raw.unknown);
    let header = header(c, &format!("{at}.header"), &raw.header);
    if raw.keys_file.is_none() && raw.keys_env.is_none() {
        c.err(at, "needs keys_file or keys_env (or both)");
        return None;
    }
    let mut entries: Vec<api_keys::Entry> = Vec::new();
    let mut texts = Vec::new();
    if let Some(file) = &raw.keys_file {
        let path = format!("{at}.keys_file");
        match std::fs::read_to_string(file) {
            Ok(t) => texts.push((path, t, format!("{file:?}"))),
            Err(e) => c.err(path, format!("cannot read {file:?}: {e}")),
        }
    }
    if let Some(var) = &raw.keys_env {
        let path = format!("{at}.keys_env");
        if let Some(t) = env_var(c, &path, var, env) {
            texts.push((path, t, var.clone()));
        }
    }
    for (path, text, origin) in texts {
        match api_keys::parse(&text) {
            Ok(list) => {
                for (name, hash) in list {
                    if entries.iter().any(|(n, h)| *n == name || *h == hash) {
                        c.err(
                            &path,
                            format!(
                                "key {name:?} from {origin} repeats a name or hash given earlier"
                            ),
                        );
                    } else {
                        entries.push((name, hash));
                    }
                }
            }
            Err(errors) => {
                for e in errors {
                    c.err(&path, format!("{origin} line {}: {}", e.line, e.message));
                }
            }
        }
    }
    Some(ApiKeys::new(header?, raw.hide_credentials, entries))
}

fn forward(c: &mut Problems, at: &str, raw: &RawForwardAuth) -> Option<ForwardAuth> {
    c.unknown(at, &raw.unknown);
    let url = match &raw.url {
        Some(u) => http_url(c, &format!("{at}.url"), u),
        None => {
            c.err(format!("{at}.url"), "missing; the URL of the auth service");
            None
        }
    };
    let timeout = c.duration_in(&format!("{at}.timeout"), &raw.timeout, limits::TIMEOUT);
    let on_error = match raw.on_error.as_str() {
        "unavailable" => OnError::Unavailable,
        "deny" => OnError::Deny,
        other => {
            c.err(
                format!("{at}.on_error"),
                format!(
                    "unknown value {other:?}; expected \"unavailable\" (503) or \"deny\" (401)"
                ),
            );
            OnError::Unavailable
        }
    };
    let copy_request_headers = raw.copy_request_headers.as_ref().map(|list| {
        list.iter()
            .enumerate()
            .filter_map(|(i, h)| header(c, &format!("{at}.copy_request_headers[{i}]"), h))
            .collect()
    });
    let copy_response_headers = raw
        .copy_response_headers
        .iter()
        .enumerate()
        .filter_map(|(i, h)| header(c, &format!("{at}.copy_response_headers[{i}]"), h))
        .collect();
    Some(ForwardAuth::new(
        url?,
        copy_request_headers,
        copy_response_headers,
        timeout,
        on_error,
    ))
}

#[cfg(test)]
mod tests;
