//! The optimizer on the inference port: `POST /v2/models/NAME/optimize` starts a search of the
//! model's served version in the background, `GET` the same path shows its progress and then its
//! report; `DELETE` rolls back what an adopted search (`"apply": true`) changed. Like repository
//! control, starting and rolling back are for loopback peers or the admin token.
//!
//! The body (every member optional; unknown members are refused):
//! `{"strategy": "latency|throughput|memory|cost|balanced", "max_accuracy_loss": 0.01,
//!   "max_abs_error": X, "max_rel_error": 0.01, "latency_slo_ms": MS, "price_per_hour": P,
//!   "cpu_share": 0.5, "rounds": 30, "max_batch": N}`.

use axum::extract::{Path, Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use common::directive::OptimizeOptions;
use serde_json::json;

use super::{ApiError, ApiResult, ApiState, check_control, check_names};
use crate::optimizer::start::{StartError, spec_for};

/// Largest body of a start request.
const MAX_BODY: usize = 16 * 1024;

pub(super) async fn start(
    State(s): State<ApiState>,
    Path(model): Path<String>,
    request: Request,
) -> ApiResult<Response> {
    check_control(&s, &request)?;
    check_names(&model, None)?;
    let bytes = axum::body::to_bytes(request.into_body(), MAX_BODY)
        .await
        .map_err(|e| ApiError::bad(format!("reading the body (at most {MAX_BODY} bytes): {e}")))?;
    let options: OptimizeOptions = if bytes.iter().all(u8::is_ascii_whitespace) {
        OptimizeOptions::default()
    } else {
        serde_json::from_slice(&bytes).map_err(|e| ApiError::bad(format!("the body: {e}")))?
    };
    let (name, spec) = spec_for(&s.repository, &model, &options, s.footprint_probe.clone())
        .map_err(|e| match e {
            StartError::Unknown(lookup) => ApiError::from(lookup),
            StartError::Bad(why) => ApiError::bad(why),
        })?;
    let strategy = spec.strategy;
    let adopter = crate::optimizer::jobs::Adopter {
        repository: s.repository.clone(),
        runtime: tokio::runtime::Handle::current(),
    };
    s.optimizations
        .start(&name, spec, Some(adopter))
        .map_err(|e| ApiError(StatusCode::CONFLICT, e))?;
    let status = format!("/v2/models/{name}/optimize");
    Ok((
        StatusCode::ACCEPTED,
        axum::Json(
            json!({"model": name, "strategy": strategy, "state": "running", "status": status}),
        ),
    )
        .into_response())
}

/// `DELETE`: puts back what the last adopted search replaced.
pub(super) async fn rollback(
    State(s): State<ApiState>,
    Path(model): Path<String>,
    request: Request,
) -> ApiResult<axum::Json<serde_json::Value>> {
    check_control(&s, &request)?;
    check_names(&model, None)?;
    let what = s
        .optimizations
        .rollback(&s.repository, &model)
        .await
        .map_err(|e| ApiError(StatusCode::CONFLICT, e))?;
    Ok(axum::Json(json!({"model": model, "rolled_back": what})))
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
