//! Idle WebSocket benchmark (not a test): N WebSocket connections held open through the release
//! gateway, reporting the gateway's memory per connection. The upstream echo server runs in a
//! child process so that no process needs more than one descriptor per connection and side.
//! `cargo bench --bench ws_idle` (default 9,500 connections; `-- N` to choose). With
//! `MESHGATE_BIN=target/release/meshgate cargo bench --profile dev --bench ws_idle` it measures a
//! gateway built elsewhere without building this client in release.
//! Each proxied WebSocket costs the gateway two descriptors; with this machine's hard limit of
//! 20,000 per process, about 9,900 is the most one gateway process can hold here.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn kib(pid: u32, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

async fn upstream() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    println!("{}", listener.local_addr().unwrap().port());
    while let Ok((tcp, _)) = listener.accept().await {
        tokio::spawn(async move {
            let Ok(mut ws) = tokio_tungstenite::accept_async(tcp).await else {
                return;
            };
            while let Some(Ok(m)) = ws.next().await {
                if m.is_text() && ws.send(m).await.is_err() {
                    return;
                }
            }
        });
    }
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "upstream") {
        return upstream().await;
    }
    let n: usize = args
        .iter()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(9_500);
    let mut up = Command::new(&args[0])
        .arg("upstream")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(up.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let up_port: u16 = line.trim().parse().unwrap();

    let dir = tempfile::tempdir().unwrap();
    let (port, admin) = (free_port(), free_port());
    let cfg = dir.path().join("ws.toml");
    std::fs::write(
        &cfg,
        format!(
            "listen = \"127.0.0.1:{port}\"\n[admin]\nlisten = \"127.0.0.1:{admin}\"\n[log]\nlevel = \"warn\"\n[server]\ndrain_delay = \"0s\"\nmax_connections = 20000\n\
             [[routes]]\npath = \"/\"\ntargets = [\"ws://127.0.0.1:{up_port}\"]\n"
        ),
    )
    .unwrap();
    // MESHGATE_BIN: measure a prebuilt (release) gateway without building this bench in release.
    let bin =
        std::env::var_os("MESHGATE_BIN").unwrap_or_else(|| env!("CARGO_BIN_EXE_meshgate").into());
    let mut gw = Command::new(bin)
        .env_remove("MESHGATE_BIN")
        .args(["--config", cfg.to_str().unwrap()])
        .env("MESHGATE_WORKERS", "1")
        .spawn()
        .unwrap();
    let pid = gw.id();
    let deadline = Instant::now() + Duration::from_secs(30);
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        assert!(Instant::now() < deadline, "gateway did not start");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Warm the gateway so one-time allocations are not counted per connection.
    let (mut warm, _) = tokio_tungstenite::connect_async(format!("ws://127.0.0.1:{port}/"))
        .await
        .unwrap();
    warm.send(Message::text("w")).await.unwrap();
    warm.next().await;
    let base = kib(pid, "VmRSS:");
    let started = Instant::now();
    let mut held = Vec::with_capacity(n);
    for i in 0..n {
        match tokio_tungstenite::connect_async(format!("ws://127.0.0.1:{port}/")).await {
            Ok((ws, _)) => held.push(ws),
            Err(e) => {
                eprintln!("connection {i} failed: {e}");
                break;
            }
        }
    }
    let opened = started.elapsed();
    // A message on a sample proves the connections are live, not just accepted.
    for ws in held.iter_mut().step_by(500) {
        ws.send(Message::text("ping")).await.unwrap();
        assert_eq!(ws.next().await.unwrap().unwrap(), Message::text("ping"));
    }
    let rss = kib(pid, "VmRSS:");
    let peak = kib(pid, "VmHWM:");
    let per = (rss.saturating_sub(base) as f64 * 1024.0) / held.len().max(1) as f64;
    println!(
        "| idle WebSockets | opened in | gateway RSS before | after | peak | per connection |"
    );
    println!("|---:|---:|---:|---:|---:|---:|");
    println!(
        "| {} | {:.1} s | {:.1} MiB | {:.1} MiB | {:.1} MiB | {:.1} KiB |",
        held.len(),
        opened.as_secs_f64(),
        base as f64 / 1024.0,
        rss as f64 / 1024.0,
        peak as f64 / 1024.0,
        per / 1024.0
    );
    drop(held);
    let _ = gw.kill();
    let _ = gw.wait();
    let _ = up.kill();
    let _ = up.wait();
}
