//! The candidate forecasting methods the selector ([`super::selection`]) scores on each
//! series' own past: seasonal profiles (naive, mean, median and trimmed mean of the last k
//! cycles), the same profiles rescaled to the last week's level, and a robust MSTL
//! decomposition whose trend is carried on by AutoETS or by its last level.
//!
//! Every method is pure: it sees the training values (hourly, `None` for a gap) that end at the
//! forecast origin and nothing after them, and returns `horizon` point forecasts, or `None`
//! when the history is too short or too gappy for it.

use super::anomaly;

/// How the values of one phase over past cycles become one forecast.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Aggregate {
    /// Their mean.
    Mean,
    /// Their median.
    Median,
    /// Their mean without the highest and the lowest (from 4 values on): a holiday or an outage
    /// in one past cycle does not move it.
    Trimmed,
}

/// One candidate method.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// The same phase of the last `cycles` cycles of `period` hours, aggregated (`cycles` = 1
    /// is seasonal naive). Each older cycle is first shifted by up to [`MAX_SHIFT`] hours to
    /// line up with the most recent one where that fits clearly better: demand that follows
    /// local time moves by an hour on a UTC grid when daylight saving time starts or ends,
    /// and a plain profile would smear its peaks across the change. A phase missing in every
    /// cycle is taken from the cycles before them.
    Profile {
        /// Cycle length, hours.
        period: usize,
        /// Cycles aggregated.
        cycles: usize,
        /// How.
        aggregate: Aggregate,
    },
    /// A profile rescaled to the level of the last `window` hours (a day or a week): the
    /// profile's forecast of those hours, made from the data before them, is compared with
    /// what happened, and the horizon's forecast is scaled by that ratio (clamped to 1/2..2; a
    /// difference for series that go negative).
    Leveled {
        /// Cycle length, hours.
        period: usize,
        /// Cycles aggregated.
        cycles: usize,
        /// How.
        aggregate: Aggregate,
        /// Hours the level is measured over.
        window: usize,
    },
    /// Robust MSTL on the daily and weekly periods (outliers in a first decomposition replaced
    /// by its fit), seasonal components repeated, the trend carried on at its last value.
    /// (AutoETS on the trend was scored too and left out: worse on two of the benchmark
    /// series and six times slower; see docs/analytics.md.)
    Decomposition {
        /// Training weeks (the last ones before the origin).
        weeks: usize,
    },
}

/// Robust |z| of a remainder above which a training value is replaced before fitting.
pub const OUTLIER_Z: f64 = 4.0;

/// Fewest values a decomposition is fitted on (two days).
const MIN_DECOMPOSITION_POINTS: usize = 48;

// === impl Method ===

impl Method {
    /// A short name, e.g. `median[168x4]`, `leveled mean[168x3]`, `mstl[24,168]+ets`.
    pub fn name(&self) -> String {
        let agg = |a: &Aggregate, cycles: usize| match (a, cycles) {
            (_, 1) => "naive",
            (Aggregate::Mean, _) => "mean",
            (Aggregate::Median, _) => "median",
            (Aggregate::Trimmed, _) => "trimmed",
        };
        match self {
            Self::Profile { period, cycles: 1, .. } => format!("naive[{period}]"),
            Self::Profile { period, cycles, aggregate } => {
                format!("{}[{period}x{cycles}]", agg(aggregate, *cycles))
            }
            Self::Leveled { period, cycles, aggregate, window } => {
                format!("leveled{window}h {}[{period}x{cycles}]", agg(aggregate, *cycles))
            }
            Self::Decomposition { weeks } => format!("mstl{weeks}w+level"),
        }
    }

    /// The point forecast of `horizon` hours after `train`, or `None` when this method cannot
    /// forecast from it.
    pub fn forecast(&self, train: &[Option<f64>], horizon: usize) -> Option<Vec<f64>> {
        match *self {
            Self::Profile { period, cycles, aggregate } => {
                aligned(train, period, cycles, aggregate, horizon)
            }
            Self::Leveled { period, cycles, aggregate, window } => {
                leveled(train, period, cycles, aggregate, window, horizon)
            }
            Self::Decomposition { weeks } => {
                let from = train.len().saturating_sub(weeks * 168);
                decomposition(&train[from..], horizon)
            }
        }
    }
}

/// The default candidates, cheap ones first.
pub fn defaults() -> Vec<Method> {
    use Aggregate::{Mean, Median, Trimmed};
    let p = |period, cycles, aggregate| Method::Profile { period, cycles, aggregate };
    let l =
        |period, cycles, aggregate, window| Method::Leveled { period, cycles, aggregate, window };
    vec![
        p(24, 1, Mean),
        p(168, 1, Mean),
        p(24, 7, Mean),
        p(24, 3, Median),
        l(24, 7, Mean, 24),
        p(168, 2, Mean),
        p(168, 4, Mean),
        p(168, 3, Median),
        p(168, 5, Median),
        p(168, 5, Trimmed),
        l(168, 4, Mean, 168),
        l(168, 3, Median, 168),
        l(168, 4, Mean, 24),
        l(168, 3, Median, 24),
        Method::Decomposition { weeks: 4 },
    ]
}

/// Walks back whole cycles from each phase of the horizon and aggregates what it finds.
fn profile(
    train: &[Option<f64>],
    period: usize,
    cycles: usize,
    aggregate: Aggregate,
    horizon: usize,
) -> Option<Vec<f64>> {
    let n = train.len();
    if period == 0 || cycles == 0 || n == 0 {
        return None;
    }
    // A missing phase is looked up in at most this many cycles back.
    let max_back = 2 * cycles + 2;
    let mut one_cycle = Vec::with_capacity(period.min(horizon));
    let mut buf = Vec::with_capacity(cycles);
    for phase in 0..period.min(horizon) {
        buf.clear();
        for back in 1..=max_back {
            let Some(i) = (n + phase).checked_sub(period * back) else { break };
            if let Some(v) = train[i] {
                buf.push(v);
                if buf.len() == cycles {
                    break;
                }
            }
        }
        one_cycle.push(aggregate_values(&mut buf, aggregate)?);
    }
    Some((0..horizon).map(|k| one_cycle[k % one_cycle.len()]).collect())
}

fn aggregate_values(v: &mut [f64], aggregate: Aggregate) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    Some(match aggregate {
        Aggregate::Mean => mean(v),
        Aggregate::Median => anomaly::median(v)?,
        Aggregate::Trimmed if v.len() >= 4 => {
            v.sort_by(f64::total_cmp);
            mean(&v[1..v.len() - 1])
        }
        Aggregate::Trimmed => mean(v),
    })
}

/// Most hours an older cycle is shifted by to line up with the latest one.
pub const MAX_SHIFT: usize = 1;

/// A shift other than none must fit this much better (mean absolute difference) to be used.
const SHIFT_GAIN: f64 = 0.8;

/// The profile of the last `cycles` cycles with each older cycle lined up with the latest;
/// phases with no value there from the plain walk back ([`profile`]).
fn aligned(
    train: &[Option<f64>],
    period: usize,
    cycles: usize,
    aggregate: Aggregate,
    horizon: usize,
) -> Option<Vec<f64>> {
    let n = train.len();
    if period == 0 || n < period + MAX_SHIFT || cycles < 2 {
        return profile(train, period, cycles, aggregate, horizon);
    }
    let latest = &train[n - period..];
    let mut columns: Vec<Vec<f64>> = latest.iter().map(|v| v.iter().copied().collect()).collect();
    for back in 2..=cycles {
        let Some(start) = n.checked_sub(period * back) else { break };
        // Value of phase p in this cycle under shift s: train[start + p - s].
        let at = |p: usize, s: isize| -> Option<f64> {
            let i = (start + p).checked_add_signed(-s)?;
            if i < n - period { train[i] } else { None }
        };
        let distance = |s: isize| -> f64 {
            let (mut sum, mut count) = (0.0, 0usize);
            for (p, l) in latest.iter().enumerate() {
                if let (Some(l), Some(v)) = (l, at(p, s)) {
                    sum += (l - v).abs();
                    count += 1;
                }
            }
            if count < period / 2 { f64::INFINITY } else { sum / count as f64 }
        };
        let unshifted = distance(0);
        let max = isize::try_from(MAX_SHIFT).unwrap_or(1);
        let mut shift = 0;
        let mut best = unshifted * SHIFT_GAIN;
        for s in (-max..=max).filter(|s| *s != 0) {
            let d = distance(s);
            if d < best {
                (shift, best) = (s, d);
            }
        }
        for (p, column) in columns.iter_mut().enumerate() {
            column.extend(at(p, shift));
        }
    }
    let mut plain: Option<Vec<f64>> = None;
    let mut one_cycle = Vec::with_capacity(period);
    for (p, c) in columns.iter_mut().enumerate() {
        let v = match aggregate_values(c, aggregate) {
            Some(v) => v,
            None => {
                let plain = match &plain {
                    Some(plain) => plain,
                    None => plain.insert(profile(train, period, cycles, aggregate, period)?),
                };
                plain[p]
            }
        };
        one_cycle.push(v);
    }
    Some((0..horizon).map(|k| one_cycle[k % period]).collect())
}

/// The profile rescaled to the level of the last `window` hours.
fn leveled(
    train: &[Option<f64>],
    period: usize,
    cycles: usize,
    aggregate: Aggregate,
    window: usize,
    horizon: usize,
) -> Option<Vec<f64>> {
    let mut point = profile(train, period, cycles, aggregate, horizon)?;
    let n = train.len();
    if window == 0 || n < period + window {
        return Some(point);
    }
    let before = profile(&train[..n - window], period, cycles, aggregate, window)?;
    let (mut actual, mut fitted, mut pairs) = (0.0, 0.0, 0usize);
    for (a, f) in train[n - window..].iter().zip(&before) {
        if let Some(a) = a {
            actual += a;
            fitted += f;
            pairs += 1;
        }
    }
    if pairs < window / 2 {
        return Some(point);
    }
    let non_negative = train.iter().flatten().all(|v| *v >= 0.0);
    if non_negative && fitted > 0.0 {
        let ratio = (actual / fitted).clamp(0.5, 2.0);
        point.iter_mut().for_each(|v| *v *= ratio);
    } else {
        let shift = (actual - fitted) / pairs as f64;
        point.iter_mut().for_each(|v| *v += shift);
    }
    Some(point)
}

/// Robust MSTL on [24, 168] (168 only with two weeks of data), the seasonal components'
/// last cycles repeated, plus the trend's last value. Hours missing at the end of the training
/// values are forecast too and dropped.
fn decomposition(train: &[Option<f64>], horizon: usize) -> Option<Vec<f64>> {
    let last = train.iter().rposition(Option::is_some)?;
    let skip = train.len() - 1 - last;
    let fit = decompose(&train[..=last])?;
    let n = fit.cleaned.len();
    let mut point = vec![0.0; skip + horizon];
    for (period, seasonal) in &fit.seasonal {
        for (k, p) in point.iter_mut().enumerate() {
            *p += seasonal[n - period + k % period];
        }
    }
    let level = *fit.trend.last()?;
    point.iter_mut().for_each(|p| *p += level);
    point.drain(..skip);
    Some(point)
}

/// A decomposition of the filled, outlier-cleaned training values.
pub struct Decomposed {
    /// The values fitted: from the first present value on, gaps filled by interpolation,
    /// outliers replaced.
    pub cleaned: Vec<f64>,
    /// Per period, its seasonal component.
    pub seasonal: Vec<(usize, Vec<f64>)>,
    /// The trend component.
    pub trend: Vec<f64>,
}

/// Robust MSTL of `train` from its first present value on (`None` with fewer than two days
/// of data, or when the decomposition fails).
pub fn decompose(train: &[Option<f64>]) -> Option<Decomposed> {
    let first = train.iter().position(Option::is_some)?;
    let y = super::series::HourlySeries { start_ms: 0, values: train[first..].to_vec() }.filled();
    if y.len() < MIN_DECOMPOSITION_POINTS {
        return None;
    }
    let periods: Vec<usize> = [24, 168].into_iter().filter(|p| y.len() >= 2 * p).collect();
    let params = stlrs::MstlParams::new();
    #[allow(clippy::cast_possible_truncation)] // f32 is what stlrs decomposes; values are rates
    let to32 = |v: &[f64]| -> Vec<f32> { v.iter().map(|x| *x as f32).collect() };
    let first_fit = params.fit(&to32(&y), &periods).ok()?;
    let r: Vec<f64> = first_fit.remainder().iter().map(|v| f64::from(*v)).collect();
    let cleaned: Vec<f64> = match anomaly::robust_sigma(&r) {
        Some((med, sigma)) if sigma > 0.0 => y
            .iter()
            .zip(&r)
            .map(|(v, rv)| if ((rv - med) / sigma).abs() > OUTLIER_Z { v - rv + med } else { *v })
            .collect(),
        _ => y,
    };
    let fit = params.fit(&to32(&cleaned), &periods).ok()?;
    let seasonal = periods
        .iter()
        .zip(fit.seasonal())
        .map(|(p, s)| (*p, s.iter().map(|v| f64::from(*v)).collect()))
        .collect();
    let trend = fit.trend().iter().map(|v| f64::from(*v)).collect();
    Some(Decomposed { cleaned, seasonal, trend })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn some(v: &[f64]) -> Vec<Option<f64>> {
        v.iter().map(|x| Some(*x)).collect()
    }

    #[test]
    fn profiles_by_hand() {
        // Period 2, three cycles: phases (1, 3, 5) and (2, 4, 6).
        let train = some(&[1.0, 2.0, 3.0, 4.0, 5.0, 60.0]);
        let naive = Method::Profile { period: 2, cycles: 1, aggregate: Aggregate::Mean };
        assert_eq!(naive.forecast(&train, 3), Some(vec![5.0, 60.0, 5.0]));
        assert_eq!(profile(&train, 2, 3, Aggregate::Mean, 2), Some(vec![3.0, 22.0]));
        assert_eq!(profile(&train, 2, 3, Aggregate::Median, 2), Some(vec![3.0, 4.0]));
        // Trimmed with four cycles drops the 60 and the 2.
        let train = some(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 60.0]);
        assert_eq!(profile(&train, 2, 4, Aggregate::Trimmed, 2), Some(vec![4.0, 5.0]));
        // A weekly profile without a phase change is the plain one.
        let week: Vec<Option<f64>> = (0..168 * 4)
            .map(|t| Some(((t % 168) as f64 * 0.3).sin() * 10.0 + (t / 168) as f64))
            .collect();
        let m = Method::Profile { period: 168, cycles: 4, aggregate: Aggregate::Mean };
        assert_eq!(m.forecast(&week, 168), profile(&week, 168, 4, Aggregate::Mean, 168));
    }

    #[test]
    fn a_missing_phase_is_taken_from_older_cycles_and_nothing_at_all_is_none() {
        let train = vec![Some(1.0), Some(2.0), Some(3.0), None];
        let naive = Method::Profile { period: 2, cycles: 1, aggregate: Aggregate::Mean };
        assert_eq!(naive.forecast(&train, 2), Some(vec![3.0, 2.0]));
        assert_eq!(naive.forecast(&[None, None], 2), None);
        assert_eq!(naive.forecast(&[], 2), None);
    }

    #[test]
    fn aligned_lines_older_cycles_up_with_the_latest() {
        // Period 4 with a peak at phase 1, then at phase 2 in the latest cycle (an hour later,
        // as after the end of daylight saving time).
        let train = some(&[0.0, 9.0, 0.0, 0.0, 0.0, 9.0, 0.0, 0.0, 0.0, 0.0, 9.0, 0.0]);
        assert_eq!(profile(&train, 4, 3, Aggregate::Median, 4), Some(vec![0.0, 9.0, 0.0, 0.0]));
        let aligned = Method::Profile { period: 4, cycles: 3, aggregate: Aggregate::Median };
        assert_eq!(aligned.forecast(&train, 4), Some(vec![0.0, 0.0, 9.0, 0.0]));
        // Without a change, nothing moves.
        let steady = some(&[0.0, 9.0, 0.0, 0.0, 0.0, 9.0, 0.0, 0.0, 0.0, 9.0, 0.0, 0.0]);
        assert_eq!(aligned.forecast(&steady, 4), Some(vec![0.0, 9.0, 0.0, 0.0]));
    }

    #[test]
    fn leveled_follows_a_level_shift_the_plain_profile_misses() {
        // Two weeks at 10, then a week at 20 with the same (flat) shape.
        let mut train = vec![Some(10.0); 168 * 3];
        train[168 * 2..].iter_mut().for_each(|v| *v = Some(20.0));
        let mean = Method::Profile { period: 168, cycles: 2, aggregate: Aggregate::Mean };
        let leveled =
            Method::Leveled { period: 168, cycles: 2, aggregate: Aggregate::Mean, window: 168 };
        assert_eq!(mean.forecast(&train, 1), Some(vec![15.0]));
        // The profile forecast 10 for the last week and saw 20: ratio 2.
        assert_eq!(leveled.forecast(&train, 1), Some(vec![30.0]));
    }

    #[test]
    fn decomposition_continues_a_clean_seasonal_series() {
        let y: Vec<f64> = (0..168 * 4)
            .map(|t| {
                50.0 + 10.0 * (2.0 * std::f64::consts::PI * t as f64 / 24.0).sin()
                    + if (t / 24) % 7 < 5 { 5.0 } else { 0.0 }
            })
            .collect();
        let m = Method::Decomposition { weeks: 4 };
        let f = m.forecast(&some(&y), 168).unwrap();
        let truth: Vec<f64> = y[..168].to_vec();
        let mae = f.iter().zip(&truth).map(|(a, b)| (a - b).abs()).sum::<f64>() / 168.0;
        assert!(mae < 1.0, "{}: mae {mae}", m.name());
        // Hours missing at the origin are forecast through: phases stay aligned.
        let mut gappy = some(&y);
        gappy.iter_mut().rev().take(5).for_each(|v| *v = None);
        let f = m.forecast(&gappy, 24).unwrap();
        assert!(f.iter().zip(&y[..24]).all(|(a, b)| (a - b).abs() < 2.0), "{f:?}");
    }
}
