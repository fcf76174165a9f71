//! The inputs a search measures and compares on.
//!
//! `calibration.json` in the model's directory (beside the version directories), when present:
//! a JSON array of KServe v2 inference requests with their `data` inline (or one such request),
//! for example real requests saved from traffic. Each must give every input of the model by
//! name. Without the file, requests are synthesized from the signature with a fixed seed (one
//! row each; open sizes at 16), and the report says which was used. Synthesized inputs do not
//! suit every model (silero's frames must be 512 samples at a rate of 16000): such a model needs
//! the file.

use std::path::Path;

use crate::serving::auto::{trial_shape, trial_tensor};
use crate::serving::request;
use crate::serving::runner::Signature;
use crate::serving::tensor::{DataType, Tensor};

/// The file's name in the model's directory.
pub const FILE: &str = "calibration.json";

/// The seed synthesized inputs start from.
pub const SEED: usize = 7;

/// Open sizes of synthesized inputs.
pub const OPEN_SIZE: usize = 16;

/// Largest calibration file read.
pub const MAX_FILE_BYTES: u64 = 256 << 20;

/// The requests a search runs, and where they came from.
#[derive(Debug, Clone)]
pub struct Calibration {
    /// Each request's inputs, in signature order.
    pub requests: Vec<Vec<Tensor>>,
    /// `calibration.json (N requests)` or `synthesized (N requests, seed 7)`.
    pub source: String,
}

/// Reads `model_dir/calibration.json`, or synthesizes `rows` one-row requests.
pub fn load(model_dir: &Path, signature: &Signature, rows: usize) -> Result<Calibration, String> {
    let path = model_dir.join(FILE);
    if path.is_file() {
        let requests = from_file(&path, signature)?;
        return Ok(Calibration {
            source: format!("{} ({} requests)", path.display(), requests.len()),
            requests,
        });
    }
    let requests = synthesize(signature, rows.max(1))?;
    Ok(Calibration {
        source: format!("synthesized ({} requests, seed {SEED}; no {FILE})", requests.len()),
        requests,
    })
}

/// One-row requests of fixed pseudo-random values.
pub fn synthesize(signature: &Signature, rows: usize) -> Result<Vec<Vec<Tensor>>, String> {
    let inputs = signature.inputs.len();
    (0..rows)
        .map(|r| {
            signature
                .inputs
                .iter()
                .enumerate()
                .map(|(i, io)| {
                    let shape = trial_shape(signature, io, OPEN_SIZE);
                    trial_tensor(io, shape, SEED + r * inputs + i)
                        .map_err(|e| format!("synthesizing input {:?}: {e}", io.name))
                })
                .collect()
        })
        .collect()
}

fn from_file(path: &Path, signature: &Signature) -> Result<Vec<Vec<Tensor>>, String> {
    let shown = path.display();
    let size = std::fs::metadata(path).map_err(|e| format!("reading {shown}: {e}"))?.len();
    if size > MAX_FILE_BYTES {
        return Err(format!(
            "{shown} is {size} bytes, over the {MAX_FILE_BYTES}-byte limit; keep a few hundred representative requests"
        ));
    }
    let text = std::fs::read(path).map_err(|e| format!("reading {shown}: {e}"))?;
    let value: serde_json::Value = serde_json::from_slice(&text).map_err(|e| {
        format!("{shown} is not JSON: {e}; it must be a KServe v2 request or an array of them")
    })?;
    let list = match value {
        serde_json::Value::Array(list) => list,
        one => vec![one],
    };
    if list.is_empty() {
        return Err(format!("{shown} holds no request"));
    }
    list.iter()
        .enumerate()
        .map(|(r, one)| {
            let bytes = serde_json::to_vec(one).unwrap_or_default();
            let parsed = request::parse(&bytes)
                .map_err(|e| format!("{shown} request {r}: {e}"))?;
            let mut by_name = parsed.inputs;
            signature
                .inputs
                .iter()
                .map(|io| {
                    let at = by_name.iter().position(|h| h.name == io.name).ok_or_else(|| {
                        format!("{shown} request {r} has no input {:?}; give every input of the model", io.name)
                    })?;
                    let h = by_name.swap_remove(at);
                    let dtype = DataType::parse(&h.datatype).ok_or_else(|| {
                        format!("{shown} request {r} input {:?}: unknown datatype {:?}", io.name, h.datatype)
                    })?;
                    let data = h.data.ok_or_else(|| {
                        format!("{shown} request {r} input {:?}: no inline data (binary tensors are not read here)", io.name)
                    })?;
                    let (payload, _) = data
                        .into_payload(dtype)
                        .map_err(|e| format!("{shown} request {r} input {:?}: {e}", io.name))?;
                    let shape = h.shape.iter().map(|d| usize::try_from(*d).unwrap_or(usize::MAX)).collect();
                    Tensor::from_payload(dtype, shape, payload)
                        .map_err(|e| format!("{shown} request {r} input {:?}: {}", io.name, e.0))
                })
                .collect()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::serving::runner::IoSpec;

    fn signature() -> Signature {
        Signature {
            inputs: vec![IoSpec { name: "x".into(), datatype: DataType::F32, dims: vec![-1, 3] }],
            outputs: vec![],
            max_batch_size: 8,
            batching_off_reason: None,
        }
    }

    #[test]
    fn a_calibration_file_is_read_and_its_mistakes_are_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let sig = signature();
        let synthesized = load(dir.path(), &sig, 4).expect("synthesized");
        assert_eq!(synthesized.requests.len(), 4);
        assert_eq!(synthesized.requests[0][0].shape(), &[1, 3]);
        assert_ne!(synthesized.requests[0][0], synthesized.requests[1][0], "each request differs");
        assert!(synthesized.source.contains("seed 7"));
        std::fs::write(
            dir.path().join(FILE),
            r#"[{"inputs":[{"name":"x","shape":[1,3],"datatype":"FP32","data":[1,2,3]}]},
                {"inputs":[{"name":"x","shape":[2,3],"datatype":"FP32","data":[1,2,3,4,5,6]}]}]"#,
        )
        .expect("write");
        let read = load(dir.path(), &sig, 4).expect("read");
        assert_eq!(read.requests.len(), 2);
        assert_eq!(read.requests[1][0].shape(), &[2, 3]);
        assert_eq!(read.requests[0][0].to_f64(), vec![1.0, 2.0, 3.0]);
        std::fs::write(
            dir.path().join(FILE),
            r#"{"inputs":[{"name":"y","shape":[1],"datatype":"FP32","data":[1]}]}"#,
        )
        .expect("write");
        let why = load(dir.path(), &sig, 4).expect_err("no x");
        assert!(why.contains("has no input \"x\""), "{why}");
        std::fs::write(dir.path().join(FILE), "not json").expect("write");
        assert!(load(dir.path(), &sig, 4).expect_err("bad").contains("is not JSON"));
    }
}
