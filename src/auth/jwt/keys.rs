//! Verification key sets: from a JWKS document or an HS256 secret, each key bound to the one
//! algorithm it accepts, and signature verification with that algorithm only.

use std::fmt;

use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, KeyAlgorithm};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::{Map, Value};

use crate::auth::refusal::Refusal;

/// The verified claims of a token.
pub type Claims = Map<String, Value>;

/// One verification key with the one algorithm it accepts.
struct VerifyKey {
    kid: Option<String>,
    alg: Algorithm,
    key: DecodingKey,
}

/// A set of verification keys. Compared by a digest of what it was built from, so that an
/// unchanged file keeps its route on reload and a changed one replaces it.
pub struct KeySet {
    keys: Vec<VerifyKey>,
    fingerprint: [u8; 32],
}

impl PartialEq for KeySet {
    fn eq(&self, other: &Self) -> bool {
        self.fingerprint == other.fingerprint
    }
}

impl fmt::Debug for KeySet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(self.keys.iter().map(|k| (k.kid.as_deref(), k.alg)))
            .finish()
    }
}

/// Why a JWKS document could not be used.
#[derive(Debug, thiserror::Error)]
pub enum JwksError {
    /// Not JSON, or no `keys` array.
    #[error("not a JWKS document (a JSON object with a \"keys\" array): {0}")]
    NotJwks(String),
    /// A `keys` array without one key meshgate can verify with.
    #[error("the JWKS holds no usable signing key{}", skipped_note(.0))]
    NoUsableKey(Vec<String>),
}

fn skipped_note(skipped: &[String]) -> String {
    if skipped.is_empty() {
        String::new()
    } else {
        format!(" (skipped: {})", skipped.join("; "))
    }
}

impl KeySet {
    /// An HS256 key set from a shared secret.
    pub fn from_secret(secret: &[u8]) -> Self {
        Self {
            keys: vec![VerifyKey {
                kid: None,
                alg: Algorithm::HS256,
                key: DecodingKey::from_secret(secret),
            }],
            fingerprint: digest(&[b"hs256:", secret].concat()),
        }
    }

    /// A key set from a JWKS document. Keys meshgate cannot use (encryption keys, unknown
    /// types) are skipped and named in the second value; none usable is an error.
    pub fn from_jwks(doc: &[u8]) -> Result<(Self, Vec<String>), JwksError> {
        #[derive(serde::Deserialize)]
        struct Doc {
            keys: Vec<Value>,
        }
        let parsed: Doc =
            serde_json::from_slice(doc).map_err(|e| JwksError::NotJwks(e.to_string()))?;
        let mut keys = Vec::new();
        let mut skipped = Vec::new();
        for (i, raw) in parsed.keys.into_iter().enumerate() {
            match key_from_jwk(raw) {
                Ok(k) => keys.push(k),
                Err(why) => skipped.push(format!("keys[{i}]: {why}")),
            }
        }
        if keys.is_empty() {
            return Err(JwksError::NoUsableKey(skipped));
        }
        Ok((
            Self {
                keys,
                fingerprint: digest(doc),
            },
            skipped,
        ))
    }

    /// Number of usable keys.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// True when the set holds no key.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Whether a key with this id is in the set.
    pub fn has_kid(&self, kid: &str) -> bool {
        self.keys.iter().any(|k| k.kid.as_deref() == Some(kid))
    }

    /// Verifies `token`'s signature with the key its header names (or, without `kid`, the
    /// first key of the token's algorithm) and returns its claims. Claims are not checked here.
    pub fn verify(&self, token: &str, header: &jsonwebtoken::Header) -> Result<Claims, Refusal> {
        let key = match &header.kid {
            Some(kid) => {
                let key = self
                    .keys
                    .iter()
                    .find(|k| k.kid.as_deref() == Some(kid.as_str()))
                    .ok_or(Refusal::UnknownKey)?;
                // The key decides the algorithm; a token that claims another one (HS256 signed
                // with an RSA public key, say) is refused before any verification.
                if key.alg != header.alg {
                    return Err(Refusal::Algorithm);
                }
                key
            }
            None => self
                .keys
                .iter()
                .find(|k| k.alg == header.alg)
                .ok_or(Refusal::Algorithm)?,
        };
        let mut v = Validation::new(key.alg);
        // Claims are checked by `check_claims` with strict types; jsonwebtoken 9 treats a claim
        // of the wrong type as absent (CVE-2026-25537), so its own checks are all off.
        v.required_spec_claims.clear();
        v.validate_exp = false;
        v.validate_nbf = false;
        v.validate_aud = false;
        v.leeway = 0;
        match jsonwebtoken::decode::<Claims>(token, &key.key, &v) {
            Ok(data) => Ok(data.claims),
            Err(e) => Err(match e.kind() {
                jsonwebtoken::errors::ErrorKind::InvalidAlgorithm
                | jsonwebtoken::errors::ErrorKind::MissingAlgorithm => Refusal::Algorithm,
                jsonwebtoken::errors::ErrorKind::InvalidSignature
                | jsonwebtoken::errors::ErrorKind::InvalidEcdsaKey
                | jsonwebtoken::errors::ErrorKind::InvalidRsaKey(_)
                | jsonwebtoken::errors::ErrorKind::InvalidKeyFormat
                | jsonwebtoken::errors::ErrorKind::Crypto(_) => Refusal::Signature,
                _ => Refusal::Malformed,
            }),
        }
    }
}

/// One JWK into a verification key with its algorithm: the JWK's `alg` when present (it must
/// fit the key type), else the one algorithm its type implies (RSA: RS256; EC: by curve;
/// oct: HS256; OKP Ed25519: EdDSA).
fn key_from_jwk(raw: Value) -> Result<VerifyKey, String> {
    let kid = raw.get("kid").and_then(Value::as_str).map(str::to_owned);
    if let Some(u) = raw.get("use").and_then(Value::as_str) {
        if u != "sig" {
            return Err(format!("\"use\": {u:?} is not a signing key"));
        }
    }
    let jwk: Jwk = serde_json::from_value(raw).map_err(|e| format!("not a usable JWK: {e}"))?;
    let implied = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => Algorithm::RS256,
        AlgorithmParameters::EllipticCurve(p) => match p.curve {
            EllipticCurve::P256 => Algorithm::ES256,
            EllipticCurve::P384 => Algorithm::ES384,
            ref c => return Err(format!("curve {c:?} is not supported")),
        },
        AlgorithmParameters::OctetKey(_) => Algorithm::HS256,
        AlgorithmParameters::OctetKeyPair(p) => match p.curve {
            EllipticCurve::Ed25519 => Algorithm::EdDSA,
            ref c => return Err(format!("curve {c:?} is not supported")),
        },
    };
    let alg = match jwk.common.key_algorithm {
        None => implied,
        Some(a) => {
            let alg =
                signing_alg(a).ok_or_else(|| format!("\"alg\": {a} is not a signing algorithm"))?;
            let fits = match &jwk.algorithm {
                AlgorithmParameters::RSA(_) => matches!(
                    alg,
                    Algorithm::RS256
                        | Algorithm::RS384
                        | Algorithm::RS512
                        | Algorithm::PS256
                        | Algorithm::PS384
                        | Algorithm::PS512
                ),
                AlgorithmParameters::EllipticCurve(_) | AlgorithmParameters::OctetKeyPair(_) => {
                    alg == implied
                }
                AlgorithmParameters::OctetKey(_) => {
                    matches!(alg, Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512)
                }
            };
            if !fits {
                return Err(format!("\"alg\": {a} does not fit the key type"));
            }
            alg
        }
    };
    let key = DecodingKey::from_jwk(&jwk).map_err(|e| format!("bad key material: {e}"))?;
    Ok(VerifyKey { kid, alg, key })
}

fn signing_alg(a: KeyAlgorithm) -> Option<Algorithm> {
    Some(match a {
        KeyAlgorithm::HS256 => Algorithm::HS256,
        KeyAlgorithm::HS384 => Algorithm::HS384,
        KeyAlgorithm::HS512 => Algorithm::HS512,
        KeyAlgorithm::ES256 => Algorithm::ES256,
        KeyAlgorithm::ES384 => Algorithm::ES384,
        KeyAlgorithm::RS256 => Algorithm::RS256,
        KeyAlgorithm::RS384 => Algorithm::RS384,
        KeyAlgorithm::RS512 => Algorithm::RS512,
        KeyAlgorithm::PS256 => Algorithm::PS256,
        KeyAlgorithm::PS384 => Algorithm::PS384,
        KeyAlgorithm::PS512 => Algorithm::PS512,
        KeyAlgorithm::EdDSA => Algorithm::EdDSA,
        KeyAlgorithm::RSA1_5 | KeyAlgorithm::RSA_OAEP | KeyAlgorithm::RSA_OAEP_256 => return None,
    })
}

fn digest(bytes: &[u8]) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, bytes);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}
