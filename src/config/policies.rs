//! `[policies.NAME]`: edge policies written once and referenced by routes
//! (`policies = ["NAME"]`), and how a route's inline keys and its named policies combine.

use std::collections::BTreeMap;

use super::auth::auth;
use super::cache::cache;
use super::env::Env;
use super::problems::Problems;
use super::ratelimit::rate_limit;
use super::raw::{RawPolicy, RawRoute};
use crate::auth::AuthSettings;
use crate::cache::CacheSettings;
use crate::ratelimit::RateLimitSettings;

/// One validated named policy.
#[derive(Debug, Clone, Default)]
pub struct NamedPolicy {
    /// Its rate limit.
    pub rate_limit: Option<RateLimitSettings>,
    /// Its authentication.
    pub auth: Option<AuthSettings>,
    /// Its cache settings (each route naming it still has its own store).
    pub cache: Option<CacheSettings>,
}

/// Every `[policies.NAME]`, checked. `redis`: whether `[redis]` is configured; `env`: where
/// `auth` secrets are read from.
pub(super) fn policies(
    c: &mut Problems,
    raw: &BTreeMap<String, RawPolicy>,
    redis: bool,
    env: &Env,
) -> BTreeMap<String, NamedPolicy> {
    raw.iter()
        .map(|(name, p)| {
            let at = format!("policies.{name}");
            c.unknown(&at, &p.unknown);
            if name.is_empty() || name.len() > 100 {
                c.err(&at, "a policy name has 1 to 100 characters");
            }
            let rate_limit = p
                .rate_limit
                .as_ref()
                .and_then(|r| rate_limit(c, &format!("{at}.rate_limit"), r, name, true, redis));
            let auth = p
                .auth
                .as_ref()
                .and_then(|a| auth(c, &format!("{at}.auth"), a, Some(env)));
            let cache = p
                .cache
                .as_ref()
                .and_then(|raw| cache(c, &format!("{at}.cache"), raw));
            (
                name.clone(),
                NamedPolicy {
                    rate_limit,
                    auth,
                    cache,
                },
            )
        })
        .collect()
}

/// Reports the route's policy names that no `[policies.NAME]` defines.
pub(super) fn unknown_names(
    c: &mut Problems,
    rp: &str,
    r: &RawRoute,
    named: &BTreeMap<String, NamedPolicy>,
) {
    for (i, p) in r.policies.iter().enumerate() {
        if !named.contains_key(p) {
            let known = if named.is_empty() {
                "none".to_owned()
            } else {
                named.keys().cloned().collect::<Vec<_>>().join(", ")
            };
            c.err(
                format!("{rp}.policies[{i}]"),
                format!("unknown policy {p:?}; define it as [policies.{p}] (known: {known})"),
            );
        }
    }
}

/// One kind of policy for a route: inline (`Some(validated)` when the route sets it), or from
/// the one named policy that has it (`get`). Giving it both ways, or through two named
/// policies, is refused: no silent precedence.
fn one_place<T: Clone>(
    c: &mut Problems,
    rp: &str,
    kind: &str,
    inline: Option<Option<T>>,
    policies: &[String],
    named: &BTreeMap<String, NamedPolicy>,
    get: impl Fn(&NamedPolicy) -> Option<&T>,
) -> Option<T> {
    let from: Vec<(&str, &T)> = policies
        .iter()
        .filter_map(|p| Some((p.as_str(), get(named.get(p)?)?)))
        .collect();
    if from.len() > 1 {
        let names: Vec<&str> = from.iter().map(|(n, _)| *n).collect();
        c.err(
            format!("{rp}.policies"),
            format!(
                "policies {} each set a {kind}; a route takes its {kind} from one place",
                names.join(" and ")
            ),
        );
    }
    if let Some(inline) = inline {
        if let Some((first, _)) = from.first() {
            c.err(
                format!("{rp}.{kind}"),
                format!(
                    "set inline and by policy {first:?}; give one (inline keys do not override named policies)"
                ),
            );
        }
        return inline;
    }
    from.first().map(|(_, t)| (*t).clone())
}

/// A route's rate limit, inline or from a named policy (whose buckets it then shares).
pub(super) fn route_rate_limit(
    c: &mut Problems,
    rp: &str,
    name: &str,
    r: &RawRoute,
    named: &BTreeMap<String, NamedPolicy>,
    redis: bool,
) -> Option<RateLimitSettings> {
    let inline = r
        .rate_limit
        .as_ref()
        .map(|raw| rate_limit(c, &format!("{rp}.rate_limit"), raw, name, false, redis));
    one_place(c, rp, "rate_limit", inline, &r.policies, named, |p| {
        p.rate_limit.as_ref()
    })
}

/// A route's authentication, inline or from a named policy.
pub(super) fn route_auth(
    c: &mut Problems,
    rp: &str,
    r: &RawRoute,
    named: &BTreeMap<String, NamedPolicy>,
    env: Option<&Env>,
) -> Option<AuthSettings> {
    let inline = r
        .auth
        .as_ref()
        .map(|a| auth(c, &format!("{rp}.auth"), a, env));
    one_place(c, rp, "auth", inline, &r.policies, named, |p| {
        p.auth.as_ref()
    })
}

/// A route's cache settings, inline or from a named policy.
pub(super) fn route_cache(
    c: &mut Problems,
    rp: &str,
    r: &RawRoute,
    named: &BTreeMap<String, NamedPolicy>,
) -> Option<CacheSettings> {
    let inline = r
        .cache
        .as_ref()
        .map(|raw| cache(c, &format!("{rp}.cache"), raw));
    one_place(c, rp, "cache", inline, &r.policies, named, |p| {
        p.cache.as_ref()
    })
}
