//! The host source: CPU (total and per core), load averages, memory, swap, and network and disk
//! bytes moved since the previous sample, read through sysinfo.
//!
//! Invariants:
//! - Only what a sample needs is refreshed (CPU usage, memory, network counters, disk I/O); the
//!   process list is never read.
//! - Byte counters and `interval_ms` cover the same span: from the previous sample (or from
//!   [`HostCollector::new`] for the first one) to this one.
//! - Loopback interfaces are left out of network bytes; a device mounted more than once counts
//!   once in disk bytes.

use std::time::Instant;

use common::proto::HostSample;
use sysinfo::{DiskRefreshKind, Disks, Networks, System};

/// Reads the host's CPU, memory, network and disk counters.
pub(crate) struct HostCollector {
    system: System,
    networks: Networks,
    disks: Disks,
    /// When the counters were last refreshed.
    last: Instant,
}

impl HostCollector {
    /// Takes the first reading, which later samples are measured against.
    pub(crate) fn new() -> Self {
        let mut system = System::new();
        system.refresh_cpu_usage();
        system.refresh_memory();
        let networks = Networks::new_with_refreshed_list();
        let disks = Disks::new_with_refreshed_list_specifics(disk_refresh());
        Self { system, networks, disks, last: Instant::now() }
    }

    /// Reads every counter once; bytes and `interval_ms` cover the time since the last call.
    pub(crate) fn sample(&mut self) -> HostSample {
        self.system.refresh_cpu_usage();
        self.system.refresh_memory();
        self.networks.refresh(true);
        self.disks.refresh_specifics(true, disk_refresh());
        let now = Instant::now();
        let interval_ms =
            u32::try_from(now.duration_since(self.last).as_millis()).unwrap_or(u32::MAX);
        self.last = now;

        let (mut net_rx_bytes, mut net_tx_bytes) = (0u64, 0u64);
        for (name, data) in self.networks.list() {
            let loopback = name == "lo"
                || (!data.ip_networks().is_empty()
                    && data.ip_networks().iter().all(|n| n.addr.is_loopback()));
            if !loopback {
                net_rx_bytes = net_rx_bytes.saturating_add(data.received());
                net_tx_bytes = net_tx_bytes.saturating_add(data.transmitted());
            }
        }

        let (mut disk_read_bytes, mut disk_write_bytes) = (0u64, 0u64);
        let disks = self.disks.list();
        for (i, disk) in disks.iter().enumerate() {
            // Bind mounts list one device several times; count its first entry only.
            if disks[..i].iter().any(|d| d.name() == disk.name()) {
                continue;
            }
            let usage = disk.usage();
            disk_read_bytes = disk_read_bytes.saturating_add(usage.read_bytes);
            disk_write_bytes = disk_write_bytes.saturating_add(usage.written_bytes);
        }

        let load = System::load_average();
        HostSample {
            cpu_util_pct: pct(self.system.global_cpu_usage()),
            cpu_core_util_pct: self.system.cpus().iter().map(|c| pct(c.cpu_usage())).collect(),
            load1: load.one,
            load5: load.five,
            load15: load.fifteen,
            memory_used_bytes: self.system.used_memory(),
            memory_total_bytes: self.system.total_memory(),
            swap_used_bytes: self.system.used_swap(),
            swap_total_bytes: self.system.total_swap(),
            net_rx_bytes,
            net_tx_bytes,
            disk_read_bytes,
            disk_write_bytes,
            interval_ms,
        }
    }

    /// Logical CPUs the kernel lists.
    pub(crate) fn cpu_cores(&self) -> u32 {
        u32::try_from(self.system.cpus().len()).unwrap_or(u32::MAX)
    }

    /// The first CPU's brand string ("AMD EPYC 9654 96-Core Processor"), empty if unknown.
    pub(crate) fn cpu_brand(&self) -> String {
        self.system.cpus().first().map(|c| c.brand().trim().to_owned()).unwrap_or_default()
    }

    /// Installed memory in bytes, as of the last refresh.
    pub(crate) fn memory_total_bytes(&self) -> u64 {
        self.system.total_memory()
    }
}

/// Disk refresh limited to I/O counters (no statvfs on every mount).
fn disk_refresh() -> DiskRefreshKind {
    DiskRefreshKind::nothing().with_io_usage()
}

/// Clamps a utilization to 0..=100, mapping NaN (no data yet) to 0.
fn pct(v: f32) -> f32 {
    if v.is_nan() { 0.0 } else { v.clamp(0.0, 100.0) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_samples_a_short_time_apart_are_sane() {
        let mut host = HostCollector::new();
        std::thread::sleep(sysinfo::MINIMUM_CPU_UPDATE_INTERVAL);
        let first = host.sample();
        std::thread::sleep(sysinfo::MINIMUM_CPU_UPDATE_INTERVAL);
        let second = host.sample();
        for s in [&first, &second] {
            assert!((0.0..=100.0).contains(&s.cpu_util_pct), "cpu {}", s.cpu_util_pct);
            assert!(s.memory_total_bytes > 0);
            assert!(s.memory_used_bytes <= s.memory_total_bytes);
            assert!(s.swap_used_bytes <= s.swap_total_bytes);
            assert_eq!(s.cpu_core_util_pct.len(), host.cpu_cores() as usize);
            assert!(s.cpu_core_util_pct.iter().all(|c| (0.0..=100.0).contains(c)));
            assert!(s.interval_ms > 0);
            assert!(s.load1 >= 0.0 && s.load5 >= 0.0 && s.load15 >= 0.0);
        }
        assert!(second.interval_ms >= 150, "interval {}", second.interval_ms);
        assert!(host.cpu_cores() > 0);
        assert_eq!(host.memory_total_bytes(), second.memory_total_bytes);
    }

    #[test]
    fn pct_clamps_and_hides_nan() {
        assert!(pct(f32::NAN).abs() < f32::EPSILON);
        assert!((pct(130.0) - 100.0).abs() < f32::EPSILON);
        assert!(pct(-1.0).abs() < f32::EPSILON);
        assert!((pct(42.5) - 42.5).abs() < f32::EPSILON);
    }
}
