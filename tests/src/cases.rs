//! Inference cases for the Python clients: inputs, and the outputs tract computes for them
//! in-process, written as JSON the scripts under `tests/python` read.

use std::path::Path;

use agent::serving::model_config::ModelConfig;
use agent::serving::runner::{Engine, TractEngine};
use agent::serving::tensor::{DataType, Tensor};
use serde_json::{Value, json};

/// Deterministic values in [-1, 1).
pub fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut x = seed.wrapping_mul(6_364_136_223_846_793_005).max(1);
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % 2000) as f32 / 1000.0 - 1.0
        })
        .collect()
}

/// An FP32 tensor.
pub fn f32_tensor(shape: Vec<usize>, data: &[f32]) -> Tensor {
    Tensor::from_bytes(DataType::F32, shape, data.iter().flat_map(|v| v.to_le_bytes()).collect())
        .expect("the data fills the shape")
}

/// Runs a model on tract in-process and returns a case: inputs and the expected outputs.
pub fn tract_case(model: &str, file: &Path, inputs: Vec<(&str, Tensor)>) -> Value {
    let (engine, signature) =
        TractEngine::load(file, &ModelConfig::default()).expect("tract loads the model");
    let ordered: Vec<Tensor> = signature
        .inputs
        .iter()
        .map(|s| inputs.iter().find(|(n, _)| *n == s.name).expect("every input is given").1.clone())
        .collect();
    let outputs = engine.run(ordered).expect("tract runs the case");
    json!({
        "model": model,
        "inputs": inputs.iter().map(|(name, t)| json!({
            "name": name, "datatype": t.dtype().name(), "shape": t.shape(), "data": t.to_json(),
        })).collect::<Vec<_>>(),
        "outputs": signature.outputs.iter().zip(&outputs).map(|(spec, t)| json!({
            "name": spec.name, "shape": t.shape(), "data": t.to_f64(),
        })).collect::<Vec<_>>(),
    })
}
