//! Budget auto-optimize: when a budget with `auto_optimize = true` has a threshold crossed, the
//! cost plans that are safe to automate become directives, recorded as decisions of that
//! budget (`budget:NAME`); every other plan stays a proposal (`flotilla plan`).
//!
//! Safe to automate, per model on a host in the budget's scope, from the hourly telemetry:
//! - idle for at least [`FEWER_AFTER_HOURS`] (no requests in the hours it reported): one
//!   instance (`set_instances 1`, rule `auto_optimize.fewer_instances`);
//! - idle for at least [`UNLOAD_AFTER_HOURS`]: unloaded (`unload`, rule
//!   `auto_optimize.unload_idle`).
//!
//! - busy (requests within the last hour) and not searched on that host within
//!   [`SEARCH_AGAIN_AFTER`]: an optimization search for the cost strategy that adopts its
//!   winner (`optimize`, rule `auto_optimize.optimize_cost`, priced at the host's hourly rate),
//!   one per host per pass since an agent runs one search at a time. The search keeps within
//!   the accuracy bound and the agent's CPU share, and `flotilla optimize rollback` undoes it.
//!
//! Not automated: stopping or resizing hosts, spot capacity and moving deferrable work, which
//! need an operator or the fleet-size actuator.
//!
//! Invariant: an action is proposed only when the host's desired state does not already say it
//! (instances 1, or unloaded), or, for a search, when the model was not searched (or asked to
//! be, whatever the answer) on that host within [`SEARCH_AGAIN_AFTER`], so each is decided
//! once, not at every analytics pass.

use std::collections::{BTreeMap, BTreeSet};

use common::directive::{DirectiveBody, OptimizeOptions};

use super::store::DesiredState;
use crate::analytics::Snapshot;
use crate::analytics::budgets::{BudgetScope, BudgetStatus};

/// Idle hours after which an idle model runs one instance.
pub const FEWER_AFTER_HOURS: i64 = 1;

/// Idle hours after which an idle model is unloaded.
pub const UNLOAD_AFTER_HOURS: i64 = 24;

const HOUR_MS: i64 = 3_600_000;

/// How long after a search of a model on a host (or a budget's request for one) another is not
/// asked for.
pub const SEARCH_AGAIN_AFTER_MS: i64 = 7 * 24 * HOUR_MS;

/// See [`SEARCH_AGAIN_AFTER_MS`].
pub const SEARCH_AGAIN_AFTER: std::time::Duration = std::time::Duration::from_secs(7 * 24 * 3600);

/// What the search rule needs besides the snapshot.
#[derive(Debug, Clone, Default)]
pub struct SearchHistory {
    /// (host, model) searched, or asked to be, within [`SEARCH_AGAIN_AFTER`].
    pub recent: BTreeSet<(String, String)>,
    /// Hosts with a search running now (an agent runs one at a time, so asking would only be
    /// refused, and would use up the model's week).
    pub searching: BTreeSet<String>,
    /// Each host's hourly rate, where the cost report knows it.
    pub rates: BTreeMap<String, f64>,
}

/// The rule that asks for a search.
pub const OPTIMIZE_RULE: &str = "auto_optimize.optimize_cost";

/// One action safe to automate.
#[derive(Debug, Clone, PartialEq)]
pub struct SafeAction {
    /// The budget whose breach asks for it.
    pub budget: String,
    /// The host.
    pub host: String,
    /// The model.
    pub model: String,
    /// The directive.
    pub body: DirectiveBody,
    /// `auto_optimize.fewer_instances`, `auto_optimize.unload_idle` or [`OPTIMIZE_RULE`].
    pub rule: &'static str,
    /// A sentence with the numbers.
    pub reason: String,
    /// Idle hours seen.
    pub idle_hours: i64,
}

/// The safe actions for every breaching `auto_optimize` budget in `budgets`.
pub fn safe_actions(
    budgets: &[BudgetStatus],
    snapshot: &Snapshot,
    desired: &BTreeMap<String, DesiredState>,
    searched: &SearchHistory,
) -> Vec<SafeAction> {
    let mut out: Vec<SafeAction> = Vec::new();
    for status in budgets {
        let b = &status.budget;
        if !b.auto_optimize || status.breaches.is_empty() {
            continue;
        }
        for h in &snapshot.hosts {
            let host_in_scope = match &b.scope {
                BudgetScope::Fleet | BudgetScope::Model(_) => true,
                BudgetScope::Label { key, value } => h.labels.get(key) == Some(value),
            };
            if !host_in_scope {
                continue;
            }
            let breach = status
                .breaches
                .iter()
                .map(|x| format!("{} % {:?}", x.pct, x.on).to_lowercase())
                .collect::<Vec<_>>()
                .join(", ");
            let idle = idle_models(h, snapshot.now_ms);
            // Busy: requests in the recent window, or in an hour that ended within the last
            // hour (a model never asked for is not busy, however new).
            let busy = h
                .recent
                .models
                .iter()
                .filter(|(_, m)| m.requests > 0)
                .map(|(name, _)| name.as_str())
                .chain(
                    idle.iter()
                        .filter(|(_, hours, ever_busy)| *hours == 0 && *ever_busy)
                        .map(|(m, _, _)| m.as_str()),
                );
            for model in busy.collect::<BTreeSet<_>>() {
                let in_scope = !matches!(&b.scope, BudgetScope::Model(m) if m != model);
                let key = (h.host.clone(), model.to_owned());
                // One search per host at a time, once per model and week, one budget enough.
                if !in_scope
                    || searched.recent.contains(&key)
                    || searched.searching.contains(&h.host)
                    || out.iter().any(|a| a.host == h.host && a.rule == OPTIMIZE_RULE)
                {
                    continue;
                }
                let rate = searched.rates.get(&h.host).copied();
                let body = DirectiveBody::Optimize {
                    model: model.to_owned(),
                    options: OptimizeOptions {
                        strategy: Some("cost".into()),
                        price_per_hour: rate,
                        apply: Some(true),
                        ..OptimizeOptions::default()
                    },
                };
                out.push(SafeAction {
                    budget: b.name.clone(),
                    host: h.host.clone(),
                    model: model.to_owned(),
                    reason: format!(
                        "budget {} crossed {breach} (spent {:.1} %, forecast {:.1} %); {model} on {} is busy and was not searched within {} days: a cost search{}, adopting its winner within the accuracy bound",
                        b.name,
                        status.spent_pct,
                        status.forecast_pct,
                        h.host,
                        SEARCH_AGAIN_AFTER_MS / (24 * HOUR_MS),
                        rate.map(|r| format!(" at {r} per hour")).unwrap_or_default(),
                    ),
                    body,
                    rule: OPTIMIZE_RULE,
                    idle_hours: 0,
                });
            }
            for (model, idle_hours, _) in idle {
                if matches!(&b.scope, BudgetScope::Model(m) if *m != model) {
                    continue;
                }
                let wanted = desired.get(&h.host).and_then(|d| d.models.get(&model));
                let unloaded = wanted.is_some_and(|m| m.loaded == Some(false));
                let one = wanted.is_some_and(|m| m.instances == Some(1));
                let (body, rule) = if idle_hours >= UNLOAD_AFTER_HOURS && !unloaded {
                    (DirectiveBody::Unload { model: model.clone() }, "auto_optimize.unload_idle")
                } else if idle_hours >= FEWER_AFTER_HOURS && !one && !unloaded {
                    (
                        DirectiveBody::SetInstances {
                            model: model.clone(),
                            version: None,
                            instances: 1,
                        },
                        "auto_optimize.fewer_instances",
                    )
                } else {
                    continue;
                };
                // One budget's action is enough: two budgets over one host do not repeat it.
                if out.iter().any(|a| a.host == h.host && a.model == model) {
                    continue;
                }
                out.push(SafeAction {
                    budget: b.name.clone(),
                    host: h.host.clone(),
                    model: model.clone(),
                    reason: format!(
                        "budget {} crossed {breach} (spent {:.1} %, forecast {:.1} %); {model} on {} served no request for {idle_hours} h: {}",
                        b.name,
                        status.spent_pct,
                        status.forecast_pct,
                        h.host,
                        body.summary()
                    ),
                    body,
                    rule,
                    idle_hours,
                });
            }
        }
    }
    out
}

/// Models the host reported in its hourly history with their idle hours: full hours since the
/// last hour with requests (or since the first hour reported, when none had any), and whether
/// any hour had requests.
fn idle_models(h: &crate::analytics::HostSnapshot, now_ms: i64) -> Vec<(String, i64, bool)> {
    let mut first: BTreeMap<&str, i64> = BTreeMap::new();
    let mut last_busy: BTreeMap<&str, i64> = BTreeMap::new();
    for (&t, stats) in h.hours.iter() {
        for (model, hour) in &stats.models {
            first.entry(model).or_insert(t);
            if hour.requests_per_s > 0.0 {
                last_busy.insert(model, t + HOUR_MS);
            }
        }
    }
    // Requests in the recent raw window mean busy now, whatever the hours say.
    first
        .into_iter()
        .filter(|(model, _)| h.recent.models.get(*model).is_none_or(|m| m.requests == 0))
        .map(|(model, since)| {
            let busy = last_busy.get(model).copied();
            let idle_since = busy.unwrap_or(since);
            (model.to_owned(), (now_ms - idle_since).div_euclid(HOUR_MS), busy.is_some())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::analytics::alerts::Severity;
    use crate::analytics::budgets::{Basis, Breach, Budget, Period};
    use crate::analytics::{HostSnapshot, HourStats, ModelHour};

    const NOW: i64 = 1_000 * HOUR_MS;

    fn host(name: &str, pool: &str, models: &[(&str, i64)]) -> HostSnapshot {
        // Each model reported the last 48 hours, with requests until `busy_until_hours_ago`.
        let mut hours = BTreeMap::new();
        for k in 1..=48 {
            let t = NOW - k * HOUR_MS;
            let mut stats = HourStats::default();
            for (m, quiet) in models {
                let rps = if k > *quiet { 5.0 } else { 0.0 };
                stats.models.insert(
                    (*m).to_owned(),
                    ModelHour { requests_per_s: rps, ..ModelHour::default() },
                );
            }
            hours.insert(t, stats);
        }
        HostSnapshot {
            host: name.into(),
            labels: [("pool".to_owned(), pool.to_owned())].into(),
            hours: hours.into(),
            ..HostSnapshot::default()
        }
    }

    fn status(scope: BudgetScope, auto: bool, breached: bool) -> BudgetStatus {
        BudgetStatus {
            budget: Budget {
                name: "b".into(),
                amount: 10.0,
                period: Period::Day,
                scope,
                thresholds: vec![],
                auto_optimize: auto,
            },
            period_start_ms: 0,
            period_end_ms: 0,
            spent: 12.0,
            run_rate_hourly: 1.0,
            forecast: 20.0,
            spent_pct: 120.0,
            forecast_pct: 200.0,
            burn_down: vec![],
            breaches: if breached {
                vec![Breach { pct: 100.0, on: Basis::Actual, severity: Severity::Critical }]
            } else {
                vec![]
            },
            suggested_plans: vec![],
        }
    }

    #[test]
    fn idle_models_get_fewer_instances_then_unloaded_busy_ones_are_left_alone() {
        let snapshot = Snapshot {
            now_ms: NOW,
            hosts: vec![
                host("a", "gpu", &[("busy", 0), ("quiet", 3), ("dead", 30)]),
                host("b", "cpu", &[("quiet", 3)]),
            ],
        };
        let fleet = [status(BudgetScope::Fleet, true, true)];
        // Every busy model here was searched lately: only the idle ones get actions.
        let searched = SearchHistory {
            recent: [("a".to_owned(), "busy".to_owned())].into(),
            ..SearchHistory::default()
        };
        let mut actions = safe_actions(&fleet, &snapshot, &BTreeMap::new(), &searched);
        actions.sort_by(|x, y| (&x.host, &x.model).cmp(&(&y.host, &y.model)));
        let got: Vec<(&str, &str, &str, i64)> = actions
            .iter()
            .map(|a| (a.host.as_str(), a.model.as_str(), a.rule, a.idle_hours))
            .collect();
        assert_eq!(
            got,
            vec![
                ("a", "dead", "auto_optimize.unload_idle", 30),
                ("a", "quiet", "auto_optimize.fewer_instances", 3),
                ("b", "quiet", "auto_optimize.fewer_instances", 3),
            ]
        );
        assert!(
            actions[0].reason.contains("budget b crossed 100 % actual"),
            "{}",
            actions[0].reason
        );

        // Scoped by label or model; nothing without auto_optimize or a breach.
        let label =
            [status(BudgetScope::Label { key: "pool".into(), value: "cpu".into() }, true, true)];
        assert_eq!(safe_actions(&label, &snapshot, &BTreeMap::new(), &searched).len(), 1);
        let model = [status(BudgetScope::Model("dead".into()), true, true)];
        assert_eq!(safe_actions(&model, &snapshot, &BTreeMap::new(), &searched).len(), 1);
        assert!(
            safe_actions(
                &[status(BudgetScope::Fleet, false, true)],
                &snapshot,
                &BTreeMap::new(),
                &searched
            )
            .is_empty()
        );
        assert!(
            safe_actions(
                &[status(BudgetScope::Fleet, true, false)],
                &snapshot,
                &BTreeMap::new(),
                &searched
            )
            .is_empty()
        );

        // What the desired state already says is not decided again.
        let mut desired = BTreeMap::new();
        let mut a = DesiredState::default();
        a.apply(&DirectiveBody::Unload { model: "dead".into() }, NOW);
        a.apply(
            &DirectiveBody::SetInstances { model: "quiet".into(), version: None, instances: 1 },
            NOW,
        );
        desired.insert("a".to_owned(), a);
        let left = safe_actions(&fleet, &snapshot, &desired, &searched);
        assert_eq!(left.len(), 1);
        assert_eq!(left[0].host, "b");
    }

    #[test]
    fn busy_models_not_searched_lately_get_one_cost_search_per_host() {
        let snapshot = Snapshot {
            now_ms: NOW,
            hosts: vec![
                host("a", "gpu", &[("ocr", 0), ("asr", 0), ("quiet", 3)]),
                host("b", "cpu", &[("ocr", 0)]),
            ],
        };
        let fleet = [status(BudgetScope::Fleet, true, true)];
        let searched = SearchHistory {
            recent: [("b".to_owned(), "ocr".to_owned())].into(),
            rates: [("a".to_owned(), 2.5)].into(),
            ..SearchHistory::default()
        };
        let actions = safe_actions(&fleet, &snapshot, &BTreeMap::new(), &searched);
        let searches: Vec<&SafeAction> =
            actions.iter().filter(|a| a.rule == OPTIMIZE_RULE).collect();
        assert_eq!(
            searches.len(),
            1,
            "one per host, none for b's ocr searched lately: {actions:?}"
        );
        let a = searches[0];
        assert_eq!((a.host.as_str(), a.model.as_str()), ("a", "asr"));
        let DirectiveBody::Optimize { model, options } = &a.body else { panic!("{:?}", a.body) };
        assert_eq!(model, "asr");
        assert_eq!(options.strategy.as_deref(), Some("cost"));
        assert_eq!((options.apply, options.price_per_hour), (Some(true), Some(2.5)));
        assert!(a.reason.contains("a cost search at 2.5 per hour"), "{}", a.reason);
        // The idle model on a still gets its own action beside the search.
        assert!(actions.iter().any(|x| x.model == "quiet" && x.host == "a"), "{actions:?}");
        // Searched lately: asked again only after the week.
        let all = SearchHistory {
            recent: [("a", "ocr"), ("a", "asr"), ("b", "ocr")]
                .map(|(h, m)| (h.to_owned(), m.to_owned()))
                .into(),
            ..SearchHistory::default()
        };
        assert!(
            safe_actions(&fleet, &snapshot, &BTreeMap::new(), &all)
                .iter()
                .all(|x| x.rule != OPTIMIZE_RULE)
        );
        // A host with a search running is not asked for another (it would be refused).
        let running = SearchHistory { searching: ["a".to_owned()].into(), ..searched.clone() };
        assert!(
            safe_actions(&fleet, &snapshot, &BTreeMap::new(), &running)
                .iter()
                .all(|x| x.rule != OPTIMIZE_RULE)
        );
        // Only models in a model-scoped budget's scope.
        let scoped = [status(BudgetScope::Model("ocr".into()), true, true)];
        let only = safe_actions(&scoped, &snapshot, &BTreeMap::new(), &searched);
        assert_eq!(
            only.iter().map(|x| (x.host.as_str(), x.model.as_str(), x.rule)).collect::<Vec<_>>(),
            vec![("a", "ocr", OPTIMIZE_RULE)]
        );
    }
}
