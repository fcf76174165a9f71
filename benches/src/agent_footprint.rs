//! The agent's idle footprint: the real `flotilla-agent` binary (from the same target
//! directory) samples every second and uplinks every 5 s to a real aggregator on loopback,
//! while this bench reads its RSS and CPU time from `/proc`.
//!
//! `cargo build --release -p agent -p benches && target/release/bench-agent-footprint --seconds 60`

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use benches::{BenchAggregator, quantile};
use clap::Parser;
use common::ids::HostId;

/// Agent idle footprint benchmark.
#[derive(Debug, Parser)]
struct Args {
    /// Seconds to measure, after the warm-up.
    #[arg(long, default_value_t = 60)]
    seconds: u64,
    /// Seconds to let the agent settle first.
    #[arg(long, default_value_t = 10)]
    warmup: u64,
    /// Agent sampling interval.
    #[arg(long, default_value_t = 1000)]
    sample_ms: u64,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let dir = tempfile::tempdir()?;
    let agg = BenchAggregator::start(dir.path(), 1)?;
    common::tls::issue_host_files(&agg.tls_dir, &HostId::new("footprint")?, &agg.tls_dir, 1, true)?;
    let config = dir.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "[uplink]\naggregator = \"{}\"\ninterval_secs = 5\n\
             [tls]\nca_cert = \"tls/ca.pem\"\ncert = \"tls/footprint.pem\"\nkey = \"tls/footprint.key\"\n\
             [telemetry]\nsample_interval_ms = {}\n[spool]\npath = \"spool\"\n",
            agg.quic, args.sample_ms
        ),
    )?;
    let exe = std::env::current_exe()?;
    let agent_bin: PathBuf = exe.with_file_name("flotilla-agent");
    let mut child = Command::new(&agent_bin)
        .arg("--config")
        .arg(&config)
        .env("FLOTILLA_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {} (build it first)", agent_bin.display()))?;
    let pid = child.id();
    std::thread::sleep(Duration::from_secs(args.warmup));

    let ticks_per_s = 100.0; // Linux USER_HZ
    let cpu0 = cpu_ticks(pid)?;
    let t0 = Instant::now();
    let mut rss_kib = Vec::new();
    while t0.elapsed() < Duration::from_secs(args.seconds) {
        rss_kib.push(rss(pid)? as f64);
        std::thread::sleep(Duration::from_secs(1));
    }
    let cpu1 = cpu_ticks(pid)?;
    let wall = t0.elapsed().as_secs_f64();
    let _ = Command::new("kill").arg("-TERM").arg(pid.to_string()).status();
    let _ = child.wait();
    agg.stop();

    rss_kib.sort_by(f64::total_cmp);
    let cpu_pct = (cpu1 - cpu0) as f64 / ticks_per_s / wall * 100.0;
    let report = serde_json::json!({
        "sample_ms": args.sample_ms,
        "measured_seconds": wall,
        "cpu_pct_of_one_core": cpu_pct,
        "rss_mib": {
            "median": quantile(&rss_kib, 0.5) / 1024.0,
            "max": quantile(&rss_kib, 1.0) / 1024.0,
        },
    });
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}

fn cpu_ticks(pid: u32) -> anyhow::Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may contain spaces) start after the last ')'.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).context("bad /proc stat")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 overall: 11 and 12 after the state field (index 0).
    let utime: u64 = fields.get(11).context("utime")?.parse()?;
    let stime: u64 = fields.get(12).context("stime")?.parse()?;
    Ok(utime + stime)
}

fn rss(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).context("no VmRSS")?;
    Ok(line.split_whitespace().nth(1).context("VmRSS value")?.parse()?)
}
