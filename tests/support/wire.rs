//! HTTP/1.1 on a raw socket for the abuse suites: send exact bytes, read exact responses, and see
//! whether the server closed the connection. Everything is bounded in time.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// One parsed response.
#[derive(Debug, Clone)]
pub struct WireResponse {
    /// Status code.
    pub status: u16,
    /// Header lines, names lowercased, in order.
    pub headers: Vec<(String, String)>,
    /// The body (by Content-Length, or until close).
    pub body: Vec<u8>,
}

impl WireResponse {
    /// The first value of header `name` (lowercase).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// True when the response says `Connection: close`.
    pub fn closes(&self) -> bool {
        self.header("connection")
            .is_some_and(|v| v.eq_ignore_ascii_case("close"))
    }
}

/// A client connection that keeps what it has read but not yet parsed.
#[derive(Debug)]
pub struct Wire {
    stream: TcpStream,
    buf: Vec<u8>,
    eof: bool,
}

impl Wire {
    /// Connects to `addr`.
    pub async fn connect(addr: SocketAddr) -> Self {
        let stream = TcpStream::connect(addr).await.unwrap();
        stream.set_nodelay(true).unwrap();
        Self {
            stream,
            buf: Vec::new(),
            eof: false,
        }
    }

    /// Writes `bytes` (one write call; small writes leave in one segment with nodelay). A
    /// write error (the server already closed) is returned, not raised.
    pub async fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(bytes).await
    }

    /// Reads one whole response within `limit`; `None` when the connection closed (or `limit`
    /// passed) before a complete response head arrived.
    pub async fn response(&mut self, limit: Duration) -> Option<WireResponse> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(end) = find(&self.buf, b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&self.buf[..end]).into_owned();
                let mut lines = head.split("\r\n");
                let status_line = lines.next().unwrap_or_default();
                let status: u16 = status_line
                    .split(' ')
                    .nth(1)
                    .and_then(|s| s.parse().ok())
                    .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
                let headers: Vec<(String, String)> = lines
                    .filter_map(|l| l.split_once(':'))
                    .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
                    .collect();
                let len = headers
                    .iter()
                    .find(|(n, _)| n == "content-length")
                    .and_then(|(_, v)| v.parse::<usize>().ok());
                let chunked = headers
                    .iter()
                    .any(|(n, v)| n == "transfer-encoding" && v.contains("chunked"));
                let start = end + 4;
                let no_body = status == 204 || status == 304 || (100..200).contains(&status);
                let body = loop {
                    if no_body {
                        break Some(Vec::new());
                    }
                    if let Some(len) = len {
                        if self.buf.len() >= start + len {
                            break Some(self.buf[start..start + len].to_vec());
                        }
                    } else if chunked {
                        if let Some(b) = dechunk(&self.buf[start..]) {
                            break Some(b.0);
                        }
                    } else if self.eof {
                        break Some(self.buf[start..].to_vec());
                    }
                    if self.eof || !self.fill(deadline).await {
                        break None;
                    }
                };
                let body = body?;
                let used = if let Some(len) = len {
                    start + len
                } else if chunked {
                    start + dechunk(&self.buf[start..]).map_or(0, |b| b.1)
                } else {
                    self.buf.len()
                };
                let used = if no_body { start } else { used };
                self.buf.drain(..used);
                return Some(WireResponse {
                    status,
                    headers,
                    body,
                });
            }
            if self.eof || !self.fill(deadline).await {
                return None;
            }
        }
    }

    /// Sends `byte` once per `every` (the client's pace) until a whole response arrives or
    /// `limit` passes.
    pub async fn drip_until_answer(
        &mut self,
        byte: u8,
        every: Duration,
        limit: Duration,
    ) -> Option<WireResponse> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if self.send(&[byte]).await.is_err() {
                return self.response(Duration::from_millis(500)).await;
            }
            if let Some(r) = self.response(every).await {
                return Some(r);
            }
            if self.eof {
                return None;
            }
        }
        None
    }

    /// Waits up to `limit` for the server to close the connection, discarding what it sends;
    /// true when it closed (EOF or reset).
    pub async fn closed_within(&mut self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while !self.eof {
            if !self.fill(deadline).await {
                return self.eof;
            }
        }
        true
    }

    /// Reads more bytes; false when `deadline` passed. Sets `eof` on close or reset.
    async fn fill(&mut self, deadline: Instant) -> bool {
        let mut chunk = [0u8; 8192];
        match tokio::time::timeout_at(deadline, self.stream.read(&mut chunk)).await {
            Err(_) => false,
            Ok(Ok(0)) | Ok(Err(_)) => {
                self.eof = true;
                true
            }
            Ok(Ok(n)) => {
                self.buf.extend_from_slice(&chunk[..n]);
                true
            }
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Decodes a complete chunked body at the start of `b`: the data and the bytes it used.
fn dechunk(b: &[u8]) -> Option<(Vec<u8>, usize)> {
    let mut out = Vec::new();
    let mut at = 0;
    loop {
        let line_end = at + find(&b[at..], b"\r\n")?;
        let size_text = std::str::from_utf8(&b[at..line_end]).ok()?;
        let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
        at = line_end + 2;
        if size == 0 {
            // Trailers end with an empty line.
            let end = at + find(&b[at..], b"\r\n")?;
            if end == at {
                return Some((out, at + 2));
            }
            let rest = at + find(&b[at..], b"\r\n\r\n")?;
            return Some((out, rest + 4));
        }
        if b.len() < at + size + 2 {
            return None;
        }
        out.extend_from_slice(&b[at..at + size]);
        at += size + 2;
    }
}

/// `GET {path}` as a complete request of exactly `len` bytes (padded with a header), so it can
/// stand as a request body of a declared length.
pub fn hidden_get(path: &str, len: usize) -> Vec<u8> {
    let base = format!("GET {path} HTTP/1.1\r\nHost: smuggled\r\nX-Pad: \r\n\r\n");
    assert!(
        len >= base.len(),
        "{len} is shorter than the hidden request"
    );
    let pad = "a".repeat(len - base.len());
    format!("GET {path} HTTP/1.1\r\nHost: smuggled\r\nX-Pad: {pad}\r\n\r\n").into_bytes()
}
