//! Load-balancing policies: pure choices over an immutable snapshot.
//! Every policy skips unavailable endpoints with a bounded scan and never takes a lock.

use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};

use super::endpoint::{Endpoint, Endpoints};
use super::hash::{hash_ip, mix64};

/// How a route spreads requests over its service's endpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Policy {
    /// Each available endpoint in turn; weights are ignored.
    RoundRobin,
    /// nginx's smooth weighted round robin: 5:1:1 gives `a a b a c a a`.
    WeightedRoundRobin,
    /// Uniformly random in proportion to weight.
    Random,
    /// Power of two random choices over requests in flight (divided by weight).
    LeastConnections,
    /// Rendezvous hashing of the client address: stable for most clients when endpoints change.
    IpHash,
}

impl Policy {
    /// Every accepted name, for error messages.
    pub const NAMES: &'static [&'static str] = &[
        "round_robin",
        "weighted_round_robin",
        "random",
        "least_connections",
        "ip_hash",
    ];

    /// Parses a configuration name (`round_robin`, ...).
    pub fn from_name(name: &str) -> Option<Self> {
        Some(match name {
            "round_robin" => Self::RoundRobin,
            "weighted_round_robin" => Self::WeightedRoundRobin,
            "random" => Self::Random,
            "least_connections" => Self::LeastConnections,
            "ip_hash" => Self::IpHash,
            _ => return None,
        })
    }

    /// The configuration name.
    pub fn name(&self) -> &'static str {
        match self {
            Self::RoundRobin => "round_robin",
            Self::WeightedRoundRobin => "weighted_round_robin",
            Self::Random => "random",
            Self::LeastConnections => "least_connections",
            Self::IpHash => "ip_hash",
        }
    }
}

/// A policy plus its cursor; one per route, so two routes on one service keep separate turns.
#[derive(Debug)]
pub struct Picker {
    policy: Policy,
    cursor: AtomicUsize,
    /// Below this share (percent) of available endpoints, spread over all of them (Envoy's panic mode).
    panic_threshold: Option<f64>,
}

impl Picker {
    /// A picker starting at the first endpoint.
    pub fn new(policy: Policy) -> Self {
        Self {
            policy,
            cursor: AtomicUsize::new(0),
            panic_threshold: None,
        }
    }

    /// Sets the panic threshold (percent of endpoints available).
    pub fn with_panic_threshold(mut self, percent: Option<f64>) -> Self {
        self.panic_threshold = percent.filter(|p| *p > 0.0);
        self
    }

    /// Index of the chosen endpoint, applying panic mode and the slow-start ramp.
    pub(crate) fn choose(
        &self,
        eps: &Endpoints,
        client: IpAddr,
        avoid: Option<&Endpoint>,
    ) -> Option<usize> {
        let panic = self.in_panic(eps);
        let first = self.choose_once(eps, client, avoid, panic)?;
        let slow_start = eps.settings.slow_start;
        if !slow_start.is_zero() {
            let ramp = eps.list[first].state.ramp(slow_start);
            // Ramping endpoints keep a pick with probability equal to their share so far.
            if ramp < 1.0 && fastrand::f64() >= ramp {
                if let Some(other) = self.choose_once(eps, client, Some(&eps.list[first]), panic) {
                    return Some(other);
                }
            }
        }
        Some(first)
    }

    /// Whether panic mode applies to `eps` now: fewer endpoints available than the threshold,
    /// so picks spread over every endpoint with a positive weight.
    pub fn in_panic(&self, eps: &Endpoints) -> bool {
        self.panic_threshold.is_some_and(|t| {
            let n = eps.list.len();
            n > 0 && (eps.available() as f64) * 100.0 < t * n as f64
        })
    }

    /// The panic threshold in percent, when set.
    pub fn panic_threshold(&self) -> Option<f64> {
        self.panic_threshold
    }

    /// The policy this picker applies.
    pub fn policy(&self) -> Policy {
        self.policy
    }

    /// Index of the chosen endpoint, or `None` when none is available.
    /// `avoid` (a previous attempt's endpoint) is skipped when any other is available.
    fn choose_once(
        &self,
        eps: &Endpoints,
        client: IpAddr,
        avoid: Option<&Endpoint>,
        panic: bool,
    ) -> Option<usize> {
        let list = &eps.list;
        if list.is_empty() {
            return None;
        }
        let eligible = |e: &Endpoint| {
            if panic {
                e.weight() > 0
            } else {
                e.is_available()
            }
        };
        let ok = |i: usize| {
            let e = &list[i];
            eligible(e)
                && avoid.is_none_or(|a| !std::ptr::eq(&**e, a) && e.authority != a.authority)
        };
        let found = match self.policy {
            Policy::RoundRobin => {
                // A retry looks from the current position without taking a turn, so a dead
                // endpoint is not tried first by every request.
                let start = if avoid.is_some() {
                    self.cursor.load(Ordering::Relaxed)
                } else {
                    self.cursor.fetch_add(1, Ordering::Relaxed)
                };
                (0..list.len())
                    .map(|i| (start + i) % list.len())
                    .find(|&i| ok(i))
            }
            Policy::WeightedRoundRobin => {
                let seq = &eps.wrr;
                if seq.is_empty() {
                    None
                } else {
                    let start = self.cursor.fetch_add(1, Ordering::Relaxed);
                    // Bounded: one pass over the sequence at most, which visits every weighted endpoint.
                    (0..seq.len())
                        .map(|i| seq[(start + i) % seq.len()] as usize)
                        .find(|&i| ok(i))
                }
            }
            Policy::Random => {
                let total = eps.cumulative.last().copied().unwrap_or(0);
                if total == 0 {
                    None
                } else {
                    let r = fastrand::u64(0..total);
                    let first = eps.cumulative.partition_point(|&c| c <= r);
                    (0..list.len())
                        .map(|i| (first + i) % list.len())
                        .find(|&i| ok(i))
                }
            }
            Policy::LeastConnections => {
                let n = list.len();
                let a = fastrand::usize(0..n);
                let b = if n > 1 {
                    (a + 1 + fastrand::usize(0..n - 1)) % n
                } else {
                    a
                };
                match (ok(a), ok(b)) {
                    (true, true) => Some(if less_loaded(&list[b], &list[a]) {
                        b
                    } else {
                        a
                    }),
                    (true, false) => Some(a),
                    (false, true) => Some(b),
                    (false, false) => (0..n).filter(|&i| ok(i)).reduce(|best, i| {
                        if less_loaded(&list[i], &list[best]) {
                            i
                        } else {
                            best
                        }
                    }),
                }
            }
            Policy::IpHash => {
                let client = hash_ip(client);
                (0..list.len())
                    .filter(|&i| ok(i))
                    .map(|i| (i, rendezvous_score(client, &list[i])))
                    .max_by(|x, y| x.1.total_cmp(&y.1))
                    .map(|(i, _)| i)
            }
        };
        // With `avoid` as the only available endpoint, reuse it rather than fail the request.
        found.or_else(|| {
            let a = avoid?;
            list.iter()
                .position(|e| std::ptr::eq(&**e, a) && eligible(e))
        })
    }
}

/// `a` carries less load than `b` relative to weight (in_flight / weight, cross-multiplied).
fn less_loaded(a: &Endpoint, b: &Endpoint) -> bool {
    let la = a.state.in_flight() as u128 * u128::from(b.weight());
    let lb = b.state.in_flight() as u128 * u128::from(a.weight());
    la < lb
}

/// Weighted rendezvous score: `-w / ln(u)` with `u` the pair's hash mapped into (0, 1).
fn rendezvous_score(client: u64, ep: &Endpoint) -> f64 {
    let h = mix64(client ^ ep.key_hash);
    let u = ((h >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
    -f64::from(ep.weight()) / u.ln()
}
