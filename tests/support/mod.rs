//! Test support: real loopback servers and the real gateway. Not every test uses every helper.
#![allow(dead_code)]

pub mod consul;
pub mod gateway;
pub mod h2;
pub mod raw;
pub mod redis;
pub mod sidecar;
pub mod upstream;
pub mod util;
pub mod wire;
pub mod ws;
