//! Applying directives: what each kind changes on this agent (the model repository, a model
//! version's instances and batching, the sampling interval), checked before anything changes.
//!
//! Invariants:
//! - A refused directive changes nothing: every target and value is checked first; a change to
//!   several versions that fails part-way puts the versions already changed back.
//! - Errors name the model, the key and the value, and say what is allowed.

use std::sync::Arc;
use std::time::Duration;

use common::directive::{BatchingChange, DirectiveBody};

use crate::sampler::SampleInterval;
use crate::serving::model::{BatchingUpdate, LoadedModel};
use crate::serving::repository::{ModelState, Repository};

/// Sampling intervals a directive may set (the range of `telemetry.sample_interval_ms`).
pub const INTERVAL_RANGE_MS: std::ops::RangeInclusive<u64> = 100..=3_600_000;

/// What directives act on.
#[derive(Debug, Clone, Default)]
pub struct Actuator {
    /// The model repository, when this agent serves models.
    pub repository: Option<Arc<Repository>>,
    /// The sampling interval.
    pub interval: Option<SampleInterval>,
    /// The optimizer's searches (shared with the inference API), when this agent serves models.
    pub optimizations: Option<Arc<crate::optimizer::jobs::Jobs>>,
}

impl Actuator {
    /// Applies `body`: `Ok` says what changed, `Err` why nothing did.
    pub async fn apply(&self, body: &DirectiveBody) -> Result<String, String> {
        match body {
            DirectiveBody::Ping => Ok("pong".to_owned()),
            DirectiveBody::SetInstances { model, version, instances } => {
                let versions = self.versions(model, version.as_deref())?;
                let n = usize::try_from(*instances).unwrap_or(usize::MAX);
                let mut done: Vec<(Arc<LoadedModel>, usize)> = Vec::new();
                for m in &versions {
                    match m.set_instances(n) {
                        Ok((from, _)) => done.push((m.clone(), from)),
                        Err(e) => {
                            for (m, from) in done {
                                let _ = m.set_instances(from);
                            }
                            return Err(format!("model {model:?} version {}: {e}", m.version));
                        }
                    }
                }
                Ok(done
                    .iter()
                    .map(|(m, from)| format!("{model}@{} instances {from} -> {n}", m.version))
                    .collect::<Vec<_>>()
                    .join("; "))
            }
            DirectiveBody::SetBatching { model, version, batching } => {
                let versions = self.versions(model, version.as_deref())?;
                let update = batching_update(batching);
                let mut done: Vec<(Arc<LoadedModel>, BatchingUpdate)> = Vec::new();
                let mut changes = Vec::new();
                for m in &versions {
                    let before = m.batching();
                    match m.set_batching(&update) {
                        Ok(what) => {
                            changes.push(format!("{model}@{}: {what}", m.version));
                            done.push((m.clone(), restore_of(&before)));
                        }
                        Err(e) => {
                            for (m, previous) in done {
                                let _ = m.set_batching(&previous);
                            }
                            return Err(format!("model {model:?} version {}: {e}", m.version));
                        }
                    }
                }
                Ok(changes.join("; "))
            }
            DirectiveBody::Load { model } => {
                let repo = self.repository()?;
                repo.load(model).await.map_err(|e| format!("loading model {model:?}: {e}"))?;
                let versions = self.versions(model, None)?;
                let list: Vec<&str> = versions.iter().map(|m| m.version.as_str()).collect();
                Ok(format!("model {model:?} loaded, versions {}", list.join(", ")))
            }
            DirectiveBody::Unload { model } => {
                self.repository()?.unload(model).map_err(|e| e.to_string())?;
                Ok(format!("model {model:?} unloaded"))
            }
            DirectiveBody::Drain { model } => {
                let versions = self.versions(model, None)?;
                let mut queued = 0;
                for m in &versions {
                    queued += m.queued();
                    m.drain();
                }
                Ok(format!(
                    "model {model:?} draining: new requests refused, {queued} queued finish"
                ))
            }
            DirectiveBody::SetTelemetryInterval { interval_ms } => {
                let Some(interval) = &self.interval else {
                    return Err("this agent has no sampler to change".to_owned());
                };
                if !INTERVAL_RANGE_MS.contains(interval_ms) {
                    return Err(format!(
                        "interval_ms = {interval_ms} is out of range; use {}..={}",
                        INTERVAL_RANGE_MS.start(),
                        INTERVAL_RANGE_MS.end()
                    ));
                }
                let before = interval.set(Duration::from_millis(*interval_ms));
                Ok(format!("telemetry interval {} ms -> {interval_ms} ms", before.as_millis()))
            }
            DirectiveBody::Optimize { model, options } => {
                let (repository, jobs) = self.optimizer()?;
                let (name, spec) = crate::optimizer::start::spec_for(
                    repository,
                    model,
                    options,
                    crate::optimizer::footprint::agent_probe(),
                )
                .map_err(|e| match e {
                    crate::optimizer::start::StartError::Unknown(lookup) => lookup.to_string(),
                    crate::optimizer::start::StartError::Bad(why) => why,
                })?;
                let strategy = spec.strategy.name();
                let adopter = crate::optimizer::jobs::Adopter {
                    repository: repository.clone(),
                    runtime: tokio::runtime::Handle::current(),
                };
                jobs.start(&name, spec, Some(adopter))?;
                Ok(format!(
                    "search of model {name:?} started (strategy {strategy}); the `optimization` directive shows its progress and report"
                ))
            }
            DirectiveBody::OptimizeRollback { model } => {
                let (repository, jobs) = self.optimizer()?;
                jobs.rollback(repository, model).await
            }
            DirectiveBody::Optimization { model } => {
                let (_, jobs) = self.optimizer()?;
                let state = jobs.status(model).ok_or_else(|| {
                    format!("no search of model {model:?} has run on this agent; send `optimize` to start one")
                })?;
                serde_json::to_string(&state)
                    .map_err(|e| format!("encoding the search's state: {e}"))
            }
        }
    }

    fn optimizer(&self) -> Result<(&Arc<Repository>, &Arc<crate::optimizer::jobs::Jobs>), String> {
        let repository = self.repository()?;
        let jobs = self.optimizations.as_ref().ok_or_else(|| {
            "this agent runs no optimizer (its config has no [serving])".to_owned()
        })?;
        Ok((repository, jobs))
    }

    fn repository(&self) -> Result<&Arc<Repository>, String> {
        self.repository
            .as_ref()
            .ok_or_else(|| "this agent serves no models (its config has no [serving])".to_owned())
    }

    /// The loaded versions a directive is about: the one named, or every loaded one.
    fn versions(
        &self,
        model: &str,
        version: Option<&str>,
    ) -> Result<Vec<Arc<LoadedModel>>, String> {
        let repo = self.repository()?;
        if let Some(v) = version {
            return repo.get(model, Some(v)).map(|m| vec![m]).map_err(|e| e.to_string());
        }
        match repo.state(model) {
            Some(ModelState::Ready(versions)) if !versions.is_empty() => Ok(versions),
            Some(ModelState::Ready(_)) | None => {
                // Let the repository phrase "unknown" the way every API does.
                repo.get(model, None).map(|m| vec![m]).map_err(|e| e.to_string())
            }
            Some(ModelState::Unavailable(reason)) => {
                Err(format!("model {model:?} is not loaded: {reason}"))
            }
        }
    }
}

fn batching_update(c: &BatchingChange) -> BatchingUpdate {
    BatchingUpdate {
        max_batch_size: c.max_batch_size.map(|n| usize::try_from(n).unwrap_or(usize::MAX)),
        max_queue_delay: c.max_queue_delay_us.map(Duration::from_micros),
        adaptive: c.adaptive,
        min_batch_size: c.min_batch_size.map(|n| usize::try_from(n).unwrap_or(usize::MAX)),
        latency_slo: c.latency_slo_ms.map(Duration::from_millis),
    }
}

/// The update that puts `before` back.
pub(crate) fn restore_of(before: &crate::serving::model::BatchingNow) -> BatchingUpdate {
    BatchingUpdate {
        max_batch_size: Some(before.adaptive_max_batch_size),
        max_queue_delay: Some(before.adaptive_max_queue_delay),
        adaptive: Some(before.adaptive),
        min_batch_size: Some(before.adaptive_min_batch_size),
        latency_slo: Some(before.latency_slo.unwrap_or(Duration::ZERO)),
    }
}
