//! bench-optimize: the model optimizer's report for each shared model (and the INT32 text
//! classifier fixture) under each strategy.
//!
//! Each model is searched once (candidates, accuracy against tract, timings per batch size);
//! each strategy then chooses from the same measured figures. The bench writes a
//! `calibration.json` of real-shaped requests for the shared models (ppocr's 3x48x192 text
//! crops, silero's 512-sample frames at 16 kHz); the text classifier's are synthesized.
//!
//! Live traffic: the same model is served by a real agent inference API on loopback while a
//! client sends one request every `--traffic-interval-ms`; its p50/p99 are printed for a window
//! before the search and for the search itself, so the search's effect on serving shows.
//!
//! With `--quantize`, int8 variants made by onnxruntime's own tools go beside each model first
//! (`benches/optimize/quantize.py`), and the search measures and checks them like any candidate.
//!
//! ```text
//! cargo run --release -p benches --bin bench-optimize -- --rounds 30 --cpu-share 0.5 --quantize
//! ```

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use agent::optimizer::accuracy::Bound;
use agent::optimizer::measure::Effort;
use agent::optimizer::search::{Spec, choose_again, run};
use agent::optimizer::strategy::Strategy;
use agent::serving::model_config::ModelConfig;
use anyhow::Context as _;
use clap::Parser;

#[derive(Debug, Parser)]
#[command(about = "The optimizer's report per model and strategy")]
struct Args {
    /// Model files.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "../shared/data/models/ppocr_mobile_v2_cls.onnx,../shared/data/models/silero_vad_op18_ifless.onnx,tests/fixtures/text_cnn.onnx"
    )]
    models: Vec<PathBuf>,
    /// Timed runs per batch size.
    #[arg(long, default_value_t = 30)]
    rounds: usize,
    /// Share of one core the search may use.
    #[arg(long, default_value_t = 0.5)]
    cpu_share: f64,
    /// Largest batch size searched.
    #[arg(long, default_value_t = 8)]
    max_batch: usize,
    /// Latency SLO for the throughput and cost strategies, p99 ms.
    #[arg(long)]
    slo_ms: Option<f64>,
    /// Largest share of classifier rows allowed to change class.
    #[arg(long, default_value_t = 0.01)]
    max_accuracy_loss: f64,
    /// Make int8 variants of each model first (onnxruntime's quantize_dynamic and a static
    /// QDQ quantization, `benches/optimize/quantize.py`, run in the checkout's `.venv`), so the
    /// search measures them beside the float model.
    #[arg(long)]
    quantize: bool,
    /// Live traffic: one request this often, ms.
    #[arg(long, default_value_t = 10)]
    traffic_interval_ms: u64,
    /// Live traffic measured before the search, seconds.
    #[arg(long, default_value_t = 5.0)]
    traffic_before_s: f64,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let scratch = tempfile::tempdir()?;
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    for file in &args.models {
        let name = file.file_stem().and_then(|s| s.to_str()).unwrap_or("model").to_owned();
        let version = scratch.path().join(&name).join("1");
        std::fs::create_dir_all(&version)?;
        std::fs::copy(file, version.join("model.onnx"))
            .with_context(|| format!("copying {}", file.display()))?;
        let model_dir = scratch.path().join(&name);
        if args.quantize {
            quantize(&version, &name);
        }
        if name.starts_with("silero") {
            std::fs::write(model_dir.join("calibration.json"), silero_requests())?;
        } else if name.starts_with("ppocr") {
            std::fs::write(model_dir.join("calibration.json"), ocr_requests())?;
        }
        // The model served alone in its own repository, with live traffic on it.
        let live_repo = scratch.path().join(format!("live-{name}"));
        std::fs::create_dir_all(live_repo.join(&name).join("1"))?;
        std::fs::copy(file, live_repo.join(&name).join("1/model.onnx"))?;
        let (serving, shutdown) =
            runtime.block_on(benches::serve_repository(&live_repo, 64 << 20))?;
        let model = serving.repository.get(&name, None)?;
        let first = agent::optimizer::calibration::load(&model_dir, &model.signature, 1)
            .map_err(|e| anyhow::anyhow!("{name}: {e}"))?;
        let (header_len, body) =
            benches::inputs::binary_request(&model.signature, &first.requests[0]);
        let url = format!("http://{}/v2/models/{name}/infer", serving.addr);
        let traffic =
            Traffic::start(url, header_len, body, Duration::from_millis(args.traffic_interval_ms));
        std::thread::sleep(Duration::from_secs_f64(args.traffic_before_s));
        let before = traffic.window();
        let spec = Spec {
            file: version.join("model.onnx"),
            config: ModelConfig { max_batch_size: args.max_batch, ..ModelConfig::default() },
            strategy: Strategy::Balanced,
            bound: Bound {
                max_top1_loss: Some(args.max_accuracy_loss),
                max_rel_error: Some(1e-2),
                ..Bound::default()
            },
            slo_ms: args.slo_ms,
            price_per_hour: None,
            effort: Effort {
                rounds: args.rounds,
                max_time: Duration::from_secs(3),
                cpu_share: args.cpu_share,
            },
            calibration_rows: 16,
            footprint_probe: Some(agent_binary()),
            apply: false,
            min_improvement: 0.0,
            max_instances: 4,
        };
        let report = run(&spec, &mut |i, n, what| eprintln!("  [{i}/{n}] {what}"))
            .map_err(|e| anyhow::anyhow!("{name}: {e}"))?;
        let during = traffic.window();
        traffic.stop();
        shutdown.cancel();
        runtime.block_on(serving.stopped(agent::serving::HTTP_DRAIN_GRACE));
        println!(
            "\n{name}: inputs {}; search took {:.1} s at a {} CPU share",
            report.inputs,
            report.took_ms / 1000.0,
            args.cpu_share
        );
        println!(
            "live traffic (1 request per {} ms): before the search {before}; during it {during}",
            args.traffic_interval_ms
        );
        println!(
            "{:<34} {:<8} {:>10} {:>9} {:>9} {:>9} {:>13} {:>8}",
            "candidate",
            "outcome",
            "max abs",
            "top-1",
            "load ms",
            "p99@1 ms",
            "best rows/s@B",
            "peak MiB"
        );
        for s in &report.steps {
            let a = s.agreement.as_ref();
            let best = s
                .timings
                .iter()
                .max_by(|x, y| x.rows_per_s.total_cmp(&y.rows_per_s))
                .map_or("-".to_owned(), |t| format!("{:.1}@{}", t.rows_per_s, t.batch));
            println!(
                "{:<34} {:<8} {:>10} {:>9} {:>9.1} {:>9} {:>13} {:>8}",
                s.candidate,
                s.outcome,
                a.map_or("-".to_owned(), |a| format!("{:.2e}", a.max_abs_error)),
                a.and_then(|a| a.top1_agreement)
                    .map_or("-".to_owned(), |t| format!("{:.1} %", t * 100.0)),
                s.load_ms,
                s.timings.first().map_or("-".to_owned(), |t| format!("{:.3}", t.p99_ms)),
                best,
                s.memory_bytes.map_or("-".to_owned(), |b| format!("{:.1}", b as f64 / 1_048_576.0)),
            );
            if s.outcome != "timed" || s.why != "timed up to the model's largest batch (8)" {
                println!("{:<34}   {}", "", s.why);
            }
        }
        for strategy in Strategy::ALL {
            let (winner, batch, why) = choose_again(&report, strategy, args.slo_ms, None);
            println!(
                "  {:<10} -> {}{}: {why}",
                strategy.name(),
                winner.unwrap_or_else(|| "none".to_owned()),
                batch.map(|b| format!(" at batch {b}")).unwrap_or_default()
            );
        }
        println!("  Pareto set: {}", report.pareto.join("; "));
        let counts = |timings: &[agent::optimizer::measure::InstanceTiming]| {
            timings.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
        };
        if !report.baseline_instances.is_empty() {
            println!(
                "  baseline (tract) instances at once: {}",
                counts(&report.baseline_instances)
            );
        }
        if !report.instances.is_empty() {
            println!(
                "  balanced winner {} at batch {}, instances at once: {}; chosen: {}",
                report.winner.as_deref().unwrap_or("none"),
                report.batch.unwrap_or(1),
                counts(&report.instances),
                report.instances_chosen.map_or("none".to_owned(), |k| k.to_string())
            );
        }
    }
    Ok(())
}

/// Closed-loop-free live traffic: one request per interval from its own thread, latencies kept
/// per window.
struct Traffic {
    stop: Arc<AtomicBool>,
    latencies: Arc<Mutex<Vec<f64>>>,
    errors: Arc<AtomicUsize>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Traffic {
    fn start(url: String, header_len: usize, body: Vec<u8>, every: Duration) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let latencies = Arc::new(Mutex::new(Vec::new()));
        let errors = Arc::new(AtomicUsize::new(0));
        let (s, l, e) = (stop.clone(), latencies.clone(), errors.clone());
        let thread = std::thread::spawn(move || {
            let agent: ureq::Agent = ureq::Agent::config_builder()
                .timeout_global(Some(Duration::from_secs(30)))
                .build()
                .into();
            let mut next = Instant::now();
            while !s.load(Ordering::Relaxed) {
                let t = Instant::now();
                let sent = agent
                    .post(&url)
                    .header("Inference-Header-Content-Length", header_len.to_string())
                    .send(&body[..])
                    .and_then(|mut r| r.body_mut().read_to_vec());
                match sent {
                    Ok(_) => l
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .push(t.elapsed().as_secs_f64() * 1000.0),
                    Err(_) => {
                        e.fetch_add(1, Ordering::Relaxed);
                    }
                }
                next += every;
                std::thread::sleep(next.saturating_duration_since(Instant::now()));
            }
        });
        Self { stop, latencies, errors, thread: Some(thread) }
    }

    /// The latencies since the last window, as `N requests, p50 X ms, p99 Y ms, E errors`.
    fn window(&self) -> String {
        let mut lat = std::mem::take(
            &mut *self.latencies.lock().unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        lat.sort_by(f64::total_cmp);
        format!(
            "{} requests, p50 {:.2} ms, p99 {:.2} ms, {} errors",
            lat.len(),
            benches::quantile(&lat, 0.5),
            benches::quantile(&lat, 0.99),
            self.errors.swap(0, Ordering::Relaxed)
        )
    }

    fn stop(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Runs `benches/optimize/quantize.py` on `version/model.onnx`, writing its variants beside it;
/// a failure is printed and the search goes on with what exists.
fn quantize(version: &std::path::Path, name: &str) {
    let mut command = std::process::Command::new(".venv/bin/python");
    command.arg("benches/optimize/quantize.py").arg(version.join("model.onnx")).arg(version);
    if name.starts_with("ppocr") {
        command.arg("--dims").arg("x=1x3x48x192");
    }
    match command.output() {
        Ok(out) => {
            eprintln!(
                "{name}: {}{}",
                String::from_utf8_lossy(&out.stdout).trim(),
                String::from_utf8_lossy(&out.stderr)
                    .lines()
                    .filter(|l| l.contains("failed"))
                    .map(|l| format!("\n  {l}"))
                    .collect::<String>()
            );
        }
        Err(e) => {
            eprintln!("{name}: quantize.py did not run (run ./scripts/test to make .venv): {e}")
        }
    }
}

/// The release agent beside this binary, which measures each candidate's memory alone.
fn agent_binary() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|dir| dir.join("flotilla-agent")))
        .unwrap_or_else(|| PathBuf::from("flotilla-agent"))
}

/// Four ppocr requests: 3x48x192 crops of a fixed pattern in [-1, 1].
fn ocr_requests() -> String {
    let requests: Vec<serde_json::Value> = (0..4)
        .map(|r| {
            let pixels: Vec<f32> = (0..3 * 48 * 192)
                .map(|i| ((((i * 7 + r * 131) % 255) as f32) / 127.5) - 1.0)
                .collect();
            serde_json::json!({"inputs": [
                {"name": "x", "shape": [1, 3, 48, 192], "datatype": "FP32", "data": pixels},
            ]})
        })
        .collect();
    serde_json::Value::Array(requests).to_string()
}

/// Four silero requests: 512 samples of a tone at 16 kHz, a zero state.
fn silero_requests() -> String {
    let requests: Vec<serde_json::Value> = (0..4)
        .map(|r| {
            let samples: Vec<f32> = (0..512)
                .map(|i| (((i + r * 512) as f32) * 0.05).sin() * 0.3)
                .collect();
            serde_json::json!({"inputs": [
                {"name": "input", "shape": [1, 512], "datatype": "FP32", "data": samples},
                {"name": "state", "shape": [2, 1, 128], "datatype": "FP32", "data": vec![0.0f32; 256]},
                {"name": "sr", "shape": [], "datatype": "INT64", "data": [16000]},
            ]})
        })
        .collect();
    serde_json::Value::Array(requests).to_string()
}
