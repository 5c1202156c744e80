//! Hashing and weighted sequences for the balancers: stable hashes of addresses and keys, and
//! nginx's smooth weighted round robin unrolled into one cycle.

use std::net::IpAddr;

/// A client address as a hash key (`ip_hash`).
pub fn hash_ip(ip: IpAddr) -> u64 {
    match ip {
        IpAddr::V4(v4) => hash_bytes(&v4.octets()),
        IpAddr::V6(v6) => hash_bytes(&v6.octets()),
    }
}

/// FNV-1a then a 64-bit finaliser: fast, stable across runs and platforms.
pub fn hash_bytes(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    mix64(h)
}

/// A 64-bit finaliser (splitmix64's), so nearby keys spread.
pub fn mix64(mut x: u64) -> u64 {
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x = x.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    x ^ (x >> 33)
}

/// Longest smooth weighted round-robin cycle we precompute; larger weight sums are scaled down.
pub const MAX_WRR_CYCLE: u64 = 4096;

/// nginx's smooth weighted round robin, unrolled into one full cycle of endpoint indices.
///
/// Weights are divided by their gcd first; a cycle longer than `MAX_WRR_CYCLE` is scaled down
/// proportionally (every positive weight keeps at least one slot). Zero weights get no slot.
pub fn smooth_wrr_sequence(weights: &[u32]) -> Vec<u32> {
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
