//! A cheap monotonic millisecond clock shared by ejection, slow start and health, built on
//! `tokio::time::Instant` so paused-time tests control it.

use std::sync::OnceLock;

use tokio::time::Instant;

fn base() -> Instant {
    static BASE: OnceLock<Instant> = OnceLock::new();
    *BASE.get_or_init(Instant::now)
}

/// Milliseconds since the first call in this process, plus one, so 0 can mean "unset".
pub fn now_ms() -> u64 {
    base().elapsed().as_millis() as u64 + 1
}
