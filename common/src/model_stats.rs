//! Adding up [`ModelSample`]s: per model, across versions, hosts and intervals.
//!
//! The agent sends one `ModelSample` per model version per sample, holding deltas. Readers (the
//! `flotilla models` view, SLO alerts, cost attribution) merge every sample in a window with
//! [`ModelTotals::add`] and only then read rates and percentiles, so a fleet-wide p99 is the p99
//! of every request, never an average of hosts' p99s.

use crate::histogram::{HistogramError, LogHistogram};
use crate::proto::ModelSample;

/// Everything one model did over a window, merged from any number of samples.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ModelTotals {
    /// Requests received, admitted or not.
    pub requests: u64,
    /// Requests that got an answer.
    pub successes: u64,
    /// Admitted requests the runner failed.
    pub failures: u64,
    /// Requests refused at admission.
    pub rejected: u64,
    /// Requests whose deadline passed before compute.
    pub expired: u64,
    /// Batch rows computed.
    pub inferences: u64,
    /// Batches dispatched.
    pub batches: u64,
    /// Total capacity of the dispatched batches.
    pub batch_slots: u64,
    /// End-to-end latency of successful requests, microseconds.
    pub latency_us: LogHistogram,
    /// Queue wait, microseconds.
    pub queue_us: LogHistogram,
    /// Runner time per batch, microseconds.
    pub compute_us: LogHistogram,
    /// Rows per batch.
    pub batch_size: LogHistogram,
}

impl ModelTotals {
    /// Adds one sample. A sample whose histograms are malformed is refused whole, so totals
    /// never mix a counted request with a missing latency.
    pub fn add(&mut self, sample: &ModelSample) -> Result<(), HistogramError> {
        let read = |h: &Option<crate::proto::Histogram>| match h {
            Some(h) => LogHistogram::from_proto(h),
            None => Ok(LogHistogram::new()),
        };
        self.merge(&Self {
            requests: sample.requests,
            successes: sample.successes,
            failures: sample.failures,
            rejected: sample.rejected,
            expired: sample.expired,
            inferences: sample.inferences,
            batches: sample.batches,
            batch_slots: sample.batch_slots,
            latency_us: read(&sample.latency_us)?,
            queue_us: read(&sample.queue_us)?,
            compute_us: read(&sample.compute_us)?,
            batch_size: read(&sample.batch_size)?,
        });
        Ok(())
    }

    /// Adds another window's totals.
    pub fn merge(&mut self, other: &Self) {
        // Counters come from the wire: saturate rather than overflow (a panic in debug builds,
        // a silent wrap in release).
        self.requests = self.requests.saturating_add(other.requests);
        self.successes = self.successes.saturating_add(other.successes);
        self.failures = self.failures.saturating_add(other.failures);
        self.rejected = self.rejected.saturating_add(other.rejected);
        self.expired = self.expired.saturating_add(other.expired);
        self.inferences = self.inferences.saturating_add(other.inferences);
        self.batches = self.batches.saturating_add(other.batches);
        self.batch_slots = self.batch_slots.saturating_add(other.batch_slots);
        self.latency_us.merge(&other.latency_us);
        self.queue_us.merge(&other.queue_us);
        self.compute_us.merge(&other.compute_us);
        self.batch_size.merge(&other.batch_size);
    }

    /// These totals as one `ModelSample` (histograms in their wire form), for storing a rollup;
    /// [`ModelTotals::add`] reads it back exactly.
    pub fn to_sample(&self, model: &str) -> ModelSample {
        ModelSample {
            model: model.to_owned(),
            requests: self.requests,
            successes: self.successes,
            failures: self.failures,
            rejected: self.rejected,
            expired: self.expired,
            inferences: self.inferences,
            batches: self.batches,
            batch_slots: self.batch_slots,
            latency_us: Some(self.latency_us.to_proto()),
            queue_us: Some(self.queue_us.to_proto()),
            compute_us: Some(self.compute_us.to_proto()),
            batch_size: Some(self.batch_size.to_proto()),
            ..ModelSample::default()
        }
    }

    /// Rows computed per dispatched slot, 0..=1; `None` before the first batch.
    pub fn batch_utilization(&self) -> Option<f64> {
        (self.batch_slots > 0).then(|| self.inferences as f64 / self.batch_slots as f64)
    }

    /// Latency quantile in milliseconds.
    pub fn latency_ms(&self, q: f64) -> Option<f64> {
        self.latency_us.quantile(q).map(|us| us as f64 / 1000.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn totals_survive_the_round_trip_through_a_sample() {
        let mut t = ModelTotals::default();
        t.add(&sample(5, &[1_000, 2_000, 90_000])).unwrap();
        t.add(&sample(2, &[3_000])).unwrap();
        let mut back = ModelTotals::default();
        back.add(&t.to_sample("m")).unwrap();
        assert_eq!(back, t);
    }

    fn sample(requests: u64, latencies_us: &[u64]) -> ModelSample {
        let mut h = LogHistogram::new();
        for l in latencies_us {
            h.record(*l);
        }
        ModelSample {
            model: "m".into(),
            version: "1".into(),
            interval_ms: 1000,
            requests,
            successes: latencies_us.len() as u64,
            inferences: latencies_us.len() as u64,
            batches: 1,
            batch_slots: 8,
            latency_us: Some(h.to_proto()),
            ..ModelSample::default()
        }
    }

    #[test]
    fn fleet_percentile_comes_from_merged_histograms() {
        // Host A: 99 fast requests; host B: one request at 10 ms. The merged p99 is fast, while
        // averaging the two hosts' p99s would say 5 ms.
        let mut totals = ModelTotals::default();
        totals.add(&sample(99, &[1000; 99])).expect("valid");
        totals.add(&sample(1, &[10_000])).expect("valid");
        assert_eq!(totals.requests, 100);
        let p99 = totals.latency_ms(0.99).expect("recorded");
        assert!((p99 - 1.0).abs() < 1.0 / 32.0, "p99 {p99} ms is within a bucket of 1 ms");
        assert_eq!(totals.latency_ms(1.0), Some(10.0));
        assert_eq!(totals.batch_utilization(), Some(100.0 / 16.0));
    }

    #[test]
    fn wire_counters_saturate() {
        // Regression (issue 8, hole 6): two samples claiming u64::MAX requests overflowed.
        let mut huge = sample(u64::MAX, &[1]);
        huge.batch_slots = u64::MAX;
        let mut totals = ModelTotals::default();
        totals.add(&huge).expect("valid");
        totals.add(&huge).expect("valid");
        assert_eq!(totals.requests, u64::MAX);
        assert_eq!(totals.batch_slots, u64::MAX);
    }

    #[test]
    fn malformed_sample_is_refused_whole() {
        let mut bad = sample(5, &[1, 2]);
        if let Some(h) = bad.latency_us.as_mut() {
            h.count = 9;
        }
        let mut totals = ModelTotals::default();
        assert!(totals.add(&bad).is_err());
        assert_eq!(totals, ModelTotals::default());
    }
}
