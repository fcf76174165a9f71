//! `flotilla optimize HOST MODEL`, `flotilla optimize rollback HOST MODEL` and
//! `flotilla optimizations [HOST [MODEL]]`: model optimization searches on the agents, started
//! through the admin API (`POST /api/v1/optimizations`), followed by the aggregator to their
//! reports, and listed from what it kept (`GET /api/v1/optimizations`).

use std::io::Write as _;
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::{Args, Subcommand};
use common::directive::OptimizeOptions;
use serde_json::Value;

use super::client::Client;
use super::render::{Table, escape, format_utc};
use crate::control::routes::{OptimizationRequest, OptimizationStarted};
use crate::control::store::OptimizationRecord;
use crate::views::{DirectiveRequest, DirectiveView};

/// Between two looks at the search's record while following it (the aggregator asks the agent
/// every few seconds).
const POLL: Duration = Duration::from_secs(2);

/// `flotilla optimize HOST MODEL [options]`, or `flotilla optimize rollback HOST MODEL`.
#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct OptimizeArgs {
    /// `rollback HOST MODEL`: put back what the model's last adopted search replaced
    #[command(subcommand)]
    pub action: Option<OptimizeAction>,
    /// Host id
    #[arg(required = true)]
    pub host: Option<String>,
    /// Model name
    #[arg(required = true)]
    pub model: Option<String>,
    /// latency, throughput, memory, cost or balanced
    #[arg(long, default_value = "balanced")]
    pub strategy: String,
    /// Largest share of classifier rows whose top-1 class may change (0..=1; agent default 0.01)
    #[arg(long)]
    pub max_accuracy_loss: Option<f64>,
    /// Largest relative error against the baseline (agent default 0.01)
    #[arg(long)]
    pub max_rel_error: Option<f64>,
    /// Smallest gain over the baseline, in the strategy's own measure, worth a switch (0.1 is
    /// 10 %; agent default 0: any gain)
    #[arg(long)]
    pub min_improvement: Option<f64>,
    /// p99 a batch size must meet, ms (throughput and cost)
    #[arg(long = "latency-slo", value_name = "MS")]
    pub latency_slo_ms: Option<f64>,
    /// The host's price per hour (cost)
    #[arg(long)]
    pub price_per_hour: Option<f64>,
    /// Share of one core the search may use (agent default 0.5)
    #[arg(long)]
    pub cpu_share: Option<f64>,
    /// Timed runs per batch size (agent default 30)
    #[arg(long)]
    pub rounds: Option<usize>,
    /// Largest batch size searched
    #[arg(long)]
    pub max_batch: Option<usize>,
    /// Switch the model to the winner when the search ends (`flotilla optimize rollback`
    /// undoes it)
    #[arg(long)]
    pub apply: bool,
    /// Return once the search has started instead of following it to its report
    #[arg(long)]
    pub no_follow: bool,
    /// Give up following after this many seconds (the search goes on)
    #[arg(long, default_value_t = 1800)]
    pub follow_secs: u64,
}

/// What `flotilla optimize` does instead of a search.
#[derive(Debug, Subcommand)]
pub enum OptimizeAction {
    /// Put back what the model's last adopted search replaced (engine, file, batching)
    Rollback {
        /// Host id
        host: String,
        /// Model name
        model: String,
    },
}

/// `flotilla optimizations [HOST [MODEL]]`.
#[derive(Debug, Args)]
pub struct OptimizationsArgs {
    /// Only this host's searches
    pub host: Option<String>,
    /// Only this model's (with HOST: its latest search in full, report included)
    pub model: Option<String>,
    /// Most searches listed
    #[arg(long, default_value_t = 50)]
    pub limit: usize,
}

/// `flotilla optimize`.
pub fn optimize(client: &Client, args: &OptimizeArgs, json: bool) -> anyhow::Result<String> {
    if let Some(OptimizeAction::Rollback { host, model }) = &args.action {
        return rollback(client, host, model, json);
    }
    let (Some(host), Some(model)) = (&args.host, &args.model) else {
        bail!("flotilla optimize needs HOST and MODEL (or `rollback HOST MODEL`)");
    };
    let options = OptimizeOptions {
        apply: args.apply.then_some(true),
        strategy: Some(args.strategy.clone()),
        max_accuracy_loss: args.max_accuracy_loss,
        max_abs_error: None,
        max_rel_error: args.max_rel_error,
        min_improvement: args.min_improvement,
        latency_slo_ms: args.latency_slo_ms,
        price_per_hour: args.price_per_hour,
        cpu_share: args.cpu_share,
        rounds: args.rounds,
        max_batch: args.max_batch,
    };
    let request = OptimizationRequest { host: host.clone(), model: model.clone(), options };
    let started: OptimizationStarted = client
        .post_json("/api/v1/optimizations", Some(&request))
        .with_context(|| format!("starting a search of {model} on {host}"))?;
    let d = &started.directive;
    match d.state.as_str() {
        "applied" => {}
        "pending" | "sent" => bail!(
            "{host} has not answered the optimize directive {} yet ({}); the search starts when it does, and `flotilla optimizations {host} {model}` shows it then",
            d.id,
            d.state
        ),
        other => bail!("optimize on {host}: {other} ({})", d.message),
    }
    if args.no_follow {
        return Ok(format!(
            "{}
",
            d.message
        ));
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(args.follow_secs);
    let mut stderr = std::io::stderr();
    loop {
        let record = record_of(client, host, model, &d.id)?;
        if !record.is_running() {
            if !json {
                let _ = writeln!(stderr);
            }
            return render(&record, json);
        }
        if !json && !record.agent.is_null() {
            let _ = write!(stderr, "\r{}", progress_line(&record.agent));
            let _ = stderr.flush();
        }
        if std::time::Instant::now() >= deadline {
            bail!(
                "the search of {model} on {host} is still running after {} s; `flotilla optimizations {host} {model}` shows it later",
                args.follow_secs,
            );
        }
        std::thread::sleep(POLL);
    }
}

/// The record of the search `directive` started.
fn record_of(
    client: &Client,
    host: &str,
    model: &str,
    directive: &str,
) -> anyhow::Result<OptimizationRecord> {
    let records: Vec<OptimizationRecord> = client
        .get_json("/api/v1/optimizations", &[("host", host), ("model", model)])
        .with_context(|| format!("reading the search of {model} on {host}"))?;
    records.into_iter().find(|r| r.directive == directive).with_context(|| {
        format!(
            "the aggregator no longer keeps the search of {model} on {host} (directive {directive})"
        )
    })
}

/// `flotilla optimize rollback HOST MODEL`: the `optimize_rollback` directive, answered.
fn rollback(client: &Client, host: &str, model: &str, json: bool) -> anyhow::Result<String> {
    let request = DirectiveRequest {
        host: host.to_owned(),
        kind: "optimize_rollback".into(),
        payload: Some(serde_json::json!({"model": model})),
        ttl_secs: Some(60),
        // Under the client's own 60 s request timeout, so a slow reload answers 202, not a
        // transport error.
        wait_secs: Some(45),
    };
    let view: DirectiveView = client
        .post_json("/api/v1/directives", Some(&request))
        .with_context(|| format!("sending optimize_rollback to {host}"))?;
    if view.state != "applied" {
        bail!("optimize_rollback on {host}: {} ({})", view.state, view.message);
    }
    if json {
        super::to_json(&serde_json::json!({"rolled_back": view.message}))
    } else {
        Ok(format!("{}\n", view.message))
    }
}

/// `flotilla optimizations`.
pub fn optimizations(
    client: &Client,
    args: &OptimizationsArgs,
    json: bool,
) -> anyhow::Result<String> {
    let limit = args.limit.to_string();
    let mut query = vec![("limit", limit.as_str())];
    if let Some(h) = &args.host {
        query.push(("host", h));
    }
    if let Some(m) = &args.model {
        query.push(("model", m));
    }
    let records: Vec<OptimizationRecord> =
        client.get_json("/api/v1/optimizations", &query).context("listing the searches")?;
    if let (Some(host), Some(model)) = (&args.host, &args.model) {
        let Some(latest) = records.first() else {
            bail!(
                "no search of {model} on {host} is kept; `flotilla optimize {host} {model}` starts one"
            );
        };
        return render(latest, json);
    }
    if json {
        return super::to_json(&records);
    }
    Ok(list_text(&records))
}

/// One line per search.
fn list_text(records: &[OptimizationRecord]) -> String {
    let mut t = Table::new(["STARTED (UTC)", "HOST", "MODEL", "STRATEGY", "STATE", "RESULT"]);
    for r in records {
        let report = &r.agent["report"];
        let result = match r.state.as_str() {
            "running" if r.agent.is_null() => "starting".to_owned(),
            "running" => progress_line(&r.agent).trim_end().to_owned(),
            "done" => match report["winner"].as_str() {
                Some(w) => format!("winner {w}: {}", report["why"].as_str().unwrap_or("")),
                None => format!("no winner: {}", report["why"].as_str().unwrap_or("")),
            },
            "failed" => r.agent["error"].as_str().unwrap_or("no reason").to_owned(),
            _ => r.note.clone().unwrap_or_default(),
        };
        let result = match (&r.note, r.state.as_str()) {
            (Some(note), "done" | "failed") => format!("{result} ({note})"),
            _ => result,
        };
        t.push_row(vec![
            format_utc(r.requested_ms),
            escape(&r.host).into_owned(),
            escape(&r.model).into_owned(),
            escape(report["strategy"].as_str().unwrap_or("-")).into_owned(),
            r.state.clone(),
            escape(&result).into_owned(),
        ]);
    }
    if records.is_empty() {
        return "No optimization searches kept; `flotilla optimize HOST MODEL` starts one.\n"
            .into();
    }
    t.render()
}

/// `[=====     ] 2/5 onnxruntime host pool`.
fn progress_line(s: &Value) -> String {
    let step = s["step"].as_u64().unwrap_or(0);
    let of = s["of"].as_u64().unwrap_or(0).max(1);
    let width = 20;
    let done = usize::try_from(step.min(of) * width / of).unwrap_or(0);
    let width = usize::try_from(width).unwrap_or(20);
    format!(
        "[{}{}] {step}/{of} {:<40}",
        "=".repeat(done),
        " ".repeat(width - done),
        s["current"].as_str().unwrap_or("")
    )
}

/// A search record as text (or JSON): its report, its progress, or why it ended without one.
fn render(r: &OptimizationRecord, json: bool) -> anyhow::Result<String> {
    if json {
        return super::to_json(r);
    }
    let s = &r.agent;
    let mut text = match r.state.as_str() {
        "running" if s.is_null() => "Starting.\n".to_owned(),
        "running" => format!("Running: {}\n", progress_line(s)),
        "failed" => format!("Failed: {}\n", s["error"].as_str().unwrap_or("no reason")),
        "done" => {
            let mut text = report_text(&s["report"]);
            if let Some(adopted) = s["adopted"].as_str() {
                text.push_str(&format!("Adopted: {}\n", escape(adopted)));
            }
            text
        }
        "lost" => "Lost: the aggregator could not follow this search to its end.\n".to_owned(),
        other => bail!("unknown search state {other:?}"),
    };
    if let Some(note) = &r.note {
        text.push_str(&format!("Note: {}\n", escape(note)));
    }
    Ok(text)
}

fn report_text(r: &Value) -> String {
    let mut out = format!(
        "{} ({} strategy), inputs {}; search took {:.1} s\n",
        r["file"].as_str().unwrap_or("?"),
        r["strategy"].as_str().unwrap_or("?"),
        r["inputs"].as_str().unwrap_or("?"),
        r["took_ms"].as_f64().unwrap_or(0.0) / 1000.0
    );
    let mut t = Table::new([
        "CANDIDATE",
        "OUTCOME",
        "MAX ABS ERR",
        "TOP-1",
        "P99@1 MS",
        "BEST ROWS/S@B",
        "PEAK MIB",
        "WHY",
    ])
    .right_align(&[2, 3, 4, 5, 6]);
    let empty = Vec::new();
    for step in r["steps"].as_array().unwrap_or(&empty) {
        let timings = step["timings"].as_array().unwrap_or(&empty);
        let best = timings
            .iter()
            .max_by(|a, b| {
                a["rows_per_s"]
                    .as_f64()
                    .unwrap_or(0.0)
                    .total_cmp(&b["rows_per_s"].as_f64().unwrap_or(0.0))
            })
            .map_or("-".to_owned(), |t| {
                format!("{:.1}@{}", t["rows_per_s"].as_f64().unwrap_or(0.0), t["batch"])
            });
        let a = &step["agreement"];
        t.push_row(vec![
            escape(step["candidate"].as_str().unwrap_or("?")).into_owned(),
            step["outcome"].as_str().unwrap_or("?").to_owned(),
            a["max_abs_error"].as_f64().map_or("-".to_owned(), |e| format!("{e:.2e}")),
            a["top1_agreement"].as_f64().map_or("-".to_owned(), |x| format!("{:.1} %", x * 100.0)),
            timings
                .first()
                .and_then(|t| t["p99_ms"].as_f64())
                .map_or("-".to_owned(), |p| format!("{p:.3}")),
            best,
            step["memory_bytes"]
                .as_f64()
                .map_or("-".to_owned(), |b| format!("{:.1}", b / 1_048_576.0)),
            escape(step["why"].as_str().unwrap_or("")).into_owned(),
        ]);
    }
    out.push_str(&t.render());
    let batch = r["batch"].as_u64().map(|b| format!(" at batch {b}")).unwrap_or_default();
    match r["winner"].as_str() {
        Some(w) => out.push_str(&format!(
            "Winner: {}{batch}: {}\n",
            escape(w),
            r["why"].as_str().unwrap_or("")
        )),
        None => out.push_str(&format!("No winner: {}\n", r["why"].as_str().unwrap_or(""))),
    }
    let counts = |key: &str| -> Vec<String> {
        r[key]
            .as_array()
            .unwrap_or(&empty)
            .iter()
            .map(|t| {
                format!(
                    "{} -> {:.1} rows/s (p99 {:.3} ms)",
                    t["instances"],
                    t["rows_per_s"].as_f64().unwrap_or(0.0),
                    t["p99_ms"].as_f64().unwrap_or(0.0)
                )
            })
            .collect()
    };
    let instances = counts("instances");
    if !instances.is_empty() {
        let chosen = r["instances_chosen"].as_u64().map_or("none".to_owned(), |k| k.to_string());
        out.push_str(&format!("Instances: {}; chosen: {chosen}\n", instances.join(", ")));
    }
    let baseline = counts("baseline_instances");
    if !baseline.is_empty() {
        out.push_str(&format!("Baseline instances: {}\n", baseline.join(", ")));
    }
    let pareto: Vec<&str> =
        r["pareto"].as_array().unwrap_or(&empty).iter().filter_map(Value::as_str).collect();
    out.push_str(&format!("Pareto set: {}\n", pareto.join("; ")));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(state: &str, agent: Value, note: Option<&str>) -> OptimizationRecord {
        OptimizationRecord {
            host: "h1".into(),
            model: "m".into(),
            directive: "d1".into(),
            requested_ms: 1_700_000_000_000,
            updated_ms: 1_700_000_001_000,
            state: state.into(),
            agent,
            note: note.map(str::to_owned),
        }
    }

    #[test]
    fn progress_reports_and_lists_render() {
        let running = serde_json::json!({"state": "running", "step": 1, "of": 4, "current": "onnxruntime host pool"});
        assert!(
            progress_line(&running).starts_with("[=====               ] 1/4 onnxruntime host pool")
        );
        let done = serde_json::json!({"state": "done", "report": {
            "file": "m/1/model.onnx", "strategy": "latency", "inputs": "synthesized", "took_ms": 1500.0,
            "steps": [{"candidate": "tract", "outcome": "timed", "why": "ok",
                       "agreement": {"max_abs_error": 0.0, "top1_agreement": 1.0},
                       "timings": [{"batch": 1, "p99_ms": 1.5, "rows_per_s": 700.0}], "memory_bytes": 2097152},
                      {"candidate": "tract, model.int8.onnx", "outcome": "rejected", "why": "top-1 agreement 50.00 %",
                       "timings": []}],
            "winner": "tract", "batch": 1, "why": "lowest p99 at one row: 1.500 ms", "pareto": ["tract"],
            "instances": [{"instances": 1, "batch": 1, "rounds": 3, "p50_ms": 1.4, "p99_ms": 1.5, "rows_per_s": 700.0},
                          {"instances": 2, "batch": 1, "rounds": 3, "p50_ms": 1.6, "p99_ms": 1.75, "rows_per_s": 1250.0}],
            "instances_chosen": 2,
            "baseline_instances": [{"instances": 1, "batch": 1, "rounds": 3, "p50_ms": 1.4, "p99_ms": 1.5, "rows_per_s": 700.0}]}});
        let text = render(&record("done", done.clone(), None), false).expect("text");
        assert!(text.contains("search took 1.5 s"), "{text}");
        assert!(text.contains("700.0@1"), "{text}");
        assert!(text.contains("2.0"), "{text}");
        assert!(text.contains("rejected"), "{text}");
        assert!(text.contains("Winner: tract at batch 1: lowest p99"), "{text}");
        assert!(
            text.contains("Instances: 1 -> 700.0 rows/s (p99 1.500 ms), 2 -> 1250.0 rows/s (p99 1.750 ms); chosen: 2"),
            "{text}"
        );
        assert!(text.contains("Baseline instances: 1 -> 700.0 rows/s (p99 1.500 ms)\n"), "{text}");
        let failed = serde_json::json!({"state": "failed", "error": "no file"});
        assert_eq!(
            render(&record("failed", failed, None), false).expect("text"),
            "Failed: no file\n"
        );
        let lost =
            render(&record("lost", Value::Null, Some("agent restarted")), false).expect("text");
        assert!(lost.starts_with("Lost:") && lost.contains("Note: agent restarted"), "{lost}");
        assert!(render(&record("odd", Value::Null, None), false).is_err());

        let list = list_text(&[
            record("running", running, None),
            record("done", done, Some("rolled back: engine tract")),
            record("running", Value::Null, None),
        ]);
        assert!(list.contains("1/4 onnxruntime host pool"), "{list}");
        assert!(
            list.contains(
                "winner tract: lowest p99 at one row: 1.500 ms (rolled back: engine tract)"
            ),
            "{list}"
        );
        assert!(list.contains("latency") && list.contains("starting"), "{list}");
        assert!(list_text(&[]).starts_with("No optimization searches kept"));
    }
}
