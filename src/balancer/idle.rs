//! Idle pooled HTTP/1.1 connections of one endpoint: the type each endpoint's state stores, so
//! a request takes a connection without a pool-wide map, hash or lock.

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use crossbeam_queue::ArrayQueue;
use hyper::client::conn::http1;

use crate::body::RequestBody;

/// One endpoint's idle connections, in one queue per serving thread. A connection's task runs
/// on the thread that opened it; a request that takes it from its own thread's queue wakes no
/// other thread (nginx keeps its keepalive pools per worker for the same reason).
#[derive(Debug)]
pub struct IdleConns {
    shards: Box<[ArrayQueue<Idle>]>,
}

impl IdleConns {
    /// `shards` queues sharing `max_idle` connections between them.
    pub fn new(shards: usize, max_idle: usize) -> Self {
        let shards = shards.max(1);
        let each = max_idle.div_ceil(shards).max(1);
        Self {
            shards: (0..shards).map(|_| ArrayQueue::new(each)).collect(),
        }
    }

    /// The calling thread's queue.
    pub fn local(&self) -> &ArrayQueue<Idle> {
        &self.shards[thread_index() % self.shards.len()]
    }
}

thread_local! {
    static INDEX: Cell<Option<usize>> = const { Cell::new(None) };
}

/// Gives the calling thread its queue: serving thread `index` uses queue `index`.
pub fn set_thread_index(index: usize) {
    INDEX.with(|i| i.set(Some(index)));
}

/// The calling thread's index: set by its serving thread, or else given out in the order
/// threads first ask (only tests and library users run requests on other threads).
fn thread_index() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    INDEX.with(|i| match i.get() {
        Some(index) => index,
        None => {
            let index = NEXT.fetch_add(1, Ordering::Relaxed);
            i.set(Some(index));
            index
        }
    })
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
