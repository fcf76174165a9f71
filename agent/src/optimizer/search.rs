//! The search itself: the candidates for one model, each checked against the baseline's outputs
//! and then timed over batch sizes, and the report of every step.
//!
//! The baseline is tract on the model's `model.onnx` (the reference engine). Candidates:
//! - onnxruntime on the same file, in the host's shared pool and on one thread of its own;
//! - every other `.onnx` file in the version directory (an int8 or f16 variant made with
//!   onnxruntime's tools, for example), on tract and on onnxruntime: never assumed faster or
//!   correct, measured like the rest.
//!
//! A candidate that does not load, or whose outputs on the calibration requests are over the
//! accuracy bound, is reported with its figure and not timed. The others are timed at batch
//! sizes 1, 2, 4, ... up to the model's largest, stopping early once a doubling gains less than
//! [`MIN_DOUBLING_GAIN`] rows/s (the serving-knob sweep's early stop, as Model Analyzer does).
//! The strategy then picks among the timed candidates (see `strategy`).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::accuracy::{Agreement, Bound, compare};
use super::calibration::{self, Calibration};
use super::footprint::{engine_arg, measure_in_child};
use super::measure::{Effort, InstanceTiming, Timing, run_guarded, time_batch, time_instances};
use super::strategy::{Choice, Figures, Strategy, choose, hold_to_min_improvement, slo_text};
use crate::serving::model_config::{
    LoaderOptions, ModelConfig, OrtGraphLevel, OrtOptions, TractPrecision,
};
use crate::serving::onnxruntime::OrtEngine;
use crate::serving::runner::{Engine, Signature, TractEngine};
use crate::serving::tensor::Tensor;
use crate::serving::threads::OrtThreads;

/// A doubling of the batch size must raise rows/s by this share to keep sweeping.
pub const MIN_DOUBLING_GAIN: f64 = 0.05;

/// What to search and how.
#[derive(Debug, Clone)]
pub struct Spec {
    /// The model's `model.onnx` (inside its version directory).
    pub file: PathBuf,
    /// The model's config (loader options, batching limit, `[onnxruntime]`).
    pub config: ModelConfig,
    /// What to optimize for.
    pub strategy: Strategy,
    /// The most accuracy a candidate may lose.
    pub bound: Bound,
    /// Latency objective for batch sizes, p99 ms.
    pub slo_ms: Option<f64>,
    /// The host's price per hour, for the cost strategy.
    pub price_per_hour: Option<f64>,
    /// Timing effort and CPU share.
    pub effort: Effort,
    /// Synthesized requests when there is no calibration file.
    pub calibration_rows: usize,
    /// The agent binary, to measure each timed candidate's memory alone in a child process
    /// (`flotilla-agent footprint`); without it memory is not measured.
    pub footprint_probe: Option<PathBuf>,
    /// Switch the model to the winner when the search ends (see `jobs`).
    pub apply: bool,
    /// Most instances of the winner timed at once (the host's cores bound it too).
    pub max_instances: usize,
    /// Smallest gain over the baseline worth a switch (0: any gain); see
    /// [`super::strategy::hold_to_min_improvement`].
    pub min_improvement: f64,
}

/// Which engine runs a candidate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EngineChoice {
    /// tract, one thread, in this float precision, with one plan per batch size (false) or
    /// one plan with a symbolic batch size (true).
    Tract(TractPrecision, bool),
    /// onnxruntime with these threads, rewriting the graph this far.
    Onnxruntime(OrtThreads, OrtGraphLevel),
}

/// One thing to try.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    /// How the report names it.
    pub name: String,
    /// The ONNX file.
    pub file: PathBuf,
    /// The engine.
    pub engine: EngineChoice,
}

/// One candidate's step in the report.
#[derive(Debug, Clone, Serialize)]
pub struct Step {
    /// The candidate's name.
    pub candidate: String,
    /// Its engine: `tract`, `onnxruntime` (the host pool) or `onnxruntime:THREADS`.
    pub engine: String,
    /// Its ONNX file's name in the version directory.
    pub file: String,
    /// `timed`, `rejected` (over the bound), `dropped` (far slower than the baseline: see
    /// [`SLOW_FACTOR`]) or `failed` (did not load or run).
    pub outcome: &'static str,
    /// Why it was rejected or failed, or how the batch sweep ended.
    pub why: String,
    /// Its distance from the baseline.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agreement: Option<Agreement>,
    /// Timings per batch size.
    pub timings: Vec<Timing>,
    /// Peak resident memory it added, measured alone in a child process, bytes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory_bytes: Option<u64>,
    /// Load time, ms.
    pub load_ms: f64,
}

/// What a search found.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The model file searched.
    pub file: String,
    /// The strategy.
    pub strategy: Strategy,
    /// Where the inputs came from.
    pub inputs: String,
    /// The bound applied.
    pub bound: Bound,
    /// The SLO applied, ms.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub slo_ms: Option<f64>,
    /// The smallest gain over the baseline a winner had to make (0: any).
    pub min_improvement: f64,
    /// The winner at its batch size with 1, 2, 4, ... instances running at once (throughput,
    /// cost and balanced, on a host with more than one core).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub instances: Vec<InstanceTiming>,
    /// The instance count those figures chose.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub instances_chosen: Option<usize>,
    /// The baseline at its best batch size with 1, 2, 4, ... instances at once (every
    /// strategy, on a host with more than one core).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub baseline_instances: Vec<InstanceTiming>,
    /// Every candidate, baseline first.
    pub steps: Vec<Step>,
    /// The winner's name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub winner: Option<String>,
    /// The winner's batch size, where the strategy picks one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub batch: Option<usize>,
    /// Why it won.
    pub why: String,
    /// Names of the Pareto set.
    pub pareto: Vec<String>,
    /// How long the search took, ms.
    pub took_ms: f64,
}

/// The candidates for `spec`, baseline first; `ort` says whether onnxruntime loads here.
pub fn candidates(spec: &Spec, ort: bool) -> Vec<Candidate> {
    let mut out = vec![Candidate {
        name: "tract".to_owned(),
        file: spec.file.clone(),
        engine: EngineChoice::Tract(TractPrecision::F32, false),
    }];
    if ort {
        out.push(Candidate {
            name: "onnxruntime host pool".to_owned(),
            file: spec.file.clone(),
            engine: EngineChoice::Onnxruntime(OrtThreads::HostPool, OrtGraphLevel::All),
        });
        out.push(Candidate {
            name: "onnxruntime 1 thread".to_owned(),
            file: spec.file.clone(),
            engine: EngineChoice::Onnxruntime(OrtThreads::Own(1), OrtGraphLevel::All),
        });
        // Lighter graph rewriting: fusions without the CPU layout changes, and only the
        // rewrites that keep the graph's shape; either can win on small models or odd shapes.
        for level in [OrtGraphLevel::Extended, OrtGraphLevel::Basic] {
            out.push(Candidate {
                name: format!("onnxruntime host pool, {} graph optimizations", level.name()),
                file: spec.file.clone(),
                engine: EngineChoice::Onnxruntime(OrtThreads::HostPool, level),
            });
        }
    }
    // Half precision on tract: its f16 kernels pay on CPUs with f16 arithmetic (Arm, recent
    // x86); elsewhere tract emulates it, so it is measured, never assumed.
    out.push(Candidate {
        name: "tract f16".to_owned(),
        file: spec.file.clone(),
        engine: EngineChoice::Tract(TractPrecision::F16, false),
    });
    // One plan for every batch size (a symbolic batch axis) against today's plan per size:
    // fewer plans to build and keep, maybe slower kernels. Dropped for models that cannot batch.
    out.push(Candidate {
        name: "tract, one plan for every batch size".to_owned(),
        file: spec.file.clone(),
        engine: EngineChoice::Tract(TractPrecision::F32, true),
    });
    for variant in variant_files(&spec.file) {
        let label =
            variant.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        out.push(Candidate {
            name: format!("tract, {label}"),
            file: variant.clone(),
            engine: EngineChoice::Tract(TractPrecision::F32, false),
        });
        if ort {
            out.push(Candidate {
                name: format!("onnxruntime host pool, {label}"),
                file: variant,
                engine: EngineChoice::Onnxruntime(OrtThreads::HostPool, OrtGraphLevel::All),
            });
        }
    }
    out
}

/// The other `.onnx` files beside `file`, sorted.
fn variant_files(file: &Path) -> Vec<PathBuf> {
    let Some(dir) = file.parent() else { return Vec::new() };
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p != file && p.extension().is_some_and(|e| e == "onnx"))
        .collect();
    found.sort();
    found
}

fn load(spec: &Spec, c: &Candidate) -> Result<(Arc<dyn Engine>, Signature), String> {
    load_engine(&c.file, c.engine, &spec.config)
}

/// Loads `file` on `engine` under `config`.
pub fn load_engine(
    file: &Path,
    engine: EngineChoice,
    config: &ModelConfig,
) -> Result<(Arc<dyn Engine>, Signature), String> {
    match engine {
        EngineChoice::Tract(precision, symbolic_batch) => {
            let config = ModelConfig {
                loader: LoaderOptions { precision, symbolic_batch, ..config.loader },
                ..config.clone()
            };
            TractEngine::load(file, &config)
                .map(|(e, s)| (Arc::new(e) as Arc<dyn Engine>, s))
                .map_err(|e| format!("tract could not load {}: {e}", file.display()))
        }
        EngineChoice::Onnxruntime(threads, graph_optimization) => {
            let options = OrtOptions { graph_optimization, ..config.onnxruntime.clone() };
            OrtEngine::load(file, config, &options, threads)
                .map(|(e, s)| (Arc::new(e) as Arc<dyn Engine>, s))
        }
    }
}

/// A batch of `rows` rows: the calibration requests' rows taken one at a time, in turn (a
/// request may carry several). A model that cannot batch runs its first request as it is.
pub fn batch_of(
    calibration: &Calibration,
    rows: usize,
    batched: bool,
) -> Result<Vec<Tensor>, String> {
    let first = calibration.requests.first().ok_or("no calibration request")?;
    if !batched {
        return Ok(first.clone());
    }
    let mut singles: Vec<Vec<Tensor>> = Vec::new();
    for (r, request) in calibration.requests.iter().enumerate() {
        for row in 0..request.first().map_or(0, Tensor::rows) {
            let one = request
                .iter()
                .map(|t| t.slice_rows(row, 1))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| format!("calibration request {r} row {row}: {}", e.0))?;
            singles.push(one);
        }
    }
    if singles.is_empty() {
        return Err("the calibration requests hold no rows".to_owned());
    }
    let picked: Vec<&Vec<Tensor>> = (0..rows.max(1)).map(|r| &singles[r % singles.len()]).collect();
    (0..first.len())
        .map(|i| {
            let parts: Vec<&Tensor> = picked.iter().map(|one| &one[i]).collect();
            Tensor::concat_rows(&parts).map_err(|e| {
                format!("calibration rows of input {i} cannot form one batch: {}", e.0)
            })
        })
        .collect()
}

/// A candidate this many times slower on a calibration request than the baseline on the same
/// request (at least [`SLOW_FLOOR`]) is dropped untimed, except by the memory
/// strategy: no other strategy would pick it, and timing it would take the search that much
/// longer (tract's emulated f16 on x86 is 23 to 230 times slower).
pub const SLOW_FACTOR: u32 = 20;

/// See [`SLOW_FACTOR`].
pub const SLOW_FLOOR: Duration = Duration::from_millis(20);

/// Why the calibration requests did not all run.
#[derive(Debug)]
enum CalibrationError {
    /// A request failed (or the engine panicked).
    Failed(String),
    /// A request after the first (which may build plans) took longer than the limit.
    TooSlow(String),
}

/// Runs every calibration request, pausing after each to keep to the CPU share; returns the
/// outputs and each request's time. With `limits` (one per request), stops at the first
/// request after the first that takes longer than its limit.
fn run_all(
    engine: &dyn Engine,
    calibration: &Calibration,
    effort: &Effort,
    limits: Option<&[Duration]>,
) -> Result<(Vec<Vec<Tensor>>, Vec<Duration>), CalibrationError> {
    let mut outputs = Vec::with_capacity(calibration.requests.len());
    let mut times = Vec::with_capacity(calibration.requests.len());
    for (r, req) in calibration.requests.iter().enumerate() {
        let t = Instant::now();
        let out = run_guarded(engine, req)
            .map_err(|e| CalibrationError::Failed(format!("calibration request {r}: {e}")))?;
        let took = t.elapsed();
        effort.pause_after(took);
        if let Some(limit) = limits.and_then(|l| l.get(r)).filter(|l| r > 0 && took > **l) {
            return Err(CalibrationError::TooSlow(format!(
                "calibration request {r} took {:.1} ms, over {SLOW_FACTOR} times the baseline's ({:.1} ms allowed): dropped untimed",
                took.as_secs_f64() * 1000.0,
                limit.as_secs_f64() * 1000.0
            )));
        }
        outputs.push(out);
        times.push(took);
    }
    Ok((outputs, times))
}

/// Progress as the search goes: (step, of steps, what).
pub type Progress<'a> = &'a mut dyn FnMut(usize, usize, &str);

/// Runs the search.
pub fn run(spec: &Spec, progress: Progress<'_>) -> Result<Report, String> {
    let started = Instant::now();
    let ort =
        crate::serving::ort_library::runtime(spec.config.onnxruntime.library.as_deref()).is_ok();
    let mut list = candidates(spec, ort);
    let mut total = list.len();
    progress(0, total, "baseline: tract");
    let t = Instant::now();
    let (baseline, signature) = load(spec, &list[0])?;
    let baseline_took = t.elapsed();
    spec.effort.pause_after(baseline_took);
    let baseline_load_ms = baseline_took.as_secs_f64() * 1000.0;
    let model_dir = super::footprint::model_dir_of(&spec.file);
    let calibration = calibration::load(&model_dir, &signature, spec.calibration_rows)?;
    let (reference, baseline_times) = run_all(baseline.as_ref(), &calibration, &spec.effort, None)
        .map_err(|e| {
            let (CalibrationError::Failed(e) | CalibrationError::TooSlow(e)) = e;
            format!(
                "the baseline (tract) cannot run the calibration inputs ({}): {e}",
                calibration.source
            )
        })?;
    let slow_limits: Option<Vec<Duration>> = (spec.strategy != Strategy::Memory)
        .then(|| baseline_times.iter().map(|t| (*t * SLOW_FACTOR).max(SLOW_FLOOR)).collect());
    let max_batch = spec.config.max_batch_size.min(signature.max_batch_size).max(1);
    let batched = signature.max_batch_size > 0;
    // A symbolic batch axis means nothing to a model that cannot batch.
    if !batched || max_batch == 1 {
        list.retain(|c| !matches!(c.engine, EngineChoice::Tract(_, true)));
        total = list.len();
    }
    let mut steps = Vec::with_capacity(total);
    let mut timed: Vec<(usize, Figures)> = Vec::new();
    for (index, candidate) in list.iter().enumerate() {
        progress(index, total, &candidate.name);
        let (engine, load_ms) = if index == 0 {
            (baseline.clone(), baseline_load_ms)
        } else {
            let t = Instant::now();
            let loaded = load(spec, candidate);
            let took = t.elapsed();
            spec.effort.pause_after(took);
            match loaded {
                Ok((engine, sig)) if sig.inputs == signature.inputs => {
                    (engine, took.as_secs_f64() * 1000.0)
                }
                Ok(_) => {
                    steps.push(failed(candidate, "its inputs differ from the model's".to_owned()));
                    continue;
                }
                Err(e) => {
                    steps.push(failed(candidate, e));
                    continue;
                }
            }
        };
        // The baseline's outputs are the reference; it is not compared with itself or limited.
        let limits = if index == 0 { None } else { slow_limits.as_deref() };
        let agreement = match run_all(engine.as_ref(), &calibration, &spec.effort, limits) {
            Ok((out, _)) => match compare(&reference, &out) {
                Ok(a) => a,
                Err(e) => {
                    steps.push(failed(candidate, e));
                    continue;
                }
            },
            Err(CalibrationError::Failed(e)) => {
                steps.push(failed(candidate, e));
                continue;
            }
            Err(CalibrationError::TooSlow(why)) => {
                steps.push(Step { outcome: "dropped", load_ms, ..failed(candidate, why) });
                continue;
            }
        };
        if let Err(why) = spec.bound.check(&agreement) {
            steps.push(Step {
                candidate: candidate.name.clone(),
                engine: engine_arg(candidate.engine),
                file: file_name(&candidate.file),
                outcome: "rejected",
                why,
                agreement: Some(agreement),
                timings: Vec::new(),
                memory_bytes: None,
                load_ms,
            });
            continue;
        }
        let (timings, why) =
            match sweep(engine.as_ref(), &calibration, max_batch, batched, &spec.effort) {
                Ok(done) => done,
                Err(e) => {
                    steps.push(failed(candidate, e));
                    continue;
                }
            };
        drop(engine);
        let (memory, why) = match &spec.footprint_probe {
            Some(probe) => match measure_in_child(
                probe,
                &candidate.file,
                candidate.engine,
                &spec.config,
                spec.calibration_rows,
            ) {
                Ok(f) => (Some(f.added_bytes()), why),
                Err(e) => (None, format!("{why}; memory not measured: {e}")),
            },
            None => (None, why),
        };
        let p99_one = timings.first().map_or(f64::INFINITY, |t| t.p99_ms);
        timed.push((
            steps.len(),
            Figures {
                p99_one_row_ms: p99_one,
                points: timings.iter().map(|t| (t.batch, t.p99_ms, t.rows_per_s)).collect(),
                memory_bytes: memory,
            },
        ));
        steps.push(Step {
            candidate: candidate.name.clone(),
            engine: engine_arg(candidate.engine),
            file: file_name(&candidate.file),
            outcome: "timed",
            why,
            agreement: Some(agreement),
            timings,
            memory_bytes: memory,
            load_ms,
        });
    }
    progress(total, total, "choosing");
    let figures: Vec<Figures> = timed.iter().map(|(_, f)| f.clone()).collect();
    let mut choice = choose(spec.strategy, &figures, spec.slo_ms, spec.price_per_hour);
    // The baseline is the first step; when it was timed it is the first timed.
    if timed.first().is_some_and(|(step, _)| *step == 0) {
        choice = hold_to_min_improvement(
            choice,
            spec.strategy,
            &figures,
            spec.slo_ms,
            0,
            spec.min_improvement,
        );
    }
    let Choice { winner, batch, mut why, pareto } = choice;
    let name = |i: usize| steps[timed[i].0].candidate.clone();
    // Instances: for the strategies that serve many rows (the winner's batch size chosen), how
    // many of the winner running at once this host rewards.
    let mut instances = Vec::new();
    let mut instances_chosen = None;
    let max_instances = spec.max_instances.min(crate::serving::threads::host_cores());
    if let Some(w) = winner
        && matches!(spec.strategy, Strategy::Throughput | Strategy::Cost | Strategy::Balanced)
        && max_instances > 1
        && let Some(candidate) = list.iter().find(|c| c.name == steps[timed[w].0].candidate)
    {
        progress(total, total, &format!("instances: {}", candidate.name));
        match instance_sweep(
            spec,
            candidate,
            &calibration,
            batch.unwrap_or(1),
            batched,
            max_instances,
        ) {
            Ok((timings, chosen, said)) => {
                instances = timings;
                instances_chosen = chosen;
                why.push_str("; ");
                why.push_str(&said);
            }
            Err(e) => why.push_str(&format!("; instances not measured: {e}")),
        }
    }
    // The baseline's figures per instance count too, at its own best batch size, whatever the
    // strategy: what the model's current engine gains from more instances on this host.
    let mut baseline_instances = Vec::new();
    if max_instances > 1
        && let Some((0, base)) = timed.first()
    {
        let base_batch = base.best_throughput(spec.slo_ms).map_or(1, |t| t.0);
        let same = winner == Some(0) && batch.unwrap_or(1) == base_batch && !instances.is_empty();
        if same {
            baseline_instances.clone_from(&instances);
        } else {
            progress(total, total, "instances: baseline");
            match instance_sweep(spec, &list[0], &calibration, base_batch, batched, max_instances) {
                Ok((timings, _, _)) => baseline_instances = timings,
                Err(e) => why.push_str(&format!("; the baseline's instances not measured: {e}")),
            }
        }
    }
    Ok(Report {
        file: spec.file.display().to_string(),
        strategy: spec.strategy,
        inputs: calibration.source,
        bound: spec.bound.clone(),
        slo_ms: spec.slo_ms,
        min_improvement: spec.min_improvement,
        instances,
        instances_chosen,
        baseline_instances,
        winner: winner.map(name),
        batch,
        why,
        pareto: pareto.into_iter().map(name).collect(),
        steps,
        took_ms: started.elapsed().as_secs_f64() * 1000.0,
    })
}

/// The choice `strategy` makes from a finished search's measured figures (the candidates need
/// not be run again to compare strategies): the winner's name, its batch size and why.
pub fn choose_again(
    report: &Report,
    strategy: Strategy,
    slo_ms: Option<f64>,
    price_per_hour: Option<f64>,
) -> (Option<String>, Option<usize>, String) {
    let timed: Vec<&Step> = report.steps.iter().filter(|s| s.outcome == "timed").collect();
    let figures: Vec<Figures> = timed
        .iter()
        .map(|s| Figures {
            p99_one_row_ms: s.timings.first().map_or(f64::INFINITY, |t| t.p99_ms),
            points: s.timings.iter().map(|t| (t.batch, t.p99_ms, t.rows_per_s)).collect(),
            memory_bytes: s.memory_bytes,
        })
        .collect();
    let choice = choose(strategy, &figures, slo_ms, price_per_hour);
    (choice.winner.map(|i| timed[i].candidate.clone()), choice.batch, choice.why)
}

/// The file's name, for the report.
fn file_name(path: &Path) -> String {
    path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
}

fn failed(candidate: &Candidate, why: String) -> Step {
    Step {
        candidate: candidate.name.clone(),
        engine: engine_arg(candidate.engine),
        file: file_name(&candidate.file),
        outcome: "failed",
        why,
        agreement: None,
        timings: Vec::new(),
        memory_bytes: None,
        load_ms: 0.0,
    }
}

/// Times `candidate` at `batch` rows with 1, 2, 4, ... instances at once up to `most`,
/// stopping when a doubling gains less than [`MIN_DOUBLING_GAIN`]; returns the figures, the
/// count with the most rows/s within the SLO (none when even one instance misses it) and a
/// sentence saying so.
fn instance_sweep(
    spec: &Spec,
    candidate: &Candidate,
    calibration: &Calibration,
    batch: usize,
    batched: bool,
    most: usize,
) -> Result<(Vec<InstanceTiming>, Option<usize>, String), String> {
    let t = Instant::now();
    let (engine, _) = load(spec, candidate)?;
    spec.effort.pause_after(t.elapsed());
    let inputs = batch_of(calibration, batch, batched)?;
    let mut timings: Vec<InstanceTiming> = Vec::new();
    let mut k = 1;
    loop {
        let timing = time_instances(engine.as_ref(), &inputs, batch, k, &spec.effort)?;
        let gain_stops = timings
            .last()
            .is_some_and(|p| timing.rows_per_s < p.rows_per_s * (1.0 + MIN_DOUBLING_GAIN));
        timings.push(timing);
        if gain_stops || k >= most {
            break;
        }
        k = (k * 2).min(most);
    }
    let within = |t: &&InstanceTiming| spec.slo_ms.is_none_or(|slo| t.p99_ms <= slo);
    let best = timings.iter().filter(within).max_by(|a, b| a.rows_per_s.total_cmp(&b.rows_per_s));
    let one = timings.first().map_or(0.0, |t| t.rows_per_s);
    let said = match best {
        Some(b) if b.instances > 1 => format!(
            "{} instances at once: {:.1} rows/s against {one:.1} with one{}",
            b.instances,
            b.rows_per_s,
            slo_text(spec.slo_ms)
        ),
        Some(_) => format!(
            "one instance: more did not pay ({})",
            timings
                .iter()
                .map(|t| format!("{} -> {:.1} rows/s", t.instances, t.rows_per_s))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        None => format!("no instance count meets the SLO{}", slo_text(spec.slo_ms)),
    };
    Ok((timings.clone(), best.map(|b| b.instances), said))
}

/// Times batch sizes 1, 2, 4, ... up to `max_batch`, stopping when a doubling stops paying.
fn sweep(
    engine: &dyn Engine,
    calibration: &Calibration,
    max_batch: usize,
    batched: bool,
    effort: &Effort,
) -> Result<(Vec<Timing>, String), String> {
    let mut timings: Vec<Timing> = Vec::new();
    let mut rows = 1;
    loop {
        let inputs = batch_of(calibration, rows, batched)?;
        let t = time_batch(engine, &inputs, rows, effort)?;
        let previous = timings.last().map(|p| p.rows_per_s);
        timings.push(t);
        let now = timings.last().map_or(0.0, |t| t.rows_per_s);
        if !batched || rows >= max_batch {
            let why = if batched {
                format!("timed up to the model's largest batch ({max_batch})")
            } else {
                "the model cannot batch: one request per run".to_owned()
            };
            return Ok((timings, why));
        }
        if let Some(before) = previous
            && now < before * (1.0 + MIN_DOUBLING_GAIN)
        {
            return Ok((
                timings,
                format!(
                    "stopped at batch {rows}: {:.1} rows/s against {before:.1} at {}, under the {:.0} % a doubling must gain",
                    now,
                    rows / 2,
                    MIN_DOUBLING_GAIN * 100.0
                ),
            ));
        }
        rows = (rows * 2).min(max_batch);
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use prost::Message as _;
    use tract_onnx::pb;

    /// A three-class "classifier", `y = x * scale` over `[N, 3]` float rows, as ONNX bytes.
    pub(crate) fn scale_model(scale: [f32; 3]) -> Vec<u8> {
        let dims = |d: &[Option<i64>]| pb::TensorShapeProto {
            dim: d
                .iter()
                .map(|v| pb::tensor_shape_proto::Dimension {
                    denotation: String::new(),
                    value: Some(match v {
                        Some(n) => pb::tensor_shape_proto::dimension::Value::DimValue(*n),
                        None => pb::tensor_shape_proto::dimension::Value::DimParam("n".into()),
                    }),
                })
                .collect(),
        };
        let io = |name: &str| pb::ValueInfoProto {
            name: name.into(),
            r#type: Some(pb::TypeProto {
                denotation: String::new(),
                value: Some(pb::type_proto::Value::TensorType(pb::type_proto::Tensor {
                    elem_type: pb::tensor_proto::DataType::Float as i32,
                    shape: Some(dims(&[None, Some(3)])),
                })),
            }),
            ..Default::default()
        };
        let graph = pb::GraphProto {
            name: "scale".into(),
            node: vec![pb::NodeProto {
                input: vec!["x".into(), "scale".into()],
                output: vec!["y".into()],
                op_type: "Mul".into(),
                ..Default::default()
            }],
            initializer: vec![pb::TensorProto {
                name: "scale".into(),
                dims: vec![3],
                data_type: pb::tensor_proto::DataType::Float as i32,
                float_data: scale.to_vec(),
                ..Default::default()
            }],
            input: vec![io("x")],
            output: vec![io("y")],
            ..Default::default()
        };
        pb::ModelProto {
            ir_version: 8,
            opset_import: vec![pb::OperatorSetIdProto { domain: String::new(), version: 13 }],
            graph: Some(graph),
            ..Default::default()
        }
        .encode_to_vec()
    }

    fn spec(file: PathBuf, strategy: Strategy) -> Spec {
        Spec {
            file,
            config: ModelConfig {
                max_batch_size: 8,
                onnxruntime: crate::serving::onnxruntime::tests::options(),
                ..ModelConfig::default()
            },
            strategy,
            bound: Bound {
                max_top1_loss: Some(0.0),
                max_rel_error: Some(1e-3),
                ..Bound::default()
            },
            slo_ms: None,
            price_per_hour: None,
            effort: Effort {
                rounds: 5,
                max_time: std::time::Duration::from_secs(1),
                cpu_share: 1.0,
            },
            calibration_rows: 16,
            footprint_probe: None,
            apply: false,
            min_improvement: 0.0,
            max_instances: 4,
        }
    }

    #[test]
    fn batches_are_counted_in_rows_even_when_a_request_carries_several() {
        let rows = |n: usize, first: f32| {
            let bytes = (0..n * 3).flat_map(|i| (first + i as f32).to_le_bytes()).collect();
            Tensor::from_bytes(crate::serving::tensor::DataType::F32, vec![n, 3], bytes).expect("x")
        };
        let calibration = Calibration {
            requests: vec![vec![rows(2, 0.0)], vec![rows(1, 100.0)]],
            source: String::new(),
        };
        let one = batch_of(&calibration, 1, true).expect("one row");
        assert_eq!(one[0].shape(), &[1, 3]);
        assert_eq!(one[0].to_f64(), vec![0.0, 1.0, 2.0]);
        let four = batch_of(&calibration, 4, true).expect("four rows");
        assert_eq!(four[0].shape(), &[4, 3]);
        // Rows in turn: both of the first request, the second's, then the first again.
        assert_eq!(four[0].to_f64()[6..9], [100.0, 101.0, 102.0]);
        assert_eq!(four[0].to_f64()[9..12], [0.0, 1.0, 2.0]);
        // A model that cannot batch runs the first request as it is.
        assert_eq!(batch_of(&calibration, 4, false).expect("as is")[0].shape(), &[2, 3]);
    }

    /// Sleeps `first` on its first run and `then` on every later one.
    struct Sleeps(std::sync::atomic::AtomicUsize, Duration, Duration);
    impl Engine for Sleeps {
        fn run(
            &self,
            inputs: Vec<Tensor>,
        ) -> Result<Vec<Tensor>, crate::serving::runner::RunError> {
            let n = self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            std::thread::sleep(if n == 0 { self.1 } else { self.2 });
            Ok(inputs)
        }
    }

    #[test]
    fn a_candidate_far_slower_than_the_baseline_is_dropped_after_its_first_request() {
        let calibration = Calibration { requests: vec![Vec::new(); 4], source: String::new() };
        let effort = Effort { rounds: 1, max_time: Duration::from_secs(1), cpu_share: 1.0 };
        let limits = [Duration::from_millis(20); 4];
        let limit = Some(&limits[..]);
        // A slow first run (plans built on first use) is not held against it.
        let warming = Sleeps(Default::default(), Duration::from_millis(60), Duration::ZERO);
        let (outputs, times) = run_all(&warming, &calibration, &effort, limit).expect("runs");
        assert_eq!((outputs.len(), times.len()), (4, 4));
        assert!(times[0] >= Duration::from_millis(60) && times[1] < Duration::from_millis(20));
        let slow = Sleeps(Default::default(), Duration::ZERO, Duration::from_millis(30));
        match run_all(&slow, &calibration, &effort, limit) {
            Err(CalibrationError::TooSlow(why)) => {
                assert!(why.starts_with("calibration request 1 took"), "{why}");
                assert!(why.contains("over 20 times the baseline's (20.0 ms allowed)"), "{why}");
            }
            other => panic!("not dropped: {:?}", other.map(|(_, times)| times)),
        }
        // Without a limit (the baseline, the memory strategy) it runs to the end.
        assert!(run_all(&slow, &calibration, &effort, None).is_ok());
    }

    #[test]
    fn a_coarse_variant_is_rejected_with_its_figure_and_a_close_one_is_timed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let version = dir.path().join("scale/1");
        std::fs::create_dir_all(&version).expect("mkdir");
        std::fs::write(version.join("model.onnx"), scale_model([1.0, 2.0, 3.0])).expect("write");
        // A "quantized" scale too coarse for the bound: class 2 loses to class 1 on most rows.
        std::fs::write(version.join("model.coarse.onnx"), scale_model([1.0, 2.0, 0.5]))
            .expect("write");
        std::fs::write(version.join("model.close.onnx"), scale_model([1.0, 2.0, 3.000_1]))
            .expect("write");
        let spec = spec(version.join("model.onnx"), Strategy::Throughput);
        let mut seen = Vec::new();
        let report =
            run(&spec, &mut |i, n, what| seen.push(format!("{i}/{n} {what}"))).expect("search");
        assert!(report.inputs.contains("synthesized"), "{}", report.inputs);
        let step = |name: &str| {
            report
                .steps
                .iter()
                .find(|s| s.candidate == name)
                .unwrap_or_else(|| panic!("no step {name}: {report:#?}"))
        };
        let coarse = step("tract, model.coarse.onnx");
        assert_eq!(coarse.outcome, "rejected", "{coarse:?}");
        assert!(coarse.why.contains("over the bound"), "{}", coarse.why);
        assert!(coarse.timings.is_empty(), "a rejected candidate is not timed");
        let agreement = coarse.agreement.as_ref().expect("figures");
        assert!(agreement.top1_agreement.is_some_and(|t| t < 1.0), "{agreement:?}");
        let close = step("tract, model.close.onnx");
        assert_eq!(close.outcome, "timed", "{close:?}");
        let baseline = step("tract");
        assert_eq!(baseline.outcome, "timed");
        assert_eq!(baseline.agreement.as_ref().map(|a| a.max_abs_error), Some(0.0));
        // Every timed figure was measured: runs happened at each batch size, ascending.
        for s in report.steps.iter().filter(|s| s.outcome == "timed") {
            assert!(!s.timings.is_empty(), "{s:?}");
            assert_eq!(s.timings[0].batch, 1);
            assert!(
                s.timings.iter().all(|t| t.runs >= 1 && t.p50_ms > 0.0 && t.rows_per_s > 0.0),
                "{s:?}"
            );
            assert!(s.timings.windows(2).all(|w| w[0].batch < w[1].batch));
            assert_eq!(s.memory_bytes, None, "no probe, no memory figure");
        }
        let winner = report.winner.clone().expect("a winner");
        assert!(report.steps.iter().any(|s| s.candidate == winner && s.outcome == "timed"));
        assert!(!report.pareto.is_empty());
        assert!(report.why.contains("most rows/s"), "{}", report.why);
        // The winner was timed with instances at once, at its batch size, where the host
        // has the cores for more than one.
        if crate::serving::threads::host_cores() > 1 {
            let counts: Vec<usize> = report.instances.iter().map(|t| t.instances).collect();
            assert_eq!(counts.first(), Some(&1), "{report:#?}");
            assert!(counts.len() >= 2 && counts.windows(2).all(|w| w[0] < w[1]), "{counts:?}");
            assert!(
                report.instances.iter().all(|t| Some(t.batch) == report.batch && t.rounds >= 1)
            );
            let chosen = report.instances_chosen.expect("no SLO: some count is chosen");
            assert!(counts.contains(&chosen), "{chosen} {counts:?}");
            assert!(report.why.contains("instance"), "{}", report.why);
            let base: Vec<usize> = report.baseline_instances.iter().map(|t| t.instances).collect();
            assert_eq!(base.first(), Some(&1), "{report:#?}");
            assert!(report.baseline_instances.iter().all(|t| t.rows_per_s > 0.0));
        }
        let (again, batch, why) = choose_again(&report, Strategy::Throughput, None, None);
        assert_eq!((again, batch), (report.winner.clone(), report.batch));
        assert!(report.why.starts_with(&why), "{why} / {}", report.why);
        // Baseline, onnxruntime four ways (two thread pools, two lighter graph levels), and
        // each variant on both engines.
        assert_eq!(seen.first().map(String::as_str), Some("0/11 baseline: tract"), "{seen:?}");
        // Half precision on tract: the same classes, a small error, and measured.
        let half = step("tract f16");
        assert_eq!((half.outcome, half.engine.as_str()), ("timed", "tract@f16"), "{half:?}");
        let a = half.agreement.as_ref().expect("figures");
        assert!(a.max_abs_error > 0.0 && a.max_abs_error < 0.5, "{a:?}");
        // One plan for every batch size: the same figures as the plans per size, timed at
        // each size.
        let one_plan = step("tract, one plan for every batch size");
        assert_eq!((one_plan.outcome, one_plan.engine.as_str()), ("timed", "tract@symbolic"));
        assert_eq!(one_plan.agreement.as_ref().map(|a| a.max_abs_error), Some(0.0));
        assert!(one_plan.timings.len() >= 2, "{one_plan:?}");
        assert_eq!(step("onnxruntime host pool").outcome, "timed");
        for level in ["extended", "basic"] {
            let lighter = step(&format!("onnxruntime host pool, {level} graph optimizations"));
            assert_eq!(lighter.outcome, "timed", "{lighter:?}");
            assert_eq!(lighter.engine, format!("onnxruntime@{level}"));
        }
        assert_eq!(step("onnxruntime host pool, model.coarse.onnx").outcome, "rejected");
        assert!(seen.iter().any(|s| s == "11/11 choosing"), "{seen:?}");
    }
}
