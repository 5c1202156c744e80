//! The response cache: one in-memory store per cached route, bounded in bytes, holding GET
//! answers under a configurable key with their `Vary` variants, plus request coalescing.

pub mod rules;
mod settings;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use bytes::Bytes;
use http::header::{HeaderMap, HeaderName, HeaderValue, CONTENT_LENGTH};
use http::{Method, StatusCode};
use tokio::sync::watch;

pub use rules::Freshness;
pub use settings::{CacheSettings, KeyPart};

/// Stored variants of one key (different `Vary` values); older ones are dropped past this.
const MAX_VARIANTS: usize = 16;

/// A stored answer.
#[derive(Debug)]
pub struct Entry {
    /// Its status.
    pub status: StatusCode,
    /// Its headers (hop-by-hop removed, the route's response header rules applied).
    pub headers: HeaderMap,
    /// Its whole body.
    pub body: Bytes,
    /// The request's normalised values of the headers its `Vary` names.
    pub vary: Vec<(HeaderName, Option<String>)>,
    /// Its freshness, worked out when it was stored.
    pub fresh: Freshness,
    /// When it was stored.
    pub stored: Instant,
}

impl Entry {
    /// Its current age.
    pub fn age(&self, now: Instant) -> Duration {
        self.fresh
            .initial_age
            .saturating_add(now.saturating_duration_since(self.stored))
    }

    /// How long past its lifetime it is (zero while fresh).
    pub fn staleness(&self, now: Instant) -> Duration {
        self.age(now).saturating_sub(self.fresh.lifetime)
    }

    /// Fresh: usable without asking the upstream.
    pub fn is_fresh(&self, now: Instant) -> bool {
        self.age(now) < self.fresh.lifetime
    }

    /// Within `stale_while_revalidate`.
    pub fn serves_while_revalidating(&self, now: Instant) -> bool {
        !self.fresh.no_stale && self.staleness(now) <= self.fresh.stale_while_revalidate
    }

    /// Within `stale_if_error`.
    pub fn serves_on_error(&self, now: Instant) -> bool {
        !self.fresh.no_stale && self.staleness(now) <= self.fresh.stale_if_error
    }

    /// A declared `Content-Length` that disagrees with the body: never served.
    pub fn is_consistent(&self) -> bool {
        let mut lengths = self.headers.get_all(CONTENT_LENGTH).iter();
        match (lengths.next(), lengths.next()) {
            (None, _) => true,
            (Some(v), None) => v
                .to_str()
                .ok()
                .and_then(|v| v.trim().parse::<u64>().ok())
                .is_some_and(|n| n == self.body.len() as u64),
            (Some(_), Some(_)) => false,
        }
    }

    /// Whether it was stored for a request with these headers (`Vary`).
    fn matches(&self, req: &HeaderMap) -> bool {
        self.vary
            .iter()
            .all(|(name, value)| rules::normalise(name, req) == *value)
    }

    /// Bytes it costs in the store.
    fn weight(&self) -> usize {
        let headers: usize = self
            .headers
            .iter()
            .map(|(k, v)| k.as_str().len() + v.len() + 32)
            .sum();
        let vary: usize = self
            .vary
            .iter()
            .map(|(k, v)| k.as_str().len() + v.as_ref().map_or(0, String::len) + 32)
            .sum();
        self.body.len() + headers + vary + 256
    }
}

/// The variants stored under one key.
#[derive(Debug)]
struct Resource {
    /// The request path, for purges by prefix.
    path: Box<str>,
    variants: Vec<Arc<Entry>>,
}

/// Counters for `/metrics`, `/status` and the dashboard.
#[derive(Debug, Default)]
pub struct CacheCounters {
    /// Answered from the store while fresh (or after a 304 revalidation).
    pub hits: AtomicU64,
    /// Sent upstream: nothing usable was stored.
    pub misses: AtomicU64,
    /// Answered stale (`stale_while_revalidate`, `stale_if_error`).
    pub stale: AtomicU64,
    /// Not looked up (method, `Range`, `no-store` request, upgrade).
    pub bypass: AtomicU64,
    /// Stale answers refreshed by a 304.
    pub revalidated: AtomicU64,
    /// Answers stored.
    pub stored: AtomicU64,
    /// Stored entries removed by unsafe requests and purges.
    pub invalidated: AtomicU64,
}

/// A route's store.
pub struct Cache {
    settings: CacheSettings,
    store: moka::sync::Cache<String, Arc<Resource>>,
    flights: Mutex<HashMap<String, watch::Receiver<()>>>,
    /// What the cache did.
    pub counters: CacheCounters,
}

impl std::fmt::Debug for Cache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cache")
            .field("settings", &self.settings)
            .finish()
    }
}

/// The outcome of joining the requests in flight for a key.
pub enum Join {
    /// This request goes upstream; the others wait until the guard is dropped.
    Leader(FlightGuard),
    /// Another request is upstream for this key; wait for it (`wait`).
    Follower(watch::Receiver<()>),
}

/// Held by the one request sent upstream for a key; dropping it wakes the waiters.
pub struct FlightGuard {
    cache: Arc<Cache>,
    key: String,
    tx: watch::Sender<()>,
}

impl Drop for FlightGuard {
    fn drop(&mut self) {
        let mut flights = self.cache.flights.lock().unwrap_or_else(|p| p.into_inner());
        if flights
            .get(&self.key)
            .is_some_and(|rx| rx.same_channel(&self.tx.subscribe()))
        {
            flights.remove(&self.key);
        }
        // The sender drops after this: every waiter's `changed()` returns.
    }
}

impl Cache {
    /// An empty store.
    pub fn new(settings: CacheSettings) -> Arc<Self> {
        let store = moka::sync::Cache::builder()
            .max_capacity(settings.max_size)
            .weigher(|k: &String, r: &Arc<Resource>| {
                let w = k.len() + r.variants.iter().map(|e| e.weight()).sum::<usize>();
                u32::try_from(w).unwrap_or(u32::MAX)
            })
            .build();
        Arc::new(Self {
            settings,
            store,
            flights: Mutex::default(),
            counters: CacheCounters::default(),
        })
    }

    /// The settings it was made with.
    pub fn settings(&self) -> &CacheSettings {
        &self.settings
    }

    /// The key for a request. HEAD shares GET's key: a HEAD is answered from a stored GET.
    pub fn key(
        &self,
        method: &Method,
        host: Option<&HeaderValue>,
        path: &str,
        query: Option<&str>,
        headers: &HeaderMap,
    ) -> String {
        let mut key = String::with_capacity(path.len() + 64);
        for part in &self.settings.key {
            match part {
                KeyPart::Method if *method == Method::HEAD => key.push_str("GET"),
                KeyPart::Method => key.push_str(method.as_str()),
                KeyPart::Host => {
                    let host = host.map(|h| String::from_utf8_lossy(h.as_bytes()));
                    key.push_str(&host.unwrap_or_default().to_ascii_lowercase());
                }
                KeyPart::Path => key.push_str(path),
                KeyPart::Query => {
                    if let Some(q) = query {
                        key.push('?');
                        key.push_str(q);
                    }
                }
                KeyPart::Header(name) => {
                    if let Some(v) = rules::normalise(name, headers) {
                        key.push_str(&v);
                    }
                }
            }
            // Header values cannot hold a newline, so parts cannot run into each other.
            key.push('\n');
        }
        key
    }

    /// The stored answer for `key` whose `Vary` values match the request. With `authorized`,
    /// only answers that allow it. (Entries are consistent: [`Cache::insert`] checks.)
    pub fn lookup(&self, key: &str, req: &HeaderMap, authorized: bool) -> Option<Arc<Entry>> {
        let resource = self.store.get(key)?;
        let entry = resource.variants.iter().find(|e| e.matches(req))?.clone();
        if authorized && !entry.fresh.shareable_with_auth {
            return None;
        }
        Some(entry)
    }

    /// Stores `entry` under `key`, replacing the variant with the same `Vary` values. Entries
    /// whose length disagrees with their body are refused.
    pub fn insert(&self, key: &str, path: &str, entry: Arc<Entry>) -> bool {
        if !entry.is_consistent() || entry.body.len() as u64 > self.settings.max_object_size {
            return false;
        }
        self.store.entry(key.to_owned()).and_upsert_with(|old| {
            let mut variants: Vec<Arc<Entry>> = old
                .map(|r| r.into_value().variants.clone())
                .unwrap_or_default();
            variants.retain(|e| e.vary != entry.vary);
            if variants.len() >= MAX_VARIANTS {
                variants.remove(0);
            }
            variants.push(entry.clone());
            Arc::new(Resource {
                path: path.into(),
                variants,
            })
        });
        self.counters.stored.fetch_add(1, Ordering::Relaxed);
        true
    }

    /// Removes one stored variant (when it is still the one stored).
    pub fn remove(&self, key: &str, entry: &Arc<Entry>) {
        self.store.entry(key.to_owned()).and_compute_with(|old| {
            use moka::ops::compute::Op;
            let Some(old) = old else { return Op::Nop };
            let r = old.into_value();
            let variants: Vec<Arc<Entry>> = r
                .variants
                .iter()
                .filter(|e| !Arc::ptr_eq(e, entry))
                .cloned()
                .collect();
            if variants.is_empty() {
                Op::Remove
            } else {
                Op::Put(Arc::new(Resource {
                    path: r.path.clone(),
                    variants,
                }))
            }
        });
    }

    /// Removes every variant stored under `key`; returns how many.
    pub fn invalidate(&self, key: &str) -> usize {
        let n = self.store.remove(key).map_or(0, |r| r.variants.len());
        self.counters
            .invalidated
            .fetch_add(n as u64, Ordering::Relaxed);
        n
    }

    /// Removes the entries whose request path starts with `prefix` (all with `None`); returns
    /// how many.
    pub fn purge(&self, prefix: Option<&str>) -> usize {
        let keys: Vec<Arc<String>> = self
            .store
            .iter()
            .filter(|(_, r)| prefix.is_none_or(|p| r.path.starts_with(p)))
            .map(|(k, _)| k)
            .collect();
        let n = keys.iter().map(|k| self.invalidate(k)).sum();
        self.store.run_pending_tasks();
        n
    }

    /// Joins the requests in flight for `key`: the first goes upstream, the others wait.
    pub fn join(self: &Arc<Self>, key: &str) -> Join {
        let mut flights = self.flights.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(rx) = flights.get(key) {
            if rx.has_changed().is_ok() {
                return Join::Follower(rx.clone());
            }
        }
        let (tx, rx) = watch::channel(());
        flights.insert(key.to_owned(), rx);
        Join::Leader(FlightGuard {
            cache: self.clone(),
            key: key.to_owned(),
            tx,
        })
    }

    /// Entries stored now (variants of every key).
    pub fn entries(&self) -> u64 {
        self.store
            .iter()
            .map(|(_, r)| r.variants.len() as u64)
            .sum()
    }

    /// Bytes held now, as weighed.
    pub fn bytes(&self) -> u64 {
        self.store.run_pending_tasks();
        self.store.weighted_size()
    }

    /// A read-only look for `/explain`: the stored answer a plain GET for `key` would get.
    pub fn peek(&self, key: &str) -> Option<Arc<Entry>> {
        let resource = self.store.get(key)?;
        resource.variants.last().cloned()
    }
}

/// Waits until the request in flight for a key is done, or `timeout` passes; `true` when it is
/// done.
pub async fn wait(mut rx: watch::Receiver<()>, until: tokio::time::Instant) -> bool {
    // The sender is never used to send: `changed()` returns when the guard drops it.
    tokio::time::timeout_at(until, rx.changed()).await.is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(body: &'static [u8], len: &str) -> Arc<Entry> {
        let mut headers = HeaderMap::new();
        headers.insert(CONTENT_LENGTH, HeaderValue::from_str(len).unwrap());
        Arc::new(Entry {
            status: StatusCode::OK,
            headers,
            body: Bytes::from_static(body),
            vary: Vec::new(),
            fresh: Freshness {
                initial_age: Duration::ZERO,
                lifetime: Duration::from_secs(60),
                stale_while_revalidate: Duration::ZERO,
                stale_if_error: Duration::ZERO,
                no_stale: false,
                shareable_with_auth: false,
            },
            stored: Instant::now(),
        })
    }

    #[test]
    fn length_mismatch_is_never_stored() {
        let c = Cache::new(CacheSettings::default());
        assert!(!c.insert("k", "/", entry(b"hello", "6")));
        assert!(c.lookup("k", &HeaderMap::new(), false).is_none());
        assert!(c.insert("k", "/", entry(b"hello", "5")));
        assert!(c.lookup("k", &HeaderMap::new(), false).is_some());
    }

    #[test]
    fn purge_by_prefix_counts() {
        let c = Cache::new(CacheSettings::default());
        c.insert("a", "/a/1", entry(b"x", "1"));
        c.insert("b", "/a/2", entry(b"x", "1"));
        c.insert("c", "/b", entry(b"x", "1"));
        assert_eq!(c.purge(Some("/a")), 2);
        assert_eq!(c.purge(None), 1);
        assert_eq!(c.entries(), 0);
    }

    #[tokio::test]
    async fn one_leader_per_key() {
        let c = Cache::new(CacheSettings::default());
        let Join::Leader(g) = c.join("k") else {
            panic!("first is leader")
        };
        let Join::Follower(rx) = c.join("k") else {
            panic!("second waits")
        };
        let waiter = tokio::spawn(wait(
            rx,
            tokio::time::Instant::now() + Duration::from_secs(5),
        ));
        drop(g);
        assert!(waiter.await.unwrap());
        assert!(matches!(c.join("k"), Join::Leader(_)));
    }
}
