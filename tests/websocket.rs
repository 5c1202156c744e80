//! WebSocket through the gateway: frames both ways, ping, a 16 MiB message, close codes, header
//! forwarding, a refused upgrade, least-connections counting, and 1,000 held connections.

mod support;

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use support::gateway::{eventually, start};
use support::upstream::TestUpstream;
use support::ws::WsEcho;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::Message;

fn config(targets: &str, extra: &str) -> String {
    format!(
        r#"
        [[routes]]
        name = "ws"
        path = "/ws"
        targets = [{targets}]
        load_balancer = "least_connections"
        {extra}
        "#
    )
}

#[tokio::test]
async fn frames_ping_big_message_and_close_codes() {
    let echo = WsEcho::start().await;
    let gw = start(&config(&format!("\"ws://{}\"", echo.addr), "")).await;
    let cfg = WebSocketConfig::default()
        .max_message_size(Some(64 << 20))
        .max_frame_size(Some(64 << 20));
    let (mut ws, resp) = tokio_tungstenite::connect_async_with_config(
        format!("ws://{}/ws/chat", gw.addr),
        Some(cfg),
        false,
    )
    .await
    .unwrap();
    assert_eq!(resp.status(), 101);
    assert!(resp.headers().contains_key("sec-websocket-accept"));

    ws.send(Message::text("hello")).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap(), Message::text("hello"));
    ws.send(Message::binary(vec![0u8, 1, 2, 255]))
        .await
        .unwrap();
    assert_eq!(
        ws.next().await.unwrap().unwrap(),
        Message::binary(vec![0u8, 1, 2, 255])
    );
    ws.send(Message::Ping(b"p".to_vec().into())).await.unwrap();
    assert_eq!(
        ws.next().await.unwrap().unwrap(),
        Message::Pong(b"p".to_vec().into())
    );
    let big: Vec<u8> = (0..16 * 1024 * 1024).map(|i| (i % 251) as u8).collect();
    ws.send(Message::binary(big.clone())).await.unwrap();
    match ws.next().await.unwrap().unwrap() {
        Message::Binary(b) => assert!(b[..] == big[..], "16 MiB message intact"),
        other => panic!("unexpected {other:?}"),
    }
    // The upstream closes with its own code: the client sees it.
    ws.send(Message::text("close-me")).await.unwrap();
    match ws.next().await.unwrap().unwrap() {
        Message::Close(Some(f)) => assert_eq!(f.code, CloseCode::from(4001)),
        other => panic!("expected close, got {other:?}"),
    }

    // The client closes with its code: the upstream answers the close handshake through us.
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{}/ws", gw.addr))
        .await
        .unwrap();
    ws.close(Some(CloseFrame {
        code: CloseCode::from(4002),
        reason: "bye".into(),
    }))
    .await
    .unwrap();
    match ws.next().await {
        Some(Ok(Message::Close(Some(f)))) => {
            assert_eq!(f.code, CloseCode::from(4002), "echoed close code")
        }
        other => panic!("expected close echo, got {other:?}"),
    }
}

#[tokio::test]
async fn query_cookies_origin_and_subprotocol_reach_the_upstream() {
    let echo = WsEcho::start().await;
    let gw = start(&config(&format!("\"http://{}\"", echo.addr), "")).await;
    let mut req = format!("ws://{}/ws/room?id=7&x=%20y", gw.addr)
        .into_client_request()
        .unwrap();
    let h = req.headers_mut();
    h.insert("cookie", "session=abc".parse().unwrap());
    h.insert("origin", "https://app.example.com".parse().unwrap());
    h.insert(
        "sec-websocket-protocol",
        "chat.v2, chat.v1".parse().unwrap(),
    );
    let (mut ws, resp) = tokio_tungstenite::connect_async(req).await.unwrap();
    assert_eq!(
        resp.headers()["sec-websocket-protocol"],
        "chat.v2",
        "upstream's choice comes back"
    );
    ws.send(Message::text("x")).await.unwrap();
    ws.next().await.unwrap().unwrap();
    let (uri, headers) = echo.handshakes.lock().unwrap()[0].clone();
    assert_eq!(uri, "/ws/room?id=7&x=%20y");
    let get = |k: &str| headers.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    assert_eq!(get("cookie").as_deref(), Some("session=abc"));
    assert_eq!(get("origin").as_deref(), Some("https://app.example.com"));
    assert_eq!(
        get("sec-websocket-protocol").as_deref(),
        Some("chat.v2, chat.v1")
    );
    assert!(get("sec-websocket-key").is_some());
    assert_eq!(get("sec-websocket-version").as_deref(), Some("13"));
    assert_eq!(get("upgrade").as_deref(), Some("websocket"));
}

#[tokio::test]
async fn refused_upgrade_is_passed_back_unchanged() {
    let up = TestUpstream::builder()
        .route("/ws", 403, "no websockets here")
        .start()
        .await;
    let gw = start(&config(&format!("\"{}\"", up.url()), "")).await;
    let err = tokio_tungstenite::connect_async(format!("ws://{}/ws", gw.addr))
        .await
        .unwrap_err();
    match err {
        tokio_tungstenite::tungstenite::Error::Http(resp) => {
            assert_eq!(resp.status(), 403);
            assert_eq!(resp.body().as_deref(), Some(&b"no websockets here"[..]));
        }
        other => panic!("expected the upstream's 403, got {other}"),
    }
}

#[tokio::test]
async fn open_websockets_count_for_least_connections_and_idle_ones_close() {
    let a = WsEcho::start().await;
    let b = WsEcho::start().await;
    let gw = start(&config(
        &format!("\"ws://{}\", \"ws://{}\"", a.addr, b.addr),
        r#"websocket_idle_timeout = "300ms""#,
    ))
    .await;
    let mut held = Vec::new();
    for _ in 0..10 {
        let (ws, _) = tokio_tungstenite::connect_async(format!("ws://{}/ws", gw.addr))
            .await
            .unwrap();
        held.push(ws);
    }
    let pool = gw.pool("ws");
    let counts: Vec<usize> = pool
        .snapshot()
        .list()
        .iter()
        .map(|e| e.state.in_flight())
        .collect();
    assert_eq!(counts.iter().sum::<usize>(), 10);
    assert!(
        counts.iter().all(|c| (3..=7).contains(c)),
        "spread by open connections: {counts:?}"
    );
    // Silent connections are closed by the idle timeout and release their leases.
    assert!(
        eventually(Duration::from_secs(3), || async {
            pool.snapshot()
                .list()
                .iter()
                .all(|e| e.state.in_flight() == 0)
        })
        .await
    );
    let msg = held[0].next().await;
    assert!(
        matches!(msg, None | Some(Ok(Message::Close(_))) | Some(Err(_))),
        "{msg:?}"
    );
}

#[tokio::test]
async fn a_thousand_connections_held_open() {
    let echo = WsEcho::start().await;
    let gw = start(&config(&format!("\"ws://{}\"", echo.addr), "")).await;
    let mut held = Vec::with_capacity(1000);
    for _ in 0..1000 {
        let (ws, _) = tokio_tungstenite::connect_async(format!("ws://{}/ws", gw.addr))
            .await
            .unwrap();
        held.push(ws);
    }
    assert_eq!(gw.pool("ws").snapshot().list()[0].state.in_flight(), 1000);
    // Every one of them still works.
    for (i, ws) in held.iter_mut().enumerate().step_by(50) {
        ws.send(Message::text(format!("m{i}"))).await.unwrap();
        assert_eq!(
            ws.next().await.unwrap().unwrap(),
            Message::text(format!("m{i}"))
        );
    }
    drop(held);
    assert!(
        eventually(Duration::from_secs(5), || async {
            gw.pool("ws").snapshot().list()[0].state.in_flight() == 0
        })
        .await
    );
}

#[tokio::test]
async fn shutdown_closes_open_websockets_with_1001_after_the_grace_period() {
    let echo = WsEcho::start().await;
    let mut gw = start(&format!(
        r#"
        [server]
        drain_delay = "0s"
        grace_period = "300ms"
        [[routes]]
        name = "ws"
        path = "/ws"
        targets = ["ws://{}"]
        "#,
        echo.addr
    ))
    .await;
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{}/ws", gw.addr))
        .await
        .unwrap();
    ws.send(Message::text("before")).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap(), Message::text("before"));
    let signalled = tokio::time::Instant::now();
    gw.signal_stop();
    // Within the grace period the connection still works.
    ws.send(Message::text("during")).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap(), Message::text("during"));
    // Then the gateway says goodbye with 1001 at a frame boundary.
    match ws.next().await {
        Some(Ok(Message::Close(Some(f)))) => assert_eq!(f.code, CloseCode::Away),
        other => panic!("expected a 1001 close frame, got {other:?}"),
    }
    assert!(
        signalled.elapsed() >= Duration::from_millis(250),
        "{:?}",
        signalled.elapsed()
    );
    gw.join(Duration::from_secs(5)).await.unwrap();
}
