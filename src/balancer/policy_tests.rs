//! The balancing policies against real pools: spread, weights, stickiness, avoidance.

use super::hash::{smooth_wrr_sequence, MAX_WRR_CYCLE};
use super::policy::*;
use super::*;
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
