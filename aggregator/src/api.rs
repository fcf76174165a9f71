//! The admin HTTP API: JSON over HTTP for the `flotilla` CLI and scripts, plus `/metrics`.
//!
//! Invariants:
//! - When a token is configured (required on non-loopback addresses), every route, `/metrics`
//!   included, needs `Authorization: Bearer <token>`; a missing or wrong token gets 401.
//! - Errors are `{"error": "..."}` with a status that says whose fault it was (400 bad input,
//!   404 unknown host, 500 storage).
//! - Store calls run on blocking threads, never on the async workers.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use common::ids::HostId;
use common::proto::Inventory;
use common::tls::Revocations;
use serde::Deserialize;
use tracing::info;

use crate::connections::Connections;
use crate::ingest::now_ms;
use crate::stats::{Gauges, Stats};
use crate::store::{HostRecord, Stores, decode_or_skip};
use crate::views::{
    ApiError, HostDetail, HostState, HostSummary, MetricNames, MetricSeries, Resolution,
    RevokeResult,
};

/// What the handlers share.
#[derive(Debug, Clone)]
pub struct ApiState {
    /// Storage.
    pub stores: Stores,
    /// Decisions and directive delivery.
    pub delivery: Arc<crate::control::delivery::Delivery>,
    /// Open agent connections.
    pub connections: Connections,
    /// Revoked hosts, shared with the TLS verifier.
    pub revocations: Revocations,
    /// Counters.
    pub stats: Arc<Stats>,
    /// Bearer token, when required.
    pub token: Option<Arc<str>>,
    /// Silence after which a host counts as offline.
    pub offline_after: Duration,
    /// The analytics runner (results, budgets, manual runs).
    pub analytics: Arc<crate::scheduler::Analytics>,
    /// The autoscaler (policies and where they stand), and how often it evaluates.
    pub autoscaler: (Arc<crate::control::autoscaler::Autoscaler>, Duration),
    /// The optimization searches followed to their reports.
    pub searches: Arc<crate::control::searches::Searches>,
}

/// The router.
pub fn router(state: ApiState) -> Router {
    Router::new()
        .route("/api/v1/health", get(|| async { Json(serde_json::json!({"status": "ok"})) }))
        .route("/api/v1/hosts", get(list_hosts))
        .route("/api/v1/hosts/{host}", get(host_detail))
        .route("/api/v1/hosts/{host}/metrics/{metric}", get(metric_series))
        .route("/api/v1/hosts/{host}/metric-names", get(metric_names))
        .route("/api/v1/hosts/{host}/revoke", post(revoke).delete(unrevoke))
        .route("/api/v1/models", get(models))
        .route("/api/v1/analytics", get(analytics_summary))
        .route("/api/v1/analytics/run", post(analytics_run))
        .route("/api/v1/forecasts", get(forecasts))
        .route("/api/v1/forecasts/{target}", get(forecast))
        .route("/api/v1/costs", get(|s: State<ApiState>| report(s, "report/costs")))
        .route("/api/v1/plans", get(|s: State<ApiState>| report(s, "report/plans")))
        .route(
            "/api/v1/budgets",
            get(|s: State<ApiState>| report(s, "report/budgets")).post(add_budget),
        )
        .route("/api/v1/budgets/{name}", axum::routing::delete(delete_budget))
        .route("/api/v1/alerts", get(alerts))
        .route("/api/v1/anomalies", get(anomalies))
        .route("/metrics", get(prometheus))
        .merge(crate::control::routes::routes())
        .fallback(|| async {
            failure(StatusCode::NOT_FOUND, "no such route; see docs/admin-api.md")
        })
        .method_not_allowed_fallback(|| async {
            failure(
                StatusCode::METHOD_NOT_ALLOWED,
                "method not allowed on this route; see docs/admin-api.md",
            )
        })
        .layer(middleware::from_fn_with_state(state.clone(), require_token))
        .with_state(state)
}

/// An error response.
#[derive(Debug)]
pub struct Failure(StatusCode, String);

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        (self.0, Json(ApiError { error: self.1 })).into_response()
    }
}

/// `Path`, but a bad path segment (e.g. invalid UTF-8) is a JSON 400 like every other error.
#[derive(Debug)]
pub struct JsonPath<T>(pub T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned + Send> axum::extract::FromRequestParts<S>
    for JsonPath<T>
{
    type Rejection = Failure;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, Failure> {
        Path::<T>::from_request_parts(parts, state)
            .await
            .map(|Path(t)| Self(t))
            .map_err(|e| failure(StatusCode::BAD_REQUEST, e.to_string()))
    }
}

pub(crate) fn failure(status: StatusCode, msg: impl Into<String>) -> Failure {
    Failure(status, msg.into())
}

async fn require_token(
    State(state): State<ApiState>,
    headers: HeaderMap,
    req: Request,
    next: Next,
) -> Response {
    if let Some(token) = &state.token {
        let given = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if !given.is_some_and(|g| constant_time_eq(g.as_bytes(), token.as_bytes())) {
            return failure(
                StatusCode::UNAUTHORIZED,
                "missing or wrong bearer token: pass --token or set FLOTILLA_TOKEN",
            )
            .into_response();
        }
    }
    next.run(req).await
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, crate::store::StoreError> + Send + 'static,
) -> Result<T, Failure> {
    match tokio::task::spawn_blocking(f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => {
            Err(failure(StatusCode::INTERNAL_SERVER_ERROR, common::daemon::error_chain(&e)))
        }
        Err(e) => Err(failure(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())),
    }
}

fn parse_host(s: &str) -> Result<HostId, Failure> {
    HostId::new(s).map_err(|e| failure(StatusCode::BAD_REQUEST, e.to_string()))
}

impl ApiState {
    fn state_of(&self, host: &HostId, rec: &HostRecord, now: i64) -> HostState {
        // A connected host got past the verifier (e.g. with a certificate issued after its
        // revocation), so it is online whatever an old revocation says.
        if self.connections.is_connected(host) {
            HostState::Online
        } else if self.revocations.revoked_at(host).is_some() {
            HostState::Revoked
        } else if now - rec.last_seen_ms
            <= i64::try_from(self.offline_after.as_millis()).unwrap_or(i64::MAX)
        {
            HostState::Online
        } else {
            HostState::Offline
        }
    }

    fn summary(
        &self,
        host: &HostId,
        rec: &HostRecord,
        gpu_count: usize,
        latest: Option<&common::proto::Sample>,
        now: i64,
    ) -> HostSummary {
        let gpu_utils: Vec<f64> = latest
            .map(|s| s.gpus.iter().filter_map(|g| g.util_gpu_pct).map(f64::from).collect())
            .unwrap_or_default();
        HostSummary {
            host: host.to_string(),
            state: self.state_of(host, rec, now),
            last_seen_unix_ms: (rec.last_seen_ms > 0).then_some(rec.last_seen_ms),
            gpu_count: u32::try_from(gpu_count).unwrap_or(u32::MAX),
            cpu_util_pct: latest.and_then(|s| s.host.as_ref()).map(|h| f64::from(h.cpu_util_pct)),
            gpu_util_pct: (!gpu_utils.is_empty())
                .then(|| gpu_utils.iter().sum::<f64>() / gpu_utils.len() as f64),
            samples_total: rec.samples_total,
            last_seq: rec.last_seq,
            agent_version: rec.agent_version.clone(),
        }
    }
}

async fn list_hosts(State(state): State<ApiState>) -> Result<Json<Vec<HostSummary>>, Failure> {
    let store = state.stores.telemetry.clone();
    let rows = blocking(move || {
        let mut rows = Vec::new();
        for (host, rec) in store.hosts()? {
            let gpus = store.inventory(&host)?.map_or(0, |i| i.gpus.len());
            let latest = store.latest_sample(&host)?;
            rows.push((host, rec, gpus, latest));
        }
        Ok(rows)
    })
    .await?;
    let now = now_ms();
    Ok(Json(rows.iter().map(|(h, r, g, l)| state.summary(h, r, *g, l.as_ref(), now)).collect()))
}

async fn load_host(
    state: &ApiState,
    host: &HostId,
) -> Result<(HostRecord, Inventory, Option<common::proto::Sample>), Failure> {
    let store = state.stores.telemetry.clone();
    let h = host.clone();
    let (rec, inventory, latest) =
        blocking(move || Ok((store.host(&h)?, store.inventory(&h)?, store.latest_sample(&h)?)))
            .await?;
    let rec = rec.ok_or_else(|| {
        failure(
            StatusCode::NOT_FOUND,
            format!("unknown host {host}: it has never connected (see `flotilla hosts`)"),
        )
    })?;
    Ok((rec, inventory.unwrap_or_default(), latest))
}

async fn host_detail(
    State(state): State<ApiState>,
    JsonPath(host): JsonPath<String>,
) -> Result<Json<HostDetail>, Failure> {
    let host = parse_host(&host)?;
    let (rec, inventory, latest) = load_host(&state, &host).await?;
    let store = state.stores.telemetry.clone();
    let h = host.clone();
    let telemetry = blocking(move || store.host_health(&h)).await?;
    Ok(Json(HostDetail {
        telemetry,
        dedup_seen: rec.seen_above,
        summary: state.summary(&host, &rec, inventory.gpus.len(), latest.as_ref(), now_ms()),
        inventory,
        latest,
        spool_dropped_batches: rec.spool_dropped_batches,
        spool_dropped_samples: rec.spool_dropped_samples,
        cert_not_after_secs: (rec.cert_not_after_secs > 0).then_some(rec.cert_not_after_secs),
    }))
}

/// Query of a metric series.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SeriesQuery {
    /// Window, seconds back from now (default 3600).
    since_secs: Option<u64>,
    /// raw | minute | hour (default by window).
    resolution: Option<Resolution>,
}

async fn metric_series(
    State(state): State<ApiState>,
    JsonPath((host, metric)): JsonPath<(String, String)>,
    query: Result<Query<SeriesQuery>, QueryRejection>,
) -> Result<Json<MetricSeries>, Failure> {
    let Query(q) = query.map_err(|e| {
        failure(
            StatusCode::BAD_REQUEST,
            format!("{e}; use since_secs=N (seconds) and resolution=raw|minute|hour"),
        )
    })?;
    let host = parse_host(&host)?;
    load_host(&state, &host).await?;
    let since_secs = q.since_secs.unwrap_or(3600).min(100 * 365 * 86_400);
    let resolution = q.resolution.unwrap_or(match since_secs {
        0..=7200 => Resolution::Raw,
        7201..=172_800 => Resolution::Minute,
        _ => Resolution::Hour,
    });
    let since_ms = now_ms() - i64::try_from(since_secs).unwrap_or(0) * 1000;
    let store = state.stores.telemetry.clone();
    let (h, m) = (host.clone(), metric.clone());
    let points = blocking(move || store.series(&h, &m, since_ms, resolution)).await?;
    Ok(Json(MetricSeries { host: host.to_string(), metric, resolution, points }))
}

async fn metric_names(
    State(state): State<ApiState>,
    JsonPath(host): JsonPath<String>,
) -> Result<Json<MetricNames>, Failure> {
    let host = parse_host(&host)?;
    let (_, _, latest) = load_host(&state, &host).await?;
    let metrics = latest
        .map(|s| common::metrics::flatten(&s).into_iter().map(|(n, _)| n).collect())
        .unwrap_or_default();
    Ok(Json(MetricNames { host: host.to_string(), metrics }))
}

async fn revoke(
    State(state): State<ApiState>,
    JsonPath(host): JsonPath<String>,
) -> Result<Json<RevokeResult>, Failure> {
    let host = parse_host(&host)?;
    let at = now_ms() / 1000;
    let store = state.stores.revocations.clone();
    let h = host.clone();
    blocking(move || store.revoke(&h, at)).await?;
    state.revocations.revoke(host.clone(), at);
    let disconnected =
        state.connections.close(&host, common::proto::code::REVOKED, b"certificate revoked");
    info!(%host, at, disconnected, "Host revoked.");
    Ok(Json(RevokeResult { host: host.to_string(), revoked_at_secs: Some(at), disconnected }))
}

async fn unrevoke(
    State(state): State<ApiState>,
    JsonPath(host): JsonPath<String>,
) -> Result<Json<RevokeResult>, Failure> {
    let host = parse_host(&host)?;
    let store = state.stores.revocations.clone();
    let h = host.clone();
    let had = blocking(move || store.unrevoke(&h)).await?;
    state.revocations.unrevoke(&host);
    if !had {
        return Err(failure(StatusCode::NOT_FOUND, format!("host {host} is not revoked")));
    }
    info!(%host, "Host revocation lifted.");
    Ok(Json(RevokeResult { host: host.to_string(), revoked_at_secs: None, disconnected: false }))
}

async fn prometheus(State(state): State<ApiState>) -> Result<Response, Failure> {
    let store = state.stores.telemetry.clone();
    let hosts = blocking(move || store.hosts()).await?;
    let now = now_ms();
    let mut counts = [("online", 0), ("offline", 0), ("revoked", 0)];
    for (h, rec) in &hosts {
        let i = match state.state_of(h, rec, now) {
            HostState::Online => 0,
            HostState::Offline => 1,
            HostState::Revoked => 2,
        };
        counts[i].1 += 1;
    }
    let mut body = state
        .stats
        .render(&Gauges { connections_open: state.connections.len() as u64, hosts: counts });
    body.push_str(&health_metrics(&hosts, &state.analytics.health()));
    body.push_str(&state.delivery.stats.render());
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body).into_response())
}

/// `/metrics` lines for dedup state and analytics failures.
fn health_metrics(
    hosts: &[(HostId, HostRecord)],
    analytics: &crate::scheduler::AnalyticsHealth,
) -> String {
    let seen: u64 = hosts.iter().map(|(_, r)| r.seen_above).sum();
    format!(
        "# HELP flotilla_dedup_seen_seqs Stored seqs above the hosts' watermarks (bounded by their \
         spools).\n# TYPE flotilla_dedup_seen_seqs gauge\nflotilla_dedup_seen_seqs {seen}\n\
         # HELP flotilla_analytics_failures_total Analytics failures, by kind (each is logged at \
         ERROR).\n# TYPE flotilla_analytics_failures_total counter\n\
         flotilla_analytics_failures_total{{kind=\"pass\"}} {}\n\
         flotilla_analytics_failures_total{{kind=\"webhook\"}} {}\n\
         flotilla_analytics_failures_total{{kind=\"scheduler\"}} {}\n\
         # HELP flotilla_analytics_passes_skipped_total Scheduled analytics passes skipped because \
         the previous pass was still running.\n# TYPE flotilla_analytics_passes_skipped_total \
         counter\nflotilla_analytics_passes_skipped_total {}\n\
         # HELP flotilla_store_skipped_records_total Stored records that reads skipped because \
         they do not decode (each is counted, the first and every thousandth logged at WARN).\n\
         # TYPE flotilla_store_skipped_records_total counter\n\
         flotilla_store_skipped_records_total {}\n",
        analytics.pass_failures,
        analytics.webhook_failures,
        analytics.scheduler_failures,
        analytics.passes_skipped,
        crate::store::skipped_records()
    )
}

// === analytics routes ===

/// The longest window `/api/v1/models` answers for.
const MAX_MODELS_WINDOW_SECS: u64 = 366 * 86_400;

/// Query of `/api/v1/models`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ModelsQuery {
    /// Window, seconds back from now (default 300).
    since_secs: Option<u64>,
}

async fn models(
    State(state): State<ApiState>,
    query: Result<Query<ModelsQuery>, QueryRejection>,
) -> Result<Json<Vec<crate::analytics::models::ModelView>>, Failure> {
    let Query(q) = query.map_err(|e| {
        failure(
            StatusCode::BAD_REQUEST,
            format!("{e}; use since_secs=N (seconds, 1..={MAX_MODELS_WINDOW_SECS})"),
        )
    })?;
    let since_secs = q.since_secs.unwrap_or(300);
    if !(1..=MAX_MODELS_WINDOW_SECS).contains(&since_secs) {
        return Err(failure(
            StatusCode::BAD_REQUEST,
            format!(
                "since_secs must be 1..={MAX_MODELS_WINDOW_SECS} (a year; data older than the \
                 store's hour retention is gone), got {since_secs}"
            ),
        ));
    }
    let now = now_ms();
    let from = now - i64::try_from(since_secs).unwrap_or(300) * 1000;
    let store = state.stores.telemetry.clone();
    // Per host, whole hours and minutes come from model rollups (histograms merged), only the
    // edges from raw samples: exact percentiles over any window the data is kept for.
    let per_host = blocking(move || {
        let mut out = Vec::new();
        for (host, _) in store.hosts()? {
            out.push((host.to_string(), store.model_totals(&host, from, now + 1)?));
        }
        Ok(out)
    })
    .await?;
    Ok(Json(crate::analytics::models::summarize(&per_host, since_secs)))
}

async fn doc<T: serde::de::DeserializeOwned + Send + 'static>(
    state: &ApiState,
    key: String,
) -> Result<Option<T>, Failure> {
    let store = state.stores.reports.clone();
    let k = key.clone();
    let Some(bytes) = blocking(move || store.doc(&k)).await? else { return Ok(None) };
    serde_json::from_slice(&bytes).map(Some).map_err(|e| {
        failure(StatusCode::INTERNAL_SERVER_ERROR, format!("stored {key} does not decode: {e}"))
    })
}

fn no_pass_yet() -> Failure {
    failure(
        StatusCode::NOT_FOUND,
        "no analytics pass has run yet: wait for the schedule or run `flotilla analytics run`",
    )
}

async fn report(State(state): State<ApiState>, key: &'static str) -> Result<Response, Failure> {
    let v: serde_json::Value = doc(&state, key.to_owned()).await?.ok_or_else(no_pass_yet)?;
    Ok(Json(v).into_response())
}

async fn analytics_summary(
    State(state): State<ApiState>,
) -> Result<Json<crate::scheduler::RunSummary>, Failure> {
    doc(&state, "report/meta".to_owned()).await?.map(Json).ok_or_else(no_pass_yet)
}

async fn analytics_run(
    State(state): State<ApiState>,
) -> Result<Json<crate::scheduler::RunSummary>, Failure> {
    state
        .analytics
        .run_once(now_ms())
        .await
        .map(Json)
        .map_err(|e| failure(StatusCode::INTERNAL_SERVER_ERROR, common::daemon::error_chain(&e)))
}

async fn forecasts(
    State(state): State<ApiState>,
) -> Result<Json<Vec<crate::scheduler::ForecastSummary>>, Failure> {
    let meta: crate::scheduler::RunSummary =
        doc(&state, "report/meta".to_owned()).await?.ok_or_else(no_pass_yet)?;
    Ok(Json(meta.forecasts))
}

/// Query of `/api/v1/forecasts/{target}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ForecastQuery {
    /// For a host: gpu_util_pct (default when it has one) or cpu_util_pct.
    metric: Option<String>,
}

async fn forecast(
    State(state): State<ApiState>,
    JsonPath(target): JsonPath<String>,
    query: Result<Query<ForecastQuery>, QueryRejection>,
) -> Result<Json<crate::analytics::ForecastView>, Failure> {
    let Query(q) = query.map_err(|e| {
        failure(StatusCode::BAD_REQUEST, format!("{e}; use metric=gpu_util_pct|cpu_util_pct"))
    })?;
    let mut candidates = vec![target.clone(), format!("model:{target}")];
    match q.metric.as_deref() {
        Some(m) => candidates.push(format!("host:{target}:{m}")),
        None => {
            candidates.push(format!("host:{target}:gpu_util_pct"));
            candidates.push(format!("host:{target}:cpu_util_pct"));
        }
    }
    for c in candidates {
        if let Some(v) = doc(&state, format!("forecast/{c}")).await? {
            return Ok(Json(v));
        }
    }
    let meta: Option<crate::scheduler::RunSummary> = doc(&state, "report/meta".to_owned()).await?;
    let known: Vec<String> =
        meta.map(|m| m.forecasts.into_iter().map(|f| f.target).collect()).unwrap_or_default();
    Err(failure(
        StatusCode::NOT_FOUND,
        format!(
            "no forecast for {target:?}: name a model or host; forecasts exist for: {}",
            if known.is_empty() {
                "none (no analytics pass yet)".to_owned()
            } else {
                known.join(", ")
            }
        ),
    ))
}

async fn add_budget(
    State(state): State<ApiState>,
    body: Result<Json<crate::analytics::budgets::Budget>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<Vec<crate::analytics::budgets::Budget>>, Failure> {
    let Json(budget) =
        body.map_err(|e| failure(StatusCode::BAD_REQUEST, format!("budget: {e}")))?;
    let problems = budget.problems("budget");
    if !problems.is_empty() {
        return Err(failure(StatusCode::BAD_REQUEST, problems.join("; ")));
    }
    if state.analytics.settings().budgets.iter().any(|b| b.name == budget.name) {
        return Err(failure(
            StatusCode::CONFLICT,
            format!("budget {:?} is defined in the policy file; change it there", budget.name),
        ));
    }
    let store = state.stores.reports.clone();
    let saved = blocking(move || {
        let mut saved = Vec::new();
        update_api_budgets(store.as_ref(), &mut |all| {
            all.retain(|b| b.name != budget.name);
            all.push(budget.clone());
            saved.clone_from(all);
        })?;
        Ok(saved)
    })
    .await?;
    Ok(Json(saved))
}

async fn delete_budget(
    State(state): State<ApiState>,
    JsonPath(name): JsonPath<String>,
) -> Result<Json<Vec<crate::analytics::budgets::Budget>>, Failure> {
    let store = state.stores.reports.clone();
    let n = name.clone();
    let (had, all) = blocking(move || {
        let (mut had, mut saved) = (false, Vec::new());
        update_api_budgets(store.as_ref(), &mut |all| {
            let before = all.len();
            all.retain(|b| b.name != n);
            had = before != all.len();
            saved.clone_from(all);
        })?;
        Ok((had, saved))
    })
    .await?;
    if !had {
        return Err(failure(
            StatusCode::NOT_FOUND,
            format!(
                "no budget {name:?} was added through the API (file budgets are edited in the policy file)"
            ),
        ));
    }
    Ok(Json(all))
}

/// Read-modify-write of the API budgets as one atomic store update: concurrent requests never
/// lose each other's budget, and an undecodable document fails the request instead of being
/// replaced by an empty list.
fn update_api_budgets(
    store: &dyn crate::store::ReportStore,
    change: &mut dyn FnMut(&mut Vec<crate::analytics::budgets::Budget>),
) -> Result<(), crate::store::StoreError> {
    store.update_doc(crate::scheduler::API_BUDGETS_DOC, &mut |current| {
        let mut all = crate::scheduler::decode_api_budgets(current)?;
        change(&mut all);
        serde_json::to_vec(&all).map_err(|e| crate::store::StoreError::Corrupt {
            what: crate::scheduler::API_BUDGETS_DOC.into(),
            reason: e.to_string(),
        })
    })
}

/// Query of `/api/v1/alerts` and `/api/v1/anomalies`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct HistoryQuery {
    /// Most history records to return (default 100).
    limit: Option<usize>,
}

/// `GET /api/v1/alerts`.
#[derive(Debug, Clone, serde::Serialize, Deserialize)]
pub struct AlertsView {
    /// Active alerts.
    pub active: Vec<crate::analytics::alerts::Alert>,
    /// Transitions, newest first.
    pub history: Vec<crate::analytics::alerts::Alert>,
}

async fn alerts(
    State(state): State<ApiState>,
    query: Result<Query<HistoryQuery>, QueryRejection>,
) -> Result<Json<AlertsView>, Failure> {
    let Query(q) =
        query.map_err(|e| failure(StatusCode::BAD_REQUEST, format!("{e}; use limit=N")))?;
    let book: crate::analytics::alerts::AlertBook =
        doc(&state, "alerts/book".to_owned()).await?.unwrap_or_default();
    let store = state.stores.reports.clone();
    let limit = q.limit.unwrap_or(100).min(10_000);
    let raw = blocking(move || store.history("alert", i64::MIN, limit)).await?;
    Ok(Json(AlertsView {
        active: book.active.into_values().collect(),
        history: raw
            .iter()
            .filter_map(|v| decode_or_skip("alert", b"history/alert", serde_json::from_slice(v)))
            .collect(),
    }))
}

async fn anomalies(
    State(state): State<ApiState>,
    query: Result<Query<HistoryQuery>, QueryRejection>,
) -> Result<Json<Vec<crate::scheduler::AnomalyEvent>>, Failure> {
    let Query(q) =
        query.map_err(|e| failure(StatusCode::BAD_REQUEST, format!("{e}; use limit=N")))?;
    let store = state.stores.reports.clone();
    let limit = q.limit.unwrap_or(100).min(10_000);
    let raw = blocking(move || store.history("anomaly", i64::MIN, limit)).await?;
    Ok(Json(
        raw.iter()
            .filter_map(|v| {
                decode_or_skip("anomaly", b"history/anomaly", serde_json::from_slice(v))
            })
            .collect(),
    ))
}
