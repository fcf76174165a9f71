//! Checks [`common::decoded_size::bound`] against what decoding really allocates: an
//! instrumented allocator counts the heap bytes allocated while prost decodes (allocations plus
//! net growth by realloc, which is at least the peak), and that must never pass the bound, for
//! well-formed messages and for arbitrary field trees that are shaped like Protocol Buffers but
//! ignore the schema (the adversary's case).
//!
//! The counters are process-wide, so this binary has a single `#[test]` that runs every
//! property in turn: no other test thread allocates while one is measured.

use std::alloc::System;

use common::decoded_size::bound;
use common::proto::{GpuSample, Hello, Histogram, ModelSample, Sample, TelemetryBatch};
use common::wire;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use prost::Message;
use stats_alloc::{INSTRUMENTED_SYSTEM, Region, StatsAlloc};

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

/// Heap bytes allocated while `f` runs (its result kept alive until measured).
fn allocated_during<T>(f: impl FnOnce() -> T) -> (usize, T) {
    let region = Region::new(GLOBAL);
    let out = f();
    let change = region.change();
    let grown = usize::try_from(change.bytes_reallocated.max(0)).unwrap_or(usize::MAX);
    (change.bytes_allocated + grown, out)
}

fn check(payload: &[u8]) -> Result<(), TestCaseError> {
    let limit = bound(payload);
    let (batch_bytes, batch) = allocated_during(|| wire::decode_payload::<TelemetryBatch>(payload));
    prop_assert!(batch_bytes <= limit, "TelemetryBatch: {batch_bytes} > bound {limit}");
    drop(batch);
    let (hello_bytes, hello) = allocated_during(|| wire::decode_payload::<Hello>(payload));
    prop_assert!(hello_bytes <= limit, "Hello: {hello_bytes} > bound {limit}");
    drop(hello);
    Ok(())
}

/// A tree of fields shaped like Protocol Buffers with no regard to the schema: field numbers
/// 1..=30, varints, fixed32/64 and length-delimited fields holding more fields or raw bytes.
#[derive(Debug, Clone)]
enum Field {
    Varint(u32, u64),
    Fixed32(u32),
    Fixed64(u32),
    Bytes(u32, Vec<u8>),
    Nested(u32, Vec<Self>),
}

fn arb_fields() -> impl Strategy<Value = Vec<Field>> {
    let leaf = prop_oneof![
        (1u32..=30, any::<u64>()).prop_map(|(n, v)| Field::Varint(n, v)),
        (1u32..=30).prop_map(Field::Fixed32),
        (1u32..=30).prop_map(Field::Fixed64),
        (1u32..=30, proptest::collection::vec(any::<u8>(), 0..24))
            .prop_map(|(n, b)| Field::Bytes(n, b)),
        (1u32..=30).prop_map(|n| Field::Nested(n, Vec::new())),
    ];
    let tree = leaf.prop_recursive(4, 200, 20, |inner| {
        (1u32..=30, proptest::collection::vec(inner, 0..20)).prop_map(|(n, f)| Field::Nested(n, f))
    });
    proptest::collection::vec(tree, 0..60)
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push(u8::try_from(v & 0x7f).unwrap_or(0) | 0x80);
        v >>= 7;
    }
    out.push(u8::try_from(v).unwrap_or(0));
}

fn encode_fields(fields: &[Field], out: &mut Vec<u8>) {
    for f in fields {
        match f {
            Field::Varint(n, v) => {
                put_varint(out, u64::from(*n) << 3);
                put_varint(out, *v);
            }
            Field::Fixed32(n) => {
                put_varint(out, (u64::from(*n) << 3) | 5);
                out.extend_from_slice(&[1, 0, 0, 0]);
            }
            Field::Fixed64(n) => {
                put_varint(out, (u64::from(*n) << 3) | 1);
                out.extend_from_slice(&[1, 0, 0, 0, 0, 0, 0, 0]);
            }
            Field::Bytes(n, b) => {
                put_varint(out, (u64::from(*n) << 3) | 2);
                put_varint(out, b.len() as u64);
                out.extend_from_slice(b);
            }
            Field::Nested(n, inner) => {
                let mut body = Vec::new();
                encode_fields(inner, &mut body);
                put_varint(out, (u64::from(*n) << 3) | 2);
                put_varint(out, body.len() as u64);
                out.extend_from_slice(&body);
            }
        }
    }
}

fn arb_batch() -> impl Strategy<Value = TelemetryBatch> {
    let gpu = (any::<u32>(), proptest::collection::vec(".{0,40}", 0..4)).prop_map(|(i, names)| {
        GpuSample { index: i, throttle_reason_names: names, ..GpuSample::default() }
    });
    let hist = (proptest::collection::vec(any::<u32>(), 0..50), any::<u64>()).prop_map(
        |(index, count)| Histogram {
            bucket_count: vec![count; index.len()],
            bucket_index: index,
            ..Histogram::default()
        },
    );
    let model = (".{0,30}", proptest::option::of(hist)).prop_map(|(name, h)| ModelSample {
        model: name,
        latency_us: h,
        ..ModelSample::default()
    });
    let sample = (
        any::<i64>(),
        proptest::collection::vec(gpu, 0..9),
        proptest::collection::vec(model, 0..5),
    )
        .prop_map(|(t, gpus, models)| Sample { unix_ms: t, gpus, models, ..Sample::default() });
    (1u64.., proptest::collection::vec(sample, 0..30)).prop_map(|(seq, samples)| TelemetryBatch {
        seq,
        samples,
        ..TelemetryBatch::default()
    })
}

fn run<S: Strategy>(strategy: S, test: impl Fn(S::Value) -> Result<(), TestCaseError>) {
    let config = Config { failure_persistence: None, ..Config::default() };
    let mut runner = TestRunner::new(config);
    if let Err(e) = runner.run(&strategy, test) {
        panic!("{e}");
    }
}

#[test]
fn decoding_never_allocates_more_than_the_bound() {
    // The counter is live: a known allocation is seen (else every check below would pass).
    let (seen, kept) = allocated_during(|| vec![1u8; 4096]);
    assert!(seen >= 4096 && kept.len() == 4096, "the instrumented allocator saw {seen} bytes");

    // The attack the bound exists for: field 2 (samples) repeated, each empty, and samples
    // holding empty gpus (field 4) in turn.
    let mut payload = Vec::new();
    for _ in 0..20_000 {
        payload.extend_from_slice(&[0x12, 0x00]);
    }
    let sample_of_gpus: Vec<u8> = std::iter::repeat_n([0x22u8, 0x00], 100).flatten().collect();
    for _ in 0..100 {
        payload.push(0x12);
        put_varint(&mut payload, sample_of_gpus.len() as u64);
        payload.extend_from_slice(&sample_of_gpus);
    }
    check(&payload).unwrap();

    run(arb_batch(), |batch| check(&batch.encode_to_vec()));
    run(arb_fields(), |fields| {
        let mut payload = Vec::new();
        encode_fields(&fields, &mut payload);
        check(&payload)
    });
    run(proptest::collection::vec(any::<u8>(), 0..512), |bytes| check(&bytes));
}
