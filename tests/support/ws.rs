//! A tokio-tungstenite echo server that records each handshake's request headers.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::Message;

/// Request target and headers of one handshake.
pub type Handshake = (String, Vec<(String, String)>);

/// A running echo server.
pub struct WsEcho {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Request line and headers of every handshake seen.
    pub handshakes: Arc<Mutex<Vec<Handshake>>>,
}

impl WsEcho {
    /// Starts the server; it echoes text and binary, answers pings, and closes with code 4001
    /// when it receives the text "close-me".
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let handshakes = Arc::new(Mutex::new(Vec::new()));
        let seen = handshakes.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let seen = seen.clone();
                tokio::spawn(async move {
                    // The callback's error type is tungstenite's own; its size is not ours to choose.
                    #[allow(clippy::result_large_err)]
                    let callback = |req: &Request, mut resp: Response| {
                        let headers = req
                            .headers()
                            .iter()
                            .map(|(k, v)| {
                                (k.as_str().to_owned(), v.to_str().unwrap_or("").to_owned())
                            })
                            .collect();
                        seen.lock().unwrap().push((req.uri().to_string(), headers));
                        if let Some(p) = req.headers().get("sec-websocket-protocol") {
                            let first = p
                                .to_str()
                                .unwrap_or("")
                                .split(',')
                                .next()
                                .unwrap_or("")
                                .trim()
                                .to_owned();
                            resp.headers_mut().insert(
                                "sec-websocket-protocol",
                                HeaderValue::from_str(&first).unwrap(),
                            );
                        }
                        Ok(resp)
                    };
                    let config =
                        tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
                            .max_message_size(Some(64 << 20))
                            .max_frame_size(Some(64 << 20));
                    let Ok(mut ws) = tokio_tungstenite::accept_hdr_async_with_config(
                        stream,
                        callback,
                        Some(config),
                    )
                    .await
                    else {
                        return;
                    };
                    while let Some(Ok(msg)) = ws.next().await {
                        match msg {
                            Message::Text(t) if t.as_str() == "close-me" => {
                                let frame = tokio_tungstenite::tungstenite::protocol::CloseFrame {
                                    code: 4001.into(),
                                    reason: "asked to".into(),
                                };
                                let _ = ws.close(Some(frame)).await;
                            }
                            Message::Text(_) | Message::Binary(_) => {
                                let failed = ws.send(msg).await.is_err();
                                if failed {
                                    return;
                                }
                            }
                            // tungstenite queues the close reply; reading on sends it and ends the stream.
                            _ => {}
                        }
                    }
                });
            }
        });
        Self { addr, handshakes }
    }
}
