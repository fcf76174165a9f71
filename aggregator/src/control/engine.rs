//! The scaling decision engine: one [`Scaler`] per policy turns an [`Observation`] (and, for a
//! predictive policy, a [`ForecastInput`]) into a [`Decision`]. Pure: no I/O and no clock; time
//! is the observation's `at_ms`, and everything remembered between calls is in [`ScalerState`],
//! which the caller may persist.
//!
//! One evaluation, in order (the first rule that changes or holds the count names the decision):
//! 1. Per target metric a recommendation: `ratio = measured / target`; within `tolerance` of 1
//!    it keeps `current`, else `ceil(current * ratio)` (requests/s: `ceil(demand / target)`).
//!    From 0 instances with demand, enough for the demand (or 1). The highest one wins
//!    (`reactive.*`).
//! 2. Predictive: `max(reactive, ceil(ahead * (1 + buffer) / requests_per_instance))`, so a
//!    forecast only ever raises (`predictive.ahead`); `ahead` is the forecast at the lead times
//!    how far measured demand has lately run above or below the forecast (both smoothed over
//!    [`BIAS_TIME_CONSTANT_MS`]; `correct_bias`, the default), or the forecast itself; a
//!    forecast within `tolerance` of the current capacity recommends `current`. Forecast-only policies record it in
//!    `would_have` and go on with the reactive value.
//! 3. Scale-down is stabilized: never below the highest recommendation of the last
//!    `stabilization_window_secs` (`stabilization.hold`).
//! 4. Cooldowns: a scale-up waits `cooldown_up_secs` after the last scale-up unless demand is
//!    bursting (`cooldown.up`, `burst.bypass`); a scale-down waits `cooldown_down_secs` after any
//!    scaling (`cooldown.down`).
//! 5. Rate limits over a sliding period, counting what was already added or removed in it
//!    (`rate_limit.up`, `rate_limit.down`).
//! 6. Bounds `[min_instances, max_instances]` (`bounds.min`, `bounds.max`), applied at once.
//! 7. Budget: never grow above `max_instances_by_budget` (`budget.cap`, `budget_capped`); a
//!    fleet already above it is not shrunk by the budget, the caller alerts instead.
//! 8. Savings: scale in only when `(current - desired) * price >= min_savings_per_hour`, when a
//!    price is known (`cost.savings_too_small`).

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

use super::policy::{Mode, ScalingPolicy};

/// Demand over the last burst window above this multiple of the window before is a burst.
pub const BURST_RATIO: f64 = 1.5;

/// What the telemetry shows for the policy's model at one moment.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Observation {
    /// When, Unix ms (or any monotonic ms base).
    pub at_ms: i64,
    /// Instances that exist (loading or ready).
    pub current_instances: u32,
    /// Instances ready to serve.
    pub ready_instances: u32,
    /// Demand, requests/s.
    pub demand_rps: f64,
    /// 95th percentile queue wait, ms.
    pub queue_p95_ms: Option<f64>,
    /// 95th percentile latency, ms.
    pub latency_p95_ms: Option<f64>,
    /// Mean GPU utilization, %.
    pub gpu_util_pct: Option<f64>,
    /// Mean CPU utilization, %.
    pub cpu_util_pct: Option<f64>,
    /// Mean batch fill, %.
    pub batch_util_pct: Option<f64>,
}

/// The demand forecast a predictive policy uses.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ForecastInput {
    /// Forecast demand (requests/s) for the coming interval, already looked `lead_secs` ahead
    /// by the caller.
    pub rps_ahead: f64,
    /// The forecast for now, requests/s (for `correct_bias`); `None`: not known.
    #[serde(default)]
    pub rps_now: Option<f64>,
    /// The forecaster's recent backtest error (e.g. MASE or MAPE), shown beside the decision.
    pub backtest_error: Option<f64>,
}

/// Cost-aware limits from the caller.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Limits {
    /// The most instances the remaining budget pays for.
    pub max_instances_by_budget: Option<u32>,
    /// Price of one instance-hour from the price catalog (the policy's own price wins).
    pub price_per_instance_hour: Option<f64>,
}

/// One metric's recommendation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MetricRecommendation {
    /// Target key, e.g. `gpu_util_pct`.
    pub metric: String,
    /// Measured value.
    pub measured: f64,
    /// Target value.
    pub target: f64,
    /// `measured / target` (per instance for requests/s).
    pub ratio: f64,
    /// Instances this metric asks for.
    pub recommended: u32,
}

/// Everything a decision was made from, for the record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DecisionInputs {
    /// The observation.
    pub observation: Observation,
    /// Per-metric recommendations (metrics without data are absent).
    pub metrics: Vec<MetricRecommendation>,
    /// The highest metric recommendation (`current` when no metric had data).
    pub reactive: u32,
    /// The forecast's instance count, before bounds (predictive policies with a forecast).
    pub predictive: Option<u32>,
    /// The forecast used.
    pub forecast: Option<ForecastInput>,
    /// The limits used.
    pub limits: Limits,
    /// The highest recommendation in the stabilization window, when scaling down.
    pub stabilized: Option<u32>,
    /// Whether demand was bursting.
    pub burst: bool,
}

/// What to do now, and why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Decision {
    /// When, as the observation's `at_ms`.
    pub at_ms: i64,
    /// Policy name.
    pub policy: String,
    /// Model.
    pub model: String,
    /// Instances now.
    pub current: u32,
    /// Instances to set now (`== current` when nothing changes).
    pub desired: u32,
    /// Whether to act: `desired != current`. A forecast-only policy never acts on the forecast.
    pub act: bool,
    /// Forecast-only: what the predictive policy would have set.
    pub would_have: Option<u32>,
    /// Machine-stable name of the rule that decided, e.g. `reactive.scale_up`.
    pub rule: String,
    /// A sentence with the numbers.
    pub reason: String,
    /// What the decision was made from.
    pub inputs: DecisionInputs,
    /// The budget held the count below what the policy wanted: raise an alert.
    pub budget_capped: bool,
}

/// What a [`Scaler`] remembers between evaluations; bounded by the policy's windows.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ScalerState {
    /// `(at_ms, recommendation)` within the stabilization window.
    pub recommendations: VecDeque<(i64, u32)>,
    /// `(at_ms, demand_rps)` within two burst windows.
    pub demand: VecDeque<(i64, f64)>,
    /// `(at_ms, change in instances)` of each scaling within the longer rate-limit period.
    pub changes: VecDeque<(i64, i64)>,
    /// Last scale-up, ms.
    pub last_up_ms: Option<i64>,
    /// Last scaling in either direction, ms.
    pub last_change_ms: Option<i64>,
    /// Smoothed measured demand and forecast-for-now, for `correct_bias`.
    #[serde(default)]
    pub bias: Option<BiasTrack>,
}

/// Exponentially smoothed measured demand and the forecast for the same moments: their ratio
/// is how far the forecast runs high or low lately.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct BiasTrack {
    /// Last update, ms.
    pub at_ms: i64,
    /// Smoothed demand, requests/s.
    pub demand_rps: f64,
    /// Smoothed forecast for now, requests/s.
    pub forecast_rps: f64,
}

/// Time constant of the bias smoothing: long enough to average out minute noise, short enough
/// to follow a forecast that is off today.
pub const BIAS_TIME_CONSTANT_MS: f64 = 30.0 * 60_000.0;

/// The correction never scales the forecast by more than this factor, or less than its inverse.
pub const MAX_BIAS_RATIO: f64 = 2.0;

impl BiasTrack {
    fn update(slot: &mut Option<Self>, at_ms: i64, demand: f64, forecast: f64) {
        if !(demand.is_finite() && forecast.is_finite()) {
            return;
        }
        let Some(b) = slot else {
            *slot = Some(Self { at_ms, demand_rps: demand, forecast_rps: forecast });
            return;
        };
        let dt = (at_ms - b.at_ms).max(0) as f64;
        let alpha = 1.0 - (-dt / BIAS_TIME_CONSTANT_MS).exp();
        b.demand_rps += alpha * (demand - b.demand_rps);
        b.forecast_rps += alpha * (forecast - b.forecast_rps);
        b.at_ms = at_ms;
    }

    /// Measured over forecast, within `[1 / MAX_BIAS_RATIO, MAX_BIAS_RATIO]`; `None` while the
    /// forecast is 0.
    fn ratio(&self) -> Option<f64> {
        (self.forecast_rps > 1e-9).then(|| {
            (self.demand_rps / self.forecast_rps).clamp(1.0 / MAX_BIAS_RATIO, MAX_BIAS_RATIO)
        })
    }
}

/// A policy and its state.
#[derive(Debug, Clone)]
pub struct Scaler {
    policy: ScalingPolicy,
    state: ScalerState,
}

/// The rule that decides, and its sentence.
struct Verdict {
    rule: &'static str,
    reason: String,
}

// === impl Scaler ===

impl Scaler {
    /// A scaler with empty state. `policy` should come validated from
    /// [`super::policy::PolicySet`] or [`ScalingPolicy::validated`].
    pub fn new(policy: ScalingPolicy) -> Self {
        Self { policy, state: ScalerState::default() }
    }

    /// A scaler resuming from persisted state.
    pub fn with_state(policy: ScalingPolicy, state: ScalerState) -> Self {
        Self { policy, state }
    }

    /// The policy.
    pub fn policy(&self) -> &ScalingPolicy {
        &self.policy
    }

    /// The state to persist.
    pub fn state(&self) -> &ScalerState {
        &self.state
    }

    /// Decides the instance count for this observation, and remembers what later decisions
    /// need. When the decision acts, it is assumed carried out (the caller reports the new
    /// count in the next observation).
    pub fn evaluate(
        &mut self,
        obs: &Observation,
        forecast: Option<&ForecastInput>,
        limits: &Limits,
    ) -> Decision {
        // A copy, so the state can be updated while the policy is read (a few small fields).
        let policy = self.policy.clone();
        let p = &policy;
        let now = obs.at_ms;
        let current = obs.current_instances;
        self.remember_demand(now, obs.demand_rps);
        let burst = self.bursting(now);

        // 1. Reactive recommendation.
        let metrics = recommendations(p, obs);
        let reactive = metrics.iter().map(|m| m.recommended).max().unwrap_or(current);
        let mut v = match (metrics.is_empty(), reactive.cmp(&current)) {
            (true, _) => Verdict {
                rule: "reactive.no_metrics",
                reason: format!("no target metric has data; keeping {current}"),
            },
            (false, std::cmp::Ordering::Greater) => Verdict {
                rule: "reactive.scale_up",
                reason: format!("{} asks for {reactive} (now {current})", top(&metrics)),
            },
            (false, std::cmp::Ordering::Less) => Verdict {
                rule: "reactive.scale_down",
                reason: format!("{} asks for {reactive} (now {current})", top(&metrics)),
            },
            (false, std::cmp::Ordering::Equal) => Verdict {
                rule: "reactive.within_tolerance",
                reason: format!(
                    "every metric is within {:.0}% of its target or asks for {current}",
                    p.tolerance * 100.0
                ),
            },
        };

        // 2. Predictive: only raises.
        if let Some(at_now) = forecast.and_then(|f| f.rps_now) {
            BiasTrack::update(&mut self.state.bias, now, obs.demand_rps, at_now);
        }
        let bias = self.state.bias.filter(|_| p.predictive.correct_bias).and_then(|b| b.ratio());
        let predictive = match (p.mode, forecast, p.targets.requests_per_instance) {
            (Mode::Predictive, Some(f), Some(rpi)) => {
                // The forecast is one more metric, with the same tolerance band: a forecast
                // close to what runs keeps it, so the forecast's small moves cause no churn.
                let ahead = f.rps_ahead * bias.unwrap_or(1.0);
                let need = ahead * (1.0 + p.predictive.buffer_pct / 100.0);
                let ratio = need / (f64::from(current) * rpi);
                if current > 0 && (ratio - 1.0).abs() <= p.tolerance {
                    Some(current)
                } else {
                    Some(instances_for(need, rpi))
                }
            }
            _ => None,
        };
        let mut would_have = None;
        let mut want = reactive;
        if let Some(pred) = predictive {
            let raised = reactive.max(pred);
            if p.predictive.forecast_only {
                would_have = Some(raised.clamp(p.min_instances, p.max_instances));
            } else if pred > reactive {
                want = raised;
                v = Verdict {
                    rule: "predictive.ahead",
                    reason: format!(
                        "forecast {:.1} req/s in {} s (+{}% buffer) needs {pred}; reactive asks \
                         for {reactive} (now {current})",
                        forecast.map_or(0.0, |f| f.rps_ahead * bias.unwrap_or(1.0)),
                        p.predictive.lead_secs,
                        p.predictive.buffer_pct
                    ),
                };
            }
        }

        // 3. Stabilization of scale-down.
        self.remember_recommendation(now, want);
        let mut stabilized = None;
        let mut desired = want;
        if desired < current {
            let highest = self.state.recommendations.iter().map(|r| r.1).max().unwrap_or(want);
            stabilized = Some(highest);
            if highest > desired {
                desired = highest.min(current);
                v = Verdict {
                    rule: "stabilization.hold",
                    reason: format!(
                        "{want} asked, but the highest recommendation of the last {} s is \
                         {highest}; setting {desired} (now {current})",
                        p.stabilization_window_secs
                    ),
                };
            }
        }

        // 4 and 5. Cooldowns and rate limits.
        if desired > current {
            let since_up = self.state.last_up_ms.map(|t| now - t);
            let cooling = since_up.is_some_and(|d| d < secs_ms(p.cooldown_up_secs));
            if cooling && !burst {
                v = Verdict {
                    rule: "cooldown.up",
                    reason: format!(
                        "{desired} asked, but the last scale-up was {} s ago (cooldown {} s)",
                        since_up.unwrap_or(0) / 1000,
                        p.cooldown_up_secs
                    ),
                };
                desired = current;
            } else {
                if cooling {
                    v = Verdict {
                        rule: "burst.bypass",
                        reason: format!(
                            "demand burst (over {:.0}% up within {} s) scales up to {desired} \
                             despite the up cooldown (now {current})",
                            (BURST_RATIO - 1.0) * 100.0,
                            p.burst_window_secs
                        ),
                    };
                }
                let added = self.changed_within(now, p.scale_up_limit.per_secs, true);
                let cap = i64::from(current) - added + i64::from(p.scale_up_limit.instances);
                let cap = u32::try_from(cap.max(i64::from(current))).unwrap_or(u32::MAX);
                if desired > cap {
                    v = Verdict {
                        rule: "rate_limit.up",
                        reason: format!(
                            "{desired} asked; at most {} added per {} s ({added} already), \
                             setting {cap} (now {current})",
                            p.scale_up_limit.instances, p.scale_up_limit.per_secs
                        ),
                    };
                    desired = cap;
                }
            }
        } else if desired < current {
            let since = self.state.last_change_ms.map(|t| now - t);
            if since.is_some_and(|d| d < secs_ms(p.cooldown_down_secs)) {
                v = Verdict {
                    rule: "cooldown.down",
                    reason: format!(
                        "{desired} asked, but the last scaling was {} s ago (cooldown {} s); \
                         keeping {current}",
                        since.unwrap_or(0) / 1000,
                        p.cooldown_down_secs
                    ),
                };
                desired = current;
            } else {
                let removed = -self.changed_within(now, p.scale_down_limit.per_secs, false);
                let floor = i64::from(current) + removed - i64::from(p.scale_down_limit.instances);
                let floor = u32::try_from(floor.clamp(0, i64::from(current))).unwrap_or(0);
                if desired < floor {
                    v = Verdict {
                        rule: "rate_limit.down",
                        reason: format!(
                            "{desired} asked; at most {} removed per {} s ({removed} already), \
                             setting {floor} (now {current})",
                            p.scale_down_limit.instances, p.scale_down_limit.per_secs
                        ),
                    };
                    desired = floor;
                }
            }
        }

        // 6. Bounds.
        if desired > p.max_instances {
            v = Verdict {
                rule: "bounds.max",
                reason: format!(
                    "{desired} asked; max_instances is {} (now {current})",
                    p.max_instances
                ),
            };
            desired = p.max_instances;
        } else if desired < p.min_instances {
            v = Verdict {
                rule: "bounds.min",
                reason: format!(
                    "{desired} asked; min_instances is {} (now {current})",
                    p.min_instances
                ),
            };
            desired = p.min_instances;
        }

        // 7. Budget: never grow above it.
        let mut budget_capped = false;
        if let Some(cap) = limits.max_instances_by_budget {
            let cap = cap.max(current);
            if desired > cap {
                v = Verdict {
                    rule: "budget.cap",
                    reason: format!(
                        "{desired} asked, but the budget pays for {} instances; keeping {cap} \
                         (now {current})",
                        limits.max_instances_by_budget.unwrap_or(cap)
                    ),
                };
                desired = cap;
                budget_capped = true;
            }
        }

        // 8. Savings threshold for scale-in.
        let price = p.cost.price_per_instance_hour.or(limits.price_per_instance_hour);
        if let (true, Some(price)) = (desired < current, price) {
            let saving = f64::from(current - desired) * price;
            if saving < p.cost.min_savings_per_hour {
                v = Verdict {
                    rule: "cost.savings_too_small",
                    reason: format!(
                        "scaling in to {desired} saves {saving:.2}/h, below \
                         min_savings_per_hour {:.2}; keeping {current}",
                        p.cost.min_savings_per_hour
                    ),
                };
                desired = current;
            }
        }

        if let Some(w) = would_have.filter(|w| *w != desired) {
            v.reason = format!("{}; forecast-only: predictive would have set {w}", v.reason);
        }
        let act = desired != current;
        if act {
            self.remember_change(now, current, desired);
        }
        Decision {
            at_ms: now,
            policy: p.name.clone(),
            model: p.model.clone(),
            current,
            desired,
            act,
            would_have,
            rule: v.rule.to_owned(),
            reason: v.reason,
            inputs: DecisionInputs {
                observation: obs.clone(),
                metrics,
                reactive,
                predictive,
                forecast: forecast.cloned(),
                limits: limits.clone(),
                stabilized,
                burst,
            },
            budget_capped,
        }
    }

    fn remember_demand(&mut self, now: i64, rps: f64) {
        let keep = 2 * secs_ms(self.policy.burst_window_secs);
        let d = &mut self.state.demand;
        d.push_back((now, rps));
        while d.front().is_some_and(|(t, _)| *t <= now - keep) {
            d.pop_front();
        }
    }

    /// Mean demand over the last burst window is more than [`BURST_RATIO`] times the mean over
    /// the window before (both windows need a sample).
    fn bursting(&self, now: i64) -> bool {
        let w = secs_ms(self.policy.burst_window_secs);
        let mean = |from: i64, to: i64| {
            let (sum, n) = self
                .state
                .demand
                .iter()
                .filter(|(t, _)| *t > from && *t <= to)
                .fold((0.0, 0u32), |(s, n), (_, v)| (s + v, n + 1));
            (n > 0).then(|| sum / f64::from(n))
        };
        match (mean(now - w, now), mean(now - 2 * w, now - w)) {
            (Some(recent), Some(before)) => recent > before * BURST_RATIO && recent > 0.0,
            _ => false,
        }
    }

    fn remember_recommendation(&mut self, now: i64, rec: u32) {
        let keep = secs_ms(self.policy.stabilization_window_secs);
        let r = &mut self.state.recommendations;
        r.push_back((now, rec));
        while r.front().is_some_and(|(t, _)| *t <= now - keep) {
            r.pop_front();
        }
    }

    fn remember_change(&mut self, now: i64, from: u32, to: u32) {
        let keep =
            secs_ms(self.policy.scale_up_limit.per_secs.max(self.policy.scale_down_limit.per_secs));
        let c = &mut self.state.changes;
        c.push_back((now, i64::from(to) - i64::from(from)));
        while c.front().is_some_and(|(t, _)| *t <= now - keep) {
            c.pop_front();
        }
        if to > from {
            self.state.last_up_ms = Some(now);
        }
        self.state.last_change_ms = Some(now);
    }

    /// Instances added (`up`) or removed (negative) within the last `per_secs`.
    fn changed_within(&self, now: i64, per_secs: u64, up: bool) -> i64 {
        let since = now - secs_ms(per_secs);
        self.state
            .changes
            .iter()
            .filter(|(t, d)| *t > since && (*d > 0) == up)
            .map(|(_, d)| *d)
            .sum()
    }
}

fn secs_ms(secs: u64) -> i64 {
    i64::try_from(secs.saturating_mul(1000)).unwrap_or(i64::MAX)
}

/// `ceil(rps / per_instance)`, at least 1 when there is demand.
fn instances_for(rps: f64, per_instance: f64) -> u32 {
    if rps.is_nan() || rps <= 0.0 {
        return 0;
    }
    ceil_u32(rps / per_instance).max(1)
}

/// Ceiling that ignores float noise (`200 * 1.1 / 10` is 22, not 23), saturating at 0 and
/// `u32::MAX`.
fn ceil_u32(x: f64) -> u32 {
    // Saturating float-to-int conversion; NaN becomes 0.
    #[allow(clippy::cast_possible_truncation)]
    let n = (x - 1e-9).ceil().clamp(0.0, f64::from(u32::MAX)) as u32;
    n
}

/// The metric with the highest recommendation, as `name measured/target`.
fn top(metrics: &[MetricRecommendation]) -> String {
    metrics.iter().max_by_key(|m| m.recommended).map_or_else(String::new, |m| {
        format!("{} {:.1} vs target {:.1}", m.metric, m.measured, m.target)
    })
}

/// One recommendation per target metric that has data.
fn recommendations(p: &ScalingPolicy, obs: &Observation) -> Vec<MetricRecommendation> {
    let current = obs.current_instances;
    let t = &p.targets;
    let mut out = Vec::new();
    if let Some(target) = t.requests_per_instance {
        let demand = obs.demand_rps.max(0.0);
        let needed = instances_for(demand, target);
        let ratio =
            if current == 0 { f64::INFINITY } else { demand / (f64::from(current) * target) };
        let recommended =
            if current > 0 && (ratio - 1.0).abs() <= p.tolerance { current } else { needed };
        out.push(MetricRecommendation {
            metric: "requests_per_instance".to_owned(),
            measured: if current == 0 { demand } else { demand / f64::from(current) },
            target,
            ratio: if demand == 0.0 && current == 0 { 1.0 } else { ratio },
            recommended,
        });
    }
    let ratio_metrics = [
        ("queue_p95_ms", obs.queue_p95_ms, t.queue_p95_ms),
        ("latency_p95_ms", obs.latency_p95_ms, t.latency_p95_ms),
        ("gpu_util_pct", obs.gpu_util_pct, t.gpu_util_pct),
        ("cpu_util_pct", obs.cpu_util_pct, t.cpu_util_pct),
        ("batch_util_pct", obs.batch_util_pct, t.batch_util_pct),
    ];
    for (metric, measured, target) in ratio_metrics {
        let (Some(measured), Some(target)) = (measured.filter(|m| m.is_finite()), target) else {
            continue;
        };
        let ratio = measured / target;
        let recommended = if current == 0 {
            // Nothing runs to measure; with demand, start one.
            u32::from(obs.demand_rps > 0.0)
        } else if (ratio - 1.0).abs() <= p.tolerance {
            current
        } else {
            ceil_u32(f64::from(current) * ratio)
        };
        out.push(MetricRecommendation {
            metric: metric.to_owned(),
            measured,
            target,
            ratio,
            recommended,
        });
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use tokio::time::{Duration, Instant, advance};

    use super::*;
    use crate::control::policy::{RateLimit, Targets};

    /// Paused-time test clock: `at_ms` is the paused tokio clock's elapsed time since `base`.
    struct Clock {
        base: Instant,
    }

    impl Clock {
        fn new() -> Self {
            Self { base: Instant::now() }
        }
        fn ms(&self) -> i64 {
            i64::try_from(self.base.elapsed().as_millis()).unwrap()
        }
        async fn secs(&self, s: u64) {
            advance(Duration::from_secs(s)).await;
        }
    }

    fn rps_policy(rpi: f64) -> ScalingPolicy {
        let mut p = ScalingPolicy::new(
            "p",
            "m",
            1,
            100,
            Targets { requests_per_instance: Some(rpi), ..Targets::default() },
        );
        p.scale_up_limit = RateLimit { instances: 100, per_secs: 60 };
        p.scale_down_limit = RateLimit { instances: 100, per_secs: 60 };
        p.cooldown_down_secs = 0;
        p.stabilization_window_secs = 0;
        p
    }

    fn obs(clock: &Clock, current: u32, demand: f64) -> Observation {
        Observation {
            at_ms: clock.ms(),
            current_instances: current,
            ready_instances: current,
            demand_rps: demand,
            ..Observation::default()
        }
    }

    fn run(s: &mut Scaler, o: &Observation) -> Decision {
        s.evaluate(o, None, &Limits::default())
    }

    #[tokio::test(start_paused = true)]
    async fn tolerance_keeps_the_count_and_outside_it_scales() {
        let c = Clock::new();
        let mut s = Scaler::new(rps_policy(10.0));
        let d = run(&mut s, &obs(&c, 10, 108.0));
        assert_eq!((d.desired, d.act, d.rule.as_str()), (10, false, "reactive.within_tolerance"));
        c.secs(10).await;
        let d = run(&mut s, &obs(&c, 10, 150.0));
        assert_eq!((d.desired, d.act, d.rule.as_str()), (15, true, "reactive.scale_up"));
        assert_eq!(d.at_ms, 10_000);
    }

    #[tokio::test(start_paused = true)]
    async fn the_highest_metric_wins_and_missing_ones_are_skipped() {
        let c = Clock::new();
        let mut p = rps_policy(10.0);
        p.targets.gpu_util_pct = Some(50.0);
        p.targets.latency_p95_ms = Some(100.0);
        let mut s = Scaler::new(p);
        let mut o = obs(&c, 4, 40.0);
        o.gpu_util_pct = Some(100.0);
        let d = run(&mut s, &o);
        assert_eq!(d.desired, 8, "gpu at 2x target doubles: {}", d.reason);
        assert_eq!(d.inputs.metrics.len(), 2, "latency has no data");
        assert_eq!(d.inputs.reactive, 8);
    }

    #[tokio::test(start_paused = true)]
    async fn from_zero_instances_demand_gets_capacity() {
        let c = Clock::new();
        let mut p = rps_policy(10.0);
        p.min_instances = 0;
        let mut s = Scaler::new(p.clone());
        let d = run(&mut s, &obs(&c, 0, 35.0));
        assert_eq!((d.desired, d.rule.as_str()), (4, "reactive.scale_up"));
        let mut gpu_only = p;
        gpu_only.targets = Targets { gpu_util_pct: Some(70.0), ..Targets::default() };
        let mut s = Scaler::new(gpu_only);
        let mut o = obs(&c, 0, 3.0);
        o.gpu_util_pct = Some(0.0);
        assert_eq!(run(&mut s, &o).desired, 1);
        let mut s = Scaler::new(rps_policy(10.0));
        let mut o = obs(&c, 0, 0.0);
        o.current_instances = 0;
        let d = run(&mut s, &o);
        assert_eq!((d.desired, d.rule.as_str()), (1, "bounds.min"), "min 1 applies at zero");
    }

    #[tokio::test(start_paused = true)]
    async fn bounds_clamp_both_ways() {
        let c = Clock::new();
        let mut p = rps_policy(10.0);
        p.max_instances = 5;
        p.min_instances = 2;
        let mut s = Scaler::new(p);
        let d = run(&mut s, &obs(&c, 3, 500.0));
        assert_eq!((d.desired, d.rule.as_str()), (5, "bounds.max"));
        c.secs(60).await;
        let d = run(&mut s, &obs(&c, 5, 1.0));
        assert_eq!((d.desired, d.rule.as_str()), (2, "bounds.min"));
    }

    #[tokio::test(start_paused = true)]
    async fn stabilization_holds_scale_down_at_the_window_high() {
        let c = Clock::new();
        let mut p = rps_policy(10.0);
        p.stabilization_window_secs = 300;
        let mut s = Scaler::new(p);
        assert_eq!(run(&mut s, &obs(&c, 10, 100.0)).desired, 10);
        c.secs(60).await;
        let d = run(&mut s, &obs(&c, 10, 80.0));
        assert_eq!(run_rule(&d), ("stabilization.hold", 10));
        c.secs(60).await;
        let d = run(&mut s, &obs(&c, 10, 50.0));
        assert_eq!((d.inputs.stabilized, d.desired), (Some(10), 10));
        // The 100 req/s recommendation leaves the window after 300 s; 80 (8) is then highest.
        c.secs(181).await;
        let d = run(&mut s, &obs(&c, 10, 50.0));
        assert_eq!(run_rule(&d), ("stabilization.hold", 8));
        assert!(s.state().recommendations.len() <= 4, "history is bounded by the window");
    }

    fn run_rule(d: &Decision) -> (&str, u32) {
        (d.rule.as_str(), d.desired)
    }

    #[tokio::test(start_paused = true)]
    async fn up_rate_limit_counts_what_the_period_already_added() {
        let c = Clock::new();
        let mut p = rps_policy(10.0);
        p.scale_up_limit = RateLimit { instances: 4, per_secs: 60 };
        let mut s = Scaler::new(p);
        let d = run(&mut s, &obs(&c, 2, 200.0));
        assert_eq!(run_rule(&d), ("rate_limit.up", 6));
        c.secs(30).await;
        let d = run(&mut s, &obs(&c, 6, 200.0));
        assert_eq!(run_rule(&d), ("rate_limit.up", 6), "4 were added 30 s ago");
        assert!(!d.act);
        c.secs(31).await;
        let d = run(&mut s, &obs(&c, 6, 200.0));
        assert_eq!(run_rule(&d), ("rate_limit.up", 10));
    }

    #[tokio::test(start_paused = true)]
    async fn down_rate_limit() {
        let c = Clock::new();
        let mut p = rps_policy(10.0);
        p.scale_down_limit = RateLimit { instances: 1, per_secs: 60 };
        let mut s = Scaler::new(p);
        let d = run(&mut s, &obs(&c, 10, 20.0));
        assert_eq!(run_rule(&d), ("rate_limit.down", 9));
        c.secs(20).await;
        assert_eq!(run_rule(&run(&mut s, &obs(&c, 9, 20.0))), ("rate_limit.down", 9));
        c.secs(41).await;
        assert_eq!(run_rule(&run(&mut s, &obs(&c, 9, 20.0))), ("rate_limit.down", 8));
    }

    #[tokio::test(start_paused = true)]
    async fn cooldowns_hold_and_a_burst_bypasses_the_up_one() {
        let c = Clock::new();
        let mut p = rps_policy(10.0);
        p.cooldown_up_secs = 120;
        p.cooldown_down_secs = 60;
        p.burst_window_secs = 30;
        let mut s = Scaler::new(p);
        // Scale up once; a further rise 30 s later (not a burst) waits for the cooldown.
        assert_eq!(run(&mut s, &obs(&c, 4, 50.0)).desired, 5);
        c.secs(30).await;
        let d = run(&mut s, &obs(&c, 5, 65.0));
        assert_eq!(run_rule(&d), ("cooldown.up", 5));
        assert!(!d.inputs.burst);
        // Demand then doubles within the burst window: up at once.
        c.secs(30).await;
        let d = run(&mut s, &obs(&c, 5, 140.0));
        assert!(d.inputs.burst);
        assert_eq!(run_rule(&d), ("burst.bypass", 14));
        // Scale-down right after a scaling waits for the down cooldown.
        c.secs(30).await;
        let d = run(&mut s, &obs(&c, 14, 40.0));
        assert_eq!(run_rule(&d), ("cooldown.down", 14));
        c.secs(31).await;
        let d = run(&mut s, &obs(&c, 14, 40.0));
        assert_eq!(run_rule(&d), ("reactive.scale_down", 4));
    }

    fn predictive(forecast_only: bool) -> ScalingPolicy {
        let mut p = rps_policy(10.0);
        p.mode = Mode::Predictive;
        p.predictive.forecast_only = forecast_only;
        p.predictive.buffer_pct = 10.0;
        p
    }

    #[tokio::test(start_paused = true)]
    async fn predictive_raises_ahead_but_never_lowers() {
        let c = Clock::new();
        let mut s = Scaler::new(predictive(false));
        let f = ForecastInput { rps_ahead: 200.0, rps_now: None, backtest_error: Some(0.6) };
        let d = s.evaluate(&obs(&c, 10, 100.0), Some(&f), &Limits::default());
        assert_eq!(run_rule(&d), ("predictive.ahead", 22));
        assert_eq!(d.inputs.predictive, Some(22));
        assert_eq!(d.inputs.forecast.as_ref().and_then(|f| f.backtest_error), Some(0.6));
        c.secs(600).await;
        let low = ForecastInput { rps_ahead: 10.0, rps_now: None, backtest_error: None };
        let d = s.evaluate(&obs(&c, 22, 215.0), Some(&low), &Limits::default());
        assert_eq!(
            run_rule(&d),
            ("reactive.within_tolerance", 22),
            "a low forecast never scales in"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_biased_forecast_is_corrected_by_measured_demand() {
        let c = Clock::new();
        let mut s = Scaler::new(predictive(false));
        // The forecaster runs 50 % high: 150 now (100 measured), 200 at the lead: 200 * 2/3
        // plus 10 % is 146.7 req/s, 15 instances (not 22).
        let f = ForecastInput { rps_ahead: 200.0, rps_now: Some(150.0), backtest_error: None };
        let d = s.evaluate(&obs(&c, 10, 100.0), Some(&f), &Limits::default());
        assert_eq!(run_rule(&d), ("predictive.ahead", 15));
        // The ratio is smoothed: one minute of demand at the forecast barely moves it.
        c.secs(60).await;
        let d = s.evaluate(&obs(&c, 15, 150.0), Some(&f), &Limits::default());
        assert_eq!(d.inputs.predictive, Some(15), "{}", d.reason);
        // It stays within 2x either way.
        let mut s = Scaler::new(predictive(false));
        let far = ForecastInput { rps_ahead: 1000.0, rps_now: Some(1000.0), backtest_error: None };
        let d = s.evaluate(&obs(&c, 10, 1.0), Some(&far), &Limits::default());
        assert_eq!(d.inputs.predictive, Some(55), "1000 / 2 * 1.1 / 10");
        // With correct_bias off, the forecast's level counts.
        let mut level = predictive(false);
        level.predictive.correct_bias = false;
        let d = Scaler::new(level).evaluate(&obs(&c, 10, 100.0), Some(&f), &Limits::default());
        assert_eq!(run_rule(&d), ("predictive.ahead", 22));
    }

    #[tokio::test(start_paused = true)]
    async fn forecast_only_records_but_does_not_act() {
        let c = Clock::new();
        let mut s = Scaler::new(predictive(true));
        let f = ForecastInput { rps_ahead: 200.0, rps_now: None, backtest_error: None };
        let d = s.evaluate(&obs(&c, 10, 100.0), Some(&f), &Limits::default());
        assert_eq!((d.desired, d.act, d.would_have), (10, false, Some(22)));
        assert!(d.reason.contains("would have set 22"), "{}", d.reason);
    }

    #[tokio::test(start_paused = true)]
    async fn budget_caps_growth_and_flags_it() {
        let c = Clock::new();
        let mut s = Scaler::new(rps_policy(10.0));
        let limits = Limits { max_instances_by_budget: Some(12), price_per_instance_hour: None };
        let d = s.evaluate(&obs(&c, 10, 200.0), None, &limits);
        assert_eq!(run_rule(&d), ("budget.cap", 12));
        assert!(d.budget_capped && d.act);
        c.secs(60).await;
        let d = s.evaluate(&obs(&c, 12, 125.0), None, &limits);
        assert!(!d.budget_capped, "{}", d.reason);
    }

    #[tokio::test(start_paused = true)]
    async fn scale_in_needs_enough_savings() {
        let c = Clock::new();
        let mut p = rps_policy(10.0);
        p.cost.min_savings_per_hour = 5.0;
        let mut s = Scaler::new(p);
        let limits = Limits { max_instances_by_budget: None, price_per_instance_hour: Some(2.0) };
        let d = s.evaluate(&obs(&c, 10, 85.0), None, &limits);
        assert_eq!(run_rule(&d), ("cost.savings_too_small", 10), "{}", d.reason);
        c.secs(60).await;
        let d = s.evaluate(&obs(&c, 10, 70.0), None, &limits);
        assert_eq!(run_rule(&d), ("reactive.scale_down", 7), "saves 6/h");
    }

    #[tokio::test(start_paused = true)]
    async fn state_round_trips_through_json() {
        let c = Clock::new();
        let mut s = Scaler::new(rps_policy(10.0));
        run(&mut s, &obs(&c, 2, 100.0));
        let json = serde_json::to_string(s.state()).unwrap();
        let back: ScalerState = serde_json::from_str(&json).unwrap();
        assert_eq!(&back, s.state());
        let resumed = Scaler::with_state(s.policy().clone(), back);
        assert_eq!(resumed.state().last_up_ms, Some(0));
    }
}
