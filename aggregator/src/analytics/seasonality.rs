//! Which cycles a series has: daily (24 h) and weekly (168 h), from its autocorrelation.
//!
//! The question asked is narrow (is a daily cycle present, is a weekly one), so the test is an
//! autocorrelation contrast that can be checked by hand rather than a periodogram search:
//! - daily: `acf(24) >= MIN_ACF` and `acf(24) - acf(12) >= DAILY_CONTRAST` (a daily cycle makes
//!   the series anti-correlated half a day apart, a slow drift does not);
//! - weekly: at least two weeks of data, `acf(168) >= MIN_ACF` and
//!   `acf(168) - acf(24) >= WEEKLY_SHARE * (1 - acf(24))`, i.e. the weekly lag recovers at least
//!   a quarter of the correlation the daily lag misses (a pure daily cycle repeats at 168 h as
//!   well as at 24 h, so only a *stronger* correlation a week apart says the days of the week
//!   differ; measured against what is left, because a strong daily cycle leaves little room:
//!   the traffic benchmark has acf(24) = 0.90 and acf(168) = 0.98).
//!
//! `acf(k)` is the correlation of the series with itself `k` hours later over the overlapping
//! pairs, around the overall mean, divided by the overall variance. Input must be gap-free
//! (see [`super::series::HourlySeries::filled`]).

use serde::{Deserialize, Serialize};

/// Smallest autocorrelation that counts as a cycle.
pub const MIN_ACF: f64 = 0.3;
/// How much higher `acf(24)` must be than `acf(12)` for a daily cycle.
pub const DAILY_CONTRAST: f64 = 0.2;
/// Share of the correlation missing at 24 h that the 168 h lag must recover for a weekly cycle.
pub const WEEKLY_SHARE: f64 = 0.25;
/// Smallest absolute gain of `acf(168)` over `acf(24)` that counts (guards against noise when
/// both are close to 1).
pub const WEEKLY_MIN_GAIN: f64 = 0.02;

/// The cycles found, with the correlations that decided.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Seasonality {
    /// A daily cycle is present.
    pub daily: bool,
    /// A weekly cycle is present.
    pub weekly: bool,
    /// Autocorrelation at 12 h.
    pub acf_12: f64,
    /// Autocorrelation at 24 h.
    pub acf_24: f64,
    /// Autocorrelation at 168 h (0 with less than two weeks of data).
    pub acf_168: f64,
}

impl Seasonality {
    /// The periods (hours) a seasonal model should use, shortest first.
    pub fn periods(&self) -> Vec<usize> {
        let mut p = Vec::new();
        if self.daily {
            p.push(24);
        }
        if self.weekly {
            p.push(168);
        }
        p
    }
}

/// Detects daily and weekly cycles in a gap-free hourly series.
pub fn detect(y: &[f64]) -> Seasonality {
    let (acf_12, acf_24) = (acf(y, 12), acf(y, 24));
    let acf_168 = if y.len() >= 2 * 168 { acf(y, 168) } else { 0.0 };
    Seasonality {
        daily: y.len() >= 2 * 24 && acf_24 >= MIN_ACF && acf_24 - acf_12 >= DAILY_CONTRAST,
        weekly: y.len() >= 2 * 168
            && acf_168 >= MIN_ACF
            && acf_168 - acf_24 >= WEEKLY_MIN_GAIN
            && acf_168 - acf_24 >= WEEKLY_SHARE * (1.0 - acf_24),
        acf_12,
        acf_24,
        acf_168,
    }
}

/// Autocorrelation at `lag` over the overlapping pairs; 0 when undefined.
pub fn acf(y: &[f64], lag: usize) -> f64 {
    let n = y.len();
    if lag == 0 || lag >= n {
        return 0.0;
    }
    let mean = y.iter().sum::<f64>() / n as f64;
    let var = y.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n as f64;
    if var <= f64::EPSILON * mean.abs().max(1.0) {
        return 0.0;
    }
    let cov = (lag..n).map(|t| (y[t] - mean) * (y[t - lag] - mean)).sum::<f64>() / (n - lag) as f64;
    cov / var
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::f64::consts::PI;

    fn daily(t: usize) -> f64 {
        (2.0 * PI * t as f64 / 24.0).sin()
    }

    #[test]
    fn a_pure_daily_cycle_is_daily_only() {
        let y: Vec<f64> = (0..24 * 21).map(daily).collect();
        let s = detect(&y);
        // sin has acf(24) = 1 and acf(12) = -1 exactly over whole periods.
        assert!((s.acf_24 - 1.0).abs() < 1e-9 && (s.acf_12 + 1.0).abs() < 1e-9, "{s:?}");
        assert!(s.daily && !s.weekly, "{s:?}");
        assert_eq!(s.periods(), vec![24]);
    }

    #[test]
    fn weekday_weekend_load_is_daily_and_weekly() {
        // Daily cycle on weekdays, a flat low weekend.
        let y: Vec<f64> = (0..168 * 4)
            .map(|t| if (t / 24) % 7 < 5 { 10.0 + 5.0 * daily(t) } else { 2.0 })
            .collect();
        let s = detect(&y);
        assert!(s.daily && s.weekly, "{s:?}");
        assert_eq!(s.periods(), vec![24, 168]);
    }

    #[test]
    fn a_strong_daily_cycle_with_a_small_weekly_difference_is_weekly() {
        // Weekends at 80 % of weekdays: acf(24) is already high, acf(168) is 1.
        let y: Vec<f64> = (0..168 * 6)
            .map(|t| (if (t / 24) % 7 < 5 { 1.0 } else { 0.8 }) * (10.0 + 5.0 * daily(t)))
            .collect();
        let s = detect(&y);
        assert!(s.acf_168 - s.acf_24 < 0.1, "{s:?}");
        assert!(s.daily && s.weekly, "{s:?}");
    }

    #[test]
    fn flat_or_short_series_have_no_cycle() {
        let flat = vec![5.0; 400];
        assert_eq!(detect(&flat).periods(), Vec::<usize>::new());
        // A deterministic pseudo-random walk-free noise.
        let mut x = 1u64;
        let noise: Vec<f64> = (0..400)
            .map(|_| {
                x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
                (x >> 33) as f64 / f64::from(u32::MAX)
            })
            .collect();
        assert_eq!(detect(&noise).periods(), Vec::<usize>::new());
        let short: Vec<f64> = (0..30).map(daily).collect();
        assert!(!detect(&short).daily);
    }
}
