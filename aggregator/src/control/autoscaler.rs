//! The autoscaler: every `control.interval_secs`, each scaling policy is evaluated for every
//! host it selects that serves its model, from that host's last `control.window_secs` of
//! telemetry; a decision that acts becomes a `set_instances` directive through
//! [`Delivery::submit`], recorded with its inputs and rule.
//!
//! One evaluation, in order:
//! 1. Per (policy, host): the engine's decision, capped by the budgets that cover it
//!    ([`super::budget_cap`]; a capped decision raises the `budget_cap` alert).
//! 2. Per host: the decisions of policies that declare `[resources]` share the host's capacity
//!    by priority and demand ([`super::placement::allocate`], rule `allocation.capacity`).
//! 3. The decisions are recorded (with their directives).
//! 4. What a host could not hold is placed on other hosts the policy selects that do not serve
//!    the model yet, cheapest first: `load` then `set_instances` (rule `allocation.place`).
//! 5. What no host can hold goes to the fleet-size actuator as `add_hosts`; a selected host
//!    that has served no instance for `idle_host_secs` as `remove_host` ([`super::fleet`]).
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
//! - Instances placed on another host count against their policy's shortfall for the
//!   policy's stabilization window (at least [`PLACEMENT_HOLD_MIN`]), so one shortfall is not
//!   placed twice, nor sent to the fleet actuator, while traffic moves to the new host.
//! - Memory kept per host (last-seen counts, idle-since times, fleet requests) is dropped when
//!   the host leaves the telemetry window; scaler state is persisted and read back on return.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use common::directive::DirectiveBody;
use common::ids::HostId;
use common::model_stats::ModelTotals;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::budget_cap::{self, ScalingAlerts};
use super::delivery::Delivery;
use super::engine::{Decision, ForecastInput, Limits, Observation, Scaler, ScalerState};
use super::fleet::{self, FleetAction, FleetRequest};
use super::placement::{self, Candidate, Capacity, Claim};
use super::policy::{Mode, PolicySet, ScalingPolicy};
use super::store::{DesiredState, NewDecision, NewDirective};
use crate::analytics::ForecastView;
use crate::analytics::budgets::BudgetStatus;
use crate::analytics::cost::CostReport;
use crate::store::{StoreError, Stores};

/// How long a directed instance count stands in for the reported one.
pub const SETTLE: Duration = Duration::from_secs(30);

/// The shortest time placed instances count against their policy's shortfall.
pub const PLACEMENT_HOLD_MIN: Duration = Duration::from_secs(60);

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
    /// GPU memory and CPU cores from the inventory; `None` when the host sent none (or no CPU
    /// count): then it is neither allocated (its models keep what their decisions say) nor a
    /// placement target.
    capacity: Option<Capacity>,
}

/// What one evaluation reads besides telemetry: the analytics pass's budgets and host prices.
#[derive(Debug, Clone, Default)]
struct CostView {
    budgets: Vec<BudgetStatus>,
    /// The budgets document as stored: growth granted is counted per version of it.
    budgets_version: u64,
    host_prices: HashMap<String, f64>,
}

/// One (policy, host) decision on its way to being recorded.
#[derive(Debug, Clone)]
struct Planned {
    policy: usize,
    host: HostId,
    decision: Decision,
    demand_rps: f64,
}

/// One policy on one host, as last evaluated (for `flotilla policies`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PolicyHostStatus {
    /// Host id.
    pub host: String,
    /// Evaluated at, Unix ms.
    pub at_ms: i64,
    /// Demand seen, requests/s.
    pub demand_rps: f64,
    /// Instances then.
    pub current: u32,
    /// Instances decided.
    pub desired: u32,
    /// The rule that decided.
    pub rule: String,
    /// Forecast-only: what the forecast would have set.
    pub would_have: Option<u32>,
    /// The forecast used, requests/s (this host's share, `lead_secs` ahead).
    pub forecast_rps: Option<f64>,
    /// The forecast's own recent error (relative mean absolute error of its fit).
    pub forecast_error: Option<f64>,
    /// The budget held it back.
    pub budget_capped: bool,
}

/// A policy and where it stands on each host it scales.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PolicyStatus {
    /// The policy as loaded.
    pub policy: ScalingPolicy,
    /// Per host, as last evaluated.
    pub hosts: Vec<PolicyHostStatus>,
}

/// `GET /api/v1/policies`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PoliciesView {
    /// Seconds between evaluations.
    pub interval_secs: u64,
    /// Every policy.
    pub policies: Vec<PolicyStatus>,
    /// The fleet-size actuator, if configured.
    pub fleet: Option<super::fleet::FleetActuator>,
}

/// Memory across evaluations, bounded by policies times hosts.
#[derive(Debug, Default)]
struct Memory {
    /// Instances each (host, model) last reported: an idle model sends no samples, and its
    /// evaluation (demand 0) needs them.
    last_seen: HashMap<(HostId, String), u32>,
    /// Growth granted per budget since the budgets document of this version.
    budget_granted: (u64, BTreeMap<String, u32>),
    /// Per policy: (when, instances) placed on other hosts.
    placed: HashMap<String, Vec<(i64, u32)>>,
    /// Per policy: when the fleet actuator was last asked to add hosts.
    fleet_asked: HashMap<String, i64>,
    /// Per policy: the unmet count last recorded as `fleet.no_actuator` (recorded once per
    /// change).
    no_actuator_noted: HashMap<String, u32>,
    /// Per host: since when it has served no instance.
    idle_since: HashMap<HostId, i64>,
    /// Hosts the fleet actuator was asked to remove (until they serve again).
    removal_asked: BTreeSet<HostId>,
    /// Per (policy, host): the last evaluation.
    status: BTreeMap<(String, HostId), PolicyHostStatus>,
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
    memory: Mutex<Memory>,
    alerts: Arc<ScalingAlerts>,
    /// Fleet actuations still running (by policy, or `remove:HOST`): one at a time each, so a
    /// slow actuator with a short cooldown cannot pile up blocking threads.
    actuating: Arc<Mutex<BTreeSet<String>>>,
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
            memory: Mutex::default(),
            alerts: Arc::default(),
            actuating: Arc::default(),
        }
    }

    /// Where capped decisions raise their alerts (the analytics pass reads it).
    #[must_use]
    pub fn with_alerts(mut self, alerts: Arc<ScalingAlerts>) -> Self {
        self.alerts = alerts;
        self
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
        let (hosts, forecasts, costs) = tokio::task::spawn_blocking(move || {
            Ok::<_, StoreError>((
                read_hosts(&stores, now_ms - window_ms, now_ms)?,
                read_forecasts(&stores, &models)?,
                read_costs(&stores)?,
            ))
        })
        .await
        .map_err(|e| StoreError::Corrupt { what: "autoscaler".into(), reason: e.to_string() })??;
        self.forget_departed(&hosts);
        let mut planned = Vec::new();
        for (index, policy) in self.policies.policies().iter().enumerate() {
            let fleet_rps: f64 =
                hosts.values().filter_map(|h| h.models.get(&policy.model)).map(demand_rps).sum();
            for (host, view) in &hosts {
                if !policy.selects(&view.labels) {
                    continue;
                }
                let Some(served) = self.served(host, view, &policy.model, window_ms) else {
                    continue;
                };
                let obs = observe(policy, view, &served, now_ms);
                let forecast = forecast_for(policy, forecasts.get(&policy.model), now_ms, || {
                    if fleet_rps > 0.0 { demand_rps(&served) / fleet_rps } else { 1.0 }
                });
                let price = instance_price(policy, view, costs.host_prices.get(host.as_str()));
                let cap = {
                    let mut memory = self.lock_memory();
                    if memory.budget_granted.0 != costs.budgets_version {
                        memory.budget_granted = (costs.budgets_version, BTreeMap::new());
                    }
                    budget_cap::cap_for(
                        &costs.budgets,
                        &policy.model,
                        &view.labels,
                        obs.current_instances,
                        price,
                        &memory.budget_granted.1,
                        now_ms,
                    )
                };
                let limits = Limits {
                    max_instances_by_budget: cap.as_ref().map(|c| c.max_instances),
                    price_per_instance_hour: price,
                };
                let decision = self.decide(policy, host, &obs, forecast.as_ref(), &limits).await?;
                budget_cap::count_growth(
                    &mut self.lock_memory().budget_granted.1,
                    &costs.budgets,
                    &policy.model,
                    &view.labels,
                    &decision,
                );
                self.alerts.observe(policy, host, &decision, cap.as_ref());
                planned.push(Planned {
                    policy: index,
                    host: host.clone(),
                    demand_rps: obs.demand_rps,
                    decision,
                });
            }
        }
        let (free, shortfalls) = self.allocate(&hosts, &mut planned);
        {
            let mut memory = self.lock_memory();
            for p in &planned {
                let d = &p.decision;
                let f = d.inputs.forecast.as_ref();
                memory.status.insert(
                    (d.policy.clone(), p.host.clone()),
                    PolicyHostStatus {
                        host: p.host.to_string(),
                        at_ms: d.at_ms,
                        demand_rps: p.demand_rps,
                        current: d.current,
                        desired: d.desired,
                        rule: d.rule.clone(),
                        would_have: d.would_have,
                        forecast_rps: f.map(|f| f.rps_ahead),
                        forecast_error: f.and_then(|f| f.backtest_error),
                        budget_capped: d.budget_capped,
                    },
                );
            }
        }
        let mut acted = Vec::new();
        for p in &planned {
            let policy = &self.policies.policies()[p.policy];
            if self.record(policy, &p.host, &p.decision).await? {
                acted.push(p.decision.clone());
            }
        }
        self.place(&hosts, free, shortfalls, &costs, now_ms).await?;
        self.remove_idle_hosts(&hosts, now_ms).await?;
        Ok(acted)
    }

    /// Every policy with where it stands on each host, as last evaluated.
    pub fn status(&self, interval: Duration) -> PoliciesView {
        let memory = self.lock_memory();
        PoliciesView {
            interval_secs: interval.as_secs(),
            policies: self
                .policies
                .policies()
                .iter()
                .map(|p| PolicyStatus {
                    policy: p.clone(),
                    hosts: memory
                        .status
                        .iter()
                        .filter(|((name, _), _)| *name == p.name)
                        .map(|(_, s)| s.clone())
                        .collect(),
                })
                .collect(),
            fleet: self.policies.fleet().cloned(),
        }
    }

    /// The model as served on `host` over the window; an idle model (served before, silent
    /// now) with its last count; `None` when the host never served it.
    fn served(
        &self,
        host: &HostId,
        view: &HostView,
        model: &str,
        window_ms: i64,
    ) -> Option<Served> {
        let key = (host.clone(), model.to_owned());
        let mut memory = self.lock_memory();
        match view.models.get(model) {
            Some(served) => {
                memory.last_seen.insert(key, served.instances);
                Some(served.clone())
            }
            // Served before and silent in this window: idle (agents send no sample for a model
            // with no requests and no change).
            None => memory.last_seen.get(&key).map(|&instances| Served {
                instances,
                covered_ms: u64::try_from(window_ms).unwrap_or(0),
                ..Served::default()
            }),
        }
    }

    /// Drops what is remembered about hosts that left the telemetry window.
    fn forget_departed(&self, hosts: &BTreeMap<HostId, HostView>) {
        let mut memory = self.lock_memory();
        memory.last_seen.retain(|(h, _), _| hosts.contains_key(h));
        memory.idle_since.retain(|h, _| hosts.contains_key(h));
        memory.removal_asked.retain(|h| hosts.contains_key(h));
        memory.status.retain(|(_, h), _| hosts.contains_key(h));
        drop(memory);
        self.lock_scalers()
            .retain(|(_, h), _| HostId::new(h).is_ok_and(|h| hosts.contains_key(&h)));
        self.lock_recorded()
            .retain(|(_, h), _| HostId::new(h).is_ok_and(|h| hosts.contains_key(&h)));
        self.alerts.retain_hosts(|h| HostId::new(h).is_ok_and(|h| hosts.contains_key(&h)));
    }

    /// Shares each host's capacity among the decisions of policies that declare resources
    /// (lowering `planned` where it does not hold them); returns each host's free capacity and
    /// the shortfalls `(policy, host, instances)`.
    #[allow(clippy::type_complexity)]
    fn allocate(
        &self,
        hosts: &BTreeMap<HostId, HostView>,
        planned: &mut [Planned],
    ) -> (BTreeMap<HostId, Capacity>, Vec<(usize, HostId, u32)>) {
        let policies = self.policies.policies();
        let mut free = BTreeMap::new();
        let mut shortfalls = Vec::new();
        for (host, view) in hosts {
            let Some(capacity) = view.capacity else { continue };
            let on_host: Vec<usize> = (0..planned.len())
                .filter(|&i| {
                    planned[i].host == *host
                        && policies[planned[i].policy].resources != Default::default()
                })
                .collect();
            let claims: Vec<Claim> = on_host
                .iter()
                .map(|&i| {
                    let (p, policy) = (&planned[i], &policies[planned[i].policy]);
                    Claim {
                        model: policy.model.clone(),
                        priority: policy.priority,
                        demand_rps: p.demand_rps,
                        floor: policy.min_instances,
                        wanted: p.decision.desired,
                        per_instance: policy.resources,
                    }
                })
                .collect();
            let (granted, left) = placement::allocate(capacity, &claims);
            free.insert(host.clone(), left);
            for (&i, (claim, got)) in on_host.iter().zip(claims.iter().zip(granted)) {
                if got >= claim.wanted {
                    continue;
                }
                let d = &mut planned[i].decision;
                d.reason = format!(
                    "{}; the host's capacity (GPU {:.0} MiB, {:.1} cores) holds {got} of {} \
                     for it after higher-priority and busier models",
                    d.reason, capacity.gpu_memory_mb, capacity.cpu_cores, claim.wanted
                );
                d.desired = got;
                d.act = got != d.current;
                d.rule = "allocation.capacity".to_owned();
                shortfalls.push((planned[i].policy, host.clone(), claim.wanted - got));
            }
        }
        (free, shortfalls)
    }

    /// Places shortfalls on other hosts, and asks the fleet actuator for what none holds.
    async fn place(
        &self,
        hosts: &BTreeMap<HostId, HostView>,
        mut free: BTreeMap<HostId, Capacity>,
        shortfalls: Vec<(usize, HostId, u32)>,
        costs: &CostView,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        let mut by_policy: BTreeMap<usize, (u32, Vec<HostId>)> = BTreeMap::new();
        for (policy, host, n) in shortfalls {
            let entry = by_policy.entry(policy).or_default();
            entry.0 += n;
            entry.1.push(host);
        }
        for (index, (shortfall, from)) in by_policy {
            let policy = &self.policies.policies()[index];
            let hold_ms = i64::try_from(
                Duration::from_secs(policy.stabilization_window_secs)
                    .max(PLACEMENT_HOLD_MIN)
                    .as_millis(),
            )
            .unwrap_or(i64::MAX);
            let recently_placed: u32 = {
                let mut memory = self.lock_memory();
                let placed = memory.placed.entry(policy.name.clone()).or_default();
                placed.retain(|(at, _)| now_ms - at < hold_ms);
                placed.iter().map(|(_, n)| n).sum()
            };
            let shortfall = shortfall.saturating_sub(recently_placed);
            if shortfall == 0 {
                continue;
            }
            let mut candidates: Vec<Candidate> = hosts
                .iter()
                .filter(|(h, view)| {
                    policy.selects(&view.labels)
                        && !from.contains(h)
                        && !self.serves_or_asked(h, view, &policy.model)
                })
                .filter_map(|(h, view)| {
                    Some(Candidate {
                        host: h.to_string(),
                        free: free.get(h).copied().or(view.capacity)?,
                        price_per_hour: costs.host_prices.get(h.as_str()).copied(),
                    })
                })
                .collect();
            let (placed, unmet) = placement::place(shortfall, &policy.resources, &mut candidates);
            for c in &candidates {
                if let Ok(h) = HostId::new(&c.host) {
                    free.insert(h, c.free);
                }
            }
            for (target, n) in placed {
                let Ok(target) = HostId::new(&target) else { continue };
                self.record_placement(policy, &from, &target, n, now_ms).await?;
                self.lock_memory().placed.entry(policy.name.clone()).or_default().push((now_ms, n));
            }
            if unmet > 0 {
                self.ask_for_hosts(policy, &from, unmet, now_ms).await?;
            }
        }
        Ok(())
    }

    /// Whether `host` serves `model`, served it in this process's memory, or was asked to load
    /// it (its desired state says loaded).
    fn serves_or_asked(&self, host: &HostId, view: &HostView, model: &str) -> bool {
        view.models.contains_key(model)
            || self.lock_memory().last_seen.contains_key(&(host.clone(), model.to_owned()))
            || view
                .desired
                .as_ref()
                .and_then(|d| d.models.get(model))
                .is_some_and(|m| m.loaded == Some(true))
    }

    async fn record_placement(
        &self,
        policy: &ScalingPolicy,
        from: &[HostId],
        target: &HostId,
        instances: u32,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        let ttl_ms = i64::try_from(self.directive_ttl.as_millis()).unwrap_or(i64::MAX);
        let from_list: Vec<&str> = from.iter().map(HostId::as_str).collect();
        let reason = format!(
            "{} could not hold {instances} more instance(s) of {}; {target} has room (load, then \
             {instances} instance(s))",
            from_list.join(", "),
            policy.model
        );
        let decision = NewDecision {
            at_ms: now_ms,
            source: format!("policy:{}", policy.name),
            model: Some(policy.model.clone()),
            rule: "allocation.place".to_owned(),
            reason: reason.clone(),
            inputs: serde_json::json!({
                "from": from_list,
                "host": target.as_str(),
                "instances": instances,
                "per_instance": policy.resources,
            }),
            acted: true,
        };
        let not_after_ms = now_ms.saturating_add(ttl_ms);
        let directives = vec![
            NewDirective {
                host: target.clone(),
                body: DirectiveBody::Load { model: policy.model.clone() },
                not_after_ms,
            },
            NewDirective {
                host: target.clone(),
                body: DirectiveBody::SetInstances {
                    model: policy.model.clone(),
                    version: None,
                    instances,
                },
                not_after_ms,
            },
        ];
        self.delivery.submit(decision, directives).await?;
        info!(policy = %policy.name, host = %target, model = %policy.model, instances, "Placing: {reason}");
        Ok(())
    }

    /// Records an `add_hosts` decision and hands it to the fleet actuator (at most once per
    /// policy per cooldown); without an actuator, records that none is configured (once per
    /// change).
    async fn ask_for_hosts(
        &self,
        policy: &ScalingPolicy,
        from: &[HostId],
        unmet: u32,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        let reason = format!(
            "{unmet} instance(s) of {} found no room on any host the policy selects ({})",
            policy.model,
            if policy.hosts.is_empty() {
                "all hosts".to_owned()
            } else {
                format!("{:?}", policy.hosts)
            }
        );
        let Some(actuator) = self.policies.fleet() else {
            if self.lock_memory().no_actuator_noted.get(&policy.name) == Some(&unmet) {
                return Ok(());
            }
            let decision = NewDecision {
                at_ms: now_ms,
                source: format!("policy:{}", policy.name),
                model: Some(policy.model.clone()),
                rule: "fleet.no_actuator".to_owned(),
                reason: format!("{reason}; no [fleet] actuator is configured in the policy file"),
                inputs: serde_json::json!({ "instances": unmet, "per_instance": policy.resources }),
                acted: false,
            };
            self.delivery.submit(decision, Vec::new()).await?;
            self.lock_memory().no_actuator_noted.insert(policy.name.clone(), unmet);
            warn!(policy = %policy.name, model = %policy.model, "{reason}; configure [fleet] in the policy file to add hosts.");
            return Ok(());
        };
        let cooldown_ms =
            i64::try_from(actuator.cooldown_secs.saturating_mul(1000)).unwrap_or(i64::MAX);
        {
            let memory = self.lock_memory();
            if memory.fleet_asked.get(&policy.name).is_some_and(|at| now_ms - at < cooldown_ms) {
                return Ok(());
            }
        }
        let from_list: Vec<&str> = from.iter().map(HostId::as_str).collect();
        let request = FleetRequest {
            source: "flotilla".into(),
            decision: String::new(),
            action: FleetAction::AddHosts,
            policy: Some(policy.name.clone()),
            model: Some(policy.model.clone()),
            host_labels: policy.hosts.clone(),
            host: None,
            instances: unmet,
            per_instance: policy.resources,
            reason: format!("{reason} (short on {})", from_list.join(", ")),
            at_ms: now_ms,
        };
        // The cooldown runs from a request the actuator took, not one skipped while it was busy.
        if self.actuate(request).await? {
            self.lock_memory().fleet_asked.insert(policy.name.clone(), now_ms);
        }
        Ok(())
    }

    /// Asks the fleet actuator to remove hosts a policy selects that served no instance for
    /// `idle_host_secs`.
    async fn remove_idle_hosts(
        &self,
        hosts: &BTreeMap<HostId, HostView>,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        let Some(actuator) = self.policies.fleet() else { return Ok(()) };
        let idle_ms =
            i64::try_from(actuator.idle_host_secs.saturating_mul(1000)).unwrap_or(i64::MAX);
        for (host, view) in hosts {
            if !self.policies.policies().iter().any(|p| p.selects(&view.labels)) {
                continue;
            }
            let serving = view.models.values().any(|m| m.instances > 0)
                || self.lock_memory().last_seen.iter().any(|((h, _), n)| h == host && *n > 0);
            let since = {
                let mut memory = self.lock_memory();
                if serving {
                    memory.idle_since.remove(host);
                    memory.removal_asked.remove(host);
                    continue;
                }
                *memory.idle_since.entry(host.clone()).or_insert(now_ms)
            };
            if now_ms - since < idle_ms || !self.lock_memory().removal_asked.insert(host.clone()) {
                continue;
            }
            let idle_secs = (now_ms - since) / 1000;
            let request = FleetRequest {
                source: "flotilla".into(),
                decision: String::new(),
                action: FleetAction::RemoveHost,
                policy: None,
                model: None,
                host_labels: view.labels.clone(),
                host: Some(host.to_string()),
                instances: 0,
                per_instance: Default::default(),
                reason: format!("{host} has served no model instance for {idle_secs} s"),
                at_ms: now_ms,
            };
            if !self.actuate(request).await? {
                // Not taken (the actuator is busy with this host): ask at a later evaluation.
                self.lock_memory().removal_asked.remove(host);
            }
        }
        Ok(())
    }

    /// Records the fleet decision, then runs the actuator on a blocking thread and records its
    /// outcome on the decision when it answers. Returns false, recording nothing, when there is
    /// no actuator or it is still busy with the previous request of the same policy or host.
    async fn actuate(&self, mut request: FleetRequest) -> Result<bool, StoreError> {
        let Some(actuator) = self.policies.fleet().cloned() else { return Ok(false) };
        let slot = match (&request.policy, &request.host) {
            (Some(p), _) => p.clone(),
            (None, h) => format!("remove:{}", h.as_deref().unwrap_or_default()),
        };
        if !self.actuating.lock().unwrap_or_else(PoisonError::into_inner).insert(slot.clone()) {
            info!(actuation = %slot, "The fleet actuator is still busy with the previous request; asking again later.");
            return Ok(false);
        }
        let actuating = self.actuating.clone();
        let release = move || {
            actuating.lock().unwrap_or_else(PoisonError::into_inner).remove(&slot);
        };
        let decision = NewDecision {
            at_ms: request.at_ms,
            source: request
                .policy
                .as_ref()
                .map_or_else(|| "fleet".to_owned(), |p| format!("policy:{p}")),
            model: request.model.clone(),
            rule: request.action.rule().to_owned(),
            reason: request.reason.clone(),
            inputs: serde_json::to_value(&request).unwrap_or(serde_json::Value::Null),
            acted: true,
        };
        let record = match self.delivery.submit(decision, Vec::new()).await {
            Ok((record, _)) => record,
            Err(e) => {
                release();
                return Err(e);
            }
        };
        request.decision.clone_from(&record.id);
        info!(decision = %record.id, action = request.action.rule(), "Fleet: {}", request.reason);
        let store = self.stores.control.clone();
        tokio::task::spawn_blocking(move || {
            let outcome = fleet::actuate(&actuator, &request);
            release();
            if outcome.ok {
                info!(decision = %request.decision, elapsed_ms = outcome.elapsed_ms, "Fleet actuator done.");
            } else {
                warn!(decision = %request.decision, detail = %outcome.detail, output = %outcome.output, "Fleet actuator failed.");
            }
            let value = serde_json::to_value(&outcome).unwrap_or(serde_json::Value::Null);
            if let Err(e) = store.record_outcome(&request.decision, value) {
                warn!(decision = %request.decision, error = %common::daemon::error_chain(&e), "Recording the fleet actuator's outcome failed.");
            }
        });
        Ok(true)
    }

    async fn decide(
        &self,
        policy: &ScalingPolicy,
        host: &HostId,
        obs: &Observation,
        forecast: Option<&ForecastInput>,
        limits: &Limits,
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
        let (decision, state) = {
            let mut scalers = self.lock_scalers();
            let scaler = scalers.entry(key).or_insert_with(|| Scaler::new(policy.clone()));
            let decision = scaler.evaluate(obs, forecast, limits);
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

    fn lock_memory(&self) -> std::sync::MutexGuard<'_, Memory> {
        self.memory.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn lock_recorded(&self) -> std::sync::MutexGuard<'_, HashMap<(String, String), String>> {
        self.recorded.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The price of one instance: the policy's own, else the host's catalog price over the
/// instances of this policy its capacity holds (when the policy declares resources).
fn instance_price(
    policy: &ScalingPolicy,
    view: &HostView,
    host_price: Option<&f64>,
) -> Option<f64> {
    policy.cost.price_per_instance_hour.or_else(|| {
        let fits = view.capacity?.fits(&policy.resources);
        (fits > 0 && fits < u32::MAX).then_some(())?;
        host_price.map(|p| p / f64::from(fits))
    })
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
/// ahead and for now (the current hour's point, or the fit of the last history hour before
/// the forecast starts), times this host's share of the fleet's demand; with its in-sample
/// error.
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
    let now_fleet = match usize::try_from((now_ms - f.start_ms).div_euclid(3_600_000)) {
        Ok(i) => f.point.get(i).copied(),
        Err(_) => f.fitted.last().copied(),
    };
    let history = &view?.history;
    let share = share();
    Some(ForecastInput {
        rps_ahead: fleet.max(0.0) * share,
        rps_now: now_fleet.map(|v| v.max(0.0) * share),
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
        let inventory = stores.telemetry.inventory(&host)?;
        let capacity = inventory.as_ref().filter(|i| i.cpu_cores > 0).map(|i| Capacity {
            gpu_memory_mb: i.gpus.iter().map(|g| g.memory_total_bytes as f64).sum::<f64>()
                / (1024.0 * 1024.0),
            cpu_cores: f64::from(i.cpu_cores),
        });
        let mut view = HostView {
            capacity,
            labels: inventory.map(|i| i.labels.into_iter().collect()).unwrap_or_default(),
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

/// The analytics pass's budgets and host prices (empty before its first pass).
fn read_costs(stores: &Stores) -> Result<CostView, StoreError> {
    let mut view = CostView::default();
    if let Some(bytes) = stores.reports.doc("report/budgets")? {
        view.budgets_version = {
            use std::hash::{Hash, Hasher};
            let mut h = std::collections::hash_map::DefaultHasher::new();
            bytes.hash(&mut h);
            h.finish()
        };
        view.budgets = serde_json::from_slice(&bytes).unwrap_or_else(|e| {
            warn!(error = %e, "report/budgets does not decode; scaling runs without budget caps until the next analytics pass writes it.");
            Vec::new()
        });
    }
    if let Some(bytes) = stores.reports.doc("report/costs")?
        && let Ok(report) = serde_json::from_slice::<CostReport>(&bytes)
    {
        view.host_prices =
            report.hosts.into_iter().filter_map(|h| Some((h.host, h.hourly_rate?))).collect();
    }
    Ok(view)
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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use common::proto::{
        GpuInfo, Hello, HostSample, Inventory, ModelSample, Sample, TelemetryBatch,
    };

    use super::*;
    use crate::store::{IncomingBatch, SledStore};

    const NOW: i64 = 1_800_000_000_000;

    struct Rig {
        _dir: tempfile::TempDir,
        stores: Stores,
        delivery: Arc<Delivery>,
        seq: u64,
    }

    impl Rig {
        fn new() -> Self {
            let dir = tempfile::tempdir().unwrap();
            let stores = Stores::sled(SledStore::open(&dir.path().join("db")).unwrap()).unwrap();
            let delivery = Delivery::new(stores.control.clone());
            Self { _dir: dir, stores, delivery, seq: 0 }
        }

        /// A host with `cores` CPU cores, `gpu_mb` of GPU memory and these labels.
        fn host(&self, name: &str, cores: u32, gpu_mb: u64, labels: &[(&str, &str)]) {
            let inventory = Inventory {
                cpu_cores: cores,
                gpus: (gpu_mb > 0)
                    .then(|| GpuInfo { memory_total_bytes: gpu_mb << 20, ..GpuInfo::default() })
                    .into_iter()
                    .collect(),
                labels: labels.iter().map(|(k, v)| ((*k).into(), (*v).into())).collect(),
                ..Inventory::default()
            };
            let hello = Hello {
                spool_epoch: 1,
                agent_version: "t".into(),
                inventory: Some(inventory),
                ..Hello::default()
            };
            self.stores
                .telemetry
                .record_hello(&HostId::new(name).unwrap(), &hello, 0, NOW)
                .unwrap();
        }

        /// Ten seconds of telemetry ending at NOW: `models` as (name, instances, requests/s).
        fn serve(&mut self, name: &str, models: &[(&str, u32, u64)]) {
            self.seq += 1;
            let sample = Sample {
                unix_ms: NOW - 1000,
                sample_index: self.seq,
                host: Some(HostSample {
                    cpu_util_pct: 50.0,
                    interval_ms: 10_000,
                    ..HostSample::default()
                }),
                models: models
                    .iter()
                    .map(|(m, instances, rps)| ModelSample {
                        model: (*m).into(),
                        version: "1".into(),
                        interval_ms: 10_000,
                        requests: rps * 10,
                        successes: rps * 10,
                        instances: *instances,
                        ..ModelSample::default()
                    })
                    .collect(),
                ..Sample::default()
            };
            let batch = TelemetryBatch {
                seq: self.seq,
                samples: vec![sample],
                ..TelemetryBatch::default()
            };
            self.stores
                .telemetry
                .commit(&[IncomingBatch {
                    host: HostId::new(name).unwrap(),
                    batch,
                    received_ms: NOW,
                }])
                .unwrap();
        }

        fn autoscaler(&self, policies: &str) -> Autoscaler {
            Autoscaler::new(
                PolicySet::parse(policies).unwrap(),
                self.stores.clone(),
                self.delivery.clone(),
                Duration::from_secs(60),
                Duration::from_secs(600),
            )
        }

        fn decisions(&self) -> Vec<super::super::store::DecisionRecord> {
            let mut d = self.stores.control.decisions(None, 1000).unwrap();
            d.reverse();
            d
        }

        fn directives(&self, host: &str) -> Vec<String> {
            self.stores
                .control
                .outbox(&HostId::new(host).unwrap())
                .unwrap()
                .iter()
                .map(|d| d.body.summary())
                .collect()
        }
    }

    /// The first fleet actuator outcome recorded; fails after 30 s without one.
    async fn answered(rig: &Rig) -> serde_json::Value {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(o) = rig.decisions().into_iter().find_map(|d| d.outcome) {
                return o;
            }
            assert!(tokio::time::Instant::now() < deadline, "no actuator outcome within 30 s");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn policy(name: &str, model: &str, extra: &str) -> String {
        format!(
            "[[policy]]\nname = \"{name}\"\nmodel = \"{model}\"\nmode = \"reactive\"\n\
             max_instances = 64\nmin_instances = 1\n\
             scale_up_limit = {{ instances = 64, per_secs = 60 }}\n{extra}\n\
             [policy.targets]\nrequests_per_instance = 10.0\n"
        )
    }

    #[tokio::test]
    async fn what_a_host_cannot_hold_goes_to_the_cheapest_hosts_then_to_the_fleet_actuator() {
        let mut rig = Rig::new();
        let cpu = [("pool", "cpu")];
        rig.host("a", 4, 0, &cpu);
        rig.host("b", 4, 0, &[("pool", "cpu"), ("hourly_cost_usd", "2")]);
        rig.host("c", 8, 0, &[("pool", "cpu"), ("hourly_cost_usd", "1")]);
        rig.host("gpu", 64, 80_000, &[("pool", "gpu")]);
        rig.serve("a", &[("ocr", 1, 100)]);
        for h in ["b", "c", "gpu"] {
            rig.serve(h, &[]);
        }
        // Prices as the analytics pass writes them.
        let costs = serde_json::json!({
            "currency": "USD", "window_start_ms": 0, "window_end_ms": 1, "total_cost": 0.0,
            "idle_cost": 0.0, "fleet_hourly_rate": 3.0, "models": [],
            "hosts": [
                {"host": "b", "instance_type": null, "lifecycle": "on-demand", "hourly_rate": 2.0,
                 "hours": 1, "cost": 2.0, "idle_cost": 0.0, "note": null},
                {"host": "c", "instance_type": null, "lifecycle": "on-demand", "hourly_rate": 1.0,
                 "hours": 1, "cost": 1.0, "idle_cost": 0.0, "note": null}
            ]
        });
        rig.stores.reports.put_doc("report/costs", &serde_json::to_vec(&costs).unwrap()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let got = dir.path().join("request.json");
        let text = format!(
            "{}\n[policy.resources]\ncpu_cores = 2.0\n\n[fleet]\ncommand = [\"sh\", \"-c\", \"cat > {}\"]\n",
            policy("ocr-cpu", "ocr", "hosts = { pool = \"cpu\" }"),
            got.display()
        );
        let scaler = rig.autoscaler(&text);

        // 100 req/s at 10 per instance: 10 wanted; "a" holds 2 (4 cores / 2).
        scaler.evaluate(NOW).await.unwrap();
        let d = rig.decisions();
        let rules: Vec<&str> = d.iter().map(|d| d.rule.as_str()).collect();
        assert_eq!(
            rules,
            ["allocation.capacity", "allocation.place", "allocation.place", "fleet.add_hosts"]
        );
        assert!(d[0].reason.contains("holds 2 of 10"), "{}", d[0].reason);
        assert_eq!(rig.directives("a"), ["set_instances ocr=2"]);
        // "c" is cheaper per instance (1/h for 4) than "b" (2/h for 2); "gpu" is not selected.
        assert_eq!(rig.directives("c"), ["load ocr", "set_instances ocr=4"]);
        assert_eq!(rig.directives("b"), ["load ocr", "set_instances ocr=2"]);
        assert!(rig.directives("gpu").is_empty());
        assert_eq!(d[3].inputs["instances"], 2, "{}", d[3].inputs);
        // The actuator's answer is recorded on its decision.
        let outcome = answered(&rig).await;
        assert_eq!(outcome["ok"], true, "{outcome}");
        let request: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&got).unwrap()).unwrap();
        assert_eq!(request["action"], "add_hosts");
        assert_eq!(request["decision"], d[3].id.as_str());
        assert_eq!(request["host_labels"]["pool"], "cpu");
        assert_eq!(request["per_instance"]["cpu_cores"], 2.0);

        // The next evaluation neither places the same shortfall again nor asks the actuator
        // again within its cooldown.
        rig.serve("a", &[("ocr", 2, 100)]);
        scaler.evaluate(NOW + 15_000).await.unwrap();
        let later: Vec<String> = rig.decisions()[4..].iter().map(|d| d.rule.clone()).collect();
        assert!(
            later.iter().all(|r| r != "allocation.place" && r != "fleet.add_hosts"),
            "{later:?}"
        );
        let status = scaler.status(Duration::from_secs(15));
        assert_eq!(status.policies[0].hosts.len(), 1, "only host a serves the model");
        assert!(status.fleet.is_some());
    }

    #[tokio::test]
    async fn a_host_that_reported_no_capacity_is_not_cut_to_zero() {
        let mut rig = Rig::new();
        // No CPU count in its inventory (unknown, not zero capacity).
        rig.host("x", 0, 0, &[]);
        rig.serve("x", &[("ocr", 1, 100)]);
        let text = format!("{}\n[policy.resources]\ncpu_cores = 2.0\n", policy("ocr", "ocr", ""));
        rig.autoscaler(&text).evaluate(NOW).await.unwrap();
        assert_eq!(rig.directives("x"), ["set_instances ocr=10"]);
    }

    #[tokio::test]
    async fn a_busy_actuator_is_not_asked_again_until_it_answers() {
        let mut rig = Rig::new();
        rig.host("a", 2, 0, &[]);
        rig.serve("a", &[("ocr", 1, 100)]);
        // No cooldown, and an actuator slower than the evaluations.
        let text = format!(
            "{}\n[policy.resources]\ncpu_cores = 2.0\n\n[fleet]\ncommand = [\"sleep\", \"1\"]\ncooldown_secs = 0\n",
            policy("ocr", "ocr", "")
        );
        let scaler = rig.autoscaler(&text);
        let asked =
            |rig: &Rig| rig.decisions().iter().filter(|d| d.rule == "fleet.add_hosts").count();
        for i in 0..3 {
            rig.serve("a", &[("ocr", 1, 100)]);
            scaler.evaluate(NOW + i * 100).await.unwrap();
        }
        assert_eq!(asked(&rig), 1, "asked again while the first request ran");
        // Once it has answered, the next evaluation asks again (no cooldown).
        answered(&rig).await;
        scaler.evaluate(NOW + 1000).await.unwrap();
        assert_eq!(asked(&rig), 2);
    }

    #[tokio::test]
    async fn a_shared_host_gives_its_capacity_by_priority_and_every_floor_first() {
        let mut rig = Rig::new();
        rig.host("g", 16, 40_960, &[]);
        rig.serve("g", &[("llm", 1, 200), ("ocr", 1, 200)]);
        // 40 GiB of GPU memory, 10 GiB per instance: 4 slots. Both want 20.
        let text = format!(
            "{}\n[policy.resources]\ngpu_memory_mb = 10240\n\n{}\n[policy.resources]\ngpu_memory_mb = 10240\n",
            policy("llm", "llm", "priority = 900"),
            policy("ocr", "ocr", "priority = 10"),
        );
        let scaler = rig.autoscaler(&text);
        scaler.evaluate(NOW).await.unwrap();
        let outbox = rig.directives("g");
        assert!(outbox.contains(&"set_instances llm=3".to_owned()), "{outbox:?}");
        // The low-priority model keeps its floor; nothing else can hold it, and without an
        // actuator that is recorded (once), not acted on.
        assert!(!outbox.iter().any(|d| d.starts_with("set_instances ocr")), "{outbox:?}");
        let rules: Vec<String> = rig.decisions().iter().map(|d| d.rule.clone()).collect();
        assert_eq!(rules.iter().filter(|r| *r == "fleet.no_actuator").count(), 2, "{rules:?}");
        scaler.evaluate(NOW + 15_000).await.unwrap();
        let again: Vec<String> = rig.decisions().iter().map(|d| d.rule.clone()).collect();
        assert_eq!(again.iter().filter(|r| *r == "fleet.no_actuator").count(), 2, "{again:?}");
    }

    #[tokio::test]
    async fn a_budget_caps_growth_across_hosts_and_raises_an_alert() {
        use crate::analytics::budgets::{Budget, BudgetScope, BudgetStatus, Period};
        let mut rig = Rig::new();
        rig.host("a", 4, 0, &[]);
        rig.host("b", 4, 0, &[]);
        rig.serve("a", &[("ocr", 1, 100)]);
        rig.serve("b", &[("ocr", 1, 100)]);
        // 10 h left; room 100 - 60 = 40 at 1/instance-hour: 4 more instances in all.
        let status = BudgetStatus {
            budget: Budget {
                name: "day".into(),
                amount: 100.0,
                period: Period::Day,
                scope: BudgetScope::Fleet,
                thresholds: crate::analytics::budgets::default_thresholds(),
                auto_optimize: false,
            },
            period_start_ms: NOW - 14 * 3_600_000,
            period_end_ms: NOW + 10 * 3_600_000,
            spent: 50.0,
            run_rate_hourly: 1.0,
            forecast: 60.0,
            spent_pct: 50.0,
            forecast_pct: 60.0,
            burn_down: Vec::new(),
            breaches: Vec::new(),
            suggested_plans: Vec::new(),
        };
        rig.stores
            .reports
            .put_doc("report/budgets", &serde_json::to_vec(&vec![status]).unwrap())
            .unwrap();
        let alerts = Arc::new(ScalingAlerts::default());
        let text = policy("ocr", "ocr", "[policy.cost]\nprice_per_instance_hour = 1.0");
        let scaler = rig.autoscaler(&text).with_alerts(alerts.clone());
        scaler.evaluate(NOW).await.unwrap();
        // Host "a" gets 1 + 4; "b" none more (the room is used up).
        assert_eq!(rig.directives("a"), ["set_instances ocr=5"]);
        assert!(rig.directives("b").is_empty());
        let capped: Vec<String> = rig
            .decisions()
            .iter()
            .filter(|d| d.rule == "budget.cap")
            .map(|d| d.reason.clone())
            .collect();
        assert_eq!(capped.len(), 2, "{capped:?}");
        let keys: Vec<String> = alerts.observations().into_iter().map(|o| o.key).collect();
        assert_eq!(keys, ["budget_cap:ocr:a", "budget_cap:ocr:b"]);
        // A host that leaves takes its alert with it.
        let scaler_alerts = alerts.clone();
        scaler_alerts.retain_hosts(|h| h == "a");
        assert_eq!(alerts.observations().len(), 1);
    }
}
