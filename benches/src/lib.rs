//! Shared pieces of the Flotilla benchmarks: an in-process aggregator on loopback with a
//! throwaway fleet CA, realistic samples, small statistics helpers, and inputs for any model.

pub mod cores;
pub mod inputs;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use common::config::aggregator::AggregatorConfig;
use common::proto::{GpuSample, HostSample, Sample};
use tokio_util::sync::CancellationToken;

/// An aggregator running on its own runtime threads, with its CA directory.
pub struct BenchAggregator {
    /// QUIC address agents dial.
    pub quic: SocketAddr,
    /// Admin API address.
    pub admin: SocketAddr,
    /// The CA directory (`ca.pem`, `ca.key`, ...).
    pub tls_dir: PathBuf,
    shutdown: CancellationToken,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl BenchAggregator {
    /// Creates a CA under `dir/tls`, then starts an aggregator with its store under `dir` on
    /// `worker_threads` runtime threads.
    pub fn start(dir: &Path, worker_threads: usize) -> anyhow::Result<Self> {
        let tls_dir = dir.join("tls");
        common::tls::init_ca_dir(&tls_dir, &[], 30, true)?;
        let text = "[listen]\nquic = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\n\
             [tls]\nca_cert = \"tls/ca.pem\"\ncert = \"tls/server.pem\"\nkey = \"tls/server.key\"\n\
             [store]\npath = \"store\"\n";
        let config = AggregatorConfig::parse(text, "bench", dir)?;
        let shutdown = CancellationToken::new();
        let (tx, rx) = std::sync::mpsc::channel();
        let stop = shutdown.clone();
        let thread = std::thread::spawn(move || {
            let rt = match tokio::runtime::Builder::new_multi_thread()
                .worker_threads(worker_threads)
                .thread_name("aggregator")
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = tx.send(Err(anyhow::anyhow!(e)));
                    return;
                }
            };
            rt.block_on(async move {
                let bound = match aggregator::Bound::bind(&config).await {
                    Ok(b) => b,
                    Err(e) => {
                        let _ = tx.send(Err(e.into()));
                        return;
                    }
                };
                let addrs = (bound.quic_addr(), bound.admin_addr());
                let _ = tx.send(Ok(addrs));
                if let Err(e) = aggregator::run(config, bound, stop).await {
                    eprintln!("aggregator: {e:#}");
                }
            });
        });
        let (quic, admin) = rx.recv()??;
        let (Some(quic), Some(admin)) = (quic, admin) else {
            anyhow::bail!("aggregator did not report its addresses");
        };
        Ok(Self { quic, admin, tls_dir, shutdown, thread: Some(thread) })
    }

    /// Stops the aggregator and waits for it.
    pub fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A sample shaped like a real GPU host's: 16 cores and one H100 with every field present
/// (values from `shared/data/telemetry/h100_duty_cycle.csv` at full load).
pub fn realistic_sample(unix_ms: i64) -> Sample {
    Sample {
        unix_ms,
        sample_index: 0,
        host: Some(HostSample {
            cpu_util_pct: 37.5,
            cpu_core_util_pct: vec![37.5; 16],
            load1: 4.2,
            load5: 3.9,
            load15: 3.1,
            memory_used_bytes: 48 << 30,
            memory_total_bytes: 128 << 30,
            swap_used_bytes: 0,
            swap_total_bytes: 0,
            net_rx_bytes: 1_250_000,
            net_tx_bytes: 900_000,
            disk_read_bytes: 0,
            disk_write_bytes: 65_536,
            interval_ms: 1000,
        }),
        gpus: vec![GpuSample {
            index: 0,
            uuid: "GPU-00000000-0000-0000-0000-000000000000".into(),
            util_gpu_pct: Some(100),
            util_memory_pct: Some(64),
            util_encoder_pct: Some(0),
            util_decoder_pct: Some(0),
            memory_used_bytes: Some(4_527 << 20),
            memory_total_bytes: Some(81_559 << 20),
            temperature_c: Some(61),
            power_mw: Some(694_000),
            energy_mj: Some(123_456_789),
            power_limit_mw: Some(700_000),
            sm_clock_mhz: Some(1_470),
            memory_clock_mhz: Some(2_619),
            performance_state: Some(0),
            throttle_reasons: Some(4),
            throttle_reason_names: vec!["sw_power_cap".into()],
            ecc_corrected: Some(0),
            ecc_uncorrected: Some(0),
            pcie_tx_kib_per_s: Some(1_100),
            pcie_rx_kib_per_s: Some(2_300),
            mig_enabled: Some(false),
            processes: vec![],
        }],
        accelerators: vec![],
        models: vec![],
    }
}

/// The value at quantile `q` (0..=1) of sorted `xs`.
pub fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let last = sorted.len() - 1;
    let i = (last as f64 * q.clamp(0.0, 1.0)).round();
    // i is in 0..=last, so the conversion is exact; min() guards the float rounding anyway.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let i = (i as usize).min(last);
    sorted[i]
}

/// Now, Unix ms.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// CPU seconds used so far by this process's threads, split into the aggregator's (runtime
/// threads named `aggregator`, and sled's `sled-*` threads) and everything else (the simulated
/// agents). Read from `/proc/self/task/*/stat`.
pub fn cpu_split() -> (f64, f64) {
    let (mut server, mut other) = (0.0, 0.0);
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return (f64::NAN, f64::NAN);
    };
    for task in tasks.flatten() {
        let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) else { continue };
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else { continue };
        let name = &stat[open + 1..close];
        let fields: Vec<&str> = stat[close + 1..].split_whitespace().collect();
        let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok()).unwrap_or(0.0);
        // utime, stime at indexes 11 and 12 after the state field; USER_HZ is 100 on Linux.
        let secs = (ticks(11) + ticks(12)) / 100.0;
        if name.starts_with("aggregator") || name.starts_with("sled") {
            server += secs;
        } else {
            other += secs;
        }
    }
    (server, other)
}

/// Opens a simulated agent's connection: QUIC handshake with `config`'s certificate, then a
/// Hello (spool epoch `i + 1`, agent version `agent_version`) answered by a Welcome.
pub async fn connect_agent(
    endpoint: &quinn::Endpoint,
    config: quinn::ClientConfig,
    addr: SocketAddr,
    i: usize,
    agent_version: &str,
) -> anyhow::Result<quinn::Connection> {
    use common::framed;
    use common::proto::{Hello, HelloReply, hello_reply};
    let conn = endpoint.connect_with(config, addr, "flotilla-aggregator")?.await?;
    let (mut send, mut recv) = conn.open_bi().await?;
    let hello = Hello {
        min_version: 1,
        max_version: 1,
        agent_version: agent_version.into(),
        spool_epoch: i as u64 + 1,
        ..Hello::default()
    };
    framed::write(&mut send, &hello).await?;
    let reply: HelloReply = framed::read(&mut recv, 1 << 20).await?;
    match reply.reply {
        Some(hello_reply::Reply::Welcome(_)) => Ok(conn),
        other => anyhow::bail!("agent {i} not welcomed: {other:?}"),
    }
}

/// The agent's inference API on a loopback port serving the model repository `repo`, with
/// default limits, requests up to `max_request_bytes`, and the token that stops it.
pub async fn serve_repository(
    repo: &Path,
    max_request_bytes: usize,
) -> anyhow::Result<(agent::serving::Serving, CancellationToken)> {
    let config = common::config::agent::ServingConfig {
        listen: "127.0.0.1:0".parse()?,
        model_repository: repo.to_owned(),
        max_request_bytes,
        admin_token_file: None,
        limits: common::config::agent::ServingLimits::default(),
    };
    let shutdown = CancellationToken::new();
    let serving = agent::serving::Serving::start(&config, shutdown.clone()).await?;
    Ok((serving, shutdown))
}
