//! The response body the client receives: an upstream body streamed through (holding the
//! endpoint lease, permit and pooled connection until its last byte), or one the gateway made.

use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Sleep;

use crate::balancer::Lease;
use crate::conn::RequestMark;
use crate::telemetry::BodyTap;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// What the client receives: an upstream body streamed through, or a body the gateway made.
#[derive(Debug)]
pub struct ResponseBody {
    kind: Kind,
    /// Bytes-out counting and end-of-response telemetry (access log, server span); only set
    /// when one of them is on.
    tap: Option<Box<BodyTap>>,
    /// Marks the downstream connection busy until the body is done with (see `server::conn`).
    conn: Option<RequestMark>,
}

#[derive(Debug)]
enum Kind {
    Upstream {
        body: Incoming,
        hold: Option<(Lease, Option<OwnedSemaphorePermit>)>,
        deadline: Option<Pin<Box<Sleep>>>,
        /// The pooled connection, given back once the body has ended.
        reuse: Option<super::pool::Reuse>,
    },
    Full(Option<Bytes>),
    /// A body a stage wrapped (the cache's tee).
    Wrapped(Wrapped),
}

/// A body wrapped by a stage.
pub struct Wrapped(Pin<Box<dyn Body<Data = Bytes, Error = BoxError> + Send + Sync>>);

impl std::fmt::Debug for Wrapped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Wrapped")
    }
}

/// The response stream outlived the route's `stream_timeout`.
#[derive(Debug, thiserror::Error)]
#[error("response stream exceeded stream_timeout")]
pub struct StreamTimeout;

impl ResponseBody {
    /// Streams an upstream body; the lease and permit are released at its end.
    pub fn upstream(
        body: Incoming,
        lease: Lease,
        permit: Option<OwnedSemaphorePermit>,
        stream_timeout: Option<std::time::Duration>,
    ) -> Self {
        Self {
            kind: Kind::Upstream {
                body,
                hold: Some((lease, permit)),
                deadline: stream_timeout.map(|d| Box::pin(tokio::time::sleep(d))),
                reuse: None,
            },
            tap: None,
            conn: None,
        }
    }

    /// Gives `reuse`'s connection back to its pool once this (upstream) body has ended.
    pub(crate) fn reusing(mut self, reuse: Option<super::pool::Reuse>) -> Self {
        if let Kind::Upstream { reuse: slot, .. } = &mut self.kind {
            *slot = reuse;
        }
        self
    }

    /// A complete body made by the gateway.
    pub fn full(bytes: impl Into<Bytes>) -> Self {
        let bytes = bytes.into();
        Self {
            kind: Kind::Full((!bytes.is_empty()).then_some(bytes)),
            tap: None,
            conn: None,
        }
    }

    /// A body that wraps another (a stage watching the bytes go by).
    pub fn wrapped(
        body: impl Body<Data = Bytes, Error = BoxError> + Send + Sync + 'static,
    ) -> Self {
        Self {
            kind: Kind::Wrapped(Wrapped(Box::pin(body))),
            tap: None,
            conn: None,
        }
    }

    /// No body.
    pub fn empty() -> Self {
        Self {
            kind: Kind::Full(None),
            tap: None,
            conn: None,
        }
    }

    /// Attaches end-of-response telemetry: it counts the bytes sent and finishes when the body
    /// ends or is dropped.
    pub fn with_tap(mut self, tap: BodyTap) -> Self {
        self.tap = Some(Box::new(tap));
        self
    }

    /// Keeps the downstream connection marked busy until this body is dropped.
    pub(crate) fn hold_connection(mut self, mark: RequestMark) -> Self {
        self.conn = Some(mark);
        self
    }
}

impl Drop for ResponseBody {
    fn drop(&mut self) {
        // hyper stops polling a body whose length it knows once it has written that much.
        if let Kind::Upstream {
            body,
            reuse: reuse @ Some(_),
            ..
        } = &mut self.kind
        {
            if body.is_end_stream() {
                if let Some(r) = reuse.take() {
                    r.release();
                }
            }
        }
        if let Some(tap) = self.tap.take() {
            let complete = self.is_end_stream();
            tap.finish(complete);
        }
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        let frame = this.poll_inner(cx);
        if let (Some(tap), Poll::Ready(Some(Ok(f)))) = (&mut this.tap, &frame) {
            if let Some(data) = f.data_ref() {
                tap.sent(data.len());
            }
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Full(b) => b.is_none(),
            Kind::Upstream { body, .. } => body.is_end_stream(),
            Kind::Wrapped(w) => w.0.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            Kind::Upstream { body, .. } => body.size_hint(),
            Kind::Wrapped(w) => w.0.size_hint(),
        }
    }
}

impl ResponseBody {
    fn poll_inner(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match &mut self.kind {
            Kind::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            Kind::Wrapped(w) => w.0.as_mut().poll_frame(cx),
            Kind::Upstream {
                body,
                hold,
                deadline,
                reuse,
            } => {
                if let Some(d) = deadline {
                    if d.as_mut().poll(cx).is_ready() {
                        *hold = None;
                        *reuse = None;
                        return Poll::Ready(Some(Err(Box::new(StreamTimeout))));
                    }
                }
                let frame = ready!(Pin::new(&mut *body).poll_frame(cx));
                // A chunked body ends with `None`; one with a known length may already report
                // its end with its last frame (and hyper may not poll it again).
                let ended = match &frame {
                    None => true,
                    Some(Ok(_)) => body.is_end_stream(),
                    Some(Err(_)) => {
                        *reuse = None;
                        false
                    }
                };
                if ended {
                    if let Some(r) = reuse.take() {
                        r.release();
                    }
                }
                if let Some(Err(_)) = &frame {
                    if let Some((l, _)) = hold.as_ref() {
                        l.record_failure();
                    }
                }
                if !matches!(frame, Some(Ok(_))) {
                    // End of stream or failure: the request no longer occupies the endpoint.
                    *hold = None;
                }
                Poll::Ready(frame.map(|f| f.map_err(Into::into)))
            }
        }
    }
}
