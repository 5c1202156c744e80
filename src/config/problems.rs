//! The problem collector that walks the raw configuration: every value is parsed and held to its
//! documented range (`crate::limits`), and each problem is kept with its key path.

use std::fmt;
use std::net::SocketAddr;
use std::ops::RangeInclusive;
use std::time::Duration;

use super::raw::{RawSize, Unknown};
use crate::limits::{self, check_duration, check_number, show_size};

/// One configuration problem with the key path it belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Key path, e.g. `routes[2].load_balancer`.
    pub path: String,
    /// What is wrong and what would be right.
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// Collects problems while walking the raw config (every value checked, none skipped).
pub struct Problems {
    /// Every problem found so far.
    pub problems: Vec<Problem>,
}

impl Problems {
    pub(super) fn err(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.problems.push(Problem {
            path: path.into(),
            message: message.into(),
        });
    }

    pub(super) fn unknown(&mut self, base: &str, unknown: &Unknown) {
        for key in unknown.keys() {
            let path = if base.is_empty() {
                key.clone()
            } else {
                format!("{base}.{key}")
            };
            self.err(path, "unknown key");
        }
    }

    /// A duration from 0s to 24h (`limits::DELAY`); see `duration_in` for other ranges.
    pub(super) fn duration(&mut self, path: &str, text: &str) -> Duration {
        self.duration_in(path, text, limits::DELAY)
    }

    /// A size from 0 to 1024GiB (`limits::MAX_BODY`); see `size_in` for other ranges.
    pub(super) fn size(&mut self, path: &str, size: &RawSize) -> u64 {
        self.size_in(path, size, limits::MAX_BODY)
    }

    pub(super) fn socket(&mut self, path: &str, text: &str) -> Option<SocketAddr> {
        match text.parse() {
            Ok(a) => Some(a),
            Err(_) => {
                self.err(
                    path,
                    format!("invalid address {text:?}; expected IP:PORT such as \"0.0.0.0:8080\""),
                );
                None
            }
        }
    }

    /// A count from `min` to `limits::MAX_COUNT`; see `count_in` for other ranges.
    pub(super) fn count(&mut self, path: &str, n: i64, min: i64) -> usize {
        self.count_in(path, n, min..=limits::MAX_COUNT)
    }
}

pub(super) fn parse_size(size: &RawSize) -> Result<u64, String> {
    match size {
        RawSize::Bytes(n) if *n >= 0 => Ok(*n as u64),
        RawSize::Bytes(n) => Err(format!("size must not be negative, got {n}")),
        RawSize::Text(t) => {
            let t = t.trim();
            let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
            let (num, unit) = t.split_at(split);
            let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
                "" | "b" => 1,
                "kb" => 1000,
                "kib" | "k" => 1 << 10,
                "mb" => 1_000_000,
                "mib" | "m" => 1 << 20,
                "gb" => 1_000_000_000,
                "gib" | "g" => 1 << 30,
                _ => {
                    return Err(format!(
                        "invalid size {t:?}; use bytes or a unit: KiB, MiB, GiB, KB, MB, GB"
                    ))
                }
            };
            num.parse::<u64>()
                .ok()
                .and_then(|n| n.checked_mul(mult))
                .ok_or_else(|| {
                    format!("invalid size {t:?}; use bytes or a unit: KiB, MiB, GiB, KB, MB, GB")
                })
        }
    }
}

impl Problems {
    /// A duration key: parsed, then held to `range`. On a problem the range's start stands in,
    /// so one bad value is reported once.
    pub(super) fn duration_in(
        &mut self,
        path: &str,
        text: &str,
        range: RangeInclusive<Duration>,
    ) -> Duration {
        let d = match humantime::parse_duration(text.trim()) {
            Ok(d) => d,
            Err(e) => {
                self.err(
                    path,
                    format!("invalid duration {text:?} ({e}); use e.g. \"250ms\", \"10s\", \"5m\""),
                );
                return *range.start();
            }
        };
        match check_duration(d, &range, &format!("{:?}", text.trim())) {
            Ok(()) => d,
            Err(m) => {
                self.err(path, m);
                *range.start()
            }
        }
    }

    /// A count key held to `range`; on a problem the nearest bound stands in.
    pub(super) fn count_in(&mut self, path: &str, n: i64, range: RangeInclusive<i64>) -> usize {
        if let Err(m) = check_number(n, &range) {
            self.err(path, m);
        }
        n.clamp(*range.start(), *range.end()).max(0) as usize
    }

    /// A size key (`"64KiB"` or bytes) held to `range`; on a problem the range's start stands in.
    pub(super) fn size_in(
        &mut self,
        path: &str,
        size: &RawSize,
        range: RangeInclusive<u64>,
    ) -> u64 {
        let n = match size {
            // Below every range, like any other value outside it.
            RawSize::Bytes(b) if *b < 0 => None,
            _ => match parse_size(size) {
                Ok(n) => Some(n),
                Err(m) => {
                    self.err(path, m);
                    return *range.start();
                }
            },
        };
        if let Some(n) = n.filter(|n| range.contains(n)) {
            return n;
        }
        let got = match size {
            RawSize::Bytes(b) => format!("{b} bytes"),
            RawSize::Text(t) => t.trim().to_owned(),
        };
        self.err(
            path,
            format!(
                "must be from {} to {}, got {got}",
                show_size(*range.start()),
                show_size(*range.end())
            ),
        );
        *range.start()
    }
}
