//! The inference HTTP API: KServe v2 / Open Inference Protocol REST with JSON and binary
//! tensors, Triton's model configuration, statistics and repository extensions, and `/metrics`.
//!
//! Every error is `{"error": "..."}` naming what was wrong: 400 for a request that does not fit
//! the model (input, expected, actual), 404 for an unknown model or version, 413 for a body over
//! the limit, 503 when the model is not ready or its queue is full, 504 when the deadline passed
//! before compute, 500 when the engine failed.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Map, Value, json};

use super::batcher::Refusal;
use super::model::{InferError, LoadedModel};
use super::repository::{LookupError, ModelState, Repository};
use super::runner::IoSpec;
use super::stats::render_prometheus;
use super::tensor::{DataType, Tensor};

/// The binary extension's header naming the JSON part's length.
pub const HEADER_LENGTH: &str = "inference-header-content-length";

/// What the handlers share.
#[derive(Debug, Clone)]
pub struct ApiState {
    /// The models.
    pub repository: Arc<Repository>,
    /// Largest request body accepted, bytes.
    pub max_request_bytes: usize,
}

/// An error response.
#[derive(Debug)]
pub struct ApiError(StatusCode, String);

impl ApiError {
    fn bad(msg: impl Into<String>) -> Self {
        Self(StatusCode::BAD_REQUEST, msg.into())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, axum::Json(json!({ "error": self.1 }))).into_response()
    }
}

impl From<LookupError> for ApiError {
    fn from(e: LookupError) -> Self {
        let status = match e {
            LookupError::Unknown(_) | LookupError::NoVersion { .. } => StatusCode::NOT_FOUND,
            LookupError::NotReady { .. } => StatusCode::SERVICE_UNAVAILABLE,
        };
        Self(status, e.to_string())
    }
}

impl From<InferError> for ApiError {
    fn from(e: InferError) -> Self {
        let status = match &e {
            InferError::Refused { refusal: Refusal::QueueFull { .. }, .. }
            | InferError::Unloaded { .. } => StatusCode::SERVICE_UNAVAILABLE,
            InferError::Refused { .. } => StatusCode::BAD_REQUEST,
            InferError::Expired { .. } => StatusCode::GATEWAY_TIMEOUT,
            InferError::Failed { .. } => StatusCode::INTERNAL_SERVER_ERROR,
        };
        Self(status, e.to_string())
    }
}

type ApiResult<T> = Result<T, ApiError>;

/// The router.
pub fn router(state: ApiState) -> Router {
    Router::new()
        .route("/v2", get(server_metadata))
        .route("/v2/health/live", get(|| async { axum::Json(json!({"live": true})) }))
        .route("/v2/health/ready", get(server_ready))
        .route("/v2/models/stats", get(all_stats))
        .route("/v2/models/{model}", get(metadata))
        .route("/v2/models/{model}/versions/{version}", get(metadata_v))
        .route("/v2/models/{model}/ready", get(ready))
        .route("/v2/models/{model}/versions/{version}/ready", get(ready_v))
        .route("/v2/models/{model}/config", get(config))
        .route("/v2/models/{model}/versions/{version}/config", get(config_v))
        .route("/v2/models/{model}/stats", get(stats))
        .route("/v2/models/{model}/versions/{version}/stats", get(stats_v))
        .route("/v2/models/{model}/infer", post(infer))
        .route("/v2/models/{model}/versions/{version}/infer", post(infer_v))
        .route("/v2/repository/index", post(index))
        .route("/v2/repository/models/{model}/load", post(load))
        .route("/v2/repository/models/{model}/unload", post(unload))
        .route("/metrics", get(metrics))
        .fallback(|| async {
            ApiError(StatusCode::NOT_FOUND, "no such endpoint; see /v2 and docs/serving.md".into())
        })
        .method_not_allowed_fallback(|| async {
            ApiError(StatusCode::METHOD_NOT_ALLOWED, "method not allowed on this endpoint".into())
        })
        .with_state(state)
}

async fn server_metadata() -> axum::Json<Value> {
    axum::Json(json!({
        "name": "flotilla",
        "version": env!("CARGO_PKG_VERSION"),
        "extensions": ["binary_tensor_data", "model_configuration", "model_repository", "statistics", "schedule_policy"],
    }))
}

async fn server_ready(State(s): State<ApiState>) -> Response {
    let index = s.repository.index();
    let ready = index.iter().any(|e| e.state == "READY") || index.is_empty();
    let status = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, axum::Json(json!({ "ready": ready }))).into_response()
}

fn io_json(io: &IoSpec) -> Value {
    json!({"name": io.name, "datatype": io.datatype.name(), "shape": io.dims})
}

fn metadata_json(s: &ApiState, name: &str, m: &LoadedModel) -> Value {
    let versions: Vec<String> = match s.repository.state(name) {
        Some(ModelState::Ready(v)) => v.iter().map(|m| m.version.clone()).collect(),
        _ => vec![m.version.clone()],
    };
    json!({
        "name": name,
        "versions": versions,
        "platform": match m.config.backend { super::model_config::Backend::Tract => "tract_onnx", super::model_config::Backend::Kserve(_) => "kserve" },
        "inputs": m.signature.inputs.iter().map(io_json).collect::<Vec<_>>(),
        "outputs": m.signature.outputs.iter().map(io_json).collect::<Vec<_>>(),
    })
}

async fn metadata(
    State(s): State<ApiState>,
    Path(model): Path<String>,
) -> ApiResult<axum::Json<Value>> {
    let m = s.repository.get(&model, None)?;
    Ok(axum::Json(metadata_json(&s, &model, &m)))
}

async fn metadata_v(
    State(s): State<ApiState>,
    Path((model, version)): Path<(String, String)>,
) -> ApiResult<axum::Json<Value>> {
    let m = s.repository.get(&model, Some(&version))?;
    Ok(axum::Json(metadata_json(&s, &model, &m)))
}

async fn ready(
    State(s): State<ApiState>,
    Path(model): Path<String>,
) -> ApiResult<axum::Json<Value>> {
    s.repository.get(&model, None)?;
    Ok(axum::Json(json!({"name": model, "ready": true})))
}

async fn ready_v(
    State(s): State<ApiState>,
    Path((model, version)): Path<(String, String)>,
) -> ApiResult<axum::Json<Value>> {
    s.repository.get(&model, Some(&version))?;
    Ok(axum::Json(json!({"name": model, "version": version, "ready": true})))
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

fn config_json(m: &Arc<LoadedModel>) -> Value {
    let c = &m.config;
    let batched = m.signature.max_batch_size > 0;
    let dims = |io: &IoSpec| -> Vec<i64> {
        if batched { io.dims.iter().skip(1).copied().collect() } else { io.dims.clone() }
    };
    let tensors = |list: &[IoSpec]| -> Vec<Value> {
        list.iter()
            .map(|io| json!({"name": io.name, "data_type": io.datatype.triton_config_name(), "dims": dims(io)}))
            .collect()
    };
    let mut out = json!({
        "name": m.name,
        "platform": "tract_onnx",
        "backend": match c.backend { super::model_config::Backend::Tract => "tract", super::model_config::Backend::Kserve(_) => "kserve" },
        "max_batch_size": m.signature.max_batch_size,
        "input": tensors(&m.signature.inputs),
        "output": tensors(&m.signature.outputs),
        "instance_group": [{"name": format!("{}_0", m.name), "count": c.instances, "kind": "KIND_CPU"}],
        "version_policy": {"latest": {"num_versions": 1}},
    });
    if batched && let Some(obj) = out.as_object_mut() {
        obj.insert(
            "dynamic_batching".into(),
            json!({
                "preferred_batch_size": c.preferred_batch_sizes,
                "max_queue_delay_microseconds": micros(c.max_queue_delay),
                "priority_levels": c.priority_levels,
                "default_priority_level": c.default_priority,
                "default_queue_policy": {
                    "max_queue_size": c.max_queue_size,
                    "default_timeout_microseconds": c.default_timeout.map_or(0, micros),
                    "timeout_action": "REJECT",
                },
            }),
        );
    }
    if let Some(reason) = &m.signature.batching_off_reason
        && let Some(obj) = out.as_object_mut()
    {
        obj.insert("batching_off_reason".into(), Value::from(reason.clone()));
    }
    out
}

async fn config(
    State(s): State<ApiState>,
    Path(model): Path<String>,
) -> ApiResult<axum::Json<Value>> {
    Ok(axum::Json(config_json(&s.repository.get(&model, None)?)))
}

async fn config_v(
    State(s): State<ApiState>,
    Path((model, version)): Path<(String, String)>,
) -> ApiResult<axum::Json<Value>> {
    Ok(axum::Json(config_json(&s.repository.get(&model, Some(&version))?)))
}

async fn all_stats(State(s): State<ApiState>) -> axum::Json<Value> {
    let list: Vec<Value> = s.repository.loaded().iter().map(|m| m.stats.triton_json()).collect();
    axum::Json(json!({ "model_stats": list }))
}

async fn stats(
    State(s): State<ApiState>,
    Path(model): Path<String>,
) -> ApiResult<axum::Json<Value>> {
    let list: Vec<Value> = match s.repository.state(&model) {
        Some(ModelState::Ready(v)) => v.iter().map(|m| m.stats.triton_json()).collect(),
        _ => vec![s.repository.get(&model, None)?.stats.triton_json()],
    };
    Ok(axum::Json(json!({ "model_stats": list })))
}

async fn stats_v(
    State(s): State<ApiState>,
    Path((model, version)): Path<(String, String)>,
) -> ApiResult<axum::Json<Value>> {
    let m = s.repository.get(&model, Some(&version))?;
    Ok(axum::Json(json!({ "model_stats": [m.stats.triton_json()] })))
}

async fn index(State(s): State<ApiState>) -> axum::Json<Value> {
    let rows: Vec<Value> = s
        .repository
        .index()
        .into_iter()
        .map(|e| {
            let mut row = json!({"name": e.name, "state": e.state});
            if let Some(obj) = row.as_object_mut() {
                if let Some(v) = e.version {
                    obj.insert("version".into(), Value::from(v));
                }
                if !e.reason.is_empty() {
                    obj.insert("reason".into(), Value::from(e.reason));
                }
            }
            row
        })
        .collect();
    axum::Json(Value::Array(rows))
}

async fn load(
    State(s): State<ApiState>,
    Path(model): Path<String>,
) -> ApiResult<axum::Json<Value>> {
    if !s.repository.root().join(&model).is_dir() {
        return Err(LookupError::Unknown(model).into());
    }
    s.repository
        .load(&model)
        .await
        .map_err(|reason| ApiError::bad(format!("failed to load model {model:?}: {reason}")))?;
    Ok(axum::Json(json!({})))
}

async fn unload(
    State(s): State<ApiState>,
    Path(model): Path<String>,
) -> ApiResult<axum::Json<Value>> {
    s.repository.unload(&model)?;
    Ok(axum::Json(json!({})))
}

async fn metrics(State(s): State<ApiState>) -> Response {
    let loaded = s.repository.loaded();
    let stats: Vec<_> = loaded.iter().map(|m| m.stats.clone()).collect();
    let mut text = render_prometheus(&stats);
    text.push_str("# HELP flotilla_model_queue_depth Requests waiting in the batcher queue.\n");
    text.push_str("# TYPE flotilla_model_queue_depth gauge\n");
    for m in &loaded {
        text.push_str(&format!(
            "flotilla_model_queue_depth{{model=\"{}\",version=\"{}\"}} {}\n",
            m.name.replace('"', "\\\""),
            m.version.replace('"', "\\\""),
            m.queued()
        ));
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], text).into_response()
}

async fn infer(
    State(s): State<ApiState>,
    Path(model): Path<String>,
    request: Request,
) -> ApiResult<Response> {
    run_infer(s, model, None, request).await
}

async fn infer_v(
    State(s): State<ApiState>,
    Path((model, version)): Path<(String, String)>,
    request: Request,
) -> ApiResult<Response> {
    run_infer(s, model, Some(version), request).await
}

/// A request's wishes for one output.
struct OutputWish {
    name: String,
    binary: bool,
}

async fn run_infer(
    s: ApiState,
    model: String,
    version: Option<String>,
    request: Request,
) -> ApiResult<Response> {
    let m = s.repository.get(&model, version.as_deref())?;
    let (parts, body) = request.into_parts();
    let body = read_body(body, s.max_request_bytes).await?;
    let parsed = parse_request(&m, &parts.headers, &body);
    let (inputs, wishes, priority, timeout, id) = match parsed {
        Ok(p) => p,
        Err(e) => {
            m.stats.request_ended(super::stats::Outcome::Rejected);
            return Err(e);
        }
    };
    let outputs = m.infer(inputs, priority, timeout).await?;
    Ok(encode_response(&m, id, &wishes, outputs))
}

async fn read_body(body: Body, limit: usize) -> ApiResult<Bytes> {
    axum::body::to_bytes(body, limit).await.map_err(|e| {
        ApiError(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("request body is over the limit of {limit} bytes (serving.max_request_bytes) or unreadable: {e}"),
        )
    })
}

type Parsed = (Vec<Tensor>, Vec<OutputWish>, Option<u32>, Option<Duration>, Option<Value>);

fn parse_request(m: &LoadedModel, headers: &HeaderMap, body: &[u8]) -> ApiResult<Parsed> {
    let header_len = match headers.get(HEADER_LENGTH) {
        None => body.len(),
        Some(v) => v
            .to_str()
            .ok()
            .and_then(|v| v.trim().parse::<usize>().ok())
            .filter(|n| *n <= body.len())
            .ok_or_else(|| {
                ApiError::bad(format!(
                    "Inference-Header-Content-Length {v:?} must be a byte count no larger than the body ({} bytes)",
                    body.len()
                ))
            })?,
    };
    let header: Value = serde_json::from_slice(&body[..header_len])
        .map_err(|e| ApiError::bad(format!("request JSON is invalid: {e}")))?;
    let mut binary = &body[header_len..];
    let params = header.get("parameters").cloned().unwrap_or(Value::Null);
    let priority = match params.get("priority") {
        None | Some(Value::Null) => None,
        Some(v) => Some(v.as_u64().and_then(|p| u32::try_from(p).ok()).ok_or_else(|| {
            ApiError::bad(format!("parameters.priority must be a positive integer, got {v}"))
        })?)
        .filter(|p| *p != 0),
    };
    let timeout = match params.get("timeout") {
        None | Some(Value::Null) => None,
        Some(v) => Some(Duration::from_micros(v.as_u64().ok_or_else(|| {
            ApiError::bad(format!("parameters.timeout must be microseconds as an integer, got {v}"))
        })?))
        .filter(|d| !d.is_zero()),
    };
    let binary_all = params.get("binary_data_output").and_then(Value::as_bool).unwrap_or(false);
    let list = header
        .get("inputs")
        .and_then(Value::as_array)
        .ok_or_else(|| ApiError::bad("request JSON needs an \"inputs\" array"))?;
    let mut given: HashMap<&str, Tensor> = HashMap::new();
    for (i, input) in list.iter().enumerate() {
        let name = input
            .get("name")
            .and_then(Value::as_str)
            .ok_or_else(|| ApiError::bad(format!("inputs[{i}] has no \"name\"")))?;
        let Some(spec) = m.signature.inputs.iter().find(|s| s.name == name) else {
            let known: Vec<&str> = m.signature.inputs.iter().map(|s| s.name.as_str()).collect();
            return Err(ApiError::bad(format!(
                "model {} has no input {name:?}; its inputs are {known:?}",
                m.name
            )));
        };
        let dt_name = input.get("datatype").and_then(Value::as_str).unwrap_or_default();
        let dtype = DataType::parse(dt_name).ok_or_else(|| {
            ApiError::bad(format!("input {name:?}: unknown datatype {dt_name:?}"))
        })?;
        if dtype != spec.datatype {
            return Err(ApiError::bad(format!(
                "input {name:?}: expected datatype {}, got {dtype}",
                spec.datatype
            )));
        }
        let shape: Vec<usize> = input
            .get("shape")
            .and_then(Value::as_array)
            .and_then(|s| {
                s.iter().map(|d| d.as_u64().and_then(|d| usize::try_from(d).ok())).collect()
            })
            .ok_or_else(|| {
                ApiError::bad(format!(
                    "input {name:?}: \"shape\" must be an array of non-negative integers"
                ))
            })?;
        let fits = shape.len() == spec.dims.len()
            && shape.iter().zip(&spec.dims).all(|(got, want)| *want < 0 || *got as i64 == *want);
        if !fits {
            return Err(ApiError::bad(format!(
                "input {name:?}: expected shape {:?}, got {shape:?}",
                spec.dims
            )));
        }
        let binary_size = input
            .get("parameters")
            .and_then(|p| p.get("binary_data_size"))
            .map(|v| {
                v.as_u64().and_then(|n| usize::try_from(n).ok()).ok_or_else(|| {
                    ApiError::bad(format!(
                        "input {name:?}: binary_data_size must be a byte count, got {v}"
                    ))
                })
            })
            .transpose()?;
        let tensor = match (binary_size, input.get("data")) {
            (Some(n), _) => {
                if n > binary.len() {
                    return Err(ApiError::bad(format!(
                        "input {name:?}: binary_data_size {n} is more than the {} binary bytes left in the body",
                        binary.len()
                    )));
                }
                let (mine, rest) = binary.split_at(n);
                binary = rest;
                Tensor::from_bytes(dtype, shape, mine.to_vec())
            }
            (None, Some(data)) => Tensor::from_json(dtype, shape, data),
            (None, None) => {
                return Err(ApiError::bad(format!(
                    "input {name:?} has neither \"data\" nor parameters.binary_data_size"
                )));
            }
        }
        .map_err(|e| ApiError::bad(format!("input {name:?}: {e}")))?;
        if given.insert(name, tensor).is_some() {
            return Err(ApiError::bad(format!("input {name:?} is given twice")));
        }
    }
    if !binary.is_empty() {
        return Err(ApiError::bad(format!(
            "{} bytes after the last binary input are not claimed by any binary_data_size",
            binary.len()
        )));
    }
    let mut inputs = Vec::with_capacity(m.signature.inputs.len());
    for spec in &m.signature.inputs {
        let t = given.remove(spec.name.as_str()).ok_or_else(|| {
            ApiError::bad(format!(
                "model {} needs input {:?}, which the request lacks",
                m.name, spec.name
            ))
        })?;
        inputs.push(t);
    }
    if m.signature.max_batch_size > 0 {
        let rows = inputs.first().map_or(0, Tensor::rows);
        if rows == 0 {
            return Err(ApiError::bad("the batch dimension (first) must be at least 1"));
        }
        if let Some((spec, t)) =
            m.signature.inputs.iter().zip(&inputs).find(|(_, t)| t.rows() != rows)
        {
            return Err(ApiError::bad(format!(
                "input {:?} has {} rows but the first input has {rows}; all inputs share the batch dimension",
                spec.name,
                t.rows()
            )));
        }
        if rows > m.signature.max_batch_size {
            return Err(ApiError::bad(format!(
                "the request has {rows} rows but model {} takes at most {} (max_batch_size); split it",
                m.name, m.signature.max_batch_size
            )));
        }
    }
    let wishes = match header.get("outputs").and_then(Value::as_array) {
        None => m
            .signature
            .outputs
            .iter()
            .map(|o| OutputWish { name: o.name.clone(), binary: binary_all })
            .collect(),
        Some(list) => {
            let mut wishes = Vec::new();
            for (i, o) in list.iter().enumerate() {
                let name = o
                    .get("name")
                    .and_then(Value::as_str)
                    .ok_or_else(|| ApiError::bad(format!("outputs[{i}] has no \"name\"")))?;
                if !m.signature.outputs.iter().any(|s| s.name == name) {
                    let known: Vec<&str> =
                        m.signature.outputs.iter().map(|s| s.name.as_str()).collect();
                    return Err(ApiError::bad(format!(
                        "model {} has no output {name:?}; its outputs are {known:?}",
                        m.name
                    )));
                }
                let binary = o
                    .get("parameters")
                    .and_then(|p| p.get("binary_data"))
                    .and_then(Value::as_bool)
                    .unwrap_or(binary_all);
                wishes.push(OutputWish { name: name.to_owned(), binary });
            }
            wishes
        }
    };
    Ok((inputs, wishes, priority, timeout, header.get("id").cloned()))
}

fn encode_response(
    m: &LoadedModel,
    id: Option<Value>,
    wishes: &[OutputWish],
    outputs: Vec<Tensor>,
) -> Response {
    let mut binary = Vec::new();
    let mut list = Vec::with_capacity(wishes.len());
    for wish in wishes {
        let Some(t) = m
            .signature
            .outputs
            .iter()
            .position(|o| o.name == wish.name)
            .and_then(|i| outputs.get(i))
        else {
            continue;
        };
        let mut entry = Map::new();
        entry.insert("name".into(), Value::from(wish.name.clone()));
        entry.insert("datatype".into(), Value::from(t.dtype().name()));
        entry.insert("shape".into(), json!(t.shape()));
        if wish.binary {
            let bytes = t.to_binary();
            entry.insert("parameters".into(), json!({"binary_data_size": bytes.len()}));
            binary.extend_from_slice(&bytes);
        } else {
            entry.insert("data".into(), t.to_json());
        }
        list.push(Value::Object(entry));
    }
    let mut head = json!({"model_name": m.name, "model_version": m.version, "outputs": list});
    if let (Some(id), Some(obj)) = (id, head.as_object_mut()) {
        obj.insert("id".into(), id);
    }
    let head = head.to_string();
    if binary.is_empty() && !wishes.iter().any(|w| w.binary) {
        return ([(header::CONTENT_TYPE, "application/json")], head).into_response();
    }
    let len = head.len();
    let mut body = head.into_bytes();
    body.extend_from_slice(&binary);
    let mut response = Response::new(Body::from(body));
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"));
    if let Ok(v) = HeaderValue::from_str(&len.to_string()) {
        headers.insert(HEADER_LENGTH, v);
    }
    response
}

/// Reads the outputs of a KServe v2 reply (JSON header plus binary tail) in the order of `want`.
pub fn decode_outputs(
    reply: &Value,
    mut binary: &[u8],
    want: &[IoSpec],
) -> Result<Vec<Tensor>, String> {
    let list = reply.get("outputs").and_then(Value::as_array).ok_or("reply has no outputs")?;
    let mut by_name: HashMap<String, Tensor> = HashMap::new();
    for o in list {
        let name = o.get("name").and_then(Value::as_str).ok_or("an output has no name")?;
        let dt = o.get("datatype").and_then(Value::as_str).unwrap_or_default();
        let dtype = DataType::parse(dt)
            .ok_or_else(|| format!("output {name:?}: unknown datatype {dt:?}"))?;
        let shape: Vec<usize> = o
            .get("shape")
            .and_then(Value::as_array)
            .and_then(|s| {
                s.iter().map(|d| d.as_u64().and_then(|d| usize::try_from(d).ok())).collect()
            })
            .ok_or_else(|| format!("output {name:?}: bad shape"))?;
        let size =
            o.get("parameters").and_then(|p| p.get("binary_data_size")).and_then(Value::as_u64);
        let tensor = match size {
            Some(n) => {
                let n = usize::try_from(n).map_err(|e| e.to_string())?;
                if n > binary.len() {
                    return Err(format!(
                        "output {name:?}: binary_data_size {n} runs past the body"
                    ));
                }
                let (mine, rest) = binary.split_at(n);
                binary = rest;
                Tensor::from_bytes(dtype, shape, mine.to_vec())
            }
            None => Tensor::from_json(dtype, shape, o.get("data").unwrap_or(&Value::Null)),
        }
        .map_err(|e| format!("output {name:?}: {e}"))?;
        by_name.insert(name.to_owned(), tensor);
    }
    want.iter()
        .map(|w| by_name.remove(&w.name).ok_or_else(|| format!("reply lacks output {:?}", w.name)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower::ServiceExt as _;

    async fn app(limit: usize) -> (Router, tempfile::TempDir) {
        let dir = tempfile::tempdir().expect("tempdir");
        super::super::demo::install_demo(dir.path()).expect("demo");
        let repository = Arc::new(Repository::new(dir.path()));
        repository.load_all().await;
        (router(ApiState { repository, max_request_bytes: limit }), dir)
    }

    async fn call(
        app: &Router,
        method: &str,
        uri: &str,
        headers: &[(&str, &str)],
        body: Vec<u8>,
    ) -> (StatusCode, HeaderMap, Vec<u8>) {
        let mut request = Request::builder().method(method).uri(uri);
        for (k, v) in headers {
            request = request.header(*k, *v);
        }
        let response = app
            .clone()
            .oneshot(request.body(Body::from(body)).expect("request"))
            .await
            .expect("infallible");
        let (parts, body) = response.into_parts();
        let bytes = axum::body::to_bytes(body, usize::MAX).await.expect("body");
        (parts.status, parts.headers, bytes.to_vec())
    }

    fn error_of(body: &[u8]) -> String {
        let v: Value = serde_json::from_slice(body).expect("JSON error body");
        v["error"].as_str().expect("error string").to_owned()
    }

    const JSON_REQUEST: &str = r#"{"id":"r1","inputs":[{"name":"features","shape":[2,4],"datatype":"FP32","data":[[5.1,3.5,1.4,0.2],[6.7,3.0,5.2,2.3]]}]}"#;

    #[tokio::test]
    async fn json_and_binary_inference() {
        let (app, _dir) = app(1 << 20).await;
        let (status, _, body) =
            call(&app, "POST", "/v2/models/demo/infer", &[], JSON_REQUEST.into()).await;
        assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
        let reply: Value = serde_json::from_slice(&body).expect("json");
        assert_eq!(reply["id"], "r1");
        assert_eq!(reply["outputs"][0]["shape"], json!([2, 3]));
        let json_data = reply["outputs"][0]["data"].clone();

        // The same request with a binary input and a binary output.
        let x: Vec<u8> = [5.1f32, 3.5, 1.4, 0.2, 6.7, 3.0, 5.2, 2.3]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let header = r#"{"inputs":[{"name":"features","shape":[2,4],"datatype":"FP32","parameters":{"binary_data_size":32}}],"outputs":[{"name":"probabilities","parameters":{"binary_data":true}}]}"#;
        let mut body = header.as_bytes().to_vec();
        body.extend(&x);
        let len = header.len().to_string();
        let (status, headers, reply) =
            call(&app, "POST", "/v2/models/demo/versions/1/infer", &[(HEADER_LENGTH, &len)], body)
                .await;
        assert_eq!(status, StatusCode::OK);
        let head_len: usize =
            headers[HEADER_LENGTH].to_str().expect("ascii").parse().expect("number");
        let head: Value = serde_json::from_slice(&reply[..head_len]).expect("header");
        assert_eq!(head["outputs"][0]["parameters"]["binary_data_size"], 24);
        let t = Tensor::from_bytes(DataType::F32, vec![2, 3], reply[head_len..].to_vec())
            .expect("tensor");
        assert_eq!(t.to_json(), json_data);
    }

    #[tokio::test]
    async fn errors_are_json_with_the_right_status() {
        let (app, _dir) = app(4096).await;
        type Case<'a> = (&'a str, &'a str, Vec<(&'a str, &'a str)>, Vec<u8>, StatusCode, &'a str);
        let cases: Vec<Case<'_>> = vec![
            ("POST", "/v2/models/demo/infer", vec![], vec![b' '; 5000], StatusCode::PAYLOAD_TOO_LARGE, "max_request_bytes"),
            ("POST", "/v2/models/demo/infer", vec![], b"{not json".to_vec(), StatusCode::BAD_REQUEST, "request JSON is invalid"),
            ("POST", "/v2/models/demo/infer", vec![(HEADER_LENGTH, "99999")], JSON_REQUEST.into(), StatusCode::BAD_REQUEST, "Inference-Header-Content-Length"),
            ("POST", "/v2/models/demo/infer", vec![], br#"{"inputs":[{"name":"features","shape":[1,4],"datatype":"FP32","data":[1,2,3]}]}"#.to_vec(), StatusCode::BAD_REQUEST, "3 elements do not fill shape [1, 4]"),
            ("POST", "/v2/models/demo/infer", vec![], br#"{"inputs":[{"name":"features","shape":[1,5],"datatype":"FP32","data":[1,2,3,4,5]}]}"#.to_vec(), StatusCode::BAD_REQUEST, "expected shape [-1, 4], got [1, 5]"),
            ("POST", "/v2/models/demo/infer", vec![], br#"{"inputs":[]}"#.to_vec(), StatusCode::BAD_REQUEST, "needs input \"features\""),
            ("POST", "/v2/models/demo/infer", vec![], br#"{"inputs":[{"name":"features","shape":[1,4],"datatype":"FP32","data":[1,2,3,4]}],"outputs":[{"name":"nope"}]}"#.to_vec(), StatusCode::BAD_REQUEST, "has no output \"nope\""),
            ("POST", "/v2/models/demo/infer", vec![], br#"{"parameters":{"priority":9},"inputs":[{"name":"features","shape":[1,4],"datatype":"FP32","data":[1,2,3,4]}]}"#.to_vec(), StatusCode::BAD_REQUEST, "priority 9 is outside 1..=1"),
            ("POST", "/v2/models/demo/versions/7/infer", vec![], JSON_REQUEST.into(), StatusCode::NOT_FOUND, "no loaded version \"7\""),
            ("GET", "/v2/models/ghost", vec![], vec![], StatusCode::NOT_FOUND, "unknown model \"ghost\""),
            ("GET", "/v2/nothing/here", vec![], vec![], StatusCode::NOT_FOUND, "no such endpoint"),
            ("DELETE", "/v2/models/demo/infer", vec![], vec![], StatusCode::METHOD_NOT_ALLOWED, "method not allowed"),
        ];
        for (method, uri, headers, body, want, needle) in cases {
            let (status, _, reply) = call(&app, method, uri, &headers, body).await;
            assert_eq!(status, want, "{method} {uri}: {}", String::from_utf8_lossy(&reply));
            let message = error_of(&reply);
            assert!(message.contains(needle), "{method} {uri}: {needle:?} not in {message:?}");
        }
        // Trailing bytes no input claims are refused, not ignored.
        let header =
            r#"{"inputs":[{"name":"features","shape":[1,4],"datatype":"FP32","data":[1,2,3,4]}]}"#;
        let mut body = header.as_bytes().to_vec();
        body.extend([0u8; 8]);
        let len = header.len().to_string();
        let (status, _, reply) =
            call(&app, "POST", "/v2/models/demo/infer", &[(HEADER_LENGTH, &len)], body).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(error_of(&reply).contains("8 bytes after the last binary input"));
    }

    #[tokio::test]
    async fn mangled_requests_get_client_errors_never_a_panic() {
        let (app, _dir) = app(1 << 16).await;
        let header = r#"{"inputs":[{"name":"features","shape":[1,4],"datatype":"FP32","parameters":{"binary_data_size":16}}],"outputs":[{"name":"probabilities","parameters":{"binary_data":true}}]}"#;
        let mut valid = header.as_bytes().to_vec();
        valid.extend([0u8; 16]);
        let mut seed = 0x9e37_79b9_u32;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 17;
            seed ^= seed << 5;
            seed
        };
        for round in 0..400 {
            let mut body = valid.clone();
            // Flip, drop or insert a few bytes anywhere, header or tensor.
            for _ in 0..=(next() % 4) {
                let at = next() as usize % body.len().max(1);
                match next() % 3 {
                    0 => body[at] = next().to_le_bytes()[0],
                    1 if body.len() > 1 => {
                        body.remove(at);
                    }
                    _ => body.insert(at, next().to_le_bytes()[0]),
                }
            }
            let declared = if round % 2 == 0 { header.len() } else { next() as usize % 400 };
            let declared = declared.to_string();
            let (status, _, reply) =
                call(&app, "POST", "/v2/models/demo/infer", &[(HEADER_LENGTH, &declared)], body)
                    .await;
            assert!(
                status == StatusCode::OK || status.is_client_error(),
                "round {round}: {status} {}",
                String::from_utf8_lossy(&reply)
            );
            if status != StatusCode::OK {
                assert!(!error_of(&reply).is_empty());
            }
        }
    }

    #[tokio::test]
    async fn metadata_config_and_repository() {
        let (app, _dir) = app(1 << 20).await;
        let (_, _, body) = call(&app, "GET", "/v2/models/demo", &[], vec![]).await;
        let meta: Value = serde_json::from_slice(&body).expect("json");
        assert_eq!(
            meta["inputs"][0],
            json!({"name": "features", "datatype": "FP32", "shape": [-1, 4]})
        );
        let (_, _, body) = call(&app, "GET", "/v2/models/demo/config", &[], vec![]).await;
        let config: Value = serde_json::from_slice(&body).expect("json");
        assert_eq!(config["input"][0]["dims"], json!([4]));
        assert_eq!(config["max_batch_size"], 8);
        let (status, _, _) =
            call(&app, "POST", "/v2/repository/models/demo/unload", &[], vec![]).await;
        assert_eq!(status, StatusCode::OK);
        let (status, _, body) = call(&app, "GET", "/v2/models/demo/ready", &[], vec![]).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{}", String::from_utf8_lossy(&body));
        let (status, _, _) =
            call(&app, "POST", "/v2/repository/models/demo/load", &[], vec![]).await;
        assert_eq!(status, StatusCode::OK);
        let (status, _, _) = call(&app, "GET", "/v2/models/demo/ready", &[], vec![]).await;
        assert_eq!(status, StatusCode::OK);
        let (status, _, body) =
            call(&app, "POST", "/v2/repository/models/ghost/load", &[], vec![]).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{}", String::from_utf8_lossy(&body));
    }
}
