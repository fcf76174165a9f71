//! `flotilla optimize HOST MODEL` and `flotilla optimizations HOST MODEL`: a model optimization
//! search on an agent, started with the `optimize` directive and followed with `optimization`
//! directives (each answered with the search's state: progress, then its report), through the
//! admin API's directive endpoint.

use std::io::Write as _;
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::Args;
use common::directive::OptimizeOptions;
use serde_json::Value;

use super::client::Client;
use super::render::{Table, escape};
use crate::views::{DirectiveRequest, DirectiveView};

/// Between two `optimization` directives while following a search (each is a directive the
/// aggregator records, so not too often).
const POLL: Duration = Duration::from_secs(2);

/// `flotilla optimize HOST MODEL [options]`.
#[derive(Debug, Args)]
pub struct OptimizeArgs {
    /// Host id
    pub host: String,
    /// Model name
    pub model: String,
    /// latency, throughput, memory, cost or balanced
    #[arg(long, default_value = "balanced")]
    pub strategy: String,
    /// Largest share of classifier rows whose top-1 class may change (0..=1; agent default 0.01)
    #[arg(long)]
    pub max_accuracy_loss: Option<f64>,
    /// Largest relative error against the baseline (agent default 0.01)
    #[arg(long)]
    pub max_rel_error: Option<f64>,
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
    /// Switch the model to the winner when the search ends (`--rollback` undoes it)
    #[arg(long)]
    pub apply: bool,
    /// Instead of searching, put back what the last adopted search of the model replaced
    #[arg(long, conflicts_with = "apply")]
    pub rollback: bool,
    /// Return once the search has started instead of following it to its report
    #[arg(long)]
    pub no_follow: bool,
    /// Give up following after this many seconds (the search goes on)
    #[arg(long, default_value_t = 1800)]
    pub follow_secs: u64,
}

/// `flotilla optimizations HOST MODEL`.
#[derive(Debug, Args)]
pub struct OptimizationsArgs {
    /// Host id
    pub host: String,
    /// Model name
    pub model: String,
}

/// Sends `kind` for `model` to `host` and waits for the answer; an answer other than
/// `applied` is an error with the agent's reason.
fn ask(client: &Client, host: &str, kind: &str, payload: Value) -> anyhow::Result<String> {
    let request = DirectiveRequest {
        host: host.to_owned(),
        kind: kind.to_owned(),
        payload: Some(payload),
        ttl_secs: Some(60),
        wait_secs: Some(30),
    };
    let view: DirectiveView = client
        .post_json("/api/v1/directives", Some(&request))
        .with_context(|| format!("sending {kind} to {host}"))?;
    if view.state != "applied" {
        bail!("{kind} on {host}: {} ({})", view.state, view.message);
    }
    Ok(view.message)
}

/// The search's state as the agent reports it.
fn state(client: &Client, host: &str, model: &str) -> anyhow::Result<Value> {
    let message = ask(client, host, "optimization", serde_json::json!({"model": model}))?;
    serde_json::from_str(&message)
        .with_context(|| format!("the agent's answer is not a search state: {message}"))
}

/// `flotilla optimize`.
pub fn optimize(client: &Client, args: &OptimizeArgs, json: bool) -> anyhow::Result<String> {
    if args.rollback {
        let what =
            ask(client, &args.host, "optimize_rollback", serde_json::json!({"model": args.model}))?;
        return if json {
            super::to_json(&serde_json::json!({"rolled_back": what}))
        } else {
            Ok(format!("{what}\n"))
        };
    }
    let options = OptimizeOptions {
        apply: args.apply.then_some(true),
        strategy: Some(args.strategy.clone()),
        max_accuracy_loss: args.max_accuracy_loss,
        max_abs_error: None,
        max_rel_error: args.max_rel_error,
        latency_slo_ms: args.latency_slo_ms,
        price_per_hour: args.price_per_hour,
        cpu_share: args.cpu_share,
        rounds: args.rounds,
        max_batch: args.max_batch,
    };
    let payload = serde_json::json!({"model": args.model, "options": options});
    let started = ask(client, &args.host, "optimize", payload)?;
    if args.no_follow {
        return Ok(format!("{started}\n"));
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(args.follow_secs);
    let mut stderr = std::io::stderr();
    loop {
        let s = state(client, &args.host, &args.model)?;
        match s["state"].as_str() {
            Some("running") => {
                if !json {
                    let _ = write!(stderr, "\r{}", progress_line(&s));
                    let _ = stderr.flush();
                }
                if std::time::Instant::now() >= deadline {
                    bail!(
                        "the search of {} on {} is still running after {} s; `flotilla optimizations {} {}` shows it later",
                        args.model,
                        args.host,
                        args.follow_secs,
                        args.host,
                        args.model
                    );
                }
                std::thread::sleep(POLL);
            }
            _ => {
                if !json {
                    let _ = writeln!(stderr);
                }
                return render(&s, json);
            }
        }
    }
}

/// `flotilla optimizations`.
pub fn optimizations(
    client: &Client,
    args: &OptimizationsArgs,
    json: bool,
) -> anyhow::Result<String> {
    render(&state(client, &args.host, &args.model)?, json)
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

/// A search state as text (or JSON).
fn render(s: &Value, json: bool) -> anyhow::Result<String> {
    if json {
        return super::to_json(s);
    }
    match s["state"].as_str() {
        Some("running") => Ok(format!("Running: {}\n", progress_line(s))),
        Some("failed") => Ok(format!("Failed: {}\n", s["error"].as_str().unwrap_or("no reason"))),
        Some("done") => {
            let mut text = report_text(&s["report"]);
            if let Some(adopted) = s["adopted"].as_str() {
                text.push_str(&format!("Adopted: {}\n", escape(adopted)));
            }
            Ok(text)
        }
        _ => bail!("the agent answered an unknown search state: {s}"),
    }
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
    let pareto: Vec<&str> =
        r["pareto"].as_array().unwrap_or(&empty).iter().filter_map(Value::as_str).collect();
    out.push_str(&format!("Pareto set: {}\n", pareto.join("; ")));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_and_reports_render() {
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
            "winner": "tract", "batch": 1, "why": "lowest p99 at one row: 1.500 ms", "pareto": ["tract"]}});
        let text = render(&done, false).expect("text");
        assert!(text.contains("search took 1.5 s"), "{text}");
        assert!(text.contains("700.0@1"), "{text}");
        assert!(text.contains("2.0"), "{text}");
        assert!(text.contains("rejected"), "{text}");
        assert!(text.contains("Winner: tract at batch 1: lowest p99"), "{text}");
        let failed = serde_json::json!({"state": "failed", "error": "no file"});
        assert_eq!(render(&failed, false).expect("text"), "Failed: no file\n");
        assert!(render(&serde_json::json!({"state": "odd"}), false).is_err());
    }
}
