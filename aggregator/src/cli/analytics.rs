//! The analytics commands of the `flotilla` CLI: `models`, `forecast` (and `forecast
//! backtest`), `costs`, `plan`, `budgets`, `alerts`, `analytics run|show`. Each fetches JSON
//! from the admin API and renders a table (or passes the JSON through with `--json`).

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Args, Subcommand};

use super::client::Client;
use super::render::{ABSENT, Table, format_utc};
use crate::analytics::ForecastView;
use crate::analytics::alerts::{Alert, Severity};
use crate::analytics::backtest::{self, BacktestReport};
use crate::analytics::budgets::{Basis, Budget, BudgetScope, BudgetStatus, Period, Threshold};
use crate::analytics::cost::CostReport;
use crate::analytics::forecast::ForecastSettings;
use crate::analytics::models::ModelView;
use crate::analytics::plans::Plan;
use crate::analytics::selection::Selection;
use crate::analytics::series::{self, HOUR_MS, HourlySeries};
use crate::api::AlertsView;
use crate::scheduler::RunSummary;

/// `flotilla forecast ...`.
#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct ForecastArgs {
    /// Score a series by rolling-origin MASE instead
    #[command(subcommand)]
    pub action: Option<ForecastAction>,
    /// Model name or host id
    #[arg(required = true)]
    pub target: Option<String>,
    /// For a host: gpu_util_pct or cpu_util_pct [default: GPU when it has one]
    #[arg(long)]
    pub metric: Option<String>,
    /// Forecast hours to list
    #[arg(long, default_value_t = 24)]
    pub hours: usize,
    /// Also draw history, forecast, interval and anomalies into this SVG file
    #[arg(long, value_name = "FILE.svg")]
    pub plot: Option<PathBuf>,
}

/// `flotilla forecast backtest`.
#[derive(Debug, Subcommand)]
pub enum ForecastAction {
    /// Rolling-origin MASE of the forecaster against seasonal-naive baselines
    Backtest(BacktestArgs),
}

/// `flotilla forecast backtest (--csv FILE | --host H --metric M | --model M)`.
#[derive(Debug, Args)]
pub struct BacktestArgs {
    /// A `timestamp,value` CSV file (ISO UTC times or Unix seconds/ms)
    #[arg(long, value_name = "FILE", conflicts_with_all = ["host", "model"])]
    pub csv: Option<PathBuf>,
    /// A host's stored hourly series (with --metric)
    #[arg(long, conflicts_with = "model")]
    pub host: Option<String>,
    /// Series of --host, e.g. cpu_util_pct or gpu0_util_pct
    #[arg(long, default_value = "cpu_util_pct")]
    pub metric: String,
    /// A model's fleet-wide requests/s (summed over hosts)
    #[arg(long)]
    pub model: Option<String>,
    /// Hours forecast at each origin
    #[arg(long, default_value_t = 168)]
    pub horizon: usize,
    /// Number of origins (the last ones, a horizon apart, at UTC midnight)
    #[arg(long, default_value_t = 3)]
    pub origins: usize,
    /// Explicit origins (UTC, e.g. 2018-09-10T00:00); overrides --origins
    #[arg(long = "origin", value_parser = parse_origin)]
    pub origin: Vec<i64>,
    /// History to fetch from the store
    #[arg(long, default_value = "60d", value_parser = super::parse_since)]
    pub since: u64,
}

fn parse_origin(s: &str) -> Result<i64, String> {
    series::parse_time(s)
        .ok_or_else(|| format!("invalid --origin {s:?}: use a UTC time like 2018-09-10T00:00"))
}

/// `flotilla budgets ...`.
#[derive(Debug, Subcommand)]
pub enum BudgetsAction {
    /// Add or replace a budget through the API (effective from the next analytics pass)
    Set(BudgetSetArgs),
    /// Delete a budget added through the API
    Delete {
        /// Budget name
        name: String,
    },
}

/// `flotilla budgets set`.
#[derive(Debug, Args)]
pub struct BudgetSetArgs {
    /// Unique name
    #[arg(long)]
    pub name: String,
    /// Amount per period
    #[arg(long)]
    pub amount: f64,
    /// day or month
    #[arg(long, value_parser = ["day", "month"], default_value = "day")]
    pub period: String,
    /// fleet, model:NAME or label:KEY=VALUE
    #[arg(long, default_value = "fleet", value_parser = |s: &str| s.parse::<BudgetScope>())]
    pub scope: BudgetScope,
    /// PCT:actual|forecast[:info|warning|critical], repeatable [default: 80:actual, 100:actual:critical, 100:forecast]
    #[arg(long = "threshold", value_parser = parse_threshold)]
    pub thresholds: Vec<Threshold>,
    /// List helpful plans when a threshold is crossed
    #[arg(long)]
    pub auto_optimize: bool,
}

fn parse_threshold(s: &str) -> Result<Threshold, String> {
    let bad = || {
        format!(
            "invalid --threshold {s:?}: use PCT:actual|forecast[:info|warning|critical], e.g. 80:actual:warning"
        )
    };
    let mut parts = s.split(':');
    let pct: f64 = parts.next().and_then(|p| p.parse().ok()).ok_or_else(bad)?;
    let on = match parts.next() {
        Some("actual") => Basis::Actual,
        Some("forecast") => Basis::Forecast,
        _ => return Err(bad()),
    };
    let severity = match parts.next() {
        None | Some("warning") => Severity::Warning,
        Some("info") => Severity::Info,
        Some("critical") => Severity::Critical,
        Some(_) => return Err(bad()),
    };
    if parts.next().is_some() {
        return Err(bad());
    }
    Ok(Threshold { pct, on, severity })
}

/// `flotilla analytics ...`.
#[derive(Debug, Subcommand)]
pub enum AnalyticsAction {
    /// Run an analytics pass now (rollups first) and show what it did
    Run,
    /// Show the latest pass
    Show,
}

fn json<T: serde::Serialize>(v: &T) -> anyhow::Result<String> {
    let mut t = serde_json::to_string_pretty(v).context("encoding the answer as JSON")?;
    t.push('\n');
    Ok(t)
}

fn num(v: f64) -> String {
    if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

fn opt(v: Option<f64>) -> String {
    v.map_or_else(|| ABSENT.to_owned(), num)
}

fn money(v: f64, currency: &str) -> String {
    format!("{v:.2} {currency}")
}

/// `flotilla models`.
pub fn models(client: &Client, since_secs: u64, as_json: bool) -> anyhow::Result<String> {
    let since = since_secs.to_string();
    let rows: Vec<ModelView> =
        client.get_json("/api/v1/models", &[("since_secs", since.as_str())])?;
    if as_json {
        return json(&rows);
    }
    if rows.is_empty() {
        return Ok(format!(
            "No model served in the last {}.\n",
            super::render::format_duration_secs(since_secs)
        ));
    }
    let mut t = Table::new([
        "MODEL",
        "HOSTS",
        "REQ/S",
        "OK",
        "FAILED",
        "REJECTED",
        "EXPIRED",
        "P50 MS",
        "P95 MS",
        "P99 MS",
        "QUEUE P95 MS",
        "BATCH UTIL",
    ])
    .right_align(&[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]);
    for m in &rows {
        t.push_row(vec![
            m.model.clone(),
            m.hosts.len().to_string(),
            num(m.requests_per_s),
            m.successes.to_string(),
            m.failures.to_string(),
            m.rejected.to_string(),
            m.expired.to_string(),
            opt(m.latency_p50_ms),
            opt(m.latency_p95_ms),
            opt(m.latency_p99_ms),
            opt(m.queue_p95_ms),
            m.batch_utilization_pct.map_or_else(|| ABSENT.to_owned(), |u| format!("{u:.0} %")),
        ]);
    }
    Ok(format!(
        "Models, last {} (percentiles from histograms merged across hosts):\n{}",
        super::render::format_duration_secs(since_secs),
        t.render()
    ))
}

/// `flotilla forecast TARGET`.
pub fn forecast(client: &Client, args: &ForecastArgs, as_json: bool) -> anyhow::Result<String> {
    let target = args.target.as_deref().unwrap_or_default();
    let metric = args.metric.as_deref().map(|m| match m {
        "gpu" => "gpu_util_pct",
        "cpu" => "cpu_util_pct",
        other => other,
    });
    let view = client.forecast(target, metric)?;
    let mut out = String::new();
    if let Some(path) = &args.plot {
        super::plot::forecast_svg(&view, path, (1200, 600))?;
        if !as_json {
            out.push_str(&format!("Wrote {}\n", path.display()));
        }
    }
    if as_json {
        return json(&view);
    }
    out.push_str(&forecast_text(&view, args.hours));
    Ok(out)
}

/// The forecast table.
pub fn forecast_text(view: &ForecastView, hours: usize) -> String {
    let mut out = format!("Forecast of {} ({})\n", view.target, view.metric);
    let Some(f) = &view.forecast else {
        out.push_str(&format!(
            "No forecast: {}\n",
            view.error.as_deref().unwrap_or("unknown reason")
        ));
        return out;
    };
    let s = &f.seasonality;
    out.push_str(&format!(
        "Method {}; daily cycle {} (acf24 {:.2}), weekly cycle {} (acf168 {:.2}); {:.0} % interval.\n",
        f.method,
        if s.daily { "yes" } else { "no" },
        s.acf_24,
        if s.weekly { "yes" } else { "no" },
        s.acf_168,
        f.level * 100.0
    ));
    if let Some(sel) = &f.selection {
        out.push_str(&selection_text(sel));
    }
    let mut t = Table::new(["HOUR (UTC)", "FORECAST", "LOWER", "UPPER"]).right_align(&[1, 2, 3]);
    for k in 0..hours.min(f.point.len()) {
        let at = f.start_ms + i64::try_from(k).unwrap_or(0) * HOUR_MS;
        t.push_row(vec![format_utc(at), num(f.point[k]), num(f.lower[k]), num(f.upper[k])]);
    }
    out.push_str(&t.render());
    if f.point.len() > hours {
        out.push_str(&format!("... {} more hours (--hours N, or --json)\n", f.point.len() - hours));
    }
    if view.anomalies.is_empty() {
        out.push_str("No anomalies in the training window.\n");
    } else {
        out.push_str(&format!("{} anomalies (|z| > threshold):\n", view.anomalies.len()));
        let mut a = Table::new(["HOUR (UTC)", "VALUE", "EXPECTED", "Z"]).right_align(&[1, 2, 3]);
        for an in view.anomalies.iter().rev().take(10) {
            a.push_row(vec![
                format_utc(an.unix_ms),
                num(an.value),
                num(an.expected),
                format!("{:.1}", an.z),
            ]);
        }
        out.push_str(&a.render());
    }
    out
}

/// `flotilla forecast backtest`.
pub fn backtest(client: &Client, args: &BacktestArgs, as_json: bool) -> anyhow::Result<String> {
    let (name, points) = if let Some(path) = &args.csv {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let pts =
            series::parse_csv(&text).with_context(|| format!("reading {}", path.display()))?;
        (path.display().to_string(), pts)
    } else if let Some(host) = &args.host {
        let s = client.metric(host, &args.metric, args.since, Some("hour"))?;
        (format!("{host} {}", args.metric), s.points.iter().map(|p| (p.unix_ms, p.value)).collect())
    } else if let Some(model) = &args.model {
        let metric = format!("model.{model}.requests_per_s");
        let mut pts = std::collections::BTreeMap::<i64, f64>::new();
        for h in client.hosts()? {
            let s = client.metric(&h.host, &metric, args.since, Some("hour"))?;
            for p in s.points {
                *pts.entry(p.unix_ms).or_default() += p.value;
            }
        }
        (format!("model {model} requests/s"), pts.into_iter().collect())
    } else {
        anyhow::bail!("name a series: --csv FILE, --host HOST [--metric M] or --model MODEL");
    };
    let series = HourlySeries::from_points(points);
    let origins = if args.origin.is_empty() {
        backtest::default_origins(&series, args.horizon, args.origins)
    } else {
        args.origin.clone()
    };
    if origins.is_empty() {
        anyhow::bail!(
            "{name}: too short for a {} h backtest ({} hours of data)",
            args.horizon,
            series.len()
        );
    }
    let settings = ForecastSettings { horizon_hours: args.horizon, ..ForecastSettings::default() };
    let report = backtest::backtest(&series, &origins, &settings);
    if as_json {
        return json(&report);
    }
    Ok(backtest_text(&name, &report))
}

/// Why the forecast's method was chosen: the reason, and the best candidates' validation
/// scores.
pub fn selection_text(sel: &Selection) -> String {
    let mut out = format!(
        "Chosen: {}{}: {}.\n",
        sel.chosen,
        sel.validation_mase.map(|m| format!(" (validation MASE {m:.3})")).unwrap_or_default(),
        sel.reason
    );
    let shown: Vec<String> = sel
        .candidates
        .iter()
        .take(SHOWN_CANDIDATES)
        .map(|c| {
            format!(
                "{} {}",
                c.method,
                c.mase.map_or_else(|| ABSENT.to_owned(), |m| format!("{m:.3}"))
            )
        })
        .collect();
    if sel.candidates.len() > 1 {
        out.push_str(&format!(
            "Candidates (validation MASE, best first): {}{}\n",
            shown.join("; "),
            if sel.candidates.len() > SHOWN_CANDIDATES {
                format!("; ... {} more (--json)", sel.candidates.len() - SHOWN_CANDIDATES)
            } else {
                String::new()
            }
        ));
    }
    out
}

/// Candidates listed under a forecast.
const SHOWN_CANDIDATES: usize = 5;

/// The backtest table.
pub fn backtest_text(name: &str, r: &BacktestReport) -> String {
    let mut t = Table::new([
        "ORIGIN (UTC)",
        "FORECASTER",
        "NAIVE M=168",
        "NAIVE M=24",
        "COVER 80%",
        "COVER 95%",
        "METHOD",
    ])
    .right_align(&[1, 2, 3, 4, 5]);
    let f = |v: Option<f64>| v.map_or_else(|| ABSENT.to_owned(), |v| format!("{v:.3}"));
    let pct =
        |v: Option<f64>| v.map_or_else(|| ABSENT.to_owned(), |v| format!("{:.0}%", v * 100.0));
    for o in &r.origins {
        t.push_row(vec![
            format_utc(o.origin_ms),
            f(o.model),
            f(o.naive_weekly),
            f(o.naive_daily),
            pct(o.coverage_80),
            pct(o.coverage_95),
            o.error.clone().or_else(|| o.method.clone()).unwrap_or_default(),
        ]);
    }
    t.push_row(vec![
        "mean".into(),
        f(r.mean_model),
        f(r.mean_naive_weekly),
        f(r.mean_naive_daily),
        pct(r.mean_coverage_80),
        pct(r.mean_coverage_95),
        String::new(),
    ]);
    format!(
        "Backtest of {name}: MASE, horizon {} h (lower is better); interval coverage (calibrated: \
         about 80 % and 95 %):\n{}",
        r.horizon_hours,
        t.render()
    )
}

/// `flotilla costs`.
pub fn costs(client: &Client, as_json: bool) -> anyhow::Result<String> {
    let r: CostReport = client.get_json("/api/v1/costs", &[])?;
    if as_json {
        return json(&r);
    }
    let c = r.currency.as_str();
    let hours = (r.window_end_ms - r.window_start_ms) / HOUR_MS;
    let mut out = format!(
        "Costs {} to {} UTC ({hours} h): total {}, idle {} ({:.0} %); fleet now {}/h.\n",
        format_utc(r.window_start_ms),
        format_utc(r.window_end_ms),
        money(r.total_cost, c),
        money(r.idle_cost, c),
        if r.total_cost > 0.0 { r.idle_cost / r.total_cost * 100.0 } else { 0.0 },
        money(r.fleet_hourly_rate, c),
    );
    let mut t =
        Table::new(["HOST", "TYPE", "LIFECYCLE", "RATE/H", "HOURS", "COST", "IDLE", "NOTE"])
            .right_align(&[3, 4, 5, 6]);
    for h in &r.hosts {
        t.push_row(vec![
            h.host.clone(),
            h.instance_type.clone().unwrap_or_else(|| ABSENT.to_owned()),
            h.lifecycle.clone(),
            h.hourly_rate.map_or_else(|| ABSENT.to_owned(), |v| format!("{v:.4}")),
            h.hours.to_string(),
            format!("{:.2}", h.cost),
            format!("{:.2}", h.idle_cost),
            h.note.clone().unwrap_or_default(),
        ]);
    }
    out.push_str(&t.render());
    if r.models.is_empty() {
        out.push_str("No model served in the window.\n");
    } else {
        let mut m = Table::new(["MODEL", "COST", "INFERENCES", "COST/1K INFERENCES", "HOSTS"])
            .right_align(&[1, 2, 3]);
        for x in &r.models {
            m.push_row(vec![
                x.model.clone(),
                format!("{:.2}", x.cost),
                format!("{:.0}", x.inferences),
                x.cost_per_1k_inferences.map_or_else(|| ABSENT.to_owned(), |v| format!("{v:.5}")),
                x.hosts.join(","),
            ]);
        }
        out.push_str(&m.render());
    }
    Ok(out)
}

/// `flotilla plan`.
pub fn plan(client: &Client, as_json: bool) -> anyhow::Result<String> {
    let plans: Vec<Plan> = client.get_json("/api/v1/plans", &[])?;
    if as_json {
        return json(&plans);
    }
    if plans.is_empty() {
        return Ok("No cost plans: nothing to change at the current targets.\n".to_owned());
    }
    let mut t = Table::new([
        "#",
        "KIND",
        "TARGET",
        "SAVES/MONTH",
        "% OF TARGET",
        "% OF FLEET",
        "RISK",
        "COMPLEXITY",
        "TIME",
        "ACTION",
    ])
    .right_align(&[0, 3, 4, 5]);
    for p in &plans {
        let kind = serde_json::to_value(p.kind)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default();
        let lvl = |l| {
            serde_json::to_value(l)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_default()
        };
        t.push_row(vec![
            p.priority.to_string(),
            kind,
            p.target.clone(),
            format!("{:.2}", p.monthly_savings),
            format!("{:.1} %", p.savings_pct),
            format!("{:.1} %", p.fleet_savings_pct),
            lvl(p.risk),
            lvl(p.complexity),
            p.time_to_implement.clone(),
            p.action.clone(),
        ]);
    }
    let mut out = format!(
        "Cost plans by priority (savings of plans on one host are alternatives):\n{}",
        t.render()
    );
    for p in &plans {
        out.push_str(&format!("  {}. {}\n", p.priority, p.rationale));
    }
    Ok(out)
}

/// `flotilla budgets`.
pub fn budgets(client: &Client, as_json: bool) -> anyhow::Result<String> {
    let rows: Vec<BudgetStatus> = client.get_json("/api/v1/budgets", &[])?;
    if as_json {
        return json(&rows);
    }
    if rows.is_empty() {
        return Ok(
            "No budgets: add them to the policy file or with `flotilla budgets set`.\n".to_owned()
        );
    }
    let mut t = Table::new([
        "BUDGET",
        "SCOPE",
        "PERIOD",
        "AMOUNT",
        "SPENT",
        "SPENT %",
        "FORECAST",
        "FORECAST %",
        "CROSSED",
    ])
    .right_align(&[3, 4, 5, 6, 7]);
    for s in &rows {
        let crossed: Vec<String> = s
            .breaches
            .iter()
            .map(|b| format!("{}% {:?} ({:?})", b.pct, b.on, b.severity).to_lowercase())
            .collect();
        t.push_row(vec![
            s.budget.name.clone(),
            s.budget.scope.to_string(),
            format!("{:?}", s.budget.period).to_lowercase(),
            format!("{:.2}", s.budget.amount),
            format!("{:.2}", s.spent),
            format!("{:.1} %", s.spent_pct),
            format!("{:.2}", s.forecast),
            format!("{:.1} %", s.forecast_pct),
            if crossed.is_empty() { "none".to_owned() } else { crossed.join(", ") },
        ]);
    }
    let mut out = t.render();
    for s in &rows {
        let remaining: Vec<f64> = s.burn_down.iter().map(|p| p.remaining.max(0.0)).collect();
        out.push_str(&format!(
            "{} burn-down {} .. {} UTC (left now {:.2}, projected at end {:.2}): {}\n",
            s.budget.name,
            format_utc(s.period_start_ms),
            format_utc(s.period_end_ms),
            s.budget.amount - s.spent,
            s.budget.amount - s.forecast,
            super::render::sparkline(&remaining, remaining.len().clamp(1, 60)),
        ));
        if !s.suggested_plans.is_empty() {
            out.push_str(&format!("  auto_optimize: see plans {}\n", s.suggested_plans.join(", ")));
        }
    }
    Ok(out)
}

/// `flotilla budgets set`.
pub fn budget_set(client: &Client, a: &BudgetSetArgs, as_json: bool) -> anyhow::Result<String> {
    let budget = Budget {
        name: a.name.clone(),
        amount: a.amount,
        period: if a.period == "month" { Period::Month } else { Period::Day },
        scope: a.scope.clone(),
        thresholds: if a.thresholds.is_empty() {
            crate::analytics::budgets::default_thresholds()
        } else {
            a.thresholds.clone()
        },
        auto_optimize: a.auto_optimize,
    };
    let all: Vec<Budget> = client.post_json("/api/v1/budgets", Some(&budget))?;
    if as_json {
        return json(&all);
    }
    Ok(format!(
        "Budget {} saved ({} API budgets); it is evaluated from the next analytics pass (`flotilla analytics run` to run one now).\n",
        a.name,
        all.len()
    ))
}

/// `flotilla alerts`.
pub fn alerts(client: &Client, history: usize, as_json: bool) -> anyhow::Result<String> {
    let limit = history.to_string();
    let v: AlertsView = client.get_json("/api/v1/alerts", &[("limit", limit.as_str())])?;
    if as_json {
        return json(&v);
    }
    let row = |a: &Alert| {
        vec![
            format!("{:?}", a.severity).to_lowercase(),
            format!("{:?}", a.state).to_lowercase(),
            a.key.clone(),
            format_utc(a.resolved_ms.unwrap_or(a.fired_ms)),
            a.message.clone(),
        ]
    };
    let mut out = String::new();
    if v.active.is_empty() {
        out.push_str("No active alerts.\n");
    } else {
        let mut t = Table::new(["SEVERITY", "STATE", "ALERT", "SINCE (UTC)", "MESSAGE"]);
        for a in &v.active {
            t.push_row(row(a));
        }
        out.push_str(&format!("Active alerts:\n{}", t.render()));
    }
    if !v.history.is_empty() {
        let mut t = Table::new(["SEVERITY", "STATE", "ALERT", "AT (UTC)", "MESSAGE"]);
        for a in &v.history {
            t.push_row(row(a));
        }
        out.push_str(&format!("History (newest first):\n{}", t.render()));
    }
    Ok(out)
}

/// `flotilla analytics run|show`.
pub fn analytics(
    client: &Client,
    action: &AnalyticsAction,
    as_json: bool,
) -> anyhow::Result<String> {
    let s: RunSummary = match action {
        AnalyticsAction::Run => client.post_json::<(), _>("/api/v1/analytics/run", None)?,
        AnalyticsAction::Show => client.get_json("/api/v1/analytics", &[])?,
    };
    if as_json {
        return json(&s);
    }
    let failed: Vec<String> = s
        .forecasts
        .iter()
        .filter_map(|f| f.error.as_ref().map(|e| format!("{}: {e}", f.target)))
        .collect();
    let mut out = format!(
        "Analytics pass at {} UTC: {} hosts, {} forecasts ({} failed), {} plans, {} budgets, {} alert transitions, {} active alerts.\n",
        format_utc(s.generated_ms),
        s.hosts,
        s.forecasts.len(),
        failed.len(),
        s.plans,
        s.budgets,
        s.alert_transitions.len(),
        s.active_alerts
    );
    for f in failed {
        out.push_str(&format!("  {f}\n"));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thresholds_parse() {
        assert_eq!(
            parse_threshold("80:actual").unwrap(),
            Threshold { pct: 80.0, on: Basis::Actual, severity: Severity::Warning }
        );
        assert_eq!(parse_threshold("100:forecast:critical").unwrap().severity, Severity::Critical);
        assert!(parse_threshold("80").is_err());
        assert!(parse_threshold("80:actual:loud").is_err());
    }
}
