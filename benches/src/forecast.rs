//! `bench-forecast`: the demand forecaster on the traffic benchmark of
//! `../shared/data/README.md` ("series/"), next to the seasonal-naive baselines, plus the time
//! to fit and forecast 1,000 series.
//!
//! Protocol (exactly the README's): hourly grid, duplicate timestamps averaged, gaps left
//! missing; rolling origins 2018-09-10, -17 and -24 00:00, horizon 168 h; MASE with scale =
//! mean `|y[t] - y[t-168]|` over all training pairs where both exist, scored on the horizon hours
//! that have an actual.
//!
//! Honest selection: the forecaster's settings (training weeks, seasonal-naive weight) are
//! chosen on the three origins *before* the test weeks (2018-08-20, -27, 09-03) and only then
//! scored on the test origins; both are printed. Robust STL is fixed a priori (the series has
//! holidays and outages).
//!
//! Run from the repository root:
//! `cargo run --release -p benches --bin bench-forecast`
//! (`--csv PATH` for another copy of the file, `--series N` for the timing run).

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
    /// The traffic series.
    #[arg(long, default_value = "../shared/data/series/traffic_volume_hourly.csv")]
    csv: std::path::PathBuf,
    /// Series fitted and forecast in the timing run.
    #[arg(long, default_value_t = 1000)]
    series: usize,
}

const TEST_ORIGINS: [&str; 3] = ["2018-09-10T00:00", "2018-09-17T00:00", "2018-09-24T00:00"];
const VALIDATION_ORIGINS: [&str; 3] = ["2018-08-20T00:00", "2018-08-27T00:00", "2018-09-03T00:00"];

fn origins(list: &[&str]) -> anyhow::Result<Vec<i64>> {
    list.iter().map(|o| series::parse_time(o).with_context(|| format!("origin {o}"))).collect()
}

fn f(v: Option<f64>) -> String {
    v.map_or_else(|| "—".to_owned(), |v| format!("{v:.3}"))
}

fn print_report(title: &str, r: &BacktestReport) {
    println!("{title}");
    println!("  origin             forecaster  naive m=168  naive m=24");
    for o in &r.origins {
        println!(
            "  {}   {:>10}  {:>11}  {:>10}{}",
            series::format_time(o.origin_ms),
            f(o.model),
            f(o.naive_weekly),
            f(o.naive_daily),
            o.error.as_deref().map(|e| format!("  ({e})")).unwrap_or_default()
        );
    }
    println!(
        "  mean               {:>10}  {:>11}  {:>10}",
        f(r.mean_model),
        f(r.mean_naive_weekly),
        f(r.mean_naive_daily)
    );
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let text = std::fs::read_to_string(&args.csv)
        .with_context(|| format!("reading {}", args.csv.display()))?;
    let points =
        series::parse_csv(&text).with_context(|| format!("reading {}", args.csv.display()))?;
    let rows = points.len();
    let series = HourlySeries::from_points(points);
    println!(
        "{}: {rows} rows -> {} hourly slots, {} present, {} missing",
        args.csv.display(),
        series.len(),
        series.present(),
        series.len() - series.present()
    );

    // 1. Choose settings on the validation origins.
    let validation = origins(&VALIDATION_ORIGINS)?;
    let mut best: Option<(f64, ForecastSettings)> = None;
    println!("Selection on the validation origins {VALIDATION_ORIGINS:?} (mean MASE):");
    for train_weeks in [4, 6, 8] {
        for naive_weight in [0.0, 0.3, 0.5] {
            let s = ForecastSettings { train_weeks, naive_weight, ..ForecastSettings::default() };
            let r = backtest::backtest(&series, &validation, &s);
            let m = r.mean_model.unwrap_or(f64::INFINITY);
            println!("  train_weeks {train_weeks}, naive_weight {naive_weight:.1}: {m:.3}");
            if best.as_ref().is_none_or(|(b, _)| m < *b) {
                best = Some((m, s));
            }
        }
    }
    let (val_mase, chosen) = best.context("no setting scored")?;
    println!(
        "Chosen: train_weeks {}, naive_weight {}, robust {} (validation MASE {val_mase:.3}); the built-in default is train_weeks {}, naive_weight {}.",
        chosen.train_weeks,
        chosen.naive_weight,
        chosen.robust,
        ForecastSettings::default().train_weeks,
        ForecastSettings::default().naive_weight
    );
    print_report(
        "Validation origins, chosen settings:",
        &backtest::backtest(&series, &validation, &chosen),
    );

    // 2. Score on the test origins.
    let test = origins(&TEST_ORIGINS)?;
    let report = backtest::backtest(&series, &test, &chosen);
    print_report("Test origins (the README's protocol), chosen settings:", &report);
    let plain = ForecastSettings { naive_weight: 0.0, robust: false, ..chosen.clone() };
    print_report(
        "Test origins, plain MSTL+ETS (no robust STL, no seasonal-naive combination), for reference:",
        &backtest::backtest(&series, &test, &plain),
    );
    if let Some(m) = report.mean_model {
        println!("Goal <= 0.68: {}", if m <= 0.68 { "met" } else { "not met" });
    }

    // 3. Time to fit and forecast many series: windows of the series ending at successive
    // hours before the last test origin.
    let end = series.index_at(test[0]);
    let window = chosen.train_weeks * 168;
    let n = args.series;
    let windows: Vec<HourlySeries> = (0..n)
        .map(|i| {
            let stop = end.saturating_sub(i);
            let start = stop.saturating_sub(window);
            HourlySeries {
                start_ms: series.start_ms + i64::try_from(start).unwrap_or(0) * HOUR_MS,
                values: series.values[start..stop].to_vec(),
            }
        })
        .collect();
    let started = Instant::now();
    let mut failed = 0;
    for w in &windows {
        if forecast(w, &chosen).is_err() {
            failed += 1;
        }
    }
    let one = started.elapsed();
    let threads = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    let started = Instant::now();
    std::thread::scope(|scope| {
        for chunk in windows.chunks(n.div_ceil(threads).max(1)) {
            let chosen = &chosen;
            scope.spawn(move || chunk.iter().filter(|w| forecast(w, chosen).is_err()).count());
        }
    });
    let all = started.elapsed();
    println!(
        "Fit + 168 h forecast of {n} series of {window} hourly points ({} weeks): {:.2} s on 1 thread ({:.1} ms per series), {:.2} s on {threads} threads; {failed} failed.",
        chosen.train_weeks,
        one.as_secs_f64(),
        one.as_secs_f64() * 1000.0 / n.max(1) as f64,
        all.as_secs_f64()
    );
    Ok(())
}
