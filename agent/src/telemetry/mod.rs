//! Telemetry collectors: the [`Collectors`] type that owns every configured source and turns one
//! reading of all of them into a [`Sample`].
//!
//! | source | file | what it reads |
//! |---|---|---|
//! | host | `host.rs` | CPU, load, memory, swap, network and disk bytes (sysinfo) |
//! | GPUs | `nvml.rs` | NVIDIA GPUs through NVML, loaded at run time |
//! | hwmon | `hwmon.rs` | `/sys/class/hwmon` temperatures, power, voltages, fans |
//! | exec | `exec.rs` | operator commands printing JSON lines |
//!
//! Invariants:
//! - A missing device, driver or field is *absent* from the sample, never an error and never a
//!   zero. Only `NvmlMode::Required` turns a missing NVIDIA driver into an error, at start.
//! - [`Collectors::sample`] never panics and never fails: a source that cannot be read
//!   contributes nothing and logs a rate-limited warning.
//! - Sampling is blocking (NVML, exec commands); callers run it off the async runtime.

mod exec;
mod host;
mod hwmon;
mod nvml;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::config::agent::TelemetryConfig;
use common::proto::{AcceleratorInfo, AcceleratorSample, Inventory, Sample};

/// Why the telemetry collectors could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// `telemetry.nvml = "required"` but NVML could not be loaded or initialized.
    #[error("telemetry.nvml = \"required\": NVML (libnvidia-ml) could not be initialized")]
    NvmlRequired {
        /// What NVML said.
        #[source]
        source: nvml_wrapper::error::NvmlError,
    },
    /// `telemetry.nvml = "required"`, NVML loaded, but it could not list GPUs or found none.
    #[error("telemetry.nvml = \"required\": NVML loaded but reports no usable GPU ({detail})")]
    NvmlNoGpus {
        /// What went wrong, in words.
        detail: String,
    },
}

/// Every telemetry source configured on this host.
///
/// Built once at start with [`Collectors::new`]; [`Collectors::sample`] then reads all sources.
pub struct Collectors {
    /// CPU, memory, network and disk.
    host: host::HostCollector,
    /// NVIDIA GPUs; `None` when NVML is off or absent.
    gpus: Option<nvml::NvmlCollector>,
    /// `/sys/class/hwmon`; `None` when disabled.
    hwmon: Option<hwmon::HwmonCollector>,
    /// Operator commands.
    exec: Vec<exec::ExecSource>,
    /// Accelerators seen in any sample so far: source -> devices. Feeds the inventory.
    seen: BTreeMap<String, BTreeSet<String>>,
}

impl std::fmt::Debug for Collectors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Collectors")
            .field("gpus", &self.gpu_count())
            .field("hwmon", &self.hwmon.is_some())
            .field("exec", &self.exec.len())
            .finish_non_exhaustive()
    }
}

impl Collectors {
    /// Builds every configured source, running each exec command once to learn its devices.
    ///
    /// `NvmlMode::Auto` with no driver logs one info line ("No NVIDIA driver found; reporting no
    /// GPUs.") and continues; `NvmlMode::Required` returns an error; `NvmlMode::Off` skips NVML.
    pub fn new(cfg: &TelemetryConfig) -> Result<Self, TelemetryError> {
        let gpus = nvml::NvmlCollector::open(cfg.nvml)?;
        let hwmon = cfg.hwmon.then(|| hwmon::HwmonCollector::new(hwmon::DEFAULT_ROOT));
        let exec = cfg.exec.iter().map(exec::ExecSource::new).collect();
        let mut collectors =
            Self { host: host::HostCollector::new(), gpus, hwmon, exec, seen: BTreeMap::new() };
        // The inventory is usually read right after this, so find the accelerators now: hwmon
        // from its directory scan, exec sources by running each once (bounded by its timeout).
        if let Some(hw) = &collectors.hwmon {
            let devices = hw.devices().map(str::to_owned);
            collectors.seen.entry(hwmon::SOURCE.to_owned()).or_default().extend(devices);
        }
        let mut first = Vec::new();
        for source in &mut collectors.exec {
            source.sample(&mut first);
        }
        collectors.remember(&first);
        tracing::debug!(
            gpus = collectors.gpu_count(),
            hwmon = cfg.hwmon,
            exec_sources = cfg.exec.len(),
            "Telemetry collectors ready."
        );
        Ok(collectors)
    }

    /// What this host is made of (hostname, OS, kernel, cores, CPU brand, memory, GPUs and the
    /// accelerators seen so far, including those found by [`Collectors::new`]), with the given
    /// operator labels.
    pub fn inventory(&self, labels: &BTreeMap<String, String>) -> Inventory {
        let accelerators = self
            .seen
            .iter()
            .flat_map(|(source, devices)| {
                devices.iter().map(move |device| AcceleratorInfo {
                    source: source.clone(),
                    device: device.clone(),
                })
            })
            .collect();
        Inventory {
            hostname: sysinfo::System::host_name().unwrap_or_default(),
            os: sysinfo::System::long_os_version().unwrap_or_default(),
            kernel: sysinfo::System::kernel_version().unwrap_or_default(),
            cpu_cores: self.host.cpu_cores(),
            cpu_brand: self.host.cpu_brand(),
            memory_total_bytes: self.host.memory_total_bytes(),
            gpus: self.gpus.as_ref().map(|g| g.inventory().to_vec()).unwrap_or_default(),
            accelerators,
            labels: labels.clone(),
        }
    }

    /// Reads every source once.
    ///
    /// Blocking (NVML, exec commands): run it off the async runtime. Fills `unix_ms`; leaves
    /// `sample_index` at 0 for the caller to number.
    pub fn sample(&mut self) -> Sample {
        let unix_ms = unix_ms_now();
        let host = self.host.sample();
        let gpus = self.gpus.as_mut().map(|g| g.sample()).unwrap_or_default();
        let mut accelerators = Vec::new();
        if let Some(hw) = &mut self.hwmon {
            hw.sample(&mut accelerators);
        }
        for source in &mut self.exec {
            source.sample(&mut accelerators);
        }
        self.remember(&accelerators);
        Sample {
            unix_ms,
            sample_index: 0,
            host: Some(host),
            gpus,
            accelerators,
            models: Vec::new(),
        }
    }

    /// Number of GPUs found.
    pub fn gpu_count(&self) -> usize {
        self.gpus.as_ref().map_or(0, nvml::NvmlCollector::gpu_count)
    }

    /// Records accelerators for the inventory, allocating only for ones never seen before.
    fn remember(&mut self, accelerators: &[AcceleratorSample]) {
        for a in accelerators {
            let known = self.seen.get(&a.source).is_some_and(|devices| devices.contains(&a.device));
            if !known {
                self.seen.entry(a.source.clone()).or_default().insert(a.device.clone());
            }
        }
    }
}

/// Milliseconds since the Unix epoch on the agent clock (0 if the clock is before 1970).
fn unix_ms_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Lets a repeated warning through at most once per interval and counts what it held back.
#[derive(Debug)]
pub(crate) struct RateLimit {
    interval: Duration,
    last: Option<Instant>,
    suppressed: u64,
}

impl RateLimit {
    /// Default spacing between two warnings about the same source.
    pub(crate) const DEFAULT_INTERVAL: Duration = Duration::from_secs(60);

    /// A limiter letting one event through per `interval`.
    pub(crate) const fn new(interval: Duration) -> Self {
        Self { interval, last: None, suppressed: 0 }
    }

    /// `Some(n)` when the caller should log now, `n` being how many events were held back since
    /// the last one logged; `None` when it should stay quiet.
    pub(crate) fn allow(&mut self) -> Option<u64> {
        let now = Instant::now();
        match self.last {
            Some(last) if now.duration_since(last) < self.interval => {
                self.suppressed = self.suppressed.saturating_add(1);
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.suppressed))
            }
        }
    }
}

/// Shortens `s` to at most `max` bytes on a char boundary, for log fields.
pub(crate) fn truncate_for_log(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// A telemetry config for tests: 1 s sampling, the given NVML mode, no hwmon, no exec sources.
#[cfg(test)]
pub(crate) fn test_config(nvml: common::config::agent::NvmlMode) -> TelemetryConfig {
    TelemetryConfig {
        sample_interval: Duration::from_secs(1),
        nvml,
        hwmon: false,
        exec: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use common::config::agent::NvmlMode;

    use super::test_config as config;
    use super::*;

    #[test]
    fn sample_fills_time_and_host_but_not_index() {
        let mut c = Collectors::new(&config(NvmlMode::Off)).unwrap();
        let s = c.sample();
        assert!(s.unix_ms > 1_600_000_000_000);
        assert_eq!(s.sample_index, 0);
        assert!(s.host.is_some());
        assert!(s.gpus.is_empty());
        assert_eq!(c.gpu_count(), 0);
    }

    #[test]
    fn inventory_describes_the_host_and_carries_labels() {
        let c = Collectors::new(&config(NvmlMode::Off)).unwrap();
        let labels = BTreeMap::from([("zone".to_owned(), "a".to_owned())]);
        let inv = c.inventory(&labels);
        assert!(inv.cpu_cores > 0);
        assert!(inv.memory_total_bytes > 0);
        assert_eq!(inv.labels, labels);
        assert!(inv.gpus.is_empty());
    }

    #[test]
    fn exec_accelerators_join_the_inventory_once_seen() {
        let mut cfg = config(NvmlMode::Off);
        cfg.exec.push(common::config::agent::ExecSourceConfig {
            name: "fpga".to_owned(),
            command: vec![
                "sh".to_owned(),
                "-c".to_owned(),
                r#"printf '{"device":"card0","metrics":{"temp_c":50}}\n'"#.to_owned(),
            ],
            timeout: Duration::from_secs(5),
        });
        let mut c = Collectors::new(&cfg).unwrap();
        let expected =
            vec![AcceleratorInfo { source: "exec:fpga".to_owned(), device: "card0".to_owned() }];
        // Found at start, so the first inventory (sent in Hello) already lists it.
        assert_eq!(c.inventory(&BTreeMap::new()).accelerators, expected);
        let s = c.sample();
        assert_eq!(s.accelerators.len(), 1);
        assert_eq!(s.accelerators[0].metrics.get("temp_c"), Some(&50.0));
        let _ = c.sample();
        assert_eq!(c.inventory(&BTreeMap::new()).accelerators, expected);
    }

    #[test]
    fn collectors_can_move_to_a_blocking_thread() {
        fn assert_send<T: Send>() {}
        assert_send::<Collectors>();
    }

    #[test]
    fn rate_limit_counts_what_it_suppresses() {
        let mut r = RateLimit::new(Duration::from_secs(3600));
        assert_eq!(r.allow(), Some(0));
        assert_eq!(r.allow(), None);
        assert_eq!(r.allow(), None);
        r.last = Instant::now().checked_sub(Duration::from_secs(7200));
        assert_eq!(r.allow(), Some(2));
    }

    #[test]
    fn truncate_keeps_char_boundaries() {
        assert_eq!(truncate_for_log("abc", 10), "abc");
        assert_eq!(truncate_for_log("héllo", 2), "h");
    }
}
