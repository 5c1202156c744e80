//! Load-balancing policies: pure choices over an immutable snapshot.
//! Every policy skips unavailable endpoints with a bounded scan and never takes a lock.

use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};

use super::{Endpoint, Endpoints};

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

fn hash_ip(ip: IpAddr) -> u64 {
    match ip {
        IpAddr::V4(v4) => hash_bytes(&v4.octets()),
        IpAddr::V6(v6) => hash_bytes(&v6.octets()),
    }
}

/// FNV-1a then a 64-bit finaliser: fast, stable across runs and platforms.
pub(crate) fn hash_bytes(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    mix64(h)
}

fn mix64(mut x: u64) -> u64 {
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x = x.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    x ^ (x >> 33)
}

/// Longest smooth weighted round-robin cycle we precompute; larger weight sums are scaled down.
const MAX_WRR_CYCLE: u64 = 4096;

/// nginx's smooth weighted round robin, unrolled into one full cycle of endpoint indices.
///
/// Weights are divided by their gcd first; a cycle longer than `MAX_WRR_CYCLE` is scaled down
/// proportionally (every positive weight keeps at least one slot). Zero weights get no slot.
pub(crate) fn smooth_wrr_sequence(weights: &[u32]) -> Vec<u32> {
    let g = weights.iter().copied().filter(|w| *w > 0).fold(0, gcd);
    if g == 0 {
        return Vec::new();
    }
    let mut w: Vec<i64> = weights.iter().map(|x| i64::from(x / g)).collect();
    let total: u64 = w.iter().map(|x| *x as u64).sum();
    if total > MAX_WRR_CYCLE {
        for x in w.iter_mut().filter(|x| **x > 0) {
            *x = ((*x as u64 * MAX_WRR_CYCLE / total).max(1)) as i64;
        }
    }
    let total: i64 = w.iter().sum();
    let mut current = vec![0i64; w.len()];
    let mut seq = Vec::with_capacity(total as usize);
    for _ in 0..total {
        let mut best = 0;
        for i in 0..w.len() {
            current[i] += w[i];
            if w[i] > 0 && (w[best] == 0 || current[i] > current[best]) {
                best = i;
            }
        }
        current[best] -= total;
        seq.push(best as u32);
    }
    seq
}

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balancer::ServicePool;
    use crate::discovery::Discovered;
    use http::uri::Scheme;

    fn pool(weights: &[u32]) -> ServicePool {
        let p = ServicePool::new("svc", Scheme::HTTP);
        p.replace(
            weights
                .iter()
                .enumerate()
                .map(|(i, w)| Discovered::new("10.0.0.1", 8000 + i as u16, *w))
                .collect(),
        );
        p
    }

    fn counts(
        policy: Policy,
        p: &ServicePool,
        n: usize,
        client: impl Fn(usize) -> IpAddr,
    ) -> Vec<usize> {
        let picker = Picker::new(policy);
        let mut c = vec![0; p.snapshot().len()];
        for i in 0..n {
            let lease = picker.pick(p, client(i), None).unwrap();
            let idx = (lease.endpoint().source.port - 8000) as usize;
            c[idx] += 1;
        }
        c
    }

    #[test]
    fn smooth_wrr_matches_nginx() {
        // a=5 b=1 c=1: current weights step by step give a a b a c a a.
        let seq = smooth_wrr_sequence(&[5, 1, 1]);
        assert_eq!(seq, [0, 0, 1, 0, 2, 0, 0]);
        // gcd reduction: 10:2:2 is the same cycle.
        assert_eq!(smooth_wrr_sequence(&[10, 2, 2]), seq);
        // Zero weights never appear.
        assert_eq!(smooth_wrr_sequence(&[0, 2, 0, 1]), [1, 3, 1]);
        assert!(smooth_wrr_sequence(&[0, 0]).is_empty());
        // Huge sums are bounded and keep proportions roughly.
        let big = smooth_wrr_sequence(&[10_000, 1, 5_000]);
        assert!(big.len() as u64 <= MAX_WRR_CYCLE + 3);
        assert!(big.contains(&1));
    }

    #[test]
    fn round_robin_is_exactly_even() {
        let p = pool(&[1, 1, 1]);
        assert_eq!(
            counts(Policy::RoundRobin, &p, 300, |_| [1, 2, 3, 4].into()),
            [100, 100, 100]
        );
    }

    #[test]
    fn round_robin_skips_unhealthy_and_zero_weight() {
        let p = pool(&[1, 0, 1]);
        p.snapshot().list()[2].state.set_healthy(false);
        assert_eq!(
            counts(Policy::RoundRobin, &p, 10, |_| [1, 2, 3, 4].into()),
            [10, 0, 0]
        );
        p.snapshot().list()[0].state.set_healthy(false);
        let picker = Picker::new(Policy::RoundRobin);
        assert!(picker.pick(&p, [1, 2, 3, 4].into(), None).is_none());
    }

    #[test]
    fn weighted_round_robin_follows_weights_exactly_per_cycle() {
        let p = pool(&[5, 1, 1]);
        assert_eq!(
            counts(Policy::WeightedRoundRobin, &p, 700, |_| [1, 1, 1, 1].into()),
            [500, 100, 100]
        );
    }

    #[test]
    fn random_is_weight_aware_within_bounds() {
        let p = pool(&[3, 1]);
        let c = counts(Policy::Random, &p, 20_000, |_| [1, 1, 1, 1].into());
        // Expected 15000/5000; 4 sigma is about 245.
        assert!((14_500..=15_500).contains(&c[0]), "{c:?}");
    }

    #[test]
    fn least_connections_prefers_idle_endpoints() {
        let p = pool(&[1, 1, 1]);
        let picker = Picker::new(Policy::LeastConnections);
        let ip: IpAddr = [1, 1, 1, 1].into();
        // Hold leases: each new pick goes where the fewest are open, so they spread evenly.
        let leases: Vec<_> = (0..30)
            .map(|_| picker.pick(&p, ip, None).unwrap())
            .collect();
        for ep in p.snapshot().list() {
            assert!(
                (7..=13).contains(&ep.state.in_flight()),
                "{}",
                ep.state.in_flight()
            );
        }
        drop(leases);
        // A busy endpoint is avoided by two-choice whenever it is compared.
        let busy: Vec<_> = (0..50)
            .map(|_| crate::balancer::Lease::new(&p.snapshot().list()[0]))
            .collect();
        let c = counts(Policy::LeastConnections, &p, 300, |_| ip);
        assert_eq!(c[0], 0, "{c:?}");
        drop(busy);
    }

    #[test]
    fn ip_hash_is_sticky_and_mostly_stable_under_change() {
        let p = pool(&[1, 1, 1, 1]);
        let picker = Picker::new(Policy::IpHash);
        let clients: Vec<IpAddr> = (0..2000u32)
            .map(|i| IpAddr::from((0x0a00_0000 + i).to_be_bytes()))
            .collect();
        let before: Vec<u16> = clients
            .iter()
            .map(|c| picker.pick(&p, *c, None).unwrap().endpoint().source.port)
            .collect();
        // Sticky.
        for (c, b) in clients.iter().zip(&before) {
            assert_eq!(
                picker.pick(&p, *c, None).unwrap().endpoint().source.port,
                *b
            );
        }
        // Spread: each of 4 endpoints gets 500 +- 100.
        for port in 8000..8004 {
            let n = before.iter().filter(|x| **x == port).count();
            assert!((400..=600).contains(&n), "port {port}: {n}");
        }
        // Add a fifth endpoint: only clients that move to it move (about 1/5), nobody else.
        let mut eps: Vec<Discovered> = (0..5)
            .map(|i| Discovered::new("10.0.0.1", 8000 + i, 1))
            .collect();
        p.replace(eps.clone());
        let mut moved = 0;
        for (c, b) in clients.iter().zip(&before) {
            let now = picker.pick(&p, *c, None).unwrap().endpoint().source.port;
            if now != *b {
                assert_eq!(now, 8004);
                moved += 1;
            }
        }
        assert!((250..=550).contains(&moved), "moved {moved}");
        // Remove one: only its clients move.
        eps.remove(1);
        p.replace(eps);
        let lost = before.iter().filter(|b| **b == 8001).count();
        let mut moved = 0;
        for (c, b) in clients.iter().zip(&before) {
            let now = picker.pick(&p, *c, None).unwrap().endpoint().source.port;
            if now != *b && *b != 8001 && now != 8004 {
                moved += 1;
            }
        }
        assert_eq!(
            moved, 0,
            "{lost} lost their endpoint; nobody else should move"
        );
    }

    #[test]
    fn avoid_picks_another_endpoint_when_one_exists() {
        let p = pool(&[1, 1]);
        for policy in [
            Policy::RoundRobin,
            Policy::WeightedRoundRobin,
            Policy::Random,
            Policy::LeastConnections,
            Policy::IpHash,
        ] {
            let picker = Picker::new(policy);
            for _ in 0..20 {
                let first = picker.pick(&p, [9, 9, 9, 9].into(), None).unwrap();
                let second = picker
                    .pick(&p, [9, 9, 9, 9].into(), Some(first.endpoint()))
                    .unwrap();
                assert_ne!(
                    first.endpoint().source.port,
                    second.endpoint().source.port,
                    "{policy:?}"
                );
            }
        }
        // Only one endpoint: reuse it.
        let p = pool(&[1]);
        let picker = Picker::new(Policy::RoundRobin);
        let first = picker.pick(&p, [9, 9, 9, 9].into(), None).unwrap();
        assert!(picker
            .pick(&p, [9, 9, 9, 9].into(), Some(first.endpoint()))
            .is_some());
    }

    #[test]
    fn names_round_trip() {
        for name in Policy::NAMES {
            assert_eq!(Policy::from_name(name).unwrap().name(), *name);
        }
        assert!(Policy::from_name("round-robbin").is_none());
    }
}
