//! Per model-version serving statistics: counters and mergeable histograms, kept twice, as
//! running totals (for `/metrics` and Triton's statistics extension) and as deltas since the last
//! telemetry sample (taken by the sampler into a `ModelSample`).

use std::fmt::Write as _;
use std::sync::Mutex;
use std::time::Duration;

use common::histogram::{LogHistogram, bucket_of, upper_bound};
use common::proto::ModelSample;

use super::batcher::Reason;

/// How a request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Admitted, then failed in the engine.
    Failure,
    /// Refused at admission (queue full, bad input, not ready).
    Rejected,
    /// Its deadline passed before compute.
    Expired,
}

#[derive(Debug, Clone, Default)]
struct Counters {
    requests: u64,
    successes: u64,
    failures: u64,
    rejected: u64,
    expired: u64,
    inferences: u64,
    batches: u64,
    batch_slots: u64,
    latency_us: LogHistogram,
    queue_us: LogHistogram,
    compute_us: LogHistogram,
    batch_size: LogHistogram,
    reasons: [u64; Reason::ALL.len()],
}

/// The runtime settings of a version, shown beside its counters: `/metrics` gauges, the stats
/// JSON and telemetry samples.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Settings {
    /// Instances running batches in parallel.
    pub instances: usize,
    /// Rows per batch the batcher forms now; 0 when the model cannot batch.
    pub max_batch_size: usize,
    /// Queue delay in force, microseconds.
    pub max_queue_delay_us: u64,
    /// Whether the adaptive controller tunes the two above.
    pub adaptive: bool,
    /// The controller's lower bound.
    pub adaptive_min_batch_size: usize,
    /// The controller's upper bound.
    pub adaptive_max_batch_size: usize,
    /// The controller's delay bound, microseconds.
    pub adaptive_max_queue_delay_us: u64,
    /// p95 latency objective, milliseconds; 0 for none.
    pub latency_slo_ms: u64,
    /// Whether the version is draining.
    pub draining: bool,
}

/// Count and summed time of one compute phase.
#[derive(Debug, Clone, Copy, Default)]
struct Phase {
    count: u64,
    ns: u64,
}

impl Phase {
    fn add(&mut self, count: u64, each: Duration) {
        let ns = u64::try_from(each.as_nanos()).unwrap_or(u64::MAX);
        self.count = self.count.saturating_add(count);
        self.ns = self.ns.saturating_add(ns.saturating_mul(count));
    }

    fn json(self) -> serde_json::Value {
        serde_json::json!({"count": self.count, "ns": self.ns})
    }
}

/// The time of one batch in its three phases, as Triton splits compute.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BatchTimes {
    /// Gathering the requests' inputs into the batch's tensors.
    pub input: Duration,
    /// The engine's run.
    pub infer: Duration,
    /// Splitting the outputs into each request's rows and handing them over.
    pub output: Duration,
}

/// Triton's compute statistics: per request (each request of a batch is charged the batch's
/// times, as Triton does) and per batch size (counted once per batch).
#[derive(Debug, Clone, Default)]
struct TritonCompute {
    input: Phase,
    infer: Phase,
    output: Phase,
    /// By batch size (rows); at most the model's largest batch size entries.
    by_batch_size: std::collections::BTreeMap<usize, [Phase; 3]>,
}

#[derive(Debug, Default)]
struct Both {
    total: Counters,
    triton: TritonCompute,
    delta: Counters,
    last_inference_unix_ms: u64,
    settings: Settings,
    /// The settings changed since the last telemetry sample.
    settings_changed: bool,
}

/// The statistics of one model version.
#[derive(Debug)]
pub struct ModelStats {
    model: String,
    version: String,
    inner: Mutex<Both>,
}

fn us(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

fn narrow32(v: u64) -> u32 {
    u32::try_from(v).unwrap_or(u32::MAX)
}

fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

impl ModelStats {
    /// Empty statistics.
    pub fn new(model: &str, version: &str) -> Self {
        Self { model: model.to_owned(), version: version.to_owned(), inner: Mutex::default() }
    }

    fn with(&self, f: impl Fn(&mut Counters)) {
        let mut guard = match self.inner.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        f(&mut guard.total);
        f(&mut guard.delta);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Both> {
        self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Replaces the settings shown.
    pub fn set_settings(&self, settings: Settings) {
        self.update_settings(|s| *s = settings);
    }

    /// Changes the settings shown.
    pub fn update_settings(&self, change: impl FnOnce(&mut Settings)) {
        let mut g = self.lock();
        let before = g.settings;
        change(&mut g.settings);
        if g.settings != before {
            g.settings_changed = true;
        }
    }

    /// The settings shown.
    pub fn settings(&self) -> Settings {
        self.lock().settings
    }

    /// Counts a request that ended without an answer (successes go through
    /// [`Self::request_succeeded`], which also records their times).
    pub fn request_ended(&self, outcome: Outcome) {
        self.with(|c| {
            c.requests += 1;
            match outcome {
                Outcome::Failure => c.failures += 1,
                Outcome::Rejected => c.rejected += 1,
                Outcome::Expired => c.expired += 1,
            }
        });
    }

    /// Counts a successful request with its latency and queue time.
    pub fn request_succeeded(&self, latency: Duration, queued: Duration) {
        self.with(|c| {
            c.requests += 1;
            c.successes += 1;
            c.latency_us.record(us(latency));
            c.queue_us.record(us(queued));
        });
    }

    /// Counts one dispatched batch.
    pub fn batch_ran(&self, rows: usize, slots: usize, compute: Duration, reason: Reason) {
        let rows = rows as u64;
        self.with(|c| {
            c.batches += 1;
            c.inferences += rows;
            c.batch_slots += slots as u64;
            c.compute_us.record(us(compute));
            c.batch_size.record(rows);
            if let Some(i) = Reason::ALL.iter().position(|r| *r == reason) {
                c.reasons[i] += 1;
            }
        });
        if let Ok(mut g) = self.inner.lock() {
            g.last_inference_unix_ms = now_unix_ms();
        }
    }

    /// Records the phases of a batch whose `requests` requests were answered, for Triton's
    /// statistics.
    pub fn batch_computed(&self, requests: usize, rows: usize, times: BatchTimes) {
        let mut g = self.lock();
        let t = &mut g.triton;
        let n = requests as u64;
        t.input.add(n, times.input);
        t.infer.add(n, times.infer);
        t.output.add(n, times.output);
        let by_size = t.by_batch_size.entry(rows).or_default();
        by_size[0].add(1, times.input);
        by_size[1].add(1, times.infer);
        by_size[2].add(1, times.output);
    }

    /// The deltas since the last call, as a telemetry record (None when nothing happened).
    pub fn take_sample(&self, interval: Duration) -> Option<ModelSample> {
        let mut guard = match self.inner.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        let d = std::mem::take(&mut guard.delta);
        let changed = std::mem::take(&mut guard.settings_changed);
        let settings = guard.settings;
        drop(guard);
        if d.requests == 0 && d.batches == 0 && !changed {
            return None;
        }
        Some(ModelSample {
            model: self.model.clone(),
            version: self.version.clone(),
            interval_ms: u32::try_from(interval.as_millis()).unwrap_or(u32::MAX),
            requests: d.requests,
            successes: d.successes,
            failures: d.failures,
            rejected: d.rejected,
            expired: d.expired,
            inferences: d.inferences,
            batches: d.batches,
            batch_slots: d.batch_slots,
            latency_us: Some(d.latency_us.to_proto()),
            queue_us: Some(d.queue_us.to_proto()),
            compute_us: Some(d.compute_us.to_proto()),
            batch_size: Some(d.batch_size.to_proto()),
            instances: narrow32(settings.instances as u64),
            max_batch_size: narrow32(settings.max_batch_size as u64),
            max_queue_delay_us: settings.max_queue_delay_us,
            adaptive: settings.adaptive,
            draining: settings.draining,
        })
    }

    /// Triton's statistics-extension entry for this version.
    pub fn triton_json(&self) -> serde_json::Value {
        let g = match self.inner.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        let t = &g.total;
        let ns = |h: &LogHistogram| h.sum().saturating_mul(1000);
        let c = &g.triton;
        let batch_stats: Vec<serde_json::Value> = c
            .by_batch_size
            .iter()
            .map(|(size, [input, infer, output])| {
                serde_json::json!({
                    "batch_size": size,
                    "compute_input": input.json(),
                    "compute_infer": infer.json(),
                    "compute_output": output.json(),
                })
            })
            .collect();
        serde_json::json!({
            "name": self.model,
            "version": self.version,
            "last_inference": g.last_inference_unix_ms,
            "inference_count": t.inferences,
            "execution_count": t.batches,
            "inference_stats": {
                "success": {"count": t.successes, "ns": ns(&t.latency_us)},
                "fail": {"count": t.failures + t.rejected + t.expired, "ns": 0},
                "queue": {"count": t.queue_us.count(), "ns": ns(&t.queue_us)},
                "compute_input": c.input.json(),
                "compute_infer": c.infer.json(),
                "compute_output": c.output.json(),
                "cache_hit": {"count": 0, "ns": 0},
                "cache_miss": {"count": 0, "ns": 0},
            },
            "batch_stats": batch_stats,
            "flotilla": {
                "requests": t.requests,
                "rejected": t.rejected,
                "expired": t.expired,
                "batch_slots": t.batch_slots,
                "instances": g.settings.instances,
                "draining": g.settings.draining,
                "batching": {
                    "max_batch_size": g.settings.max_batch_size,
                    "max_queue_delay_us": g.settings.max_queue_delay_us,
                    "adaptive": g.settings.adaptive,
                    "adaptive_min_batch_size": g.settings.adaptive_min_batch_size,
                    "adaptive_max_batch_size": g.settings.adaptive_max_batch_size,
                    "adaptive_max_queue_delay_us": g.settings.adaptive_max_queue_delay_us,
                    "latency_slo_ms": g.settings.latency_slo_ms,
                },
                "dispatch_reasons": Reason::ALL.iter().zip(t.reasons).map(|(r, n)| (r.label().to_owned(), serde_json::Value::from(n))).collect::<serde_json::Map<_, _>>(),
            },
        })
    }
}

/// Latency bucket tops for `/metrics`, microseconds: exact bucket boundaries near round numbers
/// from 50 µs to 30 s.
fn latency_bounds_us() -> Vec<u64> {
    [50u64, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000]
        .into_iter()
        .chain([1_000_000, 2_500_000, 5_000_000, 10_000_000, 30_000_000])
        .map(|v| upper_bound(bucket_of(v)))
        .collect()
}

/// One family's HELP and TYPE lines.
fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// Renders every model's totals in the Prometheus text format.
pub fn render_prometheus(all: &[std::sync::Arc<ModelStats>]) -> String {
    let snapshots: Vec<(String, Counters, Settings)> = all
        .iter()
        .map(|s| {
            let g = s.lock();
            (
                format!("model=\"{}\",version=\"{}\"", escape(&s.model), escape(&s.version)),
                g.total.clone(),
                g.settings,
            )
        })
        .collect();
    let mut out = String::new();
    // Values are f64 so durations can be in seconds (Prometheus base units).
    type Gauge = fn(&Settings) -> f64;
    let gauges: [(&str, &str, Gauge); 8] = [
        ("flotilla_model_instances", "Instances running batches in parallel.", |s| {
            s.instances as f64
        }),
        (
            "flotilla_model_max_batch_size",
            "Rows per batch the batcher forms now (0: the model cannot batch).",
            |s| s.max_batch_size as f64,
        ),
        (
            "flotilla_model_max_queue_delay_seconds",
            "Longest the oldest request waits for company now, seconds.",
            |s| s.max_queue_delay_us as f64 / 1e6,
        ),
        ("flotilla_model_adaptive", "1 when adaptive batching tunes the two above.", |s| {
            f64::from(u8::from(s.adaptive))
        }),
        (
            "flotilla_model_adaptive_min_batch_size",
            "Smallest batch size adaptive batching uses.",
            |s| s.adaptive_min_batch_size as f64,
        ),
        (
            "flotilla_model_adaptive_max_batch_size",
            "Largest batch size adaptive batching uses.",
            |s| s.adaptive_max_batch_size as f64,
        ),
        (
            "flotilla_model_latency_slo_seconds",
            "The p95 latency objective adaptive batching keeps, seconds (0: none).",
            |s| s.latency_slo_ms as f64 / 1e3,
        ),
        ("flotilla_model_draining", "1 while the version takes no new requests.", |s| {
            f64::from(u8::from(s.draining))
        }),
    ];
    for (name, help, get) in gauges {
        header(&mut out, name, "gauge", help);
        for (labels, _, s) in &snapshots {
            let _ = writeln!(out, "{name}{{{labels}}} {}", get(s));
        }
    }
    type Get = fn(&Counters) -> u64;
    let counters: [(&str, &str, Get); 8] = [
        ("flotilla_model_requests_total", "Requests received, admitted or not.", |c| c.requests),
        ("flotilla_model_successes_total", "Requests answered.", |c| c.successes),
        ("flotilla_model_failures_total", "Admitted requests the engine failed.", |c| c.failures),
        ("flotilla_model_rejected_total", "Requests refused at admission.", |c| c.rejected),
        ("flotilla_model_expired_total", "Requests whose deadline passed before compute.", |c| {
            c.expired
        }),
        ("flotilla_model_inferences_total", "Batch rows computed.", |c| c.inferences),
        ("flotilla_model_batches_total", "Batches dispatched.", |c| c.batches),
        (
            "flotilla_model_batch_slots_total",
            "Capacity of dispatched batches (max batch size each).",
            |c| c.batch_slots,
        ),
    ];
    for (name, help, get) in counters {
        header(&mut out, name, "counter", help);
        for (labels, c, _) in &snapshots {
            let _ = writeln!(out, "{name}{{{labels}}} {}", get(c));
        }
    }
    let name = "flotilla_model_dispatches_total";
    header(&mut out, name, "counter", "Batches dispatched, by the reason they went.");
    for (labels, c, _) in &snapshots {
        for (reason, n) in Reason::ALL.iter().zip(c.reasons) {
            let _ = writeln!(out, "{name}{{{labels},reason=\"{}\"}} {n}", reason.label());
        }
    }
    let latency = latency_bounds_us();
    type Hist = fn(&Counters) -> &LogHistogram;
    let seconds: [(&str, &str, Hist); 3] = [
        ("flotilla_model_latency_seconds", "End-to-end latency of successful requests.", |c| {
            &c.latency_us
        }),
        ("flotilla_model_queue_seconds", "Time requests waited in the batcher queue.", |c| {
            &c.queue_us
        }),
        ("flotilla_model_compute_seconds", "Engine time per batch.", |c| &c.compute_us),
    ];
    for (name, help, get) in seconds {
        header(&mut out, name, "histogram", help);
        for (labels, c, _) in &snapshots {
            histogram(&mut out, name, labels, get(c), &latency, 1e-6);
        }
    }
    let sizes: Vec<u64> = (0..13).map(|k| 1u64 << k).collect();
    let name = "flotilla_model_batch_size";
    header(&mut out, name, "histogram", "Rows per dispatched batch.");
    for (labels, c, _) in &snapshots {
        histogram(&mut out, name, labels, &c.batch_size, &sizes, 1.0);
    }
    out
}

fn histogram(
    out: &mut String,
    name: &str,
    labels: &str,
    h: &LogHistogram,
    bounds: &[u64],
    scale: f64,
) {
    for b in bounds {
        let le = *b as f64 * scale;
        let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{le}\"}} {}", h.count_at_most(*b));
    }
    let _ = writeln!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {}", h.count());
    let _ = writeln!(out, "{name}_sum{{{labels}}} {}", h.sum() as f64 * scale);
    let _ = writeln!(out, "{name}_count{{{labels}}} {}", h.count());
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn totals_and_deltas() {
        let s = ModelStats::new("m", "1");
        s.request_succeeded(Duration::from_millis(2), Duration::from_micros(300));
        s.request_ended(Outcome::Rejected);
        s.batch_ran(3, 8, Duration::from_millis(1), Reason::Delay);
        let d = s.take_sample(Duration::from_secs(1)).expect("activity");
        assert_eq!(
            (d.requests, d.successes, d.rejected, d.inferences, d.batch_slots),
            (2, 1, 1, 3, 8)
        );
        assert!(s.take_sample(Duration::from_secs(1)).is_none(), "deltas reset");
        s.request_ended(Outcome::Expired);
        let d = s.take_sample(Duration::from_secs(1)).expect("activity");
        assert_eq!((d.requests, d.expired), (1, 1));
        let text = render_prometheus(&[Arc::new(s)]);
        assert!(
            text.contains("flotilla_model_requests_total{model=\"m\",version=\"1\"} 3"),
            "{text}"
        );
        assert!(
            text.contains(
                "flotilla_model_dispatches_total{model=\"m\",version=\"1\",reason=\"delay\"} 1"
            ),
            "{text}"
        );
        assert!(
            text.contains("flotilla_model_batch_size_bucket{model=\"m\",version=\"1\",le=\"2\"} 0"),
            "{text}"
        );
        assert!(
            text.contains("flotilla_model_batch_size_bucket{model=\"m\",version=\"1\",le=\"4\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("flotilla_model_latency_seconds_count{model=\"m\",version=\"1\"} 1"),
            "{text}"
        );
    }
}
