//! End-to-end tests: one binary, one module per area.
//!
//! - `admin`: the admin API token and its JSON errors.
//! - `analytics`: backdated seasonal telemetry -> forecast, costs, plans, a budget alert on a
//!   webhook.
//! - `control`: directives from the CLI applied once by a real agent serving a real model,
//!   refused by name, delivered after a disconnect, and not re-applied after an agent restart;
//!   load scaling a model up at once and down after the stabilization window; a crossed
//!   `auto_optimize` budget recording directives.
//! - `engines`: models on onnxruntime and on `auto` through Triton's Python client, equal to
//!   tract's outputs; a missing onnxruntime library; Triton's perf_analyzer, unmodified;
//!   HTTP/2 clients on the inference port.
//! - `fleet`: a real aggregator and agents as separate processes, seen through the CLI.
//! - `security`: certificates from another CA, expired and revoked, refused at the handshake.
//! - `durability`: the aggregator SIGKILLed and restarted loses and duplicates nothing.
//! - `crashes`: SIGKILL cycles of the aggregator during ingest and of an agent during spool
//!   writes, audited sample by sample in the store.
//! - `faults`: loss, duplication, reordering and a partition from the loopback UDP relay.
//! - `lifecycle`: a slow model with requests in flight through unload, SIGTERM and a second
//!   signal: every request answered, the stop bounded, the spool sealed.
//! - `frames`: malformed and oversized frames and bad Hellos, from a hand-driven QUIC client.
//! - `serving`: an agent serving the shared ONNX models to Triton's Python client; overload.
//! - `startup`: bad configs exit 64 naming every key; the CLI without an aggregator; `flotilla up`.
//!
//! Run `cargo build --bins` first: the tests start the real binaries.

// Test code: a failed unwrap is a failed test, and times here are far from overflowing.
#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

mod admin;
mod analytics;
mod control;
mod crashes;
mod durability;
mod engines;
mod faults;
mod fleet;
mod frames;
mod lifecycle;
mod security;
mod serving;
mod startup;
