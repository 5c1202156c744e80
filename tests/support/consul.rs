//! Consul HTTP API emulator for integration tests: one agent, one server, one datacenter on
//! loopback, with Consul's blocking queries, headers, body shapes and errors (API.md §9) plus
//! fault injection. It runs no health checks itself; tests set check states directly.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{
    HeaderName, HeaderValue, ACCEPT_ENCODING, ALLOW, CONTENT_ENCODING, CONTENT_TYPE,
};
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::Serialize;
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{oneshot, watch};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;

mod ca;
mod filter;

// Not every test binary uses every helper.
#[allow(unused_imports)]
pub use ca::{colon_hex, pem_blocks, service_uri, uri_sans, TestCa, DEFAULT_LEAF_TTL};

/// Consul version the emulator claims in node meta (matches the main real capture).
const CONSUL_VERSION: &str = "1.16.2";
/// Raft index reached by the bootstrap write (node, `serfHealth`, `consul` service).
const BOOTSTRAP_INDEX: u64 = 10;
/// Largest request body read; Consul caps KV values at 512 KiB and the rest is far smaller.
const MAX_BODY: usize = 1 << 20;
/// KV value limit of a real agent (`kv_max_value_size`).
const MAX_KV_VALUE: usize = 512 * 1024;
/// Body go-connlimit writes when a client IP is over `http_max_conns_per_client`.
const TOO_MANY_CONNS: &str =
    "Your IP is issuing too many concurrent connections, please rate limit your calls\n";
const TEXT_PLAIN: &str = "text/plain; charset=utf-8";
const APPLICATION_JSON: &str = "application/json";
const MAINT_PREFIX: &str = "_service_maintenance:";
const NODE_MAINT: &str = "_node_maintenance";
const DEFAULT_SERVICE_MAINT_REASON: &str =
    "Maintenance mode is enabled for this service, but no reason was provided. This is a default message.";
const DEFAULT_NODE_MAINT_REASON: &str =
    "Maintenance mode is enabled for this node, but no reason was provided. This is a default message.";
const ANONYMOUS_SUFFIX: &str =
    "The anonymous token is used implicitly when a request does not specify a token.";

// === public types ===

/// Knobs for [`ConsulEmulator::start_with`]. `Default` gives a real agent's defaults.
#[derive(Debug, Clone)]
pub struct EmulatorOptions {
    /// `max_query_time`: longer `wait` values are clamped to it. Default 600 s.
    pub max_wait: Duration,
    /// `default_query_time`: the wait used when `wait` is missing or `<= 0`. Default 300 s.
    /// Shorten it only in tests that mean to, since clients should always send `wait`.
    pub default_wait: Duration,
    /// Add Consul's random `[0, wait/16)` to every blocking wait. Default `true`; turn it off
    /// for tests that bound how long a timed-out blocking query takes.
    pub jitter: bool,
    /// ACL mode (default policy `deny`); `None` (default) means ACLs are disabled and tokens
    /// are ignored, as on an agent without `acl.enabled`.
    pub acl: Option<AclConfig>,
    /// `limits.http_max_conns_per_client`: concurrent connections per client IP before new
    /// ones get go-connlimit's raw 429. Default 200; 0 disables the limit.
    pub max_conns_per_client: usize,
    /// The only datacenter; any other `?dc=` gets 500 `No path to datacenter`. Default `dc1`.
    pub datacenter: String,
    /// The agent's node name; HTTP registrations land here. Default `node1`.
    pub node: String,
    /// The agent node's address (`Node.Address`). Default `127.0.0.1`.
    pub node_address: String,
    /// Register the server's own `consul` service (port 8300, no tags) at start, as every real
    /// cluster lists it in `/v1/catalog/services`. Default `true`.
    pub consul_service: bool,
}

impl Default for EmulatorOptions {
    fn default() -> Self {
        Self {
            max_wait: Duration::from_secs(600),
            default_wait: Duration::from_secs(300),
            jitter: true,
            acl: None,
            max_conns_per_client: 200,
            datacenter: "dc1".to_owned(),
            node: "node1".to_owned(),
            node_address: "127.0.0.1".to_owned(),
            consul_service: true,
        }
    }
}

/// ACL mode: known token secrets and what each may touch. Requests without a token act as
/// `anonymous`, which (default policy `deny`) can read and write nothing.
#[derive(Debug, Clone, Default)]
pub struct AclConfig {
    /// Secret ID to scope. Any other secret gets 403 `ACL not found`.
    pub tokens: HashMap<String, TokenScope>,
}

impl AclConfig {
    /// No tokens yet (only `anonymous`).
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a token `secret` with `scope`.
    pub fn token(mut self, secret: impl Into<String>, scope: TokenScope) -> Self {
        self.tokens.insert(secret.into(), scope);
        self
    }
}

/// What a token may do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenScope {
    /// Management-like: every service, node and KV key, read and write.
    All,
    /// `service:write` (so also read) on exactly these service names plus `node:read`
    /// everywhere; no KV access and no node writes.
    Services(HashSet<String>),
}

impl TokenScope {
    /// `TokenScope::Services` from any list of names.
    pub fn services<I, S>(names: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Self::Services(names.into_iter().map(Into::into).collect())
    }
}

/// One service instance for [`ConsulEmulator::register`].
#[derive(Debug, Clone)]
pub struct Registration {
    /// Service ID, unique per node.
    pub id: String,
    /// Service name (what `/v1/health/service/:name` looks up).
    pub name: String,
    /// `Service.Address`; empty means "dial `Node.Address`" and omits `TaggedAddresses`.
    pub address: String,
    /// `Service.Port`.
    pub port: u16,
    /// `Service.Tags`, case preserved.
    pub tags: Vec<String>,
    /// `(Passing, Warning)`; `None` renders Consul's default `{1, 1}`.
    pub weights: Option<(u32, u32)>,
    /// `Service.Meta`; empty renders as `null`, like a registration without `Meta`.
    pub meta: HashMap<String, String>,
    /// Node name; `None` means the agent's node ([`EmulatorOptions::node`]).
    pub node: Option<String>,
    /// Node address when `node` is new; `None` means [`EmulatorOptions::node_address`].
    pub node_address: Option<String>,
    /// `Service.Kind` (`""` for a typical service, `"connect-proxy"` for a sidecar).
    pub kind: String,
    /// `Service.Proxy.DestinationServiceName` (and `...ID`) of a sidecar.
    pub proxy_destination: Option<String>,
    /// `Service.Connect.Native`.
    pub connect_native: bool,
}

impl Registration {
    /// An instance on the agent's node with no tags, default weights and no meta.
    pub fn new(
        id: impl Into<String>,
        name: impl Into<String>,
        address: impl Into<String>,
        port: u16,
    ) -> Self {
        Self {
            id: id.into(),
            name: name.into(),
            address: address.into(),
            port,
            tags: Vec::new(),
            weights: None,
            meta: HashMap::new(),
            node: None,
            node_address: None,
            kind: String::new(),
            proxy_destination: None,
            connect_native: false,
        }
    }

    /// Makes the instance a `connect-proxy` sidecar for service `destination` (found by
    /// `/v1/health/connect/<destination>`).
    pub fn sidecar_for(mut self, destination: impl Into<String>) -> Self {
        self.kind = "connect-proxy".to_owned();
        self.proxy_destination = Some(destination.into());
        self
    }

    /// Marks the instance `Connect.Native` (found by `/v1/health/connect/<name>`).
    pub fn connect_native(mut self) -> Self {
        self.connect_native = true;
        self
    }

    /// Replaces the tags.
    pub fn tags<I, S>(mut self, tags: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.tags = tags.into_iter().map(Into::into).collect();
        self
    }

    /// Sets `Weights {Passing, Warning}`. Not validated, so tests can feed odd values.
    pub fn weights(mut self, passing: u32, warning: u32) -> Self {
        self.weights = Some((passing, warning));
        self
    }

    /// Adds one `Service.Meta` pair.
    pub fn meta(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.meta.insert(key.into(), value.into());
        self
    }

    /// Places the instance on node `name` (created with `address` and a passing
    /// `serfHealth` check if new).
    pub fn node(mut self, name: impl Into<String>, address: impl Into<String>) -> Self {
        self.node = Some(name.into());
        self.node_address = Some(address.into());
        self
    }
}

/// One HTTP request as the emulator received it (recorded before any fault or routing).
#[derive(Debug, Clone)]
pub struct RecordedRequest {
    /// Request method.
    pub method: Method,
    /// Path exactly as on the request line (not percent-decoded), without the query.
    pub path: String,
    /// Query pairs in order, percent- and `+`-decoded as Go's `url.ParseQuery` does; a bare
    /// `?passing` shows as `("passing", "")`.
    pub query: Vec<(String, String)>,
    /// All request headers.
    pub headers: HeaderMap,
    /// Request body (empty for reads).
    pub body: Bytes,
    /// When the request head and body had arrived.
    pub at: Instant,
}

impl RecordedRequest {
    /// First value of query parameter `key`, if present (`Some("")` for a bare flag).
    pub fn query_value(&self, key: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// Whether query parameter `key` was sent at all.
    pub fn has_query(&self, key: &str) -> bool {
        self.query.iter().any(|(k, _)| k == key)
    }

    /// All values of query parameter `key` (e.g. repeated `tag`).
    pub fn query_values(&self, key: &str) -> Vec<&str> {
        self.query
            .iter()
            .filter(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
            .collect()
    }

    /// The `index` parameter as sent, parsed; `None` when absent or not a number.
    pub fn index(&self) -> Option<u64> {
        self.query_value("index").and_then(|v| v.parse().ok())
    }

    /// The `wait` parameter parsed as a Go duration (`"60000ms"` → 60 s); `None` when absent
    /// or invalid. Negative waits come back as zero.
    pub fn wait(&self) -> Option<Duration> {
        self.query_value("wait")
            .and_then(parse_go_duration)
            .map(|d| Duration::from_nanos(d.max(0).unsigned_abs()))
    }

    /// The ACL token the request carried, in Consul's lookup order: `?token=`, then
    /// `X-Consul-Token`, then `Authorization: Bearer`.
    pub fn token(&self) -> Option<String> {
        request_token(&self.query, &self.headers)
    }
}

/// A running Consul emulator. Dropping it stops the server (state is discarded).
///
/// Every test-side write (`register`, `set_check`, ...) is one raft write: it bumps the global
/// index, stamps `ModifyIndex` on what it touched and wakes the blocking queries whose scope
/// it changed. Writes that change nothing are no-ops that return the current index, as a real
/// catalog skips identical updates; use [`ConsulEmulator::idempotent_write`] to force a wake-up
/// with identical data.
#[derive(Debug)]
pub struct ConsulEmulator {
    shared: Arc<Shared>,
    addr: SocketAddr,
    /// The accept loop while serving; `None` between `stop` and `restart`.
    server: Mutex<Option<ServerTask>>,
}

#[derive(Debug)]
struct ServerTask {
    stop: oneshot::Sender<()>,
    task: JoinHandle<()>,
}

// === impl ConsulEmulator ===

impl ConsulEmulator {
    /// The Connect trust domain, `<uuid>.consul`.
    pub fn trust_domain(&self) -> String {
        self.shared.state().ca.trust_domain.clone()
    }

    /// `spiffe://<td>/ns/default/dc/<dc>/svc/<service>`.
    pub fn service_uri(&self, service: &str) -> String {
        service_uri(&self.trust_domain(), &self.shared.opts.datacenter, service)
    }

    /// Every listed root certificate (active or not), concatenated PEM.
    pub fn roots_pem(&self) -> String {
        self.shared.state().ca.roots_pem()
    }

    /// `(cert chain PEM, SEC1 key PEM)` of a fresh leaf for `service` from the active root
    /// (chain = leaf + the active root's intermediates), without touching the agent's cache.
    pub fn issue_leaf(&self, service: &str) -> (String, String) {
        let (chain, key, _, _) = self.shared.state().ca.mint(service);
        (chain, key)
    }

    /// A separate CA whose leaves claim valid SPIFFE IDs of this trust domain.
    pub fn foreign_ca(&self) -> TestCa {
        TestCa::new(&self.trust_domain(), &self.shared.opts.datacenter)
    }

    /// CA rotation: a new active root (the old one stays listed, inactive); with
    /// `cross_sign` the old root signs the new one and that certificate rides in the new
    /// root's `IntermediateCerts` and every new leaf's `CertPEM`. Cached leaves are re-issued
    /// at once (the agent's `[0, 30s)` jitter is left out). Returns the write's index.
    pub fn rotate_root(&self, cross_sign: bool) -> u64 {
        self.shared.write(|st| {
            let idx = st.next_index();
            st.ca.rotate(cross_sign, idx);
            idx
        })
    }

    /// Removes rotated-out roots (what the leader's pruner does after 2 x leaf TTL).
    /// Returns the write's index, or the current one if nothing was pruned.
    pub fn prune_old_roots(&self) -> u64 {
        self.shared.write(|st| {
            if st.ca.has_inactive() {
                let idx = st.next_index();
                st.ca.prune(idx);
            }
            st.raft
        })
    }

    /// Re-issues `service`'s leaf now (new key, serial and higher `ModifyIndex`), waking
    /// its blocked leaf queries. Returns the new `ModifyIndex`.
    pub fn force_renew_leaf(&self, service: &str) -> u64 {
        self.shared.write(|st| {
            let idx = st.next_index();
            st.ca.issue(service, idx);
            idx
        })
    }

    /// Lifetime of leaves issued from now on (default 72h). NotBefore is now-1m, so a TTL
    /// under a minute issues already expired leaves, as Consul would.
    pub fn set_leaf_ttl(&self, ttl: Duration) {
        self.shared.state().ca.set_leaf_ttl(ttl);
    }
}

impl ConsulEmulator {
    /// Starts with [`EmulatorOptions::default`] on `127.0.0.1:0`.
    pub async fn start() -> Self {
        Self::start_with(EmulatorOptions::default()).await
    }

    /// Starts with `opts` on `127.0.0.1:0`. The catalog already holds the agent node with a
    /// passing `serfHealth` check and, unless disabled, the `consul` service, at index 10.
    pub async fn start_with(opts: EmulatorOptions) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind consul emulator on 127.0.0.1:0");
        let addr = listener.local_addr().expect("consul emulator local_addr");
        let shared = Shared::new(opts);
        let server = spawn_server(Arc::clone(&shared), listener);
        Self {
            shared,
            addr,
            server: Mutex::new(Some(server)),
        }
    }

    /// The bound address (loopback; the port survives `stop`/`restart`).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`, without a trailing slash.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The current raft index (the highest index any write has used), never 0.
    pub fn index(&self) -> u64 {
        self.shared.state().raft.max(1)
    }

    /// Registers or updates a service instance (creating its node if needed) with a TTL
    /// check `service:<id>` named `Service '<name>' check` that starts `passing`. On
    /// re-registration the existing check keeps its status, as Consul does. Returns the
    /// index of the write, or the current index if nothing changed.
    pub fn register(&self, r: Registration) -> u64 {
        let opts = &self.shared.opts;
        let node = r.node.clone().unwrap_or_else(|| opts.node.clone());
        let node_address = r
            .node_address
            .clone()
            .unwrap_or_else(|| opts.node_address.clone());
        let def = ServiceDef {
            node,
            node_address,
            id: r.id.clone(),
            name: r.name.clone(),
            tags: r.tags.clone(),
            tagged: default_tagged_addresses(&r.address, r.port, BTreeMap::new()),
            address: r.address,
            meta: (!r.meta.is_empty()).then(|| r.meta.into_iter().collect()),
            port: r.port,
            weights: r.weights.unwrap_or((1, 1)),
            enable_tag_override: false,
            mesh: Mesh {
                kind: r.kind,
                destination: r.proxy_destination,
                native: r.connect_native,
            },
        };
        let check = CheckDef {
            id: format!("service:{}", r.id),
            name: format!("Service '{}' check", r.name),
            status: "passing".to_owned(),
            notes: String::new(),
            output: String::new(),
            kind: "ttl".to_owned(),
            interval: String::new(),
            timeout: String::new(),
            ttl: None,
        };
        self.shared.write(|st| st.register(def, vec![check], false))
    }

    /// Removes every instance with this service ID (on any node) and its checks. Unknown
    /// IDs are a no-op that returns the current index.
    pub fn deregister(&self, service_id: &str) -> u64 {
        self.shared.write(|st| st.deregister_everywhere(service_id))
    }

    /// Forgets every service registered on the agent's own node, as an agent restarted
    /// without its data directory does. Returns the index of the last write.
    pub fn forget_agent_services(&self) -> u64 {
        let node = self.shared.opts.node.clone();
        self.shared.write(|st| {
            let ids: Vec<String> = st
                .services
                .keys()
                .filter(|(n, _)| *n == node)
                .map(|(_, id)| id.clone())
                .collect();
            let idx = st.next_index();
            for id in ids {
                st.remove_service(&node, &id, idx);
            }
            idx
        })
    }

    /// Sets status (`passing`, `warning` or `critical`) and output of check `service:<id>` of
    /// every instance with this ID.
    ///
    /// # Panics
    /// On an unknown service ID or status: both are test bugs.
    pub fn set_check(&self, service_id: &str, status: &str, output: &str) -> u64 {
        assert!(valid_status(status), "set_check: invalid status {status:?}");
        let check_id = format!("service:{service_id}");
        let nodes = self.shared.state().nodes_with_service(service_id);
        assert!(
            !nodes.is_empty(),
            "set_check: unknown service ID {service_id:?}"
        );
        self.shared.write(|st| {
            let mut idx = st.raft;
            for node in &nodes {
                if let Some(i) = st.update_check(node, &check_id, status, output) {
                    idx = i;
                }
            }
            idx
        })
    }

    /// Enables or disables maintenance of every instance with this ID: a `critical` check
    /// `_service_maintenance:<id>` named `Service Maintenance Mode` whose `Notes` are
    /// `reason` (or Consul's default text when empty). Idempotent.
    ///
    /// # Panics
    /// On an unknown service ID.
    pub fn set_maintenance(&self, service_id: &str, enable: bool, reason: &str) -> u64 {
        let nodes = self.shared.state().nodes_with_service(service_id);
        assert!(
            !nodes.is_empty(),
            "set_maintenance: unknown service ID {service_id:?}"
        );
        self.shared.write(|st| {
            let mut idx = st.raft;
            for node in &nodes {
                idx = st.service_maintenance(node, service_id, enable, reason);
            }
            idx
        })
    }

    /// Sets the `serfHealth` check of `node` (`passing`, `warning` or `critical`); this also
    /// bumps the health index of every service on the node.
    ///
    /// # Panics
    /// On an unknown node or status.
    pub fn set_node_check(&self, node: &str, status: &str) -> u64 {
        assert!(
            valid_status(status),
            "set_node_check: invalid status {status:?}"
        );
        assert!(
            self.shared.state().nodes.contains_key(node),
            "set_node_check: unknown node {node:?}"
        );
        let output = if status == "passing" {
            "Agent alive and reachable"
        } else {
            "Agent not live or unreachable"
        };
        self.shared.write(|st| {
            st.update_check(node, "serfHealth", status, output)
                .unwrap_or(st.raft)
        })
    }

    /// A raft write that bumps service `service`'s health index (and the global index) but
    /// changes no data: blocked `/v1/health/service/<service>` queries wake up with an
    /// identical body and a higher `X-Consul-Index`. For a service with no instances only the
    /// global index moves.
    pub fn idempotent_write(&self, service: &str) -> u64 {
        self.shared.write(|st| {
            let idx = st.next_index();
            if let Some(i) = st.service_index.get_mut(service) {
                *i = idx;
            }
            idx
        })
    }

    /// Writes KV `key` with `value` (flags 0). Returns the write's index.
    pub fn kv_put(&self, key: &str, value: &[u8]) -> u64 {
        let value = (!value.is_empty()).then(|| value.to_vec());
        self.shared.write(|st| st.kv_put(key, value, 0, None).1)
    }

    /// Deletes KV `key`; a missing key is a no-op that returns the current index.
    pub fn kv_delete(&self, key: &str) -> u64 {
        self.shared.write(|st| st.kv_delete(key, false))
    }

    /// Simulates a raft snapshot restore to `index` (at least 1): the global index becomes
    /// `index` and every stored index above it is lowered to it, so every endpoint's
    /// `X-Consul-Index` goes backwards while the data stays. Blocked queries return at once
    /// with the lowered index; new queries with a higher `index` block for their full wait.
    pub fn restore_snapshot(&self, index: u64) {
        {
            let mut st = self.shared.state();
            st.restore(index.max(1));
        }
        self.shared.changes.send_modify(|g| {
            g.writes += 1;
            g.restores += 1;
        });
    }

    /// With `known == false`: default and `?consistent` reads and KV writes answer 500
    /// `No cluster leader` (with `X-Consul-Knownleader: false`), `?stale` reads still answer
    /// 200 with `X-Consul-Knownleader: false` and a growing `X-Consul-Lastcontact`, and
    /// `/v1/status/leader` answers `""`. Blocked queries return the error at once.
    pub fn set_leader(&self, known: bool) {
        {
            let mut st = self.shared.state();
            if st.leader == known {
                return;
            }
            st.leader = known;
            st.leader_lost_at = (!known).then(Instant::now);
        }
        self.shared.changes.send_modify(|g| g.writes += 1);
    }

    /// Delays every request by `d` after it is recorded and before it is answered
    /// (blocking reads: before they start blocking). `Duration::ZERO` turns it off.
    pub fn set_latency(&self, d: Duration) {
        self.shared.state().latency = d;
    }

    /// The next `n` requests to any path answer `status` with plain-text `body` (empty body:
    /// no `Content-Type`, like Consul's RPC rate limiter). Reads also carry the meta headers a
    /// failed RPC leaves (`X-Consul-Index: 1`, `X-Consul-Knownleader: false`).
    ///
    /// # Panics
    /// If `status` is not a valid HTTP status code.
    pub fn fail_next(&self, n: usize, status: u16, body: &str) {
        self.fail_next_on("/", n, status, body);
    }

    /// Like [`ConsulEmulator::fail_next`], but only requests whose path starts with
    /// `path_prefix` count and fail; the rest are served normally. Rules apply in the
    /// order they were added.
    ///
    /// # Panics
    /// If `status` is not a valid HTTP status code.
    pub fn fail_next_on(&self, path_prefix: &str, n: usize, status: u16, body: &str) {
        let status = StatusCode::from_u16(status).expect("fail_next: invalid status code");
        self.shared.state().failures.push_back(Failure {
            prefix: path_prefix.to_owned(),
            remaining: n,
            status,
            body: body.to_owned(),
        });
    }

    /// Closes, without a response, the connection of every request that is blocked right
    /// now (a blocking query in its wait). Later requests are unaffected.
    pub fn drop_blocked(&self) {
        self.shared.changes.send_modify(|g| g.drops += 1);
    }

    /// Stops serving: the port is released and every open connection (blocked queries
    /// included) is closed. State is kept for [`ConsulEmulator::restart`]. No-op if stopped.
    pub async fn stop(&self) {
        let server = lock(&self.server).take();
        if let Some(server) = server {
            let _ = server.stop.send(());
            let _ = server.task.await;
        }
    }

    /// Serves again on the same address with the same state (stopping first if running),
    /// like an agent restart. The raft index is unchanged.
    ///
    /// # Panics
    /// If the port was taken by someone else in the meantime.
    pub async fn restart(&self) {
        self.stop().await;
        let socket = TcpSocket::new_v4().expect("create consul emulator socket");
        // Our own closed connections leave TIME_WAIT entries on this port.
        socket.set_reuseaddr(true).expect("set SO_REUSEADDR");
        socket
            .bind(self.addr)
            .unwrap_or_else(|e| panic!("rebind consul emulator on {}: {e}", self.addr));
        let listener = socket.listen(1024).expect("listen on consul emulator");
        *lock(&self.server) = Some(spawn_server(Arc::clone(&self.shared), listener));
    }

    /// Every request received so far, in arrival order.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        lock(&self.shared.log).clone()
    }

    /// The requests whose raw path starts with `path_prefix`, in arrival order.
    pub fn requests_to(&self, path_prefix: &str) -> Vec<RecordedRequest> {
        lock(&self.shared.log)
            .iter()
            .filter(|r| r.path.starts_with(path_prefix))
            .cloned()
            .collect()
    }

    /// Blocking queries currently waiting for a change or their timeout.
    pub fn blocked_now(&self) -> usize {
        *self.shared.blocked.borrow()
    }

    /// Accepted TCP connections currently open (over-limit connections that only got the
    /// 429 are not counted).
    pub fn open_connections(&self) -> usize {
        lock(&self.shared.conns).values().sum()
    }

    /// Waits until at least `n` blocking queries are waiting at once. Wrap it in a timeout.
    pub async fn until_blocked(&self, n: usize) {
        let mut rx = self.shared.blocked.subscribe();
        let _ = rx.wait_for(|b| *b >= n).await;
    }

    /// Waits until at least `n` requests whose raw path starts with `path_prefix` have been
    /// recorded in total. Wrap it in a timeout.
    pub async fn until_requests(&self, path_prefix: &str, n: usize) {
        let mut rx = self.shared.seen.subscribe();
        loop {
            if self.requests_to(path_prefix).len() >= n {
                return;
            }
            if rx.changed().await.is_err() {
                return;
            }
        }
    }
}

impl ConsulEmulator {
    /// Holds back every answer to a request whose raw path starts with `path_prefix` until
    /// the returned [`AnswerHold`] is released or dropped, like a slow link between Consul and
    /// the client. The answer is computed first (blocking reads: after their block ends), so
    /// it carries the data of that moment. Requests already waiting are held too.
    pub fn hold_answers(&self, path_prefix: &str) -> AnswerHold {
        let id = self
            .shared
            .next_hold
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.shared
            .holds
            .send_modify(|h| h.push((id, path_prefix.to_owned())));
        AnswerHold {
            shared: Arc::clone(&self.shared),
            id,
        }
    }

    /// Answers currently held back by [`ConsulEmulator::hold_answers`].
    pub fn held_now(&self) -> usize {
        *self.shared.held.borrow()
    }

    /// Waits until at least `n` answers are held back at once. Wrap it in a timeout.
    pub async fn until_held(&self, n: usize) {
        let mut rx = self.shared.held.subscribe();
        let _ = rx.wait_for(|h| *h >= n).await;
    }
}

/// An active [`ConsulEmulator::hold_answers`]; held answers go out when it is released or
/// dropped (so a failing test never leaves the client hanging).
#[derive(Debug)]
#[must_use = "the hold ends when this is dropped"]
pub struct AnswerHold {
    shared: Arc<Shared>,
    id: u64,
}

impl AnswerHold {
    /// Lets the held answers (and later ones) go.
    pub fn release(self) {}
}

impl Drop for AnswerHold {
    fn drop(&mut self) {
        let id = self.id;
        self.shared
            .holds
            .send_modify(|h| h.retain(|(i, _)| *i != id));
    }
}

impl Drop for ConsulEmulator {
    fn drop(&mut self) {
        if let Some(server) = lock(&self.server).take() {
            // Aborting drops the listener and the JoinSet, which aborts every connection.
            server.task.abort();
        }
    }
}

// === state ===

/// Everything the server tasks and the handle share.
#[derive(Debug)]
struct Shared {
    opts: EmulatorOptions,
    // std Mutexes: test support only, tiny critical sections, never held across an await.
    state: Mutex<State>,
    log: Mutex<Vec<RecordedRequest>>,
    conns: Mutex<HashMap<IpAddr, usize>>,
    /// Bumped after every write, restore and `drop_blocked`; blocked queries watch it.
    changes: watch::Sender<Gen>,
    /// Number of blocking queries currently waiting.
    blocked: watch::Sender<usize>,
    /// Number of requests recorded so far.
    seen: watch::Sender<usize>,
    /// Active answer holds (id, path prefix); held answers wait until none matches.
    holds: watch::Sender<Vec<(u64, String)>>,
    /// Answers currently held back by a hold.
    held: watch::Sender<usize>,
    /// Id of the next hold.
    next_hold: std::sync::atomic::AtomicU64,
    /// Runtime of `start`, for TTL timers armed from sync test-side calls.
    rt: tokio::runtime::Handle,
    /// Weak self-reference handed to TTL timers so they do not keep the state alive.
    me: Weak<Shared>,
}

/// What changed since a blocked query started; compared field by field.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Gen {
    writes: u64,
    restores: u64,
    drops: u64,
}

#[derive(Debug)]
struct Failure {
    prefix: String,
    remaining: usize,
    status: StatusCode,
    body: String,
}

/// The raft-replicated catalog and KV store, plus fault knobs.
#[derive(Debug)]
struct State {
    /// Global raft index: the last index any write used.
    raft: u64,
    nodes: BTreeMap<String, Node>,
    /// Keyed by (node, service ID), which is also Consul's iteration order.
    services: BTreeMap<(String, String), Service>,
    /// Keyed by (node, check ID).
    checks: BTreeMap<(String, String), Check>,
    kv: BTreeMap<String, KvEntry>,
    /// Deleted keys and the index of their deletion (never reaped here).
    tombstones: BTreeMap<String, u64>,
    nodes_index: u64,
    services_index: u64,
    checks_index: u64,
    kv_index: u64,
    /// Per service name, Consul's `service.<name>` index entry; absent once the last
    /// instance is gone.
    service_index: HashMap<String, u64>,
    /// Index of the last time any service lost its last instance.
    extinction: u64,
    leader: bool,
    leader_lost_at: Option<Instant>,
    latency: Duration,
    failures: VecDeque<Failure>,
    /// TTL timers to start once the lock is released.
    ttl_arms: Vec<TtlArm>,
    /// The Connect CA (roots and the agent's cached leaves).
    ca: ca::Ca,
}

#[derive(Debug, Clone)]
struct Node {
    id: String,
    address: String,
    create_index: u64,
    modify_index: u64,
}

/// A service instance as registered (without indexes).
#[derive(Debug, Clone, PartialEq)]
struct ServiceDef {
    node: String,
    node_address: String,
    id: String,
    name: String,
    tags: Vec<String>,
    address: String,
    tagged: BTreeMap<String, (String, u16)>,
    meta: Option<BTreeMap<String, String>>,
    port: u16,
    weights: (u32, u32),
    enable_tag_override: bool,
    mesh: Mesh,
}

/// The Connect side of a service instance (CONNECT.md §4.3).
#[derive(Debug, Clone, Default, PartialEq)]
struct Mesh {
    /// `Kind`: `""` or `connect-proxy`.
    kind: String,
    /// `Proxy.DestinationServiceName` of a sidecar.
    destination: Option<String>,
    /// `Connect.Native`.
    native: bool,
}

impl ServiceDef {
    /// Whether `/v1/health/connect/<name>` lists this instance (§4.1).
    fn serves_mesh(&self, name: &str) -> bool {
        (self.mesh.kind == "connect-proxy" && self.mesh.destination.as_deref() == Some(name))
            || (self.name == name && self.mesh.native)
    }

    /// Same catalog content (the node address only matters when the node is created).
    fn same(&self, other: &Self) -> bool {
        Self {
            node_address: String::new(),
            ..self.clone()
        } == Self {
            node_address: String::new(),
            ..other.clone()
        }
    }
}

#[derive(Debug, Clone)]
struct Service {
    def: ServiceDef,
    create_index: u64,
    modify_index: u64,
}

/// A check as registered.
#[derive(Debug, Clone)]
struct CheckDef {
    id: String,
    name: String,
    status: String,
    notes: String,
    output: String,
    kind: String,
    interval: String,
    timeout: String,
    ttl: Option<Duration>,
}

#[derive(Debug, Clone, PartialEq)]
struct Check {
    id: String,
    name: String,
    status: String,
    notes: String,
    output: String,
    service_id: String,
    service_name: String,
    service_tags: Vec<String>,
    kind: String,
    interval: String,
    timeout: String,
    /// `Some` for TTL checks registered over HTTP with a `TTL`; they expire to critical.
    ttl: Option<Duration>,
    /// Bumped on every TTL update, so a stale timer knows it lost.
    ttl_gen: u64,
    create_index: u64,
    modify_index: u64,
}

impl Check {
    fn from_def(d: CheckDef, svc: Option<&ServiceDef>) -> Self {
        Self {
            id: d.id,
            name: d.name,
            status: d.status,
            notes: d.notes,
            output: d.output,
            service_id: svc.map(|s| s.id.clone()).unwrap_or_default(),
            service_name: svc.map(|s| s.name.clone()).unwrap_or_default(),
            service_tags: svc.map(|s| s.tags.clone()).unwrap_or_default(),
            kind: d.kind,
            interval: d.interval,
            timeout: d.timeout,
            ttl: d.ttl,
            ttl_gen: 0,
            create_index: 0,
            modify_index: 0,
        }
    }

    /// Same content, ignoring indexes and timer bookkeeping.
    fn same(&self, other: &Self) -> bool {
        let strip = |c: &Self| Self {
            ttl_gen: 0,
            create_index: 0,
            modify_index: 0,
            ..c.clone()
        };
        strip(self) == strip(other)
    }

    fn is_ttl(&self) -> bool {
        self.kind == "ttl"
    }
}

#[derive(Debug, Clone)]
struct KvEntry {
    value: Option<Vec<u8>>,
    flags: u64,
    create_index: u64,
    modify_index: u64,
}

#[derive(Debug)]
struct TtlArm {
    node: String,
    check_id: String,
    ttl: Duration,
    gen: u64,
}

// === impl Shared ===

impl Shared {
    fn new(opts: EmulatorOptions) -> Arc<Self> {
        let state = State::bootstrap(&opts);
        Arc::new_cyclic(|me| Self {
            opts,
            state: Mutex::new(state),
            log: Mutex::new(Vec::new()),
            conns: Mutex::new(HashMap::new()),
            changes: watch::Sender::new(Gen::default()),
            blocked: watch::Sender::new(0),
            seen: watch::Sender::new(0),
            holds: watch::Sender::new(Vec::new()),
            held: watch::Sender::new(0),
            next_hold: std::sync::atomic::AtomicU64::new(0),
            rt: tokio::runtime::Handle::current(),
            me: me.clone(),
        })
    }

    fn state(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    /// Runs one write under the lock, then wakes watchers if the raft index moved and starts
    /// any TTL timers the write armed.
    fn write<R>(&self, f: impl FnOnce(&mut State) -> R) -> R {
        let (out, moved, arms) = {
            let mut st = self.state();
            let before = st.raft;
            let out = f(&mut st);
            (out, st.raft != before, std::mem::take(&mut st.ttl_arms))
        };
        if moved {
            self.changes.send_modify(|g| g.writes += 1);
        }
        for arm in arms {
            self.spawn_ttl(arm);
        }
        out
    }

    fn spawn_ttl(&self, arm: TtlArm) {
        let me = self.me.clone();
        self.rt.spawn(async move {
            tokio::time::sleep(arm.ttl).await;
            let Some(shared) = me.upgrade() else { return };
            shared.write(|st| st.expire_ttl(&arm));
        });
    }
}

// === impl State ===

impl State {
    /// The catalog a fresh single-server cluster has: the agent node with `serfHealth`
    /// and (optionally) the `consul` service, all written at `BOOTSTRAP_INDEX`.
    fn bootstrap(opts: &EmulatorOptions) -> Self {
        let mut st = Self {
            raft: BOOTSTRAP_INDEX - 1,
            nodes: BTreeMap::new(),
            services: BTreeMap::new(),
            checks: BTreeMap::new(),
            kv: BTreeMap::new(),
            tombstones: BTreeMap::new(),
            nodes_index: 0,
            services_index: 0,
            checks_index: 0,
            kv_index: 0,
            service_index: HashMap::new(),
            extinction: 0,
            leader: true,
            leader_lost_at: None,
            latency: Duration::ZERO,
            failures: VecDeque::new(),
            ttl_arms: Vec::new(),
            ca: ca::Ca::new(
                &format!("cluster/{}", fastrand::u64(..)),
                &opts.datacenter,
                BOOTSTRAP_INDEX,
            ),
        };
        let idx = st.next_index();
        st.create_node(&opts.node, &opts.node_address, idx);
        if opts.consul_service {
            let meta = [
                ("non_voter", "false"),
                ("raft_version", "3"),
                ("read_replica", "false"),
                ("serf_protocol_current", "2"),
                ("serf_protocol_max", "5"),
                ("serf_protocol_min", "1"),
                ("version", CONSUL_VERSION),
            ];
            let def = ServiceDef {
                node: opts.node.clone(),
                node_address: opts.node_address.clone(),
                id: "consul".to_owned(),
                name: "consul".to_owned(),
                tags: Vec::new(),
                address: String::new(),
                tagged: BTreeMap::new(),
                meta: Some(
                    meta.iter()
                        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                        .collect(),
                ),
                port: 8300,
                weights: (1, 1),
                enable_tag_override: false,
                mesh: Mesh::default(),
            };
            st.put_service(def, idx);
        }
        st
    }

    fn next_index(&mut self) -> u64 {
        self.raft += 1;
        self.raft
    }

    fn create_node(&mut self, name: &str, address: &str, idx: u64) {
        self.nodes.insert(
            name.to_owned(),
            Node {
                id: fake_uuid(&format!("node/{name}")),
                address: address.to_owned(),
                create_index: idx,
                modify_index: idx,
            },
        );
        let mut serf = Check::from_def(
            CheckDef {
                id: "serfHealth".to_owned(),
                name: "Serf Health Status".to_owned(),
                status: "passing".to_owned(),
                notes: String::new(),
                output: "Agent alive and reachable".to_owned(),
                kind: String::new(),
                interval: String::new(),
                timeout: String::new(),
                ttl: None,
            },
            None,
        );
        serf.create_index = idx;
        serf.modify_index = idx;
        self.checks
            .insert((name.to_owned(), "serfHealth".to_owned()), serf);
        self.nodes_index = idx;
        self.checks_index = idx;
    }

    /// Inserts or replaces the service row at `idx` and maintains the service indexes.
    fn put_service(&mut self, def: ServiceDef, idx: u64) {
        let key = (def.node.clone(), def.id.clone());
        let create_index = match self.services.get(&key) {
            Some(old) => {
                let old_name = old.def.name.clone();
                let ci = old.create_index;
                if old_name != def.name {
                    self.services.remove(&key);
                    self.note_instance_gone(&old_name, idx);
                }
                ci
            }
            None => idx,
        };
        self.service_index.insert(def.name.clone(), idx);
        self.services.insert(
            key,
            Service {
                def,
                create_index,
                modify_index: idx,
            },
        );
        self.services_index = idx;
    }

    /// After an instance of `name` went away at `idx`: bump its index, or record the
    /// extinction if it was the last one.
    fn note_instance_gone(&mut self, name: &str, idx: u64) {
        if self.services.values().any(|s| s.def.name == name) {
            self.service_index.insert(name.to_owned(), idx);
        } else {
            self.service_index.remove(name);
            self.extinction = idx;
        }
    }

    /// Agent-style register of one instance and its checks (existing checks keep status
    /// and output). A no-op returning the current index when nothing would change.
    fn register(&mut self, def: ServiceDef, checks: Vec<CheckDef>, replace_checks: bool) -> u64 {
        let node = def.node.clone();
        let node_new = !self.nodes.contains_key(&node);
        let svc_changed = self
            .services
            .get(&(node.clone(), def.id.clone()))
            .is_none_or(|old| !old.def.same(&def));
        let mut new_ids = HashSet::new();
        let mut changed_checks = Vec::new();
        for cd in checks {
            new_ids.insert(cd.id.clone());
            let mut check = Check::from_def(cd, Some(&def));
            match self.checks.get(&(node.clone(), check.id.clone())) {
                Some(prev) => {
                    check.status.clone_from(&prev.status);
                    check.output.clone_from(&prev.output);
                    check.create_index = prev.create_index;
                    // A replaced check must not match a timer armed for its predecessor.
                    check.ttl_gen = prev.ttl_gen + 1;
                    if !prev.same(&check) {
                        changed_checks.push(check);
                    }
                }
                None => changed_checks.push(check),
            }
        }
        let removed: Vec<String> = if replace_checks {
            self.checks
                .iter()
                .filter(|((n, id), c)| {
                    *n == node
                        && c.service_id == def.id
                        && !new_ids.contains(id)
                        && !id.starts_with(MAINT_PREFIX)
                })
                .map(|((_, id), _)| id.clone())
                .collect()
        } else {
            Vec::new()
        };
        if !node_new && !svc_changed && changed_checks.is_empty() && removed.is_empty() {
            return self.raft;
        }

        let idx = self.next_index();
        if node_new {
            self.create_node(&node, &def.node_address, idx);
        }
        if svc_changed {
            // Checks carry the service's name and tags; keep the other checks in step.
            for ((n, _), c) in self.checks.iter_mut() {
                if *n == node
                    && c.service_id == def.id
                    && (c.service_tags != def.tags || c.service_name != def.name)
                {
                    c.service_tags.clone_from(&def.tags);
                    c.service_name.clone_from(&def.name);
                    c.modify_index = idx;
                    self.checks_index = idx;
                }
            }
        }
        for mut check in changed_checks {
            if check.create_index == 0 {
                check.create_index = idx;
            }
            check.modify_index = idx;
            if let Some(ttl) = check.ttl {
                self.ttl_arms.push(TtlArm {
                    node: node.clone(),
                    check_id: check.id.clone(),
                    ttl,
                    gen: check.ttl_gen,
                });
            }
            self.checks.insert((node.clone(), check.id.clone()), check);
            self.checks_index = idx;
        }
        for id in removed {
            self.checks.remove(&(node.clone(), id));
            self.checks_index = idx;
        }
        if svc_changed {
            self.put_service(def, idx);
        } else {
            self.service_index.insert(def.name, idx);
        }
        idx
    }

    fn nodes_with_service(&self, service_id: &str) -> Vec<String> {
        self.services
            .keys()
            .filter(|(_, id)| id == service_id)
            .map(|(n, _)| n.clone())
            .collect()
    }

    /// Removes instance `service_id` on `node` and its checks at `idx`.
    fn remove_service(&mut self, node: &str, service_id: &str, idx: u64) {
        let Some(old) = self
            .services
            .remove(&(node.to_owned(), service_id.to_owned()))
        else {
            return;
        };
        self.services_index = idx;
        let before = self.checks.len();
        self.checks
            .retain(|(n, _), c| !(n == node && c.service_id == service_id));
        if self.checks.len() != before {
            self.checks_index = idx;
        }
        self.note_instance_gone(&old.def.name, idx);
    }

    fn deregister_everywhere(&mut self, service_id: &str) -> u64 {
        let nodes = self.nodes_with_service(service_id);
        if nodes.is_empty() {
            return self.raft;
        }
        let idx = self.next_index();
        for node in nodes {
            self.remove_service(&node, service_id, idx);
        }
        idx
    }

    /// Bumps the health index of the service a check belongs to, or of every service on
    /// the node for node-level checks (Consul's `updateAllServiceIndexesOfNode`).
    fn bump_for_check(&mut self, node: &str, service_name: &str, idx: u64) {
        if service_name.is_empty() {
            let names: Vec<String> = self
                .services
                .iter()
                .filter(|((n, _), _)| n == node)
                .map(|(_, s)| s.def.name.clone())
                .collect();
            for name in names {
                self.service_index.insert(name, idx);
            }
        } else if self.service_index.contains_key(service_name) {
            self.service_index.insert(service_name.to_owned(), idx);
        }
    }

    /// Sets a check's status and output; `Some(index)` if anything changed.
    fn update_check(
        &mut self,
        node: &str,
        check_id: &str,
        status: &str,
        output: &str,
    ) -> Option<u64> {
        let key = (node.to_owned(), check_id.to_owned());
        let check = self.checks.get(&key)?;
        if check.status == status && check.output == output {
            return None;
        }
        let service_name = check.service_name.clone();
        let idx = self.next_index();
        let check = self.checks.get_mut(&key)?;
        status.clone_into(&mut check.status);
        output.clone_into(&mut check.output);
        check.modify_index = idx;
        self.checks_index = idx;
        self.bump_for_check(node, &service_name, idx);
        Some(idx)
    }

    /// Restarts the TTL timer of a check (every TTL update does, changed or not).
    fn rearm_ttl(&mut self, node: &str, check_id: &str) {
        if let Some(c) = self.checks.get_mut(&(node.to_owned(), check_id.to_owned())) {
            c.ttl_gen += 1;
            if let Some(ttl) = c.ttl {
                self.ttl_arms.push(TtlArm {
                    node: node.to_owned(),
                    check_id: check_id.to_owned(),
                    ttl,
                    gen: c.ttl_gen,
                });
            }
        }
    }

    /// A TTL timer fired: turn the check critical unless it was updated since.
    fn expire_ttl(&mut self, arm: &TtlArm) {
        let key = (arm.node.clone(), arm.check_id.clone());
        let Some(c) = self.checks.get(&key) else {
            return;
        };
        if c.ttl_gen != arm.gen {
            return;
        }
        let output = if c.output.is_empty() {
            "TTL expired".to_owned()
        } else {
            format!(
                "TTL expired (last output before timeout follows): {}",
                c.output
            )
        };
        self.update_check(&arm.node, &arm.check_id, "critical", &output);
    }

    /// Adds or removes `_service_maintenance:<id>` on `node`; idempotent.
    fn service_maintenance(
        &mut self,
        node: &str,
        service_id: &str,
        enable: bool,
        reason: &str,
    ) -> u64 {
        let check_id = format!("{MAINT_PREFIX}{service_id}");
        let key = (node.to_owned(), check_id.clone());
        let Some(svc) = self
            .services
            .get(&(node.to_owned(), service_id.to_owned()))
            .map(|s| s.def.clone())
        else {
            return self.raft;
        };
        if enable == self.checks.contains_key(&key) {
            return self.raft;
        }
        let idx = self.next_index();
        if enable {
            let notes = if reason.is_empty() {
                DEFAULT_SERVICE_MAINT_REASON
            } else {
                reason
            };
            let mut check = Check::from_def(
                maintenance_check(check_id, "Service Maintenance Mode", notes),
                Some(&svc),
            );
            check.create_index = idx;
            check.modify_index = idx;
            self.checks.insert(key, check);
        } else {
            self.checks.remove(&key);
        }
        self.checks_index = idx;
        self.bump_for_check(node, &svc.name, idx);
        idx
    }

    /// Adds or removes `_node_maintenance` on `node`; idempotent.
    fn node_maintenance(&mut self, node: &str, enable: bool, reason: &str) -> u64 {
        let key = (node.to_owned(), NODE_MAINT.to_owned());
        if enable == self.checks.contains_key(&key) {
            return self.raft;
        }
        let idx = self.next_index();
        if enable {
            let notes = if reason.is_empty() {
                DEFAULT_NODE_MAINT_REASON
            } else {
                reason
            };
            let mut check = Check::from_def(
                maintenance_check(NODE_MAINT.to_owned(), "Node Maintenance Mode", notes),
                None,
            );
            check.create_index = idx;
            check.modify_index = idx;
            self.checks.insert(key, check);
        } else {
            self.checks.remove(&key);
        }
        self.checks_index = idx;
        self.bump_for_check(node, "", idx);
        idx
    }

    /// KV put with optional check-and-set; returns (applied, index).
    fn kv_put(
        &mut self,
        key: &str,
        value: Option<Vec<u8>>,
        flags: u64,
        cas: Option<u64>,
    ) -> (bool, u64) {
        let existing = self.kv.get(key);
        match (cas, existing) {
            (Some(0), Some(_)) => return (false, self.raft),
            (Some(n), Some(e)) if n != 0 && e.modify_index != n => return (false, self.raft),
            (Some(n), None) if n != 0 => return (false, self.raft),
            _ => {}
        }
        let create_index = existing.map(|e| e.create_index);
        let idx = self.next_index();
        self.kv.insert(
            key.to_owned(),
            KvEntry {
                value,
                flags,
                create_index: create_index.unwrap_or(idx),
                modify_index: idx,
            },
        );
        self.tombstones.remove(key);
        self.kv_index = idx;
        (true, idx)
    }

    /// Deletes `key` (or every key under it with `recurse`), leaving tombstones.
    fn kv_delete(&mut self, key: &str, recurse: bool) -> u64 {
        let doomed: Vec<String> = if recurse {
            self.kv
                .keys()
                .filter(|k| k.starts_with(key))
                .cloned()
                .collect()
        } else {
            self.kv.keys().filter(|k| *k == key).cloned().collect()
        };
        if doomed.is_empty() {
            return self.raft;
        }
        let idx = self.next_index();
        for k in doomed {
            self.kv.remove(&k);
            self.tombstones.insert(k, idx);
        }
        self.kv_index = idx;
        idx
    }

    /// Lowers every stored index above `index` to it and rewinds the raft index.
    fn restore(&mut self, index: u64) {
        let clamp = |v: &mut u64| *v = (*v).min(index);
        self.raft = index;
        for n in self.nodes.values_mut() {
            clamp(&mut n.create_index);
            clamp(&mut n.modify_index);
        }
        for s in self.services.values_mut() {
            clamp(&mut s.create_index);
            clamp(&mut s.modify_index);
        }
        for c in self.checks.values_mut() {
            clamp(&mut c.create_index);
            clamp(&mut c.modify_index);
        }
        for e in self.kv.values_mut() {
            clamp(&mut e.create_index);
            clamp(&mut e.modify_index);
        }
        self.tombstones.values_mut().for_each(clamp);
        self.service_index.values_mut().for_each(clamp);
        self.ca.restore(index);
        for v in [
            &mut self.nodes_index,
            &mut self.services_index,
            &mut self.checks_index,
            &mut self.kv_index,
            &mut self.extinction,
        ] {
            clamp(v);
        }
    }

    // --- endpoint indexes (Consul's index scopes, API.md §1.4) ---

    /// `X-Consul-Index` of `/v1/health/service/<name>` before the never-0 clamp.
    fn health_service_index(&self, name: &str) -> u64 {
        let exists = self.services.values().any(|s| s.def.name == name);
        if exists {
            if let Some(i) = self.service_index.get(name) {
                return *i;
            }
        }
        if self.extinction > 0 {
            return self.extinction;
        }
        self.nodes_index
            .max(self.services_index)
            .max(self.checks_index)
    }

    /// `X-Consul-Index` of `/v1/health/connect/<name>`: the highest index of the service
    /// names in the answer, else the extinction (or table) index (CONNECT.md §4.1).
    fn health_connect_index(&self, name: &str) -> u64 {
        let names: HashSet<&str> = self
            .services
            .values()
            .filter(|s| s.def.serves_mesh(name))
            .map(|s| s.def.name.as_str())
            .collect();
        names
            .iter()
            .filter_map(|n| self.service_index.get(*n).copied())
            .max()
            .unwrap_or_else(|| self.health_service_index(""))
    }

    /// Index of a KV read of `prefix` (`list`) or of exactly `key`.
    fn kv_read_index(&self, key: &str, list: bool) -> u64 {
        if !list {
            return self.kv.get(key).map_or(self.kv_index, |e| e.modify_index);
        }
        if key.is_empty() {
            return self.kv_index;
        }
        let live = self
            .kv
            .range(key.to_owned()..)
            .take_while(|(k, _)| k.starts_with(key))
            .map(|(_, e)| e.modify_index)
            .max()
            .unwrap_or(0);
        let dead = self
            .tombstones
            .range(key.to_owned()..)
            .take_while(|(k, _)| k.starts_with(key))
            .map(|(_, i)| *i)
            .max()
            .unwrap_or(0);
        match live.max(dead) {
            0 => self.kv_index,
            i => i,
        }
    }

    /// `X-Consul-Knownleader` and `X-Consul-Lastcontact` (ms) as a server would report.
    fn leader_meta(&self) -> (bool, u64) {
        let since = self.leader_lost_at.map_or(0, |t| {
            u64::try_from(t.elapsed().as_millis()).unwrap_or(u64::MAX)
        });
        (self.leader, if self.leader { 0 } else { since })
    }
}

fn maintenance_check(id: String, name: &str, notes: &str) -> CheckDef {
    CheckDef {
        id,
        name: name.to_owned(),
        status: "critical".to_owned(),
        notes: notes.to_owned(),
        output: String::new(),
        kind: "maintenance".to_owned(),
        interval: String::new(),
        timeout: String::new(),
        ttl: None,
    }
}

// === response bodies (field names, order and casing from real 1.16.2 captures) ===

/// An empty JSON object (`{}`), as Consul renders empty structs like `Connect`.
#[derive(Serialize)]
struct Empty {}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct NodeJson<'a> {
    #[serde(rename = "ID")]
    id: &'a str,
    node: &'a str,
    address: &'a str,
    datacenter: &'a str,
    tagged_addresses: BTreeMap<&'static str, &'a str>,
    meta: BTreeMap<&'static str, &'static str>,
    create_index: u64,
    modify_index: u64,
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct TaggedJson<'a> {
    address: &'a str,
    port: u16,
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct WeightsJson {
    passing: u32,
    warning: u32,
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct ProxyJson<'a> {
    // `omitempty` in Consul: only sidecars carry a destination.
    #[serde(skip_serializing_if = "Option::is_none")]
    destination_service_name: Option<&'a str>,
    #[serde(
        rename = "DestinationServiceID",
        skip_serializing_if = "Option::is_none"
    )]
    destination_service_id: Option<&'a str>,
    mode: &'static str,
    mesh_gateway: Empty,
    expose: Empty,
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct ServiceJson<'a> {
    // `omitempty` in Consul: typical services have no `Kind`.
    #[serde(skip_serializing_if = "str::is_empty")]
    kind: &'a str,
    #[serde(rename = "ID")]
    id: &'a str,
    service: &'a str,
    tags: &'a [String],
    address: &'a str,
    // `omitempty` in Consul: absent when the service has no address.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    tagged_addresses: BTreeMap<&'a str, TaggedJson<'a>>,
    meta: Option<&'a BTreeMap<String, String>>,
    port: u16,
    weights: WeightsJson,
    enable_tag_override: bool,
    proxy: ProxyJson<'a>,
    connect: ConnectJson,
    peer_name: &'static str,
    create_index: u64,
    modify_index: u64,
}

/// `Connect`: `{}` unless the instance is Connect-native.
#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct ConnectJson {
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    native: bool,
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct CheckJson<'a> {
    node: &'a str,
    #[serde(rename = "CheckID")]
    check_id: &'a str,
    name: &'a str,
    status: &'a str,
    notes: &'a str,
    output: &'a str,
    #[serde(rename = "ServiceID")]
    service_id: &'a str,
    service_name: &'a str,
    service_tags: &'a [String],
    #[serde(rename = "Type")]
    kind: &'a str,
    interval: &'a str,
    timeout: &'a str,
    exposed_port: u16,
    definition: Empty,
    create_index: u64,
    modify_index: u64,
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct HealthEntryJson<'a> {
    node: NodeJson<'a>,
    service: ServiceJson<'a>,
    checks: Vec<CheckJson<'a>>,
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct KvJson<'a> {
    lock_index: u64,
    key: &'a str,
    flags: u64,
    value: Option<String>,
    create_index: u64,
    modify_index: u64,
}

fn node_json<'a>(name: &'a str, node: &'a Node, dc: &'a str) -> NodeJson<'a> {
    let a = node.address.as_str();
    NodeJson {
        id: &node.id,
        node: name,
        address: a,
        datacenter: dc,
        tagged_addresses: [("lan", a), ("lan_ipv4", a), ("wan", a), ("wan_ipv4", a)]
            .into_iter()
            .collect(),
        meta: [
            ("consul-network-segment", ""),
            ("consul-version", CONSUL_VERSION),
        ]
        .into_iter()
        .collect(),
        create_index: node.create_index,
        modify_index: node.modify_index,
    }
}

fn service_json(s: &Service) -> ServiceJson<'_> {
    ServiceJson {
        kind: &s.def.mesh.kind,
        id: &s.def.id,
        service: &s.def.name,
        tags: &s.def.tags,
        address: &s.def.address,
        tagged_addresses: s
            .def
            .tagged
            .iter()
            .map(|(k, (a, p))| {
                (
                    k.as_str(),
                    TaggedJson {
                        address: a,
                        port: *p,
                    },
                )
            })
            .collect(),
        meta: s.def.meta.as_ref(),
        port: s.def.port,
        weights: WeightsJson {
            passing: s.def.weights.0,
            warning: s.def.weights.1,
        },
        enable_tag_override: s.def.enable_tag_override,
        proxy: proxy_json(&s.def),
        connect: ConnectJson {
            native: s.def.mesh.native,
        },
        peer_name: "",
        create_index: s.create_index,
        modify_index: s.modify_index,
    }
}

fn proxy_json(def: &ServiceDef) -> ProxyJson<'_> {
    let dest = def.mesh.destination.as_deref();
    ProxyJson {
        destination_service_name: dest,
        destination_service_id: dest,
        mode: "",
        mesh_gateway: Empty {},
        expose: Empty {},
    }
}

fn check_json<'a>(node: &'a str, c: &'a Check) -> CheckJson<'a> {
    CheckJson {
        node,
        check_id: &c.id,
        name: &c.name,
        status: &c.status,
        notes: &c.notes,
        output: &c.output,
        service_id: &c.service_id,
        service_name: &c.service_name,
        service_tags: &c.service_tags,
        kind: &c.kind,
        interval: &c.interval,
        timeout: &c.timeout,
        exposed_port: 0,
        definition: Empty {},
        create_index: c.create_index,
        modify_index: c.modify_index,
    }
}

/// Node checks first, then the instance's own checks, each in check-ID order (Consul's
/// `parseCheckServiceNodes`).
fn instance_checks<'a>(
    st: &'a State,
    node: &'a str,
    service_id: &str,
) -> Vec<(&'a str, &'a Check)> {
    let on_node = || {
        st.checks
            .range((node.to_owned(), String::new())..)
            .take_while(move |((n, _), _)| n == node)
            .map(|((n, _), c)| (n.as_str(), c))
    };
    on_node()
        .filter(|(_, c)| c.service_id.is_empty())
        .chain(on_node().filter(|(_, c)| c.service_id == service_id))
        .collect()
}

/// Go's `encoding/json` output: HTML-safe escapes, and `?pretty` as 4-space indent plus a
/// trailing newline.
fn to_json<T: Serialize>(value: &T, pretty: bool) -> Bytes {
    let mut out = Vec::new();
    if pretty {
        let fmt = serde_json::ser::PrettyFormatter::with_indent(b"    ");
        let mut ser = serde_json::Serializer::with_formatter(&mut out, fmt);
        value.serialize(&mut ser).expect("serialize JSON");
        out.push(b'\n');
    } else {
        serde_json::to_writer(&mut out, value).expect("serialize JSON");
    }
    // These characters can only occur inside JSON strings, so a byte-level rewrite is safe.
    let text = String::from_utf8(out).expect("serde_json writes UTF-8");
    let text = text
        .replace('<', "\\u003c")
        .replace('>', "\\u003e")
        .replace('&', "\\u0026")
        .replace('\u{2028}', "\\u2028")
        .replace('\u{2029}', "\\u2029");
    Bytes::from(text)
}

// === small helpers ===

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panicking test thread must not turn every later call into a second panic.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn valid_status(s: &str) -> bool {
    matches!(s, "passing" | "warning" | "critical")
}

/// A stable UUID-shaped ID derived from `seed` (FNV-1a), so node IDs survive restarts.
fn fake_uuid(seed: &str) -> String {
    let hash = |salt: u64| {
        seed.bytes().fold(0xcbf2_9ce4_8422_2325 ^ salt, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        })
    };
    let (a, b) = (hash(0), hash(0x9e37_79b9_7f4a_7c15));
    format!(
        "{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
        a >> 32,
        (a >> 16) & 0xffff,
        a & 0xffff,
        b >> 48,
        b & 0xffff_ffff_ffff
    )
}

/// The agent auto-fills `lan_ipv4`/`wan_ipv4` (or `_ipv6`) from an IP `Service.Address`
/// unless the registration set them; hostnames and empty addresses get none.
fn default_tagged_addresses(
    address: &str,
    port: u16,
    mut given: BTreeMap<String, (String, u16)>,
) -> BTreeMap<String, (String, u16)> {
    let family = match address.parse::<IpAddr>() {
        Ok(IpAddr::V4(_)) => "ipv4",
        Ok(IpAddr::V6(_)) => "ipv6",
        Err(_) => return given,
    };
    for scope in ["lan", "wan"] {
        given
            .entry(format!("{scope}_{family}"))
            .or_insert_with(|| (address.to_owned(), port));
    }
    given
}

fn base64(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for (i, shift) in [18, 12, 6, 0].into_iter().enumerate() {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[((n >> shift) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Go's `strconv.ParseBool`.
fn parse_go_bool(s: &str) -> Option<bool> {
    match s {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Some(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Some(false),
        _ => None,
    }
}

/// Parses a Go `time.ParseDuration` string (`"300ms"`, `"1m30s"`, `"1.5h"`, `"-2s"`, `"0"`)
/// into signed nanoseconds. A bare number other than `0` is invalid, as in Go.
pub fn parse_go_duration(s: &str) -> Option<i64> {
    let (neg, mut rest) = match s.as_bytes().first() {
        Some(b'-') => (true, &s[1..]),
        Some(b'+') => (false, &s[1..]),
        _ => (false, s),
    };
    if rest == "0" {
        return Some(0);
    }
    if rest.is_empty() {
        return None;
    }
    let mut total: u128 = 0;
    while !rest.is_empty() {
        let int_len = rest.bytes().take_while(u8::is_ascii_digit).count();
        let int_part = &rest[..int_len];
        rest = &rest[int_len..];
        let mut frac_part = "";
        if let Some(after_dot) = rest.strip_prefix('.') {
            let frac_len = after_dot.bytes().take_while(u8::is_ascii_digit).count();
            frac_part = &after_dot[..frac_len];
            rest = &after_dot[frac_len..];
        }
        if int_part.is_empty() && frac_part.is_empty() {
            return None;
        }
        let unit_len = rest
            .char_indices()
            .find(|(_, c)| c.is_ascii_digit() || *c == '.')
            .map_or(rest.len(), |(i, _)| i);
        let unit: u128 = match &rest[..unit_len] {
            "ns" => 1,
            "us" | "µs" | "μs" => 1_000,
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60_000_000_000,
            "h" => 3_600_000_000_000,
            _ => return None,
        };
        rest = &rest[unit_len..];
        let whole: u128 = if int_part.is_empty() {
            0
        } else {
            int_part.parse().ok()?
        };
        let mut value = whole.checked_mul(unit)?;
        let mut scale = unit;
        for d in frac_part.bytes() {
            scale /= 10;
            if scale == 0 {
                break;
            }
            value += u128::from(d - b'0') * scale;
        }
        total = total.checked_add(value)?;
        if total > i64::MAX as u128 {
            return None;
        }
    }
    let total = i64::try_from(total).ok()?;
    Some(if neg { -total } else { total })
}

/// Go's `time.Duration.String()` for non-negative durations (`"10s"`, `"1m30s"`, `"0s"`).
fn format_go_duration(d: Duration) -> String {
    let ns = d.as_nanos();
    if ns == 0 {
        return "0s".to_owned();
    }
    let frac = |value: u128, unit: u128, suffix: &str| {
        let whole = value / unit;
        let rem = value % unit;
        if rem == 0 {
            format!("{whole}{suffix}")
        } else {
            let width = unit.ilog10() as usize;
            let digits = format!("{rem:0width$}");
            format!("{whole}.{}{suffix}", digits.trim_end_matches('0'))
        }
    };
    if ns < 1_000 {
        return format!("{ns}ns");
    }
    if ns < 1_000_000 {
        return frac(ns, 1_000, "µs");
    }
    if ns < 1_000_000_000 {
        return frac(ns, 1_000_000, "ms");
    }
    let hours = ns / 3_600_000_000_000;
    let minutes = (ns / 60_000_000_000) % 60;
    let secs = frac(ns % 60_000_000_000, 1_000_000_000, "s");
    if hours > 0 {
        format!("{hours}h{minutes}m{secs}")
    } else if minutes > 0 {
        format!("{minutes}m{secs}")
    } else {
        secs
    }
}

/// Go's `url.ParseQuery`: `&`-separated, `+` is a space, pairs with bad escapes or `;`
/// are dropped.
fn parse_query(raw: &str) -> Vec<(String, String)> {
    raw.split('&')
        .filter(|p| !p.is_empty() && !p.contains(';'))
        .filter_map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            Some((percent_decode(k, true)?, percent_decode(v, true)?))
        })
        .collect()
}

/// Percent-decoding; `plus_is_space` for query components. `None` on a bad escape or
/// invalid UTF-8.
fn percent_decode(s: &str, plus_is_space: bool) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = bytes.get(i + 1..i + 3)?;
                if !hex.iter().all(u8::is_ascii_hexdigit) {
                    return None;
                }
                let hex = std::str::from_utf8(hex).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' if plus_is_space => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

/// Consul's token lookup order: `?token=`, `X-Consul-Token`, `Authorization: Bearer`.
fn request_token(query: &[(String, String)], headers: &HeaderMap) -> Option<String> {
    if let Some((_, t)) = query.iter().find(|(k, _)| k == "token") {
        if !t.is_empty() {
            return Some(t.clone());
        }
    }
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .filter(|v| !v.is_empty())
    };
    if let Some(t) = header("x-consul-token") {
        return Some(t.to_owned());
    }
    let auth = header("authorization")?;
    let parts: Vec<&str> = auth.split(' ').collect();
    if parts.len() > 1 && parts[0].eq_ignore_ascii_case("bearer") {
        let value = parts[1..].join(" ");
        let token = value.trim().split(' ').next().unwrap_or("").trim();
        if !token.is_empty() {
            return Some(token.to_owned());
        }
    }
    None
}

// === server ===

/// The connection was closed on purpose without an answer (`drop_blocked`, bad body).
#[derive(Debug)]
struct Hangup(&'static str);

impl fmt::Display for Hangup {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}

impl std::error::Error for Hangup {}

fn spawn_server(shared: Arc<Shared>, listener: TcpListener) -> ServerTask {
    let (stop, stopped) = oneshot::channel();
    let task = tokio::spawn(accept_loop(shared, listener, stopped));
    ServerTask { stop, task }
}

async fn accept_loop(shared: Arc<Shared>, listener: TcpListener, mut stop: oneshot::Receiver<()>) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            biased;
            _ = &mut stop => break,
            Some(_) = conns.join_next() => {}
            accepted = listener.accept() => {
                let Ok((stream, peer)) = accepted else {
                    // Transient (aborted handshake, fd pressure); a short pause avoids spinning.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                // Nagle would add ~40 ms to small responses and skew timing assertions.
                let _ = stream.set_nodelay(true);
                match ConnSlot::acquire(&shared, peer.ip()) {
                    Some(slot) => conns.spawn(serve_conn(Arc::clone(&shared), stream, slot)),
                    None => conns.spawn(reject_over_limit(stream)),
                };
            }
        }
    }
    // Free the port first, then cut every connection, blocked queries included.
    drop(listener);
    conns.shutdown().await;
}

/// One accepted connection's place in the per-client-IP count; freed on drop.
struct ConnSlot {
    shared: Arc<Shared>,
    ip: IpAddr,
}

impl ConnSlot {
    fn acquire(shared: &Arc<Shared>, ip: IpAddr) -> Option<Self> {
        let mut conns = lock(&shared.conns);
        let open = conns.entry(ip).or_insert(0);
        let limit = shared.opts.max_conns_per_client;
        if limit > 0 && *open >= limit {
            return None;
        }
        *open += 1;
        Some(Self {
            shared: Arc::clone(shared),
            ip,
        })
    }
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        let mut conns = lock(&self.shared.conns);
        if let Some(open) = conns.get_mut(&self.ip) {
            *open -= 1;
            if *open == 0 {
                conns.remove(&self.ip);
            }
        }
    }
}

async fn serve_conn(shared: Arc<Shared>, stream: TcpStream, slot: ConnSlot) {
    let svc = service_fn(move |req| handle(Arc::clone(&shared), req));
    // Go canonicalises header names (`X-Consul-Knownleader`); title case gives the same.
    let conn = http1::Builder::new()
        .keep_alive(true)
        .title_case_headers(true)
        .timer(TokioTimer::new())
        .serve_connection(TokioIo::new(CountedStream { slot, stream }), svc);
    // Errors are clients going away or hang-ups we caused on purpose.
    let _ = conn.await;
}

/// A connection that holds its per-IP slot. Fields drop in order, so the slot is free
/// before the socket closes and a client that saw the close can reconnect at once.
struct CountedStream {
    slot: ConnSlot,
    stream: TcpStream,
}

impl AsyncRead for CountedStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for CountedStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// What Consul's go-connlimit does for a client IP over the limit: a raw 429 with
/// `Connection: close`, written outside the HTTP server.
async fn reject_over_limit(mut stream: TcpStream) {
    // Unlike Go, which writes at once, read the request head first: a response that
    // arrives before the request makes HTTP clients report a broken connection instead of
    // the 429, which would make tests flaky.
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    let read_head = async {
        while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 64 * 1024 {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => head.extend_from_slice(&buf[..n]),
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), read_head).await;
    let response = format!(
        "HTTP/1.1 429 Too Many Requests\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{TOO_MANY_CONNS}",
        TOO_MANY_CONNS.len()
    );
    let _ = stream.write_all(response.as_bytes()).await;
    let _ = stream.shutdown().await;
    // Drain briefly so unread request bytes do not turn our close into a RST.
    let drain = async { while matches!(stream.read(&mut buf).await, Ok(n) if n > 0) {} };
    let _ = tokio::time::timeout(Duration::from_millis(200), drain).await;
}

/// Decrements a gauge (blocked queries, held answers) when the wait ends, however it ends.
struct BlockedGuard<'a>(&'a watch::Sender<usize>);

impl<'a> BlockedGuard<'a> {
    fn new(gauge: &'a watch::Sender<usize>) -> Self {
        gauge.send_modify(|n| *n += 1);
        Self(gauge)
    }
}

impl Drop for BlockedGuard<'_> {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n -= 1);
    }
}

// === request handling ===

/// A request after recording: decoded path and query.
struct Req {
    method: Method,
    path: String,
    query: Vec<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
}

impl Req {
    fn q(&self, key: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    fn has(&self, key: &str) -> bool {
        self.query.iter().any(|(k, _)| k == key)
    }

    fn all(&self, key: &str) -> Vec<&str> {
        self.query
            .iter()
            .filter(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
            .collect()
    }
}

/// Query meta of a blocking-capable read, sent as `X-Consul-*` headers.
#[derive(Debug, Clone, Copy)]
struct Meta {
    index: u64,
    known_leader: bool,
    last_contact_ms: u64,
    consistency: &'static str,
    filtered: bool,
    /// False for failed RPCs: an error never blocks.
    blockable: bool,
}

impl Meta {
    fn ok(index: u64, filtered: bool) -> Self {
        Self {
            index,
            known_leader: true,
            last_contact_ms: 0,
            consistency: "leader",
            filtered,
            blockable: true,
        }
    }

    /// What an endpoint's deferred `setMeta` sends after a failed RPC: zero values.
    fn failed(consistency: &'static str) -> Self {
        Self {
            index: 0,
            known_leader: false,
            last_contact_ms: 0,
            consistency,
            filtered: false,
            blockable: false,
        }
    }
}

/// A response before the common headers are added.
struct Reply {
    status: StatusCode,
    body: Bytes,
    content_type: Option<&'static str>,
    headers: Vec<(HeaderName, HeaderValue)>,
    meta: Option<Meta>,
}

impl Reply {
    /// Consul's plain-text error; an empty message sends no body and no `Content-Type`.
    fn text(status: StatusCode, msg: impl Into<String>) -> Self {
        let msg = msg.into();
        Self {
            status,
            content_type: (!msg.is_empty()).then_some(TEXT_PLAIN),
            body: Bytes::from(msg),
            headers: Vec::new(),
            meta: None,
        }
    }

    fn bad_request(msg: impl Into<String>) -> Self {
        Self::text(StatusCode::BAD_REQUEST, msg)
    }

    fn json(body: Bytes) -> Self {
        Self {
            status: StatusCode::OK,
            body,
            content_type: Some(APPLICATION_JSON),
            headers: Vec::new(),
            meta: None,
        }
    }

    /// Agent writes answer 200 with an empty body.
    fn empty() -> Self {
        Self::text(StatusCode::OK, "")
    }

    fn with_meta(mut self, meta: Meta) -> Self {
        self.meta = Some(meta);
        self
    }

    fn with_header(mut self, name: &'static str, value: &'static str) -> Self {
        self.headers.push((
            HeaderName::from_static(name),
            HeaderValue::from_static(value),
        ));
        self
    }

    fn wants_block(&self, min_index: u64) -> bool {
        self.meta
            .is_some_and(|m| m.blockable && min_index > 0 && m.index <= min_index)
    }
}

async fn handle(
    shared: Arc<Shared>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Hangup> {
    let (parts, body) = req.into_parts();
    let (body, too_large) = match Limited::new(body, MAX_BODY).collect().await {
        Ok(b) => (b.to_bytes(), false),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => (Bytes::new(), true),
        Err(_) => return Err(Hangup("client went away mid-body")),
    };
    let raw_path = parts.uri.path().to_owned();
    let query = parse_query(parts.uri.query().unwrap_or(""));
    let recorded = RecordedRequest {
        method: parts.method.clone(),
        path: raw_path.clone(),
        query: query.clone(),
        headers: parts.headers.clone(),
        body: body.clone(),
        at: Instant::now(),
    };
    lock(&shared.log).push(recorded);
    shared.seen.send_modify(|n| *n += 1);

    let latency = shared.state().latency;
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    let req = Req {
        method: parts.method,
        path: percent_decode(&raw_path, false).unwrap_or_default(),
        query,
        headers: parts.headers,
        body,
    };
    let gzip = accepts_gzip(&req.headers);
    let injected = take_failure(&mut shared.state().failures, &raw_path);
    let reply = if let Some((status, body)) = injected {
        let reply = Reply::text(status, body);
        if req.method == Method::GET && is_blocking_read(&req.path) {
            reply.with_meta(Meta::failed(consistency_of(&req)))
        } else {
            reply
        }
    } else if too_large {
        Reply::text(StatusCode::PAYLOAD_TOO_LARGE, "Request body too large")
    } else if req.path.is_empty() {
        Reply::bad_request("Invalid URL path: bad percent-encoding")
    } else {
        route(&shared, &req).await?
    };
    hold_answer(&shared, &raw_path).await;
    let reply = if gzip { gzip_reply(reply) } else { reply };
    Ok(finish(&shared, reply))
}

/// Consul's agent wraps every handler in a gzip handler with no minimum size, so any answer
/// with a body is compressed when the client asked for gzip.
fn accepts_gzip(headers: &HeaderMap) -> bool {
    headers
        .get_all(ACCEPT_ENCODING)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|coding| {
            let mut parts = coding.split(';').map(str::trim);
            let name = parts.next().unwrap_or("");
            let refused = parts.any(|p| p.replace(' ', "") == "q=0");
            (name.eq_ignore_ascii_case("gzip") || name == "*") && !refused
        })
}

fn gzip_reply(mut reply: Reply) -> Reply {
    if reply.body.is_empty() {
        return reply;
    }
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    std::io::Write::write_all(&mut encoder, &reply.body).expect("gzip into memory");
    reply.body = Bytes::from(encoder.finish().expect("gzip into memory"));
    reply
        .headers
        .push((CONTENT_ENCODING, HeaderValue::from_static("gzip")));
    reply
}

/// Waits while a [`ConsulEmulator::hold_answers`] prefix matches `path`.
async fn hold_answer(shared: &Shared, path: &str) {
    let matches = |holds: &Vec<(u64, String)>| holds.iter().any(|(_, p)| path.starts_with(p));
    let mut rx = shared.holds.subscribe();
    if !matches(&rx.borrow_and_update()) {
        return;
    }
    let _held = BlockedGuard::new(&shared.held);
    // Err only if the sender is gone, i.e. the emulator itself.
    let _ = rx.wait_for(|holds| !matches(holds)).await;
}

fn take_failure(rules: &mut VecDeque<Failure>, path: &str) -> Option<(StatusCode, String)> {
    let rule = rules
        .iter_mut()
        .find(|r| r.remaining > 0 && path.starts_with(&r.prefix))?;
    rule.remaining -= 1;
    let out = (rule.status, rule.body.clone());
    rules.retain(|r| r.remaining > 0);
    Some(out)
}

fn is_blocking_read(path: &str) -> bool {
    [
        "/v1/health/",
        "/v1/catalog/",
        "/v1/kv/",
        "/v1/agent/connect/ca/",
    ]
    .iter()
    .any(|p| path.starts_with(p))
}

/// `X-Consul-Effective-Consistency` for the flags sent (validity is checked elsewhere).
fn consistency_of(req: &Req) -> &'static str {
    let max_stale = req
        .q("max_stale")
        .and_then(parse_go_duration)
        .is_some_and(|d| d > 0);
    if req.has("consistent") {
        "consistent"
    } else if req.has("stale") || max_stale {
        "stale"
    } else {
        "leader"
    }
}

/// Adds the headers every wrapped Consul response carries, plus query meta on reads.
fn finish(shared: &Shared, reply: Reply) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(reply.body));
    *resp.status_mut() = reply.status;
    let h = resp.headers_mut();
    if let Some(ct) = reply.content_type {
        h.insert(CONTENT_TYPE, HeaderValue::from_static(ct));
    }
    h.insert("vary", HeaderValue::from_static("Accept-Encoding"));
    let policy = if shared.opts.acl.is_some() {
        "deny"
    } else {
        "allow"
    };
    h.insert(
        "x-consul-default-acl-policy",
        HeaderValue::from_static(policy),
    );
    if let Some(m) = reply.meta {
        // setIndex rewrites 0 to 1 so clients cannot busy-loop on index=0.
        h.insert("x-consul-index", HeaderValue::from(m.index.max(1)));
        let known = if m.known_leader { "true" } else { "false" };
        h.insert("x-consul-knownleader", HeaderValue::from_static(known));
        h.insert("x-consul-lastcontact", HeaderValue::from(m.last_contact_ms));
        h.insert(
            "x-consul-effective-consistency",
            HeaderValue::from_static(m.consistency),
        );
        h.insert(
            "x-consul-query-backend",
            HeaderValue::from_static("blocking-query"),
        );
        if m.filtered {
            h.insert(
                "x-consul-results-filtered-by-acls",
                HeaderValue::from_static("true"),
            );
        }
    }
    for (name, value) in reply.headers {
        h.append(name, value);
    }
    resp
}

// === routing ===

const GET: &[Method] = &[Method::GET];
const PUT: &[Method] = &[Method::PUT];
const KV_METHODS: &[Method] = &[Method::GET, Method::PUT, Method::DELETE];

enum Route<'a> {
    HealthService(&'a str),
    HealthConnect(&'a str),
    CatalogService(&'a str),
    ConnectRoots,
    ConnectLeaf(&'a str),
    HealthState(&'a str),
    CatalogServices,
    Kv(&'a str),
    StatusLeader,
    StatusPeers,
    AgentRegister,
    AgentDeregister(&'a str),
    AgentService(&'a str),
    CheckUpdate(&'static str, &'a str),
    ServiceMaintenance(&'a str),
    NodeMaintenance,
}

fn match_route(path: &str) -> Option<(Route<'_>, &'static [Method])> {
    let prefixed: [(&str, &'static [Method]); 13] = [
        ("/v1/health/service/", GET),
        ("/v1/health/connect/", GET),
        ("/v1/catalog/service/", GET),
        ("/v1/agent/connect/ca/leaf/", GET),
        ("/v1/health/state/", GET),
        ("/v1/kv/", KV_METHODS),
        ("/v1/agent/service/deregister/", PUT),
        ("/v1/agent/service/maintenance/", PUT),
        ("/v1/agent/check/pass/", PUT),
        ("/v1/agent/check/warn/", PUT),
        ("/v1/agent/check/fail/", PUT),
        ("/v1/agent/check/update/", PUT),
        ("/v1/agent/service/", GET),
    ];
    for (prefix, methods) in prefixed {
        let Some(rest) = path.strip_prefix(prefix) else {
            continue;
        };
        // `/v1/agent/service/register` is an exact route, matched below.
        if prefix == "/v1/agent/service/" && rest == "register" {
            continue;
        }
        let route = match prefix {
            "/v1/health/service/" => Route::HealthService(rest),
            "/v1/health/connect/" => Route::HealthConnect(rest),
            "/v1/catalog/service/" => Route::CatalogService(rest),
            "/v1/agent/connect/ca/leaf/" => Route::ConnectLeaf(rest),
            "/v1/health/state/" => Route::HealthState(rest),
            "/v1/kv/" => Route::Kv(rest),
            "/v1/agent/service/deregister/" => Route::AgentDeregister(rest),
            "/v1/agent/service/maintenance/" => Route::ServiceMaintenance(rest),
            "/v1/agent/check/pass/" => Route::CheckUpdate("passing", rest),
            "/v1/agent/check/warn/" => Route::CheckUpdate("warning", rest),
            "/v1/agent/check/fail/" => Route::CheckUpdate("critical", rest),
            "/v1/agent/service/" => Route::AgentService(rest),
            _ => Route::CheckUpdate("", rest),
        };
        return Some((route, methods));
    }
    Some(match path {
        "/v1/catalog/services" => (Route::CatalogServices, GET),
        "/v1/agent/connect/ca/roots" => (Route::ConnectRoots, GET),
        "/v1/status/leader" => (Route::StatusLeader, GET),
        "/v1/status/peers" => (Route::StatusPeers, GET),
        "/v1/agent/service/register" => (Route::AgentRegister, PUT),
        "/v1/agent/maintenance" => (Route::NodeMaintenance, PUT),
        _ => return None,
    })
}

async fn route(shared: &Shared, req: &Req) -> Result<Reply, Hangup> {
    let Some((route, methods)) = match_route(&req.path) else {
        return Ok(Reply::text(
            StatusCode::NOT_FOUND,
            "Invalid URL path: not a recognized HTTP API endpoint",
        ));
    };
    let allow = std::iter::once("OPTIONS")
        .chain(methods.iter().map(Method::as_str))
        .collect::<Vec<_>>()
        .join(",");
    if req.method == Method::OPTIONS {
        let mut reply = Reply::empty();
        reply.headers.push((
            ALLOW,
            HeaderValue::from_str(&allow).expect("method names are ASCII"),
        ));
        return Ok(reply);
    }
    if !methods.contains(&req.method) {
        let mut reply = Reply::text(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("method {} not allowed", req.method),
        );
        reply.headers.push((
            ALLOW,
            HeaderValue::from_str(&allow).expect("method names are ASCII"),
        ));
        return Ok(reply);
    }
    match route {
        Route::HealthService(name) => health_service(shared, req, name, false).await,
        Route::HealthConnect(name) => health_service(shared, req, name, true).await,
        Route::CatalogService(name) => catalog_service(shared, req, name).await,
        Route::ConnectRoots => connect_roots(shared, req).await,
        Route::ConnectLeaf(name) => connect_leaf(shared, req, name).await,
        Route::HealthState(state) => health_state(shared, req, state).await,
        Route::CatalogServices => catalog_services(shared, req).await,
        Route::Kv(key) if req.method == Method::GET => kv_get(shared, req, key).await,
        Route::Kv(key) => Ok(kv_write(shared, req, key)),
        Route::StatusLeader => Ok(status_leader(shared, req)),
        Route::StatusPeers => Ok(Reply::json(to_json(
            &[format!("{}:8300", shared.opts.node_address)],
            req.has("pretty"),
        ))),
        Route::AgentRegister => Ok(agent_register(shared, req)),
        Route::AgentDeregister(id) => Ok(agent_deregister(shared, req, id)),
        Route::AgentService(id) => Ok(agent_service(shared, req, id)),
        Route::CheckUpdate(status, id) => Ok(agent_check_update(shared, req, status, id)),
        Route::ServiceMaintenance(id) => Ok(agent_service_maintenance(shared, req, id)),
        Route::NodeMaintenance => Ok(agent_node_maintenance(shared, req)),
    }
}

// === ACL ===

/// Who is asking, after token resolution.
#[derive(Debug, Clone)]
enum Authz {
    /// ACLs disabled: everything allowed, nothing filtered.
    Off,
    /// No token sent; default policy `deny`.
    Anonymous,
    Token {
        accessor: String,
        scope: TokenScope,
    },
}

impl Authz {
    fn service(&self, name: &str) -> bool {
        match self {
            Self::Off => true,
            Self::Anonymous => false,
            Self::Token { scope, .. } => match scope {
                TokenScope::All => true,
                TokenScope::Services(names) => names.contains(name),
            },
        }
    }

    fn node_read(&self) -> bool {
        !matches!(self, Self::Anonymous)
    }

    /// Node writes and KV access need a management-like token.
    fn full(&self) -> bool {
        matches!(
            self,
            Self::Off
                | Self::Token {
                    scope: TokenScope::All,
                    ..
                }
        )
    }

    /// `X-Consul-Results-Filtered-By-ACLs` is only sent to non-anonymous callers.
    fn reports_filtered(&self) -> bool {
        matches!(self, Self::Token { .. })
    }

    /// Consul's current `Permission denied` text for `perm` (e.g. `service:write`).
    fn denied(&self, perm: &str, resource: &str) -> Reply {
        let msg = match self {
            Self::Token { accessor, .. } => format!(
                "Permission denied: token with AccessorID '{accessor}' lacks permission '{perm}' on {resource:?}"
            ),
            _ => format!(
                "Permission denied: anonymous token lacks permission '{perm}' on {resource:?}. {ANONYMOUS_SUFFIX}"
            ),
        };
        Reply::text(StatusCode::FORBIDDEN, msg)
    }
}

fn resolve_token(shared: &Shared, req: &Req) -> Result<Authz, Reply> {
    let Some(acl) = &shared.opts.acl else {
        return Ok(Authz::Off);
    };
    match request_token(&req.query, &req.headers) {
        None => Ok(Authz::Anonymous),
        Some(secret) => match acl.tokens.get(&secret) {
            Some(scope) => Ok(Authz::Token {
                accessor: fake_uuid(&format!("accessor/{secret}")),
                scope: scope.clone(),
            }),
            None => Err(Reply::text(StatusCode::FORBIDDEN, "ACL not found")),
        },
    }
}

// === reads ===

/// Parsed blocking and consistency options of a read.
struct QueryOpts {
    index: u64,
    /// Effective wait: clamped, defaulted and jittered.
    wait: Duration,
    consistency: &'static str,
    pretty: bool,
    cached: bool,
}

/// Consul's `parseEntMeta` + `parseConsistency` + `parseWait`; errors are 400s without meta.
fn parse_read(shared: &Shared, req: &Req) -> Result<QueryOpts, Reply> {
    let header_ns = req
        .headers
        .get("x-consul-namespace")
        .and_then(|v| v.to_str().ok());
    for (value, what) in [
        (req.q("ns").or(header_ns), "ns\" - Namespaces"),
        (req.q("partition"), "partition\" - Partitions"),
    ] {
        if value.is_some_and(|v| !v.is_empty() && v != "default") {
            return Err(Reply::bad_request(format!(
                "Invalid query parameter: \"{what} are a Consul Enterprise feature"
            )));
        }
    }
    let mut stale = req.has("stale");
    let consistent = req.has("consistent");
    let cached = req.has("cached");
    if let Some(raw) = req.q("max_stale").filter(|v| !v.is_empty()) {
        match parse_go_duration(raw) {
            Some(d) if d > 0 => stale = true,
            Some(_) => {}
            None => {
                return Err(Reply::bad_request(format!(
                    "Invalid max_stale value {raw:?}"
                )))
            }
        }
    }
    if stale && consistent {
        return Err(Reply::bad_request(
            "Cannot specify ?stale with ?consistent, conflicting semantics.",
        ));
    }
    if cached && consistent {
        return Err(Reply::bad_request(
            "Cannot specify ?cached with ?consistent, conflicting semantics.",
        ));
    }
    let mut wait_ns: i64 = 0;
    if let Some(raw) = req.q("wait").filter(|v| !v.is_empty()) {
        wait_ns = parse_go_duration(raw).ok_or_else(|| Reply::bad_request("Invalid wait time"))?;
    }
    let mut index = 0;
    if let Some(raw) = req.q("index").filter(|v| !v.is_empty()) {
        index = raw
            .parse::<u64>()
            .map_err(|_| Reply::bad_request("Invalid index"))?;
    }
    let o = &shared.opts;
    let requested = Duration::from_nanos(wait_ns.max(0).unsigned_abs());
    let mut wait = if requested > o.max_wait {
        o.max_wait
    } else if requested.is_zero() {
        o.default_wait
    } else {
        requested
    };
    if o.jitter {
        let span = u64::try_from((wait / 16).as_nanos()).unwrap_or(u64::MAX);
        if span > 0 {
            wait += Duration::from_nanos(fastrand::u64(0..span));
        }
    }
    Ok(QueryOpts {
        index,
        wait,
        consistency: if consistent {
            "consistent"
        } else if stale {
            "stale"
        } else {
            "leader"
        },
        pretty: req.has("pretty"),
        cached,
    })
}

impl Shared {
    /// The RPC part of a read: datacenter, token, leader, then Consul's blocking loop.
    async fn serve_read(
        &self,
        req: &Req,
        opts: &QueryOpts,
        compute: impl Fn(&State, &Authz) -> Reply,
    ) -> Result<Reply, Hangup> {
        let failed =
            |status, msg: &str| Reply::text(status, msg).with_meta(Meta::failed(opts.consistency));
        if req
            .q("dc")
            .is_some_and(|dc| !dc.is_empty() && dc != self.opts.datacenter)
        {
            return Ok(failed(
                StatusCode::INTERNAL_SERVER_ERROR,
                "No path to datacenter",
            ));
        }
        let authz = match resolve_token(self, req) {
            Ok(a) => a,
            Err(_) => return Ok(failed(StatusCode::FORBIDDEN, "ACL not found")),
        };
        let mut reply = self.block(opts, |st| compute(st, &authz)).await?;
        if opts.cached {
            reply = reply.with_header("x-cache", "MISS");
        }
        Ok(reply)
    }

    /// Runs `compute` until its index passes `opts.index`, the wait ends, a snapshot
    /// restore happens, or `drop_blocked` hangs the connection up.
    async fn block(
        &self,
        opts: &QueryOpts,
        compute: impl Fn(&State) -> Reply,
    ) -> Result<Reply, Hangup> {
        let run = |st: &State| {
            let (known, contact) = st.leader_meta();
            if !known && opts.consistency != "stale" {
                return Reply::text(StatusCode::INTERNAL_SERVER_ERROR, "No cluster leader")
                    .with_meta(Meta::failed(opts.consistency));
            }
            let mut reply = compute(st);
            if let Some(m) = reply.meta.as_mut() {
                m.known_leader = known;
                m.last_contact_ms = contact;
                m.consistency = opts.consistency;
            }
            reply
        };
        let mut changes = self.changes.subscribe();
        let start = *changes.borrow_and_update();
        let first = run(&self.state());
        if !first.wants_block(opts.index) {
            return Ok(first);
        }
        let _blocked = BlockedGuard::new(&self.blocked);
        let deadline = Instant::now() + opts.wait;
        loop {
            tokio::select! {
                () = tokio::time::sleep_until(deadline) => return Ok(run(&self.state())),
                changed = changes.changed() => {
                    if changed.is_err() {
                        return Err(Hangup("emulator dropped"));
                    }
                    let now = *changes.borrow_and_update();
                    if now.drops != start.drops {
                        return Err(Hangup("drop_blocked"));
                    }
                    let reply = run(&self.state());
                    if now.restores != start.restores || !reply.wants_block(opts.index) {
                        return Ok(reply);
                    }
                }
            }
        }
    }
}

/// `node-meta=k:v` pairs (split at the first `:`) against a node's meta.
fn node_meta_matches(wanted: &[(&str, &str)]) -> bool {
    wanted.iter().all(|(k, v)| match *k {
        "consul-network-segment" => v.is_empty(),
        "consul-version" => *v == CONSUL_VERSION,
        _ => false,
    })
}

fn parse_node_meta(req: &Req) -> Vec<(&str, &str)> {
    req.all("node-meta")
        .into_iter()
        .map(|kv| kv.split_once(':').unwrap_or((kv, "")))
        .collect()
}

fn filter_unsupported(req: &Req) -> Option<Reply> {
    req.q("filter").filter(|f| !f.is_empty()).map(|_| {
        Reply::text(
            StatusCode::INTERNAL_SERVER_ERROR,
            "Failed to create boolean expression evaluator: the Consul emulator does not implement ?filter",
        )
    })
}

/// `/v1/health/service/<name>`, or with `connect` `/v1/health/connect/<name>` (the sidecars
/// and Connect-native instances serving `name`, CONNECT.md §4.1).
async fn health_service(
    shared: &Shared,
    req: &Req,
    name: &str,
    connect: bool,
) -> Result<Reply, Hangup> {
    let opts = match parse_read(shared, req) {
        Ok(o) => o,
        Err(reply) => return Ok(reply),
    };
    if name.is_empty() {
        return Ok(Reply::bad_request("Missing service name"));
    }
    let passing = match req.q("passing") {
        None => false,
        Some("") => true,
        Some(v) => match parse_go_bool(v) {
            Some(b) => b,
            None => return Ok(Reply::bad_request("Invalid value for ?passing")),
        },
    };
    let filter = match parse_filter(req, &["Node", "Service", "Checks"]) {
        Ok(f) => f,
        Err(reply) => return Ok(reply.with_meta(Meta::failed(opts.consistency))),
    };
    // Consul lower-cases both sides (`serviceTagFilter`).
    let tags: Vec<String> = req.all("tag").iter().map(|t| t.to_lowercase()).collect();
    let node_meta = parse_node_meta(req);
    let peered = req.q("peer").is_some_and(|p| !p.is_empty());
    let dc = shared.opts.datacenter.as_str();
    shared
        .serve_read(req, &opts, |st, authz| {
            let index = if connect {
                st.health_connect_index(name)
            } else {
                st.health_service_index(name)
            };
            let mut filtered = false;
            let mut entries = Vec::new();
            for ((node_name, _), svc) in &st.services {
                let member = if connect {
                    svc.def.serves_mesh(name)
                } else {
                    svc.def.name == name
                };
                if peered || !member {
                    continue;
                }
                let has_tags = tags
                    .iter()
                    .all(|want| svc.def.tags.iter().any(|t| t.to_lowercase() == *want));
                let Some(node) = st.nodes.get(node_name) else {
                    continue;
                };
                if !has_tags || !node_meta_matches(&node_meta) {
                    continue;
                }
                if !authz.service(name) || !authz.node_read() {
                    filtered = true;
                    continue;
                }
                let checks = instance_checks(st, node_name, &svc.def.id);
                // Applied by the agent after the RPC: warning and node checks count too.
                if passing && checks.iter().any(|(_, c)| c.status != "passing") {
                    continue;
                }
                entries.push(HealthEntryJson {
                    node: node_json(node_name, node, dc),
                    service: service_json(svc),
                    checks: checks.iter().map(|(n, c)| check_json(n, c)).collect(),
                });
            }
            if let Some(f) = &filter {
                entries.retain(|e| filter::eval(f, &serde_json::to_value(e).unwrap_or_default()));
            }
            Reply::json(to_json(&entries, opts.pretty))
                .with_meta(Meta::ok(index, filtered && authz.reports_filtered()))
        })
        .await
}

async fn health_state(shared: &Shared, req: &Req, state: &str) -> Result<Reply, Hangup> {
    let opts = match parse_read(shared, req) {
        Ok(o) => o,
        Err(reply) => return Ok(reply),
    };
    if state.is_empty() {
        return Ok(Reply::bad_request("Missing check state"));
    }
    if state != "any" && !valid_status(state) {
        return Ok(
            Reply::text(StatusCode::INTERNAL_SERVER_ERROR, "Invalid check state")
                .with_meta(Meta::failed(opts.consistency)),
        );
    }
    if let Some(reply) = filter_unsupported(req) {
        return Ok(reply.with_meta(Meta::failed(opts.consistency)));
    }
    shared
        .serve_read(req, &opts, |st, authz| {
            let mut filtered = false;
            let mut checks = Vec::new();
            for ((node, _), c) in &st.checks {
                if state != "any" && c.status != state {
                    continue;
                }
                let allowed = if c.service_id.is_empty() {
                    authz.node_read()
                } else {
                    authz.service(&c.service_name)
                };
                if !allowed {
                    filtered = true;
                    continue;
                }
                checks.push(check_json(node, c));
            }
            Reply::json(to_json(&checks, opts.pretty)).with_meta(Meta::ok(
                st.checks_index,
                filtered && authz.reports_filtered(),
            ))
        })
        .await
}

async fn catalog_services(shared: &Shared, req: &Req) -> Result<Reply, Hangup> {
    let opts = match parse_read(shared, req) {
        Ok(o) => o,
        Err(reply) => return Ok(reply),
    };
    if let Some(reply) = filter_unsupported(req) {
        return Ok(reply.with_meta(Meta::failed(opts.consistency)));
    }
    let node_meta = parse_node_meta(req);
    shared
        .serve_read(req, &opts, |st, authz| {
            let mut filtered = false;
            let mut out: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
            if node_meta_matches(&node_meta) {
                for svc in st.services.values() {
                    if !authz.service(&svc.def.name) {
                        filtered = true;
                        continue;
                    }
                    let tags = out.entry(svc.def.name.as_str()).or_default();
                    for t in &svc.def.tags {
                        if !tags.contains(&t.as_str()) {
                            tags.push(t);
                        }
                    }
                }
            }
            Reply::json(to_json(&out, opts.pretty)).with_meta(Meta::ok(
                st.services_index,
                filtered && authz.reports_filtered(),
            ))
        })
        .await
}

/// `?filter=` parsed for an endpoint whose entries have the top-level fields `roots`; a bad
/// one is Consul's 500 (CONNECT.md §10.2).
fn parse_filter(req: &Req, roots: &[&str]) -> Result<Option<filter::Expr>, Reply> {
    match req.q("filter").filter(|f| !f.is_empty()) {
        None => Ok(None),
        Some(src) => filter::parse(src, roots).map(Some).map_err(|e| {
            Reply::text(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("Failed to create boolean expression evaluator: {e}"),
            )
        }),
    }
}

/// Top-level fields of a `/v1/catalog/service` entry (filter selectors).
const CATALOG_FIELDS: &[&str] = &[
    "ID",
    "Node",
    "Address",
    "Datacenter",
    "TaggedAddresses",
    "NodeMeta",
    "ServiceKind",
    "ServiceID",
    "ServiceName",
    "ServiceTags",
    "ServiceAddress",
    "ServiceTaggedAddresses",
    "ServiceWeights",
    "ServiceMeta",
    "ServicePort",
    "ServiceSocketPath",
    "ServiceEnableTagOverride",
    "ServiceProxy",
    "ServiceConnect",
];

/// `/v1/catalog/service/<name>`: flat entries, no health (CONNECT.md §10.1).
async fn catalog_service(shared: &Shared, req: &Req, name: &str) -> Result<Reply, Hangup> {
    let opts = match parse_read(shared, req) {
        Ok(o) => o,
        Err(reply) => return Ok(reply),
    };
    if name.is_empty() {
        return Ok(Reply::bad_request("Missing service name"));
    }
    let filter = match parse_filter(req, CATALOG_FIELDS) {
        Ok(f) => f,
        Err(reply) => return Ok(reply.with_meta(Meta::failed(opts.consistency))),
    };
    let tags: Vec<String> = req.all("tag").iter().map(|t| t.to_lowercase()).collect();
    let node_meta = parse_node_meta(req);
    let dc = shared.opts.datacenter.as_str();
    shared
        .serve_read(req, &opts, |st, authz| {
            let mut filtered = false;
            let mut entries = Vec::new();
            for ((node_name, _), svc) in &st.services {
                let has_tags = tags
                    .iter()
                    .all(|want| svc.def.tags.iter().any(|t| t.to_lowercase() == *want));
                let Some(node) = st.nodes.get(node_name) else {
                    continue;
                };
                if svc.def.name != name || !has_tags || !node_meta_matches(&node_meta) {
                    continue;
                }
                if !authz.service(name) || !authz.node_read() {
                    filtered = true;
                    continue;
                }
                entries.push(catalog_json(node_name, node, dc, svc));
            }
            if let Some(f) = &filter {
                entries.retain(|e| filter::eval(f, &serde_json::to_value(e).unwrap_or_default()));
            }
            Reply::json(to_json(&entries, opts.pretty)).with_meta(Meta::ok(
                st.health_service_index(name),
                filtered && authz.reports_filtered(),
            ))
        })
        .await
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct CatalogJson<'a> {
    #[serde(rename = "ID")]
    id: &'a str,
    node: &'a str,
    address: &'a str,
    datacenter: &'a str,
    tagged_addresses: BTreeMap<&'static str, &'a str>,
    node_meta: BTreeMap<&'static str, &'static str>,
    service_kind: &'a str,
    #[serde(rename = "ServiceID")]
    service_id: &'a str,
    service_name: &'a str,
    service_tags: &'a [String],
    service_address: &'a str,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    service_tagged_addresses: BTreeMap<&'a str, TaggedJson<'a>>,
    service_weights: WeightsJson,
    service_meta: Option<&'a BTreeMap<String, String>>,
    service_port: u16,
    service_socket_path: &'static str,
    service_enable_tag_override: bool,
    service_proxy: ProxyJson<'a>,
    service_connect: ConnectJson,
    create_index: u64,
    modify_index: u64,
}

fn catalog_json<'a>(name: &'a str, node: &'a Node, dc: &'a str, s: &'a Service) -> CatalogJson<'a> {
    let n = node_json(name, node, dc);
    let v = service_json(s);
    CatalogJson {
        id: n.id,
        node: n.node,
        address: n.address,
        datacenter: n.datacenter,
        tagged_addresses: n.tagged_addresses,
        node_meta: n.meta,
        service_kind: v.kind,
        service_id: v.id,
        service_name: v.service,
        service_tags: v.tags,
        service_address: v.address,
        service_tagged_addresses: v.tagged_addresses,
        service_weights: v.weights,
        service_meta: v.meta,
        service_port: v.port,
        service_socket_path: "",
        service_enable_tag_override: v.enable_tag_override,
        service_proxy: v.proxy,
        service_connect: v.connect,
        create_index: v.create_index,
        modify_index: v.modify_index,
    }
}

/// `/v1/agent/connect/ca/roots` (CONNECT.md §2): no ACL, blocks on the roots index.
async fn connect_roots(shared: &Shared, req: &Req) -> Result<Reply, Hangup> {
    let opts = match parse_read(shared, req) {
        Ok(o) => o,
        Err(reply) => return Ok(reply),
    };
    shared
        .serve_read(req, &opts, |st, _| {
            Reply::json(to_json(&st.ca.roots_json(), opts.pretty))
                .with_meta(Meta::ok(st.ca.index, false))
        })
        .await
}

/// `/v1/agent/connect/ca/leaf/<service>` (CONNECT.md §3): `service:write`, revalidation
/// (a missing, stale-root or nearly expired leaf is minted first), then blocking until a
/// new leaf is issued.
async fn connect_leaf(shared: &Shared, req: &Req, service: &str) -> Result<Reply, Hangup> {
    let opts = match parse_read(shared, req) {
        Ok(o) => o,
        Err(reply) => return Ok(reply),
    };
    let authz = match resolve_token(shared, req) {
        Ok(a) => a,
        Err(reply) => return Ok(reply),
    };
    if !authz.service(service) {
        return Ok(authz.denied("service:write", service));
    }
    shared.write(|st| {
        if st.ca.needs_issue(service) {
            let idx = st.next_index();
            st.ca.issue(service, idx);
        }
    });
    shared
        .serve_read(req, &opts, |st, _| match st.ca.leaf(service) {
            Some(leaf) => Reply::json(to_json(&leaf.json(service), opts.pretty))
                .with_meta(Meta::ok(leaf.modify_index, false)),
            None => Reply::text(
                StatusCode::INTERNAL_SERVER_ERROR,
                "leaf certificate missing",
            )
            .with_meta(Meta::failed(opts.consistency)),
        })
        .await
}

async fn kv_get(shared: &Shared, req: &Req, key: &str) -> Result<Reply, Hangup> {
    let opts = match parse_read(shared, req) {
        Ok(o) => o,
        Err(reply) => return Ok(reply),
    };
    let recurse = req.has("recurse");
    let keys = req.has("keys");
    let raw = req.has("raw");
    let separator = req.q("separator").unwrap_or("");
    if key.is_empty() && !recurse && !keys {
        return Ok(Reply::bad_request("Missing key name"));
    }
    // A single-key read without key:read is a 403 (lists are filtered instead).
    if !recurse && !keys {
        if let Ok(authz) = resolve_token(shared, req) {
            if !authz.full() {
                return Ok(authz
                    .denied("key:read", key)
                    .with_meta(Meta::failed(opts.consistency)));
            }
        }
    }
    let not_found =
        |index| Reply::text(StatusCode::NOT_FOUND, "").with_meta(Meta::ok(index, false));
    shared
        .serve_read(req, &opts, |st, authz| {
            let index = st.kv_read_index(key, recurse || keys);
            let under: Vec<(&String, &KvEntry)> = st
                .kv
                .range(key.to_owned()..)
                .take_while(|(k, _)| k.starts_with(key))
                .collect();
            if keys || recurse {
                if !authz.full() {
                    let mut reply = not_found(index);
                    if let Some(m) = reply.meta.as_mut() {
                        m.filtered = !under.is_empty() && authz.reports_filtered();
                    }
                    return reply;
                }
                if under.is_empty() {
                    return not_found(index);
                }
            }
            let body = if keys {
                let mut listed: Vec<&str> = Vec::new();
                for (k, _) in &under {
                    let rest = &k[key.len()..];
                    let shown = match rest.find(separator).filter(|_| !separator.is_empty()) {
                        Some(i) => &k[..key.len() + i + separator.len()],
                        None => k.as_str(),
                    };
                    if listed.last() != Some(&shown) {
                        listed.push(shown);
                    }
                }
                to_json(&listed, opts.pretty)
            } else {
                let entries: Vec<KvJson<'_>> = if recurse {
                    under.iter().map(|(k, e)| kv_json(k, e)).collect()
                } else {
                    match st.kv.get(key) {
                        Some(e) if raw => {
                            let value = Bytes::from(e.value.clone().unwrap_or_default());
                            let mut reply = Reply::json(value).with_meta(Meta::ok(index, false));
                            reply.content_type = Some(TEXT_PLAIN);
                            return reply;
                        }
                        Some(e) => vec![kv_json(key, e)],
                        None => return not_found(index),
                    }
                };
                to_json(&entries, opts.pretty)
            };
            Reply::json(body).with_meta(Meta::ok(index, false))
        })
        .await
}

fn kv_json<'a>(key: &'a str, e: &KvEntry) -> KvJson<'a> {
    KvJson {
        lock_index: 0,
        key,
        flags: e.flags,
        value: e.value.as_deref().map(base64),
        create_index: e.create_index,
        modify_index: e.modify_index,
    }
}

fn status_leader(shared: &Shared, req: &Req) -> Reply {
    let leader = if shared.state().leader {
        format!("{}:8300", shared.opts.node_address)
    } else {
        String::new()
    };
    Reply::json(to_json(&leader, req.has("pretty")))
}

// === writes ===

/// Go's name for a JSON value's kind in `cannot unmarshal` errors.
fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "bool",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// A JSON object decoded the way Consul does it: keys matched case-insensitively against
/// the Go field names and their snake_case aliases, unknown keys rejected
/// (`DisallowUnknownFields`), `null` treated as absent.
struct Fields<'a> {
    go_type: &'static str,
    values: HashMap<&'static str, &'a Value>,
}

impl<'a> Fields<'a> {
    fn decode(
        v: &'a Value,
        go_type: &'static str,
        known: &[(&'static str, &[&'static str])],
    ) -> Result<Self, String> {
        let Value::Object(map) = v else {
            return Err(format!(
                "json: cannot unmarshal {} into Go value of type {go_type}",
                json_kind(v)
            ));
        };
        let mut values = HashMap::new();
        for (key, value) in map {
            let field = known
                .iter()
                .find(|(name, aliases)| {
                    name.eq_ignore_ascii_case(key)
                        || aliases.iter().any(|a| a.eq_ignore_ascii_case(key))
                })
                .map(|(name, _)| *name)
                .ok_or_else(|| format!("json: unknown field {key:?}"))?;
            if !value.is_null() {
                values.insert(field, value);
            }
        }
        Ok(Self { go_type, values })
    }

    fn mismatch(&self, field: &str, v: &Value, go: &str) -> String {
        let kind = match v {
            Value::Number(n) => format!("number {n}"),
            other => json_kind(other).to_owned(),
        };
        format!(
            "json: cannot unmarshal {kind} into Go struct field {}.{field} of type {go}",
            self.go_type
        )
    }

    fn get(&self, field: &str) -> Option<&'a Value> {
        self.values.get(field).copied()
    }

    fn string(&self, field: &str) -> Result<String, String> {
        match self.get(field) {
            None => Ok(String::new()),
            Some(Value::String(s)) => Ok(s.clone()),
            Some(v) => Err(self.mismatch(field, v, "string")),
        }
    }

    fn boolean(&self, field: &str) -> Result<bool, String> {
        match self.get(field) {
            None => Ok(false),
            Some(Value::Bool(b)) => Ok(*b),
            Some(v) => Err(self.mismatch(field, v, "bool")),
        }
    }

    fn int(&self, field: &str) -> Result<Option<i64>, String> {
        match self.get(field) {
            None => Ok(None),
            Some(v @ Value::Number(n)) => n
                .as_i64()
                .map(Some)
                .ok_or_else(|| self.mismatch(field, v, "int")),
            Some(v) => Err(self.mismatch(field, v, "int")),
        }
    }

    fn strings(&self, field: &str) -> Result<Vec<String>, String> {
        match self.get(field) {
            None => Ok(Vec::new()),
            Some(Value::Array(items)) => items
                .iter()
                .map(|i| match i {
                    Value::String(s) => Ok(s.clone()),
                    other => Err(self.mismatch(field, other, "string")),
                })
                .collect(),
            Some(v) => Err(self.mismatch(field, v, "[]string")),
        }
    }

    fn string_map(&self, field: &str) -> Result<Option<BTreeMap<String, String>>, String> {
        match self.get(field) {
            None => Ok(None),
            Some(Value::Object(m)) => m
                .iter()
                .map(|(k, v)| match v {
                    Value::String(s) => Ok((k.clone(), s.clone())),
                    other => Err(self.mismatch(field, other, "string")),
                })
                .collect::<Result<_, _>>()
                .map(Some),
            Some(v) => Err(self.mismatch(field, v, "map[string]string")),
        }
    }

    /// Consul accepts Go duration strings or nanosecond numbers.
    fn duration(&self, field: &str) -> Result<Duration, String> {
        let ns = match self.get(field) {
            None => 0,
            Some(Value::String(s)) => {
                parse_go_duration(s).ok_or_else(|| format!("time: invalid duration {s:?}"))?
            }
            Some(v @ Value::Number(n)) => n
                .as_i64()
                .ok_or_else(|| self.mismatch(field, v, "time.Duration"))?,
            Some(v) => return Err(self.mismatch(field, v, "time.Duration")),
        };
        Ok(Duration::from_nanos(ns.max(0).unsigned_abs()))
    }
}

const SERVICE_FIELDS: &[(&str, &[&str])] = &[
    ("Kind", &[]),
    ("ID", &[]),
    ("Name", &[]),
    ("Tags", &[]),
    ("Address", &[]),
    ("TaggedAddresses", &["tagged_addresses"]),
    ("Meta", &[]),
    ("Port", &[]),
    ("SocketPath", &["socket_path"]),
    ("Check", &[]),
    ("Checks", &[]),
    ("Weights", &[]),
    ("Token", &[]),
    ("EnableTagOverride", &["enable_tag_override"]),
    ("Proxy", &[]),
    ("Connect", &[]),
    ("Locality", &[]),
    ("Namespace", &[]),
    ("Partition", &[]),
];

const CHECK_FIELDS: &[(&str, &[&str])] = &[
    ("CheckID", &["check_id", "id"]),
    ("Name", &[]),
    ("Status", &[]),
    ("Notes", &[]),
    ("ScriptArgs", &["script_args", "args"]),
    ("HTTP", &[]),
    ("Header", &[]),
    ("Method", &[]),
    ("Body", &[]),
    ("DisableRedirects", &["disable_redirects"]),
    ("TCP", &[]),
    ("TCPUseTLS", &["tcp_use_tls"]),
    ("UDP", &[]),
    ("Interval", &[]),
    ("AliasNode", &["alias_node"]),
    ("AliasService", &["alias_service"]),
    ("DockerContainerID", &["docker_container_id"]),
    ("Shell", &[]),
    ("H2PING", &[]),
    ("H2PingUseTLS", &["h2ping_use_tls"]),
    ("GRPC", &[]),
    ("GRPCUseTLS", &["grpc_use_tls"]),
    ("OSService", &["os_service"]),
    ("TLSServerName", &["tls_server_name"]),
    ("TLSSkipVerify", &["tls_skip_verify"]),
    ("Timeout", &[]),
    ("TTL", &[]),
    ("SuccessBeforePassing", &["success_before_passing"]),
    ("FailuresBeforeWarning", &["failures_before_warning"]),
    ("FailuresBeforeCritical", &["failures_before_critical"]),
    (
        "DeregisterCriticalServiceAfter",
        &["deregister_critical_service_after"],
    ),
    ("OutputMaxSize", &["output_max_size"]),
    ("Namespace", &[]),
    ("Partition", &[]),
];

/// A decoded but not yet validated check of a registration.
struct CheckInput {
    id: String,
    name: String,
    status: String,
    notes: String,
    kind: String,
    interval: Duration,
    timeout: Duration,
    ttl: Duration,
    /// Consul's `CheckType.Validate` result.
    invalid: Option<&'static str>,
}

fn decode_check(v: &Value) -> Result<Option<CheckInput>, String> {
    let f = Fields::decode(v, "structs.CheckType", CHECK_FIELDS)?;
    if f.values.is_empty() {
        // An empty `Check: {}` is dropped, as Go's `CheckType.Empty()` does.
        return Ok(None);
    }
    let has = |field: &str| f.get(field).is_some_and(|v| v.as_str() != Some(""));
    let args = !f.strings("ScriptArgs")?.is_empty();
    let (interval, timeout, ttl) = (
        f.duration("Interval")?,
        f.duration("Timeout")?,
        f.duration("TTL")?,
    );
    for field in [
        "Header",
        "Body",
        "Method",
        "Shell",
        "DockerContainerID",
        "TLSServerName",
    ] {
        if field != "Header" {
            f.string(field)?;
        }
    }
    for field in [
        "TLSSkipVerify",
        "GRPCUseTLS",
        "TCPUseTLS",
        "H2PingUseTLS",
        "DisableRedirects",
    ] {
        f.boolean(field)?;
    }
    for field in [
        "SuccessBeforePassing",
        "FailuresBeforeWarning",
        "FailuresBeforeCritical",
        "OutputMaxSize",
    ] {
        f.int(field)?;
    }
    let alias = has("AliasNode") || has("AliasService");
    let kind = if !ttl.is_zero() {
        "ttl"
    } else if has("HTTP") {
        "http"
    } else if has("TCP") {
        "tcp"
    } else if has("UDP") {
        "udp"
    } else if has("GRPC") {
        "grpc"
    } else if has("H2PING") {
        "h2ping"
    } else if has("OSService") {
        "os_service"
    } else if args && has("DockerContainerID") {
        "docker"
    } else if args {
        "script"
    } else if alias {
        "alias"
    } else {
        ""
    };
    let interval_check = matches!(
        kind,
        "http" | "tcp" | "udp" | "grpc" | "h2ping" | "os_service" | "docker" | "script"
    ) || (args && !ttl.is_zero());
    let invalid = if !interval.is_zero() && !ttl.is_zero() {
        Some("Interval and TTL cannot both be specified")
    } else if interval_check && interval.is_zero() {
        Some("Interval must be > 0 for Script, HTTP, H2PING, TCP, UDP or OSService checks")
    } else if !interval_check && !alias && ttl.is_zero() {
        Some("TTL must be > 0 for TTL checks")
    } else {
        None
    };
    Ok(Some(CheckInput {
        id: f.string("CheckID")?,
        name: f.string("Name")?,
        status: f.string("Status")?,
        notes: f.string("Notes")?,
        kind: kind.to_owned(),
        interval,
        timeout,
        ttl,
        invalid,
    }))
}

/// Decodes and validates `PUT /v1/agent/service/register`; `Err` is the 400 reply.
fn decode_registration(shared: &Shared, body: &[u8]) -> Result<(ServiceDef, Vec<CheckDef>), Reply> {
    let decode_err = |e: String| Reply::bad_request(format!("Request decode failed: {e}"));
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(decode_err("EOF".to_owned()));
    }
    let v: Value = serde_json::from_slice(body).map_err(|e| decode_err(e.to_string()))?;
    let f = Fields::decode(&v, "structs.ServiceDefinition", SERVICE_FIELDS).map_err(decode_err)?;
    let name = f.string("Name").map_err(decode_err)?;
    let mut id = f.string("ID").map_err(decode_err)?;
    let tags = f.strings("Tags").map_err(decode_err)?;
    let address = f.string("Address").map_err(decode_err)?;
    let meta = f.string_map("Meta").map_err(decode_err)?;
    let port = f.int("Port").map_err(decode_err)?.unwrap_or(0);
    let eto = f.boolean("EnableTagOverride").map_err(decode_err)?;
    for field in ["Kind", "SocketPath", "Token", "Namespace", "Partition"] {
        f.string(field).map_err(decode_err)?;
    }
    let mesh = Mesh {
        kind: f.string("Kind").map_err(decode_err)?,
        destination: f
            .get("Proxy")
            .and_then(|p| field_ci(p, "DestinationServiceName"))
            .and_then(Value::as_str)
            .filter(|d| !d.is_empty())
            .map(str::to_owned),
        native: f
            .get("Connect")
            .and_then(|c| field_ci(c, "Native"))
            .and_then(Value::as_bool)
            .unwrap_or(false),
    };
    let mut tagged = BTreeMap::new();
    if let Some(v) = f.get("TaggedAddresses") {
        let Value::Object(m) = v else {
            return Err(decode_err(f.mismatch(
                "TaggedAddresses",
                v,
                "map[string]structs.ServiceAddress",
            )));
        };
        for (k, addr) in m {
            let a = Fields::decode(
                addr,
                "structs.ServiceAddress",
                &[("Address", &[]), ("Port", &[])],
            )
            .map_err(decode_err)?;
            let p = a.int("Port").map_err(decode_err)?.unwrap_or(0);
            let p =
                u16::try_from(p).map_err(|_| Reply::bad_request("Invalid tagged address port"))?;
            tagged.insert(k.clone(), (a.string("Address").map_err(decode_err)?, p));
        }
    }
    let weights = match f.get("Weights") {
        None => None,
        Some(w) => {
            let w = Fields::decode(w, "structs.Weights", &[("Passing", &[]), ("Warning", &[])])
                .map_err(decode_err)?;
            let passing = w.int("Passing").map_err(decode_err)?.unwrap_or(0);
            let warning = w.int("Warning").map_err(decode_err)?.unwrap_or(0);
            Some((passing, warning))
        }
    };
    let mut checks = Vec::new();
    if let Some(c) = f.get("Check") {
        checks.extend(decode_check(c).map_err(decode_err)?);
    }
    match f.get("Checks") {
        None => {}
        Some(Value::Array(list)) => {
            for c in list {
                checks.extend(decode_check(c).map_err(decode_err)?);
            }
        }
        Some(v) => return Err(decode_err(f.mismatch("Checks", v, "structs.CheckTypes"))),
    }

    if name.is_empty() {
        return Err(Reply::bad_request("Missing service name"));
    }
    if matches!(address.parse::<IpAddr>(), Ok(ip) if ip.is_unspecified()) {
        return Err(Reply::bad_request("Invalid service address"));
    }
    if id.is_empty() {
        id.clone_from(&name);
    }
    let port = u16::try_from(port).map_err(|_| Reply::bad_request("Invalid service port"))?;
    let weights = match weights {
        None => (1, 1),
        Some((p, _)) if p < 1 => {
            return Err(Reply::bad_request(
                "Invalid Weights: Passing must be greater than 0",
            ))
        }
        Some((_, w)) if w < 0 => {
            return Err(Reply::bad_request(
                "Invalid Weights: Warning must be greater or equal than 0",
            ))
        }
        Some((p, w)) if p > 65535 || w > 65535 => {
            return Err(Reply::bad_request(
                "Invalid Weights: Passing and Warning must be <= 65535",
            ))
        }
        Some((p, w)) => (p as u32, w as u32),
    };
    if let Some(m) = &meta {
        if m.len() > 64 {
            return Err(Reply::bad_request(
                "Invalid Service Meta: Node metadata cannot contain more than 64 key/value pairs",
            ));
        }
        for k in m.keys() {
            let ok = !k.is_empty()
                && k.len() <= 128
                && k.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
            if !ok {
                return Err(Reply::bad_request(format!(
                    "Invalid Service Meta: Key contains invalid characters: {k:?}"
                )));
            }
        }
    }
    let several = checks.len() > 1;
    let mut defs = Vec::new();
    for (i, c) in checks.into_iter().enumerate() {
        if let Some(why) = c.invalid {
            return Err(Reply::bad_request(format!("Invalid check: {why}")));
        }
        if !c.status.is_empty() && !valid_status(&c.status) {
            return Err(Reply::bad_request(
                "Status for checks must 'passing', 'warning', 'critical'",
            ));
        }
        let check_id = match (c.id.is_empty(), several) {
            (false, _) => c.id,
            (true, false) => format!("service:{id}"),
            (true, true) => format!("service:{id}:{}", i + 1),
        };
        defs.push(CheckDef {
            id: check_id,
            name: if c.name.is_empty() {
                format!("Service '{name}' check")
            } else {
                c.name
            },
            status: if c.status.is_empty() {
                "critical".to_owned()
            } else {
                c.status
            },
            notes: c.notes,
            output: String::new(),
            kind: c.kind,
            interval: format_go_duration(c.interval),
            timeout: format_go_duration(c.timeout),
            ttl: (!c.ttl.is_zero()).then_some(c.ttl),
        });
    }
    let def = ServiceDef {
        node: shared.opts.node.clone(),
        node_address: shared.opts.node_address.clone(),
        tagged: default_tagged_addresses(&address, port, tagged),
        id,
        name,
        tags,
        address,
        meta: meta.filter(|m| !m.is_empty()),
        port,
        weights,
        enable_tag_override: eto,
        mesh,
    };
    Ok((def, defs))
}

/// A nested object's field, matched case-insensitively as Go's decoder does.
fn field_ci<'a>(v: &'a Value, name: &str) -> Option<&'a Value> {
    v.as_object()?
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v)
}

fn agent_register(shared: &Shared, req: &Req) -> Reply {
    let authz = match resolve_token(shared, req) {
        Ok(a) => a,
        Err(reply) => return reply,
    };
    let (def, checks) = match decode_registration(shared, &req.body) {
        Ok(decoded) => decoded,
        Err(reply) => return reply,
    };
    if !authz.service(&def.name) {
        return authz.denied("service:write", &def.name);
    }
    let replace = req
        .q("replace-existing-checks")
        .is_some_and(|v| parse_go_bool(v).unwrap_or(true));
    shared.write(|st| st.register(def, checks, replace));
    Reply::empty()
}

/// Agent endpoints only see services registered on the agent's own node.
fn unknown_service(id: &str) -> Reply {
    Reply::text(
        StatusCode::NOT_FOUND,
        format!("Unknown service ID {id:?}. Ensure that the service ID is passed, not the service name."),
    )
}

fn local_service_name(shared: &Shared, id: &str) -> Option<String> {
    shared
        .state()
        .services
        .get(&(shared.opts.node.clone(), id.to_owned()))
        .map(|s| s.def.name.clone())
}

fn agent_deregister(shared: &Shared, req: &Req, id: &str) -> Reply {
    let authz = match resolve_token(shared, req) {
        Ok(a) => a,
        Err(reply) => return reply,
    };
    let Some(name) = local_service_name(shared, id) else {
        return unknown_service(id);
    };
    if !authz.service(&name) {
        return authz.denied("service:write", &name);
    }
    let node = shared.opts.node.clone();
    shared.write(|st| {
        let idx = st.next_index();
        st.remove_service(&node, id, idx);
    });
    Reply::empty()
}

/// `GET /v1/agent/service/<id>` (agent/service.mdx "Get Service Configuration"): the local
/// service's definition, 404 `unknown service ID: <id>` when the agent does not know it, 403
/// without `service:read` on its name.
fn agent_service(shared: &Shared, req: &Req, id: &str) -> Reply {
    let authz = match resolve_token(shared, req) {
        Ok(a) => a,
        Err(reply) => return reply,
    };
    let def = shared
        .state()
        .services
        .get(&(shared.opts.node.clone(), id.to_owned()))
        .map(|s| s.def.clone());
    let Some(def) = def else {
        return Reply::text(StatusCode::NOT_FOUND, format!("unknown service ID: {id}"));
    };
    if !authz.service(&def.name) {
        return authz.denied("service:read", &def.name);
    }
    let tagged: BTreeMap<&str, Value> = def
        .tagged
        .iter()
        .map(|(k, (a, p))| (k.as_str(), serde_json::json!({"Address": a, "Port": p})))
        .collect();
    let hash = fake_uuid(&format!("{def:?}")).replace('-', "")[..16].to_owned();
    let body = serde_json::json!({
        "ID": def.id,
        "Service": def.name,
        "Tags": def.tags,
        "Meta": def.meta.clone().unwrap_or_default(),
        "Port": def.port,
        "Address": def.address,
        "TaggedAddresses": tagged,
        "Weights": {"Passing": def.weights.0, "Warning": def.weights.1},
        "EnableTagOverride": def.enable_tag_override,
        "ContentHash": hash,
        "Datacenter": shared.opts.datacenter,
    });
    let mut reply = Reply::json(to_json(&body, req.has("pretty")));
    reply.headers.push((
        HeaderName::from_static("x-consul-contenthash"),
        HeaderValue::from_str(&hash).expect("hex is a valid header value"),
    ));
    reply
}

fn agent_check_update(shared: &Shared, req: &Req, status: &'static str, check_id: &str) -> Reply {
    let authz = match resolve_token(shared, req) {
        Ok(a) => a,
        Err(reply) => return reply,
    };
    let (status, output) = if status.is_empty() {
        // PUT /v1/agent/check/update/:id with {"Status", "Output"}.
        let decoded = serde_json::from_slice::<Value>(&req.body)
            .map_err(|e| e.to_string())
            .and_then(|v| {
                let f =
                    Fields::decode(&v, "agent.checkUpdate", &[("Status", &[]), ("Output", &[])])?;
                Ok((f.string("Status")?, f.string("Output")?))
            });
        match decoded {
            Err(e) => return Reply::bad_request(format!("Request decode failed: {e}")),
            Ok((s, _)) if !valid_status(&s) => {
                return Reply::bad_request(format!("Invalid check status: '{s}'"))
            }
            Ok(pair) => pair,
        }
    } else {
        (status.to_owned(), req.q("note").unwrap_or("").to_owned())
    };
    let node = shared.opts.node.clone();
    let found = shared
        .state()
        .checks
        .get(&(node.clone(), check_id.to_owned()))
        .map(|c| (c.service_name.clone(), c.is_ttl()));
    let Some((service_name, is_ttl)) = found else {
        return Reply::text(
            StatusCode::NOT_FOUND,
            format!("Unknown check ID {check_id:?}. Ensure that the check ID is passed, not the check name."),
        );
    };
    if service_name.is_empty() && !authz.full() {
        return authz.denied("node:write", &node);
    }
    if !service_name.is_empty() && !authz.service(&service_name) {
        return authz.denied("service:write", &service_name);
    }
    if !is_ttl {
        return Reply::text(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("CheckID {check_id:?} does not have associated TTL"),
        );
    }
    shared.write(|st| {
        st.update_check(&node, check_id, &status, &output);
        st.rearm_ttl(&node, check_id);
    });
    Reply::empty()
}

/// `?enable=` as Consul's maintenance endpoints parse it.
fn parse_enable(req: &Req) -> Result<bool, Reply> {
    let Some(raw) = req.q("enable") else {
        return Err(Reply::bad_request("Missing value for enable"));
    };
    parse_go_bool(raw)
        .ok_or_else(|| Reply::bad_request(format!("Invalid value for enable: {raw:?}")))
}

fn agent_service_maintenance(shared: &Shared, req: &Req, id: &str) -> Reply {
    if id.is_empty() {
        return Reply::bad_request("Missing service ID");
    }
    let enable = match parse_enable(req) {
        Ok(e) => e,
        Err(reply) => return reply,
    };
    let authz = match resolve_token(shared, req) {
        Ok(a) => a,
        Err(reply) => return reply,
    };
    let Some(name) = local_service_name(shared, id) else {
        return unknown_service(id);
    };
    if !authz.service(&name) {
        return authz.denied("service:write", &name);
    }
    let node = shared.opts.node.clone();
    let reason = req.q("reason").unwrap_or("");
    shared.write(|st| st.service_maintenance(&node, id, enable, reason));
    Reply::empty()
}

fn agent_node_maintenance(shared: &Shared, req: &Req) -> Reply {
    let enable = match parse_enable(req) {
        Ok(e) => e,
        Err(reply) => return reply,
    };
    let authz = match resolve_token(shared, req) {
        Ok(a) => a,
        Err(reply) => return reply,
    };
    let node = shared.opts.node.clone();
    if !authz.full() {
        return authz.denied("node:write", &node);
    }
    let reason = req.q("reason").unwrap_or("");
    shared.write(|st| st.node_maintenance(&node, enable, reason));
    Reply::empty()
}

/// `PUT` and `DELETE /v1/kv/<key>`; answers JSON `true`/`false`.
fn kv_write(shared: &Shared, req: &Req, key: &str) -> Reply {
    let authz = match resolve_token(shared, req) {
        Ok(a) => a,
        Err(reply) => return reply,
    };
    let delete = req.method == Method::DELETE;
    let recurse = delete && req.has("recurse");
    if key.is_empty() && !recurse {
        return Reply::bad_request("Missing key name");
    }
    if req.has("acquire") || req.has("release") {
        return Reply::bad_request(
            "The Consul emulator does not implement KV sessions (acquire/release)",
        );
    }
    let parse_u64 = |name: &str, err: &str| match req.q(name) {
        None => Ok(None),
        Some(v) => v
            .parse::<u64>()
            .map(Some)
            .map_err(|_| Reply::bad_request(err.to_owned())),
    };
    let cas = match parse_u64("cas", "Invalid cas index") {
        Ok(c) => c,
        Err(reply) => return reply,
    };
    let flags = match parse_u64("flags", "Invalid flags") {
        Ok(f) => f.unwrap_or(0),
        Err(reply) => return reply,
    };
    if !delete && req.body.len() > MAX_KV_VALUE {
        return Reply::text(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "Request body({} bytes) too large, max size: {MAX_KV_VALUE} bytes. See https://developer.hashicorp.com/docs/agent/config/config-files#kv_max_value_size.",
                req.body.len()
            ),
        );
    }
    if !authz.full() {
        return authz.denied("key:write", key);
    }
    if !shared.state().leader {
        return Reply::text(StatusCode::INTERNAL_SERVER_ERROR, "No cluster leader");
    }
    let applied = shared.write(|st| {
        if delete {
            if let Some(cas) = cas {
                match st.kv.get(key) {
                    Some(e) if e.modify_index == cas => {}
                    _ => return false,
                }
            }
            st.kv_delete(key, recurse);
            true
        } else {
            // An empty body stores a nil value (rendered as `"Value": null`).
            let value = (!req.body.is_empty()).then(|| req.body.to_vec());
            st.kv_put(key, value, flags, cas).0
        }
    });
    Reply::json(to_json(&applied, req.has("pretty")))
}
