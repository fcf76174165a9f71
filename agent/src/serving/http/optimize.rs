//! The optimizer on the inference port: `POST /v2/models/NAME/optimize` starts a search of the
//! model's served version in the background, `GET` the same path shows its progress and then its
//! report. Like repository control, starting one is for loopback peers or the admin token.
//!
//! The body (every member optional; unknown members are refused):
//! `{"strategy": "latency|throughput|memory|cost|balanced", "max_accuracy_loss": 0.01,
//!   "max_abs_error": X, "max_rel_error": 0.01, "latency_slo_ms": MS, "price_per_hour": P,
//!   "cpu_share": 0.5, "rounds": 30, "max_batch": N}`.

use std::time::Duration;

use axum::extract::{Path, Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::json;

use super::{ApiError, ApiResult, ApiState, check_control, check_names};
use crate::optimizer::accuracy::Bound;
use crate::optimizer::measure::Effort;
use crate::optimizer::search::Spec;
use crate::optimizer::strategy::Strategy;

/// Largest body of a start request.
const MAX_BODY: usize = 16 * 1024;

/// What a start request may say.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct StartRequest {
    strategy: Option<String>,
    max_accuracy_loss: Option<f64>,
    max_abs_error: Option<f64>,
    max_rel_error: Option<f64>,
    latency_slo_ms: Option<f64>,
    price_per_hour: Option<f64>,
    cpu_share: Option<f64>,
    rounds: Option<usize>,
    max_batch: Option<usize>,
}

/// A member within `range`, or a 400 naming it and its value.
fn within(name: &str, value: Option<f64>, low: f64, high: f64) -> ApiResult<Option<f64>> {
    match value {
        Some(v) if !(low..=high).contains(&v) || v.is_nan() => {
            Err(ApiError::bad(format!("{name}: must be {low}..={high}, got {v}")))
        }
        other => Ok(other),
    }
}

pub(super) async fn start(
    State(s): State<ApiState>,
    Path(model): Path<String>,
    request: Request,
) -> ApiResult<Response> {
    check_control(&s, &request)?;
    check_names(&model, None)?;
    let m = s.repository.get(&model, None)?;
    let bytes = axum::body::to_bytes(request.into_body(), MAX_BODY)
        .await
        .map_err(|e| ApiError::bad(format!("reading the body (at most {MAX_BODY} bytes): {e}")))?;
    let asked: StartRequest = if bytes.iter().all(u8::is_ascii_whitespace) {
        StartRequest::default()
    } else {
        serde_json::from_slice(&bytes).map_err(|e| ApiError::bad(format!("the body: {e}")))?
    };
    let strategy: Strategy = match &asked.strategy {
        Some(name) => name.parse().map_err(ApiError::bad)?,
        None => Strategy::Balanced,
    };
    let bound = Bound {
        max_top1_loss: within("max_accuracy_loss", asked.max_accuracy_loss, 0.0, 1.0)?
            .or(Some(0.01)),
        max_abs_error: within("max_abs_error", asked.max_abs_error, 0.0, f64::MAX)?,
        max_rel_error: within("max_rel_error", asked.max_rel_error, 0.0, f64::MAX)?.or(Some(0.01)),
    };
    let cpu_share = within("cpu_share", asked.cpu_share, 0.01, 1.0)?.unwrap_or(0.5);
    let rounds = match asked.rounds {
        Some(r) if !(1..=10_000).contains(&r) => {
            return Err(ApiError::bad(format!("rounds: must be 1..=10000, got {r}")));
        }
        r => r.unwrap_or(30),
    };
    let file = s.repository.root().join(&m.name).join(&m.version).join("model.onnx");
    if !file.is_file() {
        return Err(ApiError::bad(format!(
            "model {:?} version {} is not served from an ONNX file here ({} is missing; a kserve-backed model is optimized on the server that runs it)",
            m.name,
            m.version,
            file.display()
        )));
    }
    let mut config = m.config.clone();
    if let Some(b) = asked.max_batch {
        config.max_batch_size = b;
    }
    let spec = Spec {
        file,
        config,
        strategy,
        bound,
        slo_ms: within("latency_slo_ms", asked.latency_slo_ms, 0.001, 3_600_000.0)?,
        price_per_hour: within("price_per_hour", asked.price_per_hour, 0.0, f64::MAX)?,
        effort: Effort { rounds, max_time: Duration::from_secs(10), cpu_share },
        calibration_rows: 16,
        footprint_probe: s.footprint_probe.clone(),
    };
    s.optimizations.start(&m.name, spec).map_err(|e| ApiError(StatusCode::CONFLICT, e))?;
    let status = format!("/v2/models/{}/optimize", m.name);
    Ok((
        StatusCode::ACCEPTED,
        axum::Json(json!({"model": m.name, "version": m.version, "strategy": strategy, "state": "running", "status": status})),
    )
        .into_response())
}

pub(super) async fn status(
    State(s): State<ApiState>,
    Path(model): Path<String>,
) -> ApiResult<axum::Json<serde_json::Value>> {
    check_names(&model, None)?;
    let state = s.optimizations.status(&model).ok_or_else(|| {
        ApiError(
            StatusCode::NOT_FOUND,
            format!("no search of model {model:?} has run on this agent; POST /v2/models/{model}/optimize starts one"),
        )
    })?;
    Ok(axum::Json(serde_json::to_value(state).unwrap_or_default()))
}
