//! Idle pooled HTTP/1.1 connections of one endpoint: the type each endpoint's state stores, so
//! a request takes a connection without a pool-wide map, hash or lock.

use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use crossbeam_queue::ArrayQueue;
use hyper::client::conn::http1;

use crate::body::RequestBody;

/// One endpoint's idle connections.
#[derive(Debug)]
pub struct IdleConns {
    /// Idle connections, most recently given back last.
    pub queue: ArrayQueue<Idle>,
}

/// One idle connection.
#[derive(Debug)]
pub struct Idle {
    /// The connection's request handle.
    pub sender: http1::SendRequest<RequestBody>,
    /// When it was given back (see the pool's `Reuse`).
    pub last_used: Arc<AtomicU64>,
}

/// `last_used` while a request is on the connection.
pub const BUSY: u64 = u64::MAX;
