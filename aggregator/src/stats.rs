//! Counters the aggregator keeps about itself, rendered on `/metrics` (Prometheus text format).

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

/// A monotonically increasing counter.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    /// Adds one.
    pub fn inc(&self) {
        self.add(1);
    }

    /// Adds `n`.
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    /// Current value.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Everything counted by ingest and the store.
#[derive(Debug, Default)]
pub struct Stats {
    /// Batches stored.
    pub batches_stored: Counter,
    /// Batches acknowledged as duplicates (retries).
    pub batches_duplicate: Counter,
    /// Batches that failed to store.
    pub batches_failed: Counter,
    /// Samples stored.
    pub samples_stored: Counter,
    /// Group commits (flushes).
    pub commit_groups: Counter,
    /// Connections accepted (handshake and Hello done).
    pub connections_accepted: Counter,
    /// Handshakes refused (bad, expired, revoked or foreign certificates, wrong ALPN).
    pub handshakes_refused: Counter,
    /// Connections refused before their handshake because `ingest.max_concurrent_handshakes`
    /// were already in progress.
    pub admissions_refused: Counter,
    /// Hellos refused (version mismatch, no Hello).
    pub hellos_refused: Counter,
    /// Frames refused as malformed.
    pub frames_malformed: Counter,
    /// Frames refused as too large.
    pub frames_too_large: Counter,
    /// Decoded messages refused by validation, one counter per [`REFUSAL_REASONS`] entry.
    pub refused: [Counter; REFUSAL_REASONS.len()],
}

/// Labels of `flotilla_ingest_refused_total`: the validation reasons of
/// `common::validate::Invalid::reason`, then `rate` (over the host's report rate),
/// `decoded_size` (a frame that could decode into more than the in-flight budget) and `busy`
/// (the budget stayed full too long for a frame's decoded size: retried later).
pub const REFUSAL_REASONS: [&str; 8] =
    ["histogram", "string", "list", "number", "samples", "rate", "decoded_size", "busy"];

impl Stats {
    /// Counts one refused message under `reason`; an unknown reason counts under `number`.
    pub fn refuse(&self, reason: &str) {
        let i = REFUSAL_REASONS.iter().position(|r| *r == reason).unwrap_or(3);
        if let Some(c) = self.refused.get(i) {
            c.inc();
        }
    }
}

/// A gauge value computed at scrape time.
#[derive(Debug, Clone, Copy)]
pub struct Gauges {
    /// Open agent connections.
    pub connections_open: u64,
    /// Hosts online, offline, revoked.
    pub hosts: [(&'static str, u64); 3],
}

impl Stats {
    /// Renders the counters and `gauges` in Prometheus text exposition format 0.0.4.
    pub fn render(&self, gauges: &Gauges) -> String {
        let mut out = String::with_capacity(2048);
        let mut counter = |name: &str, help: &str, rows: &[(&str, u64)]| {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} counter");
            for (labels, v) in rows {
                let _ = writeln!(out, "{name}{labels} {v}");
            }
        };
        counter(
            "flotilla_ingest_batches_total",
            "Telemetry batches received, by outcome.",
            &[
                ("{outcome=\"stored\"}", self.batches_stored.get()),
                ("{outcome=\"duplicate\"}", self.batches_duplicate.get()),
                ("{outcome=\"failed\"}", self.batches_failed.get()),
            ],
        );
        counter(
            "flotilla_ingest_samples_total",
            "Samples stored.",
            &[("", self.samples_stored.get())],
        );
        counter(
            "flotilla_store_commit_groups_total",
            "Durable group commits.",
            &[("", self.commit_groups.get())],
        );
        counter(
            "flotilla_connections_accepted_total",
            "Agent connections accepted.",
            &[("", self.connections_accepted.get())],
        );
        counter(
            "flotilla_connections_refused_total",
            "Agent connections refused, by stage.",
            &[
                ("{stage=\"admission\"}", self.admissions_refused.get()),
                ("{stage=\"handshake\"}", self.handshakes_refused.get()),
                ("{stage=\"hello\"}", self.hellos_refused.get()),
            ],
        );
        counter(
            "flotilla_frames_refused_total",
            "Frames refused, by reason.",
            &[
                ("{reason=\"malformed\"}", self.frames_malformed.get()),
                ("{reason=\"too_large\"}", self.frames_too_large.get()),
            ],
        );
        let refused: Vec<(String, u64)> = REFUSAL_REASONS
            .iter()
            .zip(&self.refused)
            .map(|(r, c)| (format!("{{reason=\"{r}\"}}"), c.get()))
            .collect();
        let rows: Vec<(&str, u64)> = refused.iter().map(|(l, v)| (l.as_str(), *v)).collect();
        counter(
            "flotilla_ingest_refused_total",
            "Decoded Hellos and batches refused by validation or limits, by reason.",
            &rows,
        );
        let _ = writeln!(out, "# HELP flotilla_connections_open Agent connections open now.");
        let _ = writeln!(out, "# TYPE flotilla_connections_open gauge");
        let _ = writeln!(out, "flotilla_connections_open {}", gauges.connections_open);
        let _ = writeln!(out, "# HELP flotilla_hosts Known hosts, by state.");
        let _ = writeln!(out, "# TYPE flotilla_hosts gauge");
        for (state, n) in gauges.hosts {
            let _ = writeln!(out, "flotilla_hosts{{state=\"{state}\"}} {n}");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_text() {
        let s = Stats::default();
        s.batches_stored.add(3);
        let text = s.render(&Gauges {
            connections_open: 2,
            hosts: [("online", 2), ("offline", 1), ("revoked", 0)],
        });
        assert!(text.contains("# TYPE flotilla_ingest_batches_total counter\n"));
        assert!(text.contains("flotilla_ingest_batches_total{outcome=\"stored\"} 3\n"));
        assert!(text.contains("flotilla_connections_open 2\n"));
        for reason in common::validate::Invalid::REASONS {
            assert!(REFUSAL_REASONS.contains(&reason), "{reason} has a label");
        }
        s.refuse("histogram");
        let refused = s.render(&Gauges { connections_open: 0, hosts: [("online", 0); 3] });
        assert!(refused.contains("flotilla_ingest_refused_total{reason=\"histogram\"} 1\n"));
        assert!(text.contains("flotilla_hosts{state=\"offline\"} 1\n"));
        // Every sample line is `name{labels} value`.
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let (name, value) = line.rsplit_once(' ').unwrap();
            assert!(name.starts_with("flotilla_"), "{line}");
            value.parse::<f64>().unwrap();
        }
    }
}
