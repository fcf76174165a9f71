//! Analytics: pure functions from a [`Snapshot`] of the store to decisions: demand forecasts
//! with anomalies, cost attribution, cost plans, budget status and alert observations.
//!
//! Nothing here does I/O or reads a clock: the snapshot carries `now_ms`, so every analytic is
//! unit-tested with hand-computed answers. [`crate::scheduler`] builds snapshots from the
//! store, runs [`analyze`] on a cron schedule (or on `POST /api/v1/analytics/run`), stores the
//! results and delivers alert transitions.
//!
//! | module | owns |
//! |---|---|
//! | [`series`] | hourly grid, gaps and duplicates, UTC calendar, CSV input |
//! | [`seasonality`] | daily / weekly cycle detection |
//! | [`forecast`] | MSTL + AutoETS forecaster with intervals |
//! | [`anomaly`] | robust (MAD) z-scores on residuals |
//! | [`backtest`] | rolling-origin MASE against seasonal-naive baselines |
//! | [`cost`] | pricing catalog, cost per host / model / 1k inferences, idle cost |
//! | [`plans`] | right-sizing, instance type, spot, scheduling, scale-in plans |
//! | [`budgets`] | budgets, burn-down, threshold observations |
//! | [`alerts`] | SLO and cost alert rules, dedupe and resolution |
//! | [`settings`] | the policy file (budgets, alerts, plan targets, webhook) |
//! | [`models`] | fleet-wide model view from merged histograms |

pub mod alerts;
pub mod anomaly;
pub mod backtest;
pub mod budgets;
pub mod candidates;
pub mod cost;
pub mod forecast;
pub mod models;
pub mod plans;
pub mod seasonality;
pub mod selection;
pub mod series;
pub mod settings;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use common::model_stats::ModelTotals;
use serde::{Deserialize, Serialize};

use self::anomaly::Anomaly;
use self::cost::{CostReport, PricingCatalog};
use self::forecast::Forecast;
use self::seasonality::Seasonality;
use self::series::{HOUR_MS, HourlySeries};
use self::settings::Settings;
use crate::store::Rollup;

/// What the store held at one moment, reduced to what analytics read.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// The moment, Unix ms; "now" for every analytic.
    pub now_ms: i64,
    /// Every host.
    pub hosts: Vec<HostSnapshot>,
}

/// One host in a snapshot.
#[derive(Debug, Clone, Default)]
pub struct HostSnapshot {
    /// Host id.
    pub host: String,
    /// Labels from its inventory (`instance_type`, `lifecycle`, ...).
    pub labels: BTreeMap<String, String>,
    /// GPUs in its inventory.
    pub gpus: u32,
    /// CPU cores in its inventory.
    pub cpu_cores: u32,
    /// Memory, bytes.
    pub memory_bytes: u64,
    /// Hourly aggregates by hour start (an entry means the host reported in that hour); shared
    /// with the pass-to-pass cache, so a snapshot costs no copy of the history.
    pub hours: Arc<BTreeMap<i64, HourStats>>,
    /// The recent window, from raw samples.
    pub recent: RecentWindow,
}

// === impl HostSnapshot ===

impl HostSnapshot {
    /// The hours, to change (copied first only if a cache still shares them).
    pub fn hours_mut(&mut self) -> &mut BTreeMap<i64, HourStats> {
        Arc::make_mut(&mut self.hours)
    }
}

/// One host-hour, from an hourly rollup.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HourStats {
    /// Mean CPU utilization, %.
    pub cpu_util_pct: Option<f64>,
    /// Highest CPU utilization sample, %.
    pub cpu_util_max_pct: Option<f64>,
    /// Mean GPU utilization over the host's GPUs, %.
    pub gpu_util_pct: Option<f64>,
    /// Highest GPU utilization sample of any GPU, %.
    pub gpu_util_max_pct: Option<f64>,
    /// Highest memory use, bytes.
    pub memory_used_max_bytes: Option<f64>,
    /// Per served model.
    pub models: BTreeMap<String, ModelHour>,
}

/// One model on one host in one hour (hourly means of its series).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ModelHour {
    /// Requests per second.
    pub requests_per_s: f64,
    /// Inferences per second.
    pub inferences_per_s: f64,
    /// Runner time over wall time, 100 per fully busy instance.
    pub busy_pct: f64,
}

/// The recent window of a host (alerts read it).
#[derive(Debug, Clone, Default)]
pub struct RecentWindow {
    /// Window length, seconds.
    pub window_secs: u64,
    /// Mean GPU utilization over the window, %.
    pub gpu_util_pct: Option<f64>,
    /// Mean CPU utilization over the window, %.
    pub cpu_util_pct: Option<f64>,
    /// Model totals merged over the window.
    pub models: BTreeMap<String, ModelTotals>,
}

// === impl HourStats ===

impl HourStats {
    /// Reads the series analytics need from one hourly rollup.
    pub fn from_rollup(rollup: &Rollup) -> Self {
        let mean =
            |name: &str| rollup.get(name).filter(|s| s.count > 0).map(|s| s.sum / s.count as f64);
        let max = |name: &str| rollup.get(name).filter(|s| s.count > 0).map(|s| s.max);
        let mut out = Self {
            cpu_util_pct: mean("cpu_util_pct"),
            cpu_util_max_pct: max("cpu_util_pct"),
            memory_used_max_bytes: max("memory_used_bytes"),
            ..Self::default()
        };
        let (mut gpu_sum, mut gpu_n, mut gpu_max) = (0.0, 0u32, None::<f64>);
        for (name, st) in rollup {
            if st.count == 0 {
                continue;
            }
            if let Some(rest) = name.strip_prefix("gpu").and_then(|r| r.strip_suffix("_util_pct")) {
                if rest.bytes().all(|b| b.is_ascii_digit()) && !rest.is_empty() {
                    gpu_sum += st.sum / st.count as f64;
                    gpu_n += 1;
                    gpu_max = Some(gpu_max.map_or(st.max, |m| m.max(st.max)));
                }
            } else if let Some((model, series)) =
                name.strip_prefix("model.").and_then(|r| r.rsplit_once('.'))
            {
                let v = st.sum / st.count as f64;
                let m = out.models.entry(model.to_owned()).or_default();
                match series {
                    "requests_per_s" => m.requests_per_s = v,
                    "inferences_per_s" => m.inferences_per_s = v,
                    "busy_pct" => m.busy_pct = v,
                    _ => {}
                }
            }
        }
        if gpu_n > 0 {
            out.gpu_util_pct = Some(gpu_sum / f64::from(gpu_n));
            out.gpu_util_max_pct = gpu_max;
        }
        out
    }
}

/// A forecast of one target, with its recent history and anomalies.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ForecastView {
    /// `model:NAME` or `host:HOST:METRIC`.
    pub target: String,
    /// Model name or host id.
    pub subject: String,
    /// What is forecast: `requests_per_s`, `gpu_util_pct` or `cpu_util_pct`.
    pub metric: String,
    /// Start of the history, Unix ms.
    pub history_start_ms: i64,
    /// Recent hourly history (`None`: no data that hour).
    pub history: Vec<Option<f64>>,
    /// The forecast, unless it failed.
    pub forecast: Option<Forecast>,
    /// Why it failed.
    pub error: Option<String>,
    /// Anomalies in the training window.
    pub anomalies: Vec<Anomaly>,
}

/// Everything one analytics pass produced.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Analysis {
    /// The snapshot's `now`.
    pub generated_ms: i64,
    /// Forecasts.
    pub forecasts: Vec<ForecastView>,
    /// Costs over the cost window.
    pub costs: CostReport,
    /// Plans, by priority.
    pub plans: Vec<plans::Plan>,
    /// Budget status.
    pub budgets: Vec<budgets::BudgetStatus>,
    /// Alert and budget observations (the scheduler applies them to the alert book).
    pub observations: Vec<alerts::Observation>,
}

/// The hourly series of every forecast target: per model the fleet-wide sum of requests/s,
/// per host its GPU (if it has GPU data) and CPU utilization.
pub fn targets(snapshot: &Snapshot) -> Vec<(String, String, String, HourlySeries)> {
    let mut out = Vec::new();
    let mut models: BTreeMap<String, BTreeMap<i64, f64>> = BTreeMap::new();
    for h in &snapshot.hosts {
        for (&t, st) in h.hours.iter() {
            for (m, mh) in &st.models {
                let series = match models.get_mut(m) {
                    Some(series) => series,
                    None => models.entry(m.clone()).or_default(),
                };
                *series.entry(t).or_default() += mh.requests_per_s;
            }
        }
    }
    for (m, pts) in models {
        out.push((
            format!("model:{m}"),
            m,
            "requests_per_s".to_owned(),
            HourlySeries::from_points(pts),
        ));
    }
    for h in &snapshot.hosts {
        type Pick = fn(&HourStats) -> Option<f64>;
        let picks: [(&str, Pick); 2] =
            [("gpu_util_pct", |s| s.gpu_util_pct), ("cpu_util_pct", |s| s.cpu_util_pct)];
        for (metric, pick) in picks {
            let pts: Vec<(i64, f64)> =
                h.hours.iter().filter_map(|(t, s)| pick(s).map(|v| (*t, v))).collect();
            if !pts.is_empty() {
                out.push((
                    format!("host:{}:{metric}", h.host),
                    h.host.clone(),
                    metric.to_owned(),
                    HourlySeries::from_points(pts),
                ));
            }
        }
    }
    out
}

/// Forecasts one target and finds anomalies in its training window. Only hours that closed
/// before `now_ms` are used (the current hour is still filling).
pub fn forecast_target(
    target: String,
    subject: String,
    metric: String,
    series: &HourlySeries,
    now_ms: i64,
    settings: &Settings,
) -> ForecastView {
    let closed = series.before(series::floor_hour(now_ms));
    let history = closed.last(settings.forecast.history_hours);
    let (forecast, error, anomalies) = match forecast::forecast(&closed, &settings.forecast.model) {
        Ok(mut f) => {
            let window = closed.last(closed.len() - closed.index_at(f.train_start_ms));
            let points: Vec<(i64, f64, f64)> = window
                .values
                .iter()
                .zip(&f.fitted)
                .enumerate()
                .filter_map(|(i, (y, e))| y.map(|y| (window.time_of(i), y, *e)))
                .collect();
            let anomalies = anomaly::detect(&points, settings.forecast.anomaly_z);
            // The fit is only needed for anomalies; keep the stored view small.
            f.fitted.clear();
            (Some(f), None, anomalies)
        }
        Err(e) => (None, Some(e.to_string()), Vec::new()),
    };
    ForecastView {
        target,
        subject,
        metric,
        history_start_ms: history.start_ms,
        history: history.values,
        forecast,
        error,
        anomalies,
    }
}

/// Runs every analytic over `snapshot`.
pub fn analyze(snapshot: &Snapshot, settings: &Settings, catalog: &PricingCatalog) -> Analysis {
    analyze_with(snapshot, settings, catalog, &mut ForecastMemo::default())
}

/// The forecasts of the previous pass by target, each with the fingerprint of its inputs (the
/// closed hours it was fitted on, the hour it was made in, the forecast settings): a target
/// whose inputs did not change is not fitted again. Holds only the targets of the last pass.
#[derive(Debug, Default)]
pub struct ForecastMemo {
    views: HashMap<String, (u64, ForecastView)>,
    /// Forecasts fitted by the last pass (the rest were reused).
    pub fitted_last_pass: usize,
}

/// Forecasts of targets too young for a model (fewer than [`forecast::MIN_POINTS`] closed
/// hours; a fresh fleet has none): the rate of the recent window, held flat, with a band from 0
/// to twice it, and said so in the method. Replaced by the model's forecast once enough hours
/// have closed.
fn young_forecasts(
    snapshot: &Snapshot,
    targets: &[(String, String, String, HourlySeries)],
    settings: &Settings,
) -> Vec<ForecastView> {
    // Closed hours per target, looked up once per candidate.
    let closed: HashMap<&str, usize> =
        targets.iter().map(|(t, _, _, s)| (t.as_str(), s.present())).collect();
    let closed_of = |target: &str| closed.get(target).copied().unwrap_or(0);
    let mut levels: BTreeMap<(String, String, String), (f64, u64)> = BTreeMap::new();
    for h in &snapshot.hosts {
        let secs = h.recent.window_secs.max(1);
        for (m, t) in &h.recent.models {
            let e = levels
                .entry((format!("model:{m}"), m.clone(), "requests_per_s".to_owned()))
                .or_insert((0.0, secs));
            e.0 += t.requests as f64 / secs as f64;
        }
        for (metric, v) in
            [("gpu_util_pct", h.recent.gpu_util_pct), ("cpu_util_pct", h.recent.cpu_util_pct)]
        {
            if let Some(v) = v {
                levels.insert(
                    (format!("host:{}:{metric}", h.host), h.host.clone(), metric.to_owned()),
                    (v, secs),
                );
            }
        }
    }
    let start = series::floor_hour(snapshot.now_ms);
    let h = settings.forecast.model.horizon_hours;
    levels
        .into_iter()
        .filter(|((target, ..), _)| closed_of(target) < forecast::MIN_POINTS)
        .map(|((target, subject, metric), (level, secs))| {
            // Utilization cannot pass 100 %.
            let high =
                if metric.ends_with("_pct") { (2.0 * level).min(100.0) } else { 2.0 * level };
            let closed = closed_of(&target);
            ForecastView {
                target,
                subject,
                metric,
                history_start_ms: start,
                history: Vec::new(),
                forecast: Some(Forecast {
                    start_ms: start,
                    point: vec![level; h],
                    lower: vec![0.0; h],
                    upper: vec![high; h],
                    level: settings.forecast.model.level,
                    seasonality: Seasonality::default(),
                    method: format!(
                        "recent level: the mean of the last {secs} s held flat, band 0 to 2x \
                         ({closed} closed hours; a model needs {})",
                        forecast::MIN_POINTS
                    ),
                    train_start_ms: start,
                    fitted: Vec::new(),
                    selection: None,
                }),
                error: None,
                anomalies: Vec::new(),
            }
        })
        .collect()
}

/// The fingerprint of one forecast's inputs.
fn fingerprint(target: &str, series: &HourlySeries, now_ms: i64, settings: &str) -> u64 {
    use std::hash::{Hash as _, Hasher as _};
    let mut h = std::hash::DefaultHasher::new();
    target.hash(&mut h);
    series::floor_hour(now_ms).hash(&mut h);
    series.start_ms.hash(&mut h);
    for v in &series.values {
        v.map(f64::to_bits).hash(&mut h);
    }
    settings.hash(&mut h);
    h.finish()
}

/// [`analyze`], reusing the forecasts in `memo` whose inputs did not change and fitting the
/// rest on every core.
pub fn analyze_with(
    snapshot: &Snapshot,
    settings: &Settings,
    catalog: &PricingCatalog,
    memo: &mut ForecastMemo,
) -> Analysis {
    let now = snapshot.now_ms;
    let targets = targets(snapshot);
    let young = young_forecasts(snapshot, &targets, settings);
    let forecast_settings = format!("{:?}", settings.forecast);
    let prints: Vec<u64> = targets
        .iter()
        .map(|(t, _, _, series)| fingerprint(t, series, now, &forecast_settings))
        .collect();
    let mut forecasts: Vec<Option<ForecastView>> = targets
        .iter()
        .zip(&prints)
        .map(|((t, ..), p)| memo.views.get(t).filter(|(q, _)| q == p).map(|(_, v)| v.clone()))
        .collect();
    let todo: Vec<usize> = (0..targets.len()).filter(|i| forecasts[*i].is_none()).collect();
    let threads = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    let chunk = todo.len().div_ceil(threads).max(1);
    let fitted: Vec<(usize, ForecastView)> = std::thread::scope(|scope| {
        let handles: Vec<_> = todo
            .chunks(chunk)
            .map(|part| {
                let targets = &targets;
                scope.spawn(move || {
                    part.iter()
                        .map(|&i| {
                            let (t, s, m, series) = &targets[i];
                            let view = forecast_target(
                                t.clone(),
                                s.clone(),
                                m.clone(),
                                series,
                                now,
                                settings,
                            );
                            (i, view)
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles.into_iter().flat_map(|h| h.join().unwrap_or_default()).collect()
    });
    memo.fitted_last_pass = fitted.len();
    for (i, view) in fitted {
        forecasts[i] = Some(view);
    }
    let mut views = HashMap::with_capacity(targets.len());
    let forecasts: Vec<ForecastView> = forecasts
        .into_iter()
        .zip(&targets)
        .zip(prints)
        .map(|((view, (t, s, m, _)), p)| match view {
            Some(view) => {
                views.insert(t.clone(), (p, view.clone()));
                view
            }
            // A fit that panicked left no view: a failed forecast, tried again next pass.
            None => ForecastView {
                target: t.clone(),
                subject: s.clone(),
                metric: m.clone(),
                history_start_ms: now,
                history: Vec::new(),
                forecast: None,
                error: Some("the forecast failed unexpectedly (see the aggregator log)".into()),
                anomalies: Vec::new(),
            },
        })
        .collect();
    memo.views = views;
    // A young target's recent-level forecast stands in for its model's "not enough data".
    let mut forecasts = forecasts;
    let young_targets: std::collections::HashSet<&str> =
        young.iter().map(|y| y.target.as_str()).collect();
    forecasts.retain(|v| v.forecast.is_some() || !young_targets.contains(v.target.as_str()));
    forecasts.extend(young);
    let to = series::floor_hour(now);
    let from = to - i64::try_from(settings.cost_window_hours).unwrap_or(24) * HOUR_MS;
    let costs = cost::attribute(snapshot, catalog, from, to);
    let plans = plans::plans(snapshot, catalog, &costs, &forecasts, &settings.plans);
    let budgets: Vec<budgets::BudgetStatus> = settings
        .budgets
        .iter()
        .map(|b| budgets::evaluate(b, &costs.ledger, snapshot, &plans))
        .collect();
    let mut observations = alerts::observe(&settings.alerts, snapshot, &costs);
    observations.extend(budgets.iter().flat_map(budgets::observations));
    Analysis { generated_ms: now, forecasts, costs, plans, budgets, observations }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Stats;

    #[test]
    fn forecasts_are_refitted_only_when_their_inputs_change() {
        // Three weeks of one model's hourly demand on one host.
        let mut host = HostSnapshot { host: "a".into(), ..HostSnapshot::default() };
        for t in 0..504i64 {
            let mut st = HourStats::default();
            let rps = 10.0 + (t % 24) as f64;
            st.models.insert("m".into(), ModelHour { requests_per_s: rps, ..ModelHour::default() });
            st.cpu_util_pct = Some(rps);
            host.hours_mut().insert(t * HOUR_MS, st);
        }
        let mut snapshot = Snapshot { now_ms: 504 * HOUR_MS + 60_000, hosts: vec![host] };
        let (settings, catalog) = (Settings::default(), PricingCatalog::builtin().unwrap());
        let mut memo = ForecastMemo::default();
        let first = analyze_with(&snapshot, &settings, &catalog, &mut memo);
        assert_eq!(memo.fitted_last_pass, 2, "model and host CPU");
        // Five minutes later, nothing new: nothing refitted, the same forecasts.
        snapshot.now_ms += 5 * 60_000;
        let again = analyze_with(&snapshot, &settings, &catalog, &mut memo);
        assert_eq!(memo.fitted_last_pass, 0);
        assert_eq!(again.forecasts, first.forecasts);
        // Late data changes one hour of the model (not the CPU): only the model is refitted.
        let hours = snapshot.hosts[0].hours_mut();
        hours.get_mut(&(100 * HOUR_MS)).unwrap().models.get_mut("m").unwrap().requests_per_s = 99.0;
        analyze_with(&snapshot, &settings, &catalog, &mut memo);
        assert_eq!(memo.fitted_last_pass, 1);
        // A new hour: everything is refitted.
        snapshot.now_ms += HOUR_MS;
        analyze_with(&snapshot, &settings, &catalog, &mut memo);
        assert_eq!(memo.fitted_last_pass, 2);
    }

    #[test]
    fn a_fresh_fleet_gets_a_recent_level_forecast_a_price_and_a_plan() {
        // One owned host, a minute old: no closed hour, a recent window with 600 requests in
        // 300 s and an idle CPU.
        let mut recent =
            RecentWindow { window_secs: 300, cpu_util_pct: Some(2.0), ..RecentWindow::default() };
        recent.models.insert("m".into(), ModelTotals { requests: 600, ..ModelTotals::default() });
        let host = HostSnapshot {
            host: "box".into(),
            labels: [("lifecycle", "owned"), ("hourly_cost_usd", "0.25")]
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect(),
            cpu_cores: 8,
            recent,
            ..HostSnapshot::default()
        };
        let snapshot = Snapshot { now_ms: 100 * HOUR_MS + 60_000, hosts: vec![host] };
        let a = analyze(&snapshot, &Settings::default(), &PricingCatalog::builtin().unwrap());
        let model = a.forecasts.iter().find(|f| f.target == "model:m").unwrap();
        let f = model.forecast.as_ref().unwrap();
        assert!(f.method.starts_with("recent level"), "{}", f.method);
        assert_eq!((f.point[0], f.upper[0], f.start_ms), (2.0, 4.0, 100 * HOUR_MS));
        let cpu = a.forecasts.iter().find(|f| f.target == "host:box:cpu_util_pct").unwrap();
        assert_eq!(cpu.forecast.as_ref().unwrap().point[0], 2.0);
        // Each target once: no "not enough data" view beside the recent level.
        assert_eq!(
            a.forecasts.len(),
            2,
            "{:?}",
            a.forecasts.iter().map(|f| &f.target).collect::<Vec<_>>()
        );
        assert_eq!(a.costs.fleet_hourly_rate, 0.25);
        let plan = a.plans.iter().find(|p| p.target == "box").expect("a scale-in plan");
        assert!(plan.rationale.contains("no closed hour yet"), "{}", plan.rationale);
    }

    #[test]
    fn hour_stats_read_gpus_and_models_from_a_rollup() {
        let st = |sum: f64, count: u64, max: f64| Stats { count, sum, min: 0.0, max };
        let rollup: Rollup = [
            ("cpu_util_pct", st(30.0, 3, 20.0)),
            ("gpu0_util_pct", st(100.0, 2, 80.0)),
            ("gpu1_util_pct", st(20.0, 2, 15.0)),
            ("gpu0_power_mw", st(1.0, 1, 1.0)),
            ("model.res.net.busy_pct", st(150.0, 3, 60.0)),
            ("model.res.net.requests_per_s", st(9.0, 3, 4.0)),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        let h = HourStats::from_rollup(&rollup);
        assert_eq!(h.cpu_util_pct, Some(10.0));
        assert_eq!(h.gpu_util_pct, Some(30.0), "mean of 50 and 10");
        assert_eq!(h.gpu_util_max_pct, Some(80.0));
        assert_eq!(h.models["res.net"].busy_pct, 50.0);
        assert_eq!(h.models["res.net"].requests_per_s, 3.0);
    }
}
