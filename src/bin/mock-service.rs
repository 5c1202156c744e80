//! `mock-service PORT NAME`: runs [`meshgate::mock`] as a process for demos and docker setups.
//! Binds `0.0.0.0:PORT` (reachable from other containers); set `MOCK_BIND=127.0.0.1` to stay local.
#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]
#![deny(clippy::disallowed_methods, clippy::disallowed_types)]

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::ExitCode;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

const USAGE: &str = "usage: mock-service PORT NAME   (env MOCK_BIND=IP, default 0.0.0.0)";

#[tokio::main]
async fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (port, name) = match args.as_slice() {
        [port, name] if !name.is_empty() => match port.parse::<u16>() {
            Ok(port) => (port, name.as_str()),
            Err(_) => return usage(&format!("invalid port {port:?}")),
        },
        _ => return usage("expected exactly two arguments"),
    };
    let ip = match std::env::var("MOCK_BIND") {
        Ok(raw) => match raw.parse::<IpAddr>() {
            Ok(ip) => ip,
            Err(_) => return usage(&format!("MOCK_BIND={raw:?} is not an IP address")),
        },
        Err(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
    };

    let listener = match TcpListener::bind(SocketAddr::new(ip, port)).await {
        Ok(listener) => listener,
        Err(e) => {
            eprintln!("mock-service {name}: cannot bind {ip}:{port}: {e}");
            return ExitCode::FAILURE;
        }
    };
    let bound = listener
        .local_addr()
        .map_or_else(|_| format!("{ip}:{port}"), |a| a.to_string());
    eprintln!("mock-service {name} listening on {bound}");

    let shutdown = CancellationToken::new();
    let serve = meshgate::mock::serve(listener, Arc::from(name), shutdown.clone());
    tokio::pin!(serve);
    let result = tokio::select! {
        result = &mut serve => result,
        () = signal() => {
            eprintln!("mock-service {name} shutting down");
            shutdown.cancel();
            serve.await
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mock-service {name}: {e}");
            ExitCode::FAILURE
        }
    }
}

fn usage(problem: &str) -> ExitCode {
    eprintln!("mock-service: {problem}\n{USAGE}");
    ExitCode::from(2)
}

/// Resolves on Ctrl-C or SIGTERM (docker stop); both mean graceful shutdown.
async fn signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    () = ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            // Without a SIGTERM handler, Ctrl-C still works and docker falls back to SIGKILL.
            Err(_) => ctrl_c().await,
        }
    }
    #[cfg(not(unix))]
    ctrl_c().await;
}

/// Ctrl-C; if the handler cannot be installed, never resolves rather than stopping at once.
async fn ctrl_c() {
    if tokio::signal::ctrl_c().await.is_err() {
        std::future::pending::<()>().await;
    }
}
