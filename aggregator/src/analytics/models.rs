//! The fleet-wide model view (`flotilla models`, `GET /api/v1/models`): per model, the hosts
//! serving it, rates, outcomes, latency percentiles, queue wait and batch utilization over a
//! window, from each host's model totals ([`crate::store::TelemetryStore::model_totals`]: model
//! rollups for whole hours and minutes, raw samples for the rest) merged across hosts.
//!
//! Percentiles come from the merged histograms of every request on every host, never from an
//! average of per-host percentiles (a host serving 1 % of traffic cannot drag the fleet's p99
//! to its own).

use std::collections::BTreeMap;

use common::model_stats::ModelTotals;

use crate::store::ModelRollup;
use serde::{Deserialize, Serialize};

/// One model over a window.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelView {
    /// Model name (all versions).
    pub model: String,
    /// Hosts that reported it in the window.
    pub hosts: Vec<String>,
    /// Window, seconds.
    pub window_secs: u64,
    /// Requests per second over the window.
    pub requests_per_s: f64,
    /// Requests received.
    pub requests: u64,
    /// Answered.
    pub successes: u64,
    /// Failed in the runner.
    pub failures: u64,
    /// Refused at admission.
    pub rejected: u64,
    /// Deadline passed before compute.
    pub expired: u64,
    /// Inferences computed.
    pub inferences: u64,
    /// Latency p50, ms.
    pub latency_p50_ms: Option<f64>,
    /// Latency p95, ms.
    pub latency_p95_ms: Option<f64>,
    /// Latency p99, ms.
    pub latency_p99_ms: Option<f64>,
    /// Queue wait p95, ms.
    pub queue_p95_ms: Option<f64>,
    /// Rows computed per batch slot, %.
    pub batch_utilization_pct: Option<f64>,
    /// Samples whose histograms were malformed and skipped.
    pub malformed_samples: u64,
}

/// Summarizes each model over `(host, per-model totals)` of a `window_secs` window.
pub fn summarize(per_host: &[(String, ModelRollup)], window_secs: u64) -> Vec<ModelView> {
    let mut totals: BTreeMap<&str, (ModelTotals, Vec<String>, u64)> = BTreeMap::new();
    for (host, models) in per_host {
        for (model, w) in models {
            let e = totals.entry(model.as_str()).or_default();
            e.0.merge(&w.totals);
            e.2 += w.malformed;
            // Each host once per model: the totals are per host already.
            e.1.push(host.clone());
        }
    }
    totals
        .into_iter()
        .map(|(model, (t, hosts, malformed))| ModelView {
            model: model.to_owned(),
            hosts,
            window_secs,
            requests_per_s: t.requests as f64 / window_secs.max(1) as f64,
            requests: t.requests,
            successes: t.successes,
            failures: t.failures,
            rejected: t.rejected,
            expired: t.expired,
            inferences: t.inferences,
            latency_p50_ms: t.latency_ms(0.5),
            latency_p95_ms: t.latency_ms(0.95),
            latency_p99_ms: t.latency_ms(0.99),
            queue_p95_ms: t.queue_us.quantile(0.95).map(|us| us as f64 / 1000.0),
            batch_utilization_pct: t.batch_utilization().map(|u| u * 100.0),
            malformed_samples: malformed,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use common::histogram::LogHistogram;
    use common::proto::{ModelSample, Sample};

    fn totals(samples: &[Sample]) -> ModelRollup {
        let mut out = ModelRollup::new();
        for s in samples {
            crate::store::add_models(&mut out, s);
        }
        out
    }

    fn sample(requests: u64, latency: &[(u64, u64)]) -> Sample {
        let mut h = LogHistogram::new();
        for (v, n) in latency {
            h.record_n(*v, *n);
        }
        let mut q = LogHistogram::new();
        q.record_n(500, requests);
        Sample {
            models: vec![ModelSample {
                model: "resnet".into(),
                version: "1".into(),
                interval_ms: 1000,
                requests,
                successes: h.count(),
                inferences: h.count(),
                batches: 1,
                batch_slots: 2 * h.count(),
                latency_us: Some(h.to_proto()),
                queue_us: Some(q.to_proto()),
                ..ModelSample::default()
            }],
            ..Sample::default()
        }
    }

    #[test]
    fn merged_p99_differs_from_the_mean_of_host_p99s() {
        // Host a: 990 requests at 2 ms, 10 at 100 ms (its p99 is 2 ms: the 990th of 1000).
        // Host b: 10 requests at 50 ms (its p99 is 50 ms). Averaging p99s says 26 ms; over all
        // 1010 requests sorted, the 1000th (ceil(0.99 * 1010)) is the last of b's: 50 ms.
        let per_host = vec![
            ("a".to_owned(), totals(&[sample(1000, &[(2_000, 990), (100_000, 10)])])),
            ("b".to_owned(), totals(&[sample(10, &[(50_000, 10)])])),
        ];
        let v = &summarize(&per_host, 10)[0];
        assert_eq!(v.model, "resnet");
        assert_eq!(v.hosts, vec!["a", "b"]);
        assert_eq!(v.requests, 1010);
        assert_eq!(v.requests_per_s, 101.0);
        let p99 = v.latency_p99_ms.unwrap();
        assert!((p99 - 50.0).abs() <= 50.0 / 32.0, "merged p99 {p99}");
        let mean_of_p99s = (2.0 + 50.0) / 2.0;
        assert!((p99 - mean_of_p99s).abs() > 20.0);
        let p50 = v.latency_p50_ms.unwrap();
        assert!((p50 - 2.0).abs() <= 2.0 / 32.0, "{p50}");
        assert_eq!(v.batch_utilization_pct, Some(50.0));
        assert!((v.queue_p95_ms.unwrap() - 0.5).abs() <= 0.5 / 32.0);
    }
}
