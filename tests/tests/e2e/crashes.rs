//! SIGKILL cycles: the aggregator killed during ingest and restarted on the same store, and an
//! agent killed at random moments while sampling fast and restarted on the same spool. No
//! acknowledged report is lost, none is stored twice, and both stores stay readable. Three
//! cycles each here; `bench-chaos --cycles 20` runs the long form.

use e2e::chaos::{agent_kill_cycles, aggregator_kill_cycles};

#[test]
fn aggregator_sigkill_cycles_lose_and_duplicate_nothing() {
    let report = aggregator_kill_cycles(3, 2, 100, 0xa66).unwrap();
    assert!(report.exact(), "{report:#?}");
}

#[test]
fn agent_sigkill_cycles_during_spool_writes_lose_and_duplicate_nothing() {
    let report = agent_kill_cycles(3, 100, 0xa6e).unwrap();
    assert!(report.exact(), "{report:#?}");
}
