//! The tract engine: loading an ONNX file (strict first, then lenient), describing its inputs
//! and outputs, and running batches with one optimized plan per concrete input shape.
//!
//! tract runs much faster on a plan whose shapes are all known, so a plan is built the first
//! time a shape is used (for a batched model: each batch size) and kept in an LRU cache of 32
//! per model (how many distinct client-chosen shapes reach it is capped in `limits`). Plans are shared by
//! the model's instance threads; running one is thread-safe. Some graphs build concrete plans
//! only under the lenient loader settings (silero's VAD needs `ignore_value_info`), so every
//! setting that loads is kept and tried in turn when a plan is built.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tracing::{info, warn};
use tract_onnx::prelude::{
    DatumType, Framework, InferenceFact, InferenceModel, InferenceModelExt, TDim, TValue,
    TypedRunnableModel, tvec,
};
use tract_onnx::tract_core::model::IntoRunnable;
use tract_onnx::tract_hir::infer::Factoid;

use super::model_config::{LoaderOptions, ModelConfig, TensorSpec, TractPrecision};
use super::tensor::{DataType, Tensor};

/// Plans kept per model; the least recently used goes first beyond this.
const MAX_PLANS: usize = 32;

/// An input or output as the API describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IoSpec {
    /// Graph name.
    pub name: String,
    /// Datatype.
    pub datatype: DataType,
    /// Full shape of one request, batch dim included as -1 when batching; -1 is any size.
    pub dims: Vec<i64>,
}

/// What a loaded model accepts and returns, and whether it batches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signature {
    /// Inputs in graph order.
    pub inputs: Vec<IoSpec>,
    /// Outputs in graph order.
    pub outputs: Vec<IoSpec>,
    /// Most rows per batch; 0 when each request runs alone.
    pub max_batch_size: usize,
    /// Why batching is off although the config asked for it.
    pub batching_off_reason: Option<String>,
}

/// Why a batch failed to run.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct RunError(pub String);

/// Runs batches: inputs in signature order, rows along axis 0; outputs in signature order.
pub trait Engine: Send + Sync + 'static {
    /// Runs one batch on the calling thread.
    fn run(&self, inputs: Vec<Tensor>) -> Result<Vec<Tensor>, RunError>;

    /// What runs the batches, for the model's config endpoint and log.
    fn info(&self) -> EngineInfo {
        EngineInfo::named("custom")
    }

    /// The model now runs `instances` batches at once: an engine that splits cores among them
    /// re-splits.
    fn instances_changed(&self, _instances: usize) {}
}

/// What runs a model's batches, as the config endpoint reports it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct EngineInfo {
    /// `tract`, `onnxruntime` or `kserve`.
    pub engine: &'static str,
    /// Threads one batch runs on (intra-op threads), where the engine is in this process.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub threads: Option<usize>,
    /// Whose pool those threads are: `host` (shared by every model that does not ask for its
    /// own) or `model` (a pool per instance).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub thread_pool: Option<&'static str>,
    /// tract's float precision: `f32` or `f16`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub precision: Option<&'static str>,
    /// tract's plans: one per concrete batch size, or one with a symbolic batch size.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub batch_plan: Option<&'static str>,
    /// How far onnxruntime rewrites the graph: `disabled`, `basic`, `extended` or `all`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub graph_optimization: Option<&'static str>,
    /// Where it runs: onnxruntime's execution provider (`CPU`, `CUDA`), or the remote URL.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub provider: Option<String>,
    /// The engine library and its version, where one was loaded at run time.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub library: Option<String>,
    /// How `backend = "auto"` chose this engine.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub choice: Option<super::auto::EngineChoice>,
}

impl EngineInfo {
    /// An engine with nothing more to say than its name.
    pub fn named(engine: &'static str) -> Self {
        Self {
            engine,
            threads: None,
            thread_pool: None,
            precision: None,
            batch_plan: None,
            graph_optimization: None,
            provider: None,
            library: None,
            choice: None,
        }
    }
}

/// Built plans by input shapes, each with the tick of its last use; beyond `capacity` the least
/// recently used is dropped (an LRU: a hot shape is never evicted by a stream of new ones).
struct PlanCache {
    by_shapes: HashMap<Vec<Vec<usize>>, (Arc<TypedRunnableModel>, u64)>,
    tick: u64,
    capacity: usize,
}

impl Default for PlanCache {
    fn default() -> Self {
        Self { by_shapes: HashMap::new(), tick: 0, capacity: MAX_PLANS }
    }
}

impl PlanCache {
    fn get(&mut self, shapes: &[Vec<usize>]) -> Option<Arc<TypedRunnableModel>> {
        self.tick += 1;
        let tick = self.tick;
        self.by_shapes.get_mut(shapes).map(|(plan, used)| {
            *used = tick;
            plan.clone()
        })
    }

    fn insert(&mut self, shapes: Vec<Vec<usize>>, plan: Arc<TypedRunnableModel>) {
        self.tick += 1;
        while self.by_shapes.len() >= self.capacity.max(1) && !self.by_shapes.contains_key(&shapes)
        {
            let oldest =
                self.by_shapes.iter().min_by_key(|(_, (_, used))| *used).map(|(k, _)| k.clone());
            match oldest {
                Some(k) => self.by_shapes.remove(&k),
                None => break,
            };
        }
        self.by_shapes.insert(shapes, (plan, self.tick));
    }
}

/// A model loaded into tract.
pub struct TractEngine {
    /// The model as loaded under each loader setting that worked, strict first.
    templates: Vec<((bool, bool), InferenceModel)>,
    /// The template that built the last plan.
    preferred: AtomicUsize,
    input_types: Vec<DatumType>,
    plans: Mutex<PlanCache>,
    /// f16 plans take f16 inputs and give f16 outputs; the engine casts at the edges.
    precision: TractPrecision,
    /// Whether each output is FP32 in the signature (an f16 plan's are widened back to it).
    outputs_f32: Vec<bool>,
    /// One plan per shape with the batch size left symbolic (every input's first axis), used
    /// for every batch size; set only for models that batch.
    symbolic_batch: bool,
}

impl std::fmt::Debug for TractEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TractEngine").field("inputs", &self.input_types).finish_non_exhaustive()
    }
}

/// The loader settings to try, in order: where `options` leaves a setting unset, strict first,
/// then lenient (`ignore_output_shapes`, `ignore_value_info`).
fn loader_attempts(options: LoaderOptions) -> Vec<(bool, bool)> {
    let choices = |set: Option<bool>| match set {
        Some(v) => vec![v],
        None => vec![false, true],
    };
    let mut attempts = Vec::new();
    for ignore_value_info in choices(options.ignore_value_info) {
        for ignore_output_shapes in choices(options.ignore_output_shapes) {
            attempts.push((ignore_output_shapes, ignore_value_info));
        }
    }
    attempts
}

/// Loads `path` with one choice of loader settings. Returns the model as loaded (the template
/// for concrete plans) and an analysed copy (for describing inputs and outputs).
fn load_onnx(
    path: &Path,
    (ignore_output_shapes, ignore_value_info): (bool, bool),
) -> Result<(InferenceModel, InferenceModel), String> {
    let onnx = tract_onnx::onnx()
        .with_ignore_output_shapes(ignore_output_shapes)
        .with_ignore_value_info(ignore_value_info);
    let raw = onnx.model_for_path(path).map_err(|e| format!("{e:#}"))?;
    let mut analysed = raw.clone();
    analysed.analyse(false).map_err(|e| format!("{e:#}"))?;
    Ok((raw, analysed))
}

fn dims_of(fact: &InferenceFact) -> Option<Vec<Option<i64>>> {
    let rank = fact.shape.rank().concretize()?;
    let dims: Vec<Option<i64>> =
        fact.shape.dims().map(|d| d.concretize().and_then(|t| t.to_i64().ok())).collect();
    (usize::try_from(rank).ok() == Some(dims.len())).then_some(dims)
}

fn spec_for<'a>(specs: &'a [TensorSpec], name: &str) -> Option<&'a TensorSpec> {
    specs.iter().find(|s| s.name == name)
}

impl TractEngine {
    /// Loads a model and works out its signature. Config entries fill in what the file leaves
    /// open; batching is turned off (with the reason) when an input or output has no batch axis.
    ///
    /// The signature comes from the first loader setting under which the graph analyses
    /// (strict settings keep the file's declared shapes). Every setting that loads is kept;
    /// each plan is built from the first one under which it builds.
    pub fn load(path: &Path, config: &ModelConfig) -> Result<(Self, Signature), String> {
        let mut first_error: Option<String> = None;
        let mut loaded = Vec::new();
        for flags in loader_attempts(config.loader) {
            match load_onnx(path, flags) {
                Ok(models) => loaded.push((flags, models)),
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        let Some((_, (_, described))) = loaded.first() else {
            return Err(first_error.unwrap_or_else(|| "no loader settings to try".to_owned()));
        };
        let (signature, input_types) = describe(described, config)?;
        let engine = Self {
            templates: loaded.into_iter().map(|(flags, (template, _))| (flags, template)).collect(),
            preferred: AtomicUsize::new(0),
            input_types,
            plans: Mutex::default(),
            precision: config.loader.precision,
            outputs_f32: signature.outputs.iter().map(|o| o.datatype == DataType::F32).collect(),
            symbolic_batch: config.loader.symbolic_batch && signature.max_batch_size > 0,
        };
        // A trial plan for one request, when the model fixes every size but the batch: it
        // catches broken graphs at load and warms the cache. With sizes left open, the graph
        // must still analyse once input shapes are given, or no request could ever run.
        match trial_shapes(&signature) {
            Some(shapes) => {
                engine.plan_for(shapes).map_err(|e| e.0)?;
            }
            None => engine.check_open_sizes(&signature)?,
        }
        Ok((engine, signature))
    }

    /// Checks that a model with open sizes analyses once its input shapes are given: first with
    /// a symbol for each open size (what tract needs to type the graph), then, for graphs that
    /// only type with numbers (a `Reshape` fed by a `Shape` chain), with each open size at 1.
    /// Either one passing is enough; a graph that fails both (an `If` whose branches give
    /// different shapes under a condition known only at run time) fails every request, so it is
    /// refused here with tract's reason.
    fn check_open_sizes(&self, signature: &Signature) -> Result<(), String> {
        let mut symbolic_error = None;
        for (_, template) in &self.templates {
            match self.type_with_symbols(template, signature) {
                Ok(()) => return Ok(()),
                Err(e) => {
                    symbolic_error.get_or_insert(e);
                }
            }
        }
        let ones: Vec<Vec<usize>> = signature
            .inputs
            .iter()
            .map(|io| io.dims.iter().map(|d| usize::try_from(*d).unwrap_or(1)).collect())
            .collect();
        // Built and dropped: a size of 1 is a guess, not a shape requests are known to send.
        match (0..self.templates.len()).find_map(|index| self.build(index, &ones).ok()) {
            Some(_) => Ok(()),
            None => Err(format!(
                "tract cannot analyse the graph once input shapes are given, so no request \
                 could run: {}",
                symbolic_error.unwrap_or_else(|| "no loader settings".to_owned())
            )),
        }
    }

    /// Types a copy of `template` with a fresh symbol for each open input size.
    fn type_with_symbols(
        &self,
        template: &InferenceModel,
        signature: &Signature,
    ) -> Result<(), String> {
        let mut model = template.clone();
        for (i, (io, dt)) in signature.inputs.iter().zip(&self.input_types).enumerate() {
            let dims: Vec<TDim> = io
                .dims
                .iter()
                .enumerate()
                .map(|(axis, d)| match usize::try_from(*d) {
                    Ok(d) => TDim::from(d),
                    Err(_) => model.symbols.sym(&format!("flotilla_open_{i}_{axis}")).into(),
                })
                .collect();
            model
                .set_input_fact(i, InferenceFact::dt_shape(*dt, dims))
                .map_err(|e| format!("giving input {i} open sizes: {e:#}"))?;
        }
        let typed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| model.into_typed()));
        match typed {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(format!("{e:#}")),
            Err(_) => Err("tract panicked typing the graph with open sizes".to_owned()),
        }
    }

    fn plan_for(&self, mut shapes: Vec<Vec<usize>>) -> Result<Arc<TypedRunnableModel>, RunError> {
        // A symbolic-batch plan is kept under the shapes with the batch axis at 0.
        if self.symbolic_batch {
            for shape in &mut shapes {
                if let Some(batch) = shape.first_mut() {
                    *batch = 0;
                }
            }
        }
        if let Some(plan) = self.plans.lock().ok().and_then(|mut p| p.get(&shapes)) {
            return Ok(plan);
        }
        // Try the loader setting that worked last, then the others in order (strict first).
        let first = self.preferred.load(Ordering::Relaxed);
        let order = std::iter::once(first).chain((0..self.templates.len()).filter(|i| *i != first));
        let mut first_error = None;
        let mut plan = None;
        for index in order {
            match self.build(index, &shapes) {
                Ok(p) => {
                    if index != first {
                        let (ignore_output_shapes, ignore_value_info) = self.templates[index].0;
                        info!(
                            ignore_output_shapes,
                            ignore_value_info, "Plans now come from lenient tract loader settings."
                        );
                    }
                    self.preferred.store(index, Ordering::Relaxed);
                    plan = Some(p);
                    break;
                }
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        let Some(plan) = plan else {
            let e = first_error.unwrap_or_else(|| "no loader settings".to_owned());
            return Err(RunError(format!("building a plan for shapes {shapes:?}: {e}")));
        };
        if let Ok(mut cache) = self.plans.lock() {
            cache.insert(shapes, plan.clone());
        }
        Ok(plan)
    }

    fn build(
        &self,
        index: usize,
        shapes: &[Vec<usize>],
    ) -> Result<Arc<TypedRunnableModel>, String> {
        let Some((_, template)) = self.templates.get(index) else {
            return Err("no such template".into());
        };
        let mut model = template.clone();
        let batch: TDim = model.symbols.sym("N").into();
        for (i, (shape, dt)) in shapes.iter().zip(&self.input_types).enumerate() {
            let dims: Vec<TDim> =
                shape
                    .iter()
                    .enumerate()
                    .map(|(axis, d)| {
                        if self.symbolic_batch && axis == 0 {
                            batch.clone()
                        } else {
                            TDim::from(*d)
                        }
                    })
                    .collect();
            model
                .set_input_fact(i, InferenceFact::dt_shape(*dt, dims))
                .map_err(|e| format!("fixing input {i} to {shape:?}: {e:#}"))?;
        }
        // tract can panic on shapes a graph does not support; that fails this plan, not the agent.
        let half = self.precision == TractPrecision::F16;
        let built = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let typed = model.into_typed()?;
            let typed = if half {
                let to_f16 = tract_onnx::tract_core::transform::get_transform("f32_to_f16")?
                    .ok_or_else(|| anyhow::anyhow!("this tract has no f32_to_f16 transform"))?;
                to_f16.transform_into(typed.into_decluttered()?)?
            } else {
                typed
            };
            typed.into_optimized().and_then(|m| m.into_runnable())
        }));
        match built {
            Ok(Ok(plan)) => Ok(plan),
            Ok(Err(e)) => Err(format!("{e:#}")),
            Err(_) => Err("tract panicked (the graph does not support these shapes)".to_owned()),
        }
    }

    /// Plans built so far (for tests and stats).
    pub fn plan_count(&self) -> usize {
        self.plans.lock().map(|p| p.by_shapes.len()).unwrap_or(0)
    }

    /// Whether a plan for these input shapes is cached (for tests).
    pub fn has_plan(&self, shapes: &[Vec<usize>]) -> bool {
        self.plans.lock().is_ok_and(|p| p.by_shapes.contains_key(shapes))
    }

    /// Sets how many plans are kept (for tests; the default is 32).
    pub fn set_plan_capacity(&self, capacity: usize) {
        if let Ok(mut p) = self.plans.lock() {
            p.capacity = capacity;
        }
    }
}

impl Engine for TractEngine {
    fn run(&self, inputs: Vec<Tensor>) -> Result<Vec<Tensor>, RunError> {
        let shapes: Vec<Vec<usize>> = inputs.iter().map(|t| t.shape().to_vec()).collect();
        let plan = self.plan_for(shapes)?;
        let mut values = tvec![];
        for (i, t) in inputs.iter().enumerate() {
            let tensor = t.to_tract().map_err(|e| RunError(format!("input {i}: {e}")))?;
            let want = self.input_types.get(i).copied().unwrap_or(tensor.datum_type());
            // An f16 plan takes the f32 inputs in half precision.
            let want = match want {
                DatumType::F32 if self.precision == TractPrecision::F16 => DatumType::F16,
                other => other,
            };
            let tensor = if tensor.datum_type() == want {
                tensor
            } else {
                tensor
                    .cast_to_dt(want)
                    .map_err(|e| RunError(format!("input {i}: {e:#}")))?
                    .into_owned()
            };
            values.push(TValue::from(tensor));
        }
        let outputs = plan.run(values).map_err(|e| RunError(format!("{e:#}")))?;
        outputs
            .iter()
            .enumerate()
            .map(|(i, v)| {
                // ... and gives f32 back where the signature says FP32 (an output the file
                // declares FP16 stays FP16).
                let widen = self.outputs_f32.get(i).copied().unwrap_or(false);
                if widen && v.datum_type() == DatumType::F16 {
                    let wide =
                        v.cast_to_dt(DatumType::F32).map_err(|e| RunError(format!("{e:#}")))?;
                    Tensor::from_tract(&wide).map_err(|e| RunError(e.0))
                } else {
                    Tensor::from_tract(v).map_err(|e| RunError(e.0))
                }
            })
            .collect()
    }

    fn info(&self) -> EngineInfo {
        // tract runs a plan on the calling instance thread only.
        EngineInfo {
            threads: Some(1),
            precision: Some(self.precision.name()),
            batch_plan: Some(if self.symbolic_batch { "symbolic" } else { "concrete" }),
            ..EngineInfo::named("tract")
        }
    }
}

/// The signature of an analysed model, and the tract type of each input.
fn describe(
    model: &InferenceModel,
    config: &ModelConfig,
) -> Result<(Signature, Vec<DatumType>), String> {
    let mut inputs = Vec::new();
    let mut input_types = Vec::new();
    let input_outlets = model.input_outlets().map_err(|e| format!("{e:#}"))?.to_vec();
    for (i, outlet) in input_outlets.iter().enumerate() {
        let name = model.node(outlet.node).name.clone();
        let fact = model.input_fact(i).map_err(|e| format!("{e:#}"))?;
        let spec = spec_for(&config.inputs, &name);
        let dt = spec
            .and_then(|s| s.datatype)
            .map(DataType::to_tract)
            .or_else(|| fact.datum_type.concretize())
            .unwrap_or(DatumType::F32);
        let datatype = DataType::from_tract(dt)
            .ok_or_else(|| format!("input {name:?} has type {dt:?}, which KServe cannot carry"))?;
        input_types.push(dt);
        inputs.push((IoSpec { name, datatype, dims: Vec::new() }, dims_of(fact)));
    }
    let mut outputs = Vec::new();
    for outlet in model.output_outlets().map_err(|e| format!("{e:#}"))? {
        let name = model
            .outlet_label(*outlet)
            .map_or_else(|| model.node(outlet.node).name.clone(), str::to_owned);
        let fact = model.outlet_fact(*outlet).map_err(|e| format!("{e:#}"))?;
        let spec = spec_for(&config.outputs, &name);
        let dt = spec
            .and_then(|s| s.datatype)
            .map(DataType::to_tract)
            .or_else(|| fact.datum_type.concretize())
            .unwrap_or(DatumType::F32);
        let datatype = DataType::from_tract(dt).unwrap_or(DataType::F32);
        outputs.push((IoSpec { name, datatype, dims: Vec::new() }, dims_of(fact)));
    }
    let signature = assemble_signature(inputs, outputs, config);
    Ok((signature, input_types))
}

/// An input or output as an engine reads it from the file: its API description (dims still
/// empty) and the file's dims, each `None` where open; `None` for all when the rank is unknown.
pub(super) type FileIo = (IoSpec, Option<Vec<Option<i64>>>);

/// The signature from what an engine read from the file and what the config says: batching is
/// turned off, with the reason, when an input or output has no batch axis; the config's dims
/// fill in what the file leaves open.
pub(super) fn assemble_signature(
    inputs: Vec<FileIo>,
    outputs: Vec<FileIo>,
    config: &ModelConfig,
) -> Signature {
    let mut off_reason = None;
    if config.max_batch_size > 0 {
        let all = inputs
            .iter()
            .map(|io| ("input", io, &config.inputs))
            .chain(outputs.iter().map(|io| ("output", io, &config.outputs)));
        for (what, (io, file), specs) in all {
            off_reason =
                batch_axis_problem(what, &io.name, spec_for(specs, &io.name), file.as_deref());
            if off_reason.is_some() {
                break;
            }
        }
    }
    let max_batch_size = if off_reason.is_some() { 0 } else { config.max_batch_size };
    let finish = |list: Vec<FileIo>, specs: &[TensorSpec]| {
        list.into_iter()
            .map(|(mut io, file)| {
                io.dims = full_dims(spec_for(specs, &io.name), file.as_deref(), max_batch_size > 0);
                io
            })
            .collect()
    };
    Signature {
        inputs: finish(inputs, &config.inputs),
        outputs: finish(outputs, &config.outputs),
        max_batch_size,
        batching_off_reason: off_reason,
    }
}

/// Shapes for a trial plan of one request (one row on the batch axis), if every other size is
/// known.
pub(super) fn trial_shapes(signature: &Signature) -> Option<Vec<Vec<usize>>> {
    signature
        .inputs
        .iter()
        .map(|io| {
            io.dims
                .iter()
                .enumerate()
                .map(|(axis, d)| match usize::try_from(*d) {
                    Ok(d) => Some(d),
                    Err(_) if axis == 0 && signature.max_batch_size > 0 => Some(1),
                    Err(_) => None,
                })
                .collect()
        })
        .collect()
}

/// Full per-request dims: batch dim -1 first when batching, then the config's or the file's.
fn full_dims(spec: Option<&TensorSpec>, file: Option<&[Option<i64>]>, batching: bool) -> Vec<i64> {
    if let Some(dims) = spec.and_then(|s| s.dims.clone()) {
        return if batching { std::iter::once(-1).chain(dims).collect() } else { dims };
    }
    let Some(file) = file else { return if batching { vec![-1] } else { vec![] } };
    let mut dims: Vec<i64> = file.iter().map(|d| d.unwrap_or(-1)).collect();
    if batching && let Some(first) = dims.first_mut() {
        *first = -1;
    }
    dims
}

/// Why an input or output cannot be batched along axis 0, if it cannot.
fn batch_axis_problem(
    what: &str,
    name: &str,
    spec: Option<&TensorSpec>,
    file: Option<&[Option<i64>]>,
) -> Option<String> {
    if spec.and_then(|s| s.dims.as_ref()).is_some() {
        return None; // the config says the batch dim comes first
    }
    match file {
        Some([]) => Some(format!("{what} {name:?} is a scalar, so it has no batch axis")),
        Some([Some(n), ..]) => Some(format!(
            "{what} {name:?} has a fixed first dimension ({n}) in the model file, so it has no batch axis"
        )),
        _ => None,
    }
}

/// Logs why batching is off for a model, once at load.
pub fn log_signature(model: &str, signature: &Signature) {
    if let Some(reason) = &signature.batching_off_reason {
        warn!(model, reason = %reason, "Batching is off for this model; each request runs alone.");
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::path::PathBuf;

    /// A model from the shared development data (`../shared/data/models` beside the checkout).
    pub(crate) fn shared_model(file: &str) -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/data/models").join(file)
    }

    fn pseudo_random_f32(n: usize, seed: u32) -> Vec<u8> {
        let mut x = seed.wrapping_mul(2_654_435_761).max(1);
        let mut out = Vec::with_capacity(n * 4);
        for _ in 0..n {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            let v = (x % 2000) as f32 / 1000.0 - 1.0;
            out.extend_from_slice(&v.to_le_bytes());
        }
        out
    }

    #[test]
    fn ocr_classifier_batches_and_matches_single_runs() {
        let config = ModelConfig::default();
        let (engine, sig) =
            TractEngine::load(&shared_model("ppocr_mobile_v2_cls.onnx"), &config).expect("loads");
        assert_eq!(sig.max_batch_size, 8, "{:?}", sig.batching_off_reason);
        assert_eq!(sig.inputs.len(), 1);
        assert_eq!(sig.inputs[0].name, "x");
        assert_eq!(sig.inputs[0].datatype, DataType::F32);
        assert_eq!(sig.inputs[0].dims, vec![-1, 3, -1, -1]);
        assert_eq!(sig.outputs[0].dims, vec![-1, 2]);
        let row = 3 * 48 * 192;
        let a = Tensor::from_bytes(DataType::F32, vec![1, 3, 48, 192], pseudo_random_f32(row, 1))
            .expect("a");
        let b = Tensor::from_bytes(DataType::F32, vec![1, 3, 48, 192], pseudo_random_f32(row, 2))
            .expect("b");
        let single_a = engine.run(vec![a.clone()]).expect("a runs");
        let single_b = engine.run(vec![b.clone()]).expect("b runs");
        let both = Tensor::concat_rows(&[&a, &b]).expect("batch");
        let batched = engine.run(vec![both]).expect("batch runs");
        assert_eq!(batched[0].shape(), &[2, 2]);
        assert_eq!(engine.plan_count(), 2, "one plan per batch size (H and W are open: no trial)");
        let joined: Vec<f64> =
            single_a[0].to_f64().into_iter().chain(single_b[0].to_f64()).collect();
        for (x, y) in batched[0].to_f64().iter().zip(&joined) {
            assert!((x - y).abs() < 1e-5, "batched {x} vs single {y}");
        }
    }

    #[test]
    fn one_symbolic_batch_plan_serves_every_batch_size_and_f16_stays_close() {
        // text_cnn (INT32 tokens [N, 512]) types with a symbolic batch size.
        let file = crate::serving::onnxruntime::tests::fixture("text_cnn.onnx");
        let tokens = |n: usize| {
            let data: Vec<u8> = (0..n * 512)
                .flat_map(|i| i32::try_from(i * 7 % 61).unwrap_or(0).to_le_bytes())
                .collect();
            Tensor::from_bytes(DataType::I32, vec![n, 512], data).expect("tokens")
        };
        let (reference, _) = TractEngine::load(&file, &ModelConfig::default()).expect("loads");
        let mut config = ModelConfig::default();
        config.loader.symbolic_batch = true;
        let (symbolic, _) = TractEngine::load(&file, &config).expect("loads");
        assert_eq!(symbolic.info().batch_plan, Some("symbolic"));
        let per_size_before = reference.plan_count();
        for n in [1, 2, 4] {
            let want = reference.run(vec![tokens(n)]).expect("per-size plan");
            let got = symbolic.run(vec![tokens(n)]).expect("symbolic plan");
            assert_eq!(got[0].shape(), &[n, 4]);
            for (x, y) in got[0].to_f64().iter().zip(want[0].to_f64()) {
                assert!((x - y).abs() < 1e-5, "batch {n}: {x} vs {y}");
            }
        }
        assert_eq!(symbolic.plan_count(), 1, "one plan for batch sizes 1, 2 and 4");
        assert!(reference.plan_count() >= per_size_before + 2, "a plan per size");
        // ppocr's Reshape from a Shape chain does not type with a symbolic batch: refused at
        // load with tract's reason, so the optimizer reports that candidate as failed.
        let ppocr = shared_model("ppocr_mobile_v2_cls.onnx");
        let refused = TractEngine::load(&ppocr, &config).expect_err("no symbolic plan");
        assert!(refused.contains("Reshape"), "{refused}");
        // Half precision: f32 on the wire, the same classes, a small error.
        let file = ppocr;
        let row = 3 * 48 * 192;
        let rows = |n: usize| {
            Tensor::from_bytes(DataType::F32, vec![n, 3, 48, 192], pseudo_random_f32(row * n, 3))
                .expect("rows")
        };
        let (reference, _) = TractEngine::load(&file, &ModelConfig::default()).expect("loads");
        config.loader.symbolic_batch = false;
        config.loader.precision = TractPrecision::F16;
        let (half, _) = TractEngine::load(&file, &config).expect("loads");
        assert_eq!(half.info().precision, Some("f16"));
        let got = half.run(vec![rows(2)]).expect("f16 plan");
        let want = reference.run(vec![rows(2)]).expect("f32 plan");
        assert_eq!(got[0].dtype(), DataType::F32);
        for (x, y) in got[0].to_f64().iter().zip(want[0].to_f64()) {
            assert!((x - y).abs() < 0.05, "f16 {x} vs f32 {y}");
        }
    }

    #[test]
    fn vad_with_scalar_and_state_inputs_runs_unbatched_with_a_reason() {
        let config = ModelConfig::default();
        let (engine, sig) =
            TractEngine::load(&shared_model("silero_vad_op18_ifless.onnx"), &config)
                .expect("loads");
        assert_eq!(sig.max_batch_size, 0);
        let reason = sig.batching_off_reason.clone().expect("a reason");
        assert!(reason.contains("sr") || reason.contains("state"), "{reason}");
        let names: Vec<&str> = sig.inputs.iter().map(|i| i.name.as_str()).collect();
        assert_eq!(names, ["input", "sr", "state"]);
        let mut inputs = Vec::new();
        for spec in &sig.inputs {
            inputs.push(
                match spec.name.as_str() {
                    "input" => {
                        Tensor::from_bytes(DataType::F32, vec![1, 512], pseudo_random_f32(512, 3))
                    }
                    "state" => {
                        Tensor::from_bytes(DataType::F32, vec![2, 1, 128], vec![0; 2 * 128 * 4])
                    }
                    "sr" => {
                        Tensor::from_bytes(DataType::I64, vec![], 16_000i64.to_le_bytes().to_vec())
                    }
                    other => panic!("unexpected input {other}"),
                }
                .expect("tensor"),
            );
        }
        let out = engine.run(inputs).expect("runs");
        assert_eq!(out.len(), 2);
        let probability = out[0].to_f64()[0];
        assert!((0.0..=1.0).contains(&probability), "{probability}");
        assert_eq!(out[1].shape(), &[2, 1, 128]);
    }

    /// The plan cache keeps the shape in use: with room for two plans, using A, B, A, C drops
    /// B (least recently used), where the old FIFO dropped A.
    #[test]
    fn plan_cache_is_lru() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("model.onnx");
        std::fs::write(&path, crate::serving::demo::DEMO_ONNX).expect("write");
        let (engine, _) = TractEngine::load(&path, &ModelConfig::default()).expect("loads");
        engine.set_plan_capacity(2);
        let rows = |n: usize| {
            Tensor::from_bytes(DataType::F32, vec![n, 4], vec![0; n * 16]).expect("tensor")
        };
        for n in [1, 2, 1, 3] {
            engine.run(vec![rows(n)]).expect("runs");
        }
        assert!(engine.has_plan(&[vec![1, 4]]), "the hot shape stays");
        assert!(engine.has_plan(&[vec![3, 4]]));
        assert!(!engine.has_plan(&[vec![2, 4]]), "the least recently used goes");
        assert_eq!(engine.plan_count(), 2);
    }

    /// A fixture made by `tests/python/make_fixtures.py` (committed under `tests/fixtures`).
    fn fixture(file: &str) -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures").join(file)
    }

    #[test]
    fn a_model_tract_cannot_analyse_fails_at_load_naming_the_node() {
        // Branches of different shapes under an undecided condition, nested: the analysis at
        // load must fail, naming the node, so the model is never listed ready.
        let err = TractEngine::load(&fixture("nested_if.onnx"), &ModelConfig::default())
            .expect_err("a model tract cannot analyse does not load");
        assert!(
            err.contains("Failed analyse") && err.contains("If_0"),
            "the failing node is named: {err}"
        );
    }

    #[test]
    fn a_broken_file_is_reported_with_tracts_message() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("model.onnx");
        std::fs::write(&path, b"not a protobuf").expect("write");
        let err = TractEngine::load(&path, &ModelConfig::default()).unwrap_err();
        // tract's own words for what failed: the file is not an ONNX protobuf.
        assert!(err.contains("failed to decode Protobuf message"), "{err}");
    }
}
