//! `backend = "auto"`: at load, the model is opened in tract and in onnxruntime, a trial input
//! is run through both, their outputs are compared, both are timed, and the faster serves.
//!
//! - The trial input has one row (the batch axis at 1), the file's and the config's sizes, and 64,
//!   16 or 1 for each size still open (the first that both engines run: a larger trial is closer
//!   to real requests, where per-call overheads matter less; pin real sizes with the config's
//!   `[[input]] dims` to time exactly what clients send). Its values are fixed
//!   pseudo-random numbers: floats in [-1, 1), integers in [0, 8) (valid as indices and
//!   categories), booleans alternating, strings "flotilla".
//! - Outputs agree when they have the same shapes and types and every element is within
//!   [`ABS_TOLERANCE`] + [`REL_TOLERANCE`] x |tract's value| (integers and strings exactly).
//!   When they do not, tract serves: it is the reference engine and the disagreement is logged.
//! - Timing: each engine runs the trial twice to warm up, then they take turns (so a noisy
//!   neighbour hurts both alike) for up to [`MAX_ROUNDS`] rounds or [`TIMING_BUDGET`]; the
//!   medians decide.
//! - When no synthetic trial runs on both engines (a model whose inputs carry meaning, such as
//!   silero's sample rate and 512-sample frames), tract serves and the first real request
//!   decides: it is answered at once by tract while a background thread runs the same inputs
//!   through both engines, compares and times them, and switches engines if onnxruntime wins.
//!   After [`REAL_REQUEST_ATTEMPTS`] requests that do not run on both, tract stays.
//! - An engine that does not load (onnxruntime not installed, a graph tract cannot analyse)
//!   leaves the other, with the reason; neither loading fails the model with both reasons.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use tracing::{info, warn};

use super::model_config::{ModelConfig, OrtOptions};
use super::onnxruntime::OrtEngine;
use super::runner::{Engine, EngineInfo, IoSpec, RunError, Signature, TractEngine};
use super::tensor::{DataType, Payload, Tensor};
use super::threads::OrtThreads;

/// Absolute part of the agreement tolerance.
pub const ABS_TOLERANCE: f64 = 1e-3;
/// Relative part of the agreement tolerance.
pub const REL_TOLERANCE: f64 = 1e-3;
/// Most timed rounds (one run of each engine per round).
pub const MAX_ROUNDS: usize = 15;
/// Timing stops after this long, after at least three rounds.
pub const TIMING_BUDGET: Duration = Duration::from_secs(2);

/// How `auto` chose, as the config endpoint and the log report it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EngineChoice {
    /// The engine that serves.
    pub chosen: &'static str,
    /// Why, in words.
    pub reason: String,
    /// tract's median time for the trial, in microseconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tract_us: Option<f64>,
    /// onnxruntime's median time for the trial, in microseconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub onnxruntime_us: Option<f64>,
    /// Largest difference between the engines' outputs on the trial.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_abs_difference: Option<f64>,
    /// The trial input's shapes.
    pub trial_shapes: Vec<Vec<usize>>,
    /// The agreement rule.
    pub tolerance: String,
}

/// Real requests `auto` tries to decide on, when no synthetic trial ran on both engines,
/// before it gives up and keeps tract.
pub const REAL_REQUEST_ATTEMPTS: u32 = 3;

/// The engine `auto` serves with, reporting the choice with its own description.
struct Chosen {
    state: Arc<Mutex<ChoiceState>>,
}

struct ChoiceState {
    serving: Arc<dyn Engine>,
    choice: EngineChoice,
    /// Both engines, while the choice waits for a real request (no synthetic trial ran on both).
    undecided: Option<Undecided>,
}

struct Undecided {
    tract: Arc<dyn Engine>,
    ort: Arc<dyn Engine>,
    threads: usize,
    attempts_left: u32,
    /// A trial on a real request is running in the background.
    trying: bool,
}

fn lock(state: &Mutex<ChoiceState>) -> std::sync::MutexGuard<'_, ChoiceState> {
    state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Engine for Chosen {
    fn run(&self, inputs: Vec<Tensor>) -> Result<Vec<Tensor>, RunError> {
        let (engine, trial) = {
            let mut st = lock(&self.state);
            let trial = match st.undecided.as_mut() {
                Some(u) if !u.trying => {
                    u.trying = true;
                    Some((u.tract.clone(), u.ort.clone(), u.threads))
                }
                _ => None,
            };
            (st.serving.clone(), trial)
        };
        if let Some((tract, ort, threads)) = trial {
            // The request is served at once by the engine in place; the trial runs on a copy of
            // its inputs in the background and switches engines when it is done.
            let state = self.state.clone();
            let copy = inputs.clone();
            let spawned = std::thread::Builder::new()
                .name("auto-trial".into())
                .spawn(move || decide_on_request(&state, &tract, &ort, &copy, threads));
            if spawned.is_err()
                && let Some(u) = lock(&self.state).undecided.as_mut()
            {
                u.trying = false;
            }
        }
        engine.run(inputs)
    }

    fn instances_changed(&self, instances: usize) {
        let (serving, undecided) = {
            let st = lock(&self.state);
            (st.serving.clone(), st.undecided.as_ref().map(|u| u.ort.clone()))
        };
        serving.instances_changed(instances);
        if let Some(ort) = undecided {
            ort.instances_changed(instances);
        }
    }

    fn info(&self) -> EngineInfo {
        let (engine, choice) = {
            let st = lock(&self.state);
            (st.serving.clone(), st.choice.clone())
        };
        EngineInfo { choice: Some(choice), ..engine.info() }
    }
}

fn decide_on_request(
    state: &Mutex<ChoiceState>,
    tract: &Arc<dyn Engine>,
    ort: &Arc<dyn Engine>,
    inputs: &[Tensor],
    threads: usize,
) {
    let tolerance = lock(state).choice.tolerance.clone();
    // A panic in either engine counts as a failed attempt: left to unwind, it would leave
    // `trying` set and the choice waiting forever.
    let verdict = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        judge(tract, ort, inputs, threads, tolerance)
    }))
    .unwrap_or_else(|_| Err("an engine panicked on the request".to_owned()));
    let mut st = lock(state);
    match verdict {
        Ok((ort_wins, mut choice)) => {
            choice.reason = format!("decided on the first request: {}", choice.reason);
            st.serving = if ort_wins { ort.clone() } else { tract.clone() };
            st.choice = choice;
            st.undecided = None;
        }
        Err(why) => {
            let Some(u) = st.undecided.as_mut() else { return };
            u.attempts_left = u.attempts_left.saturating_sub(1);
            u.trying = false;
            if u.attempts_left == 0 {
                st.undecided = None;
                st.choice.reason = format!(
                    "neither a synthetic trial nor {REAL_REQUEST_ATTEMPTS} real requests ran on both engines (last: {why}); tract is the reference"
                );
            }
        }
    }
    report(&st.choice);
}

/// Runs `inputs` on both engines, compares their outputs and times them: whether onnxruntime
/// serves, and the choice. Fails when an engine cannot run the inputs.
fn judge(
    tract: &Arc<dyn Engine>,
    ort: &Arc<dyn Engine>,
    inputs: &[Tensor],
    threads: usize,
    tolerance: String,
) -> Result<(bool, EngineChoice), String> {
    let tract_out = tract.run(inputs.to_vec()).map_err(|e| format!("tract: {e}"))?;
    let ort_out = ort.run(inputs.to_vec()).map_err(|e| format!("onnxruntime: {e}"))?;
    let difference = max_difference(&tract_out, &ort_out);
    let mut choice = EngineChoice {
        chosen: "tract",
        reason: String::new(),
        tract_us: None,
        onnxruntime_us: None,
        max_abs_difference: difference.as_ref().ok().copied(),
        trial_shapes: inputs.iter().map(|t| t.shape().to_vec()).collect(),
        tolerance,
    };
    if let Err(why) = difference {
        choice.reason = format!("the engines' outputs disagree ({why}); tract is the reference");
        return Ok((false, choice));
    }
    let (tract_time, ort_time, rounds) = time_both(tract, ort, inputs);
    choice.tract_us = Some(micros(tract_time));
    choice.onnxruntime_us = Some(micros(ort_time));
    let ort_wins = ort_time < tract_time;
    if ort_wins {
        choice.chosen = "onnxruntime";
    }
    choice.reason = format!(
        "{} is faster on the trial input: onnxruntime {:.3} ms ({threads} threads), tract {:.3} ms \
         (1 thread), medians of {rounds} runs; outputs agree within the tolerance",
        choice.chosen,
        micros(ort_time) / 1000.0,
        micros(tract_time) / 1000.0,
    );
    Ok((ort_wins, choice))
}

/// Loads `path` in both engines and keeps the faster one that agrees with tract.
pub fn choose(
    path: &Path,
    config: &ModelConfig,
    options: &OrtOptions,
    threads: OrtThreads,
) -> Result<(Arc<dyn Engine>, Signature), String> {
    let tract = TractEngine::load(path, config);
    let ort = OrtEngine::load(path, config, options, threads);
    let tolerance = format!("|onnxruntime - tract| <= {ABS_TOLERANCE} + {REL_TOLERANCE} x |tract|");
    let serve = |serving: Arc<dyn Engine>, choice: EngineChoice, undecided: Option<Undecided>| {
        report(&choice);
        let state = ChoiceState { serving, choice, undecided };
        Arc::new(Chosen { state: Arc::new(Mutex::new(state)) }) as Arc<dyn Engine>
    };
    let named = |chosen, reason: String| EngineChoice {
        chosen,
        reason,
        tract_us: None,
        onnxruntime_us: None,
        max_abs_difference: None,
        trial_shapes: Vec::new(),
        tolerance: tolerance.clone(),
    };
    let ((tract, tract_sig), ort) = match (tract, ort) {
        (Err(t), Err(o)) => {
            return Err(format!("neither engine loads the model: tract: {t}; onnxruntime: {o}"));
        }
        (Ok((engine, sig)), Err(o)) => {
            let choice = named("tract", format!("onnxruntime is not available: {o}"));
            return Ok((serve(Arc::new(engine), choice, None), sig));
        }
        (Err(t), Ok((engine, sig))) => {
            let choice = named("onnxruntime", format!("tract cannot load the model: {t}"));
            return Ok((serve(Arc::new(engine), choice, None), sig));
        }
        (Ok(t), Ok((o, _))) => (t, o),
    };
    let tract: Arc<dyn Engine> = Arc::new(tract);
    let ort: Arc<dyn Engine> = Arc::new(ort);
    let threads = ort.info().threads.unwrap_or(1);
    let verdict = synthetic_trials(&tract_sig)
        .into_iter()
        .find_map(|inputs| judge(&tract, &ort, &inputs, threads, tolerance.clone()).ok());
    let engine = match verdict {
        Some((true, choice)) => serve(ort, choice, None),
        Some((false, choice)) => serve(tract, choice, None),
        None => {
            let choice = named(
                "tract",
                "no synthetic trial input (open sizes at 64, 16 or 1) ran on both engines; tract \
                 serves until a real request both engines run decides"
                    .to_owned(),
            );
            let undecided = Undecided {
                tract: tract.clone(),
                ort,
                threads,
                attempts_left: REAL_REQUEST_ATTEMPTS,
                trying: false,
            };
            serve(tract, choice, Some(undecided))
        }
    };
    Ok((engine, tract_sig))
}

fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn report(choice: &EngineChoice) {
    if choice.reason.contains("disagree") {
        warn!(chosen = choice.chosen, reason = %choice.reason, "backend = \"auto\" chose an engine.");
    } else {
        info!(chosen = choice.chosen, reason = %choice.reason, "backend = \"auto\" chose an engine.");
    }
}

/// The synthetic trial inputs to try, in order (see the module docs).
fn synthetic_trials(signature: &Signature) -> Vec<Vec<Tensor>> {
    [64, 16, 1].into_iter().filter_map(|open| trial_inputs(signature, open).ok()).collect()
}

/// A trial input of one row with every open size at `open`.
pub fn trial_inputs(signature: &Signature, open: usize) -> Result<Vec<Tensor>, String> {
    signature
        .inputs
        .iter()
        .enumerate()
        .map(|(i, io)| trial_tensor(io, trial_shape(signature, io, open), i))
        .collect()
}

/// The shape of a one-row trial of `io`: a batched model's batch dim at 1, every other open
/// size at `open`.
pub fn trial_shape(signature: &Signature, io: &IoSpec, open: usize) -> Vec<usize> {
    io.dims
        .iter()
        .enumerate()
        .map(|(axis, d)| match usize::try_from(*d) {
            Ok(d) => d,
            Err(_) if axis == 0 && signature.max_batch_size > 0 => 1,
            Err(_) => open,
        })
        .collect()
}

/// Fixed pseudo-random values of the input's type (see the module docs for the ranges).
pub fn trial_tensor(io: &IoSpec, shape: Vec<usize>, seed: usize) -> Result<Tensor, String> {
    let n = super::tensor::element_count(&shape).map_err(|e| e.0)?;
    let mut x = u32::try_from(seed % 1000).unwrap_or(0).wrapping_mul(2_654_435_761).max(1);
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        x
    };
    let dtype = io.datatype;
    if dtype == DataType::Bytes {
        let strings = vec![b"flotilla".to_vec(); n];
        return Tensor::from_payload(dtype, shape, Payload::Strings(strings)).map_err(|e| e.0);
    }
    let mut bytes = Vec::with_capacity(n * dtype.size().unwrap_or(1));
    for i in 0..n {
        let r = next();
        let unit = f64::from(r % 2000) / 1000.0 - 1.0;
        let small = r % 8;
        match dtype {
            DataType::Bool => bytes.push(u8::from(i % 2 == 1)),
            DataType::U8 | DataType::I8 => bytes.push(small.to_le_bytes()[0]),
            DataType::U16 | DataType::I16 => bytes.extend_from_slice(&small.to_le_bytes()[..2]),
            DataType::U32 | DataType::I32 => bytes.extend_from_slice(&small.to_le_bytes()),
            DataType::U64 | DataType::I64 => {
                bytes.extend_from_slice(&u64::from(small).to_le_bytes())
            }
            DataType::F16 => {
                bytes.extend_from_slice(&half::f16::from_f64(unit).to_le_bytes());
            }
            #[allow(clippy::cast_possible_truncation)]
            DataType::F32 => bytes.extend_from_slice(&(unit as f32).to_le_bytes()),
            DataType::F64 => bytes.extend_from_slice(&unit.to_le_bytes()),
            DataType::Bytes => {}
        }
    }
    Tensor::from_bytes(dtype, shape, bytes).map_err(|e| e.0)
}

/// The largest absolute difference between two engines' outputs, or why they disagree.
pub fn max_difference(reference: &[Tensor], other: &[Tensor]) -> Result<f64, String> {
    if reference.len() != other.len() {
        return Err(format!("{} outputs against {}", reference.len(), other.len()));
    }
    let mut worst = 0.0f64;
    for (i, (a, b)) in reference.iter().zip(other).enumerate() {
        if a.shape() != b.shape() {
            return Err(format!("output {i}: shape {:?} against {:?}", a.shape(), b.shape()));
        }
        if a.dtype() != b.dtype() {
            return Err(format!("output {i}: type {} against {}", a.dtype(), b.dtype()));
        }
        if let (Payload::Strings(x), Payload::Strings(y)) = (a.payload(), b.payload()) {
            if x != y {
                return Err(format!("output {i}: strings differ"));
            }
            continue;
        }
        let exact = !matches!(a.dtype(), DataType::F16 | DataType::F32 | DataType::F64);
        for (j, (x, y)) in a.to_f64().into_iter().zip(b.to_f64()).enumerate() {
            let d = (x - y).abs();
            let same_nan = x.is_nan() && y.is_nan();
            let allowed = if exact { 0.0 } else { ABS_TOLERANCE + REL_TOLERANCE * x.abs() };
            // A NaN difference (NaN against a number) is outside any tolerance.
            let within = x == y || d <= allowed; // equal infinities differ by NaN
            if !same_nan && !within {
                return Err(format!("output {i} element {j}: tract {x}, onnxruntime {y}"));
            }
            if !same_nan {
                worst = worst.max(d);
            }
        }
    }
    Ok(worst)
}

/// Medians of the engines' run times on `inputs`, taking turns, and the rounds run.
fn time_both(
    tract: &Arc<dyn Engine>,
    ort: &Arc<dyn Engine>,
    inputs: &[Tensor],
) -> (Duration, Duration, usize) {
    let run = |engine: &Arc<dyn Engine>| {
        let start = Instant::now();
        let ok = engine.run(inputs.to_vec()).is_ok();
        (start.elapsed(), ok)
    };
    for _ in 0..2 {
        run(tract);
        run(ort);
    }
    let began = Instant::now();
    let (mut t, mut o) = (Vec::new(), Vec::new());
    while t.len() < MAX_ROUNDS && (t.len() < 3 || began.elapsed() < TIMING_BUDGET) {
        let (dt, tract_ok) = run(tract);
        let (dortt, ort_ok) = run(ort);
        // An engine that fails a run it passed before is charged the whole budget.
        t.push(if tract_ok { dt } else { TIMING_BUDGET });
        o.push(if ort_ok { dortt } else { TIMING_BUDGET });
    }
    let rounds = t.len();
    (median(t), median(o), rounds)
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort_unstable();
    v.get(v.len() / 2).copied().unwrap_or(Duration::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tensor(values: &[f32]) -> Tensor {
        let bytes = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        Tensor::from_bytes(DataType::F32, vec![values.len()], bytes).expect("tensor")
    }

    #[test]
    fn outputs_agree_within_the_tolerance_and_disagreements_are_named() {
        let a = tensor(&[1.0, -2.0, 100.0]);
        let close = tensor(&[1.000_5, -2.000_5, 100.05]);
        let d = max_difference(std::slice::from_ref(&a), &[close]).expect("agree");
        assert!(d > 0.04 && d < 0.06, "{d}");
        let far = tensor(&[1.0, -2.0, 100.2]);
        let why = max_difference(std::slice::from_ref(&a), &[far]).expect_err("disagree");
        assert!(why.contains("element 2"), "{why}");
        let shorter = tensor(&[1.0, -2.0]);
        assert!(
            max_difference(std::slice::from_ref(&a), &[shorter])
                .expect_err("shape")
                .contains("shape")
        );
        let nan = tensor(&[f32::NAN]);
        assert!(max_difference(&[nan], &[tensor(&[0.0])]).is_err(), "NaN against a number");
        let inf = tensor(&[f32::INFINITY, f32::NEG_INFINITY]);
        assert_eq!(max_difference(std::slice::from_ref(&inf), std::slice::from_ref(&inf)), Ok(0.0));
        let flags =
            |v: &[u8]| Tensor::from_bytes(DataType::Bool, vec![v.len()], v.to_vec()).expect("bool");
        assert_eq!(max_difference(&[flags(&[1, 0])], &[flags(&[1, 0])]), Ok(0.0));
        let why =
            max_difference(&[flags(&[1, 0])], &[flags(&[1, 1])]).expect_err("booleans differ");
        assert!(why.contains("element 1"), "{why}");
    }

    /// Returns its inputs.
    struct Echo;
    impl Engine for Echo {
        fn run(&self, inputs: Vec<Tensor>) -> Result<Vec<Tensor>, RunError> {
            Ok(inputs)
        }
    }

    /// Fails every run; panics on the second.
    #[derive(Default)]
    struct Refuses(std::sync::atomic::AtomicUsize);
    impl Engine for Refuses {
        fn run(&self, _: Vec<Tensor>) -> Result<Vec<Tensor>, RunError> {
            let n = self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            assert!(n != 1, "a panicking engine");
            Err(RunError("cannot run this".into()))
        }
    }

    /// While undecided, each request is served by tract at once; requests that one engine
    /// cannot run (or panics on) use up the attempts, and then tract stays, saying why.
    #[test]
    fn the_choice_gives_up_after_requests_that_do_not_run_on_both() {
        let tract: Arc<dyn Engine> = Arc::new(Echo);
        let undecided = Undecided {
            tract: tract.clone(),
            ort: Arc::new(Refuses::default()),
            threads: 1,
            attempts_left: REAL_REQUEST_ATTEMPTS,
            trying: false,
        };
        let choice = EngineChoice {
            chosen: "tract",
            reason: "waiting".into(),
            tract_us: None,
            onnxruntime_us: None,
            max_abs_difference: None,
            trial_shapes: Vec::new(),
            tolerance: String::new(),
        };
        let state = ChoiceState { serving: tract, choice, undecided: Some(undecided) };
        let chosen = Chosen { state: Arc::new(Mutex::new(state)) };
        let settled = |chosen: &Chosen| {
            let st = lock(&chosen.state);
            st.undecided.as_ref().is_none_or(|u| !u.trying)
        };
        for attempt in 0..REAL_REQUEST_ATTEMPTS {
            let out = chosen.run(vec![tensor(&[1.0, 2.0])]).expect("tract answers at once");
            assert_eq!(out[0].to_f64(), vec![1.0, 2.0]);
            let deadline = Instant::now() + Duration::from_secs(10);
            while !settled(&chosen) {
                assert!(Instant::now() < deadline, "attempt {attempt} never ended");
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        let st = lock(&chosen.state);
        assert!(st.undecided.is_none(), "no more attempts");
        assert_eq!(st.choice.chosen, "tract");
        assert!(st.choice.reason.contains("nor 3 real requests"), "{}", st.choice.reason);
    }

    #[test]
    fn trial_inputs_fill_every_type_with_one_row() {
        let every = [
            DataType::Bool,
            DataType::U8,
            DataType::U16,
            DataType::U32,
            DataType::U64,
            DataType::I8,
            DataType::I16,
            DataType::I32,
            DataType::I64,
            DataType::F16,
            DataType::F32,
            DataType::F64,
            DataType::Bytes,
        ];
        let signature = Signature {
            inputs: every
                .iter()
                .map(|dt| IoSpec {
                    name: dt.name().to_owned(),
                    datatype: *dt,
                    dims: vec![-1, 3, -1],
                })
                .collect(),
            outputs: Vec::new(),
            max_batch_size: 8,
            batching_off_reason: None,
        };
        let inputs = trial_inputs(&signature, 16).expect("every type");
        for (t, dt) in inputs.iter().zip(every) {
            assert_eq!((t.dtype(), t.shape()), (dt, &[1, 3, 16][..]));
        }
        let ints = inputs[7].to_f64();
        assert!(ints.iter().all(|v| (0.0..8.0).contains(v)), "{ints:?}");
    }
}
