//! The serving threads beyond the first: each runs a single-threaded runtime with accept loops on
//! copies of the proxied listeners, so connections spread over threads that never share a task.

use std::io;
use std::thread::JoinHandle;

use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use super::{serve, Acceptor};

/// The extra serving threads of a running gateway.
pub struct ServingThreads {
    /// One per thread: fires once its accept loops have ended.
    accepting: Vec<oneshot::Receiver<()>>,
    /// Ends the threads' runtimes (their connections, upgrades and upstream connections).
    done: CancellationToken,
    handles: Vec<JoinHandle<()>>,
}

impl ServingThreads {
    /// Starts `n` threads, each accepting on copies of `listeners` with the same acceptors
    /// (one connection limit and one drain per listener across threads).
    pub fn start(n: usize, listeners: &[(TcpListener, Acceptor)]) -> io::Result<Self> {
        let done = CancellationToken::new();
        let mut threads = Self {
            accepting: Vec::with_capacity(n),
            done: done.clone(),
            handles: Vec::with_capacity(n),
        };
        for index in 1..=n {
            let mut copies = Vec::with_capacity(listeners.len());
            for (listener, acceptor) in listeners {
                let copy: std::net::TcpListener =
                    socket2::SockRef::from(listener).try_clone()?.into();
                copy.set_nonblocking(true)?;
                copies.push((copy, acceptor.clone()));
            }
            // Built here, so a failure is the caller's error rather than a dead thread.
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let (accepted, accepting) = oneshot::channel();
            let done = done.clone();
            let handle = std::thread::Builder::new()
                .name(format!("meshgate-serve-{index}"))
                .spawn(move || {
                    crate::balancer::idle::set_thread_index(index);
                    runtime.block_on(run(copies, accepted, done));
                })?;
            threads.accepting.push(accepting);
            threads.handles.push(handle);
        }
        Ok(threads)
    }

    /// Resolves once every thread's accept loops have ended (after their `stop`); connections
    /// accepted before then are tracked by the drain.
    pub async fn stopped_accepting(&mut self) {
        for rx in self.accepting.drain(..) {
            let _ = rx.await;
        }
    }

    /// Ends the threads and waits for them: after the drain, when nothing is left to serve.
    pub async fn stop(mut self) {
        self.done.cancel();
        let handles = std::mem::take(&mut self.handles);
        let joined = tokio::task::spawn_blocking(move || {
            for h in handles {
                let _ = h.join();
            }
        });
        let _ = joined.await;
    }
}

impl Drop for ServingThreads {
    /// A gateway dropped without `stop` (its `run` future cancelled) still ends its threads.
    fn drop(&mut self) {
        self.done.cancel();
    }
}

async fn run(
    listeners: Vec<(std::net::TcpListener, Acceptor)>,
    accepted: oneshot::Sender<()>,
    done: CancellationToken,
) {
    let mut loops = Vec::with_capacity(listeners.len());
    for (listener, acceptor) in listeners {
        match TcpListener::from_std(listener) {
            Ok(l) => loops.push(tokio::spawn(serve(l, acceptor))),
            Err(e) => tracing::error!(error = %e, "a serving thread could not use its listener"),
        }
    }
    let accepting = async {
        for l in loops {
            let _ = l.await;
        }
    };
    // `done` also ends a thread whose gateway was dropped before it stopped accepting.
    tokio::select! {
        _ = accepting => {}
        _ = done.cancelled() => return,
    }
    let _ = accepted.send(());
    done.cancelled().await;
}
