//! The aggregator dies hard while agents keep reporting; after a restart nothing is lost and
//! nothing is stored twice. A spool that drops batches while the aggregator is away leaves no
//! dedup state behind.

use std::sync::Arc;
use std::time::Duration;

use e2e::{Aggregator, Fleet, WAIT, agent, eventually, samples_produced};

#[test]
fn aggregator_sigkill_loses_and_duplicates_nothing() {
    let fleet = Fleet::new();
    let mut agg = Aggregator::start(&fleet.aggregator_config(0));
    let port = agg.quic.port();
    let hosts = ["d1", "d2", "d3"];
    let mut agents: Vec<_> = hosts
        .iter()
        .map(|h| {
            fleet.issue(h);
            agent(h, &fleet.agent_config(h, agg.quic, 100))
        })
        .collect();
    eventually("every agent to have stored batches", WAIT, || {
        let rows = agg.cli_json(&["hosts"]).ok()?;
        let rows = rows.as_array()?;
        (rows.len() == 3 && rows.iter().all(|r| r["last_seq"].as_u64() >= Some(2))).then_some(())
    });

    // Kill it mid-stream. Agents keep sampling into their spools and retry.
    agg.proc.kill();
    std::thread::sleep(std::time::Duration::from_secs(3));

    // Restart on the same port and store; agents reconnect and catch up.
    let agg = Aggregator::start(&fleet.aggregator_config(port));
    for a in &agents {
        let connects =
            || a.logs().iter().filter(|l| l.contains("Connected to aggregator.")).count();
        eventually("the agent to reconnect", WAIT, || (connects() >= 2).then_some(()));
    }
    std::thread::sleep(std::time::Duration::from_secs(2));

    // Stop the agents cleanly: each seals and drains what it has, and says how much it made.
    for a in &mut agents {
        assert!(a.terminate().success(), "{} did not stop cleanly", a.name);
    }
    for (h, a) in hosts.iter().zip(&agents) {
        let produced = samples_produced(a);
        assert!(produced >= 40, "{h} produced only {produced} samples");
        let detail = agg.cli_json(&["host", h]).unwrap();
        assert_eq!(
            detail["summary"]["samples_total"].as_u64(),
            Some(produced),
            "{h}: stored sample counter differs from what the agent produced"
        );
        // Count the stored raw samples themselves (each has a distinct key).
        let raw =
            agg.cli_json(&["metrics", h, "load1", "--since", "1h", "--resolution", "raw"]).unwrap();
        assert_eq!(raw["points"].as_array().unwrap().len() as u64, produced, "{h}: raw samples");
        assert_eq!(detail["spool_dropped_samples"], 0);
    }
    // Some batches were retried across the outage and recognised as duplicates, or none were:
    // either way the counts above are exact. The restarted aggregator saw no failures.
    let metrics = e2e::http_get(&agg.api, "/metrics");
    assert_eq!(metric(&metrics, "flotilla_ingest_batches_total{outcome=\"failed\"}"), 0.0);
    assert!(metric(&metrics, "flotilla_ingest_batches_total{outcome=\"stored\"}") > 0.0);
    assert_eq!(metric(&metrics, "flotilla_dedup_seen_seqs"), 0.0);
}

/// Batches dropped at the spool cap while the aggregator is down leave a gap in the seqs; the
/// agent's low seq (Hello and every batch) moves the aggregator's watermark past it, so its
/// `seen` set returns to empty instead of growing with every later batch. Real aggregator
/// process; the agent side is the real spool (with a cap far below the config minimum, to
/// force drops quickly) and the real uplink, in process.
#[test]
fn spool_drops_leave_no_dedup_gap_behind() {
    let fleet = Fleet::new();
    let mut agg = Aggregator::start(&fleet.aggregator_config(0));
    let port = agg.quic.port();
    fleet.issue("g1");
    let config =
        common::config::agent::AgentConfig::load(&fleet.agent_config("g1", agg.quic, 1000))
            .unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let spool_dir = tempfile::tempdir().unwrap();
    let spool = Arc::new(agent::spool::Spool::open(spool_dir.path(), 2000).unwrap());
    let sealed = Arc::new(tokio::sync::Notify::new());
    let seal = |n: usize| {
        for _ in 0..n {
            let now = e2e_now_ms();
            // About 270 bytes each: the 2000-byte spool holds two batches of three.
            let host = common::proto::HostSample {
                cpu_core_util_pct: vec![50.0; 64],
                ..Default::default()
            };
            let samples: Vec<_> = (0..3)
                .map(|i| common::proto::Sample {
                    unix_ms: now + i,
                    host: Some(host.clone()),
                    ..Default::default()
                })
                .collect();
            spool.append(&samples).unwrap();
            sealed.notify_one();
        }
    };
    let stop = tokio_util::sync::CancellationToken::new();
    let uplink = {
        let _guard = rt.enter();
        let endpoint = agent::client_endpoint(&config).unwrap();
        rt.spawn(
            agent::uplink::Uplink {
                endpoint,
                config: config.uplink.clone(),
                spool: spool.clone(),
                hello: common::proto::Hello {
                    min_version: common::proto::MIN_VERSION,
                    max_version: common::proto::MAX_VERSION,
                    spool_epoch: spool.epoch(),
                    ..Default::default()
                },
                sealed: sealed.clone(),
                drain_grace: Duration::from_secs(2),
                directives: Arc::new(agent::downlink::Directives {
                    ledger: agent::ledger::Ledger::open(&spool).unwrap(),
                    actuator: agent::actuator::Actuator::default(),
                }),
                health: Arc::default(),
            }
            .run(stop.clone()),
        )
    };
    let host = |agg: &Aggregator| agg.cli_json(&["host", "g1"]).ok();
    seal(2);
    eventually("seqs 1 and 2 to be stored", WAIT, || {
        (host(&agg)?["summary"]["last_seq"].as_u64()? == 2).then_some(())
    });

    // The aggregator goes away; the spool keeps only the newest batches.
    agg.proc.kill();
    seal(12);
    let stats = spool.stats();
    assert!(stats.dropped_batches >= 8, "the cap should have dropped batches: {stats:?}");

    // Back on the same port and store: the agent reconnects and sends what it still holds.
    let agg = Aggregator::start(&fleet.aggregator_config(port));
    eventually("seq 14 to be stored", WAIT, || {
        (host(&agg)?["summary"]["last_seq"].as_u64()? == 14).then_some(())
    });
    seal(5);
    eventually("seq 19 to be stored", WAIT, || {
        (host(&agg)?["summary"]["last_seq"].as_u64()? == 19).then_some(())
    });
    let detail = host(&agg).unwrap();
    assert_eq!(detail["dedup_seen"], 0, "seen must return to empty: {detail:#}");
    assert_eq!(detail["spool_dropped_batches"].as_u64(), Some(spool.stats().dropped_batches));
    let metrics = e2e::http_get(&agg.api, "/metrics");
    assert_eq!(metric(&metrics, "flotilla_dedup_seen_seqs"), 0.0);
    stop.cancel();
    rt.block_on(uplink).unwrap();
}

fn e2e_now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// The value of the sample line `name{labels}` in Prometheus text; fails when it is missing.
fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {series} in\n{text}"))
}
