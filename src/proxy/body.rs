//! Body wrappers: the client's body as read from the socket (read timeout, end-of-body flag), the
//! request body sent upstream (streamed, or kept whole for replay) with its size limit, and the
//! response body that holds the endpoint lease and permit until the last byte.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Sleep;

use crate::balancer::Lease;
use crate::telemetry::BodyTap;

/// Why reading the client's body failed: always the client's fault, never the upstream's.
#[derive(Debug, thiserror::Error)]
pub enum ClientBodyError {
    /// The body's framing is invalid (a malformed chunk, a bad trailer).
    #[error("malformed request body")]
    Malformed(#[source] hyper::Error),
    /// The client closed or reset the connection before the body ended.
    #[error("the client went away before the body ended")]
    Aborted(#[source] hyper::Error),
    /// The client sent nothing for `server.body_read_timeout`.
    #[error("no body bytes for {after:?}")]
    Stalled {
        /// The timeout.
        after: Duration,
    },
}

impl ClientBodyError {
    fn from_hyper(e: hyper::Error) -> Self {
        // hyper reports a body cut short as an unexpected EOF (or an incomplete message);
        // every other decoding failure is a framing error.
        let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(&e);
        let mut eof = e.is_incomplete_message();
        while let Some(err) = cur {
            if let Some(io) = err.downcast_ref::<std::io::Error>() {
                eof |= matches!(
                    io.kind(),
                    std::io::ErrorKind::UnexpectedEof
                        | std::io::ErrorKind::ConnectionReset
                        | std::io::ErrorKind::ConnectionAborted
                        | std::io::ErrorKind::BrokenPipe
                );
            }
            cur = err.source();
        }
        if eof {
            Self::Aborted(e)
        } else {
            Self::Malformed(e)
        }
    }
}

/// Set once a client's body has been read to its end (shared between the body and the
/// connection, which must not be reused while the body is unread).
pub type BodyEnd = Arc<AtomicBool>;

/// The client's request body as the server read it: bounded silences between reads, and a
/// flag raised at its end. Bodies that are empty from the start carry no flag (nothing to read).
#[derive(Debug)]
pub struct ClientBody {
    inner: Incoming,
    /// The longest silence allowed between two reads.
    read_timeout: Duration,
    /// Armed while a read is pending; boxed and made only for bodies that wait.
    idle: Option<Pin<Box<Sleep>>>,
    end: Option<BodyEnd>,
}

impl ClientBody {
    /// Wraps a body from hyper. The flag is returned when there is a body left to read.
    pub fn new(inner: Incoming, read_timeout: Duration) -> (Self, Option<BodyEnd>) {
        let end = (!inner.is_end_stream()).then(|| Arc::new(AtomicBool::new(false)));
        let body = Self {
            inner,
            read_timeout,
            idle: None,
            end: end.clone(),
        };
        (body, end)
    }

    /// The flag raised at the body's end; `None` when there was no body to read.
    pub fn end_flag(&self) -> Option<&BodyEnd> {
        self.end.as_ref()
    }

    fn ended(&mut self) {
        if let Some(end) = self.end.take() {
            end.store(true, Ordering::Release);
        }
        self.idle = None;
    }
}

impl Body for ClientBody {
    type Data = Bytes;
    type Error = ClientBodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if this.inner.is_end_stream() {
                    this.ended();
                } else if let Some(idle) = &mut this.idle {
                    idle.as_mut()
                        .reset(tokio::time::Instant::now() + this.read_timeout);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                this.idle = None;
                Poll::Ready(Some(Err(ClientBodyError::from_hyper(e))))
            }
            Poll::Ready(None) => {
                this.ended();
                Poll::Ready(None)
            }
            Poll::Pending => {
                let after = this.read_timeout;
                let idle = this
                    .idle
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(after)));
                match idle.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Some(Err(ClientBodyError::Stalled { after }))),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Why a request body stopped.
#[derive(Debug, thiserror::Error)]
pub enum RequestBodyError {
    /// The client sent more than the route allows.
    #[error("request body exceeds {limit} bytes")]
    TooLarge {
        /// The limit.
        limit: u64,
    },
    /// Reading from the client failed.
    #[error("reading the request body")]
    Read(#[from] ClientBodyError),
}

/// The client's body on its way upstream: chunks already read (kept for replay, or read ahead
/// while deciding), then the rest of the stream, with an optional byte limit.
#[derive(Debug, Default)]
pub struct RequestBody {
    buffered: VecDeque<Bytes>,
    inner: Option<ClientBody>,
    limit: Option<u64>,
    seen: u64,
    /// Counts bytes streamed from the client, for the access log (set only when it is on).
    tally: Option<Arc<AtomicU64>>,
}

impl RequestBody {
    /// Streams a client body; `limit` ends the stream with an error once exceeded.
    pub fn streaming(inner: ClientBody, limit: Option<u64>) -> Self {
        Self {
            buffered: VecDeque::new(),
            inner: Some(inner),
            limit,
            seen: 0,
            tally: None,
        }
    }

    /// A body made of chunks already in memory (a replay).
    pub fn from_chunks(chunks: &[Bytes]) -> Self {
        Self {
            buffered: chunks.iter().cloned().collect(),
            ..Self::default()
        }
    }

    /// No body at all.
    pub fn empty() -> Self {
        Self::default()
    }

    /// Reads the client body into memory while it stays within `keep` bytes.
    ///
    /// Returns `Ok(chunks)` when the whole body fit (it can be replayed), or a streaming body
    /// that starts with what was read when it did not.
    pub async fn read_up_to(
        mut inner: ClientBody,
        keep: u64,
        limit: Option<u64>,
    ) -> Result<Result<Vec<Bytes>, Self>, RequestBodyError> {
        use http_body_util::BodyExt;
        let mut chunks = Vec::new();
        let mut total = 0u64;
        while let Some(frame) = inner.frame().await {
            let Ok(data) = frame?.into_data() else {
                continue;
            };
            total += data.len() as u64;
            if let Some(l) = limit {
                if total > l {
                    return Err(RequestBodyError::TooLarge { limit: l });
                }
            }
            chunks.push(data);
            if total > keep {
                return Ok(Err(Self {
                    buffered: chunks.into(),
                    inner: Some(inner),
                    limit,
                    seen: total,
                    tally: None,
                }));
            }
        }
        Ok(Ok(chunks))
    }

    /// The client body's end flag: `None` when nothing is left to read from the client.
    pub fn end_flag(&self) -> Option<BodyEnd> {
        self.inner.as_ref().and_then(|b| b.end_flag().cloned())
    }

    /// Adds the body's bytes to `tally`: those already read now, the rest as they stream.
    pub fn count_into(&mut self, tally: Arc<AtomicU64>) {
        let buffered: u64 = self.buffered.iter().map(|b| b.len() as u64).sum();
        tally.fetch_add(buffered, Ordering::Relaxed);
        self.tally = Some(tally);
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = RequestBodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        if let Some(chunk) = this.buffered.pop_front() {
            return Poll::Ready(Some(Ok(Frame::data(chunk))));
        }
        let Some(inner) = this.inner.as_mut() else {
            return Poll::Ready(None);
        };
        match ready!(Pin::new(inner).poll_frame(cx)) {
            Some(Ok(frame)) => {
                if let (Some(tally), Some(data)) = (&this.tally, frame.data_ref()) {
                    tally.fetch_add(data.len() as u64, Ordering::Relaxed);
                }
                if let (Some(limit), Some(data)) = (this.limit, frame.data_ref()) {
                    this.seen += data.len() as u64;
                    if this.seen > limit {
                        this.inner = None;
                        return Poll::Ready(Some(Err(RequestBodyError::TooLarge { limit })));
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Some(Err(e)) => Poll::Ready(Some(Err(e.into()))),
            None => {
                this.inner = None;
                Poll::Ready(None)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.buffered.is_empty() && self.inner.as_ref().is_none_or(|b| b.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        let buffered: u64 = self.buffered.iter().map(|b| b.len() as u64).sum();
        match &self.inner {
            None => SizeHint::with_exact(buffered),
            Some(b) => {
                let h = b.size_hint();
                let mut out = SizeHint::new();
                out.set_lower(h.lower() + buffered);
                if let Some(u) = h.upper() {
                    out.set_upper(u + buffered);
                }
                out
            }
        }
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// What the client receives: an upstream body streamed through, or a body the gateway made.
#[derive(Debug)]
pub struct ResponseBody {
    kind: Kind,
    /// Bytes-out counting and end-of-response telemetry (access log, server span); only set
    /// when one of them is on.
    tap: Option<Box<BodyTap>>,
    /// Marks the downstream connection busy until the body is done with (see `server::conn`).
    conn: Option<crate::server::conn::RequestMark>,
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
    pub(crate) fn hold_connection(mut self, mark: crate::server::conn::RequestMark) -> Self {
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
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            Kind::Upstream { body, .. } => body.size_hint(),
        }
    }
}

impl ResponseBody {
    fn poll_inner(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match &mut self.kind {
            Kind::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
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
