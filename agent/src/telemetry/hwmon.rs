//! The hwmon accelerator source: sensors under `/sys/class/hwmon/hwmon*/`, converted to the
//! metric units used everywhere else:
//!
//! | file | unit in sysfs | metric |
//! |---|---|---|
//! | `tempN_input` | millidegrees Celsius | `tempN_c` |
//! | `powerN_input` (or `powerN_average`) | microwatts | `powerN_mw` |
//! | `inN_input` | millivolts | `inN_mv` |
//! | `fanN_input` | RPM | `fanN_rpm` |
//!
//! Each `hwmonI` directory is one device, named `NAME-I` from its `name` file (so two chips with
//! the same driver stay apart). Readings carry the source `hwmon`.
//!
//! Invariants:
//! - The sensor list is found at start and looked for again every [`RESCAN_INTERVAL`], so a
//!   sample reads only files known to exist, through one reused buffer.
//! - A sensor that cannot be read or parsed (many report `ENODATA` when idle) is absent from that
//!   sample; a device with no readable sensor is left out of it.
//! - The root directory is a parameter so tests can use a fake tree.

use std::collections::BTreeMap;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::proto::AcceleratorSample;

/// Where the kernel lists hardware monitors.
pub(crate) const DEFAULT_ROOT: &str = "/sys/class/hwmon";

/// The `source` of every hwmon reading.
pub(crate) const SOURCE: &str = "hwmon";

/// How often the directory tree is walked again for new or removed sensors.
const RESCAN_INTERVAL: Duration = Duration::from_secs(300);

/// Reads every hwmon sensor under one root.
pub(crate) struct HwmonCollector {
    root: PathBuf,
    devices: Vec<Device>,
    scanned: Instant,
    /// Reused for every file read.
    buf: String,
}

/// One `hwmonI` directory.
struct Device {
    /// `NAME-I`.
    name: String,
    sensors: Vec<Sensor>,
}

/// One readable `*_input` file.
struct Sensor {
    path: PathBuf,
    /// Metric name, e.g. `temp1_c`.
    metric: String,
    /// Multiply the raw integer by this to get the metric's unit.
    scale: f64,
}

impl HwmonCollector {
    /// Finds the sensors under `root` (normally [`DEFAULT_ROOT`]); a missing root means none.
    pub(crate) fn new(root: impl Into<PathBuf>) -> Self {
        let root = root.into();
        let devices = scan(&root);
        tracing::debug!(root = %root.display(), devices = devices.len(), "Scanned hwmon.");
        Self { root, devices, scanned: Instant::now(), buf: String::with_capacity(32) }
    }

    /// Device names found, e.g. `k10temp-2`.
    pub(crate) fn devices(&self) -> impl Iterator<Item = &str> {
        self.devices.iter().map(|d| d.name.as_str())
    }

    /// Reads every sensor once, appending one reading per device that answered.
    pub(crate) fn sample(&mut self, out: &mut Vec<AcceleratorSample>) {
        if self.scanned.elapsed() >= RESCAN_INTERVAL {
            self.devices = scan(&self.root);
            self.scanned = Instant::now();
        }
        for device in &self.devices {
            let mut metrics = BTreeMap::new();
            for sensor in &device.sensors {
                if let Some(raw) = read_i64(&sensor.path, &mut self.buf) {
                    // sysfs integers are far below 2^53, so the conversion is exact.
                    #[allow(clippy::cast_precision_loss)]
                    let value = raw as f64 * sensor.scale;
                    metrics.insert(sensor.metric.clone(), value);
                }
            }
            if !metrics.is_empty() {
                out.push(AcceleratorSample {
                    source: SOURCE.to_owned(),
                    device: device.name.clone(),
                    metrics,
                });
            }
        }
    }
}

/// Walks `root/hwmon*` for devices with at least one sensor, in index order.
fn scan(root: &Path) -> Vec<Device> {
    let Ok(entries) = fs::read_dir(root) else { return Vec::new() };
    let mut found: Vec<(u32, Device)> = entries
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let dir_name = entry.file_name();
            let index: u32 = dir_name.to_str()?.strip_prefix("hwmon")?.parse().ok()?;
            // `entry.path()` is usually a symlink into /sys/devices; read through it.
            let dir = entry.path();
            let name = fs::read_to_string(dir.join("name"))
                .map(|n| sanitize(n.trim()))
                .ok()
                .filter(|n| !n.is_empty())
                .unwrap_or_else(|| "hwmon".to_owned());
            let sensors = sensors(&dir);
            (!sensors.is_empty())
                .then(|| (index, Device { name: format!("{name}-{index}"), sensors }))
        })
        .collect();
    found.sort_by_key(|(index, _)| *index);
    found.into_iter().map(|(_, d)| d).collect()
}

/// The sensor files in one hwmon directory, sorted by metric name.
fn sensors(dir: &Path) -> Vec<Sensor> {
    let Ok(entries) = fs::read_dir(dir) else { return Vec::new() };
    let files: Vec<String> =
        entries.filter_map(Result::ok).filter_map(|e| e.file_name().into_string().ok()).collect();
    let mut out: Vec<Sensor> = files
        .iter()
        .filter_map(|file| {
            let (metric, scale) = metric_for(file, &files)?;
            Some(Sensor { path: dir.join(file), metric, scale })
        })
        .collect();
    out.sort_by(|a, b| a.metric.cmp(&b.metric));
    out
}

/// Metric name and scale for a sysfs file name, or `None` if it is not a sensor we report.
/// `powerN_average` is used only when the chip has no `powerN_input`.
fn metric_for(file: &str, all: &[String]) -> Option<(String, f64)> {
    let (stem, suffix) = file.split_once('_')?;
    let (kind, n) = split_kind(stem)?;
    let (unit, scale) = match (kind, suffix) {
        ("temp", "input") => ("c", 0.001),
        ("power", "input") => ("mw", 0.001),
        ("power", "average") if !all.iter().any(|f| f == &format!("power{n}_input")) => {
            ("mw", 0.001)
        }
        ("in", "input") => ("mv", 1.0),
        ("fan", "input") => ("rpm", 1.0),
        _ => return None,
    };
    Some((format!("{kind}{n}_{unit}"), scale))
}

/// `temp12` -> (`temp`, `12`).
fn split_kind(stem: &str) -> Option<(&str, &str)> {
    let digits = stem.find(|c: char| c.is_ascii_digit())?;
    let (kind, n) = stem.split_at(digits);
    (!kind.is_empty() && n.chars().all(|c| c.is_ascii_digit())).then_some((kind, n))
}

/// Keeps a device name usable inside dotted series names (`accel.hwmon.NAME-I.temp1_c`).
fn sanitize(name: &str) -> String {
    name.chars()
        .map(|c| if c.is_ascii_alphanumeric() || c == '_' || c == '-' { c } else { '_' })
        .collect()
}

/// Reads one integer file through `buf`; `None` if unreadable (e.g. `ENODATA`) or not a number.
fn read_i64(path: &Path, buf: &mut String) -> Option<i64> {
    buf.clear();
    fs::File::open(path).ok()?.read_to_string(buf).ok()?;
    buf.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, file: &str, content: &str) {
        fs::create_dir_all(dir).unwrap();
        fs::write(dir.join(file), content).unwrap();
    }

    #[test]
    fn fake_sysfs_tree_gives_converted_values() {
        let root = tempfile::tempdir().unwrap();
        let chip = root.path().join("hwmon3");
        write(&chip, "name", "amdgpu\n");
        write(&chip, "temp1_input", "55500\n");
        write(&chip, "temp1_label", "edge\n");
        write(&chip, "temp1_crit", "100000\n");
        write(&chip, "power1_average", "21000000\n");
        write(&chip, "in0_input", "850\n");
        write(&chip, "fan1_input", "1200\n");
        write(&chip, "temp2_input", "garbage\n");
        let other = root.path().join("hwmon0");
        write(&other, "name", "nvme\n");
        write(&other, "temp1_input", "-5000\n");
        write(&other, "power1_input", "3000000\n");
        write(&other, "power1_average", "9000000\n");
        // Not a hwmon directory, and a device with no sensors: both ignored.
        write(&root.path().join("other"), "temp1_input", "1000\n");
        write(&root.path().join("hwmon7"), "name", "empty\n");

        let mut hw = HwmonCollector::new(root.path());
        assert_eq!(hw.devices().collect::<Vec<_>>(), ["nvme-0", "amdgpu-3"]);
        let mut out = Vec::new();
        hw.sample(&mut out);
        assert_eq!(out.len(), 2);
        assert!(out.iter().all(|a| a.source == "hwmon"));

        let nvme = &out[0];
        assert_eq!(nvme.device, "nvme-0");
        assert_eq!(nvme.metrics.len(), 2);
        assert!((nvme.metrics["temp1_c"] + 5.0).abs() < 1e-9);
        assert!((nvme.metrics["power1_mw"] - 3000.0).abs() < 1e-9);

        let gpu = &out[1];
        assert_eq!(gpu.device, "amdgpu-3");
        assert!((gpu.metrics["temp1_c"] - 55.5).abs() < 1e-9);
        assert!((gpu.metrics["power1_mw"] - 21000.0).abs() < 1e-9);
        assert!((gpu.metrics["in0_mv"] - 850.0).abs() < 1e-9);
        assert!((gpu.metrics["fan1_rpm"] - 1200.0).abs() < 1e-9);
        assert!(!gpu.metrics.contains_key("temp2_c"), "unparsable value must be absent");
        assert_eq!(gpu.metrics.len(), 4);
    }

    #[test]
    fn a_missing_root_means_no_devices() {
        let mut hw = HwmonCollector::new("/nonexistent/hwmon-root");
        assert_eq!(hw.devices().count(), 0);
        let mut out = Vec::new();
        hw.sample(&mut out);
        assert!(out.is_empty());
    }

    #[test]
    fn file_names_map_to_metrics() {
        let none: [String; 0] = [];
        assert_eq!(metric_for("temp12_input", &none), Some(("temp12_c".to_owned(), 0.001)));
        assert_eq!(metric_for("fan1_input", &none), Some(("fan1_rpm".to_owned(), 1.0)));
        assert_eq!(metric_for("temp1_max", &none), None);
        assert_eq!(metric_for("name", &none), None);
        assert_eq!(metric_for("in_input", &none), None);
        assert_eq!(sanitize("my chip.v2"), "my_chip_v2");
    }
}
