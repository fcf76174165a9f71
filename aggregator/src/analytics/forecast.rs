//! The demand forecaster: MSTL decomposition with an AutoETS trend (the `augurs` crates),
//! combined with a seasonal-naive forecast, with prediction intervals and in-sample residuals.
//!
//! Steps, all pure (no clock, no I/O):
//! 1. Take the last `train_weeks` weeks of the hourly series, drop leading/trailing gaps and
//!    fill inner gaps by linear interpolation (MSTL needs a gap-free series).
//! 2. Detect daily and weekly cycles ([`super::seasonality`]); a period is used only with at
//!    least two full cycles of data.
//! 3. With cycles: robust MSTL on those periods (STL with robustness weights, and values whose
//!    remainder in a first decomposition has robust |z| > [`OUTLIER_Z`] replaced by that
//!    decomposition's fit, so holidays, outages and spikes bend neither the seasonal shape nor
//!    the trend), trend forecast by AutoETS (`ZZN`: error, trend and damping chosen by AICc, no
//!    seasonality). Without cycles: AutoETS alone.
//! 4. The point forecast is `(1 - w) * mstl + w * seasonal_naive(longest period)`, with
//!    `w = naive_weight`; the interval is the model's, shifted by the same amount.
//! 5. Series that never go negative (rates, utilization) get forecasts clamped at 0.
//!
//! The defaults (4 weeks, robust, w = 0.5) were chosen on the three weeks *before* the
//! benchmark's test origins; see `benches/src/forecast.rs` and `docs/analytics.md`.

use augurs_core::{Fit, Predict};
use augurs_ets::AutoETS;
use augurs_mstl::MSTLModel;
use serde::{Deserialize, Serialize};

use super::seasonality::{self, Seasonality};
use super::series::HourlySeries;

/// Fewest present values a forecast is attempted with.
pub const MIN_POINTS: usize = 48;

/// Why no forecast could be made.
#[derive(Debug, thiserror::Error)]
pub enum ForecastError {
    /// Too little data.
    #[error("need at least {MIN_POINTS} hourly values in the training window, have {have}")]
    NotEnoughData {
        /// Values present.
        have: usize,
    },
    /// The model failed to fit or predict.
    #[error("{method} failed: {reason}")]
    Model {
        /// Which model.
        method: &'static str,
        /// Its message.
        reason: String,
    },
}

/// How to forecast.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ForecastSettings {
    /// Hours ahead.
    pub horizon_hours: usize,
    /// Prediction interval level, e.g. 0.95.
    pub level: f64,
    /// Training window, weeks back from the end of the series.
    pub train_weeks: usize,
    /// Weight of the seasonal-naive forecast in the combination, 0..=1.
    pub naive_weight: f64,
    /// Robust STL fitting.
    pub robust: bool,
}

impl Default for ForecastSettings {
    fn default() -> Self {
        Self { horizon_hours: 168, level: 0.95, train_weeks: 4, naive_weight: 0.5, robust: true }
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
    /// What produced it, e.g. `mstl[24,168]+ets, 0.5 seasonal-naive`.
    pub method: String,
    /// Start of the training window, Unix ms.
    pub train_start_ms: i64,
    /// In-sample fit per training hour (trend + seasonal), same grid as the window.
    pub fitted: Vec<f64>,
}

/// Forecasts `settings.horizon_hours` hours past the end of `series`.
pub fn forecast(
    series: &HourlySeries,
    settings: &ForecastSettings,
) -> Result<Forecast, ForecastError> {
    let window = series.last(settings.train_weeks.max(1) * 168).trimmed();
    let have = window.present();
    if have < MIN_POINTS {
        return Err(ForecastError::NotEnoughData { have });
    }
    let y = window.filled();
    let h = settings.horizon_hours;
    let level = settings.level.clamp(0.5, 0.999);
    let season = seasonality::detect(&y);
    let periods: Vec<usize> = season.periods().into_iter().filter(|p| y.len() >= 2 * p).collect();
    let model_err = |method: &'static str| {
        move |e: &dyn std::fmt::Display| ForecastError::Model { method, reason: e.to_string() }
    };
    let (mut fc, fitted, mut method) = if periods.is_empty() {
        let fit = AutoETS::non_seasonal().fit(&y).map_err(|e| model_err("ets")(&e))?;
        let fc = fit.predict(h, level).map_err(|e| model_err("ets")(&e))?;
        let fitted = fit.predict_in_sample(None).map(|f| f.point).unwrap_or_else(|_| y.clone());
        (fc, fitted, "ets".to_owned())
    } else {
        let mut params = stlrs::MstlParams::new();
        let mut stl = stlrs::StlParams::new();
        stl.robust(settings.robust);
        params.stl_params(stl);
        let trend = AutoETS::new(1, "ZZN").map_err(|e| model_err("ets")(&e))?.into_trend_model();
        // Robust: outliers (|z| > OUTLIER_Z in a first decomposition's remainder) are replaced
        // by that decomposition's fit before the model is fitted, so a spike bends neither the
        // seasonal shape nor the trend model.
        let cleaned =
            if settings.robust { replace_outliers(&y, &periods, &params) } else { y.clone() };
        let fit = MSTLModel::new(periods.clone(), trend)
            .mstl_params(params)
            .fit(&cleaned)
            .map_err(|e| model_err("mstl")(&e))?;
        let fc = fit.predict(h, level).map_err(|e| model_err("mstl")(&e))?;
        let remainder = fit.fit().remainder();
        let fitted: Vec<f64> =
            cleaned.iter().zip(remainder).map(|(v, r)| v - f64::from(*r)).collect();
        (fc, fitted, format!("mstl{periods:?}+ets"))
    };
    let point = std::mem::take(&mut fc.point);
    let (mut lower, mut upper) = match fc.intervals.take() {
        Some(i) if i.lower.len() == h && i.upper.len() == h => (i.lower, i.upper),
        _ => residual_interval(&y, &fitted, &point, level),
    };
    let mut point = point;
    if let (Some(&m), true) = (periods.last(), settings.naive_weight > 0.0) {
        let w = settings.naive_weight.clamp(0.0, 1.0);
        let naive = seasonal_naive(&y, m, h);
        for k in 0..h {
            let combined = (1.0 - w) * point[k] + w * naive[k];
            let shift = combined - point[k];
            point[k] = combined;
            lower[k] += shift;
            upper[k] += shift;
        }
        method = format!("{method}, {w} seasonal-naive[{m}]");
    }
    if y.iter().all(|v| *v >= 0.0) {
        for v in point.iter_mut().chain(lower.iter_mut()).chain(upper.iter_mut()) {
            *v = v.max(0.0);
        }
    }
    Ok(Forecast {
        start_ms: window.end_ms().max(series.end_ms()),
        point,
        lower,
        upper,
        level,
        seasonality: season,
        method,
        train_start_ms: window.start_ms,
        fitted,
    })
}

/// Robust |z| of a remainder above which a training value is replaced before fitting.
pub const OUTLIER_Z: f64 = 4.0;

/// `y` with the values whose MSTL remainder is an outlier replaced by the decomposition's fit
/// (`y` unchanged if the decomposition fails).
fn replace_outliers(y: &[f64], periods: &[usize], params: &stlrs::MstlParams) -> Vec<f64> {
    #[allow(clippy::cast_possible_truncation)] // f32 is what stlrs decomposes; values are rates
    let y32: Vec<f32> = y.iter().map(|v| *v as f32).collect();
    let Ok(fit) = params.fit(&y32, periods) else { return y.to_vec() };
    let r: Vec<f64> = fit.remainder().iter().map(|v| f64::from(*v)).collect();
    let Some((med, sigma)) = super::anomaly::robust_sigma(&r) else { return y.to_vec() };
    if sigma <= 0.0 {
        return y.to_vec();
    }
    y.iter()
        .zip(&r)
        .map(|(v, rv)| if ((rv - med) / sigma).abs() > OUTLIER_Z { v - rv + med } else { *v })
        .collect()
}

/// The last cycle of `y` (period `m`) repeated over `horizon` hours.
pub fn seasonal_naive(y: &[f64], m: usize, horizon: usize) -> Vec<f64> {
    let n = y.len();
    if n == 0 || m == 0 {
        return vec![0.0; horizon];
    }
    let m = m.min(n);
    (0..horizon).map(|k| y[n - m + k % m]).collect()
}

/// A normal interval from the in-sample residuals' standard deviation.
fn residual_interval(y: &[f64], fitted: &[f64], point: &[f64], level: f64) -> (Vec<f64>, Vec<f64>) {
    let r: Vec<f64> = y.iter().zip(fitted).map(|(a, b)| a - b).collect();
    let sd = (r.iter().map(|v| v * v).sum::<f64>() / r.len().max(1) as f64).sqrt();
    let z = if level >= 0.99 {
        2.576
    } else if level >= 0.95 {
        1.96
    } else {
        1.645
    };
    (point.iter().map(|p| p - z * sd).collect(), point.iter().map(|p| p + z * sd).collect())
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
    fn seasonal_naive_repeats_the_last_cycle() {
        assert_eq!(seasonal_naive(&[1.0, 2.0, 3.0, 4.0], 2, 5), vec![3.0, 4.0, 3.0, 4.0, 3.0]);
    }
}
