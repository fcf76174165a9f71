//! The control commands of the `flotilla` CLI: `directives`, `directive send|show`,
//! `decisions` and `policies`.

use anyhow::{Context as _, bail};
use clap::{Args, Subcommand};

use super::client::Client;
use super::render::{Table, escape, format_utc};
use crate::control::autoscaler::PoliciesView;
use crate::control::policy::{Mode, PolicySet, ScalingPolicy};
use crate::control::store::DecisionRecord;
use crate::views::{DirectiveRequest, DirectiveView};

/// `flotilla directives [--host H] [--state S] [--decision D] [--limit N]`.
#[derive(Debug, Args)]
pub struct DirectivesArgs {
    /// Only this host's
    #[arg(long)]
    pub host: Option<String>,
    /// Only in this state: pending (includes sent), sent, applied, rejected, unsupported, expired
    #[arg(long)]
    pub state: Option<String>,
    /// Only those made by this decision
    #[arg(long)]
    pub decision: Option<String>,
    /// Most to show, newest first
    #[arg(long, default_value_t = 50)]
    pub limit: usize,
}

/// `flotilla directive send|show`.
#[derive(Debug, Subcommand)]
pub enum DirectiveAction {
    /// Send an operator's directive to a host, e.g. `send gpu-7 set_instances model=ocr instances=4`
    Send(SendArgs),
    /// Show one directive's life
    Show {
        /// Directive id
        id: String,
    },
}

/// `flotilla directive send HOST KIND [KEY=VALUE ...]`.
#[derive(Debug, Args)]
pub struct SendArgs {
    /// Host id
    pub host: String,
    /// ping, set_instances, set_batching, load, unload, drain, set_telemetry_interval,
    /// optimize, optimization or optimize_rollback
    pub kind: String,
    /// Payload fields: model=NAME, version=V, instances=N, max_batch_size=N,
    /// max_queue_delay_us=US, adaptive=true|false, min_batch_size=N, latency_slo_ms=MS,
    /// interval_ms=MS
    pub fields: Vec<String>,
    /// Seconds until it expires unapplied
    #[arg(long, default_value_t = 600)]
    pub ttl_secs: u64,
    /// Seconds to wait for the agent's answer (0: return once queued)
    #[arg(long, default_value_t = 10)]
    pub wait_secs: u64,
}

/// Fields of `set_batching` that go inside its `batching` object.
const BATCHING_FIELDS: &[&str] =
    &["max_batch_size", "max_queue_delay_us", "adaptive", "min_batch_size", "latency_slo_ms"];

/// Builds a kind's JSON payload from `KEY=VALUE` words: numbers and booleans are typed, the
/// rest are strings; `set_batching`'s batching keys are nested under `batching`, and every key
/// of `optimize` but `model` under `options`.
pub fn payload(kind: &str, fields: &[String]) -> anyhow::Result<Option<serde_json::Value>> {
    if fields.is_empty() {
        return Ok(None);
    }
    let mut top = serde_json::Map::new();
    let mut batching = serde_json::Map::new();
    for field in fields {
        let Some((key, value)) = field.split_once('=') else {
            bail!("payload field {field:?} is not KEY=VALUE (e.g. model=ocr instances=4)");
        };
        let value = if let Ok(n) = value.parse::<u64>() {
            serde_json::Value::from(n)
        } else if let Ok(b) = value.parse::<bool>() {
            serde_json::Value::from(b)
        } else if let Some(f) =
            value.parse::<f64>().ok().filter(|f| kind == "optimize" && f.is_finite())
        {
            serde_json::Value::from(f)
        } else {
            serde_json::Value::from(value)
        };
        if (kind == "set_batching" && BATCHING_FIELDS.contains(&key))
            || (kind == "optimize" && key != "model")
        {
            batching.insert(key.to_owned(), value);
        } else {
            top.insert(key.to_owned(), value);
        }
    }
    if !batching.is_empty() {
        let nested = if kind == "optimize" { "options" } else { "batching" };
        top.insert(nested.into(), serde_json::Value::Object(batching));
    }
    Ok(Some(serde_json::Value::Object(top)))
}

/// `flotilla directives`.
pub fn directives(client: &Client, args: &DirectivesArgs, json: bool) -> anyhow::Result<String> {
    let limit = args.limit.to_string();
    let mut query: Vec<(&str, &str)> = vec![("limit", &limit)];
    for (key, value) in [("host", &args.host), ("state", &args.state), ("decision", &args.decision)]
    {
        if let Some(v) = value {
            query.push((key, v));
        }
    }
    let list: Vec<DirectiveView> = client.get_json("/api/v1/directives", &query)?;
    if json {
        return super::to_json(&list);
    }
    if list.is_empty() {
        return Ok("No directives match.\n".to_owned());
    }
    Ok(directives_table(&list))
}

/// The directives table: one row per directive, newest first.
pub fn directives_table(list: &[DirectiveView]) -> String {
    let mut t = Table::new([
        "ID", "HOST", "WHAT", "STATE", "CREATED", "SENT", "ANSWERED", "TRIES", "DECISION",
        "MESSAGE",
    ])
    .right_align(&[7]);
    for d in list {
        t.push_row(vec![
            escape(&d.id).into_owned(),
            escape(&d.host).into_owned(),
            escape(&d.summary).into_owned(),
            d.state.clone(),
            format_utc(d.created_ms),
            d.first_sent_ms.map_or_else(|| super::render::ABSENT.to_owned(), format_utc),
            d.answered_ms.map_or_else(|| super::render::ABSENT.to_owned(), format_utc),
            d.attempts.to_string(),
            escape(&d.decision).into_owned(),
            escape(&d.message).into_owned(),
        ]);
    }
    t.render()
}

/// `flotilla directive send|show`.
pub fn directive(client: &Client, action: &DirectiveAction, json: bool) -> anyhow::Result<String> {
    let view: DirectiveView = match action {
        DirectiveAction::Show { id } => client
            .get_json(&format!("/api/v1/directives/{}", super::client::encode_segment(id)), &[])?,
        DirectiveAction::Send(a) => {
            let request = DirectiveRequest {
                host: a.host.clone(),
                kind: a.kind.clone(),
                payload: payload(&a.kind, &a.fields)?,
                ttl_secs: Some(a.ttl_secs),
                wait_secs: Some(a.wait_secs),
            };
            client
                .post_json("/api/v1/directives", Some(&request))
                .context("sending the directive")?
        }
    };
    if json {
        return super::to_json(&view);
    }
    Ok(directives_table(std::slice::from_ref(&view)))
}

/// `flotilla decisions [--model M]`.
pub fn decisions(
    client: &Client,
    model: Option<&str>,
    limit: usize,
    json: bool,
) -> anyhow::Result<String> {
    let limit = limit.to_string();
    let mut query: Vec<(&str, &str)> = vec![("limit", &limit)];
    if let Some(m) = model {
        query.push(("model", m));
    }
    let list: Vec<DecisionRecord> = client.get_json("/api/v1/decisions", &query)?;
    if json {
        return super::to_json(&list);
    }
    if list.is_empty() {
        return Ok("No decisions recorded yet.\n".to_owned());
    }
    let mut t =
        Table::new(["ID", "AT", "SOURCE", "MODEL", "RULE", "ACTED", "DIRECTIVES", "REASON"])
            .right_align(&[6]);
    for d in &list {
        t.push_row(vec![
            escape(&d.id).into_owned(),
            format_utc(d.at_ms),
            escape(&d.source).into_owned(),
            escape(d.model.as_deref().unwrap_or(super::render::ABSENT)).into_owned(),
            escape(&d.rule).into_owned(),
            if d.acted { "yes" } else { "no" }.to_owned(),
            d.directives.len().to_string(),
            escape(&with_outcome(d)).into_owned(),
        ]);
    }
    Ok(t.render())
}

/// The reason, with the fleet actuator's outcome when it was asked.
fn with_outcome(d: &DecisionRecord) -> String {
    let Some(o) = &d.outcome else {
        return if d.rule.starts_with("fleet.") && d.acted {
            format!("{} [actuator: no answer yet]", d.reason)
        } else {
            d.reason.clone()
        };
    };
    let ok = o["ok"].as_bool().unwrap_or(false);
    let detail = o["detail"].as_str().unwrap_or_default();
    format!("{} [actuator: {}{detail}]", d.reason, if ok { "" } else { "FAILED: " })
}

/// One line per policy.
fn policy_line(p: &ScalingPolicy) -> String {
    let t = &p.targets;
    let targets: Vec<String> = [
        ("queue_p95_ms", t.queue_p95_ms),
        ("latency_p95_ms", t.latency_p95_ms),
        ("rps/instance", t.requests_per_instance),
        ("gpu%", t.gpu_util_pct),
        ("cpu%", t.cpu_util_pct),
        ("batch%", t.batch_util_pct),
    ]
    .iter()
    .filter_map(|(k, v)| v.map(|v| format!("{k} {v}")))
    .collect();
    let mode = match (p.mode, p.predictive.forecast_only) {
        (Mode::Reactive, _) => "reactive".to_owned(),
        (Mode::Predictive, true) => format!(
            "predictive (forecast-only), lead {} s, buffer {}%",
            p.predictive.lead_secs, p.predictive.buffer_pct
        ),
        (Mode::Predictive, false) => {
            format!(
                "predictive, lead {} s, buffer {}%",
                p.predictive.lead_secs, p.predictive.buffer_pct
            )
        }
    };
    let hosts = if p.hosts.is_empty() {
        "all hosts".to_owned()
    } else {
        p.hosts.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(",")
    };
    format!(
        "{} -> model {} on {hosts}: {mode}; {}..={} instances, priority {}; targets {}\n",
        escape(&p.name),
        escape(&p.model),
        p.min_instances,
        p.max_instances,
        p.priority,
        targets.join(", ")
    )
}

/// `flotilla policies --check FILE`.
pub fn check_policies(file: &std::path::Path, json: bool) -> anyhow::Result<String> {
    let set = PolicySet::load(file)?;
    if json {
        return super::to_json(&set);
    }
    let mut out = format!("{}: {} policies, all valid.\n", file.display(), set.policies().len());
    for p in set.policies() {
        out.push_str(&policy_line(p));
    }
    if let Some(f) = set.fleet() {
        out.push_str(&format!(
            "fleet actuator: {}\n",
            f.command.as_ref().map_or_else(
                || format!("webhook {}", f.webhook_url.as_deref().unwrap_or_default()),
                |c| format!("command {c:?}")
            )
        ));
    }
    Ok(out)
}

/// `flotilla policies`.
pub fn policies(client: &Client, json: bool) -> anyhow::Result<String> {
    let view: PoliciesView = client.get_json("/api/v1/policies", &[])?;
    if json {
        return super::to_json(&view);
    }
    if view.policies.is_empty() {
        return Ok("No scaling policy is loaded (set control.policy_file in the aggregator's \
                   config).\n"
            .to_owned());
    }
    let mut out = String::new();
    for s in &view.policies {
        out.push_str(&policy_line(&s.policy));
        if s.hosts.is_empty() {
            out.push_str("  (no host it selects serves the model yet)\n\n");
            continue;
        }
        let mut t = Table::new([
            "HOST",
            "AT",
            "REQ/S",
            "NOW",
            "DECIDED",
            "RULE",
            "WOULD_HAVE",
            "FORECAST",
            "FC_ERR",
        ])
        .right_align(&[2, 3, 4, 6, 7, 8]);
        for h in &s.hosts {
            t.push_row(vec![
                escape(&h.host).into_owned(),
                format_utc(h.at_ms),
                format!("{:.1}", h.demand_rps),
                h.current.to_string(),
                h.desired.to_string(),
                format!("{}{}", escape(&h.rule), if h.budget_capped { " (budget)" } else { "" }),
                h.would_have.map_or_else(|| "-".to_owned(), |w| w.to_string()),
                h.forecast_rps.map_or_else(|| "-".to_owned(), |f| format!("{f:.1}")),
                h.forecast_error.map_or_else(|| "-".to_owned(), |e| format!("{:.0}%", e * 100.0)),
            ]);
        }
        out.push_str(&t.render());
        out.push('\n');
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn payload_words_become_the_kinds_json() {
        let words = |w: &[&str]| w.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        let p = payload("set_instances", &words(&["model=ocr", "instances=4"])).unwrap().unwrap();
        assert_eq!(p, serde_json::json!({"model": "ocr", "instances": 4}));
        let p =
            payload("set_batching", &words(&["model=vad", "max_batch_size=8", "adaptive=false"]))
                .unwrap()
                .unwrap();
        assert_eq!(
            p,
            serde_json::json!({"model": "vad", "batching": {"max_batch_size": 8, "adaptive": false}})
        );
        assert!(payload("ping", &[]).unwrap().is_none());
        let e = payload("load", &words(&["ocr"])).unwrap_err().to_string();
        assert!(e.contains("\"ocr\" is not KEY=VALUE"), "{e}");
        // What the CLI builds, the agent's parser reads.
        let p = payload("set_batching", &words(&["model=vad", "max_queue_delay_us=300"])).unwrap();
        let bytes = serde_json::to_vec(&p).unwrap();
        assert!(common::directive::DirectiveBody::parse("set_batching", &bytes).is_ok());
        // optimize nests its options, fractions included.
        let p = payload("optimize", &words(&["model=ocr", "strategy=cost", "cpu_share=0.25"]))
            .unwrap()
            .unwrap();
        assert_eq!(
            p,
            serde_json::json!({"model": "ocr", "options": {"strategy": "cost", "cpu_share": 0.25}})
        );
        let bytes = serde_json::to_vec(&p).unwrap();
        assert!(common::directive::DirectiveBody::parse("optimize", &bytes).is_ok());
    }
}
