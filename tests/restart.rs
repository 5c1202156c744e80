//! Restart without refusing connections (issue #11, defect 13): with `server.reuse_port` a new
//! gateway binds the ports of one that is draining, and clients opening new connections
//! throughout are never refused. Without it the second bind fails and says what to set.

mod support;

use std::io::ErrorKind;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use meshgate::config::{Config, Env};
use meshgate::{Gateway, Listeners};
use support::gateway::eventually;
use support::upstream::TestUpstream;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// A gateway started the way `main` starts one: config, `Listeners::bind`, `Gateway::run`.
struct Running {
    addr: SocketAddr,
    admin: SocketAddr,
    stop: oneshot::Sender<()>,
    join: JoinHandle<std::io::Result<()>>,
}

/// Binds `listen` and `admin` from config and runs a gateway in front of `upstream`.
async fn launch(
    listen: &str,
    admin: &str,
    reuse_port: bool,
    upstream: &str,
) -> std::io::Result<Running> {
    let toml = format!(
        r#"
        listen = "{listen}"
        [server]
        reuse_port = {reuse_port}
        drain_delay = "300ms"
        grace_period = "2s"
        [admin]
        listen = "{admin}"
        [[routes]]
        path = "/"
        targets = ["{upstream}"]
        "#
    );
    let config = Config::from_toml(&toml, &Env::default()).unwrap();
    let listeners = Listeners::bind(&config).await?;
    let addr = listeners.main.local_addr()?;
    let admin = listeners.admin.as_ref().unwrap().local_addr()?;
    let gateway = Gateway::build(config).unwrap();
    let (stop, rx) = oneshot::channel::<()>();
    let join = tokio::spawn(gateway.run(listeners, async move {
        let _ = rx.await;
    }));
    Ok(Running {
        addr,
        admin,
        stop,
        join,
    })
}

/// What the client loops saw.
#[derive(Default)]
struct Tally {
    /// Answered by the gateway in front of the upstream named `old`.
    old: AtomicUsize,
    /// Answered by the gateway in front of `new`.
    new: AtomicUsize,
    /// `connect` failed with "connection refused".
    refused: AtomicUsize,
    /// Connected, then closed or reset without an answer.
    cut: Mutex<Vec<String>>,
    /// Anything else that went wrong.
    other: Mutex<Vec<String>>,
}

/// One request on a new connection: `Connection: close`, read to the end.
async fn one_request(addr: SocketAddr, tally: &Tally) {
    let mut s = match TcpStream::connect(addr).await {
        Ok(s) => s,
        Err(e) if e.kind() == ErrorKind::ConnectionRefused => {
            tally.refused.fetch_add(1, Ordering::SeqCst);
            return;
        }
        // The same residue as a reset after the request was sent (below): a handshake still
        // in the old listener's queue when it closed is reset, and under load the client's
        // connect() can see it before it returned.
        Err(e) if e.kind() == ErrorKind::ConnectionReset => {
            tally.cut.lock().unwrap().push(format!("connect: {e}"));
            return;
        }
        Err(e) => {
            tally.other.lock().unwrap().push(format!("connect: {e}"));
            return;
        }
    };
    let exchange = async {
        s.write_all(b"GET / HTTP/1.1\r\nHost: restart.test\r\nConnection: close\r\n\r\n")
            .await?;
        let mut out = Vec::new();
        s.read_to_end(&mut out).await?;
        Ok::<_, std::io::Error>(String::from_utf8_lossy(&out).into_owned())
    };
    match tokio::time::timeout(Duration::from_secs(5), exchange).await {
        Ok(Ok(r)) if r.starts_with("HTTP/1.1 200") && r.ends_with("\r\n\r\nold") => {
            tally.old.fetch_add(1, Ordering::SeqCst);
        }
        Ok(Ok(r)) if r.starts_with("HTTP/1.1 200") && r.ends_with("\r\n\r\nnew") => {
            tally.new.fetch_add(1, Ordering::SeqCst);
        }
        Ok(Ok(r)) if r.is_empty() => tally.cut.lock().unwrap().push("closed".to_owned()),
        Ok(Ok(r)) => tally.other.lock().unwrap().push(format!("reply {r:?}")),
        Ok(Err(e)) if e.kind() == ErrorKind::ConnectionReset => {
            tally.cut.lock().unwrap().push(e.to_string());
        }
        Ok(Err(e)) => tally.other.lock().unwrap().push(format!("exchange: {e}")),
        Err(_) => tally
            .other
            .lock()
            .unwrap()
            .push("no reply in 5 s".to_owned()),
    }
}

/// Client loops, each with one connection at a time.
const CLIENTS: usize = 4;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_with_reuse_port_refuses_no_connection() {
    let old_up = TestUpstream::builder().name("old").start().await;
    let new_up = TestUpstream::builder().name("new").start().await;
    let old = launch("127.0.0.1:0", "127.0.0.1:0", true, &old_up.url())
        .await
        .unwrap();
    let addr = old.addr;

    let tally = Arc::new(Tally::default());
    let done = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let (tally, done) = (tally.clone(), done.clone());
            tokio::spawn(async move {
                while !done.load(Ordering::SeqCst) {
                    one_request(addr, &tally).await;
                }
            })
        })
        .collect();
    let counted = |which: fn(&Tally) -> &AtomicUsize, at_least: usize| {
        let tally = tally.clone();
        async move {
            eventually(Duration::from_secs(5), || {
                let n = which(&tally).load(Ordering::SeqCst);
                async move { n >= at_least }
            })
            .await
        }
    };
    assert!(counted(|t| &t.old, 20).await, "the old gateway serves");

    // The new version starts on the same ports while the old one still serves.
    let new = launch(
        &addr.to_string(),
        &old.admin.to_string(),
        true,
        &new_up.url(),
    )
    .await
    .expect("the new gateway binds the ports the old one holds");
    assert_eq!(new.addr, addr);
    assert!(counted(|t| &t.new, 20).await, "both serve");

    // SIGTERM to the old one: it drains for drain_delay, closes its listener, and stops.
    let _ = old.stop.send(());
    tokio::time::timeout(Duration::from_secs(5), old.join)
        .await
        .expect("the old gateway stops")
        .unwrap()
        .unwrap();
    let served_when_old_stopped = tally.new.load(Ordering::SeqCst);
    assert!(
        counted(|t| &t.new, served_when_old_stopped + 100).await,
        "the new gateway serves alone"
    );
    done.store(true, Ordering::SeqCst);
    for c in clients {
        c.await.unwrap();
    }

    let (old_n, new_n) = (
        tally.old.load(Ordering::SeqCst),
        tally.new.load(Ordering::SeqCst),
    );
    let refused = tally.refused.load(Ordering::SeqCst);
    let cut = tally.cut.lock().unwrap().clone();
    let other = tally.other.lock().unwrap().clone();
    assert_eq!(
        refused, 0,
        "refused connections during the restart (old served {old_n}, new {new_n})"
    );
    assert!(other.is_empty(), "{other:?}");
    // The one residue: a connection the kernel queued on the old listener just as it closed
    // is reset (Linux moves it to the new listener only with net.ipv4.tcp_migrate_req = 1).
    // It hits at most the one connection each client has open at that moment. (A connection
    // accepted just before the drain began is answered: see tests/shutdown.rs.)
    assert!(
        cut.len() <= CLIENTS,
        "{} connections cut, more than were in flight when the old gateway closed: {cut:?}",
        cut.len()
    );
    assert_eq!(
        old_up.hits(),
        old_n,
        "every answer from the old gateway went upstream once"
    );
    let _ = new.stop.send(());
    new.join.await.unwrap().unwrap();
}

#[tokio::test]
async fn without_reuse_port_a_second_gateway_cannot_bind_and_says_why() {
    let up = TestUpstream::builder().start().await;
    let first = launch("127.0.0.1:0", "127.0.0.1:0", false, &up.url())
        .await
        .unwrap();
    let addr = first.addr.to_string();
    // Another free port for the admin listener, so only the main one collides.
    let admin = "127.0.0.1:0";
    for reuse_port in [false, true] {
        let e = launch(&addr, admin, reuse_port, &up.url())
            .await
            .err()
            .unwrap_or_else(|| panic!("bound {addr} twice (reuse_port = {reuse_port})"));
        assert_eq!(e.kind(), ErrorKind::AddrInUse);
        let message = e.to_string();
        assert!(
            message.starts_with(&format!("binding {addr}: ")),
            "{message}"
        );
        assert!(message.contains("server.reuse_port"), "{message}");
    }
    let _ = first.stop.send(());
    first.join.await.unwrap().unwrap();
}
