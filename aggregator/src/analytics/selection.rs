//! Per-series method selection: every candidate of [`super::candidates`] is scored by rolling
//! backtests on the series' own past, and the forecast uses the best one or the mean of the
//! best two or three, whichever scored best. The prediction interval comes from the same
//! backtests: the empirical quantiles of the chosen forecast's errors there.
//!
//! No peeking: the validation origins lie inside the training values handed in, each
//! candidate at a validation origin sees only the values before it, and the training values
//! themselves end at the forecast origin.
//!
//! With too little history for one validation week, the best simple method is used without
//! validation (weekly seasonal naive from two weeks of data, daily otherwise), with an
//! interval from its in-sample errors widened by [`SHORT_HISTORY_WIDEN`].

use serde::{Deserialize, Serialize};

use super::backtest;
use super::candidates::{self, Method};

/// Hours in a week: the validation horizon and the spacing of validation origins.
const WEEK: usize = 168;

/// Data a validation origin needs before it (one week).
const MIN_BEFORE_ORIGIN: usize = WEEK;

/// How much wider the interval of an unvalidated (short-history) forecast is made.
pub const SHORT_HISTORY_WIDEN: f64 = 1.5;

/// Weight of a validation week relative to the week after it.
const RECENCY: f64 = 0.5;

/// The most candidates averaged into one forecast.
const MAX_COMBINED: usize = 3;

/// One candidate's validation score.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CandidateScore {
    /// The method, e.g. `median[168x5]` or `mean of median[168x5], mstl4w+level`.
    pub method: String,
    /// Its mean MASE over the validation origins (`None`: it could not forecast at all of
    /// them).
    pub mase: Option<f64>,
}

/// What was chosen and why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Selection {
    /// The chosen method (a combination is named `mean of A, B`).
    pub chosen: String,
    /// Its validation MASE (`None` when nothing was validated).
    pub validation_mase: Option<f64>,
    /// Validation origins (weeks) scored.
    pub validation_weeks: usize,
    /// Every candidate's score, best first; combinations included.
    pub candidates: Vec<CandidateScore>,
    /// Why this one, in words.
    pub reason: String,
}

/// A chosen forecast: the points, the errors it made in validation, and the story.
#[derive(Debug, Clone)]
pub struct Chosen {
    /// Point forecast per horizon hour.
    pub point: Vec<f64>,
    /// `actual - forecast` of the chosen method at every validation hour with an actual.
    pub errors: Vec<f64>,
    /// How much the error quantiles are widened (1 when validated).
    pub widen: f64,
    /// The chosen method's forecast for each hour of the validated weeks (oldest first), the
    /// out-of-sample "expected" value of those hours; without validation, the value one
    /// cycle before each hour.
    pub fitted: Vec<f64>,
    /// Hours of training data before the first fitted hour.
    pub fitted_from: usize,
    /// What was chosen and why.
    pub selection: Selection,
}

// === impl Chosen ===

impl Chosen {
    /// The interval at `level` around the points: the validation errors' quantiles at
    /// `(1 - level) / 2` and `(1 + level) / 2`, widened by `widen`.
    pub fn interval(&self, level: f64) -> (Vec<f64>, Vec<f64>) {
        let mut e = self.errors.clone();
        e.sort_by(f64::total_cmp);
        let lo = quantile(&e, (1.0 - level) / 2.0).unwrap_or(0.0).min(0.0) * self.widen;
        let hi = quantile(&e, f64::midpoint(1.0, level)).unwrap_or(0.0).max(0.0) * self.widen;
        (self.point.iter().map(|p| p + lo).collect(), self.point.iter().map(|p| p + hi).collect())
    }
}

/// The `q` quantile of sorted values (linear between order statistics).
fn quantile(sorted: &[f64], q: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let pos = q.clamp(0.0, 1.0) * (sorted.len() - 1) as f64;
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)] // 0..len by the clamp
    let i = pos.floor() as usize;
    let frac = pos - i as f64;
    let next = sorted.get(i + 1).copied().unwrap_or(sorted[i]);
    Some(sorted[i] + frac * (next - sorted[i]))
}

/// Weight of a daily validation origin in the last week, per hour scored, relative to the
/// last weekly origin.
const DAILY_WEIGHT: f64 = 1.0;

/// An absolute validation error counts at most this many MASE scales.
const CLIP_SCALES: f64 = 5.0;

/// A validation origin: forecasts from `train[..at]` are scored on the `hours` after it.
struct Origin {
    at: usize,
    hours: usize,
    weight: f64,
}

/// One candidate's validation forecasts, one per validation origin.
struct Validated {
    method: Vec<Method>,
    forecasts: Vec<Vec<f64>>,
    mase: f64,
}

/// Scores `methods` on up to `validation_weeks` weekly origins inside `train` and forecasts
/// `horizon` hours after it with the winner.
pub fn select(
    train: &[Option<f64>],
    horizon: usize,
    methods: &[Method],
    validation_weeks: usize,
) -> Option<Chosen> {
    let n = train.len();
    // Weekly validation origins, oldest first: whole weeks back from the end, each with a
    // week of data before it; recent weeks weigh more, so demand that changed regime is
    // judged by its new regime.
    let weekly: Vec<usize> = (1..=validation_weeks)
        .rev()
        .filter_map(|j| n.checked_sub(j * WEEK))
        .filter(|o| *o >= MIN_BEFORE_ORIGIN)
        .collect();
    if weekly.is_empty() {
        return short_history(train, horizon);
    }
    let weeks = weekly.len();
    let mut origins: Vec<Origin> = weekly
        .iter()
        .enumerate()
        .map(|(i, at)| Origin {
            at: *at,
            hours: WEEK,
            weight: RECENCY.powi(i32::try_from(weeks - 1 - i).unwrap_or(0)),
        })
        .collect();
    // Daily origins inside the last week, scored on the hours up to the end: a change in the
    // last days shows in every one of them.
    origins.extend((1..WEEK / 24).rev().map(|d| Origin {
        at: n - 24 * d,
        hours: 24 * d,
        weight: DAILY_WEIGHT,
    }));
    let lag = if n >= 2 * WEEK { WEEK } else { 24 };
    let scale = backtest::mase_scale(train, lag).unwrap_or(1.0);
    let actual = |o: &Origin| &train[o.at..o.at + o.hours];
    // A holiday or an outage in the validation hours costs every candidate a lot, and says
    // little about which one is better on ordinary hours: errors count up to a cap.
    let clip = CLIP_SCALES * scale;
    let score = |forecasts: &[Vec<f64>]| -> f64 {
        let (mut sum, mut weight) = (0.0, 0.0);
        for (o, f) in origins.iter().zip(forecasts) {
            for (a, p) in actual(o).iter().zip(f) {
                if let Some(a) = a {
                    sum += o.weight * (a - p).abs().min(clip);
                    weight += o.weight;
                }
            }
        }
        if weight == 0.0 { f64::INFINITY } else { sum / weight / scale }
    };
    let mut scored: Vec<Validated> = Vec::new();
    let mut failed = Vec::new();
    for m in methods {
        let forecasts: Option<Vec<Vec<f64>>> =
            origins.iter().map(|o| m.forecast(&train[..o.at], o.hours)).collect();
        match forecasts {
            Some(forecasts) => {
                let mase = score(&forecasts);
                scored.push(Validated { method: vec![*m], forecasts, mase });
            }
            None => failed.push(*m),
        }
    }
    if scored.is_empty() {
        return short_history(train, horizon);
    }
    scored.sort_by(|a, b| a.mase.total_cmp(&b.mase));
    // Means of the best 2 and 3.
    let singles = scored.len();
    for k in 2..=MAX_COMBINED.min(singles) {
        let top = &scored[..k];
        let forecasts: Vec<Vec<f64>> = (0..origins.len())
            .map(|i| mean_of(top.iter().map(|v| v.forecasts[i].as_slice())))
            .collect();
        let mase = score(&forecasts);
        let method = top.iter().map(|v| v.method[0]).collect();
        scored.push(Validated { method, forecasts, mase });
    }
    // The winner; a tie goes to the simpler (fewer methods, then listed earlier).
    let best = scored
        .iter()
        .enumerate()
        .min_by(|(i, a), (j, b)| {
            a.mase.total_cmp(&b.mase).then(a.method.len().cmp(&b.method.len())).then(i.cmp(j))
        })
        .map(|(i, _)| i)?;
    let winner = &scored[best];
    let finals: Option<Vec<Vec<f64>>> =
        winner.method.iter().map(|m| m.forecast(train, horizon)).collect();
    let (point, winner) = match finals {
        Some(f) => (mean_of(f.iter().map(Vec::as_slice)), winner),
        // The winner cannot forecast from the whole history (it could from every validation
        // origin, so this is rare): the best single that can.
        None => scored[..singles]
            .iter()
            .find_map(|v| Some((v.method[0].forecast(train, horizon)?, v)))?,
    };
    // The interval from the weekly origins' errors: whole horizons, as the forecast's.
    let mut errors = Vec::with_capacity(weeks * WEEK);
    for (o, f) in origins[..weeks].iter().zip(&winner.forecasts) {
        errors.extend(actual(o).iter().zip(f).filter_map(|(a, p)| a.map(|a| a - p)));
    }
    let mut candidates: Vec<CandidateScore> = scored
        .iter()
        .map(|v| CandidateScore { method: name_of(&v.method), mase: Some(v.mase) })
        .collect();
    candidates.sort_by(|a, b| {
        a.mase.unwrap_or(f64::INFINITY).total_cmp(&b.mase.unwrap_or(f64::INFINITY))
    });
    candidates.extend(failed.iter().map(|m| CandidateScore { method: m.name(), mase: None }));
    let chosen = name_of(&winner.method);
    let reason = format!(
        "lowest mean MASE of {} candidates over the last {weeks} week{} before the origin",
        candidates.len(),
        if weeks == 1 { "" } else { "s" }
    );
    Some(Chosen {
        point,
        errors,
        widen: 1.0,
        fitted: winner.forecasts[..weeks].concat(),
        fitted_from: weekly[0],
        selection: Selection {
            chosen,
            validation_mase: Some(winner.mase),
            validation_weeks: weeks,
            candidates,
            reason,
        },
    })
}

/// The hour-by-hour mean of equally long forecasts.
fn mean_of<'a>(forecasts: impl Iterator<Item = &'a [f64]>) -> Vec<f64> {
    let mut sum: Vec<f64> = Vec::new();
    let mut count = 0usize;
    for f in forecasts {
        if sum.is_empty() {
            sum = f.to_vec();
        } else {
            sum.iter_mut().zip(f).for_each(|(s, v)| *s += v);
        }
        count += 1;
    }
    sum.iter_mut().for_each(|s| *s /= count.max(1) as f64);
    sum
}

fn name_of(methods: &[Method]) -> String {
    match methods {
        [one] => one.name(),
        many => {
            format!("mean of {}", many.iter().map(Method::name).collect::<Vec<_>>().join(", "))
        }
    }
}

/// Too little history to validate: weekly seasonal naive with two weeks of data, daily
/// otherwise; the interval from its in-sample errors, widened.
fn short_history(train: &[Option<f64>], horizon: usize) -> Option<Chosen> {
    let present = train.iter().flatten().count();
    let period = if present >= 2 * WEEK { WEEK } else { 24 };
    let method = Method::Profile { period, cycles: 1, aggregate: candidates::Aggregate::Mean };
    let point = method.forecast(train, horizon)?;
    // In-sample: each hour against the value one cycle (or more, past gaps) before it.
    let before = |t: usize| (1..=t / period).find_map(|j| train[t - j * period]);
    let errors: Vec<f64> =
        (period..train.len()).filter_map(|t| Some(train[t]? - before(t)?)).collect();
    let mean = train.iter().flatten().sum::<f64>() / present.max(1) as f64;
    let fitted: Vec<f64> = (period..train.len()).map(|t| before(t).unwrap_or(mean)).collect();
    let fitted_from = period.min(train.len());
    let chosen = method.name();
    Some(Chosen {
        point,
        errors,
        widen: SHORT_HISTORY_WIDEN,
        fitted,
        fitted_from,
        selection: Selection {
            chosen: chosen.clone(),
            validation_mase: None,
            validation_weeks: 0,
            candidates: vec![CandidateScore { method: chosen, mase: None }],
            reason: format!(
                "{} hours of data: too little for a validation week ({} needed), so the \
                 simplest seasonal method, with its in-sample errors widened {SHORT_HISTORY_WIDEN}x",
                train.len(),
                MIN_BEFORE_ORIGIN + WEEK
            ),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::analytics::candidates::Aggregate;

    fn weekly(t: usize) -> f64 {
        let hour = t % 24;
        let weekday = (t / 24) % 7 < 5;
        10.0 + hour as f64 + if weekday { 20.0 } else { 0.0 }
    }

    #[test]
    fn a_clean_weekly_series_picks_a_weekly_method_and_nothing_after_the_origin_matters() {
        let n = WEEK * 6;
        let train: Vec<Option<f64>> = (0..n).map(|t| Some(weekly(t))).collect();
        let c = select(&train, 48, &candidates::defaults(), 3).unwrap();
        assert_eq!(c.selection.validation_weeks, 3);
        assert!(c.selection.validation_mase.unwrap() < 1e-9, "{:?}", c.selection);
        assert!(c.point.iter().enumerate().all(|(k, p)| (p - weekly(n + k)).abs() < 1e-6));
        // Exact in validation: a zero-width interval.
        let (lo, hi) = c.interval(0.95);
        assert_eq!((lo[0], hi[0]), (c.point[0], c.point[0]));
        assert_eq!(c.fitted.len(), 3 * WEEK);
        assert_eq!(c.fitted_from, n - 3 * WEEK);
    }

    #[test]
    fn a_spike_in_one_past_week_sends_the_choice_to_a_robust_method() {
        // Noise-free weekly shape with one week of 10x spikes every 5th hour, three weeks back.
        let n = WEEK * 8;
        let train: Vec<Option<f64>> = (0..n)
            .map(|t| {
                let spike = (n - 3 * WEEK..n - 2 * WEEK).contains(&t) && t % 5 == 0;
                Some(weekly(t) * if spike { 10.0 } else { 1.0 })
            })
            .collect();
        let c = select(&train, WEEK, &candidates::defaults(), 3).unwrap();
        let mae = c.point.iter().enumerate().map(|(k, p)| (p - weekly(n + k)).abs()).sum::<f64>()
            / WEEK as f64;
        assert!(mae < 0.5, "{} mae {mae}", c.selection.chosen);
    }

    #[test]
    fn short_history_falls_back_to_naive_with_a_wider_interval() {
        let train: Vec<Option<f64>> = (0..100).map(|t| Some(weekly(t) + (t % 5) as f64)).collect();
        let c = select(&train, 24, &candidates::defaults(), 3).unwrap();
        assert_eq!(c.selection.chosen, "naive[24]");
        assert_eq!(c.selection.validation_weeks, 0);
        assert!((c.widen - SHORT_HISTORY_WIDEN).abs() < 1e-12);
        // The fit is the value a day before each hour.
        assert_eq!((c.fitted_from, c.fitted.len()), (24, 76));
        assert_eq!(c.fitted[0], train[0].unwrap());
        let (lo, hi) = c.interval(0.8);
        assert!(lo[0] < c.point[0] && c.point[0] < hi[0]);
    }

    #[test]
    fn combinations_are_scored_and_named() {
        let n = WEEK * 6;
        // A noisy weekly series: several methods score close, and a mean of the best is a
        // candidate next to each.
        let mut state = 7u64;
        let train: Vec<Option<f64>> = (0..n)
            .map(|t| {
                state = state.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
                Some(weekly(t) + ((state >> 33) % 11) as f64)
            })
            .collect();
        let methods = [
            Method::Profile { period: 168, cycles: 1, aggregate: Aggregate::Mean },
            Method::Profile { period: 168, cycles: 4, aggregate: Aggregate::Mean },
            Method::Decomposition { weeks: 4 },
        ];
        let c = select(&train, WEEK, &methods, 2).unwrap();
        let names: Vec<&str> = c.selection.candidates.iter().map(|s| s.method.as_str()).collect();
        assert_eq!(names.len(), 5, "{names:?}");
        assert!(names.iter().any(|n| n.starts_with("mean of ")), "{names:?}");
        // Best first.
        let scores: Vec<f64> = c.selection.candidates.iter().filter_map(|s| s.mase).collect();
        assert!(scores.windows(2).all(|w| w[0] <= w[1]), "{scores:?}");
        assert_eq!(c.selection.validation_mase, Some(scores[0]));
    }
}
