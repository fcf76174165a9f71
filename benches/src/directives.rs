//! Directive delivery: N simulated agents (each its own certificate and QUIC connection) stay
//! connected to an in-process aggregator and answer every directive `APPLIED` at once; an
//! operator's directives go through the real admin API (`POST /api/v1/directives` with a wait),
//! which records the decision durably, delivers it over the host's connection and records the
//! answer.
//!
//! Prints decision-to-applied latency (the POST until its answered reply: decision recorded
//! and flushed, sent, applied, answer recorded) at concurrency 1, p50 and p99, and the
//! directives per second the aggregator sustains with `--clients` operators at once.
//!
//! `cargo build --release -p benches --bin bench-directives && target/release/bench-directives --agents 1000`

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use aggregator::cli::client::Client;
use aggregator::views::{DirectiveRequest, DirectiveView};
use benches::{BenchAggregator, quantile};
use clap::Parser;
use common::framed;
use common::ids::HostId;
use common::proto::{Directive, DirectiveResult, DirectiveStatus};

/// Directive delivery benchmark.
#[derive(Debug, Parser)]
struct Args {
    /// Simulated agents connected.
    #[arg(long, default_value_t = 1000)]
    agents: usize,
    /// Directives timed one at a time (decision to applied).
    #[arg(long, default_value_t = 500)]
    sequential: usize,
    /// Operators sending at once for the throughput run.
    #[arg(long, default_value_t = 32)]
    clients: usize,
    /// Seconds of the throughput run.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Aggregator runtime threads.
    #[arg(long, default_value_t = 2)]
    threads: usize,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let dir = tempfile::tempdir()?;
    let agg = BenchAggregator::start(dir.path(), args.threads)?;
    let ca = common::tls::Ca::load(&agg.tls_dir)?;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let endpoint = {
        let _guard = rt.enter();
        quinn::Endpoint::client("127.0.0.1:0".parse().expect("literal address"))?
    };
    let answered = Arc::new(AtomicU64::new(0));
    let t0 = Instant::now();
    let mut agents = Vec::with_capacity(args.agents);
    for i in 0..args.agents {
        let host = format!("node-{i:05}");
        let pair = ca.issue_host(&HostId::new(&host)?, 1)?;
        let tls = common::tls::client_config_pem(ca.cert_pem(), &pair.cert_pem, &pair.key_pem)?;
        let config = common::quic::client_config(tls)?;
        let conn = rt.block_on(benches::connect_agent(
            &endpoint,
            config,
            agg.quic,
            i,
            "bench-directives",
        ))?;
        rt.spawn(answer_directives(conn.clone(), answered.clone()));
        agents.push((host, conn));
    }
    eprintln!("{} agents connected in {:.1} s", args.agents, t0.elapsed().as_secs_f64());
    let api = format!("http://{}", agg.admin);
    let hosts: Arc<Vec<String>> = Arc::new(agents.iter().map(|(h, _)| h.clone()).collect());

    // Decision to applied, one at a time.
    let client = Client::new(&api, None);
    let mut latencies = Vec::with_capacity(args.sequential);
    for k in 0..args.sequential {
        let started = Instant::now();
        let d = send(&client, &hosts[(k * 7919) % hosts.len()], k)?;
        latencies.push(started.elapsed().as_secs_f64() * 1000.0);
        anyhow::ensure!(
            d.state == "applied",
            "directive {} ended {}: {}",
            d.id,
            d.state,
            d.message
        );
    }
    latencies.sort_by(f64::total_cmp);

    // Throughput: `clients` operators at once, each waiting for its answer.
    let done = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let until = Instant::now() + Duration::from_secs(args.seconds);
    let started = Instant::now();
    let threads: Vec<_> = (0..args.clients)
        .map(|c| {
            let (api, hosts, done, failed) =
                (api.clone(), hosts.clone(), done.clone(), failed.clone());
            std::thread::spawn(move || {
                let client = Client::new(&api, None);
                let mut k = c;
                while Instant::now() < until {
                    match send(&client, &hosts[(k * 104_729) % hosts.len()], k) {
                        Ok(d) if d.state == "applied" => done.fetch_add(1, Ordering::Relaxed),
                        _ => failed.fetch_add(1, Ordering::Relaxed),
                    };
                    k += args.clients;
                }
            })
        })
        .collect();
    for t in threads {
        let _ = t.join();
    }
    let window = started.elapsed().as_secs_f64();
    let result = serde_json::json!({
        "agents": args.agents,
        "aggregator_threads": args.threads,
        "decision_to_applied_ms": {
            "count": latencies.len(),
            "p50": quantile(&latencies, 0.5),
            "p90": quantile(&latencies, 0.9),
            "p99": quantile(&latencies, 0.99),
            "max": latencies.last().copied().unwrap_or(0.0),
        },
        "throughput": {
            "clients": args.clients,
            "seconds": window,
            "applied": done.load(Ordering::Relaxed),
            "failed": failed.load(Ordering::Relaxed),
            "directives_per_s": done.load(Ordering::Relaxed) as f64 / window,
        },
        "agent_answers": answered.load(Ordering::Relaxed),
    });
    println!("{}", serde_json::to_string_pretty(&result)?);
    for (_, conn) in &agents {
        conn.close(0u32.into(), b"bench done");
    }
    agg.stop();
    Ok(())
}

/// One operator directive, waiting up to 30 s for the answer.
fn send(client: &Client, host: &str, k: usize) -> anyhow::Result<DirectiveView> {
    let request = DirectiveRequest {
        host: host.to_owned(),
        kind: "set_instances".into(),
        payload: Some(serde_json::json!({"model": "m", "instances": k % 8 + 1})),
        ttl_secs: Some(600),
        wait_secs: Some(30),
    };
    Ok(client.post_json("/api/v1/directives", Some(&request))?)
}

/// A simulated agent's directive side: every directive is answered `APPLIED` at once.
async fn answer_directives(conn: quinn::Connection, answered: Arc<AtomicU64>) {
    while let Ok((mut send, mut recv)) = conn.accept_bi().await {
        let answered = answered.clone();
        tokio::spawn(async move {
            let Ok(d) = framed::read::<Directive>(&mut recv, 1 << 20).await else { return };
            let result = DirectiveResult {
                id: d.id,
                status: DirectiveStatus::Applied.into(),
                message: "applied (simulated)".into(),
                payload: Vec::new(),
            };
            if framed::write(&mut send, &result).await.is_ok() {
                answered.fetch_add(1, Ordering::Relaxed);
            }
            let _ = send.finish();
        });
    }
}
