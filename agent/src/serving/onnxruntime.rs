//! The onnxruntime engine: a model file opened as onnxruntime sessions, its signature read from
//! the session, and batches run on a pool of sessions.
//!
//! onnxruntime's Rust binding runs a session through `&mut` (some execution providers are not
//! safe to run concurrently), so each instance thread takes a session from the pool for one
//! batch and puts it back. The pool starts with one session (built at load, which also checks
//! the file) and grows by one whenever every session is busy; it never holds more sessions than
//! batches have run at once, which the instance count bounds. Sessions run their batches in
//! the host's shared thread pool, or in pools of their own when the model asks (see
//! [`super::threads`]); when the instance count changes, a model with its own pools re-splits
//! the cores, and sessions built with the old thread count are dropped as they come back.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use ort::session::Session;
use ort::session::builder::GraphOptimizationLevel;
use ort::value::{
    DynValue, PrimitiveTensorElementType, Tensor as OrtTensor, TensorElementType, ValueType,
};

use tracing::{info, warn};

use super::model_config::{ExecutionProvider, ModelConfig, OrtGraphLevel, OrtOptions};
use super::ort_library::{OrtRuntime, runtime};
use super::runner::{Engine, EngineInfo, FileIo, IoSpec, RunError, Signature, assemble_signature};
use super::tensor::{DataType, Payload, Tensor};
use super::threads::{OrtThreads, host_cores, ort_threads};

/// A model loaded into onnxruntime.
pub struct OrtEngine {
    file: PathBuf,
    runtime: OrtRuntime,
    options: OrtOptions,
    /// Threads of each session's own pool; 0 when the sessions use the host's pool.
    own_threads: AtomicUsize,
    input_names: Vec<String>,
    /// Idle sessions with the `own_threads` they were built with.
    idle: Mutex<Vec<(usize, Session)>>,
}

impl std::fmt::Debug for OrtEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OrtEngine")
            .field("file", &self.file)
            .field("threads", &self.threads())
            .finish_non_exhaustive()
    }
}

impl OrtEngine {
    /// Loads `path`, its batches to run on `threads`. Fails, with where the library was looked
    /// for, when onnxruntime is not installed; with onnxruntime's reason when the file does not
    /// load.
    pub fn load(
        path: &Path,
        config: &ModelConfig,
        options: &OrtOptions,
        threads: OrtThreads,
    ) -> Result<(Self, Signature), String> {
        let runtime = runtime(options.library.as_deref())?;
        let own = match threads {
            OrtThreads::HostPool => 0,
            OrtThreads::Own(n) => n.max(1),
        };
        let session = open_session(&runtime, path, options, own)?;
        let (signature, input_names) = describe(&session, config)?;
        let engine = Self {
            file: path.to_path_buf(),
            runtime,
            options: options.clone(),
            own_threads: AtomicUsize::new(own),
            input_names,
            idle: Mutex::new(vec![(own, session)]),
        };
        Ok((engine, signature))
    }

    /// Where its batches run now.
    pub fn threads(&self) -> OrtThreads {
        match self.own_threads.load(Ordering::Relaxed) {
            0 => OrtThreads::HostPool,
            n => OrtThreads::Own(n),
        }
    }

    /// Sessions built so far (for tests).
    pub fn session_count(&self) -> usize {
        self.idle.lock().map(|s| s.len()).unwrap_or(0)
    }

    fn take_session(&self) -> Result<(usize, Session), RunError> {
        let own = self.own_threads.load(Ordering::Relaxed);
        let spare = self.idle.lock().ok().and_then(|mut idle| idle.pop());
        match spare {
            Some(session) => Ok(session),
            None => open_session(&self.runtime, &self.file, &self.options, own)
                .map(|session| (own, session))
                .map_err(|e| RunError(format!("opening another onnxruntime session: {e}"))),
        }
    }

    fn give_back(&self, session: (usize, Session)) {
        // A session built before the threads were re-split is dropped, not kept.
        if session.0 != self.own_threads.load(Ordering::Relaxed) {
            return;
        }
        if let Ok(mut idle) = self.idle.lock() {
            idle.push(session);
        }
    }
}

/// Opens a session: in the host's pool when `own_threads` is 0, else in a pool of its own.
fn open_session(
    runtime: &OrtRuntime,
    path: &Path,
    options: &OrtOptions,
    own_threads: usize,
) -> Result<Session, String> {
    let fail = |what: &str, e: ort::Error| format!("onnxruntime {what}: {e}");
    let mut builder = Session::builder(&runtime.environment)
        .map_err(|e| fail("session options", e))?
        .with_optimization_level(match options.graph_optimization {
            OrtGraphLevel::Disabled => GraphOptimizationLevel::Disable,
            OrtGraphLevel::Basic => GraphOptimizationLevel::Level1,
            OrtGraphLevel::Extended => GraphOptimizationLevel::Level2,
            OrtGraphLevel::All => GraphOptimizationLevel::All,
        })
        .map_err(|e| fail("optimization level", e.into()))?;
    if own_threads > 0 {
        builder = builder
            .with_independent_thread_pool()
            .map_err(|e| fail("own thread pool", e.into()))?
            .with_intra_threads(own_threads)
            .map_err(|e| fail("intra-op threads", e.into()))?
            .with_inter_threads(1)
            .map_err(|e| fail("inter-op threads", e.into()))?
            .with_intra_op_spinning(options.intra_op_spinning)
            .map_err(|e| fail("intra-op spinning", e.into()))?;
    }
    if options.provider == ExecutionProvider::Cuda {
        builder = builder
            .with_execution_providers([ort::ep::CUDA::default().build().error_on_failure()])
            .map_err(|e| {
                format!(
                    "onnxruntime could not use CUDA (execution_provider = \"cuda\" needs the \
                     GPU build of the library, e.g. `pip install onnxruntime-gpu`, and a GPU): {e}"
                )
            })?;
    }
    let path_text = path.display().to_string();
    builder
        .commit_from_file(path)
        .map_err(|e| format!("onnxruntime could not load {path_text}: {e}"))
}

fn datatype_of(ty: TensorElementType) -> Option<DataType> {
    Some(match ty {
        TensorElementType::Bool => DataType::Bool,
        TensorElementType::Uint8 => DataType::U8,
        TensorElementType::Uint16 => DataType::U16,
        TensorElementType::Uint32 => DataType::U32,
        TensorElementType::Uint64 => DataType::U64,
        TensorElementType::Int8 => DataType::I8,
        TensorElementType::Int16 => DataType::I16,
        TensorElementType::Int32 => DataType::I32,
        TensorElementType::Int64 => DataType::I64,
        TensorElementType::Float16 => DataType::F16,
        TensorElementType::Float32 => DataType::F32,
        TensorElementType::Float64 => DataType::F64,
        TensorElementType::String => DataType::Bytes,
        _ => return None,
    })
}

/// The session's inputs and outputs as the API describes them, and the input names in order.
fn describe(session: &Session, config: &ModelConfig) -> Result<(Signature, Vec<String>), String> {
    let read = |outlets: &[ort::value::Outlet], what: &str| -> Result<Vec<FileIo>, String> {
        outlets
            .iter()
            .map(|outlet| {
                let ValueType::Tensor { ty, shape, .. } = outlet.dtype() else {
                    return Err(format!(
                        "{what} {:?} is not a tensor ({}), which KServe cannot carry",
                        outlet.name(),
                        outlet.dtype()
                    ));
                };
                let datatype = datatype_of(*ty).ok_or_else(|| {
                    format!("{what} {:?} has type {ty:?}, which KServe cannot carry", outlet.name())
                })?;
                let dims: Vec<Option<i64>> =
                    shape.iter().map(|d| (*d >= 0).then_some(*d)).collect();
                Ok((
                    IoSpec { name: outlet.name().to_owned(), datatype, dims: Vec::new() },
                    Some(dims),
                ))
            })
            .collect()
    };
    let inputs = read(session.inputs(), "input")?;
    let outputs = read(session.outputs(), "output")?;
    let names = inputs.iter().map(|(io, _)| io.name.clone()).collect();
    Ok((assemble_signature(inputs, outputs, config), names))
}

/// Element types moved between the agent's little-endian bytes and onnxruntime tensors.
trait Element: PrimitiveTensorElementType + Copy + std::fmt::Debug + 'static {
    const SIZE: usize;
    fn read(bytes: &[u8]) -> Self;
    fn write(self, out: &mut Vec<u8>);
}

macro_rules! element {
    ($($t:ty),*) => {$(
        impl Element for $t {
            const SIZE: usize = std::mem::size_of::<$t>();
            fn read(bytes: &[u8]) -> Self {
                let mut raw = [0u8; std::mem::size_of::<$t>()];
                raw.copy_from_slice(bytes);
                <$t>::from_le_bytes(raw)
            }
            fn write(self, out: &mut Vec<u8>) {
                out.extend_from_slice(&self.to_le_bytes());
            }
        }
    )*};
}
element!(u8, u16, u32, u64, i8, i16, i32, i64, f32, f64, half::f16);

impl Element for bool {
    const SIZE: usize = 1;
    fn read(bytes: &[u8]) -> Self {
        bytes.first().is_some_and(|b| *b != 0)
    }
    fn write(self, out: &mut Vec<u8>) {
        out.push(u8::from(self));
    }
}

fn ort_shape(shape: &[usize]) -> Result<Vec<i64>, RunError> {
    shape
        .iter()
        .map(|d| i64::try_from(*d).map_err(|_| RunError(format!("dimension {d} is too large"))))
        .collect()
}

fn typed_input<T: Element>(shape: &[usize], bytes: &[u8]) -> Result<DynValue, RunError> {
    let data: Vec<T> = bytes.chunks_exact(T::SIZE).map(T::read).collect();
    OrtTensor::from_array((ort_shape(shape)?, data))
        .map(OrtTensor::into_dyn)
        .map_err(|e| RunError(format!("building an onnxruntime tensor: {e}")))
}

fn to_ort(t: &Tensor) -> Result<DynValue, RunError> {
    let shape = t.shape();
    let bytes = match t.payload() {
        Payload::Fixed(bytes) => bytes,
        Payload::Strings(strings) => {
            let strings: Vec<String> =
                strings.iter().map(|s| String::from_utf8_lossy(s).into_owned()).collect();
            return OrtTensor::from_string_array((ort_shape(shape)?, strings.as_slice()))
                .map(OrtTensor::into_dyn)
                .map_err(|e| RunError(format!("building an onnxruntime string tensor: {e}")));
        }
    };
    match t.dtype() {
        DataType::Bool => typed_input::<bool>(shape, bytes),
        DataType::U8 => typed_input::<u8>(shape, bytes),
        DataType::U16 => typed_input::<u16>(shape, bytes),
        DataType::U32 => typed_input::<u32>(shape, bytes),
        DataType::U64 => typed_input::<u64>(shape, bytes),
        DataType::I8 => typed_input::<i8>(shape, bytes),
        DataType::I16 => typed_input::<i16>(shape, bytes),
        DataType::I32 => typed_input::<i32>(shape, bytes),
        DataType::I64 => typed_input::<i64>(shape, bytes),
        DataType::F16 => typed_input::<half::f16>(shape, bytes),
        DataType::F32 => typed_input::<f32>(shape, bytes),
        DataType::F64 => typed_input::<f64>(shape, bytes),
        DataType::Bytes => Err(RunError("BYTES data in fixed-size storage".to_owned())),
    }
}

fn typed_output<T: Element>(value: &DynValue, dtype: DataType) -> Result<Tensor, RunError> {
    let (shape, data) = value
        .try_extract_tensor::<T>()
        .map_err(|e| RunError(format!("reading an onnxruntime output: {e}")))?;
    let shape = shape_of(shape)?;
    let mut bytes = Vec::with_capacity(data.len() * T::SIZE);
    for v in data {
        v.write(&mut bytes);
    }
    Tensor::from_bytes(dtype, shape, bytes).map_err(|e| RunError(e.0))
}

fn shape_of(shape: &[i64]) -> Result<Vec<usize>, RunError> {
    shape
        .iter()
        .map(|d| {
            usize::try_from(*d).map_err(|_| RunError(format!("onnxruntime output dimension {d}")))
        })
        .collect()
}

fn from_ort(value: &DynValue) -> Result<Tensor, RunError> {
    let ValueType::Tensor { ty, .. } = value.dtype() else {
        return Err(RunError(format!("an output is not a tensor ({})", value.dtype())));
    };
    let dtype = datatype_of(*ty)
        .ok_or_else(|| RunError(format!("an output has type {ty:?}, which KServe cannot carry")))?;
    match dtype {
        DataType::Bool => typed_output::<bool>(value, dtype),
        DataType::U8 => typed_output::<u8>(value, dtype),
        DataType::U16 => typed_output::<u16>(value, dtype),
        DataType::U32 => typed_output::<u32>(value, dtype),
        DataType::U64 => typed_output::<u64>(value, dtype),
        DataType::I8 => typed_output::<i8>(value, dtype),
        DataType::I16 => typed_output::<i16>(value, dtype),
        DataType::I32 => typed_output::<i32>(value, dtype),
        DataType::I64 => typed_output::<i64>(value, dtype),
        DataType::F16 => typed_output::<half::f16>(value, dtype),
        DataType::F32 => typed_output::<f32>(value, dtype),
        DataType::F64 => typed_output::<f64>(value, dtype),
        DataType::Bytes => {
            let (shape, strings) = value
                .try_extract_strings()
                .map_err(|e| RunError(format!("reading an onnxruntime string output: {e}")))?;
            let shape = shape_of(shape)?;
            let payload = Payload::Strings(strings.into_iter().map(String::into_bytes).collect());
            Tensor::from_payload(dtype, shape, payload).map_err(|e| RunError(e.0))
        }
    }
}

impl Engine for OrtEngine {
    fn run(&self, inputs: Vec<Tensor>) -> Result<Vec<Tensor>, RunError> {
        let mut values = Vec::with_capacity(inputs.len());
        for (name, t) in self.input_names.iter().zip(&inputs) {
            let value =
                to_ort(t).map_err(|RunError(e)| RunError(format!("input {name:?}: {e}")))?;
            values.push((name.as_str(), value));
        }
        let (built, mut session) = self.take_session()?;
        // onnxruntime reports its failures as errors; a panic in the binding fails this batch and
        // loses this session, not the instance thread.
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let outputs = session.run(values).map_err(|e| RunError(format!("onnxruntime: {e}")))?;
            outputs.values().map(|v| from_ort(&v)).collect::<Result<Vec<_>, _>>()
        }));
        match outcome {
            Ok(result) => {
                self.give_back((built, session));
                result
            }
            Err(_) => Err(RunError("onnxruntime panicked running this batch".to_owned())),
        }
    }

    fn instances_changed(&self, instances: usize) {
        if self.threads() == OrtThreads::HostPool {
            return;
        }
        let (threads, lowered) = ort_threads(&self.options, instances, host_cores());
        let OrtThreads::Own(n) = threads else { return };
        if self.own_threads.swap(n, Ordering::Relaxed) == n {
            return;
        }
        // Idle sessions have the old count; busy ones are dropped when they come back.
        if let Ok(mut idle) = self.idle.lock() {
            idle.clear();
        }
        if let Some(why) = lowered {
            warn!(file = %self.file.display(), reason = %why, "onnxruntime threads lowered to the core budget.");
        }
        info!(file = %self.file.display(), instances, threads = n, "onnxruntime threads re-split for the new instance count.");
    }

    fn info(&self) -> EngineInfo {
        let (threads, pool) = match self.threads() {
            OrtThreads::HostPool => (self.runtime.host_pool_threads, "host"),
            OrtThreads::Own(n) => (n, "model"),
        };
        EngineInfo {
            threads: Some(threads),
            thread_pool: Some(pool),
            graph_optimization: Some(self.options.graph_optimization.name()),
            provider: Some(self.options.provider.name().to_owned()),
            library: Some(format!(
                "onnxruntime {} ({})",
                self.runtime.version,
                self.runtime.library.display()
            )),
            ..EngineInfo::named("onnxruntime")
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::serving::auto;
    use crate::serving::runner::TractEngine;
    use crate::serving::runner::tests::shared_model;

    /// onnxruntime from the wheel `scripts/test` installs into the checkout's `.venv`.
    pub(crate) fn options() -> OrtOptions {
        let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv");
        let library = crate::serving::ort_library::tests::wheel_libraries_under(&venv)
            .into_iter()
            .next()
            .unwrap_or_else(|| {
                panic!(
                    "no onnxruntime wheel in {}: run scripts/test, which installs it",
                    venv.display()
                )
            });
        OrtOptions { library: Some(library), ..OrtOptions::default() }
    }

    pub(crate) fn fixture(file: &str) -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures").join(file)
    }

    fn tokens(rows: usize, seed: u32) -> Tensor {
        let io = IoSpec { name: "tokens".into(), datatype: DataType::I32, dims: vec![-1, 512] };
        auto::trial_tensor(&io, vec![rows, 512], seed as usize).expect("tokens")
    }

    #[test]
    fn an_int32_model_runs_batched_and_agrees_with_tract() {
        let config = ModelConfig::default();
        let file = fixture("text_cnn.onnx");
        let (ort, sig) = OrtEngine::load(&file, &config, &options(), OrtThreads::Own(1))
            .expect("onnxruntime loads");
        let (tract, tract_sig) = TractEngine::load(&file, &config).expect("tract loads");
        assert_eq!(sig, tract_sig, "both engines describe the model alike");
        assert_eq!(sig.inputs[0].datatype, DataType::I32);
        assert_eq!(sig.max_batch_size, 8);
        let batch =
            Tensor::concat_rows(&[&tokens(1, 1), &tokens(1, 2), &tokens(1, 3)]).expect("batch");
        let a = ort.run(vec![batch.clone()]).expect("onnxruntime runs");
        let b = tract.run(vec![batch]).expect("tract runs");
        assert_eq!(a[0].shape(), &[3, 4]);
        let d = auto::max_difference(&b, &a).expect("the engines agree");
        assert!(d < 1e-4, "{d}");
        let info = ort.info();
        assert_eq!(
            (info.engine, info.threads, info.provider.as_deref()),
            ("onnxruntime", Some(1), Some("CPU"))
        );
        assert!(info.library.is_some_and(|l| l.contains("libonnxruntime")));
    }

    #[test]
    fn a_model_with_its_own_pools_re_splits_the_cores_when_instances_change() {
        let file = fixture("text_cnn.onnx");
        let cores = host_cores();
        let asked = OrtOptions { intra_op_threads: Some(cores), ..options() };
        let (ort, _) =
            OrtEngine::load(&file, &ModelConfig::default(), &asked, OrtThreads::Own(cores))
                .expect("loads");
        assert_eq!(ort.threads(), OrtThreads::Own(cores));
        assert_eq!(ort.info().thread_pool, Some("model"));
        ort.run(vec![tokens(1, 1)]).expect("runs");
        assert_eq!(ort.session_count(), 1);
        // Twice the instances: each gets half the cores, and the old session is not reused.
        ort.instances_changed(2);
        let share = (cores / 2).max(1);
        assert_eq!(ort.threads(), OrtThreads::Own(share));
        assert_eq!(ort.info().threads, Some(share));
        if share != cores {
            assert_eq!(ort.session_count(), 0, "sessions of the old thread count are dropped");
        }
        ort.run(vec![tokens(1, 2)]).expect("runs on a session of the new count");
        assert_eq!(ort.session_count(), 1);
        // A model in the host pool has nothing to re-split.
        let (shared, _) =
            OrtEngine::load(&file, &ModelConfig::default(), &options(), OrtThreads::HostPool)
                .expect("loads");
        shared.instances_changed(8);
        assert_eq!(shared.threads(), OrtThreads::HostPool);
        let info = shared.info();
        assert_eq!((info.thread_pool, info.threads), (Some("host"), Some(cores)));
    }

    #[test]
    fn a_scalar_int64_input_and_a_state_run_unbatched() {
        let config = ModelConfig::default();
        let file = shared_model("silero_vad_op18_ifless.onnx");
        let (ort, sig) =
            OrtEngine::load(&file, &config, &options(), OrtThreads::Own(1)).expect("loads");
        assert_eq!(sig.max_batch_size, 0, "{:?}", sig.batching_off_reason);
        let inputs = auto::trial_inputs(&sig, 1).expect("inputs");
        let (tract, _) = TractEngine::load(&file, &config).expect("tract loads");
        let mut inputs = inputs;
        for (io, t) in sig.inputs.iter().zip(inputs.iter_mut()) {
            match io.name.as_str() {
                "sr" => {
                    *t = Tensor::from_bytes(DataType::I64, vec![], 16_000i64.to_le_bytes().to_vec())
                        .expect("sr")
                }
                "input" => *t = auto::trial_tensor(io, vec![1, 512], 5).expect("audio"),
                "state" => {
                    *t = Tensor::from_bytes(DataType::F32, vec![2, 1, 128], vec![0; 1024])
                        .expect("state")
                }
                other => panic!("unexpected input {other}"),
            }
        }
        let a = ort.run(inputs.clone()).expect("onnxruntime runs");
        let b = tract.run(inputs).expect("tract runs");
        auto::max_difference(&b, &a).expect("the engines agree");
    }

    #[test]
    fn concurrent_batches_each_get_a_session_and_the_pool_stays_bounded() {
        let file = fixture("text_cnn.onnx");
        let (ort, _) =
            OrtEngine::load(&file, &ModelConfig::default(), &options(), OrtThreads::Own(1))
                .expect("loads");
        let ort = std::sync::Arc::new(ort);
        let threads: Vec<_> = (0..3u32)
            .map(|i| {
                let ort = ort.clone();
                std::thread::spawn(move || {
                    for j in 0..5 {
                        ort.run(vec![tokens(2, i * 10 + j)]).expect("runs");
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().expect("no panic");
        }
        let sessions = ort.session_count();
        assert!(
            (1..=3).contains(&sessions),
            "one session per concurrent batch at most: {sessions}"
        );
    }

    #[test]
    fn a_wrong_input_is_an_error_that_names_it_not_a_panic() {
        let file = fixture("text_cnn.onnx");
        let (ort, _) =
            OrtEngine::load(&file, &ModelConfig::default(), &options(), OrtThreads::Own(1))
                .expect("loads");
        let wrong = Tensor::from_bytes(DataType::I32, vec![1, 7], vec![0; 28]).expect("tensor");
        let err = ort.run(vec![wrong]).expect_err("a wrong shape fails the batch");
        assert!(err.0.contains("onnxruntime"), "{err}");
        ort.run(vec![tokens(1, 1)]).expect("the engine serves on");
    }

    /// silero's inputs carry meaning (512-sample frames, a 16 kHz rate), so no synthetic trial
    /// runs on both engines: tract serves until the first real request decides.
    #[test]
    fn auto_decides_on_the_first_real_request_when_no_trial_runs() {
        let file = shared_model("silero_vad_op18_ifless.onnx");
        let (engine, sig) =
            auto::choose(&file, &ModelConfig::default(), &options(), OrtThreads::Own(1))
                .expect("loads");
        let before = engine.info();
        assert_eq!(before.engine, "tract");
        let reason = before.choice.expect("a choice").reason;
        assert!(reason.contains("until a real request"), "{reason}");
        let mut inputs = Vec::new();
        for io in &sig.inputs {
            inputs.push(match io.name.as_str() {
                "sr" => Tensor::from_bytes(DataType::I64, vec![], 16_000i64.to_le_bytes().to_vec())
                    .expect("sr"),
                "input" => auto::trial_tensor(io, vec![1, 512], 5).expect("audio"),
                _ => Tensor::from_bytes(DataType::F32, vec![2, 1, 128], vec![0; 1024])
                    .expect("state"),
            });
        }
        engine.run(inputs.clone()).expect("the first request is served at once");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        let choice = loop {
            let choice = engine.info().choice.expect("a choice");
            if choice.reason.contains("decided on the first request") {
                break choice;
            }
            assert!(std::time::Instant::now() < deadline, "no decision: {}", choice.reason);
            std::thread::sleep(std::time::Duration::from_millis(50));
        };
        assert!(choice.tract_us.is_some() && choice.onnxruntime_us.is_some(), "{choice:?}");
        assert_eq!(choice.trial_shapes, vec![vec![1, 512], vec![], vec![2, 1, 128]]);
        assert_eq!(engine.info().engine, choice.chosen);
        engine.run(inputs).expect("the chosen engine serves");
    }

    #[test]
    fn auto_picks_an_engine_and_says_why() {
        let file = fixture("text_cnn.onnx");
        let (engine, sig) =
            auto::choose(&file, &ModelConfig::default(), &options(), OrtThreads::Own(1))
                .expect("loads");
        assert_eq!(sig.inputs[0].datatype, DataType::I32);
        let info = engine.info();
        let choice = info.choice.expect("the choice is reported");
        assert_eq!(choice.chosen, info.engine);
        assert!(choice.reason.contains("faster"), "{}", choice.reason);
        assert!(choice.tract_us.is_some_and(|t| t > 0.0));
        assert!(choice.onnxruntime_us.is_some_and(|t| t > 0.0));
        assert!(choice.max_abs_difference.is_some_and(|d| d < 1e-3));
        assert_eq!(choice.trial_shapes, vec![vec![1, 512]], "512 is fixed by the file");
        engine.run(vec![tokens(2, 9)]).expect("the chosen engine serves");
    }
}

#[cfg(test)]
mod provider_tests {
    use super::tests::{fixture, options};
    use super::*;

    #[test]
    fn cuda_without_a_gpu_build_fails_the_load_naming_what_is_needed() {
        let cuda = OrtOptions { provider: ExecutionProvider::Cuda, ..options() };
        let err = OrtEngine::load(
            &fixture("text_cnn.onnx"),
            &ModelConfig::default(),
            &cuda,
            OrtThreads::Own(1),
        )
        .expect_err("the CPU build of onnxruntime has no CUDA provider");
        assert!(err.contains("onnxruntime-gpu") && err.contains("cuda"), "{err}");
    }

    /// On a GPU host with the GPU build of onnxruntime (`pip install onnxruntime-gpu`, its
    /// library in ORT_DYLIB_PATH): the model runs on CUDA and agrees with tract.
    #[test]
    #[ignore = "needs an NVIDIA GPU and the GPU build of onnxruntime in ORT_DYLIB_PATH"]
    fn gpu_cuda_provider_runs_the_model_and_agrees_with_tract() {
        let library = std::env::var_os("ORT_DYLIB_PATH").map(PathBuf::from);
        let cuda =
            OrtOptions { provider: ExecutionProvider::Cuda, library, ..OrtOptions::default() };
        let file = fixture("text_cnn.onnx");
        let config = ModelConfig::default();
        let (engine, sig) =
            OrtEngine::load(&file, &config, &cuda, OrtThreads::HostPool).expect("loads on CUDA");
        assert_eq!(engine.info().provider.as_deref(), Some("CUDA"));
        let inputs = crate::serving::auto::trial_inputs(&sig, 1).expect("inputs");
        let on_gpu = engine.run(inputs.clone()).expect("runs on the GPU");
        let (tract, _) = crate::serving::runner::TractEngine::load(&file, &config).expect("tract");
        let on_cpu = tract.run(inputs).expect("tract runs");
        let d = crate::serving::auto::max_difference(&on_cpu, &on_gpu).expect("agree");
        println!("CUDA vs tract: max difference {d:e}");
    }
}
