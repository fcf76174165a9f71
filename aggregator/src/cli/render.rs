//! Text rendering for the `flotilla` CLI: aligned tables, human units and times, the host detail
//! page, metric tables and sparklines.
//!
//! Text that came from agents or the store (host names, labels, model and GPU names, error
//! texts) can hold terminal control sequences. [`escape`] makes such text inert; every table cell
//! and detail-page value goes through it, and the CLI passes its whole output through
//! [`escape_output`] before writing it, so no control character but the line breaks the renderer
//! itself writes reaches the operator's terminal.
//!
//! Everything here is a pure function of its inputs (the current time is passed in as `now_ms`),
//! so output is unit-tested with known strings. Absent values render as [`ABSENT`]. Times are
//! shown in UTC. Widths count `char`s, which is right for the ASCII, `—`, `°` and block
//! characters used here.

use std::collections::BTreeSet;
use std::fmt::Display;

use common::proto::{GpuInfo, GpuSample, HostSample, Inventory, Sample};

use crate::views::{HostDetail, HostSummary, MetricSeries, Resolution};

/// What an absent reading renders as.
pub const ABSENT: &str = "—";

/// Sparkline levels, lowest first.
const BARS: [char; 8] = ['▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'];

/// Clock offset (agent minus aggregator) above which `flotilla host` warns, ms.
pub const CLOCK_WARN_MS: i64 = 2_000;

/// Width of the key column in the host detail page.
const KEY_WIDTH: usize = 14;

/// A text table with one header row and aligned columns, two spaces apart.
#[derive(Debug, Clone)]
pub struct Table {
    headers: Vec<String>,
    right: Vec<bool>,
    rows: Vec<Vec<String>>,
}

// === impl Table ===

impl Table {
    /// A table with these column headers, every column left-aligned.
    pub fn new<S: Into<String>>(headers: impl IntoIterator<Item = S>) -> Self {
        let headers: Vec<String> = headers.into_iter().map(Into::into).collect();
        let right = vec![false; headers.len()];
        Self { headers, right, rows: Vec::new() }
    }

    /// Right-aligns the columns at these indexes (numbers read better that way).
    pub fn right_align(mut self, columns: &[usize]) -> Self {
        for &column in columns {
            if let Some(right) = self.right.get_mut(column) {
                *right = true;
            }
        }
        self
    }

    /// Adds a row, [`escape`]d. Missing cells render empty; extra cells are ignored.
    pub fn push_row(&mut self, row: Vec<String>) {
        self.rows.push(row.into_iter().map(|c| escape(&c).into_owned()).collect());
    }

    /// The table as lines ending in `\n`, without trailing spaces.
    pub fn render(&self) -> String {
        let mut widths: Vec<usize> = self.headers.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (width, cell) in widths.iter_mut().zip(row) {
                *width = (*width).max(cell.chars().count());
            }
        }
        let mut out = String::new();
        for row in std::iter::once(&self.headers).chain(&self.rows) {
            let mut line = String::new();
            let cells = row.iter().map(String::as_str).chain(std::iter::repeat(""));
            for (column, ((cell, &width), &right)) in
                cells.zip(&widths).zip(&self.right).enumerate()
            {
                let pad = width.saturating_sub(cell.chars().count());
                if column > 0 {
                    line.push_str("  ");
                }
                if right {
                    line.extend(std::iter::repeat_n(' ', pad));
                    line.push_str(cell);
                } else {
                    line.push_str(cell);
                    line.extend(std::iter::repeat_n(' ', pad));
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

// === escaping ===

/// `text` with every control character (C0, DEL, C1, line breaks included) written as a visible
/// Rust-style escape (`\n`, `\u{1b}`), so it stays on one line and cannot drive the terminal.
/// Borrowed when there is nothing to escape.
pub fn escape(text: &str) -> std::borrow::Cow<'_, str> {
    escape_except(text, |_| false)
}

/// A whole rendered answer with every control character but `\n` escaped as in [`escape`]:
/// the last guard before the terminal.
pub fn escape_output(text: &str) -> std::borrow::Cow<'_, str> {
    escape_except(text, |c| c == '\n')
}

fn escape_except(text: &str, keep: impl Fn(char) -> bool) -> std::borrow::Cow<'_, str> {
    if !text.chars().any(|c| c.is_control() && !keep(c)) {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if c.is_control() && !keep(c) {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    std::borrow::Cow::Owned(out)
}

// === units ===

/// Bytes in binary units: `512 B`, `1.5 KiB`, `12.3 GiB`.
pub fn format_bytes(bytes: u64) -> String {
    format_bytes_f64(bytes as f64)
}

/// A byte rate: `0 B/s`, `1.2 MiB/s`.
pub fn format_rate(bytes_per_sec: f64) -> String {
    format!("{}/s", format_bytes_f64(bytes_per_sec))
}

/// Power from milliwatts: `115.2 W`.
pub fn format_power_mw(milliwatts: f64) -> String {
    format!("{:.1} W", milliwatts / 1000.0)
}

/// Energy from millijoules in SI units: `850 J`, `12.3 kJ`, `4.5 MJ`, `1.2 GJ`.
pub fn format_energy_mj(millijoules: f64) -> String {
    let joules = millijoules / 1000.0;
    if joules.abs() < 1000.0 {
        return format!("{joules:.0} J");
    }
    let mut value = joules / 1000.0;
    for unit in ["kJ", "MJ", "GJ"] {
        if value.abs() < 1000.0 {
            return format!("{value:.1} {unit}");
        }
        value /= 1000.0;
    }
    format!("{value:.1} TJ")
}

/// A percentage with one decimal: `12.3 %`.
pub fn format_pct(pct: f64) -> String {
    format!("{pct:.1} %")
}

/// How long ago `then_ms` was at `now_ms`, in the largest whole unit: `just now`, `3s ago`,
/// `5m ago`, `2h ago`, `3d ago`; `in 5s` when it lies ahead (clock skew).
pub fn format_ago(then_ms: i64, now_ms: i64) -> String {
    let delta_ms = now_ms.saturating_sub(then_ms);
    if delta_ms.abs() < 1000 {
        return "just now".to_owned();
    }
    let span = format_span_secs(delta_ms.unsigned_abs() / 1000);
    if delta_ms > 0 { format!("{span} ago") } else { format!("in {span}") }
}

/// A span in its largest whole unit: `45s`, `5m`, `2h`, `3d`.
fn format_span_secs(secs: u64) -> String {
    match secs {
        0..60 => format!("{secs}s"),
        60..3600 => format!("{}m", secs / 60),
        3600..86_400 => format!("{}h", secs / 3600),
        _ => format!("{}d", secs / 86_400),
    }
}

/// A duration in the largest unit that divides it exactly: `90s`, `15m`, `1h`, `2d`, `1w`
/// (the same notation `--since` accepts).
pub fn format_duration_secs(secs: u64) -> String {
    for (unit, size) in [("w", 604_800), ("d", 86_400), ("h", 3600), ("m", 60)] {
        if secs >= size && secs / size * size == secs {
            return format!("{}{unit}", secs / size);
        }
    }
    format!("{secs}s")
}

/// A Unix millisecond time as UTC `YYYY-MM-DD HH:MM:SS`.
pub fn format_utc(unix_ms: i64) -> String {
    let secs = unix_ms.div_euclid(1000);
    let (year, month, day) = crate::analytics::series::civil_from_days(secs.div_euclid(86_400));
    let second_of_day = secs.rem_euclid(86_400);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}",
        second_of_day / 3600,
        second_of_day % 3600 / 60,
        second_of_day % 60
    )
}

/// A metric value in the unit its name ends with (`_bytes`, `_bytes_per_s`, `_kib_per_s`,
/// `_pct`, `_mw`, `_mj`, `_c`, `_mhz`); a plain number otherwise.
pub fn format_metric_value(metric: &str, value: f64) -> String {
    if !value.is_finite() {
        return value.to_string();
    }
    if metric.ends_with("_bytes_per_s") && value >= 0.0 {
        return format!("{}/s", format_bytes_f64(value));
    }
    if metric.ends_with("_kib_per_s") && value >= 0.0 {
        return format!("{}/s", format_bytes_f64(value * 1024.0));
    }
    let unit = metric.rsplit('_').next().unwrap_or_default();
    match unit {
        "bytes" if value >= 0.0 => format_bytes_f64(value),
        "pct" => format_pct(value),
        "mw" => format_power_mw(value),
        "mj" => format_energy_mj(value),
        "c" => format!("{value:.1} °C"),
        "mhz" => format!("{value:.0} MHz"),
        _ => format_number(value),
    }
}

/// A plain number: integers without decimals, others with up to three.
fn format_number(value: f64) -> String {
    if value.fract() == 0.0 && value.abs() < 1e15 {
        format!("{value:.0}")
    } else {
        let text = format!("{value:.3}");
        text.trim_end_matches('0').trim_end_matches('.').to_owned()
    }
}

fn format_bytes_f64(bytes: f64) -> String {
    if bytes.abs() < 1024.0 {
        return format!("{bytes:.0} B");
    }
    let mut value = bytes / 1024.0;
    for unit in ["KiB", "MiB", "GiB", "TiB"] {
        if value.abs() < 1024.0 {
            return format!("{value:.1} {unit}");
        }
        value /= 1024.0;
    }
    format!("{value:.1} PiB")
}

fn or_absent<T: Display>(value: Option<T>) -> String {
    value.map_or_else(|| ABSENT.to_owned(), |v| v.to_string())
}

fn text_or_absent(text: &str) -> &str {
    if text.is_empty() { ABSENT } else { text }
}

// === sparkline ===

/// A sparkline of `values`, at most `width` characters: each character is the mean of an equal
/// share of the values, scaled between their smallest and largest finite value onto `▁`..`█`.
/// A flat series renders as `▄`; a non-finite value as a space.
pub fn sparkline(values: &[f64], width: usize) -> String {
    let buckets = downsample(values, width);
    let finite = buckets.iter().copied().filter(|v| v.is_finite());
    let min = finite.clone().fold(f64::INFINITY, f64::min);
    let max = finite.fold(f64::NEG_INFINITY, f64::max);
    buckets
        .iter()
        .map(|&value| {
            if !value.is_finite() {
                ' '
            } else if max - min <= f64::EPSILON * max.abs().max(1.0) {
                BARS[3]
            } else {
                let scaled = (value - min) / (max - min) * 7.0;
                // The level is the number of half-way marks the value reaches: rounding without
                // a float-to-int cast.
                let level = (1..BARS.len()).filter(|&k| scaled >= k as f64 - 0.5).count();
                BARS[level]
            }
        })
        .collect()
}

/// Splits `values` into at most `width` consecutive, near-equal groups and takes each mean
/// (non-finite values are skipped; a group of only those is NaN).
fn downsample(values: &[f64], width: usize) -> Vec<f64> {
    if width == 0 || values.len() <= width {
        return values.to_vec();
    }
    (0..width)
        .map(|i| {
            let group = &values[i * values.len() / width..(i + 1) * values.len() / width];
            let finite: Vec<f64> = group.iter().copied().filter(|v| v.is_finite()).collect();
            if finite.is_empty() {
                f64::NAN
            } else {
                finite.iter().sum::<f64>() / finite.len() as f64
            }
        })
        .collect()
}

// === pages ===

/// `flotilla hosts`: HOST STATE LAST SEEN GPUS CPU% GPU% SAMPLES.
pub fn hosts_table(hosts: &[HostSummary], now_ms: i64) -> String {
    let mut table = Table::new(["HOST", "STATE", "LAST SEEN", "GPUS", "CPU%", "GPU%", "SAMPLES"])
        .right_align(&[3, 4, 5, 6]);
    for host in hosts {
        table.push_row(vec![
            host.host.clone(),
            host.state.to_string(),
            host.last_seen_unix_ms.map_or_else(|| "never".to_owned(), |t| format_ago(t, now_ms)),
            host.gpu_count.to_string(),
            or_absent(host.cpu_util_pct.map(|p| format!("{p:.1}"))),
            or_absent(host.gpu_util_pct.map(|p| format!("{p:.1}"))),
            host.samples_total.to_string(),
        ]);
    }
    table.render()
}

/// `flotilla host HOST`: inventory, latest readings, one block per GPU, accelerators.
pub fn host_detail(detail: &HostDetail, now_ms: i64) -> String {
    let mut out = String::new();
    let summary = &detail.summary;
    let inventory = &detail.inventory;
    let seen = summary.last_seen_unix_ms.map_or_else(
        || "never seen".to_owned(),
        |t| format!("last seen {}", format_ago(t, now_ms)),
    );
    field(&mut out, "Host", &summary.host);
    field(&mut out, "State", format!("{} ({seen})", summary.state));
    field(&mut out, "Agent", text_or_absent(&summary.agent_version));
    inventory_fields(&mut out, inventory);
    field(
        &mut out,
        "Samples",
        format!("{} stored, last batch {}", summary.samples_total, summary.last_seq),
    );
    field(
        &mut out,
        "Spool drops",
        format!(
            "{} batches, {} samples",
            detail.spool_dropped_batches, detail.spool_dropped_samples
        ),
    );
    telemetry_fields(&mut out, detail, now_ms);
    let certificate = detail.cert_not_after_secs.map(|secs| {
        let ms = secs.saturating_mul(1000);
        format!("expires {} UTC ({})", format_utc(ms), format_ago(ms, now_ms))
    });
    field(&mut out, "Certificate", or_absent(certificate));

    let Some(latest) = &detail.latest else {
        out.push_str("\nNo samples stored yet.\n");
        return out;
    };
    out.push_str(&format!(
        "\nLatest sample ({}, {} UTC)\n",
        format_ago(latest.unix_ms, now_ms),
        format_utc(latest.unix_ms)
    ));
    match &latest.host {
        Some(host) => host_fields(&mut out, host, inventory.cpu_cores),
        None => field(&mut out, "Host", ABSENT),
    }
    gpu_blocks(&mut out, &inventory.gpus, latest);
    accelerator_blocks(&mut out, inventory, latest);
    out
}

/// Clock, telemetry health and refused samples of the host detail page.
fn telemetry_fields(out: &mut String, detail: &HostDetail, now_ms: i64) {
    let t = &detail.telemetry;
    let clock = match t.clock_offset_ms {
        None => ABSENT.to_owned(),
        Some(ms) => {
            let side = if ms >= 0 { "ahead of" } else { "behind" };
            let text = format!("{:.3} s {side} the aggregator", ms.unsigned_abs() as f64 / 1000.0);
            if ms.abs() > CLOCK_WARN_MS {
                format!("{text}  WARNING: over {} s off; check NTP", CLOCK_WARN_MS / 1000)
            } else {
                text
            }
        }
    };
    field(out, "Clock", clock);
    let health = if t.telemetry_errors == 0 {
        "ok".to_owned()
    } else {
        format!(
            "{} errors since agent start, last {}: {}",
            t.telemetry_errors,
            format_ago(t.last_telemetry_error_unix_ms, now_ms),
            printable(&t.last_telemetry_error)
        )
    };
    field(out, "Telemetry", health);
    if t.future_samples_refused > 0 {
        field(
            out,
            "Refused",
            format!(
                "{} samples dated in the future, last {}",
                t.future_samples_refused,
                format_ago(t.last_future_refusal_ms, now_ms)
            ),
        );
    }
    if detail.dedup_seen > 0 {
        field(out, "Gaps", format!("{} batches stored after a missing one", detail.dedup_seen));
    }
}

/// Agent-supplied text with control characters escaped, so it cannot drive the terminal.
fn printable(text: &str) -> String {
    text.chars()
        .flat_map(|c| if c.is_control() { c.escape_default().collect() } else { vec![c] })
        .collect()
}

/// `flotilla metrics HOST METRIC`: TIME VALUE MIN MAX COUNT, oldest first.
pub fn metric_table(series: &MetricSeries) -> String {
    let mut table =
        Table::new(["TIME (UTC)", "VALUE", "MIN", "MAX", "COUNT"]).right_align(&[1, 2, 3, 4]);
    for point in &series.points {
        table.push_row(vec![
            format_utc(point.unix_ms),
            format_metric_value(&series.metric, point.value),
            format_metric_value(&series.metric, point.min),
            format_metric_value(&series.metric, point.max),
            point.count.to_string(),
        ]);
    }
    table.render()
}

/// `flotilla metrics HOST METRIC --plot`: a sparkline of the means at most `width` wide, then
/// the smallest minimum, largest maximum and last mean, then the time span.
pub fn metric_plot(series: &MetricSeries, width: usize) -> String {
    let values: Vec<f64> = series.points.iter().map(|p| p.value).collect();
    let metric = &series.metric;
    let mut out = sparkline(&values, width);
    out.push('\n');
    let min = series.points.iter().map(|p| p.min).fold(f64::INFINITY, f64::min);
    let max = series.points.iter().map(|p| p.max).fold(f64::NEG_INFINITY, f64::max);
    if let (Some(first), Some(last)) = (series.points.first(), series.points.last()) {
        out.push_str(&format!(
            "min {}  max {}  last {}\n{} → {} UTC\n",
            format_metric_value(metric, min),
            format_metric_value(metric, max),
            format_metric_value(metric, last.value),
            format_utc(first.unix_ms),
            format_utc(last.unix_ms),
        ));
    }
    out
}

/// The lowercase name of a resolution, as the API spells it.
pub fn resolution_name(resolution: Resolution) -> &'static str {
    match resolution {
        Resolution::Raw => "raw",
        Resolution::Minute => "minute",
        Resolution::Hour => "hour",
    }
}

// --- detail page helpers ---

fn field(out: &mut String, key: &str, value: impl Display) {
    let value = value.to_string();
    out.push_str(&format!("  {key:<KEY_WIDTH$}{}\n", escape(&value)));
}

fn inventory_fields(out: &mut String, inventory: &Inventory) {
    field(out, "Hostname", text_or_absent(&inventory.hostname));
    let os = match (inventory.os.as_str(), inventory.kernel.as_str()) {
        ("", "") => ABSENT.to_owned(),
        (os, "") => os.to_owned(),
        ("", kernel) => format!("kernel {kernel}"),
        (os, kernel) => format!("{os}, kernel {kernel}"),
    };
    field(out, "OS", os);
    field(
        out,
        "CPU",
        format!("{}, {} cores", text_or_absent(&inventory.cpu_brand), inventory.cpu_cores),
    );
    field(out, "Memory", format_bytes(inventory.memory_total_bytes));
    let labels = if inventory.labels.is_empty() {
        "none".to_owned()
    } else {
        let pairs: Vec<String> = inventory.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        pairs.join(", ")
    };
    field(out, "Labels", labels);
}

fn host_fields(out: &mut String, host: &HostSample, cores: u32) {
    let busiest = host
        .cpu_core_util_pct
        .iter()
        .copied()
        .fold(None, |acc: Option<f32>, v| Some(acc.map_or(v, |a| a.max(v))));
    let mut cpu = format_pct(f64::from(host.cpu_util_pct));
    if cores > 0 {
        cpu.push_str(&format!(" of {cores} cores"));
    }
    if let Some(busiest) = busiest {
        cpu.push_str(&format!(", busiest core {}", format_pct(f64::from(busiest))));
    }
    field(out, "CPU", cpu);
    field(
        out,
        "Load",
        format!("{:.2} {:.2} {:.2} (1, 5, 15 min)", host.load1, host.load5, host.load15),
    );
    field(out, "Memory", used_of_total(host.memory_used_bytes, host.memory_total_bytes));
    let swap = if host.swap_total_bytes == 0 {
        "none".to_owned()
    } else {
        used_of_total(host.swap_used_bytes, host.swap_total_bytes)
    };
    field(out, "Swap", swap);
    let rate = |bytes: u64| {
        if host.interval_ms == 0 {
            ABSENT.to_owned()
        } else {
            format_rate(bytes as f64 * 1000.0 / f64::from(host.interval_ms))
        }
    };
    field(
        out,
        "Network",
        format!("rx {}, tx {}", rate(host.net_rx_bytes), rate(host.net_tx_bytes)),
    );
    field(
        out,
        "Disk",
        format!("read {}, write {}", rate(host.disk_read_bytes), rate(host.disk_write_bytes)),
    );
}

fn used_of_total(used: u64, total: u64) -> String {
    if total == 0 {
        return format!("{} / {ABSENT}", format_bytes(used));
    }
    let pct = used as f64 * 100.0 / total as f64;
    format!("{} / {} ({})", format_bytes(used), format_bytes(total), format_pct(pct))
}

/// One block per GPU index found in the inventory or the sample.
fn gpu_blocks(out: &mut String, infos: &[GpuInfo], latest: &Sample) {
    let indexes: BTreeSet<u32> =
        infos.iter().map(|g| g.index).chain(latest.gpus.iter().map(|g| g.index)).collect();
    for index in indexes {
        let info = infos.iter().find(|g| g.index == index);
        let sample = latest.gpus.iter().find(|g| g.index == index);
        let name = info.map_or(ABSENT, |g| text_or_absent(&g.name));
        out.push_str(&format!("\nGPU {index}: {name}\n"));
        let uuid = sample.map(|g| g.uuid.as_str()).filter(|u| !u.is_empty());
        let uuid = uuid.or_else(|| info.map(|g| g.uuid.as_str()));
        field(out, "UUID", text_or_absent(uuid.unwrap_or_default()));
        if let Some(info) = info {
            field(out, "Driver", text_or_absent(&info.driver_version));
        }
        match sample {
            Some(sample) => gpu_fields(out, info, sample),
            None => field(out, "Readings", "none in the latest sample"),
        }
    }
}

fn gpu_fields(out: &mut String, info: Option<&GpuInfo>, gpu: &GpuSample) {
    let pct = |v: Option<u32>| or_absent(v.map(|p| format!("{p} %")));
    field(
        out,
        "Utilization",
        format!(
            "GPU {}, memory {}, encoder {}, decoder {}",
            pct(gpu.util_gpu_pct),
            pct(gpu.util_memory_pct),
            pct(gpu.util_encoder_pct),
            pct(gpu.util_decoder_pct)
        ),
    );
    let total =
        gpu.memory_total_bytes.or_else(|| info.map(|g| g.memory_total_bytes).filter(|&t| t > 0));
    let memory = match (gpu.memory_used_bytes, total) {
        (Some(used), Some(total)) => used_of_total(used, total),
        (None, Some(total)) => format!("{ABSENT} / {}", format_bytes(total)),
        (Some(used), None) => format!("{} / {ABSENT}", format_bytes(used)),
        (None, None) => ABSENT.to_owned(),
    };
    field(out, "Memory", memory);
    field(out, "Temperature", or_absent(gpu.temperature_c.map(|c| format!("{c} °C"))));
    let limit = gpu.power_limit_mw.or_else(|| info.and_then(|g| g.power_limit_mw));
    let watts = |mw: Option<u32>| or_absent(mw.map(|mw| format_power_mw(f64::from(mw))));
    field(out, "Power", format!("{} / {}", watts(gpu.power_mw), watts(limit)));
    field(out, "Energy", or_absent(gpu.energy_mj.map(|mj| format_energy_mj(mj as f64))));
    let mhz = |v: Option<u32>| or_absent(v.map(|m| format!("{m} MHz")));
    field(
        out,
        "Clocks",
        format!("SM {}, memory {}", mhz(gpu.sm_clock_mhz), mhz(gpu.memory_clock_mhz)),
    );
    field(out, "P-state", or_absent(gpu.performance_state.map(|p| format!("P{p}"))));
    let throttle = if !gpu.throttle_reason_names.is_empty() {
        gpu.throttle_reason_names.join(", ")
    } else {
        match gpu.throttle_reasons {
            Some(0) => "none".to_owned(),
            Some(bits) => format!("{bits:#x}"),
            None => ABSENT.to_owned(),
        }
    };
    field(out, "Throttle", throttle);
    field(
        out,
        "ECC errors",
        format!(
            "corrected {}, uncorrected {}",
            or_absent(gpu.ecc_corrected),
            or_absent(gpu.ecc_uncorrected)
        ),
    );
    let rate =
        |v: Option<u32>| or_absent(v.map(|k| format!("{}/s", format_bytes(u64::from(k) * 1024))));
    field(
        out,
        "PCIe",
        format!("tx {}, rx {}", rate(gpu.pcie_tx_kib_per_s), rate(gpu.pcie_rx_kib_per_s)),
    );
    let mig = gpu.mig_enabled.or_else(|| info.and_then(|g| g.mig_enabled));
    field(out, "MIG", or_absent(mig.map(|on| if on { "enabled" } else { "disabled" })));
    let processes = if gpu.processes.is_empty() {
        "none".to_owned()
    } else {
        let list: Vec<String> = gpu
            .processes
            .iter()
            .map(|p| {
                format!("pid {} ({})", p.pid, or_absent(p.used_memory_bytes.map(format_bytes)))
            })
            .collect();
        list.join(", ")
    };
    field(out, "Processes", processes);
}

fn accelerator_blocks(out: &mut String, inventory: &Inventory, latest: &Sample) {
    let mut devices: Vec<(&str, &str)> =
        inventory.accelerators.iter().map(|a| (a.source.as_str(), a.device.as_str())).collect();
    for sample in &latest.accelerators {
        let key = (sample.source.as_str(), sample.device.as_str());
        if !devices.contains(&key) {
            devices.push(key);
        }
    }
    for (source, device) in devices {
        out.push_str(&format!("\nAccelerator {source} {device}\n"));
        let sample = latest.accelerators.iter().find(|a| a.source == source && a.device == device);
        match sample {
            Some(sample) if !sample.metrics.is_empty() => {
                for (name, value) in &sample.metrics {
                    field(out, name, format_metric_value(name, *value));
                }
            }
            _ => field(out, "Readings", "none in the latest sample"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use common::proto::{AcceleratorSample, GpuProcess};

    use crate::views::{HostState, MetricPoint};

    #[test]
    fn table_columns_align() {
        let mut table = Table::new(["NAME", "N", "NOTE"]).right_align(&[1]);
        table.push_row(vec!["a".into(), "1".into(), "x".into()]);
        table.push_row(vec!["longer".into(), "1234".into(), "—".into()]);
        table.push_row(vec!["b".into()]);
        assert_eq!(
            table.render(),
            "NAME       N  NOTE\n\
             a          1  x\n\
             longer  1234  —\n\
             b\n"
        );
    }

    #[test]
    fn bytes_are_binary_units() {
        assert_eq!(format_bytes(0), "0 B");
        assert_eq!(format_bytes(1023), "1023 B");
        assert_eq!(format_bytes(1024), "1.0 KiB");
        assert_eq!(format_bytes(1536), "1.5 KiB");
        assert_eq!(format_bytes(13_207_024_435), "12.3 GiB");
        assert_eq!(format_bytes(85_899_345_920), "80.0 GiB");
        assert_eq!(format_bytes(u64::MAX), "16384.0 PiB");
        assert_eq!(format_rate(1_258_291.2), "1.2 MiB/s");
    }

    #[test]
    fn power_energy_and_values() {
        assert_eq!(format_power_mw(115_200.0), "115.2 W");
        assert_eq!(format_energy_mj(850_000.0), "850 J");
        assert_eq!(format_energy_mj(12_300_000.0), "12.3 kJ");
        assert_eq!(format_energy_mj(4_500_000_000.0), "4.5 MJ");
        assert_eq!(format_metric_value("gpu0_power_mw", 115_200.0), "115.2 W");
        assert_eq!(format_metric_value("cpu_util_pct", 12.34), "12.3 %");
        assert_eq!(format_metric_value("memory_used_bytes", 2048.0), "2.0 KiB");
        assert_eq!(format_metric_value("gpu0_temperature_c", 45.0), "45.0 °C");
        assert_eq!(format_metric_value("load1", 2.0), "2");
        assert_eq!(format_metric_value("load1", 0.125), "0.125");
        assert_eq!(format_metric_value("load1", 0.5), "0.5");
    }

    #[test]
    fn times_are_human() {
        let now = 1_700_000_000_000;
        assert_eq!(format_ago(now - 400, now), "just now");
        assert_eq!(format_ago(now - 3_000, now), "3s ago");
        assert_eq!(format_ago(now - 59_999, now), "59s ago");
        assert_eq!(format_ago(now - 5 * 60_000 - 10, now), "5m ago");
        assert_eq!(format_ago(now - 2 * 3_600_000, now), "2h ago");
        assert_eq!(format_ago(now - 3 * 86_400_000, now), "3d ago");
        assert_eq!(format_ago(now + 5_000, now), "in 5s");
        assert_eq!(format_utc(0), "1970-01-01 00:00:00");
        assert_eq!(format_utc(1_700_000_000_000), "2023-11-14 22:13:20");
        assert_eq!(format_utc(951_782_400_000), "2000-02-29 00:00:00");
        assert_eq!(format_utc(-1_000), "1969-12-31 23:59:59");
        assert_eq!(format_duration_secs(90), "90s");
        assert_eq!(format_duration_secs(900), "15m");
        assert_eq!(format_duration_secs(3600), "1h");
        assert_eq!(format_duration_secs(5400), "90m");
        assert_eq!(format_duration_secs(172_800), "2d");
        assert_eq!(format_duration_secs(604_800), "1w");
    }

    #[test]
    fn sparkline_scales_onto_eight_levels() {
        let ramp: Vec<f64> = (0..8).map(f64::from).collect();
        assert_eq!(sparkline(&ramp, 80), "▁▂▃▄▅▆▇█");
        assert_eq!(sparkline(&[1.0, 5.0, 3.0, 5.0, 1.0], 80), "▁█▅█▁");
        assert_eq!(sparkline(&[2.0, 2.0, 2.0], 80), "▄▄▄");
        assert_eq!(sparkline(&[0.0, f64::NAN, 7.0], 80), "▁ █");
        assert_eq!(sparkline(&[], 80), "");
    }

    #[test]
    fn sparkline_downsamples_to_width() {
        // Pairs average to 0.5, 2.5, 4.5, 6.5: evenly spaced, so the ends and two middles.
        let ramp: Vec<f64> = (0..8).map(f64::from).collect();
        assert_eq!(sparkline(&ramp, 4), "▁▃▆█");
        assert_eq!(sparkline(&vec![1.0; 1000], 10).chars().count(), 10);
    }

    #[test]
    fn agent_strings_cannot_drive_the_terminal() {
        // Regression (issue 8, hole 6): a host name or label with an escape sequence was printed
        // raw, so an agent could retitle, clear or rewrite the operator's terminal.
        let now = 1_700_000_000_000;
        let table = hosts_table(&[summary("evil\u{1b}]0;pwned\u{7}\nfake-host", now)], now);
        assert!(!table.chars().any(|c| c.is_control() && c != '\n'), "{table:?}");
        assert!(table.contains("evil\\u{1b}]0;pwned\\u{7}\\nfake-host"), "{table}");
        assert_eq!(table.lines().count(), 2, "an embedded newline must not add a row");
        let mut inventory = Inventory { hostname: "h\u{9b}2J".into(), ..Inventory::default() };
        inventory.labels.insert("zone".into(), "a\u{1b}[31m".into());
        let mut out = String::new();
        inventory_fields(&mut out, &inventory);
        assert!(!out.chars().any(|c| c.is_control() && c != '\n'), "{out:?}");
        assert_eq!(escape_output("ok\nline\u{1b}"), "ok\nline\\u{1b}");
        assert!(matches!(escape("plain"), std::borrow::Cow::Borrowed("plain")));
    }

    fn summary(host: &str, now: i64) -> HostSummary {
        HostSummary {
            host: host.into(),
            state: HostState::Online,
            last_seen_unix_ms: Some(now - 3_000),
            gpu_count: 8,
            cpu_util_pct: Some(12.345),
            gpu_util_pct: None,
            samples_total: 12_345,
            last_seq: 321,
            agent_version: "0.1.0".into(),
        }
    }

    #[test]
    fn hosts_table_renders_rows() {
        let now = 1_700_000_000_000;
        let mut offline = summary("cpu-7", now);
        offline.state = HostState::Offline;
        offline.last_seen_unix_ms = None;
        offline.gpu_count = 0;
        offline.cpu_util_pct = None;
        offline.samples_total = 0;
        assert_eq!(
            hosts_table(&[summary("gpu-01", now), offline], now),
            "HOST    STATE    LAST SEEN  GPUS  CPU%  GPU%  SAMPLES\n\
             gpu-01  online   3s ago        8  12.3     —    12345\n\
             cpu-7   offline  never         0     —     —        0\n"
        );
    }

    #[test]
    fn host_detail_shows_gpus_with_absent_fields() {
        let now = 1_700_000_000_000;
        let mut inventory = Inventory {
            hostname: "gpu-01.lan".into(),
            os: "Ubuntu 24.04".into(),
            kernel: "6.8.0".into(),
            cpu_cores: 4,
            cpu_brand: "EPYC".into(),
            memory_total_bytes: 16 << 30,
            gpus: vec![GpuInfo {
                index: 0,
                uuid: "GPU-abc".into(),
                name: "NVIDIA H100 80GB HBM3".into(),
                memory_total_bytes: 80 << 30,
                power_limit_mw: Some(700_000),
                driver_version: "550.54".into(),
                mig_enabled: Some(false),
            }],
            ..Default::default()
        };
        inventory.labels.insert("zone".into(), "a".into());
        let latest = Sample {
            unix_ms: now - 2_000,
            sample_index: 9,
            host: Some(HostSample {
                cpu_util_pct: 50.0,
                cpu_core_util_pct: vec![10.0, 90.0],
                memory_used_bytes: 4 << 30,
                memory_total_bytes: 16 << 30,
                net_rx_bytes: 2048,
                interval_ms: 1000,
                ..Default::default()
            }),
            gpus: vec![GpuSample {
                index: 0,
                uuid: "GPU-abc".into(),
                util_gpu_pct: Some(45),
                memory_used_bytes: Some(8 << 30),
                power_mw: Some(115_200),
                throttle_reasons: Some(1),
                throttle_reason_names: vec!["gpu_idle".into()],
                processes: vec![GpuProcess { pid: 42, used_memory_bytes: None }],
                ..Default::default()
            }],
            accelerators: vec![AcceleratorSample {
                source: "exec:fpga".into(),
                device: "u250".into(),
                metrics: [("temp_c".to_owned(), 41.5)].into_iter().collect(),
            }],
            models: Vec::new(),
        };
        let detail = HostDetail {
            summary: summary("gpu-01", now),
            inventory,
            latest: Some(latest),
            spool_dropped_batches: 0,
            spool_dropped_samples: 0,
            cert_not_after_secs: None,
            telemetry: crate::store::HostHealth::default(),
            dedup_seen: 0,
        };
        let page = host_detail(&detail, now);
        for expected in [
            "  Host          gpu-01\n",
            "  State         online (last seen 3s ago)\n",
            "  OS            Ubuntu 24.04, kernel 6.8.0\n",
            "  Memory        16.0 GiB\n",
            "  Labels        zone=a\n",
            "  Certificate   —\n",
            "Latest sample (2s ago, 2023-11-14 22:13:18 UTC)\n",
            "  CPU           50.0 % of 4 cores, busiest core 90.0 %\n",
            "  Memory        4.0 GiB / 16.0 GiB (25.0 %)\n",
            "  Swap          none\n",
            "  Network       rx 2.0 KiB/s, tx 0 B/s\n",
            "GPU 0: NVIDIA H100 80GB HBM3\n",
            "  Utilization   GPU 45 %, memory —, encoder —, decoder —\n",
            "  Memory        8.0 GiB / 80.0 GiB (10.0 %)\n",
            "  Temperature   —\n",
            "  Power         115.2 W / 700.0 W\n",
            "  Throttle      gpu_idle\n",
            "  MIG           disabled\n",
            "  Processes     pid 42 (—)\n",
            "Accelerator exec:fpga u250\n",
            "  temp_c        41.5 °C\n",
            "  Clock         —\n",
            "  Telemetry     ok\n",
        ] {
            assert!(page.contains(expected), "missing {expected:?} in\n{page}");
        }
        assert!(!page.contains("Refused") && !page.contains("Gaps"), "{page}");
    }

    #[test]
    fn host_detail_shows_clock_skew_and_telemetry_failures() {
        let now = 1_700_000_000_000;
        let mut detail = HostDetail {
            summary: summary("gpu-01", now),
            inventory: Inventory::default(),
            latest: None,
            spool_dropped_batches: 0,
            spool_dropped_samples: 0,
            cert_not_after_secs: None,
            telemetry: crate::store::HostHealth {
                clock_offset_ms: Some(-1_250),
                ..Default::default()
            },
            dedup_seen: 0,
        };
        let page = host_detail(&detail, now);
        assert!(page.contains("  Clock         1.250 s behind the aggregator\n"), "{page}");
        detail.telemetry = crate::store::HostHealth {
            clock_offset_ms: Some(600_000),
            telemetry_errors: 3,
            last_telemetry_error: "spool: append failed\x1b[2J".into(),
            last_telemetry_error_unix_ms: now - 60_000,
            future_samples_refused: 7,
            last_future_refusal_ms: now - 5_000,
        };
        detail.dedup_seen = 2;
        let page = host_detail(&detail, now);
        for expected in [
            "  Clock         600.000 s ahead of the aggregator  WARNING: over 2 s off; check NTP\n",
            "  Telemetry     3 errors since agent start, last 1m ago: spool: append failed\\u{1b}[2J\n",
            "  Refused       7 samples dated in the future, last 5s ago\n",
            "  Gaps          2 batches stored after a missing one\n",
        ] {
            assert!(page.contains(expected), "missing {expected:?} in\n{page}");
        }
    }

    #[test]
    fn metric_table_and_plot() {
        let point = |unix_ms, value: f64| MetricPoint {
            unix_ms,
            value,
            min: value - 1.0,
            max: value + 1.0,
            count: 60,
        };
        let series = MetricSeries {
            host: "gpu-01".into(),
            metric: "cpu_util_pct".into(),
            resolution: Resolution::Minute,
            points: vec![point(0, 10.0), point(60_000, 20.0)],
        };
        assert_eq!(
            metric_table(&series),
            "TIME (UTC)            VALUE     MIN     MAX  COUNT\n\
             1970-01-01 00:00:00  10.0 %   9.0 %  11.0 %     60\n\
             1970-01-01 00:01:00  20.0 %  19.0 %  21.0 %     60\n"
        );
        assert_eq!(
            metric_plot(&series, 80),
            "▁█\nmin 9.0 %  max 21.0 %  last 20.0 %\n\
             1970-01-01 00:00:00 → 1970-01-01 00:01:00 UTC\n"
        );
    }
}
