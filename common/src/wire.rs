//! Length-prefixed framing on bytes only: no tokio, no sockets, no clock.
//!
//! A frame is a 4-byte big-endian length `n` followed by `n` bytes holding one Protocol Buffers
//! message. Invariants:
//! - a length over the caller's maximum is refused before any payload byte is read or buffered;
//! - decoding never panics on any input, it returns a [`WireError`];
//! - an empty payload is a valid frame (a message with every field at its default).

use bytes::{BufMut, Bytes, BytesMut};
use prost::Message;

/// Size of the length prefix in bytes.
pub const PREFIX_LEN: usize = 4;

/// Why bytes could not be turned into a message.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// The length prefix announces more than the receiver accepts.
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge {
        /// Announced payload length.
        len: u64,
        /// The receiver's limit.
        max: u32,
    },
    /// The payload is not a valid encoding of the expected message.
    #[error("frame does not decode as {message}")]
    Malformed {
        /// Name of the expected message type.
        message: &'static str,
        /// prost's reason.
        #[source]
        source: prost::DecodeError,
    },
    /// The payload could decode into more memory than the receiver will hold for it.
    #[error(
        "frame of {len} bytes could decode into {bound} bytes, over the receiver's budget of \
         {max} bytes; send fewer or smaller submessages per frame"
    )]
    DecodesTooLarge {
        /// Payload length on the wire.
        len: usize,
        /// The decoded-size bound ([`crate::decoded_size::bound`]).
        bound: usize,
        /// The receiver's budget.
        max: usize,
    },
    /// The stream ended in the middle of a frame.
    #[error("stream ended inside a frame ({got} of {expected} bytes)")]
    Truncated {
        /// Bytes present.
        got: usize,
        /// Bytes the frame needs.
        expected: usize,
    },
}

impl WireError {
    /// The protocol error code to reset a stream with for this error.
    pub fn code(&self) -> u32 {
        match self {
            Self::TooLarge { .. } | Self::DecodesTooLarge { .. } => {
                crate::proto::code::FRAME_TOO_LARGE
            }
            Self::Malformed { .. } | Self::Truncated { .. } => crate::proto::code::MALFORMED_FRAME,
        }
    }
}

/// Encodes `msg` as one frame. The caller ensures it fits the peer's limit (see
/// [`check_len`]); messages this project builds are far below it.
pub fn encode<M: Message>(msg: &M) -> Bytes {
    let len = msg.encoded_len();
    let mut buf = BytesMut::with_capacity(PREFIX_LEN + len);
    // A message over 4 GiB cannot be framed; saturate so the receiver refuses it as too large.
    buf.put_u32(u32::try_from(len).unwrap_or(u32::MAX));
    // Encoding into a buffer with enough capacity cannot fail.
    msg.encode_raw(&mut buf);
    buf.freeze()
}

/// Reads the payload length from a 4-byte prefix and checks it against `max`.
pub fn check_len(prefix: [u8; PREFIX_LEN], max: u32) -> Result<usize, WireError> {
    let len = u32::from_be_bytes(prefix);
    if len > max {
        return Err(WireError::TooLarge { len: u64::from(len), max });
    }
    // u32 always fits usize on the 32- and 64-bit targets we build for.
    Ok(len as usize)
}

/// Decodes a payload (without its prefix) as `M`.
pub fn decode_payload<M: Message + Default>(payload: &[u8]) -> Result<M, WireError> {
    M::decode(payload).map_err(|source| WireError::Malformed { message: short_name::<M>(), source })
}

/// Decodes one whole frame from the front of `buf`.
///
/// Returns `Ok(None)` when `buf` does not yet hold a whole frame, or `Ok(Some((msg, used)))`
/// with the number of bytes consumed.
pub fn decode_frame<M: Message + Default>(
    buf: &[u8],
    max: u32,
) -> Result<Option<(M, usize)>, WireError> {
    let Some(prefix) = buf.first_chunk::<PREFIX_LEN>() else {
        return Ok(None);
    };
    let len = check_len(*prefix, max)?;
    let end = PREFIX_LEN + len;
    let Some(payload) = buf.get(PREFIX_LEN..end) else {
        return Ok(None);
    };
    Ok(Some((decode_payload(payload)?, end)))
}

fn short_name<M>() -> &'static str {
    let full = std::any::type_name::<M>();
    full.rsplit("::").next().unwrap_or(full)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{Ack, Hello, Inventory, Sample, TelemetryBatch};

    fn batch() -> TelemetryBatch {
        TelemetryBatch {
            seq: 7,
            samples: vec![Sample {
                unix_ms: 1_700_000_000_000,
                sample_index: 3,
                ..Default::default()
            }],
            spool_dropped_batches: 1,
            spool_dropped_samples: 5,
            spool_low_seq: 6,
            clock_offset_ms: Some(-12),
            ..Default::default()
        }
    }

    #[test]
    fn round_trip() {
        let frame = encode(&batch());
        let (back, used) = decode_frame::<TelemetryBatch>(&frame, 1024).unwrap().unwrap();
        assert_eq!(back, batch());
        assert_eq!(used, frame.len());
        let hello = Hello {
            min_version: 1,
            max_version: 1,
            inventory: Some(Inventory { hostname: "h".into(), ..Default::default() }),
            ..Default::default()
        };
        let frame = encode(&hello);
        assert_eq!(decode_frame::<Hello>(&frame, 1024).unwrap().unwrap().0, hello);
    }

    #[test]
    fn partial_frames_wait_for_more() {
        let frame = encode(&batch());
        for cut in 0..frame.len() {
            assert!(decode_frame::<TelemetryBatch>(&frame[..cut], 1024).unwrap().is_none());
        }
    }

    #[test]
    fn oversized_prefix_is_refused_before_payload() {
        let mut buf = vec![0, 0, 16, 1];
        buf.extend([0u8; 8]);
        let err = decode_frame::<Ack>(&buf, 4096).unwrap_err();
        assert!(matches!(err, WireError::TooLarge { len: 4097, max: 4096 }), "{err}");
        assert_eq!(err.code(), crate::proto::code::FRAME_TOO_LARGE);
    }

    #[test]
    fn garbage_is_malformed_not_a_panic() {
        // Field 1 with wire type 7 (invalid), then a truncated varint.
        for payload in [&[0x0f, 0xff][..], &[0x08, 0xff, 0xff][..], &[0x12, 0x40, 0x01][..]] {
            let mut buf = u32::try_from(payload.len()).unwrap().to_be_bytes().to_vec();
            buf.extend_from_slice(payload);
            let err = decode_frame::<TelemetryBatch>(&buf, 1024).unwrap_err();
            assert!(err.to_string().contains("TelemetryBatch"), "{err}");
            assert_eq!(err.code(), crate::proto::code::MALFORMED_FRAME);
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        // A cheap deterministic fuzz: every prefix of a pseudo-random byte string.
        let mut x: u32 = 0x1234_5678;
        let bytes: Vec<u8> = (0..2048)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                x.to_le_bytes()[0]
            })
            .collect();
        for start in 0..bytes.len() {
            let _ = decode_frame::<TelemetryBatch>(&bytes[start..], 1 << 20);
            let _ = decode_payload::<Hello>(&bytes[start..]);
        }
    }

    #[test]
    fn empty_payload_is_default_message() {
        let (ack, used) = decode_frame::<Ack>(&[0, 0, 0, 0], 16).unwrap().unwrap();
        assert_eq!(ack, Ack::default());
        assert_eq!(used, 4);
    }
}
