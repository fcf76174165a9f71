//! The demand forecaster: for each series, the method that forecast its own recent past best.
//!
//! Steps, all pure (no clock, no I/O):
//! 1. Take the last `train_weeks + validation_weeks` weeks of the hourly series (at least
//!    five weeks plus validation, what the longest candidate profile reads), drop leading gaps.
//! 2. Score every candidate of [`super::candidates`] (seasonal naive daily and weekly,
//!    seasonal mean, median and trimmed mean of the last k weeks, the same rescaled to the last
//!    week's level, robust MSTL) and the means of the best two and three, on weekly origins
//!    inside that window ([`super::selection`]); forecast with the winner.
//! 3. The interval is the winner's empirical error quantiles on those validation weeks; with
//!    too little history for a validation week, weekly (or daily) seasonal naive with its
//!    in-sample errors widened.
//! 4. Series that never go negative (rates, utilization) get forecasts clamped at 0.
//!
//! Cycles found in the window ([`super::seasonality`]) are reported beside the forecast.
//! The candidate set was chosen on the series of `benches/data/series` and the traffic series
//! of `shared/data`; `bench-forecast` scores it on each (see `docs/analytics.md`).

use serde::{Deserialize, Serialize};

use super::candidates;
use super::seasonality::{self, Seasonality};
use super::selection::{self, Chosen, Selection};
use super::series::{HOUR_MS, HourlySeries};

/// Fewest present values a forecast is attempted with.
pub const MIN_POINTS: usize = 48;

/// Weeks the longest candidate profile reads before an origin.
const LONGEST_PROFILE_WEEKS: usize = 5;

/// Why no forecast could be made.
#[derive(Debug, thiserror::Error)]
pub enum ForecastError {
    /// Too little data.
    #[error("need at least {MIN_POINTS} hourly values in the training window, have {have}")]
    NotEnoughData {
        /// Values present.
        have: usize,
    },
    /// No candidate could forecast.
    #[error("no method could forecast from the training window ({have} values)")]
    NoMethod {
        /// Values present.
        have: usize,
    },
}

/// How to forecast.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ForecastSettings {
    /// Hours ahead.
    pub horizon_hours: usize,
    /// Prediction interval level, e.g. 0.95.
    pub level: f64,
    /// Weeks a model candidate (MSTL) is fitted on.
    pub train_weeks: usize,
    /// Weekly validation origins the candidates are scored on (0: no selection, the
    /// short-history fallback).
    #[serde(default = "default_validation_weeks")]
    pub validation_weeks: usize,
}

fn default_validation_weeks() -> usize {
    3
}

impl Default for ForecastSettings {
    fn default() -> Self {
        Self {
            horizon_hours: 168,
            level: 0.95,
            train_weeks: 4,
            validation_weeks: default_validation_weeks(),
        }
    }
}

/// A fitted forecast.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Forecast {
    /// Start of the first forecast hour, Unix ms.
    pub start_ms: i64,
    /// Point forecast per hour.
    pub point: Vec<f64>,
    /// Lower bound of the interval per hour.
    pub lower: Vec<f64>,
    /// Upper bound per hour.
    pub upper: Vec<f64>,
    /// Interval level.
    pub level: f64,
    /// Cycles found in the training window.
    pub seasonality: Seasonality,
    /// The method chosen, e.g. `median[168x5]` or `mean of naive[168], mstl4w+level`.
    pub method: String,
    /// Start of the hours `fitted` covers, Unix ms.
    pub train_start_ms: i64,
    /// The chosen method's out-of-sample forecast of each validation hour, from
    /// `train_start_ms` on (without validation, the value a cycle before each hour).
    pub fitted: Vec<f64>,
    /// Which method was chosen, its validation score and every candidate's.
    #[serde(default)]
    pub selection: Option<Selection>,
}

/// A selection and its points before any interval is drawn: the same fit gives an interval
/// at any level ([`Fitted::forecast_at`]).
#[derive(Debug, Clone)]
pub struct Fitted {
    chosen: Chosen,
    start_ms: i64,
    train_start_ms: i64,
    seasonality: Seasonality,
    non_negative: bool,
}

// === impl Fitted ===

impl Fitted {
    /// The forecast with its interval at `level`.
    pub fn forecast_at(&self, level: f64) -> Forecast {
        let level = level.clamp(0.5, 0.999);
        let (mut lower, mut upper) = self.chosen.interval(level);
        let mut point = self.chosen.point.clone();
        if self.non_negative {
            for v in point.iter_mut().chain(lower.iter_mut()).chain(upper.iter_mut()) {
                *v = v.max(0.0);
            }
        }
        Forecast {
            start_ms: self.start_ms,
            point,
            lower,
            upper,
            level,
            seasonality: self.seasonality,
            method: self.chosen.selection.chosen.clone(),
            train_start_ms: self.train_start_ms,
            fitted: self.chosen.fitted.clone(),
            selection: Some(self.chosen.selection.clone()),
        }
    }
}

/// Forecasts `settings.horizon_hours` hours past the end of `series`.
pub fn forecast(
    series: &HourlySeries,
    settings: &ForecastSettings,
) -> Result<Forecast, ForecastError> {
    Ok(fit(series, settings)?.forecast_at(settings.level))
}

/// Selects and fits the method for `series` (see the module doc).
pub fn fit(series: &HourlySeries, settings: &ForecastSettings) -> Result<Fitted, ForecastError> {
    let weeks = settings.train_weeks.max(LONGEST_PROFILE_WEEKS) + settings.validation_weeks;
    let window = series.last(weeks * 168);
    let first = window.values.iter().position(Option::is_some).unwrap_or(window.len());
    let values = &window.values[first..];
    let have = values.iter().flatten().count();
    if have < MIN_POINTS {
        return Err(ForecastError::NotEnoughData { have });
    }
    let methods: Vec<candidates::Method> = candidates::defaults()
        .into_iter()
        .map(|m| match m {
            candidates::Method::Decomposition { .. } => {
                candidates::Method::Decomposition { weeks: settings.train_weeks.max(1) }
            }
            other => other,
        })
        .collect();
    let chosen =
        selection::select(values, settings.horizon_hours, &methods, settings.validation_weeks)
            .ok_or(ForecastError::NoMethod { have })?;
    let start_ms = series.end_ms();
    let train_start_ms =
        window.time_of(first) + i64::try_from(chosen.fitted_from).unwrap_or(0) * HOUR_MS;
    let seasonality =
        seasonality::detect(&HourlySeries { start_ms: 0, values: values.to_vec() }.filled());
    let non_negative = values.iter().flatten().all(|v| *v >= 0.0);
    Ok(Fitted { chosen, start_ms, train_start_ms, seasonality, non_negative })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::analytics::series::HOUR_MS;
    use std::f64::consts::PI;

    /// 100 + 20 sin(daily) + 30 on weekdays: a known, noise-free seasonal load.
    fn load(t: usize) -> f64 {
        let weekday = if (t / 24) % 7 < 5 { 30.0 } else { 0.0 };
        100.0 + 20.0 * (2.0 * PI * t as f64 / 24.0).sin() + weekday
    }

    #[test]
    fn forecast_of_a_synthetic_seasonal_series_continues_it() {
        let n = 168 * 6;
        let series = HourlySeries { start_ms: 0, values: (0..n).map(|t| Some(load(t))).collect() };
        let f = forecast(&series, &ForecastSettings::default()).unwrap();
        assert!(f.seasonality.daily && f.seasonality.weekly, "{:?}", f.seasonality);
        assert_eq!(f.start_ms, n as i64 * HOUR_MS);
        assert_eq!(f.point.len(), 168);
        for k in 0..168 {
            let truth = load(n + k);
            assert!((f.point[k] - truth).abs() < 5.0, "hour {k}: {} vs {truth}", f.point[k]);
            assert!(f.lower[k] <= f.point[k] + 1e-9 && f.point[k] <= f.upper[k] + 1e-9);
        }
    }

    #[test]
    fn gaps_are_filled_for_fitting_and_short_series_refused() {
        let n = 168 * 3;
        let mut values: Vec<Option<f64>> = (0..n).map(|t| Some(load(t))).collect();
        for v in values.iter_mut().skip(100).take(30) {
            *v = None;
        }
        let f =
            forecast(&HourlySeries { start_ms: 0, values }, &ForecastSettings::default()).unwrap();
        assert!(f.point.iter().all(|v| v.is_finite()));
        let short = HourlySeries { start_ms: 0, values: vec![Some(1.0); 10] };
        assert!(matches!(
            forecast(&short, &ForecastSettings::default()),
            Err(ForecastError::NotEnoughData { have: 10 })
        ));
    }

    #[test]
    fn nothing_after_the_origin_changes_the_forecast() {
        // No peeking: the same history followed by two different futures gives the same
        // choice and the same points at the origin.
        let n = 168 * 7;
        let origin = 168 * 6;
        let mut a = HourlySeries { start_ms: 0, values: (0..n).map(|t| Some(load(t))).collect() };
        let mut b = a.clone();
        b.values[origin..].iter_mut().for_each(|v| *v = v.map(|x| x * 3.0 + 100.0));
        let (fa, fb) = (
            forecast(&a.before(origin as i64 * HOUR_MS), &ForecastSettings::default()).unwrap(),
            forecast(&b.before(origin as i64 * HOUR_MS), &ForecastSettings::default()).unwrap(),
        );
        assert_eq!(fa, fb);
        // Whereas a change before the origin does reach it.
        a.values[origin - 1] = Some(1e6);
        let fc =
            forecast(&a.before(origin as i64 * HOUR_MS), &ForecastSettings::default()).unwrap();
        assert_ne!(fa.selection, fc.selection);
    }

    #[test]
    fn the_choice_and_its_scores_are_reported() {
        let n = 168 * 8;
        let series = HourlySeries { start_ms: 0, values: (0..n).map(|t| Some(load(t))).collect() };
        let f = forecast(&series, &ForecastSettings::default()).unwrap();
        let s = f.selection.as_ref().unwrap();
        assert_eq!(s.chosen, f.method);
        assert_eq!(s.validation_weeks, 3);
        assert!(s.candidates.len() >= candidates::defaults().len(), "{s:?}");
        assert!(s.reason.contains("3 weeks"), "{}", s.reason);
        // The fit covers the validation weeks and ends at the origin.
        assert_eq!(f.train_start_ms + f.fitted.len() as i64 * HOUR_MS, f.start_ms);
    }
}
