//! Crash and fault scenarios shared by the e2e tests (a few cycles) and `bench-chaos` (many):
//! SIGKILL cycles of the aggregator during ingest and of an agent in the middle of spool writes,
//! and the exact audit of what the aggregator stored.
//!
//! Invariants checked by every scenario:
//! - Every sample the agents produced (their final `samples_produced`) is stored exactly once:
//!   the stored sample indexes of a host are exactly `1..=produced`, one key each.
//! - No acknowledged report is lost: a batch an agent sealed and then saw acknowledged as a
//!   duplicate within the same run was never stored (its seq had been used before).
//! - Both stores open and read cleanly after every kill.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use aggregator::store::{SledStore, TelemetryStore as _};
use anyhow::{Context as _, bail};
use common::ids::HostId;

use crate::{Aggregator, Fleet, Proc, WAIT};

/// Path of a workspace binary: next to the running executable (a bench in `target/<profile>/`)
/// or one level up (a test in `target/<profile>/deps/`).
pub fn binary(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("locating the running executable")?;
    for dir in exe.ancestors().skip(1).take(2) {
        let path = dir.join(name);
        if path.exists() {
            return Ok(path);
        }
    }
    bail!("{name} is missing next to {}: run `cargo build --bins` first", exe.display())
}

/// What the aggregator stored for one host, compared with what its agent produced.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostAudit {
    /// The host.
    pub host: String,
    /// Samples the agent says it produced (its last clean stop).
    pub produced: u64,
    /// Raw sample keys stored.
    pub stored_keys: u64,
    /// The host record's `samples_total` counter.
    pub samples_total: u64,
    /// Indexes in `1..=produced` with no stored sample.
    pub missing: u64,
    /// Stored keys beyond the first for an index (the same sample stored twice).
    pub duplicated: u64,
    /// Stored indexes above `produced` (numbers the agent reused or never reported).
    pub unexpected: u64,
    /// Batches the agent sealed and then saw acknowledged as duplicates in the same run: their
    /// seq was already stored, so their samples were thrown away.
    pub acked_lost_batches: u64,
    /// Samples in those batches.
    pub acked_lost_samples: u64,
}

impl HostAudit {
    /// Whether everything produced is stored exactly once and nothing acknowledged was lost.
    pub fn exact(&self) -> bool {
        self.missing == 0
            && self.duplicated == 0
            && self.unexpected == 0
            && self.stored_keys == self.produced
            && self.samples_total == self.produced
            && self.acked_lost_batches == 0
    }
}

/// Opens the aggregator store at `path` (the aggregator must have stopped) and audits `host`
/// against `produced`. Fails if the store does not open or read: "unreadable" is a finding.
pub fn audit_store(path: &Path, host: &str, produced: u64) -> anyhow::Result<HostAudit> {
    let store = open_store(path)?;
    let id = HostId::new(host)?;
    let rec = store.host(&id)?.with_context(|| format!("no host record for {host}"))?;
    let samples = store.samples(&id, i64::MIN, i64::MAX)?;
    let keys = store.count_samples(&id)?;
    let mut per_index: BTreeMap<u64, u64> = BTreeMap::new();
    for s in &samples {
        *per_index.entry(s.sample_index).or_default() += 1;
    }
    let distinct_in_range = per_index.keys().filter(|&&i| (1..=produced).contains(&i)).count();
    Ok(HostAudit {
        host: host.to_owned(),
        produced,
        stored_keys: keys,
        samples_total: rec.samples_total,
        missing: produced - distinct_in_range as u64,
        duplicated: per_index.values().map(|n| n - 1).sum::<u64>()
            + keys.saturating_sub(samples.len() as u64),
        unexpected: per_index.keys().filter(|&&i| i > produced || i == 0).count() as u64,
        ..HostAudit::default()
    })
}

/// Opens a sled store, retrying while a just-exited process's lock is released.
fn open_store(path: &Path) -> anyhow::Result<SledStore> {
    let start = Instant::now();
    loop {
        match SledStore::open(path) {
            Ok(s) => return Ok(s),
            Err(e) if start.elapsed() > Duration::from_secs(10) => {
                return Err(e).with_context(|| format!("store {} is unreadable", path.display()));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

/// Seals and acks one agent run logged (run the agent with `agent=debug`).
#[derive(Debug, Default)]
pub struct RunLog {
    /// seq -> samples, for every batch this run sealed.
    pub sealed: BTreeMap<u64, u64>,
    /// Seqs acknowledged as new.
    pub acked_new: BTreeSet<u64>,
    /// Seqs acknowledged as duplicates.
    pub acked_duplicate: BTreeSet<u64>,
}

impl RunLog {
    /// Reads the seal and ack lines of one agent process's log.
    pub fn parse(lines: &[String]) -> Self {
        let mut log = Self::default();
        for l in lines {
            if l.contains("Sealed batch into spool.") {
                if let (Some(seq), Some(n)) = (field(l, "seq"), field(l, "samples")) {
                    log.sealed.insert(seq, n);
                }
            } else if l.contains("Batch acknowledged.")
                && let Some(seq) = field(l, "seq")
            {
                if l.contains("duplicate=true") {
                    log.acked_duplicate.insert(seq);
                } else {
                    log.acked_new.insert(seq);
                }
            }
        }
        log
    }

    /// Batches (and their samples) this run sealed itself and saw acknowledged as duplicates.
    /// Within one connection nothing is sent twice, so each is an acknowledged report that the
    /// aggregator threw away because its seq had been used before.
    pub fn acked_lost(&self) -> (u64, u64) {
        self.sealed
            .iter()
            .filter(|(seq, _)| self.acked_duplicate.contains(seq) && !self.acked_new.contains(seq))
            .fold((0, 0), |(b, s), (_, n)| (b + 1, s + n))
    }
}

/// `name=NUMBER` from a log line.
fn field(line: &str, name: &str) -> Option<u64> {
    let prefix = format!("{name}=");
    line.split_whitespace().find_map(|w| w.strip_prefix(&prefix)).and_then(|v| v.parse().ok())
}

/// Starts an agent for `host` with `config`, logging its seals and acks.
pub fn agent_debug(host: &str, config: &Path) -> anyhow::Result<Proc> {
    let program = binary("flotilla-agent")?;
    Ok(Proc::spawn(
        &format!("agent {host}"),
        &program,
        &["--config", &config.display().to_string(), "--log", "info,agent=debug"],
    ))
}

/// A seeded generator for kill moments (xorshift64*), so a run can be replayed.
#[derive(Debug, Clone)]
pub struct Dice(u64);

impl Dice {
    /// A generator from `seed` (0 is replaced by 1).
    pub fn new(seed: u64) -> Self {
        Self(seed.max(1))
    }

    /// A duration uniform in `lo..hi`.
    pub fn between(&mut self, lo: Duration, hi: Duration) -> Duration {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        let unit = (x.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 / (1u64 << 53) as f64;
        lo + (hi.saturating_sub(lo)).mul_f64(unit)
    }
}

/// Outcome of a kill-cycle scenario.
#[derive(Debug, Clone, Default)]
pub struct CycleReport {
    /// Kill cycles done.
    pub cycles: usize,
    /// One audit per host.
    pub hosts: Vec<HostAudit>,
    /// Wall time of the whole scenario.
    pub seconds: f64,
    /// Batches the killed agents logged as sealed (agent-kill scenario; proves the logs were
    /// read, so `acked_lost_batches == 0` means something).
    pub batches_sealed: u64,
}

impl CycleReport {
    /// Samples produced and not stored, over every host.
    pub fn lost(&self) -> u64 {
        self.hosts.iter().map(|h| h.missing + h.acked_lost_samples).sum()
    }

    /// Samples stored more than once, over every host.
    pub fn duplicated(&self) -> u64 {
        self.hosts.iter().map(|h| h.duplicated).sum()
    }

    /// Whether every host's audit is exact.
    pub fn exact(&self) -> bool {
        self.hosts.iter().all(HostAudit::exact)
    }
}

/// Waits until `agent` has logged "Connected to aggregator." at least `n` times.
fn wait_connects(agent: &Proc, n: usize) {
    crate::eventually(&format!("{} to connect {n} times", agent.name), WAIT, || {
        let c = agent.logs().iter().filter(|l| l.contains("Connected to aggregator.")).count();
        (c >= n).then_some(())
    });
}

/// Waits until the aggregator has stored at least `batches` batches from every host in `hosts`.
fn wait_batches(agg: &Aggregator, hosts: &[String], batches: u64) -> anyhow::Result<()> {
    let start = Instant::now();
    loop {
        let rows = agg.cli_json(&["hosts"]);
        if let Ok(rows) = &rows {
            let done = hosts.iter().all(|h| {
                rows.as_array().into_iter().flatten().any(|r| {
                    r["host"].as_str() == Some(h.as_str())
                        && r["last_seq"].as_u64() >= Some(batches)
                })
            });
            if done {
                return Ok(());
            }
        }
        if start.elapsed() > WAIT {
            bail!("hosts did not reach {batches} stored batches within {WAIT:?}; last: {rows:?}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// SIGKILLs the aggregator `cycles` times while `agents` agents report every `sample_ms`, and
/// restarts it on the same port and store each time; then stops everything cleanly and audits.
pub fn aggregator_kill_cycles(
    cycles: usize,
    agents: usize,
    sample_ms: u64,
    seed: u64,
) -> anyhow::Result<CycleReport> {
    let t0 = Instant::now();
    let mut dice = Dice::new(seed);
    let fleet = Fleet::new();
    let config = fleet.aggregator_config(0);
    let mut agg = Aggregator::start(&config);
    let port = agg.quic.port();
    let config = fleet.aggregator_config(port);
    let hosts: Vec<String> = (1..=agents).map(|i| format!("k{i}")).collect();
    let mut procs = Vec::new();
    for h in &hosts {
        fleet.issue(h);
        procs.push(agent_debug(h, &fleet.agent_config(h, agg.quic, sample_ms))?);
    }
    if let Err(e) = wait_batches(&agg, &hosts, 2) {
        procs.iter().for_each(Proc::dump);
        agg.proc.dump();
        return Err(e);
    }
    for cycle in 1..=cycles {
        // Let ingest run a random while, then kill it with batches in flight.
        std::thread::sleep(dice.between(Duration::from_millis(300), Duration::from_millis(2500)));
        agg.proc.kill();
        std::thread::sleep(dice.between(Duration::ZERO, Duration::from_millis(1000)));
        agg = Aggregator::start(&config);
        // Every agent reconnects to the new process and gets something stored before the next
        // kill, so each cycle really interrupts ingest.
        for p in &procs {
            wait_connects(p, cycle + 1);
        }
    }
    std::thread::sleep(Duration::from_secs(2));
    let mut produced = Vec::new();
    for p in &mut procs {
        if !p.terminate().success() {
            bail!("{} did not stop cleanly", p.name);
        }
        produced.push(crate::samples_produced(p));
    }
    if !agg.proc.terminate().success() {
        bail!("the aggregator did not stop cleanly");
    }
    let mut report = CycleReport { cycles, ..CycleReport::default() };
    // Each agent run spans several aggregator processes here, so a duplicate ack may be an
    // honest retry after a lost ack; the index audit is the exact check.
    for (h, n) in hosts.iter().zip(produced) {
        report.hosts.push(audit_store(&fleet.path().join("store"), h, n)?);
    }
    report.seconds = t0.elapsed().as_secs_f64();
    Ok(report)
}

/// SIGKILLs one agent `cycles` times at random moments while it samples every `sample_ms`
/// (many samples per sealed batch), restarting it on the same spool each time; then stops it
/// cleanly, stops the aggregator and audits.
pub fn agent_kill_cycles(cycles: usize, sample_ms: u64, seed: u64) -> anyhow::Result<CycleReport> {
    let t0 = Instant::now();
    let mut dice = Dice::new(seed);
    let fleet = Fleet::new();
    let mut agg = Aggregator::start(&fleet.aggregator_config(0));
    let host = "crashy";
    fleet.issue(host);
    let config = fleet.agent_config(host, agg.quic, sample_ms);
    let (mut lost_batches, mut lost_samples, mut sealed) = (0, 0, 0);
    for _ in 0..cycles {
        let mut a = agent_debug(host, &config)?;
        wait_connects(&a, 1);
        // Seals happen every second; most runs seal a few batches, some die before the first.
        std::thread::sleep(dice.between(Duration::from_millis(300), Duration::from_millis(3500)));
        a.kill();
        let log = RunLog::parse(&a.logs());
        sealed += log.sealed.len() as u64;
        let (b, s) = log.acked_lost();
        lost_batches += b;
        lost_samples += s;
    }
    // A last run on the same spool delivers the backlog and stops cleanly.
    let mut a = agent_debug(host, &config)?;
    wait_connects(&a, 1);
    std::thread::sleep(Duration::from_secs(3));
    if !a.terminate().success() {
        bail!("{} did not stop cleanly after {cycles} kills", a.name);
    }
    let produced = crate::samples_produced(&a);
    let log = RunLog::parse(&a.logs());
    sealed += log.sealed.len() as u64;
    if sealed == 0 {
        bail!("no \"Sealed batch into spool.\" lines at debug level: the audit cannot see seals");
    }
    let (b, s) = log.acked_lost();
    lost_batches += b;
    lost_samples += s;
    if !agg.proc.terminate().success() {
        bail!("the aggregator did not stop cleanly");
    }
    let mut audit = audit_store(&fleet.path().join("store"), host, produced)?;
    audit.acked_lost_batches = lost_batches;
    audit.acked_lost_samples = lost_samples;
    Ok(CycleReport {
        cycles,
        hosts: vec![audit],
        seconds: t0.elapsed().as_secs_f64(),
        batches_sealed: sealed,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_log_finds_acknowledged_batches_that_were_thrown_away() {
        let lines: Vec<String> = [
            "2026-12-01T15:07:05Z DEBUG agent::sampler: Sealed batch into spool. seq=7 samples=10",
            "2026-12-01T15:07:05Z DEBUG agent::uplink: Batch acknowledged. seq=7 duplicate=true",
            "2026-12-01T15:07:06Z DEBUG agent::sampler: Sealed batch into spool. seq=8 samples=9",
            "2026-12-01T15:07:06Z DEBUG agent::uplink: Batch acknowledged. seq=8 duplicate=false",
            // A batch inherited from the spool and retried: a duplicate ack is honest here.
            "2026-12-01T15:07:06Z DEBUG agent::uplink: Batch acknowledged. seq=6 duplicate=true",
        ]
        .map(String::from)
        .to_vec();
        let log = RunLog::parse(&lines);
        assert_eq!(log.sealed.len(), 2);
        assert_eq!(log.acked_lost(), (1, 10), "seq 7 was sealed here and thrown away as a dup");
    }

    #[test]
    fn audit_is_exact_only_when_every_count_agrees() {
        let exact =
            HostAudit { produced: 5, stored_keys: 5, samples_total: 5, ..HostAudit::default() };
        assert!(exact.exact());
        assert!(!HostAudit { missing: 1, ..exact.clone() }.exact());
        assert!(!HostAudit { duplicated: 1, ..exact.clone() }.exact());
        assert!(!HostAudit { samples_total: 6, ..exact.clone() }.exact());
        assert!(!HostAudit { acked_lost_batches: 1, ..exact }.exact());
    }

    #[test]
    fn dice_stays_in_range_and_replays() {
        let (lo, hi) = (Duration::from_millis(300), Duration::from_millis(3500));
        let a: Vec<_> = (0..100).scan(Dice::new(9), |d, _| Some(d.between(lo, hi))).collect();
        let b: Vec<_> = (0..100).scan(Dice::new(9), |d, _| Some(d.between(lo, hi))).collect();
        assert_eq!(a, b);
        assert!(a.iter().all(|d| (lo..hi).contains(d)));
    }
}
