//! bench-serving: what the inference server costs over running tract directly.
//!
//! For each model in `../shared/data/models/` (or `--models DIR`), each batch size (1, 2, 4, 8)
//! and each instance count (1, 2), side by side in one run:
//!
//! - **served**: a real agent inference API (axum on loopback, the batcher, instance threads)
//!   driven by closed-loop HTTP clients sending binary tensors. A model that batches gets
//!   single-row requests and forms batches of up to B rows; a model that cannot batch (scalar or
//!   state inputs) gets requests of B rows each.
//! - **raw**: the same rows through the same tract plans in-process, no server: `instances`
//!   threads each running batches of B rows back to back.
//!
//! It prints rows/s, p50 and p99 latency for both and the ratio served/raw (the server's
//! overhead; the goal is at least 0.9). Then the batcher's own overhead per request: the pure
//! policy (push + form), and the whole queue path (queue, worker, instance thread, reply) with a
//! no-op engine.
//!
//! ```text
//! cargo run --release -p benches --bin bench-serving -- --seconds 3
//! ```

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use agent::serving::batcher::{BatchQueue, Policy, Step};
use agent::serving::model::LoadedModel;
use agent::serving::model_config::ModelConfig;
use agent::serving::runner::{Engine, RunError, Signature, TractEngine};
use agent::serving::tensor::{DataType, Tensor};
use anyhow::{Context as _, bail};
use benches::quantile;
use clap::Parser;
use common::config::agent::ServingConfig;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Parser)]
#[command(about = "Served vs raw tract throughput and latency, and the batcher's overhead")]
struct Args {
    /// Seconds per measurement.
    #[arg(long, default_value_t = 3.0)]
    seconds: f64,
    /// Directory of .onnx files to measure.
    #[arg(long, default_value = "../shared/data/models")]
    models: PathBuf,
    /// Batch sizes.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8")]
    batch: Vec<usize>,
    /// Instance counts.
    #[arg(long, value_delimiter = ',', default_value = "1,2")]
    instances: Vec<usize>,
}

/// One measurement's results.
struct Run {
    rows_per_s: f64,
    p50_ms: f64,
    p99_ms: f64,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut files: Vec<PathBuf> = std::fs::read_dir(&args.models)
        .with_context(|| format!("reading {}", args.models.display()))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "onnx"))
        .collect();
    files.sort();
    if files.is_empty() {
        bail!("no .onnx files in {}", args.models.display());
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    println!(
        "bench-serving: {} s per point, {} CPU cores",
        args.seconds,
        std::thread::available_parallelism().map_or(0, std::num::NonZero::get)
    );
    println!(
        "{:<30} {:>2} {:>4} | {:>9} {:>8} {:>8} | {:>9} {:>8} {:>8} | {:>6}",
        "model",
        "B",
        "inst",
        "raw r/s",
        "p50 ms",
        "p99 ms",
        "served r/s",
        "p50 ms",
        "p99 ms",
        "ratio"
    );
    for file in &files {
        let name = file.file_stem().and_then(|s| s.to_str()).unwrap_or("model").to_owned();
        for &instances in &args.instances {
            for &batch in &args.batch {
                let raw = raw_run(file, batch, instances, args.seconds)?;
                let served = runtime.block_on(served_run(file, batch, instances, args.seconds))?;
                println!(
                    "{:<30} {:>2} {:>4} | {:>9.1} {:>8.2} {:>8.2} | {:>9.1} {:>8.2} {:>8.2} | {:>6.2}",
                    name,
                    batch,
                    instances,
                    raw.rows_per_s,
                    raw.p50_ms,
                    raw.p99_ms,
                    served.rows_per_s,
                    served.p50_ms,
                    served.p99_ms,
                    served.rows_per_s / raw.rows_per_s
                );
            }
        }
    }
    batcher_overhead(&runtime);
    Ok(())
}

/// Inputs of `rows` rows (or per-request rows for unbatched models) for `signature`.
fn inputs_for(signature: &Signature, rows: usize) -> anyhow::Result<Vec<Tensor>> {
    let mut seed = 1u32;
    signature
        .inputs
        .iter()
        .map(|io| {
            let shape: Vec<usize> = io
                .dims
                .iter()
                .enumerate()
                .map(|(axis, d)| match usize::try_from(*d) {
                    Ok(d) => d,
                    // Open sizes: the batch axis takes the rows; others the sizes the shared
                    // data README gives (48x192 images, 512-sample audio, state of `rows`).
                    Err(_) if axis == 0 => rows,
                    Err(_) if io.dims.len() == 4 && axis == 2 => 48,
                    Err(_) if io.dims.len() == 4 && axis == 3 => 192,
                    Err(_) if io.dims.len() == 2 => 512,
                    Err(_) => rows,
                })
                .collect();
            let n: usize = shape.iter().product();
            let bytes = match io.datatype {
                DataType::F32 => (0..n)
                    .flat_map(|_| {
                        seed ^= seed << 13;
                        seed ^= seed >> 17;
                        seed ^= seed << 5;
                        ((seed % 2000) as f32 / 1000.0 - 1.0).to_le_bytes()
                    })
                    .collect(),
                DataType::I64 => (0..n).flat_map(|_| 16_000i64.to_le_bytes()).collect(),
                other => bail!("bench inputs of type {other} are not generated"),
            };
            Ok(Tensor::from_bytes(io.datatype, shape, bytes)?)
        })
        .collect()
}

fn load(file: &Path, batch: usize) -> anyhow::Result<(TractEngine, Signature)> {
    let config = ModelConfig { max_batch_size: batch, ..ModelConfig::default() };
    TractEngine::load(file, &config).map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))
}

/// tract in-process: `instances` threads running batches of `batch` rows back to back.
fn raw_run(file: &Path, batch: usize, instances: usize, seconds: f64) -> anyhow::Result<Run> {
    let (engine, signature) = load(file, batch)?;
    let inputs = inputs_for(&signature, batch)?;
    engine.run(inputs.clone()).map_err(|e| anyhow::anyhow!("{e}"))?; // build the plan
    let engine = Arc::new(engine);
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
    })
}

/// The agent's inference API on loopback, driven by closed-loop HTTP clients.
async fn served_run(
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
            "max_batch_size = {batch}\nmax_queue_delay_us = 2000\ninstances = {instances}\nmax_queue_size = 1024\n"
        ),
    )?;
    let config = ServingConfig {
        listen: "127.0.0.1:0".parse()?,
        model_repository: repo.path().to_owned(),
        max_request_bytes: 64 << 20,
        admin_token_file: None,
        limits: common::config::agent::ServingLimits::default(),
    };
    let shutdown = CancellationToken::new();
    let serving = agent::serving::Serving::start(&config, shutdown.clone()).await?;
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
    let start = Instant::now();
    let handles: Vec<_> = (0..clients)
        .map(|_| {
            let (url, body, stop) = (url.clone(), body.clone(), stop.clone());
            std::thread::spawn(move || {
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
    let mut lat: Vec<f64> = Vec::new();
    for h in handles {
        lat.extend(tokio::task::spawn_blocking(move || h.join().unwrap_or_default()).await?);
    }
    shutdown.cancel();
    serving.stopped(agent::serving::HTTP_DRAIN_GRACE).await;
    lat.sort_by(f64::total_cmp);
    Ok(Run {
        rows_per_s: (lat.len() * rows_per_request) as f64 / elapsed,
        p50_ms: quantile(&lat, 0.5),
        p99_ms: quantile(&lat, 0.99),
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
    let mut binary = Vec::new();
    let mut header = Vec::new();
    for (io, t) in signature.inputs.iter().zip(inputs) {
        let bytes = t.to_binary();
        header.push(serde_json::json!({
            "name": io.name, "shape": t.shape(), "datatype": t.dtype().name(),
            "parameters": {"binary_data_size": bytes.len()},
        }));
        binary.extend(bytes);
    }
    let outputs: Vec<_> = signature
        .outputs
        .iter()
        .map(|o| serde_json::json!({"name": o.name, "parameters": {"binary_data": true}}))
        .collect();
    let head = serde_json::json!({"inputs": header, "outputs": outputs}).to_string();
    let header_len = head.len();
    let mut bytes = head.into_bytes();
    bytes.extend(binary);
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
