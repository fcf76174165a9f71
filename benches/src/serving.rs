//! bench-serving: what the inference server costs over running its engine directly.
//!
//! For each model (the `.onnx` files of `--models`, files or directories: by default the shared
//! models and the INT32 text classifier fixture), each engine (tract, onnxruntime), each batch
//! size (1, 2, 4, 8) and each instance count (1, 2), side by side in one run:
//!
//! - **served**: a real agent inference API (axum on loopback, the batcher, instance threads)
//!   driven by closed-loop HTTP clients sending binary tensors. A model that batches gets
//!   single-row requests and forms batches of up to B rows; a model that cannot batch (scalar or
//!   state inputs) gets requests of B rows each.
//! - **raw**: the same rows through the same engine in-process, no server: `instances` threads
//!   each running batches of B rows back to back (onnxruntime with the intra-op threads the
//!   agent's core budget gives it).
//!
//! It prints rows/s, p50 and p99 latency and the mean engine time per batch for both (served:
//! the model's own `compute_infer` statistics over the window), the ratio served/raw (the
//! server's overhead) and served over the fastest engine's raw rate at that point (`vs best`:
//! the physical limit on a CPU). By default the last core is kept for the load generator and
//! the server and the raw runs share the others (`--client-cores 0` puts everything on every
//! core), so served/raw compares like with like and not the client's CPU. Inputs of every datatype are generated (`benches::inputs`). Then the batcher's own
//! overhead per request: the pure policy (push + form), and the whole queue path (queue,
//! worker, instance thread, reply) with a no-op engine.
//!
//! ```text
//! cargo run --release -p benches --bin bench-serving -- --seconds 3
//! ```
//!
//! onnxruntime comes from the `.venv` wheel `scripts/test` installs (or `ORT_DYLIB_PATH`);
//! without it the onnxruntime rows are skipped with the reason.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use agent::serving::batcher::{BatchQueue, Policy, Step};
use agent::serving::model::LoadedModel;
use agent::serving::model_config::ModelConfig;
use agent::serving::onnxruntime::OrtEngine;
use agent::serving::runner::{Engine, RunError, Signature, TractEngine};
use agent::serving::tensor::{DataType, Tensor};
use agent::serving::threads::{host_cores, ort_threads};
use anyhow::{Context as _, bail};
use benches::quantile;
use clap::Parser;

#[derive(Debug, Parser)]
#[command(about = "Served vs raw engine throughput and latency, and the batcher's overhead")]
struct Args {
    /// Seconds per measurement.
    #[arg(long, default_value_t = 3.0)]
    seconds: f64,
    /// .onnx files, or directories of them, to measure.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "../shared/data/models,tests/fixtures/text_cnn.onnx"
    )]
    models: Vec<PathBuf>,
    /// Engines to measure: tract, onnxruntime.
    #[arg(long, value_delimiter = ',', default_value = "tract,onnxruntime")]
    engines: Vec<String>,
    /// Batch sizes.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8")]
    batch: Vec<usize>,
    /// onnxruntime intra-op threads per instance (default: the agent's core budget).
    #[arg(long)]
    ort_threads: Option<usize>,
    /// Whether onnxruntime's idle intra-op threads spin.
    #[arg(long, default_value_t = false)]
    ort_spinning: bool,
    /// Instance counts.
    #[arg(long, value_delimiter = ',', default_value = "1,2")]
    instances: Vec<usize>,
    /// Cores kept for the load generator (the last ones this process may use); the server and
    /// the raw runs get the rest. 0 runs everything on every core.
    #[arg(long, default_value_t = 1)]
    client_cores: usize,
}

/// One measurement's results.
struct Run {
    rows_per_s: f64,
    p50_ms: f64,
    p99_ms: f64,
    /// Mean engine time per batch: raw, each run; served, the model's `compute_infer`.
    engine_ms: f64,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let _ = ORT_SETTINGS.set((args.ort_threads, args.ort_spinning));
    // Before anything starts a thread, so the runtime, the engines and their pools inherit it.
    let split = benches::cores::CoreSplit::apply(args.client_cores)?;
    let _ = CORE_SPLIT.set(split.clone());
    let mut files: Vec<PathBuf> = Vec::new();
    for path in &args.models {
        if path.is_dir() {
            let mut found: Vec<PathBuf> = std::fs::read_dir(path)
                .with_context(|| format!("reading {}", path.display()))?
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|e| e == "onnx"))
                .collect();
            found.sort();
            files.extend(found);
        } else {
            files.push(path.clone());
        }
    }
    if files.is_empty() {
        bail!("no .onnx files in {:?}", args.models);
    }
    let mut engines = Vec::new();
    for name in &args.engines {
        match name.as_str() {
            "tract" => engines.push(EngineKind::Tract),
            "onnxruntime" => match agent::serving::ort_library::runtime(None) {
                Ok(rt) => {
                    println!("onnxruntime {} from {}", rt.version, rt.library.display());
                    engines.push(EngineKind::Onnxruntime);
                }
                Err(e) => println!("skipping onnxruntime: {e}"),
            },
            other => bail!("--engines: must be tract or onnxruntime, got {other:?}"),
        }
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    println!(
        "bench-serving: {} s per point, {} CPU cores for the server and the raw runs ({})",
        args.seconds,
        host_cores(),
        split.as_ref().map_or_else(
            || "the load generator shares them".to_owned(),
            benches::cores::CoreSplit::describe
        )
    );
    println!(
        "{:<20} {:<11} {:>2} {:>4} | {:>8} {:>7} {:>7} {:>7} | {:>9} {:>7} {:>7} {:>7} | {:>5} {:>7}",
        "model",
        "engine",
        "B",
        "inst",
        "raw r/s",
        "p50 ms",
        "p99 ms",
        "eng ms",
        "served/s",
        "p50 ms",
        "p99 ms",
        "eng ms",
        "ratio",
        "vs best"
    );
    for file in &files {
        let name = file.file_stem().and_then(|s| s.to_str()).unwrap_or("model").to_owned();
        for &instances in &args.instances {
            for &batch in &args.batch {
                let mut rows = Vec::new();
                for &engine in &engines {
                    let raw = raw_run(engine, file, batch, instances, args.seconds)?;
                    let served = runtime.block_on(served_run(
                        engine,
                        file,
                        batch,
                        instances,
                        args.seconds,
                    ))?;
                    rows.push((engine, raw, served));
                }
                let best = rows.iter().map(|(_, raw, _)| raw.rows_per_s).fold(0.0, f64::max);
                for (engine, raw, served) in rows {
                    println!(
                        "{:<20} {:<11} {:>2} {:>4} | {:>8.1} {:>7.2} {:>7.2} {:>7.3} | {:>9.1} {:>7.2} {:>7.2} {:>7.3} | {:>5.2} {:>7.2}",
                        name.chars().take(20).collect::<String>(),
                        engine.name(),
                        batch,
                        instances,
                        raw.rows_per_s,
                        raw.p50_ms,
                        raw.p99_ms,
                        raw.engine_ms,
                        served.rows_per_s,
                        served.p50_ms,
                        served.p99_ms,
                        served.engine_ms,
                        served.rows_per_s / raw.rows_per_s,
                        served.rows_per_s / best,
                    );
                }
            }
        }
    }
    batcher_overhead(&runtime);
    let floor = runtime.block_on(http_floor(args.seconds))?;
    println!(
        "HTTP floor (GET /v2/health/live, {FLOOR_CLIENTS} closed-loop clients, same cores): {floor:.0} requests/s, {:.1} us per request",
        1e6 / floor
    );
    Ok(())
}

/// Closed-loop clients measuring the HTTP floor: enough to keep the server's cores busy.
const FLOOR_CLIENTS: usize = 8;

/// Requests/s the inference port answers with no model work at all: the transport's own cost
/// (loopback TCP, HTTP, routing) on the server's cores, the floor under every served request.
async fn http_floor(seconds: f64) -> anyhow::Result<f64> {
    let repo = tempfile::tempdir()?;
    let (serving, shutdown) = benches::serve_repository(repo.path(), 1 << 20).await?;
    let url = format!("http://{}/v2/health/live", serving.addr);
    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let handles: Vec<_> = (0..FLOOR_CLIENTS)
        .map(|_| {
            let (url, stop) = (url.clone(), stop.clone());
            std::thread::spawn(move || {
                benches::cores::pin_client(CORE_SPLIT.get().and_then(Option::as_ref));
                let agent = http_agent();
                let mut answered = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let Ok(mut response) = agent.get(&url).call() else { break };
                    let _ = response.body_mut().read_to_vec();
                    answered += 1;
                }
                answered
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs_f64(seconds)).await;
    stop.store(true, Ordering::Relaxed);
    let elapsed = start.elapsed().as_secs_f64();
    let mut answered = 0;
    for h in handles {
        answered += tokio::task::spawn_blocking(move || h.join().unwrap_or_default()).await?;
    }
    shutdown.cancel();
    serving.stopped(agent::serving::HTTP_DRAIN_GRACE).await;
    Ok(answered as f64 / elapsed)
}

/// The cores given to the load generator, if they are split off.
static CORE_SPLIT: std::sync::OnceLock<Option<benches::cores::CoreSplit>> =
    std::sync::OnceLock::new();

/// `--ort-threads` and `--ort-spinning`, for the raw and the served runs alike.
static ORT_SETTINGS: std::sync::OnceLock<(Option<usize>, bool)> = std::sync::OnceLock::new();

fn ort_settings() -> (Option<usize>, bool) {
    ORT_SETTINGS.get().copied().unwrap_or((None, false))
}

/// The engines measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum EngineKind {
    Tract,
    Onnxruntime,
}

impl EngineKind {
    fn name(self) -> &'static str {
        match self {
            Self::Tract => "tract",
            Self::Onnxruntime => "onnxruntime",
        }
    }
}

fn inputs_for(signature: &Signature, rows: usize) -> anyhow::Result<Vec<Tensor>> {
    benches::inputs::bench_inputs(signature, rows)
}

fn load(
    kind: EngineKind,
    file: &Path,
    batch: usize,
    instances: usize,
) -> anyhow::Result<(Arc<dyn Engine>, Signature)> {
    let config = ModelConfig { max_batch_size: batch, instances, ..ModelConfig::default() };
    let loaded = match kind {
        EngineKind::Tract => {
            TractEngine::load(file, &config).map(|(e, s)| (Arc::new(e) as Arc<dyn Engine>, s))
        }
        EngineKind::Onnxruntime => {
            let (asked, spinning) = ort_settings();
            let options = agent::serving::model_config::OrtOptions {
                intra_op_threads: asked,
                intra_op_spinning: spinning,
                ..config.onnxruntime.clone()
            };
            // As the agent does: the host's pool unless threads or spinning are asked for.
            let (threads, _) = ort_threads(&options, instances, host_cores());
            OrtEngine::load(file, &config, &options, threads)
                .map(|(e, s)| (Arc::new(e) as Arc<dyn Engine>, s))
        }
    };
    loaded.map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))
}

/// The engine in-process: `instances` threads running batches of `batch` rows back to back.
fn raw_run(
    kind: EngineKind,
    file: &Path,
    batch: usize,
    instances: usize,
    seconds: f64,
) -> anyhow::Result<Run> {
    let (engine, signature) = load(kind, file, batch, instances)?;
    let inputs = inputs_for(&signature, batch)?;
    for _ in 0..=instances {
        engine.run(inputs.clone()).map_err(|e| anyhow::anyhow!("{e}"))?; // plans, sessions
    }
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    let start = Instant::now();
    let results: Vec<Vec<f64>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..instances)
            .map(|_| {
                let engine = engine.clone();
                let inputs = inputs.clone();
                scope.spawn(move || {
                    let mut lat = Vec::new();
                    while Instant::now() < deadline {
                        let t = Instant::now();
                        if engine.run(inputs.clone()).is_err() {
                            break;
                        }
                        lat.push(t.elapsed().as_secs_f64() * 1000.0);
                    }
                    lat
                })
            })
            .collect();
        handles.into_iter().filter_map(|h| h.join().ok()).collect()
    });
    let elapsed = start.elapsed().as_secs_f64();
    let mut lat: Vec<f64> = results.into_iter().flatten().collect();
    lat.sort_by(f64::total_cmp);
    Ok(Run {
        rows_per_s: (lat.len() * batch) as f64 / elapsed,
        p50_ms: quantile(&lat, 0.5),
        p99_ms: quantile(&lat, 0.99),
        engine_ms: lat.iter().sum::<f64>() / lat.len().max(1) as f64,
    })
}

/// The agent's inference API on loopback, driven by closed-loop HTTP clients.
async fn served_run(
    kind: EngineKind,
    file: &Path,
    batch: usize,
    instances: usize,
    seconds: f64,
) -> anyhow::Result<Run> {
    let repo = tempfile::tempdir()?;
    let dir = repo.path().join("m");
    std::fs::create_dir_all(dir.join("1"))?;
    std::fs::copy(file, dir.join("1/model.onnx"))?;
    std::fs::write(
        dir.join("config.toml"),
        format!(
            "backend = \"{}\"\nmax_batch_size = {batch}\nmax_queue_delay_us = 2000\ninstances = {instances}\nmax_queue_size = 1024\n{}",
            kind.name(),
            match ort_settings() {
                (Some(t), spin) =>
                    format!("[onnxruntime]\nintra_op_threads = {t}\nintra_op_spinning = {spin}\n"),
                (None, spin) => format!("[onnxruntime]\nintra_op_spinning = {spin}\n"),
            }
        ),
    )?;
    let (serving, shutdown) = benches::serve_repository(repo.path(), 64 << 20).await?;
    let model = serving.repository.get("m", None)?;
    let batched = model.signature.max_batch_size > 0;
    let rows_per_request = if batched { 1 } else { batch };
    let clients = if batched { 2 * batch * instances } else { 2 * instances };
    let inputs = inputs_for(&model.signature, rows_per_request)?;
    let body = binary_body(&model.signature, &inputs);
    let url = format!("http://{}/v2/models/m/infer", serving.addr);
    // Warm every plan the run can use (each batch size up to B) before measuring.
    let warm = tokio::task::spawn_blocking({
        let (url, body) = (url.clone(), body.clone());
        move || -> anyhow::Result<()> {
            let agent = http_agent();
            for _ in 0..(4 * batch) {
                post(&agent, &url, &body)?;
            }
            Ok(())
        }
    });
    warm.await??;
    for rows in 1..=model.signature.max_batch_size {
        let _ = model.infer(inputs_for(&model.signature, rows)?, None, None).await;
    }
    let stop = Arc::new(AtomicBool::new(false));
    let engine_before = engine_time(&model);
    let start = Instant::now();
    let handles: Vec<_> = (0..clients)
        .map(|_| {
            let (url, body, stop) = (url.clone(), body.clone(), stop.clone());
            std::thread::spawn(move || {
                benches::cores::pin_client(CORE_SPLIT.get().and_then(Option::as_ref));
                let agent = http_agent();
                let mut lat = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let t = Instant::now();
                    if post(&agent, &url, &body).is_err() {
                        break;
                    }
                    lat.push(t.elapsed().as_secs_f64() * 1000.0);
                }
                lat
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs_f64(seconds)).await;
    stop.store(true, Ordering::Relaxed);
    let elapsed = start.elapsed().as_secs_f64();
    let engine_after = engine_time(&model);
    let mut lat: Vec<f64> = Vec::new();
    for h in handles {
        lat.extend(tokio::task::spawn_blocking(move || h.join().unwrap_or_default()).await?);
    }
    shutdown.cancel();
    serving.stopped(agent::serving::HTTP_DRAIN_GRACE).await;
    lat.sort_by(f64::total_cmp);
    let batches = engine_after.0.saturating_sub(engine_before.0);
    Ok(Run {
        rows_per_s: (lat.len() * rows_per_request) as f64 / elapsed,
        p50_ms: quantile(&lat, 0.5),
        p99_ms: quantile(&lat, 0.99),
        engine_ms: (engine_after.1 - engine_before.1) / batches.max(1) as f64 / 1e6,
    })
}

/// Batches run and their engine time in ns so far, from the model's Triton statistics.
fn engine_time(model: &LoadedModel) -> (u64, f64) {
    let stats = model.stats.triton_json();
    let sizes = stats["batch_stats"].as_array().cloned().unwrap_or_default();
    sizes.iter().fold((0, 0.0), |(count, ns), size| {
        let infer = &size["compute_infer"];
        (count + infer["count"].as_u64().unwrap_or(0), ns + infer["ns"].as_f64().unwrap_or(0.0))
    })
}

fn http_agent() -> ureq::Agent {
    ureq::Agent::config_builder().timeout_global(Some(Duration::from_secs(60))).build().into()
}

/// A binary-extension request: the JSON header's length and the whole body.
#[derive(Clone)]
struct Body {
    header_len: usize,
    bytes: Vec<u8>,
}

fn binary_body(signature: &Signature, inputs: &[Tensor]) -> Arc<Body> {
    let (header_len, bytes) = benches::inputs::binary_request(signature, inputs);
    Arc::new(Body { header_len, bytes })
}

fn post(agent: &ureq::Agent, url: &str, body: &Body) -> anyhow::Result<()> {
    let mut response = agent
        .post(url)
        .header("Inference-Header-Content-Length", body.header_len.to_string())
        .send(&body.bytes[..])?;
    let _ = response.body_mut().with_config().limit(1 << 30).read_to_vec()?;
    Ok(())
}

/// An engine that returns its inputs: the queue path with no compute.
struct Echo;

impl Engine for Echo {
    fn run(&self, inputs: Vec<Tensor>) -> Result<Vec<Tensor>, RunError> {
        Ok(inputs)
    }
}

fn batcher_overhead(runtime: &tokio::runtime::Runtime) {
    // The pure policy: push one request and form batches of 8, many times.
    let policy =
        Policy::from_config(&ModelConfig { max_queue_size: 1 << 20, ..ModelConfig::default() });
    let mut queue = BatchQueue::new(policy);
    let n = 1_000_000u32;
    let now = tokio::time::Instant::now();
    let t = Instant::now();
    let mut dispatched = 0usize;
    for i in 0..n {
        let _ = queue.push(i, 1, 1, None, now, Duration::ZERO);
        if let Step::Dispatch(b) = queue.next(now, Duration::ZERO) {
            dispatched += b.items.len();
        }
    }
    let policy_ns = t.elapsed().as_nanos() as f64 / f64::from(n);
    println!(
        "\nbatcher policy: {policy_ns:.0} ns per request (push + form), {dispatched} dispatched in batches of 8"
    );

    // The whole queue path with a no-op engine, 16 concurrent callers.
    let per_request_us = runtime.block_on(async {
        let signature = Signature {
            inputs: vec![],
            outputs: vec![],
            max_batch_size: 8,
            batching_off_reason: None,
        };
        let config = ModelConfig {
            max_queue_delay: Duration::from_micros(100),
            adaptive: false,
            ..ModelConfig::default()
        };
        let Ok(model) = LoadedModel::start("echo", "1", config, signature, Arc::new(Echo)) else {
            return f64::NAN;
        };
        let x = Tensor::from_bytes(DataType::F32, vec![1, 4], vec![0; 16]).ok();
        let requests = 20_000usize;
        let t = Instant::now();
        let tasks: Vec<_> = (0..16)
            .map(|_| {
                let (model, x) = (model.clone(), x.clone());
                tokio::spawn(async move {
                    for _ in 0..requests / 16 {
                        let _ = model.infer(x.clone().into_iter().collect(), None, None).await;
                    }
                })
            })
            .collect();
        for task in tasks {
            let _ = task.await;
        }
        let us = t.elapsed().as_secs_f64() * 1e6 / requests as f64;
        model.stop(agent::serving::model::StopCause::Unload);
        us
    });
    println!(
        "batcher queue path (queue, worker, instance thread, reply; no-op engine, 16 callers): {per_request_us:.1} us per request"
    );
}
