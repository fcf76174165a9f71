//! The Flotilla agent.
#![forbid(unsafe_code)]

pub mod probe;
pub mod telemetry;
