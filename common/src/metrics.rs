//! Flattening a [`Sample`] into named series, the one naming scheme every reader uses.
//!
//! Names are snake_case with a unit suffix. Per-core and per-device series carry their index:
//! `cpu_util_pct`, `cpu3_util_pct`, `gpu0_power_mw`, `accel.exec:fpga.card0.temp_c`. Rates are per
//! second, computed from the sample's `interval_ms`. Fields a device did not report are absent,
//! never zero.
//!
//! Served models add `model.NAME.*` series, summed over the model's versions:
//! `requests_per_s`, `successes_per_s`, `failures_per_s`, `rejected_per_s`, `expired_per_s`,
//! `inferences_per_s`, `busy_pct` (runner time over wall time, 100 per fully busy instance),
//! `batch_utilization_pct` and `latency_mean_ms`. Latency percentiles are deliberately not series:
//! they come from merged histograms ([`crate::model_stats`]), never from averaging.

use crate::proto::{GpuSample, HostSample, ModelSample, Sample};

/// One named value from a sample.
pub type Point = (String, f64);

/// Every series a sample contributes, in a stable order.
pub fn flatten(sample: &Sample) -> Vec<Point> {
    let mut out = Vec::with_capacity(32);
    if let Some(h) = &sample.host {
        host(h, &mut out);
    }
    for g in &sample.gpus {
        gpu(g, &mut out);
    }
    for a in &sample.accelerators {
        for (name, v) in &a.metrics {
            out.push((format!("accel.{}.{}.{}", a.source, a.device, name), *v));
        }
    }
    models(&sample.models, &mut out);
    out
}

/// The value of one named series in a sample, if the sample has it.
pub fn value(sample: &Sample, name: &str) -> Option<f64> {
    flatten(sample).into_iter().find(|(n, _)| n == name).map(|(_, v)| v)
}

fn host(h: &HostSample, out: &mut Vec<Point>) {
    let secs = f64::from(h.interval_ms.max(1)) / 1000.0;
    let mut push = |n: &str, v: f64| out.push((n.to_owned(), v));
    push("cpu_util_pct", f64::from(h.cpu_util_pct));
    push("load1", h.load1);
    push("load5", h.load5);
    push("load15", h.load15);
    push("memory_used_bytes", h.memory_used_bytes as f64);
    push("memory_total_bytes", h.memory_total_bytes as f64);
    push("swap_used_bytes", h.swap_used_bytes as f64);
    push("net_rx_bytes_per_s", h.net_rx_bytes as f64 / secs);
    push("net_tx_bytes_per_s", h.net_tx_bytes as f64 / secs);
    push("disk_read_bytes_per_s", h.disk_read_bytes as f64 / secs);
    push("disk_write_bytes_per_s", h.disk_write_bytes as f64 / secs);
    for (i, u) in h.cpu_core_util_pct.iter().enumerate() {
        out.push((format!("cpu{i}_util_pct"), f64::from(*u)));
    }
}

fn gpu(g: &GpuSample, out: &mut Vec<Point>) {
    let i = g.index;
    let mut opt = |name: &str, v: Option<f64>| {
        if let Some(v) = v {
            out.push((format!("gpu{i}_{name}"), v));
        }
    };
    opt("util_pct", g.util_gpu_pct.map(f64::from));
    opt("mem_util_pct", g.util_memory_pct.map(f64::from));
    opt("encoder_util_pct", g.util_encoder_pct.map(f64::from));
    opt("decoder_util_pct", g.util_decoder_pct.map(f64::from));
    opt("memory_used_bytes", g.memory_used_bytes.map(|v| v as f64));
    opt("memory_total_bytes", g.memory_total_bytes.map(|v| v as f64));
    opt("temperature_c", g.temperature_c.map(f64::from));
    opt("power_mw", g.power_mw.map(f64::from));
    opt("energy_mj", g.energy_mj.map(|v| v as f64));
    opt("power_limit_mw", g.power_limit_mw.map(f64::from));
    opt("sm_clock_mhz", g.sm_clock_mhz.map(f64::from));
    opt("memory_clock_mhz", g.memory_clock_mhz.map(f64::from));
    opt("performance_state", g.performance_state.map(f64::from));
    opt("ecc_corrected", g.ecc_corrected.map(|v| v as f64));
    opt("ecc_uncorrected", g.ecc_uncorrected.map(|v| v as f64));
    opt("pcie_tx_kib_per_s", g.pcie_tx_kib_per_s.map(f64::from));
    opt("pcie_rx_kib_per_s", g.pcie_rx_kib_per_s.map(f64::from));
}

/// Per-model series, versions of one model summed. Keeps first-seen model order.
fn models(samples: &[ModelSample], out: &mut Vec<Point>) {
    #[derive(Default)]
    struct Sum {
        interval_ms: u32,
        counts: [u64; 6],
        batch_slots: u64,
        compute_us: u64,
        latency_us: u64,
        latency_n: u64,
    }
    let mut order: Vec<(&str, Sum)> = Vec::new();
    for m in samples {
        let position = match order.iter().position(|(name, _)| *name == m.model) {
            Some(p) => p,
            None => {
                order.push((&m.model, Sum::default()));
                order.len() - 1
            }
        };
        let sum = &mut order[position].1;
        sum.interval_ms = sum.interval_ms.max(m.interval_ms);
        for (slot, v) in sum.counts.iter_mut().zip([
            m.requests,
            m.successes,
            m.failures,
            m.rejected,
            m.expired,
            m.inferences,
        ]) {
            *slot += v;
        }
        sum.batch_slots += m.batch_slots;
        // Only the histograms' exact sums and counts are used here, as stated; the buckets are
        // read (and checked) only where percentiles are needed (`model_stats`).
        if let Some(h) = &m.compute_us {
            sum.compute_us = sum.compute_us.saturating_add(h.sum);
        }
        if let Some(h) = &m.latency_us {
            sum.latency_us = sum.latency_us.saturating_add(h.sum);
            sum.latency_n = sum.latency_n.saturating_add(h.count);
        }
    }
    for (name, sum) in order {
        let secs = f64::from(sum.interval_ms.max(1)) / 1000.0;
        let names = ["requests", "successes", "failures", "rejected", "expired", "inferences"];
        for (series, count) in names.iter().zip(sum.counts) {
            out.push((format!("model.{name}.{series}_per_s"), count as f64 / secs));
        }
        out.push((format!("model.{name}.busy_pct"), sum.compute_us as f64 / 10.0 / secs / 1000.0));
        if sum.batch_slots > 0 {
            let utilization = sum.counts[5] as f64 / sum.batch_slots as f64 * 100.0;
            out.push((format!("model.{name}.batch_utilization_pct"), utilization));
        }
        if sum.latency_n > 0 {
            let mean_ms = sum.latency_us as f64 / sum.latency_n as f64 / 1000.0;
            out.push((format!("model.{name}.latency_mean_ms"), mean_ms));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::histogram::LogHistogram;
    use crate::proto::AcceleratorSample;

    #[test]
    fn model_series_sum_versions() {
        let mut compute = LogHistogram::new();
        compute.record(250_000); // 250 ms of runner time in a 2 s interval: 12.5 % busy
        let mut latency = LogHistogram::new();
        latency.record(2000);
        latency.record(4000);
        let version = |v: &str, requests| ModelSample {
            model: "resnet".into(),
            version: v.into(),
            interval_ms: 2000,
            requests,
            inferences: requests,
            batch_slots: 8,
            ..Default::default()
        };
        let s = Sample {
            models: vec![
                ModelSample {
                    compute_us: Some(compute.to_proto()),
                    latency_us: Some(latency.to_proto()),
                    ..version("1", 6)
                },
                version("2", 2),
            ],
            ..Default::default()
        };
        assert_eq!(value(&s, "model.resnet.requests_per_s"), Some(4.0));
        assert_eq!(value(&s, "model.resnet.busy_pct"), Some(12.5));
        assert_eq!(value(&s, "model.resnet.batch_utilization_pct"), Some(50.0));
        assert_eq!(value(&s, "model.resnet.latency_mean_ms"), Some(3.0));
        assert_eq!(value(&s, "model.resnet.expired_per_s"), Some(0.0));
    }

    #[test]
    fn names_units_and_absent_fields() {
        let s = Sample {
            host: Some(HostSample {
                cpu_util_pct: 50.0,
                cpu_core_util_pct: vec![40.0, 60.0],
                net_rx_bytes: 2000,
                interval_ms: 2000,
                ..Default::default()
            }),
            gpus: vec![GpuSample { index: 1, power_mw: Some(115_000), ..Default::default() }],
            accelerators: vec![AcceleratorSample {
                source: "exec:fpga".into(),
                device: "card0".into(),
                metrics: [("temp_c".to_owned(), 55.5)].into(),
            }],
            ..Default::default()
        };
        assert_eq!(value(&s, "cpu_util_pct"), Some(50.0));
        assert_eq!(value(&s, "cpu1_util_pct"), Some(60.0));
        assert_eq!(value(&s, "net_rx_bytes_per_s"), Some(1000.0));
        assert_eq!(value(&s, "gpu1_power_mw"), Some(115_000.0));
        assert_eq!(value(&s, "gpu1_temperature_c"), None, "unsupported fields stay absent");
        assert_eq!(value(&s, "accel.exec:fpga.card0.temp_c"), Some(55.5));
    }
}
