//! cargo-fuzz entry for the `request_head` target; the body is shared with tests/fuzz_corpus.rs.
#![no_main]

#[path = "../targets.rs"]
mod targets;

libfuzzer_sys::fuzz_target!(|data: &[u8]| targets::request_head(data));
