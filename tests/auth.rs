//! Route authentication end to end: the real gateway in front of a counting upstream, with a
//! JWKS server and a forward-auth server on loopback. Every refusal asserts that the upstream
//! received nothing; every pass asserts what it received.

mod support;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response};
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use meshgate::config::{Config, Env};
use meshgate::telemetry::{AccessFormat, AccessLog, RequestTelemetry};
use meshgate::Gateway;
use serde_json::{json, Value};
use support::gateway::{client, eventually, start_gateway, TestGateway};
use support::upstream::TestUpstream;
use support::util::dead_port;

const SECRET: &str = "an-hs256-secret-of-at-least-32-bytes!";
const SERVER: &str = "[server]\ndrain_delay = \"0s\"\n";
const RSA_PRIVATE: &[u8] = include_bytes!("fixtures/auth/rsa_private.der");
const RSA_PUBLIC: &[u8] = include_bytes!("fixtures/auth/rsa_public.der");
const RSA_JWK: &str = include_str!("fixtures/auth/rsa_public.jwk.json");

// === helpers ===

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Claims that pass the routes below: issuer, audience, an hour left.
fn claims(sub: &str) -> Value {
    json!({"iss": "https://id.example", "aud": "orders", "sub": sub, "exp": now() + 3600, "role": "admin"})
}

fn hs256(claims: &Value) -> String {
    encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

fn signed(alg: Algorithm, kid: Option<&str>, key: &EncodingKey, claims: &Value) -> String {
    let mut h = Header::new(alg);
    h.kid = kid.map(str::to_owned);
    encode(&h, claims, key).unwrap()
}

fn b64(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// A fresh P-256 key: the signing key and its public JWK.
fn ec_key(kid: &str) -> (EncodingKey, Value) {
    let kp = rcgen::KeyPair::generate().unwrap();
    let point = kp.public_key_raw();
    assert_eq!(point.len(), 65, "uncompressed P-256 point");
    let jwk = json!({"kty": "EC", "crv": "P-256", "kid": kid, "use": "sig",
        "x": b64(&point[1..33]), "y": b64(&point[33..])});
    (EncodingKey::from_ec_der(&kp.serialize_der()), jwk)
}

fn rsa_jwk(kid: &str) -> Value {
    let mut jwk: Value = serde_json::from_str(RSA_JWK).unwrap();
    jwk["kid"] = json!(kid);
    jwk["alg"] = json!("RS256");
    jwk
}

/// A hyper server on 127.0.0.1:0 answering with `handler`.
async fn serve<F, Fut>(handler: F) -> SocketAddr
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    serve_counted(handler).await.0
}

/// Like [`serve`], also counting the connections accepted.
async fn serve_counted<F, Fut>(handler: F) -> (SocketAddr, Arc<AtomicUsize>)
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            count.fetch_add(1, Ordering::Relaxed);
            let handler = handler.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| {
                    let fut = handler(req);
                    async move { Ok::<_, Infallible>(fut.await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    (addr, accepted)
}

/// A JWKS server whose document can be swapped; counts fetches.
#[derive(Clone)]
struct Jwks {
    doc: Arc<Mutex<String>>,
    fetches: Arc<AtomicUsize>,
}

impl Jwks {
    async fn start(doc: String) -> (Self, SocketAddr) {
        let me = Self {
            doc: Arc::new(Mutex::new(doc)),
            fetches: Arc::default(),
        };
        let s = me.clone();
        let addr = serve(move |_req| {
            let s = s.clone();
            async move {
                s.fetches.fetch_add(1, Ordering::SeqCst);
                let body = s.doc.lock().unwrap().clone();
                Response::new(Full::new(Bytes::from(body)))
            }
        })
        .await;
        (me, addr)
    }

    fn set(&self, doc: String) {
        *self.doc.lock().unwrap() = doc;
    }

    fn fetches(&self) -> usize {
        self.fetches.load(Ordering::SeqCst)
    }
}

async fn gateway(toml: &str, env: &Env) -> TestGateway {
    let config = Config::from_toml(&format!("{toml}\n{SERVER}"), env)
        .unwrap_or_else(|e| panic!("invalid test config:\n{e}"));
    start_gateway(Gateway::build(config).unwrap()).await
}

/// A `Write` into shared memory, for the access log.
#[derive(Clone, Default)]
struct SharedBuf(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for SharedBuf {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn secret_env() -> Env {
    Env::from_pairs([("JWT_SECRET", SECRET)])
}

fn jwt_route(up: &TestUpstream, extra: &str) -> String {
    format!(
        r#"
        [[routes]]
        name = "orders"
        path = "/orders"
        targets = ["{}"]
        auth = {{ jwt = {{ issuer = "https://id.example", audiences = ["orders"], hs256_secret_env = "JWT_SECRET", forward_claims = {{ sub = "X-User-Id", role = "X-Role" }}{extra} }} }}
        "#,
        up.url()
    )
}

async fn send(
    c: &reqwest::Client,
    url: String,
    headers: &[(&str, &str)],
) -> (u16, reqwest::header::HeaderMap, String) {
    let mut req = c.get(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let h = resp.headers().clone();
    (status, h, resp.text().await.unwrap())
}

fn challenge(h: &reqwest::header::HeaderMap) -> &str {
    h.get("www-authenticate")
        .map(|v| v.to_str().unwrap())
        .unwrap_or("")
}

async fn metric(c: &reqwest::Client, gw: &TestGateway, line_start: &str) -> Option<f64> {
    let text = c
        .get(gw.admin_url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find(|l| l.starts_with(line_start))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

// === JWT ===

#[tokio::test]
async fn a_valid_jwt_passes_with_claim_headers_and_spoofed_copies_removed() {
    let up = TestUpstream::builder().start().await;
    let gw = gateway(&jwt_route(&up, ""), &secret_env()).await;
    let c = client();

    let token = hs256(&claims("alice"));
    let bearer = format!("Bearer {token}");
    let (code, _, _) = send(
        &c,
        gw.url("/orders/1"),
        &[
            ("authorization", &bearer),
            ("x-user-id", "admin"),
            ("X-User-Id", "root"),
        ],
    )
    .await;
    assert_eq!(code, 200);
    let seen = up.last_request().unwrap();
    let ids: Vec<_> = seen.headers.get_all("x-user-id").iter().collect();
    assert_eq!(
        ids,
        ["alice"],
        "only the verified claim reaches the upstream"
    );
    assert_eq!(seen.headers["x-role"], "admin");

    // A token without the claim: the spoofed header is still removed, nothing replaces it.
    let mut no_role = claims("bob");
    no_role.as_object_mut().unwrap().remove("role");
    let bearer = format!("Bearer {}", hs256(&no_role));
    let (code, _, _) = send(
        &c,
        gw.url("/orders/2"),
        &[("authorization", &bearer), ("x-role", "admin")],
    )
    .await;
    assert_eq!(code, 200);
    let seen = up.last_request().unwrap();
    assert_eq!(seen.headers["x-user-id"], "bob");
    assert!(seen.headers.get("x-role").is_none(), "{:?}", seen.headers);
    assert_eq!(up.hits(), 2);
}

#[tokio::test]
async fn refusals_are_401_or_403_with_challenges_and_nothing_reaches_the_upstream() {
    let up = TestUpstream::builder().start().await;
    let gw = gateway(
        &jwt_route(
            &up,
            ", leeway = \"5s\", required_claims = { role = [\"admin\", \"ops\"] }",
        ),
        &secret_env(),
    )
    .await;
    let c = client();
    let url = || gw.url("/orders");

    // No credentials: 401, a bare challenge (RFC 6750 §3.1), a JSON body.
    let (code, h, body) = send(&c, url(), &[]).await;
    assert_eq!(code, 401);
    assert_eq!(challenge(&h), "Bearer realm=\"meshgate\"");
    let body: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["error"], "Unauthorized");
    assert_eq!(body["message"], "credentials are required");

    let with = |f: &dyn Fn(&mut Value)| {
        let mut c = claims("alice");
        f(&mut c);
        format!("Bearer {}", hs256(&c))
    };
    let cases: Vec<(&str, String, u16, &str)> = vec![
        (
            "expired",
            with(&|c| c["exp"] = json!(now() - 60)),
            401,
            "invalid_token",
        ),
        (
            "exp as a string",
            with(&|c| c["exp"] = json!("never")),
            401,
            "invalid_token",
        ),
        (
            "not yet valid",
            with(&|c| c["nbf"] = json!(now() + 60)),
            401,
            "invalid_token",
        ),
        (
            "other issuer",
            with(&|c| c["iss"] = json!("https://evil.example")),
            401,
            "invalid_token",
        ),
        (
            "no audience",
            with(&|c| {
                c.as_object_mut().unwrap().remove("aud");
            }),
            401,
            "invalid_token",
        ),
        (
            "other audience",
            with(&|c| c["aud"] = json!(["billing"])),
            401,
            "invalid_token",
        ),
        (
            "role refused",
            with(&|c| c["role"] = json!("guest")),
            403,
            "insufficient_scope",
        ),
        (
            "wrong secret",
            format!(
                "Bearer {}",
                encode(
                    &Header::new(Algorithm::HS256),
                    &claims("alice"),
                    &EncodingKey::from_secret(b"some-other-secret-of-32-bytes-or-more")
                )
                .unwrap()
            ),
            401,
            "invalid_token",
        ),
        (
            "bad base64",
            "Bearer !!!!.@@@@.####".into(),
            401,
            "invalid_token",
        ),
        (
            "header not JSON",
            format!("Bearer {}.{}.c2ln", b64(b"{nope"), b64(b"{}")),
            401,
            "invalid_token",
        ),
        (
            "payload not JSON",
            format!("Bearer {}.{}.c2ln", b64(br#"{"alg":"HS256"}"#), b64(b"[1,")),
            401,
            "invalid_token",
        ),
        (
            "basic scheme",
            "Basic YWxpY2U6cHc=".into(),
            400,
            "invalid_request",
        ),
        (
            "oversized",
            format!("Bearer {}", "a".repeat(9000)),
            401,
            "invalid_token",
        ),
    ];
    for (what, auth, status, error) in &cases {
        let (code, h, body) = send(&c, url(), &[("authorization", auth)]).await;
        assert_eq!(code, *status, "{what}: {body}");
        assert!(
            challenge(&h).contains(&format!("error=\"{error}\"")),
            "{what}: {:?}",
            challenge(&h)
        );
        let body: Value = serde_json::from_str(&body).unwrap();
        assert!(body["message"].is_string(), "{what}");
    }
    assert_eq!(up.hits(), 0, "no refused request reached the upstream");

    // Within the leeway is still valid.
    let ok = with(&|c| c["exp"] = json!(now() - 2));
    assert_eq!(send(&c, url(), &[("authorization", &ok)]).await.0, 200);
    assert_eq!(up.hits(), 1);

    // Failures are counted per route and reason.
    let m = |reason: &str| {
        format!("meshgate_auth_refused_total{{route=\"orders\",reason=\"{reason}\"}}")
    };
    assert_eq!(metric(&c, &gw, &m("expired")).await, Some(2.0));
    assert_eq!(metric(&c, &gw, &m("too_large")).await, Some(1.0));
    assert_eq!(metric(&c, &gw, &m("claims")).await, Some(1.0));
    assert_eq!(metric(&c, &gw, &m("missing")).await, Some(1.0));
    assert_eq!(
        metric(&c, &gw, "meshgate_auth_allowed_total{route=\"orders\"}").await,
        Some(1.0)
    );
}

#[tokio::test]
async fn the_token_may_come_from_a_named_header_or_a_cookie() {
    let up = TestUpstream::builder().start().await;
    let gw = gateway(
        &jwt_route(&up, ", header = \"X-Token\", cookie = \"session\""),
        &secret_env(),
    )
    .await;
    let c = client();
    let token = hs256(&claims("carol"));
    let cookie = format!("theme=dark; session={token}");
    assert_eq!(
        send(&c, gw.url("/orders"), &[("x-token", &token)]).await.0,
        200
    );
    assert_eq!(
        send(&c, gw.url("/orders"), &[("cookie", &cookie)]).await.0,
        200
    );
    // Authorization is not read when another header is configured.
    let bearer = format!("Bearer {token}");
    assert_eq!(
        send(&c, gw.url("/orders"), &[("authorization", &bearer)])
            .await
            .0,
        401
    );
    assert_eq!(up.hits(), 2);
    assert_eq!(up.last_request().unwrap().headers["x-user-id"], "carol");
}

#[tokio::test]
async fn alg_none_and_rs_hs_confusion_are_refused() {
    let up = TestUpstream::builder().start().await;
    let dir = tempfile::tempdir().unwrap();
    let jwks = dir.path().join("jwks.json");
    std::fs::write(&jwks, json!({"keys": [rsa_jwk("rsa-1")]}).to_string()).unwrap();
    let gw = gateway(
        &format!(
            r#"
            [[routes]]
            name = "orders"
            path = "/orders"
            targets = ["{}"]
            auth = {{ jwt = {{ jwks_file = {:?}, audiences = ["orders"] }} }}
            "#,
            up.url(),
            jwks.display().to_string()
        ),
        &Env::default(),
    )
    .await;
    let c = client();
    let rsa = EncodingKey::from_rsa_der(RSA_PRIVATE);
    let good = signed(Algorithm::RS256, Some("rsa-1"), &rsa, &claims("alice"));
    assert_eq!(
        send(
            &c,
            gw.url("/orders"),
            &[("authorization", &format!("Bearer {good}"))]
        )
        .await
        .0,
        200
    );

    // alg "none": an unsigned token with the real claims.
    let none = format!(
        "{}.{}.",
        b64(br#"{"alg":"none","typ":"JWT","kid":"rsa-1"}"#),
        b64(claims("mallory").to_string().as_bytes())
    );
    // HS256 keyed with the RSA public key (DER, and the JWK text), with and without the kid.
    let mut attacks = vec![none];
    for secret in [
        RSA_PUBLIC.to_vec(),
        rsa_jwk("rsa-1").to_string().into_bytes(),
    ] {
        for kid in [Some("rsa-1"), None] {
            attacks.push(signed(
                Algorithm::HS256,
                kid,
                &EncodingKey::from_secret(&secret),
                &claims("mallory"),
            ));
        }
    }
    for t in &attacks {
        let (code, h, _) = send(
            &c,
            gw.url("/orders"),
            &[("authorization", &format!("Bearer {t}"))],
        )
        .await;
        assert_eq!(code, 401, "{t}");
        assert!(challenge(&h).contains("invalid_token"));
    }
    assert_eq!(up.hits(), 1, "no forged token reached the upstream");
}

#[tokio::test]
async fn jwks_url_keys_are_fetched_refetched_on_an_unknown_kid_at_most_once_per_gap() {
    let up = TestUpstream::builder().start().await;
    let (k1, jwk1) = ec_key("k1");
    let (k2, jwk2) = ec_key("k2");
    let (server, jwks_addr) = Jwks::start(json!({"keys": [jwk1.clone()]}).to_string()).await;
    let gw = gateway(
        &format!(
            r#"
            [[routes]]
            name = "orders"
            path = "/orders"
            targets = ["{}"]
            auth = {{ jwt = {{ jwks_url = "http://{jwks_addr}/jwks.json", jwks_min_refresh = "2s", audiences = ["orders"] }} }}
            "#,
            up.url()
        ),
        &Env::default(),
    )
    .await;
    let c = client();
    let bearer = |key: &EncodingKey, kid: &str| {
        format!(
            "Bearer {}",
            signed(Algorithm::ES256, Some(kid), key, &claims("alice"))
        )
    };
    let t1 = bearer(&k1, "k1");
    let t2 = bearer(&k2, "k2");

    // The first request waits for the first fetch.
    assert_eq!(
        send(&c, gw.url("/orders"), &[("authorization", &t1)])
            .await
            .0,
        200
    );
    assert_eq!(server.fetches(), 1);

    // The key rotates; an unknown kid right away is refused without another fetch.
    server.set(json!({"keys": [jwk1.clone(), jwk2.clone()]}).to_string());
    let (code, h, _) = send(&c, gw.url("/orders"), &[("authorization", &t2)]).await;
    assert_eq!(code, 401);
    assert!(challenge(&h).contains("invalid_token"));
    assert_eq!(server.fetches(), 1, "refetches wait for jwks_min_refresh");

    // Once the gap has passed, the unknown kid triggers one refetch and passes.
    let passed = eventually(Duration::from_secs(5), || async {
        send(&c, gw.url("/orders"), &[("authorization", &t2)])
            .await
            .0
            == 200
    })
    .await;
    assert!(passed, "the rotated key was fetched");
    assert_eq!(server.fetches(), 2);

    // A JWKS server answering garbage: the last good key set stays in use.
    server.set("<html>maintenance</html>".into());
    let (k3, _) = ec_key("k3");
    let t3 = bearer(&k3, "k3");
    let refetched = eventually(Duration::from_secs(10), || async {
        assert_eq!(
            send(&c, gw.url("/orders"), &[("authorization", &t3)])
                .await
                .0,
            401
        );
        server.fetches() >= 3
    })
    .await;
    assert!(refetched);
    assert_eq!(
        send(&c, gw.url("/orders"), &[("authorization", &t1)])
            .await
            .0,
        200
    );
    assert_eq!(
        send(&c, gw.url("/orders"), &[("authorization", &t2)])
            .await
            .0,
        200
    );
    assert!(
        server.fetches() <= 4,
        "fetches stay bounded: {}",
        server.fetches()
    );
    assert_eq!(up.hits(), 4);
}

#[tokio::test]
async fn jwks_url_keys_are_refreshed_in_the_background_once_old() {
    let up = TestUpstream::builder().start().await;
    let (k1, jwk1) = ec_key("k1");
    let (server, jwks_addr) = Jwks::start(json!({"keys": [jwk1]}).to_string()).await;
    let gw = gateway(
        &format!(
            r#"
            [[routes]]
            name = "orders"
            path = "/orders"
            targets = ["{}"]
            auth = {{ jwt = {{ jwks_url = "http://{jwks_addr}/jwks.json", jwks_refresh = "1s", jwks_min_refresh = "100ms" }} }}
            "#,
            up.url()
        ),
        &Env::default(),
    )
    .await;
    let c = client();
    let t1 = format!(
        "Bearer {}",
        signed(Algorithm::ES256, Some("k1"), &k1, &claims("alice"))
    );
    assert_eq!(
        send(&c, gw.url("/orders"), &[("authorization", &t1)])
            .await
            .0,
        200
    );
    assert_eq!(server.fetches(), 1);
    // Every request is served from the cached set while it is refreshed behind them.
    let refreshed = eventually(Duration::from_secs(10), || async {
        assert_eq!(
            send(&c, gw.url("/orders"), &[("authorization", &t1)])
                .await
                .0,
            200
        );
        server.fetches() >= 2
    })
    .await;
    assert!(refreshed, "the key set was refetched after jwks_refresh");
    let status: Value = c
        .get(gw.admin_url("/status"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(status["routes"][0]["auth"]["jwks"]["keys"], 1, "{status}");
}

#[tokio::test]
async fn an_unreachable_jwks_is_a_503_and_nothing_is_forwarded() {
    let up = TestUpstream::builder().start().await;
    let dead = dead_port().await;
    let gw = gateway(
        &format!(
            r#"
            [[routes]]
            name = "orders"
            path = "/orders"
            targets = ["{}"]
            auth = {{ jwt = {{ jwks_url = "http://127.0.0.1:{dead}/jwks" }} }}
            "#,
            up.url()
        ),
        &Env::default(),
    )
    .await;
    let c = client();
    let (k1, _) = ec_key("k1");
    let t = signed(Algorithm::ES256, Some("k1"), &k1, &claims("alice"));
    let (code, h, body) = send(
        &c,
        gw.url("/orders"),
        &[("authorization", &format!("Bearer {t}"))],
    )
    .await;
    assert_eq!(code, 503, "{body}");
    assert_eq!(h["retry-after"], "1");
    assert_eq!(up.hits(), 0);
}

// === API keys ===

use meshgate::auth::api_keys::sha256_hex as sha_hex;

fn keys_route(up: &TestUpstream, file: &Path) -> String {
    format!(
        r#"
        [[routes]]
        name = "partners"
        path = "/partners"
        targets = ["{}"]
        auth = {{ api_keys = {{ keys_file = {:?}, hide_credentials = true }} }}
        "#,
        up.url(),
        file.display().to_string()
    )
}

#[tokio::test]
async fn api_keys_are_found_by_hash_named_and_reread_on_reload() {
    let up = TestUpstream::builder().start().await;
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys.txt");
    std::fs::write(
        &keys,
        format!("# partners\nacme {}\n", sha_hex("acme-key-1")),
    )
    .unwrap();
    let config_path = dir.path().join("gateway.toml");
    std::fs::write(
        &config_path,
        format!("{}\n{SERVER}", keys_route(&up, &keys)),
    )
    .unwrap();
    let config = Config::load(&config_path, &Env::default()).unwrap();
    let buf = SharedBuf::default();
    let access = AccessLog::to_writer(AccessFormat::Json, buf.clone()).unwrap();
    let gw = start_gateway(
        Gateway::build_with_telemetry(config, RequestTelemetry::new(None, Some(access)))
            .unwrap()
            .with_reload(config_path.clone(), Env::default(), false),
    )
    .await;
    let c = client();

    let (code, h, _) = send(&c, gw.url("/partners"), &[]).await;
    assert_eq!(code, 401);
    assert_eq!(
        challenge(&h),
        "ApiKey realm=\"meshgate\", header=\"x-api-key\""
    );
    assert_eq!(
        send(&c, gw.url("/partners"), &[("x-api-key", "acme-key-2")])
            .await
            .0,
        401
    );
    assert_eq!(up.hits(), 0);
    assert_eq!(
        send(&c, gw.url("/partners"), &[("x-api-key", "acme-key-1")])
            .await
            .0,
        200
    );
    let seen = up.last_request().unwrap();
    assert!(seen.headers.get("x-api-key").is_none(), "hide_credentials");

    // The key's name is in the access log; the key itself is not.
    gw.state
        .proxy
        .telemetry
        .access_log()
        .unwrap()
        .flush(Duration::from_secs(5))
        .await;
    let log = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
    let lines: Vec<Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3);
    assert_eq!(lines[2]["identity"], "acme");
    assert!(lines[0].get("identity").is_none());
    assert!(!log.contains("acme-key"), "{log}");

    // Rotation: the file changes, a reload reads it again.
    std::fs::write(&keys, format!("acme {}\n", sha_hex("acme-key-2"))).unwrap();
    let resp = c.post(gw.admin_url("/reload")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        send(&c, gw.url("/partners"), &[("x-api-key", "acme-key-1")])
            .await
            .0,
        401
    );
    assert_eq!(
        send(&c, gw.url("/partners"), &[("x-api-key", "acme-key-2")])
            .await
            .0,
        200
    );
    assert_eq!(up.hits(), 2);
}

// === forward auth ===

async fn auth_server() -> (SocketAddr, Arc<Mutex<Vec<http::HeaderMap>>>) {
    let seen: Arc<Mutex<Vec<http::HeaderMap>>> = Arc::default();
    let s = seen.clone();
    let addr = serve(move |req: Request<Incoming>| {
        let s = s.clone();
        async move {
            s.lock().unwrap().push(req.headers().clone());
            let auth = req
                .headers()
                .get("authorization")
                .map(|v| v.to_str().unwrap().to_owned());
            match auth.as_deref() {
                Some("Bearer good") => Response::builder()
                    .header("x-auth-user", "alice")
                    .header("x-auth-internal", "secret")
                    .body(Full::new(Bytes::new()))
                    .unwrap(),
                Some("Bearer slow") => {
                    tokio::time::sleep(Duration::from_secs(10)).await;
                    Response::new(Full::new(Bytes::new()))
                }
                _ => Response::builder()
                    .status(302)
                    .header("location", "https://login.example/?next=/app")
                    .header("set-cookie", "state=xyz")
                    .body(Full::new(Bytes::from_static(b"please log in")))
                    .unwrap(),
            }
        }
    })
    .await;
    (addr, seen)
}

fn forward_route(up: &TestUpstream, name: &str, url: &str, on_error: &str) -> String {
    format!(
        r#"
        [[routes]]
        name = "{name}"
        path = "/{name}"
        targets = ["{}"]
        auth = {{ forward = {{ url = "{url}", copy_request_headers = ["Authorization"], copy_response_headers = ["X-Auth-User"], timeout = "1s", on_error = "{on_error}" }} }}
        "#,
        up.url()
    )
}

#[tokio::test]
async fn forward_auth_passes_on_2xx_relays_refusals_and_fails_closed() {
    let up = TestUpstream::builder().start().await;
    let (auth, seen) = auth_server().await;
    let dead = dead_port().await;
    let toml = [
        forward_route(&up, "app", &format!("http://{auth}/check"), "unavailable"),
        forward_route(
            &up,
            "strict",
            &format!("http://127.0.0.1:{dead}/check"),
            "deny",
        ),
        forward_route(
            &up,
            "lenient",
            &format!("http://127.0.0.1:{dead}/check"),
            "unavailable",
        ),
    ]
    .concat();
    let gw = gateway(&toml, &Env::default()).await;
    let c = client();

    // 2xx: through, with the chosen answer header only; the client's copy is replaced.
    let (code, _, _) = send(
        &c,
        gw.url("/app/orders?id=7"),
        &[
            ("authorization", "Bearer good"),
            ("x-auth-user", "root"),
            ("cookie", "a=b"),
        ],
    )
    .await;
    assert_eq!(code, 200);
    let got = up.last_request().unwrap();
    let users: Vec<_> = got.headers.get_all("x-auth-user").iter().collect();
    assert_eq!(users, ["alice"]);
    assert!(got.headers.get("x-auth-internal").is_none());
    let asked = seen.lock().unwrap().last().unwrap().clone();
    assert_eq!(asked["x-forwarded-uri"], "/app/orders?id=7");
    assert_eq!(asked["x-forwarded-method"], "GET");
    assert!(
        asked.get("cookie").is_none(),
        "only the listed request headers"
    );

    // Anything else goes back as it came (this client does not follow the redirect).
    let no_redirect = reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let resp = no_redirect
        .get(gw.url("/app"))
        .header("authorization", "Bearer bad")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 302);
    assert_eq!(
        resp.headers()["location"],
        "https://login.example/?next=/app"
    );
    assert_eq!(resp.headers()["set-cookie"], "state=xyz");
    assert_eq!(resp.text().await.unwrap(), "please log in");

    // Too slow: 503. Unreachable: 503, or 401 with on_error = "deny".
    let (code, _, _) = send(&c, gw.url("/app"), &[("authorization", "Bearer slow")]).await;
    assert_eq!(code, 503);
    let (code, _, _) = send(&c, gw.url("/lenient"), &[]).await;
    assert_eq!(code, 503);
    let (code, h, body) = send(&c, gw.url("/strict"), &[]).await;
    assert_eq!(code, 401, "{body}");
    assert!(challenge(&h).starts_with("Bearer"));
    assert_eq!(up.hits(), 1);
    assert_eq!(
        metric(
            &c,
            &gw,
            "meshgate_auth_refused_total{route=\"app\",reason=\"denied\"}"
        )
        .await,
        Some(1.0)
    );
}

// === no token in logs or /explain ===

#[tokio::test]
async fn tokens_never_appear_in_the_access_log_or_explain() {
    let up = TestUpstream::builder().start().await;
    let config =
        Config::from_toml(&format!("{}\n{SERVER}", jwt_route(&up, "")), &secret_env()).unwrap();
    let buf = SharedBuf::default();
    let access = AccessLog::to_writer(AccessFormat::Text, buf.clone()).unwrap();
    let gw = start_gateway(
        Gateway::build_with_telemetry(config, RequestTelemetry::new(None, Some(access))).unwrap(),
    )
    .await;
    let c = client();
    let good = hs256(&claims("alice"));
    let mut expired = claims("alice");
    expired["exp"] = json!(now() - 3600);
    let expired = hs256(&expired);
    for t in [&good, &expired] {
        send(
            &c,
            gw.url("/orders"),
            &[("authorization", &format!("Bearer {t}"))],
        )
        .await;
    }
    gw.state
        .proxy
        .telemetry
        .access_log()
        .unwrap()
        .flush(Duration::from_secs(5))
        .await;
    let log = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
    assert_eq!(log.lines().count(), 2);
    assert!(log.contains("identity=alice"), "{log}");

    let explain = c
        .get(gw.admin_url("/explain?url=/orders/1"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let e: Value = serde_json::from_str(&explain).unwrap();
    assert_eq!(e["auth"]["method"], "jwt", "{explain}");
    assert_eq!(e["auth"]["last_refusal"], "expired", "{explain}");
    let status = c
        .get(gw.admin_url("/status"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for t in [&good, &expired] {
        let signature = t.rsplit('.').next().unwrap();
        for (what, text) in [
            ("access log", &log),
            ("/explain", &explain),
            ("/status", &status),
        ] {
            assert!(!text.contains(signature), "{what} holds a token: {text}");
            assert!(!text.contains(&t[..20]), "{what} holds a token: {text}");
        }
    }
}

// === meshgate check ===

#[test]
fn meshgate_check_reports_bad_auth_values_with_their_key_paths() {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys.txt");
    std::fs::write(&keys, "acme not-a-sha256\n").unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        format!(
            r#"
            [[routes]]
            path = "/a"
            targets = ["http://127.0.0.1:1"]
            auth = {{ jwt = {{ hs256_secret_env = "JWT_SECRET", leeway = "soon" }} }}
            [[routes]]
            path = "/b"
            targets = ["http://127.0.0.1:2"]
            auth = {{ api_keys = {{ keys_file = {:?} }} }}
            [[routes]]
            path = "/c"
            targets = ["http://127.0.0.1:3"]
            auth = {{ forward = {{ url = "auth:8080", on_error = "maybe" }} }}
            "#,
            keys.display().to_string()
        ),
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_meshgate"))
        .args(["check", "--config", path.to_str().unwrap()])
        .env_remove("RUST_LOG")
        .env("JWT_SECRET", "too-short")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    for expected in [
        "routes[0].auth.jwt.leeway: invalid duration \"soon\"",
        "routes[0].auth.jwt.hs256_secret_env: the secret in JWT_SECRET is shorter than 32 bytes",
        "routes[1].auth.api_keys.keys_file: ",
        "line 1: key \"acme\": the second field must be 64 hex digits",
        "routes[2].auth.forward.url: invalid URL \"auth:8080\"",
        "routes[2].auth.forward.on_error: unknown value \"maybe\"",
    ] {
        assert!(err.contains(expected), "missing {expected:?} in:\n{err}");
    }
    assert!(
        !err.contains("too-short"),
        "the secret is never printed:\n{err}"
    );
}

#[tokio::test]
async fn a_named_auth_policy_guards_every_route_that_names_it() {
    let up = TestUpstream::builder().start().await;
    let env = Env::from_pairs([("PARTNER_KEYS", format!("acme {}\n", sha_hex("acme-key-1")))]);
    let toml = format!(
        r#"
        [policies.partners]
        auth = {{ api_keys = {{ header = "X-Api-Key", keys_env = "PARTNER_KEYS" }} }}

        [[routes]]
        path = "/a"
        targets = ["{0}"]
        policies = ["partners"]

        [[routes]]
        path = "/b"
        targets = ["{0}"]
        policies = ["partners"]

        [[routes]]
        path = "/open"
        targets = ["{0}"]
        "#,
        up.url()
    );
    let gw = gateway(&toml, &env).await;
    let c = client();
    for path in ["/a", "/b"] {
        assert_eq!(send(&c, gw.url(path), &[]).await.0, 401, "{path}");
        assert_eq!(
            send(&c, gw.url(path), &[("x-api-key", "wrong")]).await.0,
            401,
            "{path}"
        );
    }
    assert_eq!(up.hits(), 0, "no refused request reached the upstream");
    for path in ["/a", "/b"] {
        assert_eq!(
            send(&c, gw.url(path), &[("x-api-key", "acme-key-1")])
                .await
                .0,
            200,
            "{path}"
        );
    }
    assert_eq!(send(&c, gw.url("/open"), &[]).await.0, 200);
    assert_eq!(up.hits(), 3);

    // Inline and named at once is refused, with both places named.
    let both = format!(
        "{toml}\n",
        toml = toml.replacen(
            "policies = [\"partners\"]",
            "policies = [\"partners\"]\n        auth = { api_keys = { keys_env = \"PARTNER_KEYS\" } }",
            1
        )
    );
    let err = Config::from_toml(&format!("{both}\n{SERVER}"), &env)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("routes[0].auth") && err.contains("set inline and by policy \"partners\""),
        "{err}"
    );
}

#[tokio::test]
async fn rate_limits_key_on_the_api_key_and_jwt_claims_the_auth_stage_found() {
    let up = TestUpstream::builder().start().await;
    let env = Env::from_pairs([
        (
            "PARTNER_KEYS",
            format!(
                "acme {}\nbeta {}\n",
                sha_hex("acme-key-1"),
                sha_hex("beta-key-1")
            ),
        ),
        ("JWT_SECRET", SECRET.to_owned()),
    ]);
    let toml = format!(
        r#"
        [policies.partner-api]
        auth = {{ api_keys = {{ keys_env = "PARTNER_KEYS" }} }}
        rate_limit = {{ rate = "2/m", burst = 2, key = "api_key" }}

        [[routes]]
        path = "/partners"
        targets = ["{0}"]
        policies = ["partner-api"]
        {1}
        rate_limit = {{ rate = "1/m", burst = 1, key = "jwt:sub" }}
        "#,
        up.url(),
        jwt_route(&up, "").trim_start()
    );
    let gw = gateway(&toml, &env).await;
    let c = client();
    let codes = |key: &'static str| {
        let c = c.clone();
        let url = gw.url("/partners");
        async move {
            let mut out = Vec::new();
            for _ in 0..3 {
                out.push(send(&c, url.clone(), &[("x-api-key", key)]).await.0);
            }
            out
        }
    };
    // Each key has its own bucket of two; the key's name, not the key, is the bucket.
    assert_eq!(codes("acme-key-1").await, vec![200, 200, 429]);
    assert_eq!(codes("beta-key-1").await, vec![200, 200, 429]);
    // JWT subjects likewise: one request each a minute.
    let bearer = |sub: &str| format!("Bearer {}", hs256(&claims(sub)));
    for sub in ["alice", "bob"] {
        let auth = bearer(sub);
        let first = send(&c, gw.url("/orders"), &[("authorization", &auth)])
            .await
            .0;
        let second = send(&c, gw.url("/orders"), &[("authorization", &auth)])
            .await
            .0;
        assert_eq!((first, second), (200, 429), "{sub}");
    }
    assert_eq!(up.hits(), 6, "refused requests never reached the upstream");
}

#[tokio::test]
async fn a_routes_error_page_keeps_the_refusals_status_and_challenge() {
    let up = TestUpstream::builder().start().await;
    let env = Env::from_pairs([("PARTNER_KEYS", format!("acme {}\n", sha_hex("acme-key-1")))]);
    let toml = format!(
        r#"
        [[routes]]
        path = "/"
        targets = ["{}"]
        auth = {{ api_keys = {{ keys_env = "PARTNER_KEYS" }} }}
        error = {{ status = 200, content_type = "text/plain", body = "sorry" }}
        "#,
        up.url()
    );
    let gw = gateway(&toml, &env).await;
    let c = client();
    // The page's body, but still a 401 with its challenge: never a 200 that looks like success.
    let (status, h, body) = send(&c, gw.url("/x"), &[("x-api-key", "wrong")]).await;
    assert_eq!(status, 401);
    assert!(!challenge(&h).is_empty());
    assert_eq!(body, "sorry");
    assert_eq!(up.hits(), 0);
}

#[tokio::test]
async fn forward_auth_sends_every_header_but_the_hop_by_hop_ones() {
    let up = TestUpstream::builder().start().await;
    let (addr, seen) = auth_server().await;
    let toml = format!(
        r#"
        [[routes]]
        path = "/"
        targets = ["{}"]
        auth = {{ forward = {{ url = "http://{addr}/check" }} }}
        "#,
        up.url()
    );
    let gw = gateway(&toml, &Env::default()).await;
    let c = client();
    let (status, _, _) = send(
        &c,
        gw.url("/x"),
        &[
            ("authorization", "Bearer good"),
            ("connection", "x-secret-hop"),
            ("x-secret-hop", "1"),
            ("keep-alive", "timeout=5"),
            ("x-tenant", "blue"),
        ],
    )
    .await;
    assert_eq!(status, 200);
    let seen = seen.lock().unwrap();
    let h = seen.last().unwrap();
    assert_eq!(h["authorization"], "Bearer good");
    assert_eq!(h["x-tenant"], "blue");
    for hop in ["x-secret-hop", "keep-alive"] {
        assert!(!h.contains_key(hop), "{hop} reached the auth service");
    }
}

#[tokio::test]
async fn passwords_in_auth_urls_stay_out_of_explain_status_and_errors() {
    let up = TestUpstream::builder().start().await;
    let port = dead_port().await;
    let toml = format!(
        r#"
        [[routes]]
        name = "f"
        path = "/f"
        targets = ["{}"]
        auth = {{ forward = {{ url = "http://checker:hunter2@127.0.0.1:{port}/check", timeout = "1s" }} }}
        "#,
        up.url()
    );
    let gw = gateway(&toml, &Env::default()).await;
    let c = client();
    // The auth service is down: 503, and its URL's password is not in the answer.
    let (status, _, body) = send(&c, gw.url("/f/x"), &[]).await;
    assert_eq!(status, 503);
    assert!(!body.contains("hunter2"), "{body}");
    for view in ["/explain?url=/f/x", "/status"] {
        let text = c
            .get(gw.admin_url(view))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert!(!text.contains("hunter2"), "{view}: {text}");
    }
    let explain = c
        .get(gw.admin_url("/explain?url=/f/x"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(explain.contains("checker:***@"), "{explain}");
}

#[tokio::test]
async fn forward_auth_reuses_its_connection_when_the_2xx_has_a_body() {
    let up = TestUpstream::builder().start().await;
    // A body larger than one read: left unread, it would cost the connection.
    let (addr, accepted) = serve_counted(|_req: Request<Incoming>| async {
        Response::new(Full::new(Bytes::from(vec![b'x'; 48 << 10])))
    })
    .await;
    let toml = format!(
        r#"
        [[routes]]
        path = "/"
        targets = ["{}"]
        auth = {{ forward = {{ url = "http://{addr}/check" }} }}
        "#,
        up.url()
    );
    let gw = gateway(&toml, &Env::default()).await;
    let c = client();
    for _ in 0..5 {
        assert_eq!(send(&c, gw.url("/x"), &[]).await.0, 200);
    }
    assert_eq!(accepted.load(Ordering::Relaxed), 1, "one pooled connection");
}
