//! HTTP/2 both sides, gRPC trailers, TLS with SNI, TLS upstreams, wss, and SSE timeliness.

mod support;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{Request, Version};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use support::gateway::{client, start};
use support::h2::{cert, h2c_client, tls_client, GrpcUpstream};
use support::upstream::TestUpstream;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

fn grpc_request(uri: String) -> Request<Full<Bytes>> {
    Request::post(uri)
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("grpc-timeout", "5S")
        .body(Full::new(Bytes::from_static(b"\x00\x00\x00\x00\x03abc")))
        .unwrap()
}

#[tokio::test]
async fn h2c_downstream_to_h2c_upstream_carries_grpc_trailers() {
    let up = GrpcUpstream::start_h2c().await;
    let gw = start(&format!(
        r#"
        [[routes]]
        name = "grpc"
        path = "/pkg.Greeter"
        targets = ["h2c://{}"]
        "#,
        up.addr
    ))
    .await;
    let mut h2 = h2c_client(gw.addr).await;
    let resp = h2
        .send_request(grpc_request(format!(
            "http://{}/pkg.Greeter/SayHello",
            gw.addr
        )))
        .await
        .unwrap();
    assert_eq!(
        resp.version(),
        Version::HTTP_2,
        "h2c with prior knowledge downstream"
    );
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "application/grpc");
    let collected = resp.into_body().collect().await.unwrap();
    let trailers = collected
        .trailers()
        .cloned()
        .expect("trailers pass through");
    assert_eq!(trailers["grpc-status"], "0");
    assert_eq!(trailers["grpc-message"], "ok");
    assert_eq!(&collected.to_bytes()[..], b"\x00\x00\x00\x00\x02hi");
    let seen = up.seen.lock().unwrap()[0].clone();
    assert_eq!(seen.version, Version::HTTP_2, "h2c upstream");
    assert_eq!(seen.uri, "/pkg.Greeter/SayHello");
    assert_eq!(seen.headers["te"], "trailers", "gRPC needs TE: trailers");
    assert_eq!(seen.headers["grpc-timeout"], "5S", "deadline travels");
    assert_eq!(seen.body_len, 8);
}

#[tokio::test]
async fn h2c_downstream_to_http1_upstream() {
    let up = TestUpstream::builder().name("h1").start().await;
    let gw = start(&format!(
        "[[routes]]\npath = \"/\"\ntargets = [\"{}\"]\n",
        up.url()
    ))
    .await;
    let mut h2 = h2c_client(gw.addr).await;
    let req = Request::get(format!("http://{}/x?q=1", gw.addr))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = h2.send_request(req).await.unwrap();
    assert_eq!(resp.version(), Version::HTTP_2);
    assert_eq!(resp.into_body().collect().await.unwrap().to_bytes(), "h1");
    let seen = up.last_request().unwrap();
    assert_eq!(seen.version, Version::HTTP_11);
    assert_eq!(seen.uri, "/x?q=1");
    assert_eq!(
        seen.headers["host"],
        gw.addr.to_string().as_str(),
        ":authority becomes Host"
    );
    assert_eq!(seen.headers["via"], "2 meshgate");
}

#[tokio::test]
async fn tls_listener_picks_certificates_by_sni_and_speaks_h2_by_alpn() {
    let dir = tempfile::tempdir().unwrap();
    let a = cert(dir.path(), "a", &["a.test"]);
    let b = cert(dir.path(), "b", &["b.test", "*.b.test"]);
    let up = TestUpstream::builder().name("behind-tls").start().await;
    let gw = start(&format!(
        r#"
        [tls]
        listen = "127.0.0.1:0"
        cert_file = "{}"
        key_file = "{}"
        certificates = [{{ cert_file = "{}", key_file = "{}" }}]
        [[routes]]
        path = "/"
        targets = ["{}"]
        "#,
        a.cert.display(),
        a.key.display(),
        b.cert.display(),
        b.key.display(),
        up.url()
    ))
    .await;
    let tls_addr = gw.tls.unwrap();
    // Each name verifies only against its own certificate: the right one was chosen.
    for (name, cert) in [("a.test", &a), ("b.test", &b), ("api.b.test", &b)] {
        let connector = tls_client(&[cert], &[b"h2", b"http/1.1"]);
        let tcp = TcpStream::connect(tls_addr).await.unwrap();
        let server_name = rustls::pki_types::ServerName::try_from(name.to_owned()).unwrap();
        let tls = connector
            .connect(server_name, tcp)
            .await
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(
            tls.get_ref().1.alpn_protocol(),
            Some(&b"h2"[..]),
            "h2 by ALPN"
        );
        let (mut send, conn) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            TokioIo::new(tls),
        )
        .await
        .unwrap();
        tokio::spawn(conn);
        let resp = send
            .send_request(
                Request::get(format!("https://{name}/x"))
                    .body(Full::new(Bytes::new()))
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(resp.version(), Version::HTTP_2);
        assert_eq!(
            resp.into_body().collect().await.unwrap().to_bytes(),
            "behind-tls"
        );
        assert_eq!(
            up.last_request().unwrap().headers["x-forwarded-proto"],
            "https"
        );
    }
    // The wrong certificate for a name fails verification.
    let connector = tls_client(&[&a], &[b"http/1.1"]);
    let tcp = TcpStream::connect(tls_addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("b.test".to_owned()).unwrap();
    assert!(connector.connect(name, tcp).await.is_err());
    // HTTP/1.1 over TLS works too.
    let connector = tls_client(&[&a], &[b"http/1.1"]);
    let tcp = TcpStream::connect(tls_addr).await.unwrap();
    let tls = connector
        .connect(
            rustls::pki_types::ServerName::try_from("a.test".to_owned()).unwrap(),
            tcp,
        )
        .await
        .unwrap();
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    let resp = send
        .send_request(
            Request::get("/y")
                .header("host", "a.test")
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.version(), Version::HTTP_11);
    assert_eq!(resp.status(), 200);
}

#[tokio::test]
async fn tls_upstream_with_ca_file_negotiates_h2_and_grpc_works_over_it() {
    let dir = tempfile::tempdir().unwrap();
    let c = cert(dir.path(), "up", &["localhost"]);
    let up = GrpcUpstream::start_tls(&c).await;
    let gw = start(&format!(
        r#"
        [[routes]]
        path = "/"
        targets = ["https://localhost:{}"]
        upstream_tls = {{ ca_file = "{}" }}
        "#,
        up.addr.port(),
        c.cert.display()
    ))
    .await;
    let mut h2 = h2c_client(gw.addr).await;
    let resp = h2
        .send_request(grpc_request(format!("http://{}/pkg.S/M", gw.addr)))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let collected = resp.into_body().collect().await.unwrap();
    assert_eq!(collected.trailers().unwrap()["grpc-status"], "0");
    let seen = up.seen.lock().unwrap()[0].clone();
    assert_eq!(
        seen.version,
        Version::HTTP_2,
        "the upstream offered h2 through ALPN"
    );

    // Without the CA the upstream's self-signed certificate is refused: 502.
    let gw2 = start(&format!(
        "[[routes]]\npath = \"/\"\ntargets = [\"https://localhost:{}\"]\n",
        up.addr.port()
    ))
    .await;
    assert_eq!(
        client().get(gw2.url("/x")).send().await.unwrap().status(),
        502
    );
}

#[tokio::test]
async fn wss_upstream_is_reached_over_tls() {
    let dir = tempfile::tempdir().unwrap();
    let c = cert(dir.path(), "ws", &["localhost"]);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let key = {
        use rustls::pki_types::pem::PemObject;
        rustls::pki_types::PrivateKeyDer::from_pem_file(&c.key).unwrap()
    };
    let cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(vec![c.der.clone()], key)
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let Ok(mut ws) = tokio_tungstenite::accept_async(tls).await else {
                    return;
                };
                while let Some(Ok(m)) = ws.next().await {
                    if m.is_text()
                        && ws
                            .send(Message::text(format!("tls:{}", m.to_text().unwrap())))
                            .await
                            .is_err()
                    {
                        return;
                    }
                }
            });
        }
    });
    let gw = start(&format!(
        r#"
        [[routes]]
        path = "/ws"
        targets = ["wss://localhost:{port}"]
        upstream_tls = {{ ca_file = "{}" }}
        "#,
        c.cert.display()
    ))
    .await;
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{}/ws", gw.addr))
        .await
        .unwrap();
    ws.send(Message::text("hi")).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap(), Message::text("tls:hi"));
}

#[tokio::test]
async fn server_sent_events_arrive_as_they_are_sent() {
    let stop = tokio_util::sync::CancellationToken::new();
    let mock = meshgate::mock::spawn("127.0.0.1:0".parse().unwrap(), "sse", stop.clone())
        .await
        .unwrap();
    let gw = start(&format!(
        "[[routes]]\npath = \"/\"\ntargets = [\"http://{mock}\"]\n"
    ))
    .await;
    let mut resp = client()
        .get(gw.url("/sse?events=5&interval_ms=200"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let mut arrivals = Vec::new();
    let start = tokio::time::Instant::now();
    let mut buf = Vec::new();
    while let Some(chunk) = resp.chunk().await.unwrap() {
        buf.extend_from_slice(&chunk);
        while let Some(end) = buf.windows(2).position(|w| w == b"\n\n") {
            buf.drain(..end + 2);
            arrivals.push(start.elapsed());
        }
    }
    assert_eq!(arrivals.len(), 5);
    // The upstream sends one event every 200 ms: each must arrive on its own, on time
    // (a buffering proxy would deliver them together at the end).
    for (i, pair) in arrivals.windows(2).enumerate() {
        let gap = pair[1] - pair[0];
        assert!(
            gap >= Duration::from_millis(170) && gap <= Duration::from_millis(260),
            "gap {i}: {gap:?} in {arrivals:?}"
        );
    }
    stop.cancel();
}

/// Active HTTP probes of an `https` service speak TLS with the route's `upstream_tls`: the
/// endpoint passes its probe and takes traffic (it used to be probed with a plain-HTTP client
/// that can never reach an `https` URL, so it never became healthy), and the probe reads the
/// status it got over TLS.
#[tokio::test]
async fn https_services_are_probed_over_tls_with_the_routes_settings() {
    let dir = tempfile::tempdir().unwrap();
    let c = cert(dir.path(), "probed", &["localhost"]);
    let up = GrpcUpstream::start_tls(&c).await;
    let config = |expected: &str| {
        format!(
            r#"
            [[routes]]
            path = "/"
            targets = ["https://localhost:{}"]
            upstream_tls = {{ ca_file = "{}" }}
            start_unhealthy = {}
            health_check = {{ path = "/health", interval = "50ms", timeout = "1s", healthy_threshold = 1, unhealthy_threshold = 1, jitter = "0s", expected_status = "{expected}" }}
            "#,
            up.addr.port(),
            c.cert.display(),
            expected == "200-299",
        )
    };
    let probed = || {
        up.seen
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.uri == "/health")
            .count()
    };
    let gw = start(&config("200-299")).await;
    let http = client();
    assert!(
        support::gateway::eventually(Duration::from_secs(5), || async {
            http.get(gw.url("/x")).send().await.unwrap().status() == 200
        })
        .await,
        "the https endpoint never passed its probe"
    );
    assert!(probed() >= 1, "no probe reached the upstream over TLS");
    gw.stop().await;

    // The status read over TLS decides: 200 is not what this check expects.
    let gw = start(&config("500-599")).await;
    assert!(
        support::gateway::eventually(Duration::from_secs(5), || async {
            http.get(gw.url("/x")).send().await.unwrap().status() == 503
        })
        .await,
        "a probe answered with an unexpected status left the endpoint healthy"
    );
}
