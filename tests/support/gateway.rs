//! Starts the real gateway on 127.0.0.1:0 from a TOML string, plus client helpers.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use meshgate::config::{Config, Env};
use meshgate::control::static_discovery::StaticDiscovery;
use meshgate::control::ControlState;
use meshgate::{Gateway, Listeners};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// A running gateway.
pub struct TestGateway {
    /// Main listener.
    pub addr: SocketAddr,
    /// Admin listener.
    pub admin: SocketAddr,
    /// TLS listener, when the config has `[tls]`.
    pub tls: Option<SocketAddr>,
    /// Request-path state (pools, routes).
    pub state: Arc<ControlState>,
    /// The static provider, to change services at run time.
    pub discovery: StaticDiscovery,
    stop: Option<oneshot::Sender<()>>,
    join: Option<JoinHandle<std::io::Result<()>>>,
}

/// Parses `toml` and starts the gateway; `drain_delay` defaults to zero here unless set.
pub async fn start(toml: &str) -> TestGateway {
    let mut config = Config::from_toml(toml, &Env::default())
        .unwrap_or_else(|e| panic!("invalid test config:\n{e}"));
    if !toml.contains("drain_delay") {
        config.server.drain_delay = Duration::ZERO;
    }
    start_config(config).await
}

/// A gateway with one catch-all route to `upstream` (a URL) and `server` as its `[server]`
/// section (TOML lines, may be empty).
pub async fn start_in_front_of(upstream: &str, server: &str) -> TestGateway {
    start(&format!(
        r#"
        [server]
        {server}
        [[routes]]
        path = "/"
        targets = ["{upstream}"]
        "#
    ))
    .await
}

/// Starts the gateway from a built config.
pub async fn start_config(config: Config) -> TestGateway {
    start_gateway(Gateway::build(config).unwrap()).await
}

/// Starts an already-built gateway.
pub async fn start_gateway(gateway: Gateway) -> TestGateway {
    let main = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let tls = match gateway.state().tls.load().is_some() {
        true => Some(TcpListener::bind("127.0.0.1:0").await.unwrap()),
        false => None,
    };
    let tls_addr = tls.as_ref().map(|l| l.local_addr().unwrap());
    let addr = main.local_addr().unwrap();
    let admin_addr = admin.local_addr().unwrap();
    let state = gateway.state().clone();
    let discovery = gateway.static_discovery().clone();
    let (tx, rx) = oneshot::channel::<()>();
    let join = tokio::spawn(gateway.run(
        Listeners {
            main,
            admin: Some(admin),
            tls,
        },
        async move {
            let _ = rx.await;
        },
    ));
    TestGateway {
        addr,
        admin: admin_addr,
        tls: tls_addr,
        state,
        discovery,
        stop: Some(tx),
        join: Some(join),
    }
}

impl TestGateway {
    /// A live service's pool.
    pub fn pool(&self, service: &str) -> std::sync::Arc<meshgate::balancer::ServicePool> {
        let services = self.state.services.load();
        services
            .get(service)
            .unwrap_or_else(|| panic!("no service {service}"))
            .pool
            .clone()
    }

    /// `http://ADDR{path}` on the main listener.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// `http://ADMIN{path}` on the admin listener.
    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin)
    }

    /// Drops the running gateway without a shutdown (its `run` future is cancelled).
    pub fn abort(&mut self) {
        if let Some(j) = self.join.take() {
            j.abort();
        }
    }

    /// Signals shutdown without waiting.
    pub fn signal_stop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }

    /// Shuts down and waits for `run` to return.
    pub async fn stop(mut self) {
        self.signal_stop();
        if let Some(j) = self.join.take() {
            j.await.unwrap().unwrap();
        }
    }

    /// Waits for `run` to return after a signal, at most `limit`.
    pub async fn join(&mut self, limit: Duration) -> std::io::Result<()> {
        let j = self.join.take().expect("already joined");
        tokio::time::timeout(limit, j)
            .await
            .expect("gateway did not stop in time")
            .unwrap()
    }
}

impl Drop for TestGateway {
    fn drop(&mut self) {
        self.signal_stop();
    }
}

/// A plain HTTP client for tests (no proxy from the environment, no pooling surprises).
pub fn client() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder().no_proxy().build().unwrap()
}

/// Polls `check` until it returns true or `limit` passes; returns whether it became true.
pub async fn eventually<F, Fut>(limit: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if check().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
