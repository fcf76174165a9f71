//! `bench-forecast`: the demand forecaster scored on public hourly demand series of different
//! character, next to the seasonal-naive baselines, plus the time to select, fit and forecast
//! 1,000 series.
//!
//! Protocol (the one of `../shared/data/README.md`, "series/", extended to 8 weekly origins,
//! exactly what `flotilla forecast backtest --csv F --origins 8` runs): hourly grid,
//! duplicate timestamps averaged, gaps left missing; rolling origins at the last 8 UTC
//! midnights a week apart whose 168 h horizon fits in the data; MASE with scale = mean
//! `|y[t] - y[t-168]|` over all training pairs where both exist, scored on the horizon hours
//! that have an actual; 80 % and 95 % interval coverage beside it.
//!
//! Goal per series: mean MASE at most 0.9 times the best seasonal-naive baseline (daily or
//! weekly, scored in the same run), and never above it.
//!
//! The series: the traffic series of `../shared/data/series` and every CSV of
//! `benches/data/series` (made by `benches/data/convert_series.py`; origins and licenses in
//! `benches/data/series/ORIGIN.md`).
//!
//! Run from the repository root:
//! `cargo run --release -p benches --bin bench-forecast`
//! (`--csv PATH` (repeatable) for other series, `--series N` for the timing run).

use std::time::Instant;

use aggregator::analytics::backtest::{self, BacktestReport};
use aggregator::analytics::forecast::{ForecastSettings, forecast};
use aggregator::analytics::series::{self, HOUR_MS, HourlySeries};
use anyhow::Context as _;
use clap::Parser;

/// Flags.
#[derive(Debug, Parser)]
#[command(name = "bench-forecast")]
struct Args {
    /// Series to score (default: the shared traffic series and benches/data/series/*.csv).
    #[arg(long)]
    csv: Vec<std::path::PathBuf>,
    /// Weekly origins per series.
    #[arg(long, default_value_t = 8)]
    origins: usize,
    /// Series fitted and forecast in the timing run.
    #[arg(long, default_value_t = 1000)]
    series: usize,
}

const TRAFFIC: &str = "../shared/data/series/traffic_volume_hourly.csv";
const SERIES_DIR: &str = "benches/data/series";

/// Hourly points per series in the timing run (4 weeks).
const TIMING_POINTS: usize = 672;

fn f(v: Option<f64>) -> String {
    v.map_or_else(|| "-".to_owned(), |v| format!("{v:.3}"))
}

fn pct(v: Option<f64>) -> String {
    v.map_or_else(|| "-".to_owned(), |v| format!("{:.0}%", v * 100.0))
}

fn read(path: &std::path::Path) -> anyhow::Result<HourlySeries> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let points = series::parse_csv(&text).with_context(|| format!("reading {}", path.display()))?;
    Ok(HourlySeries::from_points(points))
}

/// The forecaster's mean MASE over the best baseline's, and the verdict.
fn verdict(r: &BacktestReport) -> (Option<f64>, &'static str) {
    let best = match (r.mean_naive_weekly, r.mean_naive_daily) {
        (Some(w), Some(d)) => Some(w.min(d)),
        (w, d) => w.or(d),
    };
    let ratio = r.mean_model.zip(best).map(|(m, b)| m / b);
    let verdict = match ratio {
        Some(x) if x <= 0.9 => "met",
        Some(x) if x <= 1.0 => "missed (<= 1.0)",
        Some(_) => "missed (> 1.0)",
        None => "not scored",
    };
    (ratio, verdict)
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut paths = args.csv.clone();
    if paths.is_empty() {
        paths.push(TRAFFIC.into());
        let mut dir: Vec<_> = std::fs::read_dir(SERIES_DIR)
            .with_context(|| format!("listing {SERIES_DIR} (run from the repository root)"))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "csv"))
            .collect();
        dir.sort();
        paths.extend(dir);
    }
    let settings = ForecastSettings::default();
    println!(
        "Backtest: {} weekly origins per series, horizon {} h; MASE (lower is better), ratio = forecaster / best seasonal naive.",
        args.origins, settings.horizon_hours
    );
    println!(
        "{:<30} {:>6} {:>10} {:>11} {:>10} {:>6} {:>9} {:>9}  goal",
        "series",
        "hours",
        "forecaster",
        "naive m=168",
        "naive m=24",
        "ratio",
        "cover 80%",
        "cover 95%"
    );
    let mut traffic = None;
    for path in &paths {
        let series = read(path)?;
        let origins = backtest::default_origins(&series, settings.horizon_hours, args.origins);
        let r = backtest::backtest(&series, &origins, &settings);
        let (ratio, goal) = verdict(&r);
        let name = path.file_stem().map_or_else(String::new, |s| s.to_string_lossy().into_owned());
        println!(
            "{name:<30} {:>6} {:>10} {:>11} {:>10} {:>6} {:>9} {:>9}  {goal}",
            series.len(),
            f(r.mean_model),
            f(r.mean_naive_weekly),
            f(r.mean_naive_daily),
            f(ratio),
            pct(r.mean_coverage_80),
            pct(r.mean_coverage_95)
        );
        for o in &r.origins {
            println!(
                "    {}  {:>10} {:>11} {:>10}  {}",
                series::format_time(o.origin_ms),
                f(o.model),
                f(o.naive_weekly),
                f(o.naive_daily),
                o.error.as_deref().or(o.method.as_deref()).unwrap_or("")
            );
        }
        if path.ends_with("traffic_volume_hourly.csv") {
            traffic = Some(series);
        }
    }

    // Time to select, fit and forecast many series: 4-week windows of the traffic series
    // ending at successive hours.
    let Some(series) = traffic.or_else(|| read(&paths[0]).ok()) else { return Ok(()) };
    let n = args.series;
    let end = series.len();
    let windows: Vec<HourlySeries> = (0..n)
        .map(|i| {
            let stop = end.saturating_sub(i);
            let start = stop.saturating_sub(TIMING_POINTS);
            HourlySeries {
                start_ms: series.start_ms + i64::try_from(start).unwrap_or(0) * HOUR_MS,
                values: series.values[start..stop].to_vec(),
            }
        })
        .collect();
    let started = Instant::now();
    let mut failed = 0;
    for w in &windows {
        if forecast(w, &settings).is_err() {
            failed += 1;
        }
    }
    let one = started.elapsed();
    let threads = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    let started = Instant::now();
    std::thread::scope(|scope| {
        for chunk in windows.chunks(n.div_ceil(threads).max(1)) {
            let settings = &settings;
            scope.spawn(move || chunk.iter().filter(|w| forecast(w, settings).is_err()).count());
        }
    });
    let all = started.elapsed();
    println!(
        "Selection + fit + {} h forecast of {n} series of {TIMING_POINTS} hourly points: {:.2} s on 1 thread ({:.1} ms per series), {:.2} s on {threads} threads; {failed} failed.",
        settings.horizon_hours,
        one.as_secs_f64(),
        one.as_secs_f64() * 1000.0 / n.max(1) as f64,
        all.as_secs_f64()
    );
    Ok(())
}
