//! bench-overload: the agent's inference API past its capacity, with open-loop clients.
//!
//! The agent runs as a child process (this binary with `serve`), serving one real model from
//! `../shared/data/models/` (default: the PaddleOCR direction classifier, binary FP32 requests of
//! `[1, 3, 48, 192]`) with every `[serving]` limit at its default. The parent:
//!
//! 1. steps an open-loop request rate up (doubling from `--start-rate`, `--step-seconds` each)
//!    until at least 1 % of the requests are refused: that rate is R, where refusing starts;
//! 2. drives R/2 (below capacity), then 2R and 5R, `--seconds` each, open loop (each request is
//!    sent at its scheduled time on a fresh connection, whatever earlier ones are doing);
//! 3. prints for each: offered and answered rates, the refusal rate with the statuses, p50 and
//!    p99 latency of admitted (200) requests, and the agent process's peak and final RSS.
//!
//! With `--compare-queue-wait-ms W`, a second agent whose model has `max_queue_wait_ms = W`
//! (0 turns the early refusal off) runs beside the first, and every phase drives one, then the
//! other, at the same rate: the two rows of each phase are measured side by side.
//!
//! ```text
//! cargo build --release -p benches --bin bench-overload
//! target/release/bench-overload --seconds 10
//! target/release/bench-overload --seconds 6 --compare-queue-wait-ms 0
//! ```

use std::collections::BTreeMap;
use std::io::{BufRead as _, Read as _};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use benches::quantile;
use clap::{Parser, Subcommand};
use common::config::agent::{ServingConfig, ServingLimits};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
struct Args {
    /// The model file to serve.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Seconds of each measured phase (R/2, 2R, 5R).
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
    /// Seconds of each step while looking for R.
    #[arg(long, default_value_t = 3.0)]
    step_seconds: f64,
    /// First rate tried, requests/s.
    #[arg(long, default_value_t = 25.0)]
    start_rate: f64,
    /// Instance threads of the model.
    #[arg(long, default_value_t = 2)]
    instances: usize,
    /// The model's max_queue_size.
    #[arg(long, default_value_t = 64)]
    queue: usize,
    /// The model's max_queue_wait_ms (0: no early refusal by expected wait).
    #[arg(long, default_value_t = 1000)]
    max_queue_wait_ms: u64,
    /// Also run a second agent with this max_queue_wait_ms, phase by phase beside the first.
    #[arg(long)]
    compare_queue_wait_ms: Option<u64>,
    #[command(subcommand)]
    command: Option<Cmd>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Child mode: serve the model, print `ADDR host:port`, stop when stdin closes.
    Serve,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let model = args.model.clone().unwrap_or_else(|| {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../../shared/data/models/ppocr_mobile_v2_cls.onnx")
    });
    if !model.is_file() {
        bail!("no model at {}; pass --model FILE", model.display());
    }
    if matches!(args.command, Some(Cmd::Serve)) {
        return serve(&model, args.instances, args.queue, args.max_queue_wait_ms);
    }
    let mut waits = vec![args.max_queue_wait_ms];
    waits.extend(args.compare_queue_wait_ms);
    let mut agents = Vec::new();
    for wait in waits {
        let (child, addr) = spawn_agent(&model, &args, wait)?;
        agents.push(Target { label: format!("wait {wait}"), addr, pid: child.id(), child });
    }
    let result = drive(&args, &agents);
    for mut agent in agents {
        let _ = agent.child.kill();
        let _ = agent.child.wait();
    }
    result
}

/// One agent child under load.
struct Target {
    label: String,
    addr: std::net::SocketAddr,
    pid: u32,
    child: Child,
}

// === the agent (child) ===

fn serve(model: &Path, instances: usize, queue: usize, wait_ms: u64) -> anyhow::Result<()> {
    let repo = tempfile::tempdir()?;
    let dir = repo.path().join("m");
    std::fs::create_dir_all(dir.join("1"))?;
    std::fs::copy(model, dir.join("1/model.onnx"))?;
    std::fs::write(
        dir.join("config.toml"),
        format!(
            "max_batch_size = 1\ninstances = {instances}\nmax_queue_size = {queue}\n\
             max_queue_wait_ms = {wait_ms}\n"
        ),
    )?;
    let runtime =
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    runtime.block_on(async {
        let config = ServingConfig {
            listen: "127.0.0.1:0".parse()?,
            model_repository: repo.path().to_owned(),
            max_request_bytes: 64 << 20,
            admin_token_file: None,
            limits: ServingLimits::default(),
        };
        let shutdown = CancellationToken::new();
        let serving = agent::serving::Serving::start(&config, shutdown.clone()).await?;
        println!("ADDR {}", serving.addr);
        // Until the parent closes stdin.
        tokio::task::spawn_blocking(|| {
            let mut sink = Vec::new();
            let _ = std::io::stdin().read_to_end(&mut sink);
        })
        .await?;
        shutdown.cancel();
        serving.stopped(std::time::Duration::from_secs(5)).await;
        anyhow::Ok(())
    })
}

fn spawn_agent(
    model: &Path,
    args: &Args,
    wait_ms: u64,
) -> anyhow::Result<(Child, std::net::SocketAddr)> {
    let exe = std::env::current_exe()?;
    let mut child = Command::new(exe)
        .arg("--model")
        .arg(model)
        .arg("--instances")
        .arg(args.instances.to_string())
        .arg("--queue")
        .arg(args.queue.to_string())
        .arg("--max-queue-wait-ms")
        .arg(wait_ms.to_string())
        .arg("serve")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting the agent child")?;
    let stdout = child.stdout.take().context("child stdout")?;
    let mut lines = std::io::BufReader::new(stdout).lines();
    loop {
        let Some(line) = lines.next() else { bail!("the agent child exited before listening") };
        if let Some(addr) = line?.strip_prefix("ADDR ") {
            return Ok((child, addr.parse()?));
        }
    }
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

// === the load (parent) ===

struct Phase {
    offered_per_s: f64,
    answered_per_s: f64,
    refused_pct: f64,
    statuses: BTreeMap<u16, usize>,
    p50_ms: f64,
    p99_ms: f64,
    peak_rss_mib: f64,
    end_rss_mib: f64,
}

fn drive(args: &Args, agents: &[Target]) -> anyhow::Result<()> {
    let runtime =
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let Some(first) = agents.first() else { bail!("no agent to drive") };
    let request = Arc::new(request_bytes(first.addr));
    for agent in agents {
        println!(
            "agent ({}) pid {} on {}; idle RSS {:.1} MiB",
            agent.label,
            agent.pid,
            agent.addr,
            rss_kib(agent.pid) as f64 / 1024.0
        );
        // Warm the plan.
        runtime.block_on(async {
            for _ in 0..20 {
                let _ = one(agent.addr, &request).await;
            }
        });
    }
    let mut rate = args.start_rate;
    let onset = loop {
        let p = runtime.block_on(phase(first.addr, &request, rate, args.step_seconds, first.pid));
        println!(
            "  step {rate:>7.0}/s: answered {:>7.1}/s, refused {:>5.1} %, admitted p99 {:>7.1} ms",
            p.answered_per_s, p.refused_pct, p.p99_ms
        );
        if p.refused_pct >= 1.0 {
            break rate;
        }
        rate *= 2.0;
        if rate > 100_000.0 {
            bail!("no refusals up to 100000 requests/s");
        }
    };
    println!("refusals start at R = {onset:.0} requests/s (>= 1 % refused, {})\n", first.label);
    println!(
        "{:>6} {:>10} {:>9} {:>10} {:>9} {:>9} {:>9} {:>10} {:>9}  statuses",
        "load",
        "agent",
        "offered/s",
        "answered/s",
        "refused%",
        "p50 ms",
        "p99 ms",
        "peak RSS",
        "end RSS"
    );
    for (label, factor) in [("R/2", 0.5), ("2R", 2.0), ("5R", 5.0)] {
        for agent in agents {
            // Let what the previous phase left in flight finish first.
            std::thread::sleep(Duration::from_secs(2));
            let p = runtime.block_on(phase(
                agent.addr,
                &request,
                onset * factor,
                args.seconds,
                agent.pid,
            ));
            println!(
                "{label:>6} {:>10} {:>9.0} {:>10.1} {:>9.1} {:>9.1} {:>9.1} {:>8.1}Mi {:>7.1}Mi  {:?}",
                agent.label,
                p.offered_per_s,
                p.answered_per_s,
                p.refused_pct,
                p.p50_ms,
                p.p99_ms,
                p.peak_rss_mib,
                p.end_rss_mib,
                p.statuses
            );
        }
    }
    Ok(())
}

/// One binary request for `[1, 3, 48, 192]` FP32 zeros.
fn request_bytes(addr: std::net::SocketAddr) -> Vec<u8> {
    let n = 3 * 48 * 192 * 4;
    let header = format!(
        r#"{{"inputs":[{{"name":"x","shape":[1,3,48,192],"datatype":"FP32","parameters":{{"binary_data_size":{n}}}}}]}}"#
    );
    let mut out = format!(
        "POST /v2/models/m/infer HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\nInference-Header-Content-Length: {}\r\n\r\n",
        header.len() + n,
        header.len()
    )
    .into_bytes();
    out.extend(header.as_bytes());
    out.extend(vec![0u8; n]);
    out
}

/// Sends one request on a fresh connection; the status and how long it took.
async fn one(addr: std::net::SocketAddr, request: &[u8]) -> Option<(u16, Duration)> {
    let t = Instant::now();
    let attempt = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
        stream.write_all(request).await.ok()?;
        let mut reply = Vec::new();
        stream.read_to_end(&mut reply).await.ok()?;
        let line = reply.split(|b| *b == b'\n').next()?;
        let status = std::str::from_utf8(line).ok()?.split(' ').nth(1)?.parse().ok()?;
        Some(status)
    };
    let status = tokio::time::timeout(Duration::from_secs(60), attempt).await.ok()??;
    Some((status, t.elapsed()))
}

async fn phase(
    addr: std::net::SocketAddr,
    request: &Arc<Vec<u8>>,
    rate: f64,
    seconds: f64,
    pid: u32,
) -> Phase {
    let peak = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = std::thread::spawn({
        let (peak, stop) = (peak.clone(), stop.clone());
        move || {
            while !stop.load(Ordering::Relaxed) {
                peak.fetch_max(rss_kib(pid), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    });
    let period = Duration::from_secs_f64(1.0 / rate);
    // A count of requests well inside usize.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let total = (rate * seconds).round().clamp(1.0, 1e9) as usize;
    let start = tokio::time::Instant::now();
    let mut tasks = Vec::with_capacity(total);
    for i in 0..total {
        tokio::time::sleep_until(start + period.mul_f64(i as f64)).await;
        let request = request.clone();
        tasks.push(tokio::spawn(async move { one(addr, &request).await }));
    }
    let mut statuses: BTreeMap<u16, usize> = BTreeMap::new();
    let mut admitted = Vec::new();
    let mut answered = 0usize;
    for t in tasks {
        match t.await.ok().flatten() {
            Some((status, took)) => {
                answered += 1;
                *statuses.entry(status).or_default() += 1;
                if status == 200 {
                    admitted.push(took.as_secs_f64() * 1000.0);
                }
            }
            None => *statuses.entry(0).or_default() += 1,
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    let _ = sampler.join();
    admitted.sort_by(f64::total_cmp);
    let refused = total - admitted.len();
    Phase {
        offered_per_s: rate,
        answered_per_s: answered as f64 / elapsed,
        refused_pct: 100.0 * refused as f64 / total as f64,
        statuses,
        p50_ms: quantile(&admitted, 0.5),
        p99_ms: quantile(&admitted, 0.99),
        peak_rss_mib: peak.load(Ordering::Relaxed) as f64 / 1024.0,
        end_rss_mib: rss_kib(pid) as f64 / 1024.0,
    }
}
