//! Small helpers for the resilience tests: a port nobody listens on, the admin `/status` view of
//! one endpoint, and raw HTTP/1.1 exchanges for what reqwest cannot send (half heads, chunks).

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::gateway::TestGateway;

/// A port free now, for a server the test starts itself on it (bind, note the port, close).
pub async fn free_port() -> u16 {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    l.local_addr().unwrap().port()
}

/// A port with nothing listening, reserved for the rest of the test process: a socket bound
/// to it without `SO_REUSEADDR` and never listening. Connecting is refused at once, and no
/// other test's listener can take the port (a port merely closed again could be reused by a
/// parallel test, which then answers in its place).
pub async fn dead_port() -> u16 {
    use socket2::{Domain, Socket, Type};
    static HELD: std::sync::Mutex<Vec<Socket>> = std::sync::Mutex::new(Vec::new());
    let s = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    s.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .unwrap();
    let port = s.local_addr().unwrap().as_socket().unwrap().port();
    HELD.lock().unwrap_or_else(|e| e.into_inner()).push(s);
    port
}

/// `GET /status` on the admin listener, as JSON. Takes a client because building one is slow
/// enough (certificate stores) to upset timing-sensitive tests.
pub async fn status(c: &reqwest::Client, gw: &TestGateway) -> Value {
    let resp = c.get(gw.admin_url("/status")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    resp.json().await.unwrap()
}

/// One endpoint of `service` in the admin `/status` document (`healthy`, `ejected`, `requests`...).
///
/// # Panics
/// When the service or the endpoint is not listed.
pub async fn endpoint_status(
    c: &reqwest::Client,
    gw: &TestGateway,
    service: &str,
    addr: SocketAddr,
) -> Value {
    let doc = status(c, gw).await;
    let services = doc["services"].as_array().expect("services array");
    let svc = services
        .iter()
        .find(|s| s["name"] == service)
        .unwrap_or_else(|| panic!("no service {service} in /status: {doc:#}"));
    svc["endpoints"]
        .as_array()
        .expect("endpoints array")
        .iter()
        .find(|e| e["address"] == addr.to_string().as_str())
        .cloned()
        .unwrap_or_else(|| panic!("no endpoint {addr} in service {service}: {svc:#}"))
}

/// What a raw exchange saw.
#[derive(Debug)]
pub struct RawReply {
    /// Everything the server sent, lossily decoded.
    pub text: String,
    /// Whether the server closed the connection (EOF or reset) before `limit` passed.
    pub closed: bool,
    /// Time from the end of the write to the close (or to `limit`).
    pub after: Duration,
}

/// Opens a connection to `addr`, writes `bytes`, then reads until the server closes the
/// connection or `limit` passes. Nothing is sent after `bytes`, so a partial head stays partial.
pub async fn raw_exchange(addr: SocketAddr, bytes: &[u8], limit: Duration) -> RawReply {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let written = Instant::now();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let closed = loop {
        match tokio::time::timeout_at(written + limit, s.read(&mut buf)).await {
            Err(_) => break false,
            Ok(Ok(0)) | Ok(Err(_)) => break true,
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
        }
    };
    RawReply {
        text: String::from_utf8_lossy(&out).into_owned(),
        closed,
        after: written.elapsed(),
    }
}

/// A chunked request: `head` (request line and headers, without the blank line) followed by
/// `chunks` in chunked transfer coding, with `Connection: close`.
pub fn chunked_request(head: &str, chunks: &[&[u8]]) -> Vec<u8> {
    let mut out =
        format!("{head}\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n").into_bytes();
    for c in chunks {
        out.extend_from_slice(format!("{:x}\r\n", c.len()).as_bytes());
        out.extend_from_slice(c);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"0\r\n\r\n");
    out
}
