//! The autoscaler: every `control.interval_secs`, each scaling policy is evaluated for every
//! host it selects that serves its model, from that host's last `control.window_secs` of
//! telemetry; a decision that acts becomes a `set_instances` directive through
//! [`Delivery::submit`], recorded with its inputs and rule.
//!
//! Invariants:
//! - One [`Scaler`] per (policy, host); its state (stabilization window, rate limits,
//!   cooldowns) is stored after every evaluation, so a restarted aggregator neither forgets a
//!   stabilization window nor scales twice inside a cooldown. The map is bounded by policies
//!   times hosts.
//! - A directive's instance count counts as current while it settles: until the host's
//!   telemetry shows the count its desired state asks for (or [`SETTLE`] passes), the
//!   evaluation starts from the desired count, so a slow report does not make it ask again.
//! - Decisions that do not act are recorded only when what they say changes (rule, desired
//!   count, forecast-only count), so the log shows changes, not every tick.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use common::directive::DirectiveBody;
use common::ids::HostId;
use common::model_stats::ModelTotals;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::delivery::Delivery;
use super::engine::{Decision, ForecastInput, Limits, Observation, Scaler, ScalerState};
use super::policy::{Mode, PolicySet, ScalingPolicy};
use super::store::{DesiredState, NewDecision, NewDirective};
use crate::analytics::ForecastView;
use crate::store::{StoreError, Stores};

/// How long a directed instance count stands in for the reported one.
pub const SETTLE: Duration = Duration::from_secs(30);

/// One model on one host over the window.
#[derive(Debug, Clone, Default)]
struct Served {
    totals: ModelTotals,
    /// Instances in the newest sample (the highest over its versions).
    instances: u32,
    /// Time the model samples cover, ms.
    covered_ms: u64,
}

/// What one evaluation reads from the stores, per host.
#[derive(Debug, Clone, Default)]
struct HostView {
    labels: BTreeMap<String, String>,
    models: BTreeMap<String, Served>,
    cpu_util_pct: Option<f64>,
    gpu_util_pct: Option<f64>,
    desired: Option<DesiredState>,
}

/// The autoscaler.
#[derive(Debug)]
pub struct Autoscaler {
    policies: PolicySet,
    stores: Stores,
    delivery: Arc<Delivery>,
    window: Duration,
    directive_ttl: Duration,
    scalers: Mutex<HashMap<(String, String), Scaler>>,
    recorded: Mutex<HashMap<(String, String), String>>,
    /// Instances each (host, model) last reported: an idle model sends no samples, and its
    /// evaluation (demand 0) needs them. Bounded by hosts times policy models.
    last_seen: Mutex<HashMap<(HostId, String), u32>>,
}

impl Autoscaler {
    /// An autoscaler for `policies`.
    pub fn new(
        policies: PolicySet,
        stores: Stores,
        delivery: Arc<Delivery>,
        window: Duration,
        directive_ttl: Duration,
    ) -> Self {
        Self {
            policies,
            stores,
            delivery,
            window,
            directive_ttl,
            scalers: Mutex::default(),
            recorded: Mutex::default(),
            last_seen: Mutex::default(),
        }
    }

    /// Evaluates every `every` until `shutdown`; a failed evaluation is logged and the next
    /// one runs as usual.
    pub async fn run(self: Arc<Self>, every: Duration, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = shutdown.cancelled() => return,
            }
            if let Err(e) = self.evaluate(crate::ingest::now_ms()).await {
                warn!(error = %common::daemon::error_chain(&e), "Autoscaler evaluation failed; trying again at the next interval.");
            }
        }
    }

    /// One evaluation of every policy at `now_ms`; returns the decisions that acted.
    pub async fn evaluate(&self, now_ms: i64) -> Result<Vec<Decision>, StoreError> {
        if self.policies.policies().is_empty() {
            return Ok(Vec::new());
        }
        let stores = self.stores.clone();
        let window_ms = i64::try_from(self.window.as_millis()).unwrap_or(i64::MAX);
        let models: Vec<String> =
            self.policies.policies().iter().map(|p| p.model.clone()).collect();
        let (hosts, forecasts) = tokio::task::spawn_blocking(move || {
            Ok::<_, StoreError>((
                read_hosts(&stores, now_ms - window_ms, now_ms)?,
                read_forecasts(&stores, &models)?,
            ))
        })
        .await
        .map_err(|e| StoreError::Corrupt { what: "autoscaler".into(), reason: e.to_string() })??;
        let mut acted = Vec::new();
        for policy in self.policies.policies() {
            let fleet_rps: f64 =
                hosts.values().filter_map(|h| h.models.get(&policy.model)).map(demand_rps).sum();
            for (host, view) in &hosts {
                if !policy.selects(&view.labels) {
                    continue;
                }
                let key = (host.clone(), policy.model.clone());
                let served = match view.models.get(&policy.model) {
                    Some(served) => {
                        self.lock_last_seen().insert(key, served.instances);
                        served.clone()
                    }
                    // Served before and silent in this window: idle (agents send no sample
                    // for a model with no requests and no change).
                    None => match self.lock_last_seen().get(&key) {
                        Some(&instances) => Served {
                            instances,
                            covered_ms: u64::try_from(window_ms).unwrap_or(0),
                            ..Served::default()
                        },
                        None => continue,
                    },
                };
                let served = &served;
                let obs = observe(policy, view, served, now_ms);
                let forecast = forecast_for(policy, forecasts.get(&policy.model), now_ms, || {
                    if fleet_rps > 0.0 { demand_rps(served) / fleet_rps } else { 1.0 }
                });
                let decision = self.decide(policy, host, &obs, forecast.as_ref()).await?;
                if self.record(policy, host, &decision).await? {
                    acted.push(decision);
                }
            }
        }
        Ok(acted)
    }

    async fn decide(
        &self,
        policy: &ScalingPolicy,
        host: &HostId,
        obs: &Observation,
        forecast: Option<&ForecastInput>,
    ) -> Result<Decision, StoreError> {
        let key = (policy.name.clone(), host.to_string());
        let state_key = format!("{}\u{0}{}", policy.name, host);
        let known = self.lock_scalers().contains_key(&key);
        if !known {
            let store = self.stores.control.clone();
            let k = state_key.clone();
            let stored =
                tokio::task::spawn_blocking(move || store.scaler_state(&k)).await.map_err(
                    |e| StoreError::Corrupt { what: "scaler state".into(), reason: e.to_string() },
                )??;
            let state: ScalerState =
                stored.and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default();
            self.lock_scalers()
                .entry(key.clone())
                .or_insert_with(|| Scaler::with_state(policy.clone(), state));
        }
        let limits = Limits {
            max_instances_by_budget: None,
            price_per_instance_hour: policy.cost.price_per_instance_hour,
        };
        let (decision, state) = {
            let mut scalers = self.lock_scalers();
            let scaler = scalers.entry(key).or_insert_with(|| Scaler::new(policy.clone()));
            let decision = scaler.evaluate(obs, forecast, &limits);
            (decision, serde_json::to_vec(scaler.state()).unwrap_or_default())
        };
        let store = self.stores.control.clone();
        tokio::task::spawn_blocking(move || store.put_scaler_state(&state_key, &state))
            .await
            .map_err(|e| StoreError::Corrupt {
                what: "scaler state".into(),
                reason: e.to_string(),
            })??;
        Ok(decision)
    }

    /// Records `decision` (with its directive when it acts); returns whether it acted.
    async fn record(
        &self,
        policy: &ScalingPolicy,
        host: &HostId,
        decision: &Decision,
    ) -> Result<bool, StoreError> {
        let signature = format!("{}|{}|{:?}", decision.rule, decision.desired, decision.would_have);
        let key = (policy.name.clone(), host.to_string());
        let changed = self.lock_recorded().get(&key) != Some(&signature);
        if !decision.act && !changed {
            return Ok(false);
        }
        let inputs = serde_json::to_value(&decision.inputs).unwrap_or(serde_json::Value::Null);
        let new = NewDecision {
            at_ms: decision.at_ms,
            source: format!("policy:{}", policy.name),
            model: Some(policy.model.clone()),
            rule: decision.rule.clone(),
            reason: format!("{host}: {}", decision.reason),
            inputs: serde_json::json!({
                "host": host.as_str(),
                "current": decision.current,
                "desired": decision.desired,
                "would_have": decision.would_have,
                "budget_capped": decision.budget_capped,
                "engine": inputs,
            }),
            acted: decision.act,
        };
        let ttl_ms = i64::try_from(self.directive_ttl.as_millis()).unwrap_or(i64::MAX);
        let directives = if decision.act {
            vec![NewDirective {
                host: host.clone(),
                body: DirectiveBody::SetInstances {
                    model: policy.model.clone(),
                    version: None,
                    instances: decision.desired,
                },
                not_after_ms: decision.at_ms.saturating_add(ttl_ms),
            }]
        } else {
            Vec::new()
        };
        self.delivery.submit(new, directives).await?;
        self.lock_recorded().insert(key, signature);
        if decision.act {
            info!(policy = %policy.name, %host, model = %policy.model, from = decision.current, to = decision.desired, rule = %decision.rule, "Scaling: {}", decision.reason);
        }
        Ok(decision.act)
    }

    fn lock_scalers(&self) -> std::sync::MutexGuard<'_, HashMap<(String, String), Scaler>> {
        self.scalers.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn lock_last_seen(&self) -> std::sync::MutexGuard<'_, HashMap<(HostId, String), u32>> {
        self.last_seen.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn lock_recorded(&self) -> std::sync::MutexGuard<'_, HashMap<(String, String), String>> {
        self.recorded.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

fn demand_rps(s: &Served) -> f64 {
    if s.covered_ms == 0 { 0.0 } else { s.totals.requests as f64 * 1000.0 / s.covered_ms as f64 }
}

/// The observation for one host and model; the instance count is the directed one while it
/// settles (see the module invariants).
fn observe(policy: &ScalingPolicy, view: &HostView, served: &Served, now_ms: i64) -> Observation {
    let settle_ms = i64::try_from(SETTLE.as_millis()).unwrap_or(i64::MAX);
    let directed = view.desired.as_ref().and_then(|d| {
        let m = d.models.get(&policy.model)?;
        let n = m.instances?;
        (n != served.instances && now_ms - d.updated_ms < settle_ms).then_some(n)
    });
    let current = directed.unwrap_or(served.instances);
    let ms = |us: Option<u64>| us.map(|v| v as f64 / 1000.0);
    Observation {
        at_ms: now_ms,
        current_instances: current,
        ready_instances: served.instances.min(current),
        demand_rps: demand_rps(served),
        queue_p95_ms: ms(served.totals.queue_us.quantile(0.95)),
        latency_p95_ms: served.totals.latency_ms(0.95),
        gpu_util_pct: view.gpu_util_pct,
        cpu_util_pct: view.cpu_util_pct,
        batch_util_pct: served.totals.batch_utilization().map(|u| u * 100.0),
    }
}

/// The forecast input of a predictive policy: the fleet forecast for the model `lead_secs`
/// ahead, times this host's share of the fleet's demand; with its in-sample error.
fn forecast_for(
    policy: &ScalingPolicy,
    view: Option<&ForecastView>,
    now_ms: i64,
    share: impl FnOnce() -> f64,
) -> Option<ForecastInput> {
    if !matches!(policy.mode, Mode::Predictive) {
        return None;
    }
    let f = view?.forecast.as_ref()?;
    let lead_ms = i64::try_from(policy.predictive.lead_secs).unwrap_or(0).saturating_mul(1000);
    let at = now_ms.saturating_add(lead_ms);
    let hour = usize::try_from((at - f.start_ms).div_euclid(3_600_000)).ok()?;
    let fleet = *f.point.get(hour)?;
    let history = &view?.history;
    Some(ForecastInput {
        rps_ahead: fleet.max(0.0) * share(),
        backtest_error: in_sample_error(history, &f.fitted),
    })
}

/// Mean absolute error of the fit over the last hours of history, relative to their mean:
/// the forecast's own error, shown beside decisions that use it.
fn in_sample_error(history: &[Option<f64>], fitted: &[f64]) -> Option<f64> {
    let n = history.len().min(fitted.len());
    let pairs: Vec<(f64, f64)> = history[history.len() - n..]
        .iter()
        .zip(&fitted[fitted.len() - n..])
        .filter_map(|(h, f)| h.map(|h| (h, *f)))
        .collect();
    let mean = pairs.iter().map(|(h, _)| h.abs()).sum::<f64>() / pairs.len().max(1) as f64;
    (mean > 0.0)
        .then(|| pairs.iter().map(|(h, f)| (h - f).abs()).sum::<f64>() / pairs.len() as f64 / mean)
}

fn read_hosts(
    stores: &Stores,
    from_ms: i64,
    to_ms: i64,
) -> Result<BTreeMap<HostId, HostView>, StoreError> {
    let mut out = BTreeMap::new();
    for (host, _) in stores.telemetry.hosts()? {
        let samples = stores.telemetry.samples(&host, from_ms, to_ms + 1)?;
        if samples.is_empty() {
            continue;
        }
        let mut view = HostView {
            labels: stores
                .telemetry
                .inventory(&host)?
                .map(|i| i.labels.into_iter().collect())
                .unwrap_or_default(),
            desired: stores.control.desired(&host)?,
            ..HostView::default()
        };
        let (mut cpu, mut cpu_n, mut gpu, mut gpu_n) = (0.0, 0u32, 0.0, 0u32);
        for s in &samples {
            if let Some(h) = &s.host {
                cpu += f64::from(h.cpu_util_pct);
                cpu_n += 1;
            }
            let utils: Vec<f64> =
                s.gpus.iter().filter_map(|g| g.util_gpu_pct).map(f64::from).collect();
            if !utils.is_empty() {
                gpu += utils.iter().sum::<f64>() / utils.len() as f64;
                gpu_n += 1;
            }
            let mut newest: BTreeMap<&str, u32> = BTreeMap::new();
            for m in &s.models {
                let first_version = !newest.contains_key(m.model.as_str());
                let served = view.models.entry(m.model.clone()).or_default();
                // A malformed model sample is skipped whole (ModelTotals refuses it). Versions
                // of one model cover the same interval: it counts once per sample.
                if served.totals.add(m).is_ok() && first_version {
                    served.covered_ms += u64::from(m.interval_ms);
                }
                let n = newest.entry(&m.model).or_default();
                *n = (*n).max(m.instances);
            }
            for (model, n) in newest {
                if let Some(served) = view.models.get_mut(model) {
                    served.instances = n;
                }
            }
        }
        view.cpu_util_pct = (cpu_n > 0).then(|| cpu / f64::from(cpu_n));
        view.gpu_util_pct = (gpu_n > 0).then(|| gpu / f64::from(gpu_n));
        out.insert(host, view);
    }
    Ok(out)
}

fn read_forecasts(
    stores: &Stores,
    models: &[String],
) -> Result<HashMap<String, ForecastView>, StoreError> {
    let mut out = HashMap::new();
    for model in models {
        let key = format!("forecast/model:{model}");
        if let Some(bytes) = stores.reports.doc(&key)?
            && let Ok(view) = serde_json::from_slice::<ForecastView>(&bytes)
        {
            out.insert(model.clone(), view);
        }
    }
    Ok(out)
}
