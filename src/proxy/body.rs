//! Body wrappers: the request body with its size limit, and the response body that holds the
//! endpoint lease until the last byte, so least-connections sees streaming responses.

use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use crate::balancer::Lease;

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
    Read(#[from] hyper::Error),
}

/// The client's body on its way upstream, streamed, with an optional byte limit.
#[derive(Debug)]
pub struct RequestBody {
    inner: Option<Incoming>,
    limit: Option<u64>,
    seen: u64,
}

impl RequestBody {
    /// Wraps a client body; `limit` ends the stream with an error once exceeded.
    pub fn new(inner: Incoming, limit: Option<u64>) -> Self {
        Self {
            inner: Some(inner),
            limit,
            seen: 0,
        }
    }

    /// No body at all (used when a request is replayed without one).
    pub fn empty() -> Self {
        Self {
            inner: None,
            limit: None,
            seen: 0,
        }
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
        let Some(inner) = this.inner.as_mut() else {
            return Poll::Ready(None);
        };
        let frame = ready!(Pin::new(inner).poll_frame(cx));
        match frame {
            Some(Ok(frame)) => {
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
        self.inner.as_ref().is_none_or(|b| b.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        self.inner
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), |b| b.size_hint())
    }
}

/// What the client receives: an upstream body streamed through, or a body the gateway made.
#[derive(Debug)]
pub struct ResponseBody {
    kind: Kind,
}

#[derive(Debug)]
enum Kind {
    Upstream {
        body: Incoming,
        lease: Option<Lease>,
    },
    Full(Option<Bytes>),
}

impl ResponseBody {
    /// Streams an upstream body; the lease is released at its end.
    pub fn upstream(body: Incoming, lease: Lease) -> Self {
        Self {
            kind: Kind::Upstream {
                body,
                lease: Some(lease),
            },
        }
    }

    /// A complete body made by the gateway.
    pub fn full(bytes: impl Into<Bytes>) -> Self {
        let bytes = bytes.into();
        Self {
            kind: Kind::Full((!bytes.is_empty()).then_some(bytes)),
        }
    }

    /// No body.
    pub fn empty() -> Self {
        Self {
            kind: Kind::Full(None),
        }
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match &mut self.kind {
            Kind::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            Kind::Upstream { body, lease } => {
                let frame = ready!(Pin::new(body).poll_frame(cx));
                if let Some(Err(_)) = &frame {
                    if let Some(l) = lease.as_ref() {
                        l.record_failure();
                    }
                }
                if !matches!(frame, Some(Ok(_))) {
                    // End of stream or failure: the request no longer occupies the endpoint.
                    *lease = None;
                }
                Poll::Ready(frame)
            }
        }
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
