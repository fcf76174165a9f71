//! Checking decoded messages before anything stores or reads them: the one place that says what
//! a well-formed `Hello` and `TelemetryBatch` are.
//!
//! A frame that decodes is not yet trusted: prost accepts any field values. The aggregator runs
//! [`batch`] and [`hello`] on every decoded message and refuses the whole message on the first
//! problem, with an [`Invalid`] whose [`Invalid::reason`] is a short label for counters and whose
//! `Display` names the field and what to fix. Invariants, once a message passes:
//! - every histogram passes [`LogHistogram::from_proto`], so readers never meet `min > max`;
//! - every float is finite, percentages are within 0..=100;
//! - every string is at most [`MAX_STRING_BYTES`] bytes without control characters (names reach
//!   operators' terminals), and every list is within the caps below.
//!
//! Pure: no I/O, no clock.

use crate::histogram::LogHistogram;
use crate::proto::{Hello, ModelSample, Sample, TelemetryBatch};

/// Longest string field accepted, in bytes (names, ids, labels, versions).
pub const MAX_STRING_BYTES: usize = 256;
/// Most GPUs per host.
pub const MAX_GPUS: usize = 64;
/// Most accelerators per host or sample.
pub const MAX_ACCELERATORS: usize = 256;
/// Most metrics per accelerator sample.
pub const MAX_METRICS: usize = 256;
/// Most CPU cores reported per sample.
pub const MAX_CORES: usize = 8192;
/// Most model versions per sample.
pub const MAX_MODELS: usize = 1024;
/// Most GPU processes or throttle reason names per GPU sample.
pub const MAX_GPU_LIST: usize = 4096;
/// Most inventory labels.
pub const MAX_LABELS: usize = 64;

/// Why a decoded message was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {problem}")]
pub struct Invalid {
    /// Short label for counters (`histogram`, `string`, `list`, `number`, `samples`).
    reason: &'static str,
    /// Dotted path of the offending field, e.g. `samples[3].models[0].latency_us`.
    pub field: String,
    /// What is wrong and what would be right.
    pub problem: String,
}

impl Invalid {
    fn new(reason: &'static str, field: impl Into<String>, problem: impl Into<String>) -> Self {
        Self { reason, field: field.into(), problem: problem.into() }
    }

    /// A short, fixed label for the kind of problem, usable as a metrics label value.
    pub fn reason(&self) -> &'static str {
        self.reason
    }

    /// Every label [`Invalid::reason`] can return, for pre-declaring counters.
    pub const REASONS: [&'static str; 5] = ["histogram", "string", "list", "number", "samples"];
}

/// Checks a telemetry batch; `max_samples` is the aggregator's per-batch cap.
pub fn batch(b: &TelemetryBatch, max_samples: usize) -> Result<(), Invalid> {
    if b.seq == 0 {
        return Err(Invalid::new("number", "seq", "must be at least 1 (seqs start at 1)"));
    }
    if b.samples.len() > max_samples {
        return Err(Invalid::new(
            "samples",
            "samples",
            format!(
                "{} samples is over this aggregator's limit of {max_samples} per batch \
                 (ingest.max_batch_samples); seal batches more often",
                b.samples.len()
            ),
        ));
    }
    for (i, s) in b.samples.iter().enumerate() {
        sample(s, &format!("samples[{i}]"))?;
    }
    Ok(())
}

/// Checks a Hello's inventory and version strings.
pub fn hello(h: &Hello) -> Result<(), Invalid> {
    text(&h.agent_version, "agent_version")?;
    text(&h.config_version, "config_version")?;
    let Some(inv) = &h.inventory else { return Ok(()) };
    for (value, field) in [
        (&inv.hostname, "inventory.hostname"),
        (&inv.os, "inventory.os"),
        (&inv.kernel, "inventory.kernel"),
        (&inv.cpu_brand, "inventory.cpu_brand"),
    ] {
        text(value, field)?;
    }
    list(inv.gpus.len(), MAX_GPUS, "inventory.gpus")?;
    for (i, g) in inv.gpus.iter().enumerate() {
        text(&g.uuid, &format!("inventory.gpus[{i}].uuid"))?;
        text(&g.name, &format!("inventory.gpus[{i}].name"))?;
        text(&g.driver_version, &format!("inventory.gpus[{i}].driver_version"))?;
    }
    list(inv.accelerators.len(), MAX_ACCELERATORS, "inventory.accelerators")?;
    for (i, a) in inv.accelerators.iter().enumerate() {
        text(&a.source, &format!("inventory.accelerators[{i}].source"))?;
        text(&a.device, &format!("inventory.accelerators[{i}].device"))?;
    }
    list(inv.labels.len(), MAX_LABELS, "inventory.labels")?;
    for (k, v) in &inv.labels {
        text(k, "inventory.labels (a key)")?;
        text(v, &format!("inventory.labels.{}", k.escape_debug()))?;
    }
    Ok(())
}

/// Checks one histogram field, if present.
pub fn histogram(h: Option<&crate::proto::Histogram>, field: &str) -> Result<(), Invalid> {
    match h {
        Some(h) => LogHistogram::from_proto(h)
            .map(drop)
            .map_err(|e| Invalid::new("histogram", field, e.to_string())),
        None => Ok(()),
    }
}

/// Checks a string field: length and no control characters.
pub fn text(value: &str, field: &str) -> Result<(), Invalid> {
    if value.len() > MAX_STRING_BYTES {
        return Err(Invalid::new(
            "string",
            field,
            format!("{} bytes is over the limit of {MAX_STRING_BYTES}", value.len()),
        ));
    }
    if let Some(c) = value.chars().find(|c| c.is_control()) {
        return Err(Invalid::new(
            "string",
            field,
            format!("contains the control character {c:?}; names must be printable"),
        ));
    }
    Ok(())
}

fn sample(s: &Sample, at: &str) -> Result<(), Invalid> {
    if let Some(h) = &s.host {
        pct(f64::from(h.cpu_util_pct), &format!("{at}.host.cpu_util_pct"))?;
        list(h.cpu_core_util_pct.len(), MAX_CORES, &format!("{at}.host.cpu_core_util_pct"))?;
        for (i, v) in h.cpu_core_util_pct.iter().enumerate() {
            pct(f64::from(*v), &format!("{at}.host.cpu_core_util_pct[{i}]"))?;
        }
        for (v, name) in [(h.load1, "load1"), (h.load5, "load5"), (h.load15, "load15")] {
            if !v.is_finite() || v < 0.0 {
                return Err(Invalid::new(
                    "number",
                    format!("{at}.host.{name}"),
                    format!("must be a finite number at least 0, got {v}"),
                ));
            }
        }
    }
    list(s.gpus.len(), MAX_GPUS, &format!("{at}.gpus"))?;
    for (i, g) in s.gpus.iter().enumerate() {
        let gat = format!("{at}.gpus[{i}]");
        text(&g.uuid, &format!("{gat}.uuid"))?;
        for (v, name) in [
            (g.util_gpu_pct, "util_gpu_pct"),
            (g.util_memory_pct, "util_memory_pct"),
            (g.util_encoder_pct, "util_encoder_pct"),
            (g.util_decoder_pct, "util_decoder_pct"),
        ] {
            if let Some(v) = v {
                pct(f64::from(v), &format!("{gat}.{name}"))?;
            }
        }
        list(g.throttle_reason_names.len(), MAX_GPU_LIST, &format!("{gat}.throttle_reason_names"))?;
        for (j, n) in g.throttle_reason_names.iter().enumerate() {
            text(n, &format!("{gat}.throttle_reason_names[{j}]"))?;
        }
        list(g.processes.len(), MAX_GPU_LIST, &format!("{gat}.processes"))?;
    }
    list(s.accelerators.len(), MAX_ACCELERATORS, &format!("{at}.accelerators"))?;
    for (i, a) in s.accelerators.iter().enumerate() {
        let aat = format!("{at}.accelerators[{i}]");
        text(&a.source, &format!("{aat}.source"))?;
        text(&a.device, &format!("{aat}.device"))?;
        list(a.metrics.len(), MAX_METRICS, &format!("{aat}.metrics"))?;
        for (name, v) in &a.metrics {
            text(name, &format!("{aat}.metrics (a name)"))?;
            if !v.is_finite() {
                return Err(Invalid::new(
                    "number",
                    format!("{aat}.metrics.{}", name.escape_debug()),
                    format!("must be finite, got {v}"),
                ));
            }
        }
    }
    list(s.models.len(), MAX_MODELS, &format!("{at}.models"))?;
    for (i, m) in s.models.iter().enumerate() {
        model(m, &format!("{at}.models[{i}]"))?;
    }
    Ok(())
}

fn model(m: &ModelSample, at: &str) -> Result<(), Invalid> {
    text(&m.model, &format!("{at}.model"))?;
    text(&m.version, &format!("{at}.version"))?;
    for (h, name) in [
        (&m.latency_us, "latency_us"),
        (&m.queue_us, "queue_us"),
        (&m.compute_us, "compute_us"),
        (&m.batch_size, "batch_size"),
    ] {
        histogram(h.as_ref(), &format!("{at}.{name}"))?;
    }
    Ok(())
}

fn pct(v: f64, field: &str) -> Result<(), Invalid> {
    if v.is_finite() && (0.0..=100.0).contains(&v) {
        Ok(())
    } else {
        Err(Invalid::new("number", field, format!("must be a percentage 0..=100, got {v}")))
    }
}

fn list(len: usize, max: usize, field: &str) -> Result<(), Invalid> {
    if len > max {
        Err(Invalid::new("list", field, format!("{len} entries is over the limit of {max}")))
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{AcceleratorSample, GpuSample, Histogram, HostSample, Inventory};

    fn good() -> TelemetryBatch {
        let mut h = LogHistogram::new();
        h.record(1500);
        TelemetryBatch {
            seq: 1,
            samples: vec![Sample {
                unix_ms: 1_700_000_000_000,
                sample_index: 1,
                host: Some(HostSample {
                    cpu_util_pct: 12.5,
                    cpu_core_util_pct: vec![10.0, 15.0],
                    load1: 0.5,
                    ..Default::default()
                }),
                gpus: vec![GpuSample { util_gpu_pct: Some(99), ..Default::default() }],
                accelerators: vec![AcceleratorSample {
                    source: "exec:npu".into(),
                    device: "npu0".into(),
                    metrics: [("temp_c".to_owned(), 41.0)].into(),
                }],
                models: vec![ModelSample {
                    model: "resnet".into(),
                    version: "1".into(),
                    latency_us: Some(h.to_proto()),
                    ..Default::default()
                }],
            }],
            ..Default::default()
        }
    }

    #[test]
    fn a_real_batch_passes() {
        assert_eq!(batch(&good(), 100), Ok(()));
    }

    /// One way to spoil a batch.
    type Spoil = Box<dyn Fn(&mut TelemetryBatch)>;

    #[test]
    fn each_problem_is_named_with_its_field() {
        let cases: Vec<(&str, &str, Spoil)> = vec![
            ("number", "seq", Box::new(|b| b.seq = 0)),
            (
                "histogram",
                "samples[0].models[0].latency_us",
                Box::new(|b| {
                    b.samples[0].models[0].latency_us = Some(Histogram {
                        bucket_index: vec![3],
                        bucket_count: vec![1],
                        count: 1,
                        sum: 3,
                        min: 9,
                        max: 1,
                    })
                }),
            ),
            (
                "number",
                "samples[0].host.cpu_util_pct",
                Box::new(|b| b.samples[0].host.as_mut().unwrap().cpu_util_pct = f32::NAN),
            ),
            (
                "number",
                "samples[0].accelerators[0].metrics.temp_c",
                Box::new(|b| {
                    b.samples[0].accelerators[0].metrics.insert("temp_c".into(), f64::INFINITY);
                }),
            ),
            (
                "string",
                "samples[0].models[0].model",
                Box::new(|b| b.samples[0].models[0].model = "evil\x1b]0;pwned\x07".into()),
            ),
            (
                "string",
                "samples[0].gpus[0].uuid",
                Box::new(|b| b.samples[0].gpus[0].uuid = "x".repeat(300)),
            ),
            ("samples", "samples", Box::new(|b| b.samples = vec![Sample::default(); 101])),
        ];
        for (reason, field, mutate) in cases {
            let mut b = good();
            mutate(&mut b);
            let err = batch(&b, 100).expect_err(field);
            assert_eq!((err.reason(), err.field.as_str()), (reason, field), "{err}");
            assert!(Invalid::REASONS.contains(&err.reason()));
        }
    }

    #[test]
    fn hello_strings_are_checked() {
        let mut h = Hello {
            inventory: Some(Inventory { hostname: "web-1".into(), ..Default::default() }),
            ..Default::default()
        };
        assert_eq!(hello(&h), Ok(()));
        if let Some(inv) = h.inventory.as_mut() {
            inv.labels.insert("zone".into(), "a\nb".into());
        }
        let err = hello(&h).unwrap_err();
        assert_eq!(err.field, "inventory.labels.zone");
    }
}
