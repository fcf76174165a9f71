//! Aggregator ingest capacity: N simulated agents, each with its own certificate and QUIC
//! connection, send telemetry batches to a real aggregator (in this process, on its own
//! runtime threads, with a real sled store) and wait for the application Ack.
//!
//! Two modes:
//! - `paced` (default): every agent reports once per `--interval-ms`, like real agents. Reports
//!   whether every report was acked and the ack latency.
//! - `closed`: every agent sends its next report as soon as the previous is acked, to find the
//!   ceiling in reports/s.
//!
//! `cargo run --release -p benches --bin bench-ingest -- --agents 2000 --seconds 20`

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use benches::{BenchAggregator, cpu_split, now_ms, quantile, realistic_sample};
use clap::{Parser, ValueEnum};
use common::framed;
use common::ids::HostId;
use common::proto::{Ack, TelemetryBatch};

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Mode {
    Paced,
    Closed,
}

/// Aggregator ingest benchmark.
#[derive(Debug, Parser)]
struct Args {
    /// Simulated agents (one QUIC connection and certificate each).
    #[arg(long, default_value_t = 1000)]
    agents: usize,
    /// Measured seconds (after connecting).
    #[arg(long, default_value_t = 20)]
    seconds: u64,
    /// paced: one report per interval per agent; closed: back to back.
    #[arg(long, value_enum, default_value_t = Mode::Paced)]
    mode: Mode,
    /// Interval between one agent's reports in paced mode.
    #[arg(long, default_value_t = 1000)]
    interval_ms: u64,
    /// Samples per report.
    #[arg(long, default_value_t = 1)]
    samples: usize,
    /// Client UDP sockets the agents are spread over.
    #[arg(long, default_value_t = 4)]
    sockets: usize,
    /// Aggregator runtime worker threads.
    #[arg(long, default_value_t = 2)]
    server_threads: usize,
}

#[derive(Default)]
struct Tally {
    sent: AtomicU64,
    acked: AtomicU64,
    failed: AtomicU64,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let dir = tempfile::tempdir()?;
    let agg = BenchAggregator::start(dir.path(), args.server_threads)?;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let result = rt.block_on(drive(&args, &agg));
    drop(rt);
    agg.stop();
    result
}

async fn drive(args: &Args, agg: &BenchAggregator) -> anyhow::Result<()> {
    let ca = common::tls::Ca::load(&agg.tls_dir)?;
    let ca_pem = ca.cert_pem().to_owned();
    let t0 = Instant::now();
    let mut configs = Vec::with_capacity(args.agents);
    for i in 0..args.agents {
        let host = HostId::new(&format!("sim-{i:05}"))?;
        let pair = ca.issue_host(&host, 1)?;
        let tls = common::tls::client_config_pem(&ca_pem, &pair.cert_pem, &pair.key_pem)?;
        configs.push(common::quic::client_config(tls)?);
    }
    eprintln!("issued {} certificates in {:.1} s", args.agents, t0.elapsed().as_secs_f64());
    let mut endpoints = Vec::new();
    for _ in 0..args.sockets.max(1) {
        endpoints.push(quinn::Endpoint::client("127.0.0.1:0".parse()?)?);
    }

    // Connect everyone (bounded concurrency so handshakes don't all time out together).
    let t0 = Instant::now();
    let sem = Arc::new(tokio::sync::Semaphore::new(64));
    let mut joins = tokio::task::JoinSet::new();
    for (i, config) in configs.into_iter().enumerate() {
        let endpoint = endpoints[i % endpoints.len()].clone();
        let sem = sem.clone();
        let addr = agg.quic;
        joins.spawn(async move {
            let _permit = sem.acquire().await;
            benches::connect_agent(&endpoint, config, addr, i, "bench").await
        });
    }
    let mut conns = Vec::with_capacity(args.agents);
    while let Some(r) = joins.join_next().await {
        conns.push(r.context("connect task")??);
    }
    let connect_s = t0.elapsed().as_secs_f64();
    eprintln!("connected {} agents (Hello/Welcome done) in {connect_s:.1} s", conns.len());

    let tally = Arc::new(Tally::default());
    let latencies = Arc::new(std::sync::Mutex::new(Vec::<f64>::new()));
    let deadline = Instant::now() + Duration::from_secs(args.seconds);
    let start = Instant::now();
    let cpu_start = cpu_split();
    let mut tasks = tokio::task::JoinSet::new();
    for (i, conn) in conns.into_iter().enumerate() {
        let tally = tally.clone();
        let latencies = latencies.clone();
        let (mode, interval, samples, agents) =
            (args.mode, Duration::from_millis(args.interval_ms), args.samples, args.agents);
        tasks.spawn(async move {
            // Spread paced agents evenly over the interval.
            let offset = interval.mul_f64(i as f64 / agents as f64);
            let mut next = tokio::time::Instant::now() + offset;
            let mut seq = 0u64;
            let mut mine = Vec::new();
            while Instant::now() < deadline {
                if let Mode::Paced = mode {
                    tokio::time::sleep_until(next).await;
                    next += interval;
                    if Instant::now() >= deadline {
                        break;
                    }
                }
                seq += 1;
                let batch = TelemetryBatch {
                    seq,
                    samples: (0..samples)
                        .map(|k| {
                            let mut s = realistic_sample(now_ms());
                            s.sample_index = (seq - 1) * samples as u64 + k as u64 + 1;
                            s
                        })
                        .collect(),
                    ..TelemetryBatch::default()
                };
                tally.sent.fetch_add(1, Ordering::Relaxed);
                let t = Instant::now();
                match send(&conn, &batch).await {
                    Ok(()) => {
                        tally.acked.fetch_add(1, Ordering::Relaxed);
                        mine.push(t.elapsed().as_secs_f64() * 1000.0);
                    }
                    Err(_) => {
                        tally.failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            latencies.lock().unwrap_or_else(std::sync::PoisonError::into_inner).extend(mine);
            conn.close(0u32.into(), b"bench done");
        });
    }
    while tasks.join_next().await.is_some() {}
    let elapsed = start.elapsed().as_secs_f64();
    let cpu_end = cpu_split();
    let server_cpu = cpu_end.0 - cpu_start.0;
    let client_cpu = cpu_end.1 - cpu_start.1;
    let mut lat =
        std::mem::take(&mut *latencies.lock().unwrap_or_else(std::sync::PoisonError::into_inner));
    lat.sort_by(f64::total_cmp);
    let (sent, acked, failed) = (
        tally.sent.load(Ordering::Relaxed),
        tally.acked.load(Ordering::Relaxed),
        tally.failed.load(Ordering::Relaxed),
    );
    let rate = acked as f64 / elapsed;
    let report = serde_json::json!({
        "mode": format!("{:?}", args.mode).to_lowercase(),
        "agents": args.agents,
        "samples_per_report": args.samples,
        "interval_ms": args.interval_ms,
        "seconds": elapsed,
        "connect_seconds": connect_s,
        "reports_sent": sent,
        "reports_acked": acked,
        "reports_failed": failed,
        "acked_reports_per_s": rate,
        "aggregator_cpu_cores": server_cpu / elapsed,
        "simulated_agents_cpu_cores": client_cpu / elapsed,
        "acked_reports_per_aggregator_core_second": acked as f64 / server_cpu,
        "ack_latency_ms": { "p50": quantile(&lat, 0.5), "p99": quantile(&lat, 0.99), "max": quantile(&lat, 1.0) },
    });
    println!("{}", serde_json::to_string_pretty(&report)?);
    for e in &endpoints {
        e.wait_idle().await;
    }
    Ok(())
}

async fn send(conn: &quinn::Connection, batch: &TelemetryBatch) -> anyhow::Result<()> {
    let (mut send, mut recv) = conn.open_bi().await?;
    framed::write(&mut send, batch).await?;
    send.finish()?;
    let ack: Ack = framed::read(&mut recv, 1024).await?;
    anyhow::ensure!(ack.seq == batch.seq, "acked {} for {}", ack.seq, batch.seq);
    Ok(())
}
