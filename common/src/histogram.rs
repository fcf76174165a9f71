//! Mergeable log-linear histograms: the one way latency and size distributions travel and merge.
//!
//! Values are unsigned integers (microseconds, rows). Values below 32 get a bucket each; above
//! that every power of two is split into 32 equal buckets, so a bucket's width is at most 1/32 of
//! its lower bound and any quantile read back is within about 3 % of the true value. The layout is
//! fixed, so two histograms merge by adding counts bucket by bucket, which is what makes fleet-wide
//! percentiles honest: merge first, then read the quantile, never average quantiles.
//!
//! On the wire a histogram is the sparse [`proto::Histogram`]; [`LogHistogram::from_proto`]
//! checks it, since it arrives from the network: buckets paired and ascending, `count` their
//! total, `min <= max`, `min` in the first non-empty bucket, `max` in the last, and `sum` between
//! `min·count` and `max·count`. Every operation saturates instead of overflowing, and no method
//! panics on any histogram, checked or not.

use crate::proto;

/// Sub-buckets per power of two, as a bit count.
const SUB_BITS: u32 = 5;
const SUB_COUNT: u64 = 1 << SUB_BITS;
/// Number of buckets needed to cover every `u64`.
#[allow(clippy::cast_possible_truncation)] // 32 fits any usize
pub const BUCKETS: usize = ((64 - SUB_BITS as usize) << SUB_BITS) + SUB_COUNT as usize;

/// The bucket a value falls in.
#[allow(clippy::cast_possible_truncation)] // indexes are below BUCKETS (1,920)
pub fn bucket_of(value: u64) -> usize {
    if value < SUB_COUNT {
        return value as usize;
    }
    let exp = 63 - value.leading_zeros(); // floor(log2 value), >= SUB_BITS
    let sub = (value >> (exp - SUB_BITS)) & (SUB_COUNT - 1);
    (((exp - SUB_BITS + 1) as usize) << SUB_BITS) + sub as usize
}

/// The smallest value in bucket `index`.
#[allow(clippy::cast_possible_truncation)] // index >> 5 is below 60
pub fn lower_bound(index: usize) -> u64 {
    if index < SUB_COUNT as usize {
        return index as u64;
    }
    let exp = (index >> SUB_BITS) as u32 + SUB_BITS - 1;
    let sub = (index as u64) & (SUB_COUNT - 1);
    (SUB_COUNT + sub) << (exp - SUB_BITS)
}

/// The largest value in bucket `index`.
pub fn upper_bound(index: usize) -> u64 {
    if index + 1 >= BUCKETS { u64::MAX } else { lower_bound(index + 1) - 1 }
}

/// Why a histogram from the wire was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HistogramError {
    /// `bucket_index` and `bucket_count` differ in length.
    #[error("histogram has {indexes} bucket indexes but {counts} counts; they must pair up")]
    Unpaired {
        /// Length of `bucket_index`.
        indexes: usize,
        /// Length of `bucket_count`.
        counts: usize,
    },
    /// An index past the last bucket, or indexes not strictly ascending.
    #[error("histogram bucket index {index} is out of order or past the last bucket ({max})")]
    BadIndex {
        /// The offending index.
        index: u32,
        /// The largest valid index.
        max: usize,
    },
    /// `count` is not the sum of the bucket counts.
    #[error("histogram count {stated} does not match its buckets' total {actual}")]
    CountMismatch {
        /// `count` as sent.
        stated: u64,
        /// Sum of the bucket counts.
        actual: u64,
    },
    /// `min` or `max` is not in the bucket range the counts cover, or `min > max`.
    #[error(
        "histogram min {min} / max {max} do not fit its buckets (values {low}..={high} recorded)"
    )]
    BadRange {
        /// `min` as sent.
        min: u64,
        /// `max` as sent.
        max: u64,
        /// Lowest value the first non-empty bucket holds.
        low: u64,
        /// Highest value the last non-empty bucket holds.
        high: u64,
    },
    /// `sum` is outside `min·count ..= max·count`.
    #[error("histogram sum {sum} is impossible for {count} values between {min} and {max}")]
    BadSum {
        /// `sum` as sent.
        sum: u64,
        /// `count` as sent.
        count: u64,
        /// `min` as sent.
        min: u64,
        /// `max` as sent.
        max: u64,
    },
}

/// A histogram being recorded or merged. Buckets grow only as far as the largest value seen.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LogHistogram {
    counts: Vec<u64>,
    count: u64,
    sum: u64,
    min: u64,
    max: u64,
}

impl LogHistogram {
    /// An empty histogram.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records one value.
    pub fn record(&mut self, value: u64) {
        self.record_n(value, 1);
    }

    /// Records `n` occurrences of one value.
    pub fn record_n(&mut self, value: u64, n: u64) {
        if n == 0 {
            return;
        }
        let index = bucket_of(value);
        if self.counts.len() <= index {
            self.counts.resize(index + 1, 0);
        }
        self.counts[index] = self.counts[index].saturating_add(n);
        if self.count == 0 {
            self.min = value;
            self.max = value;
        } else {
            self.min = self.min.min(value);
            self.max = self.max.max(value);
        }
        self.count = self.count.saturating_add(n);
        self.sum = self.sum.saturating_add(value.saturating_mul(n));
    }

    /// Adds every recording of `other` to this one.
    pub fn merge(&mut self, other: &Self) {
        if other.count == 0 {
            return;
        }
        if self.counts.len() < other.counts.len() {
            self.counts.resize(other.counts.len(), 0);
        }
        for (mine, theirs) in self.counts.iter_mut().zip(&other.counts) {
            *mine = mine.saturating_add(*theirs);
        }
        if self.count == 0 {
            self.min = other.min;
            self.max = other.max;
        } else {
            self.min = self.min.min(other.min);
            self.max = self.max.max(other.max);
        }
        self.count = self.count.saturating_add(other.count);
        self.sum = self.sum.saturating_add(other.sum);
    }

    /// Number of values recorded.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// Exact sum of the values recorded.
    pub fn sum(&self) -> u64 {
        self.sum
    }

    /// Smallest value recorded, if any.
    pub fn min(&self) -> Option<u64> {
        (self.count > 0).then_some(self.min)
    }

    /// Largest value recorded, if any.
    pub fn max(&self) -> Option<u64> {
        (self.count > 0).then_some(self.max)
    }

    /// Exact mean, if anything was recorded.
    pub fn mean(&self) -> Option<f64> {
        (self.count > 0).then(|| self.sum as f64 / self.count as f64)
    }

    /// The value at quantile `q` (0..=1): the top of the bucket holding the rank `ceil(q·count)`,
    /// clamped to the recorded min and max. `None` when empty.
    #[allow(clippy::cast_possible_truncation)] // the rank is at most count, a u64
    pub fn quantile(&self, q: f64) -> Option<u64> {
        if self.count == 0 {
            return None;
        }
        let q = if q.is_nan() { 0.5 } else { q.clamp(0.0, 1.0) };
        let rank = ((q * self.count as f64).ceil() as u64).max(1);
        let mut seen = 0u64;
        for (index, n) in self.counts.iter().enumerate() {
            seen = seen.saturating_add(*n);
            if seen >= rank {
                // Not `clamp`: it panics when min > max, and a histogram is only guaranteed
                // consistent when it came through `from_proto` or `record`.
                return Some(upper_bound(index).min(self.max).max(self.min));
            }
        }
        Some(self.max)
    }

    /// How many recorded values are at most `bound` (exact at bucket boundaries, which is where
    /// Prometheus `le` buckets are placed).
    pub fn count_at_most(&self, bound: u64) -> u64 {
        self.counts
            .iter()
            .enumerate()
            .take_while(|(index, _)| upper_bound(*index) <= bound)
            .fold(0u64, |total, (_, n)| total.saturating_add(*n))
    }

    /// The sparse wire form.
    pub fn to_proto(&self) -> proto::Histogram {
        let mut out = proto::Histogram {
            count: self.count,
            sum: self.sum,
            min: self.min().unwrap_or(0),
            max: self.max().unwrap_or(0),
            ..proto::Histogram::default()
        };
        for (index, n) in self.counts.iter().enumerate() {
            if *n > 0 {
                out.bucket_index.push(u32::try_from(index).unwrap_or(u32::MAX));
                out.bucket_count.push(*n);
            }
        }
        out
    }

    /// Reads the wire form, refusing one that is inconsistent.
    pub fn from_proto(wire: &proto::Histogram) -> Result<Self, HistogramError> {
        if wire.bucket_index.len() != wire.bucket_count.len() {
            return Err(HistogramError::Unpaired {
                indexes: wire.bucket_index.len(),
                counts: wire.bucket_count.len(),
            });
        }
        let mut out = Self::new();
        let mut previous: Option<u32> = None;
        let mut total = 0u64;
        for (index, n) in wire.bucket_index.iter().zip(&wire.bucket_count) {
            let position = *index as usize;
            if position >= BUCKETS || previous.is_some_and(|p| p >= *index) {
                return Err(HistogramError::BadIndex { index: *index, max: BUCKETS - 1 });
            }
            previous = Some(*index);
            if out.counts.len() <= position {
                out.counts.resize(position + 1, 0);
            }
            out.counts[position] = *n;
            total = total.saturating_add(*n);
        }
        if total != wire.count {
            return Err(HistogramError::CountMismatch { stated: wire.count, actual: total });
        }
        let first = out.counts.iter().position(|n| *n > 0);
        let last = out.counts.iter().rposition(|n| *n > 0);
        if let (Some(first), Some(last)) = (first, last) {
            let (low, high) = (lower_bound(first), upper_bound(last));
            let (min, max) = (wire.min, wire.max);
            let in_first = (low..=upper_bound(first)).contains(&min);
            let in_last = (lower_bound(last)..=high).contains(&max);
            if min > max || !in_first || !in_last {
                return Err(HistogramError::BadRange { min, max, low, high });
            }
            let (floor, ceiling) = (min.saturating_mul(total), max.saturating_mul(total));
            if wire.sum < floor || wire.sum > ceiling {
                return Err(HistogramError::BadSum { sum: wire.sum, count: total, min, max });
            }
        } else {
            // Empty: min, max and sum carry nothing; keep the canonical zeros.
            out.counts.clear();
            return Ok(out);
        }
        out.count = total;
        out.sum = wire.sum;
        out.min = wire.min;
        out.max = wire.max;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_contiguous_and_cover_u64() {
        for index in 0..BUCKETS - 1 {
            assert_eq!(upper_bound(index) + 1, lower_bound(index + 1), "index {index}");
            assert_eq!(bucket_of(lower_bound(index)), index);
            assert_eq!(bucket_of(upper_bound(index)), index);
        }
        assert_eq!(bucket_of(u64::MAX), BUCKETS - 1);
        assert_eq!(upper_bound(BUCKETS - 1), u64::MAX);
    }

    #[test]
    fn small_values_are_exact_and_large_ones_within_one_thirty_second() {
        for v in 0..32 {
            assert_eq!(lower_bound(bucket_of(v)), v);
            assert_eq!(upper_bound(bucket_of(v)), v);
        }
        for v in [33u64, 100, 1_000, 12_345, 999_999, 1 << 40] {
            let i = bucket_of(v);
            let width = upper_bound(i) - lower_bound(i) + 1;
            assert!(width * 32 <= lower_bound(i), "v {v} width {width}");
        }
    }

    #[test]
    fn quantiles_of_one_to_a_hundred() {
        let mut h = LogHistogram::new();
        for v in 1..=100 {
            h.record(v);
        }
        assert_eq!(h.count(), 100);
        assert_eq!(h.sum(), 5050);
        assert_eq!(h.quantile(0.0), Some(1));
        // Up to 63 buckets are one wide; 95 is in [94, 95], 100 in [100, 101] (clamped to max).
        assert_eq!(h.quantile(0.31), Some(31));
        assert_eq!(h.quantile(0.5), Some(50));
        assert_eq!(h.quantile(0.95), Some(95));
        assert_eq!(h.quantile(1.0), Some(100));
        assert_eq!(h.mean(), Some(50.5));
    }

    #[test]
    fn merging_equals_recording_everything_in_one() {
        let mut a = LogHistogram::new();
        let mut b = LogHistogram::new();
        let mut all = LogHistogram::new();
        for v in 0..5000u64 {
            let value = v * v % 100_003;
            if v % 3 == 0 {
                a.record(value)
            } else {
                b.record(value)
            }
            all.record(value);
        }
        let mut merged = a.clone();
        merged.merge(&b);
        assert_eq!(merged, all);
        // Averaging the two p99s is not the fleet's p99; merging is.
        assert_eq!(merged.quantile(0.99), all.quantile(0.99));
    }

    #[test]
    fn empty_histogram_has_no_quantile() {
        let h = LogHistogram::new();
        assert_eq!(h.quantile(0.5), None);
        assert_eq!(h.min(), None);
        assert_eq!(h.mean(), None);
        let mut other = LogHistogram::new();
        other.merge(&h);
        assert_eq!(other, h);
    }

    #[test]
    fn wire_round_trip() {
        let mut h = LogHistogram::new();
        for v in [0, 3, 3, 77, 1_000_000, 5] {
            h.record(v);
        }
        let wire = h.to_proto();
        assert_eq!(wire.bucket_index.len(), 5);
        assert_eq!(LogHistogram::from_proto(&wire), Ok(h));
    }

    #[test]
    fn bad_wire_histograms_are_refused() {
        let good = {
            let mut h = LogHistogram::new();
            h.record(10);
            h.record(100);
            h.to_proto()
        };
        let mut unpaired = good.clone();
        unpaired.bucket_count.pop();
        assert!(matches!(
            LogHistogram::from_proto(&unpaired),
            Err(HistogramError::Unpaired { indexes: 2, counts: 1 })
        ));
        let mut descending = good.clone();
        descending.bucket_index.reverse();
        assert!(matches!(
            LogHistogram::from_proto(&descending),
            Err(HistogramError::BadIndex { .. })
        ));
        let mut past_end = good.clone();
        past_end.bucket_index[1] = u32::MAX;
        assert!(matches!(
            LogHistogram::from_proto(&past_end),
            Err(HistogramError::BadIndex { .. })
        ));
        let mut wrong_count = good;
        wrong_count.count = 7;
        assert_eq!(
            LogHistogram::from_proto(&wrong_count),
            Err(HistogramError::CountMismatch { stated: 7, actual: 2 })
        );
    }

    #[test]
    fn min_above_max_is_refused_and_quantile_never_panics() {
        // Regression (issue 8, hole 6): this histogram from the wire made `quantile` panic in
        // `clamp` on every /api/v1/models call and analytics pass.
        let wire = proto::Histogram {
            bucket_index: vec![5],
            bucket_count: vec![1],
            count: 1,
            sum: 5,
            min: 9,
            max: 1,
        };
        assert!(matches!(
            LogHistogram::from_proto(&wire),
            Err(HistogramError::BadRange { min: 9, max: 1, .. })
        ));
        // Even an unchecked inconsistent histogram answers instead of panicking.
        let bad = LogHistogram { counts: vec![0, 1], count: 1, sum: 1, min: 9, max: 1 };
        assert!(bad.quantile(0.5).is_some());
    }

    #[test]
    fn min_max_and_sum_must_fit_the_buckets() {
        let mut h = LogHistogram::new();
        h.record(100);
        h.record(1000);
        let good = h.to_proto();
        assert_eq!(LogHistogram::from_proto(&good), Ok(h));
        let mut low_min = good.clone();
        low_min.min = 1;
        assert!(matches!(LogHistogram::from_proto(&low_min), Err(HistogramError::BadRange { .. })));
        let mut high_max = good.clone();
        high_max.max = 1 << 40;
        assert!(matches!(
            LogHistogram::from_proto(&high_max),
            Err(HistogramError::BadRange { .. })
        ));
        let mut sum = good;
        sum.sum = u64::MAX;
        assert!(matches!(LogHistogram::from_proto(&sum), Err(HistogramError::BadSum { .. })));
    }

    #[test]
    fn counts_saturate_instead_of_overflowing() {
        let mut a = LogHistogram::new();
        a.record_n(7, u64::MAX);
        let b = a.clone();
        a.merge(&b);
        a.record(7);
        assert_eq!(a.count(), u64::MAX);
        assert_eq!(a.quantile(1.0), Some(7));
        assert_eq!(a.count_at_most(u64::MAX), u64::MAX);
    }

    #[test]
    fn count_at_most_uses_bucket_tops() {
        let mut h = LogHistogram::new();
        for v in [1, 2, 40, 41, 1000] {
            h.record(v);
        }
        assert_eq!(h.count_at_most(2), 2);
        assert_eq!(h.count_at_most(upper_bound(bucket_of(41))), 4);
        assert_eq!(h.count_at_most(u64::MAX), 5);
    }
}
