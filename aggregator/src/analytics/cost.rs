//! Cost attribution: what each host costs per hour (from the pricing catalog and its declared
//! instance type and lifecycle), how that splits over the models it serves (by their measured
//! share of the host's accelerators), what is idle, and the cost per 1,000 inferences.
//!
//! Rules (documented in `docs/analytics.md`):
//! - A host costs its hourly rate for every hour in which it reported (an hourly rollup exists).
//! - The rate: label `hourly_cost_usd` if set (any lifecycle), else the catalog price of label
//!   `instance_type` for label `lifecycle` (`on-demand` default, `spot`, `owned`: amortized
//!   purchase plus hosting). A host without a price is listed as unpriced, never costed at 0.
//! - A model's share of a host-hour is `busy_pct / 100 / units`, where `units` is the host's
//!   GPU count (or 1 on a CPU-only host): one fully busy model instance occupies one GPU. When
//!   shares add up to more than 1 they are scaled down to 1. The rest is idle cost.
//! - Inferences in a host-hour are `inferences_per_s (hourly mean) * 3600`.

use std::collections::BTreeMap;

use common::config::ConfigError;
use serde::{Deserialize, Serialize};

use super::{HostSnapshot, Snapshot};

/// The built-in catalog: `config/pricing.toml` of this repository.
pub const BUILTIN_CATALOG: &str = include_str!("../../../config/pricing.toml");

/// Hours in an average month (365.25 * 24 / 12), for monthly figures.
pub const HOURS_PER_MONTH: f64 = 730.5;

/// How a host is paid for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Lifecycle {
    /// On-demand cloud instance.
    OnDemand,
    /// Spot (preemptible) cloud instance.
    Spot,
    /// Owned hardware, amortized.
    Owned,
}

impl Lifecycle {
    /// From the host label value; unknown values are `None`.
    pub fn from_label(v: &str) -> Option<Self> {
        match v {
            "on-demand" | "ondemand" | "on_demand" => Some(Self::OnDemand),
            "spot" => Some(Self::Spot),
            "owned" => Some(Self::Owned),
            _ => None,
        }
    }

    /// The label spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::OnDemand => "on-demand",
            Self::Spot => "spot",
            Self::Owned => "owned",
        }
    }
}

/// A spot interruption-frequency band, as the AWS Spot Instance Advisor publishes them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum InterruptionBand {
    /// Under 5 % of instances interrupted per month.
    #[serde(rename = "<5%")]
    Under5,
    /// 5 to 10 %.
    #[serde(rename = "5-10%")]
    From5To10,
    /// 10 to 15 %.
    #[serde(rename = "10-15%")]
    From10To15,
    /// 15 to 20 %.
    #[serde(rename = "15-20%")]
    From15To20,
    /// Over 20 %.
    #[serde(rename = ">20%")]
    Over20,
}

impl InterruptionBand {
    /// Mid-band interruption probability per month (25 % for the open top band).
    pub fn probability(self) -> f64 {
        match self {
            Self::Under5 => 0.025,
            Self::From5To10 => 0.075,
            Self::From10To15 => 0.125,
            Self::From15To20 => 0.175,
            Self::Over20 => 0.25,
        }
    }
}

/// One instance type of the catalog.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstanceType {
    /// vCPUs.
    pub vcpus: u32,
    /// Memory, GiB.
    pub memory_gib: f64,
    /// GPUs (0 for CPU-only types).
    #[serde(default)]
    pub gpus: u32,
    /// GPU model, e.g. `H100 80GB`.
    #[serde(default)]
    pub gpu_model: String,
    /// On-demand price per hour.
    pub on_demand_hourly: f64,
    /// Typical spot price per hour, if offered.
    #[serde(default)]
    pub spot_hourly: Option<f64>,
    /// Spot interruption band, if known.
    #[serde(default)]
    pub spot_interruption_band: Option<InterruptionBand>,
    /// Amortized hourly cost of owning one (purchase over its life plus power and hosting).
    #[serde(default)]
    pub owned_hourly: Option<f64>,
}

impl InstanceType {
    /// The hourly price for `lifecycle`, if the catalog has one.
    pub fn hourly(&self, lifecycle: Lifecycle) -> Option<f64> {
        match lifecycle {
            Lifecycle::OnDemand => Some(self.on_demand_hourly),
            Lifecycle::Spot => self.spot_hourly,
            Lifecycle::Owned => self.owned_hourly,
        }
    }

    /// Capacity units: GPUs, or 1 for a CPU-only type.
    pub fn units(&self) -> u32 {
        self.gpus.max(1)
    }
}

/// The pricing catalog.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PricingCatalog {
    /// Currency of every price, e.g. `USD`.
    #[serde(default = "usd")]
    pub currency: String,
    /// Instance types by name.
    pub types: BTreeMap<String, InstanceType>,
}

fn usd() -> String {
    "USD".into()
}

// === impl PricingCatalog ===

impl PricingCatalog {
    /// Parses and checks a catalog; every bad price is named by its dotted key.
    pub fn parse(text: &str, origin: &str) -> Result<Self, ConfigError> {
        let catalog: Self = toml::from_str(text)
            .map_err(|e| ConfigError::Parse { origin: origin.into(), message: e.to_string() })?;
        let mut problems = Vec::new();
        let mut price = |key: String, v: Option<f64>| {
            if let Some(v) = v.filter(|v| !(v.is_finite() && *v >= 0.0 && *v < 1e6)) {
                problems.push(format!("{key}: must be a price 0..1000000, got {v}"));
            }
        };
        for (name, t) in &catalog.types {
            price(format!("types.\"{name}\".on_demand_hourly"), Some(t.on_demand_hourly));
            price(format!("types.\"{name}\".spot_hourly"), t.spot_hourly);
            price(format!("types.\"{name}\".owned_hourly"), t.owned_hourly);
        }
        for (name, t) in &catalog.types {
            if t.vcpus == 0 {
                problems.push(format!("types.\"{name}\".vcpus: must be at least 1, got 0"));
            }
        }
        if catalog.types.is_empty() {
            problems.push("types: must list at least one instance type, got none".into());
        }
        if problems.is_empty() {
            Ok(catalog)
        } else {
            Err(ConfigError::Invalid { origin: origin.into(), problems })
        }
    }

    /// The built-in catalog.
    pub fn builtin() -> Result<Self, ConfigError> {
        Self::parse(BUILTIN_CATALOG, "<built-in pricing.toml>")
    }
}

/// What one host costs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HostCost {
    /// Host id.
    pub host: String,
    /// Declared instance type.
    pub instance_type: Option<String>,
    /// Declared lifecycle.
    pub lifecycle: String,
    /// Price per hour, when known.
    pub hourly_rate: Option<f64>,
    /// Hours with data in the window.
    pub hours: u32,
    /// Cost over the window.
    pub cost: f64,
    /// Part of it no model used.
    pub idle_cost: f64,
    /// Why it has no price, when it has none.
    pub note: Option<String>,
}

/// What one model costs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelCost {
    /// Model name.
    pub model: String,
    /// Attributed cost over the window.
    pub cost: f64,
    /// Inferences over the window.
    pub inferences: f64,
    /// Cost per 1,000 inferences, when there were any.
    pub cost_per_1k_inferences: Option<f64>,
    /// Hosts that served it.
    pub hosts: Vec<String>,
}

/// Hourly costs: the input of budgets.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Ledger {
    /// Host -> hour start -> cost.
    pub hosts: BTreeMap<String, BTreeMap<i64, f64>>,
    /// Model -> hour start -> attributed cost.
    pub models: BTreeMap<String, BTreeMap<i64, f64>>,
}

impl Ledger {
    /// Sum of one series' costs in `[from, to)`.
    pub fn sum(series: &BTreeMap<i64, f64>, from: i64, to: i64) -> f64 {
        series.range(from..to).map(|(_, c)| c).sum()
    }
}

/// The cost report of a window.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CostReport {
    /// Currency.
    pub currency: String,
    /// Window start, Unix ms.
    pub window_start_ms: i64,
    /// Window end, Unix ms.
    pub window_end_ms: i64,
    /// Everything the fleet cost in the window.
    pub total_cost: f64,
    /// Of which idle.
    pub idle_cost: f64,
    /// Sum of the hourly rates of priced hosts: the fleet's cost per hour now.
    pub fleet_hourly_rate: f64,
    /// Per host, most expensive first.
    pub hosts: Vec<HostCost>,
    /// Per model, most expensive first.
    pub models: Vec<ModelCost>,
    /// Hourly ledger (not serialized: budgets read it in-process).
    #[serde(skip)]
    pub ledger: Ledger,
}

/// A host's hourly rate and instance type, or why there is none.
pub fn host_rate<'a>(
    host: &HostSnapshot,
    catalog: &'a PricingCatalog,
) -> (Option<&'a InstanceType>, Lifecycle, Result<f64, String>) {
    let lifecycle_label = host.labels.get("lifecycle").map_or("on-demand", String::as_str);
    let lifecycle = Lifecycle::from_label(lifecycle_label).unwrap_or(Lifecycle::OnDemand);
    let itype = host.labels.get("instance_type").and_then(|t| catalog.types.get(t));
    if let Some(v) = host.labels.get("hourly_cost_usd") {
        return match v.parse::<f64>() {
            Ok(v) if v.is_finite() && v >= 0.0 => (itype, lifecycle, Ok(v)),
            _ => (itype, lifecycle, Err(format!("label hourly_cost_usd {v:?} is not a price"))),
        };
    }
    if Lifecycle::from_label(lifecycle_label).is_none() {
        return (itype, lifecycle, Err(format!("unknown lifecycle {lifecycle_label:?}")));
    }
    let rate = match (host.labels.get("instance_type"), itype) {
        (None, _) => Err("no instance_type label".to_owned()),
        (Some(t), None) => Err(format!("instance type {t:?} is not in the pricing catalog")),
        (Some(t), Some(it)) => it
            .hourly(lifecycle)
            .ok_or_else(|| format!("the catalog has no {} price for {t}", lifecycle.as_str())),
    };
    (itype, lifecycle, rate)
}

/// Attributes costs for every hour of the snapshot; the report sums `[from_ms, to_ms)`.
pub fn attribute(
    snapshot: &Snapshot,
    catalog: &PricingCatalog,
    from_ms: i64,
    to_ms: i64,
) -> CostReport {
    let mut ledger = Ledger::default();
    let mut hosts = Vec::new();
    let mut models: BTreeMap<String, ModelCost> = BTreeMap::new();
    let mut fleet_hourly_rate = 0.0;
    for h in &snapshot.hosts {
        let (itype, lifecycle, rate) = host_rate(h, catalog);
        let units = f64::from(itype.map_or(h.gpus.max(1), InstanceType::units));
        let mut row = HostCost {
            host: h.host.clone(),
            instance_type: h.labels.get("instance_type").cloned(),
            lifecycle: lifecycle.as_str().to_owned(),
            hourly_rate: rate.as_ref().ok().copied(),
            hours: 0,
            cost: 0.0,
            idle_cost: 0.0,
            note: rate.as_ref().err().cloned(),
        };
        let Ok(rate) = rate else {
            hosts.push(row);
            continue;
        };
        fleet_hourly_rate += rate;
        let host_ledger = ledger.hosts.entry(h.host.clone()).or_default();
        for (&hour, stats) in h.hours.iter() {
            host_ledger.insert(hour, rate);
            let mut shares: Vec<(&String, f64, f64)> = stats
                .models
                .iter()
                .map(|(m, mh)| {
                    (m, (mh.busy_pct / 100.0 / units).max(0.0), mh.inferences_per_s * 3600.0)
                })
                .collect();
            let total: f64 = shares.iter().map(|s| s.1).sum();
            if total > 1.0 {
                for s in &mut shares {
                    s.1 /= total;
                }
            }
            let used: f64 = shares.iter().map(|s| s.1).sum();
            let in_window = (from_ms..to_ms).contains(&hour);
            for (m, share, inferences) in shares {
                let model_ledger = match ledger.models.get_mut(m) {
                    Some(l) => l,
                    None => ledger.models.entry(m.clone()).or_default(),
                };
                *model_ledger.entry(hour).or_default() += share * rate;
                if in_window {
                    let mc = models.entry(m.clone()).or_insert_with(|| ModelCost {
                        model: m.clone(),
                        cost: 0.0,
                        inferences: 0.0,
                        cost_per_1k_inferences: None,
                        hosts: Vec::new(),
                    });
                    mc.cost += share * rate;
                    mc.inferences += inferences.max(0.0);
                    if !mc.hosts.contains(&h.host) {
                        mc.hosts.push(h.host.clone());
                    }
                }
            }
            if in_window {
                row.hours += 1;
                row.cost += rate;
                row.idle_cost += (1.0 - used) * rate;
            }
        }
        hosts.push(row);
    }
    let mut models: Vec<ModelCost> = models
        .into_values()
        .map(|mut m| {
            m.cost_per_1k_inferences =
                (m.inferences > 0.0).then(|| m.cost / (m.inferences / 1000.0));
            m
        })
        .collect();
    models.sort_by(|a, b| b.cost.total_cmp(&a.cost));
    hosts.sort_by(|a, b| b.cost.total_cmp(&a.cost).then_with(|| a.host.cmp(&b.host)));
    CostReport {
        currency: catalog.currency.clone(),
        window_start_ms: from_ms,
        window_end_ms: to_ms,
        total_cost: hosts.iter().map(|h| h.cost).sum(),
        idle_cost: hosts.iter().map(|h| h.idle_cost).sum(),
        fleet_hourly_rate,
        hosts,
        models,
        ledger,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::analytics::{HourStats, ModelHour};

    /// A two-type catalog with round prices.
    pub(crate) const CATALOG: &str = r#"
currency = "USD"
[types."g.small"]
vcpus = 8
memory_gib = 32
gpus = 1
on_demand_hourly = 2.0
spot_hourly = 0.6
spot_interruption_band = "<5%"
[types."g.big"]
vcpus = 48
memory_gib = 192
gpus = 4
on_demand_hourly = 10.0
spot_hourly = 4.0
spot_interruption_band = "10-15%"
owned_hourly = 3.0
[types."g.mid"]
vcpus = 16
memory_gib = 64
gpus = 2
on_demand_hourly = 4.5
[types."c.large"]
vcpus = 16
memory_gib = 32
on_demand_hourly = 0.8
"#;

    pub(crate) fn host(name: &str, itype: &str, lifecycle: &str, gpus: u32) -> HostSnapshot {
        HostSnapshot {
            host: name.into(),
            labels: [("instance_type", itype), ("lifecycle", lifecycle)]
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect(),
            gpus,
            ..HostSnapshot::default()
        }
    }

    pub(crate) fn hour(busy: &[(&str, f64, f64)], gpu_util: f64) -> HourStats {
        HourStats {
            cpu_util_pct: Some(10.0),
            gpu_util_pct: Some(gpu_util),
            gpu_util_max_pct: Some(gpu_util),
            cpu_util_max_pct: Some(10.0),
            models: busy
                .iter()
                .map(|(m, b, ips)| {
                    (
                        m.to_string(),
                        ModelHour { busy_pct: *b, inferences_per_s: *ips, requests_per_s: *ips },
                    )
                })
                .collect(),
            ..HourStats::default()
        }
    }

    /// Host a: g.big on-demand (10/h, 4 GPUs), two hours, model m 200 % busy (2 GPUs) at
    /// 10 inferences/s. Host b: g.small spot (0.6/h, 1 GPU), two hours, m 50 % busy at 5/s.
    pub(crate) fn small_fleet() -> Snapshot {
        let mut a = host("a", "g.big", "on-demand", 4);
        let mut b = host("b", "g.small", "spot", 1);
        for t in [0, 1] {
            a.hours_mut().insert(t * 3_600_000, hour(&[("m", 200.0, 10.0)], 50.0));
            b.hours_mut().insert(t * 3_600_000, hour(&[("m", 50.0, 5.0)], 50.0));
        }
        Snapshot { now_ms: 2 * 3_600_000, hosts: vec![a, b] }
    }

    #[test]
    fn cost_per_host_model_idle_and_per_1k_by_hand() {
        let catalog = PricingCatalog::parse(CATALOG, "t").unwrap();
        let r = attribute(&small_fleet(), &catalog, 0, 2 * 3_600_000);
        // a: 2 h * 10 = 20, half of it used by m; b: 2 h * 0.6 = 1.2, half used.
        assert_eq!(r.total_cost, 21.2);
        assert!((r.idle_cost - 10.6).abs() < 1e-9);
        assert_eq!(r.fleet_hourly_rate, 10.6);
        assert_eq!(r.hosts[0].host, "a");
        assert_eq!((r.hosts[0].hours, r.hosts[0].cost), (2, 20.0));
        let m = &r.models[0];
        assert!((m.cost - 10.6).abs() < 1e-9);
        // 2 h * (10 + 5) /s * 3600 = 108,000 inferences -> 10.6 / 108 per thousand.
        assert_eq!(m.inferences, 108_000.0);
        assert!((m.cost_per_1k_inferences.unwrap() - 10.6 / 108.0).abs() < 1e-12);
        assert_eq!(m.hosts, vec!["a", "b"]);
        assert_eq!(r.ledger.models["m"][&0], 5.0 + 0.3);
    }

    #[test]
    fn unpriced_hosts_are_named_and_overbooked_shares_scaled() {
        let catalog = PricingCatalog::parse(CATALOG, "t").unwrap();
        let mut x = host("x", "nope.big", "on-demand", 1);
        x.hours_mut().insert(0, hour(&[], 0.0));
        let mut y = host("y", "g.small", "on-demand", 1);
        y.hours_mut().insert(0, hour(&[("p", 150.0, 1.0), ("q", 50.0, 1.0)], 90.0));
        let mut z = host("z", "g.small", "owned", 1);
        z.labels.insert("hourly_cost_usd".into(), "1.25".into());
        z.hours_mut().insert(0, hour(&[], 0.0));
        let r = attribute(&Snapshot { now_ms: 0, hosts: vec![x, y, z] }, &catalog, 0, 3_600_000);
        let x = r.hosts.iter().find(|h| h.host == "x").unwrap();
        assert!(x.note.as_deref().unwrap().contains("not in the pricing catalog"));
        assert_eq!(x.cost, 0.0);
        let p = r.models.iter().find(|m| m.model == "p").unwrap();
        assert!((p.cost - 1.5).abs() < 1e-9, "150 of 200 busy -> 3/4 of 2.0");
        assert_eq!(r.hosts.iter().find(|h| h.host == "z").unwrap().cost, 1.25);
    }

    #[test]
    fn bad_catalog_values_are_named() {
        let err = PricingCatalog::parse(
            "[types.\"a\"]\nvcpus = 0\nmemory_gib = 1\non_demand_hourly = -1\n",
            "p.toml",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("types.\"a\".on_demand_hourly: must be a price"), "{err}");
        assert!(err.contains("types.\"a\".vcpus"), "{err}");
        assert!(PricingCatalog::builtin().is_ok());
    }
}
