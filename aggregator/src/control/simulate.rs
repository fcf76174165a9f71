//! Replay: drives the real [`Scaler`] and the real forecaster ([`forecast()`]) over a demand
//! trace, minute by minute, against a simple capacity model, and compares three strategies:
//! reactive only, predictive + reactive, and a fixed fleet sized for the peak.
//!
//! The model (every number is a [`ReplayConfig`] field):
//! - Demand: the trace's hourly values (inner gaps filled linearly), scaled so the window's
//!   highest hour is `peak_rps`, then interpolated linearly from each hour's start to the next
//!   (optionally times seeded noise), one value per minute.
//! - Each minute `t` the scaler sees the demand of minute `t - 1` (what telemetry would show),
//!   the instance counts, and utilization `100 * demand / (ready * rps_per_instance)` (capped
//!   at 100) as the GPU and batch utilization; latency and queue metrics are absent.
//! - An added instance is billed at once and ready `load_secs` later; a removal takes loading
//!   instances first, and stops billing at once.
//! - **SLO-violation minute**: a minute `t` in which `demand(t) > ready(t) * rps_per_instance`,
//!   where `ready(t)` counts the instances ready at the start of minute `t` after that
//!   minute's decision was carried out.
//! - Instance-hours: the sum over minutes of the instances that exist (loading or ready) / 60;
//!   cost: instance-hours * `price_per_instance_hour`.
//! - Flaps: scale direction changes, an up followed by a down or a down by an up.
//! - Forecast: refitted at the start of each simulated hour on the hourly history before it
//!   (the forecaster uses the last `train_weeks`), read `lead_secs` ahead; the predictive
//!   strategy's `rps_ahead` is the highest forecast value from now to `lead_secs` ahead, and
//!   `rps_now` the forecast for the current minute (for the engine's bias correction).

use serde::{Deserialize, Serialize};

use super::engine::{ForecastInput, Limits, Observation, Scaler};
use super::policy::{Mode, Predictive, RateLimit, ScalingPolicy, Targets};
use crate::analytics::forecast::{ForecastSettings, forecast};
use crate::analytics::series::HourlySeries;

const MINUTE_MS: i64 = 60_000;
const WEEK_HOURS: usize = 168;

/// Why a replay could not run.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    /// The trace is too short for the window asked for.
    #[error(
        "the trace has {have} hours; a replay needs at least {need} (one week of history and one day)"
    )]
    TooShort {
        /// Hours in the trace.
        have: usize,
        /// Hours needed.
        need: usize,
    },
    /// The window has no positive demand.
    #[error("the trace has no positive value in the replay window")]
    NoDemand,
    /// A setting is out of range.
    #[error("{0}")]
    Setting(String),
    /// The predictive strategy needs a requests/s target.
    #[error(
        "policy {0:?} has no targets.requests_per_instance, which the predictive strategy needs"
    )]
    NoRpsTarget(String),
}

/// How to replay.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReplayConfig {
    /// Demand of the window's highest hour, requests/s.
    pub peak_rps: f64,
    /// Requests/s one ready instance serves within the SLO.
    pub rps_per_instance: f64,
    /// Seconds from adding an instance to its being ready (load and warm-up).
    pub load_secs: u64,
    /// Price of one instance-hour.
    pub price_per_instance_hour: f64,
    /// Weeks replayed, ending at `end_ms`.
    pub weeks: usize,
    /// Weeks of history before the window, for the forecaster.
    pub warmup_weeks: usize,
    /// The forecaster's training window, weeks.
    pub train_weeks: usize,
    /// End of the window, Unix ms; `None`: the end of the trace.
    pub end_ms: Option<i64>,
    /// Multiplicative noise on minute demand, +- this %, uniform; 0 for none.
    pub noise_pct: f64,
    /// Seed of the noise.
    pub seed: u64,
}

impl Default for ReplayConfig {
    fn default() -> Self {
        Self {
            peak_rps: 400.0,
            rps_per_instance: 10.0,
            load_secs: 300,
            price_per_instance_hour: 2.0,
            weeks: 8,
            warmup_weeks: 4,
            train_weeks: 4,
            end_ms: None,
            noise_pct: 0.0,
            seed: 1,
        }
    }
}

/// One strategy's totals over the window.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StrategyResult {
    /// `reactive`, `predictive+reactive` or `fixed-peak`.
    pub strategy: String,
    /// Minutes in which demand exceeded ready capacity.
    pub slo_violation_minutes: u64,
    /// Instance-hours billed.
    pub instance_hours: f64,
    /// Instance-hours times the price.
    pub cost: f64,
    /// Scaling actions taken.
    pub scale_actions: u64,
    /// Scale direction changes.
    pub flaps: u64,
    /// Most instances at once.
    pub peak_instances: u32,
}

/// A replay's results.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReplayReport {
    /// First replayed minute, Unix ms.
    pub start_ms: i64,
    /// End of the window, Unix ms.
    pub end_ms: i64,
    /// Minutes replayed.
    pub minutes: usize,
    /// Hours of forecast warm-up history before the window.
    pub warmup_hours: usize,
    /// The settings.
    pub config: ReplayConfig,
    /// The policy the dynamic strategies ran (its mode set per strategy).
    pub policy: ScalingPolicy,
    /// Mean absolute percentage error of the next-hour forecast over the window.
    pub forecast_mape: Option<f64>,
    /// Hours whose forecast failed (the predictive strategy ran reactively then).
    pub forecast_failures: usize,
    /// One entry per strategy.
    pub strategies: Vec<StrategyResult>,
}

/// The default policy for a replay: requests/s target at 70% of an instance's capacity, at most
/// twice the peak's instances, and the predictive lead set to the load time plus one minute.
pub fn default_policy(cfg: &ReplayConfig) -> ScalingPolicy {
    let target = 0.7 * cfg.rps_per_instance;
    let peak_instances = (cfg.peak_rps / target).ceil().clamp(1.0, 512.0);
    // Bounded to 1..=512 just above, so the conversion is exact.
    #[allow(clippy::cast_possible_truncation)]
    let peak_instances = peak_instances as u32;
    let mut p = ScalingPolicy::new(
        "replay-default",
        "replay",
        1,
        (2 * peak_instances).min(super::policy::MAX_INSTANCES),
        Targets { requests_per_instance: Some(target), ..Targets::default() },
    );
    p.scale_up_limit = RateLimit { instances: (peak_instances / 10).max(4), per_secs: 60 };
    p.scale_down_limit = RateLimit { instances: (peak_instances / 20).max(1), per_secs: 60 };
    p.burst_window_secs = 120;
    p.predictive.forecast_only = false;
    p.predictive.buffer_pct = 0.0;
    p.predictive.lead_secs = cfg.load_secs + 60;
    p
}

/// Counts scale direction changes in a sequence of instance-count changes (zeros ignored).
pub fn count_flaps(changes: impl IntoIterator<Item = i64>) -> u64 {
    let mut last = 0i64;
    let mut flaps = 0;
    for c in changes.into_iter().filter(|c| *c != 0) {
        if last != 0 && c.signum() != last.signum() {
            flaps += 1;
        }
        last = c;
    }
    flaps
}

/// The demand per minute and the forecasts per hour of one window.
struct Window {
    start_ms: i64,
    /// Requests/s per minute.
    demand: Vec<f64>,
    /// Per replayed hour: the forecast fitted at its start (point per hour from that hour on).
    forecasts: Vec<Option<Vec<f64>>>,
    warmup_hours: usize,
    mape: Option<f64>,
    failures: usize,
}

/// Replays the three strategies over `trace` with `policy`.
pub fn replay(
    trace: &HourlySeries,
    policy: &ScalingPolicy,
    cfg: &ReplayConfig,
) -> Result<ReplayReport, ReplayError> {
    replay_variants(trace, policy, cfg, &[])
}

/// As [`replay`], with one predictive + reactive row per entry of `variants` (the policy's own
/// predictive settings when empty), all on one window and one set of forecasts: for tuning the
/// buffer and lead on an earlier part of a trace before trusting them on a later one.
pub fn replay_variants(
    trace: &HourlySeries,
    policy: &ScalingPolicy,
    cfg: &ReplayConfig,
    variants: &[Predictive],
) -> Result<ReplayReport, ReplayError> {
    check(cfg)?;
    if policy.targets.requests_per_instance.is_none() {
        return Err(ReplayError::NoRpsTarget(policy.name.clone()));
    }
    let own = [policy.predictive.clone()];
    let variants = if variants.is_empty() { &own[..] } else { variants };
    let longest = variants.iter().map(|v| v.lead_secs).max().unwrap_or(0);
    let w = window(trace, cfg, longest)?;
    let mut reactive = policy.clone();
    reactive.mode = Mode::Reactive;
    let mut strategies = vec![run_dynamic("reactive", reactive, &w, cfg, false)];
    for v in variants {
        let mut predictive = policy.clone();
        predictive.mode = Mode::Predictive;
        predictive.predictive = Predictive { forecast_only: false, ..v.clone() };
        let name = if variants.len() == 1 {
            "predictive+reactive".to_owned()
        } else {
            format!(
                "predictive b{}% l{}s{}",
                v.buffer_pct,
                v.lead_secs,
                if v.correct_bias { "" } else { " level" }
            )
        };
        strategies.push(run_dynamic(&name, predictive, &w, cfg, true));
    }
    strategies.push(run_fixed(&w, cfg));
    Ok(ReplayReport {
        start_ms: w.start_ms,
        end_ms: w.start_ms + i64::try_from(w.demand.len()).unwrap_or(0) * MINUTE_MS,
        minutes: w.demand.len(),
        warmup_hours: w.warmup_hours,
        config: cfg.clone(),
        policy: policy.clone(),
        forecast_mape: w.mape,
        forecast_failures: w.failures,
        strategies,
    })
}

fn check(cfg: &ReplayConfig) -> Result<(), ReplayError> {
    let positive = |name: &str, v: f64| {
        if v.is_finite() && v > 0.0 {
            Ok(())
        } else {
            Err(ReplayError::Setting(format!("{name} = {v}: must be a finite number above 0")))
        }
    };
    positive("peak_rps", cfg.peak_rps)?;
    positive("rps_per_instance", cfg.rps_per_instance)?;
    if !(cfg.price_per_instance_hour.is_finite() && cfg.price_per_instance_hour >= 0.0) {
        return Err(ReplayError::Setting(format!(
            "price = {}: must be a finite number >= 0",
            cfg.price_per_instance_hour
        )));
    }
    if !(1..=520).contains(&cfg.weeks) || !(1..=52).contains(&cfg.train_weeks) {
        return Err(ReplayError::Setting(format!(
            "weeks = {}, train_weeks = {}: allowed 1..=520 and 1..=52",
            cfg.weeks, cfg.train_weeks
        )));
    }
    if !(0.0..=100.0).contains(&cfg.noise_pct) || cfg.load_secs > 86_400 {
        return Err(ReplayError::Setting(format!(
            "noise_pct = {}, load_secs = {}: allowed 0..=100 and 0..=86400",
            cfg.noise_pct, cfg.load_secs
        )));
    }
    Ok(())
}

/// SplitMix64: a fixed, seeded sequence for the demand noise.
fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

fn window(trace: &HourlySeries, cfg: &ReplayConfig, lead_secs: u64) -> Result<Window, ReplayError> {
    let end = cfg.end_ms.map_or(trace.len(), |t| trace.index_at(t));
    let need = WEEK_HOURS + 24;
    if end < need {
        return Err(ReplayError::TooShort { have: end, need });
    }
    let hours = (cfg.weeks * WEEK_HOURS).min(end - WEEK_HOURS);
    let start = end - hours;
    let warmup_from = start.saturating_sub(cfg.warmup_weeks * WEEK_HOURS);
    let filled = trace.filled();
    let peak = filled[start..end].iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if peak.is_nan() || peak <= 0.0 {
        return Err(ReplayError::NoDemand);
    }
    let scale = cfg.peak_rps / peak;
    let mut demand = Vec::with_capacity(hours * 60);
    for h in start..end {
        let (a, b) = (filled[h], filled.get(h + 1).copied().unwrap_or(filled[h]));
        for m in 0..60 {
            let base = scale * (a + (b - a) * f64::from(m) / 60.0);
            let k = demand.len() as u64;
            let u = (splitmix(cfg.seed ^ k.wrapping_mul(0x2545_F491_4F6C_DD1D)) >> 11) as f64
                / (1u64 << 53) as f64;
            let noise = 1.0 + cfg.noise_pct / 100.0 * (2.0 * u - 1.0);
            demand.push((base * noise).max(0.0));
        }
    }
    // Forecasts: refit at each replayed hour on the scaled history before it.
    let scaled: Vec<Option<f64>> = trace.values.iter().map(|v| v.map(|v| v * scale)).collect();
    let lead_hours = usize::try_from(lead_secs.div_ceil(3600)).unwrap_or(1);
    let settings = ForecastSettings {
        horizon_hours: lead_hours + 2,
        train_weeks: cfg.train_weeks,
        ..ForecastSettings::default()
    };
    let mut forecasts = Vec::with_capacity(hours);
    let (mut err_sum, mut err_n, mut failures) = (0.0, 0u32, 0);
    for h in start..end {
        let history = HourlySeries {
            start_ms: trace.time_of(warmup_from),
            values: scaled[warmup_from..h].to_vec(),
        };
        match forecast(&history, &settings) {
            Ok(f) => {
                if let (Some(p), Some(actual)) = (f.point.first(), scaled[h])
                    && actual > 0.0
                {
                    err_sum += (p - actual).abs() / actual;
                    err_n += 1;
                }
                forecasts.push(Some(f.point));
            }
            Err(_) => {
                failures += 1;
                forecasts.push(None);
            }
        }
    }
    Ok(Window {
        start_ms: trace.time_of(start),
        demand,
        forecasts,
        warmup_hours: start - warmup_from,
        mape: (err_n > 0).then(|| 100.0 * err_sum / f64::from(err_n)),
        failures,
    })
}

/// The highest forecast demand from minute `k` to `lead_secs` ahead.
fn rps_ahead(w: &Window, k: usize, lead_secs: u64) -> Option<f64> {
    let hour = k / 60;
    let points = w.forecasts.get(hour)?.as_ref()?;
    let lead_min = usize::try_from(lead_secs.div_ceil(60)).unwrap_or(0);
    let mut best: Option<f64> = None;
    for j in k..=k + lead_min {
        let off = j - hour * 60;
        let (i, m) = (off / 60, off % 60);
        let (Some(a), b) = (points.get(i), points.get(i + 1)) else { break };
        let b = b.unwrap_or(a);
        let v = a + (b - a) * m as f64 / 60.0;
        best = Some(best.map_or(v, |x: f64| x.max(v)));
    }
    best
}

fn run_dynamic(
    name: &str,
    policy: ScalingPolicy,
    w: &Window,
    cfg: &ReplayConfig,
    use_forecast: bool,
) -> StrategyResult {
    let load_ms = i64::try_from(cfg.load_secs).unwrap_or(0) * 1000;
    let target = policy.targets.requests_per_instance.unwrap_or(cfg.rps_per_instance);
    let lead = policy.predictive.lead_secs;
    let limits = Limits {
        max_instances_by_budget: None,
        price_per_instance_hour: Some(cfg.price_per_instance_hour),
    };
    let first = (w.demand.first().copied().unwrap_or(0.0) / target).ceil();
    // Clamped to the policy's bounds (<= 1024), so the conversion is exact.
    #[allow(clippy::cast_possible_truncation)]
    let first =
        first.clamp(f64::from(policy.min_instances), f64::from(policy.max_instances)) as u32;
    let mut scaler = Scaler::new(policy);
    // Ready time per instance; the replay starts with a warm fleet for the first minute.
    let mut fleet: Vec<i64> = vec![w.start_ms - load_ms; first as usize];
    let mut changes = Vec::new();
    let (mut violations, mut instance_minutes, mut peak) = (0u64, 0u64, first);
    for (k, &now_demand) in w.demand.iter().enumerate() {
        let now = w.start_ms + i64::try_from(k).unwrap_or(0) * MINUTE_MS;
        let seen = if k == 0 { now_demand } else { w.demand[k - 1] };
        let ready = count_ready(&fleet, now);
        let util = if ready > 0 {
            (100.0 * seen / (f64::from(ready) * cfg.rps_per_instance)).min(100.0)
        } else if seen > 0.0 {
            100.0
        } else {
            0.0
        };
        let current = u32::try_from(fleet.len()).unwrap_or(u32::MAX);
        let obs = Observation {
            at_ms: now,
            current_instances: current,
            ready_instances: ready,
            demand_rps: seen,
            gpu_util_pct: Some(util),
            batch_util_pct: Some(util),
            ..Observation::default()
        };
        let fc = if use_forecast {
            rps_ahead(w, k, lead).map(|rps| ForecastInput {
                rps_ahead: rps,
                rps_now: rps_ahead(w, k, 0),
                backtest_error: w.mape,
            })
        } else {
            None
        };
        let d = scaler.evaluate(&obs, fc.as_ref(), &limits);
        if d.desired > current {
            fleet.extend(std::iter::repeat_n(now + load_ms, (d.desired - current) as usize));
        } else if d.desired < current {
            // Loading instances (latest ready time) go first.
            fleet.sort_unstable();
            fleet.truncate(d.desired as usize);
        }
        if d.desired != current {
            changes.push(i64::from(d.desired) - i64::from(current));
        }
        let ready_now = count_ready(&fleet, now);
        if now_demand > f64::from(ready_now) * cfg.rps_per_instance {
            violations += 1;
        }
        instance_minutes += fleet.len() as u64;
        peak = peak.max(u32::try_from(fleet.len()).unwrap_or(u32::MAX));
    }
    let instance_hours = instance_minutes as f64 / 60.0;
    StrategyResult {
        strategy: name.to_owned(),
        slo_violation_minutes: violations,
        instance_hours,
        cost: instance_hours * cfg.price_per_instance_hour,
        scale_actions: changes.len() as u64,
        flaps: count_flaps(changes),
        peak_instances: peak,
    }
}

fn count_ready(fleet: &[i64], now: i64) -> u32 {
    u32::try_from(fleet.iter().filter(|t| **t <= now).count()).unwrap_or(u32::MAX)
}

/// A fixed fleet sized for the window's highest minute, ready throughout.
fn run_fixed(w: &Window, cfg: &ReplayConfig) -> StrategyResult {
    let peak_demand = w.demand.iter().copied().fold(0.0, f64::max);
    // Demand is finite and bounded by peak_rps * (1 + noise), so the count fits.
    #[allow(clippy::cast_possible_truncation)]
    let n = ((peak_demand / cfg.rps_per_instance - 1e-9).ceil().max(1.0)) as u32;
    let violations =
        w.demand.iter().filter(|d| **d > f64::from(n) * cfg.rps_per_instance).count() as u64;
    let instance_hours = f64::from(n) * w.demand.len() as f64 / 60.0;
    StrategyResult {
        strategy: "fixed-peak".to_owned(),
        slo_violation_minutes: violations,
        instance_hours,
        cost: instance_hours * cfg.price_per_instance_hour,
        scale_actions: 0,
        flaps: 0,
        peak_instances: n,
    }
}

/// The report as a text table.
pub fn render(report: &ReplayReport, trace_name: &str) -> String {
    use crate::analytics::series::format_time;
    let c = &report.config;
    let mut out = format!(
        "Replay of {trace_name}: {} to {} ({} minutes, {} h of forecast warm-up)\n\
         peak {} req/s, {} req/s per instance, load {} s, price {}/instance-hour, noise {}%\n\
         policy {:?}: target {} req/s per instance, lead {} s, buffer {}%; next-hour forecast \
         MAPE {}\n\n",
        format_time(report.start_ms),
        format_time(report.end_ms),
        report.minutes,
        report.warmup_hours,
        c.peak_rps,
        c.rps_per_instance,
        c.load_secs,
        c.price_per_instance_hour,
        c.noise_pct,
        report.policy.name,
        report.policy.targets.requests_per_instance.unwrap_or(0.0),
        report.policy.predictive.lead_secs,
        report.policy.predictive.buffer_pct,
        report.forecast_mape.map_or_else(|| "-".to_owned(), |m| format!("{m:.1}%")),
    );
    out.push_str(&format!(
        "{:<28} {:>12} {:>12} {:>12} {:>8} {:>6} {:>6}\n",
        "strategy", "slo_viol_min", "instance_h", "cost", "actions", "flaps", "peak"
    ));
    for s in &report.strategies {
        out.push_str(&format!(
            "{:<28} {:>12} {:>12.1} {:>12.2} {:>8} {:>6} {:>6}\n",
            s.strategy,
            s.slo_violation_minutes,
            s.instance_hours,
            s.cost,
            s.scale_actions,
            s.flaps,
            s.peak_instances
        ));
    }
    if report.forecast_failures > 0 {
        out.push_str(&format!(
            "\n{} hours had no forecast; the predictive strategy ran reactively then.\n",
            report.forecast_failures
        ));
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::analytics::series::HOUR_MS;

    #[test]
    fn flaps_count_direction_changes() {
        assert_eq!(count_flaps([]), 0);
        assert_eq!(count_flaps([1, 2, 3]), 0);
        assert_eq!(count_flaps([1, -1, 1, -1]), 3);
        assert_eq!(count_flaps([2, 0, 1, -3, -1, 0, 4]), 2);
        assert_eq!(count_flaps([-1, -1, 2]), 1);
    }

    /// A daily cycle with steep morning ramps, three weeks of it plus warm-up.
    fn daily_trace(weeks: usize) -> HourlySeries {
        let values = (0..weeks * WEEK_HOURS)
            .map(|h| {
                let hour = h % 24;
                // Night 10, ramp 07-09 to 100, day 100, ramp down 18-21.
                let v = match hour {
                    0..=6 => 10.0,
                    7 => 40.0,
                    8 => 80.0,
                    9..=17 => 100.0,
                    18 => 80.0,
                    19 => 50.0,
                    20 => 30.0,
                    _ => 10.0,
                };
                Some(v)
            })
            .collect();
        HourlySeries { start_ms: 19_675 * crate::analytics::series::DAY_MS, values }
    }

    #[test]
    fn predictive_beats_reactive_on_regular_ramps_and_fixed_never_violates() {
        let cfg =
            ReplayConfig { weeks: 1, warmup_weeks: 2, load_secs: 600, ..ReplayConfig::default() };
        let trace = daily_trace(3);
        let policy = default_policy(&cfg);
        let report = replay(&trace, &policy, &cfg).unwrap();
        let [reactive, predictive, fixed] = &report.strategies[..] else { panic!("3 strategies") };
        assert_eq!(report.minutes, WEEK_HOURS * 60);
        assert_eq!(fixed.slo_violation_minutes, 0);
        assert_eq!(fixed.peak_instances, 40);
        assert_eq!(report.forecast_failures, 0);
        assert!(reactive.slo_violation_minutes > 0, "{}", render(&report, "daily"));
        assert!(
            predictive.slo_violation_minutes < reactive.slo_violation_minutes,
            "{}",
            render(&report, "daily")
        );
        assert!(reactive.cost < fixed.cost && predictive.cost < fixed.cost);
    }

    #[test]
    fn demand_is_scaled_to_the_peak_and_interpolated() {
        let cfg =
            ReplayConfig { weeks: 1, warmup_weeks: 1, peak_rps: 50.0, ..ReplayConfig::default() };
        let w = window(&daily_trace(2), &cfg, 60).unwrap();
        let max = w.demand.iter().copied().fold(0.0, f64::max);
        assert!((max - 50.0).abs() < 1e-9);
        // 06:00 is 10 -> 07:00 is 40, scaled by 0.5: 06:30 is 12.5.
        let day_start = w.start_ms.rem_euclid(24 * HOUR_MS);
        assert_eq!(day_start, 0, "trace starts at midnight");
        assert!((w.demand[6 * 60 + 30] - 12.5).abs() < 1e-9);
    }

    #[test]
    fn a_short_trace_is_refused() {
        let cfg = ReplayConfig::default();
        let trace = HourlySeries { start_ms: 0, values: vec![Some(1.0); 100] };
        let err = replay(&trace, &default_policy(&cfg), &cfg).unwrap_err().to_string();
        assert!(err.contains("100 hours"), "{err}");
    }
}
