//! Soak run (issue #11): the gateway binary as its own process under mixed traffic while the
//! Consul emulator churns instances and the config reloads; fails on unexpected errors or on RSS
//! or descriptor growth after warm-up. Ignored by default: `bench/soak.sh` runs it in release.

mod support;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use prometheus_parse::{Scrape, Value as PromValue};
use support::consul::{ConsulEmulator, Registration};
use support::gateway::eventually;
use support::upstream::{TestUpstream, TestUpstreamBuilder};
use support::ws::WsEcho;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tokio_util::sync::CancellationToken;

/// Warm-up: the first 3 minutes, or 10 % of the run when that is shorter.
const WARMUP_MAX: Duration = Duration::from_secs(180);
/// RSS and descriptors may grow at most this much between the warm-up and the end.
const GROWTH_LIMIT: f64 = 0.05;
/// Every exchange must finish within this, or it counts as an unexpected error.
const OP_LIMIT: Duration = Duration::from_secs(30);
/// `upstream.idle_timeout` of the soak config: short, so a quiesced sample sees no idle pooled
/// upstream connection left over from the traffic before it.
const UPSTREAM_IDLE: Duration = Duration::from_secs(2);
/// `server.header_read_timeout` of the soak config; the slowloris client outlasts it.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(3);
const RELOAD_EVERY: Duration = Duration::from_secs(30);
const CHURN_EVERY: Duration = Duration::from_secs(2);
/// A deregistered instance's upstream keeps serving this long (and until the gateway dropped
/// it from its pool) before it is shut down, so requests already sent to it finish.
const RETIRE_AFTER: Duration = Duration::from_secs(20);
const KEEPALIVE_LOOPS: usize = 4;
const NEWCONN_LOOPS: usize = 2;
const SLOW_BODY_LOOPS: usize = 2;
const HELD_WEBSOCKETS: usize = 16;
const BODY: usize = 1 << 20;
const SERVICES: [&str; 2] = ["soak-api", "soak-bulk"];

// === settings and bookkeeping ===

/// What the environment asks for: `SOAK_MINUTES` (default 30, fractions allowed) and
/// `SOAK_OUT` (a directory for the samples, the config and the gateway's log).
struct Settings {
    run: Duration,
    warmup: Duration,
    every: Duration,
    out: PathBuf,
    /// Keeps a scratch directory alive when `SOAK_OUT` is not set.
    _scratch: Option<tempfile::TempDir>,
}

impl Settings {
    fn from_env() -> Self {
        let minutes: f64 = std::env::var("SOAK_MINUTES").map_or(30.0, |v| {
            v.trim()
                .parse()
                .unwrap_or_else(|_| panic!("SOAK_MINUTES: not a number of minutes: {v:?}"))
        });
        assert!(minutes > 0.0, "SOAK_MINUTES must be positive");
        let run = Duration::from_secs_f64(minutes * 60.0);
        let (out, scratch) = match std::env::var("SOAK_OUT") {
            Ok(dir) if !dir.is_empty() => {
                std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("SOAK_OUT {dir}: {e}"));
                (PathBuf::from(dir), None)
            }
            _ => {
                let t = tempfile::tempdir().unwrap();
                (t.path().to_owned(), Some(t))
            }
        };
        Self {
            run,
            warmup: WARMUP_MAX.min(run / 10),
            // About a dozen samples for short runs, one a minute for long ones.
            every: (run / 12).clamp(Duration::from_secs(10), Duration::from_secs(60)),
            out,
            _scratch: scratch,
        }
    }
}

/// How one exchange ended, when it did not end in an unexpected error.
enum Outcome {
    /// The answer the exchange wanted.
    Ok,
    /// A malformed or too slow request refused (4xx or closed): what it should get.
    Rejected,
    /// A malformed request answered 2xx (its head-rule conformance is tested elsewhere; here it
    /// is counted and shown, not failed).
    Accepted,
}

#[derive(Debug, Default, Clone, Copy)]
struct Counts {
    ok: u64,
    rejected: u64,
    accepted: u64,
    unexpected: u64,
}

impl Counts {
    fn total(&self) -> u64 {
        self.ok + self.rejected + self.accepted + self.unexpected
    }
}

/// Outcome counts per kind of exchange, and the unexpected errors grouped by kind and message.
struct Tally {
    start: Instant,
    // std Mutexes: test-side bookkeeping, tiny sections, never held across an await.
    kinds: Mutex<BTreeMap<String, Counts>>,
    /// `kind: message` → (times seen, seconds into the run when first seen).
    errors: Mutex<BTreeMap<String, (u64, f64)>>,
}

impl Tally {
    fn new(start: Instant) -> Self {
        Self {
            start,
            kinds: Mutex::new(BTreeMap::new()),
            errors: Mutex::new(BTreeMap::new()),
        }
    }

    fn record(&self, kind: &str, result: Result<Outcome, String>) {
        let mut kinds = self.kinds.lock().unwrap();
        let c = kinds.entry(kind.to_owned()).or_default();
        match result {
            Ok(Outcome::Ok) => c.ok += 1,
            Ok(Outcome::Rejected) => c.rejected += 1,
            Ok(Outcome::Accepted) => c.accepted += 1,
            Err(e) => {
                c.unexpected += 1;
                drop(kinds);
                let at = self.start.elapsed().as_secs_f64();
                let key = format!("{kind}: {e}");
                let mut errors = self.errors.lock().unwrap();
                // Messages carry no ids or timings, so repeats of one failure group together;
                // the cap keeps a storm of distinct messages from growing without bound.
                if !errors.contains_key(&key) && errors.len() < 50 {
                    println!("soak: unexpected ({at:.1} s): {key}");
                    errors.insert(key.clone(), (0, at));
                }
                if let Some(e) = errors.get_mut(&key) {
                    e.0 += 1;
                }
            }
        }
    }

    /// Runs `op` with [`OP_LIMIT`] and records its outcome under `kind`.
    async fn run<F>(&self, kind: &str, op: F)
    where
        F: std::future::Future<Output = Result<Outcome, String>>,
    {
        let result = match tokio::time::timeout(OP_LIMIT, op).await {
            Ok(r) => r,
            Err(_) => Err(format!("no outcome within {OP_LIMIT:?}")),
        };
        self.record(kind, result);
    }

    fn totals(&self) -> Counts {
        let kinds = self.kinds.lock().unwrap();
        kinds.values().fold(Counts::default(), |a, c| Counts {
            ok: a.ok + c.ok,
            rejected: a.rejected + c.rejected,
            accepted: a.accepted + c.accepted,
            unexpected: a.unexpected + c.unexpected,
        })
    }
}

/// Lets the sampler pause every loop between two iterations, so a sample sees the gateway at
/// rest (only long-lived connections open) rather than at a random point of the traffic.
struct Gate {
    paused: watch::Sender<bool>,
    parked: watch::Sender<usize>,
    stop: CancellationToken,
}

impl Gate {
    fn new() -> Self {
        Self {
            paused: watch::Sender::new(false),
            parked: watch::Sender::new(0),
            stop: CancellationToken::new(),
        }
    }

    /// Between iterations: waits while paused; false once the run is over.
    async fn pass(&self) -> bool {
        if *self.paused.borrow() && !self.stop.is_cancelled() {
            self.parked.send_modify(|n| *n += 1);
            let mut rx = self.paused.subscribe();
            tokio::select! {
                _ = rx.wait_for(|p| !*p) => {}
                () = self.stop.cancelled() => {}
            }
            self.parked.send_modify(|n| *n -= 1);
        }
        !self.stop.is_cancelled()
    }

    /// Pacing between iterations; ends early when the run is over.
    async fn rest(&self, d: Duration) {
        tokio::select! {
            () = tokio::time::sleep(d) => {}
            () = self.stop.cancelled() => {}
        }
    }

    /// Pauses and waits until `loops` loops are parked; false when they were not within `limit`.
    async fn pause(&self, loops: usize, limit: Duration) -> bool {
        self.paused.send_replace(true);
        let mut rx = self.parked.subscribe();
        let parked = tokio::time::timeout(limit, rx.wait_for(|n| *n >= loops))
            .await
            .is_ok();
        parked
    }

    fn resume(&self) {
        self.paused.send_replace(false);
    }
}

// === the gateway process ===

/// Addresses the config file points at.
#[derive(Clone)]
struct Wiring {
    listen: SocketAddr,
    admin: SocketAddr,
    consul: String,
    ws: SocketAddr,
    sink: SocketAddr,
}

fn config_toml(w: &Wiring, generation: u64) -> String {
    // A reload flips a response header value and the api route's timeout.
    let timeout = if generation % 2 == 0 { "10s" } else { "11s" };
    format!(
        r#"# Written by tests/soak.rs; generation {generation}.
listen = "{listen}"

[admin]
listen = "{admin}"

[log]
level = "warn"

[server]
header_read_timeout = "{hrt}s"
drain_delay = "0s"
grace_period = "5s"

[upstream]
idle_timeout = "{idle}s"

[discovery]
provider = "consul"

[discovery.consul]
address = "{consul}"
wait = "10s"

[[routes]]
name = "api"
path = "/api"
service = "soak-api"
timeout = "{timeout}"
response_headers = {{ set = {{ "X-Soak-Generation" = "{generation}" }} }}

[[routes]]
name = "bulk"
path = "/bulk"
service = "soak-bulk"

[[routes]]
name = "ws"
path = "/ws"
targets = ["ws://{ws}"]

[[routes]]
name = "sink"
path = "/sink"
targets = ["http://{sink}"]
retry = {{ attempts = 1 }}
"#,
        listen = w.listen,
        admin = w.admin,
        hrt = HEADER_READ_TIMEOUT.as_secs(),
        idle = UPSTREAM_IDLE.as_secs(),
        consul = w.consul,
        ws = w.ws,
        sink = w.sink,
    )
}

/// Replaces the config file in one rename, so the gateway's file watcher never reads half of it.
fn write_config(path: &Path, text: &str) {
    let tmp = path.with_extension("toml.tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// The gateway binary running as a child process; killed on drop if still running.
struct GatewayProc {
    child: Child,
    pid: u32,
    log: PathBuf,
}

impl GatewayProc {
    fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// SIGTERM, then waits up to `limit` for the exit status.
    async fn terminate(&mut self, limit: Duration) -> Option<ExitStatus> {
        // std offers only SIGKILL; `kill -TERM` asks for the graceful shutdown.
        let _ = Command::new("kill")
            .args(["-TERM", &self.pid.to_string()])
            .status();
        let deadline = Instant::now() + limit;
        loop {
            if let Some(s) = self.exited() {
                return Some(s);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for GatewayProc {
    fn drop(&mut self) {
        if self.exited().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A port that was free a moment ago (bind `:0`, note it, close).
fn free_port() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

/// Starts the gateway binary on fresh ports and waits for `/ready`; tries new ports when
/// another process took one of them between our check and the gateway's bind.
async fn start_gateway(
    out: &Path,
    consul: String,
    ws: SocketAddr,
    sink: SocketAddr,
    http: &reqwest::Client,
) -> (GatewayProc, Wiring) {
    let config = out.join("gateway.toml");
    for attempt in 1..=5 {
        let wiring = Wiring {
            listen: free_port(),
            admin: free_port(),
            consul: consul.clone(),
            ws,
            sink,
        };
        write_config(&config, &config_toml(&wiring, 0));
        let log = out.join("gateway.log");
        let log_file = std::fs::File::create(&log).unwrap();
        // A clean environment: meshgate reads MESHGATE_* and CONSUL_* variables as configuration.
        let child = Command::new(env!("CARGO_BIN_EXE_meshgate"))
            .arg("--config")
            .arg(&config)
            .env_clear()
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().unwrap())
            .stderr(log_file)
            .spawn()
            .expect("start the meshgate binary");
        let mut gw = GatewayProc {
            pid: child.id(),
            child,
            log,
        };
        let ready_url = format!("http://{}/ready", wiring.admin);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = gw.exited() {
                let tail = gw.log_tail(20);
                assert!(
                    attempt < 5 && tail.contains("binding"),
                    "the gateway exited at start ({status}):\n{tail}"
                );
                println!("soak: the gateway could not bind (attempt {attempt}), new ports");
                break;
            }
            let ready = http
                .get(&ready_url)
                .send()
                .await
                .is_ok_and(|r| r.status() == 200);
            if ready {
                return (gw, wiring);
            }
            assert!(
                Instant::now() < deadline,
                "the gateway was not ready within 60 s:\n{}",
                gw.log_tail(20)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    unreachable!("every attempt either returns or panics")
}

/// `GET /metrics` on the admin listener, parsed.
async fn scrape(http: &reqwest::Client, admin: SocketAddr) -> Result<Scrape, String> {
    let text = http
        .get(format!("http://{admin}/metrics"))
        .send()
        .await
        .map_err(|e| format!("/metrics: {e}"))?
        .text()
        .await
        .map_err(|e| format!("/metrics body: {e}"))?;
    Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).map_err(|e| format!("/metrics: {e}"))
}

fn metric(scrape: &Scrape, name: &str) -> Option<f64> {
    scrape
        .samples
        .iter()
        .find(|s| s.metric == name)
        .and_then(|s| match s.value {
            PromValue::Gauge(v) | PromValue::Counter(v) | PromValue::Untyped(v) => Some(v),
            _ => None,
        })
}

/// One reading of the gateway process.
#[derive(Debug, Clone, Default)]
struct Reading {
    rss_kib: u64,
    fds: u64,
    tasks: f64,
    conns: f64,
    sockets: Sockets,
}

/// The gateway's TCP sockets by role, from its descriptors and `/proc/net/tcp`.
#[derive(Debug, Clone, Default)]
struct Sockets {
    /// Accepted on the main or admin listener.
    downstream: u64,
    /// Opened to Consul.
    consul: u64,
    /// Opened to upstreams (services, the WebSocket echo, the sink).
    upstream: u64,
    /// Any socket whose peer has closed but the gateway has not (`CLOSE_WAIT`).
    close_wait: u64,
    /// One line per non-listening socket: role, local, remote, state.
    list: Vec<String>,
}

impl Sockets {
    fn read(pid: u32, w: &Wiring) -> Self {
        let mut inodes = std::collections::HashSet::new();
        if let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) {
            for e in dir.flatten() {
                if let Ok(target) = std::fs::read_link(e.path()) {
                    let t = target.to_string_lossy();
                    if let Some(i) = t.strip_prefix("socket:[").and_then(|r| r.strip_suffix(']')) {
                        inodes.insert(i.to_owned());
                    }
                }
            }
        }
        let table = std::fs::read_to_string(format!("/proc/{pid}/net/tcp")).unwrap_or_default();
        let consul_port = w
            .consul
            .rsplit(':')
            .next()
            .and_then(|p| p.parse::<u16>().ok());
        let mut out = Self::default();
        for line in table.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 10 || !inodes.contains(f[9]) {
                continue;
            }
            let (local, remote, state) = (hex_addr(f[1]), hex_addr(f[2]), tcp_state(f[3]));
            if state == "LISTEN" {
                continue;
            }
            let role = if local.1 == w.listen.port() || local.1 == w.admin.port() {
                out.downstream += 1;
                "downstream"
            } else if Some(remote.1) == consul_port {
                out.consul += 1;
                "consul"
            } else {
                out.upstream += 1;
                "upstream"
            };
            if state == "CLOSE_WAIT" {
                out.close_wait += 1;
            }
            out.list.push(format!(
                "{role:<10} {}:{} -> {}:{} {state}",
                local.0, local.1, remote.0, remote.1
            ));
        }
        out.list.sort();
        out
    }

    fn brief(&self) -> String {
        format!(
            "{}/{}/{}{}",
            self.downstream,
            self.upstream,
            self.consul,
            if self.close_wait > 0 {
                format!(" ({} CLOSE_WAIT)", self.close_wait)
            } else {
                String::new()
            }
        )
    }
}

/// `0100007F:1F90` (IPv4 in host byte order, port) from `/proc/net/tcp`.
fn hex_addr(s: &str) -> (std::net::Ipv4Addr, u16) {
    let (ip, port) = s.split_once(':').unwrap_or(("0", "0"));
    let ip = u32::from_str_radix(ip, 16).unwrap_or(0);
    (
        std::net::Ipv4Addr::from(u32::from_be(ip)),
        u16::from_str_radix(port, 16).unwrap_or(0),
    )
}

fn tcp_state(hex: &str) -> &'static str {
    match hex {
        "01" => "ESTABLISHED",
        "02" => "SYN_SENT",
        "03" => "SYN_RECV",
        "04" => "FIN_WAIT1",
        "05" => "FIN_WAIT2",
        "06" => "TIME_WAIT",
        "07" => "CLOSE",
        "08" => "CLOSE_WAIT",
        "09" => "LAST_ACK",
        "0A" => "LISTEN",
        "0B" => "CLOSING",
        _ => "OTHER",
    }
}

async fn read_gateway(pid: u32, http: &reqwest::Client, w: &Wiring) -> Reading {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0);
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count() as u64);
    let (tasks, conns) = match scrape(http, w.admin).await {
        Ok(s) => (
            metric(&s, "meshgate_runtime_alive_tasks").unwrap_or(f64::NAN),
            metric(&s, "meshgate_connections_open").unwrap_or(f64::NAN),
        ),
        Err(_) => (f64::NAN, f64::NAN),
    };
    Reading {
        rss_kib,
        fds,
        tasks,
        conns,
        sockets: Sockets::read(pid, w),
    }
}

/// `GET /status` on the admin listener: the endpoint addresses of `service`.
async fn pool_addresses(
    http: &reqwest::Client,
    admin: SocketAddr,
    service: &str,
) -> Result<Vec<String>, String> {
    let doc: serde_json::Value = http
        .get(format!("http://{admin}/status"))
        .send()
        .await
        .map_err(|e| format!("/status: {}", chain(&e)))?
        .json()
        .await
        .map_err(|e| format!("/status body: {}", chain(&e)))?;
    let svc = doc["services"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["name"] == service))
        .ok_or_else(|| format!("no service {service} in /status"))?;
    Ok(svc["endpoints"]
        .as_array()
        .map(|eps| {
            eps.iter()
                .filter_map(|e| e["address"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default())
}

// === Consul churn ===

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Check {
    Passing,
    Warning,
    Critical,
}

impl Check {
    fn next(self) -> Self {
        match self {
            Self::Passing => Self::Warning,
            Self::Warning => Self::Critical,
            Self::Critical => Self::Passing,
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Self::Passing => "passing",
            Self::Warning => "warning",
            Self::Critical => "critical",
        }
    }
}

struct Instance {
    id: String,
    upstream: TestUpstream,
    check: Check,
}

struct Retiring {
    upstream: TestUpstream,
    since: Instant,
    reported: bool,
}

/// One churned service: its registered instances (each a live upstream) and the upstreams of
/// deregistered ones that still serve until the gateway has dropped them.
struct Churned {
    name: &'static str,
    seq: u64,
    instances: Vec<Instance>,
    retiring: Vec<Retiring>,
}

fn upstream_for(service: &str) -> TestUpstreamBuilder {
    let b = TestUpstream::builder().name(service);
    if service == "soak-bulk" {
        // Uploads get the echo JSON (with body_size); downloads a fixed 1 MiB body.
        b.echo().route("/bulk/big", 200, &"x".repeat(BODY))
    } else {
        b.route("/api/ok", 200, "ok")
    }
}

impl Churned {
    async fn add(&mut self, consul: &ConsulEmulator) {
        self.seq += 1;
        let id = format!("{}-{}", self.name, self.seq);
        let upstream = upstream_for(self.name).start().await;
        consul.register(Registration::new(
            id.clone(),
            self.name,
            "127.0.0.1",
            upstream.addr().port(),
        ));
        self.instances.push(Instance {
            id,
            upstream,
            check: Check::Passing,
        });
    }

    fn passing_except(&self, i: usize) -> usize {
        self.instances
            .iter()
            .enumerate()
            .filter(|(j, inst)| *j != i && inst.check == Check::Passing)
            .count()
    }

    /// One random change that keeps at least one passing instance: register a new instance,
    /// deregister the oldest, or move one instance's check passing → warning → critical →
    /// passing.
    async fn churn(&mut self, consul: &ConsulEmulator) -> &'static str {
        let n = self.instances.len();
        let pick = if n < 3 {
            0
        } else if n > 4 {
            1
        } else {
            fastrand::usize(0..3)
        };
        if pick == 1 && self.passing_except(0) > 0 {
            let old = self.instances.remove(0);
            consul.deregister(&old.id);
            self.retiring.push(Retiring {
                upstream: old.upstream,
                since: Instant::now(),
                reported: false,
            });
            return "consul_deregister";
        }
        if pick == 2 {
            let i = fastrand::usize(0..n);
            let inst = &self.instances[i];
            if inst.check != Check::Passing || self.passing_except(i) > 0 {
                let next = inst.check.next();
                consul.set_check(&inst.id, next.as_str(), "soak");
                self.instances[i].check = next;
                return "consul_check";
            }
        }
        self.add(consul).await;
        "consul_register"
    }

    /// Shuts down retired upstreams the gateway no longer lists; an endpoint still listed long
    /// after its deregistration is an unexpected error (reported once).
    async fn retire(&mut self, http: &reqwest::Client, admin: SocketAddr, tally: &Tally) {
        // Asked on every tick even with nothing to retire, so the churn client's connection
        // is always open (quiesced samples see the same connections every time).
        let listed = match pool_addresses(http, admin, self.name).await {
            Ok(l) => l,
            Err(e) => {
                tally.record("churn", Err(e));
                return;
            }
        };
        let mut keep = Vec::new();
        for mut r in std::mem::take(&mut self.retiring) {
            let addr = r.upstream.addr().to_string();
            if r.since.elapsed() < RETIRE_AFTER {
                keep.push(r);
            } else if !listed.contains(&addr) {
                r.upstream.shutdown().await;
            } else {
                if r.since.elapsed() >= RETIRE_AFTER * 3 && !r.reported {
                    r.reported = true;
                    tally.record(
                        "churn",
                        Err(format!(
                            "{addr} still in the {} pool {:?} after its deregistration",
                            self.name,
                            r.since.elapsed()
                        )),
                    );
                }
                keep.push(r);
            }
        }
        self.retiring = keep;
    }

    async fn shutdown(self) {
        for i in self.instances {
            i.upstream.shutdown().await;
        }
        for r in self.retiring {
            r.upstream.shutdown().await;
        }
    }
}

// === traffic ===

/// An error and its sources, `: `-separated (reqwest's own message leaves the cause out).
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut next = e.source();
    while let Some(s) = next {
        let _ = write!(out, ": {s}");
        next = s.source();
    }
    out
}

fn client_builder() -> reqwest::ClientBuilder {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder().no_proxy().timeout(OP_LIMIT)
}

fn http_client(pooled: bool) -> reqwest::Client {
    let b = client_builder();
    let b = if pooled {
        b
    } else {
        b.pool_max_idle_per_host(0)
    };
    b.build().unwrap()
}

async fn expect_get(c: &reqwest::Client, url: &str, want: &[u8]) -> Result<Outcome, String> {
    let resp = c
        .get(url)
        .send()
        .await
        .map_err(|e| format!("GET: {}", chain(&e)))?;
    let status = resp.status();
    let body = resp
        .bytes()
        .await
        .map_err(|e| format!("GET body: {}", chain(&e)))?;
    if status != 200 || body != want {
        return Err(format!(
            "GET {url}: {status}, {} bytes: {:?}",
            body.len(),
            String::from_utf8_lossy(&body[..body.len().min(200)])
        ));
    }
    Ok(Outcome::Ok)
}

async fn upload(c: &reqwest::Client, url: &str, body: Bytes) -> Result<Outcome, String> {
    let resp = c
        .post(url)
        .body(body)
        .send()
        .await
        .map_err(|e| format!("POST: {}", chain(&e)))?;
    let status = resp.status();
    let text = resp
        .text()
        .await
        .map_err(|e| format!("POST body: {}", chain(&e)))?;
    let echoed: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
    if status != 200 || echoed["body_size"] != BODY {
        return Err(format!(
            "POST 1 MiB: {status}, {:?}",
            &text[..text.len().min(200)]
        ));
    }
    Ok(Outcome::Ok)
}

async fn download(c: &reqwest::Client, url: &str) -> Result<Outcome, String> {
    let resp = c
        .get(url)
        .send()
        .await
        .map_err(|e| format!("GET: {}", chain(&e)))?;
    let status = resp.status();
    let body = resp
        .bytes()
        .await
        .map_err(|e| format!("GET body: {}", chain(&e)))?;
    if status != 200 || body.len() != BODY {
        return Err(format!("GET 1 MiB: {status}, {} bytes", body.len()));
    }
    Ok(Outcome::Ok)
}

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

async fn ws_open(addr: SocketAddr, path: &str) -> Result<Ws, String> {
    let (ws, resp) = tokio_tungstenite::connect_async(format!("ws://{addr}{path}"))
        .await
        .map_err(|e| format!("WebSocket handshake: {e}"))?;
    if resp.status() != 101 {
        return Err(format!("WebSocket handshake: {}", resp.status()));
    }
    Ok(ws)
}

async fn ws_echo(ws: &mut Ws, text: String) -> Result<(), String> {
    ws.send(Message::text(text.clone()))
        .await
        .map_err(|e| format!("WebSocket send: {e}"))?;
    match ws.next().await {
        Some(Ok(Message::Text(t))) if t.as_str() == text => Ok(()),
        other => Err(format!("WebSocket echo of {text:?}: {other:?}")),
    }
}

/// Closes with the close handshake and reads until the connection ends.
async fn ws_close(mut ws: Ws) -> Result<(), String> {
    ws.close(None)
        .await
        .map_err(|e| format!("WebSocket close: {e}"))?;
    while let Some(m) = ws.next().await {
        match m {
            Ok(_) => {}
            Err(tokio_tungstenite::tungstenite::Error::ConnectionClosed) => break,
            Err(e) => return Err(format!("WebSocket after close: {e}")),
        }
    }
    Ok(())
}

async fn ws_session(addr: SocketAddr, n: u64) -> Result<Outcome, String> {
    let mut ws = ws_open(addr, "/ws/session").await?;
    for i in 0..5 {
        ws_echo(&mut ws, format!("session {n} message {i}")).await?;
    }
    ws_close(ws).await?;
    Ok(Outcome::Ok)
}

/// What a raw exchange got back: the status of the first response (if any), the number of
/// responses, the whole reply, and whether the server closed within the limit.
struct Raw {
    status: Option<u16>,
    responses: usize,
    text: String,
    body_len: usize,
    closed: bool,
}

fn parse_raw(bytes: &[u8], closed: bool) -> Raw {
    let text = String::from_utf8_lossy(bytes).into_owned();
    let status = text
        .strip_prefix("HTTP/1.1 ")
        .and_then(|r| r.get(..3))
        .and_then(|s| s.parse().ok());
    let body_len = bytes
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(0, |i| bytes.len() - i - 4);
    Raw {
        status,
        responses: text.matches("HTTP/1.1 ").count(),
        text,
        body_len,
        closed,
    }
}

/// Reads until the server closes or `limit` passes; `pause` between reads makes a slow reader.
async fn read_all(s: &mut TcpStream, limit: Duration, pause: Option<Duration>) -> Raw {
    let deadline = Instant::now() + limit;
    let mut out = Vec::new();
    let mut buf = vec![0u8; 8192];
    let closed = loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Err(_) => break false,
            Ok(Ok(0)) | Ok(Err(_)) => break true,
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
        }
        if let Some(p) = pause {
            tokio::time::sleep(p).await;
        }
    };
    parse_raw(&out, closed)
}

async fn connect(addr: SocketAddr) -> Result<TcpStream, String> {
    let s = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    s.set_nodelay(true).map_err(|e| e.to_string())?;
    Ok(s)
}

impl Raw {
    /// The status line and the start of the body, for error messages (no ids or dates).
    fn summary(&self) -> String {
        let line = self.text.lines().next().unwrap_or("");
        let body = self.text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
        let body: String = body.chars().take(100).collect();
        let body = body
            .split("\"request_id\"")
            .next()
            .unwrap_or_default()
            .to_owned();
        match (line.is_empty(), self.closed) {
            (true, true) => "closed without an answer".to_owned(),
            (true, false) => "no answer, connection left open".to_owned(),
            (false, _) => format!("{line} {body}").trim().to_owned(),
        }
    }
}

fn expect_status(raw: &Raw, want: u16, what: &str) -> Result<Outcome, String> {
    match raw.status {
        Some(s) if s == want => Ok(Outcome::Ok),
        _ => Err(format!("{what}: expected {want}, got {}", raw.summary())),
    }
}

/// A `Connection: close` GET on a new connection.
async fn close_get(addr: SocketAddr) -> Result<Outcome, String> {
    let mut s = connect(addr).await?;
    s.write_all(b"GET /api/ok HTTP/1.1\r\nHost: soak\r\nConnection: close\r\n\r\n")
        .await
        .map_err(|e| format!("write: {e}"))?;
    let raw = read_all(&mut s, OP_LIMIT, None).await;
    expect_status(&raw, 200, "GET with Connection: close")
}

/// A 64-byte body sent 8 bytes at a time, 200 ms apart.
async fn drip_body(addr: SocketAddr) -> Result<Outcome, String> {
    let mut s = connect(addr).await?;
    s.write_all(
        b"POST /api/drip HTTP/1.1\r\nHost: soak\r\nContent-Length: 64\r\nConnection: close\r\n\r\n",
    )
    .await
    .map_err(|e| format!("write: {e}"))?;
    for _ in 0..8 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        s.write_all(b"dripdrip")
            .await
            .map_err(|e| format!("write body: {e}"))?;
    }
    let raw = read_all(&mut s, OP_LIMIT, None).await;
    expect_status(&raw, 200, "drip-fed body")
}

/// A request head sent in four pieces 250 ms apart (well inside the header read timeout).
async fn drip_head(addr: SocketAddr) -> Result<Outcome, String> {
    let mut s = connect(addr).await?;
    for piece in [
        &b"GET /api/ok HTT"[..],
        b"P/1.1\r\nHost: so",
        b"ak\r\nConnection: close\r\n",
        b"\r\n",
    ] {
        s.write_all(piece)
            .await
            .map_err(|e| format!("write: {e}"))?;
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let raw = read_all(&mut s, OP_LIMIT, None).await;
    expect_status(&raw, 200, "drip-fed head")
}

/// Half a head, then silence: the gateway must close (408 or nothing) after its header read
/// timeout.
async fn slowloris(addr: SocketAddr) -> Result<Outcome, String> {
    let mut s = connect(addr).await?;
    s.write_all(b"GET /api/ok HTTP/1.1\r\nHost: soak\r\n")
        .await
        .map_err(|e| format!("write: {e}"))?;
    let raw = read_all(
        &mut s,
        HEADER_READ_TIMEOUT * 2 + Duration::from_secs(2),
        None,
    )
    .await;
    match (raw.closed, raw.status) {
        (true, None | Some(408)) => Ok(Outcome::Rejected),
        _ => Err(format!("half a head: {}", raw.summary())),
    }
}

/// A 1 MiB download read through a 16 KiB receive buffer, 8 KiB every 20 ms.
async fn slow_read(addr: SocketAddr) -> Result<Outcome, String> {
    let socket = TcpSocket::new_v4().map_err(|e| e.to_string())?;
    socket
        .set_recv_buffer_size(16 * 1024)
        .map_err(|e| e.to_string())?;
    let mut s = socket
        .connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    s.write_all(b"GET /bulk/big HTTP/1.1\r\nHost: soak\r\nConnection: close\r\n\r\n")
        .await
        .map_err(|e| format!("write: {e}"))?;
    let raw = read_all(&mut s, OP_LIMIT, Some(Duration::from_millis(20))).await;
    expect_status(&raw, 200, "slow reader")?;
    if raw.body_len != BODY {
        return Err(format!("slow reader: {} body bytes", raw.body_len));
    }
    Ok(Outcome::Ok)
}

/// Malformed requests to the sink route. Every one should be refused with a 4xx.
const MALFORMED: [(&str, &[u8]); 6] = [
    (
        "bad_chunk",
        b"POST /sink/chunk HTTP/1.1\r\nHost: soak\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
    ),
    (
        "bad_host",
        b"GET /sink/host HTTP/1.1\r\nHost: bad host\r\nConnection: close\r\n\r\n",
    ),
    (
        "two_hosts",
        b"GET /sink/hosts HTTP/1.1\r\nHost: a.example\r\nHost: b.example\r\nConnection: close\r\n\r\n",
    ),
    (
        "cl_te",
        b"POST /sink/smuggle HTTP/1.1\r\nHost: soak\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /sink/smuggled HTTP/1.1\r\nHost: soak\r\n\r\n",
    ),
    (
        "bad_request_line",
        b"GET /sink/a b HTTP/1.1\r\nHost: soak\r\nConnection: close\r\n\r\n",
    ),
    (
        "two_lengths",
        b"POST /sink/lengths HTTP/1.1\r\nHost: soak\r\nContent-Length: 3\r\nContent-Length: 4\r\nConnection: close\r\n\r\nabcd",
    ),
];

async fn malformed(addr: SocketAddr, bytes: &[u8]) -> Result<Outcome, String> {
    let mut s = connect(addr).await?;
    s.write_all(bytes)
        .await
        .map_err(|e| format!("write: {e}"))?;
    let raw = read_all(&mut s, Duration::from_secs(5), None).await;
    if raw.responses > 1 {
        return Err(format!(
            "{} responses on one connection (a smuggled request was answered)",
            raw.responses
        ));
    }
    match raw.status {
        Some(400..=499) => Ok(Outcome::Rejected),
        None if raw.closed => Ok(Outcome::Rejected),
        Some(200..=299) => Ok(Outcome::Accepted),
        _ => Err(raw.summary()),
    }
}

// === the run ===

/// One sample: a reading under load, then one with the traffic paused (long-lived connections
/// only, idle pooled upstream connections expired).
struct Sample {
    /// Traffic time before it (pauses for earlier samples not counted).
    at: Duration,
    exchanges: u64,
    unexpected: u64,
    /// Whether the transient connections had closed within 15 s of the pause.
    settled: bool,
    load: Reading,
    quiet: Reading,
}

struct Context {
    gw: SocketAddr,
    admin: SocketAddr,
    tally: Tally,
    gate: Gate,
}

/// Spawns a loop that runs `body` until the run is over, pausing when the sampler asks.
fn spawn_loop<F, Fut>(set: &mut JoinSet<()>, cx: &Arc<Context>, mut body: F)
where
    F: FnMut(Arc<Context>, u64) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let cx = cx.clone();
    set.spawn(async move {
        let mut n = 0u64;
        while cx.gate.pass().await {
            body(cx.clone(), n).await;
            n += 1;
        }
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "long: bench/soak.sh runs it (SOAK_MINUTES, SOAK_OUT)"]
async fn soak() {
    let settings = Settings::from_env();
    // The sampler idles about a minute between samples, as long as the gateway's keep-alive
    // timeout (60 s): it drops its idle connection first, so it never races the gateway's close.
    let admin_http = client_builder()
        .pool_idle_timeout(Duration::from_secs(20))
        .build()
        .unwrap();

    // Upstreams, the Consul emulator with three passing instances per service, the gateway.
    let consul = Arc::new(ConsulEmulator::start().await);
    let echo = WsEcho::start().await;
    let sink = TestUpstream::builder().name("sink").start().await;
    let mut churned = Vec::new();
    for name in SERVICES {
        let mut svc = Churned {
            name,
            seq: 0,
            instances: Vec::new(),
            retiring: Vec::new(),
        };
        for _ in 0..3 {
            svc.add(&consul).await;
        }
        churned.push(svc);
    }
    let (mut gateway, wiring) = start_gateway(
        &settings.out,
        consul.url(),
        echo.addr,
        sink.addr(),
        &admin_http,
    )
    .await;
    println!(
        "soak: gateway pid {} on {} (admin {}), {:.1} min, warm-up {:?}, samples every {:?}, output in {}",
        gateway.pid,
        wiring.listen,
        wiring.admin,
        settings.run.as_secs_f64() / 60.0,
        settings.warmup,
        settings.every,
        settings.out.display()
    );

    // The fresh gateway before any traffic.
    let baseline = read_gateway(gateway.pid, &admin_http, &wiring).await;

    let start = Instant::now();
    let cx = Arc::new(Context {
        gw: wiring.listen,
        admin: wiring.admin,
        tally: Tally::new(start),
        gate: Gate::new(),
    });
    let mut loops = JoinSet::new();

    for _ in 0..KEEPALIVE_LOOPS {
        let c = http_client(true);
        spawn_loop(&mut loops, &cx, move |cx, _| {
            let c = c.clone();
            async move {
                let url = format!("http://{}/api/ok", cx.gw);
                cx.tally.run("keepalive", expect_get(&c, &url, b"ok")).await;
                cx.gate.rest(Duration::from_millis(10)).await;
            }
        });
    }
    for _ in 0..NEWCONN_LOOPS {
        let c = http_client(false);
        spawn_loop(&mut loops, &cx, move |cx, n| {
            let c = c.clone();
            async move {
                // Alternately a client that drops its connection and an explicit close.
                if n % 2 == 0 {
                    let url = format!("http://{}/api/ok", cx.gw);
                    cx.tally
                        .run("new_connection", expect_get(&c, &url, b"ok"))
                        .await;
                } else {
                    cx.tally.run("new_connection", close_get(cx.gw)).await;
                }
                cx.gate.rest(Duration::from_millis(20)).await;
            }
        });
    }
    let body = Bytes::from(vec![b'u'; BODY]);
    let c = http_client(true);
    spawn_loop(&mut loops, &cx, move |cx, _| {
        let (c, body) = (c.clone(), body.clone());
        async move {
            let url = format!("http://{}/bulk/upload", cx.gw);
            cx.tally.run("upload_1mib", upload(&c, &url, body)).await;
            cx.gate.rest(Duration::from_millis(250)).await;
        }
    });
    let c = http_client(true);
    spawn_loop(&mut loops, &cx, move |cx, _| {
        let c = c.clone();
        async move {
            let url = format!("http://{}/bulk/big", cx.gw);
            cx.tally.run("download_1mib", download(&c, &url)).await;
            cx.gate.rest(Duration::from_millis(250)).await;
        }
    });
    spawn_loop(&mut loops, &cx, |cx, n| async move {
        cx.tally
            .run("websocket_session", ws_session(cx.gw, n))
            .await;
        cx.gate.rest(Duration::from_millis(100)).await;
    });
    for _ in 0..SLOW_BODY_LOOPS {
        spawn_loop(&mut loops, &cx, |cx, _| async move {
            cx.tally.run("slow_body", drip_body(cx.gw)).await;
        });
    }
    spawn_loop(&mut loops, &cx, |cx, _| async move {
        cx.tally.run("slow_head", drip_head(cx.gw)).await;
    });
    spawn_loop(&mut loops, &cx, |cx, _| async move {
        cx.tally.run("slowloris", slowloris(cx.gw)).await;
    });
    spawn_loop(&mut loops, &cx, |cx, _| async move {
        cx.tally.run("slow_reader", slow_read(cx.gw)).await;
    });
    spawn_loop(&mut loops, &cx, |cx, n| async move {
        let (name, bytes) = MALFORMED[n as usize % MALFORMED.len()];
        let kind = format!("malformed {name}");
        cx.tally.run(&kind, malformed(cx.gw, bytes)).await;
        cx.gate.rest(Duration::from_millis(100)).await;
    });

    // Held WebSockets: opened once, a message each every 5 s, closed at the end. One task owns
    // them, so it parks with them open: they are part of the quiesced state.
    {
        let cx = cx.clone();
        let mut held: Vec<Ws> = Vec::new();
        for _ in 0..HELD_WEBSOCKETS {
            held.push(
                ws_open(cx.gw, "/ws/held")
                    .await
                    .expect("open a held WebSocket"),
            );
        }
        loops.spawn(async move {
            let mut round = 0u64;
            while cx.gate.pass().await {
                for (i, ws) in held.iter_mut().enumerate() {
                    let r = tokio::time::timeout(
                        OP_LIMIT,
                        ws_echo(ws, format!("held {i} round {round}")),
                    )
                    .await
                    .unwrap_or_else(|_| Err("no echo within the limit".into()));
                    match r {
                        Ok(()) => cx.tally.record("websocket_held", Ok(Outcome::Ok)),
                        Err(e) => {
                            cx.tally.record("websocket_held", Err(e));
                            // Keep the number held constant.
                            match ws_open(cx.gw, "/ws/held").await {
                                Ok(fresh) => *ws = fresh,
                                Err(e) => cx.tally.record("websocket_held", Err(e)),
                            }
                        }
                    }
                }
                round += 1;
                cx.gate.rest(Duration::from_secs(5)).await;
            }
            for ws in held {
                let r = tokio::time::timeout(Duration::from_secs(10), ws_close(ws))
                    .await
                    .unwrap_or_else(|_| Err("close did not finish".into()));
                cx.tally.record("websocket_held", r.map(|()| Outcome::Ok));
            }
        });
    }

    // Reloads: the next generation of the file, POST /reload, then the new header is served.
    {
        let cx = cx.clone();
        // Own clients for the reload and churn tasks: each keeps one connection per listener,
        // so the connections open at a quiesced sample are the same every time.
        let http = http_client(true);
        let config = settings.out.join("gateway.toml");
        let wiring = wiring.clone();
        loops.spawn(async move {
            let mut generation = 0u64;
            // The first reload at once, then one every RELOAD_EVERY.
            let mut next = Instant::now();
            while cx.gate.pass().await {
                if Instant::now() < next {
                    cx.gate
                        .rest(
                            next.saturating_duration_since(Instant::now())
                                .min(Duration::from_millis(500)),
                        )
                        .await;
                    continue;
                }
                next += RELOAD_EVERY;
                generation += 1;
                write_config(&config, &config_toml(&wiring, generation));
                cx.tally
                    .run("reload", reload(&http, cx.gw, cx.admin, generation))
                    .await;
            }
        });
    }

    // Consul churn: one change every 2 s, alternating between the services.
    let churn = {
        let cx = cx.clone();
        let consul = consul.clone();
        let http = http_client(true);
        tokio::spawn(async move {
            let mut turn = 0usize;
            while cx.gate.pass().await {
                let i = turn % churned.len();
                let svc = &mut churned[i];
                let what = svc.churn(&consul).await;
                cx.tally.record(what, Ok(Outcome::Ok));
                for svc in churned.iter_mut() {
                    svc.retire(&http, cx.admin, &cx.tally).await;
                }
                turn += 1;
                cx.gate.rest(CHURN_EVERY).await;
            }
            churned
        })
    };
    // The loops in the JoinSet, plus the churn task.
    let loop_count = loops.len() + 1;

    // A sample after every `every` of traffic, until the run's traffic time is over.
    let mut samples = vec![Sample {
        at: Duration::ZERO,
        exchanges: 0,
        unexpected: 0,
        settled: true,
        load: baseline.clone(),
        quiet: baseline,
    }];
    let mut traffic = Duration::ZERO;
    let mut crashed = None;
    while traffic < settings.run {
        let span = settings.every.min(settings.run - traffic);
        tokio::time::sleep(span).await;
        traffic += span;
        if let Some(status) = gateway.exited() {
            crashed = Some(status);
            break;
        }
        let load = read_gateway(gateway.pid, &admin_http, &wiring).await;
        if !cx.gate.pause(loop_count, Duration::from_secs(60)).await {
            let parked = *cx.gate.parked.borrow();
            cx.tally.record(
                "sampler",
                Err(format!(
                    "traffic did not pause within 60 s ({parked} of {loop_count} loops parked)"
                )),
            );
        }
        // Connections of the last exchanges close asynchronously. What stays: one connection
        // per keep-alive client (the GET loops, upload, download), the reload client's two
        // (admin, and main for its check), the churn client's and the sampler's. Upgraded
        // connections (the held WebSockets) are not in `connections_open`.
        let floor = (KEEPALIVE_LOOPS + 6) as f64;
        let settled = eventually(Duration::from_secs(15), || async {
            read_gateway(gateway.pid, &admin_http, &wiring).await.conns <= floor
        })
        .await;
        // Idle pooled upstream connections expire on a timer; there is no event to await.
        tokio::time::sleep(UPSTREAM_IDLE + Duration::from_secs(1)).await;
        let quiet = read_gateway(gateway.pid, &admin_http, &wiring).await;
        cx.gate.resume();
        let totals = cx.tally.totals();
        let s = Sample {
            at: traffic,
            exchanges: totals.total(),
            unexpected: totals.unexpected,
            settled,
            load,
            quiet,
        };
        println!(
            "soak: {:>5.1} min  exchanges {:>8}  unexpected {:>4}  RSS {:>6.1} MiB  fds {:>4}  tasks {:>4}  conns {:>3}  sockets down/up/consul {}  (under load: RSS {:.1} MiB, fds {}, tasks {}; driver RSS {:.0} MiB)",
            s.at.as_secs_f64() / 60.0,
            s.exchanges,
            s.unexpected,
            mib(s.quiet.rss_kib),
            s.quiet.fds,
            s.quiet.tasks,
            s.quiet.conns,
            s.quiet.sockets.brief(),
            mib(s.load.rss_kib),
            s.load.fds,
            s.load.tasks,
            mib(own_rss_kib()),
        );
        samples.push(s);
    }

    // Stop the traffic; every loop ends after its current exchange.
    cx.gate.stop.cancel();
    cx.gate.resume();
    let stopped = tokio::time::timeout(Duration::from_secs(90), async {
        while loops.join_next().await.is_some() {}
    })
    .await;
    if stopped.is_err() {
        cx.tally.record(
            "shutdown",
            Err("traffic loops did not stop within 90 s".into()),
        );
    }
    let churned = churn.await.unwrap();
    // Idle pooled upstream connections expire on a timer; there is no event to await.
    tokio::time::sleep(UPSTREAM_IDLE + Duration::from_secs(1)).await;
    let after = match crashed {
        None => Some(read_gateway(gateway.pid, &admin_http, &wiring).await),
        Some(_) => None,
    };
    let exit = match crashed {
        Some(s) => Err(format!("the gateway exited during the run: {s}")),
        None => match gateway.terminate(Duration::from_secs(20)).await {
            Some(s) if s.success() => Ok(s),
            Some(s) => Err(format!("the gateway exited with {s} after SIGTERM")),
            None => Err("the gateway did not exit within 20 s of SIGTERM".into()),
        },
    };
    let log = std::fs::read_to_string(&gateway.log).unwrap_or_default();
    for svc in churned {
        svc.shutdown().await;
    }
    let sink_hits = sink.hits();
    sink.shutdown().await;

    let report = Report {
        settings: &settings,
        samples: &samples,
        after,
        tally: &cx.tally,
        exit: &exit,
        log: &log,
        sink_hits,
    };
    let (markdown, verdict) = report.render();
    std::fs::write(settings.out.join("soak.md"), &markdown).unwrap();
    std::fs::write(settings.out.join("samples.csv"), report.csv()).unwrap();
    println!("\n{markdown}");
    if exit.is_err() || crashed.is_some() {
        println!("gateway log (last lines):\n{}", gateway.log_tail(30));
    }
    assert!(verdict.pass, "soak failed: {}", verdict.why.join("; "));
}

/// Writes nothing; asks the gateway to reload the file (already written for `generation`) and
/// checks that the new response header is served right after.
async fn reload(
    http: &reqwest::Client,
    gw: SocketAddr,
    admin: SocketAddr,
    generation: u64,
) -> Result<Outcome, String> {
    let resp = http
        .post(format!("http://{admin}/reload"))
        .send()
        .await
        .map_err(|e| format!("POST /reload: {}", chain(&e)))?;
    let status = resp.status();
    let doc: serde_json::Value = resp
        .json()
        .await
        .map_err(|e| format!("POST /reload body: {}", chain(&e)))?;
    if status != 200 || doc["reloaded"] != true || doc["restart_needed"] != serde_json::json!([]) {
        return Err(format!("POST /reload: {status} {doc}"));
    }
    let resp = http
        .get(format!("http://{gw}/api/ok"))
        .send()
        .await
        .map_err(|e| format!("GET after reload: {}", chain(&e)))?;
    let seen = resp
        .headers()
        .get("x-soak-generation")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let _ = resp.bytes().await;
    if seen.as_deref() != Some(generation.to_string().as_str()) {
        return Err(format!(
            "after reloading generation {generation}, X-Soak-Generation is {seen:?}"
        ));
    }
    Ok(Outcome::Ok)
}

/// This test process's RSS: its upstreams record every request they receive, so it grows.
fn own_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn growth(from: f64, to: f64) -> f64 {
    if from > 0.0 {
        (to - from) / from
    } else {
        f64::NAN
    }
}

/// Medians over consecutive samples.
struct Window {
    from: Duration,
    to: Duration,
    rss_mib: f64,
    fds: f64,
    tasks: f64,
}

impl Window {
    fn of(samples: &[&Sample]) -> Self {
        let median = |f: &dyn Fn(&Sample) -> f64| {
            let mut v: Vec<f64> = samples.iter().map(|s| f(s)).collect();
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        Self {
            from: samples[0].at,
            to: samples[samples.len() - 1].at,
            rss_mib: median(&|s| mib(s.quiet.rss_kib)),
            fds: median(&|s| s.quiet.fds as f64),
            tasks: median(&|s| s.quiet.tasks),
        }
    }

    fn span(&self) -> String {
        let m = |d: Duration| d.as_secs_f64() / 60.0;
        if self.from == self.to {
            format!("at {:.1} min", m(self.from))
        } else {
            format!("median of {:.1}–{:.1} min", m(self.from), m(self.to))
        }
    }
}

struct Verdict {
    pass: bool,
    why: Vec<String>,
}

struct Report<'a> {
    settings: &'a Settings,
    samples: &'a [Sample],
    after: Option<Reading>,
    tally: &'a Tally,
    exit: &'a Result<ExitStatus, String>,
    log: &'a str,
    sink_hits: usize,
}

impl Report<'_> {
    /// Quiesced figures right after the warm-up and at the end: medians of up to five samples
    /// each, so a single sample caught at an allocator high-water mark does not decide alone
    /// (the gateway's RSS moves by about a megabyte from one quiesced sample to the next).
    fn windows(&self) -> Option<(Window, Window)> {
        let after: Vec<&Sample> = self
            .samples
            .iter()
            .filter(|s| s.at >= self.settings.warmup && !s.at.is_zero())
            .collect();
        let n = (after.len() / 2).min(5);
        if n == 0 {
            return None;
        }
        Some((
            Window::of(&after[..n]),
            Window::of(&after[after.len() - n..]),
        ))
    }

    fn csv(&self) -> String {
        let mut out = String::from(
            "traffic_seconds,exchanges,unexpected,rss_kib,fds,tasks,conns,sockets_down,sockets_up,sockets_consul,close_wait,load_rss_kib,load_fds,load_tasks,load_conns\n",
        );
        for s in self.samples {
            let _ = writeln!(
                out,
                "{:.0},{},{},{},{},{},{},{},{},{},{},{},{},{},{}",
                s.at.as_secs_f64(),
                s.exchanges,
                s.unexpected,
                s.quiet.rss_kib,
                s.quiet.fds,
                s.quiet.tasks,
                s.quiet.conns,
                s.quiet.sockets.downstream,
                s.quiet.sockets.upstream,
                s.quiet.sockets.consul,
                s.quiet.sockets.close_wait,
                s.load.rss_kib,
                s.load.fds,
                s.load.tasks,
                s.load.conns
            );
        }
        out
    }

    fn render(&self) -> (String, Verdict) {
        let mut why = Vec::new();
        let totals = self.tally.totals();
        if totals.unexpected > 0 {
            why.push(format!("{} unexpected errors", totals.unexpected));
        }
        if let Err(e) = self.exit {
            why.push(e.clone());
        }
        let panics = self.log.matches("panicked").count();
        if panics > 0 {
            why.push(format!("{panics} panics in the gateway log"));
        }
        let mut lines = Vec::new();
        match self.windows() {
            Some((warm, end)) => {
                for (what, from, to, unit) in [
                    ("RSS", warm.rss_mib, end.rss_mib, " MiB"),
                    ("descriptors", warm.fds, end.fds, ""),
                    ("tasks", warm.tasks, end.tasks, ""),
                ] {
                    let g = growth(from, to);
                    // Tasks are shown, not judged: the pass criteria are RSS and descriptors.
                    let judged = what != "tasks";
                    let ok = !judged || g < GROWTH_LIMIT;
                    if !ok {
                        why.push(format!("{what} grew {:+.1} %", g * 100.0));
                    }
                    lines.push(format!(
                        "- {what}: {from:.1}{unit} after warm-up ({}) → {to:.1}{unit} at the end ({}): {:+.1} %{}",
                        warm.span(),
                        end.span(),
                        g * 100.0,
                        match (judged, ok) {
                            (false, _) => " (shown, not judged)".to_owned(),
                            (true, true) => format!(" (limit {:.0} %)", GROWTH_LIMIT * 100.0),
                            (true, false) => {
                                format!(" — over the {:.0} % limit", GROWTH_LIMIT * 100.0)
                            }
                        }
                    ));
                }
            }
            None => why.push("too few samples after the warm-up".into()),
        }
        let pass = why.is_empty();

        let mut md = String::new();
        let s = self.settings;
        let _ = writeln!(
            md,
            "- run: {:.1} min of traffic, warm-up {:.1} min, a sample every {} s (quiesced: traffic paused, \
             transient connections closed, idle pooled upstream connections expired; `under load` is read just before the pause)",
            s.run.as_secs_f64() / 60.0,
            s.warmup.as_secs_f64() / 60.0,
            s.every.as_secs()
        );
        let _ = writeln!(
            md,
            "- traffic: {KEEPALIVE_LOOPS} keep-alive GET loops (10 ms apart), {NEWCONN_LOOPS} new-connection GET loops, \
             1 MiB uploads (echoed size) and downloads every 250 ms, WebSocket sessions of 5 echoes every 100 ms, \
             {HELD_WEBSOCKETS} WebSockets held open (an echo each every 5 s), {SLOW_BODY_LOOPS} drip-fed bodies, a drip-fed head, \
             a slowloris past `header_read_timeout`, a slow reader of 1 MiB, malformed requests every 100 ms \
             ({}); Consul: a change every {} s (register, deregister, or check passing → warning → critical → passing; \
             at least one passing instance per service); config rewritten and `POST /reload` every {} s",
            MALFORMED.map(|(n, _)| n).join(", "),
            CHURN_EVERY.as_secs(),
            RELOAD_EVERY.as_secs()
        );
        md.push('\n');
        md.push_str("| traffic min | exchanges | unexpected | RSS MiB | fds | tasks | conns open | sockets down/up/consul | RSS MiB (load) | fds (load) | tasks (load) |\n");
        md.push_str("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
        for s in self.samples {
            let _ = writeln!(
                md,
                "| {:.1} | {} | {} | {:.1} | {} | {} | {}{} | {} | {:.1} | {} | {} |",
                s.at.as_secs_f64() / 60.0,
                s.exchanges,
                s.unexpected,
                mib(s.quiet.rss_kib),
                s.quiet.fds,
                s.quiet.tasks,
                s.quiet.conns,
                if s.settled { "" } else { " (not settled)" },
                s.quiet.sockets.brief(),
                mib(s.load.rss_kib),
                s.load.fds,
                s.load.tasks,
            );
        }
        if let Some(a) = &self.after {
            let _ = writeln!(
                md,
                "| after the traffic | | | {:.1} | {} | {} | {} | {} | | | |",
                mib(a.rss_kib),
                a.fds,
                a.tasks,
                a.conns,
                a.sockets.brief()
            );
        }
        md.push_str(
            "\nMinutes are traffic time (the pauses for samples not counted); the first row is the \
             fresh gateway before any traffic.\n",
        );
        md.push_str("\n| exchange | ok | refused as expected | malformed but accepted (2xx) | unexpected |\n");
        md.push_str("|---|---:|---:|---:|---:|\n");
        for (kind, c) in self.tally.kinds.lock().unwrap().iter() {
            let _ = writeln!(
                md,
                "| {kind} | {} | {} | {} | {} |",
                c.ok, c.rejected, c.accepted, c.unexpected
            );
        }
        let _ = writeln!(
            md,
            "\nThe sink upstream behind the malformed requests received {} of them.",
            self.sink_hits
        );
        let warnings = self.log.lines().filter(|l| l.contains("WARN")).count();
        let errors = self.log.lines().filter(|l| l.contains("ERROR")).count();
        let _ = writeln!(
            md,
            "\n**Verdict: {}**{}\n",
            if pass { "PASS" } else { "FAIL" },
            if pass {
                String::new()
            } else {
                format!(" ({})", why.join("; "))
            }
        );
        let _ = writeln!(md, "- unexpected errors: {}", totals.unexpected);
        for l in &lines {
            let _ = writeln!(md, "{l}");
        }
        let _ = writeln!(
            md,
            "- gateway: {}; its log has {warnings} WARN and {errors} ERROR lines, {panics} panics",
            match self.exit {
                Ok(s) => format!("exited {s} after SIGTERM"),
                Err(e) => e.clone(),
            }
        );
        if let Some(a) = &self.after {
            let _ = writeln!(
                md,
                "\nGateway sockets after the traffic stopped (the sampler's admin connection stays):\n\n```"
            );
            for l in &a.sockets.list {
                let _ = writeln!(md, "{l}");
            }
            md.push_str("```\n");
        }
        let errors = self.tally.errors.lock().unwrap();
        if !errors.is_empty() {
            md.push_str("\n| unexpected error | times | first at |\n|---|---:|---:|\n");
            for (what, (n, at)) in errors.iter() {
                let _ = writeln!(md, "| {} | {n} | {at:.0} s |", what.replace('|', "\\|"));
            }
        }
        (md, Verdict { pass, why })
    }
}
