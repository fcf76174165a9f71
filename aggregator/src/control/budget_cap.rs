//! The budget cap on scaling: how many instances a scaling policy may grow to on a host before
//! the budgets covering it would break their hard threshold. The autoscaler passes it to the
//! engine as `Limits::max_instances_by_budget`; a decision held by it is flagged
//! `budget_capped` and raises an alert (`budget_cap:POLICY:HOST`) instead of scaling.
//!
//! For each budget whose scope covers the host and model (the fleet, the model, or a label the
//! host has), from its latest status (the analytics pass's `report/budgets`):
//! - hard limit: `amount * pct / 100` of its highest critical threshold, or the amount when it
//!   has none;
//! - room: hard limit minus the period's forecast spend (spent so far plus the run rate to the
//!   period's end), minus what instances granted since that status was computed will cost;
//! - one more instance costs `price_per_instance_hour * hours left in the period`;
//! - cap: `current + floor(room / that)`, never below `current` (the budget does not shrink a
//!   fleet that is already above it: the alert says so, an operator decides).
//!
//! The tightest budget wins. No price, no budget, or a period that has ended: no cap.

use std::collections::BTreeMap;
use std::sync::{Mutex, PoisonError};

use common::ids::HostId;

use super::engine::Decision;
use super::policy::ScalingPolicy;
use crate::analytics::alerts::{Observation, Severity};
use crate::analytics::budgets::{BudgetScope, BudgetStatus};

/// The alert rule a budget-capped decision raises.
pub const ALERT_RULE: &str = "budget_cap";

/// The `budget_cap` alerts the autoscaler raises, read by every analytics pass (which fires
/// and resolves them like every other alert). One entry per capped (policy, host), removed
/// when its next decision is not capped or the host leaves.
#[derive(Debug, Default)]
pub struct ScalingAlerts {
    capped: Mutex<BTreeMap<String, (String, Observation)>>,
}

impl ScalingAlerts {
    /// Notes `decision` of `policy` on `host`: capped raises, not capped clears.
    pub fn observe(
        &self,
        policy: &ScalingPolicy,
        host: &HostId,
        decision: &Decision,
        cap: Option<&BudgetCap>,
    ) {
        let subject = format!("{}:{host}", policy.name);
        let key = format!("{ALERT_RULE}:{subject}");
        let mut capped = self.capped.lock().unwrap_or_else(PoisonError::into_inner);
        match cap.filter(|_| decision.budget_capped) {
            Some(cap) => {
                let wanted = decision.inputs.predictive.unwrap_or(0).max(decision.inputs.reactive);
                let o = Observation {
                    key: key.clone(),
                    rule: ALERT_RULE.to_owned(),
                    subject,
                    severity: Severity::Warning,
                    breached: true,
                    value: Some(f64::from(wanted)),
                    threshold: f64::from(cap.max_instances),
                    message: format!(
                        "policy {} wants {wanted} instances of {} on {host}, but budget {} pays \
                         for {}: raise the budget or accept the SLO risk",
                        policy.name, policy.model, cap.budget, cap.max_instances
                    ),
                };
                capped.insert(key, (host.to_string(), o));
            }
            None => {
                capped.remove(&key);
            }
        }
    }

    /// Drops the entries of hosts not in `keep`.
    pub fn retain_hosts(&self, keep: impl Fn(&str) -> bool) {
        self.capped.lock().unwrap_or_else(PoisonError::into_inner).retain(|_, (h, _)| keep(h));
    }

    /// The current observations.
    pub fn observations(&self) -> Vec<Observation> {
        self.capped
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .map(|(_, o)| o.clone())
            .collect()
    }
}

const HOUR_MS: f64 = 3_600_000.0;

/// A cap and the budget it comes from.
#[derive(Debug, Clone, PartialEq)]
pub struct BudgetCap {
    /// Budget name.
    pub budget: String,
    /// Most instances the policy may run on the host.
    pub max_instances: u32,
}

/// Whether `status`'s budget covers `model` on a host with `labels`.
pub fn covers(status: &BudgetStatus, model: &str, labels: &BTreeMap<String, String>) -> bool {
    match &status.budget.scope {
        BudgetScope::Fleet => true,
        BudgetScope::Model(m) => m == model,
        BudgetScope::Label { key, value } => labels.get(key) == Some(value),
    }
}

/// The hard limit of a budget: its highest critical threshold, or its amount.
pub fn hard_limit(status: &BudgetStatus) -> f64 {
    let b = &status.budget;
    let pct = b
        .thresholds
        .iter()
        .filter(|t| t.severity == Severity::Critical)
        .map(|t| t.pct)
        .fold(None, |m: Option<f64>, p| Some(m.map_or(p, |m| m.max(p))))
        .unwrap_or(100.0);
    b.amount * pct / 100.0
}

/// The tightest cap for one policy on one host at `now_ms`. `granted` is, per budget name, the
/// instances already granted since `budgets` were computed (they are not in its forecast yet).
pub fn cap_for(
    budgets: &[BudgetStatus],
    model: &str,
    labels: &BTreeMap<String, String>,
    current: u32,
    price_per_instance_hour: Option<f64>,
    granted: &BTreeMap<String, u32>,
    now_ms: i64,
) -> Option<BudgetCap> {
    let price = price_per_instance_hour.filter(|p| p.is_finite() && *p > 0.0)?;
    budgets
        .iter()
        .filter(|s| covers(s, model, labels))
        .filter_map(|s| {
            let hours_left = (s.period_end_ms - now_ms) as f64 / HOUR_MS;
            if hours_left <= 0.0 {
                return None;
            }
            let per_instance = price * hours_left;
            let already = f64::from(granted.get(&s.budget.name).copied().unwrap_or(0));
            let room = hard_limit(s) - s.forecast - already * per_instance;
            let extra = super::placement::whole(room / per_instance);
            Some(BudgetCap {
                budget: s.budget.name.clone(),
                max_instances: current.saturating_add(extra),
            })
        })
        .min_by_key(|c| c.max_instances)
}

/// Counts `decision`'s growth against every budget covering it, so the next host's cap in the
/// same period leaves it out of the room.
pub fn count_growth(
    granted: &mut BTreeMap<String, u32>,
    budgets: &[BudgetStatus],
    model: &str,
    labels: &BTreeMap<String, String>,
    decision: &Decision,
) {
    let grew = decision.desired.saturating_sub(decision.current);
    if grew == 0 || !decision.act {
        return;
    }
    for s in budgets.iter().filter(|s| covers(s, model, labels)) {
        let n = granted.entry(s.budget.name.clone()).or_default();
        *n = n.saturating_add(grew);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::analytics::budgets::{Basis, Budget, Period, Threshold};

    const NOW: i64 = 1_700_000_000_000;

    fn status(
        name: &str,
        scope: BudgetScope,
        amount: f64,
        forecast: f64,
        hours: i64,
    ) -> BudgetStatus {
        BudgetStatus {
            budget: Budget {
                name: name.into(),
                amount,
                period: Period::Day,
                scope,
                thresholds: vec![
                    Threshold { pct: 80.0, on: Basis::Actual, severity: Severity::Warning },
                    Threshold { pct: 90.0, on: Basis::Actual, severity: Severity::Critical },
                ],
                auto_optimize: false,
            },
            period_start_ms: NOW - 3_600_000,
            period_end_ms: NOW + hours * 3_600_000,
            spent: 0.0,
            run_rate_hourly: 0.0,
            forecast,
            spent_pct: 0.0,
            forecast_pct: 0.0,
            burn_down: Vec::new(),
            breaches: Vec::new(),
            suggested_plans: Vec::new(),
        }
    }

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
    }

    #[test]
    fn the_cap_is_what_the_room_under_the_critical_threshold_pays_for() {
        // Hard limit 90 % of 1000 = 900; forecast 700: room 200; an instance for the 10 h
        // left at 4/h costs 40: 5 more.
        let b = [status("day", BudgetScope::Fleet, 1000.0, 700.0, 10)];
        let none = BTreeMap::new();
        let no_grants = BTreeMap::new();
        let cap = cap_for(&b, "ocr", &none, 3, Some(4.0), &no_grants, NOW).unwrap();
        assert_eq!(cap, BudgetCap { budget: "day".into(), max_instances: 8 });
        // Over the limit already: no growth, and no shrinking either.
        let over = [status("day", BudgetScope::Fleet, 1000.0, 950.0, 10)];
        let cap = cap_for(&over, "ocr", &none, 3, Some(4.0), &no_grants, NOW).unwrap();
        assert_eq!(cap.max_instances, 3);
        // No price, or the period is over: no cap.
        assert_eq!(cap_for(&b, "ocr", &none, 3, None, &no_grants, NOW), None);
        let later = NOW + 11 * 3_600_000;
        assert_eq!(cap_for(&b, "ocr", &none, 3, Some(4.0), &no_grants, later), None);
    }

    #[test]
    fn only_budgets_covering_the_host_and_model_count_and_the_tightest_wins() {
        let b = [
            status("fleet", BudgetScope::Fleet, 10_000.0, 0.0, 10),
            status("ocr", BudgetScope::Model("ocr".into()), 1000.0, 700.0, 10),
            status(
                "gpu",
                BudgetScope::Label { key: "pool".into(), value: "gpu".into() },
                1000.0,
                820.0,
                10,
            ),
        ];
        let none = BTreeMap::new();
        let cpu = labels(&[("pool", "cpu")]);
        let gpu = labels(&[("pool", "gpu")]);
        assert_eq!(cap_for(&b, "ocr", &cpu, 0, Some(4.0), &none, NOW).unwrap().budget, "ocr");
        assert_eq!(cap_for(&b, "asr", &cpu, 0, Some(4.0), &none, NOW).unwrap().budget, "fleet");
        let cap = cap_for(&b, "ocr", &gpu, 0, Some(4.0), &none, NOW).unwrap();
        assert_eq!((cap.budget.as_str(), cap.max_instances), ("gpu", 2));
    }

    #[test]
    fn growth_granted_since_the_status_uses_up_the_room() {
        let b = [status("day", BudgetScope::Fleet, 1000.0, 700.0, 10)];
        let none = BTreeMap::new();
        let mut granted = BTreeMap::new();
        let decision = |current, desired| Decision {
            at_ms: NOW,
            policy: "p".into(),
            model: "ocr".into(),
            current,
            desired,
            act: desired != current,
            would_have: None,
            rule: "reactive.scale_up".into(),
            reason: String::new(),
            inputs: crate::control::engine::DecisionInputs {
                observation: Default::default(),
                metrics: Vec::new(),
                reactive: desired,
                predictive: None,
                forecast: None,
                limits: Default::default(),
                stabilized: None,
                burst: false,
            },
            budget_capped: false,
        };
        count_growth(&mut granted, &b, "ocr", &none, &decision(1, 4));
        count_growth(&mut granted, &b, "ocr", &none, &decision(4, 2));
        assert_eq!(granted.get("day"), Some(&3));
        // 5 paid for, 3 already granted on another host: 2 more here.
        assert_eq!(
            cap_for(&b, "ocr", &none, 1, Some(4.0), &granted, NOW).unwrap().max_instances,
            3
        );
    }
}
