//! `jwks_url`: the key set fetched over HTTP, cached, refreshed in the background once it is
//! older than the refresh interval and on an unknown `kid`, never more often than the minimum
//! gap. One fetch at a time; requests never take a lock, they wait on the fetch's outcome.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use tokio::sync::watch;
use tokio::time::Instant;

use super::keys::KeySet;

/// Longest wait for a fetch, and its HTTP timeout.
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest JWKS document read.
const MAX_DOC: usize = 1 << 20;
/// Gap between attempts while no key set has ever loaded.
const FIRST_LOAD_GAP: Duration = Duration::from_secs(1);

/// A remote key set and its fetch state. Settings compare by URL and intervals only.
pub struct RemoteJwks {
    url: reqwest::Url,
    refresh: Duration,
    min_gap: Duration,
    client: OnceLock<Option<reqwest::Client>>,
    /// The last good key set and when it was fetched; a bad answer never replaces it.
    current: ArcSwapOption<Loaded>,
    /// Milliseconds since `base` at the start of the last attempt, plus one (0: never).
    last_attempt: AtomicU64,
    base: Instant,
    fetching: AtomicBool,
    /// Bumped after every attempt, good or bad; waiters watch it.
    done: watch::Sender<u64>,
}

struct Loaded {
    keys: Arc<KeySet>,
    at: Instant,
}

impl PartialEq for RemoteJwks {
    fn eq(&self, other: &Self) -> bool {
        self.url == other.url && self.refresh == other.refresh && self.min_gap == other.min_gap
    }
}

/// What the cache can say at once.
pub enum Lookup {
    /// Use these keys (the token's `kid`, if any, is among them, or may not be refetched yet).
    Ready(Arc<KeySet>),
    /// A fetch is due and worth waiting for: nothing loaded yet, or an unknown `kid`.
    Fetch,
    /// No key set has ever loaded and the next attempt is not due yet.
    Unavailable,
}

impl RemoteJwks {
    /// A cache for `url`, refreshed after `refresh`, fetched at most once per `min_gap`.
    pub fn new(url: reqwest::Url, refresh: Duration, min_gap: Duration) -> Self {
        Self {
            url,
            refresh,
            min_gap,
            client: OnceLock::new(),
            current: ArcSwapOption::empty(),
            last_attempt: AtomicU64::new(0),
            base: Instant::now(),
            fetching: AtomicBool::new(false),
            done: watch::channel(0).0,
        }
    }

    /// The JWKS URL.
    pub fn url(&self) -> &reqwest::Url {
        &self.url
    }

    /// Keys loaded now, if any (for `/status`).
    pub fn loaded(&self) -> Option<(usize, Duration)> {
        self.current
            .load()
            .as_ref()
            .map(|l| (l.keys.len(), l.at.elapsed()))
    }

    /// Answers from the cache when it can; starts a background refresh when the set is old.
    pub fn lookup(self: &Arc<Self>, kid: Option<&str>) -> Lookup {
        let cur = self.current.load_full();
        match cur {
            None if self.due(FIRST_LOAD_GAP) || self.fetching.load(Ordering::Acquire) => {
                Lookup::Fetch
            }
            None => Lookup::Unavailable,
            Some(loaded) => {
                let unknown = kid.is_some_and(|k| !loaded.keys.has_kid(k));
                if unknown && self.due(self.min_gap) {
                    return Lookup::Fetch;
                }
                if loaded.at.elapsed() >= self.refresh {
                    self.try_start(self.min_gap);
                }
                Lookup::Ready(loaded.keys.clone())
            }
        }
    }

    /// Fetches (or joins the fetch in flight) and waits for its outcome until `deadline`, then
    /// answers with whatever set is loaded; `None` when none has ever loaded.
    pub async fn fetch_and_wait(self: &Arc<Self>, deadline: Instant) -> Option<Arc<KeySet>> {
        // Subscribed first, so a fetch that ends from here on wakes this request.
        let mut rx = self.done.subscribe();
        let gap = if self.current.load().is_none() {
            FIRST_LOAD_GAP
        } else {
            self.min_gap
        };
        if self.try_start(gap) {
            let until = deadline.min(Instant::now() + FETCH_TIMEOUT);
            let _ = tokio::time::timeout_at(until, rx.changed()).await;
        }
        self.current.load().as_ref().map(|l| l.keys.clone())
    }

    fn due(&self, gap: Duration) -> bool {
        match self.last_attempt.load(Ordering::Acquire) {
            0 => true,
            t => {
                let since = self.base.elapsed().as_millis() as u64 + 1;
                since.saturating_sub(t) >= gap.as_millis() as u64
            }
        }
    }

    /// Starts one fetch when `gap` has passed since the last attempt; true when a fetch is in
    /// flight now (this one or another's). The fetch runs as its own task, so a request that
    /// gives up (or whose client goes away) never cancels it.
    fn try_start(self: &Arc<Self>, gap: Duration) -> bool {
        if self
            .fetching
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            return true;
        }
        if !self.due(gap) {
            self.fetching.store(false, Ordering::Release);
            return false;
        }
        self.last_attempt.store(
            self.base.elapsed().as_millis() as u64 + 1,
            Ordering::Release,
        );
        let this = self.clone();
        tokio::spawn(async move {
            let done = Done(&this);
            this.fetch_once().await;
            drop(done);
        });
        true
    }

    async fn fetch_once(&self) {
        let Some(client) = self.client.get_or_init(|| build_client(&self.url)) else {
            return;
        };
        let body = match get(client, &self.url).await {
            Ok(b) => b,
            Err(why) => {
                tracing::warn!(jwks.url = %crate::error::redact_url(self.url.as_str()), error = %why, kept = self.current.load().is_some(), "JWKS fetch failed; the last good key set stays in use");
                return;
            }
        };
        match KeySet::from_jwks(&body) {
            Ok((keys, skipped)) => {
                if !skipped.is_empty() {
                    tracing::info!(jwks.url = %crate::error::redact_url(self.url.as_str()), skipped = %skipped.join("; "), "JWKS keys skipped");
                }
                tracing::debug!(jwks.url = %crate::error::redact_url(self.url.as_str()), keys = keys.len(), "JWKS loaded");
                self.current.store(Some(Arc::new(Loaded {
                    keys: Arc::new(keys),
                    at: Instant::now(),
                })));
            }
            Err(e) => {
                tracing::warn!(jwks.url = %crate::error::redact_url(self.url.as_str()), error = %e, kept = self.current.load().is_some(), "JWKS answer refused; the last good key set stays in use");
            }
        }
    }
}

/// Ends an attempt even when its task is dropped mid-fetch (runtime shutdown): clears the
/// in-flight flag and wakes the waiters.
struct Done<'a>(&'a RemoteJwks);

impl Drop for Done<'_> {
    fn drop(&mut self) {
        self.0.fetching.store(false, Ordering::Release);
        self.0.done.send_modify(|n| *n += 1);
    }
}

fn build_client(url: &reqwest::Url) -> Option<reqwest::Client> {
    let tls = match crate::tls::client_config(&crate::tls::UpstreamTls::default()) {
        Ok(t) => t,
        Err(e) => {
            tracing::warn!(jwks.url = %crate::error::redact_url(url.as_str()), error = %crate::error::Chain(&e), "JWKS client TLS setup failed");
            return None;
        }
    };
    reqwest::Client::builder()
        .tls_backend_preconfigured(tls)
        .user_agent(concat!("meshgate/", env!("CARGO_PKG_VERSION")))
        .timeout(FETCH_TIMEOUT)
        .no_proxy()
        .build()
        .map_err(|e| tracing::warn!(jwks.url = %crate::error::redact_url(url.as_str()), error = %crate::error::Chain(&e), "JWKS client setup failed"))
        .ok()
}

async fn get(client: &reqwest::Client, url: &reqwest::Url) -> Result<Vec<u8>, String> {
    let mut resp = client
        .get(url.clone())
        .send()
        .await
        // The URL is logged beside the error, with its password hidden: not inside it.
        .map_err(|e| crate::error::Chain(&e.without_url()).to_string())?;
    if !resp.status().is_success() {
        return Err(format!("status {}", resp.status()));
    }
    let mut body = Vec::new();
    while let Some(chunk) = resp
        .chunk()
        .await
        .map_err(|e| crate::error::Chain(&e.without_url()).to_string())?
    {
        if body.len() + chunk.len() > MAX_DOC {
            return Err(format!("document larger than {MAX_DOC} bytes"));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}
