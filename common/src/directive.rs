//! Directive kinds: the typed body of a `Directive` frame, shared by the aggregator that makes
//! them and the agent that applies them.
//!
//! On the wire a directive is a kind name (`Directive.kind`) and a JSON payload
//! (`Directive.payload`); [`DirectiveBody::kind`] and [`DirectiveBody::payload`] build them and
//! [`DirectiveBody::parse`] reads them back, naming the kind and the field on error. Unknown
//! fields are refused rather than ignored: an agent that silently dropped a field it does not
//! know would apply something other than what was decided.

use serde::{Deserialize, Serialize};

/// Every kind name this version knows, for help texts and errors.
pub const KINDS: &[&str] = &[
    "ping",
    "set_instances",
    "set_batching",
    "load",
    "unload",
    "drain",
    "set_telemetry_interval",
    "optimize",
    "optimization",
    "optimize_rollback",
];

/// What a model optimization search is asked for (every member optional; the agent's
/// defaults are in `docs/optimizer.md`). The same shape is the body of the agent's
/// `POST /v2/models/M/optimize`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OptimizeOptions {
    /// `latency`, `throughput`, `memory`, `cost` or `balanced`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strategy: Option<String>,
    /// Largest share of classifier rows whose top-1 class may change, 0..=1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_accuracy_loss: Option<f64>,
    /// Largest absolute error against the baseline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_abs_error: Option<f64>,
    /// Largest relative error against the baseline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_rel_error: Option<f64>,
    /// Smallest gain over the baseline, in the strategy's own measure, worth switching for
    /// (0.1: 10 %); a winner that gains less leaves the model as it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_improvement: Option<f64>,
    /// p99 a batch size must meet, ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency_slo_ms: Option<f64>,
    /// The host's price per hour, for the cost strategy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub price_per_hour: Option<f64>,
    /// Share of one core the search may use, (0, 1].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_share: Option<f64>,
    /// Timed runs per batch size.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rounds: Option<usize>,
    /// Largest batch size searched.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_batch: Option<usize>,
    /// Switch the model to the winner when the search ends (`optimize_rollback` undoes it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub apply: Option<bool>,
}

/// A batching change: only the fields given change.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchingChange {
    /// Most rows per batch (0: every request alone; the model must allow batching for more).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_batch_size: Option<u32>,
    /// Longest the oldest request waits for company, microseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_queue_delay_us: Option<u64>,
    /// Whether the agent's adaptive controller tunes size and delay within the model's bounds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adaptive: Option<bool>,
    /// The adaptive controller's smallest batch size.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_batch_size: Option<u32>,
    /// The p95 latency objective the adaptive controller keeps, ms (0 clears it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency_slo_ms: Option<u64>,
}

/// What a directive asks an agent to do.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum DirectiveBody {
    /// Answer, changing nothing (reachability and round-trip checks).
    Ping,
    /// Run this many instances of a model (every loaded version, or the one named).
    SetInstances {
        /// Model name.
        model: String,
        /// Version; `None` for every loaded version.
        version: Option<String>,
        /// Instances, at least 1.
        instances: u32,
    },
    /// Change a model's batching settings.
    SetBatching {
        /// Model name.
        model: String,
        /// Version; `None` for every loaded version.
        version: Option<String>,
        /// What changes.
        batching: BatchingChange,
    },
    /// Load (or reload) a model from the agent's repository.
    Load {
        /// Model name.
        model: String,
    },
    /// Stop serving a model; queued requests are answered "unloaded, retry elsewhere".
    Unload {
        /// Model name.
        model: String,
    },
    /// Stop taking new requests for a model and finish the queued ones.
    Drain {
        /// Model name.
        model: String,
    },
    /// Sample host and model telemetry this often.
    SetTelemetryInterval {
        /// Milliseconds, 100..=3,600,000 (the range of `telemetry.sample_interval_ms`).
        interval_ms: u64,
    },
    /// Start an optimization search of a model in the background (answered at once).
    Optimize {
        /// Model name.
        model: String,
        /// What to search for.
        options: OptimizeOptions,
    },
    /// Report where a model's optimization search stands: its progress, or its report.
    Optimization {
        /// Model name.
        model: String,
    },
    /// Put back what the last adopted optimization of a model replaced.
    OptimizeRollback {
        /// Model name.
        model: String,
    },
}

/// The payload of `optimize`: `{"model": M, "options": {...}}`.
#[derive(Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct OptimizePayload {
    model: String,
    #[serde(default)]
    options: OptimizeOptions,
}

/// The payload shapes, one per kind (the kind itself travels in `Directive.kind`).
#[derive(Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct ModelPayload {
    model: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    instances: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    batching: Option<BatchingChange>,
}

#[derive(Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct IntervalPayload {
    interval_ms: u64,
}

/// Why a directive's kind or payload could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BodyError {
    /// The kind is not one this version knows.
    #[error("unknown directive kind {0:?}; known kinds: {known}", known = KINDS.join(", "))]
    UnknownKind(String),
    /// The payload is not the kind's JSON shape.
    #[error("directive {kind}: bad payload: {reason}")]
    Payload {
        /// The kind.
        kind: String,
        /// What was wrong (names the field).
        reason: String,
    },
}

impl DirectiveBody {
    /// The kind name sent in `Directive.kind`.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Ping => "ping",
            Self::SetInstances { .. } => "set_instances",
            Self::SetBatching { .. } => "set_batching",
            Self::Load { .. } => "load",
            Self::Unload { .. } => "unload",
            Self::Drain { .. } => "drain",
            Self::SetTelemetryInterval { .. } => "set_telemetry_interval",
            Self::Optimize { .. } => "optimize",
            Self::Optimization { .. } => "optimization",
            Self::OptimizeRollback { .. } => "optimize_rollback",
        }
    }

    /// The model it is about, if any.
    pub fn model(&self) -> Option<&str> {
        match self {
            Self::SetInstances { model, .. }
            | Self::SetBatching { model, .. }
            | Self::Load { model }
            | Self::Unload { model }
            | Self::Drain { model }
            | Self::Optimize { model, .. }
            | Self::Optimization { model }
            | Self::OptimizeRollback { model } => Some(model),
            Self::Ping | Self::SetTelemetryInterval { .. } => None,
        }
    }

    /// The JSON payload sent in `Directive.payload` (empty for `ping`).
    pub fn payload(&self) -> Vec<u8> {
        let model = |model: &str| ModelPayload {
            model: model.to_owned(),
            version: None,
            instances: None,
            batching: None,
        };
        let json = match self {
            Self::Ping => return Vec::new(),
            Self::SetInstances { model: m, version, instances } => {
                serde_json::to_vec(&ModelPayload {
                    version: version.clone(),
                    instances: Some(*instances),
                    ..model(m)
                })
            }
            Self::SetBatching { model: m, version, batching } => {
                serde_json::to_vec(&ModelPayload {
                    version: version.clone(),
                    batching: Some(batching.clone()),
                    ..model(m)
                })
            }
            Self::Load { model: m }
            | Self::Unload { model: m }
            | Self::Drain { model: m }
            | Self::Optimization { model: m }
            | Self::OptimizeRollback { model: m } => serde_json::to_vec(&model(m)),
            Self::Optimize { model, options } => serde_json::to_vec(&OptimizePayload {
                model: model.clone(),
                options: options.clone(),
            }),
            Self::SetTelemetryInterval { interval_ms } => {
                serde_json::to_vec(&IntervalPayload { interval_ms: *interval_ms })
            }
        };
        // Plain structs of strings and numbers always serialize.
        json.unwrap_or_default()
    }

    /// Reads a kind and its payload back.
    pub fn parse(kind: &str, payload: &[u8]) -> Result<Self, BodyError> {
        let bad = |reason: String| BodyError::Payload { kind: kind.to_owned(), reason };
        let model_payload = || -> Result<ModelPayload, BodyError> {
            serde_json::from_slice::<ModelPayload>(payload).map_err(|e| bad(e.to_string()))
        };
        let body = match kind {
            "ping" => Self::Ping,
            "set_instances" => {
                let p = model_payload()?;
                let instances =
                    p.instances.ok_or_else(|| bad("missing field `instances`".into()))?;
                Self::SetInstances { model: p.model, version: p.version, instances }
            }
            "set_batching" => {
                let p = model_payload()?;
                let batching = p.batching.ok_or_else(|| bad("missing field `batching`".into()))?;
                Self::SetBatching { model: p.model, version: p.version, batching }
            }
            "load" | "unload" | "drain" | "optimization" | "optimize_rollback" => {
                let p = model_payload()?;
                if p.instances.is_some() || p.batching.is_some() || p.version.is_some() {
                    return Err(bad(format!("{kind} takes only `model`")));
                }
                match kind {
                    "load" => Self::Load { model: p.model },
                    "unload" => Self::Unload { model: p.model },
                    "optimization" => Self::Optimization { model: p.model },
                    "optimize_rollback" => Self::OptimizeRollback { model: p.model },
                    _ => Self::Drain { model: p.model },
                }
            }
            "optimize" => {
                let p: OptimizePayload =
                    serde_json::from_slice(payload).map_err(|e| bad(e.to_string()))?;
                Self::Optimize { model: p.model, options: p.options }
            }
            "set_telemetry_interval" => {
                let p: IntervalPayload =
                    serde_json::from_slice(payload).map_err(|e| bad(e.to_string()))?;
                Self::SetTelemetryInterval { interval_ms: p.interval_ms }
            }
            other => return Err(BodyError::UnknownKind(other.to_owned())),
        };
        Ok(body)
    }

    /// A one-line summary for logs and the CLI, e.g. `set_instances ocr=4`.
    pub fn summary(&self) -> String {
        let at = |model: &str, version: &Option<String>| match version {
            Some(v) => format!("{model}@{v}"),
            None => model.to_owned(),
        };
        match self {
            Self::Ping => "ping".to_owned(),
            Self::SetInstances { model, version, instances } => {
                format!("set_instances {}={instances}", at(model, version))
            }
            Self::SetBatching { model, version, batching } => {
                let mut parts = Vec::new();
                if let Some(n) = batching.max_batch_size {
                    parts.push(format!("max_batch_size={n}"));
                }
                if let Some(us) = batching.max_queue_delay_us {
                    parts.push(format!("max_queue_delay_us={us}"));
                }
                if let Some(a) = batching.adaptive {
                    parts.push(format!("adaptive={a}"));
                }
                if let Some(n) = batching.min_batch_size {
                    parts.push(format!("min_batch_size={n}"));
                }
                if let Some(ms) = batching.latency_slo_ms {
                    parts.push(format!("latency_slo_ms={ms}"));
                }
                format!("set_batching {} {}", at(model, version), parts.join(" "))
            }
            Self::Load { model } => format!("load {model}"),
            Self::Unload { model } => format!("unload {model}"),
            Self::Drain { model } => format!("drain {model}"),
            Self::SetTelemetryInterval { interval_ms } => {
                format!("set_telemetry_interval {interval_ms}ms")
            }
            Self::Optimize { model, options } => {
                format!("optimize {model} {}", options.strategy.as_deref().unwrap_or("balanced"))
            }
            Self::Optimization { model } => format!("optimization {model}"),
            Self::OptimizeRollback { model } => format!("optimize_rollback {model}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_round_trips_through_kind_and_payload() {
        let bodies = [
            DirectiveBody::Ping,
            DirectiveBody::SetInstances { model: "ocr".into(), version: None, instances: 3 },
            DirectiveBody::SetBatching {
                model: "vad".into(),
                version: Some("2".into()),
                batching: BatchingChange {
                    max_batch_size: Some(8),
                    max_queue_delay_us: Some(500),
                    adaptive: Some(false),
                    min_batch_size: Some(2),
                    latency_slo_ms: Some(20),
                },
            },
            DirectiveBody::Load { model: "a".into() },
            DirectiveBody::Unload { model: "a".into() },
            DirectiveBody::Drain { model: "a".into() },
            DirectiveBody::SetTelemetryInterval { interval_ms: 2000 },
            DirectiveBody::Optimize {
                model: "ocr".into(),
                options: OptimizeOptions {
                    strategy: Some("throughput".into()),
                    max_accuracy_loss: Some(0.01),
                    latency_slo_ms: Some(25.0),
                    cpu_share: Some(0.5),
                    rounds: Some(20),
                    ..OptimizeOptions::default()
                },
            },
            DirectiveBody::Optimization { model: "ocr".into() },
            DirectiveBody::OptimizeRollback { model: "ocr".into() },
        ];
        assert_eq!(bodies.len(), KINDS.len());
        for b in bodies {
            assert!(KINDS.contains(&b.kind()));
            assert_eq!(DirectiveBody::parse(b.kind(), &b.payload()), Ok(b));
        }
    }

    #[test]
    fn an_optimize_payload_refuses_unknown_options_by_name() {
        let e = DirectiveBody::parse("optimize", br#"{"model":"m","options":{"speed":1}}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("optimize") && e.contains("unknown field `speed`"), "{e}");
        let bare = DirectiveBody::parse("optimize", br#"{"model":"m"}"#).unwrap();
        assert_eq!(
            bare,
            DirectiveBody::Optimize { model: "m".into(), options: OptimizeOptions::default() }
        );
    }

    #[test]
    fn bad_payloads_name_the_kind_and_field() {
        let e = DirectiveBody::parse("set_instances", br#"{"model":"m"}"#).unwrap_err();
        assert_eq!(
            e.to_string(),
            "directive set_instances: bad payload: missing field `instances`"
        );
        let e = DirectiveBody::parse("set_instances", br#"{"model":"m","instances":-1}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("invalid value: integer `-1`"), "{e}");
        let e = DirectiveBody::parse("load", br#"{"model":"m","colour":"red"}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown field `colour`"), "{e}");
        let e = DirectiveBody::parse("reboot", b"").unwrap_err().to_string();
        assert!(e.contains("unknown directive kind \"reboot\"") && e.contains("set_instances"));
        assert!(DirectiveBody::parse("set_batching", b"\xff").is_err());
    }
}
