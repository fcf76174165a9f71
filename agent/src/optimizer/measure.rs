//! Timing a candidate: batches of one size run back to back on the calling thread, with pauses
//! that hold the search to its share of a core so live traffic keeps the rest. The same pause
//! ([`Effort::pause_after`]) follows every other piece of the search's own work: each load and
//! each calibration run.

use std::time::{Duration, Instant};

use serde::Serialize;

use crate::serving::runner::Engine;
use crate::serving::tensor::Tensor;

/// How long and how hard one batch size is timed.
#[derive(Debug, Clone, PartialEq)]
pub struct Effort {
    /// Timed runs per batch size (after one untimed warm-up run).
    pub rounds: usize,
    /// Stop a batch size's runs after this long even if fewer rounds ran.
    pub max_time: Duration,
    /// Share of one core the search may use, in (0, 1]: after a run of `d` it pauses
    /// `d x (1 / share - 1)`.
    pub cpu_share: f64,
}

impl Effort {
    /// After work that took `took`, sleeps long enough that the work is `cpu_share` of the
    /// time (nothing at a share of 1).
    pub fn pause_after(&self, took: Duration) {
        let share = self.cpu_share.clamp(0.01, 1.0);
        if share < 1.0 {
            std::thread::sleep(took.mul_f64(1.0 / share - 1.0));
        }
    }
}

impl Default for Effort {
    fn default() -> Self {
        Self { rounds: 30, max_time: Duration::from_secs(3), cpu_share: 0.5 }
    }
}

/// One batch size's figures.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Timing {
    /// Rows per batch.
    pub batch: usize,
    /// Runs timed.
    pub runs: usize,
    /// Latency of one batch, ms.
    pub p50_ms: f64,
    /// 95th percentile, ms.
    pub p95_ms: f64,
    /// 99th percentile, ms.
    pub p99_ms: f64,
    /// Rows per second at the median.
    pub rows_per_s: f64,
}

/// Times `engine` on `inputs` (one batch of `batch` rows): a warm-up run (plans, sessions),
/// then up to `effort.rounds` timed runs, pausing between them to keep to the CPU share.
pub fn time_batch(
    engine: &dyn Engine,
    inputs: &[Tensor],
    batch: usize,
    effort: &Effort,
) -> Result<Timing, String> {
    let warm = Instant::now();
    engine.run(inputs.to_vec()).map_err(|e| format!("batch of {batch}: {e}"))?;
    effort.pause_after(warm.elapsed());
    let started = Instant::now();
    let mut times = Vec::with_capacity(effort.rounds);
    while times.len() < effort.rounds.max(1)
        && (times.is_empty() || started.elapsed() < effort.max_time)
    {
        let t = Instant::now();
        engine.run(inputs.to_vec()).map_err(|e| format!("batch of {batch}: {e}"))?;
        let took = t.elapsed();
        times.push(took.as_secs_f64() * 1000.0);
        effort.pause_after(took);
    }
    times.sort_by(f64::total_cmp);
    let p50 = quantile(&times, 0.5);
    Ok(Timing {
        batch,
        runs: times.len(),
        p50_ms: p50,
        p95_ms: quantile(&times, 0.95),
        p99_ms: quantile(&times, 0.99),
        rows_per_s: if p50 > 0.0 { batch as f64 * 1000.0 / p50 } else { 0.0 },
    })
}

/// The value at `q` of sorted `values` (nearest rank).
pub fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = (q.clamp(0.0, 1.0) * sorted.len() as f64).ceil();
    // rank is in 0..=len, so the conversion is exact; clamp() guards the float rounding.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let rank = rank as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::serving::runner::RunError;

    /// Sleeps a fixed time per run.
    struct Slow(Duration);
    impl Engine for Slow {
        fn run(&self, inputs: Vec<Tensor>) -> Result<Vec<Tensor>, RunError> {
            std::thread::sleep(self.0);
            Ok(inputs)
        }
    }

    #[test]
    fn quantiles_take_the_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(quantile(&v, 0.5), 50.0);
        assert_eq!(quantile(&v, 0.99), 99.0);
        assert_eq!(quantile(&[3.0], 0.99), 3.0);
        assert_eq!(quantile(&[], 0.5), 0.0);
    }

    #[test]
    fn timing_keeps_to_the_cpu_share() {
        let engine = Slow(Duration::from_millis(2));
        let effort = Effort { rounds: 10, max_time: Duration::from_secs(10), cpu_share: 0.5 };
        let started = Instant::now();
        let t = time_batch(&engine, &[], 4, &effort).expect("runs");
        let wall = started.elapsed();
        assert_eq!(t.runs, 10);
        assert!(t.p50_ms >= 2.0, "{t:?}");
        // 11 runs of at least 2 ms, each followed by a pause as long as the run.
        assert!(wall >= Duration::from_millis(44), "{wall:?}");
        assert!((t.rows_per_s - 4000.0 / t.p50_ms).abs() < 1e-9);
    }
}
