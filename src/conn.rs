//! Downstream connection bookkeeping shared by the server's connection loop and the response
//! body: requests in flight, whether the socket may be taken back, and unread bodies.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::{header, Method, Request, Version};

/// What the service and the connection loop know about each other, per connection.
#[derive(Debug, Default)]
pub struct ConnShared {
    /// Requests whose response body has not been dropped yet.
    pub in_flight: AtomicU32,
    /// Requests started on this connection (only compared, so wrapping is fine).
    pub started: AtomicU32,
    /// Cleared by a request that ends the connection or takes it over (close, upgrade, CONNECT):
    /// hyper must then finish the connection itself.
    pub reusable: AtomicBool,
    /// Set by the loop while it takes the socket back from hyper: shutdown must not close it.
    pub releasing: AtomicBool,
    /// When the latest request started (`clock::now_ms`).
    pub last_start_ms: AtomicU64,
    /// The latest request started within the quiet period of the one before: the next one is likely
    /// to come soon too, so hyper keeps the connection until it has been quiet for a while.
    pub hot: AtomicBool,
    /// the connection loop's quiet period in milliseconds.
    quiet_ms: u64,
    /// A request was answered before its body was read to the end: the connection closes
    /// after the answer, and what the client still sends is read and discarded first.
    pub unread: AtomicBool,
}

impl ConnShared {
    /// A new connection's shared state; `quiet` is the connection loop's quiet period.
    pub fn new(quiet: Duration) -> Arc<Self> {
        Arc::new(Self {
            reusable: AtomicBool::new(true),
            quiet_ms: quiet.as_millis() as u64,
            ..Self::default()
        })
    }

    /// Counts a request in; the mark counts it out when the response body is dropped.
    pub fn begin<B>(self: &Arc<Self>, req: &Request<B>) -> RequestMark {
        self.started.fetch_add(1, Ordering::Relaxed);
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        let now = crate::clock::now_ms();
        let prev = self.last_start_ms.swap(now, Ordering::Relaxed);
        self.hot.store(
            prev != 0 && now.saturating_sub(prev) < self.quiet_ms,
            Ordering::Relaxed,
        );
        if !keeps_connection(req) {
            self.reusable.store(false, Ordering::Relaxed);
        }
        RequestMark(self.clone())
    }

    /// Marks the connection as carrying an unread request body: it must end after the
    /// current answer and never be handed back for another request.
    pub fn end_unread(&self) {
        self.unread.store(true, Ordering::Relaxed);
        self.reusable.store(false, Ordering::Relaxed);
    }

    /// True when every request started since `started_before` has finished and none of them
    /// asked to end or take over the connection.
    pub fn idle_after(&self, started_before: u32) -> bool {
        self.started.load(Ordering::Relaxed) != started_before
            && self.in_flight.load(Ordering::Relaxed) == 0
            && self.reusable.load(Ordering::Relaxed)
    }
}

/// A request in flight on a downstream connection, until dropped with its response body.
#[derive(Debug)]
pub struct RequestMark(Arc<ConnShared>);

impl RequestMark {
    /// See [`ConnShared::end_unread`]: this request was answered with its body unread.
    pub fn end_unread(&self) {
        self.0.end_unread();
    }
}

impl Drop for RequestMark {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Requests after which the socket must not be taken back: hyper closes or upgrades it, or may
/// decide to close it. A chunked request is one: hyper drops a `Content-Length` sent with
/// `Transfer-Encoding` before the service sees it and closes after the answer (RFC 9112 §6.3),
/// so such a connection is left to hyper to keep or close.
pub fn keeps_connection<B>(req: &Request<B>) -> bool {
    if req.version() != Version::HTTP_11
        || req.method() == Method::CONNECT
        || req.headers().contains_key(header::TRANSFER_ENCODING)
    {
        return false;
    }
    req.headers().get_all(header::CONNECTION).iter().all(|v| {
        v.to_str().is_ok_and(|v| {
            v.split(',').all(|t| {
                let t = t.trim();
                !t.eq_ignore_ascii_case("close") && !t.eq_ignore_ascii_case("upgrade")
            })
        })
    })
}
