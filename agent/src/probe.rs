//! Human-readable report of what this host's collectors see: the host, one block per GPU with
//! every field and its unit ("unsupported" where the device did not answer), and accelerators.
//!
//! Used by the agent's probe command so an operator can check a host before enrolling it. The
//! output is for people; nothing parses it.

use std::fmt::{self, Display, Formatter};

use common::proto::{GpuInfo, GpuSample, HostSample, Inventory, Sample};

/// Renders `inventory` and one `sample` as a multi-line report.
pub fn render(inventory: &Inventory, sample: &Sample) -> String {
    Report { inventory, sample }.to_string()
}

/// Width of the label column.
const LABEL: usize = 22;

/// What "absent" reads as.
const UNSUPPORTED: &str = "unsupported";

struct Report<'a> {
    inventory: &'a Inventory,
    sample: &'a Sample,
}

impl Display for Report<'_> {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        let inv = self.inventory;
        writeln!(f, "Host")?;
        row(f, "hostname", &inv.hostname)?;
        row(f, "os", &inv.os)?;
        row(f, "kernel", &inv.kernel)?;
        row(f, "cpu", format_args!("{} x {}", inv.cpu_cores, inv.cpu_brand))?;
        row(f, "memory", Bytes(inv.memory_total_bytes))?;
        for (k, v) in &inv.labels {
            row(f, &format!("label {k}"), v)?;
        }
        match &self.sample.host {
            Some(h) => host(f, h)?,
            None => row(f, "readings", "none")?,
        }

        writeln!(f)?;
        if self.sample.gpus.is_empty() && inv.gpus.is_empty() {
            writeln!(f, "GPUs: none found")?;
        }
        for g in &self.sample.gpus {
            let info = inv.gpus.iter().find(|i| i.index == g.index);
            gpu(f, info, g)?;
        }
        // GPUs in the inventory that the sample did not read at all.
        for info in inv.gpus.iter().filter(|i| !self.sample.gpus.iter().any(|g| g.index == i.index))
        {
            gpu(f, Some(info), &GpuSample { index: info.index, ..GpuSample::default() })?;
        }

        writeln!(f)?;
        if self.sample.accelerators.is_empty() {
            writeln!(f, "Accelerators: none found")?;
            for a in &inv.accelerators {
                row(f, &format!("{} {}", a.source, a.device), "seen before, no reading now")?;
            }
        } else {
            writeln!(f, "Accelerators")?;
            for a in &self.sample.accelerators {
                writeln!(f, "  {} {}", a.source, a.device)?;
                if a.metrics.is_empty() {
                    row(f, "metrics", "none")?;
                }
                for (name, v) in &a.metrics {
                    row(f, name, v)?;
                }
            }
        }
        Ok(())
    }
}

fn host(f: &mut Formatter<'_>, h: &HostSample) -> fmt::Result {
    row(f, "cpu util", format_args!("{:.1} %", h.cpu_util_pct))?;
    let mut cores = String::new();
    for (i, u) in h.cpu_core_util_pct.iter().enumerate() {
        if i > 0 {
            cores.push(' ');
        }
        cores.push_str(&format!("{u:.0}"));
    }
    row(f, "cpu per core", format_args!("{cores} %"))?;
    row(f, "load 1/5/15", format_args!("{:.2} {:.2} {:.2}", h.load1, h.load5, h.load15))?;
    row(
        f,
        "memory used",
        format_args!("{} of {}", Bytes(h.memory_used_bytes), Bytes(h.memory_total_bytes)),
    )?;
    row(
        f,
        "swap used",
        format_args!("{} of {}", Bytes(h.swap_used_bytes), Bytes(h.swap_total_bytes)),
    )?;
    row(
        f,
        "network rx/tx",
        format_args!(
            "{} / {} in {} ms",
            Bytes(h.net_rx_bytes),
            Bytes(h.net_tx_bytes),
            h.interval_ms
        ),
    )?;
    row(
        f,
        "disk read/write",
        format_args!(
            "{} / {} in {} ms",
            Bytes(h.disk_read_bytes),
            Bytes(h.disk_write_bytes),
            h.interval_ms
        ),
    )
}

fn gpu(f: &mut Formatter<'_>, info: Option<&GpuInfo>, g: &GpuSample) -> fmt::Result {
    let name = info.map_or("", |i| i.name.as_str());
    writeln!(f, "GPU {} {}", g.index, name)?;
    let uuid = if g.uuid.is_empty() { info.map_or("", |i| i.uuid.as_str()) } else { &g.uuid };
    row(f, "uuid", uuid)?;
    if let Some(i) = info {
        row(f, "driver", &i.driver_version)?;
        row(f, "memory total", Bytes(i.memory_total_bytes))?;
        row(f, "power limit (config)", Opt(i.power_limit_mw.map(Milli::<'W'>)))?;
    }
    row(f, "util gpu", Opt(g.util_gpu_pct.map(|v| Unit(v, "%"))))?;
    row(f, "util memory", Opt(g.util_memory_pct.map(|v| Unit(v, "%"))))?;
    row(f, "util encoder", Opt(g.util_encoder_pct.map(|v| Unit(v, "%"))))?;
    row(f, "util decoder", Opt(g.util_decoder_pct.map(|v| Unit(v, "%"))))?;
    row(f, "memory used", Opt(g.memory_used_bytes.map(Bytes)))?;
    row(f, "memory total", Opt(g.memory_total_bytes.map(Bytes)))?;
    row(f, "temperature", Opt(g.temperature_c.map(|v| Unit(v, "C"))))?;
    row(f, "power", Opt(g.power_mw.map(Milli::<'W'>)))?;
    row(f, "energy since load", Opt(g.energy_mj.map(|v| Unit(v / 1000, "J"))))?;
    row(f, "power limit", Opt(g.power_limit_mw.map(Milli::<'W'>)))?;
    row(f, "sm clock", Opt(g.sm_clock_mhz.map(|v| Unit(v, "MHz"))))?;
    row(f, "memory clock", Opt(g.memory_clock_mhz.map(|v| Unit(v, "MHz"))))?;
    row(f, "performance state", Opt(g.performance_state.map(|v| format!("P{v}"))))?;
    match g.throttle_reasons {
        Some(bits) if g.throttle_reason_names.is_empty() => {
            row(f, "throttle reasons", format_args!("{bits:#x} (none)"))?;
        }
        Some(bits) => {
            row(
                f,
                "throttle reasons",
                format_args!("{bits:#x} {}", g.throttle_reason_names.join(", ")),
            )?;
        }
        None => row(f, "throttle reasons", UNSUPPORTED)?,
    }
    row(f, "ecc corrected", Opt(g.ecc_corrected))?;
    row(f, "ecc uncorrected", Opt(g.ecc_uncorrected))?;
    row(f, "pcie tx", Opt(g.pcie_tx_kib_per_s.map(|v| Unit(v, "KiB/s"))))?;
    row(f, "pcie rx", Opt(g.pcie_rx_kib_per_s.map(|v| Unit(v, "KiB/s"))))?;
    row(f, "mig", Opt(g.mig_enabled.map(|on| if on { "enabled" } else { "disabled" })))?;
    if g.processes.is_empty() {
        row(f, "processes", "none")?;
    }
    for p in &g.processes {
        row(f, &format!("process {}", p.pid), Opt(p.used_memory_bytes.map(Bytes)))?;
    }
    Ok(())
}

/// One indented `label  value` line.
fn row(f: &mut Formatter<'_>, label: &str, value: impl Display) -> fmt::Result {
    writeln!(f, "  {label:<LABEL$} {value}")
}

/// An optional value, "unsupported" when absent.
struct Opt<T>(Option<T>);

impl<T: Display> Display for Opt<T> {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        match &self.0 {
            Some(v) => v.fmt(f),
            None => f.write_str(UNSUPPORTED),
        }
    }
}

/// A number with a unit.
struct Unit<T>(T, &'static str);

impl<T: Display> Display for Unit<T> {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.0, self.1)
    }
}

/// A milli-unit value shown in the whole unit with three decimals (`21000` mW -> `21.000 W`).
struct Milli<const U: char>(u32);

impl<const U: char> Display for Milli<U> {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{:03} {}", self.0 / 1000, self.0 % 1000, U)
    }
}

/// A byte count in binary units.
struct Bytes(u64);

impl Display for Bytes {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
        let mut unit = 0;
        let mut scaled = self.0;
        while scaled >= 1024 * 10 && unit + 1 < UNITS.len() {
            scaled /= 1024;
            unit += 1;
        }
        if unit == 0 { write!(f, "{} B", self.0) } else { write!(f, "{scaled} {}", UNITS[unit]) }
    }
}

#[cfg(test)]
mod tests {
    use common::proto::{AcceleratorSample, GpuProcess};

    use super::*;

    #[test]
    fn a_gpu_with_missing_fields_reads_unsupported() {
        let inventory = Inventory {
            hostname: "gpu-7".into(),
            cpu_cores: 2,
            memory_total_bytes: 8 << 30,
            gpus: vec![GpuInfo {
                index: 0,
                uuid: "GPU-1234".into(),
                name: "NVIDIA H100 80GB HBM3".into(),
                memory_total_bytes: 80 << 30,
                power_limit_mw: Some(700_000),
                driver_version: "580.159.04".into(),
                mig_enabled: Some(false),
            }],
            ..Inventory::default()
        };
        let sample = Sample {
            unix_ms: 1,
            sample_index: 0,
            host: Some(HostSample {
                cpu_util_pct: 12.5,
                cpu_core_util_pct: vec![10.0, 15.0],
                memory_total_bytes: 8 << 30,
                interval_ms: 1000,
                ..HostSample::default()
            }),
            gpus: vec![GpuSample {
                index: 0,
                uuid: "GPU-1234".into(),
                util_gpu_pct: Some(97),
                power_mw: Some(694_120),
                temperature_c: Some(61),
                throttle_reasons: Some(4),
                throttle_reason_names: vec!["sw_power_cap".into()],
                processes: vec![GpuProcess { pid: 42, used_memory_bytes: Some(4 << 30) }],
                ..GpuSample::default()
            }],
            accelerators: vec![AcceleratorSample {
                source: "exec:fpga".into(),
                device: "card0".into(),
                metrics: [("temp_c".to_owned(), 55.0)].into(),
            }],
            models: vec![],
        };
        let text = render(&inventory, &sample);
        assert!(text.contains("NVIDIA H100 80GB HBM3"), "{text}");
        assert!(text.contains("unsupported"), "{text}");
        assert!(text.contains("694.120 W"), "{text}");
        assert!(text.contains("sw_power_cap"), "{text}");
        assert!(text.contains("process 42"), "{text}");
        assert!(text.contains("exec:fpga card0"), "{text}");
        assert!(text.contains("gpu-7"), "{text}");
        // Absent fields read "unsupported", never zero.
        assert!(text.lines().any(|l| l.contains("util encoder") && l.contains("unsupported")));
    }

    #[test]
    fn a_host_without_gpus_says_so() {
        let text = render(&Inventory::default(), &Sample::default());
        assert!(text.contains("GPUs: none found"), "{text}");
        assert!(text.contains("Accelerators: none found"), "{text}");
    }

    #[test]
    fn bytes_pick_a_readable_unit() {
        assert_eq!(Bytes(512).to_string(), "512 B");
        assert_eq!(Bytes(80 << 30).to_string(), "80 GiB");
        assert_eq!(Milli::<'W'>(700_000).to_string(), "700.000 W");
    }
}
