//! A 100 MiB body streamed through the gateway in both directions while the process's peak
//! memory stays flat. Alone in its file so no other test shares the process's memory figures.

mod support;

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio_util::sync::CancellationToken;

const SIZE: u64 = 100 * 1024 * 1024;

/// Generates `left` bytes in 64 KiB chunks without holding more than one chunk.
struct Generated {
    left: u64,
    chunk: Bytes,
}

impl Body for Generated {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if self.left == 0 {
            return Poll::Ready(None);
        }
        let n = self.left.min(self.chunk.len() as u64) as usize;
        self.left -= n as u64;
        Poll::Ready(Some(Ok(Frame::data(self.chunk.slice(..n)))))
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.left)
    }
}

/// Peak resident memory of this process in KiB.
fn peak_rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[tokio::test]
async fn hundred_mib_streams_both_ways_with_flat_memory() {
    let stop = CancellationToken::new();
    let mock = meshgate::mock::spawn("127.0.0.1:0".parse().unwrap(), "big", stop.clone())
        .await
        .unwrap();
    let gw = support::gateway::start(&format!(
        r#"
        [[routes]]
        path = "/"
        targets = ["http://{mock}"]
        "#
    ))
    .await;
    let client: Client<_, Generated> = Client::builder(TokioExecutor::new()).build_http();
    // Warm up so one-time allocations are not counted.
    let warm = Generated {
        left: 1 << 20,
        chunk: Bytes::from(vec![7u8; 64 * 1024]),
    };
    let req = http::Request::post(gw.url("/echo/warm"))
        .body(warm)
        .unwrap();
    client
        .request(req)
        .await
        .unwrap()
        .into_body()
        .collect()
        .await
        .unwrap();
    let before = peak_rss_kib();

    // Upload: the mock counts what arrives and answers with the count.
    let body = Generated {
        left: SIZE,
        chunk: Bytes::from(vec![7u8; 64 * 1024]),
    };
    let req = http::Request::post(gw.url("/echo/upload"))
        .body(body)
        .unwrap();
    let resp = client.request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let json: serde_json::Value =
        serde_json::from_slice(&resp.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert_eq!(json["body_size"], SIZE);

    // Download: count frames as they arrive, checking the mock's byte pattern.
    let req = http::Request::get(gw.url(&format!("/bytes?size={SIZE}")))
        .body(Generated {
            left: 0,
            chunk: Bytes::new(),
        })
        .unwrap();
    let resp = client.request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let mut got = 0u64;
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.unwrap().into_data() {
            for (i, b) in data.iter().enumerate() {
                assert_eq!(*b as u64, (got + i as u64) % 251);
            }
            got += data.len() as u64;
        }
    }
    assert_eq!(got, SIZE);

    let grown_mib = (peak_rss_kib() - before) / 1024;
    // 200 MiB went through; buffering any of it whole would show here.
    assert!(grown_mib < 32, "peak memory grew by {grown_mib} MiB");
    stop.cancel();
}
