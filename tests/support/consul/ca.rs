//! The emulator's Connect CA (CONNECT.md §1-3, §11): EC P-256 roots with a `spiffe://<td>` URI
//! SAN, cross-signed rotation, and SPIFFE leaves; plus the DER/PEM odds and ends tests need.

use std::collections::BTreeMap;
use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType, SerialNumber,
};
use serde::Serialize;

/// `time::OffsetDateTime` of a `SystemTime` (reached through rcgen, not named, to add no
/// dependency).
macro_rules! to_time {
    ($t:expr) => {
        rcgen::date_time_ymd(1970, 1, 1) + $t.duration_since(UNIX_EPOCH).unwrap_or_default()
    };
}

/// Consul's default `LeafCertTTL`.
pub const DEFAULT_LEAF_TTL: Duration = Duration::from_secs(72 * 3600);
/// Consul's clock-skew buffer: leaves start one minute in the past.
const SKEW: Duration = Duration::from_secs(60);
/// Root lifetime (Consul's default root TTL, 10 years).
const ROOT_TTL: Duration = Duration::from_secs(87_600 * 3600);
/// The built-in provider's cross-signed certificates live 7 days.
const CROSS_SIGN_TTL: Duration = Duration::from_secs(7 * 24 * 3600);

/// A certificate authority that can mint SPIFFE leaves: the emulator's roots use it, and
/// [`TestCa`]s made by `foreign_ca()` are unrelated ones with the same trust domain.
pub struct Authority {
    params: CertificateParams,
    key: KeyPair,
    /// The self-signed certificate, PEM.
    pub cert_pem: String,
    /// `NotBefore`/`NotAfter` of the self-signed certificate.
    not_before: SystemTime,
    not_after: SystemTime,
    serial: u64,
}

impl fmt::Debug for Authority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Authority")
            .field("serial", &self.serial)
            .finish_non_exhaustive()
    }
}

impl Authority {
    /// A new EC P-256 root named `name` with URI SAN `spiffe://<trust_domain>`.
    pub fn new(trust_domain: &str, name: &str) -> Self {
        let key = KeyPair::generate().expect("generate P-256 CA key");
        let serial = fastrand::u64(1..);
        let now = SystemTime::now();
        let mut params = CertificateParams::default();
        params.distinguished_name.remove(DnType::CommonName);
        params.distinguished_name.push(DnType::CommonName, name);
        params.subject_alt_names = vec![uri_san(&format!("spiffe://{trust_domain}"))];
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.serial_number = Some(SerialNumber::from_slice(&serial.to_be_bytes()));
        params.not_before = to_time!(now - SKEW);
        params.not_after = to_time!(now + ROOT_TTL);
        let cert_pem = params.self_signed(&key).expect("self-sign CA").pem();
        Self {
            params,
            key,
            cert_pem,
            not_before: now - SKEW,
            not_after: now + ROOT_TTL,
            serial,
        }
    }

    /// A leaf for `uri` (one URI SAN, EKU client+server, NotBefore now-1m) valid `ttl` from
    /// NotBefore, with a fresh P-256 key; returns the certificate, the key and the serial.
    fn sign_leaf(&self, uri: &str, ttl: Duration, serial: u64) -> (String, KeyPair, LeafTimes) {
        let key = KeyPair::generate().expect("generate P-256 leaf key");
        let not_before = SystemTime::now() - SKEW;
        let not_after = not_before + ttl;
        let mut params = CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.subject_alt_names = vec![uri_san(uri)];
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
            KeyUsagePurpose::KeyAgreement,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ClientAuth,
            ExtendedKeyUsagePurpose::ServerAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(SerialNumber::from_slice(&serial.to_be_bytes()));
        params.not_before = to_time!(not_before);
        params.not_after = to_time!(not_after);
        let issuer = Issuer::from_params(&self.params, &self.key);
        let pem = params.signed_by(&key, &issuer).expect("sign leaf").pem();
        (
            pem,
            key,
            LeafTimes {
                not_before,
                not_after,
            },
        )
    }

    /// `other`'s certificate (same subject and key) signed by this authority: the
    /// cross-signed intermediate of a rotation.
    fn cross_sign(&self, other: &Self) -> String {
        let mut params = other.params.clone();
        let now = SystemTime::now();
        params.not_before = to_time!(now - SKEW);
        params.not_after = to_time!(now + CROSS_SIGN_TTL);
        params.use_authority_key_identifier_extension = true;
        let issuer = Issuer::from_params(&self.params, &self.key);
        params
            .signed_by(&other.key, &issuer)
            .expect("cross-sign root")
            .pem()
    }

    /// Colon-hex of the SubjectKeyId (`SigningKeyID`).
    fn key_id(&self) -> String {
        colon_hex(&self.params.key_identifier(&self.key))
    }
}

#[derive(Debug, Clone, Copy)]
pub(super) struct LeafTimes {
    not_before: SystemTime,
    not_after: SystemTime,
}

/// A separate CA for negative tests: its leaves claim valid SPIFFE IDs of the emulator's
/// trust domain but chain to a root nobody trusts.
#[derive(Debug)]
pub struct TestCa {
    authority: Authority,
    trust_domain: String,
    datacenter: String,
}

impl TestCa {
    /// A CA whose leaves name `spiffe://<trust_domain>/ns/default/dc/<datacenter>/svc/<x>`.
    pub fn new(trust_domain: &str, datacenter: &str) -> Self {
        Self {
            authority: Authority::new(trust_domain, "Foreign CA"),
            trust_domain: trust_domain.to_owned(),
            datacenter: datacenter.to_owned(),
        }
    }

    /// `(cert chain PEM, SEC1 key PEM)` of a 72h leaf for `service`.
    pub fn issue_leaf(&self, service: &str) -> (String, String) {
        let uri = service_uri(&self.trust_domain, &self.datacenter, service);
        let (pem, key, _) = self
            .authority
            .sign_leaf(&uri, DEFAULT_LEAF_TTL, fastrand::u64(1..));
        (pem, sec1_pem(&key))
    }

    /// The CA's own certificate, PEM.
    pub fn root_pem(&self) -> String {
        self.authority.cert_pem.clone()
    }
}

/// One entry of `Roots[]`.
#[derive(Debug)]
pub(super) struct Root {
    authority: Authority,
    id: String,
    name: String,
    intermediates: Vec<String>,
    active: bool,
    create_index: u64,
    modify_index: u64,
}

/// One issued leaf as the agent caches it.
#[derive(Debug, Clone)]
pub(super) struct Leaf {
    chain_pem: String,
    key_pem: String,
    serial: String,
    uri: String,
    times: LeafTimes,
    root_id: String,
    create_index: u64,
    pub(super) modify_index: u64,
}

/// The CA state inside the emulator's raft state.
#[derive(Debug)]
pub(super) struct Ca {
    pub(super) trust_domain: String,
    datacenter: String,
    roots: Vec<Root>,
    /// Index of the CA roots table.
    pub(super) index: u64,
    leaf_ttl: Duration,
    leaves: BTreeMap<String, Leaf>,
    next_serial: u64,
}

impl Ca {
    /// A bootstrapped CA: one active root written at `idx`.
    pub(super) fn new(cluster_seed: &str, datacenter: &str, idx: u64) -> Self {
        let trust_domain = format!("{}.consul", super::fake_uuid(cluster_seed));
        let mut ca = Self {
            trust_domain,
            datacenter: datacenter.to_owned(),
            roots: Vec::new(),
            index: idx,
            leaf_ttl: DEFAULT_LEAF_TTL,
            leaves: BTreeMap::new(),
            next_serial: 1,
        };
        let root = ca.new_root(idx);
        ca.roots.push(root);
        ca
    }

    fn new_root(&self, idx: u64) -> Root {
        let name = format!("Consul CA Root Cert {}", self.roots.len() + 1);
        let authority = Authority::new(&self.trust_domain, &name);
        let der = pem_blocks(&authority.cert_pem)
            .into_iter()
            .next()
            .expect("root PEM");
        Root {
            id: colon_hex(&sha1(&der)),
            authority,
            name: "Consul CA Root Cert".to_owned(),
            intermediates: Vec::new(),
            active: true,
            create_index: idx,
            modify_index: idx,
        }
    }

    fn active(&self) -> &Root {
        self.roots
            .iter()
            .find(|r| r.active)
            .expect("the emulator always has an active root")
    }

    /// Every root certificate (active or not), concatenated PEM.
    pub(super) fn roots_pem(&self) -> String {
        self.roots
            .iter()
            .map(|r| r.authority.cert_pem.clone())
            .collect()
    }

    /// A new active root at `idx`; the old one stays listed, inactive. With `cross_sign`
    /// the old root signs the new one and that certificate joins its `IntermediateCerts`.
    pub(super) fn rotate(&mut self, cross_sign: bool, idx: u64) {
        let mut root = self.new_root(idx);
        let old = self
            .roots
            .iter_mut()
            .find(|r| r.active)
            .expect("active root");
        if cross_sign {
            root.intermediates
                .push(old.authority.cross_sign(&root.authority));
        }
        old.active = false;
        old.modify_index = idx;
        self.roots.push(root);
        self.index = idx;
        let services: Vec<String> = self.leaves.keys().cloned().collect();
        for s in services {
            self.issue(&s, idx);
        }
    }

    /// Whether a rotated-out root is still listed.
    pub(super) fn has_inactive(&self) -> bool {
        self.roots.iter().any(|r| !r.active)
    }

    /// Drops every inactive root at `idx`.
    pub(super) fn prune(&mut self, idx: u64) {
        self.roots.retain(|r| r.active);
        self.index = idx;
    }

    pub(super) fn set_leaf_ttl(&mut self, ttl: Duration) {
        self.leaf_ttl = ttl;
    }

    /// Mints a leaf for `service` from the active root at `idx` and caches it.
    pub(super) fn issue(&mut self, service: &str, idx: u64) -> &Leaf {
        let (chain_pem, key_pem, serial, times) = self.mint(service);
        let uri = service_uri(&self.trust_domain, &self.datacenter, service);
        let create_index = self.leaves.get(service).map_or(idx, |l| l.create_index);
        let leaf = Leaf {
            chain_pem,
            key_pem,
            serial,
            uri,
            times,
            root_id: self.active().id.clone(),
            create_index,
            modify_index: idx,
        };
        self.leaves.insert(service.to_owned(), leaf);
        &self.leaves[service]
    }

    /// A leaf chain and key from the active root, not cached (what a test sidecar presents).
    pub(super) fn mint(&mut self, service: &str) -> (String, String, String, LeafTimes) {
        let serial = self.next_serial;
        self.next_serial += 1;
        let uri = service_uri(&self.trust_domain, &self.datacenter, service);
        let root = self.active();
        let (pem, key, times) = root.authority.sign_leaf(&uri, self.leaf_ttl, serial);
        let mut chain = pem;
        for i in &root.intermediates {
            chain.push_str(i);
        }
        let serial = colon_hex(&trim_zeros(&serial.to_be_bytes()));
        (chain, sec1_pem(&key), serial, times)
    }

    /// The cached leaf, unless it must be re-minted first: none yet, signed by a root that
    /// is no longer active, or past 90% of its lifetime (the agent's hard renewal point).
    pub(super) fn needs_issue(&self, service: &str) -> bool {
        let Some(leaf) = self.leaves.get(service) else {
            return true;
        };
        let life = leaf
            .times
            .not_after
            .duration_since(leaf.times.not_before)
            .unwrap_or_default();
        let renew_at = leaf.times.not_before + life.mul_f64(0.9);
        leaf.root_id != self.active().id || SystemTime::now() >= renew_at
    }

    pub(super) fn leaf(&self, service: &str) -> Option<&Leaf> {
        self.leaves.get(service)
    }

    /// Lowers indexes above `index` (snapshot restore).
    pub(super) fn restore(&mut self, index: u64) {
        self.index = self.index.min(index);
        for r in &mut self.roots {
            r.create_index = r.create_index.min(index);
            r.modify_index = r.modify_index.min(index);
        }
        for l in self.leaves.values_mut() {
            l.create_index = l.create_index.min(index);
            l.modify_index = l.modify_index.min(index);
        }
    }

    /// The `/v1/agent/connect/ca/roots` body (§2.1).
    pub(super) fn roots_json(&self) -> RootsJson<'_> {
        RootsJson {
            active_root_id: &self.active().id,
            trust_domain: &self.trust_domain,
            roots: self
                .roots
                .iter()
                .map(|r| RootJson {
                    id: &r.id,
                    name: &r.name,
                    serial_number: r.authority.serial,
                    signing_key_id: r.authority.key_id(),
                    external_trust_domain: "",
                    not_before: rfc3339(r.authority.not_before),
                    not_after: rfc3339(r.authority.not_after),
                    root_cert: &r.authority.cert_pem,
                    intermediate_certs: (!r.intermediates.is_empty()).then_some(&r.intermediates),
                    active: r.active,
                    private_key_type: "ec",
                    private_key_bits: 256,
                    create_index: r.create_index,
                    modify_index: r.modify_index,
                })
                .collect(),
        }
    }
}

impl Leaf {
    /// The `/v1/agent/connect/ca/leaf/:service` body (§3.1).
    pub(super) fn json<'a>(&'a self, service: &'a str) -> LeafJson<'a> {
        LeafJson {
            serial_number: &self.serial,
            cert_pem: &self.chain_pem,
            private_key_pem: &self.key_pem,
            service,
            service_uri: &self.uri,
            valid_after: rfc3339(self.times.not_before),
            valid_before: rfc3339(self.times.not_after),
            create_index: self.create_index,
            modify_index: self.modify_index,
        }
    }
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
pub(super) struct RootsJson<'a> {
    #[serde(rename = "ActiveRootID")]
    active_root_id: &'a str,
    trust_domain: &'a str,
    roots: Vec<RootJson<'a>>,
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct RootJson<'a> {
    #[serde(rename = "ID")]
    id: &'a str,
    name: &'a str,
    serial_number: u64,
    #[serde(rename = "SigningKeyID")]
    signing_key_id: String,
    external_trust_domain: &'static str,
    not_before: String,
    not_after: String,
    root_cert: &'a str,
    intermediate_certs: Option<&'a Vec<String>>,
    active: bool,
    private_key_type: &'static str,
    private_key_bits: u32,
    create_index: u64,
    modify_index: u64,
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
pub(super) struct LeafJson<'a> {
    serial_number: &'a str,
    #[serde(rename = "CertPEM")]
    cert_pem: &'a str,
    #[serde(rename = "PrivateKeyPEM")]
    private_key_pem: &'a str,
    service: &'a str,
    #[serde(rename = "ServiceURI")]
    service_uri: &'a str,
    valid_after: String,
    valid_before: String,
    create_index: u64,
    modify_index: u64,
}

// === helpers, public for tests and the sidecar ===

/// `spiffe://<td>/ns/default/dc/<dc>/svc/<service>`.
pub fn service_uri(trust_domain: &str, datacenter: &str, service: &str) -> String {
    format!("spiffe://{trust_domain}/ns/default/dc/{datacenter}/svc/{service}")
}

/// The DER blocks of every `CERTIFICATE` in `pem`.
pub fn pem_blocks(pem: &str) -> Vec<Vec<u8>> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .filter_map(Result::ok)
        .map(|c| c.to_vec())
        .collect()
}

/// The URI SANs of a DER certificate, in order (empty if it does not parse).
pub fn uri_sans(cert_der: &[u8]) -> Vec<String> {
    const SAN_OID: &[u8] = &[0x55, 0x1d, 0x11];
    let parse = || -> Option<Vec<String>> {
        let (_, cert, _) = tlv(cert_der)?;
        let (_, mut tbs, _) = tlv(cert)?;
        // Walk tbsCertificate to the [3] extensions field.
        let exts = loop {
            let (tag, body, rest) = tlv(tbs)?;
            if tag == 0xa3 {
                break tlv(body)?.1;
            }
            tbs = rest;
        };
        let mut exts = exts;
        while !exts.is_empty() {
            let (_, ext, rest) = tlv(exts)?;
            exts = rest;
            let (_, oid, mut fields) = tlv(ext)?;
            if oid != SAN_OID {
                continue;
            }
            let value = loop {
                let (tag, body, rest) = tlv(fields)?;
                if tag == 0x04 {
                    break body;
                }
                fields = rest;
            };
            let (_, mut names, _) = tlv(value)?;
            let mut out = Vec::new();
            while !names.is_empty() {
                let (tag, body, rest) = tlv(names)?;
                if tag == 0x86 {
                    out.push(String::from_utf8_lossy(body).into_owned());
                }
                names = rest;
            }
            return Some(out);
        }
        Some(Vec::new())
    };
    parse().unwrap_or_default()
}

/// One DER TLV: (tag, contents, rest). Short and long definite lengths only.
fn tlv(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, mut rest) = rest.split_first()?;
    let len = if first < 0x80 {
        usize::from(first)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |acc, b| (acc << 8) | usize::from(*b));
        rest = &rest[n..];
        len
    };
    (rest.len() >= len).then(|| (tag, &rest[..len], &rest[len..]))
}

/// `EC PRIVATE KEY` (SEC1) PEM of a key: the ECPrivateKey inside rcgen's PKCS#8 wrapper.
fn sec1_pem(key: &KeyPair) -> String {
    let pkcs8 = key.serialized_der();
    let sec1 = (|| {
        let (_, info, _) = tlv(pkcs8)?;
        let (_, _version, rest) = tlv(info)?;
        let (_, _algorithm, rest) = tlv(rest)?;
        let (tag, sec1, _) = tlv(rest)?;
        (tag == 0x04).then_some(sec1)
    })()
    .expect("rcgen writes PKCS#8 with an ECPrivateKey");
    pem_encode("EC PRIVATE KEY", sec1)
}

fn pem_encode(label: &str, der: &[u8]) -> String {
    let b64 = super::base64(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).expect("base64 is ASCII"));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

fn uri_san(uri: &str) -> SanType {
    SanType::URI(uri.try_into().expect("SPIFFE URIs are ASCII"))
}

/// Lower-case colon-separated hex (`"08"`, `"01:7e"`).
pub fn colon_hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn trim_zeros(bytes: &[u8]) -> Vec<u8> {
    let start = bytes
        .iter()
        .position(|b| *b != 0)
        .unwrap_or(bytes.len() - 1);
    bytes[start..].to_vec()
}

/// RFC 3339 UTC with seconds (`2018-05-21T16:33:28Z`).
fn rfc3339(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
    let days = i64::try_from(secs / 86_400).unwrap_or(0);
    let rem = secs % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// SHA-1 (FIPS 180-4), only for Consul's root `ID` fingerprint.
fn sha1(data: &[u8]) -> [u8; 20] {
    let mut h: [u32; 5] = [
        0x6745_2301,
        0xefcd_ab89,
        0x98ba_dcfe,
        0x1032_5476,
        0xc3d2_e1f0,
    ];
    let mut msg = data.to_vec();
    let bit_len = (data.len() as u64).wrapping_mul(8);
    msg.push(0x80);
    while msg.len() % 64 != 56 {
        msg.push(0);
    }
    msg.extend_from_slice(&bit_len.to_be_bytes());
    for block in msg.chunks(64) {
        let mut w = [0u32; 80];
        for (i, word) in block.chunks(4).enumerate() {
            w[i] = u32::from_be_bytes([word[0], word[1], word[2], word[3]]);
        }
        for i in 16..80 {
            w[i] = (w[i - 3] ^ w[i - 8] ^ w[i - 14] ^ w[i - 16]).rotate_left(1);
        }
        let [mut a, mut b, mut c, mut d, mut e] = h;
        for (i, wi) in w.iter().enumerate() {
            let (f, k) = match i {
                0..=19 => ((b & c) | (!b & d), 0x5a82_7999),
                20..=39 => (b ^ c ^ d, 0x6ed9_eba1),
                40..=59 => ((b & c) | (b & d) | (c & d), 0x8f1b_bcdc),
                _ => (b ^ c ^ d, 0xca62_c1d6),
            };
            let t = a
                .rotate_left(5)
                .wrapping_add(f)
                .wrapping_add(e)
                .wrapping_add(k)
                .wrapping_add(*wi);
            e = d;
            d = c;
            c = b.rotate_left(30);
            b = a;
            a = t;
        }
        for (x, y) in h.iter_mut().zip([a, b, c, d, e]) {
            *x = x.wrapping_add(y);
        }
    }
    let mut out = [0u8; 20];
    for (chunk, word) in out.chunks_mut(4).zip(h) {
        chunk.copy_from_slice(&word.to_be_bytes());
    }
    out
}
