//! Request bodies: the client's body as read from the socket (read timeout, end-of-body flag),
//! and the body sent upstream (streamed, or kept whole for replay) with its size limit.

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
use tokio::time::Sleep;

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
