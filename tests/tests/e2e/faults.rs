//! Network faults between an agent and the aggregator, injected by the loopback UDP relay
//! (`e2e::relay`): loss bursts, random loss, duplication, reordering, then a partition longer
//! than the QUIC idle timeout. After healing, every sample the agent produced is stored exactly
//! once: the CLI's counters and raw points, and the sample indexes read back from the store.

use std::time::Duration;

use e2e::relay::{Faults, Relay};
use e2e::{Aggregator, Fleet, WAIT, agent, eventually, samples_produced};

/// CI length of the partition: longer than the 15 s QUIC idle timeout, so the connection dies.
const PARTITION_CI: Duration = Duration::from_secs(20);

#[test]
fn relay_faults_and_partition_lose_and_duplicate_nothing() {
    faults_then_partition(PARTITION_CI, 0x5eed);
}

/// The full-length variant: `cargo test -p e2e -- --ignored faults::five_minute_partition`.
#[test]
#[ignore = "5-minute partition; run by hand or in the nightly job"]
fn five_minute_partition_loses_and_duplicates_nothing() {
    faults_then_partition(Duration::from_secs(300), 0xfa17);
}

fn faults_then_partition(partition: Duration, seed: u64) {
    let fleet = Fleet::new();
    let agg = Aggregator::start(&fleet.aggregator_config(0));
    let relay = Relay::start(agg.quic, seed).unwrap();
    let host = "lossy";
    fleet.issue(host);
    let mut a = agent(host, &fleet.agent_config(host, relay.addr, 100));
    let connects =
        |a: &e2e::Proc| a.logs().iter().filter(|l| l.contains("Connected to aggregator.")).count();
    let last_seq = || -> u64 {
        agg.cli_json(&["host", host])
            .ok()
            .and_then(|d| d["summary"]["last_seq"].as_u64())
            .unwrap_or(0)
    };
    eventually("the first batches through the relay", WAIT, || (last_seq() >= 2).then_some(()));

    // Loss bursts (each eats a whole batch exchange: the agent sends a few datagrams a
    // second) on top of 5 % random loss, then short blackouts of about a second.
    let start = last_seq();
    relay.set(Faults { drop_prob: 0.05, ..Faults::default() });
    for _ in 0..5 {
        relay.burst(6);
        std::thread::sleep(Duration::from_millis(1500));
        relay.partition(Duration::from_millis(700));
        std::thread::sleep(Duration::from_millis(1000));
    }
    eventually("batches through the loss bursts", WAIT, || (last_seq() > start + 3).then_some(()));
    // Duplication, reordering and jitter, both directions.
    relay.set(Faults {
        drop_prob: 0.02,
        duplicate_prob: 0.2,
        reorder_prob: 0.2,
        reorder_hold: Duration::from_millis(30),
        delay: Duration::from_millis(2),
        jitter: Duration::from_millis(10),
    });
    let start = last_seq();
    std::thread::sleep(Duration::from_secs(5));
    // The phase lasts until the relay has really duplicated and reordered some datagrams (a
    // quiet connection may send few enough that chance alone skips them).
    let exercised = || {
        use std::sync::atomic::Ordering::Relaxed;
        relay.stats.duplicated.load(Relaxed) > 0 && relay.stats.reordered.load(Relaxed) > 0
    };
    eventually("batches through duplication and reordering", WAIT, || {
        (last_seq() > start + 3 && exercised()).then_some(())
    });
    let before_cut = last_seq();

    // Cut: nothing passes for longer than the idle timeout; the agent keeps spooling.
    relay.heal();
    let connected_before = connects(&a);
    relay.partition(partition);
    std::thread::sleep(partition);
    assert!(!relay.partitioned());

    // Healed: the agent reconnects and catches up on its backlog.
    eventually("the agent to reconnect after the partition", WAIT, || {
        (connects(&a) > connected_before).then_some(())
    });
    let backlog = before_cut + partition.as_secs();
    eventually("the backlog to arrive", WAIT, || (last_seq() >= backlog).then_some(()));

    assert!(a.terminate().success(), "the agent did not stop cleanly");
    let produced = samples_produced(&a);
    assert!(produced >= 10 * partition.as_secs(), "produced only {produced} samples");
    let detail = agg.cli_json(&["host", host]).unwrap();
    assert_eq!(detail["summary"]["samples_total"].as_u64(), Some(produced), "stored counter");
    assert_eq!(detail["spool_dropped_samples"], 0);
    let raw =
        agg.cli_json(&["metrics", host, "load1", "--since", "1h", "--resolution", "raw"]).unwrap();
    assert_eq!(raw["points"].as_array().unwrap().len() as u64, produced, "raw points");
    eprintln!("relay: {}", relay.stats.summary());
    assert!(relay.stats.dropped.load(std::sync::atomic::Ordering::Relaxed) > 50);
    assert!(relay.stats.duplicated.load(std::sync::atomic::Ordering::Relaxed) > 0);
    assert!(relay.stats.reordered.load(std::sync::atomic::Ordering::Relaxed) > 0);

    // Exactly once, by sample index, read back from the store itself.
    let mut agg = agg;
    assert!(agg.proc.terminate().success(), "the aggregator did not stop cleanly");
    let audit = e2e::chaos::audit_store(&fleet.path().join("store"), host, produced).unwrap();
    assert!(audit.exact(), "{audit:?}");
}
