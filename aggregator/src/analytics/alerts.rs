//! SLO and cost alerts: rules, observations and the alert book that deduplicates them.
//!
//! A rule names a subject (`model`, `host`, both, or `*` for each one seen) and one condition:
//! - `p95_latency_ms`: the p95 of end-to-end latency over the recent window, from the window's
//!   raw samples' latency histograms merged across hosts ([`ModelTotals`]); never an average of
//!   per-host percentiles. No successful request in the window means nothing to judge: clear.
//! - `min_requests_per_s`: requests in the window / window length below the minimum (silence
//!   counts as 0, so a model that stopped serving breaches).
//! - `max_gpu_util_pct`: a host's mean GPU utilization over the window above the maximum.
//! - `max_hourly_cost`: a host's rate, a model's attributed cost in the last complete hour, or
//!   (with neither) the fleet's rate, above the maximum.
//!
//! Evaluating rules yields [`Observation`]s keyed `rule:subject`. [`AlertBook::apply`] turns
//! them into transitions: a breached key not yet active fires once; an active key observed
//! clear, or no longer observed at all, resolves. Only transitions are delivered and logged, so
//! a condition that persists over many passes alerts once.

use std::collections::BTreeMap;

use common::model_stats::ModelTotals;
use serde::{Deserialize, Serialize};

use super::Snapshot;
use super::cost::CostReport;
use super::series::{HOUR_MS, floor_hour};

/// How urgent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    /// For the record.
    Info,
    /// Look soon.
    Warning,
    /// Act now.
    Critical,
}

/// What a rule checks.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Condition {
    /// p95 latency above, ms.
    P95LatencyMs(f64),
    /// Throughput below, requests/s.
    MinRequestsPerS(f64),
    /// Mean GPU utilization above, %.
    MaxGpuUtilPct(f64),
    /// Hourly cost above.
    MaxHourlyCost(f64),
}

/// An alert rule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AlertRule {
    /// Unique name.
    pub name: String,
    /// Model name, `*` for each model, or none.
    pub model: Option<String>,
    /// Host id, `*` for each host, or none.
    pub host: Option<String>,
    /// The condition.
    pub condition: Condition,
    /// Severity.
    pub severity: Severity,
}

/// One rule judged on one subject.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Observation {
    /// Dedupe key: `rule:subject`.
    pub key: String,
    /// Rule name.
    pub rule: String,
    /// What it is about.
    pub subject: String,
    /// Severity when breached.
    pub severity: Severity,
    /// Whether the condition holds.
    pub breached: bool,
    /// The measured value.
    pub value: Option<f64>,
    /// The threshold.
    pub threshold: f64,
    /// In words.
    pub message: String,
}

/// Firing or resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AlertState {
    /// The condition holds.
    Firing,
    /// It no longer does.
    Resolved,
}

/// An alert (active, or a transition in the history).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Alert {
    /// Dedupe key.
    pub key: String,
    /// Rule name.
    pub rule: String,
    /// Subject.
    pub subject: String,
    /// Severity.
    pub severity: Severity,
    /// State.
    pub state: AlertState,
    /// Latest message.
    pub message: String,
    /// Latest value.
    pub value: Option<f64>,
    /// Threshold.
    pub threshold: f64,
    /// When it fired, Unix ms.
    pub fired_ms: i64,
    /// When it resolved, Unix ms.
    pub resolved_ms: Option<i64>,
}

/// The active alerts.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AlertBook {
    /// By key.
    pub active: BTreeMap<String, Alert>,
}

impl AlertBook {
    /// Applies one pass of observations at `now_ms`; returns the transitions (new firing
    /// alerts and resolved ones), which are what gets delivered.
    pub fn apply(&mut self, observations: &[Observation], now_ms: i64) -> Vec<Alert> {
        let mut out = Vec::new();
        let mut seen = std::collections::BTreeSet::new();
        for o in observations {
            seen.insert(o.key.as_str());
            match (o.breached, self.active.get_mut(&o.key)) {
                (true, Some(a)) => {
                    a.value = o.value;
                    a.message.clone_from(&o.message);
                }
                (true, None) => {
                    let a = Alert {
                        key: o.key.clone(),
                        rule: o.rule.clone(),
                        subject: o.subject.clone(),
                        severity: o.severity,
                        state: AlertState::Firing,
                        message: o.message.clone(),
                        value: o.value,
                        threshold: o.threshold,
                        fired_ms: now_ms,
                        resolved_ms: None,
                    };
                    self.active.insert(o.key.clone(), a.clone());
                    out.push(a);
                }
                (false, Some(_)) => {
                    if let Some(mut a) = self.active.remove(&o.key) {
                        a.state = AlertState::Resolved;
                        a.resolved_ms = Some(now_ms);
                        a.value = o.value;
                        a.message = format!("resolved: {}", o.message);
                        out.push(a);
                    }
                }
                (false, None) => {}
            }
        }
        let gone: Vec<String> =
            self.active.keys().filter(|k| !seen.contains(k.as_str())).cloned().collect();
        for k in gone {
            if let Some(mut a) = self.active.remove(&k) {
                a.state = AlertState::Resolved;
                a.resolved_ms = Some(now_ms);
                a.message = format!("resolved: {} (no longer observed)", a.rule);
                out.push(a);
            }
        }
        out
    }
}

/// Judges every rule on every subject it covers.
pub fn observe(rules: &[AlertRule], snapshot: &Snapshot, costs: &CostReport) -> Vec<Observation> {
    let mut out = Vec::new();
    let window_secs =
        snapshot.hosts.iter().map(|h| h.recent.window_secs).max().unwrap_or(300).max(1);
    let mut fleet: BTreeMap<&str, ModelTotals> = BTreeMap::new();
    for h in &snapshot.hosts {
        for (m, t) in &h.recent.models {
            fleet.entry(m.as_str()).or_default().merge(t);
        }
    }
    let last_hour = floor_hour(snapshot.now_ms) - HOUR_MS;
    for r in rules {
        let hosts: Vec<&super::HostSnapshot> = match r.host.as_deref() {
            None => Vec::new(),
            Some("*") => snapshot.hosts.iter().collect(),
            Some(h) => snapshot.hosts.iter().filter(|x| x.host == h).collect(),
        };
        let models: Vec<String> = match r.model.as_deref() {
            None => Vec::new(),
            Some("*") => fleet.keys().map(|m| (*m).to_owned()).collect(),
            Some(m) => vec![m.to_owned()],
        };
        let mut judge =
            |subject: String, value: Option<f64>, threshold: f64, above: bool, what: &str| {
                let breached =
                    value.is_some_and(|v| if above { v > threshold } else { v < threshold });
                let shown = value.map_or_else(|| "no data".to_owned(), |v| format!("{v:.2}"));
                out.push(Observation {
                    key: format!("{}:{subject}", r.name),
                    rule: r.name.clone(),
                    subject: subject.clone(),
                    severity: r.severity,
                    breached,
                    value,
                    threshold,
                    message: format!(
                        "{subject}: {what} {shown} {} {threshold}",
                        if above { "above max" } else { "below min" }
                    ),
                });
            };
        let totals = |model: &str, host: Option<&super::HostSnapshot>| -> ModelTotals {
            match host {
                Some(h) => h.recent.models.get(model).cloned().unwrap_or_default(),
                None => fleet.get(model).cloned().unwrap_or_default(),
            }
        };
        // (subject, model, host) pairs this rule covers.
        let mut pairs: Vec<(String, Option<String>, Option<&super::HostSnapshot>)> = Vec::new();
        match (models.is_empty(), hosts.is_empty()) {
            (false, true) => {
                pairs.extend(models.iter().map(|m| (format!("model {m}"), Some(m.clone()), None)))
            }
            (true, false) => {
                pairs.extend(hosts.iter().map(|h| (format!("host {}", h.host), None, Some(*h))))
            }
            (false, false) => {
                for m in &models {
                    for h in &hosts {
                        pairs.push((format!("model {m} on {}", h.host), Some(m.clone()), Some(*h)));
                    }
                }
            }
            (true, true) => pairs.push(("fleet".to_owned(), None, None)),
        }
        for (subject, model, host) in pairs {
            match r.condition {
                Condition::P95LatencyMs(max) => {
                    let Some(m) = &model else { continue };
                    judge(subject, totals(m, host).latency_ms(0.95), max, true, "p95 latency ms");
                }
                Condition::MinRequestsPerS(min) => {
                    let Some(m) = &model else { continue };
                    let rps = totals(m, host).requests as f64 / window_secs as f64;
                    judge(subject, Some(rps), min, false, "requests/s");
                }
                Condition::MaxGpuUtilPct(max) => {
                    let Some(h) = host else { continue };
                    judge(subject, h.recent.gpu_util_pct, max, true, "GPU utilization %");
                }
                Condition::MaxHourlyCost(max) => {
                    let value = match (&model, host) {
                        (Some(m), _) => costs
                            .ledger
                            .models
                            .get(m)
                            .map(|s| s.get(&last_hour).copied().unwrap_or(0.0)),
                        (None, Some(h)) => costs
                            .hosts
                            .iter()
                            .find(|c| c.host == h.host)
                            .and_then(|c| c.hourly_rate),
                        (None, None) => Some(costs.fleet_hourly_rate),
                    };
                    judge(subject, value, max, true, "hourly cost");
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::analytics::HostSnapshot;
    use crate::analytics::cost::tests::{CATALOG, small_fleet};
    use crate::analytics::cost::{PricingCatalog, attribute};
    use common::histogram::LogHistogram;
    use common::proto::ModelSample;

    fn totals(requests: u64, latencies_us: &[(u64, u64)]) -> ModelTotals {
        let mut h = LogHistogram::new();
        for (v, n) in latencies_us {
            h.record_n(*v, *n);
        }
        let mut t = ModelTotals::default();
        t.add(&ModelSample {
            model: "m".into(),
            requests,
            successes: h.count(),
            latency_us: Some(h.to_proto()),
            ..ModelSample::default()
        })
        .unwrap();
        t
    }

    fn host_with(name: &str, t: ModelTotals, gpu: f64) -> HostSnapshot {
        let mut h = HostSnapshot { host: name.into(), ..HostSnapshot::default() };
        h.recent.window_secs = 100;
        h.recent.gpu_util_pct = Some(gpu);
        h.recent.models.insert("m".into(), t);
        h
    }

    fn rule(name: &str, model: Option<&str>, host: Option<&str>, c: Condition) -> AlertRule {
        AlertRule {
            name: name.into(),
            model: model.map(Into::into),
            host: host.map(Into::into),
            condition: c,
            severity: Severity::Critical,
        }
    }

    #[test]
    fn p95_comes_from_merged_histograms_and_alerts_dedupe() {
        // Host a: 90 requests at 10 ms; host b: 10 at 200 ms. Merged p95 is ~200 ms (the 95th
        // request of 100 is slow); b's alone is 200 and a's 10, and neither their mean (105)
        // nor a's own says what users see.
        let snap = Snapshot {
            now_ms: 0,
            hosts: vec![
                host_with("a", totals(90, &[(10_000, 90)]), 50.0),
                host_with("b", totals(10, &[(200_000, 10)]), 97.0),
            ],
        };
        let costs = attribute(&snap, &PricingCatalog::parse(CATALOG, "t").unwrap(), 0, 1);
        let rules = vec![
            rule("lat", Some("m"), None, Condition::P95LatencyMs(150.0)),
            rule("tput", Some("m"), None, Condition::MinRequestsPerS(2.0)),
            rule("gpu", None, Some("*"), Condition::MaxGpuUtilPct(95.0)),
        ];
        let obs = observe(&rules, &snap, &costs);
        let lat = obs.iter().find(|o| o.key == "lat:model m").unwrap();
        let p95 = lat.value.unwrap();
        assert!((p95 - 200.0).abs() < 200.0 / 32.0, "{p95}");
        assert!(lat.breached);
        // 100 requests / 100 s = 1/s < 2.
        let tput = obs.iter().find(|o| o.key == "tput:model m").unwrap();
        assert_eq!(tput.value, Some(1.0));
        assert!(tput.breached);
        assert!(obs.iter().find(|o| o.key == "gpu:host b").unwrap().breached);
        assert!(!obs.iter().find(|o| o.key == "gpu:host a").unwrap().breached);

        let mut book = AlertBook::default();
        let fired = book.apply(&obs, 10);
        assert_eq!(fired.len(), 3);
        assert!(book.apply(&obs, 20).is_empty(), "still breached: no new alert");
        // b cools down: its GPU alert resolves; the others stay.
        let mut obs2 = obs.clone();
        for o in &mut obs2 {
            if o.key == "gpu:host b" {
                o.breached = false;
            }
        }
        let resolved = book.apply(&obs2, 30);
        assert_eq!(resolved.len(), 1);
        assert_eq!((resolved[0].state, resolved[0].resolved_ms), (AlertState::Resolved, Some(30)));
        assert_eq!(book.active.len(), 2);
        // Rules removed: everything resolves.
        assert_eq!(book.apply(&[], 40).len(), 2);
    }

    #[test]
    fn hourly_cost_rule_on_host_and_fleet() {
        let snap = small_fleet();
        let costs = attribute(&snap, &PricingCatalog::parse(CATALOG, "t").unwrap(), 0, 7_200_000);
        let rules = vec![
            rule("hc", None, Some("a"), Condition::MaxHourlyCost(5.0)),
            rule("fc", None, None, Condition::MaxHourlyCost(20.0)),
            rule("mc", Some("m"), None, Condition::MaxHourlyCost(5.0)),
        ];
        let obs = observe(&rules, &snap, &costs);
        assert!(obs[0].breached && obs[0].value == Some(10.0));
        assert!(!obs[1].breached && obs[1].value == Some(10.6));
        // m in the last complete hour (01:00): 5 + 0.3.
        assert!(obs[2].breached && (obs[2].value.unwrap() - 5.3).abs() < 1e-9);
    }
}
