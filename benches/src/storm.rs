//! Reconnect storm: N simulated agents, each with its own certificate from the fleet CA and its
//! own QUIC connection, report to a real `flotilla-aggregator` process; the aggregator is
//! SIGKILLed and restarted on the same port and store, every agent dials it at once (retrying
//! with the agent's backoff: 200 ms doubling to 30 s, with jitter), then all report steadily.
//!
//! Prints the time until every agent was welcomed again, the batches/s acknowledged in steady
//! state, failures, and the aggregator's peak RSS (`VmHWM` of its process).
//!
//! `cargo build --release --bins && target/release/bench-storm --agents 1000`

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use benches::{now_ms, quantile, realistic_sample};
use clap::Parser;
use common::framed;
use common::ids::HostId;
use common::proto::{Ack, TelemetryBatch};
use e2e::{Aggregator, Fleet};

/// Reconnect-storm benchmark.
#[derive(Debug, Parser)]
struct Args {
    /// Simulated agents (one certificate and QUIC connection each).
    #[arg(long, default_value_t = 500)]
    agents: usize,
    /// Seconds of steady reporting measured after everyone reconnected.
    #[arg(long, default_value_t = 20)]
    seconds: u64,
    /// Interval between one agent's reports.
    #[arg(long, default_value_t = 1000)]
    interval_ms: u64,
    /// Client UDP sockets the agents are spread over.
    #[arg(long, default_value_t = 8)]
    sockets: usize,
    /// Give up waiting for full reconnection after this many seconds.
    #[arg(long, default_value_t = 120)]
    reconnect_limit_secs: u64,
}

/// Shared counters of the simulated fleet.
#[derive(Debug, Default)]
struct Tally {
    connected: AtomicU64,
    connect_failures: AtomicU64,
    acked: AtomicU64,
    failed: AtomicU64,
    /// Microseconds from the restart until the last agent was welcomed.
    last_welcome_us: AtomicU64,
    /// Seconds from the restart until each agent was welcomed.
    welcomes: std::sync::Mutex<Vec<f64>>,
    /// Why connection attempts failed, and how often.
    errors: std::sync::Mutex<std::collections::BTreeMap<String, u64>>,
}

impl Tally {
    fn error(&self, why: String) {
        let mut e = self.errors.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        *e.entry(why).or_default() += 1;
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let fleet = Fleet::new();
    let mut agg = Aggregator::start(&fleet.aggregator_config(0));
    let port = agg.quic.port();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;

    let ca = fleet.ca();
    let t0 = Instant::now();
    let mut configs = Vec::with_capacity(args.agents);
    for i in 0..args.agents {
        let pair = ca.issue_host(&HostId::new(&format!("storm-{i:05}"))?, 1)?;
        let tls = common::tls::client_config_pem(ca.cert_pem(), &pair.cert_pem, &pair.key_pem)?;
        configs.push(common::quic::client_config(tls)?);
    }
    eprintln!("issued {} certificates in {:.1} s", args.agents, t0.elapsed().as_secs_f64());
    let endpoints = {
        let _guard = rt.enter();
        (0..args.sockets.max(1))
            .map(|_| quinn::Endpoint::client("127.0.0.1:0".parse().expect("literal address")))
            .collect::<Result<Vec<_>, _>>()?
    };

    // Warm-up: every agent is known to the store (Hello and one batch) before the restart.
    let warm = rt.block_on(warm_up(&endpoints, &configs, agg.quic))?;
    eprintln!("warm-up: {warm} agents reported once; killing the aggregator");

    agg.proc.kill();
    let restart = Instant::now();
    let config = fleet.aggregator_config(port);
    let agg = Aggregator::start(&config);
    let started_s = restart.elapsed().as_secs_f64();
    let pid = agg.proc.pid();
    eprintln!("aggregator restarted (pid {pid}) in {started_s:.2} s; storm begins");

    let tally = Arc::new(Tally::default());
    let stop = Arc::new(AtomicBool::new(false));
    let storm_start = Instant::now();
    let result = rt.block_on(async {
        let mut tasks = tokio::task::JoinSet::new();
        for (i, config) in configs.into_iter().enumerate() {
            let endpoint = endpoints[i % endpoints.len()].clone();
            let (tally, stop) = (tally.clone(), stop.clone());
            let interval = Duration::from_millis(args.interval_ms);
            let addr = agg.quic;
            tasks.spawn(agent_life(endpoint, config, addr, i, interval, storm_start, tally, stop));
        }
        let limit = Duration::from_secs(args.reconnect_limit_secs);
        let n = args.agents as u64;
        while tally.connected.load(Ordering::Relaxed) < n && storm_start.elapsed() < limit {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let reconnected = tally.connected.load(Ordering::Relaxed);
        let full_s =
            (reconnected == n).then(|| tally.last_welcome_us.load(Ordering::Relaxed) as f64 / 1e6);
        let rss_after_storm = vm_kb(pid, "VmRSS:");
        let mut welcomes =
            tally.welcomes.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
        welcomes.sort_by(f64::total_cmp);
        // Steady state: measure a window of reporting.
        let acked0 = tally.acked.load(Ordering::Relaxed);
        let failed0 = tally.failed.load(Ordering::Relaxed);
        let w = Instant::now();
        tokio::time::sleep(Duration::from_secs(args.seconds)).await;
        let window = w.elapsed().as_secs_f64();
        let acked = tally.acked.load(Ordering::Relaxed) - acked0;
        let failed = tally.failed.load(Ordering::Relaxed) - failed0;
        stop.store(true, Ordering::Relaxed);
        while tasks.join_next().await.is_some() {}
        for e in &endpoints {
            e.wait_idle().await;
        }
        serde_json::json!({
            "agents": args.agents,
            "interval_ms": args.interval_ms,
            "aggregator_restart_seconds": started_s,
            "reconnected": reconnected,
            "full_reconnection_seconds": full_s,
            "welcome_seconds": {
                "p10": quantile(&welcomes, 0.1),
                "p50": quantile(&welcomes, 0.5),
                "p90": quantile(&welcomes, 0.9),
            },
            "connect_attempts_failed": tally.connect_failures.load(Ordering::Relaxed),
            "connect_errors": *tally.errors.lock().unwrap_or_else(std::sync::PoisonError::into_inner),
            "steady_seconds": window,
            "steady_batches_acked_per_s": acked as f64 / window,
            "steady_batches_expected_per_s": args.agents as f64 * 1000.0 / args.interval_ms as f64,
            "steady_batches_failed": failed,
            "aggregator_rss_kb_after_storm": rss_after_storm,
            "aggregator_peak_rss_kb": vm_kb(pid, "VmHWM:"),
        })
    });
    println!("{}", serde_json::to_string_pretty(&result)?);
    drop(agg);
    Ok(())
}

/// Connects every agent (64 at a time), sends one batch each, and closes.
async fn warm_up(
    endpoints: &[quinn::Endpoint],
    configs: &[quinn::ClientConfig],
    addr: SocketAddr,
) -> anyhow::Result<usize> {
    let sem = Arc::new(tokio::sync::Semaphore::new(64));
    let mut joins = tokio::task::JoinSet::new();
    for (i, config) in configs.iter().enumerate() {
        let (endpoint, config, sem) =
            (endpoints[i % endpoints.len()].clone(), config.clone(), sem.clone());
        joins.spawn(async move {
            let _permit = sem.acquire().await;
            let conn = benches::connect_agent(&endpoint, config, addr, i, "bench-storm").await?;
            send(&conn, 1).await?;
            conn.close(0u32.into(), b"warm-up done");
            anyhow::Ok(())
        });
    }
    let mut n = 0;
    while let Some(r) = joins.join_next().await {
        r.context("warm-up task")??;
        n += 1;
    }
    Ok(n)
}

/// One simulated agent after the restart: connect with backoff, then report every `interval`
/// until `stop`, reconnecting when the connection fails.
#[allow(clippy::too_many_arguments)]
async fn agent_life(
    endpoint: quinn::Endpoint,
    config: quinn::ClientConfig,
    addr: SocketAddr,
    i: usize,
    interval: Duration,
    storm_start: Instant,
    tally: Arc<Tally>,
    stop: Arc<AtomicBool>,
) {
    let mut seq = 1u64;
    let mut first = true;
    let mut attempt = 0u32;
    while !stop.load(Ordering::Relaxed) {
        let conn = match tokio::time::timeout(
            Duration::from_secs(10),
            benches::connect_agent(&endpoint, config.clone(), addr, i, "bench-storm"),
        )
        .await
        {
            Ok(Ok(c)) => c,
            other => {
                tally.error(match other {
                    Ok(Err(e)) => format!("{e:#}"),
                    _ => "connect and Hello took over 10 s".to_owned(),
                });
                tally.connect_failures.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(backoff(attempt, i)).await;
                attempt = attempt.saturating_add(1);
                continue;
            }
        };
        attempt = 0;
        if first {
            first = false;
            let us = u64::try_from(storm_start.elapsed().as_micros()).unwrap_or(u64::MAX);
            tally.last_welcome_us.fetch_max(us, Ordering::Relaxed);
            tally
                .welcomes
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .push(storm_start.elapsed().as_secs_f64());
            tally.connected.fetch_add(1, Ordering::Relaxed);
        }
        let mut next = tokio::time::Instant::now();
        loop {
            if stop.load(Ordering::Relaxed) {
                conn.close(0u32.into(), b"bench done");
                return;
            }
            seq += 1;
            match tokio::time::timeout(Duration::from_secs(10), send(&conn, seq)).await {
                Ok(Ok(())) => {
                    tally.acked.fetch_add(1, Ordering::Relaxed);
                }
                _ => {
                    tally.failed.fetch_add(1, Ordering::Relaxed);
                    break;
                }
            }
            next += interval;
            tokio::time::sleep_until(next).await;
        }
    }
}

/// The agent's reconnect delay: 200 ms doubling to 30 s, with jitter (50..100 %).
fn backoff(attempt: u32, i: usize) -> Duration {
    let base = Duration::from_millis(200).saturating_mul(1u32 << attempt.min(8));
    let base = base.min(Duration::from_secs(30));
    // Deterministic per agent and attempt, spread over half the delay.
    let spread = ((i as u64).wrapping_mul(2_654_435_761) ^ u64::from(attempt)) % 1000;
    base.mul_f64(0.5 + spread as f64 / 2000.0)
}

async fn send(conn: &quinn::Connection, seq: u64) -> anyhow::Result<()> {
    let mut sample = realistic_sample(now_ms());
    sample.sample_index = seq;
    let batch = TelemetryBatch { seq, samples: vec![sample], ..TelemetryBatch::default() };
    let (mut send, mut recv) = conn.open_bi().await?;
    framed::write(&mut send, &batch).await?;
    send.finish()?;
    let ack: Ack = framed::read(&mut recv, 1024).await?;
    anyhow::ensure!(ack.seq == seq, "acked {} for {seq}", ack.seq);
    Ok(())
}

/// A `VmRSS:`/`VmHWM:` line of `/proc/PID/status`, in kB.
fn vm_kb(pid: u32, key: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}
