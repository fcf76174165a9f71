//! The analytics policy file (`[analytics] policy_file` in the aggregator config): forecast and
//! plan settings, budgets, alert rules and the alert webhook. Every key is documented in
//! `docs/analytics.md` and `config/analytics.example.toml`.
//!
//! Parse, don't validate: [`Settings::parse`] refuses unknown keys (serde) and collects every
//! bad value with its dotted key (`budgets[0].amount: must be a positive amount, got -5`) into
//! one [`ConfigError::Invalid`], so `flotilla-aggregator check-config` and startup (exit 64)
//! report them all at once.

use common::config::ConfigError;
use serde::{Deserialize, Serialize};

use super::alerts::{AlertRule, Condition, Severity};
use super::budgets::Budget;
use super::forecast::ForecastSettings;
use super::plans::PlanSettings;

/// The validated policy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Settings {
    /// Forecasts.
    pub forecast: ForecastPolicy,
    /// Plans.
    pub plans: PlanSettings,
    /// Budgets from the file.
    pub budgets: Vec<Budget>,
    /// Alert rules.
    pub alerts: Vec<AlertRule>,
    /// Hours the cost report covers (back from the current hour).
    pub cost_window_hours: usize,
    /// Seconds of raw samples alert rules judge.
    pub alert_window_secs: u64,
    /// Where alert transitions are POSTed as JSON.
    pub webhook_url: Option<String>,
}

/// Forecast settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ForecastPolicy {
    /// The forecaster's settings.
    pub model: ForecastSettings,
    /// |z| above which a residual is an anomaly.
    pub anomaly_z: f64,
    /// Hours of history kept with each forecast (for tables and plots).
    pub history_hours: usize,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            forecast: ForecastPolicy {
                model: ForecastSettings::default(),
                anomaly_z: super::anomaly::DEFAULT_Z,
                history_hours: 14 * 24,
            },
            plans: PlanSettings::default(),
            budgets: Vec::new(),
            alerts: Vec::new(),
            cost_window_hours: 24,
            alert_window_secs: 300,
            webhook_url: None,
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSettings {
    webhook_url: Option<String>,
    cost_window_hours: Option<usize>,
    alert_window_secs: Option<u64>,
    #[serde(default)]
    forecast: RawForecast,
    #[serde(default)]
    plans: Option<PlanSettings>,
    #[serde(default)]
    budgets: Vec<Budget>,
    #[serde(default)]
    alerts: Vec<RawAlert>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawForecast {
    horizon_hours: Option<usize>,
    level: Option<f64>,
    train_weeks: Option<usize>,
    validation_weeks: Option<usize>,
    anomaly_z: Option<f64>,
    history_hours: Option<usize>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAlert {
    name: String,
    model: Option<String>,
    host: Option<String>,
    p95_latency_ms: Option<f64>,
    min_requests_per_s: Option<f64>,
    max_gpu_util_pct: Option<f64>,
    max_hourly_cost: Option<f64>,
    #[serde(default = "warning")]
    severity: Severity,
}

fn warning() -> Severity {
    Severity::Warning
}

// === impl Settings ===

impl Settings {
    /// Reads and checks a policy file.
    pub fn load(path: &std::path::Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.into(), source })?;
        Self::parse(&text, &path.display().to_string())
    }

    /// Parses and checks policy TOML.
    pub fn parse(text: &str, origin: &str) -> Result<Self, ConfigError> {
        let raw: RawSettings = toml::from_str(text)
            .map_err(|e| ConfigError::Parse { origin: origin.into(), message: e.to_string() })?;
        let mut p = Vec::new();
        let d = Self::default();
        let mut range = |key: &str, v: f64, lo: f64, hi: f64| {
            if !(v.is_finite() && (lo..=hi).contains(&v)) {
                p.push(format!("{key}: must be {lo}..={hi}, got {v}"));
            }
            v
        };
        let mut problems_u = Vec::new();
        let mut range_u = |key: &str, v: usize, lo: usize, hi: usize| {
            if !(lo..=hi).contains(&v) {
                problems_u.push(format!("{key}: must be {lo}..={hi}, got {v}"));
            }
            v.clamp(lo, hi)
        };
        let f = &raw.forecast;
        let model = ForecastSettings {
            horizon_hours: range_u(
                "forecast.horizon_hours",
                f.horizon_hours.unwrap_or(168),
                1,
                24 * 60,
            ),
            level: range("forecast.level", f.level.unwrap_or(0.95), 0.5, 0.999),
            train_weeks: range_u("forecast.train_weeks", f.train_weeks.unwrap_or(4), 1, 52),
            validation_weeks: range_u(
                "forecast.validation_weeks",
                f.validation_weeks.unwrap_or(3),
                0,
                12,
            ),
        };
        let forecast = ForecastPolicy {
            model,
            anomaly_z: range("forecast.anomaly_z", f.anomaly_z.unwrap_or(2.0), 0.5, 20.0),
            history_hours: range_u(
                "forecast.history_hours",
                f.history_hours.unwrap_or(336),
                24,
                24 * 400,
            ),
        };
        let plans = raw.plans.unwrap_or_default();
        range("plans.target_util_pct", plans.target_util_pct, 1.0, 100.0);
        range("plans.headroom_pct", plans.headroom_pct, 0.0, 500.0);
        range("plans.percentile", plans.percentile, 1.0, 100.0);
        range_u("plans.lookback_hours", plans.lookback_hours, 1, 24 * 400);
        range("plans.idle_util_pct", plans.idle_util_pct, 0.0, 100.0);
        range("plans.deferrable_fraction", plans.deferrable_fraction, 0.0, 1.0);
        range("plans.min_spot_score", plans.min_spot_score, 0.0, 100.0);
        let cost_window_hours = range_u(
            "cost_window_hours",
            raw.cost_window_hours.unwrap_or(d.cost_window_hours),
            1,
            24 * 31,
        );
        let alert_secs = raw.alert_window_secs.unwrap_or(d.alert_window_secs);
        let alert_window_secs = range_u(
            "alert_window_secs",
            usize::try_from(alert_secs).unwrap_or(usize::MAX),
            10,
            86_400,
        ) as u64;
        p.append(&mut problems_u);
        if let Some(url) = raw
            .webhook_url
            .as_ref()
            .filter(|u| !u.starts_with("http://") && !u.starts_with("https://"))
        {
            p.push(format!("webhook_url: must be an http:// or https:// URL, got {url:?}"));
        }
        for (i, b) in raw.budgets.iter().enumerate() {
            p.extend(b.problems(&format!("budgets[{i}]")));
            if raw.budgets[..i].iter().any(|o| o.name == b.name) {
                p.push(format!("budgets[{i}].name: must be unique, got {:?} twice", b.name));
            }
        }
        let mut alerts = Vec::new();
        for (i, a) in raw.alerts.iter().enumerate() {
            let key = format!("alerts[{i}]");
            let conditions: Vec<Condition> = [
                a.p95_latency_ms.map(Condition::P95LatencyMs),
                a.min_requests_per_s.map(Condition::MinRequestsPerS),
                a.max_gpu_util_pct.map(Condition::MaxGpuUtilPct),
                a.max_hourly_cost.map(Condition::MaxHourlyCost),
            ]
            .into_iter()
            .flatten()
            .collect();
            if conditions.len() != 1 {
                p.push(format!(
                    "{key}: must set exactly one of p95_latency_ms, min_requests_per_s, max_gpu_util_pct, max_hourly_cost, got {}",
                    conditions.len()
                ));
                continue;
            }
            let c = conditions[0];
            let (v, name) = match c {
                Condition::P95LatencyMs(v) => (v, "p95_latency_ms"),
                Condition::MinRequestsPerS(v) => (v, "min_requests_per_s"),
                Condition::MaxGpuUtilPct(v) => (v, "max_gpu_util_pct"),
                Condition::MaxHourlyCost(v) => (v, "max_hourly_cost"),
            };
            if !(v.is_finite() && v >= 0.0) {
                p.push(format!("{key}.{name}: must be a non-negative number, got {v}"));
            }
            let needs_model =
                matches!(c, Condition::P95LatencyMs(_) | Condition::MinRequestsPerS(_));
            if needs_model && a.model.is_none() {
                p.push(format!("{key}.model: {name} needs a model (a name or \"*\"), got none"));
            }
            if matches!(c, Condition::MaxGpuUtilPct(_)) && a.host.is_none() {
                p.push(format!(
                    "{key}.host: max_gpu_util_pct needs a host (an id or \"*\"), got none"
                ));
            }
            if a.name.trim().is_empty() || raw.alerts[..i].iter().any(|o| o.name == a.name) {
                p.push(format!("{key}.name: must be non-empty and unique, got {:?}", a.name));
            }
            alerts.push(AlertRule {
                name: a.name.clone(),
                model: a.model.clone(),
                host: a.host.clone(),
                condition: c,
                severity: a.severity,
            });
        }
        if !p.is_empty() {
            return Err(ConfigError::Invalid { origin: origin.into(), problems: p });
        }
        Ok(Self {
            forecast,
            plans,
            budgets: raw.budgets,
            alerts,
            cost_window_hours,
            alert_window_secs,
            webhook_url: raw.webhook_url,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_policy_parses() {
        let s =
            Settings::parse(include_str!("../../../config/analytics.example.toml"), "ex").unwrap();
        assert!(!s.budgets.is_empty() && !s.alerts.is_empty());
        assert_eq!(Settings::parse("", "empty").unwrap(), Settings::default());
    }

    #[test]
    fn every_bad_value_is_named() {
        let text = r#"
webhook_url = "ftp://x"
[forecast]
level = 2.0
[plans]
target_util_pct = 0
[[budgets]]
name = "b"
amount = -5
period = "day"
scope = "fleet"
thresholds = [{ pct = 0, on = "actual" }]
[[alerts]]
name = "a"
host = "*"
p95_latency_ms = 10
max_gpu_util_pct = 90
[[alerts]]
name = "g"
max_gpu_util_pct = 90
"#;
        let err = Settings::parse(text, "policy.toml").unwrap_err().to_string();
        for needle in [
            "webhook_url: must be an http",
            "forecast.level: must be 0.5..=0.999, got 2",
            "plans.target_util_pct: must be 1..=100, got 0",
            "budgets[0].amount: must be a positive amount, got -5",
            "budgets[0].thresholds[0].pct",
            "alerts[0]: must set exactly one of",
            "alerts[1].host: max_gpu_util_pct needs a host",
        ] {
            assert!(err.contains(needle), "missing {needle:?} in:\n{err}");
        }
        let err = Settings::parse(
            "[[budgets]]\nname = \"x\"\namount = 1\nperiod = \"day\"\nscope = \"team\"\n",
            "p",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("must be fleet, model:NAME or label:KEY=VALUE"), "{err}");
    }
}
