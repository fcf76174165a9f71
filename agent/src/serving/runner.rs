//! The tract engine: loading an ONNX file (strict first, then lenient), describing its inputs
//! and outputs, and running batches with one optimized plan per concrete input shape.
//!
//! tract runs much faster on a plan whose shapes are all known, so a plan is built the first
//! time a shape is used (for a batched model: each batch size) and cached. Plans are shared by
//! the model's instance threads; running one is thread-safe.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use tract_onnx::prelude::{
    DatumType, Framework, InferenceFact, InferenceModel, InferenceModelExt, TValue,
    TypedRunnableModel, tvec,
};
use tract_onnx::tract_core::model::IntoRunnable;
use tract_onnx::tract_hir::infer::Factoid;
use tracing::{info, warn};

use super::model_config::{LoaderOptions, ModelConfig, TensorSpec};
use super::tensor::{DataType, Tensor};

/// Plans kept per model; the least recently built goes first beyond this.
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
}

/// A model loaded into tract.
pub struct TractEngine {
    template: InferenceModel,
    input_types: Vec<DatumType>,
    plans: Mutex<HashMap<Vec<Vec<usize>>, Arc<TypedRunnableModel>>>,
    plan_order: Mutex<Vec<Vec<Vec<usize>>>>,
}

impl std::fmt::Debug for TractEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TractEngine").field("inputs", &self.input_types).finish_non_exhaustive()
    }
}

/// Loads `path` with the loader settings in `options`: where a setting is unset, the strict
/// load is tried first and then the lenient ones (`ignore_output_shapes`, `ignore_value_info`).
pub fn load_onnx(path: &Path, options: LoaderOptions) -> Result<InferenceModel, String> {
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
    let mut first_error = None;
    for (ignore_output_shapes, ignore_value_info) in attempts {
        let onnx = tract_onnx::onnx()
            .with_ignore_output_shapes(ignore_output_shapes)
            .with_ignore_value_info(ignore_value_info);
        let loaded = onnx.model_for_path(path).and_then(|mut m| {
            m.analyse(false)?;
            Ok(m)
        });
        match loaded {
            Ok(model) => {
                if first_error.is_some() {
                    info!(
                        path = %path.display(),
                        ignore_output_shapes,
                        ignore_value_info,
                        "Model loaded with lenient tract loader settings."
                    );
                }
                return Ok(model);
            }
            Err(e) => {
                first_error.get_or_insert_with(|| format!("{e:#}"));
            }
        }
    }
    Err(first_error.unwrap_or_else(|| "no loader settings to try".to_owned()))
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
    pub fn load(path: &Path, config: &ModelConfig) -> Result<(Self, Signature), String> {
        let mut model = load_onnx(path, config.loader)?;
        let batching = config.max_batch_size > 0;
        let mut off_reason = None;
        let mut inputs = Vec::new();
        let mut input_types = Vec::new();
        let input_outlets = model.input_outlets().map_err(|e| format!("{e:#}"))?.to_vec();
        for (i, outlet) in input_outlets.iter().enumerate() {
            let name = model.node(outlet.node).name.clone();
            let fact = model.input_fact(i).map_err(|e| format!("{e:#}"))?.clone();
            let spec = spec_for(&config.inputs, &name);
            let dt = spec
                .and_then(|s| s.datatype)
                .map(DataType::to_tract)
                .or_else(|| fact.datum_type.concretize())
                .unwrap_or(DatumType::F32);
            let datatype = DataType::from_tract(dt)
                .ok_or_else(|| format!("input {name:?} has type {dt:?}, which KServe cannot carry"))?;
            let file_dims = dims_of(&fact);
            let dims = full_dims(spec, file_dims.as_deref(), batching);
            if batching && off_reason.is_none() {
                off_reason = batch_axis_problem("input", &name, spec, file_dims.as_deref());
            }
            if let Some(declared) = spec.and_then(|s| s.datatype) {
                // Pin the declared type so analysis can go further when the file is vague.
                let pinned = InferenceFact::default().with_datum_type(declared.to_tract());
                let merged = if fact.shape.rank().concretize().is_some() {
                    pinned.with_shape(fact.shape.clone())
                } else {
                    pinned
                };
                model.set_input_fact(i, merged).map_err(|e| format!("{e:#}"))?;
            }
            input_types.push(dt);
            inputs.push(IoSpec { name, datatype, dims });
        }
        let mut outputs = Vec::new();
        let output_outlets = model.output_outlets().map_err(|e| format!("{e:#}"))?.to_vec();
        for outlet in &output_outlets {
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
            let file_dims = dims_of(fact);
            if batching && off_reason.is_none() {
                off_reason = batch_axis_problem("output", &name, spec, file_dims.as_deref())
                    .filter(|_| file_dims.is_some() || spec.is_some_and(|s| s.dims.is_some()));
            }
            outputs.push(IoSpec { name, datatype, dims: full_dims(spec, file_dims.as_deref(), batching) });
        }
        let max_batch_size = if off_reason.is_some() { 0 } else { config.max_batch_size };
        if batching && max_batch_size == 0 {
            // Batching was asked for but is impossible: describe the file's own shapes.
            for (io, outlet) in inputs.iter_mut().zip(&input_outlets) {
                let fact = model.outlet_fact(*outlet).map_err(|e| format!("{e:#}"))?;
                io.dims = full_dims(spec_for(&config.inputs, &io.name), dims_of(fact).as_deref(), false);
            }
            for (io, outlet) in outputs.iter_mut().zip(&output_outlets) {
                let fact = model.outlet_fact(*outlet).map_err(|e| format!("{e:#}"))?;
                io.dims = full_dims(spec_for(&config.outputs, &io.name), dims_of(fact).as_deref(), false);
            }
        }
        let engine = Self {
            template: model,
            input_types,
            plans: Mutex::new(HashMap::new()),
            plan_order: Mutex::new(Vec::new()),
        };
        let signature =
            Signature { inputs, outputs, max_batch_size, batching_off_reason: off_reason };
        Ok((engine, signature))
    }

    fn plan_for(&self, shapes: Vec<Vec<usize>>) -> Result<Arc<TypedRunnableModel>, RunError> {
        if let Some(plan) = self.plans.lock().ok().and_then(|p| p.get(&shapes).cloned()) {
            return Ok(plan);
        }
        let mut model = self.template.clone();
        for (i, (shape, dt)) in shapes.iter().zip(&self.input_types).enumerate() {
            model
                .set_input_fact(i, InferenceFact::dt_shape(*dt, shape.as_slice()))
                .map_err(|e| RunError(format!("fixing input {i} to {shape:?}: {e:#}")))?;
        }
        let plan = model
            .into_optimized()
            .and_then(|m| m.into_runnable())
            .map_err(|e| RunError(format!("building a plan for shapes {shapes:?}: {e:#}")))?;
        if let (Ok(mut plans), Ok(mut order)) = (self.plans.lock(), self.plan_order.lock()) {
            if plans.len() >= MAX_PLANS && !order.is_empty() {
                let oldest = order.remove(0);
                plans.remove(&oldest);
            }
            plans.insert(shapes.clone(), plan.clone());
            order.push(shapes);
        }
        Ok(plan)
    }

    /// Plans built so far (for tests and stats).
    pub fn plan_count(&self) -> usize {
        self.plans.lock().map(|p| p.len()).unwrap_or(0)
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
            .map(|v| Tensor::from_tract(v).map_err(|e| RunError(e.0)))
            .collect()
    }
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
