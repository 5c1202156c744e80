//! Consul discovery benchmark (not a test): time from a Consul change to the first request
//! routed by it, and the gateway's CPU and memory while watching 1,000 and 10,000 services.
//! Runs the release `meshgate` binary against the project's Consul emulator on loopback:
//! `cargo bench --bench consul` (add `-- quick` for fewer rounds).

// An inline module with a path, so consul.rs finds its children in tests/support/consul/.
#[path = "../tests/support"]
#[allow(dead_code)]
mod support {
    pub mod consul;
}

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use support::consul::{ConsulEmulator, EmulatorOptions, Registration};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn proc_cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let rest = stat.rsplit_once(')').map(|x| x.1).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let t = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (t(11) + t(12)) / 100.0
}

fn proc_kib(pid: u32, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

struct Gateway {
    child: Child,
    addr: SocketAddr,
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn start_gateway(consul: &ConsulEmulator, services: usize, dir: &std::path::Path) -> Gateway {
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let mut toml = format!(
        "listen = \"{addr}\"\n[admin]\nlisten = \"{admin}\"\n[log]\nlevel = \"warn\"\n[server]\ndrain_delay = \"0s\"\n\
         [discovery]\nprovider = \"consul\"\n[discovery.consul]\naddress = \"{}\"\nwait = \"60s\"\nstartup_timeout = \"120s\"\n",
        consul.url()
    );
    for i in 0..services {
        toml.push_str(&format!("[[routes]]\nname = \"r{i}\"\npath = \"/s{i}\"\nservice = \"s{i}\"\nretry = {{ attempts = 1 }}\n"));
    }
    let path = dir.join(format!("gw-{services}.toml"));
    std::fs::write(&path, toml).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_meshgate"))
        .args(["--config", path.to_str().unwrap()])
        .env("MESHGATE_WORKERS", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let gw = Gateway { child, addr };
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        if let Ok(r) = client.get(format!("http://{admin}/ready")).send().await {
            if r.status() == 200 {
                break;
            }
        }
        assert!(Instant::now() < deadline, "gateway never became ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    gw
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

#[tokio::main]
async fn main() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let quick = std::env::args().any(|a| a == "quick");
    let dir = tempfile::tempdir().unwrap();
    let stop = CancellationToken::new();
    let a = meshgate::mock::spawn("127.0.0.1:0".parse().unwrap(), "a", stop.clone())
        .await
        .unwrap();
    let b = meshgate::mock::spawn("127.0.0.1:0".parse().unwrap(), "b", stop.clone())
        .await
        .unwrap();
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    println!("| services | change to first routed request p50 | p99 | gateway CPU while idle | RSS | peak RSS |");
    println!("|---:|---:|---:|---:|---:|---:|");
    for services in [1_000usize, 10_000] {
        let consul = ConsulEmulator::start_with(EmulatorOptions {
            max_conns_per_client: 0,
            ..EmulatorOptions::default()
        })
        .await;
        for i in 0..services {
            consul.register(Registration::new(
                format!("s{i}-a"),
                format!("s{i}"),
                "127.0.0.1",
                a.port(),
            ));
        }
        let gw = start_gateway(&consul, services, dir.path()).await;
        let pid = gw.child.id();

        // Propagation: register b on s0, time until a request through the gateway reaches it.
        let rounds = if quick { 10 } else { 40 };
        let mut samples = Vec::with_capacity(rounds);
        for _ in 0..rounds {
            // A quiet service: the watch's token bucket (burst 2, then 1/s while the index
            // churns) has refilled, as it has for any service that is not flapping.
            tokio::time::sleep(Duration::from_millis(2500)).await;
            let t0 = Instant::now();
            consul.register(Registration::new("s0-b", "s0", "127.0.0.1", b.port()));
            loop {
                let body = client
                    .get(format!("http://{}/s0/health", gw.addr))
                    .send()
                    .await
                    .unwrap()
                    .text()
                    .await
                    .unwrap();
                if body.contains(&format!("\"port\":{}", b.port())) {
                    break;
                }
                assert!(
                    t0.elapsed() < Duration::from_secs(30),
                    "change never arrived"
                );
            }
            samples.push(t0.elapsed());
            consul.deregister("s0-b");
            // Let the removal land so the next round starts from one instance.
            let t1 = Instant::now();
            let mut only_a = 0;
            while only_a < 4 && t1.elapsed() < Duration::from_secs(30) {
                let body = client
                    .get(format!("http://{}/s0/health", gw.addr))
                    .send()
                    .await
                    .unwrap()
                    .text()
                    .await
                    .unwrap();
                only_a = if body.contains(&format!("\"port\":{}", a.port())) {
                    only_a + 1
                } else {
                    0
                };
            }
        }
        samples.sort();

        // Idle cost over a window with no changes.
        let window = Duration::from_secs(if quick { 5 } else { 20 });
        let cpu0 = proc_cpu_seconds(pid);
        tokio::time::sleep(window).await;
        let cpu = (proc_cpu_seconds(pid) - cpu0) / window.as_secs_f64() * 100.0;
        println!(
            "| {services} | {:.1} ms | {:.1} ms | {cpu:.2} % of a core | {} MiB | {} MiB |",
            percentile(&samples, 0.5).as_secs_f64() * 1e3,
            percentile(&samples, 0.99).as_secs_f64() * 1e3,
            proc_kib(pid, "VmRSS:") / 1024,
            proc_kib(pid, "VmHWM:") / 1024,
        );
        drop(gw);
    }
    stop.cancel();
}
