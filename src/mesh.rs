//! Consul Connect identity: the gateway's leaf certificate and the CA roots, swapped atomically,
//! and mTLS client configurations that accept only the expected service's SPIFFE identity.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwapOption;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, TrustAnchor, UnixTime};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, SignatureScheme};

use crate::tls::{provider, HandshakeSignatures};

/// Why a Connect answer or a presented certificate was refused.
#[derive(Debug, thiserror::Error)]
pub enum MeshError {
    /// A PEM block did not parse.
    #[error("{what}: PEM does not parse")]
    Pem {
        /// Which PEM.
        what: String,
    },
    /// The roots answer names no active root, or lists none.
    #[error("the CA roots answer has no active root")]
    NoActiveRoot,
    /// The roots answer has no trust domain (Connect is not bootstrapped).
    #[error("the CA roots answer has no trust domain (is Connect enabled?)")]
    NoTrustDomain,
    /// A root certificate cannot be a trust anchor.
    #[error("root {id} is not a usable CA certificate")]
    BadRoot {
        /// The root's ID.
        id: String,
        /// Why.
        #[source]
        source: webpki::Error,
    },
    /// The leaf's private key does not belong to its certificate.
    #[error("the leaf's private key does not match its certificate")]
    KeyMismatch(#[source] rustls::Error),
    /// The leaf was issued for another service than the gateway's identity.
    #[error("the leaf is for {got}, not for service {want}")]
    WrongService {
        /// The leaf's service URI.
        got: String,
        /// The gateway's identity name.
        want: String,
    },
    /// A certificate carries no URI SAN (no SPIFFE identity).
    #[error("the certificate has no SPIFFE URI")]
    NoUri,
    /// A peer presented another identity than the one expected.
    #[error("peer certificate mismatch: got {got}, want {want}")]
    IdentityMismatch {
        /// The presented URI.
        got: String,
        /// The expected URI path.
        want: String,
    },
}

/// One CA root as Consul lists it (`/v1/agent/connect/ca/roots`).
#[derive(Debug, Clone, PartialEq)]
pub struct CaRoot {
    /// Colon-hex SHA-1 fingerprint.
    pub id: String,
    /// The root certificate, PEM.
    pub pem: String,
    /// Whether it signs new leaves.
    pub active: bool,
}

/// The CA roots answer, decoded.
#[derive(Debug, Clone, PartialEq)]
pub struct RootsAnswer {
    /// `<cluster-id>.consul`.
    pub trust_domain: String,
    /// The active root's ID.
    pub active_root_id: String,
    /// Every root, active or not (all are trusted, so a rotation in progress breaks nothing).
    pub roots: Vec<CaRoot>,
}

/// The gateway's leaf as Consul issues it (`/v1/agent/connect/ca/leaf/<name>`).
#[derive(Debug, Clone, PartialEq)]
pub struct LeafAnswer {
    /// Leaf followed by the active root's intermediates, PEM.
    pub cert_pem: String,
    /// The private key, PEM (SEC1, PKCS#8 or PKCS#1).
    pub key_pem: String,
    /// Colon-hex serial.
    pub serial: String,
    /// The leaf's SPIFFE ID.
    pub service_uri: String,
    /// Not valid before.
    pub valid_after: SystemTime,
    /// Not valid after.
    pub valid_before: SystemTime,
}

/// The trusted roots, ready for verification.
pub struct Roots {
    /// `<cluster-id>.consul`.
    pub trust_domain: String,
    /// Every root's ID, the active one first.
    pub ids: Vec<String>,
    anchors: Vec<TrustAnchor<'static>>,
}

impl fmt::Debug for Roots {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Roots")
            .field("trust_domain", &self.trust_domain)
            .field("ids", &self.ids)
            .finish()
    }
}

impl Roots {
    /// Trust anchors from every root in `answer`; refuses an answer without an active root.
    pub fn from_answer(answer: &RootsAnswer) -> Result<Self, MeshError> {
        if answer.trust_domain.is_empty() {
            return Err(MeshError::NoTrustDomain);
        }
        if !answer
            .roots
            .iter()
            .any(|r| r.active && r.id == answer.active_root_id)
        {
            return Err(MeshError::NoActiveRoot);
        }
        let mut anchors = Vec::new();
        let mut ids = Vec::new();
        let mut ordered: Vec<&CaRoot> = answer.roots.iter().collect();
        ordered.sort_by_key(|r| !r.active);
        for root in ordered {
            let der = CertificateDer::from_pem_slice(root.pem.as_bytes()).map_err(|_| {
                MeshError::Pem {
                    what: format!("root {}", root.id),
                }
            })?;
            let anchor = webpki::anchor_from_trusted_cert(&der)
                .map_err(|source| MeshError::BadRoot {
                    id: root.id.clone(),
                    source,
                })?
                .to_owned();
            anchors.push(anchor);
            ids.push(root.id.clone());
        }
        Ok(Self {
            trust_domain: answer.trust_domain.clone(),
            ids,
            anchors,
        })
    }
}

/// The gateway's own certificate and key, checked.
#[derive(Debug)]
pub struct Leaf {
    /// The leaf's SPIFFE ID.
    pub uri: String,
    /// Colon-hex serial.
    pub serial: String,
    /// Not valid before.
    pub valid_after: SystemTime,
    /// Not valid after.
    pub valid_before: SystemTime,
    key: Arc<CertifiedKey>,
}

impl Leaf {
    /// Parses and checks a leaf answer for the identity `service`: the PEMs parse, the key
    /// belongs to the certificate, and the certificate is that service's.
    pub fn from_answer(answer: &LeafAnswer, service: &str) -> Result<Self, MeshError> {
        let chain: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(answer.cert_pem.as_bytes())
                .collect::<Result<_, _>>()
                .map_err(|_| MeshError::Pem {
                    what: "leaf certificate".into(),
                })?;
        if chain.is_empty() {
            return Err(MeshError::Pem {
                what: "leaf certificate".into(),
            });
        }
        let key = PrivateKeyDer::from_pem_slice(answer.key_pem.as_bytes()).map_err(|_| {
            MeshError::Pem {
                what: "leaf private key".into(),
            }
        })?;
        let provider = provider();
        let key = CertifiedKey::from_der(chain, key, &provider).map_err(MeshError::KeyMismatch)?;
        let cert = webpki::EndEntityCert::try_from(&key.cert[0]).map_err(|_| MeshError::Pem {
            what: "leaf certificate".into(),
        })?;
        let uri = cert
            .valid_uri_names()
            .next()
            .ok_or(MeshError::NoUri)?
            .to_owned();
        if spiffe_service(&uri).map(|s| s.service) != Some(service) {
            return Err(MeshError::WrongService {
                got: uri,
                want: service.to_owned(),
            });
        }
        Ok(Self {
            uri,
            serial: answer.serial.clone(),
            valid_after: answer.valid_after,
            valid_before: answer.valid_before,
            key: Arc::new(key),
        })
    }

    /// The datacenter in the leaf's own SPIFFE ID.
    pub fn datacenter(&self) -> Option<&str> {
        spiffe_service(&self.uri).map(|s| s.datacenter)
    }

    /// Whether the leaf is in the last tenth of its validity, or past it.
    pub fn renewal_overdue(&self, now: SystemTime) -> bool {
        let total = self
            .valid_before
            .duration_since(self.valid_after)
            .unwrap_or_default();
        let left = self.valid_before.duration_since(now).unwrap_or_default();
        left < total / 10
    }

    /// Whether `now` is past the leaf's validity.
    pub fn expired(&self, now: SystemTime) -> bool {
        now >= self.valid_before
    }

    /// Seconds until the leaf expires (negative once it has).
    pub fn seconds_left(&self, now: SystemTime) -> f64 {
        match self.valid_before.duration_since(now) {
            Ok(d) => d.as_secs_f64(),
            Err(e) => -e.duration().as_secs_f64(),
        }
    }
}

/// The parts of a service SPIFFE ID (`spiffe://<td>/ns/<ns>/dc/<dc>/svc/<service>`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpiffeService<'a> {
    /// The trust domain.
    pub trust_domain: &'a str,
    /// The namespace (`default` outside Enterprise).
    pub namespace: &'a str,
    /// The datacenter.
    pub datacenter: &'a str,
    /// The service.
    pub service: &'a str,
}

/// Parses a service SPIFFE ID of the default partition; `None` for any other identity.
pub fn spiffe_service(uri: &str) -> Option<SpiffeService<'_>> {
    let rest = uri.strip_prefix("spiffe://")?;
    let (td, path) = rest.split_once('/')?;
    let mut parts = path.split('/');
    match (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    ) {
        (Some("ns"), Some(ns), Some("dc"), Some(dc), Some("svc"), Some(svc), None)
            if !td.is_empty() && !ns.is_empty() && !dc.is_empty() && !svc.is_empty() =>
        {
            Some(SpiffeService {
                trust_domain: td,
                namespace: ns,
                datacenter: dc,
                service: svc,
            })
        }
        _ => None,
    }
}

/// The path of a service's SPIFFE ID in namespace `default`: what a mesh peer must present.
/// The trust domain is not compared, as in Consul's own client (a trust-domain migration keeps
/// working; the CA roots already bound who may sign).
pub fn service_path(datacenter: &str, service: &str) -> String {
    format!("/ns/default/dc/{datacenter}/svc/{service}")
}

/// The SNI Consul's own proxies send to a service (`<svc>.default.<dc>.internal.<td>`); sidecars
/// ignore it, mesh gateways route on it.
pub fn service_sni(trust_domain: &str, datacenter: &str, service: &str) -> String {
    format!("{service}.default.{datacenter}.internal.{trust_domain}")
}

/// What the request path reads: roots and leaf of one generation.
#[derive(Debug)]
pub struct Snapshot {
    /// Bumped whenever the leaf or the roots change; mesh clients are rebuilt when it moves.
    pub generation: u64,
    /// The trusted roots.
    pub roots: Arc<Roots>,
    /// The gateway's leaf.
    pub leaf: Arc<Leaf>,
}

impl Snapshot {
    /// A client configuration that presents the gateway's leaf and accepts only a peer chaining
    /// to the roots with the SPIFFE path `expected` (see [`service_path`]). ALPN is left to the
    /// connector.
    pub fn client_config(&self, expected: String) -> rustls::ClientConfig {
        let provider = provider();
        let verifier = SpiffeVerifier {
            roots: self.roots.clone(),
            expected,
            signatures: HandshakeSignatures(provider.clone()),
        };
        rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("ring supports the default protocol versions")
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_client_cert_resolver(Arc::new(FixedKey(self.leaf.key.clone())))
    }
}

/// The gateway's mesh identity: the latest roots and leaf, what went wrong last, and counts.
#[derive(Debug)]
pub struct MeshIdentity {
    /// The identity name (`discovery.consul.connect.service`).
    pub service: String,
    roots: ArcSwapOption<Roots>,
    leaf: ArcSwapOption<Leaf>,
    current: ArcSwapOption<Snapshot>,
    generation: AtomicU64,
    rotations: AtomicU64,
    /// The last problem with a Consul answer, for `/status` and `/ready` (control plane only).
    last_error: Mutex<Option<String>>,
}

impl MeshIdentity {
    /// An identity named `service`, with nothing loaded yet.
    pub fn new(service: impl Into<String>) -> Self {
        Self {
            service: service.into(),
            roots: ArcSwapOption::empty(),
            leaf: ArcSwapOption::empty(),
            current: ArcSwapOption::empty(),
            generation: AtomicU64::new(0),
            rotations: AtomicU64::new(0),
            last_error: Mutex::new(None),
        }
    }

    /// Installs new roots; a bad answer changes nothing and is returned.
    pub fn set_roots(&self, answer: &RootsAnswer) -> Result<(), MeshError> {
        let roots = Roots::from_answer(answer)?;
        let changed = self.roots.load().as_ref().map(|r| &r.ids) != Some(&roots.ids);
        if changed {
            if self.roots.load().is_some() {
                self.rotations.fetch_add(1, Ordering::Relaxed);
            }
            self.roots.store(Some(Arc::new(roots)));
            self.publish();
        }
        Ok(())
    }

    /// Installs a new leaf; a bad answer changes nothing and is returned.
    pub fn set_leaf(&self, answer: &LeafAnswer) -> Result<(), MeshError> {
        let leaf = Leaf::from_answer(answer, &self.service)?;
        let changed = self.leaf.load().as_ref().map(|l| &l.serial) != Some(&leaf.serial);
        if changed {
            if self.leaf.load().is_some() {
                self.rotations.fetch_add(1, Ordering::Relaxed);
            }
            self.leaf.store(Some(Arc::new(leaf)));
            self.publish();
        }
        Ok(())
    }

    fn publish(&self) {
        let (Some(roots), Some(leaf)) = (self.roots.load_full(), self.leaf.load_full()) else {
            return;
        };
        let generation = self.generation.fetch_add(1, Ordering::Relaxed) + 1;
        self.current.store(Some(Arc::new(Snapshot {
            generation,
            roots,
            leaf,
        })));
    }

    /// The current roots and leaf, once both have loaded.
    pub fn snapshot(&self) -> Option<Arc<Snapshot>> {
        self.current.load_full()
    }

    /// Whether both the roots and the leaf have loaded.
    pub fn is_loaded(&self) -> bool {
        self.current.load().is_some()
    }

    /// Leaf renewals and root changes seen since the first of each.
    pub fn rotations(&self) -> u64 {
        self.rotations.load(Ordering::Relaxed)
    }

    /// Records (or clears, with `None`) the last problem with a Connect answer.
    pub fn set_error(&self, error: Option<String>) {
        if let Ok(mut e) = self.last_error.lock() {
            *e = error;
        }
    }

    /// The last problem with a Connect answer.
    pub fn error(&self) -> Option<String> {
        self.last_error.lock().ok().and_then(|e| e.clone())
    }

    /// `/status`'s view: SPIFFE ID, serial, validity, roots.
    pub fn status(&self) -> serde_json::Value {
        let now = SystemTime::now();
        let leaf = self.leaf.load_full().map(|l| {
            serde_json::json!({
                "spiffe_id": l.uri,
                "serial": l.serial,
                "valid_until": humantime::format_rfc3339_seconds(l.valid_before).to_string(),
                "seconds_left": l.seconds_left(now).floor(),
            })
        });
        let roots = self.roots.load_full().map(|r| {
            serde_json::json!({
                "trust_domain": r.trust_domain,
                "ids": r.ids,
            })
        });
        serde_json::json!({
            "service": self.service,
            "loaded": self.is_loaded(),
            "leaf": leaf,
            "roots": roots,
            "rotations": self.rotations(),
            "error": self.error(),
        })
    }

    /// How long until the leaf should have been renewed: for the warning loop.
    pub fn leaf(&self) -> Option<Arc<Leaf>> {
        self.leaf.load_full()
    }
}

/// Checks a peer like Consul's client does: the chain must lead to one of the roots (the
/// peer's extra certificates as intermediates, no hostname), then the first URI SAN's path must
/// equal the expected service's, ASCII case-insensitively.
#[derive(Debug)]
struct SpiffeVerifier {
    roots: Arc<Roots>,
    expected: String,
    signatures: HandshakeSignatures,
}

impl ServerCertVerifier for SpiffeVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let cert = webpki::EndEntityCert::try_from(end_entity).map_err(pki_error)?;
        cert.verify_for_usage(
            self.signatures.0.signature_verification_algorithms.all,
            &self.roots.anchors,
            intermediates,
            now,
            webpki::KeyUsage::server_auth(),
            None,
            None,
        )
        .map_err(pki_error)?;
        let uri = cert
            .valid_uri_names()
            .next()
            .ok_or_else(|| other(MeshError::NoUri))?;
        let path = uri
            .strip_prefix("spiffe://")
            .and_then(|r| r.find('/').map(|i| &r[i..]))
            .unwrap_or("");
        if path.eq_ignore_ascii_case(&self.expected) {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(other(MeshError::IdentityMismatch {
                got: uri.to_owned(),
                want: self.expected.clone(),
            }))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.signatures.tls12(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.signatures.tls13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.signatures.schemes()
    }
}

/// Presents the gateway's leaf whatever the server asks.
#[derive(Debug)]
struct FixedKey(Arc<CertifiedKey>);

impl rustls::client::ResolvesClientCert for FixedKey {
    fn resolve(&self, _: &[&[u8]], _: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

fn pki_error(e: webpki::Error) -> rustls::Error {
    use rustls::CertificateError as C;
    rustls::Error::InvalidCertificate(match e {
        webpki::Error::CertExpired { .. } => C::Expired,
        webpki::Error::CertNotValidYet { .. } => C::NotValidYet,
        webpki::Error::UnknownIssuer => C::UnknownIssuer,
        webpki::Error::InvalidSignatureForPublicKey => C::BadSignature,
        other => C::Other(rustls::OtherError(Arc::new(other))),
    })
}

fn other(e: MeshError) -> rustls::Error {
    rustls::Error::InvalidCertificate(rustls::CertificateError::Other(rustls::OtherError(
        Arc::new(e),
    )))
}

/// How often a leaf near its end is warned about.
pub const EXPIRY_WARNING_EVERY: Duration = Duration::from_secs(60);

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, SanType};

    const TD: &str = "11111111-2222-3333-4444-555555555555.consul";

    fn uri(s: &str) -> SanType {
        SanType::URI(s.try_into().unwrap())
    }

    /// A CA and a leaf for `service` signed by it, as Consul's answers carry them.
    fn ca() -> (CertificateParams, KeyPair, String) {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![uri(&format!("spiffe://{TD}"))];
        params.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let pem = params.self_signed(&key).unwrap().pem();
        (params, key, pem)
    }

    fn leaf(ca: &(CertificateParams, KeyPair, String), service: &str) -> (String, String) {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![uri(&format!(
            "spiffe://{TD}/ns/default/dc/dc1/svc/{service}"
        ))];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ClientAuth,
            ExtendedKeyUsagePurpose::ServerAuth,
        ];
        let issuer = Issuer::from_params(&ca.0, &ca.1);
        let pem = params.signed_by(&key, &issuer).unwrap().pem();
        (pem, key.serialize_pem())
    }

    fn roots(pem: &str, active: bool) -> RootsAnswer {
        RootsAnswer {
            trust_domain: TD.into(),
            active_root_id: "aa".into(),
            roots: vec![CaRoot {
                id: "aa".into(),
                pem: pem.into(),
                active,
            }],
        }
    }

    fn leaf_answer(cert: &str, key: &str, serial: &str) -> LeafAnswer {
        let now = SystemTime::now();
        LeafAnswer {
            cert_pem: cert.into(),
            key_pem: key.into(),
            serial: serial.into(),
            service_uri: String::new(),
            valid_after: now - Duration::from_secs(60),
            valid_before: now + Duration::from_secs(3600),
        }
    }

    #[test]
    fn spiffe_ids_parse_only_for_services() {
        let id = format!("spiffe://{TD}/ns/default/dc/dc1/svc/web");
        let s = spiffe_service(&id).unwrap();
        assert_eq!((s.datacenter, s.service), ("dc1", "web"));
        assert!(spiffe_service(&format!("spiffe://{TD}/agent/server/dc/dc1")).is_none());
        assert!(spiffe_service(&format!("spiffe://{TD}")).is_none());
        assert!(spiffe_service("https://x/ns/default/dc/dc1/svc/web").is_none());
        assert_eq!(
            service_sni(TD, "dc1", "web"),
            format!("web.default.dc1.internal.{TD}")
        );
    }

    #[test]
    fn bad_connect_answers_are_refused_and_the_last_good_state_stays() {
        let good_ca = ca();
        let identity = MeshIdentity::new("meshgate");
        // Roots without an active root, or whose PEM does not parse: refused, nothing loaded.
        assert!(matches!(
            identity.set_roots(&roots(&good_ca.2, false)),
            Err(MeshError::NoActiveRoot)
        ));
        assert!(matches!(
            identity.set_roots(&roots("-----BEGIN CERTIFICATE-----\nnope\n", true)),
            Err(MeshError::Pem { .. })
        ));
        let mut no_td = roots(&good_ca.2, true);
        no_td.trust_domain.clear();
        assert!(matches!(
            identity.set_roots(&no_td),
            Err(MeshError::NoTrustDomain)
        ));
        identity.set_roots(&roots(&good_ca.2, true)).unwrap();
        assert!(!identity.is_loaded());

        let (cert, key) = leaf(&good_ca, "meshgate");
        let (other_cert, other_key) = leaf(&good_ca, "web");
        // A key that belongs to another certificate, a leaf for another service, a PEM that
        // does not parse: each refused.
        assert!(matches!(
            identity.set_leaf(&leaf_answer(&cert, &other_key, "01")),
            Err(MeshError::KeyMismatch(_))
        ));
        assert!(matches!(
            identity.set_leaf(&leaf_answer(&other_cert, &other_key, "02")),
            Err(MeshError::WrongService { .. })
        ));
        assert!(matches!(
            identity.set_leaf(&leaf_answer("garbage", &key, "03")),
            Err(MeshError::Pem { .. })
        ));
        identity.set_leaf(&leaf_answer(&cert, &key, "04")).unwrap();
        let first = identity.snapshot().unwrap();
        assert_eq!(first.leaf.serial, "04");
        assert_eq!(first.leaf.datacenter(), Some("dc1"));
        // A bad answer later keeps the good leaf and roots in force.
        assert!(identity
            .set_leaf(&leaf_answer(&other_cert, &key, "05"))
            .is_err());
        assert!(identity.set_roots(&roots(&good_ca.2, false)).is_err());
        let still = identity.snapshot().unwrap();
        assert_eq!(still.generation, first.generation);
        assert_eq!(identity.rotations(), 0);
        // A renewal is a new generation and a rotation.
        let (cert2, key2) = leaf(&good_ca, "meshgate");
        identity
            .set_leaf(&leaf_answer(&cert2, &key2, "06"))
            .unwrap();
        assert!(identity.snapshot().unwrap().generation > first.generation);
        assert_eq!(identity.rotations(), 1);
    }

    #[test]
    fn leaf_validity_windows() {
        let ca = ca();
        let (cert, key) = leaf(&ca, "meshgate");
        let now = SystemTime::now();
        let mut answer = leaf_answer(&cert, &key, "01");
        answer.valid_after = now - Duration::from_secs(100);
        answer.valid_before = now + Duration::from_secs(5);
        let l = Leaf::from_answer(&answer, "meshgate").unwrap();
        assert!(l.renewal_overdue(now));
        assert!(!l.expired(now));
        assert!(l.expired(now + Duration::from_secs(6)));
        assert!(l.seconds_left(now + Duration::from_secs(10)) < 0.0);
        answer.valid_before = now + Duration::from_secs(100);
        let l = Leaf::from_answer(&answer, "meshgate").unwrap();
        assert!(!l.renewal_overdue(now));
    }
}
