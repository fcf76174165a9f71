//! bench-default-batching: is a model without a config served as fast as with
//! `max_batch_size = 1`?
//!
//! For each model in `--models` (default: the two shared development models), the agent's real
//! inference API on loopback is driven by one closed-loop HTTP client (concurrency 1) under
//! three model configs, each in its own repository and server:
//!
//! - **none**: no `config.toml` (today's default: adaptive batching, starting at one row);
//! - **mbs=1**: `max_batch_size = 1`;
//! - **old default**: `max_batch_size = 8`, `max_queue_delay_us = 500` (the default before
//!   adaptive batching).
//!
//! Each run warms up, then measures for `--seconds`; the configs take turns run by run so a
//! slow moment of the machine hits all three alike. It prints, per model and config, the
//! median over `--runs` of each run's median latency, with the spread of those medians, and the
//! difference to `mbs=1`.
//!
//! ```text
//! cargo run --release -p benches --bin bench-default-batching -- --runs 5 --seconds 2
//! ```

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use agent::serving::runner::Signature;
use anyhow::{Context as _, bail};
use benches::quantile;
use clap::Parser;

#[derive(Debug, Parser)]
#[command(about = "Per-request latency at concurrency 1: no config vs max_batch_size = 1")]
struct Args {
    /// Seconds measured per run.
    #[arg(long, default_value_t = 2.0)]
    seconds: f64,
    /// Runs per model and config (the median is reported).
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Model files to measure.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "../shared/data/models/ppocr_mobile_v2_cls.onnx,../shared/data/models/silero_vad_op18_ifless.onnx"
    )]
    models: Vec<PathBuf>,
}

/// The configs compared, by label.
const CONFIGS: [(&str, Option<&str>); 3] = [
    ("none", None),
    ("mbs=1", Some("max_batch_size = 1\n")),
    ("old default", Some("max_batch_size = 8\nmax_queue_delay_us = 500\n")),
];

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.runs == 0 || args.seconds <= 0.0 {
        bail!("--runs and --seconds must be positive");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    println!(
        "bench-default-batching: concurrency 1, {} runs x {} s per point, {} CPU cores",
        args.runs,
        args.seconds,
        std::thread::available_parallelism().map_or(0, std::num::NonZero::get)
    );
    println!(
        "{:<30} {:<12} | {:>10} {:>10} {:>10} | {:>10} | {:>12}",
        "model", "config", "p50 ms", "min p50", "max p50", "p99 ms", "vs mbs=1 ms"
    );
    for file in &args.models {
        let name = file.file_stem().and_then(|s| s.to_str()).unwrap_or("model").to_owned();
        let mut p50s = vec![Vec::new(); CONFIGS.len()];
        let mut p99s = vec![Vec::new(); CONFIGS.len()];
        for _ in 0..args.runs {
            for (i, (_, config)) in CONFIGS.iter().enumerate() {
                let (p50, p99) = runtime.block_on(served(file, *config, args.seconds))?;
                p50s[i].push(p50);
                p99s[i].push(p99);
            }
        }
        let median = |v: &mut Vec<f64>| {
            v.sort_by(f64::total_cmp);
            quantile(v, 0.5)
        };
        let base = median(&mut p50s[1]);
        for (i, (label, _)) in CONFIGS.iter().enumerate() {
            let p50 = median(&mut p50s[i]);
            let p99 = median(&mut p99s[i]);
            println!(
                "{:<30} {:<12} | {:>10.3} {:>10.3} {:>10.3} | {:>10.3} | {:>+12.3}",
                name,
                label,
                p50,
                p50s[i].first().copied().unwrap_or(f64::NAN),
                p50s[i].last().copied().unwrap_or(f64::NAN),
                p99,
                p50 - base
            );
        }
    }
    Ok(())
}

/// One run: a server for `file` under `config`, one client; (p50, p99) latency in ms.
async fn served(file: &Path, config: Option<&str>, seconds: f64) -> anyhow::Result<(f64, f64)> {
    let repo = tempfile::tempdir()?;
    let dir = repo.path().join("m");
    std::fs::create_dir_all(dir.join("1"))?;
    std::fs::copy(file, dir.join("1/model.onnx"))
        .with_context(|| format!("copying {}", file.display()))?;
    if let Some(text) = config {
        std::fs::write(dir.join("config.toml"), text)?;
    }
    let (serving, shutdown) = benches::serve_repository(repo.path(), 64 << 20).await?;
    let model = serving.repository.get("m", None)?;
    let (header_len, body) = request(&model.signature)?;
    let url = format!("http://{}/v2/models/m/infer", serving.addr);
    let latencies = tokio::task::spawn_blocking(move || -> anyhow::Result<Vec<f64>> {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_secs(60)))
            .build()
            .into();
        let send = || -> anyhow::Result<()> {
            let mut response = agent
                .post(&url)
                .header("Inference-Header-Content-Length", header_len.to_string())
                .send(&body[..])?;
            let _ = response.body_mut().with_config().limit(1 << 30).read_to_vec()?;
            Ok(())
        };
        for _ in 0..50 {
            send()?; // plans built, caches warm
        }
        let mut lat = Vec::new();
        let end = Instant::now() + Duration::from_secs_f64(seconds);
        while Instant::now() < end {
            let t = Instant::now();
            send()?;
            lat.push(t.elapsed().as_secs_f64() * 1000.0);
        }
        Ok(lat)
    })
    .await??;
    shutdown.cancel();
    serving.stopped(agent::serving::HTTP_DRAIN_GRACE).await;
    let mut lat = latencies;
    lat.sort_by(f64::total_cmp);
    Ok((quantile(&lat, 0.5), quantile(&lat, 0.99)))
}

/// A one-row binary-extension request for `signature` (inputs as `benches::inputs` makes them).
fn request(signature: &Signature) -> anyhow::Result<(usize, Vec<u8>)> {
    let inputs = benches::inputs::bench_inputs(signature, 1)?;
    Ok(benches::inputs::binary_request(signature, &inputs))
}
