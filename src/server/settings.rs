//! The server's own settings: `[server]` limits and timeouts, and the `[tls]` listener.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::rules::path::{EscapedSlashes, PathRules};

/// `[server]`.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Largest request head.
    pub max_header_bytes: usize,
    /// Most header fields in an HTTP/1.1 request head (431 beyond).
    pub max_headers: usize,
    /// Time allowed for a request head.
    pub header_read_timeout: Duration,
    /// How long an idle keep-alive connection waits for its next request.
    pub keep_alive_timeout: Duration,
    /// The longest silence between two reads of a request body.
    pub body_read_timeout: Duration,
    /// Most concurrent downstream connections.
    pub max_connections: usize,
    /// How long `/ready` fails before the listener closes on shutdown.
    pub drain_delay: Duration,
    /// How long in-flight requests may take to finish on shutdown.
    pub grace_period: Duration,
    /// What to do with `%2F`, `%5C` and `\` in a request path.
    pub escaped_slashes: EscapedSlashes,
    /// Collapse runs of `/` in a request path.
    pub merge_slashes: bool,
    /// Streams one HTTP/2 connection may have open at once (1 to 10000).
    pub h2_max_concurrent_streams: u32,
    /// Bind the listeners with `SO_REUSEPORT`.
    pub reuse_port: bool,
    /// Proxies whose `X-Forwarded-For` is believed (`server.trusted_proxies`).
    pub trusted_proxies: crate::ratelimit::TrustedProxies,
}

impl ServerConfig {
    /// `escaped_slashes` and `merge_slashes`, as the request path applies them.
    pub fn path_rules(&self) -> PathRules {
        PathRules {
            escaped_slashes: self.escaped_slashes,
            merge_slashes: self.merge_slashes,
        }
    }
}

/// `[tls]`.
#[derive(Debug, Clone)]
pub struct TlsListener {
    /// Where it listens.
    pub listen: SocketAddr,
    /// Certificates; the first answers clients without a known SNI name.
    pub certs: Vec<crate::tls::CertPair>,
    /// Built from `certs` when the config was validated (files read then).
    pub server_config: Arc<rustls::ServerConfig>,
}
