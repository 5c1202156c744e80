//! HTTP/2 and TLS helpers: self-signed certificates, an h2c or TLS upstream that answers with
//! trailers like a gRPC server, and raw HTTP/2 clients.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{HeaderMap, Request, Response, Version};
use http_body::{Body, Frame};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::{TcpListener, TcpStream};

/// A self-signed certificate for `names`, written as PEM files in `dir`.
pub struct TestCert {
    /// Certificate PEM path.
    pub cert: PathBuf,
    /// Key PEM path.
    pub key: PathBuf,
    /// The certificate in DER, to trust it.
    pub der: rustls::pki_types::CertificateDer<'static>,
}

/// Makes a self-signed certificate.
pub fn cert(dir: &std::path::Path, stem: &str, names: &[&str]) -> TestCert {
    let ck =
        rcgen::generate_simple_self_signed(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
            .unwrap();
    let cert = dir.join(format!("{stem}.pem"));
    let key = dir.join(format!("{stem}-key.pem"));
    std::fs::write(&cert, ck.cert.pem()).unwrap();
    std::fs::write(&key, ck.signing_key.serialize_pem()).unwrap();
    TestCert {
        cert,
        key,
        der: ck.cert.der().clone(),
    }
}

/// What the upstream saw of each request.
#[derive(Debug, Clone)]
pub struct Seen {
    /// Protocol version.
    pub version: Version,
    /// Path and query.
    pub uri: String,
    /// Headers.
    pub headers: HeaderMap,
    /// Body bytes.
    pub body_len: usize,
}

/// A body of one data frame then trailers, as a gRPC server answers.
struct WithTrailers {
    data: Option<Bytes>,
    trailers: Option<HeaderMap>,
}

impl Body for WithTrailers {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if let Some(d) = self.data.take() {
            return Poll::Ready(Some(Ok(Frame::data(d))));
        }
        Poll::Ready(self.trailers.take().map(|t| Ok(Frame::trailers(t))))
    }
}

/// An upstream that answers every request like a unary gRPC call: `content-type:
/// application/grpc`, one message, then `grpc-status: 0` and `grpc-message: ok` as trailers.
pub struct GrpcUpstream {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Requests seen.
    pub seen: Arc<Mutex<Vec<Seen>>>,
}

async fn grpc_answer(
    req: Request<Incoming>,
    seen: Arc<Mutex<Vec<Seen>>>,
) -> Result<Response<WithTrailers>, Infallible> {
    let (parts, body) = req.into_parts();
    let body_len = body
        .collect()
        .await
        .map(|b| b.to_bytes().len())
        .unwrap_or(0);
    seen.lock().unwrap().push(Seen {
        version: parts.version,
        uri: parts
            .uri
            .path_and_query()
            .map(|p| p.to_string())
            .unwrap_or_default(),
        headers: parts.headers,
        body_len,
    });
    let mut trailers = HeaderMap::new();
    trailers.insert("grpc-status", "0".parse().unwrap());
    trailers.insert("grpc-message", "ok".parse().unwrap());
    let mut resp = Response::new(WithTrailers {
        data: Some(Bytes::from_static(b"\x00\x00\x00\x00\x02hi")),
        trailers: Some(trailers),
    });
    resp.headers_mut()
        .insert("content-type", "application/grpc".parse().unwrap());
    Ok(resp)
}

impl GrpcUpstream {
    /// Plain TCP, HTTP/2 with prior knowledge (h2c) or HTTP/1.1, whichever the client speaks.
    pub async fn start_h2c() -> Self {
        Self::start(None).await
    }

    /// TLS with ALPN h2 and http/1.1.
    pub async fn start_tls(cert: &TestCert) -> Self {
        let certs = vec![cert.der.clone()];
        let key = rustls::pki_types::PrivateKeyDer::from_pem_file(&cert.key).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .unwrap();
        cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Self::start(Some(tokio_rustls::TlsAcceptor::from(Arc::new(cfg)))).await
    }

    async fn start(tls: Option<tokio_rustls::TlsAcceptor>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let (s, tls) = (s.clone(), tls.clone());
                tokio::spawn(async move {
                    let service = service_fn(move |req| grpc_answer(req, s.clone()));
                    let builder =
                        hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                    match tls {
                        None => {
                            let _ = builder
                                .serve_connection(TokioIo::new(stream), service)
                                .await;
                        }
                        Some(acceptor) => {
                            if let Ok(tls) = acceptor.accept(stream).await {
                                let _ = builder.serve_connection(TokioIo::new(tls), service).await;
                            }
                        }
                    }
                });
            }
        });
        Self { addr, seen }
    }
}

use rustls::pki_types::pem::PemObject;

/// A raw HTTP/2 (prior knowledge) client connection over plain TCP.
pub async fn h2c_client(
    addr: SocketAddr,
) -> hyper::client::conn::http2::SendRequest<http_body_util::Full<Bytes>> {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    send
}

/// A TLS client config trusting exactly `roots`, offering `alpn`.
pub fn tls_client(roots: &[&TestCert], alpn: &[&[u8]]) -> tokio_rustls::TlsConnector {
    let mut store = rustls::RootCertStore::empty();
    for r in roots {
        store.add(r.der.clone()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(store)
        .with_no_client_auth();
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    tokio_rustls::TlsConnector::from(Arc::new(cfg))
}
