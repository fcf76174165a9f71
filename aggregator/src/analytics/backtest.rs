//! Rolling-origin backtests scored by MASE, next to seasonal-naive baselines.
//!
//! Protocol (the one `shared/data/README.md` fixes for the traffic benchmark):
//! - the series is on an hourly grid, duplicates averaged, gaps missing;
//! - at each origin the model sees only the hours before it and forecasts `horizon` hours;
//! - MASE = mean |forecast - actual| over the horizon hours that have an actual, divided by the
//!   scale = mean `|y[t] - y[t-168]|` over all training pairs where both exist (lag 24 when the
//!   training data is shorter than two weeks, lag 1 shorter than two days);
//! - seasonal naive with period m forecasts hour `origin + k` with the value m hours before
//!   (for k >= m, the one repeated from the last cycle); a missing value is taken from one more
//!   cycle back, and so on;
//! - interval coverage: the share of horizon hours with an actual whose actual lies within the
//!   forecaster's 80 % (and 95 %) interval, both from the same fit; a calibrated
//!   forecaster covers about 80 % (95 %) of them.

use serde::{Deserialize, Serialize};

use super::forecast::{ForecastSettings, fit};
use super::series::{DAY_MS, HOUR_MS, HourlySeries, day_start};

/// Scores at one origin (`None`: could not be scored or the method failed).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OriginScore {
    /// Forecast origin, Unix ms.
    pub origin_ms: i64,
    /// The MASE scale at this origin.
    pub scale: Option<f64>,
    /// The forecaster's MASE.
    pub model: Option<f64>,
    /// Seasonal naive, m = 168.
    pub naive_weekly: Option<f64>,
    /// Seasonal naive, m = 24.
    pub naive_daily: Option<f64>,
    /// Why the forecaster failed here, if it did.
    pub error: Option<String>,
    /// Share of the horizon's actuals inside the 80 % interval.
    #[serde(default)]
    pub coverage_80: Option<f64>,
    /// Share of the horizon's actuals inside the 95 % interval.
    #[serde(default)]
    pub coverage_95: Option<f64>,
    /// The method the forecaster chose at this origin.
    #[serde(default)]
    pub method: Option<String>,
}

/// A whole backtest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BacktestReport {
    /// Hours forecast at each origin.
    pub horizon_hours: usize,
    /// One row per origin.
    pub origins: Vec<OriginScore>,
    /// Mean MASE of the forecaster over the origins it scored at.
    pub mean_model: Option<f64>,
    /// Mean of seasonal naive m = 168.
    pub mean_naive_weekly: Option<f64>,
    /// Mean of seasonal naive m = 24.
    pub mean_naive_daily: Option<f64>,
    /// Mean 80 % interval coverage over the origins.
    #[serde(default)]
    pub mean_coverage_80: Option<f64>,
    /// Mean 95 % interval coverage over the origins.
    #[serde(default)]
    pub mean_coverage_95: Option<f64>,
}

/// The share of `actual` values (those present) inside `[lower, upper]`.
pub fn coverage(lower: &[f64], upper: &[f64], actual: &[Option<f64>]) -> Option<f64> {
    let (mut inside, mut n) = (0usize, 0usize);
    for ((lo, hi), a) in lower.iter().zip(upper).zip(actual) {
        if let Some(a) = a {
            n += 1;
            if (*lo..=*hi).contains(a) {
                inside += 1;
            }
        }
    }
    (n > 0).then(|| inside as f64 / n as f64)
}

/// The MASE scale: mean `|y[t] - y[t-m]|` over pairs where both exist.
pub fn mase_scale(train: &[Option<f64>], m: usize) -> Option<f64> {
    let (mut sum, mut n) = (0.0, 0usize);
    for t in m..train.len() {
        if let (Some(a), Some(b)) = (train[t], train[t - m]) {
            sum += (a - b).abs();
            n += 1;
        }
    }
    (n > 0 && sum > 0.0).then(|| sum / n as f64)
}

/// Seasonal naive forecast of `horizon` hours after `train`, period `m`, walking back whole
/// cycles past missing values.
pub fn seasonal_naive(train: &[Option<f64>], m: usize, horizon: usize) -> Vec<Option<f64>> {
    let n = train.len();
    (0..horizon)
        .map(|k| {
            let mut back = m * (1 + k / m.max(1));
            while back <= n && m > 0 {
                if let Some(v) = train[n + k - back] {
                    return Some(v);
                }
                back += m;
            }
            None
        })
        .collect()
}

/// MASE of `pred` against `actual` (hours without an actual or a prediction are skipped).
pub fn mase(pred: &[Option<f64>], actual: &[Option<f64>], scale: f64) -> Option<f64> {
    let (mut sum, mut n) = (0.0, 0usize);
    for (p, a) in pred.iter().zip(actual) {
        if let (Some(p), Some(a)) = (p, a) {
            sum += (p - a).abs();
            n += 1;
        }
    }
    (n > 0 && scale > 0.0).then(|| sum / n as f64 / scale)
}

/// The last `count` origins, `horizon` hours apart, at UTC midnights, such that the last
/// origin's horizon ends at or before the end of the series.
pub fn default_origins(series: &HourlySeries, horizon: usize, count: usize) -> Vec<i64> {
    let step = i64::try_from(horizon).unwrap_or(168) * HOUR_MS;
    let last = day_start(series.end_ms() - step);
    let mut out: Vec<i64> = (0..count)
        .map(|i| last - i64::try_from(i).unwrap_or(0) * step.max(DAY_MS))
        .filter(|o| *o > series.start_ms)
        .collect();
    out.reverse();
    out
}

/// Scores the forecaster and the two seasonal-naive baselines at each origin.
pub fn backtest(
    series: &HourlySeries,
    origins: &[i64],
    settings: &ForecastSettings,
) -> BacktestReport {
    let h = settings.horizon_hours;
    let mut rows = Vec::new();
    for &origin in origins {
        let i = series.index_at(origin);
        let train = &series.values[..i];
        let actual: Vec<Option<f64>> =
            (0..h).map(|k| series.values.get(i + k).copied().flatten()).collect();
        let lag = if train.len() >= 2 * 168 {
            168
        } else if train.len() >= 48 {
            24
        } else {
            1
        };
        let scale = mase_scale(train, lag);
        let score = |pred: &[Option<f64>]| scale.and_then(|s| mase(pred, &actual, s));
        let history = series.before(origin);
        let (model, error, fitted, method) = match fit(&history, settings) {
            Ok(f) => {
                let main = f.forecast_at(settings.level);
                let point: Vec<Option<f64>> = main.point.into_iter().map(Some).collect();
                (score(&point), None, Some(f), Some(main.method))
            }
            Err(e) => (None, Some(e.to_string()), None, None),
        };
        // Both levels' intervals from the one fit.
        let covered = |level: f64| {
            let f = fitted.as_ref()?.forecast_at(level);
            coverage(&f.lower, &f.upper, &actual)
        };
        rows.push(OriginScore {
            origin_ms: origin,
            scale,
            model,
            naive_weekly: score(&seasonal_naive(train, 168, h)),
            naive_daily: score(&seasonal_naive(train, 24, h)),
            error,
            coverage_80: covered(0.80),
            coverage_95: covered(0.95),
            method,
        });
    }
    let mean = |f: fn(&OriginScore) -> Option<f64>| {
        let v: Vec<f64> = rows.iter().filter_map(f).collect();
        (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
    };
    BacktestReport {
        horizon_hours: h,
        mean_model: mean(|r| r.model),
        mean_naive_weekly: mean(|r| r.naive_weekly),
        mean_naive_daily: mean(|r| r.naive_daily),
        mean_coverage_80: mean(|r| r.coverage_80),
        mean_coverage_95: mean(|r| r.coverage_95),
        origins: rows,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mase_by_hand() {
        // Pairs 2 apart: |3-1|, |4-2|, (5 missing), |6-4| -> scale 2.
        let train = [Some(1.0), Some(2.0), Some(3.0), Some(4.0), None, Some(6.0)];
        assert_eq!(mase_scale(&train, 2), Some(2.0));
        // Naive m=2 after train: hour 0 <- train[4] missing -> train[2] = 3; hour 1 <- 6.
        let naive = seasonal_naive(&train, 2, 3);
        assert_eq!(naive, vec![Some(3.0), Some(6.0), Some(3.0)]);
        // Errors |3-4| = 1 and |6-8| = 2, third actual missing: MASE = 1.5 / 2.
        assert_eq!(mase(&naive, &[Some(4.0), Some(8.0), None], 2.0), Some(0.75));
        assert_eq!(mase(&naive, &[None, None, None], 2.0), None);
    }

    #[test]
    fn a_weekly_series_with_trend_by_hand() {
        // A weekly shape plus 0.01 per hour: y[t] - y[t-168] = 1.68 everywhere, so the scale is
        // 1.68 and weekly naive is off by exactly 1.68 at every horizon hour: MASE 1.
        let week = |t: usize| {
            ((t % 168) as f64 * 0.7).sin() * 10.0 + 50.0 + (t % 7) as f64 + 0.01 * t as f64
        };
        let series =
            HourlySeries { start_ms: 0, values: (0..168 * 8).map(|t| Some(week(t))).collect() };
        let origins = default_origins(&series, 168, 2);
        assert_eq!(origins.len(), 2);
        let r = backtest(&series, &origins, &ForecastSettings::default());
        assert!((r.origins[0].scale.unwrap() - 1.68).abs() < 1e-9);
        assert!((r.mean_naive_weekly.unwrap() - 1.0).abs() < 1e-9);
        assert!(r.mean_model.unwrap() < 1.0, "{r:?}");
        // Both levels are scored at every origin, and the wider interval covers at least as
        // much as the narrower one.
        for o in &r.origins {
            let (c80, c95) = (o.coverage_80.unwrap(), o.coverage_95.unwrap());
            assert!((0.0..=1.0).contains(&c80) && c80 <= c95, "{o:?}");
        }
        assert!(r.mean_coverage_95.is_some());
    }

    #[test]
    fn coverage_counts_the_actuals_inside_their_interval() {
        let lower = [0.0, 0.0, 0.0, 0.0];
        let upper = [10.0, 10.0, 10.0, 10.0];
        let actual = [Some(5.0), Some(10.0), Some(11.0), None];
        assert_eq!(coverage(&lower, &upper, &actual), Some(2.0 / 3.0));
        assert_eq!(coverage(&lower, &upper, &[None, None, None, None]), None);
    }
}
