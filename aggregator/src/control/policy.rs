//! Scaling policies: the `[[policy]]` TOML file, its validation, and the validated
//! [`ScalingPolicy`] the decision engine ([`super::engine`]) runs.
//!
//! Invariants:
//! - Unknown keys are refused by name (serde `deny_unknown_fields` on every table).
//! - Every problem is collected, not only the first; each message names the policy, the key
//!   and the bad value, and says what is allowed.
//! - A [`ScalingPolicy`] that came out of [`PolicySet::parse`] or [`ScalingPolicy::validated`]
//!   satisfies every rule checked there, so the engine never re-checks them.
//!
//! Rate limits have one form: `{ instances = N, per_secs = S }`, at most `N` instances added
//! (or removed) within any `S` seconds. See `config/policies.toml` for every key.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::fleet::FleetActuator;

/// The most instances a policy may allow.
pub const MAX_INSTANCES: u32 = 1024;

/// Why a policy file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// The file could not be read.
    #[error("reading policy file {path}")]
    Read {
        /// File.
        path: PathBuf,
        /// OS reason.
        #[source]
        source: std::io::Error,
    },
    /// The text is not TOML of the expected shape (an unknown key, a wrong type). The parser's
    /// message is shown inline (not as a source), so an error chain prints it once.
    #[error("policy file: {0}")]
    Toml(toml::de::Error),
    /// One or more values are out of range; one line per problem.
    #[error("{}", problems.join("\n"))]
    Invalid {
        /// Each problem, naming the policy, key and value.
        problems: Vec<String>,
    },
}

/// How a policy decides.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// From measured metrics only.
    Reactive,
    /// Reactive, raised ahead of forecast demand (never lowered by it).
    Predictive,
}

/// Target values; a metric without a target is not used.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Targets {
    /// 95th percentile queue wait, ms.
    pub queue_p95_ms: Option<f64>,
    /// 95th percentile request latency, ms.
    pub latency_p95_ms: Option<f64>,
    /// Requests/s one instance should carry.
    pub requests_per_instance: Option<f64>,
    /// Mean GPU utilization, %.
    pub gpu_util_pct: Option<f64>,
    /// Mean CPU utilization, %.
    pub cpu_util_pct: Option<f64>,
    /// Mean batch fill (batch size used / max batch), %.
    pub batch_util_pct: Option<f64>,
}

/// At most `instances` added (or removed) within any `per_secs` seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    /// Instances per period.
    pub instances: u32,
    /// Period, seconds.
    pub per_secs: u64,
}

/// Predictive settings (used when `mode = "predictive"`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Predictive {
    /// Record what the forecast would set without acting on it.
    #[serde(default = "default_true")]
    pub forecast_only: bool,
    /// Extra capacity above the forecast, %.
    #[serde(default = "default_buffer_pct")]
    pub buffer_pct: f64,
    /// Model load and warm-up time: how far ahead of demand to act, seconds.
    #[serde(default = "default_lead_secs")]
    pub lead_secs: u64,
    /// Scale the forecast by how far measured demand has lately run above or below it (both
    /// smoothed over 30 minutes, the factor within 1/2..2): a forecast that runs high or low
    /// today then costs nothing and misses nothing; its shape still leads.
    #[serde(default = "default_true")]
    pub correct_bias: bool,
}

impl Default for Predictive {
    fn default() -> Self {
        Self {
            forecast_only: default_true(),
            buffer_pct: default_buffer_pct(),
            lead_secs: default_lead_secs(),
            correct_bias: default_true(),
        }
    }
}

/// What one instance of the model takes from its host, for allocation and placement
/// ([`super::placement`]). A resource left out is not limited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Resources {
    /// GPU memory per instance, MiB (from NVML's totals on the host's side).
    pub gpu_memory_mb: Option<f64>,
    /// CPU cores per instance (fractions allowed).
    pub cpu_cores: Option<f64>,
}

/// The most a policy's `priority` may be.
pub const MAX_PRIORITY: u32 = 1000;

/// Cost-aware settings.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CostSettings {
    /// Price of one instance-hour; absent: the caller supplies it from the price catalog.
    pub price_per_instance_hour: Option<f64>,
    /// Scale in only when the saving per hour reaches this.
    #[serde(default)]
    pub min_savings_per_hour: f64,
}

/// One validated scaling policy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScalingPolicy {
    /// Unique name.
    pub name: String,
    /// Model it scales.
    pub model: String,
    /// Host label selector; empty selects every host.
    #[serde(default)]
    pub hosts: BTreeMap<String, String>,
    /// Reactive or predictive.
    pub mode: Mode,
    /// Fewest instances.
    #[serde(default)]
    pub min_instances: u32,
    /// Most instances.
    pub max_instances: u32,
    /// Metric targets (at least one).
    pub targets: Targets,
    /// Relative deviation from a target that is tolerated without scaling.
    #[serde(default = "default_tolerance")]
    pub tolerance: f64,
    /// Scale down only to the highest recommendation of this many seconds.
    #[serde(default = "default_stabilization")]
    pub stabilization_window_secs: u64,
    /// Scale-up rate limit.
    #[serde(default = "default_up_limit")]
    pub scale_up_limit: RateLimit,
    /// Scale-down rate limit.
    #[serde(default = "default_down_limit")]
    pub scale_down_limit: RateLimit,
    /// Seconds after a scale-up before the next scale-up.
    #[serde(default)]
    pub cooldown_up_secs: u64,
    /// Seconds after any scaling before a scale-down.
    #[serde(default = "default_cooldown_down")]
    pub cooldown_down_secs: u64,
    /// A demand spike over this window scales up at once, bypassing the up cooldown.
    #[serde(default = "default_burst_window")]
    pub burst_window_secs: u64,
    /// Predictive settings.
    #[serde(default)]
    pub predictive: Predictive,
    /// Cost-aware settings.
    #[serde(default)]
    pub cost: CostSettings,
    /// Where models share a host, a higher priority gets its instances first.
    #[serde(default = "default_priority")]
    pub priority: u32,
    /// What one instance takes from its host; absent: not limited by host capacity.
    #[serde(default)]
    pub resources: Resources,
}

fn default_priority() -> u32 {
    100
}

fn default_true() -> bool {
    true
}
fn default_buffer_pct() -> f64 {
    10.0
}
fn default_lead_secs() -> u64 {
    120
}
fn default_tolerance() -> f64 {
    0.10
}
fn default_stabilization() -> u64 {
    300
}
fn default_up_limit() -> RateLimit {
    RateLimit { instances: 4, per_secs: 60 }
}
fn default_down_limit() -> RateLimit {
    RateLimit { instances: 1, per_secs: 60 }
}
fn default_cooldown_down() -> u64 {
    60
}
fn default_burst_window() -> u64 {
    30
}

// === impl ScalingPolicy ===

impl ScalingPolicy {
    /// A reactive policy for `model` with the documented defaults and these bounds and
    /// targets (for callers that build policies in code, like the replay).
    pub fn new(name: &str, model: &str, min: u32, max: u32, targets: Targets) -> Self {
        Self {
            name: name.to_owned(),
            model: model.to_owned(),
            hosts: BTreeMap::new(),
            mode: Mode::Reactive,
            min_instances: min,
            max_instances: max,
            targets,
            tolerance: default_tolerance(),
            stabilization_window_secs: default_stabilization(),
            scale_up_limit: default_up_limit(),
            scale_down_limit: default_down_limit(),
            cooldown_up_secs: 0,
            cooldown_down_secs: default_cooldown_down(),
            burst_window_secs: default_burst_window(),
            predictive: Predictive::default(),
            cost: CostSettings::default(),
            priority: default_priority(),
            resources: Resources::default(),
        }
    }

    /// The policy itself when every rule holds, else every problem found.
    pub fn validated(self) -> Result<Self, PolicyError> {
        let problems = self.problems();
        if problems.is_empty() { Ok(self) } else { Err(PolicyError::Invalid { problems }) }
    }

    /// True when the selector matches these host labels (an empty selector matches all).
    pub fn selects(&self, host_labels: &BTreeMap<String, String>) -> bool {
        self.hosts.iter().all(|(k, v)| host_labels.get(k) == Some(v))
    }

    fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        let name = &self.name;
        let mut bad = |key: &str, value: String, allowed: &str| {
            out.push(format!("policy {name:?}: {key} = {value} {allowed}"));
        };
        if self.name.trim().is_empty() {
            bad("name", format!("{:?}", self.name), "is empty; give each policy a unique name");
        }
        if self.model.trim().is_empty() {
            bad("model", format!("{:?}", self.model), "is empty; name the model to scale");
        }
        for key in self.hosts.keys().filter(|k| k.trim().is_empty()) {
            bad("hosts", format!("{key:?}"), "is an empty label name; use label = \"value\"");
        }
        if self.max_instances < self.min_instances {
            bad(
                "max_instances",
                self.max_instances.to_string(),
                &format!(
                    "is below min_instances = {}; set max_instances >= min_instances",
                    self.min_instances
                ),
            );
        }
        if self.max_instances == 0 || self.max_instances > MAX_INSTANCES {
            bad(
                "max_instances",
                self.max_instances.to_string(),
                &format!("is out of range; allowed 1..={MAX_INSTANCES}"),
            );
        }
        let t = &self.targets;
        let all = [
            ("targets.queue_p95_ms", t.queue_p95_ms, f64::MAX),
            ("targets.latency_p95_ms", t.latency_p95_ms, f64::MAX),
            ("targets.requests_per_instance", t.requests_per_instance, f64::MAX),
            ("targets.gpu_util_pct", t.gpu_util_pct, 100.0),
            ("targets.cpu_util_pct", t.cpu_util_pct, 100.0),
            ("targets.batch_util_pct", t.batch_util_pct, 100.0),
        ];
        if all.iter().all(|(_, v, _)| v.is_none()) {
            bad(
                "targets",
                "{}".to_owned(),
                "has no target; set at least one of queue_p95_ms, latency_p95_ms, \
                 requests_per_instance, gpu_util_pct, cpu_util_pct, batch_util_pct",
            );
        }
        for (key, value, most) in all {
            if let Some(v) = value.filter(|v| !(v.is_finite() && *v > 0.0 && *v <= most)) {
                let allowed = if most == 100.0 {
                    "is out of range; allowed above 0 up to 100".to_owned()
                } else {
                    "is out of range; allowed a finite number above 0".to_owned()
                };
                bad(key, v.to_string(), &allowed);
            }
        }
        if !(0.0..1.0).contains(&self.tolerance) {
            bad("tolerance", self.tolerance.to_string(), "is out of range; allowed 0 to below 1");
        }
        let secs = [
            ("stabilization_window_secs", self.stabilization_window_secs, 0),
            ("cooldown_up_secs", self.cooldown_up_secs, 0),
            ("cooldown_down_secs", self.cooldown_down_secs, 0),
            ("burst_window_secs", self.burst_window_secs, 1),
            ("scale_up_limit.per_secs", self.scale_up_limit.per_secs, 1),
            ("scale_down_limit.per_secs", self.scale_down_limit.per_secs, 1),
            ("predictive.lead_secs", self.predictive.lead_secs, 0),
        ];
        for (key, v, least) in secs {
            if !(least..=86_400).contains(&v) {
                bad(key, v.to_string(), &format!("is out of range; allowed {least}..=86400"));
            }
        }
        for (key, limit) in
            [("scale_up_limit", self.scale_up_limit), ("scale_down_limit", self.scale_down_limit)]
        {
            if !(1..=MAX_INSTANCES).contains(&limit.instances) {
                bad(
                    &format!("{key}.instances"),
                    limit.instances.to_string(),
                    &format!("is out of range; allowed 1..={MAX_INSTANCES}"),
                );
            }
        }
        let p = &self.predictive;
        if !(p.buffer_pct.is_finite() && (0.0..=500.0).contains(&p.buffer_pct)) {
            bad(
                "predictive.buffer_pct",
                p.buffer_pct.to_string(),
                "is out of range; allowed 0..=500",
            );
        }
        if self.mode == Mode::Predictive && t.requests_per_instance.is_none() {
            bad(
                "mode",
                "\"predictive\"".to_owned(),
                "needs targets.requests_per_instance (the forecast is in requests/s); set it or \
                 use mode = \"reactive\"",
            );
        }
        if self.priority > MAX_PRIORITY {
            bad(
                "priority",
                self.priority.to_string(),
                &format!("is out of range; allowed 0..={MAX_PRIORITY}"),
            );
        }
        let r = &self.resources;
        for (key, value) in
            [("resources.gpu_memory_mb", r.gpu_memory_mb), ("resources.cpu_cores", r.cpu_cores)]
        {
            if let Some(v) = value.filter(|v| !(v.is_finite() && *v > 0.0)) {
                bad(key, v.to_string(), "is out of range; allowed a finite number above 0");
            }
        }
        let c = &self.cost;
        if let Some(price) = c.price_per_instance_hour.filter(|p| !(p.is_finite() && *p >= 0.0)) {
            bad(
                "cost.price_per_instance_hour",
                price.to_string(),
                "is out of range; allowed a finite number >= 0",
            );
        }
        if !(c.min_savings_per_hour.is_finite() && c.min_savings_per_hour >= 0.0) {
            bad(
                "cost.min_savings_per_hour",
                c.min_savings_per_hour.to_string(),
                "is out of range; allowed a finite number >= 0",
            );
        }
        out
    }
}

/// The file's top level: `[[policy]]` tables.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    policy: Vec<ScalingPolicy>,
    #[serde(default)]
    fleet: Option<FleetActuator>,
}

/// Every scaling policy of a file, validated, and the fleet-size actuator, if configured.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PolicySet {
    policies: Vec<ScalingPolicy>,
    fleet: Option<FleetActuator>,
}

// === impl PolicySet ===

impl PolicySet {
    /// Parses and validates a policy file's text.
    pub fn parse(text: &str) -> Result<Self, PolicyError> {
        let raw: RawFile = toml::from_str(text).map_err(PolicyError::Toml)?;
        let mut problems = Vec::new();
        let mut seen = HashSet::new();
        for p in &raw.policy {
            if !seen.insert(p.name.as_str()) {
                problems.push(format!(
                    "policy {:?}: name = {:?} is used by an earlier policy; names must be unique",
                    p.name, p.name
                ));
            }
            problems.extend(p.problems());
        }
        if let Some(fleet) = &raw.fleet {
            problems.extend(fleet.problems());
        }
        if problems.is_empty() {
            Ok(Self { policies: raw.policy, fleet: raw.fleet })
        } else {
            Err(PolicyError::Invalid { problems })
        }
    }

    /// Reads and validates a policy file.
    pub fn load(path: &Path) -> Result<Self, PolicyError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| PolicyError::Read { path: path.to_owned(), source })?;
        Self::parse(&text)
    }

    /// All policies, in file order.
    pub fn policies(&self) -> &[ScalingPolicy] {
        &self.policies
    }

    /// The fleet-size actuator (`[fleet]`), if configured.
    pub fn fleet(&self) -> Option<&FleetActuator> {
        self.fleet.as_ref()
    }

    /// The policy named `name`.
    pub fn get(&self, name: &str) -> Option<&ScalingPolicy> {
        self.policies.iter().find(|p| p.name == name)
    }

    /// The policies for `model` whose host selector matches `host_labels`, in file order.
    pub fn for_model<'a>(
        &'a self,
        model: &'a str,
        host_labels: &'a BTreeMap<String, String>,
    ) -> impl Iterator<Item = &'a ScalingPolicy> + 'a {
        self.policies.iter().filter(move |p| p.model == model && p.selects(host_labels))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
        [[policy]]
        name = "ocr-up"
        model = "ocr"
        mode = "reactive"
        min_instances = 1
        max_instances = 8
        [policy.targets]
        requests_per_instance = 20
    "#;

    fn err(text: &str) -> String {
        PolicySet::parse(text).unwrap_err().to_string()
    }

    #[test]
    fn the_example_file_parses_with_every_key() {
        let text = include_str!("../../../config/policies.toml");
        let set = PolicySet::parse(text).unwrap();
        assert!(set.policies().len() >= 2);
        let p = set.get("ocr-predictive").unwrap();
        assert_eq!(p.mode, Mode::Predictive);
        assert!(p.predictive.forecast_only);
        assert_eq!(p.scale_up_limit, RateLimit { instances: 8, per_secs: 60 });
        assert_eq!(p.hosts.get("pool").map(String::as_str), Some("gpu"));
        assert_eq!(p.resources.gpu_memory_mb, Some(1024.0));
        assert!(set.fleet().is_none());
        // The commented [fleet] table, with the command chosen, parses with every key.
        let fleet = text
            .replace("# [fleet]", "[fleet]")
            .replace("# command =", "command =")
            .replace("# timeout_secs", "timeout_secs")
            .replace("# cooldown_secs", "cooldown_secs")
            .replace("# idle_host_secs", "idle_host_secs");
        let set = PolicySet::parse(&fleet).unwrap();
        let f = set.fleet().unwrap();
        assert_eq!((f.timeout_secs, f.cooldown_secs, f.idle_host_secs), (30, 600, 3600));
        let both = fleet.replace("# webhook_url", "webhook_url");
        assert!(err(&both).contains("set exactly one of command"), "{}", err(&both));
    }

    #[test]
    fn defaults_apply() {
        let set = PolicySet::parse(MINIMAL).unwrap();
        let p = &set.policies()[0];
        assert_eq!(p.tolerance, 0.10);
        assert_eq!(p.stabilization_window_secs, 300);
        assert_eq!(p.scale_down_limit, RateLimit { instances: 1, per_secs: 60 });
        assert_eq!((p.cooldown_up_secs, p.cooldown_down_secs, p.burst_window_secs), (0, 60, 30));
        assert!(p.predictive.forecast_only);
        assert_eq!((p.predictive.buffer_pct, p.predictive.lead_secs), (10.0, 120));
        assert_eq!(p.cost.min_savings_per_hour, 0.0);
        assert_eq!((p.priority, p.resources), (100, Resources::default()));
    }

    #[test]
    fn bounds_error_names_policy_key_value_and_fix() {
        let text = MINIMAL
            .replace("min_instances = 1", "min_instances = 3")
            .replace("max_instances = 8", "max_instances = 2");
        let e = err(&text);
        assert!(
            e.contains(
                "policy \"ocr-up\": max_instances = 2 is below min_instances = 3; set \
                 max_instances >= min_instances"
            ),
            "{e}"
        );
        let e = err(&MINIMAL.replace("max_instances = 8", "max_instances = 5000"));
        assert!(e.contains("max_instances = 5000") && e.contains("1..=1024"), "{e}");
    }

    #[test]
    fn unknown_keys_are_refused_by_name() {
        let e =
            err(&MINIMAL.replace("mode = \"reactive\"", "mode = \"reactive\"\nmax_replicas = 3"));
        assert!(e.contains("max_replicas"), "{e}");
        let e = err(&MINIMAL.replace("requests_per_instance = 20", "rps = 20"));
        assert!(e.contains("rps"), "{e}");
        let e = err(&format!("{MINIMAL}\n[policy.predictive]\nlead = 5\n"));
        assert!(e.contains("lead"), "{e}");
    }

    #[test]
    fn every_problem_is_reported() {
        let text = r#"
            [[policy]]
            name = "a"
            model = ""
            mode = "predictive"
            max_instances = 4
            tolerance = 1.5
            priority = 5000
            [policy.targets]
            gpu_util_pct = 150
            [policy.resources]
            gpu_memory_mb = -1
            [policy.scale_up_limit]
            instances = 0
            per_secs = 60
        "#;
        let e = err(text);
        for needle in [
            "policy \"a\": model",
            "tolerance = 1.5",
            "targets.gpu_util_pct = 150",
            "scale_up_limit.instances = 0",
            "needs targets.requests_per_instance",
            "priority = 5000 is out of range; allowed 0..=1000",
            "resources.gpu_memory_mb = -1",
        ] {
            assert!(e.contains(needle), "missing {needle}: {e}");
        }
    }

    #[test]
    fn a_target_is_required_and_names_are_unique() {
        let e = err(&MINIMAL.replace("requests_per_instance = 20", ""));
        assert!(e.contains("targets = {} has no target"), "{e}");
        let e = err(&format!("{MINIMAL}\n{MINIMAL}"));
        assert!(e.contains("names must be unique"), "{e}");
    }

    #[test]
    fn for_model_matches_labels() {
        let text = format!(
            "{MINIMAL}\n{}",
            MINIMAL
                .replace("ocr-up", "ocr-eu")
                .replace("mode = \"reactive\"", "mode = \"reactive\"\nhosts = { region = \"eu\" }")
        );
        let set = PolicySet::parse(&text).unwrap();
        let eu = BTreeMap::from([("region".to_owned(), "eu".to_owned())]);
        let us = BTreeMap::from([("region".to_owned(), "us".to_owned())]);
        let names =
            |labels| set.for_model("ocr", labels).map(|p| p.name.clone()).collect::<Vec<_>>();
        assert_eq!(names(&eu), ["ocr-up", "ocr-eu"]);
        assert_eq!(names(&us), ["ocr-up"]);
        assert_eq!(set.for_model("asr", &eu).count(), 0);
    }
}
