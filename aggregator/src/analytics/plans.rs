//! Cost plans: concrete changes that would spend less, each with its monthly savings (money,
//! and percent of the target's and of the fleet's predicted monthly cost at the current run
//! rate), risk, complexity and time to implement, in priority order.
//!
//! Kinds, per priced host (a host that qualifies for scale-in gets no other plan):
//! - **scale-in**: the `percentile` of hourly utilization over `lookback_hours` is under
//!   `idle_util_pct`: stop the host; saves its whole rate.
//! - **right-size**: `p = percentile` utilization; the work needs
//!   `ceil(units * p * (1 + headroom) / target)` capacity units (GPUs, or 1 on CPU hosts); the
//!   cheapest type of the same family (name before the first `.`) with that many units, cheaper
//!   than now, saves the difference.
//! - **change-type**: the cheapest type of any family that fits the observed *peak* plus
//!   headroom in GPUs, vCPUs and memory, when cheaper than now and than the right-size choice.
//! - **use-spot**: on-demand hosts whose type has a spot price: score
//!   `round(100 * (1 - interruption probability) * tolerance)`, tolerance from the host label
//!   `spot_tolerance` (`high` 1.0, `medium` 0.6 (default: stateless serving behind retries),
//!   `low` 0.2); proposed at `min_spot_score` or more.
//! - **schedule**: for each model named in `deferrable_models` with a forecast: moving
//!   `deferrable_fraction` of its demand out of peak hours into the forecast's lowest hours
//!   lowers the peak from `max` to `max(max * (1 - fraction), mean)`; capacity (and so the
//!   model's cost) shrinks in proportion.
//!
//! Priority: savings weighted by risk (low 1.0, medium 0.75, high 0.5), highest first. Plans on
//! one host are alternatives; their savings do not add up.

use serde::{Deserialize, Serialize};

use super::cost::{
    CostReport, HOURS_PER_MONTH, InstanceType, Lifecycle, PricingCatalog, host_rate,
};
use super::series::HOUR_MS;
use super::{ForecastView, HourStats, Snapshot};

/// What plans aim for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PlanSettings {
    /// Utilization a right-sized host should run at, %.
    pub target_util_pct: f64,
    /// Extra capacity kept above the observed load, %.
    pub headroom_pct: f64,
    /// Percentile of hourly utilization used for right-sizing and scale-in, 0..=100.
    pub percentile: f64,
    /// Hours of history plans look at.
    pub lookback_hours: usize,
    /// Below this utilization (at the percentile) a host is idle, %.
    pub idle_util_pct: f64,
    /// Models whose work can wait for cheaper hours.
    pub deferrable_models: Vec<String>,
    /// Share of a deferrable model's demand that can move, 0..=1.
    pub deferrable_fraction: f64,
    /// Smallest spot score worth proposing, 0..=100.
    pub min_spot_score: f64,
}

impl Default for PlanSettings {
    fn default() -> Self {
        Self {
            target_util_pct: 70.0,
            headroom_pct: 20.0,
            percentile: 95.0,
            lookback_hours: 168,
            idle_util_pct: 5.0,
            deferrable_models: Vec::new(),
            deferrable_fraction: 0.5,
            min_spot_score: 50.0,
        }
    }
}

/// A kind of plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PlanKind {
    /// Stop an idle host.
    ScaleIn,
    /// A smaller size of the same family.
    RightSize,
    /// A different, cheaper type that fits the peak.
    ChangeType,
    /// Run on spot capacity.
    UseSpot,
    /// Move deferrable work to low-demand hours.
    Schedule,
}

/// Low, medium or high.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Level {
    /// Low.
    Low,
    /// Medium.
    Medium,
    /// High.
    High,
}

impl Level {
    fn weight(self) -> f64 {
        match self {
            Self::Low => 1.0,
            Self::Medium => 0.75,
            Self::High => 0.5,
        }
    }
}

/// One proposed change.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    /// Stable id: `kind:target`.
    pub id: String,
    /// Kind.
    pub kind: PlanKind,
    /// Host id or `model:NAME`.
    pub target: String,
    /// What to do, in words.
    pub action: String,
    /// Why, with the numbers.
    pub rationale: String,
    /// Estimated savings per month.
    pub monthly_savings: f64,
    /// Savings as % of the target's predicted monthly cost.
    pub savings_pct: f64,
    /// Savings as % of the fleet's predicted monthly cost.
    pub fleet_savings_pct: f64,
    /// Risk.
    pub risk: Level,
    /// Complexity.
    pub complexity: Level,
    /// Time to implement, in words.
    pub time_to_implement: String,
    /// 1 = do first.
    pub priority: u32,
}

/// The `q`-th percentile (0..=100, nearest rank) of `v`; `None` when empty.
// The rank is a finite value in 0..=len (q is clamped), so the cast cannot truncate.
#[allow(clippy::cast_possible_truncation)]
pub fn percentile(v: &[f64], q: f64) -> Option<f64> {
    let mut s: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if s.is_empty() {
        return None;
    }
    s.sort_by(f64::total_cmp);
    let rank = (q.clamp(0.0, 100.0) / 100.0 * s.len() as f64).ceil() as usize;
    Some(s[rank.clamp(1, s.len()) - 1])
}

/// Proposes plans for the snapshot.
pub fn plans(
    snapshot: &Snapshot,
    catalog: &PricingCatalog,
    costs: &CostReport,
    forecasts: &[ForecastView],
    s: &PlanSettings,
) -> Vec<Plan> {
    let fleet_monthly = costs.fleet_hourly_rate * HOURS_PER_MONTH;
    let mut out = Vec::new();
    let mut push = |kind: PlanKind,
                    target: &str,
                    action: String,
                    rationale: String,
                    savings: f64,
                    target_monthly: f64,
                    (risk, complexity, time): (Level, Level, &str)| {
        let kind_name = serde_json::to_value(kind).ok().and_then(|v| v.as_str().map(str::to_owned));
        out.push(Plan {
            id: format!("{}:{target}", kind_name.unwrap_or_default()),
            kind,
            target: target.to_owned(),
            action,
            rationale,
            monthly_savings: savings,
            savings_pct: pct(savings, target_monthly),
            fleet_savings_pct: pct(savings, fleet_monthly),
            risk,
            complexity,
            time_to_implement: time.to_owned(),
            priority: 0,
        });
    };
    let since = snapshot.now_ms - i64::try_from(s.lookback_hours).unwrap_or(168) * HOUR_MS;
    let headroom = 1.0 + s.headroom_pct / 100.0;
    for h in &snapshot.hosts {
        let (itype, lifecycle, rate) = host_rate(h, catalog);
        let Ok(rate) = rate else { continue };
        let hours: Vec<&HourStats> =
            h.hours.range(since..snapshot.now_ms).map(|(_, v)| v).collect();
        let gpu = h.gpus > 0 || hours.iter().any(|st| st.gpu_util_pct.is_some());
        let mut util: Vec<f64> = hours
            .iter()
            .filter_map(|st| if gpu { st.gpu_util_pct } else { st.cpu_util_pct })
            .collect();
        // A host without a closed hour yet (a fresh fleet) is judged on its recent window,
        // and the rationale says so.
        let over = if util.is_empty() {
            let recent = if gpu { h.recent.gpu_util_pct } else { h.recent.cpu_util_pct };
            util.extend(recent);
            format!("the last {} s (no closed hour yet)", h.recent.window_secs)
        } else {
            format!("{} h", s.lookback_hours)
        };
        let Some(p) = percentile(&util, s.percentile) else { continue };
        let monthly = rate * HOURS_PER_MONTH;
        let name = h.host.as_str();
        if p < s.idle_util_pct {
            push(
                PlanKind::ScaleIn,
                name,
                format!("Drain and stop {name}."),
                format!(
                    "p{} utilization over {over} is {p:.1} % (idle under {} %).",
                    s.percentile, s.idle_util_pct
                ),
                monthly,
                monthly,
                (Level::Low, Level::Low, "1 hour"),
            );
            continue;
        }
        let Some(current) = itype else { continue };
        let cur_name = h.labels.get("instance_type").map_or("", String::as_str);
        let price = |t: &InstanceType| t.hourly(lifecycle);
        // Right-size within the family.
        let units = f64::from(current.units());
        let need_units = (units * p * headroom / s.target_util_pct.max(1.0)).ceil().max(1.0);
        let family = cur_name.split('.').next().unwrap_or(cur_name);
        let right = catalog
            .types
            .iter()
            .filter(|(n, t)| {
                n.split('.').next() == Some(family) && f64::from(t.units()) >= need_units
            })
            .filter(|(n, _)| n.as_str() != cur_name)
            .filter(|(_, t)| (t.gpus > 0) == (current.gpus > 0))
            .filter_map(|(n, t)| price(t).filter(|pr| *pr < rate).map(|pr| (n, pr)))
            .min_by(|a, b| a.1.total_cmp(&b.1));
        if let Some((n, pr)) = right {
            push(
                PlanKind::RightSize,
                name,
                format!("Move {name} from {cur_name} to {n}."),
                format!(
                    "p{} utilization {p:.1} % of {units} unit(s) needs {need_units} at {} % target with {} % headroom.",
                    s.percentile, s.target_util_pct, s.headroom_pct
                ),
                (rate - pr) * HOURS_PER_MONTH,
                monthly,
                (Level::Medium, Level::Medium, "1 day"),
            );
        }
        // Any type that fits the peak.
        let peak = |f: fn(&HourStats) -> Option<f64>| {
            hours.iter().filter_map(|st| f(st)).fold(0.0_f64, f64::max)
        };
        let need_gpus = if current.gpus > 0 {
            (f64::from(current.gpus) * peak(|st| st.gpu_util_max_pct.or(st.gpu_util_pct)) / 100.0
                * headroom)
                .ceil()
                .max(1.0)
        } else {
            0.0
        };
        let need_vcpus =
            (f64::from(current.vcpus) * peak(|st| st.cpu_util_max_pct.or(st.cpu_util_pct)) / 100.0
                * headroom)
                .ceil()
                .max(1.0);
        let need_mem_gib = peak(|st| st.memory_used_max_bytes) / f64::from(1u32 << 30) * headroom;
        let change = catalog
            .types
            .iter()
            .filter(|(n, _)| n.as_str() != cur_name)
            .filter(|(_, t)| {
                f64::from(t.gpus) >= need_gpus
                    && (t.gpus > 0) == (current.gpus > 0)
                    && f64::from(t.vcpus) >= need_vcpus
                    && t.memory_gib >= need_mem_gib
            })
            .filter_map(|(n, t)| price(t).filter(|pr| *pr < rate).map(|pr| (n, pr)))
            .min_by(|a, b| a.1.total_cmp(&b.1));
        if let Some((n, pr)) =
            change.filter(|(n, pr)| right.is_none_or(|(rn, rp)| *pr < rp && rn != *n))
        {
            push(
                PlanKind::ChangeType,
                name,
                format!("Move {name} from {cur_name} to {n}."),
                format!(
                    "Peak needs {need_gpus} GPU(s), {need_vcpus} vCPUs, {need_mem_gib:.1} GiB with {} % headroom; {n} is the cheapest fit.",
                    s.headroom_pct
                ),
                (rate - pr) * HOURS_PER_MONTH,
                monthly,
                (Level::Medium, Level::High, "1 week"),
            );
        }
        // Spot.
        if let (Lifecycle::OnDemand, Some(spot), Some(band)) =
            (lifecycle, current.spot_hourly, current.spot_interruption_band)
        {
            let tolerance = match h.labels.get("spot_tolerance").map(String::as_str) {
                Some("high") => 1.0,
                Some("low") => 0.2,
                _ => 0.6,
            };
            let score = (100.0 * (1.0 - band.probability()) * tolerance).round();
            if score >= s.min_spot_score && spot < rate {
                let risk = match band.probability() {
                    p if p < 0.05 => Level::Low,
                    p if p < 0.15 => Level::Medium,
                    _ => Level::High,
                };
                push(
                    PlanKind::UseSpot,
                    name,
                    format!("Run {name} ({cur_name}) on spot capacity."),
                    format!(
                        "Spot score {score} (interruption {:.1} %/month, tolerance {tolerance}); spot {spot}/h vs {rate}/h.",
                        band.probability() * 100.0
                    ),
                    (rate - spot) * HOURS_PER_MONTH,
                    monthly,
                    (risk, Level::Medium, "2 days"),
                );
            }
        }
    }
    // Scheduling of deferrable work.
    let window_hours = ((costs.window_end_ms - costs.window_start_ms) / HOUR_MS).max(1) as f64;
    for m in &s.deferrable_models {
        let target = format!("model:{m}");
        let Some(f) =
            forecasts.iter().find(|f| f.target == target).and_then(|f| f.forecast.as_ref())
        else {
            continue;
        };
        let Some(cost) = costs.models.iter().find(|c| &c.model == m) else { continue };
        let n = f.point.len();
        let peak = f.point.iter().copied().fold(0.0_f64, f64::max);
        if n == 0 || peak <= 0.0 {
            continue;
        }
        let mean = f.point.iter().sum::<f64>() / n as f64;
        let new_peak = (peak * (1.0 - s.deferrable_fraction.clamp(0.0, 1.0))).max(mean);
        let reduction = (peak - new_peak) / peak;
        let monthly = cost.cost / window_hours * HOURS_PER_MONTH;
        if reduction <= 0.0 || monthly <= 0.0 {
            continue;
        }
        let mut by_hour = [(0.0, 0u32); 24];
        for (k, v) in f.point.iter().enumerate() {
            let k = i64::try_from(k).unwrap_or(0);
            let hod = usize::try_from((f.start_ms / HOUR_MS + k).rem_euclid(24)).unwrap_or(0);
            by_hour[hod].0 += v;
            by_hour[hod].1 += 1;
        }
        let mut hods: Vec<(usize, f64)> = by_hour
            .iter()
            .enumerate()
            .filter(|(_, (_, c))| *c > 0)
            .map(|(h, (s, c))| (h, s / f64::from(*c)))
            .collect();
        hods.sort_by(|a, b| a.1.total_cmp(&b.1));
        let mut low: Vec<usize> = hods.iter().take(6).map(|(h, _)| *h).collect();
        low.sort_unstable();
        let hours_text: Vec<String> = low.iter().map(|h| format!("{h:02}:00")).collect();
        push(
            PlanKind::Schedule,
            &target,
            format!(
                "Run deferrable {m} work in the low-demand hours {} UTC.",
                hours_text.join(", ")
            ),
            format!(
                "Forecast peak {peak:.2} req/s, mean {mean:.2}: moving {:.0} % of demand lowers the peak to {new_peak:.2} ({:.0} % less capacity).",
                s.deferrable_fraction * 100.0,
                reduction * 100.0
            ),
            reduction * monthly,
            monthly,
            (Level::Low, Level::Medium, "1 week"),
        );
    }
    out.sort_by(|a, b| {
        (b.monthly_savings * b.risk.weight())
            .total_cmp(&(a.monthly_savings * a.risk.weight()))
            .then_with(|| a.id.cmp(&b.id))
    });
    for (i, p) in out.iter_mut().enumerate() {
        p.priority = u32::try_from(i + 1).unwrap_or(u32::MAX);
    }
    out
}

fn pct(part: f64, whole: f64) -> f64 {
    if whole > 0.0 { part / whole * 100.0 } else { 0.0 }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::analytics::cost::attribute;
    use crate::analytics::cost::tests::{CATALOG, host, hour};
    use crate::analytics::forecast::Forecast;
    use crate::analytics::seasonality::Seasonality;

    fn catalog() -> PricingCatalog {
        PricingCatalog::parse(CATALOG, "t").unwrap()
    }

    fn plan<'a>(plans: &'a [Plan], id: &str) -> &'a Plan {
        plans.iter().find(|p| p.id == id).unwrap_or_else(|| panic!("no {id} in {plans:#?}"))
    }

    /// a: g.big on-demand (10/h, 4 GPUs) at 20 % (peak 40 %); b: g.small on-demand (2/h) at
    /// 2 %; c: g.small on-demand at 50 %, spot tolerance high.
    fn fleet() -> Snapshot {
        let mut a = host("a", "g.big", "on-demand", 4);
        let mut b = host("b", "g.small", "on-demand", 1);
        let mut c = host("c", "g.small", "on-demand", 1);
        c.labels.insert("spot_tolerance".into(), "high".into());
        for t in 0..10 {
            let mut ha = hour(&[("m", 80.0, 10.0)], 20.0);
            ha.gpu_util_max_pct = Some(40.0);
            a.hours_mut().insert(t * HOUR_MS, ha);
            b.hours_mut().insert(t * HOUR_MS, hour(&[], 2.0));
            c.hours_mut().insert(t * HOUR_MS, hour(&[("m", 50.0, 1.0)], 50.0));
        }
        Snapshot { now_ms: 10 * HOUR_MS, hosts: vec![a, b, c] }
    }

    #[test]
    fn each_host_plan_kind_by_hand() {
        let snap = fleet();
        let costs = attribute(&snap, &catalog(), 0, 10 * HOUR_MS);
        assert_eq!(costs.fleet_hourly_rate, 14.0);
        let plans = plans(&snap, &catalog(), &costs, &[], &PlanSettings::default());
        // b idles at 2 % < 5 %: scale in, the whole 2/h.
        let b = plan(&plans, "scale-in:b");
        assert!((b.monthly_savings - 2.0 * 730.5).abs() < 1e-9);
        assert_eq!(b.savings_pct, 100.0);
        assert!((b.fleet_savings_pct - 2.0 / 14.0 * 100.0).abs() < 1e-9);
        assert!(plans.iter().all(|p| p.target != "b" || p.kind == PlanKind::ScaleIn));
        // a: 4 units * 20 % * 1.2 / 70 % = 1.37 -> 2 GPUs; the g family's cheapest with >= 2
        // units under 10/h is g.mid (4.5/h): saves 5.5/h.
        let a = plan(&plans, "right-size:a");
        assert!(a.action.contains("g.mid"), "{a:?}");
        assert!((a.monthly_savings - 5.5 * 730.5).abs() < 1e-9);
        assert!((a.savings_pct - 55.0).abs() < 1e-9);
        // Peak 40 % of 4 GPUs * 1.2 = 1.92 -> 2 GPUs, 48 vCPUs * 10 % * 1.2 = 5.76 -> 6:
        // g.mid again (same as right-size), so no separate change-type plan.
        assert!(plans.iter().all(|p| p.id != "change-type:a"));
        // a is g.big: 10-15 % band, default tolerance 0.6: 100 * 0.875 * 0.6 = 52.5.
        let sa = plan(&plans, "use-spot:a");
        let score = (100.0_f64 * (1.0 - 0.125) * 0.6).round();
        assert!(sa.rationale.contains(&format!("score {score} ")), "{sa:?}");
        assert!((sa.monthly_savings - 6.0 * 730.5).abs() < 1e-9);
        assert_eq!(sa.risk, Level::Medium);
        // c: < 5 % band, high tolerance: 97.5 -> 98; 2.0 - 0.6 = 1.4/h.
        let sc = plan(&plans, "use-spot:c");
        assert!(sc.rationale.contains("score 98"), "{sc:?}");
        assert_eq!(sc.risk, Level::Low);
        // Priority: risk-weighted savings, highest first: spot a (6 * 0.75 = 4.5/h) > right-size
        // a (5.5 * 0.75 = 4.1/h) > scale-in b (2/h) > spot c (1.4/h).
        assert_eq!(plans[0].id, "use-spot:a");
        assert_eq!(plans[1].id, "right-size:a");
        assert_eq!(
            plans.iter().map(|p| p.priority).collect::<Vec<_>>(),
            (1..=u32::try_from(plans.len()).unwrap()).collect::<Vec<_>>()
        );
    }

    #[test]
    fn change_type_when_another_family_is_cheaper() {
        // A CPU host on g.small? No: a CPU type host c.large would fit; use a CPU-only host on
        // an expensive GPU-less type: make a catalog where "x.cpu" (0.5/h) fits.
        let mut cat = catalog();
        cat.types.insert(
            "x.cpu".into(),
            InstanceType {
                vcpus: 16,
                memory_gib: 32.0,
                gpus: 0,
                gpu_model: String::new(),
                on_demand_hourly: 0.5,
                spot_hourly: None,
                spot_interruption_band: None,
                owned_hourly: None,
            },
        );
        let mut h = host("w", "c.large", "on-demand", 0);
        for t in 0..5 {
            let mut st = hour(&[], 0.0);
            st.gpu_util_pct = None;
            st.gpu_util_max_pct = None;
            st.cpu_util_pct = Some(60.0);
            st.cpu_util_max_pct = Some(70.0);
            h.hours_mut().insert(t * HOUR_MS, st);
        }
        let snap = Snapshot { now_ms: 5 * HOUR_MS, hosts: vec![h] };
        let costs = attribute(&snap, &cat, 0, 5 * HOUR_MS);
        let plans = plans(&snap, &cat, &costs, &[], &PlanSettings::default());
        // 16 vCPUs * 70 % * 1.2 = 13.44 -> 14 vCPUs: x.cpu fits at 0.5/h vs 0.8/h.
        let p = plan(&plans, "change-type:w");
        assert!(p.action.contains("x.cpu"));
        assert!((p.monthly_savings - 0.3 * 730.5).abs() < 1e-9);
    }

    #[test]
    fn scheduling_deferrable_work_by_hand() {
        let snap = fleet();
        let costs = attribute(&snap, &catalog(), 0, 10 * HOUR_MS);
        // Forecast alternating 10 / 30 req/s: peak 30, mean 20; moving half lowers the peak to
        // max(15, 20) = 20, a third less capacity.
        let point: Vec<f64> = (0..48).map(|k| if k % 2 == 0 { 10.0 } else { 30.0 }).collect();
        let fv = ForecastView {
            target: "model:m".into(),
            subject: "m".into(),
            metric: "requests_per_s".into(),
            history_start_ms: 0,
            history: vec![],
            forecast: Some(Forecast {
                start_ms: 10 * HOUR_MS,
                lower: point.clone(),
                upper: point.clone(),
                point,
                level: 0.95,
                seasonality: Seasonality {
                    daily: false,
                    weekly: false,
                    acf_12: 0.0,
                    acf_24: 0.0,
                    acf_168: 0.0,
                },
                method: "t".into(),
                train_start_ms: 0,
                fitted: vec![],
                selection: None,
            }),
            error: None,
            anomalies: vec![],
        };
        let s = PlanSettings { deferrable_models: vec!["m".into()], ..PlanSettings::default() };
        let plans = plans(&snap, &catalog(), &costs, &[fv], &s);
        let p = plan(&plans, "schedule:model:m");
        // m's cost: a 80 % of 4 GPUs -> 0.2 * 10 = 2/h, c 50 % -> 1/h: 3/h over 10 h.
        let monthly = 3.0 * 730.5;
        assert!((p.monthly_savings - monthly / 3.0).abs() < 1e-6, "{p:?}");
        assert!((p.savings_pct - 100.0 / 3.0).abs() < 1e-6);
        // The 10 req/s hours are the even ones from hour 10: 10, 12, ..., i.e. even hours.
        assert!(p.action.contains("00:00, 02:00, 04:00, 06:00, 08:00, 10:00"), "{}", p.action);
    }

    #[test]
    fn percentile_nearest_rank() {
        let v: Vec<f64> = (1..=20).map(f64::from).collect();
        assert_eq!(percentile(&v, 95.0), Some(19.0));
        assert_eq!(percentile(&v, 100.0), Some(20.0));
        assert_eq!(percentile(&[], 50.0), None);
    }
}
