//! Logging setup: a `RUST_LOG`-style filter and text or JSON lines. OpenTelemetry export will
//! be wired here and only here.

use tracing_subscriber::EnvFilter;

use crate::config::LogConfig;

/// Installs the global subscriber. `RUST_LOG`, when set, wins over `[log] level`.
/// Returns false when a subscriber was already installed (tests, embedding applications).
pub fn init(log: &LogConfig, rust_log: Option<String>) -> bool {
    let filter = rust_log
        .and_then(|f| EnvFilter::try_new(f).ok())
        .or_else(|| EnvFilter::try_new(&log.level).ok())
        .unwrap_or_else(|| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false);
    if log.json {
        builder.json().flatten_event(true).try_init().is_ok()
    } else {
        builder.try_init().is_ok()
    }
}
