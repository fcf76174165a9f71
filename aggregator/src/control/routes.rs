//! The control routes of the admin API: directives (list, show, send), decisions, a host's
//! desired state, and optimization searches (start, list). Merged into [`crate::api::router`].

use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::routing::get;
use common::directive::DirectiveBody;
use common::directive::OptimizeOptions;
use common::ids::HostId;
use serde::{Deserialize, Serialize};
use tracing::info;

use super::store::{
    DecisionRecord, DesiredState, DirectiveFilter, DirectiveRecord, DirectiveState, NewDecision,
    NewDirective, OptimizationRecord,
};
use crate::api::{ApiState, Failure, JsonPath, blocking, failure};
use crate::views::{DirectiveRequest, DirectiveView};

/// Default lifetime of an operator's directive.
pub const DEFAULT_TTL: Duration = Duration::from_secs(600);

/// Longest lifetime a directive may be given.
pub const MAX_TTL: Duration = Duration::from_secs(7 * 24 * 3600);

/// Longest a `POST /api/v1/directives` may wait for the answer.
pub const MAX_WAIT: Duration = Duration::from_secs(120);

/// Most records one list returns.
const MAX_LIMIT: usize = 10_000;

/// The control routes.
pub fn routes() -> Router<ApiState> {
    Router::new()
        .route("/api/v1/directives", get(list_directives).post(send_directive))
        .route("/api/v1/directives/{id}", get(show_directive))
        .route("/api/v1/decisions", get(list_decisions))
        .route("/api/v1/hosts/{host}/desired", get(desired))
        .route("/api/v1/policies", get(policies))
        .route("/api/v1/optimizations", get(list_optimizations).post(start_optimization))
}

/// `GET /api/v1/policies`: every scaling policy and where it stands on each host.
async fn policies(State(state): State<ApiState>) -> Json<super::autoscaler::PoliciesView> {
    let (autoscaler, interval) = &state.autoscaler;
    Json(autoscaler.status(*interval))
}

/// The API's view of a stored directive.
pub fn view(d: &DirectiveRecord) -> DirectiveView {
    let payload = d.body.payload();
    DirectiveView {
        id: d.id.clone(),
        host: d.host.clone(),
        kind: d.body.kind().to_owned(),
        payload: if payload.is_empty() {
            serde_json::Value::Null
        } else {
            serde_json::from_slice(&payload).unwrap_or(serde_json::Value::Null)
        },
        summary: d.body.summary(),
        decision: d.decision.clone(),
        state: d.state.name().to_owned(),
        created_ms: d.created_ms,
        not_after_ms: d.not_after_ms,
        attempts: d.attempts,
        first_sent_ms: d.first_sent_ms,
        answered_ms: d.answered_ms,
        message: d.message.clone(),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DirectiveQuery {
    host: Option<String>,
    state: Option<String>,
    decision: Option<String>,
    limit: Option<usize>,
}

async fn list_directives(
    State(state): State<ApiState>,
    query: Result<Query<DirectiveQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Vec<DirectiveView>>, Failure> {
    let Query(q) = query.map_err(|e| failure(StatusCode::BAD_REQUEST, e.body_text()))?;
    let host = q.host.as_deref().map(parse_host).transpose()?;
    let wanted = match q.state.as_deref() {
        None => None,
        Some(s) => Some(DirectiveState::parse(s).ok_or_else(|| {
            failure(
                StatusCode::BAD_REQUEST,
                format!(
                    "state={s:?} is not a directive state; use pending, sent, applied, rejected, unsupported or expired"
                ),
            )
        })?),
    };
    let filter = DirectiveFilter { host, state: wanted, decision: q.decision };
    let limit = q.limit.unwrap_or(100).min(MAX_LIMIT);
    let store = state.stores.control.clone();
    let found = blocking(move || store.directives(&filter, limit)).await?;
    Ok(Json(found.iter().map(view).collect()))
}

async fn show_directive(
    State(state): State<ApiState>,
    JsonPath(id): JsonPath<String>,
) -> Result<Json<DirectiveView>, Failure> {
    let store = state.stores.control.clone();
    let key = id.clone();
    match blocking(move || store.directive(&key)).await? {
        Some(d) => Ok(Json(view(&d))),
        None => Err(failure(
            StatusCode::NOT_FOUND,
            format!("no directive {id:?}; `flotilla directives` lists them"),
        )),
    }
}

async fn send_directive(
    State(state): State<ApiState>,
    body: Result<Json<DirectiveRequest>, axum::extract::rejection::JsonRejection>,
) -> Result<(StatusCode, Json<DirectiveView>), Failure> {
    let Json(req) = body.map_err(|e| failure(StatusCode::BAD_REQUEST, e.body_text()))?;
    let host = parse_host(&req.host)?;
    let payload = match &req.payload {
        None | Some(serde_json::Value::Null) => Vec::new(),
        Some(v) => serde_json::to_vec(v).unwrap_or_default(),
    };
    let body = DirectiveBody::parse(&req.kind, &payload)
        .map_err(|e| failure(StatusCode::BAD_REQUEST, e.to_string()))?;
    let ttl = Duration::from_secs(req.ttl_secs.unwrap_or(DEFAULT_TTL.as_secs()));
    if ttl.is_zero() || ttl > MAX_TTL {
        return Err(failure(
            StatusCode::BAD_REQUEST,
            format!("ttl_secs = {} is out of range; use 1..={}", ttl.as_secs(), MAX_TTL.as_secs()),
        ));
    }
    let wait = Duration::from_secs(req.wait_secs.unwrap_or(0));
    if wait > MAX_WAIT {
        return Err(failure(
            StatusCode::BAD_REQUEST,
            format!(
                "wait_secs = {} is out of range; use 0..={}",
                wait.as_secs(),
                MAX_WAIT.as_secs()
            ),
        ));
    }
    let inputs = serde_json::json!({ "request": req });
    let (status, record) = submit_and_wait(&state, host, body, inputs, ttl, wait).await?;
    Ok((status, Json(view(&record))))
}

/// Records an operator's directive to `host` and waits up to `wait` for its answer: 200 with
/// the answered record, or 202 with the record as it stands (also when `wait` is zero).
async fn submit_and_wait(
    state: &ApiState,
    host: HostId,
    body: DirectiveBody,
    inputs: serde_json::Value,
    ttl: Duration,
    wait: Duration,
) -> Result<(StatusCode, DirectiveRecord), Failure> {
    let telemetry = state.stores.telemetry.clone();
    let h = host.clone();
    if blocking(move || telemetry.host(&h)).await?.is_none() {
        return Err(failure(
            StatusCode::NOT_FOUND,
            format!("unknown host {host}: it never connected; `flotilla hosts` lists the hosts"),
        ));
    }
    let now = crate::ingest::now_ms();
    let decision = NewDecision {
        at_ms: now,
        source: "operator".into(),
        model: body.model().map(str::to_owned),
        rule: "operator".into(),
        reason: format!("sent by an operator through the admin API: {}", body.summary()),
        inputs,
        acted: true,
    };
    let not_after_ms = now.saturating_add(i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX));
    let mut answers = state.delivery.answers();
    let (_, made) = state
        .delivery
        .submit(decision, vec![NewDirective { host: host.clone(), body, not_after_ms }])
        .await
        .map_err(|e| failure(StatusCode::INTERNAL_SERVER_ERROR, common::daemon::error_chain(&e)))?;
    let Some(made) = made.into_iter().next() else {
        return Err(failure(StatusCode::INTERNAL_SERVER_ERROR, "the directive was not recorded"));
    };
    info!(%host, id = %made.id, what = %made.body.summary(), "Operator directive queued.");
    if wait.is_zero() {
        return Ok((StatusCode::ACCEPTED, made));
    }
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        match tokio::time::timeout_at(deadline, answers.recv()).await {
            Ok(Ok(answered)) if answered.id == made.id => {
                return Ok((StatusCode::OK, answered));
            }
            Ok(Ok(_)) => {}
            // Missed answers (lagged) or time is up: read the record as it stands.
            Ok(Err(_)) | Err(_) => break,
        }
    }
    let store = state.stores.control.clone();
    let id = made.id.clone();
    let current = blocking(move || store.directive(&id)).await?.unwrap_or(made);
    let status = if current.state.is_final() { StatusCode::OK } else { StatusCode::ACCEPTED };
    Ok((status, current))
}

/// `POST /api/v1/optimizations`: starts a search (the `optimize` directive, as an operator's)
/// and answers with the directive once the agent has answered it, and the search's record
/// when it accepted.
async fn start_optimization(
    State(state): State<ApiState>,
    body: Result<Json<OptimizationRequest>, axum::extract::rejection::JsonRejection>,
) -> Result<(StatusCode, Json<OptimizationStarted>), Failure> {
    let Json(req) = body.map_err(|e| failure(StatusCode::BAD_REQUEST, e.body_text()))?;
    let host = parse_host(&req.host)?;
    let body = DirectiveBody::Optimize { model: req.model.clone(), options: req.options.clone() };
    let payload = body.payload();
    // The agent validates the options too; this names a bad one before anything is recorded.
    DirectiveBody::parse("optimize", &payload)
        .map_err(|e| failure(StatusCode::BAD_REQUEST, e.to_string()))?;
    let inputs = serde_json::json!({ "request": req });
    let (status, answered) =
        submit_and_wait(&state, host.clone(), body, inputs, OPTIMIZE_TTL, OPTIMIZE_WAIT).await?;
    state.searches.clone().answered(&answered).await;
    let store = state.stores.control.clone();
    let (model, id) = (req.model.clone(), answered.id.clone());
    let record = blocking(move || store.optimizations(Some(&host), Some(&model), usize::MAX))
        .await?
        .into_iter()
        .find(|r| r.directive == id);
    Ok((status, Json(OptimizationStarted { directive: view(&answered), record })))
}

/// Lifetime of an `optimize` directive sent through `POST /api/v1/optimizations`.
const OPTIMIZE_TTL: Duration = Duration::from_secs(60);

/// How long `POST /api/v1/optimizations` waits for the agent's answer.
const OPTIMIZE_WAIT: Duration = Duration::from_secs(30);

/// `POST /api/v1/optimizations`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OptimizationRequest {
    /// The host.
    pub host: String,
    /// The model.
    pub model: String,
    /// The search's options (strategy, bounds, `apply`).
    #[serde(default)]
    pub options: OptimizeOptions,
}

/// What `POST /api/v1/optimizations` answers.
#[derive(Debug, Serialize, Deserialize)]
pub struct OptimizationStarted {
    /// The `optimize` directive, as answered (or still pending: 202).
    pub directive: DirectiveView,
    /// The search's record, when the agent accepted it.
    pub record: Option<OptimizationRecord>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct OptimizationQuery {
    host: Option<String>,
    model: Option<String>,
    limit: Option<usize>,
}

/// `GET /api/v1/optimizations[?host=H&model=M&limit=N]`: the searches followed, newest first.
async fn list_optimizations(
    State(state): State<ApiState>,
    query: Result<Query<OptimizationQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Vec<OptimizationRecord>>, Failure> {
    let Query(q) = query.map_err(|e| failure(StatusCode::BAD_REQUEST, e.body_text()))?;
    let host = q.host.as_deref().map(parse_host).transpose()?;
    let limit = q.limit.unwrap_or(100).min(MAX_LIMIT);
    let store = state.stores.control.clone();
    Ok(Json(blocking(move || store.optimizations(host.as_ref(), q.model.as_deref(), limit)).await?))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DecisionQuery {
    model: Option<String>,
    limit: Option<usize>,
}

async fn list_decisions(
    State(state): State<ApiState>,
    query: Result<Query<DecisionQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Vec<DecisionRecord>>, Failure> {
    let Query(q) = query.map_err(|e| failure(StatusCode::BAD_REQUEST, e.body_text()))?;
    let limit = q.limit.unwrap_or(100).min(MAX_LIMIT);
    let store = state.stores.control.clone();
    Ok(Json(blocking(move || store.decisions(q.model.as_deref(), limit)).await?))
}

async fn desired(
    State(state): State<ApiState>,
    JsonPath(host): JsonPath<String>,
) -> Result<Json<DesiredState>, Failure> {
    let host = parse_host(&host)?;
    let store = state.stores.control.clone();
    let h = host.clone();
    Ok(Json(blocking(move || store.desired(&h)).await?.unwrap_or_default()))
}

fn parse_host(s: &str) -> Result<HostId, Failure> {
    HostId::new(s).map_err(|e| failure(StatusCode::BAD_REQUEST, e.to_string()))
}
