//! The documented range of every numeric, size and duration key, and the one place that checks
//! a value against its range: whatever `validate` accepts, the runtime can hold (no instant
//! overflows, no allocation sized by a typo, no limit of zero that wedges a listener).

use std::ops::RangeInclusive;
use std::time::Duration;

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

/// The longest duration any key accepts: a day. Longer means "never" in practice, and a day
/// can be added to any instant without overflow.
pub const MAX_DURATION: Duration = Duration::from_secs(24 * 60 * 60);

/// Timeouts: from 1ms, since zero would fail or close everything at once.
pub const TIMEOUT: RangeInclusive<Duration> = Duration::from_millis(1)..=MAX_DURATION;

/// Delays, periods and caps where zero means "none" or "off".
pub const DELAY: RangeInclusive<Duration> = Duration::ZERO..=MAX_DURATION;

/// `server.header_read_timeout`: from 100ms, since zero closes every connection unread and a
/// few milliseconds cut off ordinary clients on real networks.
pub const HEADER_READ_TIMEOUT: RangeInclusive<Duration> = Duration::from_millis(100)..=MAX_DURATION;

/// `routes[].health_check.interval`: probing more often than every 10ms only adds load.
pub const HEALTH_INTERVAL: RangeInclusive<Duration> = Duration::from_millis(10)..=MAX_DURATION;

/// `discovery.consul.wait`: Consul clamps anything above its `max_query_time` (600s), and zero
/// would make it block for its own 5-minute default.
pub const CONSUL_WAIT: RangeInclusive<Duration> =
    Duration::from_millis(1)..=Duration::from_secs(600);

/// Upper bound of counts without a tighter range of their own (thresholds, queued requests).
pub const MAX_COUNT: i64 = 1_000_000;

/// `workers`: runtime threads, all started up front.
pub const WORKERS: RangeInclusive<usize> = 1..=1024;

/// `upstream.max_idle_per_host`: the idle queue of each endpoint is allocated at this size.
pub const MAX_IDLE_PER_HOST: RangeInclusive<i64> = 0..=10_000;

/// `server.max_connections`: a semaphore's permits (tokio caps them at `usize::MAX >> 3`).
pub const MAX_CONNECTIONS: RangeInclusive<i64> = 1..=1_000_000;

/// `server.h2_max_concurrent_streams`: beyond it one connection could start more work than a
/// whole well-behaved client population.
pub const H2_MAX_CONCURRENT_STREAMS: RangeInclusive<i64> = 1..=10_000;

/// `server.max_headers`: hyper allocates room for this many headers per request.
pub const MAX_HEADERS: RangeInclusive<i64> = 1..=10_000;

/// `server.max_header_bytes`: hyper's read buffer cannot be smaller than 8KiB, and HTTP/2
/// takes the limit as a `u32`.
pub const MAX_HEADER_BYTES: RangeInclusive<u64> = 8 * KIB..=MIB;

/// `routes[].max_requests`: a semaphore's permits.
pub const MAX_REQUESTS: RangeInclusive<i64> = 1..=MAX_COUNT;

/// `routes[].max_pending`.
pub const MAX_PENDING: RangeInclusive<i64> = 0..=MAX_COUNT;

/// `routes[].retry.attempts`, the first included.
pub const ATTEMPTS: RangeInclusive<i64> = 1..=10;

/// `routes[].health_check.healthy_threshold` and `unhealthy_threshold`.
pub const THRESHOLD: RangeInclusive<i64> = 1..=10_000;

/// `routes[].outlier.consecutive_5xx` and `consecutive_gateway_failures` (0 = off).
pub const CONSECUTIVE: RangeInclusive<i64> = 0..=10_000;

/// `routes[].max_body`: a limit, never an allocation; beyond a TiB it means "unlimited".
pub const MAX_BODY: RangeInclusive<u64> = 0..=1024 * GIB;

/// `routes[].retry.max_body`: bodies up to this size are held in memory for replay.
pub const RETRY_MAX_BODY: RangeInclusive<u64> = 0..=64 * MIB;

/// `discovery.consul.max_watches`: one HTTP connection to Consul each.
pub const CONSUL_MAX_WATCHES: RangeInclusive<usize> = 1..=10_000;

/// `OTEL_EXPORTER_OTLP_TIMEOUT` and `OTEL_BSP_SCHEDULE_DELAY`, in milliseconds (1ms to 24h).
pub const OTEL_MILLIS: RangeInclusive<u64> = 1..=86_400_000;

/// `OTEL_BSP_MAX_QUEUE_SIZE` and `OTEL_BSP_MAX_EXPORT_BATCH_SIZE`: both allocated up front.
pub const OTEL_SPANS: RangeInclusive<u64> = 1..=65_536;

/// `Err` with the message `validate` reports when `d` is outside `range`; `got` is the value
/// as the user wrote it.
pub fn check_duration(
    d: Duration,
    range: &RangeInclusive<Duration>,
    got: &str,
) -> Result<(), String> {
    if range.contains(&d) {
        return Ok(());
    }
    Err(format!(
        "must be from {} to {}, got {got}",
        show_duration(*range.start()),
        show_duration(*range.end())
    ))
}

/// `Err` with the message `validate` reports when `n` is outside `range`.
pub fn check_number<T: PartialOrd + std::fmt::Display>(
    n: T,
    range: &RangeInclusive<T>,
) -> Result<(), String> {
    if range.contains(&n) {
        return Ok(());
    }
    Err(format!(
        "must be from {} to {}, got {n}",
        range.start(),
        range.end()
    ))
}

/// A bound as a user would write it: `0s`, `1ms`, `600s`, `24h`.
pub fn show_duration(d: Duration) -> String {
    let s = d.as_secs();
    match () {
        _ if d.subsec_nanos() != 0 => format!("{}ms", d.as_millis()),
        _ if s != 0 && s % 3600 == 0 => format!("{}h", s / 3600),
        _ => format!("{s}s"),
    }
}

/// A size bound as a user would write it: `8KiB`, `64MiB`, `1024GiB`, `0`.
pub fn show_size(n: u64) -> String {
    match n {
        0 => "0".to_owned(),
        _ if n % GIB == 0 => format!("{}GiB", n / GIB),
        _ if n % MIB == 0 => format!("{}MiB", n / MIB),
        _ if n % KIB == 0 => format!("{}KiB", n / KIB),
        _ => format!("{n} bytes"),
    }
}
