//! The cache stage: answers from the route's store, coalesces concurrent misses, revalidates
//! stale entries upstream, and stores answers through a tee as they stream to the client.

use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};
use std::time::SystemTime;

use bytes::{Bytes, BytesMut};
use http::header::{
    HeaderMap, HeaderValue, AGE, AUTHORIZATION, CONTENT_LENGTH, ETAG, IF_MODIFIED_SINCE,
    IF_NONE_MATCH, LAST_MODIFIED, RANGE,
};
use http::{Method, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use tokio::time::Instant;

use super::body::ResponseBody;
use super::error::ProxyError;
use super::pipeline::{Exchange, Flow, Stage, Step};
use crate::cache::rules::{self, Directives};
use crate::cache::{self as store, Cache, Entry, FlightGuard, Join};
use crate::rules::headers::declared_length;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// `X-Cache` on every answer of a cached route.
pub static X_CACHE: http::HeaderName = http::HeaderName::from_static("x-cache");

/// The route's `cache`.
pub struct CacheStage {
    /// The route's store.
    pub cache: Arc<Cache>,
    /// The route has `auth`: every request it lets through carries an identity (a key in a
    /// custom header, a token in a cookie, forward auth's answer), so only answers the
    /// upstream marked shareable may be stored or served, as for `Authorization`.
    pub authenticated: bool,
}

/// What the request phase decided, for the response phase (kept in the request's extensions:
/// forwarding may take the request headers).
#[derive(Clone)]
struct Pending(Arc<PendingKind>);

enum PendingKind {
    /// An unsafe method: a success removes the URL's stored answers (GET's key).
    Invalidate(String),
    /// Looked up and sent upstream.
    Miss(Miss),
}

struct Miss {
    key: String,
    /// The request path, kept with the entry for purges by prefix.
    path: String,
    /// The client's request headers as they arrived (forwarding changes and may take them).
    request: HeaderMap,
    request_time: SystemTime,
    head: bool,
    /// The stored answer, stale: revalidated upstream, or served when the upstream fails.
    stale: Option<Arc<Entry>>,
    /// Validators were sent for `stale`, so a 304 refreshes it.
    revalidating: bool,
    /// The request carried an identity: only answers marked shareable are stored.
    authorized: bool,
    /// A refresh in the background: the client already has the stale copy.
    background: bool,
    /// Held by the one request sent upstream for its key.
    flight: Mutex<Option<FlightGuard>>,
}

impl Stage for CacheStage {
    fn name(&self) -> &'static str {
        "cache"
    }

    fn on_request<'a>(&'a self, ex: &'a mut Exchange<'_>) -> Step<'a> {
        let method = ex.head.method.clone();
        // A request not looked up carries no `Pending`: the response phase reads that as
        // BYPASS, so bypassing costs no allocation.
        if method != Method::GET && method != Method::HEAD {
            if is_unsafe(&method) {
                // RFC 9111 4.4: a successful unsafe request invalidates the URL's stored
                // answers, which are only ever stored under GET's key.
                let get = self.key(ex, &Method::GET);
                ex.head
                    .extensions
                    .insert(Pending(Arc::new(PendingKind::Invalidate(get))));
            }
            return Step::Next;
        }
        let req_cc = Directives::parse(&ex.head.headers);
        if ex.upgrade.is_some() || ex.head.headers.contains_key(RANGE) || req_cc.has("no-store") {
            return Step::Next;
        }
        let head = method == Method::HEAD;
        let key = self.key(ex, &method);
        let authorized = self.authenticated || ex.head.headers.contains_key(AUTHORIZATION);
        let must_ask = rules::request_wants_revalidation(&ex.head.headers, &req_cc);
        let max_age = req_cc.seconds("max-age");
        let now = Instant::now();
        let stored = self.cache.lookup(&key, &ex.head.headers, authorized);
        if let Some(entry) = &stored {
            let fresh = entry.is_fresh(now)
                && !must_ask
                && max_age.is_none_or(|m| entry.age(now).as_secs() <= m);
            if fresh {
                self.count(|c| &c.hits);
                return Step::Answer(answer(entry, "HIT", head, &ex.head.headers, now));
            }
            if !must_ask && entry.serves_while_revalidating(now) {
                self.count(|c| &c.stale);
                let resp = answer(entry, "STALE", head, &ex.head.headers, now);
                if head {
                    // A HEAD cannot refresh a body; the next GET will.
                    return Step::Answer(resp);
                }
                // The first stale request refreshes it in the background; the others, and this
                // one, get the stale copy without waiting (RFC 5861 section 3).
                return match self.cache.join(&key) {
                    Join::Leader(guard) => {
                        let entry = entry.clone();
                        self.go_upstream(ex, key, Some(entry), Some(guard), true);
                        Step::Detach(resp)
                    }
                    Join::Follower(_) => Step::Answer(resp),
                };
            }
        }
        if head {
            self.go_upstream(ex, key, stored, None, false);
            return Step::Next;
        }
        match self.cache.join(&key) {
            Join::Leader(guard) => {
                self.go_upstream(ex, key, stored, Some(guard), false);
                Step::Next
            }
            Join::Follower(rx) => {
                let until = ex
                    .deadline
                    .min(tokio::time::Instant::now() + self.cache.settings().lock_timeout);
                Step::Wait(Box::pin(async move {
                    store::wait(rx, until).await;
                    let now = Instant::now();
                    let stored = self.cache.lookup(&key, &ex.head.headers, authorized);
                    if let Some(entry) = stored.as_ref().filter(|e| e.is_fresh(now)) {
                        self.count(|c| &c.hits);
                        return Ok(Flow::Answer(answer(
                            entry,
                            "HIT",
                            false,
                            &ex.head.headers,
                            now,
                        )));
                    }
                    // Nothing stored for it (not cacheable, too large, timed out): its own way.
                    self.go_upstream(ex, key, stored, None, false);
                    Ok(Flow::Next)
                }))
            }
        }
    }

    fn on_response(&self, ex: &Exchange<'_>, resp: &mut Response<ResponseBody>) {
        let Some(Pending(pending)) = ex.head.extensions.get::<Pending>() else {
            self.count(|c| &c.bypass);
            mark(resp, "BYPASS");
            return;
        };
        let miss = match &**pending {
            PendingKind::Invalidate(key) => {
                let status = resp.status();
                if status.is_success() || status.is_redirection() {
                    self.cache.invalidate(key);
                }
                self.count(|c| &c.bypass);
                mark(resp, "BYPASS");
                return;
            }
            PendingKind::Miss(miss) => miss,
        };
        let now = Instant::now();
        let status = resp.status();
        if let (StatusCode::NOT_MODIFIED, Some(entry), true) =
            (status, &miss.stale, miss.revalidating)
        {
            let refreshed = self.refresh(miss, entry, resp.headers());
            self.count(|c| &c.revalidated);
            if miss.background {
                return;
            }
            self.count(|c| &c.hits);
            *resp = answer(&refreshed, "HIT", miss.head, &miss.request, now);
            return;
        }
        if status.is_server_error() {
            if miss.background {
                // The stale copy stays: the client has it, and the next request tries again.
                return;
            }
            if let Some(entry) = miss.stale.as_ref().filter(|e| e.serves_on_error(now)) {
                self.count(|c| &c.stale);
                *resp = answer(entry, "STALE", miss.head, &miss.request, now);
                return;
            }
        }
        if !miss.background {
            self.count(|c| &c.misses);
        }
        if !miss.head && status != StatusCode::NOT_MODIFIED {
            self.store(miss, resp);
        }
        mark(resp, "MISS");
    }

    fn on_error(&self, ex: &Exchange<'_>, _e: &ProxyError) -> Option<Response<ResponseBody>> {
        let Pending(pending) = ex.head.extensions.get::<Pending>()?;
        let PendingKind::Miss(miss) = &**pending else {
            return None;
        };
        let now = Instant::now();
        let entry = miss.stale.as_ref().filter(|e| e.serves_on_error(now))?;
        self.count(|c| &c.stale);
        Some(answer(entry, "STALE", miss.head, &miss.request, now))
    }
}

impl CacheStage {
    fn key(&self, ex: &Exchange<'_>, method: &Method) -> String {
        self.cache.key(
            method,
            ex.host.as_ref(),
            ex.path,
            ex.head.uri.query(),
            &ex.head.headers,
        )
    }

    fn count(&self, which: impl Fn(&store::CacheCounters) -> &std::sync::atomic::AtomicU64) {
        which(&self.cache.counters).fetch_add(1, Ordering::Relaxed);
    }

    /// Sends the request upstream: with the stored answer's validators when there is one, so
    /// that a 304 can refresh it. A `background` refresh never carries the client's validators.
    fn go_upstream(
        &self,
        ex: &mut Exchange<'_>,
        key: String,
        stale: Option<Arc<Entry>>,
        flight: Option<FlightGuard>,
        background: bool,
    ) {
        let request = ex.head.headers.clone();
        if background {
            // A 304 for the client's copy would refresh nothing of ours.
            ex.head.headers.remove(IF_NONE_MATCH);
            ex.head.headers.remove(IF_MODIFIED_SINCE);
        }
        let mut revalidating = false;
        if let Some(entry) = &stale {
            let etag = entry.headers.get(ETAG).cloned();
            let modified = entry.headers.get(LAST_MODIFIED).cloned();
            if etag.is_some() || modified.is_some() {
                // The client's own validators are for its copy, not ours: ours go instead, and
                // the client's are answered from the refreshed entry.
                let h = &mut ex.head.headers;
                h.remove(IF_NONE_MATCH);
                h.remove(IF_MODIFIED_SINCE);
                if let Some(v) = etag {
                    h.insert(IF_NONE_MATCH, v);
                }
                if let Some(v) = modified {
                    h.insert(IF_MODIFIED_SINCE, v);
                }
                revalidating = true;
            }
        }
        let authorized = self.authenticated || request.contains_key(AUTHORIZATION);
        let miss = Miss {
            key,
            path: ex.path.to_owned(),
            request,
            request_time: SystemTime::now(),
            head: ex.head.method == Method::HEAD,
            stale,
            revalidating,
            authorized,
            background,
            flight: Mutex::new(flight),
        };
        ex.head
            .extensions
            .insert(Pending(Arc::new(PendingKind::Miss(miss))));
    }

    /// A 304 for a stored answer: its headers updated, its freshness started again.
    fn refresh(&self, miss: &Miss, entry: &Arc<Entry>, update: &HeaderMap) -> Arc<Entry> {
        let mut headers = entry.headers.clone();
        // Age and Date belong to a message: the 304's (or none) count from now on.
        headers.remove(AGE);
        headers.remove(http::header::DATE);
        for name in update.keys() {
            if rules::keeps_stored(name) {
                continue;
            }
            headers.remove(name);
            for v in update.get_all(name) {
                headers.append(name.clone(), v.clone());
            }
        }
        let settings = self.cache.settings();
        let now = SystemTime::now();
        let fresh = rules::storable(
            settings,
            &miss.request,
            miss.authorized,
            entry.status,
            &headers,
            miss.request_time,
            now,
        );
        let refreshed = Arc::new(Entry {
            status: entry.status,
            headers,
            body: entry.body.clone(),
            vary: entry.vary.clone(),
            fresh: fresh.clone().unwrap_or_else(|_| entry.fresh.clone()),
            stored: Instant::now(),
        });
        match fresh {
            Ok(_) => {
                self.cache.insert(&miss.key, &miss.path, refreshed.clone());
            }
            Err(_) => self.cache.remove(&miss.key, entry),
        }
        refreshed
    }

    /// Stores the upstream's answer as it streams, when the rules allow it.
    fn store(&self, miss: &Miss, resp: &mut Response<ResponseBody>) {
        let settings = self.cache.settings();
        let fresh = match rules::storable(
            settings,
            &miss.request,
            miss.authorized,
            resp.status(),
            resp.headers(),
            miss.request_time,
            SystemTime::now(),
        ) {
            Ok(f) => f,
            Err(why) => {
                tracing::debug!(reason = why, "answer not cached");
                return;
            }
        };
        let declared = declared_length(resp.headers());
        if declared.is_some_and(|n| n > settings.max_object_size) {
            return;
        }
        let mut headers = resp.headers().clone();
        headers.remove(&X_CACHE);
        let entry = Entry {
            status: resp.status(),
            vary: rules::vary_values(&headers, &miss.request),
            headers,
            body: Bytes::new(),
            fresh,
            stored: Instant::now(),
        };
        let flight = miss.flight.lock().unwrap_or_else(|p| p.into_inner()).take();
        let body = std::mem::replace(resp.body_mut(), ResponseBody::empty());
        *resp.body_mut() = ResponseBody::wrapped(Tee {
            inner: body,
            // Sized by the declared length up to 64 KiB: an upstream's claim alone does not
            // reserve memory.
            buf: BytesMut::with_capacity(declared.unwrap_or(0).min(64 << 10) as usize),
            limit: settings.max_object_size,
            fill: Some(Fill {
                cache: self.cache.clone(),
                key: miss.key.clone(),
                path: miss.path.clone(),
                entry,
                _flight: flight,
            }),
        });
    }
}

fn is_unsafe(m: &Method) -> bool {
    !matches!(
        *m,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::CONNECT
    )
}

fn mark(resp: &mut Response<ResponseBody>, value: &'static str) {
    resp.headers_mut()
        .insert(X_CACHE.clone(), HeaderValue::from_static(value));
}

/// The stored answer for a request: a 304 when the client's validators match, else the whole
/// answer (no body for HEAD), with its current `Age` and `X-Cache`.
fn answer(
    entry: &Entry,
    x_cache: &'static str,
    head: bool,
    req: &HeaderMap,
    now: Instant,
) -> Response<ResponseBody> {
    // Preconditions apply to 2xx answers only (RFC 9110 13.2.1): a stored 404 stays a 404.
    let mut resp = if entry.status.is_success() && rules::not_modified(req, &entry.headers) {
        let mut resp = Response::new(ResponseBody::empty());
        *resp.status_mut() = StatusCode::NOT_MODIFIED;
        for name in rules::NOT_MODIFIED_HEADERS.iter().chain([&LAST_MODIFIED]) {
            for v in entry.headers.get_all(name) {
                resp.headers_mut().append(name.clone(), v.clone());
            }
        }
        resp
    } else {
        let body = if head {
            ResponseBody::empty()
        } else {
            ResponseBody::full(entry.body.clone())
        };
        let mut resp = Response::new(body);
        *resp.status_mut() = entry.status;
        *resp.headers_mut() = entry.headers.clone();
        if head && !resp.headers().contains_key(CONTENT_LENGTH) {
            resp.headers_mut()
                .insert(CONTENT_LENGTH, HeaderValue::from(entry.body.len()));
        }
        resp
    };
    resp.headers_mut()
        .insert(AGE, HeaderValue::from(entry.age(now).as_secs()));
    mark(&mut resp, x_cache);
    resp
}

/// What a completed tee stores.
struct Fill {
    cache: Arc<Cache>,
    key: String,
    path: String,
    entry: Entry,
    /// Dropped after the insert (or when storing is given up): the waiters look again then.
    _flight: Option<FlightGuard>,
}

/// The response body on its way to the client, copied until it ends (then stored) or passes
/// `limit` (then only streamed: memory stays flat).
struct Tee {
    inner: ResponseBody,
    buf: BytesMut,
    limit: u64,
    fill: Option<Fill>,
}

impl Tee {
    fn finish(&mut self) {
        let Some(mut fill) = self.fill.take() else {
            return;
        };
        let buf = std::mem::take(&mut self.buf);
        // The store weighs entries by their length: a buffer that grew by doubling is copied
        // to its exact size, so `max_size` bounds memory rather than half of it. (A body that
        // disagrees with its declared length is refused by `insert`.)
        let body = if buf.capacity() > buf.len() + buf.len() / 8 {
            Bytes::copy_from_slice(&buf)
        } else {
            buf.freeze()
        };
        fill.entry.body = body;
        fill.entry.stored = Instant::now();
        let Fill {
            cache,
            key,
            path,
            entry,
            _flight,
            ..
        } = fill;
        cache.insert(&key, &path, Arc::new(entry));
        drop(_flight);
    }
}

impl Body for Tee {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let frame = ready!(Pin::new(&mut this.inner).poll_frame(cx));
        match &frame {
            Some(Ok(f)) => {
                match f.data_ref() {
                    Some(data) if this.fill.is_some() => {
                        if (this.buf.len() + data.len()) as u64 > this.limit {
                            this.fill = None;
                            this.buf = BytesMut::new();
                        } else {
                            this.buf.extend_from_slice(data);
                        }
                    }
                    Some(_) => {}
                    // Trailers are not stored: the answer is not.
                    None => this.fill = None,
                }
                if this.inner.is_end_stream() {
                    this.finish();
                }
            }
            Some(Err(_)) => {
                this.fill = None;
                this.buf = BytesMut::new();
            }
            None => this.finish(),
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
