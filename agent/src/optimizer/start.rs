//! Turning a request for a search (the agent's HTTP endpoint or an `optimize` directive, both
//! [`OptimizeOptions`]) into a [`Spec`] for a served model, checking every value first: a bad
//! one is refused with its name and value, and nothing starts.

use std::path::PathBuf;
use std::time::Duration;

use common::directive::OptimizeOptions;

use super::accuracy::Bound;
use super::measure::Effort;
use super::search::Spec;
use super::strategy::Strategy;
use crate::serving::repository::{LookupError, Repository};

/// Why a search cannot start.
#[derive(Debug)]
pub enum StartError {
    /// The model is not served here.
    Unknown(LookupError),
    /// A value is out of range, or the model has no ONNX file here.
    Bad(String),
}

/// Defaults: a top-1 loss of at most 1 % of rows, a relative error of at most 1 %, half a core,
/// 30 timed runs per batch size.
pub const DEFAULT_MAX_ACCURACY_LOSS: f64 = 0.01;
/// See [`DEFAULT_MAX_ACCURACY_LOSS`].
pub const DEFAULT_MAX_REL_ERROR: f64 = 0.01;
/// See [`DEFAULT_MAX_ACCURACY_LOSS`].
pub const DEFAULT_CPU_SHARE: f64 = 0.5;
/// See [`DEFAULT_MAX_ACCURACY_LOSS`].
pub const DEFAULT_ROUNDS: usize = 30;
/// Most instances of the winner timed at once (and never more than the host's cores).
pub const DEFAULT_MAX_INSTANCES: usize = 8;

fn within(name: &str, value: Option<f64>, low: f64, high: f64) -> Result<Option<f64>, StartError> {
    match value {
        Some(v) if v.is_nan() || !(low..=high).contains(&v) => {
            Err(StartError::Bad(format!("{name}: must be {low}..={high}, got {v}")))
        }
        other => Ok(other),
    }
}

/// The search of `model`'s served (latest) version that `options` ask for, with its name.
pub fn spec_for(
    repository: &Repository,
    model: &str,
    options: &OptimizeOptions,
    footprint_probe: Option<PathBuf>,
) -> Result<(String, Spec), StartError> {
    let m = repository.get(model, None).map_err(StartError::Unknown)?;
    let strategy: Strategy = match &options.strategy {
        Some(name) => name.parse().map_err(StartError::Bad)?,
        None => Strategy::Balanced,
    };
    let bound = Bound {
        max_top1_loss: within("max_accuracy_loss", options.max_accuracy_loss, 0.0, 1.0)?
            .or(Some(DEFAULT_MAX_ACCURACY_LOSS)),
        max_abs_error: within("max_abs_error", options.max_abs_error, 0.0, f64::MAX)?,
        max_rel_error: within("max_rel_error", options.max_rel_error, 0.0, f64::MAX)?
            .or(Some(DEFAULT_MAX_REL_ERROR)),
    };
    let cpu_share = within("cpu_share", options.cpu_share, 0.01, 1.0)?.unwrap_or(DEFAULT_CPU_SHARE);
    let rounds = match options.rounds {
        Some(r) if !(1..=10_000).contains(&r) => {
            return Err(StartError::Bad(format!("rounds: must be 1..=10000, got {r}")));
        }
        r => r.unwrap_or(DEFAULT_ROUNDS),
    };
    let mut config = m.config.clone();
    if let Some(b) = options.max_batch {
        if !(1..=4096).contains(&b) {
            return Err(StartError::Bad(format!("max_batch: must be 1..=4096, got {b}")));
        }
        config.max_batch_size = b;
    }
    let file = repository.root().join(&m.name).join(&m.version).join("model.onnx");
    if !file.is_file() {
        return Err(StartError::Bad(format!(
            "model {:?} version {} is not served from an ONNX file here ({} is missing; a kserve-backed model is optimized on the server that runs it)",
            m.name,
            m.version,
            file.display()
        )));
    }
    let spec = Spec {
        file,
        config,
        strategy,
        bound,
        slo_ms: within("latency_slo_ms", options.latency_slo_ms, 0.001, 3_600_000.0)?,
        price_per_hour: within("price_per_hour", options.price_per_hour, 0.0, f64::MAX)?,
        effort: Effort { rounds, max_time: Duration::from_secs(10), cpu_share },
        calibration_rows: 16,
        footprint_probe,
        apply: options.apply.unwrap_or(false),
        max_instances: DEFAULT_MAX_INSTANCES,
        min_improvement: within("min_improvement", options.min_improvement, 0.0, 1000.0)?
            .unwrap_or(0.0),
    };
    Ok((m.name.clone(), spec))
}
