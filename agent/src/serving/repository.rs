//! The model repository: `ROOT/<name>/<version>/model.onnx` plus `ROOT/<name>/config.toml`,
//! which models are loaded, and loading and unloading them.
//!
//! A model that fails to load is kept in the index as unavailable, with the reason (the config
//! key, tract's message naming the failing node, or where the onnxruntime library was looked
//! for), and every other model goes on serving. Loading runs the engine's analysis on a blocking
//! thread, never on the runtime's workers.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use tracing::{error, info, warn};

use super::auto;
use super::kserve::KserveEngine;
use super::model::{LoadedModel, StopCause};
use super::model_config::{Backend, ModelConfig};
use super::names::{self, is_model_name};
use super::onnxruntime::OrtEngine;
use super::runner::{Engine, TractEngine, log_signature};
use super::threads::{host_cores, ort_threads};

/// A model's place in the index.
#[derive(Debug, Clone)]
pub enum ModelState {
    /// Serving these versions (highest first).
    Ready(Vec<Arc<LoadedModel>>),
    /// Not serving, and why.
    Unavailable(String),
}

/// One row of the repository index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexEntry {
    /// Model name.
    pub name: String,
    /// Version, when one is loaded.
    pub version: Option<String>,
    /// `READY` or `UNAVAILABLE`.
    pub state: &'static str,
    /// Why it is unavailable.
    pub reason: String,
}

/// Why a model could not be found or used.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LookupError {
    /// No such model in the repository.
    #[error("unknown model {0:?}; GET /v2/repository/index lists the models here")]
    Unknown(String),
    /// The model exists but is not loaded.
    #[error("model {name:?} is not ready: {reason}")]
    NotReady {
        /// Model name.
        name: String,
        /// Why.
        reason: String,
    },
    /// The version is not loaded.
    #[error("model {name:?} has no loaded version {version:?} (loaded: {loaded})")]
    NoVersion {
        /// Model name.
        name: String,
        /// Version asked for.
        version: String,
        /// Versions loaded.
        loaded: String,
    },
}

/// An engine a model is to run on instead of its config's, as the optimizer adopted it: kept
/// in memory (an agent restart serves the config again) and applied at every (re)load.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineOverride {
    /// The version it applies to (the one searched).
    pub version: String,
    /// The ONNX file in that version's directory (`model.onnx` or a variant).
    pub file: String,
    /// tract or onnxruntime.
    pub backend: Backend,
    /// onnxruntime threads of its own per instance; `None` for the host's pool.
    pub intra_op_threads: Option<usize>,
    /// onnxruntime's graph optimization level; `None` keeps the config's.
    pub graph_optimization: Option<crate::serving::model_config::OrtGraphLevel>,
    /// tract's float precision and whether it plans one symbolic batch size; `None` keeps the
    /// config's.
    pub tract: Option<(crate::serving::model_config::TractPrecision, bool)>,
}

/// The repository and its loaded models.
#[derive(Debug)]
pub struct Repository {
    root: PathBuf,
    models: RwLock<BTreeMap<String, ModelState>>,
    overrides: RwLock<BTreeMap<String, EngineOverride>>,
}

impl Repository {
    /// A repository rooted at `root` with nothing loaded.
    pub fn new(root: &Path) -> Self {
        Self {
            root: root.to_owned(),
            models: RwLock::new(BTreeMap::new()),
            overrides: RwLock::new(BTreeMap::new()),
        }
    }

    /// Sets (or with `None` clears) a model's engine override, taking effect at its next
    /// (re)load; returns the one it replaces.
    pub fn set_override(&self, name: &str, to: Option<EngineOverride>) -> Option<EngineOverride> {
        let mut overrides =
            self.overrides.write().unwrap_or_else(std::sync::PoisonError::into_inner);
        match to {
            Some(o) => overrides.insert(name.to_owned(), o),
            None => overrides.remove(name),
        }
    }

    /// A model's engine override, if it has one.
    pub fn override_of(&self, name: &str) -> Option<EngineOverride> {
        self.overrides.read().unwrap_or_else(std::sync::PoisonError::into_inner).get(name).cloned()
    }

    /// The repository directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Model directories on disk, sorted.
    pub fn scan(&self) -> Vec<String> {
        let Ok(entries) = std::fs::read_dir(&self.root) else { return Vec::new() };
        let mut names: Vec<String> = entries
            .flatten()
            .filter(|e| e.path().is_dir())
            .filter_map(|e| e.file_name().to_str().map(str::to_owned))
            .filter(|n| is_model_name(n))
            .collect();
        names.sort();
        names
    }

    /// Loads every model on disk; failures are logged and kept as unavailable.
    pub async fn load_all(&self) {
        for name in self.scan() {
            let _ = self.load(&name).await;
        }
    }

    /// (Re)loads a model's versions from disk. On failure the model is marked unavailable with
    /// the reason, which is also returned.
    pub async fn load(&self, name: &str) -> Result<(), String> {
        names::check("model", name).map_err(|e| e.to_string())?;
        let dir = self.root.join(name);
        if !dir.is_dir() {
            return Err(format!("no directory {} in the model repository", dir.display()));
        }
        let owned = name.to_owned();
        let chosen = self.override_of(name);
        let loaded = tokio::task::spawn_blocking(move || prepare(&dir, &owned, chosen.as_ref()))
            .await
            .map_err(|e| format!("loader thread failed: {e}"))
            .and_then(|r| r);
        let outcome = loaded.and_then(|versions| {
            versions
                .into_iter()
                .map(|(version, config, signature, engine)| {
                    log_signature(name, &signature);
                    LoadedModel::start(name, &version, config, signature, engine)
                        .map_err(|e| format!("starting instance threads: {e}"))
                })
                .collect::<Result<Vec<_>, _>>()
        });
        let state = match &outcome {
            Ok(versions) => {
                let list: Vec<&str> = versions.iter().map(|m| m.version.as_str()).collect();
                info!(model = name, versions = ?list, "Model ready.");
                ModelState::Ready(versions.clone())
            }
            Err(reason) => {
                error!(model = name, reason = %reason, "Model failed to load; serving the others.");
                ModelState::Unavailable(reason.clone())
            }
        };
        let previous = self.models.write().ok().and_then(|mut m| m.insert(name.to_owned(), state));
        if let Some(ModelState::Ready(old)) = previous {
            for m in old {
                m.stop(StopCause::Reload);
            }
        }
        outcome.map(|_| ())
    }

    /// Stops serving a model. Queued requests fail with "unloaded".
    pub fn unload(&self, name: &str) -> Result<(), LookupError> {
        // Checked before any path is built from it: an unknown name adds nothing to the index.
        if !is_model_name(name) {
            return Err(LookupError::Unknown(name.to_owned()));
        }
        let mut models = self.models.write().map_err(|_| LookupError::Unknown(name.to_owned()))?;
        match models.get(name) {
            None if !self.root.join(name).is_dir() => Err(LookupError::Unknown(name.to_owned())),
            _ => {
                let previous =
                    models.insert(name.to_owned(), ModelState::Unavailable("unloaded".to_owned()));
                drop(models);
                if let Some(ModelState::Ready(old)) = previous {
                    for m in old {
                        m.stop(StopCause::Unload);
                    }
                }
                info!(model = name, "Model unloaded.");
                Ok(())
            }
        }
    }

    /// The model version to serve: the one asked for, or the highest loaded.
    pub fn get(&self, name: &str, version: Option<&str>) -> Result<Arc<LoadedModel>, LookupError> {
        let models = self.models.read().map_err(|_| LookupError::Unknown(name.to_owned()))?;
        match models.get(name) {
            None => Err(LookupError::Unknown(name.to_owned())),
            Some(ModelState::Unavailable(reason)) => {
                Err(LookupError::NotReady { name: name.to_owned(), reason: reason.clone() })
            }
            Some(ModelState::Ready(versions)) => match version {
                None | Some("") => versions.first().cloned().ok_or_else(|| LookupError::NotReady {
                    name: name.to_owned(),
                    reason: "no versions".to_owned(),
                }),
                Some(v) => versions.iter().find(|m| m.version == v).cloned().ok_or_else(|| {
                    LookupError::NoVersion {
                        name: name.to_owned(),
                        version: v.to_owned(),
                        loaded: versions
                            .iter()
                            .map(|m| m.version.as_str())
                            .collect::<Vec<_>>()
                            .join(", "),
                    }
                }),
            },
        }
    }

    /// Whether a model (or a version of it) is known at all, loaded or not.
    pub fn state(&self, name: &str) -> Option<ModelState> {
        self.models.read().ok().and_then(|m| m.get(name).cloned())
    }

    /// Every model on disk or in memory, with its state.
    pub fn index(&self) -> Vec<IndexEntry> {
        let models = self.models.read().map(|m| m.clone()).unwrap_or_default();
        let mut names: Vec<String> = self.scan();
        names.extend(models.keys().cloned());
        names.sort();
        names.dedup();
        let mut out = Vec::new();
        for name in names {
            match models.get(&name) {
                Some(ModelState::Ready(versions)) => {
                    for m in versions {
                        out.push(IndexEntry {
                            name: name.clone(),
                            version: Some(m.version.clone()),
                            state: "READY",
                            reason: String::new(),
                        });
                    }
                }
                Some(ModelState::Unavailable(reason)) => out.push(IndexEntry {
                    name,
                    version: None,
                    state: "UNAVAILABLE",
                    reason: reason.clone(),
                }),
                None => out.push(IndexEntry {
                    name,
                    version: None,
                    state: "UNAVAILABLE",
                    reason: "not loaded".to_owned(),
                }),
            }
        }
        out
    }

    /// Every loaded version.
    pub fn loaded(&self) -> Vec<Arc<LoadedModel>> {
        let models = self.models.read().map(|m| m.clone()).unwrap_or_default();
        models
            .into_values()
            .filter_map(|s| match s {
                ModelState::Ready(v) => Some(v),
                ModelState::Unavailable(_) => None,
            })
            .flatten()
            .collect()
    }

    /// Stops every model.
    pub fn stop_all(&self) {
        for m in self.loaded() {
            m.stop(StopCause::Shutdown);
        }
    }
}

type Prepared = (String, ModelConfig, super::runner::Signature, Arc<dyn Engine>);

/// Reads the config and builds an engine for every version directory (blocking); `chosen`
/// replaces the config's engine (and file) for its version.
fn prepare(
    dir: &Path,
    name: &str,
    chosen: Option<&EngineOverride>,
) -> Result<Vec<Prepared>, String> {
    let configured = ModelConfig::load(dir, name).map_err(|e| e.to_string())?;
    let mut versions: Vec<(u64, String)> = std::fs::read_dir(dir)
        .map_err(|e| format!("reading {}: {e}", dir.display()))?
        .flatten()
        .filter(|e| e.path().is_dir())
        .filter_map(|e| e.file_name().to_str().map(str::to_owned))
        .filter_map(|v| v.parse::<u64>().ok().map(|n| (n, v)))
        .collect();
    versions.sort_by_key(|v| std::cmp::Reverse(v.0));
    if versions.is_empty() {
        return Err(format!(
            "no version directories in {} (expected e.g. {}/1/model.onnx)",
            dir.display(),
            dir.display()
        ));
    }
    let mut out = Vec::new();
    for (_, version) in versions {
        let mut config = configured.clone();
        let mut file = dir.join(&version).join("model.onnx");
        if let Some(o) = chosen.filter(|o| o.version == version) {
            config.backend = o.backend.clone();
            config.onnxruntime.intra_op_threads = o.intra_op_threads;
            if let Some(level) = o.graph_optimization {
                config.onnxruntime.graph_optimization = level;
            }
            if let Some((precision, symbolic_batch)) = o.tract {
                config.loader.precision = precision;
                config.loader.symbolic_batch = symbolic_batch;
            }
            file = dir.join(&version).join(&o.file);
            info!(model = name, version = %version, file = %o.file, backend = ?o.backend, threads = ?o.intra_op_threads, graph = ?o.graph_optimization, tract = ?o.tract, "Serving the engine the optimizer adopted.");
        }
        let in_process =
            matches!(config.backend, Backend::Tract | Backend::Onnxruntime | Backend::Auto);
        if in_process && !file.is_file() {
            return Err(format!("version {version}: {} is missing", file.display()));
        }
        let threads_for_ort = || {
            let (threads, lowered) =
                ort_threads(&config.onnxruntime, config.instances, host_cores());
            if let Some(why) = &lowered {
                warn!(model = name, reason = %why, "onnxruntime threads lowered to the core budget.");
            }
            threads
        };
        let (signature, engine): (_, Arc<dyn Engine>) = match &config.backend {
            Backend::Tract => {
                let (engine, signature) = TractEngine::load(&file, &config).map_err(|e| {
                    format!("version {version}: tract could not load {}: {e}", file.display())
                })?;
                (signature, Arc::new(engine))
            }
            Backend::Onnxruntime => {
                let (engine, signature) =
                    OrtEngine::load(&file, &config, &config.onnxruntime, threads_for_ort())
                        .map_err(|e| format!("version {version}: {e}"))?;
                (signature, Arc::new(engine))
            }
            Backend::Auto => {
                let (engine, signature) =
                    auto::choose(&file, &config, &config.onnxruntime, threads_for_ort())
                        .map_err(|e| format!("version {version}: {e}"))?;
                (signature, engine)
            }
            Backend::Kserve(target) => {
                let (engine, signature) = KserveEngine::connect(target, &config)
                    .map_err(|e| format!("version {version}: {e}"))?;
                (signature, Arc::new(engine))
            }
        };
        out.push((version, config.clone(), signature, engine));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(file: &str) -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures").join(file)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_model_tract_cannot_analyse_is_unavailable_with_tracts_reason() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(dir.path().join("nested/1")).expect("mkdir");
        std::fs::copy(fixture("nested_if.onnx"), dir.path().join("nested/1/model.onnx"))
            .expect("copy the fixture");
        let repo = Repository::new(dir.path());
        let reason = repo.load("nested").await.expect_err("refused at load");
        assert!(reason.contains("If_"), "the failing node is named: {reason}");
        assert!(repo.loaded().is_empty());
        let index = repo.index();
        assert_eq!(index.len(), 1, "{index:?}");
        assert_eq!(index[0].state, "UNAVAILABLE");
        assert_eq!(index[0].reason, reason);
        let refused = repo.get("nested", None).expect_err("not served");
        assert!(refused.to_string().contains("not ready"), "{refused}");
    }
}
