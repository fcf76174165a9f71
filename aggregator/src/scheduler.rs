//! The analytics runner: builds a [`Snapshot`] from the store, runs [`analytics::analyze`],
//! stores the results, applies alert transitions (log, history, webhook), on a cron schedule
//! (tokio-cron-scheduler, `[analytics] schedule`) and on demand (`POST /api/v1/analytics/run`).
//!
//! Invariants:
//! - One pass at a time (a mutex); a scheduled pass that finds one running waits for it.
//! - Store reads and writes run on blocking threads.
//! - The alert book (active alerts) is stored after every pass, so a restart neither re-fires
//!   nor forgets active alerts; every transition is kept in the `alert` history.
//! - Analysis documents (`forecast/TARGET`, `report/*`) are replaced whole by each pass.
//! - A failed pass (or webhook delivery, or the scheduler itself) is logged at ERROR, counted in
//!   [`AnalyticsHealth`] (on `/metrics` and the analytics summary API), and retried with
//!   backoff: a pass up to [`PASS_RETRIES`] times before the next scheduled one, the scheduler
//!   until it starts. Nothing ends silently.
//!
//! Stored documents: `report/meta`, `report/costs`, `report/plans`, `report/budgets`,
//! `forecast/{target}`, `alerts/book`, `budgets/api` (budgets added through the API).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use common::config::ConfigError;
use common::config::aggregator::AnalyticsConfig;
use common::ids::HostId;
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::analytics::alerts::{Alert, AlertBook, AlertState, Severity};
use crate::analytics::anomaly::Anomaly;
use crate::analytics::budgets::Budget;
use crate::analytics::cost::PricingCatalog;
use crate::analytics::series::{DAY_MS, HOUR_MS};
use crate::analytics::settings::Settings;
use crate::analytics::{self, Analysis, HostSnapshot, RecentWindow, Snapshot};
use crate::hour_cache::HourCache;
use crate::store::{ReportStore, StoreError, Stores, TelemetryStore};

/// Why a pass failed.
#[derive(Debug, thiserror::Error)]
pub enum AnalyticsError {
    /// Storage.
    #[error("analytics pass: {0}")]
    Store(#[from] StoreError),
    /// Encoding results.
    #[error("analytics pass: encoding {what}")]
    Encode {
        /// What.
        what: String,
        /// serde's reason.
        #[source]
        source: serde_json::Error,
    },
    /// A blocking task failed.
    #[error("analytics pass: task failed: {0}")]
    Task(String),
    /// The scheduler could not be set up.
    #[error("analytics.schedule {schedule:?}: {reason}")]
    Schedule {
        /// The cron expression.
        schedule: String,
        /// Why.
        reason: String,
    },
}

/// What the API shows about the latest pass.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunSummary {
    /// When it ran, Unix ms.
    pub generated_ms: i64,
    /// Hosts in the snapshot.
    pub hosts: usize,
    /// Forecast targets, with their error if they failed.
    pub forecasts: Vec<ForecastSummary>,
    /// Plans proposed.
    pub plans: usize,
    /// Budgets evaluated.
    pub budgets: usize,
    /// Alert transitions in this pass.
    pub alert_transitions: Vec<Alert>,
    /// Alerts active after it.
    pub active_alerts: usize,
    /// Directives budget auto-optimize made in this pass.
    #[serde(default)]
    pub auto_optimized: usize,
}

/// One forecast target in a summary.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ForecastSummary {
    /// `model:NAME` or `host:HOST:METRIC`.
    pub target: String,
    /// Method used, when it worked.
    pub method: Option<String>,
    /// Why not, when it did not.
    pub error: Option<String>,
    /// Anomalies found.
    pub anomalies: usize,
}

/// An anomaly with its target, as kept in the history.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AnomalyEvent {
    /// Forecast target.
    pub target: String,
    /// The anomaly.
    #[serde(flatten)]
    pub anomaly: Anomaly,
}

/// Times a failed scheduled pass is retried before waiting for the next scheduled one.
pub const PASS_RETRIES: u32 = 3;

/// First wait before retrying a failed pass or restarting the scheduler (doubles each time,
/// up to [`MAX_RETRY_BACKOFF`]).
pub const FIRST_RETRY_BACKOFF: Duration = Duration::from_secs(5);

/// Longest wait between retries.
pub const MAX_RETRY_BACKOFF: Duration = Duration::from_secs(300);

/// Failures of the analytics runner since the aggregator started.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AnalyticsHealth {
    /// Passes that failed (each retry counts).
    pub pass_failures: u64,
    /// Alert webhook deliveries that failed after all their attempts.
    pub webhook_failures: u64,
    /// Times the cron scheduler failed and was restarted.
    pub scheduler_failures: u64,
    /// Scheduled passes skipped because the previous pass was still running (they are not
    /// queued: the next one on the schedule covers the same data).
    #[serde(default)]
    pub passes_skipped: u64,
    /// The latest failure, in words (empty when none).
    pub last_failure: String,
    /// When, Unix ms (0 when none).
    pub last_failure_ms: i64,
}

/// The analytics runner.
#[derive(Debug)]
pub struct Analytics {
    stores: Stores,
    settings: Settings,
    catalog: PricingCatalog,
    pass: Mutex<()>,
    webhook_backoff: Duration,
    health: Arc<std::sync::Mutex<AnalyticsHealth>>,
    retry_backoff: Duration,
    /// Where budget auto-optimize sends its directives, and their lifetime.
    delivery: Option<(Arc<crate::control::delivery::Delivery>, Duration)>,
    /// The autoscaler's `budget_cap` alerts, added to each pass's observations.
    scaling_alerts: Option<Arc<crate::control::budget_cap::ScalingAlerts>>,
    /// Decoded hours and fitted forecasts kept between passes (used under the pass lock).
    memory: Arc<std::sync::Mutex<PassMemory>>,
}

/// What a pass keeps for the next one, so it reads and fits only what changed.
#[derive(Debug, Default)]
pub struct PassMemory {
    /// Decoded hour rollups per host.
    pub hours: HourCache,
    /// Forecasts by target, with their inputs' fingerprints.
    pub forecasts: analytics::ForecastMemo,
}

/// Loads the policy and pricing files the config names (the built-in catalog and an empty
/// policy when it names none).
pub fn load_settings(config: &AnalyticsConfig) -> Result<(Settings, PricingCatalog), ConfigError> {
    let settings = match &config.policy_file {
        Some(p) => Settings::load(p)?,
        None => Settings::default(),
    };
    let catalog = match &config.pricing_file {
        Some(p) => {
            let text = std::fs::read_to_string(p)
                .map_err(|source| ConfigError::Read { path: p.clone(), source })?;
            PricingCatalog::parse(&text, &p.display().to_string())?
        }
        None => PricingCatalog::builtin()?,
    };
    Ok((settings, catalog))
}

/// Checks the analytics part of the config before startup: the policy and pricing files parse
/// and the schedule is a valid cron expression. Every problem names its key.
pub fn check(config: &AnalyticsConfig) -> Result<(), ConfigError> {
    load_settings(config)?;
    if let Err(e) = tokio_cron_scheduler::Job::new(config.schedule.as_str(), |_, _| {}) {
        return Err(ConfigError::Invalid {
            origin: "aggregator config".into(),
            problems: vec![format!(
                "analytics.schedule: must be a cron expression (sec min hour day month weekday), got {:?}: {e}",
                config.schedule
            )],
        });
    }
    Ok(())
}

/// What budget auto-optimize needs to ask for a search once a week at most: the searches kept,
/// the budgets' own requests for one (whatever their answer), and each host's hourly rate.
fn search_history(
    control: &dyn crate::control::store::ControlStore,
    analysis: &analytics::Analysis,
    now_ms: i64,
) -> Result<crate::control::optimize::SearchHistory, AnalyticsError> {
    use crate::control::optimize::{OPTIMIZE_RULE, SEARCH_AGAIN_AFTER_MS};
    let mut history = crate::control::optimize::SearchHistory::default();
    let recent = |at_ms: i64| now_ms.saturating_sub(at_ms) < SEARCH_AGAIN_AFTER_MS;
    for r in control.optimizations(None, None, usize::MAX)? {
        if r.is_running() {
            history.searching.insert(r.host.clone());
        }
        if r.is_running() || recent(r.requested_ms) {
            history.recent.insert((r.host, r.model));
        }
    }
    // Newest first: stop at the first older than the window.
    for d in control.decisions(None, 100_000)? {
        if !recent(d.at_ms) {
            break;
        }
        if d.rule == OPTIMIZE_RULE
            && let (Some(model), Some(host)) = (d.model, d.inputs["host"].as_str())
        {
            history.recent.insert((host.to_owned(), model));
        }
    }
    for h in &analysis.costs.hosts {
        if let Some(rate) = h.hourly_rate {
            history.rates.insert(h.host.clone(), rate);
        }
    }
    Ok(history)
}

// === impl Analytics ===

impl Analytics {
    /// Records each safe action as a decision of its budget with its directive.
    async fn auto_optimize(
        &self,
        actions: Vec<crate::control::optimize::SafeAction>,
        now_ms: i64,
    ) -> Result<usize, AnalyticsError> {
        let Some((delivery, ttl)) = &self.delivery else { return Ok(0) };
        let ttl_ms = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX);
        let mut made = 0;
        for a in actions {
            let Ok(host) = HostId::new(&a.host) else { continue };
            let decision = crate::control::store::NewDecision {
                at_ms: now_ms,
                source: format!("budget:{}", a.budget),
                model: Some(a.model.clone()),
                rule: a.rule.to_owned(),
                reason: a.reason.clone(),
                inputs: serde_json::json!({
                    "budget": a.budget,
                    "host": a.host,
                    "idle_hours": a.idle_hours,
                }),
                acted: true,
            };
            let directive = crate::control::store::NewDirective {
                host,
                body: a.body.clone(),
                not_after_ms: now_ms.saturating_add(ttl_ms),
            };
            delivery.submit(decision, vec![directive]).await?;
            info!(budget = %a.budget, host = %a.host, model = %a.model, rule = a.rule, "Budget auto-optimize: {}", a.reason);
            made += 1;
        }
        Ok(made)
    }
}

impl Analytics {
    /// A runner over `stores` with this policy and catalog.
    pub fn new(stores: Stores, settings: Settings, catalog: PricingCatalog) -> Self {
        Self {
            stores,
            settings,
            catalog,
            pass: Mutex::new(()),
            webhook_backoff: crate::webhook::FIRST_BACKOFF,
            health: Arc::default(),
            retry_backoff: FIRST_RETRY_BACKOFF,
            delivery: None,
            scaling_alerts: None,
            memory: Arc::default(),
        }
    }

    /// Includes the autoscaler's `budget_cap` alerts in every pass.
    #[must_use]
    pub fn with_scaling_alerts(
        mut self,
        alerts: Arc<crate::control::budget_cap::ScalingAlerts>,
    ) -> Self {
        self.scaling_alerts = Some(alerts);
        self
    }

    /// Lets budgets with `auto_optimize` act: their safe plans become directives through
    /// `delivery`, each deliverable for `ttl` ([`crate::control::optimize`]).
    #[must_use]
    pub fn with_delivery(
        mut self,
        delivery: Arc<crate::control::delivery::Delivery>,
        ttl: Duration,
    ) -> Self {
        self.delivery = Some((delivery, ttl));
        self
    }

    /// Failures since start.
    pub fn health(&self) -> AnalyticsHealth {
        lock_health(&self.health).clone()
    }

    /// The delay before retry `attempt` (1-based): doubling from the first backoff, capped.
    fn retry_delay(&self, attempt: u32) -> Duration {
        self.retry_backoff
            .saturating_mul(2u32.saturating_pow(attempt.saturating_sub(1).min(16)))
            .min(MAX_RETRY_BACKOFF)
    }

    /// Runs a scheduled pass; a failure is logged at ERROR, counted, and retried with backoff
    /// up to [`PASS_RETRIES`] times.
    ///
    /// A pass that would overlap the one still running (a slow pass, a manual run) is skipped
    /// and counted (`passes_skipped`), not queued behind it.
    pub async fn run_scheduled(&self) {
        for attempt in 0..=PASS_RETRIES {
            if attempt > 0 {
                tokio::time::sleep(self.retry_delay(attempt)).await;
            }
            let Ok(guard) = self.pass.try_lock() else {
                lock_health(&self.health).passes_skipped += 1;
                warn!("Analytics pass skipped: the previous pass is still running.");
                return;
            };
            let Err(e) = self.run_locked(guard, crate::ingest::now_ms()).await else { return };
            let chain = common::daemon::error_chain(&e);
            record_failure(&self.health, |h| h.pass_failures += 1, &chain);
            if attempt < PASS_RETRIES {
                error!(
                    error = %chain,
                    attempt = attempt + 1,
                    retry_in_ms = u64::try_from(self.retry_delay(attempt + 1).as_millis()).unwrap_or(u64::MAX),
                    "Analytics pass failed; retrying."
                );
            } else {
                error!(
                    error = %chain,
                    attempts = attempt + 1,
                    "Analytics pass failed; giving up until the next scheduled pass."
                );
            }
        }
    }

    /// The policy.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// The stores.
    pub fn stores(&self) -> &Stores {
        &self.stores
    }

    /// Budgets from the file and from the API.
    pub fn budgets(&self) -> Result<Vec<Budget>, StoreError> {
        let mut all = self.settings.budgets.clone();
        all.extend(api_budgets(self.stores.reports.as_ref())?);
        Ok(all)
    }

    /// Runs one pass at `now_ms` (rolling up first, so the latest closed buckets count), after
    /// the one running, if any.
    pub async fn run_once(&self, now_ms: i64) -> Result<RunSummary, AnalyticsError> {
        let guard = self.pass.lock().await;
        self.run_locked(guard, now_ms).await
    }

    /// One pass, while holding the pass lock.
    async fn run_locked(
        &self,
        _guard: tokio::sync::MutexGuard<'_, ()>,
        now_ms: i64,
    ) -> Result<RunSummary, AnalyticsError> {
        let store = self.stores.telemetry.clone();
        let reports = self.stores.reports.clone();
        let mut settings = self.settings.clone();
        let catalog = self.catalog.clone();
        let control = self.stores.control.clone();
        let acts = self.delivery.is_some();
        let scaling_alerts =
            self.scaling_alerts.as_ref().map(|a| a.observations()).unwrap_or_default();
        let memory = self.memory.clone();
        let (analysis, hosts, transitions, active, actions) =
            tokio::task::spawn_blocking(move || {
                store.roll_up(now_ms)?;
                settings.budgets.extend(api_budgets(reports.as_ref())?);
                let mut memory = memory.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                let memory = &mut *memory;
                let snapshot = snapshot(store.as_ref(), &settings, now_ms, &mut memory.hours)?;
                let mut analysis =
                    analytics::analyze_with(&snapshot, &settings, &catalog, &mut memory.forecasts);
                analysis.observations.extend(scaling_alerts);
                let (transitions, active) = persist(reports.as_ref(), &analysis)?;
                let mut actions = Vec::new();
                if acts {
                    let mut desired = BTreeMap::new();
                    for h in &snapshot.hosts {
                        if let Ok(id) = HostId::new(&h.host)
                            && let Some(d) = control.desired(&id)?
                        {
                            desired.insert(h.host.clone(), d);
                        }
                    }
                    let searched = if analysis
                        .budgets
                        .iter()
                        .any(|b| b.budget.auto_optimize && !b.breaches.is_empty())
                    {
                        search_history(control.as_ref(), &analysis, now_ms)?
                    } else {
                        crate::control::optimize::SearchHistory::default()
                    };
                    actions = crate::control::optimize::safe_actions(
                        &analysis.budgets,
                        &snapshot,
                        &desired,
                        &searched,
                    );
                }
                Ok::<_, AnalyticsError>((
                    analysis,
                    snapshot.hosts.len(),
                    transitions,
                    active,
                    actions,
                ))
            })
            .await
            .map_err(|e| AnalyticsError::Task(e.to_string()))??;
        for a in &transitions {
            match (a.state, a.severity) {
                (AlertState::Firing, Severity::Critical) => {
                    warn!(alert = %a.key, severity = "critical", value = ?a.value, threshold = a.threshold, "Alert firing: {}", a.message);
                }
                (AlertState::Firing, _) => {
                    warn!(alert = %a.key, severity = ?a.severity, value = ?a.value, threshold = a.threshold, "Alert firing: {}", a.message);
                }
                (AlertState::Resolved, _) => info!(alert = %a.key, "Alert resolved: {}", a.message),
            }
        }
        if let (Some(url), false) = (self.settings.webhook_url.clone(), transitions.is_empty()) {
            let alerts = transitions.clone();
            let backoff = self.webhook_backoff;
            let health = self.health.clone();
            tokio::task::spawn_blocking(move || {
                // `deliver` logs its own failure at ERROR; count it so it shows.
                if let Err(e) = crate::webhook::deliver(&url, now_ms, &alerts, backoff) {
                    let chain = common::daemon::error_chain(&e);
                    record_failure(&health, |h| h.webhook_failures += 1, &chain);
                }
            });
        }
        let auto_optimized = self.auto_optimize(actions, now_ms).await?;
        let summary = RunSummary {
            auto_optimized,
            generated_ms: now_ms,
            hosts,
            forecasts: analysis
                .forecasts
                .iter()
                .map(|f| ForecastSummary {
                    target: f.target.clone(),
                    method: f.forecast.as_ref().map(|x| x.method.clone()),
                    error: f.error.clone(),
                    anomalies: f.anomalies.len(),
                })
                .collect(),
            plans: analysis.plans.len(),
            budgets: analysis.budgets.len(),
            alert_transitions: transitions,
            active_alerts: active,
        };
        let store = self.stores.reports.clone();
        let meta = encode("summary", &summary)?;
        tokio::task::spawn_blocking(move || store.put_doc("report/meta", &meta))
            .await
            .map_err(|e| AnalyticsError::Task(e.to_string()))??;
        info!(
            hosts = summary.hosts,
            forecasts = summary.forecasts.len(),
            plans = summary.plans,
            budgets = summary.budgets,
            alert_transitions = summary.alert_transitions.len(),
            "Analytics pass done."
        );
        Ok(summary)
    }
}

/// Runs passes on `schedule` (cron with seconds) until `shutdown`. A scheduler that fails to
/// start is logged at ERROR, counted and restarted with backoff; the error is returned only if
/// `shutdown` comes first.
pub async fn schedule(
    analytics: Arc<Analytics>,
    schedule: String,
    shutdown: CancellationToken,
) -> Result<(), AnalyticsError> {
    let mut attempt: u32 = 0;
    loop {
        let Err(e) = run_scheduler(analytics.clone(), &schedule, &shutdown).await else {
            return Ok(());
        };
        attempt = attempt.saturating_add(1);
        let chain = common::daemon::error_chain(&e);
        record_failure(&analytics.health, |h| h.scheduler_failures += 1, &chain);
        let delay = analytics.retry_delay(attempt);
        error!(
            error = %chain,
            attempt,
            retry_in_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
            "Analytics scheduler failed; no scheduled passes until it restarts."
        );
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = shutdown.cancelled() => return Err(e),
        }
    }
}

async fn run_scheduler(
    analytics: Arc<Analytics>,
    schedule: &str,
    shutdown: &CancellationToken,
) -> Result<(), AnalyticsError> {
    use tokio_cron_scheduler::{Job, JobScheduler};
    let err = |e: tokio_cron_scheduler::JobSchedulerError| AnalyticsError::Schedule {
        schedule: schedule.to_owned(),
        reason: e.to_string(),
    };
    let mut scheduler = JobScheduler::new().await.map_err(err)?;
    let job = Job::new_async(schedule, move |_, _| {
        let a = analytics.clone();
        Box::pin(async move { a.run_scheduled().await })
    })
    .map_err(err)?;
    scheduler.add(job).await.map_err(err)?;
    scheduler.start().await.map_err(err)?;
    shutdown.cancelled().await;
    scheduler.shutdown().await.map_err(err)?;
    Ok(())
}

fn lock_health(
    health: &std::sync::Mutex<AnalyticsHealth>,
) -> std::sync::MutexGuard<'_, AnalyticsHealth> {
    health.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn record_failure(
    health: &std::sync::Mutex<AnalyticsHealth>,
    count: impl FnOnce(&mut AnalyticsHealth),
    what: &str,
) {
    let mut h = lock_health(health);
    count(&mut h);
    what.clone_into(&mut h.last_failure);
    h.last_failure_ms = crate::ingest::now_ms();
}

/// The document holding budgets added through the API.
pub const API_BUDGETS_DOC: &str = "budgets/api";

/// Budgets added through the API. A document that does not decode is an error naming it, never
/// an empty list (which the next write would persist, losing every budget).
pub fn api_budgets(store: &dyn ReportStore) -> Result<Vec<Budget>, StoreError> {
    decode_api_budgets(store.doc(API_BUDGETS_DOC)?.as_deref())
}

/// Decodes the API budgets document (`None`: no budgets yet).
pub fn decode_api_budgets(bytes: Option<&[u8]>) -> Result<Vec<Budget>, StoreError> {
    match bytes {
        None => Ok(Vec::new()),
        Some(v) => serde_json::from_slice(v).map_err(|e| StoreError::Corrupt {
            what: format!("analytics document {API_BUDGETS_DOC}"),
            reason: format!("{e}; restore it from a backup or delete and re-add the budgets"),
        }),
    }
}

/// Builds the snapshot analytics read.
pub fn snapshot(
    store: &dyn TelemetryStore,
    settings: &Settings,
    now_ms: i64,
    cache: &mut HourCache,
) -> Result<Snapshot, StoreError> {
    let weeks = i64::try_from(settings.forecast.model.train_weeks).unwrap_or(6);
    let lookback_ms = (weeks * 7 * DAY_MS)
        .max(32 * DAY_MS)
        .max(i64::try_from(settings.plans.lookback_hours).unwrap_or(0) * HOUR_MS)
        .max(i64::try_from(settings.forecast.history_hours).unwrap_or(0) * HOUR_MS);
    let window_ms = i64::try_from(settings.alert_window_secs).unwrap_or(300) * 1000;
    let ids: Vec<HostId> = store.hosts()?.into_iter().map(|(id, _)| id).collect();
    // Hour starts in the lookback, the same buckets a whole read would take.
    let from_ms = now_ms - lookback_ms;
    cache.refresh(store, &ids, from_ms, now_ms)?;
    let mut hosts = Vec::new();
    for id in ids {
        let inventory = store.inventory(&id)?.unwrap_or_default();
        hosts.push(HostSnapshot {
            host: id.to_string(),
            labels: inventory.labels.into_iter().collect(),
            gpus: u32::try_from(inventory.gpus.len()).unwrap_or(u32::MAX),
            cpu_cores: inventory.cpu_cores,
            memory_bytes: inventory.memory_total_bytes,
            hours: cache.hours(id.as_str()),
            recent: recent(store, &id, now_ms - window_ms, now_ms, settings.alert_window_secs)?,
        });
    }
    Ok(Snapshot { now_ms, hosts })
}

fn recent(
    store: &dyn TelemetryStore,
    host: &HostId,
    from: i64,
    to: i64,
    window_secs: u64,
) -> Result<RecentWindow, StoreError> {
    let mut w = RecentWindow { window_secs, ..RecentWindow::default() };
    let (mut gpu_sum, mut gpu_n) = (0.0, 0u32);
    let (mut cpu_sum, mut cpu_n) = (0.0, 0u32);
    for s in store.samples(host, from, to)? {
        let utils: Vec<f64> = s.gpus.iter().filter_map(|g| g.util_gpu_pct).map(f64::from).collect();
        if !utils.is_empty() {
            gpu_sum += utils.iter().sum::<f64>() / utils.len() as f64;
            gpu_n += 1;
        }
        if let Some(h) = &s.host {
            cpu_sum += f64::from(h.cpu_util_pct);
            cpu_n += 1;
        }
    }
    w.cpu_util_pct = (cpu_n > 0).then(|| cpu_sum / f64::from(cpu_n));
    // Models from the store's model totals: rollups for whole minutes, raw samples for the
    // rest, so an alert window longer than raw retention is still exact.
    for (model, m) in store.model_totals(host, from, to)? {
        w.models.insert(model, m.totals);
    }
    w.gpu_util_pct = (gpu_n > 0).then(|| gpu_sum / f64::from(gpu_n));
    Ok(w)
}

fn encode<T: Serialize>(what: &str, v: &T) -> Result<Vec<u8>, AnalyticsError> {
    serde_json::to_vec(v).map_err(|source| AnalyticsError::Encode { what: what.to_owned(), source })
}

/// Stores an analysis and applies its observations to the alert book; returns the transitions
/// and the number of active alerts.
fn persist(store: &dyn ReportStore, a: &Analysis) -> Result<(Vec<Alert>, usize), AnalyticsError> {
    store.delete_docs("forecast/")?;
    for f in &a.forecasts {
        store.put_doc(&format!("forecast/{}", f.target), &encode(&f.target, f)?)?;
        for an in &f.anomalies {
            let ev = AnomalyEvent { target: f.target.clone(), anomaly: an.clone() };
            store.put_history("anomaly", an.unix_ms, &f.target, &encode("anomaly", &ev)?)?;
        }
    }
    store.put_doc("report/costs", &encode("costs", &a.costs)?)?;
    store.put_doc("report/plans", &encode("plans", &a.plans)?)?;
    store.put_doc("report/budgets", &encode("budgets", &a.budgets)?)?;
    // An undecodable book is an error, not an empty book that would be written back (and would
    // re-fire every active alert).
    let mut book: AlertBook = match store.doc("alerts/book")? {
        Some(v) => serde_json::from_slice(&v).map_err(|e| StoreError::Corrupt {
            what: "analytics document alerts/book".into(),
            reason: e.to_string(),
        })?,
        None => AlertBook::default(),
    };
    let transitions = book.apply(&a.observations, a.generated_ms);
    for t in &transitions {
        let id = format!("{}\u{0}{:?}", t.key, t.state);
        store.put_history("alert", a.generated_ms, &id, &encode("alert", t)?)?;
    }
    store.put_doc("alerts/book", &encode("alert book", &book)?)?;
    Ok((transitions, book.active.len()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn undecodable_api_budgets_are_an_error_not_an_empty_list() {
        // Regression (issue 8, hole 11): a corrupt budgets document read as "no budgets", and the
        // next API write persisted the empty list over it.
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::SledStore::open(dir.path()).unwrap();
        assert_eq!(api_budgets(&store).unwrap(), Vec::new());
        store.put_doc(API_BUDGETS_DOC, b"{not json").unwrap();
        let err = api_budgets(&store).unwrap_err().to_string();
        assert!(err.contains(API_BUDGETS_DOC), "{err}");
        assert_eq!(store.doc(API_BUDGETS_DOC).unwrap().unwrap(), b"{not json");
    }

    #[test]
    fn check_names_the_schedule_and_policy_problems() {
        let bad = AnalyticsConfig {
            schedule: "x y z a b c".into(),
            pricing_file: None,
            policy_file: None,
        };
        let err = check(&bad).unwrap_err().to_string();
        assert!(err.contains("analytics.schedule"), "{err}");
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("policy.toml");
        std::fs::write(
            &p,
            "[[budgets]]\nname = \"b\"\namount = 0\nperiod = \"day\"\nscope = \"fleet\"\n",
        )
        .unwrap();
        let cfg = AnalyticsConfig {
            schedule: "0 */5 * * * *".into(),
            pricing_file: None,
            policy_file: Some(p),
        };
        let err = check(&cfg).unwrap_err().to_string();
        assert!(err.contains("budgets[0].amount: must be a positive amount, got 0"), "{err}");
        assert!(check(&AnalyticsConfig { policy_file: None, ..cfg }).is_ok());
    }

    /// A real store whose one host has an undecodable inventory, so every pass fails.
    fn failing_store(dir: &std::path::Path) -> Stores {
        use crate::store::SledStore;
        let host = HostId::new("h1").unwrap();
        {
            let store = SledStore::open(dir).unwrap();
            store.record_hello(&host, &common::proto::Hello::default(), 0, 0).unwrap();
        }
        let open_raw = || {
            for _ in 0..100 {
                if let Ok(db) = sled::open(dir) {
                    return db;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            sled::open(dir).unwrap()
        };
        {
            let db = open_raw();
            db.open_tree("inventories").unwrap().insert("h1", &[0xff, 0xff, 0xff][..]).unwrap();
            db.flush().unwrap();
        }
        for _ in 0..100 {
            if let Ok(s) = SledStore::open(dir) {
                return Stores::sled(s).unwrap();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Stores::sled(SledStore::open(dir).unwrap()).unwrap()
    }

    fn analytics(store: Stores) -> Analytics {
        let mut a = Analytics::new(store, Settings::default(), PricingCatalog::builtin().unwrap());
        a.retry_backoff = Duration::from_millis(5);
        a
    }

    #[tokio::test]
    async fn a_scheduled_pass_that_would_overlap_is_skipped_and_counted_not_queued() {
        let dir = tempfile::tempdir().unwrap();
        let stores = Stores::sled(crate::store::SledStore::open(dir.path()).unwrap()).unwrap();
        let a = analytics(stores);
        let running = a.pass.lock().await;
        tokio::time::timeout(Duration::from_secs(5), a.run_scheduled())
            .await
            .expect("a scheduled pass waited behind the running one");
        assert_eq!(a.health().passes_skipped, 1);
        drop(running);
        a.run_scheduled().await;
        assert_eq!(a.health().passes_skipped, 1);
        assert_eq!(a.health().pass_failures, 0);
    }

    #[tokio::test]
    async fn a_failed_pass_is_counted_and_retried() {
        let dir = tempfile::tempdir().unwrap();
        let a = analytics(failing_store(dir.path()));
        a.run_scheduled().await;
        let h = a.health();
        assert_eq!(h.pass_failures, u64::from(PASS_RETRIES) + 1, "{h:?}");
        assert!(h.last_failure.contains("inventory h1"), "{h:?}");
        assert!(h.last_failure_ms > 0);
    }

    #[tokio::test]
    async fn a_failed_scheduler_is_restarted_not_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let a = Arc::new(analytics(failing_store(dir.path())));
        let stop = CancellationToken::new();
        let task = tokio::spawn(schedule(a.clone(), "not a schedule".into(), stop.clone()));
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!task.is_finished(), "the scheduler gave up silently");
        let h = a.health();
        assert!(h.scheduler_failures >= 2, "{h:?}");
        assert!(h.last_failure.contains("not a schedule"), "{h:?}");
        stop.cancel();
        assert!(task.await.unwrap().is_err(), "the error is still returned at stop");
    }
}

#[cfg(test)]
mod scaling_alert_tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::control::budget_cap::ScalingAlerts;
    use crate::control::engine::{Decision, DecisionInputs};
    use crate::control::policy::{ScalingPolicy, Targets};

    #[tokio::test]
    async fn a_budget_capped_decision_fires_an_alert_at_the_next_pass_and_resolves_after() {
        let dir = tempfile::tempdir().unwrap();
        let stores = Stores::sled(crate::store::SledStore::open(dir.path()).unwrap()).unwrap();
        let alerts = Arc::new(ScalingAlerts::default());
        let analytics =
            Analytics::new(stores, Settings::default(), PricingCatalog::builtin().unwrap())
                .with_scaling_alerts(alerts.clone());
        let policy = ScalingPolicy::new("ocr", "ocr", 1, 8, Targets::default());
        let host = HostId::new("gpu-1").unwrap();
        let mut decision = Decision {
            at_ms: 0,
            policy: "ocr".into(),
            model: "ocr".into(),
            current: 2,
            desired: 2,
            act: false,
            would_have: None,
            rule: "budget.cap".into(),
            reason: String::new(),
            inputs: DecisionInputs {
                observation: Default::default(),
                metrics: Vec::new(),
                reactive: 6,
                predictive: None,
                forecast: None,
                limits: Default::default(),
                stabilized: None,
                burst: false,
            },
            budget_capped: true,
        };
        let cap = crate::control::budget_cap::BudgetCap { budget: "day".into(), max_instances: 2 };
        alerts.observe(&policy, &host, &decision, Some(&cap));
        let run = analytics.run_once(1_800_000_000_000).await.unwrap();
        let fired: Vec<&str> = run.alert_transitions.iter().map(|a| a.key.as_str()).collect();
        assert_eq!(fired, ["budget_cap:ocr:gpu-1"]);
        assert!(
            run.alert_transitions[0].message.contains("budget day pays for 2"),
            "{:?}",
            run.alert_transitions
        );
        decision.budget_capped = false;
        alerts.observe(&policy, &host, &decision, Some(&cap));
        let run = analytics.run_once(1_800_000_060_000).await.unwrap();
        assert_eq!(run.alert_transitions[0].state, AlertState::Resolved);
    }
}
