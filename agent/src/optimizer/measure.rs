//! Timing a candidate: batches of one size run back to back on the calling thread, with pauses
//! that hold the search to its share of a core so live traffic keeps the rest. The same pause
//! ([`Effort::pause_after`]) follows every other piece of the search's own work: each load and
//! each calibration run. [`time_instances`] runs several instances' batches at once, in rounds
//! that start together, to see what more instances buy on this host.

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

/// Runs `engine` on `inputs`; a panic in the engine (tract panics on some inputs a graph does
/// not support) is an error like any other, so it fails the candidate, not the search.
pub fn run_guarded(engine: &dyn Engine, inputs: &[Tensor]) -> Result<Vec<Tensor>, String> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| engine.run(inputs.to_vec()))) {
        Ok(Ok(out)) => Ok(out),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("the engine panicked".to_owned()),
    }
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
    run_guarded(engine, inputs).map_err(|e| format!("batch of {batch}: {e}"))?;
    effort.pause_after(warm.elapsed());
    let started = Instant::now();
    let mut times = Vec::with_capacity(effort.rounds);
    while times.len() < effort.rounds.max(1)
        && (times.is_empty() || started.elapsed() < effort.max_time)
    {
        let t = Instant::now();
        run_guarded(engine, inputs).map_err(|e| format!("batch of {batch}: {e}"))?;
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

/// One instance count's figures: every instance runs a batch at the same moment, round after
/// round.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct InstanceTiming {
    /// Instances running at once.
    pub instances: usize,
    /// Rows per batch.
    pub batch: usize,
    /// Rounds timed (each runs one batch per instance).
    pub rounds: usize,
    /// Latency of one batch among the others, ms.
    pub p50_ms: f64,
    /// 99th percentile, ms.
    pub p99_ms: f64,
    /// Rows per second at the median round (instances x batch per round).
    pub rows_per_s: f64,
}

impl std::fmt::Display for InstanceTiming {
    /// `2 -> 1054.5 rows/s (p99 14.983 ms)`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} -> {:.1} rows/s (p99 {:.3} ms)", self.instances, self.rows_per_s, self.p99_ms)
    }
}

/// Times `instances` threads each running `engine` on `inputs` (one batch of `batch` rows) at
/// the same moment: a warm-up round, then up to `effort.rounds` rounds. A round lasts as long
/// as its slowest batch; after it the search pauses long enough that the CPU it used (up to
/// `instances` cores for the round) is `cpu_share` of one core over time. A batch that fails
/// or panics ends every thread at the next round and is the error.
pub fn time_instances(
    engine: &dyn Engine,
    inputs: &[Tensor],
    batch: usize,
    instances: usize,
    effort: &Effort,
) -> Result<InstanceTiming, String> {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Barrier, Mutex};

    let instances = instances.max(1);
    let rounds = effort.rounds.max(1);
    let start = Barrier::new(instances);
    let end = Barrier::new(instances);
    let stop = AtomicBool::new(false);
    let error: Mutex<Option<String>> = Mutex::new(None);
    // The round's slowest batch so far, ms (reset by the leader after each round).
    let slowest: Mutex<f64> = Mutex::new(0.0);
    let started = Instant::now();
    let run_one = || -> Result<Duration, String> {
        let t = Instant::now();
        run_guarded(engine, inputs)
            .map(|_| t.elapsed())
            .map_err(|e| format!("{instances} instances, batch of {batch}: {e}"))
    };
    // Per thread, per round (the warm-up round is not kept).
    let per_thread: Vec<Vec<f64>> = std::thread::scope(|s| {
        let threads: Vec<_> = (0..instances)
            .map(|_| {
                let (start, end, stop, error, slowest, run_one) =
                    (&start, &end, &stop, &error, &slowest, &run_one);
                let lock = |m: &Mutex<f64>| -> f64 {
                    *m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
                };
                s.spawn(move || {
                    let mut times = Vec::with_capacity(rounds);
                    for round in 0..=rounds {
                        start.wait();
                        // Everyone reads the same flag here: only the leader sets it, between
                        // the end of one round and the start of the next.
                        if stop.load(Ordering::Relaxed) {
                            break;
                        }
                        match run_one() {
                            Ok(took) => {
                                let ms = took.as_secs_f64() * 1000.0;
                                let mut s = slowest
                                    .lock()
                                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                                *s = s.max(ms);
                                drop(s);
                                if round > 0 {
                                    times.push(ms);
                                }
                            }
                            // Recorded only: setting `stop` here could let a thread still
                            // waking from the start barrier skip this round's end barrier.
                            Err(e) => {
                                error
                                    .lock()
                                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                                    .get_or_insert(e);
                            }
                        }
                        let leader = end.wait().is_leader();
                        if leader {
                            if error
                                .lock()
                                .unwrap_or_else(std::sync::PoisonError::into_inner)
                                .is_some()
                            {
                                stop.store(true, Ordering::Relaxed);
                            }
                            let slowest_ms = lock(slowest);
                            *slowest.lock().unwrap_or_else(std::sync::PoisonError::into_inner) =
                                0.0;
                            if round == rounds
                                || (round > 0 && started.elapsed() >= effort.max_time)
                            {
                                stop.store(true, Ordering::Relaxed);
                            }
                            // The round used up to `instances` cores for its slowest batch.
                            let share = effort.cpu_share.clamp(0.01, 1.0);
                            let cpu_ms = slowest_ms * instances as f64;
                            if share < 1.0 && cpu_ms > 0.0 {
                                std::thread::sleep(Duration::from_secs_f64(
                                    ((cpu_ms / share - slowest_ms) / 1000.0).max(0.0),
                                ));
                            }
                        }
                    }
                    times
                })
            })
            .collect();
        threads.into_iter().map(|t| t.join().unwrap_or_default()).collect()
    });
    if let Some(e) = error.into_inner().unwrap_or_else(std::sync::PoisonError::into_inner) {
        return Err(e);
    }
    let kept = per_thread.iter().map(Vec::len).min().unwrap_or(0);
    let mut rounds_ms: Vec<f64> =
        (0..kept).map(|r| per_thread.iter().map(|t| t[r]).fold(0.0, f64::max)).collect();
    let mut all: Vec<f64> = per_thread.iter().flatten().copied().collect();
    rounds_ms.sort_by(f64::total_cmp);
    all.sort_by(f64::total_cmp);
    let round_p50 = quantile(&rounds_ms, 0.5);
    Ok(InstanceTiming {
        instances,
        batch,
        rounds: kept,
        p50_ms: quantile(&all, 0.5),
        p99_ms: quantile(&all, 0.99),
        rows_per_s: if round_p50 > 0.0 {
            (instances * batch) as f64 * 1000.0 / round_p50
        } else {
            0.0
        },
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

    /// Fails (or panics) on its `n`th run.
    struct FailsAt(std::sync::atomic::AtomicUsize, usize, bool);
    impl Engine for FailsAt {
        fn run(&self, inputs: Vec<Tensor>) -> Result<Vec<Tensor>, RunError> {
            let n = self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            if n == self.1 {
                assert!(!self.2, "a panic in the engine");
                return Err(RunError("out of memory".into()));
            }
            Ok(inputs)
        }
    }

    #[test]
    fn instances_run_their_batches_together_in_rounds() {
        let engine = Slow(Duration::from_millis(5));
        let effort = Effort { rounds: 6, max_time: Duration::from_secs(10), cpu_share: 1.0 };
        let started = Instant::now();
        let t = time_instances(&engine, &[], 2, 3, &effort).expect("runs");
        assert_eq!((t.instances, t.batch, t.rounds), (3, 2, 6));
        assert!(t.p50_ms >= 5.0 && t.p99_ms >= t.p50_ms, "{t:?}");
        // Three instances' batches of two rows each round: six rows per round of about 5 ms.
        assert!((t.rows_per_s - 6000.0 / t.p50_ms).abs() / t.rows_per_s < 0.5, "{t:?}");
        // Seven rounds (one warm-up) of at least 5 ms each, run at once, not one after another.
        let wall = started.elapsed();
        assert!(wall >= Duration::from_millis(35), "{wall:?}");
    }

    #[test]
    fn a_failing_or_panicking_instance_ends_the_rounds_with_its_error() {
        let effort = Effort { rounds: 50, max_time: Duration::from_secs(10), cpu_share: 1.0 };
        // Many times, with instant runs: a failing thread must not leave another waiting at a
        // barrier (that hung the search before).
        for (panics, at) in (0..200).map(|i| (i % 2 == 1, 1 + i % 8)) {
            let engine = FailsAt(std::sync::atomic::AtomicUsize::new(0), at, panics);
            let e = time_instances(&engine, &[], 1, 4, &effort).expect_err("fails");
            let want = if panics { "the engine panicked" } else { "out of memory" };
            assert!(e.contains(want) && e.starts_with("4 instances, batch of 1"), "{e}");
        }
        // One run, and a timed batch, fail the same way instead of unwinding the search.
        let panics = FailsAt(std::sync::atomic::AtomicUsize::new(0), 0, true);
        assert_eq!(run_guarded(&panics, &[]).unwrap_err(), "the engine panicked");
        let panics = FailsAt(std::sync::atomic::AtomicUsize::new(0), 3, true);
        let e = time_batch(&panics, &[], 1, &effort).unwrap_err();
        assert_eq!(e, "batch of 1: the engine panicked");
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
