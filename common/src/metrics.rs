//! Flattening a [`Sample`] into named series, the one naming scheme every reader uses.
//!
//! Names are snake_case with a unit suffix. Per-core and per-device series carry their index:
//! `cpu_util_pct`, `cpu3_util_pct`, `gpu0_power_mw`, `accel.exec:fpga.card0.temp_c`. Rates are per
//! second, computed from the sample's `interval_ms`. Fields a device did not report are absent,
//! never zero.

use crate::proto::{GpuSample, HostSample, Sample};

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::AcceleratorSample;

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
