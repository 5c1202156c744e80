//! The `meshgate` command: parse the command line, load and validate the config, start logging
//! and the runtime, run until a signal. Exit code 64 means an invalid configuration.

#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]
#![deny(clippy::disallowed_methods, clippy::disallowed_types)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use meshgate::config::{Config, ConfigError, Env};
use meshgate::telemetry::RequestTelemetry;
use meshgate::{Gateway, Listeners};
use tokio_util::sync::CancellationToken;

/// Exit status for an invalid configuration (sysexits' EX_USAGE... EX_DATAERR is 65; the
/// convention for "bad config" across our tooling is 64).
const EXIT_INVALID_CONFIG: u8 = 64;

#[derive(Parser, Debug)]
#[command(
    name = "meshgate",
    version,
    about = "A Consul-centric HTTP edge gateway"
)]
struct Cli {
    /// Configuration file (TOML; .json and .yaml by extension). MESHGATE_* variables override it.
    #[arg(long, short, global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the gateway (the default).
    Run,
    /// Validate the configuration, print every problem, exit 64 when invalid.
    Check,
    /// Run the embedded demo: the seed's routes with built-in mock services.
    Demo {
        /// Gateway listen address.
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let env = Env::from_process();
    let demo_listen = match &cli.command {
        Some(Command::Demo { listen }) => Some(*listen),
        _ => None,
    };
    let loaded = match (&cli.config, demo_listen) {
        (_, Some(_)) => Config::from_toml(meshgate::config::DEMO_TOML, &env),
        (Some(path), None) => Config::load(path, &env),
        // Containers configure the gateway with variables alone (docker-compose.yml, k8s/).
        (None, None) if env.has_meshgate_vars() => Config::from_toml("", &env),
        (None, None) => {
            eprintln!("meshgate: no configuration given; use --config FILE, set MESHGATE_* variables, or run `meshgate demo` to try it out");
            return ExitCode::from(EXIT_INVALID_CONFIG);
        }
    };
    let mut config = match loaded {
        Ok(c) => c,
        Err(e) => return report_invalid(&e),
    };
    if let Some(Command::Check) = cli.command {
        println!("configuration is valid: {} routes", config.routes.len());
        return ExitCode::SUCCESS;
    }
    if let Some(listen) = demo_listen {
        config.listen = listen;
    }
    let trace_pipeline = match meshgate::telemetry::Tracing::build(&config.tracing) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("meshgate: {}", meshgate::error::Chain(&e));
            return match e {
                meshgate::telemetry::TracingError::Exporter(_) => {
                    ExitCode::from(EXIT_INVALID_CONFIG)
                }
                meshgate::telemetry::TracingError::Thread(_) => ExitCode::FAILURE,
            };
        }
    };
    meshgate::telemetry::init(&config.log, env.get("RUST_LOG"), trace_pipeline.as_ref());
    if trace_pipeline.is_some() {
        let t = &config.tracing;
        tracing::info!(
            endpoint = %t.endpoint,
            protocol = ?t.protocol,
            sampler = t.sampler.name(),
            service = %t.service_name,
            "exporting traces over OTLP"
        );
    }
    let telemetry = RequestTelemetry::from_config(&config.log, trace_pipeline.as_ref());
    // Thread per core: this thread's single-threaded runtime runs the control plane and serves,
    // and `workers - 1` more threads serve with runtimes of their own (`Gateway::run`). No
    // work stealing: a connection, its requests and its upstream connections stay on one
    // thread, where a shared multi-threaded runtime wakes threads across cores per request.
    let workers = config.workers.unwrap_or_else(|| {
        std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
    });
    let mut runtime = tokio::runtime::Builder::new_current_thread();
    runtime.enable_all();
    let result = runtime
        .build()
        .context("starting the runtime")
        .and_then(|rt| {
            rt.block_on(run(
                config,
                demo_listen.is_some(),
                cli.config.clone(),
                env,
                telemetry,
                workers,
            ))
        });
    // After the gateway stopped: the last requests' spans go out (bounded wait).
    drop(trace_pipeline);
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("meshgate: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn report_invalid(e: &ConfigError) -> ExitCode {
    eprintln!("meshgate: invalid configuration:");
    for p in e.problems() {
        eprintln!("  {p}");
    }
    ExitCode::from(EXIT_INVALID_CONFIG)
}

async fn run(
    mut config: Config,
    demo: bool,
    path: Option<PathBuf>,
    env: Env,
    telemetry: RequestTelemetry,
    workers: usize,
) -> anyhow::Result<()> {
    let mocks = CancellationToken::new();
    if demo {
        let started = meshgate::demo::start_mocks(&mut config, false, &mocks).await?;
        for s in &started {
            tracing::info!(service = %s.name, addr = %s.addr, "demo service started");
        }
    }
    let listeners = Listeners::bind(&config).await?;
    if demo {
        let admin = listeners.admin.as_ref().and_then(|l| l.local_addr().ok());
        println!("\nmeshgate demo is running. Try:\n");
        for c in meshgate::demo::curl_commands(listeners.main.local_addr()?, admin) {
            println!("  {c}");
        }
        println!("\nPress Ctrl-C to stop (twice to stop at once).\n");
    }
    let mut gateway =
        Gateway::build_with_telemetry(config, telemetry)?.with_serving_threads(workers);
    if let (Some(path), false) = (path, demo) {
        gateway = gateway.with_reload(path, env, true);
        let reloader = gateway.reloader();
        tokio::spawn(async move {
            #[cfg(unix)]
            {
                use tokio::signal::unix::{signal, SignalKind};
                let Ok(mut hup) = signal(SignalKind::hangup()) else {
                    return;
                };
                while hup.recv().await.is_some() {
                    if let Some(r) = &reloader {
                        r.reload_and_log("SIGHUP");
                    }
                }
            }
        });
    }
    let shutdown = async {
        meshgate::server::shutdown_signal().await;
        // A second signal during the drain exits at once.
        tokio::spawn(async {
            meshgate::server::shutdown_signal().await;
            eprintln!("meshgate: second signal, exiting now");
            std::process::exit(130);
        });
    };
    gateway.run(listeners, shutdown).await?;
    mocks.cancel();
    Ok(())
}
