//! Property tests over arbitrary bytes and arbitrary structured inputs: the stand-in for a
//! coverage-guided fuzzer, which needs a nightly toolchain we do not have.
//!
//! Targets: the frame decoder, decoding of every protocol message followed by validation,
//! `LogHistogram` from the wire with `quantile`/`merge`/`count_at_most`, and both config parsers.
//! The property is always "returns, never panics" plus, where there is one, a round trip.
//! CI runs a small count (the `proptest` default of 256 per target, a few seconds); a longer run:
//! `PROPTEST_CASES=200000 cargo test -p common --test properties --release`.
//! A case that ever fails becomes a named regression test beside the code it broke.

use std::path::Path;

use common::config::agent::AgentConfig;
use common::config::aggregator::AggregatorConfig;
use common::histogram::LogHistogram;
use common::proto::{
    Ack, Directive, DirectiveResult, Hello, HelloReply, Histogram, ModelSample, Sample,
    TelemetryBatch,
};
use common::{validate, wire};
use proptest::prelude::*;
use prost::Message;

/// Every message type a peer can send, decoded from the same bytes, then validated where a
/// validator exists.
fn decode_everything(bytes: &[u8]) {
    if let Ok(b) = wire::decode_payload::<TelemetryBatch>(bytes) {
        let _ = validate::batch(&b, 50_000);
        // Reading a validated batch the way the aggregator does must not panic either.
        for s in &b.samples {
            for m in &s.models {
                let mut totals = common::model_stats::ModelTotals::default();
                if totals.add(m).is_ok() {
                    let _ = totals.latency_ms(0.99);
                    let _ = totals.batch_utilization();
                }
            }
        }
    }
    if let Ok(h) = wire::decode_payload::<Hello>(bytes) {
        let _ = validate::hello(&h);
    }
    let _ = wire::decode_payload::<HelloReply>(bytes);
    let _ = wire::decode_payload::<Ack>(bytes);
    let _ = wire::decode_payload::<Directive>(bytes);
    let _ = wire::decode_payload::<DirectiveResult>(bytes);
    let _ = wire::decode_payload::<Sample>(bytes);
    let _ = wire::decode_payload::<ModelSample>(bytes);
    if let Ok(h) = wire::decode_payload::<Histogram>(bytes) {
        exercise_histogram(&h);
    }
}

fn exercise_histogram(wire: &Histogram) {
    if let Ok(h) = LogHistogram::from_proto(wire) {
        for q in [0.0, 0.5, 0.99, 1.0, f64::NAN, -1.0, 2.0] {
            if let (Some(v), Some(min), Some(max)) = (h.quantile(q), h.min(), h.max()) {
                assert!(min <= v && v <= max, "quantile {v} outside {min}..={max}");
            }
        }
        let mut merged = h.clone();
        merged.merge(&h);
        let _ = merged.quantile(0.5);
        let _ = merged.count_at_most(u64::MAX / 2);
        // What was accepted goes back out unchanged (canonical form).
        assert_eq!(LogHistogram::from_proto(&h.to_proto()).as_ref(), Ok(&h));
    }
}

fn arb_histogram() -> impl Strategy<Value = Histogram> {
    (
        proptest::collection::vec((0u32..2000, any::<u64>()), 0..8),
        any::<u64>(),
        any::<u64>(),
        any::<u64>(),
        any::<u64>(),
        any::<bool>(),
    )
        .prop_map(|(mut buckets, count, sum, min, max, honest)| {
            buckets.sort_by_key(|b| b.0);
            buckets.dedup_by_key(|b| b.0);
            let (bucket_index, bucket_count): (Vec<u32>, Vec<u64>) = buckets.into_iter().unzip();
            // Half the cases state a matching count so the deeper checks are reached.
            let count = if honest {
                bucket_count.iter().fold(0u64, |a, n| a.saturating_add(*n))
            } else {
                count
            };
            Histogram { bucket_index, bucket_count, count, sum, min, max }
        })
}

proptest! {
    #[test]
    fn frame_decoder_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512), max in any::<u32>()) {
        if let Ok(Some((_, used))) = wire::decode_frame::<TelemetryBatch>(&bytes, max) {
            prop_assert!(used <= bytes.len());
        }
        let _ = wire::decode_frame::<Hello>(&bytes, max);
    }

    #[test]
    fn every_message_decodes_or_errs_then_validates(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        decode_everything(&bytes);
    }

    #[test]
    fn structured_batches_validate_without_panicking(
        hists in proptest::collection::vec(arb_histogram(), 0..4),
        counters in proptest::collection::vec(any::<u64>(), 8),
        cpu in any::<f32>(),
        names in proptest::collection::vec(".{0,300}", 2),
    ) {
        let mut it = hists.into_iter();
        let model = ModelSample {
            model: names[0].clone(),
            version: names[1].clone(),
            requests: counters[0],
            successes: counters[1],
            failures: counters[2],
            rejected: counters[3],
            expired: counters[4],
            inferences: counters[5],
            batches: counters[6],
            batch_slots: counters[7],
            latency_us: it.next(),
            queue_us: it.next(),
            compute_us: it.next(),
            batch_size: it.next(),
            ..ModelSample::default()
        };
        let batch = TelemetryBatch {
            seq: counters[0],
            samples: vec![Sample {
                host: Some(common::proto::HostSample { cpu_util_pct: cpu, ..Default::default() }),
                models: vec![model.clone(), model],
                ..Sample::default()
            }],
            ..TelemetryBatch::default()
        };
        let valid = validate::batch(&batch, 10).is_ok();
        // The encoded form decodes back to the same message and the same verdict.
        let again = wire::decode_payload::<TelemetryBatch>(&batch.encode_to_vec()).unwrap();
        prop_assert_eq!(validate::batch(&again, 10).is_ok(), valid);
        decode_everything(&batch.encode_to_vec());
    }

    #[test]
    fn histograms_from_the_wire_never_panic(h in arb_histogram()) {
        exercise_histogram(&h);
    }

    #[test]
    fn config_parsers_never_panic(text in "(\\[[a-z_.]{0,12}\\]\n|[a-z_]{1,24} = (\"[^\"\n]{0,20}\"|-?[0-9]{1,20}|true|\\[\\])\n|.{0,40}\n){0,12}") {
        let _ = AgentConfig::parse(&text, "prop.toml", Path::new("/tmp"));
        let _ = AggregatorConfig::parse(&text, "prop.toml", Path::new("/tmp"));
    }

    #[test]
    fn config_parsers_take_arbitrary_values_for_real_keys(
        n in any::<i64>(), f in any::<f64>(), s in ".{0,40}",
    ) {
        // Every example key set to hostile values: each is refused with a message or accepted.
        for example in [
            include_str!("../../config/agent.toml"),
            include_str!("../../config/aggregator.toml"),
        ] {
            for value in [n.to_string(), format!("{f:?}"), format!("{s:?}")] {
                let text: String = example
                    .lines()
                    .map(|l| match l.split_once(" = ") {
                        Some((k, _)) if !l.starts_with('#') => format!("{k} = {value}\n"),
                        _ => format!("{l}\n"),
                    })
                    .collect();
                let _ = AgentConfig::parse(&text, "prop.toml", Path::new("/tmp"));
                let _ = AggregatorConfig::parse(&text, "prop.toml", Path::new("/tmp"));
            }
        }
    }
}
