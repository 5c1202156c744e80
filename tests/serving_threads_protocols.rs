//! Every protocol the listeners speak, served by several threads at once: TLS with h2 and
//! HTTP/1.1 by ALPN, h2c by prior knowledge and WebSocket upgrades, over connections that land
//! on different serving threads.

mod support;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{Request, Version};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use meshgate::config::{Config, Env};
use meshgate::Gateway;
use support::gateway::start_gateway;
use support::h2::{cert, h2c_client, tls_client};
use support::upstream::TestUpstream;
use support::ws::WsEcho;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

/// One request over a new TLS connection with `alpn`; returns the version and body.
async fn over_tls(
    addr: std::net::SocketAddr,
    cert: &support::h2::TestCert,
    alpn: &[u8],
) -> (Version, Bytes) {
    let tls = tls_client(&[cert], &[alpn])
        .connect(
            rustls::pki_types::ServerName::try_from("a.test".to_owned()).unwrap(),
            TcpStream::connect(addr).await.unwrap(),
        )
        .await
        .unwrap();
    let req = Request::get("https://a.test/api/x")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = if alpn == b"h2" {
        let (mut send, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
                .await
                .unwrap();
        tokio::spawn(conn);
        send.send_request(req).await.unwrap()
    } else {
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .unwrap();
        tokio::spawn(conn);
        let (mut parts, body) = req.into_parts();
        parts.uri = "/api/x".parse().unwrap();
        parts
            .headers
            .insert("host", http::HeaderValue::from_static("a.test"));
        send.send_request(Request::from_parts(parts, body))
            .await
            .unwrap()
    };
    assert_eq!(resp.status(), 200);
    let version = resp.version();
    (
        version,
        resp.into_body().collect().await.unwrap().to_bytes(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_h2c_and_websocket_work_on_every_serving_thread() {
    let dir = tempfile::tempdir().unwrap();
    let a = std::sync::Arc::new(cert(dir.path(), "a", &["a.test"]));
    let up = TestUpstream::builder()
        .route("/api/x", 200, "api")
        .start()
        .await;
    let echo = WsEcho::start().await;
    let mut config = Config::from_toml(
        &format!(
            r#"
            [tls]
            listen = "127.0.0.1:0"
            cert_file = "{}"
            key_file = "{}"
            [[routes]]
            path = "/api"
            targets = ["{}"]
            [[routes]]
            path = "/ws"
            targets = ["ws://{}"]
            "#,
            a.cert.display(),
            a.key.display(),
            up.url(),
            echo.addr
        ),
        &Env::default(),
    )
    .unwrap();
    config.server.drain_delay = std::time::Duration::ZERO;
    let gw = start_gateway(Gateway::build(config).unwrap().with_serving_threads(3)).await;
    let tls_addr = gw.tls.unwrap();

    // Enough connections of each kind that every thread takes some (the accepting thread is
    // whichever wakes first), all at once.
    let mut tasks = Vec::new();
    for i in 0..24 {
        let a = a.clone();
        let main = gw.addr;
        tasks.push(tokio::spawn(async move {
            match i % 4 {
                0 => assert_eq!(
                    over_tls(tls_addr, &a, b"h2").await,
                    (Version::HTTP_2, Bytes::from("api"))
                ),
                1 => assert_eq!(
                    over_tls(tls_addr, &a, b"http/1.1").await,
                    (Version::HTTP_11, Bytes::from("api"))
                ),
                2 => {
                    let mut send = h2c_client(main).await;
                    let resp = send
                        .send_request(
                            Request::get(format!("http://{main}/api/x"))
                                .body(Full::new(Bytes::new()))
                                .unwrap(),
                        )
                        .await
                        .unwrap();
                    assert_eq!(resp.version(), Version::HTTP_2);
                    let body = resp.into_body().collect().await.unwrap().to_bytes();
                    assert_eq!(body, "api");
                }
                _ => {
                    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{main}/ws"))
                        .await
                        .unwrap();
                    for n in 0..5 {
                        let text = format!("hello {i} {n}");
                        ws.send(Message::text(text.clone())).await.unwrap();
                        assert_eq!(ws.next().await.unwrap().unwrap(), Message::text(text));
                    }
                    ws.close(None).await.unwrap();
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(up.hits_on("/api/x"), 18);
    assert_eq!(echo.handshakes.lock().unwrap().len(), 6);
    gw.stop().await;
}
