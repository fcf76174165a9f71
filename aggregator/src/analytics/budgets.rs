//! Budgets: an amount per period (UTC day or month) over a scope (the fleet, one model, or the
//! hosts with a label), with thresholds on actual spend and on forecast spend.
//!
//! - Spent = the scope's ledger costs (see [`super::cost`]) from the period start to now.
//! - Forecast = spent + run rate * hours left, the run rate being the scope's mean cost per
//!   hour over the last 24 hours.
//! - Each threshold is an observation keyed `budget:NAME:BASIS:PCT`; the alert book (see
//!   [`super::alerts`]) raises it once when crossed and resolves it when no longer crossed
//!   (e.g. in the next period).
//! - Burn-down: the amount left at each hour (day budgets) or day (month budgets) of the period
//!   so far, then projected at the run rate to the period end.
//! - `auto_optimize`: when a threshold is crossed, the status lists the plans that touch the
//!   scope, highest priority first, as the suggested remedy (nothing is changed automatically).

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::Snapshot;
use super::alerts::{Observation, Severity};
use super::cost::Ledger;
use super::plans::Plan;
use super::series::{DAY_MS, HOUR_MS, day_start, floor_hour, month_bounds};

/// A budget period.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Period {
    /// UTC day.
    Day,
    /// UTC calendar month.
    Month,
}

/// What a budget covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BudgetScope {
    /// Every host.
    Fleet,
    /// One model's attributed cost.
    Model(String),
    /// Hosts whose label `key` is `value`.
    Label {
        /// Label key.
        key: String,
        /// Label value.
        value: String,
    },
}

impl FromStr for BudgetScope {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("must be fleet, model:NAME or label:KEY=VALUE, got {s:?}");
        if s == "fleet" {
            return Ok(Self::Fleet);
        }
        if let Some(m) = s.strip_prefix("model:").filter(|m| !m.is_empty()) {
            return Ok(Self::Model(m.to_owned()));
        }
        let (k, v) = s.strip_prefix("label:").and_then(|l| l.split_once('=')).ok_or_else(bad)?;
        if k.is_empty() || v.is_empty() {
            return Err(bad());
        }
        Ok(Self::Label { key: k.to_owned(), value: v.to_owned() })
    }
}

impl fmt::Display for BudgetScope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Fleet => f.write_str("fleet"),
            Self::Model(m) => write!(f, "model:{m}"),
            Self::Label { key, value } => write!(f, "label:{key}={value}"),
        }
    }
}

impl Serialize for BudgetScope {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for BudgetScope {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// What a threshold compares.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Basis {
    /// Spend so far.
    Actual,
    /// Spend forecast for the whole period.
    Forecast,
}

/// A threshold: `pct` % of the amount on `on`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Threshold {
    /// Percent of the amount, e.g. 80.
    pub pct: f64,
    /// Actual or forecast spend.
    pub on: Basis,
    /// Severity of the alert.
    #[serde(default = "warning")]
    pub severity: Severity,
}

fn warning() -> Severity {
    Severity::Warning
}

/// A budget.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Budget {
    /// Unique name.
    pub name: String,
    /// Amount per period, in the catalog's currency.
    pub amount: f64,
    /// Period.
    pub period: Period,
    /// Scope: `fleet`, `model:NAME` or `label:KEY=VALUE`.
    pub scope: BudgetScope,
    /// Thresholds (default: 80 % and 100 % of actual, 100 % of forecast).
    #[serde(default = "default_thresholds")]
    pub thresholds: Vec<Threshold>,
    /// List the plans that would help when a threshold is crossed.
    #[serde(default)]
    pub auto_optimize: bool,
}

/// The thresholds a budget gets when it names none.
pub fn default_thresholds() -> Vec<Threshold> {
    vec![
        Threshold { pct: 80.0, on: Basis::Actual, severity: Severity::Warning },
        Threshold { pct: 100.0, on: Basis::Actual, severity: Severity::Critical },
        Threshold { pct: 100.0, on: Basis::Forecast, severity: Severity::Warning },
    ]
}

impl Budget {
    /// Problems with this budget, each naming `prefix.key`.
    pub fn problems(&self, prefix: &str) -> Vec<String> {
        let mut p = Vec::new();
        if self.name.trim().is_empty() {
            p.push(format!("{prefix}.name: must not be empty, got {:?}", self.name));
        }
        if !(self.amount.is_finite() && self.amount > 0.0) {
            p.push(format!("{prefix}.amount: must be a positive amount, got {}", self.amount));
        }
        for (i, t) in self.thresholds.iter().enumerate() {
            if !(t.pct.is_finite() && t.pct > 0.0 && t.pct <= 1000.0) {
                p.push(format!(
                    "{prefix}.thresholds[{i}].pct: must be 0..=1000 (percent), got {}",
                    t.pct
                ));
            }
        }
        p
    }
}

/// One point of a burn-down.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BurnPoint {
    /// Time, Unix ms.
    pub unix_ms: i64,
    /// Amount left.
    pub remaining: f64,
    /// True past now (projected at the run rate).
    pub projected: bool,
}

/// A crossed threshold.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Breach {
    /// Threshold percent.
    pub pct: f64,
    /// Basis.
    pub on: Basis,
    /// Severity.
    pub severity: Severity,
}

/// A budget's state now.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BudgetStatus {
    /// The budget.
    pub budget: Budget,
    /// Period start, Unix ms.
    pub period_start_ms: i64,
    /// Period end, Unix ms.
    pub period_end_ms: i64,
    /// Spent so far.
    pub spent: f64,
    /// Cost per hour over the last 24 h.
    pub run_rate_hourly: f64,
    /// Forecast spend for the whole period.
    pub forecast: f64,
    /// Spent as % of the amount.
    pub spent_pct: f64,
    /// Forecast as % of the amount.
    pub forecast_pct: f64,
    /// Amount left over the period.
    pub burn_down: Vec<BurnPoint>,
    /// Thresholds crossed now.
    pub breaches: Vec<Breach>,
    /// With `auto_optimize` and a breach: ids of plans touching the scope, by priority.
    pub suggested_plans: Vec<String>,
}

/// The hourly costs of a scope.
pub fn scope_costs(
    scope: &BudgetScope,
    ledger: &Ledger,
    snapshot: &Snapshot,
) -> BTreeMap<i64, f64> {
    let mut out: BTreeMap<i64, f64> = BTreeMap::new();
    let mut add = |series: &BTreeMap<i64, f64>| {
        for (t, c) in series {
            *out.entry(*t).or_default() += c;
        }
    };
    match scope {
        BudgetScope::Fleet => ledger.hosts.values().for_each(&mut add),
        BudgetScope::Model(m) => ledger.models.get(m).into_iter().for_each(&mut add),
        BudgetScope::Label { key, value } => snapshot
            .hosts
            .iter()
            .filter(|h| h.labels.get(key) == Some(value))
            .filter_map(|h| ledger.hosts.get(&h.host))
            .for_each(&mut add),
    }
    out
}

/// Evaluates one budget at `snapshot.now_ms`.
pub fn evaluate(b: &Budget, ledger: &Ledger, snapshot: &Snapshot, plans: &[Plan]) -> BudgetStatus {
    let now = snapshot.now_ms;
    let (start, end) = match b.period {
        Period::Day => (day_start(now), day_start(now) + DAY_MS),
        Period::Month => month_bounds(now),
    };
    let costs = scope_costs(&b.scope, ledger, snapshot);
    let spent = Ledger::sum(&costs, start, now);
    let run_rate_hourly = Ledger::sum(&costs, now - DAY_MS, now) / 24.0;
    let hours_left = (end - now).max(0) as f64 / HOUR_MS as f64;
    let forecast = spent + run_rate_hourly * hours_left;
    let pct = |v: f64| v / b.amount * 100.0;
    let step = if b.period == Period::Day { HOUR_MS } else { DAY_MS };
    let mut burn_down = Vec::new();
    let mut t = start;
    while t <= end {
        let projected = t > floor_hour(now);
        let spent_then = if projected {
            spent + run_rate_hourly * (t - now).max(0) as f64 / HOUR_MS as f64
        } else {
            Ledger::sum(&costs, start, t)
        };
        burn_down.push(BurnPoint { unix_ms: t, remaining: b.amount - spent_then, projected });
        t += step;
    }
    let breaches: Vec<Breach> = b
        .thresholds
        .iter()
        .filter(|th| match th.on {
            Basis::Actual => pct(spent) >= th.pct,
            Basis::Forecast => pct(forecast) >= th.pct,
        })
        .map(|th| Breach { pct: th.pct, on: th.on, severity: th.severity })
        .collect();
    let suggested_plans = if b.auto_optimize && !breaches.is_empty() {
        let hosts: Vec<&str> = match &b.scope {
            BudgetScope::Fleet => snapshot.hosts.iter().map(|h| h.host.as_str()).collect(),
            BudgetScope::Label { key, value } => snapshot
                .hosts
                .iter()
                .filter(|h| h.labels.get(key) == Some(value))
                .map(|h| h.host.as_str())
                .collect(),
            BudgetScope::Model(_) => Vec::new(),
        };
        plans
            .iter()
            .filter(|p| {
                hosts.contains(&p.target.as_str())
                    || matches!(&b.scope, BudgetScope::Model(m) if p.target == format!("model:{m}"))
                    || b.scope == BudgetScope::Fleet
            })
            .map(|p| p.id.clone())
            .collect()
    } else {
        Vec::new()
    };
    BudgetStatus {
        budget: b.clone(),
        period_start_ms: start,
        period_end_ms: end,
        spent,
        run_rate_hourly,
        forecast,
        spent_pct: pct(spent),
        forecast_pct: pct(forecast),
        burn_down,
        breaches,
        suggested_plans,
    }
}

/// One observation per threshold of the budget: breached or not.
pub fn observations(s: &BudgetStatus) -> Vec<Observation> {
    let b = &s.budget;
    b.thresholds
        .iter()
        .map(|th| {
            let (basis, value) = match th.on {
                Basis::Actual => ("actual", s.spent_pct),
                Basis::Forecast => ("forecast", s.forecast_pct),
            };
            Observation {
                key: format!("budget:{}:{basis}:{}", b.name, th.pct),
                rule: format!("budget {}", b.name),
                subject: b.scope.to_string(),
                severity: th.severity,
                breached: value >= th.pct,
                value: Some(value),
                threshold: th.pct,
                message: format!(
                    "budget {} ({} per {:?}, {}): {basis} spend {:.1} % of the amount, threshold {} %",
                    b.name,
                    b.amount,
                    b.period,
                    b.scope,
                    value,
                    th.pct
                )
                .to_lowercase(),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::analytics::alerts::{AlertBook, AlertState};
    use crate::analytics::cost::tests::{CATALOG, small_fleet};
    use crate::analytics::cost::{PricingCatalog, attribute};

    #[test]
    fn scopes_parse_and_print() {
        for s in ["fleet", "model:resnet", "label:team=search"] {
            assert_eq!(s.parse::<BudgetScope>().unwrap().to_string(), s);
        }
        assert!("label:team".parse::<BudgetScope>().is_err());
        assert!("model:".parse::<BudgetScope>().is_err());
    }

    #[test]
    fn crossing_raises_once_and_resolves_next_period() {
        // Fleet costs 10.6/h (a 10 on-demand, b 0.6 spot) in hours 0 and 1 of day 0.
        let catalog = PricingCatalog::parse(CATALOG, "t").unwrap();
        let mut snap = small_fleet();
        let costs = attribute(&snap, &catalog, 0, 2 * HOUR_MS);
        let budget = Budget {
            name: "daily".into(),
            amount: 100.0,
            period: Period::Day,
            scope: BudgetScope::Fleet,
            thresholds: vec![
                Threshold { pct: 20.0, on: Basis::Actual, severity: Severity::Warning },
                Threshold { pct: 100.0, on: Basis::Forecast, severity: Severity::Critical },
            ],
            auto_optimize: true,
        };
        // Now = 02:00: spent 21.2 (21.2 %), run rate 21.2 / 24, forecast 21.2 + 22 h * that.
        let st = evaluate(&budget, &costs.ledger, &snap, &[]);
        assert!((st.spent - 21.2).abs() < 1e-9);
        assert!((st.run_rate_hourly - 21.2 / 24.0).abs() < 1e-12);
        assert!((st.forecast - (21.2 + 22.0 * 21.2 / 24.0)).abs() < 1e-9);
        assert_eq!(st.breaches.len(), 1, "actual 21.2 % >= 20 %; forecast 40.6 % < 100 %");
        assert_eq!(st.burn_down[0].remaining, 100.0);
        assert!((st.burn_down[2].remaining - 78.8).abs() < 1e-9);
        assert!(st.burn_down.last().unwrap().projected);
        assert_eq!(st.burn_down.len(), 25);

        let mut book = AlertBook::default();
        let fired = book.apply(&observations(&st), snap.now_ms);
        assert_eq!(fired.len(), 1);
        assert_eq!(fired[0].state, AlertState::Firing);
        assert!(fired[0].key.starts_with("budget:daily:actual:20"));
        // Evaluated again: still crossed, nothing new (deduplicated).
        assert!(book.apply(&observations(&st), snap.now_ms + 1).is_empty());
        // The next day nothing is spent yet: the alert resolves.
        snap.now_ms += DAY_MS;
        let st = evaluate(&budget, &costs.ledger, &snap, &[]);
        assert_eq!(st.spent, 0.0);
        let resolved = book.apply(&observations(&st), snap.now_ms);
        assert_eq!(resolved.len(), 1);
        assert_eq!(resolved[0].state, AlertState::Resolved);
        assert!(book.active.is_empty());
    }

    #[test]
    fn model_and_label_scopes_sum_their_share() {
        let catalog = PricingCatalog::parse(CATALOG, "t").unwrap();
        let mut snap = small_fleet();
        snap.hosts[1].labels.insert("team".into(), "x".into());
        let costs = attribute(&snap, &catalog, 0, 2 * HOUR_MS);
        let m = scope_costs(&BudgetScope::Model("m".into()), &costs.ledger, &snap);
        assert!((m.values().sum::<f64>() - 10.6).abs() < 1e-9);
        let l = scope_costs(
            &BudgetScope::Label { key: "team".into(), value: "x".into() },
            &costs.ledger,
            &snap,
        );
        assert!((l.values().sum::<f64>() - 1.2).abs() < 1e-9);
    }
}
