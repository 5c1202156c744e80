//! `[policies.NAME]`: edge policies written once and referenced by routes
//! (`policies = ["NAME"]`), and how a route's inline keys and its named policies combine.

use std::collections::BTreeMap;

use super::problems::Problems;
use super::ratelimit::rate_limit;
use super::raw::{RawPolicy, RawRoute};
use crate::ratelimit::RateLimitSettings;

/// One validated named policy.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NamedPolicy {
    /// Its rate limit.
    pub rate_limit: Option<RateLimitSettings>,
}

/// Every `[policies.NAME]`, checked. `redis`: whether `[redis]` is configured.
pub(super) fn policies(
    c: &mut Problems,
    raw: &BTreeMap<String, RawPolicy>,
    redis: bool,
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
            (name.clone(), NamedPolicy { rate_limit })
        })
        .collect()
}

/// A route's rate limit: inline, or from the one named policy that has one. Giving it both
/// ways, or through two named policies, is refused: no silent precedence.
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
        .and_then(|raw| rate_limit(c, &format!("{rp}.rate_limit"), raw, name, false, redis));
    let mut from: Vec<&str> = Vec::new();
    let mut found = None;
    for (i, p) in r.policies.iter().enumerate() {
        match named.get(p) {
            None => c.err(
                format!("{rp}.policies[{i}]"),
                format!(
                    "unknown policy {p:?}; define it as [policies.{p}] (known: {})",
                    if named.is_empty() {
                        "none".to_owned()
                    } else {
                        named.keys().cloned().collect::<Vec<_>>().join(", ")
                    }
                ),
            ),
            Some(np) => {
                if let Some(rl) = &np.rate_limit {
                    from.push(p);
                    found.get_or_insert_with(|| rl.clone());
                }
            }
        }
    }
    if from.len() > 1 {
        c.err(
            format!("{rp}.policies"),
            format!(
                "policies {} each set a rate_limit; a route takes its rate limit from one place",
                from.join(" and ")
            ),
        );
    }
    if r.rate_limit.is_some() && !from.is_empty() {
        c.err(
            format!("{rp}.rate_limit"),
            format!(
                "set inline and by policy {:?}; give one (inline keys do not override named policies)",
                from[0]
            ),
        );
    }
    if r.rate_limit.is_some() {
        inline
    } else {
        found
    }
}
