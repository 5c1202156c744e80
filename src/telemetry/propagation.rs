//! W3C trace context in HTTP headers: the header names, the trace id the access log reads
//! from `traceparent`, and the carriers the OpenTelemetry propagator reads and writes through.

use http::header::{HeaderMap, HeaderValue};
use opentelemetry::propagation::{Extractor, Injector};

/// The W3C `tracestate` header.
pub(super) static TRACESTATE: http::HeaderName = http::HeaderName::from_static("tracestate");

/// The W3C `traceparent` header.
pub static TRACEPARENT: http::HeaderName = http::HeaderName::from_static("traceparent");

/// The trace id of a well-formed `traceparent` (`00-<32 hex>-<16 hex>-<2 hex>`).
pub(super) fn traceparent_trace_id(v: &str) -> Option<String> {
    let id = v.get(3..35)?;
    (v.len() >= 55 && id.bytes().all(|b| b.is_ascii_hexdigit()) && id.bytes().any(|b| b != b'0'))
        .then(|| id.to_ascii_lowercase())
}

/// Reads trace context from request headers.
pub(super) struct HeaderExtractor<'a>(pub(super) &'a HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

/// Writes trace context into request headers.
pub(super) struct HeaderInjector<'a>(pub(super) &'a mut HeaderMap);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        // An empty tracestate means "none": send no header rather than an empty one.
        if value.is_empty() {
            return;
        }
        if let (Ok(name), Ok(value)) = (
            http::HeaderName::from_bytes(key.as_bytes()),
            HeaderValue::from_str(&value),
        ) {
            self.0.insert(name, value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_parsing() {
        assert_eq!(
            traceparent_trace_id("00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01")
                .as_deref(),
            Some("4bf92f3577b34da6a3ce929d0e0e4736")
        );
        assert_eq!(traceparent_trace_id("00-short"), None);
        assert_eq!(
            traceparent_trace_id("00-00000000000000000000000000000000-00f067aa0ba902b7-01"),
            None
        );
    }
}
