//! Crash cycles, long form: SIGKILLs the aggregator during ingest and an agent in the middle of
//! spool writes, `--cycles` times each, with real processes on loopback, then audits the store
//! sample by sample and prints reports lost and duplicated (goal: 0 and 0).
//!
//! `cargo build --bins && cargo run -p benches --bin bench-chaos -- --cycles 20`
//! (the flotilla binaries must sit next to this one).

use clap::Parser;
use e2e::chaos::{CycleReport, agent_kill_cycles, aggregator_kill_cycles};

/// Crash-cycle benchmark.
#[derive(Debug, Parser)]
struct Args {
    /// SIGKILL cycles of each kind.
    #[arg(long, default_value_t = 20)]
    cycles: usize,
    /// Agents reporting while the aggregator is killed.
    #[arg(long, default_value_t = 2)]
    agents: usize,
    /// Agent sampling interval during aggregator kills.
    #[arg(long, default_value_t = 100)]
    sample_ms: u64,
    /// Agent sampling interval during agent kills (100 ms, the fastest the config allows).
    #[arg(long, default_value_t = 100)]
    crash_sample_ms: u64,
    /// Seed of the kill moments.
    #[arg(long, default_value_t = 20_261_201)]
    seed: u64,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let aggregator = aggregator_kill_cycles(args.cycles, args.agents, args.sample_ms, args.seed)?;
    print("aggregator_sigkill", &aggregator);
    let agent = agent_kill_cycles(args.cycles, args.crash_sample_ms, args.seed ^ 0xa6e)?;
    print("agent_sigkill", &agent);
    let exact = aggregator.exact() && agent.exact();
    println!(
        "{}",
        serde_json::json!({
            "scenario": "total",
            "cycles_each": args.cycles,
            "samples_lost": aggregator.lost() + agent.lost(),
            "samples_duplicated": aggregator.duplicated() + agent.duplicated(),
            "exact": exact,
        })
    );
    anyhow::ensure!(exact, "reports were lost or duplicated; see the lines above");
    Ok(())
}

fn print(scenario: &str, r: &CycleReport) {
    let hosts: Vec<_> = r
        .hosts
        .iter()
        .map(|h| {
            serde_json::json!({
                "host": h.host,
                "produced": h.produced,
                "stored_keys": h.stored_keys,
                "samples_total": h.samples_total,
                "missing": h.missing,
                "duplicated": h.duplicated,
                "unexpected_indexes": h.unexpected,
                "acked_then_lost_batches": h.acked_lost_batches,
                "acked_then_lost_samples": h.acked_lost_samples,
            })
        })
        .collect();
    println!(
        "{}",
        serde_json::json!({
            "scenario": scenario,
            "cycles": r.cycles,
            "seconds": r.seconds,
            "batches_sealed_by_killed_agents": r.batches_sealed,
            "samples_lost": r.lost(),
            "samples_duplicated": r.duplicated(),
            "hosts": hosts,
        })
    );
}
