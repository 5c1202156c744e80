//! TLS with rustls (ring): the server side (certificates by SNI, h2 and HTTP/1.1 by ALPN) and the
//! client side to upstreams (CA file, client certificate, server name). Certificates are read when
//! the config is applied, so a reload picks up renewed files.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, SignatureScheme};

/// What can go wrong building a TLS configuration.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("reading {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A PEM file holds nothing usable.
    #[error("{path}: {what}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// What was wrong.
        what: String,
    },
    /// rustls refused the material.
    #[error("TLS configuration")]
    Rustls(#[from] rustls::Error),
    /// The certificate could not be parsed for its names.
    #[error("{path}: cannot read the certificate's names")]
    Names {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: webpki::Error,
    },
}

/// One certificate and key, with the names it serves (from the certificate when empty).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertPair {
    /// PEM certificate chain.
    pub cert_file: PathBuf,
    /// PEM private key.
    pub key_file: PathBuf,
    /// SNI names; empty means the certificate's DNS names.
    pub names: Vec<String>,
}

/// TLS to an upstream.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UpstreamTls {
    /// Trust these CAs instead of the system's.
    pub ca_file: Option<PathBuf>,
    /// Client certificate and key for mutual TLS.
    pub client_cert: Option<(PathBuf, PathBuf)>,
    /// Name to verify and send as SNI instead of the endpoint's host.
    pub server_name: Option<String>,
    /// Skip certificate verification (tests, labs).
    pub insecure_skip_verify: bool,
}

/// The crypto provider every rustls configuration of the gateway uses (ring).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })
}

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(path)?;
    let certs: Vec<_> = CertificateDer::pem_slice_iter(&pem)
        .filter_map(Result::ok)
        .collect();
    if certs.is_empty() {
        return Err(TlsError::Pem {
            path: path.to_owned(),
            what: "no certificate found".into(),
        });
    }
    Ok(certs)
}

fn key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = read(path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| TlsError::Pem {
        path: path.to_owned(),
        what: format!("no private key found ({e})"),
    })
}

/// Chooses a certificate by SNI; the first one answers clients that send no (or an unknown) name.
#[derive(Debug)]
struct SniResolver {
    by_name: HashMap<String, Arc<CertifiedKey>>,
    wildcard: Vec<(String, Arc<CertifiedKey>)>,
    default: Arc<CertifiedKey>,
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let Some(name) = hello.server_name() else {
            return Some(self.default.clone());
        };
        let name = name.to_ascii_lowercase();
        if let Some(k) = self.by_name.get(&name) {
            return Some(k.clone());
        }
        let parent = name.split_once('.').map(|(_, p)| p);
        for (suffix, k) in &self.wildcard {
            if parent == Some(suffix.as_str()) {
                return Some(k.clone());
            }
        }
        Some(self.default.clone())
    }
}

/// Builds the server configuration for the TLS listener.
pub fn server_config(pairs: &[CertPair]) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let provider = provider();
    let mut by_name = HashMap::new();
    let mut wildcard = Vec::new();
    let mut default = None;
    for pair in pairs {
        let chain = certs(&pair.cert_file)?;
        let names = if pair.names.is_empty() {
            let ee =
                webpki::EndEntityCert::try_from(&chain[0]).map_err(|source| TlsError::Names {
                    path: pair.cert_file.clone(),
                    source,
                })?;
            ee.valid_dns_names().map(str::to_owned).collect()
        } else {
            pair.names.clone()
        };
        let ck = Arc::new(CertifiedKey::from_der(
            chain,
            key(&pair.key_file)?,
            &provider,
        )?);
        for n in names {
            let n = n.to_ascii_lowercase();
            match n.strip_prefix("*.") {
                Some(suffix) => wildcard.push((suffix.to_owned(), ck.clone())),
                None => {
                    by_name.insert(n, ck.clone());
                }
            }
        }
        default.get_or_insert(ck);
    }
    let default = default.ok_or_else(|| TlsError::Pem {
        path: PathBuf::new(),
        what: "no certificate configured".into(),
    })?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(SniResolver {
            by_name,
            wildcard,
            default,
        }));
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// A connector that speaks TLS to `https` URIs (and plain TCP to `http` ones) with `tls`, sending
/// `server_name` as SNI and verifying it instead of the URI's host when set. `http1_only`
/// offers only HTTP/1.1 by ALPN (upgrades and probes need it); otherwise h2 is offered too.
pub fn https_connector(
    tls: rustls::ClientConfig,
    server_name: Option<String>,
    http: hyper_util::client::legacy::connect::HttpConnector,
    http1_only: bool,
) -> hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector> {
    let builder = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http();
    let builder = match server_name.and_then(|n| ServerName::try_from(n).ok()) {
        Some(name) => {
            builder.with_server_name_resolver(hyper_rustls::FixedServerNameResolver::new(name))
        }
        None => builder,
    };
    if http1_only {
        builder.enable_http1().wrap_connector(http)
    } else {
        builder.enable_all_versions().wrap_connector(http)
    }
}

/// Builds the client configuration for upstream TLS (ALPN is set by the connector, which
/// knows whether the client speaks HTTP/2).
pub fn client_config(tls: &UpstreamTls) -> Result<rustls::ClientConfig, TlsError> {
    let provider = provider();
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?;
    let builder = if tls.insecure_skip_verify {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerify(HandshakeSignatures(provider))))
    } else if let Some(ca) = &tls.ca_file {
        let mut roots = rustls::RootCertStore::empty();
        for c in certs(ca)? {
            roots.add(c)?;
        }
        builder.with_root_certificates(roots)
    } else {
        let verifier =
            rustls_platform_verifier::Verifier::new(provider).map_err(TlsError::Rustls)?;
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
    };
    Ok(match &tls.client_cert {
        Some((cert, k)) => builder.with_client_auth_cert(certs(cert)?, key(k)?)?,
        None => builder.with_no_client_auth(),
    })
}

/// The handshake-signature half of a certificate verifier, shared by every custom verifier:
/// whatever a verifier decides about the certificate, signatures are checked with the provider.
#[derive(Debug)]
pub struct HandshakeSignatures(pub Arc<CryptoProvider>);

impl HandshakeSignatures {
    /// `ServerCertVerifier::verify_tls12_signature`.
    pub fn tls12(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    /// `ServerCertVerifier::verify_tls13_signature`.
    pub fn tls13(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    /// `ServerCertVerifier::supported_verify_schemes`.
    pub fn schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Accepts any certificate but still checks handshake signatures (insecure_skip_verify).
#[derive(Debug)]
struct NoVerify(HandshakeSignatures);

impl ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.tls12(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.tls13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.schemes()
    }
}
