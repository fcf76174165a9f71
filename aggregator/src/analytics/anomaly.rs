//! Robust anomaly detection on forecast residuals: a point is anomalous when its robust z-score
//! `|r - median(r)| / sigma` exceeds a threshold (2 by default), with
//! `sigma = 1.4826 * MAD` (the median absolute deviation scaled to a normal standard deviation),
//! so the outliers being looked for do not inflate the yardstick as they would a plain standard
//! deviation.
//!
//! When more than half the residuals are equal (MAD = 0), sigma falls back to
//! `1.2533 * mean |r - median|` (the mean absolute deviation scaled the same way); when that is
//! 0 too, nothing is anomalous.
//!
//! [`detect`] also floors sigma at [`SIGMA_FLOOR`] (0.5 %) of the series' median absolute level,
//! so a near-perfect fit (residuals of rounding size) does not turn every wiggle into an
//! anomaly: at |z| > 2 a point must be off by more than 1 % of the typical level.

use serde::{Deserialize, Serialize};

/// Scales a MAD to a normal standard deviation.
pub const MAD_TO_SIGMA: f64 = 1.4826;
/// Scales a mean absolute deviation to a normal standard deviation.
pub const MEAN_AD_TO_SIGMA: f64 = 1.2533;
/// The default threshold on |z|.
pub const DEFAULT_Z: f64 = 2.0;
/// Smallest sigma [`detect`] uses, as a share of the median absolute observed value.
pub const SIGMA_FLOOR: f64 = 0.005;

/// One anomalous point.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Anomaly {
    /// When, Unix ms (start of the hour).
    pub unix_ms: i64,
    /// The observed value.
    pub value: f64,
    /// What the model expected there (in-sample fit).
    pub expected: f64,
    /// Robust z-score of the residual.
    pub z: f64,
}

/// Median and robust sigma of `r`; `None` when `r` is empty.
pub fn robust_sigma(r: &[f64]) -> Option<(f64, f64)> {
    let med = median(r)?;
    let dev: Vec<f64> = r.iter().map(|v| (v - med).abs()).collect();
    let mad = median(&dev)?;
    let sigma = if mad > 0.0 {
        MAD_TO_SIGMA * mad
    } else {
        MEAN_AD_TO_SIGMA * dev.iter().sum::<f64>() / dev.len() as f64
    };
    Some((med, sigma))
}

/// The robust z-score of each residual (0 where sigma is 0).
pub fn z_scores(r: &[f64]) -> Vec<f64> {
    match robust_sigma(r) {
        Some((med, sigma)) if sigma > 0.0 => r.iter().map(|v| (v - med) / sigma).collect(),
        _ => vec![0.0; r.len()],
    }
}

/// Anomalies among `(unix_ms, observed, expected)` points: residual `observed - expected`,
/// robust |z| above `threshold`.
pub fn detect(points: &[(i64, f64, f64)], threshold: f64) -> Vec<Anomaly> {
    let residuals: Vec<f64> = points.iter().map(|(_, y, e)| y - e).collect();
    let levels: Vec<f64> = points.iter().map(|(_, y, _)| y.abs()).collect();
    let floor = median(&levels).unwrap_or(0.0) * SIGMA_FLOOR;
    let Some((med, sigma)) = robust_sigma(&residuals) else { return Vec::new() };
    let sigma = sigma.max(floor);
    if sigma <= 0.0 {
        return Vec::new();
    }
    residuals
        .iter()
        .zip(points)
        .map(|(r, p)| ((r - med) / sigma, p))
        .filter(|(z, _)| z.abs() > threshold)
        .map(|(z, &(unix_ms, value, expected))| Anomaly { unix_ms, value, expected, z })
        .collect()
}

/// Median of finite values; `None` when empty.
pub fn median(v: &[f64]) -> Option<f64> {
    let mut s: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if s.is_empty() {
        return None;
    }
    s.sort_by(f64::total_cmp);
    let n = s.len();
    Some(if n % 2 == 1 { s[n / 2] } else { (s[n / 2 - 1] + s[n / 2]) / 2.0 })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mad_sigma_by_hand() {
        // Deviations from the median 0: 0,1,1,2,2,0,1,1,10 -> MAD 1 -> sigma 1.4826.
        let r = [0.0, 1.0, -1.0, 2.0, -2.0, 0.0, 1.0, -1.0, 10.0];
        let (med, sigma) = robust_sigma(&r).unwrap();
        assert_eq!(med, 0.0);
        assert!((sigma - 1.4826).abs() < 1e-12);
        let pts: Vec<(i64, f64, f64)> =
            r.iter().enumerate().map(|(i, v)| (i as i64, 100.0 + v, 100.0)).collect();
        let found = detect(&pts, DEFAULT_Z);
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].unix_ms, 8);
        assert!((found[0].z - 10.0 / 1.4826).abs() < 1e-9);
        // |z| of 2 / 1.4826 = 1.35 stays under the threshold.
        assert!(found.iter().all(|a| a.value != 102.0));
    }

    #[test]
    fn mostly_equal_residuals_fall_back_to_mean_deviation() {
        let r = [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 4.0];
        let (_, sigma) = robust_sigma(&r).unwrap();
        assert!((sigma - 1.2533 * 4.0 / 7.0).abs() < 1e-12);
        assert_eq!(detect(&[(0, 1.0, 1.0), (1, 1.0, 1.0)], 2.0), vec![]);
        assert_eq!(robust_sigma(&[]), None);
    }

    #[test]
    fn rounding_size_residuals_are_not_anomalies() {
        // A near-perfect fit of a level-100 series: residuals of 1e-6 with one of 1e-5 would
        // be |z| >> 2 without the floor; with it sigma is 0.5 and nothing is anomalous, while a
        // real 5 % excursion still is.
        let mut pts: Vec<(i64, f64, f64)> = (0..20)
            .map(|i| (i, 100.0 + f64::from(i32::try_from(i % 3).unwrap()) * 1e-6, 100.0))
            .collect();
        pts.push((20, 100.00001, 100.0));
        assert!(detect(&pts, DEFAULT_Z).is_empty());
        pts.push((21, 105.0, 100.0));
        let found = detect(&pts, DEFAULT_Z);
        assert_eq!(found.iter().map(|a| a.unix_ms).collect::<Vec<_>>(), vec![21]);
    }
}
