//! Pure request rules with no state of their own: path matching, rewriting and normalisation,
//! request-head checks, header edits, CORS, retry policy and the concurrency limiter.

pub mod cors;
pub mod head;
pub mod headers;
pub mod limit;
pub mod path;
pub mod retry;
