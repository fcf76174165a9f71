//! The Flotilla aggregator: QUIC ingest, sled store, admin API, and the `flotilla` CLI.
#![forbid(unsafe_code)]

pub mod views;
