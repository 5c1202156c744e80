//! Test "sidecar": an mTLS listener playing a Connect sidecar's public port (CONNECT.md §6.3,
//! §7.1): client certificates must chain to the emulator's roots, it presents a SPIFFE leaf,
//! plays intentions by caller ID (L4 close or L7 403) and forwards to a loopback upstream.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_TYPE, HOST};
use http::{Request, Response, StatusCode, Uri, Version};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;

use super::consul::{pem_blocks, uri_sans, ConsulEmulator};

/// What the listener advertises in ALPN (CONNECT.md §7.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Alpn {
    /// `protocol = "http"`: `http/1.1`.
    Http11,
    /// `protocol = "http2"`/`"grpc"`: `h2`, `http/1.1`.
    H2,
    /// `protocol = "tcp"`: no ALPN; bytes are proxied to the upstream as they come.
    None,
}

/// How a denied caller is refused (CONNECT.md §6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Deny {
    /// Handshake completes, the first bytes are read, the connection closes unanswered.
    L4,
    /// Each request is answered `403` with body `RBAC: access denied`.
    L7,
}

/// A running test sidecar; dropping it stops the listener.
#[derive(Debug)]
pub struct Sidecar {
    addr: SocketAddr,
    state: Arc<State>,
    task: JoinHandle<()>,
}

#[derive(Debug)]
struct State {
    alpn: Alpn,
    upstream: SocketAddr,
    // std Mutexes: test support only, never held across an await.
    tls: Mutex<Arc<ServerConfig>>,
    service: Mutex<String>,
    /// Lower-cased caller SPIFFE URI to its denial.
    denies: Mutex<HashMap<String, Deny>>,
    callers: Mutex<Vec<Option<String>>>,
    accepted: AtomicUsize,
    handshakes: AtomicUsize,
    forwarded: AtomicUsize,
}

type Body = BoxBody<Bytes, hyper::Error>;

impl Sidecar {
    /// Listens on `127.0.0.1:0`, trusting `consul`'s roots and presenting a fresh leaf for
    /// `service` from its active root; forwards to `upstream` (e.g. a `TestUpstream`).
    pub async fn start(
        consul: &ConsulEmulator,
        service: &str,
        alpn: Alpn,
        upstream: SocketAddr,
    ) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind sidecar on 127.0.0.1:0");
        let addr = listener.local_addr().expect("sidecar local_addr");
        let state = Arc::new(State {
            alpn,
            upstream,
            tls: Mutex::new(server_config(consul, service, alpn)),
            service: Mutex::new(service.to_owned()),
            denies: Mutex::new(HashMap::new()),
            callers: Mutex::new(Vec::new()),
            accepted: AtomicUsize::new(0),
            handshakes: AtomicUsize::new(0),
            forwarded: AtomicUsize::new(0),
        });
        let task = tokio::spawn(accept_loop(listener, Arc::clone(&state)));
        Self { addr, state, task }
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Re-reads the roots and takes a new leaf from the active root, for new connections
    /// (e.g. after `rotate_root`).
    pub fn reload(&self, consul: &ConsulEmulator) {
        let service = self.state.service.lock().expect("sidecar lock").clone();
        self.set_service(consul, &service);
    }

    /// Presents a leaf for `service` from now on (a wrong identity, if the test wants one).
    pub fn set_service(&self, consul: &ConsulEmulator, service: &str) {
        let config = server_config(consul, service, self.state.alpn);
        *self.state.tls.lock().expect("sidecar lock") = config;
        *self.state.service.lock().expect("sidecar lock") = service.to_owned();
    }

    /// Presents `chain_pem`/`key_pem` from now on (e.g. a `foreign_ca()` leaf), still
    /// trusting only `consul`'s roots for callers.
    pub fn present(&self, consul: &ConsulEmulator, chain_pem: &str, key_pem: &str) {
        let config = tls_config(consul, chain_pem, key_pem, self.state.alpn);
        *self.state.tls.lock().expect("sidecar lock") = config;
    }

    /// Refuses callers presenting `spiffe_uri` (compared ASCII case-insensitively).
    pub fn deny(&self, spiffe_uri: &str, how: Deny) {
        self.state
            .denies
            .lock()
            .expect("sidecar lock")
            .insert(spiffe_uri.to_ascii_lowercase(), how);
    }

    /// Lets `spiffe_uri` through again.
    pub fn allow(&self, spiffe_uri: &str) {
        self.state
            .denies
            .lock()
            .expect("sidecar lock")
            .remove(&spiffe_uri.to_ascii_lowercase());
    }

    /// TCP connections accepted.
    pub fn connections(&self) -> usize {
        self.state.accepted.load(Ordering::SeqCst)
    }

    /// TLS handshakes completed (client certificate verified).
    pub fn handshakes(&self) -> usize {
        self.state.handshakes.load(Ordering::SeqCst)
    }

    /// HTTP requests forwarded to the upstream (with [`Alpn::None`]: connections proxied).
    pub fn forwarded(&self) -> usize {
        self.state.forwarded.load(Ordering::SeqCst)
    }

    /// The caller's SPIFFE URI (first URI SAN) of each completed handshake, in order.
    pub fn callers(&self) -> Vec<Option<String>> {
        self.state.callers.lock().expect("sidecar lock").clone()
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Chain and key in the shapes rustls takes.
fn identity(
    chain_pem: &str,
    key_pem: &str,
) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
    let chain = pem_blocks(chain_pem)
        .into_iter()
        .map(CertificateDer::from)
        .collect();
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).expect("leaf key PEM");
    (chain, key)
}

fn root_store(roots_pem: &str) -> RootCertStore {
    let mut roots = RootCertStore::empty();
    for der in pem_blocks(roots_pem) {
        roots
            .add(CertificateDer::from(der))
            .expect("root certificate");
    }
    roots
}

fn server_config(consul: &ConsulEmulator, service: &str, alpn: Alpn) -> Arc<ServerConfig> {
    let (chain, key) = consul.issue_leaf(service);
    tls_config(consul, &chain, &key, alpn)
}

fn tls_config(
    consul: &ConsulEmulator,
    chain_pem: &str,
    key_pem: &str,
    alpn: Alpn,
) -> Arc<ServerConfig> {
    let verifier = WebPkiClientVerifier::builder_with_provider(
        Arc::new(root_store(&consul.roots_pem())),
        provider(),
    )
    .build()
    .expect("client verifier");
    let (chain, key) = identity(chain_pem, key_pem);
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .expect("sidecar certificate");
    config.alpn_protocols = match alpn {
        Alpn::Http11 => vec![b"http/1.1".to_vec()],
        Alpn::H2 => vec![b"h2".to_vec(), b"http/1.1".to_vec()],
        Alpn::None => Vec::new(),
    };
    Arc::new(config)
}

async fn accept_loop(listener: TcpListener, state: Arc<State>) {
    while let Ok((tcp, _)) = listener.accept().await {
        state.accepted.fetch_add(1, Ordering::SeqCst);
        tokio::spawn(serve(tcp, Arc::clone(&state)));
    }
}

async fn serve(tcp: TcpStream, state: Arc<State>) {
    let config = Arc::clone(&state.tls.lock().expect("sidecar lock"));
    let Ok(mut tls) = TlsAcceptor::from(config).accept(tcp).await else {
        return;
    };
    state.handshakes.fetch_add(1, Ordering::SeqCst);
    let caller = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .and_then(|c| uri_sans(c).into_iter().next());
    state
        .callers
        .lock()
        .expect("sidecar lock")
        .push(caller.clone());
    let deny = caller.as_ref().and_then(|c| {
        state
            .denies
            .lock()
            .expect("sidecar lock")
            .get(&c.to_ascii_lowercase())
            .copied()
    });
    if deny == Some(Deny::L4) {
        // Envoy's network RBAC filter decides on the first read, then closes without a byte.
        let mut buf = [0u8; 1024];
        let _ = tls.read(&mut buf).await;
        return;
    }
    if state.alpn == Alpn::None {
        let Ok(mut up) = TcpStream::connect(state.upstream).await else {
            return;
        };
        state.forwarded.fetch_add(1, Ordering::SeqCst);
        let _ = tokio::io::copy_bidirectional(&mut tls, &mut up).await;
        return;
    }
    let svc = service_fn(move |req| {
        let state = Arc::clone(&state);
        let caller = caller.clone();
        async move {
            // Envoy's HTTP RBAC filter decides per request, with the intentions in force now.
            let deny = caller.as_ref().and_then(|c| {
                state
                    .denies
                    .lock()
                    .expect("sidecar lock")
                    .get(&c.to_ascii_lowercase())
                    .copied()
            });
            Ok::<_, hyper::Error>(handle(&state, caller.as_deref(), deny, req).await)
        }
    });
    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
        .serve_connection_with_upgrades(TokioIo::new(tls), svc)
        .await;
}

fn text(status: StatusCode, body: &'static str) -> Response<Body> {
    let mut resp = Response::new(
        Full::new(Bytes::from_static(body.as_bytes()))
            .map_err(|never| match never {})
            .boxed(),
    );
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    resp
}

/// One request: the L7 intention, then HTTP/1.1 to the upstream (h2 downstream included);
/// an HTTP/1.1 upgrade (WebSocket) is spliced through once the upstream answers 101.
async fn handle(
    state: &State,
    caller: Option<&str>,
    deny: Option<Deny>,
    mut req: Request<Incoming>,
) -> Response<Body> {
    if deny == Some(Deny::L7) {
        return text(StatusCode::FORBIDDEN, "RBAC: access denied");
    }
    let down_upgrade = hyper::upgrade::on(&mut req);
    let (mut parts, body) = req.into_parts();
    if let Some(authority) = parts.uri.authority().cloned() {
        if !parts.headers.contains_key(HOST) {
            if let Ok(v) = HeaderValue::from_str(authority.as_str()) {
                parts.headers.insert(HOST, v);
            }
        }
    }
    let path = parts
        .uri
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_owned();
    parts.uri = path
        .parse::<Uri>()
        .unwrap_or_else(|_| Uri::from_static("/"));
    parts.version = Version::HTTP_11;
    if let Some(v) = caller.and_then(|c| HeaderValue::from_str(&format!("URI={c}")).ok()) {
        parts.headers.insert("x-forwarded-client-cert", v);
    }
    let Ok(stream) = TcpStream::connect(state.upstream).await else {
        return text(StatusCode::SERVICE_UNAVAILABLE, "upstream connect error");
    };
    let Ok((mut sender, conn)) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await
    else {
        return text(StatusCode::SERVICE_UNAVAILABLE, "upstream connect error");
    };
    tokio::spawn(conn.with_upgrades());
    state.forwarded.fetch_add(1, Ordering::SeqCst);
    let mut resp = match sender.send_request(Request::from_parts(parts, body)).await {
        Ok(resp) => resp,
        Err(_) => return text(StatusCode::SERVICE_UNAVAILABLE, "upstream reset"),
    };
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        let up_upgrade = hyper::upgrade::on(&mut resp);
        tokio::spawn(async move {
            if let (Ok(down), Ok(up)) = (down_upgrade.await, up_upgrade.await) {
                let _ =
                    tokio::io::copy_bidirectional(&mut TokioIo::new(down), &mut TokioIo::new(up))
                        .await;
            }
        });
    }
    resp.map(BodyExt::boxed)
}

/// A client config for tests that dial a sidecar as a mesh member: presents `chain_pem` /
/// `key_pem`, trusts `roots_pem`, and (with `expect_uri`) requires that first URI SAN,
/// compared ASCII case-insensitively. No hostname check, as in Consul's own library.
pub fn mesh_client_config(
    chain_pem: &str,
    key_pem: &str,
    roots_pem: &str,
    expect_uri: Option<&str>,
    alpn: &[&[u8]],
) -> Arc<ClientConfig> {
    let (chain, key) = identity(chain_pem, key_pem);
    let verifier = MeshVerifier {
        roots: pem_blocks(roots_pem)
            .into_iter()
            .map(CertificateDer::from)
            .collect(),
        expect_uri: expect_uri.map(str::to_owned),
        provider: provider(),
    };
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_auth_cert(chain, key)
        .expect("client certificate");
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(config)
}

/// Chain to the roots (peer's extra certificates as intermediates), then the URI SAN.
#[derive(Debug)]
struct MeshVerifier {
    roots: Vec<CertificateDer<'static>>,
    expect_uri: Option<String>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for MeshVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let bad = |e: webpki::Error| rustls::Error::General(format!("mesh chain: {e:?}"));
        let anchors = self
            .roots
            .iter()
            .map(|r| webpki::anchor_from_trusted_cert(r).map_err(bad))
            .collect::<Result<Vec<_>, _>>()?;
        let cert = webpki::EndEntityCert::try_from(end_entity).map_err(bad)?;
        cert.verify_for_usage(
            self.provider.signature_verification_algorithms.all,
            &anchors,
            intermediates,
            now,
            webpki::KeyUsage::server_auth(),
            None,
            None,
        )
        .map_err(bad)?;
        if let Some(want) = &self.expect_uri {
            let got = uri_sans(end_entity).into_iter().next().unwrap_or_default();
            if !got.eq_ignore_ascii_case(want) {
                return Err(rustls::Error::General(format!(
                    "peer certificate mismatch got {got}, want {want}"
                )));
            }
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}
