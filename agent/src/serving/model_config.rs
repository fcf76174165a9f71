//! A model's `config.toml`: batching, instances, priorities, timeouts, loader options and the
//! inputs and outputs the ONNX file leaves open. Every key has a default, so a model directory
//! with only `1/model.onnx` serves; a bad key is named with its value.

use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

use super::tensor::DataType;

/// Most instances a model may run (the `instances` key's range, and the runtime knob's).
pub const MAX_INSTANCES: usize = 64;

/// Which engine runs the batches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backend {
    /// tract, in this process (the default: pure Rust, nothing to install).
    Tract,
    /// onnxruntime, in this process, from a shared library found at run time.
    Onnxruntime,
    /// Whichever of tract and onnxruntime runs the model faster, measured at load on a trial
    /// input after checking that both give the same outputs.
    Auto,
    /// A local accelerator server speaking KServe v2 over HTTP.
    Kserve(KserveTarget),
}

impl Backend {
    /// The config's name for it.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Tract => "tract",
            Self::Onnxruntime => "onnxruntime",
            Self::Auto => "auto",
            Self::Kserve(_) => "kserve",
        }
    }
}

/// Where onnxruntime runs a model.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ExecutionProvider {
    /// The CPU.
    #[default]
    Cpu,
    /// An NVIDIA GPU (needs the GPU build of the library).
    Cuda,
}

impl ExecutionProvider {
    /// onnxruntime's name for it.
    pub fn name(self) -> &'static str {
        match self {
            Self::Cpu => "CPU",
            Self::Cuda => "CUDA",
        }
    }
}

/// How far onnxruntime rewrites a model's graph when it opens a session (its
/// `GraphOptimizationLevel`): constant folding and redundant-node removal (`basic`), node
/// fusions (`extended`), and layout changes for the CPU (`all`, the default).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum OrtGraphLevel {
    /// No rewriting.
    Disabled,
    /// Semantics-preserving rewrites only.
    Basic,
    /// Plus node fusions.
    Extended,
    /// Plus layout optimizations.
    #[default]
    All,
}

impl OrtGraphLevel {
    /// Every level, least first.
    pub const ALL: [Self; 4] = [Self::Disabled, Self::Basic, Self::Extended, Self::All];

    /// Its name in configs and engine names.
    pub fn name(self) -> &'static str {
        match self {
            Self::Disabled => "disabled",
            Self::Basic => "basic",
            Self::Extended => "extended",
            Self::All => "all",
        }
    }

    /// The level named `name`.
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|l| l.name() == name)
    }
}

/// The `[onnxruntime]` table: used by `backend = "onnxruntime"` and `"auto"`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OrtOptions {
    /// The shared library to load, before `ORT_DYLIB_PATH` and the PyPI wheel.
    pub library: Option<std::path::PathBuf>,
    /// The execution provider.
    pub provider: ExecutionProvider,
    /// Intra-op threads per instance; `None` gives each instance its share of the host's cores.
    pub intra_op_threads: Option<usize>,
    /// Whether idle intra-op threads spin waiting for work (lower latency, CPU burnt while
    /// idle) instead of sleeping.
    pub intra_op_spinning: bool,
    /// How far onnxruntime rewrites the graph (`graph_optimization`).
    pub graph_optimization: OrtGraphLevel,
}

/// Where the `kserve` backend forwards batches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KserveTarget {
    /// Base URL, e.g. `http://127.0.0.1:9000`.
    pub url: String,
    /// The model's name on that server.
    pub model: String,
    /// Per-batch HTTP timeout.
    pub timeout: Duration,
}

/// An input or output declared in the config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSpec {
    /// Name in the ONNX graph.
    pub name: String,
    /// Datatype, when the config sets it.
    pub datatype: Option<DataType>,
    /// Dims of one request without the batch dim when batching is on; -1 for any size.
    pub dims: Option<Vec<i64>>,
}

/// The float precision tract computes in.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum TractPrecision {
    /// As the file says.
    #[default]
    F32,
    /// The graph's f32 math in half precision (tract's `f32_to_f16` transform); inputs and
    /// outputs stay f32 on the wire.
    F16,
}

impl TractPrecision {
    /// Its name in configs and engine names.
    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::F16 => "f16",
        }
    }

    /// The precision named `name`.
    pub fn parse(name: &str) -> Option<Self> {
        [Self::F32, Self::F16].into_iter().find(|p| p.name() == name)
    }
}

/// Loader switches: `None` means try strict first, then lenient.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LoaderOptions {
    /// tract `with_ignore_output_shapes`.
    pub ignore_output_shapes: Option<bool>,
    /// tract `with_ignore_value_info`.
    pub ignore_value_info: Option<bool>,
    /// The float precision tract plans in (`precision`).
    pub precision: TractPrecision,
    /// One plan with a symbolic batch size for every batch (`batch_plan = "symbolic"`)
    /// instead of one plan per concrete batch size (`"concrete"`, the default).
    pub symbolic_batch: bool,
}

/// A model's validated configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelConfig {
    /// Engine.
    pub backend: Backend,
    /// onnxruntime's settings (for `onnxruntime` and `auto`).
    pub onnxruntime: OrtOptions,
    /// Most rows in one batch; 0 turns batching off (each request runs alone).
    pub max_batch_size: usize,
    /// Batch sizes dispatched as soon as they can be formed.
    pub preferred_batch_sizes: Vec<usize>,
    /// Longest the oldest request waits for company.
    pub max_queue_delay: Duration,
    /// Fewest rows dispatched on delay, until `min_batch_wait_cap` has passed.
    pub min_batch_size: usize,
    /// Longest the oldest request waits for `min_batch_size` rows.
    pub min_batch_wait_cap: Duration,
    /// Runner instances working in parallel.
    pub instances: usize,
    /// Priority levels, 1 (highest) to this.
    pub priority_levels: u32,
    /// Level of requests that name none.
    pub default_priority: u32,
    /// Waiting this long raises a request one level.
    pub priority_aging: Duration,
    /// Longest a top-priority request waits before its batch goes (when levels > 1).
    pub high_priority_max_queue_delay: Duration,
    /// Deadline of requests that set no timeout; `None` for no deadline.
    pub default_timeout: Option<Duration>,
    /// Requests waiting at most; more are refused at once.
    pub max_queue_size: usize,
    /// Longest expected queue wait a new request is admitted into (the batches queued ahead of
    /// it times the running estimate of one batch's run time, shared by the instances); past it
    /// the request is refused at once. `None`: no limit beyond `max_queue_size`.
    pub max_queue_wait: Option<Duration>,
    /// Whether the adaptive controller tunes batch size and queue delay at run time (between
    /// `adaptive_min_batch_size` and `max_batch_size`, delay at most `max_queue_delay`). Default:
    /// on when the file sets none of `max_batch_size`, `max_queue_delay_us`,
    /// `preferred_batch_sizes` and `min_batch_size` (a model without a config starts at one row
    /// and zero delay), off otherwise (the file's batching is used as written).
    pub adaptive: bool,
    /// The smallest batch size the adaptive controller uses.
    pub adaptive_min_batch_size: usize,
    /// The model's p95 end-to-end latency objective, which the adaptive controller keeps;
    /// `None` for none.
    pub latency_slo: Option<Duration>,
    /// Inputs to pin or describe.
    pub inputs: Vec<TensorSpec>,
    /// Outputs to describe.
    pub outputs: Vec<TensorSpec>,
    /// tract loader switches.
    pub loader: LoaderOptions,
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self::from_raw(RawModelConfig::default(), "").unwrap_or_else(|e| unreachable!("{e:?}"))
    }
}

/// Why a model config was refused: every problem, each naming its key.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{origin}: {}", problems.join("; "))]
pub struct ModelConfigError {
    /// The file.
    pub origin: String,
    /// `key: must ..., got ...` lines.
    pub problems: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawModelConfig {
    backend: Option<String>,
    max_batch_size: Option<usize>,
    #[serde(default)]
    preferred_batch_sizes: Vec<usize>,
    max_queue_delay_us: Option<u64>,
    min_batch_size: Option<usize>,
    min_batch_wait_cap_us: Option<u64>,
    instances: Option<usize>,
    priority_levels: Option<u32>,
    default_priority: Option<u32>,
    priority_aging_ms: Option<u64>,
    high_priority_max_queue_delay_us: Option<u64>,
    default_timeout_ms: Option<u64>,
    max_queue_size: Option<usize>,
    max_queue_wait_ms: Option<u64>,
    #[serde(default)]
    input: Vec<RawTensor>,
    #[serde(default)]
    output: Vec<RawTensor>,
    #[serde(default)]
    loader: RawLoader,
    kserve: Option<RawKserve>,
    #[serde(default)]
    onnxruntime: RawOnnxruntime,
    #[serde(default)]
    adaptive: RawAdaptive,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOnnxruntime {
    library: Option<String>,
    execution_provider: Option<String>,
    intra_op_threads: Option<u64>,
    intra_op_spinning: Option<bool>,
    graph_optimization: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAdaptive {
    enabled: Option<bool>,
    min_batch_size: Option<usize>,
    latency_slo_ms: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTensor {
    name: String,
    datatype: Option<String>,
    dims: Option<Vec<i64>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLoader {
    ignore_output_shapes: Option<bool>,
    ignore_value_info: Option<bool>,
    precision: Option<String>,
    batch_plan: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKserve {
    url: String,
    model: Option<String>,
    timeout_ms: Option<u64>,
}

/// A value already clamped to a small range, in a narrower integer type.
fn narrow<T: TryFrom<u64> + Bounded>(v: u64) -> T {
    T::try_from(v).unwrap_or(T::MAX)
}

/// The largest value of an integer type.
trait Bounded {
    const MAX: Self;
}
impl Bounded for usize {
    const MAX: Self = Self::MAX;
}
impl Bounded for u32 {
    const MAX: Self = Self::MAX;
}

impl ModelConfig {
    /// Reads `dir/config.toml`, or the defaults when there is none. `name` is the model's
    /// directory name (the default remote name for `kserve`).
    pub fn load(dir: &Path, name: &str) -> Result<Self, ModelConfigError> {
        let path = dir.join("config.toml");
        let origin = path.display().to_string();
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => {
                return Err(ModelConfigError { origin, problems: vec![format!("reading: {e}")] });
            }
        };
        Self::parse(&text, &origin, name)
    }

    /// Parses config text.
    pub fn parse(text: &str, origin: &str, name: &str) -> Result<Self, ModelConfigError> {
        let raw: RawModelConfig = toml::from_str(text).map_err(|e| ModelConfigError {
            origin: origin.to_owned(),
            problems: vec![e.message().to_owned()],
        })?;
        Self::from_raw(raw, name)
            .map_err(|problems| ModelConfigError { origin: origin.to_owned(), problems })
    }

    fn from_raw(raw: RawModelConfig, name: &str) -> Result<Self, Vec<String>> {
        let mut problems = Vec::new();
        let mut range = |key: &str, v: u64, lo: u64, hi: u64| {
            if v < lo || v > hi {
                problems.push(format!("{key}: must be {lo}..={hi}, got {v}"));
            }
            v.clamp(lo, hi)
        };
        let max_batch_size =
            range("max_batch_size", raw.max_batch_size.unwrap_or(8) as u64, 0, 4096);
        let max_queue_delay =
            range("max_queue_delay_us", raw.max_queue_delay_us.unwrap_or(500), 0, 10_000_000);
        let min_batch_size =
            range("min_batch_size", raw.min_batch_size.unwrap_or(1) as u64, 1, 4096);
        let min_cap = range(
            "min_batch_wait_cap_us",
            raw.min_batch_wait_cap_us.unwrap_or(10_000),
            0,
            60_000_000,
        );
        let instances =
            range("instances", raw.instances.unwrap_or(1) as u64, 1, MAX_INSTANCES as u64);
        let levels = range("priority_levels", u64::from(raw.priority_levels.unwrap_or(1)), 1, 16);
        let default_priority = range(
            "default_priority",
            u64::from(raw.default_priority.unwrap_or(narrow(levels))),
            1,
            levels,
        );
        let aging = range("priority_aging_ms", raw.priority_aging_ms.unwrap_or(100), 1, 3_600_000);
        let high = range(
            "high_priority_max_queue_delay_us",
            raw.high_priority_max_queue_delay_us.unwrap_or(0),
            0,
            10_000_000,
        );
        let timeout =
            range("default_timeout_ms", raw.default_timeout_ms.unwrap_or(0), 0, 3_600_000);
        let max_queue_size =
            range("max_queue_size", raw.max_queue_size.unwrap_or(256) as u64, 1, 1_000_000);
        let max_queue_wait =
            range("max_queue_wait_ms", raw.max_queue_wait_ms.unwrap_or(1000), 0, 3_600_000);
        let adaptive_min = range(
            "adaptive.min_batch_size",
            raw.adaptive.min_batch_size.unwrap_or(1) as u64,
            1,
            max_batch_size.max(1),
        );
        let slo = range(
            "adaptive.latency_slo_ms",
            raw.adaptive.latency_slo_ms.unwrap_or(0),
            0,
            3_600_000,
        );
        let ort_threads = raw
            .onnxruntime
            .intra_op_threads
            .map(|t| range("onnxruntime.intra_op_threads", t, 1, 256));
        let batching_written = raw.max_batch_size.is_some()
            || raw.max_queue_delay_us.is_some()
            || !raw.preferred_batch_sizes.is_empty()
            || raw.min_batch_size.is_some();
        let adaptive = raw.adaptive.enabled.unwrap_or(!batching_written);
        let mut preferred = raw.preferred_batch_sizes.clone();
        preferred.sort_unstable();
        preferred.dedup();
        for p in &preferred {
            if *p == 0 || *p as u64 > max_batch_size {
                problems.push(format!(
                    "preferred_batch_sizes: each must be 1..=max_batch_size ({max_batch_size}), got {p}"
                ));
            }
        }
        if max_batch_size > 0 && min_batch_size > max_batch_size {
            problems.push(format!(
                "min_batch_size: must be <= max_batch_size ({max_batch_size}), got {min_batch_size}"
            ));
        }
        let mut tensors = |list: &[RawTensor], what: &str| {
            list.iter()
                .enumerate()
                .map(|(i, t)| {
                    let datatype = t.datatype.as_deref().and_then(|d| {
                        let parsed = DataType::parse(d);
                        if parsed.is_none() {
                            problems.push(format!(
                                "{what}[{i}].datatype: must be one of BOOL, UINT8..UINT64, INT8..INT64, FP16, FP32, FP64, BYTES, got {d:?}"
                            ));
                        }
                        parsed
                    });
                    if let Some(dims) = &t.dims
                        && dims.iter().any(|d| *d < -1 || *d == 0)
                    {
                        problems.push(format!(
                            "{what}[{i}].dims: each must be a positive size or -1 for any, got {dims:?}"
                        ));
                    }
                    if t.name.is_empty() {
                        problems.push(format!("{what}[{i}].name: must name a graph {what}, got \"\""));
                    }
                    TensorSpec { name: t.name.clone(), datatype, dims: t.dims.clone() }
                })
                .collect::<Vec<_>>()
        };
        let inputs = tensors(&raw.input, "input");
        let outputs = tensors(&raw.output, "output");
        let provider = match raw.onnxruntime.execution_provider.as_deref() {
            None | Some("cpu") => ExecutionProvider::Cpu,
            Some("cuda") => ExecutionProvider::Cuda,
            Some(other) => {
                problems.push(format!(
                    "onnxruntime.execution_provider: must be \"cpu\" or \"cuda\", got {other:?}"
                ));
                ExecutionProvider::Cpu
            }
        };
        if raw.onnxruntime.library.as_deref() == Some("") {
            problems.push(
                "onnxruntime.library: must be the path of a libonnxruntime.so, got \"\"".to_owned(),
            );
        }
        let graph_optimization = match raw.onnxruntime.graph_optimization.as_deref() {
            None => OrtGraphLevel::All,
            Some(name) => OrtGraphLevel::parse(name).unwrap_or_else(|| {
                problems.push(format!(
                    "onnxruntime.graph_optimization: must be \"disabled\", \"basic\", \"extended\" or \"all\", got {name:?}"
                ));
                OrtGraphLevel::All
            }),
        };
        let precision = match raw.loader.precision.as_deref() {
            None => TractPrecision::F32,
            Some(name) => TractPrecision::parse(name).unwrap_or_else(|| {
                problems
                    .push(format!("loader.precision: must be \"f32\" or \"f16\", got {name:?}"));
                TractPrecision::F32
            }),
        };
        let symbolic_batch = match raw.loader.batch_plan.as_deref() {
            None | Some("concrete") => false,
            Some("symbolic") => true,
            Some(other) => {
                problems.push(format!(
                    "loader.batch_plan: must be \"concrete\" or \"symbolic\", got {other:?}"
                ));
                false
            }
        };
        let onnxruntime = OrtOptions {
            library: raw.onnxruntime.library.filter(|l| !l.is_empty()).map(Into::into),
            provider,
            intra_op_threads: ort_threads.map(narrow),
            intra_op_spinning: raw.onnxruntime.intra_op_spinning.unwrap_or(false),
            graph_optimization,
        };
        let backend = match (raw.backend.as_deref().unwrap_or("tract"), raw.kserve) {
            ("tract", _) => Backend::Tract,
            ("onnxruntime", _) => Backend::Onnxruntime,
            ("auto", _) => Backend::Auto,
            ("kserve", Some(k)) => {
                if !(k.url.starts_with("http://") || k.url.starts_with("https://")) {
                    problems.push(format!(
                        "kserve.url: must be an http:// or https:// base URL, got {:?}",
                        k.url
                    ));
                }
                let timeout_ms = k.timeout_ms.unwrap_or(10_000);
                if !(1..=600_000).contains(&timeout_ms) {
                    problems
                        .push(format!("kserve.timeout_ms: must be 1..=600000, got {timeout_ms}"));
                }
                Backend::Kserve(KserveTarget {
                    url: k.url.trim_end_matches('/').to_owned(),
                    model: k.model.unwrap_or_else(|| name.to_owned()),
                    timeout: Duration::from_millis(timeout_ms),
                })
            }
            ("kserve", None) => {
                problems.push(
                    "kserve: backend = \"kserve\" needs a [kserve] table with url = \"http://host:port\""
                        .to_owned(),
                );
                Backend::Tract
            }
            (other, _) => {
                problems.push(format!(
                    "backend: must be \"tract\", \"onnxruntime\", \"auto\" or \"kserve\", got {other:?}"
                ));
                Backend::Tract
            }
        };
        if !problems.is_empty() {
            return Err(problems);
        }
        Ok(Self {
            backend,
            onnxruntime,
            max_batch_size: narrow(max_batch_size),
            preferred_batch_sizes: preferred,
            max_queue_delay: Duration::from_micros(max_queue_delay),
            min_batch_size: narrow(min_batch_size),
            min_batch_wait_cap: Duration::from_micros(min_cap),
            instances: narrow(instances),
            priority_levels: narrow(levels),
            default_priority: narrow(default_priority),
            priority_aging: Duration::from_millis(aging),
            high_priority_max_queue_delay: Duration::from_micros(high),
            default_timeout: (timeout > 0).then(|| Duration::from_millis(timeout)),
            max_queue_size: narrow(max_queue_size),
            max_queue_wait: (max_queue_wait > 0).then(|| Duration::from_millis(max_queue_wait)),
            adaptive,
            adaptive_min_batch_size: narrow(adaptive_min),
            latency_slo: (slo > 0).then(|| Duration::from_millis(slo)),
            inputs,
            outputs,
            loader: LoaderOptions {
                ignore_output_shapes: raw.loader.ignore_output_shapes,
                ignore_value_info: raw.loader.ignore_value_info,
                precision,
                symbolic_batch,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_config_is_all_defaults() {
        let c = ModelConfig::parse("", "t", "m").expect("defaults");
        assert_eq!(c.backend, Backend::Tract);
        assert_eq!(c.max_batch_size, 8);
        assert_eq!(c.instances, 1);
        assert_eq!(c.default_timeout, None);
        assert!(c.adaptive, "a model without a config is tuned, starting at one row");
        assert_eq!((c.adaptive_min_batch_size, c.latency_slo), (1, None));
        assert_eq!(c, ModelConfig::default());
    }

    #[test]
    fn adaptive_keys_parse_and_written_batching_turns_it_off_by_default() {
        let c = ModelConfig::parse("max_batch_size = 4", "t", "m").expect("valid");
        assert!(!c.adaptive, "batching written in the file is used as written");
        let c = ModelConfig::parse(
            "max_batch_size = 16\n[adaptive]\nenabled = true\nmin_batch_size = 2\nlatency_slo_ms = 20\n",
            "t",
            "m",
        )
        .expect("valid");
        assert!(c.adaptive);
        assert_eq!(c.adaptive_min_batch_size, 2);
        assert_eq!(c.latency_slo, Some(Duration::from_millis(20)));
        let e = ModelConfig::parse(
            "max_batch_size = 4\n[adaptive]\nmin_batch_size = 5\nlatency_slo_ms = 4000000\n",
            "t",
            "m",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("adaptive.min_batch_size: must be 1..=4, got 5"), "{e}");
        assert!(e.contains("adaptive.latency_slo_ms: must be 0..=3600000, got 4000000"), "{e}");
        let e = ModelConfig::parse("[adaptive]\nenable = true\n", "t", "m").unwrap_err();
        assert!(e.to_string().contains("enable"), "{e}");
    }

    #[test]
    fn full_config_parses() {
        let c = ModelConfig::parse(
            r#"
            backend = "kserve"
            max_batch_size = 16
            preferred_batch_sizes = [8, 4, 8]
            max_queue_delay_us = 2000
            instances = 2
            priority_levels = 3
            default_timeout_ms = 50
            [[input]]
            name = "x"
            datatype = "FP32"
            dims = [3, -1, 192]
            [loader]
            ignore_output_shapes = true
            [kserve]
            url = "http://127.0.0.1:9000/"
            "#,
            "t",
            "ocr",
        )
        .expect("valid");
        assert_eq!(c.preferred_batch_sizes, vec![4, 8]);
        assert_eq!(c.default_priority, 3);
        assert_eq!(c.default_timeout, Some(Duration::from_millis(50)));
        assert_eq!(c.inputs[0].datatype, Some(DataType::F32));
        assert_eq!(c.loader.ignore_output_shapes, Some(true));
        let Backend::Kserve(k) = c.backend else { panic!("kserve") };
        assert_eq!((k.url.as_str(), k.model.as_str()), ("http://127.0.0.1:9000", "ocr"));
    }

    #[test]
    fn onnxruntime_keys_parse() {
        let c = ModelConfig::parse(
            "backend = \"onnxruntime\"\n[onnxruntime]\nlibrary = \"/opt/ort/libonnxruntime.so\"\nexecution_provider = \"cuda\"\nintra_op_threads = 4\ngraph_optimization = \"basic\"\n",
            "t",
            "m",
        )
        .expect("valid");
        assert_eq!(c.backend, Backend::Onnxruntime);
        assert_eq!(
            c.onnxruntime,
            OrtOptions {
                library: Some("/opt/ort/libonnxruntime.so".into()),
                provider: ExecutionProvider::Cuda,
                intra_op_threads: Some(4),
                intra_op_spinning: false,
                graph_optimization: OrtGraphLevel::Basic,
            }
        );
        let auto = ModelConfig::parse("backend = \"auto\"", "t", "m").expect("valid");
        assert_eq!((auto.backend, auto.onnxruntime), (Backend::Auto, OrtOptions::default()));
    }

    #[test]
    fn every_bad_key_is_named_with_its_value() {
        let e = ModelConfig::parse(
            r#"
            backend = "onnx"
            max_batch_size = 4
            preferred_batch_sizes = [8]
            instances = 0
            [[input]]
            name = "x"
            datatype = "FLOAT"
            dims = [0]
            "#,
            "models/m/config.toml",
            "m",
        )
        .unwrap_err();
        let text = e.to_string();
        for expected in [
            "models/m/config.toml",
            "backend: must be \"tract\", \"onnxruntime\", \"auto\" or \"kserve\", got \"onnx\"",
            "preferred_batch_sizes: each must be 1..=max_batch_size (4), got 8",
            "instances: must be 1..=64, got 0",
            "input[0].datatype",
            "got \"FLOAT\"",
            "input[0].dims",
        ] {
            assert!(text.contains(expected), "{expected:?} missing from {text}");
        }
        let unknown = ModelConfig::parse("max_batch = 3", "t", "m").unwrap_err();
        assert!(unknown.to_string().contains("max_batch"), "{unknown}");
        let ort = ModelConfig::parse(
            "backend = \"auto\"\n[onnxruntime]\nexecution_provider = \"tpu\"\nintra_op_threads = 0\ngraph_optimization = \"max\"\n",
            "t",
            "m",
        )
        .unwrap_err()
        .to_string();
        assert!(
            ort.contains(
                "onnxruntime.execution_provider: must be \"cpu\" or \"cuda\", got \"tpu\""
            ),
            "{ort}"
        );
        assert!(ort.contains("onnxruntime.intra_op_threads: must be 1..=256, got 0"), "{ort}");
        let half = ModelConfig::parse("[loader]\nprecision = \"f16\"\n", "t", "m").expect("valid");
        assert_eq!(half.loader.precision, TractPrecision::F16);
        let one =
            ModelConfig::parse("[loader]\nbatch_plan = \"symbolic\"\n", "t", "m").expect("valid");
        assert!(one.loader.symbolic_batch);
        let bad = ModelConfig::parse("[loader]\nbatch_plan = \"one\"\n", "t", "m").unwrap_err();
        assert!(
            bad.to_string()
                .contains("loader.batch_plan: must be \"concrete\" or \"symbolic\", got \"one\""),
            "{bad}"
        );
        let bad = ModelConfig::parse("[loader]\nprecision = \"f8\"\n", "t", "m").unwrap_err();
        assert!(
            bad.to_string().contains("loader.precision: must be \"f32\" or \"f16\", got \"f8\""),
            "{bad}"
        );
        assert!(
            ort.contains("onnxruntime.graph_optimization: must be \"disabled\", \"basic\", \"extended\" or \"all\", got \"max\""),
            "{ort}"
        );
        let no_table = ModelConfig::parse("backend = \"kserve\"", "t", "m").unwrap_err();
        assert!(no_table.to_string().contains("[kserve] table"), "{no_table}");
    }
}

#[cfg(test)]
mod example {
    use super::*;

    #[test]
    fn the_documented_example_parses() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/model.toml");
        let text = std::fs::read_to_string(&path).expect("config/model.toml");
        let c = ModelConfig::parse(&text, "config/model.toml", "ocr").expect("valid");
        assert_eq!((c.priority_levels, c.preferred_batch_sizes.clone()), (2, vec![4, 8]));
        assert_eq!(c.inputs[0].dims, Some(vec![3, 48, -1]));
    }

    /// `config/model.toml` with every `key = value` line's value replaced by `value`.
    fn every_key_set_to(value: &str) -> String {
        let example = include_str!("../../../config/model.toml");
        let mut out = String::new();
        for line in example.lines() {
            match line.split_once(" = ") {
                Some((key, _)) if !line.trim_start().starts_with('#') => {
                    out.push_str(&format!("{key} = {value}\n"));
                }
                _ => out.push_str(&format!("{line}\n")),
            }
        }
        out
    }

    proptest::proptest! {
        /// Any text, and every real key set to a hostile value, is parsed or refused with a
        /// message naming the model's config file.
        #[test]
        fn any_config_text_is_parsed_or_refused_by_name(
            text in "(\\[{1,2}[a-z_.]{0,12}\\]{1,2}\n|[a-z_]{1,24} = (\"[^\"\n]{0,20}\"|-?[0-9]{1,20}|true|\\[[0-9, ]{0,12}\\])\n|.{0,40}\n){0,12}",
            n in proptest::prelude::any::<i64>(),
            f in proptest::prelude::any::<f64>(),
            s in ".{0,30}",
        ) {
            if let Err(e) = ModelConfig::parse(&text, "prop/config.toml", "m") {
                proptest::prop_assert!(e.to_string().contains("config.toml"), "{e}");
            }
            for value in [n.to_string(), format!("{f:?}"), format!("{s:?}"), "[]".to_owned()] {
                let _ = ModelConfig::parse(&every_key_set_to(&value), "prop/config.toml", "m");
            }
        }
    }
}
