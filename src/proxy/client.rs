//! Upstream clients: hyper's pooled client with TLS (ALPN), h2c or HTTP/1.1 only, built from
//! `[upstream]` and a route's `upstream_tls`.

use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use super::settings::UpstreamConfig;
use crate::body::RequestBody;
use crate::tls::UpstreamTls;

/// A pooled upstream client: plain HTTP/1.1, h2c, or TLS with HTTP/2 or HTTP/1.1 by ALPN.
pub type UpstreamClient = Client<HttpsConnector<HttpConnector>, RequestBody>;

/// How a client reaches its endpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// HTTP/1.1 over TCP, or TLS with ALPN (h2 preferred) for `https` URIs.
    Auto,
    /// HTTP/2 with prior knowledge over TCP (`h2c://` targets).
    H2c,
    /// HTTP/1.1 only, also over TLS (protocol upgrades such as WebSocket need it).
    Http1,
}

/// Builds the default keep-alive client pool to upstreams (system roots for TLS).
pub fn client(cfg: &UpstreamConfig) -> UpstreamClient {
    match client_for(cfg, None, Transport::Auto) {
        Ok(c) => c,
        Err(e) => {
            // Only a broken system trust store gets here; plain HTTP still works.
            tracing::warn!(error = %crate::error::Chain(&e), "system trust store unavailable; upstream TLS needs ca_file");
            let tls = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .expect("ring supports the default protocol versions")
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
            build(cfg, tls, None, Transport::Auto)
        }
    }
}

/// Builds a client for one route's TLS settings and transport.
pub fn client_for(
    cfg: &UpstreamConfig,
    tls: Option<&UpstreamTls>,
    transport: Transport,
) -> Result<UpstreamClient, crate::tls::TlsError> {
    let default = UpstreamTls::default();
    let tls_settings = tls.unwrap_or(&default);
    let rustls_cfg = crate::tls::client_config(tls_settings)?;
    Ok(build(
        cfg,
        rustls_cfg,
        tls_settings.server_name.clone(),
        transport,
    ))
}

/// Builds a client with a ready TLS configuration, sending `server_name` as SNI.
pub fn build(
    cfg: &UpstreamConfig,
    tls: rustls::ClientConfig,
    server_name: Option<String>,
    transport: Transport,
) -> UpstreamClient {
    let mut http = HttpConnector::new();
    http.set_nodelay(true);
    http.set_connect_timeout(Some(cfg.connect_timeout));
    http.set_keepalive(Some(std::time::Duration::from_secs(60)));
    http.enforce_http(false);
    let connector =
        crate::tls::https_connector(tls, server_name, http, transport == Transport::Http1);
    let mut client = Client::builder(TokioExecutor::new());
    client
        .pool_idle_timeout(cfg.idle_timeout)
        .pool_max_idle_per_host(cfg.max_idle_per_host)
        .pool_timer(TokioTimer::new())
        .timer(TokioTimer::new());
    if transport == Transport::H2c {
        client.http2_only(true);
    }
    client.build(connector)
}
