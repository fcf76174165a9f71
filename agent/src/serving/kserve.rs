//! The `kserve` engine: batches go to a local accelerator server that speaks KServe v2 over
//! HTTP (an FPGA or NPU runtime, or another agent). The remote model's metadata gives the
//! signature at load; each batch is one `/infer` call with binary tensors.

use std::time::Duration;

use serde_json::{Value, json};

use super::model_config::{KserveTarget, ModelConfig};
use super::runner::{Engine, IoSpec, RunError, Signature};
use super::tensor::{DataType, Tensor};

/// A model served by another KServe v2 server.
#[derive(Debug)]
pub struct KserveEngine {
    agent: ureq::Agent,
    infer_url: String,
    inputs: Vec<IoSpec>,
    outputs: Vec<IoSpec>,
}

fn io_specs(meta: &Value, key: &str) -> Result<Vec<IoSpec>, String> {
    let list = meta
        .get(key)
        .and_then(Value::as_array)
        .ok_or_else(|| format!("metadata has no {key:?} list"))?;
    list.iter()
        .map(|io| {
            let name = io.get("name").and_then(Value::as_str).ok_or("an entry has no name")?;
            let dt = io.get("datatype").and_then(Value::as_str).unwrap_or_default();
            let datatype = DataType::parse(dt)
                .ok_or_else(|| format!("{name:?} has unknown datatype {dt:?}"))?;
            let dims = io
                .get("shape")
                .and_then(Value::as_array)
                .map(|s| s.iter().filter_map(Value::as_i64).collect())
                .unwrap_or_default();
            Ok(IoSpec { name: name.to_owned(), datatype, dims })
        })
        .collect()
}

impl KserveEngine {
    /// Reads the remote model's metadata and builds the engine.
    pub fn connect(
        target: &KserveTarget,
        config: &ModelConfig,
    ) -> Result<(Self, Signature), String> {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_connect(Some(Duration::from_secs(2)))
            .timeout_global(Some(target.timeout))
            .build()
            .into();
        let meta_url = format!("{}/v2/models/{}", target.url, target.model);
        let mut response =
            agent.get(&meta_url).call().map_err(|e| format!("kserve backend {meta_url}: {e}"))?;
        let status = response.status();
        let meta: Value = response
            .body_mut()
            .read_json()
            .map_err(|e| format!("kserve backend {meta_url}: unreadable metadata: {e}"))?;
        if !status.is_success() {
            return Err(format!("kserve backend {meta_url}: {status}: {meta}"));
        }
        let inputs =
            io_specs(&meta, "inputs").map_err(|e| format!("kserve backend {meta_url}: {e}"))?;
        let outputs =
            io_specs(&meta, "outputs").map_err(|e| format!("kserve backend {meta_url}: {e}"))?;
        let batchable = inputs.iter().chain(&outputs).all(|io| io.dims.first() == Some(&-1));
        let (max_batch_size, batching_off_reason) = if config.max_batch_size > 0 && !batchable {
            (
                0,
                Some(
                    "the remote model's shapes do not all start with a -1 batch dimension"
                        .to_owned(),
                ),
            )
        } else {
            (config.max_batch_size, None)
        };
        let engine = Self {
            agent,
            infer_url: format!("{}/v2/models/{}/infer", target.url, target.model),
            inputs: inputs.clone(),
            outputs: outputs.clone(),
        };
        Ok((engine, Signature { inputs, outputs, max_batch_size, batching_off_reason }))
    }
}

impl Engine for KserveEngine {
    fn run(&self, inputs: Vec<Tensor>) -> Result<Vec<Tensor>, RunError> {
        let mut binary = Vec::new();
        let mut header_inputs = Vec::new();
        for (spec, t) in self.inputs.iter().zip(&inputs) {
            let bytes = t.to_binary();
            header_inputs.push(json!({
                "name": spec.name,
                "shape": t.shape(),
                "datatype": t.dtype().name(),
                "parameters": {"binary_data_size": bytes.len()},
            }));
            binary.extend_from_slice(&bytes);
        }
        let outputs: Vec<Value> = self
            .outputs
            .iter()
            .map(|o| json!({"name": o.name, "parameters": {"binary_data": true}}))
            .collect();
        let header = json!({"inputs": header_inputs, "outputs": outputs}).to_string();
        let mut body = header.clone().into_bytes();
        body.extend_from_slice(&binary);
        let mut response = self
            .agent
            .post(&self.infer_url)
            .header("Inference-Header-Content-Length", header.len().to_string())
            .header("Content-Type", "application/octet-stream")
            .send(&body[..])
            .map_err(|e| RunError(format!("kserve backend {}: {e}", self.infer_url)))?;
        let status = response.status();
        let header_len = response
            .headers()
            .get("inference-header-content-length")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<usize>().ok());
        let raw = response.body_mut().with_config().limit(1 << 30).read_to_vec().map_err(|e| {
            RunError(format!("kserve backend {}: reading reply: {e}", self.infer_url))
        })?;
        let split = header_len.unwrap_or(raw.len()).min(raw.len());
        let reply: Value = serde_json::from_slice(&raw[..split]).map_err(|e| {
            RunError(format!("kserve backend {}: reply is not JSON: {e}", self.infer_url))
        })?;
        if !status.is_success() {
            let message = reply.get("error").and_then(Value::as_str).unwrap_or("no message");
            return Err(RunError(format!(
                "kserve backend {}: {status}: {message}",
                self.infer_url
            )));
        }
        super::http::decode_outputs(&reply, &raw[split..], &self.outputs)
            .map_err(|e| RunError(format!("kserve backend {}: {e}", self.infer_url)))
    }

    fn info(&self) -> super::runner::EngineInfo {
        super::runner::EngineInfo {
            provider: Some(self.infer_url.clone()),
            ..super::runner::EngineInfo::named("kserve")
        }
    }
}
