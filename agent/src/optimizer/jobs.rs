//! Searches on this agent: one at a time (so the CPU share a search keeps to is the agent's,
//! not each model's), on its own thread, with its progress while it runs and its report (or why
//! it failed) afterwards, kept per model; and adopting a winner, with its rollback.
//!
//! Adoption (a search started with `apply`): the winner's engine, threads and file become the
//! model's engine override in the repository and the model is reloaded; then the winner's batch
//! size, where the strategy chose one, becomes its `max_batch_size`, and the instance count
//! the search chose, where it measured one, its instances. What it replaced (the previous
//! override, the batching and the instance count in force) is kept per model, and [`Jobs::rollback`] puts
//! it back (reloading again). The override lives in memory: an agent restart serves the model's
//! config again. A reload that fails puts the previous override back and reloads that.
//!
//! Bounds: one entry per model name that was ever searched (the repository bounds the names;
//! a new search replaces the model's last result). A search is never cancelled by unloading
//! the model (it reads the files, not the served instance); a search whose thread panics ends
//! as failed with the panic's message, so nobody waits on it forever.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;

use super::footprint::parse_engine;
use super::search::{EngineChoice, Report, Spec, run};
use crate::serving::model::{BatchingNow, BatchingUpdate};
use crate::serving::model_config::Backend;
use crate::serving::repository::{EngineOverride, Repository};
use crate::serving::threads::OrtThreads;

/// Where a model's search stands.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "state", rename_all = "lowercase")]
pub enum JobState {
    /// Running: on candidate `step` of `of`, named `current`.
    Running {
        /// When it started, Unix ms.
        started_unix_ms: u64,
        /// Candidates done.
        step: usize,
        /// Candidates in all.
        of: usize,
        /// What it is on now.
        current: String,
    },
    /// Finished, with its report.
    Done {
        /// When it started, Unix ms.
        started_unix_ms: u64,
        /// The report.
        report: Box<Report>,
        /// What adopting the winner changed, or why it did not (searches started with `apply`).
        #[serde(skip_serializing_if = "Option::is_none")]
        adopted: Option<String>,
    },
    /// Ended without a report.
    Failed {
        /// When it started, Unix ms.
        started_unix_ms: u64,
        /// Why.
        error: String,
    },
}

/// What adopting a winner needs: the repository to reload from and the runtime to reload on.
#[derive(Debug, Clone)]
pub struct Adopter {
    /// The model repository.
    pub repository: Arc<Repository>,
    /// The agent's runtime (the search thread reloads through it).
    pub runtime: tokio::runtime::Handle,
}

/// What an adoption replaced.
#[derive(Debug, Clone)]
struct Previous {
    engine: Option<EngineOverride>,
    batching: BatchingNow,
    instances: usize,
}

/// The searches of this agent.
#[derive(Debug, Default)]
pub struct Jobs {
    by_model: Mutex<HashMap<String, JobState>>,
    previous: Mutex<HashMap<String, Previous>>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(0))
}

impl Jobs {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, JobState>> {
        self.by_model.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Starts a search of `model`; refused while any search runs on this agent. With
    /// `spec.apply`, `adopter` switches the model to the winner when it ends.
    pub fn start(
        self: &Arc<Self>,
        model: &str,
        spec: Spec,
        adopter: Option<Adopter>,
    ) -> Result<(), String> {
        let started_unix_ms = now_ms();
        {
            let mut jobs = self.lock();
            let running = jobs.iter().find_map(|(name, state)| match state {
                JobState::Running { step, of, current, .. } => Some((name, step, of, current)),
                _ => None,
            });
            if let Some((name, step, of, current)) = running {
                return Err(format!(
                    "a search of {name:?} is already running on this agent (step {step} of {of}: {current}); one runs at a time, so wait for its report"
                ));
            }
            jobs.insert(
                model.to_owned(),
                JobState::Running { started_unix_ms, step: 0, of: 0, current: "starting".into() },
            );
        }
        let jobs = self.clone();
        let name = model.to_owned();
        let spawned =
            std::thread::Builder::new().name(format!("optimize-{model}")).spawn(move || {
                let progress_jobs = jobs.clone();
                let progress_name = name.clone();
                let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    run(&spec, &mut |step, of, current| {
                        progress_jobs.lock().insert(
                            progress_name.clone(),
                            JobState::Running {
                                started_unix_ms,
                                step,
                                of,
                                current: current.to_owned(),
                            },
                        );
                    })
                }));
                let state = match outcome {
                    Ok(Ok(report)) => {
                        let adopted = match (&adopter, spec.apply) {
                            (_, false) => None,
                            (None, true) => {
                                Some("not adopted: this agent cannot reload models".to_owned())
                            }
                            // A panic while adopting ends as a reason, not a search stuck running.
                            (Some(a), true) => Some(
                                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                                    jobs.adopt(a, &name, &report)
                                }))
                                .unwrap_or_else(|_| Err("adopting panicked".to_owned()))
                                .unwrap_or_else(|why| format!("not adopted: {why}")),
                            ),
                        };
                        JobState::Done { started_unix_ms, report: Box::new(report), adopted }
                    }
                    Ok(Err(error)) => JobState::Failed { started_unix_ms, error },
                    Err(panic) => JobState::Failed {
                        started_unix_ms,
                        error: format!(
                            "the search panicked: {}",
                            panic
                                .downcast_ref::<String>()
                                .map(String::as_str)
                                .or_else(|| panic.downcast_ref::<&str>().copied())
                                .unwrap_or("no message")
                        ),
                    },
                };
                jobs.lock().insert(name, state);
            });
        if let Err(e) = spawned {
            let error = format!("could not start the search thread: {e}");
            self.lock().insert(
                model.to_owned(),
                JobState::Failed { started_unix_ms, error: error.clone() },
            );
            return Err(error);
        }
        Ok(())
    }

    /// The model's search, if one ever ran.
    pub fn status(&self, model: &str) -> Option<JobState> {
        self.lock().get(model).cloned()
    }

    fn previous(&self) -> std::sync::MutexGuard<'_, HashMap<String, Previous>> {
        self.previous.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Switches `model` to the report's winner (on the search thread).
    fn adopt(&self, a: &Adopter, model: &str, report: &Report) -> Result<String, String> {
        let winner = report.winner.as_deref().ok_or("the search has no winner")?;
        let step = report
            .steps
            .iter()
            .find(|s| s.candidate == winner)
            .ok_or_else(|| format!("the winner {winner:?} is not among the steps"))?;
        let served = a.repository.get(model, None).map_err(|e| e.to_string())?;
        let (backend, intra_op_threads, graph_optimization, tract) =
            match parse_engine(&step.engine)? {
                EngineChoice::Tract(precision, symbolic) => {
                    (Backend::Tract, None, None, Some((precision, symbolic)))
                }
                EngineChoice::Onnxruntime(threads, level) => {
                    let own = match threads {
                        OrtThreads::HostPool => None,
                        OrtThreads::Own(n) => Some(n),
                    };
                    (Backend::Onnxruntime, own, Some(level), None)
                }
            };
        let chosen = EngineOverride {
            version: served.version.clone(),
            file: step.file.clone(),
            backend,
            intra_op_threads,
            graph_optimization,
            tract,
        };
        let before = Previous {
            engine: a.repository.set_override(model, Some(chosen)),
            batching: served.batching(),
            instances: served.instances(),
        };
        drop(served);
        if let Err(why) = a.runtime.block_on(a.repository.load(model)) {
            a.repository.set_override(model, before.engine.clone());
            let back = match a.runtime.block_on(a.repository.load(model)) {
                // A reload serves the config's batching and instances: put back those in force.
                Ok(()) => restore_serving(&a.repository, model, &before.batching, before.instances),
                Err(e) => format!(" but did not load either: {e}"),
            };
            return Err(format!(
                "reloading on {winner} failed ({why}); the previous engine is back{back}"
            ));
        }
        let mut what = format!("now serving {winner} ({})", step.file);
        let now = a.repository.get(model, None).map_err(|e| e.to_string())?;
        // The reload served the config's batching and instances; the winner's figures, where
        // the search chose them, else what was in force before (the control loop's, say).
        match report.batch.filter(|b| *b > 1) {
            Some(b) => {
                let update =
                    BatchingUpdate { max_batch_size: Some(b), ..BatchingUpdate::default() };
                match now.set_batching(&update) {
                    Ok(change) => what.push_str(&format!("; {change}")),
                    Err(e) => what.push_str(&format!("; batch size {b} not set: {e}")),
                }
            }
            None => {
                if let Err(e) = now.set_batching(&crate::actuator::restore_of(&before.batching)) {
                    what.push_str(&format!("; the batching in force before not restored: {e}"));
                }
            }
        }
        let k = report.instances_chosen.unwrap_or(before.instances);
        if k != now.instances() {
            match now.set_instances(k) {
                Ok((from, to)) => what.push_str(&format!("; instances {from} -> {to}")),
                Err(e) => what.push_str(&format!("; {k} instances not set: {e}")),
            }
        }
        drop(now);
        self.previous().insert(model.to_owned(), before);
        Ok(what)
    }

    /// Puts back what the last adoption for `model` replaced.
    pub async fn rollback(&self, repository: &Repository, model: &str) -> Result<String, String> {
        let before = self.previous().remove(model).ok_or_else(|| {
            format!("nothing was adopted for model {model:?} on this agent since it started; nothing to roll back")
        })?;
        repository.set_override(model, before.engine.clone());
        if let Err(why) = repository.load(model).await {
            return Err(format!("reloading {model:?} on its previous engine failed: {why}"));
        }
        Ok(format!(
            "model {model:?} is back on {}{}",
            before.engine.as_ref().map_or_else(
                || "its configured engine".to_owned(),
                |o| format!("{:?} ({})", o.backend, o.file)
            ),
            restore_serving(repository, model, &before.batching, before.instances)
        ))
    }
}

/// Puts `batching` and `instances` back on the served `model` (a reload serves its config's);
/// says what changed, or what could not be put back.
fn restore_serving(
    repository: &Repository,
    model: &str,
    batching: &BatchingNow,
    instances: usize,
) -> String {
    let m = match repository.get(model, None) {
        Ok(m) => m,
        Err(e) => return format!("; batching and instances not restored: {e}"),
    };
    let mut said = match m.set_batching(&crate::actuator::restore_of(batching)) {
        Ok(change) => format!("; {change}"),
        Err(e) => format!("; batching not restored: {e}"),
    };
    if m.instances() != instances {
        match m.set_instances(instances) {
            Ok((from, to)) => said.push_str(&format!("; instances {from} -> {to}")),
            Err(e) => said.push_str(&format!("; instances not restored: {e}")),
        }
    }
    said
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::optimizer::accuracy::Bound;
    use crate::optimizer::measure::Effort;
    use crate::optimizer::strategy::Strategy;
    use crate::serving::model_config::ModelConfig;

    fn spec(file: std::path::PathBuf) -> Spec {
        Spec {
            file,
            config: ModelConfig::default(),
            strategy: Strategy::Latency,
            bound: Bound::default(),
            slo_ms: None,
            price_per_hour: None,
            effort: Effort {
                rounds: 1,
                max_time: std::time::Duration::from_secs(1),
                cpu_share: 1.0,
            },
            calibration_rows: 1,
            footprint_probe: None,
            apply: false,
            min_improvement: 0.0,
            max_instances: 4,
        }
    }

    #[test]
    fn one_search_per_model_and_a_failure_is_kept_with_its_reason() {
        let jobs = Arc::new(Jobs::default());
        jobs.lock().insert(
            "m".into(),
            JobState::Running { started_unix_ms: 1, step: 2, of: 5, current: "tract".into() },
        );
        let why =
            jobs.start("m", spec("/nonexistent/m/1/model.onnx".into()), None).expect_err("running");
        assert!(
            why.contains("\"m\" is already running on this agent (step 2 of 5: tract)"),
            "{why}"
        );
        // Another model waits too: one search per agent keeps the CPU share the agent's.
        let why = jobs
            .start("other", spec("/nonexistent/other/1/model.onnx".into()), None)
            .expect_err("one at a time");
        assert!(why.contains("one runs at a time"), "{why}");
        jobs.lock()
            .insert("m".into(), JobState::Failed { started_unix_ms: 1, error: "gone".into() });
        // Another model starts; its file is missing, so it fails, and says why.
        jobs.start("other", spec("/nonexistent/other/1/model.onnx".into()), None).expect("starts");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            match jobs.status("other") {
                Some(JobState::Failed { error, .. }) => {
                    assert!(error.contains("/nonexistent/other/1/model.onnx"), "{error}");
                    break;
                }
                Some(JobState::Running { .. }) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        assert!(jobs.status("never").is_none());
    }
}
