//! In-process GCRA buckets: sharded maps from key hash to theoretical arrival time, with a cap
//! on keys so a flood of new keys cannot grow memory.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use super::decision::{Decision, Via};

/// Nanoseconds since the first call in this process, on tokio's clock (paused-time tests).
pub fn now_ns() -> u64 {
    static BASE: OnceLock<tokio::time::Instant> = OnceLock::new();
    BASE.get_or_init(tokio::time::Instant::now)
        .elapsed()
        .as_nanos() as u64
}

const SHARDS: usize = 64;

/// The keys are already SipHash outputs (keyed per limiter): hashing them again is waste.
#[derive(Default)]
struct Prehashed(u64);

impl Hasher for Prehashed {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 << 8) | u64::from(*b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

type Map = HashMap<u64, u64, BuildHasherDefault<Prehashed>>;

/// Buckets of one limiter. A key's state is one number, its theoretical arrival time (TAT):
/// a request at `now` is admitted when `max(tat, now) + interval - now <= burst * interval`.
pub struct Buckets {
    shards: Box<[Mutex<Map>]>,
    per_shard: usize,
    interval: u64,
    burst: u64,
}

impl Buckets {
    /// Buckets admitting one request per `interval` ns with `burst` at once, holding at most
    /// `max_keys` keys (rounded up to a multiple of the shard count).
    pub fn new(interval: u64, burst: u64, max_keys: usize) -> Self {
        let per_shard = max_keys.div_ceil(SHARDS).max(1);
        Self {
            shards: (0..SHARDS).map(|_| Mutex::new(Map::default())).collect(),
            per_shard,
            interval: interval.max(1),
            burst: burst.max(1),
        }
    }

    /// Keys held now.
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|p| p.into_inner()).len())
            .sum()
    }

    /// True when no key is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The most keys held.
    pub fn capacity(&self) -> usize {
        self.per_shard * SHARDS
    }

    /// The shard of `key`, picked by middle bits: the map places entries by the low bits and
    /// tags them with the top seven, which must stay varied within a shard.
    fn shard(&self, key: u64) -> &Mutex<Map> {
        &self.shards[(key >> 32) as usize % SHARDS]
    }

    /// What `check` would decide, without charging anything.
    pub fn peek(&self, key: u64, now: u64) -> Decision {
        let limit = self.interval.saturating_mul(self.burst);
        let shard = self.shard(key);
        let tat = {
            let map = shard.lock().unwrap_or_else(|p| p.into_inner());
            map.get(&key).copied().unwrap_or(now).max(now)
        };
        let ahead = tat.saturating_add(self.interval) - now;
        Decision {
            allowed: ahead <= limit,
            remaining: limit.saturating_sub(ahead) / self.interval,
            reset: Duration::from_nanos(tat - now),
            retry_after: Duration::from_nanos(ahead.saturating_sub(limit)),
            via: Via::Local,
        }
    }

    /// Charges one request to `key` at `now` (ns) if its bucket admits it.
    pub fn check(&self, key: u64, now: u64) -> Decision {
        let limit = self.interval.saturating_mul(self.burst);
        let shard = self.shard(key);
        let mut map = shard.lock().unwrap_or_else(|p| p.into_inner());
        let tat = map.get(&key).copied().unwrap_or(now).max(now);
        let new_tat = tat.saturating_add(self.interval);
        let ahead = new_tat - now;
        if ahead > limit {
            return Decision {
                allowed: false,
                remaining: 0,
                reset: Duration::from_nanos(tat - now),
                retry_after: Duration::from_nanos(ahead - limit),
                via: Via::Local,
            };
        }
        if map.len() >= self.per_shard && !map.contains_key(&key) {
            make_room(&mut map, now, self.per_shard);
        }
        map.insert(key, new_tat);
        Decision {
            allowed: true,
            remaining: (limit - ahead) / self.interval,
            reset: Duration::from_nanos(ahead),
            retry_after: Duration::ZERO,
            via: Via::Local,
        }
    }
}

/// Frees slots in a full shard: keys whose bucket has refilled (TAT in the past) are the same
/// as absent keys and go first; when every key is still draining, the eighth of them closest
/// to full go (they lose the least: at most their remaining drain time). Linear in the shard's
/// size, and then the shard has room for an eighth more keys: a flood of new keys pays for it
/// once per `cap / 8` keys, not on every one.
fn make_room(map: &mut Map, now: u64, cap: usize) {
    map.retain(|_, tat| *tat > now);
    if map.len() < cap {
        return;
    }
    let mut tats: Vec<u64> = map.values().copied().collect();
    let n = (tats.len() / 8).max(1);
    let (_, &mut cut, _) = tats.select_nth_unstable(n - 1);
    let mut evict = n;
    map.retain(|_, tat| {
        let go = evict > 0 && *tat <= cut;
        evict -= usize::from(go);
        !go
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: u64 = 1_000_000_000;

    #[test]
    fn burst_then_steady_rate() {
        // 3 per minute, burst 3.
        let b = Buckets::new(20 * SEC, 3, 100);
        let allowed = (0..10).filter(|_| b.check(7, 1000).allowed).count();
        assert_eq!(allowed, 3);
        let d = b.check(7, 1000);
        assert!(!d.allowed);
        assert_eq!(d.retry_after, Duration::from_secs(20));
        // One interval later exactly one more.
        assert!(b.check(7, 1000 + 20 * SEC).allowed);
        assert!(!b.check(7, 1000 + 20 * SEC).allowed);
        // Other keys are independent.
        assert!(b.check(8, 1000).allowed);
    }

    #[test]
    fn remaining_counts_down() {
        let b = Buckets::new(SEC, 5, 100);
        let r: Vec<u64> = (0..5).map(|_| b.check(1, 0).remaining).collect();
        assert_eq!(r, [4, 3, 2, 1, 0]);
    }

    #[test]
    fn a_full_shard_evicts_the_keys_closest_to_full_in_batches() {
        let mut map = Map::default();
        for k in 0..80u64 {
            map.insert(k, 1_000 + k);
        }
        make_room(&mut map, 0, 80);
        // An eighth went, and they were the ones with the earliest TAT.
        assert_eq!(map.len(), 70);
        assert!((0..10).all(|k| !map.contains_key(&k)));
        assert!((10..80).all(|k| map.contains_key(&k)));
        // Refilled buckets go first, however many.
        make_room(&mut map, 1_040, 80);
        assert_eq!(map.len(), 39);
    }

    #[test]
    fn key_rotation_stays_under_the_cap() {
        let b = Buckets::new(SEC, 10, 1000);
        for k in 0..200_000u64 {
            b.check(k.wrapping_mul(0x9E37_79B9_7F4A_7C15), 5);
        }
        assert!(b.len() <= b.capacity(), "{} > {}", b.len(), b.capacity());
        assert!(b.capacity() < 1100);
    }
}
