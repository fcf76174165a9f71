//! The inference HTTP API: KServe v2 / Open Inference Protocol REST with JSON and binary
//! tensors, Triton's model configuration, statistics and repository extensions, and `/metrics`.
//!
//! Every error is `{"error": "..."}` naming what was wrong: 400 for a request that does not fit
//! the model (input, expected, actual) or a name outside the rule, 403 for repository control
//! from a non-loopback peer without the admin token, 404 for an unknown model or version, 413
//! for a body over the limit, 503 when the model is not ready, its queue is full or a `limits`
//! budget is spent, 504 when the deadline or `serving.request_timeout_ms` passed, 500 when the
//! engine failed.
//!
//! Model and version names from the path are checked against [`names`](super::names) before
//! anything else; the admission limits ([`limits`](super::limits)) apply before a body is read.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{ConnectInfo, Path, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};

use super::batcher::Refusal;
use super::limits::{Limit, Limits};
use super::model::{InferError, LoadedModel};
use super::repository::{LookupError, ModelState, Repository};
use super::runner::IoSpec;
use super::stats::render_prometheus;
use super::tensor::{DataType, Tensor, write_json_string};

mod optimize;

/// The binary extension's header naming the JSON part's length.
pub const HEADER_LENGTH: &str = "inference-header-content-length";

/// What the handlers share.
#[derive(Debug, Clone)]
pub struct ApiState {
    /// The models.
    pub repository: Arc<Repository>,
    /// Largest request body accepted, bytes.
    pub max_request_bytes: usize,
    /// Admission limits.
    pub limits: Arc<Limits>,
    /// Bearer token that lets non-loopback peers load and unload models.
    pub admin_token: Option<AdminToken>,
    /// The agent's telemetry health, shown on `/metrics` once the agent has set it (the API
    /// starts before the telemetry pipeline).
    pub telemetry_health: Arc<std::sync::OnceLock<Arc<crate::health::TelemetryHealth>>>,
    /// The optimizer's searches on this agent.
    pub optimizations: Arc<crate::optimizer::jobs::Jobs>,
    /// The agent binary that measures a candidate's memory alone (`flotilla-agent footprint`);
    /// `None` when this process is not the agent (memory is then not measured).
    pub footprint_probe: Option<std::path::PathBuf>,
}

/// The repository-control bearer token; never printed.
#[derive(Clone)]
pub struct AdminToken(Arc<str>);

impl AdminToken {
    /// Wraps a token read from `serving.admin_token_file`.
    pub fn new(token: &str) -> Self {
        Self(token.into())
    }

    /// Compares in time independent of where the first difference is.
    fn matches(&self, given: &str) -> bool {
        let (a, b) = (self.0.as_bytes(), given.as_bytes());
        a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
    }
}

impl std::fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AdminToken(<redacted>)")
    }
}

/// Refuses a model or version name outside the rule, before any lookup or path.
fn check_names(model: &str, version: Option<&str>) -> ApiResult<()> {
    super::names::check("model", model).map_err(|e| ApiError::bad(e.to_string()))?;
    if let Some(v) = version {
        super::names::check("version", v).map_err(|e| ApiError::bad(e.to_string()))?;
    }
    Ok(())
}

/// Repository control is for loopback peers, or any peer with the admin token.
fn check_control(s: &ApiState, request: &Request) -> ApiResult<()> {
    let peer = request.extensions().get::<ConnectInfo<SocketAddr>>().map(|c| c.0);
    if peer.is_some_and(|p| p.ip().to_canonical().is_loopback()) {
        return Ok(());
    }
    let shown = peer.map_or_else(|| "an unknown peer".to_owned(), |p| p.ip().to_string());
    let forbidden = |msg: String| Err(ApiError(StatusCode::FORBIDDEN, msg));
    let Some(token) = &s.admin_token else {
        return forbidden(format!(
            "repository control (load/unload) is allowed only from loopback; this request came from {shown}. Run it on the agent's host, or set serving.admin_token_file and send Authorization: Bearer TOKEN"
        ));
    };
    let given = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match given {
        Some(t) if token.matches(t.trim()) => Ok(()),
        Some(_) => forbidden(format!(
            "repository control from {shown}: the bearer token does not match serving.admin_token_file"
        )),
        None => forbidden(format!(
            "repository control from {shown} needs Authorization: Bearer TOKEN (the token in serving.admin_token_file)"
        )),
    }
}

/// The concurrency limit and the time limit, around every route but the health checks.
async fn admission(State(limits): State<Arc<Limits>>, request: Request, next: Next) -> Response {
    let path = request.uri().path();
    if path.starts_with("/v2/health/") {
        return next.run(request).await;
    }
    // Loading a large model may take longer than a request; it must not be cut off half-way.
    let timed = !path.starts_with("/v2/repository/");
    let _slot = match limits.request_slot() {
        Ok(slot) => slot,
        Err(msg) => return unavailable(msg).into_response(),
    };
    if !timed {
        return next.run(request).await;
    }
    let limit = limits.config().request_timeout;
    match tokio::time::timeout(limit, next.run(request)).await {
        Ok(response) => response,
        Err(_) => {
            limits.refused(Limit::Timeout);
            ApiError(
                StatusCode::GATEWAY_TIMEOUT,
                format!(
                    "the request took longer than {} ms (serving.request_timeout_ms) and was abandoned",
                    limit.as_millis()
                ),
            )
            .into_response()
        }
    }
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
            InferError::Refused {
                refusal: Refusal::QueueFull { .. } | Refusal::WaitTooLong { .. },
                ..
            }
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
        .route(
            "/v2/models/{model}/optimize",
            post(optimize::start).get(optimize::status).delete(optimize::rollback),
        )
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
        .layer(middleware::from_fn_with_state(state.limits.clone(), admission))
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

/// Triton's platform name for what serves the model: `onnxruntime_onnx` as Triton names its
/// own onnxruntime backend, `tract_onnx`, or `kserve`.
fn platform(m: &LoadedModel) -> &'static str {
    match m.engine_info().engine {
        "onnxruntime" => "onnxruntime_onnx",
        "kserve" => "kserve",
        _ => "tract_onnx",
    }
}

fn metadata_json(s: &ApiState, name: &str, m: &LoadedModel) -> Value {
    let versions: Vec<String> = match s.repository.state(name) {
        Some(ModelState::Ready(v)) => v.iter().map(|m| m.version.clone()).collect(),
        _ => vec![m.version.clone()],
    };
    json!({
        "name": name,
        "versions": versions,
        "platform": platform(m),
        "inputs": m.signature.inputs.iter().map(io_json).collect::<Vec<_>>(),
        "outputs": m.signature.outputs.iter().map(io_json).collect::<Vec<_>>(),
    })
}

async fn metadata(
    State(s): State<ApiState>,
    Path(model): Path<String>,
) -> ApiResult<axum::Json<Value>> {
    check_names(&model, None)?;
    let m = s.repository.get(&model, None)?;
    Ok(axum::Json(metadata_json(&s, &model, &m)))
}

async fn metadata_v(
    State(s): State<ApiState>,
    Path((model, version)): Path<(String, String)>,
) -> ApiResult<axum::Json<Value>> {
    check_names(&model, Some(&version))?;
    let m = s.repository.get(&model, Some(&version))?;
    Ok(axum::Json(metadata_json(&s, &model, &m)))
}

async fn ready(
    State(s): State<ApiState>,
    Path(model): Path<String>,
) -> ApiResult<axum::Json<Value>> {
    check_names(&model, None)?;
    s.repository.get(&model, None)?;
    Ok(axum::Json(json!({"name": model, "ready": true})))
}

async fn ready_v(
    State(s): State<ApiState>,
    Path((model, version)): Path<(String, String)>,
) -> ApiResult<axum::Json<Value>> {
    check_names(&model, Some(&version))?;
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
        "platform": platform(m),
        "backend": c.backend.name(),
        "engine": m.engine_info(),
        "max_batch_size": m.signature.max_batch_size,
        "input": tensors(&m.signature.inputs),
        "output": tensors(&m.signature.outputs),
        // The count in force (the control loop and the optimizer change it), not the configured one.
        "instance_group": [{"name": format!("{}_0", m.name), "count": m.instances(), "kind": "KIND_CPU"}],
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
    check_names(&model, None)?;
    Ok(axum::Json(config_json(&s.repository.get(&model, None)?)))
}

async fn config_v(
    State(s): State<ApiState>,
    Path((model, version)): Path<(String, String)>,
) -> ApiResult<axum::Json<Value>> {
    check_names(&model, Some(&version))?;
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
    check_names(&model, None)?;
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
    check_names(&model, Some(&version))?;
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
    request: Request,
) -> ApiResult<axum::Json<Value>> {
    check_control(&s, &request)?;
    check_names(&model, None)?;
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
    request: Request,
) -> ApiResult<axum::Json<Value>> {
    check_control(&s, &request)?;
    check_names(&model, None)?;
    s.repository.unload(&model)?;
    Ok(axum::Json(json!({})))
}

/// The telemetry pipeline's health as Prometheus text: failures to sample or to seal into the
/// spool (each also logged at ERROR), when the last one happened, and the clock offset.
fn render_telemetry_health(h: &crate::health::HealthState) -> String {
    let mut text = String::new();
    text.push_str(
        "# HELP flotilla_telemetry_errors_total Failures to take a sample or seal samples into the spool.\n",
    );
    text.push_str("# TYPE flotilla_telemetry_errors_total counter\n");
    text.push_str(&format!("flotilla_telemetry_errors_total {}\n", h.errors));
    text.push_str(
        "# HELP flotilla_telemetry_last_error_timestamp_seconds When the latest telemetry failure happened (0: none).\n",
    );
    text.push_str("# TYPE flotilla_telemetry_last_error_timestamp_seconds gauge\n");
    let at = h.last_error_unix_ms as f64 / 1000.0;
    text.push_str(&format!("flotilla_telemetry_last_error_timestamp_seconds {at}\n"));
    if let Some(offset_ms) = h.clock_offset_ms {
        text.push_str(
            "# HELP flotilla_clock_offset_seconds This agent's clock minus the aggregator's, from the latest Welcome.\n",
        );
        text.push_str("# TYPE flotilla_clock_offset_seconds gauge\n");
        let offset = offset_ms as f64 / 1000.0;
        text.push_str(&format!("flotilla_clock_offset_seconds {offset}\n"));
    }
    text
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
    text.push_str(
        "# HELP flotilla_api_refused_total Requests refused by an admission limit (serving.*).\n",
    );
    text.push_str("# TYPE flotilla_api_refused_total counter\n");
    for (limit, n) in s.limits.refusals() {
        text.push_str(&format!("flotilla_api_refused_total{{limit=\"{}\"}} {n}\n", limit.label()));
    }
    if let Some(health) = s.telemetry_health.get() {
        text.push_str(&render_telemetry_health(&health.snapshot()));
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
    check_names(&model, version.as_deref())?;
    let m = s.repository.get(&model, version.as_deref())?;
    let key = format!("{}/{}", m.name, m.version);
    let refuse = |e: ApiError| {
        m.stats.request_ended(super::stats::Outcome::Rejected);
        e
    };
    let (parts, body) = request.into_parts();
    // Bytes in flight: the body while it is read and parsed (reserved up front when the client
    // declares its length), then the decoded inputs until the reply is built.
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if let Some(n) = declared.filter(|n| *n > s.max_request_bytes) {
        return Err(refuse(too_large(s.max_request_bytes, &format!("Content-Length {n}"))));
    }
    let early = match declared {
        Some(n) => Some(s.limits.reserve(&key, n).map_err(|(_, msg)| refuse(unavailable(msg)))?),
        None => None,
    };
    let body = read_body(body, s.max_request_bytes).await.map_err(&refuse)?;
    let body_permit = match early {
        Some(p) => p,
        None => s.limits.reserve(&key, body.len()).map_err(|(_, msg)| refuse(unavailable(msg)))?,
    };
    let (inputs, wishes, priority, timeout, id) =
        parse_request(&m, &parts.headers, &body).map_err(&refuse)?;
    s.limits.admit_shape(&m, free_dims(&m, &inputs)).map_err(|msg| refuse(ApiError::bad(msg)))?;
    let tensor_bytes = inputs.iter().map(Tensor::byte_len).fold(0usize, usize::saturating_add);
    let _inputs_permit =
        s.limits.reserve(&key, tensor_bytes).map_err(|(_, msg)| refuse(unavailable(msg)))?;
    drop(body);
    drop(body_permit);
    let outputs = m.infer(inputs, priority, timeout).await?;
    Ok(encode_response(&m, id, &wishes, outputs))
}

fn too_large(limit: usize, what: &str) -> ApiError {
    ApiError(
        StatusCode::PAYLOAD_TOO_LARGE,
        format!(
            "request body is over the limit of {limit} bytes (serving.max_request_bytes): {what}"
        ),
    )
}

fn unavailable(msg: String) -> ApiError {
    ApiError(StatusCode::SERVICE_UNAVAILABLE, msg)
}

async fn read_body(body: Body, limit: usize) -> ApiResult<Bytes> {
    axum::body::to_bytes(body, limit)
        .await
        .map_err(|e| too_large(limit, &format!("or unreadable: {e}")))
}

/// The sizes a request chose for the model's free dims: every `-1` in an input's declared
/// shape except the batch axis of a batched model. Each distinct list costs a tract plan.
fn free_dims(m: &LoadedModel, inputs: &[Tensor]) -> Vec<usize> {
    let batched = m.signature.max_batch_size > 0;
    let mut free = Vec::new();
    for (spec, t) in m.signature.inputs.iter().zip(inputs) {
        for (axis, (want, got)) in spec.dims.iter().zip(t.shape()).enumerate() {
            if *want < 0 && !(batched && axis == 0) {
                free.push(*got);
            }
        }
    }
    free
}

type Parsed = (Vec<Tensor>, Vec<OutputWish>, Option<u32>, Option<Duration>, Option<Value>);

/// Checks an input's shape against the dims the model (file or config) declares.
fn check_shape(name: &str, shape: &[usize], dims: &[i64]) -> ApiResult<()> {
    if shape.len() != dims.len() {
        return Err(ApiError::bad(format!(
            "input {name:?}: expected shape {dims:?} ({} dims), got {shape:?} ({} dims)",
            dims.len(),
            shape.len()
        )));
    }
    for (axis, (got, want)) in shape.iter().zip(dims).enumerate() {
        if *want >= 0 && i64::try_from(*got).ok() != Some(*want) {
            return Err(ApiError::bad(format!(
                "input {name:?}: dim {axis} must be {want}, got {got} (expected shape {dims:?}, got {shape:?})"
            )));
        }
    }
    Ok(())
}

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
    let (json, mut binary) = body.split_at(header_len);
    let header = super::request::parse(json)
        .map_err(|e| ApiError::bad(format!("request JSON is invalid: {e}")))?;
    let priority = match header.priority {
        None => None,
        Some(p) => Some(u32::try_from(p).map_err(|_| {
            ApiError::bad(format!("parameters.priority must be a positive integer, got {p}"))
        })?)
        .filter(|p| *p != 0),
    };
    let timeout = header.timeout_us.map(Duration::from_micros).filter(|d| !d.is_zero());
    let binary_all = header.binary_data_output;
    let mut given: HashMap<String, Tensor> = HashMap::new();
    for input in header.inputs {
        let name = input.name;
        let Some(spec) = m.signature.inputs.iter().find(|s| s.name == name) else {
            let known: Vec<&str> = m.signature.inputs.iter().map(|s| s.name.as_str()).collect();
            return Err(ApiError::bad(format!(
                "model {} has no input {name:?}; its inputs are {known:?}",
                m.name
            )));
        };
        let dt_name = input.datatype;
        let dtype = DataType::parse(&dt_name).ok_or_else(|| {
            ApiError::bad(format!("input {name:?}: unknown datatype {dt_name:?}"))
        })?;
        if dtype != spec.datatype {
            return Err(ApiError::bad(format!(
                "input {name:?}: expected datatype {}, got {dtype}",
                spec.datatype
            )));
        }
        let shape: Vec<usize> = input
            .shape
            .iter()
            .map(|d| usize::try_from(*d))
            .collect::<Result<_, _>>()
            .map_err(|_| {
                ApiError::bad(format!("input {name:?}: a dim of {:?} is too large", input.shape))
            })?;
        check_shape(&name, &shape, &spec.dims)?;
        let tensor = match (input.binary_data_size, input.data) {
            (Some(n), _) => {
                let n = usize::try_from(n).ok().filter(|n| *n <= binary.len()).ok_or_else(|| {
                    ApiError::bad(format!(
                        "input {name:?}: binary_data_size {n} is more than the {} binary bytes left in the body",
                        binary.len()
                    ))
                })?;
                let (mine, rest) = binary.split_at(n);
                binary = rest;
                Tensor::from_bytes(dtype, shape, mine.to_vec())
            }
            (None, Some(data)) => {
                let (payload, _) = data
                    .into_payload(dtype)
                    .map_err(|e| ApiError::bad(format!("input {name:?}: {e}")))?;
                Tensor::from_payload(dtype, shape, payload)
            }
            (None, None) => {
                return Err(ApiError::bad(format!(
                    "input {name:?} has neither \"data\" nor parameters.binary_data_size"
                )));
            }
        }
        .map_err(|e| ApiError::bad(format!("input {name:?}: {e}")))?;
        if given.contains_key(&name) {
            return Err(ApiError::bad(format!("input {name:?} is given twice")));
        }
        given.insert(name, tensor);
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
    let wishes = match header.outputs {
        None => m
            .signature
            .outputs
            .iter()
            .map(|o| OutputWish { name: o.name.clone(), binary: binary_all })
            .collect(),
        Some(list) => {
            let mut wishes = Vec::new();
            for o in list {
                if !m.signature.outputs.iter().any(|s| s.name == o.name) {
                    let known: Vec<&str> =
                        m.signature.outputs.iter().map(|s| s.name.as_str()).collect();
                    return Err(ApiError::bad(format!(
                        "model {} has no output {:?}; its outputs are {known:?}",
                        m.name, o.name
                    )));
                }
                let binary = o.parameters.binary_data.unwrap_or(binary_all);
                wishes.push(OutputWish { name: o.name, binary });
            }
            wishes
        }
    };
    Ok((inputs, wishes, priority, timeout, header.id.map(|id| id.to_json())))
}

fn encode_response(
    m: &LoadedModel,
    id: Option<Value>,
    wishes: &[OutputWish],
    outputs: Vec<Tensor>,
) -> Response {
    // The JSON header is written straight into its buffer: no tree of values per element.
    let elements: usize = outputs.iter().map(|t| t.shape().iter().product::<usize>()).sum();
    let mut head = Vec::with_capacity(256 + 12 * elements);
    let mut binary = Vec::new();
    head.extend_from_slice(b"{\"model_name\":");
    write_json_string(&mut head, &m.name);
    head.extend_from_slice(b",\"model_version\":");
    write_json_string(&mut head, &m.version);
    if let Some(id) = id {
        head.extend_from_slice(b",\"id\":");
        let _ = serde_json::to_writer(&mut head, &id);
    }
    head.extend_from_slice(b",\"outputs\":[");
    let mut first = true;
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
        if !first {
            head.push(b',');
        }
        first = false;
        head.extend_from_slice(b"{\"name\":");
        write_json_string(&mut head, &wish.name);
        head.extend_from_slice(b",\"datatype\":");
        write_json_string(&mut head, t.dtype().name());
        head.extend_from_slice(b",\"shape\":");
        let _ = serde_json::to_writer(&mut head, t.shape());
        if wish.binary {
            let bytes = t.to_binary();
            head.extend_from_slice(
                format!(",\"parameters\":{{\"binary_data_size\":{}}}", bytes.len()).as_bytes(),
            );
            binary.extend_from_slice(&bytes);
        } else {
            head.extend_from_slice(b",\"data\":");
            t.write_json_data(&mut head);
        }
        head.push(b'}');
    }
    head.extend_from_slice(b"]}");
    if binary.is_empty() && !wishes.iter().any(|w| w.binary) {
        return ([(header::CONTENT_TYPE, "application/json")], head).into_response();
    }
    let len = head.len();
    let mut body = head;
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

    use common::config::agent::ServingLimits;

    async fn app(limit: usize) -> (Router, tempfile::TempDir) {
        let (app, dir, _) = app_with(limit, ServingLimits::default(), None).await;
        (app, dir)
    }

    async fn app_with(
        limit: usize,
        limits: ServingLimits,
        token: Option<&str>,
    ) -> (Router, tempfile::TempDir, ApiState) {
        let dir = tempfile::tempdir().expect("tempdir");
        super::super::demo::install_demo(dir.path()).expect("demo");
        let repository = Arc::new(Repository::new(dir.path()));
        repository.load_all().await;
        let state = ApiState {
            repository,
            max_request_bytes: limit,
            limits: Arc::new(Limits::new(limits)),
            admin_token: token.map(AdminToken::new),
            telemetry_health: Arc::default(),
            optimizations: Arc::default(),
            footprint_probe: None,
        };
        (router(state.clone()), dir, state)
    }

    /// Loopback, as a local client; tests of other peers use `call_from`.
    const LOCAL: &str = "127.0.0.1:50000";

    async fn call(
        app: &Router,
        method: &str,
        uri: &str,
        headers: &[(&str, &str)],
        body: Vec<u8>,
    ) -> (StatusCode, HeaderMap, Vec<u8>) {
        call_from(app, LOCAL, method, uri, headers, body).await
    }

    async fn call_from(
        app: &Router,
        peer: &str,
        method: &str,
        uri: &str,
        headers: &[(&str, &str)],
        body: Vec<u8>,
    ) -> (StatusCode, HeaderMap, Vec<u8>) {
        let mut request = Request::builder().method(method).uri(uri);
        for (k, v) in headers {
            request = request.header(*k, *v);
        }
        let mut request = request.body(Body::from(body)).expect("request");
        let peer: SocketAddr = peer.parse().expect("peer");
        request.extensions_mut().insert(ConnectInfo(peer));
        let response = app.clone().oneshot(request).await.expect("infallible");
        let (parts, body) = response.into_parts();
        let bytes = axum::body::to_bytes(body, usize::MAX).await.expect("body");
        (parts.status, parts.headers, bytes.to_vec())
    }

    fn error_of(body: &[u8]) -> String {
        let v: Value = serde_json::from_slice(body).expect("JSON error body");
        v["error"].as_str().expect("error string").to_owned()
    }

    const JSON_REQUEST: &str = r#"{"id":"r1","inputs":[{"name":"features","shape":[2,4],"datatype":"FP32","data":[[5.1,3.5,1.4,0.2],[6.7,3.0,5.2,2.3]]}]}"#;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_optimizer_search_starts_reports_progress_and_ends_with_its_report() {
        let (app, _dir) = app(1 << 20).await;
        let path = format!("/v2/models/{}/optimize", super::super::demo::DEMO_NAME);
        let (status, _, body) = call(&app, "GET", &path, &[], vec![]).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert!(error_of(&body).contains("POST /v2/models/"), "{}", error_of(&body));
        for (bad, names) in [
            (r#"{"strategy":"fastest"}"#, "strategy \"fastest\""),
            (r#"{"cpu_share":2}"#, "cpu_share: must be 0.01..=1, got 2"),
            (r#"{"rounds":0}"#, "rounds: must be 1..=10000, got 0"),
            (r#"{"bogus":1}"#, "unknown field `bogus`"),
        ] {
            let (status, _, body) = call(&app, "POST", &path, &[], bad.into()).await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}");
            assert!(error_of(&body).contains(names), "{bad}: {}", error_of(&body));
        }
        let (status, _, body) =
            call_from(&app, "10.1.2.3:5000", "POST", &path, &[], b"{}".to_vec()).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "a stranger cannot start a search");
        assert!(error_of(&body).contains("loopback"));
        let (status, _, body) = call(&app, "POST", "/v2/models/nosuch/optimize", &[], vec![]).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{}", String::from_utf8_lossy(&body));
        let start = r#"{"strategy":"latency","rounds":3,"cpu_share":1.0,"max_batch":2}"#;
        let (status, _, body) = call(&app, "POST", &path, &[], start.into()).await;
        assert_eq!(status, StatusCode::ACCEPTED, "{}", String::from_utf8_lossy(&body));
        let started: Value = serde_json::from_slice(&body).expect("json");
        assert_eq!(started["state"], "running");
        assert_eq!(started["strategy"], "latency");
        let deadline = std::time::Instant::now() + Duration::from_secs(120);
        let report = loop {
            let (status, _, body) = call(&app, "GET", &path, &[], vec![]).await;
            assert_eq!(status, StatusCode::OK);
            let state: Value = serde_json::from_slice(&body).expect("json");
            match state["state"].as_str() {
                Some("running") => {
                    assert!(state["current"].is_string(), "{state}");
                    assert!(std::time::Instant::now() < deadline, "the search never ended");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Some("done") => break state["report"].clone(),
                other => panic!("search ended {other:?}: {state}"),
            }
        };
        assert_eq!(report["strategy"], "latency");
        assert!(report["winner"].is_string(), "{report}");
        assert!(report["why"].as_str().is_some_and(|w| w.contains("lowest p99")), "{report}");
        let steps = report["steps"].as_array().expect("steps");
        assert_eq!(steps[0]["candidate"], "tract");
        assert_eq!(steps[0]["outcome"], "timed");
        assert_eq!(steps[0]["timings"][0]["runs"], 3);
        // Nothing was adopted (no "apply"), so there is nothing to roll back; strangers may not.
        let (status, _, body) = call(&app, "DELETE", &path, &[], vec![]).await;
        assert_eq!(status, StatusCode::CONFLICT);
        assert!(error_of(&body).contains("nothing to roll back"), "{}", error_of(&body));
        let (status, _, _) = call_from(&app, "10.1.2.3:5000", "DELETE", &path, &[], vec![]).await;
        assert_eq!(status, StatusCode::FORBIDDEN);
    }

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
            ("POST", "/v2/models/demo/infer", vec![], br#"{"inputs":[{"name":"features","shape":[1,5],"datatype":"FP32","data":[1,2,3,4,5]}]}"#.to_vec(), StatusCode::BAD_REQUEST, "input \"features\": dim 1 must be 4, got 5 (expected shape [-1, 4], got [1, 5])"),
            ("POST", "/v2/models/demo/infer", vec![], br#"{"inputs":[{"name":"features","shape":[4],"datatype":"FP32","data":[1,2,3,4]}]}"#.to_vec(), StatusCode::BAD_REQUEST, "expected shape [-1, 4] (2 dims), got [4] (1 dims)"),
            ("POST", "/v2/models/demo/infer", vec![], br#"{"inputs":[{"name":"features","shape":[1,4],"datatype":"FP32","data":[1,2,"x",4]}]}"#.to_vec(), StatusCode::BAD_REQUEST, "element 2: expected a number, got the string \"x\""),
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

    /// Names are checked after percent-decoding and before any lookup or path: `..`, `/`, NUL
    /// and long names get 400 naming the rule, on every route that takes a name.
    #[tokio::test]
    async fn names_outside_the_rule_are_refused_before_any_file_access() {
        let (app, dir, state) = app_with(1 << 20, ServingLimits::default(), None).await;
        std::fs::create_dir(dir.path().join("secret")).expect("dir");
        let long = "x".repeat(129);
        let bad = [
            "%2e%2e",
            "..",
            "%2E%2E",
            ".",
            "a%2Fb",
            "demo%2F1",
            "a%00b",
            "%2e%2e%2fsecret",
            long.as_str(),
        ];
        for name in bad {
            for (method, uri) in [
                ("POST", format!("/v2/repository/models/{name}/load")),
                ("POST", format!("/v2/repository/models/{name}/unload")),
                ("GET", format!("/v2/models/{name}")),
                ("GET", format!("/v2/models/{name}/ready")),
                ("GET", format!("/v2/models/{name}/config")),
                ("GET", format!("/v2/models/{name}/stats")),
                ("POST", format!("/v2/models/{name}/infer")),
                ("GET", format!("/v2/models/demo/versions/{name}")),
                ("POST", format!("/v2/models/demo/versions/{name}/infer")),
            ] {
                let (status, _, body) = call(&app, method, &uri, &[], vec![]).await;
                assert_eq!(
                    status,
                    StatusCode::BAD_REQUEST,
                    "{uri}: {}",
                    String::from_utf8_lossy(&body)
                );
                let e = error_of(&body);
                assert!(e.contains("name") && e.contains("1 to 128 ASCII letters"), "{uri}: {e}");
            }
        }
        // Unknown names: 404, and the index does not grow.
        let before = state.repository.index();
        for name in ["ghost", "secret2", "a.b"] {
            for action in ["load", "unload"] {
                let uri = format!("/v2/repository/models/{name}/{action}");
                let (status, _, body) = call(&app, "POST", &uri, &[], vec![]).await;
                assert_eq!(
                    status,
                    StatusCode::NOT_FOUND,
                    "{uri}: {}",
                    String::from_utf8_lossy(&body)
                );
            }
        }
        assert_eq!(state.repository.index(), before);
        // An unload of a directory path inside a model never adds an entry either.
        assert!(state.repository.unload("demo/1").is_err());
        assert!(state.repository.unload("..").is_err());
        assert_eq!(state.repository.index(), before);
    }

    /// Load and unload from a non-loopback peer: 403 without a token configured; with one,
    /// 403 without or with a wrong bearer token, 200 with the right one. Loopback always works.
    #[tokio::test]
    async fn repository_control_is_loopback_only_unless_a_token_is_configured() {
        let remote = "10.1.2.3:40000";
        let (open, _dir) = app(1 << 20).await;
        for action in ["unload", "load"] {
            let uri = format!("/v2/repository/models/demo/{action}");
            let (status, _, body) = call_from(&open, remote, "POST", &uri, &[], vec![]).await;
            assert_eq!(status, StatusCode::FORBIDDEN, "{}", String::from_utf8_lossy(&body));
            let e = error_of(&body);
            assert!(e.contains("only from loopback") && e.contains("10.1.2.3"), "{e}");
            assert!(e.contains("serving.admin_token_file"), "{e}");
            let mapped = "[::ffff:127.0.0.1]:1";
            let (status, _, _) = call_from(&open, mapped, "POST", &uri, &[], vec![]).await;
            assert_eq!(status, StatusCode::OK, "IPv4-mapped loopback is loopback");
        }
        // Inference from the same peer is not affected.
        let (status, _, _) =
            call_from(&open, remote, "POST", "/v2/models/demo/infer", &[], JSON_REQUEST.into())
                .await;
        assert_eq!(status, StatusCode::OK);

        let (guarded, _dir, _) =
            app_with(1 << 20, ServingLimits::default(), Some("s3cret-token")).await;
        let uri = "/v2/repository/models/demo/unload";
        let (status, _, body) = call_from(&guarded, remote, "POST", uri, &[], vec![]).await;
        assert_eq!(status, StatusCode::FORBIDDEN);
        assert!(error_of(&body).contains("needs Authorization: Bearer"), "{}", error_of(&body));
        let wrong = [("authorization", "Bearer nope")];
        let (status, _, body) = call_from(&guarded, remote, "POST", uri, &wrong, vec![]).await;
        assert_eq!(status, StatusCode::FORBIDDEN);
        assert!(error_of(&body).contains("does not match"), "{}", error_of(&body));
        let right = [("authorization", "Bearer s3cret-token")];
        let (status, _, body) = call_from(&guarded, remote, "POST", uri, &right, vec![]).await;
        assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
        let uri = "/v2/repository/models/demo/load";
        let (status, _, _) = call_from(&guarded, remote, "POST", uri, &right, vec![]).await;
        assert_eq!(status, StatusCode::OK);
        assert!(!format!("{:?}", AdminToken::new("s3cret-token")).contains("s3cret"));
    }

    /// Bytes in flight: a body declared over the model budget is refused 503 before it is read,
    /// counted as rejected and on /metrics.
    #[tokio::test]
    async fn bytes_in_flight_are_bounded_and_counted() {
        let limits = ServingLimits {
            max_model_inflight_bytes: 64 * 1024,
            max_inflight_bytes: 64 * 1024,
            ..ServingLimits::default()
        };
        let (app, _dir, state) = app_with(1 << 20, limits, None).await;
        // Hold most of the budget as a queued request would.
        let held = state.limits.reserve("demo/1", 64 * 1024).expect("reserve");
        let len = JSON_REQUEST.len().to_string();
        let cl = [("content-length", len.as_str())];
        let (status, _, body) =
            call(&app, "POST", "/v2/models/demo/infer", &cl, JSON_REQUEST.into()).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{}", String::from_utf8_lossy(&body));
        assert!(
            error_of(&body).contains("serving.max_model_inflight_bytes"),
            "{}",
            error_of(&body)
        );
        // Without Content-Length the body is measured after reading: refused the same way.
        let (status, _, _) =
            call(&app, "POST", "/v2/models/demo/infer", &[], JSON_REQUEST.into()).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        drop(held);
        let (status, _, _) =
            call(&app, "POST", "/v2/models/demo/infer", &cl, JSON_REQUEST.into()).await;
        assert_eq!(status, StatusCode::OK);
        let (_, _, stats) = call(&app, "GET", "/v2/models/demo/stats", &[], vec![]).await;
        let stats: Value = serde_json::from_slice(&stats).expect("json");
        assert_eq!(stats["model_stats"][0]["flotilla"]["rejected"], 2, "{stats}");
        let (_, _, text) = call(&app, "GET", "/metrics", &[], vec![]).await;
        let text = String::from_utf8_lossy(&text);
        assert!(text.contains("flotilla_api_refused_total{limit=\"model_bytes\"} 2"), "{text}");
        // A declared length over max_request_bytes is refused before reading.
        let big = [("content-length", "2000000")];
        let (status, _, body) =
            call(&app, "POST", "/v2/models/demo/infer", &big, JSON_REQUEST.into()).await;
        assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
        assert!(error_of(&body).contains("Content-Length 2000000"), "{}", error_of(&body));
    }

    /// Over max_concurrent_requests: 503 at once; past request_timeout_ms: 504. Health checks
    /// are exempt from both.
    #[tokio::test]
    async fn concurrency_and_time_limits_answer_json() {
        let limits = ServingLimits {
            max_concurrent_requests: 1,
            request_timeout: Duration::from_millis(50),
            ..ServingLimits::default()
        };
        let (app, _dir, state) = app_with(1 << 20, limits, None).await;
        let slot = state.limits.request_slot().expect("the only slot");
        let (status, _, body) =
            call(&app, "POST", "/v2/models/demo/infer", &[], JSON_REQUEST.into()).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(error_of(&body).contains("serving.max_concurrent_requests"), "{}", error_of(&body));
        let (status, _, _) = call(&app, "GET", "/v2/health/live", &[], vec![]).await;
        assert_eq!(status, StatusCode::OK, "health is exempt");
        drop(slot);
        // The same layer around a handler slower than the limit.
        let slow = Router::new()
            .route(
                "/v2/models/slow/infer",
                post(|| async {
                    tokio::time::sleep(Duration::from_secs(10)).await;
                    "late"
                }),
            )
            .layer(middleware::from_fn_with_state(state.limits.clone(), admission));
        let started = std::time::Instant::now();
        let (status, _, body) = call(&slow, "POST", "/v2/models/slow/infer", &[], vec![]).await;
        assert_eq!(status, StatusCode::GATEWAY_TIMEOUT);
        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(
            error_of(&body).contains("50 ms (serving.request_timeout_ms)"),
            "{}",
            error_of(&body)
        );
        let refused: Vec<u64> = state.limits.refusals().iter().map(|(_, n)| *n).collect();
        assert_eq!(refused, vec![0, 0, 1, 1, 0]);
    }

    /// A model with free dims (the OCR classifier: `[-1, 3, -1, -1]`) accepts
    /// `max_shapes_per_model` distinct (H, W); a new one past that is refused with 400 before it
    /// costs a plan, while shapes already in use still pass.
    #[tokio::test]
    async fn new_free_dim_shapes_past_the_cap_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let model = dir.path().join("ocr/1");
        std::fs::create_dir_all(&model).expect("dirs");
        let file = super::super::runner::tests::shared_model("ppocr_mobile_v2_cls.onnx");
        std::fs::copy(file, model.join("model.onnx")).expect("copy");
        let repository = Arc::new(Repository::new(dir.path()));
        repository.load_all().await;
        let limits = ServingLimits { max_shapes_per_model: 2, ..ServingLimits::default() };
        let state = ApiState {
            repository,
            max_request_bytes: 1 << 24,
            limits: Arc::new(Limits::new(limits)),
            admin_token: None,
            telemetry_health: Arc::default(),
            optimizations: Arc::default(),
            footprint_probe: None,
        };
        let app = router(state.clone());
        let request = |h: usize, w: usize| {
            let n = 3 * h * w * 4;
            let header = format!(
                r#"{{"inputs":[{{"name":"x","shape":[1,3,{h},{w}],"datatype":"FP32","parameters":{{"binary_data_size":{n}}}}}]}}"#
            );
            let mut body = header.clone().into_bytes();
            body.extend(vec![0u8; n]);
            (header.len().to_string(), body)
        };
        for (h, w, want) in [
            (48, 64, StatusCode::OK),
            (48, 96, StatusCode::OK),
            (48, 64, StatusCode::OK),
            (48, 128, StatusCode::BAD_REQUEST),
            (32, 96, StatusCode::BAD_REQUEST),
            (48, 96, StatusCode::OK),
        ] {
            let (len, body) = request(h, w);
            let (status, _, reply) =
                call(&app, "POST", "/v2/models/ocr/infer", &[(HEADER_LENGTH, &len)], body).await;
            assert_eq!(status, want, "{h}x{w}: {}", String::from_utf8_lossy(&reply));
            if want == StatusCode::BAD_REQUEST {
                let e = error_of(&reply);
                assert!(
                    e.contains("2 distinct sizes") && e.contains("serving.max_shapes_per_model"),
                    "{e}"
                );
                assert!(e.contains(&format!("[{h}, {w}]")), "{e}");
            }
        }
        assert_eq!(state.limits.refusals()[4], (Limit::Shapes, 2));
    }

    /// Issue 8, hole 5: telemetry failures were visible only in the logs and `flotilla host`;
    /// the agent's own `/metrics` now shows them and the clock offset.
    #[tokio::test]
    async fn metrics_show_telemetry_health() {
        let (app, _dir, state) = app_with(1 << 20, ServingLimits::default(), None).await;
        let (_, _, before) = call(&app, "GET", "/metrics", &[], vec![]).await;
        let before = String::from_utf8(before).expect("utf-8");
        assert!(!before.contains("flotilla_telemetry_errors_total"), "not set yet");
        let health = Arc::new(crate::health::TelemetryHealth::default());
        health.record_error("spool: No space left on device");
        health.record_welcome(1_000, 1_010, 900);
        state.telemetry_health.set(health).expect("set once");
        let (_, _, text) = call(&app, "GET", "/metrics", &[], vec![]).await;
        let text = String::from_utf8(text).expect("utf-8");
        assert!(text.contains("flotilla_telemetry_errors_total 1\n"), "{text}");
        assert!(!text.contains("flotilla_telemetry_last_error_timestamp_seconds 0\n"), "{text}");
        assert!(text.contains("flotilla_clock_offset_seconds 0.105\n"), "{text}");
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

    /// One demo-model app shared by every property case (loading the model per case is slow).
    fn shared_app() -> &'static (tokio::runtime::Runtime, Router, tempfile::TempDir) {
        static APP: std::sync::OnceLock<(tokio::runtime::Runtime, Router, tempfile::TempDir)> =
            std::sync::OnceLock::new();
        APP.get_or_init(|| {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("runtime");
            let (app, dir) = rt.block_on(app(1 << 20));
            // The demo model serves, so a case that reaches it can really run.
            let (status, _, body) =
                rt.block_on(call(&app, "POST", "/v2/models/demo/infer", &[], JSON_REQUEST.into()));
            assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
            (rt, app, dir)
        })
    }

    /// A KServe v2 request body shaped like a real one, with every part drawn from values that
    /// are valid, odd or hostile: names, shapes (negative, zero, huge), datatypes, nested data
    /// of any JSON kind, binary sizes, and a binary tail.
    fn arb_infer_body() -> impl proptest::strategy::Strategy<Value = (Vec<u8>, Option<String>)> {
        use proptest::prelude::*;
        let dim = prop_oneof![
            Just(-1i64),
            Just(0),
            Just(1),
            Just(2),
            Just(4),
            Just(1 << 40),
            any::<i64>()
        ];
        let datatype = prop_oneof![
            Just("FP32".to_owned()),
            Just("FP16".to_owned()),
            Just("INT64".to_owned()),
            Just("BYTES".to_owned()),
            Just("BOOL".to_owned()),
            "[A-Z0-9]{0,6}",
        ];
        let scalar = prop_oneof![
            any::<f64>().prop_map(|v| Value::from(v).to_string()),
            any::<i64>().prop_map(|v| v.to_string()),
            (-1e3f64..1e3).prop_map(|v| v.to_string()),
            Just("true".to_owned()),
            Just("null".to_owned()),
            "\"[a-z]{0,5}\"",
            Just("1e999".to_owned()),
        ];
        let data = scalar.clone().prop_recursive(3, 64, 8, |inner| {
            proptest::collection::vec(inner, 0..8).prop_map(|v| format!("[{}]", v.join(",")))
        });
        // Nearly valid: the demo's input with n rows of 4, any datatype, values of any kind.
        let floats = (-1e3f64..1e3).prop_map(|v| v.to_string());
        let values = prop_oneof![
            proptest::collection::vec(floats, 12),
            proptest::collection::vec(scalar.clone(), 12),
        ];
        let datatypes = prop_oneof![Just("FP32".to_owned()), datatype.clone()];
        let near = (1usize..4, datatypes, values).prop_map(|(n, dt, values)| {
            format!(
                "{{\"name\":\"features\",\"shape\":[{n},4],\"datatype\":{dt:?},\"data\":[{}]}}",
                values[..n * 4].join(",")
            )
        });
        let input = (
            prop_oneof![Just("features".to_owned()), ".{0,8}"],
            proptest::collection::vec(dim, 0..4),
            datatype,
            proptest::option::of(data),
            proptest::option::of(any::<i64>()),
        )
            .prop_map(|(name, shape, dt, data, binary)| {
                let shape: Vec<String> = shape.iter().map(i64::to_string).collect();
                let mut fields = vec![
                    format!("\"name\":{}", Value::from(name)),
                    format!("\"shape\":[{}]", shape.join(",")),
                    format!("\"datatype\":{dt:?}"),
                ];
                if let Some(d) = data {
                    fields.push(format!("\"data\":{d}"));
                }
                if let Some(n) = binary {
                    fields.push(format!("\"parameters\":{{\"binary_data_size\":{n}}}"));
                }
                format!("{{{}}}", fields.join(","))
            });
        let input = prop_oneof![input, near];
        (
            proptest::collection::vec(input, 0..3),
            proptest::collection::vec(any::<u8>(), 0..64),
            prop_oneof![Just(None), Just(Some(usize::MAX)), (0usize..400).prop_map(Some)],
            0usize..4,
        )
            .prop_map(|(inputs, tail, header_len, mangle)| {
                let json = format!("{{\"id\":\"p\",\"inputs\":[{}]}}", inputs.join(","));
                let mut body = json.clone().into_bytes();
                let mut header = None;
                match mangle {
                    0 => {}
                    1 => {
                        body.extend_from_slice(&tail);
                        header = Some(match header_len {
                            Some(usize::MAX) => "not a number".to_owned(),
                            Some(n) => n.to_string(),
                            None => json.len().to_string(),
                        });
                    }
                    2 => body.truncate(header_len.unwrap_or(0).min(body.len())),
                    _ => body = tail,
                }
                (body, header)
            })
    }

    proptest::proptest! {
        #![proptest_config(proptest::test_runner::Config { failure_persistence: None, ..Default::default() })]
        /// Whatever the body, the KServe v2 JSON and binary parsers answer: 200 with outputs, or
        /// 4xx / 503 with a JSON error. Never a 500, never a panic.
        #[test]
        fn any_infer_body_is_answered_never_with_a_500((body, header) in arb_infer_body()) {
            let (rt, app, _) = shared_app();
            let headers: Vec<(&str, &str)> = header.iter().map(|h| (HEADER_LENGTH, h.as_str())).collect();
            let (status, _, reply) =
                rt.block_on(call(app, "POST", "/v2/models/demo/infer", &headers, body.clone()));
            proptest::prop_assert!(
                status != StatusCode::INTERNAL_SERVER_ERROR,
                "500 for {}: {}", String::from_utf8_lossy(&body), String::from_utf8_lossy(&reply)
            );
            if status != StatusCode::OK {
                let v: Value = serde_json::from_slice(&reply).expect("a JSON error body");
                proptest::prop_assert!(v["error"].is_string(), "{v}");
            }
        }
    }
}
