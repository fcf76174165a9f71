//! The NVIDIA GPU source: NVML through nvml-wrapper, with `libnvidia-ml` loaded at run time so one
//! binary serves hosts with and without GPUs.
//!
//! Invariants:
//! - Every field of [`GpuSample`] comes from one NVML call (or one call shared by two fields). Any
//!   error from that call (`NotSupported` and `InvalidArg` are normal, e.g. on an H100) makes the
//!   field absent. A sample never fails because of a field.
//! - The GPU list and each GPU's identity ([`GpuInfo`]) are read once at start; a GPU that cannot
//!   be opened later still appears in samples with its index and uuid, every field absent, and a
//!   rate-limited warning.
//! - Device handles borrow the `Nvml` instance, so they are looked up by index on each sample
//!   (one cheap NVML call) rather than stored.

use common::config::agent::NvmlMode;
use common::proto::{GpuInfo, GpuProcess, GpuSample};
use nvml_wrapper::Nvml;
use nvml_wrapper::enum_wrappers::device::{
    Clock, EccCounter, MemoryError, PcieUtilCounter, PerformanceState, TemperatureSensor,
};
use nvml_wrapper::enums::device::UsedGpuMemory;
use nvml_wrapper::error::NvmlError;

use super::{RateLimit, TelemetryError};

/// NVML clock-throttle-reason bits and their names, as in `nvml.h`.
const THROTTLE_REASONS: [(u64, &str); 9] = [
    (0x1, "gpu_idle"),
    (0x2, "applications_clocks_setting"),
    (0x4, "sw_power_cap"),
    (0x8, "hw_slowdown"),
    (0x10, "sync_boost"),
    (0x20, "sw_thermal_slowdown"),
    (0x40, "hw_thermal_slowdown"),
    (0x80, "hw_power_brake_slowdown"),
    (0x100, "display_clock_setting"),
];

/// The NVIDIA GPUs of this host.
pub(crate) struct NvmlCollector {
    nvml: Nvml,
    /// One entry per GPU, in NVML index order; read once at start.
    gpus: Vec<GpuInfo>,
    /// Warnings about GPUs that could not be opened.
    lost_warn: RateLimit,
}

impl NvmlCollector {
    /// Loads NVML as `mode` says: `Off` gives `None`; `Auto` gives `None` (and one info line)
    /// when there is no driver; `Required` fails unless NVML loads and lists at least one GPU.
    pub(crate) fn open(mode: NvmlMode) -> Result<Option<Self>, TelemetryError> {
        if mode == NvmlMode::Off {
            return Ok(None);
        }
        let nvml = match Nvml::init() {
            Ok(nvml) => nvml,
            Err(source) if mode == NvmlMode::Required => {
                return Err(TelemetryError::NvmlRequired { source });
            }
            Err(error) => {
                tracing::info!(%error, "No NVIDIA driver found; reporting no GPUs.");
                return Ok(None);
            }
        };
        let count = match nvml.device_count() {
            Ok(n) => n,
            Err(error) if mode == NvmlMode::Required => {
                return Err(TelemetryError::NvmlNoGpus {
                    detail: format!("device count failed: {error}"),
                });
            }
            Err(error) => {
                tracing::warn!(%error, "NVML loaded but could not count GPUs; reporting no GPUs.");
                0
            }
        };
        if count == 0 && mode == NvmlMode::Required {
            return Err(TelemetryError::NvmlNoGpus { detail: "device count is 0".to_owned() });
        }
        let driver_version = nvml.sys_driver_version().unwrap_or_default();
        let gpus: Vec<GpuInfo> = (0..count).map(|i| identify(&nvml, i, &driver_version)).collect();
        for g in &gpus {
            tracing::info!(
                index = g.index,
                uuid = %g.uuid,
                name = %g.name,
                memory_total_bytes = g.memory_total_bytes,
                driver = %g.driver_version,
                "Found NVIDIA GPU."
            );
        }
        Ok(Some(Self { nvml, gpus, lost_warn: RateLimit::new(RateLimit::DEFAULT_INTERVAL) }))
    }

    /// Number of GPUs found at start.
    pub(crate) fn gpu_count(&self) -> usize {
        self.gpus.len()
    }

    /// Identity of each GPU, read at start.
    pub(crate) fn inventory(&self) -> &[GpuInfo] {
        &self.gpus
    }

    /// Reads every GPU once.
    pub(crate) fn sample(&mut self) -> Vec<GpuSample> {
        let mut out = Vec::with_capacity(self.gpus.len());
        for info in &self.gpus {
            let mut s =
                GpuSample { index: info.index, uuid: info.uuid.clone(), ..GpuSample::default() };
            match self.nvml.device_by_index(info.index) {
                Ok(device) => read_device(&device, &mut s),
                Err(error) => {
                    if let Some(suppressed) = self.lost_warn.allow() {
                        tracing::warn!(
                            index = info.index,
                            uuid = %info.uuid,
                            %error,
                            suppressed,
                            "Could not open GPU; reporting it with no readings."
                        );
                    }
                }
            }
            out.push(s);
        }
        out
    }
}

/// Reads GPU `index`'s identity; unreadable parts are left empty or absent.
fn identify(nvml: &Nvml, index: u32, driver_version: &str) -> GpuInfo {
    let mut info =
        GpuInfo { index, driver_version: driver_version.to_owned(), ..GpuInfo::default() };
    match nvml.device_by_index(index) {
        Ok(d) => {
            info.uuid = field(d.uuid()).unwrap_or_default();
            info.name = field(d.name()).unwrap_or_default();
            info.memory_total_bytes = field(d.memory_info()).map_or(0, |m| m.total);
            info.power_limit_mw =
                field(d.power_management_limit()).or_else(|| field(d.enforced_power_limit()));
            info.mig_enabled = field(d.mig_mode()).map(|m| m.current == 1);
        }
        Err(error) => tracing::warn!(index, %error, "Could not open GPU to read its identity."),
    }
    info
}

/// Fills every field of `s` that `device` answers.
fn read_device(device: &nvml_wrapper::Device<'_>, s: &mut GpuSample) {
    if let Some(u) = field(device.utilization_rates()) {
        s.util_gpu_pct = Some(u.gpu);
        s.util_memory_pct = Some(u.memory);
    }
    s.util_encoder_pct = field(device.encoder_utilization()).map(|u| u.utilization);
    s.util_decoder_pct = field(device.decoder_utilization()).map(|u| u.utilization);
    if let Some(m) = field(device.memory_info()) {
        s.memory_used_bytes = Some(m.used);
        s.memory_total_bytes = Some(m.total);
    }
    s.temperature_c = field(device.temperature(TemperatureSensor::Gpu));
    s.power_mw = field(device.power_usage());
    s.energy_mj = field(device.total_energy_consumption());
    s.power_limit_mw = field(device.enforced_power_limit());
    s.sm_clock_mhz = field(device.clock_info(Clock::SM));
    s.memory_clock_mhz = field(device.clock_info(Clock::Memory));
    s.performance_state = field(device.performance_state()).and_then(pstate_number);
    if let Some(reasons) = field(device.current_throttle_reasons()) {
        let bits = reasons.bits();
        s.throttle_reasons = Some(bits);
        s.throttle_reason_names = throttle_reason_names(bits);
    }
    s.ecc_corrected = field(device.total_ecc_errors(MemoryError::Corrected, EccCounter::Volatile));
    s.ecc_uncorrected =
        field(device.total_ecc_errors(MemoryError::Uncorrected, EccCounter::Volatile));
    s.pcie_tx_kib_per_s = field(device.pcie_throughput(PcieUtilCounter::Send));
    s.pcie_rx_kib_per_s = field(device.pcie_throughput(PcieUtilCounter::Receive));
    s.mig_enabled = field(device.mig_mode()).map(|m| m.current == 1);
    if let Some(procs) = field(device.running_compute_processes()) {
        s.processes = procs
            .into_iter()
            .map(|p| GpuProcess {
                pid: p.pid,
                used_memory_bytes: match p.used_gpu_memory {
                    UsedGpuMemory::Used(bytes) => Some(bytes),
                    UsedGpuMemory::Unavailable => None,
                },
            })
            .collect();
    }
}

/// One field's reading: any NVML error means "absent". `NotSupported` and `InvalidArg` are
/// expected on real devices; other errors are logged at debug level only, since they repeat
/// every sample.
fn field<T>(r: Result<T, NvmlError>) -> Option<T> {
    match r {
        Ok(v) => Some(v),
        Err(NvmlError::NotSupported | NvmlError::InvalidArg) => None,
        Err(error) => {
            tracing::debug!(%error, "NVML field unreadable; reporting it absent.");
            None
        }
    }
}

/// P-state as its number, 0 (fastest) to 15; `None` when NVML says unknown.
fn pstate_number(p: PerformanceState) -> Option<u32> {
    use PerformanceState as P;
    Some(match p {
        P::Zero => 0,
        P::One => 1,
        P::Two => 2,
        P::Three => 3,
        P::Four => 4,
        P::Five => 5,
        P::Six => 6,
        P::Seven => 7,
        P::Eight => 8,
        P::Nine => 9,
        P::Ten => 10,
        P::Eleven => 11,
        P::Twelve => 12,
        P::Thirteen => 13,
        P::Fourteen => 14,
        P::Fifteen => 15,
        P::Unknown => return None,
    })
}

/// Names of the set throttle-reason bits, lowest bit first; unknown bits are not named.
pub(crate) fn throttle_reason_names(bits: u64) -> Vec<String> {
    THROTTLE_REASONS
        .iter()
        .filter(|(bit, _)| bits & bit != 0)
        .map(|(_, name)| (*name).to_owned())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::Collectors;
    use crate::telemetry::test_config as config;

    /// These tests describe a host without the NVIDIA driver (CI); on a GPU host they have
    /// nothing to check and return early.
    fn driver_present() -> bool {
        Nvml::init().is_ok()
    }

    #[test]
    fn auto_without_driver_reports_no_gpus() {
        if driver_present() {
            return;
        }
        let mut c = Collectors::new(&config(NvmlMode::Auto)).unwrap();
        assert_eq!(c.gpu_count(), 0);
        assert!(c.sample().gpus.is_empty());
        assert!(c.inventory(&Default::default()).gpus.is_empty());
    }

    #[test]
    fn required_without_driver_fails_naming_nvml() {
        if driver_present() {
            return;
        }
        let err = Collectors::new(&config(NvmlMode::Required)).unwrap_err();
        assert!(err.to_string().contains("NVML"), "{err}");
        assert!(matches!(err, TelemetryError::NvmlRequired { .. }));
    }

    #[test]
    fn off_never_loads_nvml() {
        let c = Collectors::new(&config(NvmlMode::Off)).unwrap();
        assert_eq!(c.gpu_count(), 0);
    }

    #[test]
    fn throttle_bits_decode_to_nvml_names() {
        assert!(throttle_reason_names(0).is_empty());
        // The H100 under load in shared/data/telemetry: idle (1) and software power cap (4).
        assert_eq!(throttle_reason_names(0x5), ["gpu_idle", "sw_power_cap"]);
        assert_eq!(throttle_reason_names(0x1FF).len(), 9);
        assert_eq!(throttle_reason_names(0x100 | 0x1000), ["display_clock_setting"]);
    }

    #[test]
    fn pstates_map_to_numbers() {
        assert_eq!(pstate_number(PerformanceState::Zero), Some(0));
        assert_eq!(pstate_number(PerformanceState::Fifteen), Some(15));
        assert_eq!(pstate_number(PerformanceState::Unknown), None);
    }

    #[test]
    fn unsupported_fields_are_absent() {
        assert_eq!(field::<u32>(Err(NvmlError::NotSupported)), None);
        assert_eq!(field::<u32>(Err(NvmlError::InvalidArg)), None);
        assert_eq!(field::<u32>(Err(NvmlError::Unknown)), None);
        assert_eq!(field::<u32>(Ok(7)), Some(7));
    }

    /// Run on GPU hosts: `cargo test -p agent -- --ignored gpu`.
    #[test]
    #[ignore = "needs an NVIDIA GPU and driver"]
    fn gpu_reports_identity_power_and_temperature() {
        let mut c = Collectors::new(&config(NvmlMode::Required)).unwrap();
        assert!(c.gpu_count() > 0);
        let inv = c.inventory(&Default::default());
        let sample = c.sample();
        assert_eq!(inv.gpus.len(), c.gpu_count());
        assert_eq!(sample.gpus.len(), c.gpu_count());
        for (info, g) in inv.gpus.iter().zip(&sample.gpus) {
            eprintln!("{info:?}\n{g:?}");
            assert!(!info.name.is_empty(), "gpu {} has no name", info.index);
            assert!(info.uuid.starts_with("GPU-"), "uuid {}", info.uuid);
            assert_eq!(g.uuid, info.uuid);
            assert!(info.memory_total_bytes >= 1 << 30, "memory {}", info.memory_total_bytes);
            let power = g.power_mw.expect("power_mw");
            assert!((1_000..=2_000_000).contains(&power), "power {power} mW");
            let temp = g.temperature_c.expect("temperature_c");
            assert!((1..=120).contains(&temp), "temperature {temp} C");
        }
        eprintln!("{}", crate::probe::render(&inv, &sample));
    }
}
