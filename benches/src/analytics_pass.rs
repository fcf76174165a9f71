//! `bench-analytics-pass`: the cost of one analytics pass over a large fleet, and how it grows
//! when each host's history doubles.
//!
//! For each history length (`--days / 2` and `--days`), a child process builds a real sled
//! store in a temporary directory: `--hosts` hosts (Hello with a priced instance type), one
//! telemetry sample per host-hour through `TelemetryStore::commit` (host CPU, one GPU, two
//! models with latency histograms, a daily demand cycle), then the store's own rollup. It then
//! times, with the scheduler's own code (`scheduler::snapshot` + `analytics::analyze_with`):
//! - the first pass (every hour decoded, every forecast fitted);
//! - a pass in the same hour with nothing new (the pass every 5 minutes in steady state);
//! - a pass after one more hour of telemetry for every host (the first pass of each hour);
//!
//! and reports the process's resident memory after the first pass (VmRSS) and at its peak
//! (VmHWM), each child being a fresh process.
//!
//! Run from the repository root: `cargo run --release -p benches --bin bench-analytics-pass`
//! (`--hosts N --days D`).

use std::collections::BTreeMap;
use std::time::Instant;

use aggregator::analytics::series::HOUR_MS;
use aggregator::analytics::{ForecastMemo, analyze_with, cost::PricingCatalog, settings::Settings};
use aggregator::hour_cache::HourCache;
use aggregator::scheduler::snapshot;
use aggregator::store::{IncomingBatch, SledStore, TelemetryStore};
use anyhow::Context as _;
use clap::Parser;
use common::histogram::LogHistogram;
use common::ids::HostId;
use common::proto::{GpuSample, Hello, HostSample, Inventory, ModelSample, Sample, TelemetryBatch};

/// Flags.
#[derive(Debug, Parser)]
#[command(name = "bench-analytics-pass")]
struct Args {
    /// Hosts in the fleet.
    #[arg(long, default_value_t = 1000)]
    hosts: usize,
    /// Days of history (also measured at half of it).
    #[arg(long, default_value_t = 30)]
    days: i64,
    /// Run one history length in this process (used by the parent).
    #[arg(long, hide = true)]
    child: Option<i64>,
}

/// What one child measured.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct Measured {
    days: i64,
    build_s: f64,
    first_pass_s: f64,
    first_snapshot_s: f64,
    first_hours_read: usize,
    first_fitted: usize,
    same_hour_pass_s: f64,
    same_hour_snapshot_s: f64,
    same_hour_hours_read: usize,
    same_hour_fitted: usize,
    next_hour_pass_s: f64,
    next_hour_snapshot_s: f64,
    next_hour_hours_read: usize,
    next_hour_fitted: usize,
    rss_after_first_mib: f64,
    peak_rss_mib: f64,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(days) = args.child {
        let m = measure(args.hosts, days)?;
        println!("{}", serde_json::to_string(&m)?);
        return Ok(());
    }
    let me = std::env::current_exe().context("finding this binary")?;
    let mut rows = Vec::new();
    for days in [args.days / 2, args.days] {
        eprintln!("building {} hosts x {days} days ...", args.hosts);
        let out = std::process::Command::new(&me)
            .args(["--hosts", &args.hosts.to_string(), "--child", &days.to_string()])
            .output()
            .context("running a child")?;
        anyhow::ensure!(
            out.status.success(),
            "child for {days} days failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8_lossy(&out.stdout);
        let line = text.lines().last().context("child printed nothing")?;
        rows.push(serde_json::from_str::<Measured>(line).context("reading the child's result")?);
    }
    println!(
        "Analytics pass over {} hosts (2 models each, one GPU), history doubling:",
        args.hosts
    );
    println!(
        "{:>5} {:>9} {:>22} {:>22} {:>22} {:>9} {:>9}",
        "days",
        "build s",
        "first pass s (hours)",
        "same hour s (hours)",
        "next hour s (hours)",
        "RSS MiB",
        "peak MiB"
    );
    for m in &rows {
        println!(
            "{:>5} {:>9.1} {:>12.2} ({:>7}) {:>12.3} ({:>7}) {:>12.2} ({:>7}) {:>9.0} {:>9.0}",
            m.days,
            m.build_s,
            m.first_pass_s,
            m.first_hours_read,
            m.same_hour_pass_s,
            m.same_hour_hours_read,
            m.next_hour_pass_s,
            m.next_hour_hours_read,
            m.rss_after_first_mib,
            m.peak_rss_mib
        );
    }
    for m in &rows {
        println!(
            "  {} days: store reads (snapshot) s: first {:.3}, same hour {:.3}, next hour {:.3}; forecasts fitted: first {}, same hour {}, next hour {}",
            m.days,
            m.first_snapshot_s,
            m.same_hour_snapshot_s,
            m.next_hour_snapshot_s,
            m.first_fitted,
            m.same_hour_fitted,
            m.next_hour_fitted
        );
    }
    if let [half, full] = rows.as_slice() {
        println!(
            "Doubling the history: same-hour pass x{:.2}, next-hour pass x{:.2}, RSS x{:.2} (first pass x{:.2}: it reads everything once).",
            full.same_hour_pass_s / half.same_hour_pass_s.max(1e-9),
            full.next_hour_pass_s / half.next_hour_pass_s.max(1e-9),
            full.rss_after_first_mib / half.rss_after_first_mib.max(1e-9),
            full.first_pass_s / half.first_pass_s.max(1e-9)
        );
    }
    Ok(())
}

/// Builds the fleet's store with `days` of history and times the passes.
fn measure(hosts: usize, days: i64) -> anyhow::Result<Measured> {
    let dir = tempfile::tempdir()?;
    let store = SledStore::open(dir.path())?;
    // Whole hours, so the "next hour" is a new bucket.
    let now = (aggregator::ingest::now_ms() / HOUR_MS) * HOUR_MS + 30 * 60_000;
    let ids: Vec<HostId> =
        (0..hosts).map(|i| HostId::new(&format!("host-{i:04}"))).collect::<Result<_, _>>()?;
    let started = Instant::now();
    for id in &ids {
        let inventory = Inventory {
            cpu_cores: 8,
            labels: BTreeMap::from([
                ("instance_type".to_owned(), "g5.xlarge".to_owned()),
                ("lifecycle".to_owned(), "on-demand".to_owned()),
            ])
            .into_iter()
            .collect(),
            ..Inventory::default()
        };
        let hello = Hello { inventory: Some(inventory), spool_epoch: 1, ..Hello::default() };
        store.record_hello(id, &hello, i64::MAX, now)?;
    }
    let hours = usize::try_from(days * 24).unwrap_or(0);
    for (k, id) in ids.iter().enumerate() {
        // One batch per day of hourly samples, ending an hour before `now`.
        let batches: Vec<IncomingBatch> = (0..hours)
            .collect::<Vec<_>>()
            .chunks(24)
            .enumerate()
            .map(|(day, chunk)| {
                let samples = chunk
                    .iter()
                    .map(|h| {
                        let at = now - i64::try_from(hours - h).unwrap_or(0) * HOUR_MS;
                        fleet_sample(k, at, *h as u64)
                    })
                    .collect();
                IncomingBatch {
                    host: id.clone(),
                    batch: TelemetryBatch {
                        seq: day as u64 + 1,
                        samples,
                        ..TelemetryBatch::default()
                    },
                    received_ms: now,
                }
            })
            .collect();
        store.commit(&batches)?;
    }
    let committed_s = started.elapsed().as_secs_f64();
    store.roll_up(now + 2 * HOUR_MS)?;
    let build_s = started.elapsed().as_secs_f64();
    eprintln!(
        "  {days} days: samples committed in {committed_s:.1} s, rolled up in {:.1} s",
        build_s - committed_s
    );

    let settings = Settings::default();
    let catalog = PricingCatalog::builtin()?;
    let (mut cache, mut memo) = (HourCache::default(), ForecastMemo::default());
    let mut pass = |at: i64| -> anyhow::Result<(f64, f64, usize, usize)> {
        let started = Instant::now();
        let snap = snapshot(&store, &settings, at, &mut cache)?;
        let snapshot_s = started.elapsed().as_secs_f64();
        let analysis = analyze_with(&snap, &settings, &catalog, &mut memo);
        anyhow::ensure!(!analysis.forecasts.is_empty(), "no forecast made");
        Ok((
            started.elapsed().as_secs_f64(),
            snapshot_s,
            cache.last_refresh().hours_read,
            memo.fitted_last_pass,
        ))
    };
    let (first_pass_s, first_snapshot_s, first_hours_read, first_fitted) = pass(now)?;
    let rss_after_first_mib = proc_status_mib("VmRSS:");
    let (same_hour_pass_s, same_hour_snapshot_s, same_hour_hours_read, same_hour_fitted) =
        pass(now + 5 * 60_000)?;
    // One more hour for every host: a sample in the hour of `now`, rolled up once it closed.
    let next = now + HOUR_MS;
    for (k, id) in ids.iter().enumerate() {
        let sample = fleet_sample(k, now, hours as u64);
        store.commit(&[IncomingBatch {
            host: id.clone(),
            batch: TelemetryBatch {
                seq: (hours / 24) as u64 + 2,
                samples: vec![sample],
                ..TelemetryBatch::default()
            },
            received_ms: next,
        }])?;
    }
    store.roll_up(next + 2 * 60_000)?;
    let (next_hour_pass_s, next_hour_snapshot_s, next_hour_hours_read, next_hour_fitted) =
        pass(next + 2 * 60_000)?;
    Ok(Measured {
        days,
        build_s,
        first_pass_s,
        first_snapshot_s,
        first_hours_read,
        first_fitted,
        same_hour_pass_s,
        same_hour_snapshot_s,
        same_hour_hours_read,
        same_hour_fitted,
        next_hour_pass_s,
        next_hour_snapshot_s,
        next_hour_hours_read,
        next_hour_fitted,
        rss_after_first_mib,
        peak_rss_mib: proc_status_mib("VmHWM:"),
    })
}

/// Host `k`'s sample at `at`: demand with a daily cycle, two models, one GPU.
fn fleet_sample(k: usize, at: i64, index: u64) -> Sample {
    let hour = (at / HOUR_MS).rem_euclid(24) as f64;
    let demand = 20.0 + 15.0 * (2.0 * std::f64::consts::PI * hour / 24.0).sin() + (k % 7) as f64;
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)] // small positive rates
    let rps = demand as u64;
    let models = (0..2usize)
        .map(|m| {
            let mut latency = LogHistogram::new();
            latency.record_n(20_000 + 1_000 * m as u64, rps);
            ModelSample {
                model: format!("model-{}", (k + m) % 50),
                interval_ms: 1000,
                requests: rps,
                successes: rps,
                inferences: rps,
                latency_us: Some(latency.to_proto()),
                ..ModelSample::default()
            }
        })
        .collect();
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)] // a positive percentage
    let (util, gpu_util) = (demand as f32, demand as u32);
    Sample {
        unix_ms: at,
        sample_index: index,
        host: Some(HostSample {
            cpu_util_pct: util / 2.0,
            interval_ms: 1000,
            ..HostSample::default()
        }),
        gpus: vec![GpuSample { index: 0, util_gpu_pct: Some(gpu_util), ..GpuSample::default() }],
        models,
        ..Sample::default()
    }
}

/// A `/proc/self/status` size line (kB) in MiB (0 where unreadable).
fn proc_status_mib(key: &str) -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(key))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}
