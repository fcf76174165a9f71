//! The versioned wire schema, generated from `common/proto/flotilla.proto` by prost, plus the
//! protocol constants and QUIC error codes that go with it.
//!
//! `docs/protocol.md` describes the streams; the `.proto` file is the single source of the
//! message layouts.

#![allow(missing_docs, unreachable_pub, clippy::use_self)]

include!(concat!(env!("OUT_DIR"), "/flotilla.v1.rs"));

/// ALPN protocol id negotiated in the TLS handshake.
pub const ALPN: &[u8] = b"flotilla/1";

/// Lowest protocol version this build speaks.
pub const MIN_VERSION: u32 = 1;

/// Highest protocol version this build speaks.
pub const MAX_VERSION: u32 = 1;

/// Largest frame either side accepts by default (4 MiB).
pub const DEFAULT_MAX_FRAME_BYTES: u32 = 4 * 1024 * 1024;

/// Application error codes used to reset streams and close connections.
///
/// Values are part of the protocol: never renumber them.
pub mod code {
    /// Normal close (shutdown, or the peer is done).
    pub const OK: u32 = 0;
    /// A frame could not be decoded as the expected message.
    pub const MALFORMED_FRAME: u32 = 0x10;
    /// A frame's length prefix is over the maximum.
    pub const FRAME_TOO_LARGE: u32 = 0x11;
    /// The peer failed to process a well-formed message (e.g. storage error); retry later.
    pub const INTERNAL: u32 = 0x12;
    /// A message arrived on a stream that does not expect it, or out of order.
    pub const UNEXPECTED_MESSAGE: u32 = 0x13;
    /// The Hello's version range does not meet the aggregator's.
    pub const VERSION_REFUSED: u32 = 0x20;
    /// The host's certificate has been revoked while connected.
    pub const REVOKED: u32 = 0x21;
    /// The first stream did not carry a Hello in time.
    pub const HELLO_MISSING: u32 = 0x22;
    /// The same host connected again; this older connection is replaced.
    pub const REPLACED: u32 = 0x23;

    /// A short name for a code, for logs.
    pub fn name(code: u64) -> &'static str {
        match u32::try_from(code) {
            Ok(OK) => "ok",
            Ok(MALFORMED_FRAME) => "malformed_frame",
            Ok(FRAME_TOO_LARGE) => "frame_too_large",
            Ok(INTERNAL) => "internal",
            Ok(UNEXPECTED_MESSAGE) => "unexpected_message",
            Ok(VERSION_REFUSED) => "version_refused",
            Ok(REVOKED) => "revoked",
            Ok(HELLO_MISSING) => "hello_missing",
            Ok(REPLACED) => "replaced",
            _ => "unknown",
        }
    }
}

/// Picks the highest version both ranges share, if any.
pub fn negotiate_version(agent_min: u32, agent_max: u32) -> Option<u32> {
    let high = agent_max.min(MAX_VERSION);
    let low = agent_min.max(MIN_VERSION);
    (low <= high).then_some(high)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_negotiation_picks_highest_common() {
        assert_eq!(negotiate_version(1, 1), Some(1));
        assert_eq!(negotiate_version(1, 9), Some(MAX_VERSION));
        assert_eq!(negotiate_version(MAX_VERSION + 1, MAX_VERSION + 3), None);
        assert_eq!(negotiate_version(0, 0), None);
    }
}
