//! The most memory a frame's payload can take once decoded, worked out from its bytes alone,
//! before prost allocates anything.
//!
//! A frame's wire size says little about its decoded size: an empty `GpuSample` is 2 bytes on
//! the wire and a few hundred in memory, so a 4 MiB frame of empty submessages would decode into
//! hundreds of MiB. The aggregator reserves [`bound`] from its in-flight budget before decoding,
//! and refuses a payload whose bound is over the whole budget.
//!
//! How the bound is made, without the schema: the payload is walked as Protocol Buffers fields.
//! Every length-delimited field is charged as if it were a submessage of the largest type in the
//! schema, held in a `Vec` that may have doubled its capacity (two [`LARGEST_MESSAGE`]), plus
//! whatever its own bytes decode to: walked the same way when they parse as fields, else charged
//! as a leaf (a string, bytes or a packed array: at most [`LEAF_FACTOR`] bytes per wire byte,
//! a packed `uint64` of one-byte varints in a doubled `Vec`). Every other field costs
//! [`SCALAR_COST`], enough for an element of a non-packed repeated scalar. A string whose bytes
//! happen to parse as fields is charged as a message, so the bound only ever errs high.
//! Nesting beyond [`MAX_DEPTH`] is charged as a leaf: the schema is not that deep, so nothing
//! down there can be a message prost keeps.

use crate::proto;

/// How deep nested messages are walked; the schema's deepest path (`TelemetryBatch` > `Sample`
/// > `ModelSample` > `Histogram`) is four levels.
pub const MAX_DEPTH: usize = 8;

/// Bytes charged per wire byte of a leaf (string, bytes, packed scalars).
pub const LEAF_FACTOR: usize = 16;

/// Bytes charged per scalar field.
pub const SCALAR_COST: usize = 16;

/// Bytes charged once per payload: prost's error when the bytes do not decode (a boxed
/// description and the path of fields it was in, up to its recursion limit of 100).
pub const ERROR_ALLOWANCE: usize = 8 * 1024;

const fn max(a: usize, b: usize) -> usize {
    if a > b { a } else { b }
}

/// The size of the largest message type in the schema. A message added to
/// `proto/flotilla.proto` must be added here too, or the bound may fall short for it.
pub const LARGEST_MESSAGE: usize = {
    use std::mem::size_of;
    let mut m = size_of::<proto::Hello>();
    m = max(m, size_of::<proto::Welcome>());
    m = max(m, size_of::<proto::Refusal>());
    m = max(m, size_of::<proto::HelloReply>());
    m = max(m, size_of::<proto::Inventory>());
    m = max(m, size_of::<proto::GpuInfo>());
    m = max(m, size_of::<proto::AcceleratorInfo>());
    m = max(m, size_of::<proto::TelemetryBatch>());
    m = max(m, size_of::<proto::Ack>());
    m = max(m, size_of::<proto::Sample>());
    m = max(m, size_of::<proto::HostSample>());
    m = max(m, size_of::<proto::GpuSample>());
    m = max(m, size_of::<proto::GpuProcess>());
    m = max(m, size_of::<proto::AcceleratorSample>());
    m = max(m, size_of::<proto::Directive>());
    m = max(m, size_of::<proto::DirectiveResult>());
    m = max(m, size_of::<proto::ModelSample>());
    max(m, size_of::<proto::Histogram>())
};

/// An upper bound, in bytes, on the heap memory decoding `payload` as any message of the
/// schema can allocate. Bytes that are not a valid message get a bound too (decoding them fails
/// early, allocating no more than a valid prefix would).
pub fn bound(payload: &[u8]) -> usize {
    walk(payload, 0).unwrap_or_else(|partial| partial).saturating_add(ERROR_ALLOWANCE)
}

/// Walks the fields of `buf`. `Ok` with the bound when every byte parses as fields; `Err` with
/// the bound of the fields read before the first byte that does not.
fn walk(mut buf: &[u8], depth: usize) -> Result<usize, usize> {
    let mut total: usize = 0;
    while !buf.is_empty() {
        let Some(key) = varint(&mut buf) else { return Err(total) };
        if key >> 3 == 0 {
            return Err(total); // field number 0 does not exist
        }
        let cost = match key & 7 {
            0 => varint(&mut buf).map(|_| SCALAR_COST),
            1 => skip(&mut buf, 8).map(|()| SCALAR_COST),
            5 => skip(&mut buf, 4).map(|()| SCALAR_COST),
            2 => length_delimited(&mut buf, depth),
            _ => None, // groups (3, 4) are not in the schema; 6 and 7 are not wire types
        };
        let Some(cost) = cost else { return Err(total) };
        total = total.saturating_add(cost);
    }
    Ok(total)
}

fn length_delimited(buf: &mut &[u8], depth: usize) -> Option<usize> {
    let len = usize::try_from(varint(buf)?).ok()?;
    let body = buf.get(..len)?;
    *buf = &buf[len..];
    let as_leaf = len.saturating_mul(LEAF_FACTOR);
    let inner = if depth + 1 < MAX_DEPTH {
        match walk(body, depth + 1) {
            Ok(fields) => fields.max(as_leaf),
            Err(_) => as_leaf,
        }
    } else {
        as_leaf
    };
    Some(inner.saturating_add(2 * LARGEST_MESSAGE))
}

fn varint(buf: &mut &[u8]) -> Option<u64> {
    let mut value: u64 = 0;
    for (i, byte) in buf.iter().take(10).enumerate() {
        value |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            *buf = &buf[i + 1..];
            return Some(value);
        }
    }
    None
}

fn skip(buf: &mut &[u8], n: usize) -> Option<()> {
    *buf = buf.get(n..)?;
    Some(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{GpuSample, Sample, TelemetryBatch};
    use prost::Message;

    #[test]
    fn empty_submessages_are_charged_what_they_cost_decoded() {
        // 100,000 empty samples: 2 bytes each on the wire, a Sample struct each in memory.
        let batch = TelemetryBatch {
            seq: 1,
            samples: vec![Sample::default(); 100_000],
            ..TelemetryBatch::default()
        };
        let wire = batch.encode_to_vec();
        assert!(wire.len() < 210_000, "{}", wire.len());
        let decoded = 100_000 * std::mem::size_of::<Sample>();
        assert!(bound(&wire) >= decoded, "bound {} under {decoded}", bound(&wire));
        assert!(bound(&wire) > 50 * wire.len(), "the blowup is seen: {}", bound(&wire));
    }

    #[test]
    fn a_normal_batch_is_charged_a_few_times_its_wire_size() {
        let sample = Sample {
            unix_ms: 1_700_000_000_000,
            sample_index: 9,
            gpus: vec![
                GpuSample {
                    index: 0,
                    util_gpu_pct: Some(55),
                    power_mw: Some(300_000),
                    throttle_reason_names: vec!["sw_power_cap".into()],
                    ..GpuSample::default()
                };
                8
            ],
            ..Sample::default()
        };
        let batch =
            TelemetryBatch { seq: 3, samples: vec![sample; 50], ..TelemetryBatch::default() };
        let wire = batch.encode_to_vec();
        let b = bound(&wire);
        assert!(b >= wire.len() && b < 200 * wire.len(), "bound {b} for {} bytes", wire.len());
    }

    #[test]
    fn garbage_gets_a_bound_and_no_panic() {
        for bytes in [&[][..], &[0x0f, 0xff], &[0x12, 0x40, 0x01], &[0xff; 11], &[0x0a, 0x00]] {
            let _ = bound(bytes);
        }
        assert_eq!(bound(&[]), ERROR_ALLOWANCE);
        assert_eq!(
            bound(&[0x0a, 0x00]),
            ERROR_ALLOWANCE + 2 * LARGEST_MESSAGE,
            "one empty submessage"
        );
    }

    #[test]
    fn deep_nesting_is_walked_only_to_the_schema_depth() {
        // 200 levels of field 1 wrapping field 1: bounded work and a finite charge.
        let mut bytes = Vec::new();
        for _ in 0..200 {
            let mut outer = vec![0x0a];
            let mut len = bytes.len();
            while len >= 0x80 {
                outer.push(u8::try_from(len & 0x7f).unwrap_or(0) | 0x80);
                len >>= 7;
            }
            outer.push(u8::try_from(len).unwrap_or(0));
            outer.extend_from_slice(&bytes);
            bytes = outer;
        }
        let b = bound(&bytes);
        assert!(b >= MAX_DEPTH * 2 * LARGEST_MESSAGE, "{b}");
    }
}
