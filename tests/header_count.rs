//! `server.max_headers` (issue #11 defect 9): hyper's default of 100 header fields answers 431
//! to a request with more; a raised limit lets it through, every field intact, on the plain
//! listener and on the TLS one.

mod support;

use std::time::Duration;

use support::gateway::{eventually, start, TestGateway};
use support::h2::{cert, tls_client};
use support::upstream::TestUpstream;
use support::util::raw_exchange;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Fields besides `Host` and `Connection`: more than hyper's default of 100.
const FIELDS: usize = 150;

/// A request with `FIELDS` small header fields of its own.
fn many_fields() -> Vec<u8> {
    let mut head = String::from("GET /many HTTP/1.1\r\nHost: many.test\r\nConnection: close\r\n");
    for i in 0..FIELDS {
        head += &format!("X-Field-{i}: v{i}\r\n");
    }
    head += "\r\n";
    head.into_bytes()
}

async fn gateway(
    up: &TestUpstream,
    server: &str,
    tls: Option<&support::h2::TestCert>,
) -> TestGateway {
    let tls = tls.map_or(String::new(), |c| {
        format!(
            "[tls]\nlisten = \"127.0.0.1:0\"\ncert_file = {:?}\nkey_file = {:?}\n",
            c.cert, c.key
        )
    });
    start(&format!(
        "{tls}[server]\n{server}\n[[routes]]\npath = \"/\"\ntargets = [\"{}\"]\n",
        up.url()
    ))
    .await
}

/// Sends `bytes` over TLS (HTTP/1.1 by ALPN) and reads until the gateway closes.
async fn tls_exchange(gw: &TestGateway, c: &support::h2::TestCert, bytes: &[u8]) -> String {
    let connector = tls_client(&[c], &[b"http/1.1"]);
    let tcp = TcpStream::connect(gw.tls.expect("TLS listener"))
        .await
        .unwrap();
    let name = rustls::pki_types::ServerName::try_from("many.test".to_owned()).unwrap();
    let mut tls = connector.connect(name, tcp).await.unwrap();
    tls.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(Duration::from_secs(5), tls.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The upstream received exactly one request carrying every field.
async fn assert_all_fields_arrived(up: &TestUpstream) {
    assert!(
        eventually(Duration::from_secs(5), || async {
            !up.requests().is_empty()
        })
        .await,
        "no request reached the upstream"
    );
    let seen = up.requests();
    assert_eq!(seen.len(), 1, "{seen:#?}");
    for i in 0..FIELDS {
        let name = format!("x-field-{i}");
        assert_eq!(
            seen[0].headers.get(&name).map(|v| v.to_str().unwrap()),
            Some(format!("v{i}").as_str()),
            "{name}"
        );
    }
}

#[tokio::test]
async fn raised_max_headers_passes_150_fields_upstream() {
    let up = TestUpstream::builder()
        .route("/many", 200, "ok")
        .start()
        .await;
    let gw = gateway(&up, "max_headers = 200", None).await;
    let reply = raw_exchange(gw.addr, &many_fields(), Duration::from_secs(5)).await;
    assert!(reply.text.starts_with("HTTP/1.1 200"), "{}", reply.text);
    assert_all_fields_arrived(&up).await;
}

#[tokio::test]
async fn default_max_headers_answers_431_and_forwards_nothing() {
    let up = TestUpstream::builder()
        .route("/many", 200, "ok")
        .start()
        .await;
    let gw = gateway(&up, "", None).await;
    let reply = raw_exchange(gw.addr, &many_fields(), Duration::from_secs(5)).await;
    assert!(reply.text.starts_with("HTTP/1.1 431"), "{}", reply.text);
    assert_eq!(up.hits(), 0);
}

#[tokio::test]
async fn max_headers_applies_to_the_tls_listener() {
    let dir = tempfile::tempdir().unwrap();
    let c = cert(dir.path(), "gw", &["many.test"]);
    let up = TestUpstream::builder()
        .route("/many", 200, "ok")
        .start()
        .await;
    let gw = gateway(&up, "", Some(&c)).await;
    let text = tls_exchange(&gw, &c, &many_fields()).await;
    assert!(text.starts_with("HTTP/1.1 431"), "{text}");
    assert_eq!(up.hits(), 0);

    let gw = gateway(&up, "max_headers = 200", Some(&c)).await;
    let text = tls_exchange(&gw, &c, &many_fields()).await;
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert_all_fields_arrived(&up).await;
}
