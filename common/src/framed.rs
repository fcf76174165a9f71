//! Frames on QUIC streams: write one message, read one message with the size limit enforced.
//!
//! The byte-level rules live in [`crate::wire`]; this module only moves them onto quinn streams.
//! A reader that meets a bad frame returns a [`FrameError`] whose [`FrameError::code`] the
//! caller uses to reset that stream; other streams on the connection are untouched.

use prost::Message;
use quinn::{RecvStream, SendStream};

use crate::wire::{self, WireError};

/// Why a frame could not be read or written on a stream.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The bytes were bad (too large, malformed, truncated).
    #[error(transparent)]
    Wire(#[from] WireError),
    /// The stream or connection failed while reading.
    #[error("reading frame")]
    Read(#[source] quinn::ReadExactError),
    /// The stream or connection failed while reading a frame's payload.
    #[error("reading frame payload")]
    ReadPayload(#[source] std::io::Error),
    /// The stream or connection failed while writing.
    #[error("writing frame")]
    Write(#[source] quinn::WriteError),
    /// The peer finished the stream where a frame was expected.
    #[error("stream finished before a frame arrived")]
    Finished,
}

impl FrameError {
    /// The protocol error code to reset the stream with, for errors caused by the peer's bytes.
    pub fn code(&self) -> Option<u32> {
        match self {
            Self::Wire(e) => Some(e.code()),
            Self::Finished => Some(crate::proto::code::UNEXPECTED_MESSAGE),
            Self::Read(_) | Self::ReadPayload(_) | Self::Write(_) => None,
        }
    }
}

/// Bytes reserved up front for a frame; larger frames grow as their bytes arrive.
const INITIAL_BUFFER: usize = 64 * 1024;

/// Writes `msg` as one frame.
pub async fn write<M: Message>(send: &mut SendStream, msg: &M) -> Result<(), FrameError> {
    send.write_all(&wire::encode(msg)).await.map_err(FrameError::Write)
}

/// Reads one frame and decodes it as `M`, refusing frames over `max` bytes before reading them.
pub async fn read<M: Message + Default>(recv: &mut RecvStream, max: u32) -> Result<M, FrameError> {
    let len = read_len(recv, max).await?;
    read_payload(recv, len).await
}

/// Reads a frame's length prefix, refusing a length over `max`. With [`read_payload`] this lets
/// a caller reserve memory for the payload before reading it.
pub async fn read_len(recv: &mut RecvStream, max: u32) -> Result<usize, FrameError> {
    let mut prefix = [0u8; wire::PREFIX_LEN];
    match recv.read_exact(&mut prefix).await {
        Ok(()) => {}
        Err(quinn::ReadExactError::FinishedEarly(0)) => return Err(FrameError::Finished),
        Err(quinn::ReadExactError::FinishedEarly(got)) => {
            return Err(WireError::Truncated { got, expected: wire::PREFIX_LEN }.into());
        }
        Err(e) => return Err(FrameError::Read(e)),
    }
    Ok(wire::check_len(prefix, max)?)
}

/// Reads the `len` payload bytes announced by [`read_len`] and decodes them as `M`.
pub async fn read_payload<M: Message + Default>(
    recv: &mut RecvStream,
    len: usize,
) -> Result<M, FrameError> {
    let payload = read_payload_bytes(recv, len).await?;
    Ok(wire::decode_payload(&payload)?)
}

/// Reads the `len` payload bytes announced by [`read_len`], undecoded (for a caller that
/// sizes them up first, see [`crate::decoded_size`]).
pub async fn read_payload_bytes(recv: &mut RecvStream, len: usize) -> Result<Vec<u8>, FrameError> {
    // Grow the buffer as bytes arrive rather than trusting the prefix: a peer announcing many
    // large frames must not make us allocate memory it never sends.
    let mut payload = Vec::with_capacity(len.min(INITIAL_BUFFER));
    let mut limited = tokio::io::AsyncReadExt::take(&mut *recv, len as u64);
    tokio::io::AsyncReadExt::read_to_end(&mut limited, &mut payload)
        .await
        .map_err(FrameError::ReadPayload)?;
    if payload.len() < len {
        return Err(WireError::Truncated { got: payload.len(), expected: len }.into());
    }
    Ok(payload)
}

/// Resets `send` and stops `recv` with `code`, ignoring streams already closed.
pub fn refuse(send: &mut SendStream, recv: &mut RecvStream, code: u32) {
    let code = quinn::VarInt::from_u32(code);
    let _ = send.reset(code);
    let _ = recv.stop(code);
}
