use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use http::header::AUTHORIZATION;
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::{json, Value};

use super::*;

const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";
const NOW: f64 = 1_800_000_000.0;

fn settings(keys: KeySet) -> JwtSettings {
    JwtSettings {
        issuer: Some("https://issuer.example".into()),
        audiences: vec!["api".into()],
        keys: KeySource::Static(Arc::new(keys)),
        leeway: Duration::from_secs(30),
        required_claims: BTreeMap::new(),
        forward_claims: Vec::new(),
        token: TokenSource {
            header: AUTHORIZATION,
            cookie: None,
        },
    }
}

fn hs(claims: &Value) -> String {
    encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(SECRET),
    )
    .unwrap()
}

fn good() -> Value {
    json!({"iss": "https://issuer.example", "aud": "api", "sub": "alice", "exp": NOW + 60.0})
}

fn check(s: &JwtSettings, claims: &Value) -> Result<(), Refusal> {
    let token = hs(claims);
    let KeySource::Static(keys) = &s.keys else {
        unreachable!()
    };
    let claims = keys.verify(&token, &header(&token)?)?;
    s.check_claims(&claims, NOW)
}

fn with(mut base: Value, key: &str, v: Value) -> Value {
    base[key] = v;
    base
}

fn without(mut base: Value, key: &str) -> Value {
    base.as_object_mut().unwrap().remove(key);
    base
}

#[test]
fn claims_are_checked_with_strict_types() {
    let s = settings(KeySet::from_secret(SECRET));
    assert_eq!(check(&s, &good()), Ok(()));
    // exp: required, a number, with the leeway.
    assert_eq!(check(&s, &without(good(), "exp")), Err(Refusal::Expired));
    assert_eq!(
        check(&s, &with(good(), "exp", json!("never"))),
        Err(Refusal::Expired)
    );
    assert_eq!(check(&s, &with(good(), "exp", json!(NOW - 20.0))), Ok(()));
    assert_eq!(
        check(&s, &with(good(), "exp", json!(NOW - 40.0))),
        Err(Refusal::Expired)
    );
    // nbf: optional, but a number when present (CVE-2026-25537's bypass is a string nbf).
    assert_eq!(check(&s, &with(good(), "nbf", json!(NOW + 20.0))), Ok(()));
    assert_eq!(
        check(&s, &with(good(), "nbf", json!(NOW + 40.0))),
        Err(Refusal::NotYetValid)
    );
    assert_eq!(
        check(&s, &with(good(), "nbf", json!("later"))),
        Err(Refusal::NotYetValid)
    );
    // iss and aud.
    assert_eq!(
        check(&s, &with(good(), "iss", json!("https://evil.example"))),
        Err(Refusal::Issuer)
    );
    assert_eq!(check(&s, &without(good(), "aud")), Err(Refusal::Audience));
    assert_eq!(
        check(&s, &with(good(), "aud", json!(["other", "api"]))),
        Ok(())
    );
    assert_eq!(
        check(&s, &with(good(), "aud", json!(["other"]))),
        Err(Refusal::Audience)
    );
}

#[test]
fn required_claims_refuse_with_403_reason() {
    let mut s = settings(KeySet::from_secret(SECRET));
    s.required_claims
        .insert("groups".into(), vec![json!("admin"), json!("ops")]);
    s.required_claims
        .insert("email_verified".into(), vec![json!(true)]);
    let ok = with(
        with(good(), "groups", json!(["dev", "ops"])),
        "email_verified",
        json!(true),
    );
    assert_eq!(check(&s, &ok), Ok(()));
    assert_eq!(
        check(&s, &with(ok.clone(), "groups", json!(["dev"]))),
        Err(Refusal::Claims)
    );
    assert_eq!(
        check(&s, &without(ok.clone(), "email_verified")),
        Err(Refusal::Claims)
    );
    assert_eq!(Refusal::Claims.status(), http::StatusCode::FORBIDDEN);
}

#[test]
fn wrong_secret_and_tampering_fail_the_signature() {
    let keys = KeySet::from_secret(b"another-secret-another-secret-xx");
    let token = hs(&good());
    assert_eq!(
        keys.verify(&token, &header(&token).unwrap()),
        Err(Refusal::Signature)
    );
    let mut parts: Vec<String> = token.split('.').map(str::to_owned).collect();
    parts[1] = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(with(good(), "sub", json!("mallory")).to_string());
    let forged = parts.join(".");
    let keys = KeySet::from_secret(SECRET);
    assert_eq!(
        keys.verify(&forged, &header(&forged).unwrap()),
        Err(Refusal::Signature)
    );
}

#[test]
fn malformed_tokens_never_panic() {
    let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
    let cases = [
        String::new(),
        "abc".into(),
        "a.b".into(),
        "a.b.c.d".into(),
        "!!!.@@@.###".into(),
        format!("{}.{}.", b64("{\"alg\":\"none\"}"), b64("{}")),
        format!("{}.{}.sig", b64("not json"), b64("{}")),
        format!("{}.{}.sig", b64("{\"alg\":\"HS999\"}"), b64("{}")),
        format!("{}.{}.sig", b64("[]"), b64("{}")),
    ];
    for t in &cases {
        assert_eq!(header(t).map(|_| ()), Err(Refusal::Malformed), "{t:?}");
    }
    // A valid header over a payload that is not JSON: malformed, not a panic.
    let keys = KeySet::from_secret(SECRET);
    let t = format!("{}.{}.c2ln", b64("{\"alg\":\"HS256\"}"), b64("{not json"));
    let h = header(&t).unwrap();
    assert!(keys.verify(&t, &h).is_err());
    assert_eq!(
        header(&"a".repeat(crate::auth::MAX_CREDENTIAL + 1)).map(|_| ()),
        Err(Refusal::TooLarge)
    );
}

fn rsa_jwk(extra: Value) -> Value {
    let mut jwk: Value = serde_json::from_str(include_str!(
        "../../../tests/fixtures/auth/rsa_public.jwk.json"
    ))
    .unwrap();
    for (k, v) in extra.as_object().unwrap() {
        jwk[k] = v.clone();
    }
    jwk
}

#[test]
fn the_algorithm_comes_from_the_key() {
    let doc = json!({"keys": [rsa_jwk(json!({"kid": "r1"}))]}).to_string();
    let (keys, skipped) = KeySet::from_jwks(doc.as_bytes()).unwrap();
    assert!(skipped.is_empty());
    let rsa_private = include_bytes!("../../../tests/fixtures/auth/rsa_private.der");
    let mut h = Header::new(Algorithm::RS256);
    h.kid = Some("r1".into());
    let token = encode(&h, &good(), &EncodingKey::from_rsa_der(rsa_private)).unwrap();
    assert!(keys.verify(&token, &header(&token).unwrap()).is_ok());

    // RS/HS confusion: HS256 keyed with the RSA public key, naming the RSA key's kid or none.
    let public = include_bytes!("../../../tests/fixtures/auth/rsa_public.der");
    let jwk_text = rsa_jwk(json!({"kid": "r1"})).to_string();
    for secret in [&public[..], jwk_text.as_bytes()] {
        for kid in [Some("r1"), None] {
            let mut h = Header::new(Algorithm::HS256);
            h.kid = kid.map(str::to_owned);
            let t = encode(&h, &good(), &EncodingKey::from_secret(secret)).unwrap();
            assert_eq!(
                keys.verify(&t, &header(&t).unwrap()),
                Err(Refusal::Algorithm)
            );
        }
    }
    // Another RSA algorithm than the key's own.
    let mut h = Header::new(Algorithm::RS512);
    h.kid = Some("r1".into());
    let t = encode(&h, &good(), &EncodingKey::from_rsa_der(rsa_private)).unwrap();
    assert_eq!(
        keys.verify(&t, &header(&t).unwrap()),
        Err(Refusal::Algorithm)
    );
    // An unknown kid.
    let mut h = Header::new(Algorithm::RS256);
    h.kid = Some("r2".into());
    let t = encode(&h, &good(), &EncodingKey::from_rsa_der(rsa_private)).unwrap();
    assert_eq!(
        keys.verify(&t, &header(&t).unwrap()),
        Err(Refusal::UnknownKey)
    );
}

#[test]
fn jwks_documents_are_checked_key_by_key() {
    assert!(matches!(
        KeySet::from_jwks(b"<html>login</html>"),
        Err(JwksError::NotJwks(_))
    ));
    assert!(matches!(
        KeySet::from_jwks(b"{\"keys\": {}}"),
        Err(JwksError::NotJwks(_))
    ));
    assert!(matches!(
        KeySet::from_jwks(b"{\"keys\": []}"),
        Err(JwksError::NoUsableKey(_))
    ));
    let doc = json!({"keys": [
        rsa_jwk(json!({"kid": "enc", "use": "enc"})),
        rsa_jwk(json!({"kid": "bad-alg", "alg": "HS256"})),
        {"kty": "RSA", "kid": "garbage", "n": 5},
        {"kty": "oct", "kid": "h", "k": "c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0LXNlY3JldA"},
        rsa_jwk(json!({"kid": "ps", "alg": "PS256"})),
    ]})
    .to_string();
    let (keys, skipped) = KeySet::from_jwks(doc.as_bytes()).unwrap();
    assert_eq!(keys.len(), 2, "{skipped:?}");
    assert_eq!(skipped.len(), 3, "{skipped:?}");
    assert!(keys.has_kid("h") && keys.has_kid("ps"));
}
