//! The control commands of the `flotilla` CLI: `directives`, `directive send|show` and
//! `decisions`.

use anyhow::{Context as _, bail};
use clap::{Args, Subcommand};

use super::client::Client;
use super::render::{Table, escape, format_utc};
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
    /// ping, set_instances, set_batching, load, unload, drain or set_telemetry_interval
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
/// rest are strings; `set_batching`'s batching keys are nested under `batching`.
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
        } else {
            serde_json::Value::from(value)
        };
        if kind == "set_batching" && BATCHING_FIELDS.contains(&key) {
            batching.insert(key.to_owned(), value);
        } else {
            top.insert(key.to_owned(), value);
        }
    }
    if !batching.is_empty() {
        top.insert("batching".into(), serde_json::Value::Object(batching));
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
            escape(&d.reason).into_owned(),
        ]);
    }
    Ok(t.render())
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
    }
}
